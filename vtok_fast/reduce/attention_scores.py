"""``attention_scores``: how much attention every key receives from a few query rows.

``attention_scores(queries, keys, scale=None, *, key_mask=None) -> (B, N) float32`` is

    softmax(queries @ keys.transpose(-1, -2) * scale, dim=-1).mean over heads and query rows

for ``queries`` ``(B, Hq, Q, d)`` and ``keys`` ``(B, Hkv, N, d)`` (``Hq`` a multiple of ``Hkv``:
grouped-query attention, query head ``h`` reads kv head ``h // (Hq / Hkv)`` as
``repeat_kv`` does), ``scale`` defaulting to ``d ** -0.5``. The query rows can be a CLS row
(VisionZip, PruMerge), the last token of a prompt (FastV) or the text tokens of a prompt; the
softmax runs over all ``N`` keys. ``key_mask`` ``(B, N)`` bool hides keys (``False``: not
attended, score 0), e.g. padding; a row that sees no key contributes 0.

CUDA: two Triton passes over the keys (``kernels/attention_scores.py``): row log-sum-exp with an
online softmax, then per-key probabilities summed over rows. Extra memory is O(B·Hkv·rows·splits)
plus the output: the (rows x N) score matrix is never stored, let alone N x N. CPU: the same two
passes in PyTorch over key chunks of at most ``CHUNK_ELEMENTS`` scores. fp32 inputs are computed
with IEEE fp32 products (no TF32), fp16/bf16 with fp32 accumulation; the result is fp32. No
gradient flows into ``queries`` or ``keys`` (the scores pick tokens; they are not trained).
"""
from __future__ import annotations

import math
import numbers

import torch

from vtok_fast._backend import use_triton
from vtok_fast._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from vtok_fast._launch import cdiv, sm_count, strides, tile_grid
from vtok_fast._op import define_op

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
CHUNK_ELEMENTS = 1 << 22  # CPU path: scores held at once (16 MiB of fp32)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --- Triton path ---------------------------------------------------------------------------------

