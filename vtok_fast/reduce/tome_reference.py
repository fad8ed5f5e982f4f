"""ToMe bipartite soft matching: the exact reference contract in plain PyTorch.

Same signatures, outputs, token order and edge cases as the public ToMe implementation
(``tome/merge.py``, ``tome/utils.py``), so existing ToMe code can switch by changing an import:

- ``bipartite_soft_matching(metric, r, class_token, distill_token) -> (merge, unmerge)``
- ``merge_wavg(merge, x, size) -> (x, size)``: size-weighted average merge
- ``merge_source(merge, x, source) -> source``: ``[B, N_cur, N0]`` membership matrix
- ``parse_r(num_layers, r) -> list[int]``: the per-layer merge schedule

The fused, faster path is ``vtok_fast.tome_merge`` (``vtok_fast/reduce/tome.py``); this module
is the reference that it and the benchmark are checked against.

Beyond the reference (documented choices): equal scores rank by index (a stable sort; ToMe's
sort is unstable, so its order of ties is unspecified: on data without ties the two agree); the
cosine is scale-invariant even where ``metric / metric.norm()`` over- or underflows (see
:func:`unit_rows`); and bad arguments raise a ``ValueError`` / ``TypeError`` naming them (a
``merge`` / ``unmerge`` knows the batch and token count of its metric and checks what it gets).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from vtok_fast._checks import check_tensor

MergeFn = Callable[..., torch.Tensor]

_METRIC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _min_norm(dtype: torch.dtype) -> float:
    """Smallest row norm that ``metric / metric.norm()`` handles as well as a unit-scale row:
    ``2**-50`` for fp32 / bf16 (the squares that matter stay clear of float32 underflow), the
    smallest normal number for fp16 (its squares are summed in float32; only the norm is fp16)."""
    acc = torch.promote_types(dtype, torch.float32)
    return max(torch.finfo(dtype).tiny, torch.finfo(acc).tiny ** 0.5 * 2.0 ** 13)


def unit_rows(metric: torch.Tensor) -> torch.Tensor:
    """``metric / metric.norm(dim=-1, keepdim=True)``, scale-invariant.

    A row whose norm is finite and at least ``2**-50`` (fp32/bf16; the smallest normal number
    for fp16) is divided by its norm exactly as in ToMe (bitwise the same). Any other row, whose
    squares overflowed to inf or underflowed to zero (e.g. a metric scaled by ``1e19`` or
    ``1e-30``), is first divided by its largest ``|value|`` and then normalized, so it gets the
    cosines of the unscaled row. An all-zero row (and one holding inf or NaN) stays NaN.
    """
    norm = metric.norm(dim=-1, keepdim=True)
    if metric.shape[-1] == 0:  # nothing to rescale (and no max |.| to take)
        return metric / norm
    ok = (norm >= _min_norm(metric.dtype)) & (norm < math.inf)  # False for NaN
    # the check costs a device sync on CUDA, so there both branches are computed instead
    if metric.device.type == "cpu" and not torch.compiler.is_compiling() and bool(ok.all()):
        return metric / norm
    scaled = metric / torch.where(ok, 1.0, metric.abs().amax(dim=-1, keepdim=True))  # x / 1 is x
    return scaled / torch.where(ok, norm, scaled.norm(dim=-1, keepdim=True))


def _check_tokens(name: str, value, batch: int, num_tokens: int, dims: tuple[str, str] = ("N", "C")) -> None:
    """``value`` is a ``(B, dims[0], dims[1])`` tensor with the metric's batch and ``num_tokens``."""
    want = f"(B, {dims[0]}, {dims[1]}) = ({batch}, {num_tokens}, {dims[1]})"
    check_tensor(name, value, ndim=3, shape_doc=want)
    if value.shape[0] != batch or value.shape[1] != num_tokens:
        raise ValueError(f"{name} must be {want}, the batch and tokens of the metric the merge was built "
                         f"on, got shape {tuple(value.shape)}")


