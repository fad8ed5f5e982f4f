"""Benchmark harness: time providers side by side, print ratios, write JSON records.

A *case* is one problem size (inputs built lazily on the target device). A *provider* turns a
case's inputs into a forward closure returning a tensor (or None when it does not apply). The
harness derives the three modes from that closure:

- ``forward``: the closure under ``torch.no_grad()``;
- ``backward``: ``out.backward(grad)`` on one saved forward graph (``retain_graph``);
- ``full``: forward then backward.

Records share one shape (op, case, provider, mode, params, times, peak memory, device, versions)
so tables and plots come from one place. A case may name the implementation its ``baseline``
provider runs in ``params["baseline"]``; the table prints it on that provider's rows.

Summaries print each target's number followed by a verdict (``verdict``); a quick run (small
shapes, a smoke test) prints ``QUICK_NO_VERDICT`` instead, since its numbers say nothing about
the targets. Without ``--out`` results go to ``default_out_dir()``.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

MODES = ("forward", "backward", "full")
QUICK_NO_VERDICT = "quick run: no verdict"
FALLBACK_OUT_DIR = "vtok_fast_bench_results"  # default --out outside the checkout


@dataclass
class Case:
    name: str
    params: dict
    make_inputs: Callable[[torch.device], dict]
    flops: float | None = None  # forward FLOP, for TFLOP/s columns
    modes: tuple[str, ...] | None = None  # restrict modes for this case


@dataclass
class Provider:
    name: str
    build: Callable[[dict], Callable[[], Any] | None]
    modes: tuple[str, ...] = MODES


@dataclass
class Result:
    op: str
    case: str
    provider: str
    mode: str
    params: dict
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    peak_mem_mb: float | None
    tflops: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


# --- machine description ---------------------------------------------------------------------

def _cpuinfo() -> dict:
    """The first value of each key of /proc/cpuinfo (one core's entry); empty off Linux."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


_CPU_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}
# /proc/cpuinfo flag -> ISA name (x86 "flags", Arm "Features")
_ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "amx_tile": "AMX", "asimd": "NEON", "sve": "SVE"}


def cpu_features() -> dict:
    """CPU vendor and vector / matrix ISA extensions (BLAS speed depends on both). Linux: read
    from /proc/cpuinfo; elsewhere the vendor is ``platform.processor()`` and the ISA list empty.
    ``torch_cpu_capability`` is the ISA torch's kernels dispatch to, on any OS."""
    info = _cpuinfo()
    vendor = info.get("vendor_id")
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = None
    return {
        "cpu_vendor": _CPU_VENDORS.get(vendor, vendor) or platform.processor() or None,
        "cpu_isa": [name for flag, name in _ISA_FLAGS.items() if flag in flags],
        "torch_cpu_capability": capability,
    }


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_warning() -> str | None:
    """A warning when the 1-minute load average exceeds the core count (other processes share
    the cores, so timings are inflated and ratios noisy); None otherwise."""
    load, cores = load_average(), os.cpu_count()
    if load is None or not cores or load <= cores:
        return None
    return (f"the load average ({load:.1f}) exceeds the {cores} cores: other processes share them, so these "
            "timings are inflated and their ratios noisy; run on a quiet machine for figures to report")


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "cpu": cpu_model(),
        **cpu_features(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# Dense bf16 tensor-core peak (TFLOP/s, datasheet), for the GPU roofline targets.
BF16_PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0, "L40S": 362.0}


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak of a CUDA ``device`` (None on the CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in BF16_PEAK_TFLOPS.items() if key in name), None)


# --- peak memory -------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _set_glibc_thresholds(mmap_bytes: int, trim_bytes: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS readings stay approximate
        pass


def _mmap_large_blocks() -> None:
    """For a memory reading: every block over 128 KiB is mmapped and returned on free, so the RSS
    high-water mark sees each large allocation (glibc otherwise serves them from heap it kept
    from earlier frees, which does not grow RSS, and later readings would read ~0)."""
    _set_glibc_thresholds(128 * 1024, 128 * 1024)


