"""The Linear GEMM of the PyTorch paths on the CPU: torch's or oneDNN's, whichever is faster here.

``torch.addmm`` runs MKL on x86, which takes a slower path on AMD CPUs; oneDNN (inside every x86
torch build, ``torch.ops.mkldnn._linear_pointwise``) does not. Measured on a 2-core AMD EPYC
(Zen 4), fp32, plain (unpacked) weights, calls alternated: 256 x 5120 -> 5120 in 82-93 ms by
``addmm`` and 61 ms by oneDNN; 256 x 4608 -> 28672 in 450-470 ms and 300-314 ms. Neither is
assumed: :func:`linear` times both once per shape class and process, on operands of the call's
layouts with at most PROBE_COLUMNS weight rows, and keeps the faster (Intel CPUs may keep MKL).
Autograd-free: the callers are custom ops' implementations, whose backward is their own.
"""
from __future__ import annotations

import time

import torch

_CHOICE: dict[tuple, str] = {}  # shape class -> "torch" | "onednn"
MEASURE_FLOP = 1 << 24  # smaller GEMMs (about 0.1 ms) always run torch's: call overhead dominates
PROBE_COLUMNS = 1024    # the measurement multiplies by at most this many weight rows
_MEASURE_WARMUP, _MEASURE_RUNS = 2, 4
FORCE: str | None = None  # tests: "torch" or "onednn" for every call


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()


def _torch(x, weight, bias):
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def _onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_RUNS = {"torch": _torch, "onednn": _onednn}


def _layout(t: torch.Tensor) -> str | None:
    """``"row"`` (row-major, dense), ``"col"`` (a dense matrix's transpose) or None (any other
    strides)."""
    rows, cols = t.shape
    if t.stride(1) == 1 and t.stride(0) == cols:
        return "row"
    if t.stride(0) == 1 and t.stride(1) == rows:
        return "col"
    return None


def _dense(rows: int, cols: int, layout: str) -> torch.Tensor:
    return torch.randn(rows, cols) if layout == "row" else torch.randn(cols, rows).t()


def _measure(x, weight, bias, layouts) -> str:
    """The faster provider on fresh operands of ``x``'s and ``weight``'s shapes and layouts, with
    at most PROBE_COLUMNS weight rows: alternating calls, the fastest of _MEASURE_RUNS each after
    _MEASURE_WARMUP untimed ones (the machine's speed drifts). Fresh, because a slice of a
    transposed weight is neither layout (oneDNN ran such a 256 x 5120 x 1024 product in 20 s)."""
    n = min(weight.shape[0], PROBE_COLUMNS)
    xp, wp = _dense(*x.shape, layouts[0]), _dense(n, weight.shape[1], layouts[1])
    bp = None if bias is None else torch.randn(n)
    best = dict.fromkeys(_RUNS, float("inf"))
    for step in range(_MEASURE_WARMUP + _MEASURE_RUNS):
        for name, run in _RUNS.items():
            t0 = time.perf_counter()
            run(xp, wp, bp)
            if step >= _MEASURE_WARMUP:
                best[name] = min(best[name], time.perf_counter() - t0)
    return "onednn" if best["onednn"] < best["torch"] else "torch"


def choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The provider :func:`linear` runs for these operands (measuring it if it is the shape
    class's first call). oneDNN only gets fp32 CPU operands, each dense row-major or a dense
    matrix's transpose (``x``: ``dz.t()``, ``weight``: ``W.t()`` in a backward), ``K >= 1`` and
    at least MEASURE_FLOP."""
    M, K = x.shape
    N = weight.shape[0]
    layouts = (_layout(x), _layout(weight))
    usable = (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and K > 0
              and (bias is None or bias.dtype == torch.float32) and None not in layouts)
    if not usable:
        return "torch"
    if FORCE:
        return FORCE
    if 2 * M * K * N < MEASURE_FLOP:
        return "torch"
    key = (M.bit_length(), K.bit_length(), N.bit_length(), bias is not None, *layouts)
    if key not in _CHOICE:
        _CHOICE[key] = _measure(x, weight, bias, layouts)
    return _CHOICE[key]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``: ``x`` ``(M, K)`` and ``weight`` ``(N, K)`` of any strides,
    ``bias`` ``(N,)`` or None, one dtype; a new contiguous ``(M, N)`` tensor. The operands
    :func:`choice` admits run the provider measured faster for their shape class; anything else
    runs ``torch.addmm``. ``add`` ``(M, N)`` (without ``bias``): ``add + x @ weight.T``, written
    into ``add`` (torch's GEMM accumulates into it in one pass, as ``addmm``)."""
    if add is None:
        return _RUNS[choice(x, weight, bias)](x, weight, bias)
    if choice(x, weight) == "torch":
        return add.addmm_(x, weight.t())
    return add.add_(_RUNS["onednn"](x, weight, None))


def choices() -> dict[str, str]:
    """The provider measured for each shape class so far in this process
    (``"M~m K~k N~n[ bias] x:row|col weight:row|col"`` -> ``"torch"`` | ``"onednn"``; powers of
    two)."""
    return {f"M~{1 << (m - 1)} K~{1 << (k - 1)} N~{1 << (n - 1)}{' bias' * b} x:{xl} weight:{wl}": v
            for (m, k, n, b, xl, wl), v in _CHOICE.items()}
