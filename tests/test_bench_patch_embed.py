"""Smoke test of the patch-embed benchmark: every provider runs its quick cases through
pytest-benchmark (disabled by default: one call each), and the summary reports the CPU target."""
import pytest
import torch

from vtok_fast.bench import patch_embed as bench
from vtok_fast.bench.harness import mode_fn, run_benchmark

CPU = torch.device("cpu")
JOBS = [(case, mode, provider) for case in bench.cases(quick=True, device=CPU)
        for mode in (case.modes or bench.MODES) for provider in bench.providers(CPU)
        if mode != "backward"]  # backward is full minus forward: the harness derives it the same way


@pytest.mark.parametrize("case,mode,provider", JOBS,
                         ids=[f"{c.name}-{m}-{p.name}" for c, m, p in JOBS])
def test_bench_providers_run(benchmark, case, mode, provider, torch_backend):
    inputs = case.make_inputs(CPU)
    forward = provider.build(inputs)
    out = benchmark(mode_fn(forward, mode))
    if mode == "forward":
        expected = bench._eager(inputs)()
        # fp32 sums of K = 768 / 588 products in two summation orders (GEMM vs conv): about
        # 1.3e-6 * sqrt(K) * |y| ~ 4e-5 for |y| ~ 1
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_bench_summary_reports_cpu_ratio(torch_backend):
    cases = bench.cases(quick=True, device=CPU)[:1]
    providers = [p for p in bench.providers(CPU) if p.name in ("vtok_fast", "timm")]
    results = run_benchmark(bench.OP, cases, providers, modes=("forward",), device=CPU, min_time_s=0.01)
    assert all(r.error is None for r in results), [r.error for r in results]
    text, summary = bench.summarize(results, CPU)
    assert "vtok_fast / timm" in text
    assert set(summary["cpu_ratio_vs_timm"]) == {f"{cases[0].name}/forward"}
