"""The family adapters, keyed by ``config.model_type``: :data:`FAMILIES` and :func:`find`.

A new family costs one adapter module here (a :class:`~vtok_fast.patch.families.base.Family`:
where its image features come out and how they split into per-tile / per-image grids) and its
tests; the engine (:mod:`vtok_fast.patch.hf_family_compress`) is shared.
"""
from __future__ import annotations

import torch.nn as nn

from vtok_fast.patch.families.base import Family, Units
from vtok_fast.patch.families.gemma3 import GEMMA3
from vtok_fast.patch.families.idefics3 import IDEFICS3, SMOLVLM
from vtok_fast.patch.families.internvl import INTERNVL
from vtok_fast.patch.families.llava_next import LLAVA_NEXT, LLAVA_ONEVISION
from vtok_fast.patch.families.qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_VL

_ALL = (LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, INTERNVL, GEMMA3, IDEFICS3, SMOLVLM)
FAMILIES: dict[str, Family] = {model_type: family for family in _ALL for model_type in family.model_types}

__all__ = ["FAMILIES", "Family", "Units", "find", "model_type"]


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` (None without a config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def find(model: nn.Module) -> tuple[Family, nn.Module] | None:
    """``(family, inner)`` for a model of a family in :data:`FAMILIES` (``inner``: the model
    holding the tower and the language model: ``model`` itself or ``model.model``); None for any
    other model."""
    family = FAMILIES.get(model_type(model))
    if family is None:
        return None
    cls = family.inner_class()
    found = [m for m in model.modules() if isinstance(m, cls)]
    if len(found) != 1:
        raise ValueError(f"a {family.name} model ({type(model).__name__}) must hold one {cls.__name__}, it holds "
                         f"{len(found)}")
    return family, found[0]
