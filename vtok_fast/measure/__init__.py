"""Measurement: token budgets (``budget``), quality metrics (``metrics``), the ToMe merge map
(``viz``), ``vtok-fast demo`` (``demo``, ``budget_cli``), and answer accuracy under compression
(``quality``: the reference VLM, its dataset and the curves; ``evaluate``, the function behind
``vtok-fast eval``).

Every submodule is an attribute of this package, imported on first access, so
``import vtok_fast; vtok_fast.measure.viz.merge_map(...)`` works without importing them all;
``vtok_fast.measure.evaluate`` is ``vtok_fast.measure.quality.evaluate.evaluate``.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil

__all__ = ["budget", "budget_cli", "demo", "evaluate", "metrics", "quality", "viz"]
_FUNCTIONS = {"evaluate": ("quality.evaluate", "evaluate")}


def __getattr__(name: str):
    if name in _FUNCTIONS:
        module, attr = _FUNCTIONS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it on this package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FUNCTIONS) | {m.name for m in pkgutil.iter_modules(__path__)})
