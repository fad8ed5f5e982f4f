"""Compress a family's image features unit by unit, back to full count.

:func:`compress_units` runs :func:`vtok_fast.reduce.compress.compress` on every unit of
:class:`~vtok_fast.patch.families.base.Units` (one batched call per distinct grid) and returns the
pieces at their *full* count: each compressed token sits at its slot (the placeholder of the input
token it stands for: its own, its destination's, a pooled window's first), every other row is
zero, and a keep flag per row says which rows the language model will see. The model's own
placeholder check and ``masked_scatter`` then run unchanged; the placeholder drop
(:mod:`vtok_fast.patch.hf_family_compress`) removes the rows whose flag is False.

``replay`` applies the same compression to other per-token features of the same units (Qwen3-VL's
DeepStack features): a kept token keeps its row, a merged or pooled token gets the mean of its
sources.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from vtok_fast.patch.placeholder_drop import slots
from vtok_fast.reduce.compress import compress
from vtok_fast.reduce.compressed import Compressed

WITH_METRIC = ("visionzip", "prumerge", "prumerge_plus")  # methods that merge by a metric


class UnitResult(NamedTuple):
    """One unit's compression: ``slot`` ``(M,)`` its tokens' rows, ``source`` ``(n,)`` each input
    row's output token (-1 dropped), ``tokens`` ``(M, D)``."""

    slot: torch.Tensor
    source: torch.Tensor
    tokens: torch.Tensor


class Cut(NamedTuple):
    """One unit: piece ``piece`` from row ``start``, ``h x w`` grid tokens per row followed by
    ``extra`` kept-as-is tokens; ``first``: its first grid token among the piece's grid tokens."""

    piece: int
    start: int
    grid: tuple[int, int]
    extra: int
    first: int


def _cut(units) -> list[Cut]:
    """Every unit, in placeholder order."""
    cuts = []
    for index, (piece, grids) in enumerate(zip(units.pieces, units.grids)):
        start = first = 0
        for grid in grids:
            h, w, extra = (*grid, 0) if len(grid) == 2 else grid
            cuts.append(Cut(index, start, (h, w), extra, first))
            start += h * (w + extra)
            first += h * w
        if start != piece.shape[0]:
            raise ValueError(f"image feature piece {index} holds {piece.shape[0]} tokens, its grids "
                             f"{grids} cover {start}")
    return cuts


def _unit_rows(cut: Cut, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The piece rows of a unit's grid tokens ``(h·w,)`` and of its kept-as-is tokens."""
    (h, w), extra = cut.grid, cut.extra
    offsets = torch.arange(h * (w + extra), device=device).view(h, w + extra) + cut.start
    return offsets[:, :w].flatten(), offsets[:, w:].flatten()


def _one(result: Compressed, i: int) -> UnitResult:
    """Unit ``i`` of a batched result, without its padding (ragged counts)."""
    valid = result.positions.shape[1] if result.counts is None else int(result.counts[i])
    single = Compressed(result.tokens[i:i + 1, :valid], result.positions[i:i + 1, :valid],
                        result.sizes[i:i + 1, :valid], result.source[i:i + 1])
    return UnitResult(slots(single)[0], result.source[i], result.tokens[i, :valid])


def compress_units(units, method: str, budget: dict, scores: list[torch.Tensor] | None = None):
    """``(pieces, keep, results)``: the full-count pieces, the ``(Σn,)`` bool keep flags in
    placeholder order and every unit's :class:`UnitResult` (for :func:`replay`). ``scores``: per
    piece, one attention score per grid token (the attention methods; kept-as-is tokens have
    none); the tokens themselves are then the ``metric`` of the methods that merge by one."""
    cuts = _cut(units)
    groups: dict[tuple[int, int], list[int]] = {}
    for u, cut in enumerate(cuts):
        if cut.grid[0] * cut.grid[1]:
            groups.setdefault(cut.grid, []).append(u)
    results: list[UnitResult | None] = [None] * len(cuts)
    for grid, members in groups.items():
        count = grid[0] * grid[1]
        pieces = [units.pieces[cuts[u].piece] for u in members]
        tokens = torch.stack([p[_unit_rows(cuts[u], p.device)[0]] for p, u in zip(pieces, members)])
        extra = {}
        if scores is not None:
            extra["scores"] = torch.stack([scores[cuts[u].piece][cuts[u].first:cuts[u].first + count].to(tokens.device)
                                           for u in members])
            if method in WITH_METRIC:
                extra["metric"] = tokens
        result = compress(tokens, method, grid=grid, **budget, **extra)
        for i, u in enumerate(members):
            results[u] = _one(result, i)
    return _full_count(units, cuts, results)


def _full_count(units, cuts: list[Cut], results: list) -> tuple:
    """The pieces at full count (kept tokens at their rows), the keep flags, the replay plan."""
    pieces = [torch.zeros_like(p) for p in units.pieces]
    keep = [torch.zeros(p.shape[0], dtype=torch.bool, device=p.device) for p in units.pieces]
    for cut, result in zip(cuts, results):
        grid_rows, fixed = _unit_rows(cut, pieces[cut.piece].device)
        pieces[cut.piece][fixed] = units.pieces[cut.piece][fixed]
        keep[cut.piece][fixed] = True
        if result is not None:
            rows = grid_rows[result.slot.to(grid_rows.device)]
            pieces[cut.piece].index_copy_(0, rows, result.tokens.to(pieces[cut.piece].dtype))  # in place: no new piece per unit
            keep[cut.piece][rows] = True
    flags = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)
    return pieces, flags, (cuts, results)


def replay(plan, others: list[torch.Tensor]) -> list[torch.Tensor]:
    """``others`` (pieces laid out as the compressed ones) with the same compression: full-count
    pieces, each output token at its slot as the mean of its sources' rows."""
    cuts, results = plan
    out = [torch.zeros_like(p) for p in others]
    for cut, result in zip(cuts, results):
        piece = cut.piece
        grid_rows, fixed = _unit_rows(cut, others[piece].device)
        out[piece][fixed] = others[piece][fixed]
        if result is None:
            continue
        x = others[piece][grid_rows]
        source = result.source.to(x.device)
        valid = source >= 0
        width = result.slot.shape[0]
        sums = x.new_zeros(width, x.shape[1]).index_add(0, source[valid], x[valid])
        counts = torch.zeros(width, dtype=x.dtype, device=x.device).index_add(
            0, source[valid], torch.ones_like(source[valid], dtype=x.dtype))
        merged = sums / counts.clamp(min=1)[:, None]
        out[piece].index_copy_(0, grid_rows[result.slot.to(x.device)], merged)
    return out
