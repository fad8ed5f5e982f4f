"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU: every
autotune config and every dtype the host launches compiles, fits shared memory, and multiplies on
tensor cores (or, for the IEEE fp32 contract, never on TF32 ones).

The compile jobs of each op stand next to its other tests (``aot_compile_all(arch)`` in
``tests/test_<op>.py``: the kernels' signatures and launch specializations); the checks are all
here. The suite runs under TRITON_INTERPRET=1, where ``@triton.jit`` functions cannot be
compiled, so :func:`helpers.aot_reports` runs each op's jobs in fresh interpreter-free Pythons,
one per architecture, and brings back JSON records.
"""
import pytest
import torch
from helpers import aot_reports

import test_attention as attention_tests
import test_codebook_search as codebook_tests
import test_merge_project as merge_tests
import test_patch_embed as patch_embed_tests

pytestmark = pytest.mark.aot
ARCHS = [80, 90]


def _records(op: str):
    """Module-scoped: each op's records for both archs, compiled once."""
    return pytest.fixture(scope="module", name=f"{op}_records")(lambda: aot_reports(f"test_{op}"))


patch_embed_records = _records("patch_embed")
codebook_search_records = _records("codebook_search")
tome_records = _records("tome")
attention_records = _records("attention")
attention_scores_records = _records("attention_scores")
merge_project_records = _records("merge_project")
adaptive_records = _records("adaptive")


def _tensor_cores_unless_ieee(rec, ieee: bool):
    if ieee:  # IEEE fp32 products by contract: no TF32 mma
        assert not rec["any_mma"], rec["what"]
    else:
        assert rec["tensor_cores"], f"{rec['what']} does not use tensor cores"


# --- patch embedding --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_patch_embed_every_config_and_dtype_compiles(patch_embed_records, arch):
    from vtok_fast.kernels import patch_embed as kernels

    entries = patch_embed_records[arch]
    for kernel, variants, configs in (("fwd", patch_embed_tests.FWD_VARIANTS, kernels.FWD_CONFIGS),
                                      ("dw", patch_embed_tests.DW_VARIANTS, kernels.DW_CONFIGS),
                                      ("dx", patch_embed_tests.DX_VARIANTS, kernels.DX_CONFIGS)):
        for variant in variants:
            got = {e["config"] for e in entries if e["kernel"] == kernel and e["variant"] == "-".join(variant)}
            assert got == {str(c.kwargs) for c in configs}, (kernel, variant)
    assert any(e["kernel"] == "fwd" and e["p"] == 14 for e in entries)


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_embed_uses_tensor_cores_and_fits_shared_memory(patch_embed_records, arch):
    too_big = []
    for e in patch_embed_records[arch]:
        # IEEE fp32 products have no tensor-core instruction; everything else must use them
        assert e["tensor_cores"] == (e["kernel"] != "fwd_ieee"), e
        if e["shared"] > patch_embed_tests.SHARED_LIMIT[arch]:
            too_big.append(e)
    # only fp32 forward tiles may exceed shared memory (pruned at launch: the kernel's estimate),
    # and at most one config per variant, so every variant keeps launchable configs
    assert all(e["kernel"] == "fwd" and e["variant"].split("-")[1] == "fp32" for e in too_big), too_big
    assert len({(e["variant"], e["p"]) for e in too_big}) == len(too_big), too_big


# --- codebook search --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_codebook_search_kernels_compile(codebook_search_records, arch):
    records = codebook_search_records[arch]
    assert len(records) >= 15
    for rec in records:
        assert "error" not in rec, f"{rec['what']}: {rec.get('error')}"
        assert rec["shared"] <= codebook_tests.SHARED_MEMORY_LIMIT[arch], rec["what"]
        if rec["dtype"] == "rerank":
            continue
        assert rec["shared"] <= rec["estimate"], f"{rec['what']}: estimate {rec['estimate']} < {rec['shared']}"
        _tensor_cores_unless_ieee(rec, rec["dtype"] == str(torch.float32))


# --- ToMe -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_tome_every_kernel_compiles(tome_records, arch):
    kinds = [(e["kernel"], e["dtype"]) for e in tome_records[arch]]
    assert kinds.count(("plan", "fp32")) == 4
    for dtype in ("fp32", "fp16", "bf16"):
        assert kinds.count(("scores", dtype)) == 2 * 3  # 3 configs x protection flags
        assert sum(k == "merge" and d.startswith(dtype) for k, d in kinds) == (2 if dtype == "fp32" else 3) * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_tome_scores_kernel_uses_tensor_cores(tome_records, arch):
    for entry in tome_records[arch]:
        if entry["kernel"] == "scores":
            assert entry["tensor_cores"], entry
            assert entry["shared"] <= 160 * 1024, entry  # fits an A100's 164 KiB


# --- attention with a key bias ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_attention_kernels_compile(attention_records, arch):
    records = attention_records[arch]
    assert len(records) == len(attention_tests.aot_jobs())
    for rec in records:
        assert "error" not in rec, f"{rec['what']}: {rec.get('error')}"
        assert rec["shared"] <= rec["estimate"], f"{rec['what']}: {rec['shared']} > {rec['estimate']}"
        if rec["dot"]:
            _tensor_cores_unless_ieee(rec, rec["dtype"] == str(torch.float32))


# --- single-row attention scores --------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_attention_scores_kernels_compile(attention_scores_records, arch):
    records = attention_scores_records[arch]
    assert len(records) == 2 * 3 * 3 * 2
    for rec in records:
        assert "error" not in rec, f"{rec['what']}: {rec.get('error')}"
        assert rec["shared"] <= 163 * 1024, rec["what"]
        _tensor_cores_unless_ieee(rec, rec["dtype"] == "fp32")


# --- fused merger + projector -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_merge_project_kernels_compile(merge_project_records, arch):
    records = merge_project_records[arch]
    assert len(records) == merge_tests.aot_record_count()
    assert any(" gemma3 " in r["what"] for r in records) and any(" aya " in r["what"] for r in records)
    too_big = []
    for rec in records:
        assert "error" not in rec, f"{rec['what']}: {rec.get('error')}"
        if rec["kind"] in ("fwd", "fwd_ieee"):  # 16-bit and TF32 products on tensor cores
            _tensor_cores_unless_ieee(rec, rec["kind"] == "fwd_ieee")
        if rec["shared"] > merge_tests.SHARED_LIMIT[arch]:
            too_big.append(rec["what"])
    # only fp32 tiles of the widest configs may exceed shared memory (pruned at launch):
    # BLOCK_N = 256, and the GLU's (Aya's) BLOCK_N = 128 tiles, which load two weight tiles per
    # step; the first (64 x 64) config of every flavour fits in every dtype
    assert all("fp32->fp32" in w and ("'BLOCK_N': 256" in w or (" aya " in w and "'BLOCK_N': 128" in w))
               for w in too_big), too_big
    assert not any("'BLOCK_M': 64, 'BLOCK_N': 64," in w for w in too_big), too_big


# --- adaptive-patch entropy -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_entropy_kernel_compiles(adaptive_records, arch):
    import test_adaptive

    records = adaptive_records[arch]
    assert len(records) == len(test_adaptive.IMAGE_TYPES) * 3
    for rec in records:
        assert "error" not in rec, f"{rec['what']}: {rec.get('error')}"
        assert not rec["fma"], f"{rec['what']}: v * 255 + 0.5 must round twice (no FMA)"
        assert rec["shared"] <= 64 * 1024, rec["what"]
