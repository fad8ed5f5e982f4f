"""Loss step of a ``VectorQuantizer`` (``layer`` below): the commitment and codebook terms of a batch
of rows and their codes, and the codebook orthogonality term.

The loss is ``commitment_weight * commitment + codebook + orthogonal_reg_weight * orthogonal_reg``
(the terms as ``LossBreakdown`` names them), computed in training and, with ``eval_loss``, in eval
(otherwise a constant 0). A learnable codebook gets gradients from ``codebook_loss``'s terms unless
the step is frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from vtok_fast.encode._vq_common import LossBreakdown, _mse, orthogonal_loss

CODEBOOK_LOSSES = ("separate", "joint")


def loss_on(layer: nn.Module) -> bool:
    """Whether this step has a loss (training, or eval with ``eval_loss``)."""
    return layer.training or layer.eval_loss


def quantization_loss(layer: nn.Module, zf: torch.Tensor, live: torch.Tensor, codes: torch.Tensor,
                      freeze: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, commitment, codebook)`` of fp32 rows ``zf`` and their codes (``live``: in the
    autograd graph of a learnable codebook; ``codes``: detached), all ``(books, rows, d)``.
    ``commitment`` is ``mse(sg[q], z)``; a learnable, unfrozen codebook adds ``codebook =
    mse(q, sg[z])`` (``codebook_loss="separate"``) or makes the commitment ``mse(q, z)`` with
    gradients to both (``"joint"``; ``codebook`` 0). Constant zeros when ``loss_on`` is False."""
    if not loss_on(layer):
        zero = torch.zeros((), device=zf.device)
        return zero, zero, zero
    to_codebook = layer.learnable_codebook and not freeze
    zero = zf.new_zeros(())
    if to_codebook and layer.codebook_loss == "joint":
        commitment, codebook_term = _mse(live, zf), zero
    else:
        commitment = _mse(codes, zf)
        codebook_term = _mse(live, zf.detach()) if to_codebook else zero
    return layer.commitment_weight * commitment + codebook_term, commitment, codebook_term


def orthogonal_term(layer: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """``orthogonal_loss`` of the codebook as it is now (after this step's update), over this batch's
    codes ``idx`` only (``orthogonal_reg_active_codes_only``) and at most ``orthogonal_reg_max_codes``
    codes drawn with torch's global generator."""
    codes = layer.embed
    if layer.orthogonal_reg_active_codes_only:
        codes = codes[:, torch.unique(idx)]
    n = codes.shape[1]
    if layer.orthogonal_reg_max_codes is not None and n > layer.orthogonal_reg_max_codes:
        codes = codes[:, torch.randperm(n, device=codes.device)[:layer.orthogonal_reg_max_codes]]
    return orthogonal_loss(codes)


def total_loss(layer: nn.Module, loss: torch.Tensor, commitment: torch.Tensor, codebook: torch.Tensor,
               idx: torch.Tensor) -> tuple[torch.Tensor, LossBreakdown]:
    """``loss`` (from ``quantization_loss``) plus the weighted orthogonality term when it is on
    (``orthogonal_reg_weight > 0`` and ``loss_on``), and the ``LossBreakdown`` of the three terms."""
    ortho = loss.new_zeros(())
    if layer.orthogonal_reg_weight > 0 and loss_on(layer):
        ortho = orthogonal_term(layer, idx)
        loss = loss + layer.orthogonal_reg_weight * ortho
    return loss, LossBreakdown(commitment, codebook, ortho)