def _reuse_freed_blocks() -> None:
    """For timing: the state glibc's dynamic thresholds reach in a long-running process (blocks
    up to 32 MiB reused from the heap, not mmapped and page-faulted again on every call)."""
    _set_glibc_thresholds(32 * 2**20, 64 * 2**20)


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator stats, or the process's RSS high-water
    mark on Linux CPUs (reset through ``/proc/self/clear_refs``). ``mb`` is None if unknown.
    On the CPU, glibc's thresholds are set for the reading on entry and back for timing on exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _mmap_large_blocks()
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._base = self._status_kb("VmRSS") * 1024
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            if self._base is not None:
                self.mb = max(self._status_kb("VmHWM") * 1024 - self._base, 0) / 2**20
            _reuse_freed_blocks()
        return False


# --- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, min_time_s: float = 0.4,
            max_reps: int = 200, warmup: int = 2) -> list[float]:
    """Per-call wall times in ms. CUDA: ``triton.testing.do_bench``-style events with an L2
    flush between calls; CPU: perf_counter around each call (:func:`time_alternating` of one)."""
    if device.type != "cuda":
        times = time_alternating({"fn": fn}, min_time_s=min_time_s, max_reps=max_reps, warmup=warmup)["fn"]
        if isinstance(times, Exception):
            raise times
        return times
    for _ in range(warmup):
        fn()
    _sync(device)
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(max_reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(max_reps)]
    t0 = time.perf_counter()
    n = 0
    while n < max_reps and (n < 5 or time.perf_counter() - t0 < min_time_s):
        cache.zero_()
        starts[n].record()
        fn()
        ends[n].record()
        n += 1
        if n % 10 == 0:
            torch.cuda.synchronize(device)
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts[:n], ends[:n])]


CPU_ROUNDS = 6  # alternation rounds of the CPU timing (each provider: at least one call per round)


