"""Triton kernels of the fused patch embedding (host code: ``vtok_fast/encode/patch_embed.py``).

All three are implicit-im2col GEMMs: the ``(rows, K)`` patch matrix is never materialized;
each tile gathers its pixels from NCHW images, with K ordered ``(c, kh, kw)`` and masked (K need
not be a multiple of the tile: p=14 gives 588). Pixels may be normalized on the load
(``x * scale[c] + shift[c]``, fp32) before the cast to the dot dtype. fp32 accumulation.

- ``patch_embed_fwd``: tokens ``(B, P + N, D)``; output rows ``r = b * L + l``; prefix rows
  (``l < P``) take the prefix token, patch rows the product plus bias; both add a position row.
- ``patch_embed_bwd_dw``: split-M weight gradient, fp32 partials ``(SPLIT, D, K)``.
- ``patch_embed_bwd_dx``: pixel gradient ``(dY W) * scale``, scattered to the pixels
  (stride = patch size: each pixel belongs to at most one patch).
"""
import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune
from vtok_fast.kernels._tiles import GEMM_CONFIGS, dot_acc, gemm_shared_memory, grouped_tile

# The forward's tiles: BLOCK_M token rows x BLOCK_N embedding columns (D), BLOCK_K steps of K (the
# shared GEMM list; the 64-row tiles keep small batches, B=1: 197 rows, spread over the SMs).
FWD_CONFIGS = GEMM_CONFIGS

# The backward kernels keep the forward's letters (M rows, N = D columns, K) and fit every sm_80+
# GPU's shared memory in every dtype (at most 96 KiB on sm_80, 144 KiB on sm_90: the AOT tests).
# (BLOCK_N, BLOCK_K, BLOCK_M): a BLOCK_N x BLOCK_K tile of dW, reducing over BLOCK_M patch rows
# per step.
DW_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_M": 64}, num_warps=4, num_stages=3),
]

# (BLOCK_M, BLOCK_K, BLOCK_N): a BLOCK_M x BLOCK_K tile of the pixel gradient, reducing over
# BLOCK_N embedding columns per step.
DX_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]


def fwd_shared_memory(config, args, arch: int) -> int:
    """``shared_memory`` of the forward: pixels (A, gathered, normalized / cast in registers
    unless they are already weight-dtype values) times the weight (B)."""
    img, w = args["img_ptr"], args["w_ptr"]
    return gemm_shared_memory(config, arch, img.element_size(), w.element_size(),
                              a_in_registers=args["HAS_NORM"] or img.dtype != w.dtype,
                              tensor_cores=w.element_size() < 4 or args["ALLOW_TF32"])


