"""Hierarchical tokens: a pyramid of token grids of one image, every level through the fused
patch embedding.

``pyramid_tokenize(images, weights, biases=None, pos_embeds=None, *, levels=(8, 16, 32), ...)``

- **Levels** are grid sizes: ``g`` is a ``g x g`` grid, ``(gh, gw)`` a rectangular one. Level
  ``l`` embeds the image resized to ``(gh * p_l, gw * p_l)`` pixels, ``p_l`` the patch side of
  its weight: one weight shared by every level (a ViT's patch embedding, the image resized per
  level) or one weight per level (e.g. patch sizes 32, 16, 8 of a 256-px image: grids 8, 16, 32,
  no resizing at all).
- **Each level on its own**: a level's pixels are resized from the input itself, never from
  another level, so its tokens are the same (bitwise) whatever other levels are requested. A size
  that divides the input's by integer factors is average-pooled (box filter = ``area``
  resampling); other sizes are resampled bilinearly (with antialiasing when shrinking). A level
  whose size is the input's embeds the input itself (uint8 included). (Pooling coarse levels from
  a finer resized one would read the pixels once, but a coarse level would then change with the
  finer levels requested: bilinear then box filter is not the bilinear filter of the input.)
- **Position tables**: ``pos_embeds`` is one table per level (``(N_l, D)`` or ``(1, N_l, D)``),
  or a single table of a square grid, resampled to every level's grid (bicubic with
  antialiasing, as timm's ``resample_abs_pos_embed``). ``level_embed`` ``(L, D)`` adds row ``l``
  to every token of level ``l``. Both are added inside the fused op.
- **Output**: ``concat=False``: a list of ``(B, P + N_l, D)``, each level led by the prefix
  tokens (each a complete ViT input); ``concat=True``: one ``(B, P + sum N_l, D)`` sequence, the
  prefix once, then the levels in the order given. The seed's example, grids 8, 16 and 32, is
  ``64 + 256 + 1024 = 1344`` tokens.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from vtok_fast._checks import FLOAT_DTYPES, check_same_device, check_tensor, token_table

Tensors = Union[torch.Tensor, Sequence[torch.Tensor], None]
_TABLE_DOC = "(N, D) or (1, N, D)"


def _grid(level, index: int) -> tuple[int, int]:
    if isinstance(level, numbers.Integral) and not isinstance(level, bool):
        level = (level, level)
    if (not isinstance(level, (tuple, list)) or len(level) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in level)):
        raise ValueError(f"levels[{index}] must be a grid side g >= 1 or a pair (gh, gw), got {level!r}")
    return int(level[0]), int(level[1])


def _per_level(name: str, value: Tensors, count: int, allow_none: bool = True) -> list:
    """``value`` as a list of ``count`` entries: one tensor shared, or one per level."""
    if value is None:
        if not allow_none:
            raise TypeError(f"{name} must be a tensor or a sequence of {count} tensors, got None")
        return [None] * count
    if isinstance(value, torch.Tensor):
        return [value] * count
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a tensor or a sequence of {count} tensors (one per level), "
                        f"got {type(value).__name__}")
    if len(value) != count:
        raise ValueError(f"{name} must have one entry per level ({count}), got {len(value)}")
    return list(value)


def _resample_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A square-grid ``(n, D)`` table resampled to ``grid`` (bicubic, antialiased), ``(gh*gw, D)``."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"a single pos_embeds table is resampled from a square grid: its rows must be "
                         f"a square number, got {table.shape[0]} (pass one table per level instead)")
    if (side, side) == grid:
        return table
    t = table.reshape(side, side, -1).permute(2, 0, 1)[None].to(torch.float32)
    t = F.interpolate(t, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1).to(table.dtype)


def _level_table(i: int, table: torch.Tensor, single: bool, grid: tuple[int, int], D: int,
                 weight: torch.Tensor) -> torch.Tensor:
    """Level ``i``'s ``(gh * gw, D)`` position rows: its own table, or the single square table
    resampled to its grid."""
    if single:
        return _resample_table(token_table("pos_embeds", table, weight, shape_doc=_TABLE_DOC), grid)
    return token_table(f"pos_embeds[{i}]", table, weight, rows=grid[0] * grid[1], shape_doc=_TABLE_DOC,
                       rows_doc=" (the level's grid)")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area (integer shrink) or bilinear resampling of float pixels."""
    H, W = x.shape[-2:]
    if (H, W) == size:
        return x
    fh, fw = H // size[0], W // size[1]
    if fh >= 1 and fw >= 1 and (fh * size[0], fw * size[1]) == (H, W):
        return F.avg_pool2d(x, (fh, fw))
    shrink = size[0] < H or size[1] < W
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _level_pixels(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The input at ``size``: itself, or resized from it (uint8 as floats in [0, 1])."""
    if size == tuple(images.shape[2:]):
        return images
    return _resize(images.to(torch.float32) / 255 if images.dtype == torch.uint8 else images, size)


def pyramid_tokenize(images: torch.Tensor, weights: Tensors, biases: Tensors = None,
                     pos_embeds: Tensors = None, *, levels: Sequence = (8, 16, 32), mean=None, std=None,
                     prefix: Optional[torch.Tensor] = None, level_embed: Optional[torch.Tensor] = None,
                     concat: bool = False) -> Union[list[torch.Tensor], torch.Tensor]:
    """Token grids of ``images`` at every level (rules in the module docstring).

    Args:
        images: ``(B, C, H, W)`` float (any range the weights expect, typically [0, 1]) or uint8.
        weights: a ``(D, C, p, p)`` Conv2d weight shared by the levels, or one per level (each its
            own ``p``, one ``D``); ``biases``: None, a ``(D,)`` tensor or one per level.
        pos_embeds: None, one table per level, or one square-grid table resampled per level.
        levels: grid sizes, ``g`` or ``(gh, gw)`` each.
        mean, std: per-channel normalization fused into the embedding (as in ``patch_embed``).
        prefix: ``(P, D)`` (or ``(1, P, D)``, ``(D,)``) tokens leading each level / the sequence.
        level_embed: ``(L, D)``, row ``l`` added to level ``l``'s tokens.
        concat: one sequence (True) or a list of levels (False).
    """
    from vtok_fast.encode.patch_embed import patch_embed

    check_tensor("images", images, ndim=4, dtypes=(*FLOAT_DTYPES, torch.uint8), shape_doc="(B, C, H, W)")
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(f"levels must be a non-empty sequence of grid sizes, got {levels!r}")
    grids = [_grid(level, i) for i, level in enumerate(levels)]
    L = len(grids)
    weights = _per_level("weights", weights, L, allow_none=False)
    biases = _per_level("biases", biases, L)
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(D, C, p, p)")
    D, C = weights[0].shape[:2]
    for i, w in enumerate(weights):
        if tuple(w.shape[:2]) != (D, C) or w.shape[2] != w.shape[3] or w.dtype != weights[0].dtype:
            raise ValueError(f"weights[{i}] must be (D, C, p, p) = ({D}, {C}, p, p) with square patches "
                             f"and the dtype of weights[0], got shape {tuple(w.shape)} {w.dtype}")
    if images.shape[1] != C:
        raise ValueError(f"images must have C={C} channels (weights' shape[1]), got shape {tuple(images.shape)}")
    if not isinstance(concat, bool):
        raise TypeError(f"concat must be a bool, got {type(concat).__name__}")
    single_table = isinstance(pos_embeds, torch.Tensor)
    tables = _per_level("pos_embeds", pos_embeds, L)
    if level_embed is not None:
        level_embed = token_table("level_embed", level_embed, weights[0], rows=L, rows_doc=" (one per level)")
    check_same_device(images=images, weight=weights[0], prefix=prefix, level_embed=level_embed,
                      pos_embed=tables[0], bias=biases[0])

    # pixels: each level resized from the input itself, so its tokens never depend on the other
    # levels requested (levels of one size share the result)
    sizes = [(gh * w.shape[2], gw * w.shape[3]) for (gh, gw), w in zip(grids, weights)]
    resized = {size: _level_pixels(images, size) for size in set(sizes)}

    out = []
    for i, (grid, size, w, b, table) in enumerate(zip(grids, sizes, weights, biases, tables)):
        n = grid[0] * grid[1]
        pos = None if table is None else _level_table(i, table, single_table, grid, D, w)
        if level_embed is not None:
            row = level_embed[i].expand(n, D)
            pos = row if pos is None else pos + row
        out.append(patch_embed(resized[size], w, b, pos, prefix, pos_covers_prefix=False, mean=mean,
                               std=std))
    if not concat:
        return out
    # every level ran the same call, prefix included, whatever its place; the prefix leads once
    P = out[0].shape[1] - grids[0][0] * grids[0][1]
    return torch.cat([out[0], *(t[:, P:] for t in out[1:])], dim=1)
