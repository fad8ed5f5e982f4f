"""Patch-embedding benchmark: the fused op against the unfused paths, in one run.

Providers: ``vtok_fast`` (:func:`vtok_fast.patch_embed`); ``eager`` (the shared reference
``patch_embed_reference``: normalize, Conv2d, flatten, transpose, cat, add, exactly as timm / HF
do it); ``torch.compile`` of that eager path; ``timm`` (a real tiny timm ``VisionTransformer``
carrying the same weights, timed as ``m._pos_embed(m.patch_embed(x))``; uint8 pixels are
normalized in eager PyTorch first, as a timm user does).

Cases: ViT-B/16@224 (cls token, bias) and CLIP-L/14@336 (cls token, no bias), at the issue's
batches on CUDA (256 / 64, bf16) and reduced batches on CPU (32 / 8, fp32; the batch is in the
case name), B=1 latency for both, and uint8 pixels with mean/std. ``flops = 2 B N D K``.
"""
from __future__ import annotations

import torch

from vtok_fast.bench.harness import Case, Provider, find_median, find_result, verdict

OP = "patch-embed"
MODES = ("forward", "backward", "full")

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BF16_PEAK_TFLOPS = 990.0  # H100/H200 dense bf16
TARGET_CASE = "vit_b16_224_B256"
TARGETS = {"cpu_vs_timm": 1.0, "gpu_vs_eager": 2.0, "gpu_vs_compile": 1.3}

# name -> (image side, patch, embed dim, bias)
MODELS = {"vit_b16_224": (224, 16, 768, True), "clip_l14_336": (336, 14, 1024, False)}