@triton.jit
def _patch_offsets(n, GW, stride_h, stride_w, PH: tl.constexpr, PW: tl.constexpr):
    """Offset of patch ``n`` (row-major over a grid of width GW) from its image's origin."""
    return (n // GW) * PH * stride_h + (n % GW) * PW * stride_w


@triton.jit
def _k_offsets(ks, stride_c, stride_h, stride_w, PH: tl.constexpr, PW: tl.constexpr):
    """Offset of element ``k = (c, kh, kw)`` inside a patch, and its channel."""
    c = ks // (PH * PW)
    r = ks % (PH * PW)
    return c * stride_c + (r // PW) * stride_h + (r % PW) * stride_w, c


@triton.jit
def _load_patch_tile(img_ptr, row_off, row_mask, ks, K, stride_c, stride_h, stride_w,
                     scale_ptr, shift_ptr, PH: tl.constexpr, PW: tl.constexpr,
                     HAS_NORM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(rows, BLOCK_K) tile of the implicit patch matrix, normalized and cast to the dot dtype."""
    k_off, c = _k_offsets(ks, stride_c, stride_h, stride_w, PH, PW)
    k_mask = ks < K
    mask = row_mask[:, None] & k_mask[None, :]
    a = tl.load(img_ptr + row_off[:, None] + k_off[None, :], mask=mask, other=0)
    if HAS_NORM:
        sc = tl.load(scale_ptr + c, mask=k_mask, other=0.0)
        sh = tl.load(shift_ptr + c, mask=k_mask, other=0.0)
        a = tl.where(mask, a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
    return a.to(DOT_DTYPE)


@autotune(configs=FWD_CONFIGS, key=["M", "D", "K"], shared_memory=fwd_shared_memory)
@triton.jit
def patch_embed_fwd(
    out_ptr, stride_ob, stride_ol, stride_od,             # (B, L, D) tokens, L = P + N
    img_ptr, stride_ib, stride_ic, stride_ih, stride_iw,  # (B, C, H, W) pixels
    w_ptr, stride_wd, stride_wk,                          # (D, K) conv weight, K = (c, kh, kw)
    bias_ptr, stride_bd,                                  # (D,)
    pos_ptr, stride_pl, stride_pd,                        # (L - POS_START, D) position table
    pre_ptr, stride_xl, stride_xd,                        # (P, D) prefix tokens
    scale_ptr, shift_ptr,                                 # (C,) fp32 pixel affine
    M, D, K, L, P, GW, POS_START,                         # M = B * L output rows
    PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_NORM: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, cols, row_in, col_in = grouped_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_N, GROUP_M)
    b = rows // L
    l = rows % L  # noqa: E741
    is_patch = row_in & (l >= P)
    n = tl.where(is_patch, l - P, 0)
    row_off = b * stride_ib + _patch_offsets(n, GW, stride_ih, stride_iw, PH, PW)

    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _load_patch_tile(img_ptr, row_off, is_patch, ks, K, stride_ic, stride_ih, stride_iw,
                             scale_ptr, shift_ptr, PH, PW, HAS_NORM, dot_dtype)
        w = tl.load(w_ptr + cols[None, :] * stride_wd + ks[:, None] * stride_wk,
                    mask=(ks < K)[:, None] & col_in[None, :], other=0)  # (BLOCK_K, BLOCK_N)
        acc = dot_acc(a, w, acc, ALLOW_TF32)

    # epilogue: bias on patch rows, prefix token on prefix rows, position row on both
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bd, mask=col_in, other=0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    is_pre = row_in & (l < P)
    pre = tl.load(pre_ptr + tl.where(is_pre, l, 0)[:, None] * stride_xl + cols[None, :] * stride_xd,
                  mask=is_pre[:, None] & col_in[None, :], other=0)
    acc += pre.to(tl.float32)
    if HAS_POS:
        has_row = row_in & (l >= POS_START)
        pos_row = tl.where(has_row, l - POS_START, 0)
        pos = tl.load(pos_ptr + pos_row[:, None] * stride_pl + cols[None, :] * stride_pd,
                      mask=has_row[:, None] & col_in[None, :], other=0)
        acc += pos.to(tl.float32)
    out = out_ptr + b[:, None] * stride_ob + l[:, None] * stride_ol + cols[None, :] * stride_od
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@autotune(configs=DW_CONFIGS, key=["M", "D", "K", "SPLIT"])
@triton.jit
def patch_embed_bwd_dw(
    dw_ptr, stride_ws, stride_wd, stride_wk,              # (SPLIT, D, K) fp32 partial sums
    g_ptr, stride_gb, stride_gl, stride_gd,               # (B, P + N, D) output gradient
    img_ptr, stride_ib, stride_ic, stride_ih, stride_iw,  # (B, C, H, W) pixels
    scale_ptr, shift_ptr,                                 # (C,) fp32 pixel affine
    M, D, K, N, P, GW, SPLIT,                             # M = B * N patch rows
    PH: tl.constexpr, PW: tl.constexpr, HAS_NORM: tl.constexpr, ALLOW_TF32: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    ds = (pid // num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    d_in = ds < D
    # this program's slice of the M patch rows, a whole number of BLOCK_M steps
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M
    m_lo = split.to(tl.int64) * rows_per_split
    m_hi = min(m_lo + rows_per_split, M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_in = ms < m_hi
        b = ms // N
        n = ms % N
        row_off = b * stride_ib + _patch_offsets(n, GW, stride_ih, stride_iw, PH, PW)
        a = _load_patch_tile(img_ptr, row_off, m_in, ks, K, stride_ic, stride_ih, stride_iw,
                             scale_ptr, shift_ptr, PH, PW, HAS_NORM, DOT_DTYPE)  # (BLOCK_M, BLOCK_K)
        g = tl.load(g_ptr + (b * stride_gb + (n + P) * stride_gl)[None, :] + ds[:, None] * stride_gd,
                    mask=d_in[:, None] & m_in[None, :], other=0)  # (BLOCK_N, BLOCK_M)
        acc = dot_acc(g.to(DOT_DTYPE), a, acc, ALLOW_TF32)

    out = dw_ptr + split.to(tl.int64) * stride_ws + ds[:, None] * stride_wd + ks[None, :] * stride_wk
    tl.store(out, acc, mask=d_in[:, None] & (ks < K)[None, :])


@autotune(configs=DX_CONFIGS, key=["M", "D", "K"])
@triton.jit
def patch_embed_bwd_dx(
    dx_ptr, stride_xb, stride_xc, stride_xh, stride_xw,   # (B, C, H, W) pixel gradient
    g_ptr, stride_gb, stride_gl, stride_gd,               # (B, P + N, D) output gradient
    w_ptr, stride_wd, stride_wk,                          # (D, K) conv weight, K = (c, kh, kw)
    scale_ptr,                                            # (C,) fp32 pixel scale
    M, D, K, N, P, GW,                                    # M = B * N patch rows
    PH: tl.constexpr, PW: tl.constexpr, HAS_NORM: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    ms = (pid // num_k).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_in = ms < M
    k_in = ks < K
    b = ms // N
    n = ms % N
    g_row = b * stride_gb + (n + P) * stride_gl
    c = ks // (PH * PW)
    dot_dtype = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_N):
        ds = d0 + tl.arange(0, BLOCK_N)
        d_in = ds < D
        g = tl.load(g_ptr + g_row[:, None] + ds[None, :] * stride_gd,
                    mask=m_in[:, None] & d_in[None, :], other=0)  # (BLOCK_M, BLOCK_N)
        w = tl.load(w_ptr + ds[:, None] * stride_wd + ks[None, :] * stride_wk,
                    mask=d_in[:, None] & k_in[None, :], other=0)  # (BLOCK_N, BLOCK_K)
        acc = dot_acc(g.to(dot_dtype), w, acc, ALLOW_TF32)

    if HAS_NORM:
        acc *= tl.load(scale_ptr + c, mask=k_in, other=0.0)[None, :]
    row_off = b * stride_xb + _patch_offsets(n, GW, stride_xh, stride_xw, PH, PW)
    k_off, _ = _k_offsets(ks, stride_xc, stride_xh, stride_xw, PH, PW)
    tl.store(dx_ptr + row_off[:, None] + k_off[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_in[:, None] & k_in[None, :])