def time_alternating(fns: dict[str, Callable[[], Any]], *, min_time_s: float = 0.4, rounds: int = CPU_ROUNDS,
                     max_reps: int = 200, warmup: int = 2) -> dict[str, list[float] | Exception]:
    """Per-call wall times in ms of several callables on the CPU, measured in alternating rounds.

    Each of the ``rounds`` (>= 1) runs every callable once, then again while its share of the
    round (``min_time_s / rounds`` seconds) lasts and it has fewer than ``max_reps`` times; each
    round starts one callable later. A drift in the machine's speed (another VM on the host, the
    clock) then hits every provider alike, where timing one provider after the other turns it
    into a difference between them (on the 2-core CI VM, ratios of equal GEMMs moved by up to
    30 % between such runs). A callable that raises gets the exception instead of its times and
    leaves the rotation.
    """
    times: dict[str, list[float] | Exception] = {name: [] for name in fns}

    def run(name: str, until: float, reps: int) -> None:
        samples = times[name]
        try:
            for _ in range(reps):
                t = time.perf_counter()
                fns[name]()
                samples.append((time.perf_counter() - t) * 1e3)
                if time.perf_counter() >= until or len(samples) >= max_reps:
                    break
        except Exception as exc:
            times[name] = exc

    for name in fns:  # warm-up calls, not recorded
        run(name, float("inf"), warmup)
        if not isinstance(times[name], Exception):
            times[name] = []
    for r in range(rounds):
        live = [name for name in fns if not isinstance(times[name], Exception)]
        for name in live[r % len(live):] + live[:r % len(live)] if live else ():
            run(name, time.perf_counter() + min_time_s / rounds, max_reps)
    return times


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mode_fn(forward: Callable[[], Any], mode: str) -> Callable[[], Any]:
    """Turn a forward closure into the callable timed for ``mode``."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if mode == "full":
        def run():
            out = forward()
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.backward(torch.ones_like(out))
        return run
    if mode == "backward":
        out = forward()
        out = out[0] if isinstance(out, (tuple, list)) else out
        grad = torch.ones_like(out)

        def run():
            out.backward(grad, retain_graph=True)
        return run
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --- running -----------------------------------------------------------------------------------

def run_benchmark(op: str, cases: list[Case], providers: list[Provider], *, modes=("forward",),
                  device: torch.device, progress: Callable[[str, int, int], None] | None = None,
                  min_time_s: float = 0.4, memory: bool = True,
                  on_result: Callable[[list], None] | None = None) -> list[Result]:
    """Run every (case, mode, provider); ``on_result(results_so_far)`` is called after each
    (case, mode) that gave a result (the CLI saves JSON there, so a run cut short still leaves its
    results).

    Each provider's first call (compilation, autotuning, one-time state) and its peak-memory call
    come first; then the providers of one (case, mode) are timed: on the CPU in alternating
    rounds (:func:`time_alternating`), on CUDA one after the other with events (the device's own
    time, which a host's drift does not reach)."""
    results: list[Result] = []
    groups = [(c, m, [p for p in providers if m in p.modes]) for c in cases for m in modes
              if c.modes is None or m in c.modes]
    total, done = sum(len(ps) for _, _, ps in groups), 0
    inputs_cache: dict[str, dict] = {}
    for case, mode, provs in groups:
        if case.name not in inputs_cache:
            inputs_cache.clear()
            inputs_cache[case.name] = case.make_inputs(device)
        inputs = inputs_cache[case.name]
        group: list[Result] = []
        fns: dict[str, Callable[[], Any]] = {}
        for prov in provs:
            if progress:
                progress(f"{case.name} · {mode} · {prov.name}", done, total)
            done += 1
            res = Result(op, case.name, prov.name, mode, case.params, None, None, None, None)
            try:
                forward = prov.build(inputs)
                if forward is None:
                    continue
                fn = mode_fn(forward, mode)
                fn()  # first call: compilation, autotuning and one-time state stay out of the peak
                if memory:
                    with PeakMemory(device) as pm:
                        fn()
                    res.peak_mem_mb = pm.mb
                if device.type == "cuda":
                    _record_times(res, time_fn(fn, device, min_time_s=min_time_s), case)
                else:
                    fns[prov.name] = fn
            except Exception as exc:  # a provider failing is a result, not a crash of the run
                res.error = _error_text(exc)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            group.append(res)
        if fns:
            timed = time_alternating(fns, min_time_s=min_time_s)
            for res in group:
                if res.provider in timed:
                    outcome = timed[res.provider]
                    if isinstance(outcome, Exception):
                        res.error = _error_text(outcome)
                    else:
                        _record_times(res, outcome, case)
        del fns
        for p in list(inputs.values()):
            if isinstance(p, torch.Tensor) and p.grad is not None:
                p.grad = None
        results.extend(group)
        if on_result and group:
            on_result(results)
    if progress:
        progress("done", total, total)
    return results


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _record_times(res: Result, times: list[float], case: Case) -> None:
    """Median and p20/p80 of ``times`` (ms) into ``res``, and TFLOP/s for a forward."""
    res.median_ms = statistics.median(times)
    res.p20_ms, res.p80_ms = _quantile(times, 0.2), _quantile(times, 0.8)
    if case.flops and res.mode == "forward":
        res.tflops = case.flops / (res.median_ms * 1e-3) / 1e12


def find_result(results: list[Result], case: str, provider: str, mode: str = "forward") -> Result | None:
    """The timed result of ``provider`` on ``case`` in ``mode``; None if absent or failed."""
    for r in results:
        if (r.case, r.provider, r.mode) == (case, provider, mode) and r.median_ms:
            return r
    return None


def find_median(results: list[Result], case: str, provider: str, mode: str = "forward") -> float | None:
    """``find_result(...).median_ms``, or None."""
    r = find_result(results, case, provider, mode)
    return None if r is None else r.median_ms


def verdict(ok: bool, quick: bool, passed: str = "ok", failed: str = "BELOW TARGET") -> str:
    """What a summary prints after a target's number: ``passed`` or ``failed``; in a quick run
    ``QUICK_NO_VERDICT`` (its shapes are too small to judge a target by)."""
    return QUICK_NO_VERDICT if quick else (passed if ok else failed)


def provider_label(result: Result) -> str:
    """The provider's name; ``baseline (<implementation>)`` when the case names it."""
    implementation = result.params.get("baseline") if result.provider == "baseline" else None
    return f"baseline ({implementation})" if implementation else result.provider


def format_table(results: list[Result], baseline: str = "vtok_fast") -> str:
    """One row per (case, mode, provider): median [p20–p80] ms, peak MiB, and ``speedup`` =
    provider time / vtok_fast time (> 1 means vtok_fast is faster). A ``baseline`` provider's
    row names its implementation when the case gives one (``params["baseline"]``)."""
    base = {(r.case, r.mode): r.median_ms for r in results if r.provider == baseline and r.median_ms}
    rows = [("case", "mode", "provider", "median ms", "p20-p80 ms", "peak MiB", "TFLOP/s", "vtok speedup")]
    for r in results:
        if r.error:
            rows.append((r.case, r.mode, provider_label(r), "error", r.error[:60], "", "", ""))
            continue
        b = base.get((r.case, r.mode))
        rows.append((
            r.case, r.mode, provider_label(r),
            f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}-{r.p80_ms:.3f}",
            "" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}",
            "" if r.tflops is None else f"{r.tflops:.1f}",
            "" if not b or r.provider == baseline else f"{r.median_ms / b:.2f}x",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def default_out_dir(cwd: str | os.PathLike | None = None) -> Path:
    """Where ``vtok-fast bench`` writes without ``--out``: ``bench/results`` when ``cwd`` (default:
    the current directory) is the source checkout this package runs from (an editable install),
    else ``./vtok_fast_bench_results`` (a directory that merely holds a ``bench/results`` is not
    the checkout)."""
    here = Path(__file__).resolve().parent  # <checkout>/bench, or site-packages/vtok_fast/bench
    checkout = here.parent
    in_checkout = here.name == "bench" and (checkout / "setup.py").is_file() and (checkout / "vtok_fast").is_dir()
    if in_checkout and Path(cwd if cwd is not None else Path.cwd()).resolve() == checkout:
        return Path("bench") / "results"
    return Path(FALLBACK_OUT_DIR)


def results_path(op: str, device: torch.device, out_dir: str | os.PathLike, quick: bool = False) -> Path:
    """``<out_dir>/<op>_<cpu|gpu>.json``; quick (smoke) runs write ``<op>_<cpu|gpu>_quick.json``,
    so they never replace a full run's results (git-ignore ``*_quick.json``)."""
    tag = "gpu" if device.type == "cuda" else "cpu"
    return Path(out_dir) / f"{op}_{tag}{'_quick' if quick else ''}.json"


def write_json(op: str, results: list[Result], device: torch.device, out_dir: str | os.PathLike,
               extra: dict | None = None, quick: bool = False) -> Path:
    path = results_path(op, device, out_dir, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    payload = {
        "op": op,
        "machine": machine,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "quick": quick,
        "records": [r.__dict__ for r in results],
    }
    if extra:
        payload.update(extra)
    path.write_text(json.dumps(payload, indent=1))
    return path


def text_progress(label: str, i: int, n: int):
    """A one-line progress display on stderr."""
    width = 24
    filled = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {i}/{n} {label[:60]:<60}")
    if i >= n:
        sys.stderr.write("\n")
    sys.stderr.flush()