def _checked_identity(batch: int, num_tokens: int) -> tuple[MergeFn, MergeFn]:
    """merge / unmerge for r = 0: return their input (after the shape check)."""
    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        _check_tokens("x", x, batch, num_tokens)
        return x

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        _check_tokens("y", y, batch, num_tokens, ("N - r", "C"))
        return y

    merge.tome_tokens = (batch, num_tokens)  # read by merge_wavg / merge_source
    return merge, unmerge


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False,
                            distill_token: bool = False) -> tuple[MergeFn, MergeFn]:
    """Match the ``r`` most similar A→B token pairs of ``metric`` ``[B, N, C]``.

    Tokens alternate between set A (even positions) and set B (odd positions). Every A token
    picks its most cosine-similar B token; the ``r`` A tokens with the highest such score are
    merged into their partner. ``class_token`` keeps token 0 (A[0]) from merging away,
    ``distill_token`` keeps anything from merging into token 1 (B[0]).

    Returns ``merge(x, mode="mean")`` (``[B, N, C'] -> [B, N - r, C']``; modes are
    ``torch.scatter_reduce`` reductions: "mean", "sum", "amax", ...) and ``unmerge(y)``
    (``[B, N - r, C'] -> [B, N, C']``). ``r`` is capped at ``(N - protected) // 2``;
    ``r <= 0`` returns two identity functions. No gradient flows through the matching.
    Output order: ``[kept A, B]``, kept A in descending-score order (equal scores by index), or
    in original order when ``class_token`` is set; with ``distill_token``:
    ``[A0, B0, rest of kept A, rest of B]``.

    ``merge`` and ``unmerge`` take ``(B, N, C')`` / ``(B, N - r, C')`` tensors with the metric's
    batch ``B`` and token count ``N`` (anything else raises ``ValueError``).
    """
    check_tensor("metric", metric, ndim=3, dtypes=_METRIC_DTYPES, shape_doc="(B, N, C)")
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be an int (tokens to merge), got {type(r).__name__}")
    protected = int(class_token) + int(distill_token)
    batch, num_tokens, _ = metric.shape
    r = capped_r(r, num_tokens, protected)
    if r <= 0:
        return _checked_identity(batch, num_tokens)

    with torch.no_grad():
        # 1. cosine similarity between the A (even) and B (odd) tokens
        metric = unit_rows(metric)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf

        # 2. every A token's best B partner; the r best-scoring A tokens merge
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        kept_idx = edge_idx[..., r:, :]  # A tokens that stay
        src_idx = edge_idx[..., :r, :]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # their B partners
        if class_token:
            kept_idx = kept_idx.sort(dim=1).values  # keep CLS first, tokens in spatial order

    num_kept = kept_idx.shape[1]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        _check_tokens("x", x, batch, num_tokens)
        a_x, b_x = x[..., ::2, :], x[..., 1::2, :]
        channels = x.shape[-1]
        kept = a_x.gather(dim=-2, index=kept_idx.expand(batch, num_kept, channels))
        sources = a_x.gather(dim=-2, index=src_idx.expand(batch, r, channels))
        b_x = b_x.scatter_reduce(-2, dst_idx.expand(batch, r, channels), sources, reduce=mode)
        if distill_token:
            return torch.cat([kept[:, :1], b_x[:, :1], kept[:, 1:], b_x[:, 1:]], dim=1)
        return torch.cat([kept, b_x], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        _check_tokens("y", y, batch, num_tokens - r, ("N - r", "C"))
        if distill_token:  # undo the [A0, B0, kept A[1:], B[1:]] layout of merge
            kept = torch.cat([y[:, :1], y[:, 2:num_kept + 1]], dim=1)
            b_y = torch.cat([y[:, 1:2], y[:, num_kept + 1:]], dim=1)
        else:
            kept, b_y = y[..., :num_kept, :], y[..., num_kept:, :]
        channels = y.shape[-1]
        sources = b_y.gather(dim=-2, index=dst_idx.expand(batch, r, channels))
        out = torch.zeros(batch, num_tokens, channels, device=y.device, dtype=y.dtype)
        out[..., 1::2, :] = b_y
        out.scatter_(dim=-2, index=(2 * kept_idx).expand(batch, num_kept, channels), src=kept)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(batch, r, channels), src=sources)
        return out

    merge.tome_tokens = (batch, num_tokens)  # read by merge_wavg / merge_source
    return merge, unmerge


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` ``[B, N, C]`` as a size-weighted average; ``size`` ``[B, N, 1]`` (default
    ones in x's dtype) counts the original tokens inside each token. Returns ``(x, size)``."""
    tokens = getattr(merge, "tome_tokens", None)  # (B, N) of a merge from bipartite_soft_matching
    if tokens is not None:
        _check_tokens("x", x, *tokens)
        if size is not None:
            _check_tokens("size", size, *tokens, ("N", "1"))
            if size.shape[2] != 1:
                raise ValueError(f"size must be (B, N, 1) = ({tokens[0]}, {tokens[1]}, 1), got shape "
                                 f"{tuple(size.shape)}")
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Track which original tokens each token holds: ``source`` ``[B, N, N0]`` (default
    ``eye(N)``, float32) merged with "amax". Row i of the result marks token i's patches."""
    tokens = getattr(merge, "tome_tokens", None)
    if tokens is not None:
        _check_tokens("x", x, *tokens)
        if source is not None:
            _check_tokens("source", source, *tokens, ("N", "N0"))
    elif source is None:
        check_tensor("x", x, ndim=3, shape_doc="(B, N, C)")
    if source is None:
        batch, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, device=x.device)[None, ...].expand(batch, num_tokens, num_tokens)
    return merge(source, mode="amax")


def capped_r(r: int, num_tokens: int, protected: int = 0) -> int:
    """Tokens one ToMe step really merges: at most half of the ``num_tokens - protected``
    tokens that take part in the bipartite matching (the one place this cap is written)."""
    return min(int(r), (num_tokens - protected) // 2)


def check_r(r, name: str = "r") -> None:
    """``r`` must be an int, an ``(r: int, inflection: float)`` tuple or a list of ints (ToMe's
    forms); raises ``TypeError`` naming ``name`` otherwise."""
    def is_int(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(r):
        return
    if isinstance(r, tuple):
        if len(r) == 2 and is_int(r[0]) and isinstance(r[1], numbers.Real) and not isinstance(r[1], bool):
            return
        raise TypeError(f"{name} as a tuple must be (r: int, inflection: float), got {r!r}")
    if isinstance(r, list):
        if all(is_int(v) for v in r):
            return
        raise TypeError(f"{name} as a list must hold ints, got {r!r}")
    raise TypeError(f"{name} must be an int, an (r, inflection) tuple or a list of ints, got {type(r).__name__}")


def parse_r(num_layers: int, r) -> list[int]:
    """Per-layer merge counts from an int, ``(r, inflection)`` or list.

    int: ``r`` at every layer. ``(r, inflection)``: linear from ``int(r * (1 - inflection))``
    to ``2r`` minus that, each value truncated with ``int()`` (``inflection`` −1 = decreasing,
    0 = constant, 1 = increasing). A list is padded with zeros to ``num_layers``.
    ``parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]``.
    A single layer gets the start value (the reference divides by zero there).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
        raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    check_r(r)
    if isinstance(r, list):
        return r + [0] * (num_layers - len(r)) if len(r) < num_layers else list(r)
    inflection = 0.0
    if isinstance(r, tuple):
        r, inflection = r
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    if num_layers <= 1:
        return [low] * num_layers
    step = (high - low) / (num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]

