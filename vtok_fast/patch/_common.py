"""Bookkeeping shared by the patchers: replace attributes in place, remember, restore, warn.

A patch is a list of ``(owner, name, value)`` replacements (usually a per-instance method)
recorded under one *feature* name on an *anchor* module: the module whose behaviour the feature
changes as a whole (a timm VisionTransformer, a Hugging Face embeddings module). The originals
live in the anchor's ``_vtok_fast_patches`` dict, so they travel with ``copy.deepcopy`` and
never reach ``state_dict``. ``restore(root, feature)`` undoes every anchor of that feature found
in ``root.modules()``.

Every patcher module is a pair: ``apply(model, ...)`` builds its replacements and calls
:func:`patch` (or :func:`patch_every` for "each module of these classes"), and
``remove(model)`` is ``restore(model, FEATURE)``; ``vtok_fast.patch.unpatch`` calls every
``remove``. So the tails of the ``apply`` functions and the ``remove`` functions are alike on
purpose.
"""
from __future__ import annotations

import os
import sys
import types
import warnings
from typing import Callable, Iterable

import torch.nn as nn

_REGISTRY = "_vtok_fast_patches"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


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


def _outside_stacklevel() -> int:
    """The ``stacklevel`` (counted from the caller of this function) of the first frame outside
    the vtok_fast package: the user's call, however many patcher layers lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def warn_not_applied(patcher: str, model: nn.Module, reason: str) -> None:
    """The one-line warning for a model a patcher leaves untouched, attributed to the user's call."""
    warnings.warn(
        f"{patcher}: not applied to {type(model).__name__} ({reason}); it keeps its original forward.",
        RuntimeWarning,
        stacklevel=_outside_stacklevel(),
    )


def overridden(module: nn.Module, cls: type, method: str = "forward") -> str | None:
    """Why ``module.method`` is not ``cls``'s own (a subclass override or another patch), else None."""
    if getattr(type(module), method) is not getattr(cls, method):
        return f"{type(module).__name__} overrides {method}"
    if method in module.__dict__:
        return f"{method} is already replaced by another patch"
    return None


def patch_every(model: nn.Module, feature: str, patcher: str, kinds, *, missing: str,
                missing_ok: bool = False) -> nn.Module:
    """Patch every module inside ``model`` that is an instance of one of ``kinds``.

    ``kinds``: ``(class, plan)`` pairs; ``plan(module, cls)`` returns the ``patch`` replacements,
    or a string saying why that module cannot be fused (it keeps its forward and gets one warning
    line). Modules already carrying ``feature`` are skipped. ``missing`` is the warning when
    ``model`` holds none of ``kinds``, unless ``missing_ok``.
    """
    found = False
    for name, module in model.named_modules():
        kind = next(((cls, plan) for cls, plan in kinds if isinstance(module, cls)), None)
        if kind is None:
            continue
        found = True
        if is_patched(module, feature):
            continue
        cls, plan = kind
        replacements = plan(module, cls)
        if isinstance(replacements, str):
            warn_not_applied(patcher, model, f"{name or 'the model'}: {replacements}")
            continue
        patch(module, feature, replacements)
    if not found and not missing_ok:
        warn_not_applied(patcher, model, missing)
    return model
