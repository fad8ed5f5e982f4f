"""ToMe device code: bipartite scoring, the merge plan, and the size-weighted merge.

Token layout (per batch row): ``prefix`` protected tokens, then A tokens at ``prefix + 2i``
(``num_a`` of them) and B tokens at ``prefix + 2j + 1`` (``num_b``). Output slots
(``num_out = N - r``): ``[prefix, kept A, B]``; with a distillation token
``[A0, B0, kept A[1:], B[1:]]`` (``prefix`` is 0 then).

1. ``tome_scores_fwd``: cosine score of every A token with every B token by ``tl.dot`` tiles,
   keeping only the running row max / argmax (the A×B matrix is never stored). A tile holding
   a row whose squares over- or underflow is recomputed with that row divided by its max |.|.
2. ``tome_plan_fwd``: programs per (chunk of tokens, batch row) turn the best edges into the
   merge plan by pairwise counting (a stable descending ranking without a sort).
3. ``tome_merge_fwd``: every output token = size-weighted mean of its representative and its
   sources in a fixed order; deterministic, no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune

# A NaN cosine score counts as this: below every real cosine, above the protected -inf (the
# PyTorch path of ``vtok_fast/reduce/tome.py`` uses it too).
NAN_SCORE = -2.0
# Rows whose float32 sum of squares is below this (or inf) are divided by their max |.| before
# they are scored: like ``unit_rows``'s 2**-50 norm limit.
MIN_SQ = 2.0 ** -100

# --- 1. scores ----------------------------------------------------------------------------------

# BLOCK_M A tokens (rows) x BLOCK_N B tokens (columns), BLOCK_K channels per step
SCORE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]


@triton.jit
def _tile_dots(base, a_tokens, b_tokens, row_ok, col_ok, channels, stride_mn, stride_mc, a_div, b_div,
               RESCALE: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A x B dot products of one tile, the squared norms of its A rows / B columns and their max
    |.|, all accumulated in fp32; with RESCALE every A row is divided by ``a_div`` and every B
    column by ``b_div`` first (1 leaves a row unchanged)."""
    dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    a_sq = tl.zeros([BLOCK_M], tl.float32)
    b_sq = tl.zeros([BLOCK_N], tl.float32)
    a_max = tl.zeros([BLOCK_M], tl.float32)
    b_max = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < channels
        a = tl.load(base + a_tokens[:, None] * stride_mn + ks[None, :] * stride_mc,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(base + b_tokens[None, :] * stride_mn + ks[:, None] * stride_mc,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if RESCALE:  # correctly rounded: a power-of-two row becomes exactly ±1 / ±0.5 ...
            a = tl.math.div_rn(a.to(tl.float32), a_div[:, None]).to(a.dtype)
            b = tl.math.div_rn(b.to(tl.float32), b_div[None, :]).to(b.dtype)
        dots = tl.dot(a, b, dots, input_precision=PRECISION)
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        a_sq += tl.sum(a32 * a32, axis=1)
        b_sq += tl.sum(b32 * b32, axis=0)
        a_max = tl.maximum(a_max, tl.max(tl.abs(a32), axis=1))
        b_max = tl.maximum(b_max, tl.max(tl.abs(b32), axis=0))
    return dots, a_sq, b_sq, a_max, b_max


@triton.jit
def _needs_rescale(sq, vmax, ok, MIN_SQ: tl.constexpr):
    """Rows whose squared norm overflowed or underflowed while their max |.| is a finite,
    non-zero number (a zero or inf/NaN row stays NaN: it scores NAN_SCORE)."""
    return ok & ((sq < MIN_SQ) | (sq == float("inf"))) & (vmax > 0.0) & (vmax < float("inf"))


# keyed on the metric width only: N shrinks every layer, and one tuning per model is enough
@autotune(configs=SCORE_CONFIGS, key=["channels"])
@triton.jit
def tome_scores_fwd(
    node_max_ptr,  # (B, num_a) fp32, contiguous: best score of each A token
    node_idx_ptr,  # (B, num_a) int32, contiguous: its best B token (0..num_b-1)
    metric_ptr, stride_mb, stride_mn, stride_mc,  # (B, N, C) fp32/fp16/bf16
    num_a, num_b, channels, prefix,
    NAN_SCORE: tl.constexpr,  # what a NaN cosine counts as
    MIN_SQ: tl.constexpr,  # rows with a smaller (or an inf) sum of squares are rescaled first
    PROTECT_A0: tl.constexpr,  # class token: A0 never merges (row 0 = -inf)
    PROTECT_B0: tl.constexpr,  # distillation token: nothing merges into B0 (column 0 = -inf)
    PRECISION: tl.constexpr,  # tl.dot input_precision ("tf32x3" keeps fp32 accuracy)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_a = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    rows = pid_a * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_a
    a_tokens = (prefix + 2 * rows).to(tl.int64)
    base = metric_ptr + batch * stride_mb

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    for b0 in range(0, num_b, BLOCK_N):
        cols = b0 + tl.arange(0, BLOCK_N)
        col_ok = cols < num_b
        b_tokens = (prefix + 2 * cols + 1).to(tl.int64)
        dots, a_sq, b_sq, a_max, b_max = _tile_dots(
            base, a_tokens, b_tokens, row_ok, col_ok, channels, stride_mn, stride_mc, 1.0, 1.0,
            False, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        # cosine is scale-invariant: a row whose squares over- or underflowed (|values| near
        # 1e19 or 1e-30) is divided by its max |.| and the tile recomputed (rare: a slow path)
        a_fix = _needs_rescale(a_sq, a_max, row_ok, MIN_SQ)
        b_fix = _needs_rescale(b_sq, b_max, col_ok, MIN_SQ)
        if tl.max(a_fix.to(tl.int32), axis=0) + tl.max(b_fix.to(tl.int32), axis=0) > 0:
            dots, a_sq, b_sq, a_max, b_max = _tile_dots(
                base, a_tokens, b_tokens, row_ok, col_ok, channels, stride_mn, stride_mc,
                tl.where(a_fix, a_max, 1.0), tl.where(b_fix, b_max, 1.0),
                True, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        # inverse norms correctly rounded (sqrt_rn, div_rn; tl.sqrt and / are approximate on GPUs),
        # so a metric whose cosines are exact in fp32 scores exactly, ties included
        inv_a = tl.math.div_rn(1.0, tl.sqrt_rn(tl.where(row_ok, a_sq, 1.0)))  # padding: no 0/0
        inv_b = tl.math.div_rn(1.0, tl.sqrt_rn(tl.where(col_ok, b_sq, 1.0)))
        scores = dots * inv_a[:, None] * inv_b[None, :]
        scores = tl.where(scores != scores, NAN_SCORE, scores)
        if PROTECT_B0:
            scores = tl.where(cols[None, :] == 0, float("-inf"), scores)
        if PROTECT_A0:
            scores = tl.where(rows[:, None] == 0, float("-inf"), scores)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        tile_max, tile_idx = tl.max(scores, axis=1, return_indices=True,
                                    return_indices_tie_break_left=True)
        better = tile_max > best  # strict: ties keep the earlier (lower) B index
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx + b0, best_idx)

    tl.store(node_max_ptr + batch * num_a + rows, best, mask=row_ok)
    tl.store(node_idx_ptr + batch * num_a + rows, best_idx, mask=row_ok)


# --- 2. plan ------------------------------------------------------------------------------------

# BLOCK_M tokens per program (its chunk), BLOCK_N tokens per step of the pairwise counts
PLAN_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 32}
PLAN_WARPS = 4


@triton.jit
def _beats(v_j, j, v_i, i):
    """(v_j, j) comes before (v_i, i) in descending score order, ties to the lower index."""
    return (v_j > v_i) | ((v_j == v_i) & (j < i))


@triton.jit
def _merges(v, i, thr_val, thr_idx):
    """A token ``i`` with best score ``v`` merges: its edge ranks at or before the threshold's."""
    return _beats(v, i, thr_val, thr_idx) | (i == thr_idx)


@triton.jit
def _b_slot(j, num_kept, prefix, DISTILL: tl.constexpr):
    """Output slot of B token j."""
    if DISTILL:
        return tl.where(j == 0, 1, num_kept + j)
    else:
        return prefix + num_kept + j


@triton.jit
def _plan_prefix(order_row, dest_row, start_row, count_row, chunk, prefix, BLOCK_M: tl.constexpr):
    """The chunk's protected prefix tokens: slot p holds token p, no sources."""
    nothing = tl.zeros([BLOCK_M], tl.int32)
    p = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = p < prefix
    tl.store(order_row + p, p.to(tl.int64), mask=p_ok)
    tl.store(dest_row + p, p.to(tl.int64), mask=p_ok)
    tl.store(start_row + p, nothing, mask=p_ok)
    tl.store(count_row + p, nothing, mask=p_ok)


@triton.jit
def _plan_threshold(max_row, num_a, r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(score, index) of the edge of rank ``r - 1`` (descending score, ties to the lower index):
    every A token at or before it merges."""
    thr_val = tl.sum(tl.zeros([BLOCK_M], tl.float32), axis=0)
    thr_idx = tl.sum(tl.zeros([BLOCK_M], tl.int32), axis=0)
    for i0 in range(0, num_a, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_ok = i < num_a
        v_i = tl.load(max_row + i, mask=i_ok, other=0.0)
        rank = tl.zeros([BLOCK_M], tl.int32)
        for j0 in range(0, num_a, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_ok = j < num_a
            v_j = tl.load(max_row + j, mask=j_ok, other=0.0)
            before = _beats(v_j[None, :], j[None, :], v_i[:, None], i[:, None]) & j_ok[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        hit = i_ok & (rank == r - 1)
        thr_val += tl.sum(tl.where(hit, v_i, 0.0), axis=0)
        thr_idx += tl.sum(tl.where(hit, i, 0), axis=0)
    return thr_val, thr_idx


@triton.jit
def _plan_a_tokens(order_row, dest_row, start_row, count_row, merged_row, max_row, idx_row,
                   chunk, thr_val, thr_idx, num_a, prefix, r, SORT_KEPT: tl.constexpr,
                   DISTILL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The chunk's A tokens: merged ones go to their partner's slot (and into ``merged``, grouped
    by partner), kept ones to their own slot."""
    num_kept = num_a - r
    i = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < num_a
    v_i = tl.load(max_row + i, mask=i_ok, other=0.0)
    n_i = tl.load(idx_row + i, mask=i_ok, other=0)
    merged_i = _merges(v_i, i, thr_val, thr_idx)
    rank = tl.zeros([BLOCK_M], tl.int32)  # position in descending-score order (not SORT_KEPT)
    merged_before = tl.zeros([BLOCK_M], tl.int32)  # merged A tokens with a lower index (SORT_KEPT)
    slot = tl.zeros([BLOCK_M], tl.int32)  # position among merged, by (partner, index)
    for j0 in range(0, num_a, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < num_a
        v_j = tl.load(max_row + j, mask=j_ok, other=0.0)
        n_j = tl.load(idx_row + j, mask=j_ok, other=0)
        merged_j = _merges(v_j, j, thr_val, thr_idx) & j_ok
        lower = j[None, :] < i[:, None]
        if SORT_KEPT:  # only the count this layout uses
            merged_before += tl.sum((lower & merged_j[None, :]).to(tl.int32), axis=1)
        else:
            rank += tl.sum((_beats(v_j[None, :], j[None, :], v_i[:, None], i[:, None])
                            & j_ok[None, :]).to(tl.int32), axis=1)
        grouped_before = (n_j[None, :] < n_i[:, None]) | ((n_j[None, :] == n_i[:, None]) & lower)
        slot += tl.sum((grouped_before & merged_j[None, :]).to(tl.int32), axis=1)
    if SORT_KEPT:
        kept_pos = i - merged_before
    else:
        kept_pos = rank - r
    if DISTILL:
        kept_slot = tl.where(kept_pos == 0, 0, kept_pos + 1)
    else:
        kept_slot = prefix + kept_pos
    token = (prefix + 2 * i).to(tl.int64)
    kept = i_ok & (merged_i == 0)
    merged = i_ok & merged_i
    nothing = tl.zeros([BLOCK_M], tl.int32)
    tl.store(order_row + kept_slot, token, mask=kept)
    tl.store(start_row + kept_slot, nothing, mask=kept)
    tl.store(count_row + kept_slot, nothing, mask=kept)
    slot_of_token = tl.where(merged, _b_slot(n_i, num_kept, prefix, DISTILL), kept_slot)
    tl.store(dest_row + token, slot_of_token.to(tl.int64), mask=i_ok)
    tl.store(merged_row + slot, token, mask=merged)


@triton.jit
def _plan_b_tokens(order_row, dest_row, start_row, count_row, max_row, idx_row, chunk, thr_val,
                   thr_idx, num_a, num_b, prefix, r, DISTILL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The chunk's B tokens, with where their sources start in ``merged`` and how many."""
    j = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    j_ok = j < num_b
    start = tl.zeros([BLOCK_M], tl.int32)
    count = tl.zeros([BLOCK_M], tl.int32)
    for i0 in range(0, num_a, BLOCK_N):
        ii = i0 + tl.arange(0, BLOCK_N)
        ii_ok = ii < num_a
        v_ii = tl.load(max_row + ii, mask=ii_ok, other=0.0)
        n_ii = tl.load(idx_row + ii, mask=ii_ok, other=-1)
        merged_ii = _merges(v_ii, ii, thr_val, thr_idx) & ii_ok
        start += tl.sum(((n_ii[None, :] < j[:, None]) & merged_ii[None, :]).to(tl.int32), axis=1)
        count += tl.sum(((n_ii[None, :] == j[:, None]) & merged_ii[None, :]).to(tl.int32), axis=1)
    b_slot = _b_slot(j, num_a - r, prefix, DISTILL)
    b_token = (prefix + 2 * j + 1).to(tl.int64)
    tl.store(order_row + b_slot, b_token, mask=j_ok)
    tl.store(dest_row + b_token, b_slot.to(tl.int64), mask=j_ok)
    tl.store(start_row + b_slot, start, mask=j_ok)
    tl.store(count_row + b_slot, count, mask=j_ok)


@triton.jit
def tome_plan_fwd(
    order_ptr,  # (B, num_out) int64: input token of each output slot
    dest_ptr,  # (B, N) int64: output slot of each input token
    merged_ptr,  # (B, r) int64: merged A tokens, grouped by destination slot
    start_ptr,  # (B, num_out) int32: first source of each slot in merged
    count_ptr,  # (B, num_out) int32: number of sources of each slot
    node_max_ptr,  # (B, num_a) fp32: best score of each A token
    node_idx_ptr,  # (B, num_a) int32: its B partner
    num_a, num_b, prefix, r,  # every buffer is contiguous: strides follow from these
    SORT_KEPT: tl.constexpr,  # kept A in original order (else in descending-score order)
    DISTILL: tl.constexpr,  # output layout [A0, B0, kept A[1:], B[1:]]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (chunk, batch) writes prefix tokens, A tokens and B tokens
    ``chunk * BLOCK_M ..`` of its batch row; every program finds the threshold itself."""
    chunk = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_tokens = prefix + num_a + num_b
    num_out = num_tokens - r
    max_row = node_max_ptr + batch * num_a
    idx_row = node_idx_ptr + batch * num_a
    order_row = order_ptr + batch * num_out
    dest_row = dest_ptr + batch * num_tokens
    start_row = start_ptr + batch * num_out
    count_row = count_ptr + batch * num_out
    _plan_prefix(order_row, dest_row, start_row, count_row, chunk, prefix, BLOCK_M)
    thr_val, thr_idx = _plan_threshold(max_row, num_a, r, BLOCK_M, BLOCK_N)
    _plan_a_tokens(order_row, dest_row, start_row, count_row, merged_ptr + batch * r, max_row, idx_row,
                   chunk, thr_val, thr_idx, num_a, prefix, r, SORT_KEPT, DISTILL, BLOCK_M, BLOCK_N)
    _plan_b_tokens(order_row, dest_row, start_row, count_row, max_row, idx_row, chunk, thr_val,
                   thr_idx, num_a, num_b, prefix, r, DISTILL, BLOCK_M, BLOCK_N)


# --- 3. merge -----------------------------------------------------------------------------------

MERGE_CONFIGS = [
    triton.Config({"BLOCK_C": 1024}, num_warps=4),
    triton.Config({"BLOCK_C": 512}, num_warps=4),
    triton.Config({"BLOCK_C": 256}, num_warps=2),
]


@autotune(configs=MERGE_CONFIGS, key=["channels"])
@triton.jit
def tome_merge_fwd(
    y_ptr,  # (B, num_out, C), contiguous: merged tokens
    size_out_ptr,  # (B, num_out, 1), contiguous: tokens per merged token
    x_ptr, stride_xb, stride_xn, stride_xc,  # (B, N, C)
    size_ptr, stride_sb, stride_sn,  # (B, N, 1), read only when HAS_SIZE (else all ones)
    order_ptr,  # (B, num_out) int64, contiguous: representative of each slot
    merged_ptr,  # (B, r) int64, contiguous: sources, grouped by slot
    start_ptr,  # (B, num_out) int32, contiguous: first source of each slot
    count_ptr,  # (B, num_out) int32, contiguous: its number of sources
    num_out, channels, r,
    HAS_SIZE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // num_out
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    x_row = x_ptr + batch * stride_xb + cs * stride_xc

    rep = tl.load(order_ptr + pid)  # pid = batch * num_out + slot
    first = tl.load(start_ptr + pid)
    count = tl.load(count_ptr + pid)
    weight = 1.0
    if HAS_SIZE:
        weight = tl.load(size_ptr + batch * stride_sb + rep * stride_sn).to(tl.float32)
    total = weight
    x_rep = tl.load(x_row + rep * stride_xn, mask=c_ok, other=0.0).to(tl.float32)
    acc = x_rep * weight
    for k in range(first, first + count):  # fixed order: sources by input position
        src = tl.load(merged_ptr + batch * r + k)
        if HAS_SIZE:
            weight = tl.load(size_ptr + batch * stride_sb + src * stride_sn).to(tl.float32)
        acc += tl.load(x_row + src * stride_xn, mask=c_ok, other=0.0).to(tl.float32) * weight
        total += weight
    out = tl.where(count > 0, acc / total, x_rep)  # a token without sources is copied exactly
    tl.store(y_ptr + pid * channels + cs, out.to(y_ptr.dtype.element_ty), mask=c_ok)
    if tl.program_id(1) == 0:
        tl.store(size_out_ptr + pid, total.to(size_out_ptr.dtype.element_ty))
