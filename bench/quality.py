"""``vtok-fast bench quality``: answer accuracy against image tokens for every compression method.

Runs ``vtok_fast.measure.quality.curves`` on each trained reference model -- LLaVA (64 image
tokens at 1-D positions), then Qwen2-VL (16 merged image tokens at M-RoPE positions) -- (the
committed checkpoint, else the cached or a freshly trained one; ``--retrain`` trains it again)
over the held-out questions (500, 100 per type; ``--quick``: 40 questions at 1x and 4x), and
prints for each:

- overall accuracy per method and position mode at each ratio (1x, 2x, 4x, 8x, 16x of its tokens);
- per question type at 4x, with the image tokens the LLM sees and the prefill time;
- the checks: every keep-all (1x) method reproduces the uncompressed answers exactly; each method's
  margin over the random floor (same ratio and position mode) at each ratio; on the
  query-dependent type ``letter_at``, FastV (ranked by the last, question, token) against the
  query-blind methods at 4x. A ``--quick`` run prints its numbers and "quick run: no verdict".

Writes ``<out>/quality_<cpu|gpu>.json`` (LLaVA) and ``<out>/quality_qwen2_vl_<cpu|gpu>.json``
(``_quick`` for a quick run: every point, the checks, the model's training record, the machine)
and their panels (``.png``, ``measure.quality.plot``; the README's copies are
``docs/quality_curves.png`` and ``docs/quality_curves_qwen2_vl.png``).
"""
from __future__ import annotations

import json
import time

import torch

OP = "quality"
FULL_QUESTIONS, QUICK_QUESTIONS = 500, 40
QUERY_TYPE = "letter_at"


def _table(rows, ratios) -> str:
    keys = list(dict.fromkeys((r["method"], r["positions"]) for r in rows if r["method"] != "none"))
    by = {(r["method"], r["positions"], r["ratio"]): r for r in rows}
    lines = [f"{'method':<11} {'positions':<9} " + " ".join(f"{f'{x}x':>7}" for x in ratios),
             f"{'none':<11} {'-':<9} {100 * rows[0]['accuracy']:6.1f}%"]
    for method, positions in keys:
        cells = [by.get((method, positions, x)) for x in ratios]
        lines.append(f"{method:<11} {positions:<9} " + " ".join(
            f"{100 * c['accuracy']:6.1f}%" if c else f"{'-':>7}" for c in cells))
    return "\n".join(lines)


def _type_table(rows, ratio) -> str:
    types = list(rows[0]["per_type"])
    lines = [f"{'method':<11} {'positions':<9} {'tokens':>6} {'prefill':>8} {'all':>6} " + " ".join(f"{t:>10}" for t in types)]
    for r in [rows[0], *(r for r in rows if r["ratio"] == ratio and r["method"] != "none")]:
        lines.append(f"{r['method']:<11} {r['positions']:<9} {r['image_tokens']:>6} {r['prefill_ms']:6.2f}ms "
                     f"{100 * r['accuracy']:5.1f}% " + " ".join(f"{100 * r['per_type'][t]:9.1f}%" for t in types))
    return "\n".join(lines)


def checks(rows, ratios, quick: bool) -> tuple[str, dict]:
    """The summary text and its JSON: keep-all exactness, margins over random, query-aware vs blind."""
    from vtok_fast.bench.harness import verdict
    from vtok_fast.measure.quality import curves

    keep_all = curves.keep_all_check(rows)
    lines = [f"keep-all (1x) reproduces the uncompressed answers: "
             f"{verdict(all(keep_all.values()), quick, 'ok', 'MISMATCH ' + str([m for m, ok in keep_all.items() if not ok]))}"]
    margins = {x: curves.beats_random(rows, x) for x in ratios if x > 1}
    for x, items in margins.items():
        above = [f"{m['method']}/{m['positions'][0]} {100 * m['margin']:+.1f}" for m in items]
        lines.append(f"{x}x vs random (points; /o original, /c compact): " + ", ".join(above))
    at4 = [r for r in rows if r["ratio"] == 4 and r["method"] != "none"]
    query = {f"{r['method']}/{r['positions']}": r["per_type"].get(QUERY_TYPE) for r in at4}
    if query:
        blind = [(v, k) for k, v in query.items() if k.split("/")[0] in curves.VISION[1:] and v is not None]
        best_blind = max(blind)
        fastv = query.get("fastv/original")
        lines.append(f"{QUERY_TYPE} at 4x (query-dependent): fastv (ranked by the question's last token) "
                     f"{100 * (fastv or 0):.1f}% vs best query-blind {best_blind[1]} {100 * best_blind[0]:.1f}%, "
                     f"random/original {100 * query.get('random/original', 0):.1f}%")
    if quick:
        from vtok_fast.bench.harness import QUICK_NO_VERDICT
        lines.append(QUICK_NO_VERDICT)
    return "\n".join(lines), {"keep_all_exact": keep_all, "margins_over_random": margins, "query_type_at_4x": query}


TITLES = {"llava": "Reference LLaVA", "qwen2_vl": "Reference Qwen2-VL (M-RoPE)"}


def run(args) -> int:
    """The ``bench quality`` command for parsed ``bench`` arguments (``quick``, ``out``,
    ``device``, ``no_progress``, ``retrain``): both reference models, one after the other;
    returns the exit status."""
    for arch in TITLES:
        run_model(arch, args)
    return 0


def run_model(arch: str, args) -> None:
    """The curves of one reference model (``arch``): ``quality_<device>.json`` for LLaVA,
    ``quality_qwen2_vl_<device>.json`` for Qwen2-VL, and their plots."""
    from pathlib import Path

    from vtok_fast.bench.harness import default_out_dir, machine_info, results_path, text_progress
    from vtok_fast.measure.quality import accuracy, curves, plot, train

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(default_out_dir() if args.out is None else args.out)
    model, processor, record = train.reference_model(train.default_settings(arch),
                                                     retrain=getattr(args, "retrain", False), verbose=True,
                                                     with_record=True)
    model.to(device)
    ratios = (1, 4) if args.quick else curves.RATIOS
    samples = accuracy.held_out(QUICK_QUESTIONS if args.quick else FULL_QUESTIONS)
    start = time.perf_counter()
    rows = curves.run(model, processor, samples, ratios, fastv_layer=train.FASTV_LAYER,
                      progress=None if args.no_progress else text_progress)
    tokens = rows[0]["image_tokens"]
    print(f"\n## quality of the {TITLES[arch]} on {device}: {len(samples)} held-out questions, {tokens} image tokens, "
          f"{time.perf_counter() - start:.0f}s")
    print(_table(rows, ratios))
    print("\nper question type at 4x (tokens: image tokens the LLM sees; prefill: ms per question):")
    print(_type_table(rows, 4))
    text, summary = checks(rows, ratios, args.quick)
    print("\n" + text)
    path = results_path(OP if arch == "llava" else f"{OP}_{arch}", device, out, args.quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"op": OP, "model": arch, "machine": machine_info(device),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
               "questions": len(samples), "ratios": list(ratios), "training": record, "checks": summary,
               "records": [{k: v for k, v in r.items() if k != "answers"} for r in rows]}
    path.write_text(json.dumps(payload, indent=1))
    png = plot.plot_curves(rows, path.with_suffix(".png"),
                           f"{TITLES[arch]} ({len(samples)} held-out questions): accuracy vs image tokens")
    print(f"results written to {path} and {png}")
