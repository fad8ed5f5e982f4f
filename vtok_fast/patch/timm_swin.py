"""Fused patch merging for timm's Swin Transformer (``timm.models.swin_transformer``).

``apply(model)`` replaces the ``forward`` of every ``PatchMerging`` instance inside ``model``
(stages 2-4 of ``swin_*`` models) with one ``merge_project`` call: the 2x2 windows are gathered
in timm's order (0,0), (1,0), (0,1), (1,1) — timm >= 1.0 writes it as
``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)`` — normalized over 4C on the load and
multiplied by ``reduction`` (no bias); odd sides are zero-padded first, as timm does. The module
keeps its parameters and ``state_dict``; ``remove(model)`` restores the original forward.
Swin V2's ``PatchMerging`` (norm after the reduction) is a different module and is left alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vtok_fast.patch._common import bind, holds, overridden, patch_every, restore
from vtok_fast.project.modules import norm_args, swin_merge

FEATURE = "timm_swin"
_PATCHER = "vtok_fast.patch.timm fused Swin patch merging"
MISSING = "no timm swin_transformer.PatchMerging inside"


def finds(model: nn.Module) -> bool:
    """Whether ``model`` holds a ``PatchMerging`` this patcher targets."""
    from timm.models.swin_transformer import PatchMerging

    return holds(model, (PatchMerging,))


def apply(model: nn.Module, *, missing_ok: bool = False) -> nn.Module:
    """Fuse every timm Swin ``PatchMerging`` inside ``model``; warn about any left unfused and,
    unless ``missing_ok``, when there is none."""
    from timm.models.swin_transformer import PatchMerging

    return patch_every(model, FEATURE, _PATCHER, [(PatchMerging, _plan)], missing_ok=missing_ok, missing=MISSING)


def remove(model: nn.Module) -> nn.Module:
    """Restore every ``PatchMerging`` this feature patched inside ``model`` (no-op if none)."""
    restore(model, FEATURE)
    return model


def _plan(module: nn.Module, cls):
    """The forward replacement, or why this ``PatchMerging`` cannot be fused."""
    reason = overridden(module, cls)
    if reason:
        return reason
    args = norm_args(module.norm)
    if args is None or args["norm_type"] != "layernorm":
        return f"norm is {type(module.norm).__name__}, not nn.LayerNorm"
    if type(module.reduction) is not nn.Linear:
        return f"reduction is {type(module.reduction).__name__}, not nn.Linear"
    return [(module, "forward", bind(_fused_forward, module))]


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Patched ``PatchMerging.forward``: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), out_dim)``."""
    return swin_merge(x, self.norm, self.reduction)
