"""``vtok-fast eval MODEL_DIR --data questions.jsonl --compress SPEC [--compress SPEC ...]``.

Loads a model saved with ``save_pretrained`` (``AutoModelForImageTextToText`` and
``AutoProcessor`` from the local directory; a family ``vtok_fast.patch.hf(compress=...)`` runs:
LLaVA today), evaluates it uncompressed and with each ``--compress`` spec
(``evaluate.compare``), prints one row per setting (accuracy, delta to uncompressed in points,
image tokens the LLM sees, prefill ms per question), and writes the rows as JSON (``--json``,
default ``vtok_fast_eval.json``) and the accuracy-against-tokens panels (``--plot``, default
``vtok_fast_eval.png``). Progress goes to stderr (``--no-progress`` silences it). Specs:
``METHOD[:key=value,...]`` as ``vtok_fast.patch.hf(compress=(METHOD, {...}))`` takes them, e.g.
``visionzip:dominant=54,contextual=10``, ``pool:stride=2,positions=compact``,
``fastv:layer=2,ratio=0.5``, and ``random:keep=64`` (the floor: 64 tokens kept at random).
Bad arguments are a one-line error (exit status 2) before the model is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from vtok_fast._cli_errors import chosen_device, device_problem, error, output_file_problem


def add_eval_parser(subparsers):
    """Register ``eval`` on an argparse ``subparsers``."""
    parser = subparsers.add_parser(
        "eval", help="answer accuracy of a saved VLM under token compression",
        description="Accuracy, image tokens and prefill time of a saved model (save_pretrained directory), "
                    "uncompressed and with each --compress method, on a JSONL of "
                    '{"image": path, "question": ..., "answer": ...}.')
    parser.add_argument("model_dir", help="directory written by save_pretrained (model and processor)")
    parser.add_argument("--data", required=True, help="JSONL questions; image paths relative to its folder")
    parser.add_argument("--compress", action="append", default=[], metavar="SPEC",
                        help="METHOD[:key=value,...], repeatable, e.g. visionzip:dominant=54,contextual=10, "
                             "pool:stride=2,positions=compact, fastv:layer=2,ratio=0.5, random:keep=64")
    parser.add_argument("--metric", choices=("exact", "prefix"), default="exact")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, help="default: the most tokens any answer takes")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--json", default="vtok_fast_eval.json", help="output rows (default vtok_fast_eval.json)")
    parser.add_argument("--plot", default="vtok_fast_eval.png", help="output panels (default vtok_fast_eval.png)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _check(args):
    """The parsed arguments' problems as one message, or the parsed specs."""
    from vtok_fast.measure.quality import evaluate as ev

    if not Path(args.model_dir).is_dir():
        return f"MODEL_DIR {args.model_dir!r} is not a directory (save the model with save_pretrained)"
    if not Path(args.data).is_file():
        return f"--data {args.data!r} is not a file"
    for name, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--limit", args.limit)):
        if value is not None and value < 1:
            return f"{name} must be a positive integer, got {value}"
    for name in ("json", "plot"):
        problem = output_file_problem(f"--{name}", getattr(args, name))
        if problem:
            return problem
    try:
        return [ev.parse_spec(spec) for spec in args.compress]
    except (TypeError, ValueError) as exc:
        return str(exc)


def _progress(label: str, done: int, total: int) -> None:
    import sys

    sys.stderr.write(f"\r{label[:50]:<50} {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _plot_rows(rows) -> list[dict]:
    return [{"method": "none" if r.compress is None else r.compress[0],
             "positions": "original" if r.compress is None else r.compress[1].get("positions", "original"),
             "image_tokens": r.image_tokens, "accuracy": r.accuracy, "per_type": r.per_type} for r in rows]


def _load(path, model_class, processor_class):
    """Model (eval mode) and processor of ``path``, without transformers' loading bar (the
    command's own progress is the one line on stderr)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(path).eval(), processor_class.from_pretrained(path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def run_eval(args) -> int:
    """The ``eval`` command for parsed arguments; returns the exit status."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtok_fast.measure.quality import evaluate as ev
    from vtok_fast.measure.quality import plot

    specs = _check(args)
    if isinstance(specs, str):
        return error(specs)
    try:
        data = ev.load_jsonl(args.data)[:args.limit]
    except (OSError, ValueError) as exc:
        return error(str(exc))
    problem = device_problem(args.device)
    if problem:
        return error(problem)
    device = chosen_device(args.device)
    model, processor = _load(args.model_dir, AutoModelForImageTextToText, AutoProcessor)
    model.to(device)
    try:
        rows = ev.compare(model, processor, data, specs, args.metric, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, progress=None if args.no_progress else _progress)
    except (TypeError, ValueError) as exc:
        return error(str(exc))
    print(ev.format_table(rows))
    Path(args.json).write_text(json.dumps({"model": str(args.model_dir), "data": str(args.data), "metric": args.metric,
                                           "questions": len(data), "rows": [r.to_dict() for r in rows]}, indent=1))
    plot.plot_curves(_plot_rows(rows), args.plot, f"{Path(args.model_dir).name}: accuracy vs image tokens")
    print(f"wrote {args.json} and {args.plot}")
    return 0
