"""``vtok-fast budget MODEL HxW [--compress SPEC]``: print the token budget of one image.

MODEL is any name of ``vtok_fast.budget.MODEL_NAMES``, the table ``count_tokens`` reads, so a
family added there is a choice here. ``--patch-size``, ``--min-pixels``, ``--max-pixels``,
``--mode``, ``--max-patches`` (InternVL) and ``--pan-and-scan`` (Gemma 3) are handed to
``count_tokens`` when given; a model that does not take one names it in the error.

``add_budget_parser(subparsers)`` adds the subcommand to ``vtok-fast``'s parser; the parsed
arguments run ``run_budget(args)``. ``main(argv)`` runs the subcommand alone. A bad value is one
line on stderr (``vtok-fast: error: ...``) and exit status 2. A compression the library cannot
run inside the model is counted all the same, with a ``note:`` line saying so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from vtok_fast._cli_errors import OneLineParser, error
from vtok_fast.measure.budget import DEEPSEEK_OCR_MODES, MODEL_NAMES, count_tokens

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[x×X*,]\s*(\d+)\s*)?$")
# flags handed to count_tokens as options (when given)
_OPTIONS = ("patch_size", "min_pixels", "max_pixels", "mode", "max_patches", "do_pan_and_scan")


def parse_size(text: str) -> tuple[int, int]:
    """``"672x1008"`` -> (672, 1008) (H x W); one number is a square."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"size must be HxW (e.g. 672x1008) or one number for a square, got {text!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def add_budget_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``budget`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "budget", help="token counts of one image for a model",
        description="Token counts of one image: ViT tokens, LLM tokens, pixels per token, and a "
                    "breakdown by view.")
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("size", help="image size HxW, e.g. 672x1008 (one number: a square)")
    parser.add_argument("--compress", metavar="SPEC",
                        help="METHOD[:key=value,...], e.g. pool:stride=2, tome:keep=144, "
                             "attn_topk:ratio=0.25 (the fraction kept), visionzip:dominant=54,contextual=10, "
                             "fastv:ratio=0.5 (FastV's R: the fraction pruned; default 0.5)")
    parser.add_argument("--patch-size", type=int, help="patch size of a fixed-grid ViT (or a Qwen VL model)")
    parser.add_argument("--min-pixels", type=int, help="Qwen smart_resize lower bound (qwen2-vl, 2.5, 3)")
    parser.add_argument("--max-pixels", type=int, help="Qwen smart_resize upper bound (qwen2-vl, 2.5, 3)")
    parser.add_argument("--mode", choices=tuple(DEEPSEEK_OCR_MODES), help="DeepSeek-OCR mode")
    parser.add_argument("--max-patches", type=int, help="InternVL: the most 448x448 tiles (default 12)")
    parser.add_argument("--pan-and-scan", dest="do_pan_and_scan", action="store_const", const=True,
                        help="Gemma 3: add the pan-and-scan crops (off by default, as in transformers)")
    parser.add_argument("--json", action="store_true", help="print the budget as JSON")
    return parser


def run_budget(args) -> int:
    """Print the budget for parsed ``budget`` arguments; return 0, or 2 after a one-line error."""
    options = {name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None}
    try:
        budget = count_tokens(args.model, parse_size(args.size), compress=args.compress, **options)
    except (TypeError, ValueError) as exc:
        return error(str(exc))
    if args.json:
        print(json.dumps(dataclasses.asdict(budget)))
    else:
        print(budget)
    return 0


def main(argv=None) -> int:
    parser = OneLineParser(prog="vtok-fast")
    add_budget_parser(parser.add_subparsers(dest="command", required=True))
    return run_budget(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