def _default_splits(batch: int, kv_heads: int, row_blocks: int, num_keys: int, device) -> int:
    """Key splits of pass 1: enough programs for ~4 per SM, each split >= 512 keys."""
    programs = batch * kv_heads * row_blocks
    return max(1, min(cdiv(4 * sm_count(device), programs), num_keys // 512))


def _scores_triton(queries, keys, key_mask, scale: float, splits: int | None = None):
    from vtok_fast.kernels.attention_scores import (MAX_BLOCK_D, MAX_BLOCK_M, MAX_BLOCK_N, MIN_BLOCK,
                                                    _attn_lse_fwd, _attn_scores_fwd)

    batch, q_heads, num_q, head_dim = queries.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    rows = group * num_q
    block_m = min(max(MIN_BLOCK, _next_pow2(rows)), MAX_BLOCK_M)
    block_d = min(max(MIN_BLOCK, _next_pow2(head_dim)), MAX_BLOCK_D)
    if splits is None:
        splits = _default_splits(batch, kv_heads, cdiv(rows, block_m), num_keys, queries.device)
    keys_per_split = cdiv(cdiv(num_keys, splits), MAX_BLOCK_N) * MAX_BLOCK_N
    splits = cdiv(num_keys, keys_per_split)
    mask = queries if key_mask is None else key_mask.view(torch.uint8)  # never read without HAS_MASK
    common = dict(q_ptr=queries, **strides(queries, "q", "bhqd"), k_ptr=keys, **strides(keys, "k", "bhnd"),
                  mask_ptr=mask, **strides(key_mask, "m", "bn"), num_kv_heads=kv_heads, group=group,
                  num_q=num_q, num_rows=rows, num_keys=num_keys, head_dim=head_dim, qk_scale=scale * LOG2E,
                  HAS_MASK=key_mask is not None, BLOCK_M=block_m, BLOCK_D=block_d,
                  PRECISION="ieee" if queries.dtype == torch.float32 else "tf32")

    lse = torch.empty(batch, kv_heads, rows, splits, dtype=torch.float32, device=queries.device)
    _attn_lse_fwd[tile_grid(rows, lead=(batch * kv_heads,), more=(splits,))](
        lse_ptr=lse, keys_per_split=keys_per_split, num_splits=splits, **common)
    total = lse[..., 0] if splits == 1 else torch.logsumexp(lse * LN2, dim=-1) / LN2
    total = total.masked_fill(total == -math.inf, math.inf).contiguous()  # no key seen: p = 0

    out = torch.empty(batch, num_keys, dtype=torch.float32, device=queries.device)
    _attn_scores_fwd[tile_grid(num_keys, row_block="BLOCK_N", more=(batch,))](
        out_ptr=out, lse_ptr=total, inv_rows=1.0 / (q_heads * num_q), **common)
    return out


# --- PyTorch path --------------------------------------------------------------------------------

def _scores_torch(queries, keys, key_mask, scale: float):
    """The same two passes over key chunks, in fp32 (queries grouped by kv head, like the kernel)."""
    batch, q_heads, num_q, head_dim = queries.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    q = (queries.reshape(batch, kv_heads, (q_heads // kv_heads) * num_q, head_dim)
         .to(torch.float32) * scale)
    chunk = max(1, CHUNK_ELEMENTS // q[..., 0].numel())

    def chunk_scores(n0):
        s = q @ keys[:, :, n0:n0 + chunk].to(torch.float32).transpose(-1, -2)
        if key_mask is not None:
            s.masked_fill_(~key_mask[:, None, None, n0:n0 + chunk], -math.inf)
        return s

    if chunk >= num_keys:
        s = chunk_scores(0)
        total = torch.logsumexp(s, dim=-1, keepdim=True)
        total.masked_fill_(total == -math.inf, math.inf)
        return s.sub_(total).exp_().sum(dim=(1, 2)).div_(q_heads * num_q)
    total = torch.full(q.shape[:-1], -math.inf, dtype=torch.float32, device=q.device)
    for n0 in range(0, num_keys, chunk):
        total = torch.logaddexp(total, torch.logsumexp(chunk_scores(n0), dim=-1))
    total = total.masked_fill_(total == -math.inf, math.inf).unsqueeze(-1)
    out = torch.empty(batch, num_keys, dtype=torch.float32, device=q.device)
    for n0 in range(0, num_keys, chunk):
        out[:, n0:n0 + chunk] = chunk_scores(n0).sub_(total).exp_().sum(dim=(1, 2))
    return out.div_(q_heads * num_q)


# --- the op ------------------------------------------------------------------------------------------

def _attention_scores_impl(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    if keys.shape[0] == 0:  # empty batch: nothing to launch or chunk
        return queries.new_empty(0, keys.shape[2], dtype=torch.float32)
    if use_triton(queries, keys):
        return _scores_triton(queries, keys, key_mask, scale)
    return _scores_torch(queries, keys, key_mask, scale)


def _attention_scores_fake(queries, keys, key_mask, scale):
    return queries.new_empty(keys.shape[0], keys.shape[2], dtype=torch.float32)


_attention_scores_op = define_op("attention_scores", _attention_scores_impl, fake=_attention_scores_fake)


def check_attention_inputs(queries, keys, key_mask=None, scale=None) -> float:
    """Validate ``queries`` ``(B, Hq, Q, d)``, ``keys`` ``(B, Hkv, N, d)``, ``key_mask`` and
    ``scale``; return the scale (``d ** -0.5`` when None)."""
    check_tensor("queries", queries, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(B, heads, Q, d)")
    check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(B, heads, N, d)")
    check_same_device(queries=queries, keys=keys, key_mask=key_mask)
    check_same_dtype(queries=queries, keys=keys)
    (batch, q_heads, num_q, head_dim), (k_batch, kv_heads, num_keys, k_dim) = queries.shape, keys.shape
    if k_batch != batch or k_dim != head_dim:
        raise ValueError(f"queries (B, heads, Q, d) = {tuple(queries.shape)} and keys (B, heads, N, d) = "
                         f"{tuple(keys.shape)} disagree: they need the same B and d")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"queries have {q_heads} heads, which must be a multiple of the keys' "
                         f"{kv_heads} heads (grouped-query attention)")
    if num_q == 0 or num_keys == 0 or head_dim == 0:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} need at least "
                         "one query row, one key and d >= 1")
    if key_mask is not None:
        check_tensor("key_mask", key_mask, ndim=2, dtypes=(torch.bool,), shape_doc="(B, N) bool")
        if tuple(key_mask.shape) != (batch, num_keys):
            raise ValueError(f"key_mask must be (B, N) = ({batch}, {num_keys}), got shape {tuple(key_mask.shape)}")
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float (default d ** -0.5), got {scale!r}")
    return float(scale)


def attention_scores(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None, *,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each key receives, ``(B, N)`` fp32: ``softmax(q · kᵀ · scale)`` over all ``N``
    keys, averaged over the query heads and rows. See the module docstring."""
    scale = check_attention_inputs(queries, keys, key_mask, scale)
    return _attention_scores_op(queries.detach(), keys.detach(), key_mask, scale)


def attention_scores_reference(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None,
                               *, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, materialized in float64 (tests): ``(B, N)`` float64."""
    scale = check_attention_inputs(queries, keys, key_mask, scale)
    group = queries.shape[1] // keys.shape[1]
    k = keys.to(torch.float64).repeat_interleave(group, dim=1)
    s = queries.to(torch.float64) @ k.transpose(-1, -2) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(nan=0.0)  # a row that sees no key: 0
    return p.mean(dim=(1, 2))
