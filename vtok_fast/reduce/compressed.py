"""``Compressed``: the one result type of every token reducer (``vtok_fast.compress`` and the
method functions), extending ToMe's ``MergeInfo``."""
from __future__ import annotations

from typing import NamedTuple

import torch

from vtok_fast._checks import check_tensor


class Compressed(NamedTuple):
    """``B`` images of ``N`` input tokens reduced to ``M`` output tokens each.

    - ``tokens`` ``(B, M, D)`` (``pixel_shuffle``: ``(B, M, s²·D)``).
    - ``positions`` ``(B, M)`` int64: the input index each output token sits at: a kept token its
      own index, a merged token its destination's; ``-1`` for a pooled or synthesized token (and
      for padding).
    - ``sizes`` ``(B, M)`` int64: how many input tokens each output stands for (0 for padding).
      Per image they sum to ``N`` minus the dropped tokens.
    - ``source`` ``(B, N)`` int64: the output token that holds each input token; ``-1`` for a
      dropped token (pruned by ``attn_topk``, or in the remainder rows/columns that floor pooling
      leaves out). Methods that merge everything (``tome``, ``visionzip``, ``prumerge``, pooling
      of a divisible grid, ``pixel_shuffle``) drop nothing.
    - ``counts`` ``(B,)`` int64 for ragged outputs (PruMerge's adaptive selection): image ``b`` has
      ``counts[b]`` valid tokens, the slots after them are padding (zero tokens, position ``-1``,
      size 0). ``None`` when every image has ``M`` tokens.

    Prefix tokens (CLS, registers) come first, unchanged, with size 1.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor
    counts: torch.Tensor | None = None

    def unmerge(self, y: torch.Tensor | None = None, fill: float = 0.0) -> torch.Tensor:
        """``(B, M, C) -> (B, N, C)``: every input token gets the value of the output token holding
        it (``y`` defaults to ``tokens``); dropped tokens get ``fill``. Differentiable in ``y``."""
        y = self.tokens if y is None else y
        check_tensor("y", y, ndim=3, shape_doc="(B, M, C)")
        batch, num_out = self.positions.shape
        if y.shape[:2] != (batch, num_out):
            raise ValueError(f"y must be (B, M, C) = ({batch}, {num_out}, C), got shape {tuple(y.shape)}")
        index = self.source.clamp(min=0).unsqueeze(-1).expand(-1, -1, y.shape[-1])
        out = y.gather(1, index)
        dropped = self.source < 0
        return out.masked_fill(dropped.unsqueeze(-1), fill) if bool(dropped.any()) else out

    def without_prefix(self, prefix: int) -> "Compressed":
        """The result for the ``N - prefix`` patch tokens alone: drops the ``prefix`` leading
        tokens (e.g. the CLS token LLaVA's projector never sees) from every field."""
        num_prefix = int(prefix)
        if not 0 <= num_prefix <= min(self.positions.shape[1], self.source.shape[1]):
            raise ValueError(f"prefix must be in [0, {min(self.positions.shape[1], self.source.shape[1])}], "
                             f"got {prefix!r}")

        def shift(index):
            return torch.where(index >= 0, index - num_prefix, index)

        return Compressed(self.tokens[:, num_prefix:], shift(self.positions[:, num_prefix:]),
                          self.sizes[:, num_prefix:], shift(self.source[:, num_prefix:]),
                          None if self.counts is None else self.counts - num_prefix)
