"""attention_scores: the single-row attention kernel (interpreter) and the PyTorch path against the
float64 definition; splits, chunks, masks, grouped-query heads, bad inputs, torch.compile, and
ahead-of-time compilation for sm_80 / sm_90."""
import math

import pytest
import torch

from helpers import compile_for_gpu, config_constexprs, tensor_core_instructions
from vtok_fast.reduce import attention_scores as mod
from vtok_fast.reduce.attention_scores import attention_scores, attention_scores_reference

# The inputs are exact in their dtype and the reference is float64 of the same values, so the
# only errors are fp32 accumulation of d products, exp2/log2 and the sum over rows: ~1e-6
# relative for any d used here (fp16 products are exact in fp32 too).
RTOL, ATOL = 2e-5, 1e-9

SHAPES = [  # (B, Hq, Hkv, Q, N, d)
    (1, 1, 1, 1, 577, 64),     # one CLS row (PruMerge / VisionZip)
    (2, 4, 2, 3, 300, 40),     # grouped-query heads, several rows, N not a tile multiple
    (2, 8, 8, 1, 129, 200),    # d over one 128 tile: two d chunks
    (1, 4, 1, 20, 70, 16),     # 80 rows: two row blocks of 64
]


def _inputs(b, hq, hkv, q, n, d, dtype, device="cpu"):
    queries = torch.randn(b, hq, q, d).to(device, dtype)
    keys = (2 * torch.randn(b, hkv, n, d)).to(device, dtype)  # peaked softmax rows
    return queries, keys


def _close(actual, expected):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_definition(backend, dtype, shape):
    queries, keys = _inputs(*shape, dtype)
    out = attention_scores(queries, keys)
    _close(out, attention_scores_reference(queries, keys))
    torch.testing.assert_close(out.sum(1).double(), torch.ones(shape[0], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_kernel_key_splits(triton_backend, splits):
    queries, keys = _inputs(2, 2, 1, 2, 1000, 32, torch.float32)
    mask = torch.rand(2, 1000) > 0.5
    for key_mask in (None, mask):
        out = mod._scores_triton(queries, keys, key_mask, 32 ** -0.5, splits=splits)
        _close(out, attention_scores_reference(queries, keys, key_mask=key_mask))


def test_torch_path_key_chunks(torch_backend, monkeypatch):
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 4 * 6 * 50)  # 50 keys per chunk: 9 chunks
    queries, keys = _inputs(2, 6, 3, 2, 430, 24, torch.float32)
    mask = torch.rand(2, 430) > 0.3
    for key_mask in (None, mask):
        _close(attention_scores(queries, keys, key_mask=key_mask),
               attention_scores_reference(queries, keys, key_mask=key_mask))


def test_key_mask_hides_keys_and_empty_rows_give_zero(backend):
    queries, keys = _inputs(3, 2, 2, 1, 50, 16, torch.float32)
    mask = torch.rand(3, 50) > 0.5
    mask[1] = False  # image 1 sees no key at all
    out = attention_scores(queries, keys, key_mask=mask)
    assert (out[~mask] == 0).all()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out[[0, 2]].sum(1), torch.ones(2), rtol=1e-5, atol=0)
    _close(out, attention_scores_reference(queries, keys, key_mask=mask))


def test_scale_and_uniform_keys(backend):
    queries, keys = _inputs(1, 2, 2, 2, 40, 8, torch.float32)
    _close(attention_scores(queries, keys, 0.3), attention_scores_reference(queries, keys, 0.3))
    # scale 0: every key gets 1/N
    torch.testing.assert_close(attention_scores(queries, keys, 0.0), torch.full((1, 40), 1 / 40),
                               rtol=RTOL, atol=0)


def test_no_gradient_and_compile(backend):
    queries, keys = _inputs(2, 2, 2, 1, 64, 16, torch.float32)
    queries.requires_grad_()
    out = attention_scores(queries, keys)
    assert not out.requires_grad
    compiled = torch.compile(lambda q, k: attention_scores(q, k) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(queries.detach(), keys), 2 * out)


