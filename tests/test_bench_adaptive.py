"""Smoke test of bench/adaptive.py: its quick cases through every provider, and its summary."""
import pytest
import torch

from vtok_fast.bench import adaptive as bench_adaptive
from vtok_fast.bench.harness import Result, mode_fn

CPU = torch.device("cpu")


def _case(name):
    return next(c for c in bench_adaptive.cases(quick=True, device=CPU) if c.name == name)


def _provider(name):
    return next(p for p in bench_adaptive.providers(CPU) if p.name == name)


def test_sample_batch_varies_the_sample():
    batch = bench_adaptive.sample_batch(4, 64)
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == torch.uint8
    assert len({bytes(x.numpy()) for x in batch}) == 4


@pytest.mark.parametrize("case_name", ["tokenize_336", "tokenize_1024"])
def test_tokenize_cases(benchmark, case_name):
    case = _case(case_name)
    inputs = case.make_inputs(CPU)
    assert _provider("timm").build(inputs) is None and _provider("torch.compile").build(inputs) is None
    ours = benchmark(mode_fn(_provider("vtok_fast").build(inputs), "forward"))
    ref = mode_fn(_provider("reference").build(inputs), "forward")()
    assert ours.shape == ref.shape and ours.shape[1] == case.params["D"]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # fp32 sums over 588 / 768 products
    p = case.params
    assert 0 < p["sample_tokens"] <= p["fixed_tokens"] == (p["side"] // p["patch"]) ** 2


def test_entropy_case():
    inputs = _case("entropy_1024").make_inputs(CPU)
    outs = [mode_fn(_provider(name).build(inputs), "forward")() for name in ("vtok_fast", "reference", "torch.compile")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_model_case(benchmark):
    case = _case("vit_b16_packed")
    inputs = case.make_inputs(CPU)
    assert _provider("reference").build(inputs) is None
    logits = benchmark(mode_fn(_provider("vtok_fast").build(inputs), "forward"))
    fixed = mode_fn(_provider("timm").build(inputs), "forward")()
    assert logits.shape == fixed.shape == (case.params["B"], 1000)
    assert case.params["sample_tokens"] < case.params["fixed_tokens"] == 196


def test_summary_reports_reduction_and_ratios():
    def rec(case, provider, ms, **params):
        return Result("adaptive", case, provider, "forward", params, ms, ms, ms, None)

    tok = dict(side=336, patch=14, B=32, sample_tokens=432, fixed_tokens=576)
    vit = dict(img=224, B=8, sample_tokens=147, fixed_tokens=196)
    results = [rec("tokenize_336", "vtok_fast", 10.0, **tok), rec("tokenize_336", "reference", 25.0, **tok),
               rec("entropy_1024", "vtok_fast", 4.0, B=32), rec("entropy_1024", "torch.compile", 2.0, B=32),
               rec("vit_b16_packed", "vtok_fast", 400.0, **vit), rec("vit_b16_packed", "timm", 500.0, **vit)]
    text, extra = bench_adaptive.summarize(results, CPU)
    summary = extra["summary"]
    assert summary["tokenize_336_vs_reference"] == pytest.approx(2.5)
    assert summary["entropy_1024_vs_torch.compile"] == pytest.approx(0.5)
    assert summary["vit_b16_packed_speedup"] == pytest.approx(1.25)
    assert summary["vit_b16_packed_images_per_s"] == pytest.approx(20.0)
    assert summary["tokenize_336_sample_tokens"] == 432
    assert "sample image at 336 px, patch 14: 432 tokens instead of 576 (25 % fewer)" in text
    assert "20.0 img/s on packed adaptive tokens vs 16.0 on the fixed grid = 1.25x" in text
    missing = bench_adaptive.summarize(results[:4], CPU)[0]
    assert "vit_b16_packed" not in missing
