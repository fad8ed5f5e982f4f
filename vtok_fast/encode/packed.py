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

All take optional ``values`` (``(total, C)`` rows in the packed order, e.g. a ViT's output) in
place of ``tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from vtok_fast._checks import check_tensor


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
        check_tensor("cu_seqlens", self.cu_seqlens, ndim=1, shape_doc="(B + 1,)")
        total = self.tokens.shape[0]
        for name in ("scale", "row", "col"):
            value = getattr(self, name)
            check_tensor(name, value, ndim=1, shape_doc="(total,)")
            if value.shape[0] != total:
                raise ValueError(f"{name} must be (total,) = ({total},) like tokens, got shape "
                                 f"{tuple(value.shape)}")
        if self.cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must be (B + 1,) with B >= 0, got an empty tensor")

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
        """The same layout holding other ``(total, C)`` rows (e.g. a ViT's output)."""
        return replace(self, tokens=tokens)

    # --- layouts -------------------------------------------------------------------------------

    def _values(self, values: Optional[torch.Tensor]) -> torch.Tensor:
        if values is None:
            return self.tokens
        check_tensor("values", values, ndim=2, shape_doc="(total, C)")
        if values.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"values must have one row per packed token ({self.tokens.shape[0]}), "
                             f"got shape {tuple(values.shape)}")
        return values

    def cell_index(self) -> torch.Tensor:
        """Packed row of the token covering each base cell, ``(B, gh, gw)`` int64."""
        gh, gw = self.grid_size
        device = self.tokens.device
        cells = torch.full((self.batch_size * gh * gw,), -1, dtype=torch.long, device=device)
        image = self.seq_index()
        for s in range(self.num_scales):
            idx = (self.scale == s).nonzero().squeeze(1)
            k = 1 << s
            dy, dx = torch.meshgrid(torch.arange(k, device=device), torch.arange(k, device=device),
                                    indexing="ij")
            rows = self.row[idx, None] + dy.reshape(1, -1)
            cols = self.col[idx, None] + dx.reshape(1, -1)
            flat = (image[idx, None] * gh + rows) * gw + cols
            cells[flat.reshape(-1)] = idx.repeat_interleave(k * k)
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
