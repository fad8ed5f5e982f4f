"""Where the time of a ToMe-patched ViT forward goes: ``vtok-fast bench tome --profile``.

One forward of a random-init timm ViT-B/16 (eval, fp16 on CUDA at B=256, fp32 on CPU at B=8)
under ``torch.profiler``, unpatched and patched at r=16. Every profiled op's self time is put in
one bucket (attention, linear layers, merge ops: ToMe's score / plan / merge, norms, the rest);
the shares are printed and saved to ``tome_profile_<cpu|gpu>.json`` in ``--out`` (default
``harness.default_out_dir()``: ``bench/results`` from the checkout).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vtok_fast.bench.harness import default_out_dir, results_path

BUCKETS = ("attention", "linear", "merge", "norm", "other")
# substrings of profiler op names (lower case), first match wins
_RULES = (
    ("merge", ("tome", "index_add", "index_select", "index_copy", "bincount", "argsort", "sort", "gather")),
    ("attention", ("attention", "attn_fwd", "flash", "efficient", "softmax", "bmm", "baddbmm")),
    ("linear", ("addmm", "linear", "matmul", "gemm", "mm")),
    ("norm", ("layer_norm", "layernorm", "norm")),
)


def bucket_of(name: str) -> str:
    """The bucket a profiler event's name belongs to."""
    low = name.lower()
    for bucket, keys in _RULES:
        if any(k in low for k in keys):
            return bucket
    return "other"


def _shares(prof, device_type: str) -> dict:
    totals = dict.fromkeys(BUCKETS, 0.0)
    for evt in prof.key_averages():
        if device_type == "cuda":
            t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        else:
            t = evt.self_cpu_time_total
        if t > 0:
            totals[bucket_of(evt.key)] += t
    total = sum(totals.values()) or 1.0
    return {"total_ms": total / 1e3, **{b: totals[b] / total for b in BUCKETS}}


def profile(device, *, batch: int | None = None, r: int = 16) -> dict:
    """``{"unpatched": shares, "patched": shares, ...}`` of one forward each (after a warm-up)."""
    import timm

    import vtok_fast.patch

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    batch = batch or (256 if cuda else 8)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    out = {"device": str(device), "batch": batch, "dtype": str(dtype), "r": r}
    for label in ("unpatched", "patched"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(device, dtype)
        if label == "patched":
            vtok_fast.patch.timm(model, tome_r=r, fuse_embed=False)
        with torch.no_grad():
            model(images)  # warm-up: autotuning and compilation stay out of the profile
            if cuda:
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as prof:
                model(images)
                if cuda:
                    torch.cuda.synchronize()
        out[label] = _shares(prof, device.type)
    return out


def format_profile(result: dict) -> str:
    lines = [f"ToMe profile: ViT-B/16, B={result['batch']}, {result['dtype']}, r={result['r']}, {result['device']}",
             f"{'':10s} {'total ms':>9s} " + " ".join(f"{b:>9s}" for b in BUCKETS)]
    for label in ("unpatched", "patched"):
        row = result[label]
        lines.append(f"{label:10s} {row['total_ms']:9.1f} " + " ".join(f"{100 * row[b]:8.1f}%" for b in BUCKETS))
    return "\n".join(lines)


def run(device, out_dir: str | None = None, quick: bool = False) -> Path:
    """Profile, print, and write ``tome_profile_<cpu|gpu>[_quick].json`` in ``out_dir`` (default
    ``harness.default_out_dir()``); returns its path."""
    out_dir = default_out_dir() if out_dir is None else out_dir
    result = profile(device, batch=2 if quick else None)
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(format_profile(result))
    path = results_path("tome_profile", torch.device(device), out_dir, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"profile written to {path}")
    return path
