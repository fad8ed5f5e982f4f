"""``vtok-fast`` command line: ``info`` and ``bench``."""
from __future__ import annotations

import argparse
import importlib
import sys


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


def _bench(args) -> int:
    import torch

    from vtok_fast.bench import OPS
    from vtok_fast.bench.harness import format_table, run_benchmark, text_progress, write_json

    names = list(OPS) if args.op == "all" else [args.op]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in names:
        mod = importlib.import_module(OPS[name])
        modes = tuple(args.modes.split(",")) if args.modes else mod.MODES
        cases = mod.cases(quick=args.quick, device=device)
        results = run_benchmark(mod.OP, cases, mod.providers(device), modes=modes, device=device,
                                progress=None if args.no_progress else text_progress,
                                min_time_s=args.min_time,
                                on_result=lambda rs: write_json(mod.OP, rs, device, args.out))
        print(f"\n## {mod.OP} on {device}")
        print(format_table(results))
        summary = getattr(mod, "summarize", None)
        extra = None
        if summary is not None:
            text, extra = summary(results, device)
            print(text)
        path = write_json(mod.OP, results, device, args.out, extra=extra)
        print(f"results written to {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vtok-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backend and device")
    from vtok_fast.bench import OPS

    b = sub.add_parser("bench", help="run a benchmark and print its table")
    b.add_argument("op", choices=[*OPS, "all"])
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    b.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    b.add_argument("--modes", help="comma-separated subset of forward,backward,full")
    b.add_argument("--out", default="bench/results", help="folder for the JSON results")
    b.add_argument("--min-time", type=float, default=0.4, help="seconds of timing per provider")
    b.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return {"info": _info, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
