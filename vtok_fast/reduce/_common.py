"""Validation and index bookkeeping shared by the reducers (``vtok_fast/reduce/*.py``)."""
from __future__ import annotations

import math
import numbers

import torch

from vtok_fast._checks import FLOAT_DTYPES, check_int, check_same_device, check_tensor
from vtok_fast.reduce.attention_scores import attention_scores
from vtok_fast.reduce.compressed import Compressed


def check_tokens(tokens, prefix) -> tuple[int, int, int]:
    """Validate ``tokens`` ``(B, prefix + n, D)`` and ``prefix``; return ``(B, N, n)``."""
    check_tensor("tokens", tokens, ndim=3, dtypes=FLOAT_DTYPES, shape_doc="(B, prefix + h*w, D)")
    batch, num_tokens, _ = tokens.shape
    if isinstance(prefix, bool) or not isinstance(prefix, numbers.Integral) or not 0 <= prefix <= num_tokens:
        raise ValueError(f"prefix must be an int in [0, N = {num_tokens}] (leading tokens kept as they "
                         f"are), got {prefix!r}")
    return batch, num_tokens, num_tokens - int(prefix)


def resolve_grid(num_patches: int, grid, prefix: int) -> tuple[int, int]:
    """``(h, w)`` of the patch tokens: ``grid`` checked against their count, or the square root of
    the count when ``grid`` is None."""
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"tokens has {num_patches} patch tokens (N - prefix, prefix = {prefix}), which is "
                             "not a square number: pass grid=(h, w)")
        return side, side
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (h, w), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h * w != num_patches:
        raise ValueError(f"grid={grid!r} holds {h * w} tokens, but tokens has {num_patches} patch tokens "
                         f"(N - prefix, prefix = {prefix})")
    return h, w


def resolve_keep(keep, ratio, num_patches: int, *, low: int = 0, extra: dict | None = None) -> int:
    """The number of patch tokens to keep from exactly one of ``keep`` (a count), ``ratio`` (the
    kept fraction, ``round(ratio * n)``) or the ``extra`` budgets already converted to a count."""
    given = {"keep": keep, "ratio": ratio, **(extra or {})}
    named = [k for k, v in given.items() if v is not None]
    if len(named) != 1:
        raise TypeError(f"pass exactly one budget of {', '.join(k + '=' for k in given)}; got "
                        f"{', '.join(named) or 'none'}")
    what = f"the {num_patches} patch tokens (N - prefix)"
    if keep is not None:
        return check_int("keep", keep, low, num_patches, what)
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a fraction of tokens kept in (0, 1], got {ratio!r}")
        return max(low, round(num_patches * float(ratio)))
    return given[named[0]]


def patch_scores(tokens, prefix: int, queries, keys, scores, scale) -> torch.Tensor:
    """``(B, n)`` fp32 attention received by each patch token: ``scores[:, prefix:]`` when given,
    else :func:`attention_scores` of ``queries`` over ``keys`` (all ``N`` keys, prefix included)."""
    batch, num_tokens, _ = tokens.shape
    if scores is not None:
        if queries is not None or scale is not None:
            raise TypeError("pass either scores= or queries= and keys= (with scale=), not both")
        check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, shape_doc="(B, N)")
        check_same_device(tokens=tokens, scores=scores)
        if tuple(scores.shape) != (batch, num_tokens):
            raise ValueError(f"scores must be (B, N) = ({batch}, {num_tokens}) like tokens, got shape "
                             f"{tuple(scores.shape)}")
        return scores[:, prefix:].float()
    if queries is None or keys is None:
        raise TypeError("the attention inputs are missing: pass queries= (B, heads, Q, d) and keys= "
                        "(B, heads, N, d), or scores= (B, N)")
    check_keys(tokens, keys)
    check_same_device(tokens=tokens, queries=queries)
    return attention_scores(queries, keys, scale)[:, prefix:]


def check_keys(tokens, keys) -> None:
    check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(B, heads, N, d)")
    check_same_device(tokens=tokens, keys=keys)
    if keys.shape[0] != tokens.shape[0] or keys.shape[2] != tokens.shape[1]:
        raise ValueError(f"keys (B, heads, N, d) = {tuple(keys.shape)} must have tokens' B = {tokens.shape[0]} "
                         f"and N = {tokens.shape[1]}")


def check_metric(tokens, metric, prefix: int) -> torch.Tensor:
    """``metric`` ``(B, N, C)`` (one similarity vector per token) -> its patch rows ``(B, n, C)``."""
    check_tensor("metric", metric, ndim=3, dtypes=FLOAT_DTYPES, shape_doc="(B, N, C)")
    check_same_device(tokens=tokens, metric=metric)
    if metric.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"metric must be (B, N, C) with tokens' (B, N) = {tuple(tokens.shape[:2])}, got "
                         f"shape {tuple(metric.shape)}")
    return metric[:, prefix:]


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)`` indices of the highest scores in ascending index order; ties go to the
    lower index and NaN ranks last."""
    order = scores.nan_to_num(nan=-math.inf).argsort(dim=1, descending=True, stable=True)
    return order[:, :count].sort(dim=1).values


def arange_rows(batch: int, count: int, device) -> torch.Tensor:
    return torch.arange(count, device=device).expand(batch, count)


def kept(tokens: torch.Tensor, prefix: int, index: torch.Tensor) -> Compressed:
    """Prefix tokens plus the patch tokens at ``index`` ``(B, k)`` (patch-relative, sorted): a
    pruning result, every other token dropped."""
    batch, num_tokens, dim = tokens.shape
    device = tokens.device
    positions = torch.cat([arange_rows(batch, prefix, device), index + prefix], dim=1)
    num_out = positions.shape[1]
    out = tokens.gather(1, positions.unsqueeze(-1).expand(batch, num_out, dim))
    source = torch.full((batch, num_tokens), -1, dtype=torch.int64, device=device)
    source.scatter_(1, positions, arange_rows(batch, num_out, device))
    sizes = torch.ones(batch, num_out, dtype=torch.int64, device=device)
    return Compressed(out, positions, sizes, source)


def sizes_from_source(source: torch.Tensor, num_out: int) -> torch.Tensor:
    """``(B, M)`` int64: input tokens held by each output (dropped tokens, ``-1``, count nowhere)."""
    batch = source.shape[0]
    held = source >= 0
    sizes = torch.zeros(batch, num_out + 1, dtype=torch.int64, device=source.device)
    sizes.scatter_add_(1, torch.where(held, source, num_out), held.long())
    return sizes[:, :num_out]


def similarity_rows(tokens, metric, keys, prefix: int, from_keys, method: str, purpose: str) -> torch.Tensor:
    """The patch rows ``(B, n, C)`` of the similarity a reducer compares tokens by: ``metric``
    ``(B, N, C)`` when given, else ``from_keys(keys)`` (``keys`` ``(B, heads, N, d)`` -> ``(B, N, C)``);
    neither given raises a TypeError saying that ``method`` needs one of them for ``purpose``."""
    if metric is not None:
        return check_metric(tokens, metric, prefix)
    if keys is None:
        raise TypeError(f"{method} needs metric= (B, N, C) or keys= (B, heads, N, d) {purpose}")
    check_keys(tokens, keys)
    return from_keys(keys)[:, prefix:]
