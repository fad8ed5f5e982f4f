"""Grid reducers: ``pool`` (average / max / bilinear) and ``pixel_shuffle`` (space-to-depth).

Both read the patch tokens as a row-major ``(h, w)`` grid (``grid=None``: a square one) after
``prefix`` leading tokens, and return a :class:`Compressed` whose outputs are row-major over the
reduced grid with position ``-1`` (synthesized tokens).

- ``pool(tokens, stride=2, mode="avg")``: ``s×s`` average (``"avg"``) or max (``"max"``) pooling
  as ``avg_pool2d`` / ``max_pool2d`` with kernel = stride = ``s``: an odd grid floors (SigLIP
  27×27 → 13×13 = 169), the remainder row/column is dropped (source ``-1``); ``ceil_mode=True``
  keeps it in partial windows (averaged over the tokens they hold). ``"bilinear"`` is
  LLaVA-Video's ``interpolate(size=(ceil(h/s), ceil(w/s)), mode="bilinear")`` (27×27 → 14×14 =
  196); each input token is held by the output whose cell contains its centre,
  ``floor((i + 0.5) · oh / h)``.
- ``pixel_shuffle(tokens, stride=2)``: InternVL's ``pixel_shuffle(scale_factor=1/s)``: every
  ``s×s`` window becomes one token ``s²`` times wider, channels ordered window row-major
  (``(0,0), (0,1), (1,0), (1,1)`` for ``s = 2``), exactly as transformers' ``InternVLModel``.
  The grid must be divisible by ``s``; prefix tokens cannot be kept at the new width (InternVL
  drops the CLS token first), so ``prefix`` must be 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vtok_fast._checks import check_int
from vtok_fast.reduce._common import check_tokens, resolve_grid, sizes_from_source
from vtok_fast.reduce.compressed import Compressed

POOL_MODES = ("avg", "max", "bilinear")


def _grid_result(tokens, prefix: int, out: torch.Tensor, patch_source: torch.Tensor) -> Compressed:
    """Prefix tokens + the reduced grid ``out`` ``(B, m, C)``; ``patch_source`` ``(n,)``: output
    cell of each patch token (``-1``: dropped)."""
    batch, num_out, device = out.shape[0], out.shape[1], tokens.device
    if prefix:
        out = torch.cat([tokens[:, :prefix], out], dim=1)
    source = torch.cat([torch.arange(prefix, device=device),
                        torch.where(patch_source >= 0, patch_source + prefix, -1)])
    source = source.expand(batch, -1).clone()
    positions = torch.cat([torch.arange(prefix, device=device),
                           torch.full((num_out,), -1, dtype=torch.int64, device=device)])
    return Compressed(out, positions.expand(batch, -1).clone(), sizes_from_source(source, prefix + num_out),
                      source)


def _cells(length: int, out_length: int, stride: int, mode: str, device) -> torch.Tensor:
    """Output row (or column) holding each input row: ``i // s`` (``-1`` past a floored grid) or,
    for bilinear, the output cell containing the row's centre."""
    i = torch.arange(length, device=device)
    if mode == "bilinear":
        return (2 * i + 1) * out_length // (2 * length)
    cell = i // stride
    return torch.where(cell < out_length, cell, -1)


def pool(tokens: torch.Tensor, stride: int = 2, mode: str = "avg", *, grid=None, prefix: int = 0,
         ceil_mode: bool = False) -> Compressed:
    """``s×s`` pooling of the patch-token grid (see the module docstring)."""
    batch, _, num_patches = check_tokens(tokens, prefix)
    if mode not in POOL_MODES:
        raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
    h, w = resolve_grid(num_patches, grid, prefix)
    stride = check_int("stride", stride, 1, min(h, w), f"the grid's shorter side (grid = ({h}, {w}))")
    dim = tokens.shape[-1]
    x = tokens[:, prefix:].reshape(batch, h, w, dim).permute(0, 3, 1, 2)  # channels-last NCHW view
    if mode == "bilinear":
        size = (-(-h // stride), -(-w // stride))
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    elif mode == "avg":
        y = F.avg_pool2d(x, stride, stride, ceil_mode=bool(ceil_mode))
    else:
        y = F.max_pool2d(x, stride, stride, ceil_mode=bool(ceil_mode))
    oh, ow = y.shape[-2:]
    out = y.permute(0, 2, 3, 1).reshape(batch, oh * ow, dim)
    rows = _cells(h, oh, stride, mode, tokens.device)
    cols = _cells(w, ow, stride, mode, tokens.device)
    cell = torch.where((rows[:, None] >= 0) & (cols[None, :] >= 0), rows[:, None] * ow + cols[None, :], -1)
    return _grid_result(tokens, prefix, out, cell.flatten())


def pixel_shuffle(tokens: torch.Tensor, stride: int = 2, *, grid=None, prefix: int = 0) -> Compressed:
    """InternVL's pixel shuffle: ``s×s`` windows to one token ``s²`` times wider (see the module
    docstring); ``stride=2`` is InternVL's ``downsample_ratio=0.5``."""
    batch, _, num_patches = check_tokens(tokens, prefix)
    if prefix:
        raise ValueError(f"pixel_shuffle makes tokens s² times wider, so prefix tokens cannot be kept: "
                         f"drop them first (InternVL drops the CLS token) and pass prefix=0, got prefix={prefix}")
    h, w = resolve_grid(num_patches, grid, prefix)
    stride = check_int("stride", stride, 1)
    if h % stride or w % stride:
        raise ValueError(f"pixel_shuffle needs a grid divisible by stride={stride}, got grid ({h}, {w})")
    dim = tokens.shape[-1]
    oh, ow = h // stride, w // stride
    out = (tokens.reshape(batch, oh, stride, ow, stride, dim).permute(0, 1, 3, 2, 4, 5)
           .reshape(batch, oh * ow, stride * stride * dim))
    i = torch.arange(h, device=tokens.device) // stride
    j = torch.arange(w, device=tokens.device) // stride
    return _grid_result(tokens, 0, out, (i[:, None] * ow + j[None, :]).flatten())

