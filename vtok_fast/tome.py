"""ToMe bipartite soft matching: the exact reference contract in plain PyTorch.

Same signatures, outputs, token order and edge cases as the public ToMe implementation
(``tome/merge.py``, ``tome/utils.py``), so existing ToMe code can switch by changing an import:

- ``bipartite_soft_matching(metric, r, class_token, distill_token) -> (merge, unmerge)``
- ``merge_wavg(merge, x, size) -> (x, size)``: size-weighted average merge
- ``merge_source(merge, x, source) -> source``: ``[B, N_cur, N0]`` membership matrix
- ``parse_r(num_layers, r) -> list[int]``: the per-layer merge schedule

The fused, faster path is ``vtok_fast.tome_merge`` (``vtok_fast/tome_fused.py``); this module
is the reference that it and the benchmark are checked against.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

MergeFn = Callable[..., torch.Tensor]


def _identity(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    return x


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
    Output order: ``[kept A, B]``, kept A in descending-score order, or in original order when
    ``class_token`` is set; with ``distill_token``: ``[A0, B0, rest of kept A, rest of B]``.
    """
    protected = int(class_token) + int(distill_token)
    num_tokens = metric.shape[1]
    r = min(r, (num_tokens - protected) // 2)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        # 1. cosine similarity between the A (even) and B (odd) tokens
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf

        # 2. every A token's best B partner; the r best-scoring A tokens merge
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        kept_idx = edge_idx[..., r:, :]  # A tokens that stay
        src_idx = edge_idx[..., :r, :]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # their B partners
        if class_token:
            kept_idx = kept_idx.sort(dim=1).values  # keep CLS first, tokens in spatial order

    num_kept = kept_idx.shape[1]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        a_x, b_x = x[..., ::2, :], x[..., 1::2, :]
        batch, _, channels = a_x.shape
        kept = a_x.gather(dim=-2, index=kept_idx.expand(batch, num_kept, channels))
        sources = a_x.gather(dim=-2, index=src_idx.expand(batch, r, channels))
        b_x = b_x.scatter_reduce(-2, dst_idx.expand(batch, r, channels), sources, reduce=mode)
        if distill_token:
            return torch.cat([kept[:, :1], b_x[:, :1], kept[:, 1:], b_x[:, 1:]], dim=1)
        return torch.cat([kept, b_x], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        if distill_token:  # undo the [A0, B0, kept A[1:], B[1:]] layout of merge
            kept = torch.cat([y[:, :1], y[:, 2:num_kept + 1]], dim=1)
            b_y = torch.cat([y[:, 1:2], y[:, num_kept + 1:]], dim=1)
        else:
            kept, b_y = y[..., :num_kept, :], y[..., num_kept:, :]
        batch, _, channels = kept.shape
        sources = b_y.gather(dim=-2, index=dst_idx.expand(batch, r, channels))
        out = torch.zeros(batch, num_tokens, channels, device=y.device, dtype=y.dtype)
        out[..., 1::2, :] = b_y
        out.scatter_(dim=-2, index=(2 * kept_idx).expand(batch, num_kept, channels), src=kept)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(batch, r, channels), src=sources)
        return out

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` ``[B, N, C]`` as a size-weighted average; ``size`` ``[B, N, 1]`` (default
    ones in x's dtype) counts the original tokens inside each token. Returns ``(x, size)``."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Track which original tokens each token holds: ``source`` ``[B, N, N0]`` (default
    ``eye(N)``, float32) merged with "amax". Row i of the result marks token i's patches."""
    if source is None:
        batch, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, device=x.device)[None, ...].expand(batch, num_tokens, num_tokens)
    return merge(source, mode="amax")


def parse_r(num_layers: int, r) -> list[int]:
    """Per-layer merge counts from an int, ``(r, inflection)`` or list.

    int: ``r`` at every layer. ``(r, inflection)``: linear from ``int(r * (1 - inflection))``
    to ``2r`` minus that, each value truncated with ``int()`` (``inflection`` −1 = decreasing,
    0 = constant, 1 = increasing). A list is padded with zeros to ``num_layers``.
    ``parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]``.
    A single layer gets the start value (the reference divides by zero there).
    """
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
