"""Triton kernels for nearest-codebook search (device code only; host side: vtok_fast/encode/codebook_search.py).

The search minimizes a per-code *score* ``s = bias[c] + scale * (x . c)``:

- metric "l2":     ``bias = ||c||^2``, ``scale = -2``  (``||x||^2`` is constant per row and left out);
- metric "cosine": ``bias = 0``, ``scale = -1``, codes l2-normalized by the host.

Two stages, so that no N x K matrix is ever written:

1. a streaming kernel walks code tiles through ``tl.dot`` and keeps a few candidate codes per row:
   ``_codebook_argmin_fwd`` (k = 1) keeps the best two tile winners, ``_codebook_topk_fwd``
   (k > 1) keeps the exact best R codes. The code range can be split over a second grid axis
   (``codes_per_split``) when there are too few row blocks to fill the GPU; each split writes its
   own candidates.
2. ``codebook_rerank_fwd`` re-scores every candidate exactly in fp32 (difference form
   ``sum((x - c)^2)`` for l2, ``x.c / (|x| |c|)`` for cosine), and writes the best k sorted best
   first, ties to the lowest code index. It also writes each row's ``||x||^2`` for the host's
   check of non-finite and huge rows (handled outside the kernels, see vtok_fast/encode/codebook_search.py).

Candidate slots that never received a code hold ``-1 - slot``; the re-rank substitutes code
``slot`` for them (a real code scored exactly, so it can never make the answer worse), which also
gives NaN rows their documented indices ``0 .. k-1``. NaN scores become +inf (``minnum``) before
any reduction, so they never enter a candidate list; ties inside a tile go to the lowest column
(``tl.min`` with ``return_indices``), across tiles strict ``<`` keeps the earlier, lower index.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune
from vtok_fast.kernels._tiles import dot_acc

# --- tile configurations (all tile sizes live here; the host picks BLOCK_D / NUM_D from them) ----
# Tensor-core configs for fp16/bf16. On sm_90, BLOCK_M >= 64 with 4 or 8 warps maps to wgmma.
ARGMIN_TC_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),  # fits sm_80 at D=256
]
# fp32 runs IEEE fp32 dot products (CUDA cores): exact by contract, so no tensor cores here.
ARGMIN_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
]
TOPK_TC_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
TOPK_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]
MAX_SINGLE_BLOCK_D = 256  # fp16/bf16: up to this (padded) D, the query tile is loaded once per row block
LOOP_BLOCK_D = 64      # fp16/bf16: D chunk when D is larger
FP32_BLOCK_D = 32      # fp32: D chunk cap (FMA dot operands live in registers: keep it small)
MIN_BLOCK_D = 16       # tl.dot needs every dim >= 16: a tiny D is padded (masked loads)
SPLIT_ALIGN = 256      # codes_per_split is a multiple of this (>= every BLOCK_N)


def shared_memory_estimate(config, block_d: int, num_d: int, elem_bytes: int, topk: bool = False) -> int:
    """Bytes of shared memory one config needs: ``num_stages`` buffers of each tile loaded in the
    innermost loop (the code tile; the query tile too when D is looped), the query tile once when
    it is loaded before the loop, and scratch for reductions and layout conversions (the top-k
    list merge converts a score tile). Checked against compiled kernels in the tests."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if num_d == 1:
        tiles = bm + config.num_stages * bn
    else:
        tiles = config.num_stages * (bm + bn)
    scratch = bm * bn * 4 if topk else 1024
    return tiles * block_d * elem_bytes + scratch


def argmin_shared_memory(config, args, arch: int = 90) -> int:
    """``shared_memory`` of the k = 1 stage-1 autotuners, at the launch's D tiles and dtype (one
    bound for every target)."""
    return shared_memory_estimate(config, args["BLOCK_D"], args["NUM_D"], args["x_ptr"].element_size())