@pytest.mark.parametrize("masked", [False, True])
def test_empty_batch(backend, masked):
    """B = 0 gives a (0, N) fp32 result (it used to divide by zero on both paths)."""
    queries, keys = _inputs(0, 4, 2, 3, 70, 16, torch.float16)
    key_mask = torch.ones(0, 70, dtype=torch.bool) if masked else None
    out = attention_scores(queries, keys, key_mask=key_mask)
    assert out.shape == (0, 70) and out.dtype == torch.float32


def test_bad_inputs_name_the_argument():
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 10, 8)
    with pytest.raises(ValueError, match=r"queries must be \(B, heads, Q, d\)"):
        attention_scores(q[0], k)
    with pytest.raises(ValueError, match="disagree"):
        attention_scores(q, torch.randn(3, 2, 10, 8))
    with pytest.raises(ValueError, match="disagree"):
        attention_scores(q, torch.randn(2, 2, 10, 4))
    with pytest.raises(ValueError, match="multiple of the keys' 3 heads"):
        attention_scores(q, torch.randn(2, 3, 10, 8))
    with pytest.raises(TypeError, match="keys has dtype torch.float16 but queries has torch.float32"):
        attention_scores(q, k.half())
    with pytest.raises(ValueError, match=r"key_mask must be \(B, N\) = \(2, 10\)"):
        attention_scores(q, k, key_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask must have dtype in"):
        attention_scores(q, k, key_mask=torch.ones(2, 10))
    with pytest.raises(TypeError, match="scale must be a finite float"):
        attention_scores(q, k, math.inf)
    with pytest.raises(ValueError, match="at least one query row"):
        attention_scores(q[:, :, :0], k)


# --- ahead-of-time compilation for sm_80 / sm_90 ---------------------------------------------

TRITON_TYPE = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _signature(kernel, dtype: str) -> dict:
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(q_ptr=TRITON_TYPE[dtype], k_ptr=TRITON_TYPE[dtype], mask_ptr="*u8", lse_ptr="*fp32",
               qk_scale="fp32")
    if "out_ptr" in sig:
        sig.update(out_ptr="*fp32", inv_rows="fp32")
    return sig


def aot_compile_all(arch: int) -> list[dict]:
    """Both kernels, every config, dtype, mask flag and the tile shapes the launcher picks."""
    from vtok_fast.kernels import attention_scores as ka

    report = []
    for name, kernel in (("lse", ka._attn_lse_fwd), ("scores", ka._attn_scores_fwd)):
        for dtype in ("fp32", "fp16", "bf16"):
            sig = _signature(kernel.fn, dtype)
            for config in kernel.all_configs:
                consts, warps, stages = config_constexprs(config)
                for block_m, block_d, has_mask in [(16, 128, True), (64, 64, False)]:
                    consts.update(BLOCK_M=block_m, BLOCK_D=block_d, HAS_MASK=has_mask, stride_qd=1,
                                  stride_kd=1, PRECISION="ieee" if dtype == "fp32" else "tf32")
                    rec = {"what": f"{name} {dtype} {consts} warps={warps}", "dtype": dtype}
                    try:
                        compiled = compile_for_gpu(kernel.fn, sig, consts, arch=arch, num_warps=warps,
                                                   num_stages=stages, divisible=("q_ptr", "k_ptr"))
                        rec.update(shared=compiled.metadata.shared, any_mma="mma" in compiled.asm["ptx"],
                                   tensor_cores=tensor_core_instructions(compiled, arch))
                    except Exception as exc:  # reported by the test
                        rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
                    report.append(rec)
    return report


# --- real GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_float64(dtype):
    for shape in SHAPES + [(2, 32, 8, 1, 16384, 128)]:
        queries, keys = _inputs(*shape, dtype, device="cuda")
        mask = torch.rand(shape[0], shape[4], device="cuda") > 0.2
        _close(attention_scores(queries, keys, key_mask=mask),
               attention_scores_reference(queries, keys, key_mask=mask))
