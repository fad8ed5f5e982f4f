"""Smoke test of bench/fastv.py: its quick cases through pytest-benchmark, and its summary."""
import pytest
import torch

from vtok_fast.bench import OPS
from vtok_fast.bench import fastv as bench_fastv
from vtok_fast.bench.harness import Result, mode_fn

CPU = torch.device("cpu")


def _provider(name):
    return next(p for p in bench_fastv.providers(CPU) if p.name == name)


def test_registered():
    assert OPS["fastv"] == "vtok_fast.bench.fastv"


def test_prompts_hold_the_image_tokens_and_left_padding():
    prompt = bench_fastv.prompts(3, 16, torch.Generator().manual_seed(0))
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    assert ((ids == bench_fastv.IMAGE_TOKEN).sum(dim=1) == 16).all()
    assert mask.sum(dim=1).tolist() == [33, 32, 31] and bool(mask[:, -1].all())
    assert bool((ids[mask == 0] == bench_fastv.VOCAB - 1).all())


@pytest.mark.parametrize("provider", ["vtok_fast", "unpruned", "vtok_fast_eager", "unpruned_eager"])
def test_quick_cases(benchmark, provider):
    cases = bench_fastv.cases(quick=True, device=CPU)
    assert [c.params["B"] for c in cases] == [1, 2]
    case = cases[1]
    inputs = case.make_inputs(CPU)
    forward = _provider(provider).build(inputs)
    out = benchmark(mode_fn(forward, "forward"))
    prompt = inputs["prompt"]["input_ids"]
    assert out.shape == (2, prompt.shape[1] + case.params["new_tokens"])
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    info = getattr(forward.model, "_fastv_info", None)
    if provider.startswith("vtok_fast"):  # half of the 16 image tokens pruned at the prefill
        assert info["image_kept"].shape == (2, 8)
    else:
        assert info is None
    assert getattr(inputs["model"], "_fastv_info", None) is None  # providers patch their own copy


def test_summary_reports_throughput_and_speedups():
    def rec(case, provider, ms, batch):
        params = {"B": batch, "new_tokens": 16, "image_tokens": 576}
        return Result("fastv", case, provider, "forward", params, ms, ms, ms, None)

    results = [rec("llava_generate_b4", "vtok_fast", 800.0, 4), rec("llava_generate_b4", "unpruned", 1200.0, 4),
               rec("llava_generate_b4", "vtok_fast_eager", 1000.0, 4),
               rec("llava_generate_b4", "unpruned_eager", 1600.0, 4),
               rec("llava_generate_b1", "vtok_fast", 400.0, 1)]
    text, extra = bench_fastv.summarize(results, CPU)
    summary = extra["summary"]
    assert summary["llava_generate_b4_vtok_fast_tokens_per_s"] == pytest.approx(80.0)
    assert summary["llava_generate_b4_speedup_vtok_fast_vs_unpruned"] == pytest.approx(1.5)
    assert summary["llava_generate_b4_speedup_vtok_fast_eager_vs_unpruned_eager"] == pytest.approx(1.6)
    assert summary["llava_generate_b4_speedup_vtok_fast_vs_unpruned_eager"] == pytest.approx(2.0)
    assert "B=4, 576 image tokens, 16 new tokens" in text and "SDPA 1.50x" in text
    assert text.index("B=1") < text.index("B=4")
    assert "llava_generate_b1_speedup_vtok_fast_vs_unpruned" not in summary  # no baseline measured
