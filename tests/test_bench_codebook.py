"""Smoke test of bench/codebook.py: quick cases through pytest-benchmark (disabled by default, so
each runs once), every provider builds and agrees, and the summary prints the targets."""
import pytest
import torch

from vtok_fast.bench import codebook as bench
from vtok_fast.bench.harness import run_benchmark

CPU = torch.device("cpu")


def assert_nearest(x, codebook, idx, name):
    """Every returned code is the float64 nearest one up to a near-tie: two fp32 squared
    distances within 1e-5 of ||x||^2 + ||c||^2 (fp32 expansion error, a few 1e-7 of that
    scale), which providers summing in different orders (or BLAS libraries rounding
    differently) may order either way."""
    x64, c64 = x.double(), codebook.double()
    d = torch.cdist(x64, c64) ** 2
    got = d.gather(1, idx.reshape(-1, 1).long()).squeeze(1)
    scale = (x64 * x64).sum(1) + (c64 * c64).sum(1).max()
    assert bool((got - d.min(1).values <= 1e-5 * scale).all()), name


@pytest.mark.parametrize("case", bench.cases(quick=True, device=CPU), ids=lambda c: c.name)
def test_quick_case(benchmark, case):
    inputs = case.make_inputs(CPU)
    forward = bench.providers(CPU)[0].build(inputs)
    idx = benchmark(forward)
    x, codebook = inputs["x"], inputs["codebook"]
    assert_nearest(x, codebook, idx, "vtok_fast")
    for provider in bench.providers(CPU)[1:]:
        other = provider.build(inputs)
        if other is None:
            continue
        assert_nearest(x, codebook, other(), provider.name)


def test_summary_and_skips():
    quick = bench.cases(quick=True, device=CPU)[:1]
    results = run_benchmark(bench.OP, quick, bench.providers(CPU)[:3], device=CPU,
                            min_time_s=0.0, memory=False)
    assert {r.provider for r in results} == {"vtok_fast", "cdist_argmin", "addmm_chunked"}
    text, extra = bench.summarize(results, CPU)
    assert "vtok_fast time / FAISS time" in text and "summary" in extra
    assert "vtok_fast CPU GEMM" in text and "cpu_gemm" in extra["summary"]
    # the memory case skips the providers that would materialize 4 GiB
    memory_case = bench._make_case(*bench.MEMORY_CASE, torch.float32, CPU, memory_case=True)
    assert set(memory_case.params["skipped"]) == set(bench.MATERIALIZING)


@pytest.mark.parametrize("cpuinfo, vendor, isa", [
    ("vendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx avx2 avx512f avx512bw amx_bf16 amx_tile\n\n"
     "vendor_id\t: GenuineIntel\nflags\t\t: fpu\n", "Intel", ["AVX2", "AVX-512", "AMX"]),
    ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx avx2\n", "AMD", ["AVX2"]),
    ("processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n", None, ["NEON", "SVE"]),
    (OSError("no /proc"), None, []),
])
def test_machine_info_records_cpu_vendor_and_isa(cpuinfo, vendor, isa, monkeypatch):
    # the benchmark JSON says which BLAS-relevant CPU it ran on (MKL is slow on AMD, AMX is
    # Intel-only); robust where /proc/cpuinfo is missing (macOS, Windows)
    import platform
    from pathlib import Path

    from vtok_fast.bench import harness

    def read_text(self, *a, **kw):
        if isinstance(cpuinfo, Exception):
            raise cpuinfo
        return cpuinfo

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(platform, "processor", lambda: "")
    info = harness.machine_info(CPU)
    assert info["cpu_vendor"] == vendor and info["cpu_isa"] == isa
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_alternating_ratio_times_both_searches():
    # side-by-side timing of the CPU target comparison, on a tiny shape
    ratio = bench.alternating_ratio(64, 32, 8, reps=2, min_time_s=0.0)
    assert ratio is not None and ratio > 0