def _make_inputs(model: str, batch: int, uint8: bool):
    side, p, dim, bias = MODELS[model]

    def make(device: torch.device) -> dict:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        n = (side // p) ** 2
        if uint8:
            images = torch.randint(0, 256, (batch, 3, side, side), generator=gen, dtype=torch.uint8)
        else:
            images = torch.randn(batch, 3, side, side, generator=gen).to(dtype)
        params = dict(
            weight=torch.randn(dim, 3, p, p, generator=gen) * 0.02,
            bias=torch.randn(dim, generator=gen) * 0.02 if bias else None,
            pos_embed=torch.randn(1, n + 1, dim, generator=gen) * 0.02,
            prefix=torch.randn(1, 1, dim, generator=gen) * 0.02,
        )
        params = {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in params.items()}
        return dict(images=images.to(device), model=model, dtype=dtype, uint8=uint8,
                    mean=MEAN if uint8 else None, std=STD if uint8 else None, **params)
    return make


def _case(model: str, batch: int, uint8: bool = False, modes=None) -> Case:
    side, p, dim, bias = MODELS[model]
    n, k = (side // p) ** 2, 3 * p * p
    name = f"{model}_B{batch}" + ("_uint8" if uint8 else "")
    params = {"B": batch, "img": side, "patch": p, "D": dim, "K": k, "N": n, "prefix": 1,
              "bias": bias, "uint8": uint8}
    return Case(name, params, _make_inputs(model, batch, uint8), flops=2.0 * batch * n * dim * k,
                modes=modes)


def cases(quick: bool, device) -> list[Case]:
    if quick:
        return [_case("vit_b16_224", 2), _case("clip_l14_336", 1, uint8=True, modes=("forward",))]
    gpu = torch.device(device).type == "cuda"
    vit_batch, clip_batch = (256, 64) if gpu else (32, 8)
    return [
        _case("vit_b16_224", vit_batch),
        _case("vit_b16_224", vit_batch, uint8=True, modes=("forward",)),
        _case("clip_l14_336", clip_batch),
        _case("vit_b16_224", 1),
        _case("clip_l14_336", 1),
    ]


# --- providers -----------------------------------------------------------------------------------

def _op_args(inputs):
    return (inputs["images"], inputs["weight"], inputs["bias"], inputs["pos_embed"], inputs["prefix"])


def _vtok(inputs):
    from vtok_fast.encode.patch_embed import patch_embed

    args, mean, std = _op_args(inputs), inputs["mean"], inputs["std"]
    if mean is not None:  # per-channel constants live on the device, as a model would hold them
        mean = torch.tensor(mean, device=args[0].device)
        std = torch.tensor(std, device=args[0].device)
    return lambda: patch_embed(*args, mean=mean, std=std)


def _eager(inputs):
    from vtok_fast.encode.patch_embed import patch_embed_reference

    args, mean, std = _op_args(inputs), inputs["mean"], inputs["std"]
    return lambda: patch_embed_reference(*args, mean=mean, std=std)


def _compiled(inputs):
    from vtok_fast.encode.patch_embed import patch_embed_reference

    # one graph per (case, grad mode): keep them all
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fn = torch.compile(patch_embed_reference, fullgraph=True)
    args, mean, std = _op_args(inputs), inputs["mean"], inputs["std"]
    return lambda: fn(*args, mean=mean, std=std)


def _timm(inputs):
    from timm.models.vision_transformer import VisionTransformer

    side, p, dim, bias = MODELS[inputs["model"]]
    model = VisionTransformer(img_size=side, patch_size=p, embed_dim=dim, depth=1, num_heads=dim // 64,
                              num_classes=0, pre_norm=not bias)
    model = model.to(inputs["weight"].device, inputs["dtype"])
    with torch.no_grad():  # same weights; the timm module trains its own copies
        model.patch_embed.proj.weight.copy_(inputs["weight"])
        if bias:
            model.patch_embed.proj.bias.copy_(inputs["bias"])
        model.cls_token.copy_(inputs["prefix"])
        model.pos_embed.copy_(inputs["pos_embed"])
    images, dtype = inputs["images"], inputs["dtype"]
    if inputs["uint8"]:
        mean = torch.tensor(inputs["mean"], device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(inputs["std"], device=images.device).view(1, -1, 1, 1)

        def run():
            x = ((images.float() / 255 - mean) / std).to(dtype)
            return model._pos_embed(model.patch_embed(x))
        return run
    return lambda: model._pos_embed(model.patch_embed(images))


def providers(device) -> list[Provider]:
    return [
        Provider("vtok_fast", _vtok),
        Provider("eager", _eager),
        Provider("torch.compile", _compiled),
        Provider("timm", _timm),
    ]


# --- targets -------------------------------------------------------------------------------------

def summarize(results, device, quick: bool = False) -> tuple[str, dict]:
    """The issue's targets: CPU time ratio vs timm (<= 1.0); GPU bf16 forward speedup at
    ViT-B/16@224 B=256 vs eager (>= 2x) and torch.compile (>= 1.3x); TFLOP/s vs the bound.
    A quick run prints no verdict (``cpu_target_met`` None)."""
    lines, summary = [], {}
    gpu = torch.device(device).type == "cuda"
    cases_seen = list(dict.fromkeys(r.case for r in results))
    if not gpu:
        lines.append(f"CPU target: vtok_fast / timm time ratio <= {TARGETS['cpu_vs_timm']:.1f}")
        ratios = {}
        for case in cases_seen:
            for mode in MODES:
                ours, timm = find_median(results, case, "vtok_fast", mode), find_median(results, case, "timm", mode)
                if ours and timm:
                    ratios[f"{case}/{mode}"] = ours / timm
                    judged = verdict(ours / timm <= TARGETS["cpu_vs_timm"], quick, failed="MISSED")
                    lines.append(f"  {case:<26} {mode:<8} ratio {ours / timm:.2f}  {judged}")
        summary["cpu_ratio_vs_timm"] = ratios
        summary["cpu_target_met"] = None if quick else (
            bool(ratios) and all(v <= TARGETS["cpu_vs_timm"] for v in ratios.values()))
        return "\n".join(lines), summary
    vt = find_result(results, TARGET_CASE, "vtok_fast", "forward")
    if vt is None:
        return f"GPU targets: case {TARGET_CASE} did not run", summary
    ours, tflops = vt.median_ms, vt.tflops  # the harness derives TFLOP/s from the case's flops
    eager = find_median(results, TARGET_CASE, "eager", "forward")
    compiled = find_median(results, TARGET_CASE, "torch.compile", "forward")
    summary.update(target_case=TARGET_CASE, forward_ms=ours, tflops=tflops,
                   fraction_of_peak=tflops / BF16_PEAK_TFLOPS)
    lines.append(f"GPU targets at {TARGET_CASE} (bf16 forward): {ours:.3f} ms, {tflops:.0f} TFLOP/s "
                 f"= {100 * tflops / BF16_PEAK_TFLOPS:.0f}% of the {BF16_PEAK_TFLOPS:.0f} TFLOP/s bound")
    for name, base, key in (("eager", eager, "gpu_vs_eager"), ("torch.compile", compiled, "gpu_vs_compile")):
        if base:
            speedup = base / ours
            summary[f"speedup_vs_{name}"] = speedup
            judged = verdict(speedup >= TARGETS[key], quick, failed="MISSED")
            lines.append(f"  speedup vs {name:<14} {speedup:.2f}x (target >= {TARGETS[key]}x)  {judged}")
    return "\n".join(lines), summary
