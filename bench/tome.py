"""ToMe benchmark: op level and model level in one run.

Op level: ``vtok_fast.tome_merge`` against the reference PyTorch ToMe
(``bipartite_soft_matching`` + ``merge_wavg`` from ``vtok_fast/reduce/tome_reference.py``), r = 16, metric
``(B, N, 64)`` (ViT keys averaged over heads): ViT-B/16 (B=256, N=197, C=768) and
ViT-L/14@336 (B=64, N=577, C=1024).

Model level: random-init timm ``vit_base_patch16_224`` in eval mode, forward only: unpatched
(``timm``) against ``vtok_fast.patch.timm(model, tome_r=..., fuse_embed=False)`` at r=16
(``vtok_fast``) and r=(16, -1) (``vtok_fast_r16_-1``). B=32 on CPU (fp32), B=256 on GPU (fp16).
"""
from __future__ import annotations

import torch

from vtok_fast.bench.harness import Case, Provider, verdict

OP = "tome"
MODES = ("forward", "full")

R = 16
METRIC_DIM = 64
MODEL = "vit_base_patch16_224"

# targets from the issue: (op level, model level at r=16), speedup over the baseline
TARGETS = {"cpu": (1.0, 1.8), "cuda": (3.0, 2.0)}


def _op_inputs(batch: int, tokens: int, channels: int):
    def make(device: torch.device) -> dict:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, tokens, channels, generator=gen).to(device, dtype).requires_grad_()
        metric = torch.randn(batch, tokens, METRIC_DIM, generator=gen).to(device, dtype)
        return {"kind": "op", "x": x, "metric": metric}
    return make


def _model_inputs(batch: int):
    def make(device: torch.device) -> dict:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return {"kind": "model", "images": images.to(device, dtype), "device": device, "dtype": dtype}
    return make


def cases(quick: bool, device) -> list[Case]:
    gpu = torch.device(device).type == "cuda"
    if quick:
        op_shapes = [("vit_b16_op", 8, 197, 768), ("vit_l14_336_op", 2, 577, 1024)]
        model_batch = 2
    else:
        op_shapes = [("vit_b16_op", 256, 197, 768), ("vit_l14_336_op", 64, 577, 1024)]
        model_batch = 256 if gpu else 32
    out = [Case(name, {"B": b, "N": n, "C": c, "Cm": METRIC_DIM, "r": R}, _op_inputs(b, n, c))
           for name, b, n, c in op_shapes]
    out.append(Case("vit_b16_model", {"B": model_batch, "model": MODEL, "img": 224},
                    _model_inputs(model_batch), modes=("forward",)))
    return out


# --- op-level providers ---------------------------------------------------------------------------

def _vtok_op(inputs):
    if inputs["kind"] != "op":
        return None
    from vtok_fast.reduce.tome import tome_merge

    x, metric = inputs["x"], inputs["metric"]
    return lambda: tome_merge(x, metric, R, class_token=True)[0]


def _reference_op(inputs):
    if inputs["kind"] != "op":
        return None
    from vtok_fast.reduce.tome_reference import bipartite_soft_matching, merge_wavg

    x, metric = inputs["x"], inputs["metric"]

    def run():
        merge, _ = bipartite_soft_matching(metric, R, class_token=True)
        return merge_wavg(merge, x)[0]
    return run


# --- model-level providers --------------------------------------------------------------------------

def _model(inputs, tome_r):
    """Forward closure of a random-init ViT-B/16, patched with ``tome_r`` unless None; None when
    timm or the ToMe patcher (``vtok_fast.patch.timm_tome``) is not available."""
    if inputs["kind"] != "model":
        return None
    try:
        import timm

        import vtok_fast.patch
        if tome_r is not None:
            import vtok_fast.patch.timm_tome  # noqa: F401
    except ImportError:
        return None
    model = timm.create_model(MODEL, pretrained=False).eval().to(inputs["device"], inputs["dtype"])
    if tome_r is not None:
        vtok_fast.patch.timm(model, tome_r=tome_r, fuse_embed=False)
    images = inputs["images"]
    return lambda: model(images)


