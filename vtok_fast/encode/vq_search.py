"""Search step of a ``VectorQuantizer`` (``layer`` below): which code each row gets, and those codes.

The nearest-code search is ``codebook_search`` (no N x K matrix) in the layer's ``search_dtype``, with
autocast off; a stochastic training step draws codes instead (``gumbel_sample_codes``, torch's global
generator). Nothing here changes the layer.
"""
from __future__ import annotations

import torch
from torch import nn

from vtok_fast.encode._vq_common import gumbel_sample_codes
from vtok_fast.encode.codebook_search import codebook_search


def search(layer: nn.Module, z: torch.Tensor, codebook: torch.Tensor, **search_kwargs):
    """``codebook_search(z, codebook)`` with the layer's metric, both detached and cast to
    ``search_dtype`` (None: ``z``'s dtype), autocast off; ``search_kwargs``: ``k``,
    ``return_distances``."""
    dtype = layer.search_dtype or z.dtype
    with torch.autocast(device_type=z.device.type, enabled=False):
        return codebook_search(z.detach().to(dtype), codebook.detach().to(dtype), metric=layer.metric,
                               **search_kwargs)


def pick_codes(layer: nn.Module, z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Int64 codes ``(books, rows)`` of the rows ``z`` ``(books, rows, d)`` in their book's codebook:
    the nearest ones, or in a training step of a ``stochastic_sample_codes`` layer with
    ``temperature > 0``, codes drawn with ``softmax(logits / temperature)``."""
    if layer.training and layer.stochastic_sample_codes and temperature > 0:
        return torch.stack([gumbel_sample_codes(z[b], layer.embed[b], layer.metric, temperature)
                            for b in range(z.shape[0])])
    return torch.stack([search(layer, z[b], layer.embed[b]) for b in range(z.shape[0])])


def lookup(layer: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of ``idx`` ``(books, rows)`` as they are now (before this step's update), twice:
    ``live`` ``(books, rows, d)``, in the autograd graph of a learnable codebook, and ``codes``, the
    same values detached."""
    embed = layer.embed if layer.learnable_codebook else layer.embed.detach()
    live = torch.stack([embed[b][idx[b]] for b in range(idx.shape[0])])
    return live, live.detach()
