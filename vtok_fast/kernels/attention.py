"""Attention with a per-key bias (ToMe proportional attention): FlashAttention-2 style kernels.

``out_i = sum_j softmax_j(scale * q_i.k_j + b_j) v_j`` for every (batch, head) of ``q`` ``(B, H, M, d)``,
``k``, ``v`` ``(B, H, N, d)`` and a key bias ``b`` ``(B, N)`` shared by all heads and query rows.
All tensors are addressed through their strides, so q/k/v may be views of one fused qkv tensor.

Logits are kept in the log2 domain: ``s' = (scale * log2 e) q.k + (log2 e) b``, so the softmax
uses ``exp2``; statistics are fp32. The forward stores ``lse = m + log2(l)`` per query row; a row
whose keys are all ``-inf`` gets ``out = 0`` and ``lse = +inf``, which makes every recomputed
probability ``exp2(s' - lse)`` zero in the backward, so its gradients are zero too.

1. ``attn_fwd``: one program per (query tile, batch * head), online softmax over KV tiles, one
   bias tile per KV tile.
2. ``attn_bwd_delta``: ``D_i = sum_d dO_id * O_id``.
3. ``attn_bwd_dkdv``: one program per (key tile, batch * head), looping over query tiles:
   ``dV_j``, ``dK_j`` and the per-head bias gradient ``sum_i dS_ij`` (summed over heads on the host).
4. ``attn_bwd_dq``: one program per (query tile, batch * head), looping over KV tiles.
No atomics: every output element is written by one program, so results are deterministic.

The three tiled kernels take their operands under the same names (outputs, then q, k, v[, dO],
bias, the scales, ``heads, seq_q, seq_k, seq_bucket`` and the constexprs), so their signatures
are parallel on purpose: Triton has no struct arguments, and the host builds those keyword
arguments once (``vtok_fast/reduce/attention.py``: ``_launch_args``) for every launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune

LOG2E = tl.constexpr(1.4426950408889634)

# --- configs --------------------------------------------------------------------------------------
# configs[0] is what the interpreter runs (tile edges at 64 or 32, so the tests cross tile
# boundaries). 16-bit inputs: tensor-core tiles; fp32 inputs: IEEE fp32 products on the FMA units,
# one small config (no tuning). configs[0] and the fp32 configs fit 99 KiB of shared memory at
# BLOCK_D = 128, the smallest opt-in limit of sm_80+ GPUs (sm_86 / sm_89); larger configs are
# pruned at launch where they do not fit (``shared_memory_estimate`` through
# ``_autotune.autotune(shared_memory=...)``, checked by the AOT tests).

FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]
FWD_FP32_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
# dK/dV: BLOCK_N keys per program, BLOCK_M query rows per loop step
DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=3),
]
DKDV_FP32_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
# dQ: BLOCK_M query rows per program, BLOCK_N keys per loop step
DQ_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]
DQ_FP32_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
DELTA_BLOCK_M = 64
DELTA_WARPS = 4


def shared_memory_estimate(kind: str, config, block_d: int, elem_bytes: int) -> int:
    """Upper bound of one program's shared memory in bytes (what sm_90 allocates; sm_80 needs
    less): the tiles loaded once, plus ``num_stages`` buffers of the tiles loaded in the loop
    (with the dK/dV loop's fp32 lse and delta rows)."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    if kind == "fwd":  # q once; k, v per step
        rows, extra = bm + stages * 2 * bn, 0
    elif kind == "dkdv":  # k, v once; q, dO, lse, delta per step
        rows, extra = 2 * bn + stages * 2 * bm, stages * bm * 8
    elif kind == "dq":  # q, dO once; k, v per step
        rows, extra = 2 * bm + stages * 2 * bn, 0
    else:
        raise ValueError(f"kind must be 'fwd', 'dkdv' or 'dq', got {kind!r}")
    return rows * block_d * elem_bytes + extra


def _shared_memory_of(kind: str):
    """``shared_memory`` of ``autotune``: the estimate at the launch's head-dim tile and dtype
    (sm_90's, so an upper bound on every target)."""
    return lambda config, args, arch: shared_memory_estimate(kind, config, args["BLOCK_D"],
                                                             args["q_ptr"].element_size())


# Tuned once per head dim and power-of-two length bucket (ToMe shrinks N every block: one tuning
# per bucket, not per length); the autotuner adds the tensors' dtypes to the key itself.
TUNE_KEY = ["HEAD_D", "seq_bucket"]


# --- shared helpers ---------------------------------------------------------------------------------

@triton.jit
def _tile_offsets(pid, seq_len, heads, BLOCK: tl.constexpr):
    """(batch, head, positions of this program's tile): programs run tile-fastest, so the tiles
    of one (batch, head) are adjacent and share its K/V (or Q/dO) in L2."""
    num_tiles = tl.cdiv(seq_len, BLOCK)
    bh = pid // num_tiles
    offs = (pid % num_tiles) * BLOCK + tl.arange(0, BLOCK)
    return (bh // heads).to(tl.int64), (bh % heads).to(tl.int64), bh.to(tl.int64), offs


@triton.jit
def _dim_mask(dims, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(1, BLOCK_D) mask of the real head dims (all true, folded away, unless d is padded)."""
    if HEAD_D == BLOCK_D:
        return tl.full([1, BLOCK_D], 1, tl.int1)
    return dims[None, :] < HEAD_D


@triton.jit
def _seq_tile_ptrs_mask(base, stride_n, stride_d, offs, seq_len, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers and mask of the (len(offs), BLOCK_D) tile of sequence positions ``offs``
    (< ``seq_len``) of one (batch, head)'s (seq, d) matrix at ``base``."""
    dims = tl.arange(0, BLOCK_D)
    ptrs = base + offs[:, None] * stride_n + dims[None, :] * stride_d
    return ptrs, (offs[:, None] < seq_len) & _dim_mask(dims, HEAD_D, BLOCK_D)


@triton.jit
def _load_seq_tile(base, stride_n, stride_d, offs, seq_len, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (len(offs), BLOCK_D) tile; positions past ``seq_len`` and padded dims read as 0."""
    ptrs, mask = _seq_tile_ptrs_mask(base, stride_n, stride_d, offs, seq_len, HEAD_D, BLOCK_D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_seq_tile(base, stride_n, stride_d, offs, seq_len, value, HEAD_D: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Store the real positions and dims of a (len(offs), BLOCK_D) fp32 tile in ``base``'s dtype."""
    ptrs, mask = _seq_tile_ptrs_mask(base, stride_n, stride_d, offs, seq_len, HEAD_D, BLOCK_D)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _key_bias(bias_ptr, stride_bn, cols, seq_k, HAS_BIAS: tl.constexpr):
    """log2(e) * bias of keys ``cols`` in fp32; keys past ``seq_k`` get -inf (so they drop out)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bn, mask=cols < seq_k, other=float("-inf"))
        return bias.to(tl.float32) * LOG2E
    return tl.where(cols < seq_k, 0.0, float("-inf"))


# --- 1. forward -------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    out_ptr, stride_ob, stride_oh, stride_om, stride_od,  # (B, H, M, d) in q's dtype
    lse_ptr,  # (B, H, M) fp32, contiguous: log2-domain log-sum-exp (+inf for a fully masked row)
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,
    bias_ptr, stride_bb, stride_bn,  # (B, N), any float dtype (never read without HAS_BIAS)
    qk_scale,  # scale * log2(e)
    # parallel to the other tiled kernels on purpose (module docstring): one set of keywords
    heads, seq_q, seq_k,
    seq_bucket,  # autotune key only
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, bh, rows = _tile_offsets(tl.program_id(0), seq_q, heads, BLOCK_M)
    q = _load_seq_tile(q_ptr + b * stride_qb + h * stride_qh, stride_qm, stride_qd, rows, seq_q, HEAD_D, BLOCK_D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_bb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, seq_k, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_seq_tile(k_base, stride_kn, stride_kd, cols, seq_k, HEAD_D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s += _key_bias(bias_base, stride_bn, cols, seq_k, HAS_BIAS)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf) while all masked
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_seq_tile(v_base, stride_vn, stride_vd, cols, seq_k, HEAD_D, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key -inf: zeros, and lse = +inf so the backward sees P = 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + bh * seq_q + rows, lse, mask=rows < seq_q)
    _store_seq_tile(out_ptr + b * stride_ob + h * stride_oh, stride_om, stride_od, rows, seq_q, out,
                HEAD_D, BLOCK_D)


attn_fwd = autotune(FWD_CONFIGS, key=TUNE_KEY, shared_memory=_shared_memory_of("fwd"))(_attn_fwd_kernel)
attn_fwd_fp32 = autotune(FWD_FP32_CONFIGS, key=TUNE_KEY)(_attn_fwd_kernel)


# --- 2. backward: D = rowsum(dO * O) -------------------------------------------------------------------

@triton.jit
def attn_bwd_delta(
    delta_ptr,  # (B, H, M) fp32, contiguous
    out_ptr, stride_ob, stride_oh, stride_om, stride_od,
    do_ptr, stride_dob, stride_doh, stride_dom, stride_dod,
    heads, seq_q,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b, h, bh, rows = _tile_offsets(tl.program_id(0), seq_q, heads, BLOCK_M)
    o = _load_seq_tile(out_ptr + b * stride_ob + h * stride_oh, stride_om, stride_od, rows, seq_q,
                   HEAD_D, BLOCK_D)
    do = _load_seq_tile(do_ptr + b * stride_dob + h * stride_doh, stride_dom, stride_dod, rows, seq_q,
                    HEAD_D, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh * seq_q + rows, delta, mask=rows < seq_q)


# --- 3. backward: dK, dV and the bias gradient ------------------------------------------------------------

@triton.jit
def _attn_bwd_dkdv_kernel(
    dk_ptr, stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # (B, H, N, d) in k's dtype
    dv_ptr, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    dbias_ptr,  # (B, H, N) fp32, contiguous: sum_i dS_ij per head (never written without HAS_BIAS)
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,
    do_ptr, stride_dob, stride_doh, stride_dom, stride_dod,
    bias_ptr, stride_bb, stride_bn,
    lse_ptr, delta_ptr,  # (B, H, M) fp32, contiguous
    scale, qk_scale,
    # parallel to the other tiled kernels on purpose (module docstring): one set of keywords
    heads, seq_q, seq_k,
    seq_bucket,  # autotune key only
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, bh, cols = _tile_offsets(tl.program_id(0), seq_k, heads, BLOCK_N)
    k = _load_seq_tile(k_ptr + b * stride_kb + h * stride_kh, stride_kn, stride_kd, cols, seq_k, HEAD_D, BLOCK_D)
    v = _load_seq_tile(v_ptr + b * stride_vb + h * stride_vh, stride_vn, stride_vd, cols, seq_k, HEAD_D, BLOCK_D)
    bias = _key_bias(bias_ptr + b * stride_bb, stride_bn, cols, seq_k, HAS_BIAS)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, seq_q, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_q
        q = _load_seq_tile(q_base, stride_qm, stride_qd, rows, seq_q, HEAD_D, BLOCK_D)
        do = _load_seq_tile(do_base, stride_dom, stride_dod, rows, seq_q, HEAD_D, BLOCK_D)
        lse = tl.load(lse_ptr + bh * seq_q + rows, mask=row_ok, other=float("inf"))  # padding: P = 0
        delta = tl.load(delta_ptr + bh * seq_q + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + bias[:, None]  # (N, M) tile
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if HAS_BIAS:
            db += tl.sum(ds_t, axis=1)

    _store_seq_tile(dk_ptr + b * stride_dkb + h * stride_dkh, stride_dkn, stride_dkd, cols, seq_k, dk * scale,
                HEAD_D, BLOCK_D)
    _store_seq_tile(dv_ptr + b * stride_dvb + h * stride_dvh, stride_dvn, stride_dvd, cols, seq_k, dv,
                HEAD_D, BLOCK_D)
    if HAS_BIAS:
        tl.store(dbias_ptr + bh * seq_k + cols, db, mask=cols < seq_k)


attn_bwd_dkdv = autotune(DKDV_CONFIGS, key=TUNE_KEY, shared_memory=_shared_memory_of("dkdv"))(_attn_bwd_dkdv_kernel)
attn_bwd_dkdv_fp32 = autotune(DKDV_FP32_CONFIGS, key=TUNE_KEY)(_attn_bwd_dkdv_kernel)


# --- 4. backward: dQ ---------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_dq_kernel(
    dq_ptr, stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # (B, H, M, d) in q's dtype
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,
    do_ptr, stride_dob, stride_doh, stride_dom, stride_dod,
    bias_ptr, stride_bb, stride_bn,
    lse_ptr, delta_ptr,
    scale, qk_scale,
    # parallel to the other tiled kernels on purpose (module docstring): one set of keywords
    heads, seq_q, seq_k,
    seq_bucket,  # autotune key only
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, bh, rows = _tile_offsets(tl.program_id(0), seq_q, heads, BLOCK_M)
    row_ok = rows < seq_q
    q = _load_seq_tile(q_ptr + b * stride_qb + h * stride_qh, stride_qm, stride_qd, rows, seq_q, HEAD_D, BLOCK_D)
    do = _load_seq_tile(do_ptr + b * stride_dob + h * stride_doh, stride_dom, stride_dod, rows, seq_q,
                    HEAD_D, BLOCK_D)
    lse = tl.load(lse_ptr + bh * seq_q + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * seq_q + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_bb

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, seq_k, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_seq_tile(k_base, stride_kn, stride_kd, cols, seq_k, HEAD_D, BLOCK_D)
        v = _load_seq_tile(v_base, stride_vn, stride_vd, cols, seq_k, HEAD_D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s += _key_bias(bias_base, stride_bn, cols, seq_k, HAS_BIAS)[None, :]
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    _store_seq_tile(dq_ptr + b * stride_dqb + h * stride_dqh, stride_dqm, stride_dqd, rows, seq_q, dq * scale,
                HEAD_D, BLOCK_D)


attn_bwd_dq = autotune(DQ_CONFIGS, key=TUNE_KEY, shared_memory=_shared_memory_of("dq"))(_attn_bwd_dq_kernel)
attn_bwd_dq_fp32 = autotune(DQ_FP32_CONFIGS, key=TUNE_KEY)(_attn_bwd_dq_kernel)
