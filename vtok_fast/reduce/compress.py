"""``compress(tokens, method, *, grid=None, prefix=0, **budget) -> Compressed``: one entry point
over every reducer.

``tokens`` is ``(B, prefix + h·w, D)``: ``prefix`` leading tokens (CLS, registers) that every
method keeps first, unchanged, then the patch tokens row-major. ``grid=(h, w)`` is needed only by
the grid methods (``pool``, ``pixel_shuffle``); when it is None they infer a square grid (and the
error names the token count when there is none). The other methods only check a given grid. ``budget`` holds the method's own arguments, in
its own terms:

==================  ==========================================================================
``pool``            ``stride=2, mode="avg" | "max" | "bilinear", ceil_mode=False``
``pixel_shuffle``   ``stride=2``
``tome``            ``keep=`` | ``r=`` | ``ratio=``, ``metric=``
``attn_topk``       ``keep=`` | ``ratio=``, ``queries=, keys=`` | ``scores=``, ``scale=``
``visionzip``       ``dominant=, contextual=``, attention inputs, ``metric=``
``prumerge``        nothing (adaptive IQR) | ``keep=`` | ``ratio=``, attention inputs, ``metric=``,
                    ``neighbours=32``
``prumerge_plus``   as ``prumerge``
``dart``            ``keep=`` | ``ratio=``, ``pivots=4``, ``keys=`` (pivots by key L1 norm),
                    ``metric=`` (cosine; default the tokens); no attention map needed
==================  ==========================================================================

Every method is also a plain function of the same name in ``vtok_fast``; see each one for its
exact semantics and :class:`~vtok_fast.reduce.compressed.Compressed` for the result.
"""
from __future__ import annotations

import inspect

import torch

from vtok_fast.reduce._common import check_tokens, resolve_grid
from vtok_fast.reduce.compressed import Compressed
from vtok_fast.reduce.dart import dart
from vtok_fast.reduce.merge import tome
from vtok_fast.reduce.pool import pixel_shuffle, pool
from vtok_fast.reduce.prumerge import prumerge, prumerge_plus
from vtok_fast.reduce.select import attn_topk, visionzip

METHODS = {
    "pool": pool,
    "pixel_shuffle": pixel_shuffle,
    "tome": tome,
    "attn_topk": attn_topk,
    "visionzip": visionzip,
    "prumerge": prumerge,
    "prumerge_plus": prumerge_plus,
    "dart": dart,
}
GRID_METHODS = ("pool", "pixel_shuffle")


def compress(tokens: torch.Tensor, method: str, *, grid=None, prefix: int = 0, **budget) -> Compressed:
    """Reduce ``tokens`` ``(B, prefix + h·w, D)`` with ``method`` (a name in ``METHODS``) and its
    ``budget`` arguments; see the module docstring."""
    reducer = METHODS.get(method) if isinstance(method, str) else None
    if reducer is None:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    _check_budget(method, reducer, budget)
    if method in GRID_METHODS:
        return reducer(tokens, grid=grid, prefix=prefix, **budget)
    if grid is not None:  # not read by this method, but it must describe the tokens
        resolve_grid(check_tokens(tokens, prefix)[2], grid, prefix)
    return reducer(tokens, prefix=prefix, **budget)


def _check_budget(method: str, reducer, budget: dict) -> None:
    """A TypeError naming ``method``, the budget arguments it takes and what is wrong, for an
    unknown or missing budget argument (before any work)."""
    parameters = inspect.signature(reducer).parameters
    options = [name for name in parameters if name not in ("tokens", "grid", "prefix")]
    unknown = sorted(set(budget) - set(options))
    missing = [name for name in options if name not in budget
               and parameters[name].default is inspect.Parameter.empty]
    if unknown or missing:
        wrong = "; ".join(filter(None, [unknown and f"unknown {', '.join(unknown)}",
                                        missing and f"missing {', '.join(missing)}"]))
        raise TypeError(f"compress(method={method!r}) takes the budget arguments {', '.join(options)}; "
                        f"got {sorted(budget)} ({wrong})")