def topk_shared_memory(config, args, arch: int = 90) -> int:
    """``shared_memory`` of the k > 1 stage-1 autotuners (the top-k merge's scratch included)."""
    return shared_memory_estimate(config, args["BLOCK_D"], args["NUM_D"], args["x_ptr"].element_size(), topk=True)


# --- shared device helpers ---------------------------------------------------------------------

@triton.jit
def _load_query_tile(x_ptr, stride_xn, stride_xd, rows, row_mask, d0, D,
                     BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd
    if EVEN_D:
        return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_code_tile(c_ptr, stride_ck, stride_cd, cols, col_mask, d0, D,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    # (BLOCK_D, BLOCK_N): codes as columns, ready to be the right operand of tl.dot
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = c_ptr + cols.to(tl.int64)[None, :] * stride_ck + offs_d[:, None] * stride_cd
    if EVEN_D:
        return tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    return tl.load(ptrs, mask=col_mask[None, :] & (offs_d[:, None] < D), other=0.0)


@triton.jit
def _score_tile(x_tile, x_ptr, stride_xn, stride_xd, c_ptr, stride_ck, stride_cd, bias_ptr, scale,
                rows, row_mask, n0, k_end, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                NUM_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr):
    """Scores (BLOCK_M, BLOCK_N) fp32 of codes ``n0 .. n0 + BLOCK_N``; +inf for codes at or past
    ``k_end`` and for NaN."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < k_end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NUM_D == 1:
        c = _load_code_tile(c_ptr, stride_ck, stride_cd, cols, col_mask, 0, D, BLOCK_D, EVEN_D)
        acc = dot_acc(x_tile, c, acc, not IEEE)
    else:
        for d0 in range(0, NUM_D * BLOCK_D, BLOCK_D):
            xt = _load_query_tile(x_ptr, stride_xn, stride_xd, rows, row_mask, d0, D, BLOCK_D, EVEN_D)
            c = _load_code_tile(c_ptr, stride_ck, stride_cd, cols, col_mask, d0, D, BLOCK_D, EVEN_D)
            acc = dot_acc(xt, c, acc, not IEEE)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=float("inf"))
    # minimum without NaN propagation (minnum): NaN -> +inf, so NaN never wins a reduction
    return tl.minimum(bias[None, :] + scale * acc, float("inf"))


@triton.jit
def _program_block(x_ptr, stride_xn, stride_xd, N, K, D, codes_per_split,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
                   EVEN_D: tl.constexpr):
    """This program's query rows, its code range ``[k_start, k_end)`` and, when D fits one
    tile, the query tile loaded once (else zeros: ``_score_tile`` loads per D step)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    k_start = pid_s * codes_per_split
    k_end = tl.minimum(k_start + codes_per_split, K)
    x_tile = tl.zeros((BLOCK_M, BLOCK_D), dtype=x_ptr.dtype.element_ty)
    if NUM_D == 1:
        x_tile = _load_query_tile(x_ptr, stride_xn, stride_xd, rows, row_mask, 0, D, BLOCK_D, EVEN_D)
    return rows, row_mask, k_start, k_end, x_tile


# --- stage 1, k = 1: best two tile winners per row ----------------------------------------------

@triton.jit
def _codebook_argmin_fwd(
    cand_ptr, stride_cn, stride_cs,  # (N, 2 * splits) int32: candidate code indices per row
    x_ptr, stride_xn, stride_xd,     # (N, D) queries (fp32 / fp16 / bf16)
    c_ptr, stride_ck, stride_cd,     # (K, D) codes, same dtype as x
    bias_ptr, scale,                 # (K,) fp32 score bias; -2 (l2) or -1 (cosine)
    N, K, D, codes_per_split,
    IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_s = tl.program_id(1).to(tl.int64)
    rows, row_mask, k_start, k_end, x_tile = _program_block(
        x_ptr, stride_xn, stride_xd, N, K, D, codes_per_split, BLOCK_M, BLOCK_D, NUM_D, EVEN_D)

    best1 = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best2 = tl.full((BLOCK_M,), float("inf"), tl.float32)
    idx1 = tl.full((BLOCK_M,), -1, tl.int32)
    idx2 = tl.full((BLOCK_M,), -2, tl.int32)
    for n0 in range(k_start, k_end, BLOCK_N):
        s = _score_tile(x_tile, x_ptr, stride_xn, stride_xd, c_ptr, stride_ck, stride_cd, bias_ptr, scale,
                        rows, row_mask, n0, k_end, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, NUM_D, EVEN_D, IEEE)
        m, j = tl.min(s, axis=1, return_indices=True)
        j = (j + n0).to(tl.int32)
        # strict '<': an equal score from a later tile never displaces an earlier (lower) index
        beats1 = m < best1
        beats2 = m < best2
        best2 = tl.where(beats1, best1, tl.where(beats2, m, best2))
        idx2 = tl.where(beats1, idx1, tl.where(beats2, j, idx2))
        best1 = tl.where(beats1, m, best1)
        idx1 = tl.where(beats1, j, idx1)

    base = cand_ptr + rows * stride_cn + (pid_s * 2) * stride_cs
    tl.store(base, idx1, mask=row_mask)
    tl.store(base + stride_cs, idx2, mask=row_mask)


# --- stage 1, k > 1: exact best R codes per row ---------------------------------------------------

@triton.jit
def _codebook_topk_fwd(
    cand_ptr, stride_cn, stride_cs,  # (N, R * splits) int32: candidate code indices per row
    x_ptr, stride_xn, stride_xd,     # (N, D) queries
    c_ptr, stride_ck, stride_cd,     # (K, D) codes
    bias_ptr, scale,                 # (K,) fp32 score bias; -2 (l2) or -1 (cosine)
    N, K, D, codes_per_split,
    IEEE: tl.constexpr, R: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_s = tl.program_id(1).to(tl.int64)
    rows, row_mask, k_start, k_end, x_tile = _program_block(
        x_ptr, stride_xn, stride_xd, N, K, D, codes_per_split, BLOCK_M, BLOCK_D, NUM_D, EVEN_D)

    slots = tl.arange(0, R)
    local = tl.arange(0, BLOCK_N)
    # unsorted list of the best R scores so far; empty slots hold +inf and distinct negative ids
    best = tl.full((BLOCK_M, R), float("inf"), tl.float32)
    bidx = tl.zeros((BLOCK_M, R), dtype=tl.int32) - 1 - slots[None, :]
    worst = tl.full((BLOCK_M,), float("inf"), tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        s = _score_tile(x_tile, x_ptr, stride_xn, stride_xd, c_ptr, stride_ck, stride_cd, bias_ptr, scale,
                        rows, row_mask, n0, k_end, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, NUM_D, EVEN_D, IEEE)
        m, j = tl.min(s, axis=1, return_indices=True)
        # pull this tile's codes in best-first order while any row still improves its list
        while tl.max((m < worst).to(tl.int32), axis=0) > 0:
            enter = m < worst
            # evict the worst entry; among equal worst scores, the highest code index
            evict = tl.max(tl.where(best == worst[:, None], bidx, -2147483647), axis=1)
            hit = enter[:, None] & (bidx == evict[:, None])
            best = tl.where(hit, m[:, None], best)
            bidx = tl.where(hit, (j + n0).to(tl.int32)[:, None], bidx)
            worst = tl.max(best, axis=1)
            s = tl.where(local[None, :] == j[:, None], float("inf"), s)
            m, j = tl.min(s, axis=1, return_indices=True)

    ptrs = cand_ptr + rows[:, None] * stride_cn + (pid_s * R + slots)[None, :] * stride_cs
    tl.store(ptrs, bidx, mask=row_mask[:, None])


# --- stage 2: exact fp32 re-rank and sorted top-k --------------------------------------------------

@triton.jit
def codebook_rerank_fwd(
    idx_ptr, stride_in, stride_ik,    # (N, k) int64 out: code indices, best first
    dist_ptr, stride_dn, stride_dk,   # (N, k) fp32 out: squared distance (l2) / similarity (cosine)
    xx_ptr,                           # (N,) fp32 out: ||x||^2 (the host's overflow / non-finite check)
    cand_ptr, stride_cn, stride_cr,   # (N, R) int32 candidates (negative = empty slot)
    x_ptr, stride_xn, stride_xd,      # (N, D) queries
    c_ptr, stride_ck, stride_cd,      # (K, D) original (not normalized) codes
    N, K, D, k_out,
    COSINE: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    slots = tl.arange(0, R)
    cand = tl.load(cand_ptr + rows[:, None] * stride_cn + slots[None, :] * stride_cr,
                   mask=row_mask[:, None], other=-1)
    code = tl.where(cand >= 0, cand, tl.minimum(-1 - cand, K - 1))
    code64 = code.to(tl.int64)

    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    cc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    xx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        dmask = offs < D
        xv = tl.load(x_ptr + rows[:, None] * stride_xn + offs[None, :] * stride_xd,
                     mask=row_mask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + code64[:, :, None] * stride_ck + offs[None, None, :] * stride_cd,
                     mask=row_mask[:, None, None] & dmask[None, None, :], other=0.0).to(tl.float32)
        xx += tl.sum(xv * xv, axis=1)
        if COSINE:
            acc += tl.sum(xv[:, None, :] * cv, axis=2)
            cc += tl.sum(cv * cv, axis=2)
        else:
            diff = xv[:, None, :] - cv
            acc += tl.sum(diff * diff, axis=2)
    tl.store(xx_ptr + rows, xx, mask=row_mask)
    if COSINE:
        # F.normalize semantics: each norm clamped below at 1e-12
        x_norm = tl.maximum(tl.sqrt(xx), 1e-12)
        c_norm = tl.maximum(tl.sqrt(cc), 1e-12)
        value = acc / (x_norm[:, None] * c_norm)
        key = -value
    else:
        value = acc
        key = acc
    key = tl.where(key == key, key, float("inf"))  # NaN ranks last

    avail = cand == cand  # all true, (BLOCK_M, R)
    for r in range(0, k_out):
        kmin = tl.min(tl.where(avail, key, float("inf")), axis=1)
        pick = tl.min(tl.where(avail & (key == kmin[:, None]), code, K), axis=1)
        hit = avail & (code == pick[:, None])
        first = tl.min(tl.where(hit, slots[None, :], R), axis=1)
        val = tl.sum(tl.where(slots[None, :] == first[:, None], value, 0.0), axis=1)
        pick = tl.minimum(pick, K - 1)  # only reachable with fewer than k distinct candidates
        tl.store(idx_ptr + rows * stride_in + r * stride_ik, pick.to(tl.int64), mask=row_mask)
        tl.store(dist_ptr + rows * stride_dn + r * stride_dk, val, mask=row_mask)
        avail = avail & (code != pick[:, None])


# The launchable stage-1 kernels: one autotuner per (kernel, dtype class), sharing the jit code.
_argmin = {"key": ["BLOCK_D", "NUM_D", "codes_per_split"], "shared_memory": argmin_shared_memory}
_topk = {"key": ["BLOCK_D", "NUM_D", "codes_per_split", "R"], "shared_memory": topk_shared_memory}
codebook_argmin_tc = autotune(ARGMIN_TC_CONFIGS, **_argmin)(_codebook_argmin_fwd)
codebook_argmin_fp32 = autotune(ARGMIN_FP32_CONFIGS, **_argmin)(_codebook_argmin_fwd)
codebook_topk_tc = autotune(TOPK_TC_CONFIGS, **_topk)(_codebook_topk_fwd)
codebook_topk_fp32 = autotune(TOPK_FP32_CONFIGS, **_topk)(_codebook_topk_fwd)
