"""Smoke test of bench/attention.py: its quick cases through pytest-benchmark and the harness,
every provider builds and runs (forward and backward), and the summary's ratios and targets."""
import pytest
import torch

from helpers import assert_close
from vtok_fast.bench import OPS
from vtok_fast.bench import attention as bench
from vtok_fast.bench.harness import Result, mode_fn, run_benchmark

CPU = torch.device("cpu")
QUICK = bench.cases(quick=True, device=CPU)


def test_registered():
    assert OPS["attention"] == "vtok_fast.bench.attention"


def test_full_cases_are_the_issue_table():
    gpu = bench.cases(quick=False, device="cuda")
    assert len(gpu) == 12 and {c.params["dtype"] for c in gpu} == {"float16", "bfloat16"}
    models = {(c.params["model"], c.params["H"], c.params["B"]) for c in gpu}
    assert models == {("vit_b", 12, 256), ("vit_l", 16, 64)}
    assert {c.params["N"] for c in gpu} == {197, 577, 1025} and {c.params["d"] for c in gpu} == {64}
    cpu = bench.cases(quick=False, device=CPU)
    assert len(cpu) == 6 and {c.params["dtype"] for c in cpu} == {"float32"}


@pytest.mark.parametrize("case", QUICK, ids=lambda c: c.name)
@pytest.mark.parametrize("provider", bench.providers(CPU), ids=lambda p: p.name)
def test_quick_case(benchmark, case, provider):
    inputs = case.make_inputs(CPU)
    out = benchmark(mode_fn(provider.build(inputs), "forward"))
    p = case.params
    assert out.shape == (p["B"], p["H"], p["N"], p["d"])
    mode_fn(provider.build(inputs), "full")()  # the backward runs too
    assert inputs["qkv"].grad is not None


@pytest.mark.parametrize("case", QUICK, ids=lambda c: c.name)
def test_vtok_matches_sdpa_with_the_mask(case):
    inputs = case.make_inputs(CPU)
    ours, masked = (p.build(inputs)() for p in bench.providers(CPU)[:2])
    assert_close(ours.detach(), masked.detach(), reduction=case.params["N"])


def test_through_the_harness():
    results = run_benchmark(bench.OP, QUICK, bench.providers(CPU), modes=bench.MODES, device=CPU,
                            min_time_s=0.0, memory=False)
    assert len(results) == len(QUICK) * 3 * len(bench.MODES)
    assert all(r.error is None and r.median_ms > 0 for r in results), [r.error for r in results]
    text, extra = bench.summarize(results, CPU)
    assert "no target" in text
    assert f"{QUICK[0].name}_forward_vs_flash_no_bias" in extra["summary"]


def test_summary_reports_ratios_against_the_gpu_target():
    def rec(case, provider, ms, mode="forward"):
        return Result("attention", case, provider, mode, {}, ms, ms, ms, None)

    case = "vit_b-N197-B256-float16"
    results = [rec(case, "vtok_fast", 1.1), rec(case, "sdpa_mask", 2.2), rec(case, "sdpa_flash_no_bias", 1.0),
               rec(case, "vtok_fast", 3.0, "full"), rec(case, "sdpa_flash_no_bias", 2.0, "full")]
    text, extra = bench.summarize(results, torch.device("cuda"))
    summary = extra["summary"]
    assert summary[f"{case}_forward_vs_flash_no_bias"] == pytest.approx(1.1)
    assert summary[f"{case}_forward_speedup_vs_mask"] == pytest.approx(2.0)
    assert summary[f"{case}_full_vs_flash_no_bias"] == pytest.approx(1.5)
    assert "<= 1.15x SDPA-flash" in text
    assert f"{case} forward: 1.100 ms, 1.10x the time of SDPA-flash without a bias ok, speedup 2.00x" in text
    assert "BELOW TARGET" not in text  # the full mode has no target
    slow = [rec(case, "vtok_fast", 1.2), rec(case, "sdpa_flash_no_bias", 1.0)]
    assert "BELOW TARGET" in bench.summarize(slow, torch.device("cuda"))[0]
    assert "BELOW TARGET" not in bench.summarize(slow, CPU)[0]
