"""Prefill of every VLM family with fewer image tokens (``vtok-fast bench vlm``).

For each family of ``vtok_fast.patch.families`` (and LLaVA-1.5) a random-weight model with the
widths and heads of a deployed checkpoint (``vlm_zoo.real_width``: 2 vision and 2 text layers)
runs one prefill (``model(**inputs)``, the forward ``generate`` starts with) on the astronaut
photograph through the family's real processor. Measured side by side on one machine, in one run:

- the unpatched model (1x);
- ``vtok_fast.patch.hf(model, compress=...)``: on the CPU ``tome`` at 2x, 4x and 8x (``ratio``
  1/2, 1/4, 1/8 of each unit), and ``dart``, ``pool`` (stride 2), ``attn_topk`` (the tower's
  attention) and FastV (layer 1 of 2, ratio 3/4) at 4x; on a GPU every one of them at 2x, 4x and
  8x (pool: 4x).

Per point: the prefill time and its speedup over the unpatched model; the FLOPs of the forward
(``torch.utils.flop_counter``) and the FLOP ceiling (unpatched FLOPs / these FLOPs: the speedup a
prefill bound by its FLOPs would reach); the fraction of that ceiling reached; the peak memory of
the forward; the selection's overhead (the time inside ``family_units.compress_units``, or
LLaVA-1.5's ``hf_compress._compress_features``, as a share of the compressed prefill; FastV's
scoring runs inside the attention of its layer and is not separated). Targets
(CPU): >= 90 % of the ceiling at 4x, overhead <= 5 %, peak memory never above the unpatched
model's. The CPU setting scales the photograph so each family's language model sees a few hundred
image tokens (a prefill of seconds on 2 cores); the GPU setting uses 1080 x 1920.
"""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from pathlib import Path

import torch

SETTINGS = {  # (H, W) of the photograph per family; None: the family's own
    "cpu": {"llava": (336, 336), "llava_next": (336, 336), "llava_onevision": (384, 384),
            "qwen2_vl": (336, 504), "qwen2_5_vl": (336, 504), "qwen3_vl": (384, 576), "internvl": (448, 448),
            "gemma3": (896, 896), "idefics3": (364, 364), "smolvlm": (512, 512)},
    "cuda": {family: (1080, 1920) for family in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
                                                  "qwen3_vl", "internvl", "gemma3", "idefics3", "smolvlm")},
}
POINTS = [("tome", {"ratio": 0.5}, 2), ("tome", {"ratio": 0.25}, 4), ("tome", {"ratio": 0.125}, 8),
          ("dart", {"ratio": 0.25}, 4), ("pool", {"stride": 2}, 4), ("attn_topk", {"ratio": 0.25}, 4),
          ("fastv", {"layer": 1, "ratio": 0.75}, 4)]
# the GPU run sweeps every method over 2x, 4x and 8x
GPU_POINTS = [(m, {"ratio": r}, x) for m in ("tome", "dart", "attn_topk") for r, x in ((0.5, 2), (0.25, 4), (0.125, 8))] + [
    ("pool", {"stride": 2}, 4)] + [("fastv", {"layer": 1, "ratio": 1 - 1 / x}, x) for x in (2, 4, 8)]
QUICK_POINTS = [POINTS[1], POINTS[4]]
PHOTO = Path(__file__).resolve().parent.parent / "tests" / "data" / "astronaut_64x48.png"
TARGET_CEILING, TARGET_OVERHEAD = 0.9, 0.05


def _model(family: str, quick: bool, device: torch.device):
    import transformers

    from vtok_fast.bench import vlm_zoo

    if quick:
        return vlm_zoo.tiny(family).to(device)
    config = vlm_zoo.real_width(family)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, vlm_zoo.FAMILIES[family].model_class)._from_config(
            config, attn_implementation="sdpa", dtype=dtype)
    return model.eval().to(device)


