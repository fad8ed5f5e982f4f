"""Bookkeeping shared by the patchers: replace attributes in place, remember, restore, warn.

A patch is a list of ``(owner, name, value)`` replacements (usually a per-instance method)
recorded under one *feature* name on an *anchor* module: the module whose behaviour the feature
changes as a whole (a timm VisionTransformer, a Hugging Face embeddings module). The originals
live in the anchor's ``_vtok_fast_patches`` dict, so they travel with ``copy.deepcopy`` and
never reach ``state_dict``. ``restore(root, feature)`` undoes every anchor of that feature found
in ``root.modules()``.
"""
from __future__ import annotations

import types
import warnings
from typing import Callable, Iterable

import torch.nn as nn

_REGISTRY = "_vtok_fast_patches"


def bind(fn: Callable, module: nn.Module) -> types.MethodType:
    """``fn`` as a method of this one ``module`` instance (its class is left alone)."""
    return types.MethodType(fn, module)


def is_patched(anchor: nn.Module, feature: str) -> bool:
    """True when ``feature`` is currently applied on ``anchor``."""
    return feature in anchor.__dict__.get(_REGISTRY, {})


def patch(anchor: nn.Module, feature: str, replacements: Iterable[tuple[object, str, object]]) -> bool:
    """Set each ``owner.name = value`` and record the originals under ``feature`` on ``anchor``.

    Returns False (and changes nothing) when ``feature`` is already applied on ``anchor``.
    """
    registry = anchor.__dict__.setdefault(_REGISTRY, {})
    if feature in registry:
        return False
    saved = []
    for owner, name, value in replacements:
        # An instance attribute (e.g. another library's patch) is restored as it was; a class
        # attribute is restored by deleting our instance override.
        had_own = name in owner.__dict__
        saved.append((owner, name, had_own, owner.__dict__.get(name)))
        setattr(owner, name, value)
    registry[feature] = saved
    return True


def restore(root: nn.Module, feature: str) -> int:
    """Undo ``feature`` on every anchor in ``root.modules()``; returns how many were undone."""
    undone = 0
    for module in root.modules():
        registry = module.__dict__.get(_REGISTRY)
        if not registry or feature not in registry:
            continue
        for owner, name, had_own, original in reversed(registry.pop(feature)):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        if not registry:
            del module.__dict__[_REGISTRY]
        undone += 1
    return undone


def warn_not_applied(patcher: str, model: nn.Module, reason: str) -> None:
    """The one-line warning for a model a patcher leaves untouched."""
    warnings.warn(
        f"{patcher}: not applied to {type(model).__name__} ({reason}); it keeps its original forward.",
        RuntimeWarning,
        stacklevel=4,  # warn_not_applied <- apply <- vtok_fast.patch.timm/hf <- the caller
    )
