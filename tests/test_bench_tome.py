"""Smoke test of bench/tome.py: its quick cases through pytest-benchmark, and its summary."""
import pytest
import torch

from vtok_fast.bench import tome as bench_tome
from vtok_fast.bench.harness import Result, mode_fn

CPU = torch.device("cpu")


def _case(name):
    return next(c for c in bench_tome.cases(quick=True, device=CPU) if c.name == name)


def _provider(name):
    return next(p for p in bench_tome.providers(CPU) if p.name == name)


@pytest.mark.parametrize("case_name", ["vit_b16_op", "vit_l14_336_op"])
@pytest.mark.parametrize("provider", ["vtok_fast", "reference"])
def test_op_cases(benchmark, case_name, provider):
    case = _case(case_name)
    inputs = case.make_inputs(CPU)
    assert _provider("timm").build(inputs) is None  # model providers skip op cases
    out = benchmark(mode_fn(_provider(provider).build(inputs), "forward"))
    assert out.shape == (case.params["B"], case.params["N"] - bench_tome.R, case.params["C"])
    mode_fn(_provider(provider).build(inputs), "full")()  # the backward mode runs too
    assert inputs["x"].grad is not None


def test_model_case(benchmark):
    case = _case("vit_b16_model")
    assert case.modes == ("forward",)
    inputs = case.make_inputs(CPU)
    assert _provider("reference").build(inputs) is None
    forward = _provider("vtok_fast").build(inputs)  # ViT-B/16 patched with r=16
    assert forward is not None, "the timm ToMe patcher (vtok_fast.patch.timm_tome) is missing"
    logits = benchmark(mode_fn(forward, "forward"))
    assert logits.shape == (case.params["B"], 1000)


def test_summary_reports_ratios_against_targets():
    def rec(case, provider, ms, mode="forward", batch=32):
        return Result("tome", case, provider, mode, {"B": batch}, ms, ms, ms, None)

    results = [rec("vit_b16_op", "vtok_fast", 10.0), rec("vit_b16_op", "reference", 25.0),
               rec("vit_b16_model", "vtok_fast", 1000.0), rec("vit_b16_model", "vtok_fast_r16_-1", 500.0),
               rec("vit_b16_model", "timm", 1900.0)]
    text, extra = bench_tome.summarize(results, CPU)
    summary = extra["summary"]
    assert summary["vit_b16_op_forward_speedup"] == pytest.approx(2.5)
    assert summary["model_r=16_speedup"] == pytest.approx(1.9)
    assert summary["model_r=(16,-1)_speedup"] == pytest.approx(3.8)
    assert summary["model_r=16_images_per_s"] == pytest.approx(32.0)
    assert "op vit_b16_op forward: 2.50x vs reference ok" in text
    assert "r=16: 32.0 img/s vs 16.8 unpatched = 1.90x ok" in text
    slow = [r for r in results if r.provider != "timm"] + [rec("vit_b16_model", "timm", 1500.0)]
    assert "BELOW TARGET" in bench_tome.summarize(slow, CPU)[0]
    missing = bench_tome.summarize(results[:2], torch.device("cuda"))[0]
    assert "op level >= 3.0x" in missing and "not measured" in missing


def test_flop_ceiling_of_the_seed_schedule():
    """ViT-B/16 @224, r=16: N_i = 197, 181, ..., 21 gives about 2.02x without the patch embedding
    and head, a little less with them; no merging gives 1."""
    assert abs(bench_tome.flop_ceiling(16, patch_pixels=0, num_classes=0) - 2.016) < 1e-3
    assert 1.9 < bench_tome.flop_ceiling(16) < bench_tome.flop_ceiling(16, patch_pixels=0, num_classes=0)
    assert bench_tome.flop_ceiling(0) == 1.0


def test_profile_buckets_and_quick_run(tmp_path):
    from vtok_fast.bench import tome_profile
    from vtok_fast.cli import main

    assert tome_profile.bucket_of("vtok_fast::tome_merge") == "merge"
    assert tome_profile.bucket_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert tome_profile.bucket_of("aten::addmm") == "linear"
    assert tome_profile.bucket_of("aten::native_layer_norm") == "norm"
    assert tome_profile.bucket_of("aten::add") == "other"
    assert main(["bench", "tome", "--device", "cpu", "--quick", "--profile", "--out", str(tmp_path)]) == 0
    import json
    result = json.loads((tmp_path / "tome_profile_cpu_quick.json").read_text())
    for label in ("unpatched", "patched"):
        assert abs(sum(result[label][b] for b in tome_profile.BUCKETS) - 1.0) < 1e-9
    assert result["patched"]["merge"] > 0 == result["unpatched"]["merge"]
