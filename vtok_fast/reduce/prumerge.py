"""LLaVA-PruMerge and PruMerge+ (Shang et al. 2024), batched: no Python loop over tokens or images.

Inputs as in ``select.py``: the attention ``a`` each patch token receives from the query rows
(the official code: the CLS row of the last CLIP layer, one head at full width, softmax over all
577 keys) and a similarity ``metric`` per token (default: the keys with their heads concatenated,
i.e. the ``k_proj`` output the official code hooks).

1. Selection. Adaptive (no budget): the tokens whose ``a`` is above ``Q3 + 1.5 · IQR`` of their
   image's ``a`` (linear-interpolated quartiles, as ``np.percentile``), so images keep different
   counts: the result is ragged (``counts``). With ``keep=`` / ``ratio=``: the top ``keep`` by
   ``a``. PruMerge+ adds spatially uniform samples: with ``k`` selected of ``n``,
   ``step = int(1 / (k / n))`` and the indices ``0, s, 2s, ... < n - 1`` for
   ``s = max(1, int(step / 3))`` (none when ``k = 0``) that are not selected yet.
2. Merge. Every kept token ``i`` becomes ``x_i + sum_j a_j x_j`` over its ``neighbours`` (32) most
   cosine-similar other patch tokens (kept or not), by ``metric``.
3. One extra token ``sum_j a_j x_j`` over the tokens not kept.

Output per image: ``[prefix, kept tokens in original order (the official code orders them by
score), extra token]``; the kept tokens hold themselves (size 1), the extra token holds every
token not kept (position ``-1``). Differences from the official code, all documented choices:
quartiles per image (it pools the batch), exactly the outliers are kept (its ``int(N · ratio)``
can lose one to rounding for some N, never for N = 576), ties rank to the lower index.

A NaN score ranks last, as everywhere in ``vtok_fast.reduce``: it is kept only when a fixed budget
reaches it, never as an IQR outlier (the quartiles are those of the image's other scores), and it
weighs 0 in the merge sums (the token counts as receiving no attention). An empty batch returns
``(0, prefix + k + 1, D)`` tokens for a budget of ``k`` (PruMerge+: the ``k`` every image keeps at
least) and ``(0, prefix + 1, D)`` when adaptive.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vtok_fast._checks import check_int
from vtok_fast.reduce._common import (arange_rows, check_tokens, patch_scores, resolve_keep, similarity_rows,
                                      sizes_from_source, top_indices)
from vtok_fast.reduce.compressed import Compressed

NEIGHBOURS = 32


def iqr_outliers(received: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` bool: scores above ``Q3 + 1.5 · IQR`` of their row. NaN ranks last: it is never
    an outlier and the quartiles are those of the row's other scores."""
    if received.shape[0] == 0:  # quantile rejects an empty tensor
        return torch.zeros_like(received, dtype=torch.bool)
    quartiles = torch.nanquantile(received, torch.tensor([0.25, 0.75], device=received.device), dim=1)
    upper = quartiles[1] + 1.5 * (quartiles[1] - quartiles[0])
    return received > upper[:, None]


