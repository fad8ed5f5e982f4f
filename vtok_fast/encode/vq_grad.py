"""Gradient-estimator step of a ``VectorQuantizer`` (``layer`` below): the quantized rows, with the
value of the codes and the gradient path the layer's ``gradient`` chooses (the estimators themselves
are in ``_vq_common``)."""
from __future__ import annotations

import torch
from torch import nn

from vtok_fast.encode._vq_common import directional_reparam, rotation_trick, straight_through

GRADIENTS = ("ste", "rotation", "diveq", "none")


def estimate(layer: nn.Module, zf: torch.Tensor, live: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Quantized rows ``(books, rows, d)`` for fp32 rows ``zf`` and their codes (``live``: in the
    autograd graph of a learnable codebook; ``codes``: detached). When gradients are on, ``zf``
    requires them and the layer trains (or ``eval_gradient``): ``"ste"`` (straight-through),
    ``"rotation"`` (rotation trick) or ``"diveq"`` (directional reparameterization, noise from
    torch's global generator); otherwise, and for ``"none"``, ``live`` itself (no gradient to ``zf``)."""
    estimating = torch.is_grad_enabled() and zf.requires_grad and (layer.training or layer.eval_gradient)
    if estimating and layer.gradient == "ste":
        return straight_through(zf, codes)
    if estimating and layer.gradient == "rotation":
        return rotation_trick(zf, codes)
    if estimating and layer.gradient == "diveq":
        return directional_reparam(zf, live, layer.diveq_variance)
    return live
