"""Smoke test of bench/compress.py: every quick case through pytest-benchmark (disabled by default,
so each runs once), every baseline agrees with vtok_fast, and the summary prints the targets."""
import pytest
import torch

from vtok_fast.bench import compress as bench
from vtok_fast.bench.harness import Result, mode_fn

CPU = torch.device("cpu")
CASES = bench.cases(quick=True, device=CPU)


def _provider(name):
    return next(p for p in bench.providers(CPU) if p.name == name)


def _rows(x):
    """The rows of a (M, D) result in a canonical order (ToMe and PruMerge order them differently)."""
    return x[x[:, 0].argsort()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_quick_case_agrees_with_its_baselines(benchmark, case):
    inputs = case.make_inputs(CPU)
    ours = benchmark(mode_fn(_provider("vtok_fast").build(inputs), "forward"))
    compared = 0
    for name in ("baseline", "materialized", "eager_rows", "torch_compile"):
        build = _provider(name).build(inputs)
        if build is None:
            continue
        theirs = build()
        compared += 1
        method = case.params.get("method")
        if method in ("pool_avg", "pool_bilinear", "attn_topk"):
            ours_cmp = ours[:, 1:]  # the baselines return the patch tokens only
        elif method == "prumerge":  # the loop returns the last image, in its own order
            count = theirs.shape[1]
            ours_cmp, theirs = _rows(ours[-1, 1:1 + count]), _rows(theirs[0])
        elif method == "tome":
            ours_cmp = torch.stack([_rows(o) for o in ours])
            theirs = torch.stack([_rows(t) for t in theirs])
        elif method == "visionzip":
            ours_cmp = ours[-1:]
        else:
            ours_cmp = ours
        torch.testing.assert_close(ours_cmp, theirs, rtol=1e-5, atol=1e-5, msg=f"{case.name}: {name}")
    assert compared >= 1 or case.params["method"] == "prumerge_plus"  # its loop: tests/test_compress.py


def test_every_method_runs_at_llava_scale_and_the_attention_cases():
    full = bench.cases(quick=False, device=CPU)
    names = [c.name for c in full]
    assert names == [f"llava15-{m}" for m in bench.LLAVA_METHODS] + ["attention-N4096", "attention-N16384"]
    assert all(c.params["B"] == 16 and c.params["N"] == 577 and c.params["D"] == 1024 for c in full[:-2])


def test_summary_reports_the_targets():
    def rec(case, provider, ms, mem=None, params=None):
        return Result("compress", case, provider, "forward", params or {"B": 16, "N": 577}, ms, ms, ms, mem)

    big = {"B": 1, "N": 16384}
    results = [rec("llava15-prumerge", "vtok_fast", 10.0), rec("llava15-prumerge", "baseline", 150.0),
               rec("attention-N4096", "vtok_fast", 1.0, 0.1, {"N": 4096}),
               rec("attention-N16384", "vtok_fast", 2.0, 0.5, big),
               rec("attention-N16384", "materialized", 900.0, 2048.0, big)]
    text, extra = bench.summarize(results, CPU)
    summary = extra["summary"]
    assert summary["llava15-prumerge_baseline_speedup"] == pytest.approx(15.0)
    assert summary["attention_memory_ratio"] == pytest.approx(0.5 / 2048)
    assert "batched PruMerge at B=16: 15.0x faster than the official per-image loop (>= 10x) ok" in text
    assert "N=16384" in text and "(<= 0.1) ok" in text
    slow = results[:1] + [rec("llava15-prumerge", "baseline", 50.0)] + results[2:4] + [
        rec("attention-N16384", "materialized", 900.0, 4.0, big)]
    text = bench.summarize(slow, CPU)[0]
    assert text.count("BELOW TARGET") == 2
    assert "not measured" in bench.summarize(results[2:3], CPU)[0]