def spatial_samples(selected: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s uniform samples ``(B, n)`` bool for the ``selected`` mask ``(B, n)``."""
    num_patches = selected.shape[1]
    count = selected.sum(dim=1, keepdim=True)
    step = torch.floor(1.0 / (count.double() / num_patches))  # float64, like the official Python floats
    spacing = torch.where(count > 0, torch.floor(step / 3), 1.0).clamp(min=1).long()
    index = torch.arange(num_patches, device=selected.device)
    return (index % spacing == 0) & (index < num_patches - 1) & (count > 0)


def _merge(tokens: torch.Tensor, prefix: int, keep_mask: torch.Tensor, received: torch.Tensor,
           similarity: torch.Tensor, neighbours: int, ragged: bool, empty_width: int) -> Compressed:
    """``empty_width``: the kept-token slots of an empty batch (the fixed budget, 0 when adaptive)."""
    batch, _, dim = tokens.shape
    num_patches = keep_mask.shape[1]
    device = tokens.device
    acc = torch.promote_types(tokens.dtype, torch.float32)
    x = tokens[:, prefix:].to(acc)
    weight = received.masked_fill(received.isnan(), 0.0).to(acc)  # NaN: no attention
    count = keep_mask.sum(dim=1)
    width = int(count.max()) if batch else empty_width
    kept_index = (~keep_mask).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # kept first, in order
    valid = arange_rows(batch, width, device) < count[:, None]
    merged = x.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, dim))
    closest = min(neighbours, num_patches - 1)
    if closest > 0 and width > 0:
        unit = F.normalize(similarity.float(), dim=-1)
        cosine = unit.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)
        cosine.scatter_(2, kept_index.unsqueeze(-1), -math.inf)  # not its own neighbour
        near = cosine.topk(closest, dim=2).indices  # (B, width, closest)
        mix = torch.zeros(batch, width, num_patches, dtype=acc, device=device)
        mix.scatter_(2, near, weight.gather(1, near.flatten(1)).view_as(near).to(acc))
        merged = merged + mix @ x
    merged = merged * valid.unsqueeze(-1)
    extra = (weight * ~keep_mask).unsqueeze(1) @ x  # (B, 1, D)
    body = torch.cat([merged, torch.zeros_like(extra)], dim=1)
    body = body.scatter(1, count.view(batch, 1, 1).expand(-1, 1, dim), extra)
    out = torch.cat([tokens[:, :prefix], body.to(tokens.dtype)], dim=1)

    no_position = torch.full((batch, 1), -1, dtype=torch.int64, device=device)
    positions = torch.cat([arange_rows(batch, prefix, device),
                           torch.where(valid, kept_index + prefix, -1), no_position], dim=1)
    rank = keep_mask.long().cumsum(dim=1) - 1
    patch_source = torch.where(keep_mask, prefix + rank, prefix + count[:, None])
    source = torch.cat([arange_rows(batch, prefix, device), patch_source], dim=1)
    counts = prefix + count + 1 if ragged else None
    return Compressed(out, positions, sizes_from_source(source, out.shape[1]), source, counts)


def _keys_concatenated(keys: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, d)`` -> ``(B, N, heads * d)``: the heads concatenated, ``k_proj``'s output."""
    return keys.transpose(1, 2).flatten(2)


def _prumerge(tokens, keep, ratio, queries, keys, scores, metric, scale, neighbours, prefix, plus: bool):
    batch, _, num_patches = check_tokens(tokens, prefix)
    if num_patches == 0:
        raise ValueError("prumerge needs at least one patch token (N - prefix >= 1)")
    neighbours = check_int("neighbours", neighbours, 0)
    received = patch_scores(tokens, prefix, queries, keys, scores, scale)
    similarity = similarity_rows(tokens, metric, keys, prefix, _keys_concatenated, "prumerge", "to find neighbours")
    adaptive = keep is None and ratio is None
    if adaptive:
        budget = 0
        keep_mask = iqr_outliers(received)
    else:
        budget = resolve_keep(keep, ratio, num_patches)
        top = top_indices(received, budget)
        keep_mask = torch.zeros_like(received, dtype=torch.bool).scatter_(1, top, True)
    if plus:
        keep_mask = keep_mask | spatial_samples(keep_mask)
    return _merge(tokens, prefix, keep_mask, received, similarity, neighbours, ragged=adaptive or plus,
                  empty_width=budget)


def prumerge(tokens: torch.Tensor, keep: int | None = None, *, ratio: float | None = None,
             queries: torch.Tensor | None = None, keys: torch.Tensor | None = None,
             scores: torch.Tensor | None = None, metric: torch.Tensor | None = None,
             scale: float | None = None, neighbours: int = NEIGHBOURS, prefix: int = 0) -> Compressed:
    """LLaVA-PruMerge: IQR-outlier (or top-``keep``) tokens, each merged with its most similar
    neighbours, plus one token for the rest; see the module docstring. Ragged (``counts``)
    unless ``keep`` or ``ratio`` is given."""
    return _prumerge(tokens, keep, ratio, queries, keys, scores, metric, scale, neighbours, prefix, plus=False)


def prumerge_plus(tokens: torch.Tensor, keep: int | None = None, *, ratio: float | None = None,
                  queries: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                  scores: torch.Tensor | None = None, metric: torch.Tensor | None = None,
                  scale: float | None = None, neighbours: int = NEIGHBOURS, prefix: int = 0) -> Compressed:
    """PruMerge+: :func:`prumerge` with spatially uniform samples added to the selection; always
    ragged (``counts``)."""
    return _prumerge(tokens, keep, ratio, queries, keys, scores, metric, scale, neighbours, prefix, plus=True)
