"""Attention-based reducers: ``attn_topk`` and ``visionzip`` (PruMerge: ``prumerge.py``).

The attention each patch token receives comes from ``scores`` ``(B, N)`` when given, else from
:func:`vtok_fast.reduce.attention_scores.attention_scores` of ``queries`` ``(B, heads, Q, d)``
over ``keys`` ``(B, heads, N, d)`` (all ``N`` tokens, prefix included: the softmax runs over every
key, then the prefix columns are left out of the ranking). Rankings are stable: equal scores go
to the lower index, NaN ranks last. Budgets count patch tokens; the prefix is always kept first.

- ``attn_topk(tokens, keep)``: the ``keep`` patch tokens receiving the most attention, in their
  original order (FastV's rule in the LLM, VisionZip's dominant set in the vision tower,
  query-based selection with text-token queries). Every other token is dropped (source ``-1``).
- ``visionzip(tokens, dominant, contextual)``: VisionZip (Yang et al. 2024, official code): the
  ``dominant`` tokens of ``attn_topk``, then the remaining ``R`` tokens in original order, of
  which ``contextual`` targets are taken uniformly (``step = max(1, R // contextual)``,
  ``targets = remaining[::step][:contextual]``), every other remaining token is assigned to its
  most similar target (cosine of ``metric``, default the keys averaged over heads, ties to the
  first target), and each contextual token = target + mean of its assigned tokens (the target
  alone when none is assigned), positioned at its target. Output: ``[prefix, dominant,
  contextual]`` (``prefix=1``, 54 + 10 gives the official 1 + 54 + 10 tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vtok_fast._checks import check_int
from vtok_fast.reduce._common import (arange_rows, check_tokens, kept, patch_scores, resolve_keep,
                                      similarity_rows, sizes_from_source, top_indices)
from vtok_fast.reduce.compressed import Compressed


def attn_topk(tokens: torch.Tensor, keep: int | None = None, *, ratio: float | None = None,
              queries: torch.Tensor | None = None, keys: torch.Tensor | None = None,
              scores: torch.Tensor | None = None, scale: float | None = None, prefix: int = 0) -> Compressed:
    """Keep the ``keep`` (or ``round(ratio * n)``) patch tokens that receive the most attention
    from ``queries`` over ``keys`` (or ``scores``), in original order; see the module docstring."""
    _, _, num_patches = check_tokens(tokens, prefix)
    count = resolve_keep(keep, ratio, num_patches)
    received = patch_scores(tokens, prefix, queries, keys, scores, scale)
    return kept(tokens, prefix, top_indices(received, count))


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _keys_mean(keys: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, d)`` -> ``(B, N, d)``: the keys averaged over heads (VisionZip's metric)."""
    return keys.mean(dim=1)


def visionzip(tokens: torch.Tensor, dominant: int, contextual: int, *, queries: torch.Tensor | None = None,
              keys: torch.Tensor | None = None, scores: torch.Tensor | None = None,
              metric: torch.Tensor | None = None, scale: float | None = None, prefix: int = 0) -> Compressed:
    """VisionZip: ``dominant`` tokens by received attention plus ``contextual`` merged tokens;
    see the module docstring. ``metric`` ``(B, N, C)`` defaults to ``keys.mean(1)``."""
    batch, _, num_patches = check_tokens(tokens, prefix)
    dominant = check_int("dominant", dominant, 0, num_patches, "the patch tokens (N - prefix)")
    remaining = num_patches - dominant
    contextual = check_int("contextual", contextual, 1 if remaining else 0, remaining,
                           f"the tokens left after the {dominant} dominant ones")
    received = patch_scores(tokens, prefix, queries, keys, scores, scale)
    similarity = similarity_rows(tokens, metric, keys, prefix, _keys_mean, "visionzip", "for the contextual merge")

    device, dim = tokens.device, tokens.shape[-1]
    top = top_indices(received, dominant)
    is_top = torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter_(1, top, True)
    rest = is_top.to(torch.int8).argsort(dim=1, stable=True)[:, :remaining]  # original order
    step = max(1, remaining // contextual) if contextual else 1
    is_target = torch.zeros(remaining, dtype=torch.bool, device=device)
    is_target[torch.arange(0, remaining, step, device=device)[:contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]

    unit = F.normalize(similarity.float(), dim=-1)
    if contextual:
        assign = (_gather_rows(unit, others) @ _gather_rows(unit, targets).transpose(1, 2)).argmax(dim=-1)
    else:  # every token is dominant
        assign = others
    x = tokens[:, prefix:]
    acc = torch.promote_types(tokens.dtype, torch.float32)
    total = torch.zeros(batch, contextual, dim, dtype=acc, device=device).scatter_add_(
        1, assign.unsqueeze(-1).expand(-1, -1, dim), _gather_rows(x, others).to(acc))
    count = torch.zeros(batch, contextual, dtype=acc, device=device).scatter_add_(
        1, assign, torch.ones_like(assign, dtype=acc))
    context = (_gather_rows(x, targets).to(acc) + total / count.clamp(min=1).unsqueeze(-1)).to(tokens.dtype)

    out = torch.cat([tokens[:, :prefix], _gather_rows(x, top), context], dim=1)
    positions = torch.cat([arange_rows(batch, prefix, device), top + prefix, targets + prefix], dim=1)
    first_context = prefix + dominant
    source = torch.cat([arange_rows(batch, prefix, device), torch.empty_like(is_top, dtype=torch.int64)], dim=1)
    patch_source = source[:, prefix:]
    patch_source.scatter_(1, top, prefix + arange_rows(batch, dominant, device))
    patch_source.scatter_(1, targets, first_context + arange_rows(batch, contextual, device))
    patch_source.scatter_(1, others, first_context + assign)
    return Compressed(out, positions, sizes_from_source(source, out.shape[1]), source)
