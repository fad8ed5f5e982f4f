"""Input layout of a ``VectorQuantizer`` (``layer`` below): a batch ``x`` becomes the rows the layer
quantizes, ``(books, rows, codebook_dim)``, and the quantized rows become an output shaped like ``x``.

``books`` is ``heads`` with ``separate_codebook_per_head`` (row ``r`` of book ``h`` is head ``h`` of
position ``r``), else 1 (the heads of position ``r`` are rows ``r * heads .. r * heads + heads - 1``).
Padded positions (``mask`` / ``lens``) are left out of the rows and filled back in on the way out.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vtok_fast.encode._vq_common import _row_mask


class Rows(NamedTuple):
    """One batch as a layer sees it."""
    lead: torch.Size             # the positions of x: its channel-last shape without the feature dim
    flat: torch.Tensor           # (M, dim): every position's vector, channel last
    keep: torch.Tensor | None    # (M,) bool: the real (unpadded) positions; None: all of them
    n: int                       # how many real positions
    z: torch.Tensor              # (books, rows, codebook_dim): their vectors, projected in, split into
    #                              heads and (metric "cosine") unit-normalized


def split_heads(layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``(n, heads * codebook_dim) -> (books, rows, codebook_dim)``."""
    n = z.shape[0]
    if layer.separate_codebook_per_head:
        return z.reshape(n, layer.heads, layer.codebook_dim).transpose(0, 1)
    return z.reshape(1, n * layer.heads, layer.codebook_dim)


def merge_heads(layer: nn.Module, q: torch.Tensor, n: int) -> torch.Tensor:
    """``(books, rows, codebook_dim) -> (n, heads * codebook_dim)``, the inverse of ``split_heads``."""
    if layer.separate_codebook_per_head:
        return q.transpose(0, 1).reshape(n, layer.heads * layer.codebook_dim)
    return q.reshape(n, layer.heads * layer.codebook_dim)


def to_rows(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
            lens: torch.Tensor | None = None) -> Rows:
    """The rows of ``x`` (channel last, already checked: ``(..., dim)``) the layer quantizes: the
    positions ``mask`` / ``lens`` keep (all by default; ValueError / TypeError for a bad mask), through
    ``project_in``, split into heads, unit-normalized for ``metric="cosine"``."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, layer.dim)
    keep = _row_mask(mask, lens, lead, x.device)
    real = flat if keep is None else flat[keep]
    z = split_heads(layer, layer.project_in(real))
    if layer.metric == "cosine":
        z = F.normalize(z, dim=-1)
    return Rows(lead, flat, keep, real.shape[0], z)


def real_rows(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``values`` (one per position of x, shaped like ``Rows.lead``) of the real positions, flat."""
    values = values.reshape(-1)
    return values if keep is None else values[keep]


def from_rows(layer: nn.Module, rows: Rows, q: torch.Tensor,
              idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantized, indices)`` for the rows' quantized vectors ``q`` ``(books, rows, codebook_dim)``
    and codes ``idx`` ``(books, rows)``: ``quantized`` through ``project_out``, shaped and laid out like
    ``x`` (channel last or not) in ``x``'s dtype; ``indices`` int64 shaped like ``x`` without its
    feature dim, plus a trailing ``heads`` dim when ``heads > 1``. Padded positions get ``x`` itself
    (``masked_output="input"``) or zeros, and index -1."""
    m, heads = rows.flat.shape[0], layer.heads
    q = layer.project_out(merge_heads(layer, q.to(rows.z.dtype), rows.n)).to(rows.flat.dtype)
    if layer.separate_codebook_per_head:
        idx_rows = idx.transpose(0, 1)
    else:
        idx_rows = idx.reshape(rows.n, heads)
    if rows.keep is not None:
        where = rows.keep.nonzero().squeeze(1)
        base = rows.flat if layer.masked_output == "input" else rows.flat.new_zeros(m, layer.dim)
        q = base.index_put((where,), q)
        idx_rows = idx_rows.new_full((m, heads), -1).index_put((where,), idx_rows)
    quantized = q.reshape(*rows.lead, layer.dim)
    if not layer.channel_last:
        quantized = quantized.movedim(-1, 1)
    indices = idx_rows.reshape(*rows.lead, heads) if heads > 1 else idx_rows.reshape(rows.lead)
    return quantized, indices
