"""``PackedTokens``: variable-length token sequences of a batch, packed into one ``(total, D)``.

Image ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (the flash-attention / varlen
convention). Every token also knows where it lies on the image's base patch grid: ``scale`` ``s``
(a square of ``2**s x 2**s`` base cells), ``row``, ``col`` of its top-left cell in base-patch
units; prefix tokens (CLS, registers) have ``scale = row = col = -1`` and come first in their
sequence.

- ``to_grid()``: ``(B, gh, gw, D)``, every base cell holding the token that covers it (a coarse
  token repeated over its cells): for dense heads and visualization.
- ``to_padded()``: ``(B, max_len, D)`` and a ``(B, max_len)`` bool mask (True = a real token).
- ``source_map()``: ``(B, P + gh * gw)`` token of each prefix token and base cell, numbered
  within its image (ToMe's ``source_map`` convention; ``vtok_fast.viz.merge_map`` draws it).

Construction checks the layout (named ``ValueError`` / ``TypeError``): ``cu_seqlens`` rises from
0 to the token count without decreasing; the first ``num_prefix_tokens`` tokens of each sequence,
and only they, are prefix tokens; every other token has a scale in ``[0, num_scales)`` and its
square of cells inside the grid; the tokens of each image cover every base cell exactly once.

All take optional ``values`` (``(total, C)`` rows in the packed order, e.g. a ViT's output) in
place of ``tokens``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from vtok_fast._checks import check_int, check_same_device, check_tensor

_INT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class PackedTokens:
    tokens: torch.Tensor  # (total, D)
    cu_seqlens: torch.Tensor  # (B + 1,) int32, cu_seqlens[0] = 0
    scale: torch.Tensor  # (total,) int64; -1: prefix token
    row: torch.Tensor  # (total,) int64, top-left base cell; -1: prefix token
    col: torch.Tensor  # (total,) int64
    grid_size: tuple[int, int]  # (gh, gw) base patches
    patch_size: int  # base patch side in pixels
    num_prefix_tokens: int = 0
    num_scales: int = 1

    def __post_init__(self):
        check_tensor("tokens", self.tokens, ndim=2, shape_doc="(total, D)")
        check_tensor("cu_seqlens", self.cu_seqlens, ndim=1, dtypes=_INT_DTYPES, shape_doc="(B + 1,)")
        total = self.tokens.shape[0]
        for name in ("scale", "row", "col"):
            value = getattr(self, name)
            check_tensor(name, value, ndim=1, dtypes=_INT_DTYPES, shape_doc="(total,)")
            if value.shape[0] != total:
                raise ValueError(f"{name} must be (total,) = ({total},) like tokens, got shape "
                                 f"{tuple(value.shape)}")
        if self.cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must be (B + 1,) with B >= 0, got an empty tensor")
        check_same_device(tokens=self.tokens, cu_seqlens=self.cu_seqlens, scale=self.scale, row=self.row,
                          col=self.col)
        grid = self.grid_size
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise ValueError(f"grid_size must be a pair (gh, gw), got {grid!r}")
        check_int("grid_size[0]", grid[0], 1)
        check_int("grid_size[1]", grid[1], 1)
        check_int("patch_size", self.patch_size, 1)
        check_int("num_prefix_tokens", self.num_prefix_tokens, 0)
        check_int("num_scales", self.num_scales, 1)
        self._check_layout()

    def _check_layout(self) -> None:
        """``cu_seqlens`` cuts the rows into sequences, each led by its prefix tokens; every other
        token lies inside the grid; the tokens of each image cover each base cell exactly once."""
        cu, total = self.cu_seqlens.long(), self.tokens.shape[0]
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu.diff() < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the token count {total} without ever "
                             f"decreasing, got {cu.tolist()}")
        (gh, gw), P, S = self.grid_size, self.num_prefix_tokens, self.num_scales
        s, r, c = self.scale.long(), self.row.long(), self.col.long()
        prefix = s == -1
        position = torch.arange(total, device=cu.device) - cu[:-1][self.seq_index()]
        k = 1 << s.clamp(0, S - 1)  # the side of each token's square of cells
        problems = {
            f"scale must be -1 on the first num_prefix_tokens = {P} tokens of each sequence and only "
            f"there": prefix != (position < P),
            "prefix tokens must have row = col = -1": prefix & ((r != -1) | (c != -1)),
            f"scale must be -1 (prefix) or in [0, num_scales) = [0, {S})": ~prefix & ((s < -1) | (s >= S)),
            f"row / col must place each token's square of 2**scale cells inside the {gh}x{gw} grid":
                ~prefix & ((r < 0) | (c < 0) | (r + k > gh) | (c + k > gw)),
        }
        found = torch.stack([bad.any() for bad in problems.values()]).tolist()  # one host sync
        for (what, bad), hit in zip(problems.items(), found):
            if hit:
                t = int(bad.nonzero()[0, 0])
                raise ValueError(f"{what}; got token {t} with scale {int(s[t])}, row {int(r[t])}, "
                                 f"col {int(c[t])}")
        cells, _ = self._token_cells()
        cover = torch.bincount(cells, minlength=self.batch_size * gh * gw).view(-1, gh, gw)
        if bool((cover != 1).any()):
            b, y, x = (cover != 1).nonzero()[0].tolist()
            raise ValueError(f"the tokens of each image must cover every base cell of the {gh}x{gw} "
                             f"grid exactly once; image {b}'s cell (row {y}, col {x}) is covered "
                             f"{int(cover[b, y, x])} times")

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def counts(self) -> torch.Tensor:
        """Tokens per image (prefix included), ``(B,)`` int64."""
        return self.cu_seqlens.diff().long()

    @property
    def max_seqlen(self) -> int:
        return int(self.counts.max()) if self.batch_size else 0

    def seq_index(self) -> torch.Tensor:
        """Image of every packed row, ``(total,)`` int64."""
        batch = torch.arange(self.batch_size, device=self.tokens.device)
        return batch.repeat_interleave(self.counts, output_size=self.tokens.shape[0])

    def with_tokens(self, tokens: torch.Tensor) -> "PackedTokens":
        """The same layout holding other ``(total, C)`` rows (e.g. a ViT's output); the layout,
        already checked, is not checked again."""
        tokens = self._values(tokens, "tokens")
        out = copy.copy(self)
        object.__setattr__(out, "tokens", tokens)
        return out

    # --- layouts -------------------------------------------------------------------------------

    def _values(self, values: Optional[torch.Tensor], name: str = "values") -> torch.Tensor:
        if values is None and name == "values":
            return self.tokens
        check_tensor(name, values, ndim=2, shape_doc="(total, C)")
        if values.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"{name} must have one row per packed token ({self.tokens.shape[0]}), "
                             f"got shape {tuple(values.shape)}")
        return values

    def _token_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cells, owners)``: every base cell a token covers, as a flat ``(b, y, x)`` index, and
        that token's packed row."""
        gh, gw = self.grid_size
        device = self.tokens.device
        image = self.seq_index()
        cells, owners = [], []
        for s in range(self.num_scales):
            idx = (self.scale == s).nonzero().squeeze(1)
            k = 1 << s
            dy, dx = torch.meshgrid(torch.arange(k, device=device), torch.arange(k, device=device),
                                    indexing="ij")
            rows = self.row[idx, None] + dy.reshape(1, -1)
            cols = self.col[idx, None] + dx.reshape(1, -1)
            cells.append(((image[idx, None] * gh + rows) * gw + cols).reshape(-1))
            owners.append(idx.repeat_interleave(k * k))
        return torch.cat(cells).long(), torch.cat(owners)

    def cell_index(self) -> torch.Tensor:
        """Packed row of the token covering each base cell, ``(B, gh, gw)`` int64."""
        gh, gw = self.grid_size
        cells = torch.full((self.batch_size * gh * gw,), -1, dtype=torch.long, device=self.tokens.device)
        flat, owners = self._token_cells()
        cells[flat] = owners
        return cells.view(self.batch_size, gh, gw)

    def to_grid(self, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, gh, gw, C)``: each base cell holds the row of the token covering it."""
        values = self._values(values)
        gh, gw = self.grid_size
        return values[self.cell_index().reshape(-1)].view(self.batch_size, gh, gw, values.shape[1])

    def to_padded(self, values: Optional[torch.Tensor] = None, padding_value: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, max_len, C)`` rows (``padding_value`` after each sequence) and the ``(B, max_len)``
        bool mask of real tokens."""
        values = self._values(values)
        image = self.seq_index()
        starts = self.cu_seqlens.long()[:-1]
        position = torch.arange(values.shape[0], device=values.device) - starts[image]
        length = self.max_seqlen
        padded = values.new_full((self.batch_size, length, values.shape[1]), padding_value)
        padded = padded.index_put((image, position), values)  # out of place: differentiable
        mask = torch.arange(length, device=values.device)[None, :] < self.counts[:, None]
        return padded, mask

    def source_map(self) -> torch.Tensor:
        """``(B, P + gh * gw)`` int64: for each prefix token and base cell, the index of the token
        holding it within its image (prefix tokens hold themselves)."""
        cells = self.cell_index().flatten(1)
        cells = cells - self.cu_seqlens.long()[:-1, None]
        P = self.num_prefix_tokens
        prefix = torch.arange(P, device=cells.device).expand(self.batch_size, P)
        return torch.cat([prefix, cells], dim=1)