def _inputs(family: str, model, size, device: torch.device) -> dict:
    from PIL import Image

    from vtok_fast.bench import vlm_zoo

    image = Image.open(PHOTO).convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    batch = vlm_zoo.inputs(family, [[image]], [vlm_zoo.prompt(family)], config=model.config)
    dtype = next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


@contextlib.contextmanager
def _selection_timer(store: list):
    """Accumulate into ``store`` the wall time of the compression itself: the family engine's
    ``family_units.compress_units`` and LLaVA-1.5's ``hf_compress._compress_features``."""
    from vtok_fast.patch import family_units, hf_compress

    targets = [(family_units, "compress_units"), (hf_compress, "_compress_features")]
    originals = [getattr(module, name) for module, name in targets]

    def timed(original):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                store.append(time.perf_counter() - start)
        return run

    for (module, name), original in zip(targets, originals):
        setattr(module, name, timed(original))
    try:
        yield
    finally:
        for (module, name), original in zip(targets, originals):
            setattr(module, name, original)


def _measure(model, inputs: dict, device: torch.device, reps: int) -> dict:
    """FLOPs and peak memory of one forward (the warm-up), then ``reps`` timed forwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from vtok_fast.bench.harness import PeakMemory, _sync

    with torch.no_grad():
        gc.collect()
        with PeakMemory(device) as peak, FlopCounterMode(display=False) as counter:  # also the warm-up
            model(**inputs)
        selection: list[float] = []
        times = []
        with _selection_timer(selection):
            for _ in range(reps):
                _sync(device)
                start = time.perf_counter()
                model(**inputs)
                _sync(device)
                times.append((time.perf_counter() - start) * 1e3)
    info = getattr(model, "_compress_info", None) or getattr(model, "_fastv_info", None) or {}
    kept = info.get("kept")
    return {"median_ms": statistics.median(times), "times_ms": times, "flops": counter.get_total_flops(),
            "peak_mb": peak.mb, "selection_ms": 1e3 * sum(selection) / max(len(times), 1),
            "llm_tokens": None if kept is None else int((kept >= 0).sum(dim=1).max())}


def _family_rows(family: str, quick: bool, device: torch.device, reps: int, progress) -> list[dict]:
    import vtok_fast.patch

    setting = "cuda" if device.type == "cuda" else "cpu"
    model = _model(family, quick, device)
    inputs = _inputs(family, model, None if quick else SETTINGS[setting][family], device)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    rows = [{"family": family, "method": "unpatched", "budget": {}, "target_x": 1, "image_tokens": image_tokens,
             **_measure(model, inputs, device, reps)}]
    rows[0]["llm_tokens"] = inputs["input_ids"].shape[1]
    for method, budget, factor in (QUICK_POINTS if quick else GPU_POINTS if device.type == "cuda" else POINTS):
        if progress:
            progress(f"{family} {method} {factor}x")
        row = {"family": family, "method": method, "budget": budget, "target_x": factor, "image_tokens": image_tokens}
        try:
            vtok_fast.patch.hf(model, fuse_embed=False, fuse_project=False, compress=(method, budget))
        except ValueError as error:  # a method the family does not run: recorded with the reason
            rows.append({**row, "refused": str(error)})
            continue
        try:
            rows.append({**row, **_measure(model, inputs, device, reps)})
        finally:
            vtok_fast.patch.unpatch(model)
    del model
    gc.collect()
    return rows


def _derive(rows: list[dict]) -> None:
    """Speedup, ceiling, fraction of the ceiling, overhead share and memory check per row."""
    base = rows[0]
    for row in rows[1:]:
        if "refused" in row:
            continue
        row["speedup"] = base["median_ms"] / row["median_ms"]
        row["flop_ceiling"] = base["flops"] / row["flops"] if row["flops"] else None
        row["ceiling_fraction"] = row["speedup"] / row["flop_ceiling"] if row["flop_ceiling"] else None
        row["selection_share"] = row["selection_ms"] / row["median_ms"]
        row["peak_within_unpatched"] = (None if row["peak_mb"] is None or base["peak_mb"] is None
                                        else row["peak_mb"] <= base["peak_mb"] * 1.02 + 1)


def _table(rows: list[dict], quick: bool) -> str:
    lines = ["family           method  x  LLM tok   ms      speedup  ceiling  reached  select  peak MB"]
    for row in rows:
        if "refused" in row:
            lines.append(f"{row['family']:<16} {row['method']:<7} {row['target_x']}  refused: {row['refused'][:90]}")
            continue
        if row["method"] == "unpatched":
            lines.append(f"{row['family']:<16} {'none':<7} 1  {row['llm_tokens']:>7} {row['median_ms']:>8.1f}"
                         f"  {'':>7}  {'':>7}  {'':>7}  {'':>6}  {row['peak_mb'] or 0:>7.0f}")
            continue
        lines.append(f"{row['family']:<16} {row['method']:<7} {row['target_x']}  {row['llm_tokens'] or 0:>7} "
                     f"{row['median_ms']:>8.1f}  {row['speedup']:>6.2f}x  {row['flop_ceiling']:>6.2f}x  "
                     f"{100 * row['ceiling_fraction']:>6.0f}%  {100 * row['selection_share']:>5.1f}%  "
                     f"{row['peak_mb'] or 0:>7.0f}")
    return "\n".join(lines)


def _verdicts(rows: list[dict], quick: bool) -> dict:
    from vtok_fast.bench.harness import QUICK_NO_VERDICT

    measured = [r for r in rows if r["method"] != "unpatched" and "refused" not in r]
    at4 = [r for r in measured if r["target_x"] == 4 and r["method"] != "fastv"]
    checks = {"ceiling_at_4x": min((r["ceiling_fraction"] for r in at4), default=None),
              "max_selection_share": max((r["selection_share"] for r in measured), default=None),
              "peak_never_above_unpatched": all(r["peak_within_unpatched"] in (True, None) for r in measured)}
    if quick:
        return {**checks, "pass": None, "note": QUICK_NO_VERDICT}
    ok = (checks["ceiling_at_4x"] is not None and checks["ceiling_at_4x"] >= TARGET_CEILING
          and checks["max_selection_share"] is not None and checks["max_selection_share"] <= TARGET_OVERHEAD
          and checks["peak_never_above_unpatched"])
    return {**checks, "pass": ok}


def run(args) -> int:
    """``vtok-fast bench vlm``: measure, print the table and the checks, write ``vlm_<cpu|gpu>.json``."""
    from vtok_fast.bench.harness import default_out_dir, machine_info, results_path, text_progress

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    families = list(SETTINGS["cpu"])
    reps = 1 if args.quick else 5 if device.type == "cuda" else 2  # a CPU prefill at real width takes seconds
    rows: list[dict] = []
    for i, family in enumerate(families):
        progress = None if args.no_progress else (lambda label, i=i: text_progress(label, i, len(families)))
        family_rows = _family_rows(family, args.quick, device, reps, progress)
        _derive(family_rows)
        rows += family_rows
    if not args.no_progress:
        text_progress("done", len(families), len(families))
    checks = _verdicts(rows, args.quick)
    print(f"\n## vlm prefill on {device} ({'tiny models' if args.quick else 'real widths, 2 + 2 layers'})")
    print(_table(rows, args.quick))
    print(f"lowest fraction of the FLOP ceiling at 4x (vision methods): {checks['ceiling_at_4x']}; "
          f"largest selection overhead: {checks['max_selection_share']}; "
          f"peak memory never above unpatched: {checks['peak_never_above_unpatched']}; "
          f"pass: {checks['pass'] if not args.quick else checks['note']}")
    out = Path(default_out_dir() if args.out is None else args.out)
    path = results_path("vlm", device, out, quick=args.quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"op": "vlm", "machine": machine_info(device), "quick": args.quick,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "checks": checks, "rows": rows}, indent=1, default=str))
    print(f"results written to {path}")
    return 0
