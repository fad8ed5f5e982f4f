"""Argument validation with messages that name the argument, what was expected and what came."""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape_doc: str | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of the given rank(s) and dtype(s); return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in ranks:
            want = shape_doc or " or ".join(f"{r}-D" for r in ranks)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in ({_fmt_dtypes(dtypes)}), got {value.dtype}")
    return value


def _first_mismatch(attr: str, tensors: dict):
    """``(name, tensor, first_name, first)`` of the first tensor whose ``attr`` differs from the
    first tensor's (non-tensors such as None are skipped), else None."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    for name, t in items[1:]:
        if getattr(t, attr) != getattr(items[0][1], attr):
            return name, t, *items[0]
    return None


def check_same_device(**tensors) -> None:
    """All non-None tensors live on one device."""
    bad = _first_mismatch("device", tensors)
    if bad:
        name, t, first_name, first = bad
        raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                         "move them to one device")


def check_same_dtype(**tensors) -> None:
    """All non-None tensors have one dtype."""
    bad = _first_mismatch("dtype", tensors)
    if bad:
        name, t, first_name, first = bad
        raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def check_dense(name: str, value: torch.Tensor) -> None:
    """``value`` is an ordinary dense (strided, non-nested) tensor."""
    if value.is_nested or value.layout != torch.strided:
        kind = "nested" if value.is_nested else str(value.layout).replace("torch.", "")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")


def check_int(name: str, value, low: int, high: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``[low, high]``; the error names the bound and what it counts.
    A bool is not an int here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} is larger than {what or high} ({high})")
    return value


def check_choice(name: str, value, choices: tuple):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_positive_real(name: str, value) -> float:
    """``value`` as a float in ``(0, inf)``: TypeError for a non-number (bools included),
    ValueError for zero, a negative number, inf or NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a number in (0, inf), got {value!r}")
    return float(value)


def square_side(tokens: int, what: str) -> int:
    """The side ``g`` of ``tokens = g * g`` (a square grid of tokens), else a ValueError naming
    ``what``."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{what} must hold a square grid of tokens, got {tokens}")
    return side


def check_bias(name: str, bias, weight: torch.Tensor) -> torch.Tensor:
    """A conv's or Linear's ``bias``: ``(D,)`` with ``D = weight.shape[0]``, in the weight's dtype."""
    D = weight.shape[0]
    check_tensor(name, bias, ndim=1, shape_doc=f"(D,) with D={D}")
    if bias.shape[0] != D:
        raise ValueError(f"{name} must be (D,) with D={D}, got shape {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{name} must have the weight's dtype {weight.dtype}, got {bias.dtype}")
    return bias


def token_table(name: str, value, weight: torch.Tensor, *, rows: int | None = None, shape_doc: str | None = None,
                one_row: bool = False, rows_doc: str = "") -> torch.Tensor:
    """A table of token rows ``D = weight.shape[0]`` wide (a position table, prefix tokens) given
    as ``(L, D)`` or ``(1, L, D)`` (with ``one_row``, also ``(D,)``: a single row), as a 2-D view;
    ``rows``: the number of rows it must have (None: any), ``rows_doc`` says why. Its dtype must
    be the weight's. Messages name the shape the caller passed (``shape_doc``, default the
    accepted forms)."""
    width = weight.shape[0]
    if shape_doc is None:
        shape_doc = "(L, D), (1, L, D) or (D,)" if one_row else "(L, D) or (1, L, D)"
    t = check_tensor(name, value, ndim=(1, 2, 3) if one_row else (2, 3), shape_doc=shape_doc)
    shape = tuple(value.shape)
    if t.dim() == 3:
        if t.shape[0] != 1:
            raise ValueError(f"{name} must be {shape_doc}, got shape {shape}")
        t = t.squeeze(0)  # a view whose backward is a view too (indexing would scatter)
    elif t.dim() == 1:
        t = t.unsqueeze(0)
    if t.shape[1] != width:
        raise ValueError(f"{name} must have width D={width} (weight.shape[0]), got shape {shape}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows{rows_doc}, got shape {shape}")
    if t.dtype != weight.dtype:
        raise TypeError(f"{name} must have the weight's dtype {weight.dtype}, got {t.dtype} "
                        "(cast it, e.g. with .to(weight.dtype))")
    return t
