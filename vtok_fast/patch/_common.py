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

A patch call is all or nothing: inside :func:`all_or_nothing` every :func:`patch`, :func:`restore`
and :func:`record`-ed change is journaled, and undone (newest first) if the block raises, so a
failing ``apply`` / ``hf(...)`` leaves the model as it found it (the patches of earlier calls
stay). Patches that depend on private call conventions of transformers check them with
:func:`check_api` before changing anything.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
import types
import warnings
from typing import Callable, Iterable, NamedTuple

import torch.nn as nn

_REGISTRY = "_vtok_fast_patches"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# The transformers releases the Hugging Face patchers are tested with (the one place it is stated).
TRANSFORMERS_TESTED = "5.24-5.25"
_local = threading.local()  # .journal: the undo list of the running all_or_nothing block, or None


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
    if is_patched(anchor, feature):
        return False
    saved = []
    for owner, name, value in replacements:
        # An instance attribute (e.g. another library's patch) is restored as it was; a class
        # attribute is restored by deleting our instance override.
        had_own = name in owner.__dict__
        saved.append((owner, name, had_own, owner.__dict__.get(name)))
        setattr(owner, name, value)
    anchor.__dict__.setdefault(_REGISTRY, {})[feature] = saved
    record(lambda: _undo(anchor, feature))
    return True


def restore(root: nn.Module, feature: str) -> int:
    """Undo ``feature`` on every anchor in ``root.modules()``; returns how many were undone."""
    undone = 0
    for module in list(root.modules()):
        if not is_patched(module, feature):
            continue
        saved = module.__dict__[_REGISTRY][feature]
        patched = [(owner, name, owner.__dict__.get(name)) for owner, name, _, _ in saved]
        _undo(module, feature)
        record(lambda module=module, saved=saved, patched=patched: _redo(module, feature, saved, patched))
        undone += 1
    return undone


def _undo(anchor: nn.Module, feature: str) -> None:
    registry = anchor.__dict__[_REGISTRY]
    for owner, name, had_own, original in reversed(registry.pop(feature)):
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    if not registry:
        del anchor.__dict__[_REGISTRY]


def _redo(anchor: nn.Module, feature: str, saved: list, patched: list) -> None:
    for owner, name, value in patched:
        setattr(owner, name, value)
    anchor.__dict__.setdefault(_REGISTRY, {})[feature] = saved


def record(undo: Callable[[], None]) -> None:
    """Journal ``undo`` in the running :func:`all_or_nothing` block (no-op outside one)."""
    journal = getattr(_local, "journal", None)
    if journal is not None:
        journal.append(undo)


@contextlib.contextmanager
def all_or_nothing():
    """Run the block as one change: if it raises, every :func:`patch`, :func:`restore` and
    :func:`record`-ed change made inside it is undone, newest first, and the error propagates.
    A nested block joins the outermost one."""
    if getattr(_local, "journal", None) is not None:
        yield
        return
    journal = _local.journal = []
    try:
        yield
    except BaseException:
        _local.journal = None  # the undos themselves are not journaled
        for undo in reversed(journal):
            undo()
        raise
    finally:
        _local.journal = None


def replaced_by(root: nn.Module, owner: object, name: str) -> str | None:
    """The feature that replaced ``owner.name``, if its anchor is in ``root.modules()``, else None."""
    for module in root.modules():
        for feature, saved in module.__dict__.get(_REGISTRY, {}).items():
            if any(o is owner and n == name for o, n, _, _ in saved):
                return feature
    return None


def holds(model: nn.Module, classes: tuple[type, ...]) -> bool:
    """True when some module of ``model`` (itself included) is an instance of ``classes``."""
    return any(isinstance(m, classes) for m in model.modules())


class Api(NamedTuple):
    """A call convention of another library a patch relies on: ``owner.attribute`` exists and
    its signature names ``parameters`` (``positional``: as its first parameters after ``self``, in
    this order, because the patch passes them by position)."""

    owner: object
    attribute: str
    parameters: tuple[str, ...] = ()
    positional: bool = False


def _parameters(fn) -> list[str] | None:
    """Parameter names of ``fn`` (``self`` of a plain class function included), or None when it
    cannot be read."""
    if isinstance(fn, nn.Module):  # transformers' hub-kernel wrappers of functions
        fn = fn.forward
    try:
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return None


def check_api(patcher: str, apis: Iterable[Api]) -> None:
    """Raise one ValueError when the installed transformers lacks any of ``apis``, naming its
    version, the tested range :data:`TRANSFORMERS_TESTED` and every difference."""
    problems = []
    for api in apis:
        label = f"{getattr(api.owner, '__name__', type(api.owner).__name__)}.{api.attribute}"
        if not hasattr(api.owner, api.attribute):
            problems.append(f"{label} does not exist")
            continue
        names = _parameters(getattr(api.owner, api.attribute)) if api.parameters else None
        if names is None:
            continue
        if isinstance(api.owner, type) and names[:1] == ["self"]:
            names = names[1:]
        if api.positional and names[:len(api.parameters)] != list(api.parameters):
            problems.append(f"{label} takes ({', '.join(names)}), not ({', '.join(api.parameters)}, ...) first")
        missing = [p for p in api.parameters if p not in names]
        if missing and not api.positional:
            problems.append(f"{label} takes no {', '.join(missing)}")
    if problems:
        import transformers

        raise ValueError(f"{patcher}: transformers {transformers.__version__} is installed, but this patch follows "
                         f"transformers {TRANSFORMERS_TESTED} (tested): {'; '.join(problems)}; nothing was patched")


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


def capture_forward(module: nn.Module, run: dict, name: str, x, *, rows: int | None = None):
    """Patched ``forward`` of a module whose output a patcher reads (the ``q_proj`` / ``k_proj``
    of a scoring layer): the class's ``forward``; while ``run["capture"]`` is a dict (set by the
    patched forward around it), the output is kept there under ``name``: whole, or with ``rows``
    its first ``rows`` tokens only (a copy). Bind the leading arguments with ``functools.partial``."""
    y = type(module).forward(module, x)
    capture = run.get("capture")
    if capture is not None:
        capture[name] = y if rows is None else y[:, :rows].clone()
    return y


def patch_every(model: nn.Module, feature: str, patcher: str, kinds, *, missing: str,
                missing_ok: bool = False) -> nn.Module:
    """Patch every module inside ``model`` that is an instance of one of ``kinds``.

    ``kinds``: ``(class, plan)`` pairs; ``plan(module, cls)`` returns the ``patch`` replacements,
    or a string saying why that module cannot be fused (it keeps its forward and gets one warning
    line); a plan that raises (e.g. :func:`check_api`) leaves every module of this call unpatched.
    Modules already carrying ``feature`` are skipped. ``missing`` is the warning when
    ``model`` holds none of ``kinds``, unless ``missing_ok``.
    """
    found = False
    with all_or_nothing():  # a plan may raise (check_api): then no module stays patched
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
