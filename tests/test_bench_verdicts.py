"""A quick (smoke) run judges no target: every benchmark summary prints its numbers followed by
"quick run: no verdict" instead of ok / BELOW TARGET / PASS / FAIL / MISSED, and records no
pass/fail in its JSON; the same results in a full run get their verdicts."""
import pytest
import torch

from vtok_fast.bench import attention, codebook, compress, merge, patch_embed, tome
from vtok_fast.bench.harness import QUICK_NO_VERDICT, Result

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
VERDICTS = ("ok", "BELOW TARGET", "PASS", "FAIL", "MISSED")


def _rec(op, case, provider, ms, mode="forward", params=None, mem=None):
    return Result(op, case, provider, mode, params or {"B": 16, "N": 577}, ms, ms, ms, mem)


def _codebook():
    name = codebook._case_name(*codebook.TARGET_CASE, torch.float32)
    small = {"N": 64, "K": 16, "D": 8}  # the alternated re-timing runs at these params
    return [_rec("codebook", name, "vtok_fast", 40.22, params=small),
            _rec("codebook", name, "faiss_flat_l2", 1.0, params=small)], CPU


def _merge_results():
    params = {c.name: c.params for c in merge.cases(quick=True, device=CPU)}["qwen2vl"]
    return [_rec("merge", "qwen2vl", "vtok_fast", 12.0, params=params),
            _rec("merge", "qwen2vl", "eager", 10.0, params=params)]


CASES = {
    "codebook": (codebook.summarize, _codebook),
    "compress": (compress.summarize, lambda: ([
        _rec("compress", "llava15-prumerge", "vtok_fast", 10.0), _rec("compress", "llava15-prumerge", "baseline", 50.0),
        _rec("compress", "attention-N16384", "vtok_fast", 2.0, params={"N": 16384}, mem=500.0),
        _rec("compress", "attention-N16384", "materialized", 9.0, params={"N": 16384}, mem=600.0)], CPU)),
    "tome": (tome.summarize, lambda: ([
        _rec("tome", "vit_b16_op", "vtok_fast", 100.0), _rec("tome", "vit_b16_op", "reference", 6.0),
        _rec("tome", "vit_b16_model", "vtok_fast", 1000.0, params={"B": 8}),
        _rec("tome", "vit_b16_model", "timm", 60.0, params={"B": 8})], CPU)),
    "patch_embed": (patch_embed.summarize, lambda: ([
        _rec("patch-embed", "vit_b16", "vtok_fast", 40.0), _rec("patch-embed", "vit_b16", "timm", 1.0)], CPU)),
    "merge": (lambda r, d, quick=False: merge.summarize(r, d, bandwidth_gbs=10.0, quick=quick),
              lambda: (_merge_results(), CPU)),
    "attention": (attention.summarize, lambda: ([
        _rec("attention", "vit_b-N197-B256-float16", "vtok_fast", 3.0),
        _rec("attention", "vit_b-N197-B256-float16", "sdpa_flash_no_bias", 1.0)], CUDA)),
}


# a ratio each summary prints from the results above
NUMBERS = {"codebook": "40.22", "compress": "5.0x", "tome": "0.06x", "patch_embed": "ratio 40.00",
           "merge": "ratio 1.20", "attention": "3.00x"}


def _judgements(summary) -> list:
    """Every pass/fail value recorded in a summary's JSON (``pass``, ``target_met``, ...)."""
    if isinstance(summary, dict):
        found = [v for k, v in summary.items() if k in ("pass", "target_met", "cpu_target_met")]
        return found + [j for v in summary.values() for j in _judgements(v)]
    return []


@pytest.mark.parametrize("name", CASES)
def test_quick_summaries_give_numbers_but_no_verdict(name):
    summarize, make = CASES[name]
    results, device = make()
    full_text, full_extra = summarize(results, device)
    assert any(word in full_text for word in VERDICTS), full_text
    quick_text, quick_extra = summarize(results, device, quick=True)
    assert QUICK_NO_VERDICT in quick_text and not any(f" {w}" in quick_text.replace(QUICK_NO_VERDICT, "")
                                                      for w in VERDICTS), quick_text
    number = NUMBERS[name]  # the numbers are printed all the same
    assert number in full_text and number in quick_text, (number, quick_text)
    judged = _judgements(quick_extra if isinstance(quick_extra, dict) else {})
    assert all(v is None for v in judged), quick_extra
    assert any(v is not None for v in _judgements(full_extra if isinstance(full_extra, dict) else {})) or not judged


def test_codebook_quick_line_reads_as_the_issue_asks():
    results, device = _codebook()
    text, extra = codebook.summarize(results, device, quick=True)
    assert "vtok_fast time / FAISS time: 40.22 (target <= 1.1) quick run: no verdict" in text
    assert extra["summary"]["targets"]["cpu_vs_faiss"] == {"value": 40.22, "target": 1.1, "pass": None}
    text, extra = codebook.summarize(results, device)
    assert "40.22 (target <= 1.1) FAIL" in text and extra["summary"]["targets"]["cpu_vs_faiss"]["pass"] is False
