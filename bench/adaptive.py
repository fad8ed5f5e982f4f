"""Adaptive patch sizes benchmark (``vtok-fast bench adaptive``), forward only.

Inputs are the shipped sample image (``vtok_fast/data``) resized to the case's side, flipped and
shifted per batch element, as uint8 pixels (normalized inside the embedding).

1. **Tokenize** (entropy + quadtree selection + embedding + packing): ``adaptive_tokenize``
   (``vtok_fast``: the entropy kernel, vectorized selection, the fused patch embedding of the
   chosen patches only) against ``adaptive_tokenize_reference`` (``reference``: eager PyTorch,
   ``scatter_add`` histograms and a ``conv2d`` of every scale's whole image), B=32 at 336² (p=14,
   three scales, thresholds [6.0, 4.0], D=1024: ViT-L/14) and 1024² (p=16, D=768).
2. **Entropy** alone (the score of every patch at every scale, one launch): ``patch_entropy``
   against the eager reference and its ``torch.compile`` (CPU tensors run the reference on the
   PyTorch path, so there the ratio is ~1).
3. **ViT forward**: random-init timm ViT-B/16 on packed adaptive tokens (``PackedViT``:
   tokenize + blocks with block-diagonal attention + head; three scales, thresholds [6.0, 4.0])
   against the model's own fixed-grid forward of the same uint8 batch (``timm``, normalization
   included). B=8 on CPU, 32 on GPU.

The summary prints the token reduction on the sample image at every case's resolution and the
speed ratios measured in the run.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from vtok_fast.bench.harness import Case, Provider

OP = "adaptive"
MODES = ("forward",)

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm ViT-B/16 (augreg)
TOKENIZE = {  # case name: (side, patch, width, thresholds)
    "tokenize_336": (336, 14, 1024, (6.0, 4.0)),
    "tokenize_1024": (1024, 16, 768, (6.0, 4.0)),
}
MODEL, MODEL_SIDE, MODEL_THRESHOLDS = "vit_base_patch16_224", 224, (6.0, 4.0)


@functools.lru_cache(maxsize=None)
def _sample(side: int) -> torch.Tensor:
    from vtok_fast.measure.demo import load_image, sample_image_path

    image, _ = load_image(sample_image_path())
    x = F.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8)


def sample_batch(batch: int, side: int) -> torch.Tensor:
    """``(batch, 3, side, side)`` uint8: the sample, flipped / shifted per element."""
    base = _sample(side)
    shots = []
    for i in range(batch):
        x = base.flip(-1) if i % 2 else base
        shots.append(x.roll(shifts=(7 * (i // 2), 5 * (i // 2)), dims=(1, 2)))
    return torch.stack(shots)


def _weights(width: int, patch: int, device):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(width, 3, patch, patch, generator=gen) / (3 * patch * patch) ** 0.5
    return w.to(device), torch.zeros(width, device=device)


def sample_tokens(side: int, patch: int, thresholds, num_scales: int = 3) -> int:
    """Adaptive tokens of the sample image at ``side`` px (no prefix)."""
    from vtok_fast.encode.adaptive import adaptive_tokenize

    w, _ = _weights(8, patch, "cpu")
    return int(adaptive_tokenize(_sample(side)[None], w, num_scales=num_scales,
                                 thresholds=list(thresholds)).counts[0])


def _tokenize_inputs(batch, side, patch, width, thresholds):
    def make(device):
        w, b = _weights(width, patch, device)
        return {"kind": "tokenize", "images": sample_batch(batch, side).to(device), "weight": w, "bias": b,
                "thresholds": list(thresholds)}
    return make


def _entropy_inputs(batch, side):
    def make(device):
        return {"kind": "entropy", "images": sample_batch(batch, side).to(device)}
    return make


def _model_inputs(batch):
    def make(device):
        return {"kind": "model", "images": sample_batch(batch, MODEL_SIDE).to(device), "device": device}
    return make


def cases(quick: bool, device) -> list[Case]:
    gpu = torch.device(device).type == "cuda"
    batch = 2 if quick else 32
    model_batch = 2 if quick else (32 if gpu else 8)
    out = []
    for name, (side, patch, width, thr) in TOKENIZE.items():
        side = min(side, 336 if quick else side)
        params = {"B": batch, "side": side, "patch": patch, "D": width, "scales": 3, "thresholds": list(thr),
                  "sample_tokens": sample_tokens(side, patch, thr), "fixed_tokens": (side // patch) ** 2}
        out.append(Case(name, params, _tokenize_inputs(batch, side, patch, width, thr)))
    out.append(Case("entropy_1024", {"B": batch, "side": 336 if quick else 1024, "patch": 16, "scales": 3},
                    _entropy_inputs(batch, 336 if quick else 1024)))
    params = {"B": model_batch, "model": MODEL, "img": MODEL_SIDE, "scales": 3,
              "thresholds": list(MODEL_THRESHOLDS),
              "sample_tokens": sample_tokens(MODEL_SIDE, 16, MODEL_THRESHOLDS),
              "fixed_tokens": (MODEL_SIDE // 16) ** 2}
    out.append(Case("vit_b16_packed", params, _model_inputs(model_batch)))
    return out


# --- providers -----------------------------------------------------------------------------------

def _tokenize(inputs, fn_name):
    if inputs["kind"] != "tokenize":
        return None
    from vtok_fast.encode import adaptive

    fn = getattr(adaptive, fn_name)
    images, w, b, thr = inputs["images"], inputs["weight"], inputs["bias"], inputs["thresholds"]
    return lambda: fn(images, w, b, num_scales=3, thresholds=thr, mean=MEAN, std=STD).tokens


def _entropy(inputs, how):
    if inputs["kind"] != "entropy":
        return None
    from vtok_fast.encode.adaptive import _patch_entropy_op, patch_entropy_reference

    images = inputs["images"]
    if how == "vtok_fast":
        return lambda: _patch_entropy_op(images, 16, 3)
    if how == "reference":
        return lambda: patch_entropy_reference(images, 16, 3)
    compiled = torch.compile(patch_entropy_reference)

    def run():
        with warnings.catch_warnings():  # dynamo notes that it traces through the table's lru_cache
            warnings.filterwarnings("ignore", message=".*lru_cache")
            return compiled(images, 16, 3)
    return run


@functools.lru_cache(maxsize=2)
def _vit(device_type: str):
    import timm

    return timm.create_model(MODEL, pretrained=False).eval().to(device_type)


def _model(inputs, packed: bool):
    if inputs["kind"] != "model":
        return None
    try:
        model = _vit(inputs["device"].type)
    except ImportError:
        return None
    images = inputs["images"]
    if packed:
        from vtok_fast.encode.packed_vit import PackedViT

        wrapper = PackedViT(model)
        return lambda: wrapper(wrapper.tokenize(images, num_scales=3, thresholds=list(MODEL_THRESHOLDS),
                                                mean=MEAN, std=STD))
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return lambda: model((images.float() / 255 - mean) / std)


def providers(device=None) -> list[Provider]:
    return [
        Provider("vtok_fast", lambda inp: _tokenize(inp, "adaptive_tokenize") or _entropy(inp, "vtok_fast")
                 or _model(inp, packed=True), modes=MODES),
        Provider("reference", lambda inp: _tokenize(inp, "adaptive_tokenize_reference")
                 or _entropy(inp, "reference"), modes=MODES),
        Provider("torch.compile", lambda inp: _entropy(inp, "compiled"), modes=MODES),
        Provider("timm", lambda inp: _model(inp, packed=False), modes=MODES),
    ]


def summarize(results, device, quick: bool = False) -> tuple[str, dict]:
    """Token reduction on the sample image and the ratios of the run: ``reference`` (or
    ``torch.compile``) time / ``vtok_fast`` time; for the ViT, images/s packed vs fixed grid. No
    target, so no verdict, quick run or not."""
    times = {(r.case, r.provider): r.median_ms for r in results if r.median_ms}
    params = {r.case: r.params for r in results}
    lines, summary = ["Adaptive tokenization"], {}
    for case, p in params.items():
        if "sample_tokens" in p:
            kept = p["sample_tokens"] / p["fixed_tokens"]
            summary[f"{case}_sample_tokens"] = p["sample_tokens"]
            lines.append(f"  sample image at {p.get('side', p.get('img'))} px, patch {p.get('patch', 16)}: "
                         f"{p['sample_tokens']} tokens instead of {p['fixed_tokens']} ({100 * (1 - kept):.0f} % fewer)")
    for case in params:
        ours = times.get((case, "vtok_fast"))
        for baseline in ("reference", "torch.compile"):
            base = times.get((case, baseline))
            if ours and base:
                summary[f"{case}_vs_{baseline}"] = base / ours
                lines.append(f"  {case}: {base / ours:.2f}x vs {baseline} ({base:.1f} vs {ours:.1f} ms)")
        base = times.get((case, "timm"))
        if ours and base:
            batch = params[case]["B"]
            summary[f"{case}_speedup"] = base / ours
            summary[f"{case}_images_per_s"] = batch / ours * 1e3
            lines.append(f"  {case} B={batch}: {batch / ours * 1e3:.1f} img/s on packed adaptive tokens vs "
                         f"{batch / base * 1e3:.1f} on the fixed grid = {base / ours:.2f}x")
        elif case == "vit_b16_packed":
            lines.append(f"  {case}: not measured (timm unavailable)")
    return "\n".join(lines), {"summary": summary}
