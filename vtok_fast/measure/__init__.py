"""Measurement: token budgets (``budget``), quality metrics (``metrics``), the ToMe merge map
(``viz``) and ``vtok-fast demo`` (``demo``, ``budget_cli``).

Every submodule is an attribute of this package, imported on first access, so
``import vtok_fast; vtok_fast.measure.viz.merge_map(...)`` works without importing them all.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil

__all__ = ["budget", "budget_cli", "demo", "metrics", "viz"]


def __getattr__(name: str):
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it on this package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {m.name for m in pkgutil.iter_modules(__path__)})