def providers(device=None) -> list[Provider]:
    return [
        Provider("vtok_fast", lambda inp: _vtok_op(inp) or _model(inp, R)),
        Provider("reference", _reference_op),
        Provider("vtok_fast_r16_-1", lambda inp: _model(inp, (R, -1.0)), modes=("forward",)),
        Provider("timm", lambda inp: _model(inp, None), modes=("forward",)),
    ]


def flop_ceiling(r, *, num_tokens: int = 197, dim: int = 768, depth: int = 12, protected: int = 1,
                 patch_pixels: int = 3 * 16 * 16, num_classes: int = 1000) -> float:
    """FLOPs of the unpatched ViT forward over those of the merged one (the speedup merging can
    give at most), counted from the token counts per block: block i runs qkv, attention and proj
    on N_i tokens (``8 N D^2 + 4 N^2 D``) and the MLP on ``N_i - r_i`` (``16 (N - r) D^2``); the
    patch embedding and the head are the same on both sides."""
    from vtok_fast.patch.tome_common import schedule
    from vtok_fast.reduce.tome_reference import capped_r

    fixed = 2 * (num_tokens - protected) * patch_pixels * dim + 2 * dim * num_classes

    def forward_flops(sched):
        total, n = fixed, num_tokens
        for r in sched:
            r = capped_r(r, n, protected)
            total += 8 * n * dim * dim + 4 * n * n * dim + 16 * (n - r) * dim * dim
            n -= r
        return total

    return forward_flops((0,) * depth) / forward_flops(schedule(r, depth))


def summarize(results, device, quick: bool = False) -> tuple[str, dict]:
    """Speedups against the issue's targets: op level (reference / vtok_fast, forward) and model
    level (unpatched timm / patched, images/s ratio); a quick run: no verdict."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    op_target, model_target = TARGETS[kind]
    times = {(r.case, r.provider, r.mode): r.median_ms for r in results if r.median_ms}
    lines, summary = [f"ToMe targets on {kind}: op level >= {op_target}x, model level (r=16) >= {model_target}x"], {}

    for case in sorted({r.case for r in results if r.case.endswith("_op")}):
        for mode in MODES:
            ours, ref = times.get((case, "vtok_fast", mode)), times.get((case, "reference", mode))
            if ours and ref:
                ratio = ref / ours
                summary[f"{case}_{mode}_speedup"] = ratio
                judged = "" if mode != "forward" else f" {verdict(ratio >= op_target, quick)}"
                lines.append(f"  op {case} {mode}: {ratio:.2f}x vs reference{judged}")

    batch = next((r.params["B"] for r in results if r.case == "vit_b16_model"), None)
    base = times.get(("vit_b16_model", "timm", "forward"))
    for provider, label, target in [("vtok_fast", "r=16", model_target), ("vtok_fast_r16_-1", "r=(16,-1)", None)]:
        ours = times.get(("vit_b16_model", provider, "forward"))
        if not (base and ours):
            lines.append(f"  model ViT-B/16 {label}: not measured (timm or the ToMe patcher unavailable)")
            continue
        ratio = base / ours
        ceiling = flop_ceiling(R if provider == "vtok_fast" else (R, -1.0))
        summary[f"model_{label}_speedup"] = ratio
        summary[f"model_{label}_images_per_s"] = batch / ours * 1e3
        summary[f"model_{label}_flop_ceiling"] = ceiling
        summary[f"model_{label}_fraction_of_ceiling"] = ratio / ceiling
        judged = "" if target is None else f" {verdict(ratio >= target, quick)}"
        lines.append(f"  model ViT-B/16 B={batch} {label}: {batch / ours * 1e3:.1f} img/s vs "
                     f"{batch / base * 1e3:.1f} unpatched = {ratio:.2f}x{judged}; FLOP ceiling "
                     f"{ceiling:.2f}x, {100 * ratio / ceiling:.0f} % of it reached")
    return "\n".join(lines), {"summary": summary}
