"""Smoke test of bench/codebook.py: quick cases through pytest-benchmark (disabled by default, so
each runs once), every provider builds and agrees, and the summary prints the targets."""
import pytest
import torch

from vtok_fast.bench import codebook as bench
from vtok_fast.bench.harness import run_benchmark
from vtok_fast.codebook import codebook_search_reference

CPU = torch.device("cpu")


@pytest.mark.parametrize("case", bench.cases(quick=True, device=CPU), ids=lambda c: c.name)
def test_quick_case(benchmark, case):
    inputs = case.make_inputs(CPU)
    forward = bench.providers(CPU)[0].build(inputs)
    idx = benchmark(forward)
    expected = codebook_search_reference(inputs["x"], inputs["codebook"])
    assert (idx == expected).float().mean() > 0.999  # random data: near-ties are rare
    for provider in bench.providers(CPU)[1:]:
        other = provider.build(inputs)
        if other is None:
            continue
        out = other()
        assert (out.reshape(-1) == expected).float().mean() > 0.999, provider.name


def test_summary_and_skips():
    quick = bench.cases(quick=True, device=CPU)[:1]
    results = run_benchmark(bench.OP, quick, bench.providers(CPU)[:3], device=CPU,
                            min_time_s=0.0, memory=False)
    assert {r.provider for r in results} == {"vtok_fast", "cdist_argmin", "addmm_chunked"}
    text, extra = bench.summarize(results, CPU)
    assert "vtok_fast time / FAISS time" in text and "summary" in extra
    # the memory case skips the providers that would materialize 4 GiB
    memory_case = bench._make_case(*bench.MEMORY_CASE, torch.float32, CPU, memory_case=True)
    assert set(memory_case.params["skipped"]) == set(bench.MATERIALIZING)
