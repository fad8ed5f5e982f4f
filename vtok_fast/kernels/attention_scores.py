"""Attention received by every key from a few query rows (device code only; host side:
vtok_fast/reduce/attention_scores.py).

``scores[b, n] = mean over query heads h and rows q of softmax_n(q_{b,h,q} . k_{b,kv(h),n} * scale)``

without ever storing a (rows x N) score matrix beyond one tile. Two passes over the keys:

1. ``_attn_lse_fwd``: per (batch, kv head, row block, key split), stream key tiles with an
   online softmax and write each row's log2-sum-exp2 over the split (the host combines splits).
2. ``_attn_scores_fwd``: per (key tile, batch), loop over kv heads and row blocks, recompute the
   tile's scores, turn them into probabilities with the rows' totals from pass 1 and sum them
   over rows: each program owns its keys, so there are no atomics and the sum order is fixed.

Rows: the ``group = Hq / Hkv`` query heads that share a kv head (grouped-query attention) and
their ``Q`` query rows form ``rows = group * Q`` rows, row ``r`` = head ``kv * group + r // Q``,
query ``r % Q``. Scores are computed transposed, ``(BLOCK_N keys) x (BLOCK_M rows)``, so the
``tl.dot`` M dimension is the key tile (>= 64: wgmma on sm_90) even for a single query row.
Scores are kept in base 2 (``qk_scale = scale * log2(e)``, ``exp2``/``log2``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune

# fp32 inputs use IEEE dot products (no TF32), fp16/bf16 tensor cores; fp32 accumulation always.
LSE_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
]
SCORE_CONFIGS = list(LSE_CONFIGS)  # the same key tiles, tuned separately per pass
MAX_BLOCK_N = 128  # key splits are multiples of this, so no tile straddles two splits
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
MAX_BLOCK_M = 64
MAX_BLOCK_D = 128


@triton.jit
def _scores_tile(q_ptr, stride_qh, stride_qq, stride_qd, k_tile_ptr, stride_kn, stride_kd,
                 rows, row_ok, cols, col_ok, kv_head, group, num_q, head_dim, qk_scale,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """``(BLOCK_N, BLOCK_M)`` fp32 tile of ``k . q * qk_scale`` (zero where out of range);
    ``q_ptr`` points at the batch row, ``k_tile_ptr`` at the (batch, kv head) key block."""
    head = kv_head * group + rows // num_q
    q_rows = q_ptr + head.to(tl.int64) * stride_qh + (rows % num_q).to(tl.int64) * stride_qq
    k_rows = k_tile_ptr + cols.to(tl.int64) * stride_kn
    s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for d0 in range(0, head_dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < head_dim
        k = tl.load(k_rows[:, None] + ds[None, :] * stride_kd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        q = tl.load(q_rows[None, :] + ds[:, None] * stride_qd,
                    mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        s = tl.dot(k, q, s, input_precision=PRECISION)
    return s * qk_scale


@triton.jit
def _visible(mask_ptr, stride_mn, cols, col_ok, HAS_MASK: tl.constexpr):
    """Keys in range (and, with a key mask, not masked out)."""
    if HAS_MASK:
        return col_ok & (tl.load(mask_ptr + cols.to(tl.int64) * stride_mn, mask=col_ok, other=0) != 0)
    else:
        return col_ok


@autotune(configs=LSE_CONFIGS, key=["head_dim", "num_rows"])
@triton.jit
def _attn_lse_fwd(
    lse_ptr,  # (B, Hkv, rows, splits) fp32, contiguous: log2-sum-exp2 of each row over a split
    q_ptr, stride_qb, stride_qh, stride_qq, stride_qd,  # (B, Hq, Q, d)
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # (B, Hkv, N, d)
    mask_ptr, stride_mb, stride_mn,  # (B, N) uint8, read only with HAS_MASK
    num_kv_heads, group, num_q, num_rows, num_keys, head_dim, keys_per_split, num_splits,
    qk_scale,  # scale * log2(e)
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(2)
    batch = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    q_b = q_ptr + batch * stride_qb
    k_bh = k_ptr + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    mask_b = mask_ptr + batch * stride_mb

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, num_keys)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        s = _scores_tile(q_b, stride_qh, stride_qq, stride_qd, k_bh, stride_kn, stride_kd,
                         rows, row_ok, cols, col_ok, kv_head, group, num_q, head_dim, qk_scale,
                         PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        s = tl.where(_visible(mask_b, stride_mn, cols, col_ok, HAS_MASK)[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: no inf - inf
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[None, :]), axis=0)
        m = m_new
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    out = lse_ptr + ((pid_bh * num_rows + rows) * num_splits + split).to(tl.int64)
    tl.store(out, lse, mask=row_ok)


@autotune(configs=SCORE_CONFIGS, key=["head_dim", "num_rows"])
@triton.jit
def _attn_scores_fwd(
    out_ptr,  # (B, N) fp32, contiguous
    q_ptr, stride_qb, stride_qh, stride_qq, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,
    mask_ptr, stride_mb, stride_mn,
    lse_ptr,  # (B, Hkv, rows) fp32, contiguous; +inf for a row that sees no key
    num_kv_heads, group, num_q, num_rows, num_keys, head_dim,
    qk_scale, inv_rows,  # 1 / (Hq * Q)
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_keys
    visible = _visible(mask_ptr + batch * stride_mb, stride_mn, cols, col_ok, HAS_MASK)
    q_b = q_ptr + batch * stride_qb
    acc = tl.zeros([BLOCK_N], tl.float32)
    k_bh = k_ptr + batch * stride_kb  # advanced by one kv head per iteration (64-bit pointer)
    for kv_head in range(0, num_kv_heads):
        lse_bh = lse_ptr + (batch * num_kv_heads + kv_head) * num_rows
        for r0 in range(0, num_rows, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < num_rows
            s = _scores_tile(q_b, stride_qh, stride_qq, stride_qd, k_bh, stride_kn, stride_kd,
                             rows, row_ok, cols, col_ok, kv_head, group, num_q, head_dim, qk_scale,
                             PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            lse = tl.load(lse_bh + rows, mask=row_ok, other=float("inf"))
            p = tl.exp2(s - lse[None, :])
            p = tl.where(visible[:, None] & row_ok[None, :], p, 0.0)
            acc += tl.sum(p, axis=1)
        k_bh += stride_kh
    tl.store(out_ptr + batch * num_keys + cols, acc * inv_rows, mask=col_ok)
