"""``vtok-fast`` command line: ``demo``, ``info``, ``bench``, ``budget`` and ``eval``.

Also ``python -m vtok_fast ...``. Errors are one line on stderr (``vtok-fast: error: ...``) with
exit status 2, checked (output paths included) before any work starts.
"""
from __future__ import annotations

import importlib
import sys

from vtok_fast._cli_errors import (OneLineParser, chosen_device, device_problem, error as _error, output_dir_problem,
                                  warn)


def _info(_args) -> int:
    import platform

    import torch

    from vtok_fast import __version__
    from vtok_fast._backend import default_backend, interpreting
    from vtok_fast.bench.harness import cpu_model

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # pragma: no cover
        triton_version = f"unavailable ({exc})"
    print(f"vtok_fast   {__version__}")
    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__}")
    print(f"triton      {triton_version}")
    print(f"cpu         {cpu_model()} ({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}      {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("cuda        not available: CPU tensors use the PyTorch path")
    print(f"backend     {default_backend()}{' [TRITON_INTERPRET=1]' if interpreting() else ''}")
    return 0


def _parse_modes(text: str | None, op_modes: dict[str, tuple[str, ...]]) -> dict | str:
    """``{op: modes to run}`` for ``--modes`` (None: each op's own), or an error message.

    Every requested mode must be one of the op's modes; with several ops (``all``) it must be
    one of some op's, and each op runs the requested modes it has."""
    if text is None:
        return dict(op_modes)
    requested = [m.strip() for m in text.split(",")]
    if "" in requested:
        return f"--modes must be a comma-separated list of modes, got {text!r}"
    known = sorted({m for modes in op_modes.values() for m in modes})
    unknown = [m for m in requested if m not in known]
    if unknown:
        where = f"{next(iter(op_modes))} has" if len(op_modes) == 1 else "the benchmarks have"
        return f"--modes: {where} modes {', '.join(known)}; got {', '.join(map(repr, unknown))}"
    requested = list(dict.fromkeys(requested))
    return {op: tuple(m for m in requested if m in modes) for op, modes in op_modes.items()}


def _announce(quick: bool, what: str) -> None:
    """Before a benchmark: a quick run says it gives no verdict (``what`` it is); a full run on a
    loaded machine warns that its timings are inflated."""
    from vtok_fast.bench.harness import QUICK_NO_VERDICT, load_warning

    if quick:
        print(f"{QUICK_NO_VERDICT} ({what})")
    elif busy := load_warning():
        warn(busy)


def _bench(args) -> int:
    from vtok_fast.bench import OPS, SUITES
    from vtok_fast.bench.harness import default_out_dir, format_table, run_benchmark, text_progress, write_json

    if args.op in SUITES:
        return _suite(args, SUITES[args.op])
    if args.retrain:
        return _error(f"--retrain is for the quality benchmark, got {args.op!r}")
    names = list(OPS) if args.op == "all" else [args.op]
    problem = device_problem(args.device)
    if problem:
        return _error(problem)
    if not args.min_time >= 0:
        return _error(f"--min-time must be >= 0 seconds, got {args.min_time}")
    if args.profile and args.op != "tome":
        return _error(f"--profile is for the tome benchmark, got {args.op!r}")
    out = default_out_dir() if args.out is None else args.out
    problem = output_dir_problem("--out", out)
    if problem:
        return _error(problem)
    device = chosen_device(args.device)
    mods = {} if args.profile else {name: importlib.import_module(OPS[name]) for name in names}
    modes = _parse_modes(args.modes, {name: tuple(mod.MODES) for name, mod in mods.items()}) if mods else {}
    if isinstance(modes, str):
        return _error(modes)
    _announce(args.quick, "small shapes: a smoke run, whose numbers judge no target")
    if args.profile:
        from vtok_fast.bench.tome_profile import run

        run(device, out, quick=args.quick)
        return 0
    status = 0
    for name, mod in mods.items():
        if not modes[name]:
            print(f"\n## {mod.OP}: skipped (--modes {args.modes}; it has {', '.join(mod.MODES)})")
            continue
        cases = mod.cases(quick=args.quick, device=device)
        results = run_benchmark(mod.OP, cases, mod.providers(device), modes=modes[name],
                                device=device, progress=None if args.no_progress else text_progress,
                                min_time_s=args.min_time,
                                on_result=lambda rs: write_json(mod.OP, rs, device, out, quick=args.quick))
        print(f"\n## {mod.OP} on {device}")
        if not results:
            print(f"vtok-fast: error: {mod.OP}: no provider ran on any case (nothing measured)",
                  file=sys.stderr)
            status = 1
            continue
        print(format_table(results))
        summary = getattr(mod, "summarize", None)
        extra = None
        if summary is not None:
            text, extra = summary(results, device, quick=args.quick)
            print(text)
        path = write_json(mod.OP, results, device, out, extra=extra, quick=args.quick)
        print(f"results written to {path}")
    return status


def _suite(args, module: str) -> int:
    """A benchmark that is not a timing harness op (``bench quality``): its module's ``run(args)``."""
    from vtok_fast.bench.harness import default_out_dir

    problem = device_problem(args.device)
    if problem:
        return _error(problem)
    for flag, given in (("--profile", args.profile), ("--modes", args.modes),
                        ("--retrain", args.retrain and args.op != "quality")):
        if given:
            return _error(f"{flag} is not an option of bench {args.op}")
    problem = output_dir_problem("--out", default_out_dir() if args.out is None else args.out)
    if problem:
        return _error(problem)
    _announce(args.quick, "few questions: a smoke run, whose numbers judge nothing")
    return importlib.import_module(module).run(args)


def main(argv=None) -> int:
    parser = OneLineParser(prog="vtok-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backend and device")
    from vtok_fast.bench import OPS, SUITES

    b = sub.add_parser("bench", help="run a benchmark and print its table")
    b.add_argument("op", choices=[*OPS, *SUITES, "all"])
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    b.add_argument("--quick", action="store_true",
                   help="small shapes (smoke run); writes <op>_<cpu|gpu>_quick.json")
    b.add_argument("--modes", help="comma-separated subset of the op's modes "
                                   "(of forward,backward,full; default: all it has)")
    b.add_argument("--out", help="folder for the JSON results, <op>_<cpu|gpu>.json (created if missing; "
                                 "default: bench/results when run from the source checkout, else "
                                 "./vtok_fast_bench_results)")
    b.add_argument("--min-time", type=float, default=0.4, help="seconds of timing per provider")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--retrain", action="store_true", help="quality only: train the reference model again")
    b.add_argument("--profile", action="store_true",
                   help="tome only: one unpatched and one patched forward under torch.profiler, time per "
                        "bucket (attention, linear, merge, norm, other), tome_profile_<cpu|gpu>.json")
    from vtok_fast.measure.budget_cli import add_budget_parser, run_budget
    from vtok_fast.measure.demo import add_demo_parser, run_demo
    from vtok_fast.measure.quality.eval_cli import add_eval_parser, run_eval

    add_budget_parser(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    return {"info": _info, "bench": _bench, "budget": run_budget, "demo": run_demo, "eval": run_eval}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
