"""Smoke test of bench/merge.py: every provider runs the quick cases through pytest-benchmark
(disabled by default: one call each) and agrees with the real module; the summary reports the
targets and the bytes moved."""
import pytest
import torch

from vtok_fast.bench import OPS
from vtok_fast.bench import merge as bench
from vtok_fast.bench.harness import Result, mode_fn

CPU = torch.device("cpu")
JOBS = [(case, mode, provider) for case in bench.cases(quick=True, device=CPU) for mode in bench.MODES
        for provider in bench.providers(CPU) if provider.name != "torch.compile" and mode in provider.modes]


def test_registered():
    assert OPS["merge"] == "vtok_fast.bench.merge"


@pytest.mark.parametrize("case,mode,provider", JOBS, ids=[f"{c.name}-{m}-{p.name}" for c, m, p in JOBS])
def test_bench_providers_run(benchmark, case, mode, provider, torch_backend):
    inputs = case.make_inputs(CPU)
    out = benchmark(mode_fn(provider.build(inputs), mode))
    if provider.name == "gemms":
        assert [list(o.shape) for o in out] == [[m, n] for m, _, n in case.params["gemms"]]
        assert sum(2.0 * m * k * n for m, k, n in case.params["gemms"]) == case.flops
    elif mode == "forward":
        with torch.no_grad():
            expected = bench._eager(inputs)()
        # the same fp32 sums in the same order up to the GEMM's blocking: K = 4C <= 256 terms
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert inputs["x"].grad is not None


def test_compiled_provider_runs(torch_backend):
    case = bench.cases(quick=True, device=CPU)[2]  # Swin: the smallest graph to compile
    inputs = case.make_inputs(CPU)
    out = mode_fn(bench._compiled(inputs), "forward")()
    with torch.no_grad():
        torch.testing.assert_close(out, bench._eager(inputs)(), rtol=1e-5, atol=1e-5)


def test_bytes_moved():
    # Swin-B stage 1 -> 2, B = 1, fp32: tokens 56*56*128, R = 784 rows of K = 512 -> H = 256
    p = dict(R=784, K=512, H=256, D=0, N=3136, C=128, gather=True, act=False, pad=True, gemms=[[784, 512, 256]])
    moved = bench.bytes_moved(p, 4)
    weights = 512 * 256 + 2 * 512 + 256
    assert moved["fused"] == 4 * (2 * 3136 * 128 + weights + 784 * 256)
    # eager reads the tokens once, writes + reads the pad copy, the gathered and the normalized rows
    assert moved["eager"] == 4 * (3136 * 128 + weights + 784 * 256 + 2 * 3136 * 128 + 4 * 784 * 512)


def test_summary_reports_targets_and_bytes():
    params = {c.name: c.params for c in bench.cases(quick=True, device=CPU)}

    def rec(case, provider, mode, ms):
        return Result("merge", case, provider, mode, params[case], ms, ms, ms, None)

    results = [rec("qwen2vl", "vtok_fast", "forward", 9.0), rec("qwen2vl", "eager", "forward", 10.0),
               rec("qwen2vl", "torch.compile", "forward", 12.0), rec("qwen2vl", "gemms", "forward", 8.0),
               rec("swin_b_stage2", "vtok_fast", "full", 11.0), rec("swin_b_stage2", "eager", "full", 10.0),
               # a family: faster than eager but slower than torch.compile misses its CPU target
               rec("gemma3", "vtok_fast", "forward", 9.0), rec("gemma3", "eager", "forward", 10.0),
               rec("gemma3", "torch.compile", "forward", 8.0)]
    text, extra = bench.summarize(results, CPU, bandwidth_gbs=10.0)
    summary = extra["summary"]
    assert summary["qwen2vl/forward"] == {"ratio_vs_eager": pytest.approx(0.9), "ratio_vs_compile": pytest.approx(0.75),
                                          "target_met": True}  # the first cases: eager only
    assert summary["swin_b_stage2/full"]["target_met"] is False
    assert summary["gemma3/forward"]["target_met"] is False
    assert "qwen2vl/forward" in text and "ratio 0.90 (torch.compile / eager 1.20)  ok" in text
    assert summary["qwen2vl/gemms"] == {"gemms_ms": 8.0, "forward_vs_gemms": pytest.approx(9 / 8)}
    assert "MISSED" in text and "bandwidth bound" in text and "1.12x the GEMMs alone by torch.mm" in text
    assert summary["qwen2vl/bytes"]["bound_ms"] == pytest.approx(summary["qwen2vl/bytes"]["fused"] / 1e7)
    gpu_text, gpu = bench.summarize(results, torch.device("cuda"), bandwidth_gbs=4800.0, peak_tflops=1000.0)
    assert ">= 1.5x eager" in gpu_text and ">= 1.3x eager" in gpu_text
    assert gpu["summary"]["qwen2vl/forward"]["speedup_vs_compile"] == pytest.approx(12 / 9)
    assert gpu["summary"]["gemma3/forward"]["target_met"] is False  # 1.11x eager < 1.3x
    flops = sum(2.0 * m * k * n for m, k, n in params["qwen2vl"]["gemms"])
    bound = bench.bytes_moved(params["qwen2vl"], 2)["fused"] / 4.8e12 * 1e3
    roofline = gpu["summary"]["qwen2vl/gemms"]
    assert roofline["roofline_ms"] == pytest.approx(max(flops / 1e15 * 1e3, bound))
    assert roofline["roofline_fraction"] == pytest.approx(roofline["roofline_ms"] / 9.0)
    assert roofline["target_met"] is None  # the roofline target is issue 21's, for its families
