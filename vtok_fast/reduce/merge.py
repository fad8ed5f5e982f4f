"""``tome``: ToMe bipartite merging of a token set to a target count in one call, on the fused
``vtok_fast.tome_merge`` op.

One ``tome_merge`` call removes at most half of the mergeable tokens, so a smaller target runs
several rounds, each on the previous round's output: the ``metric`` (default: the tokens) is merged
along with the tokens (size-weighted, as ToMe merges everything it carries), sizes accumulate
and the source maps compose. The prefix tokens are protected (``protected_prefix``), each round's
output is ``[prefix, kept A tokens in original order, B tokens]`` (ToMe's order, so positions
are not sorted), and a merged token sits at its destination's position.
"""
from __future__ import annotations

import torch

from vtok_fast._checks import check_int
from vtok_fast.reduce._common import check_metric, check_tokens, resolve_keep, sizes_from_source
from vtok_fast.reduce.compressed import Compressed
from vtok_fast.reduce.tome import tome_merge


def tome(tokens: torch.Tensor, keep: int | None = None, *, r: int | None = None, ratio: float | None = None,
         metric: torch.Tensor | None = None, prefix: int = 0) -> Compressed:
    """Merge the patch tokens down to ``keep`` (or remove ``r``, or keep ``round(ratio * n)``)
    by ToMe bipartite soft matching on ``metric`` ``(B, N, C)`` (default: ``tokens``); prefix
    tokens are kept. Differentiable in ``tokens``."""
    batch, num_tokens, num_patches = check_tokens(tokens, prefix)
    extra = {}
    if r is not None:
        removable = max(num_patches - 1, 0)
        extra["r"] = num_patches - check_int("r", r, 0, removable, "the tokens ToMe can remove (n - 1)")
    target = resolve_keep(keep, ratio, num_patches, low=min(1, num_patches), extra=extra)
    dim = tokens.shape[-1]
    x = tokens
    if metric is not None:
        check_metric(tokens, metric, prefix)
        x = torch.cat([tokens, metric.to(tokens.dtype)], dim=-1)
    positions = torch.arange(num_tokens, device=tokens.device).expand(batch, num_tokens)
    source = None  # round 1's map is its own destinations
    size = torch.ones(batch, num_tokens, 1, dtype=torch.float32, device=tokens.device)
    current = num_patches
    while current > target:
        step = min(current - target, current // 2)
        x, size, info = tome_merge(x, x if metric is None else x[..., dim:], step, size,
                                   protected_prefix=prefix, source_map=source)
        source = info.source_map
        positions = positions.gather(1, info.order)
        current -= step
    out = x if metric is None else x[..., :dim]
    if source is None:  # nothing merged
        source = positions
    return Compressed(out, positions.clone(), sizes_from_source(source, prefix + current), source.clone())
