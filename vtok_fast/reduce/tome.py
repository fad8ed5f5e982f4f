"""``tome_merge``: ToMe matching and size-weighted merge in one call, fused.

``tome_merge(x, metric, r, size=None, *, class_token=False, distill_token=False,
protected_prefix=None, source_map=None) -> (x, size, info)`` gives the same tokens, in the same
order, with the same sizes as the reference

    merge, _ = bipartite_soft_matching(metric, r, class_token, distill_token)
    x, size = merge_wavg(merge, x, size)

(``vtok_fast/reduce/tome_reference.py``), with an int64 source map instead of the ``[B, N, N0]`` matrix.

One custom op, ``vtok_fast::tome_merge`` (``torch.library``, so ``torch.compile(fullgraph=True)``
works; differentiable in ``x`` and ``size``, never in ``metric``), does three steps:

1. Scores: cosine similarity of the A (even) × B (odd) tokens and every A token's best B
   partner. CUDA: ``tome_scores_fwd`` (tiled ``tl.dot``, running row max / argmax: the
   ``ceil(N/2) x floor(N/2)`` score matrix never exists). CPU: one batched matmul.
2. Plan: the ``r`` best edges and the index bookkeeping of the merge: ``order`` (input token
   gathered into each output slot), ``dest`` (output slot of every input token) and the merged
   tokens grouped by destination slot. CUDA: ``tome_plan_fwd`` (a stable descending ranking by
   pairwise counting, no sort, parallel over batch rows and token chunks). CPU: a stable
   argsort (the full order is needed: kept A tokens stay in descending-score order without a
   class token).
3. Merge: every output token is the size-weighted mean of its representative and its sources.
   CUDA: ``tome_merge_fwd``, one program per output token, summing in a fixed order
   (representative, then sources by input position): bitwise deterministic, no atomics. CPU: one
   gather of all representatives plus an update of the few destinations that received sources
   (CPU ``index_add_`` runs in a fixed order, so it is deterministic too).

The backward is a gather by ``dest`` (no atomics either).

Semantics beyond the reference (documented choices):

- ``r < 0`` raises ``ValueError`` (the reference treats it as 0); ``r`` is capped at
  ``(N - protected) // 2`` and ``r == 0`` after capping returns ``x`` and the sizes unchanged.
- ``protected_prefix=P``: tokens ``0..P-1`` (CLS, registers, ...) are excluded from matching and
  kept in front unchanged; the bipartite split runs on tokens ``P..N-1`` (A = ``P, P+2, ...``) and
  the output is ``[prefix, kept A in original order, B]``. It replaces ``class_token`` /
  ``distill_token`` (combining them raises).
- Cosines are scale-invariant: a metric row whose squares overflow or underflow (values near
  ``1e19`` or ``1e-30`` in fp32) is divided by its largest ``|value|`` before it is normalized,
  so it scores like the unscaled row (``vtok_fast.reduce.tome_reference.unit_rows``; in the kernel: rows whose
  float32 sum of squares is inf or below ``2**-100``). Other rows are normalized as in ToMe.
- NaN scores (a metric row that is all zero, or holds inf/NaN) count as ``-2``, below every
  cosine: such an A token merges only after every finite one, and such a B token receives merges
  only from A tokens with no finite score. Ties (equal scores) go to the lower index, so every
  index stays in range and the result is deterministic. (The reference propagates NaN.)
- Sorting is stable: equal scores keep index order, as in ``bipartite_soft_matching`` (ToMe's
  own sort is not stable; on data without ties all of them agree).
- Gradients: ``x`` gets exactly ``merge_wavg``'s gradient ``s_i / S_g * dL/dy_g``; ``size`` gets
  ``merge_wavg``'s gradient too (``<dL/dy_g, x_i - y_g> / S_g + dL/dS_g``). No gradient flows into
  ``metric``.
- dtypes: ``x``/``metric`` float32, float16 or bfloat16 (independently); sums accumulate in
  float32. The output ``size`` has ``size``'s dtype (x's dtype when ``size`` is None).
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch

from vtok_fast._backend import use_triton
from vtok_fast._launch import optional_operand, strides, tile_grid
from vtok_fast._op import define_op
from vtok_fast._checks import FLOAT_DTYPES, check_same_device, check_tensor
from vtok_fast.reduce.tome_reference import capped_r, unit_rows


class MergeInfo(NamedTuple):
    """What ``tome_merge`` did, for unmerging, source tracking and visualization.

    ``dest``: ``(B, N)`` int64, output slot of every input token (a merged token: its
    destination's slot). ``order``: ``(B, N - r)`` int64, the input token each output slot was
    gathered from (merged tokens are averaged into it). ``source_map``: ``(B, N0)`` int64,
    output slot holding each original patch (``dest`` composed with the ``source_map``
    argument; ``dest`` itself when none was given). ``r``: tokens removed.
    """

    dest: torch.Tensor
    order: torch.Tensor
    source_map: torch.Tensor
    r: int

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, N - r, C) -> (B, N, C)``: every input token gets its output slot's value."""
        return tome_unmerge(y, self)


def tome_unmerge(y: torch.Tensor, info: MergeInfo) -> torch.Tensor:
    """Map merged tokens ``y`` ``(B, N - r, C)`` back to the ``N`` input positions (kept and
    B tokens to their own positions, merged tokens a copy of their destination), like the
    reference ``unmerge``. Differentiable."""
    check_tensor("y", y, ndim=3, shape_doc="(B, N - r, C)")
    batch, num_out = info.order.shape
    if y.shape[0] != batch or y.shape[1] != num_out:
        raise ValueError(f"y must be (B, N - r, C) = ({batch}, {num_out}, C), got shape {tuple(y.shape)}")
    index = info.dest.unsqueeze(-1).expand(batch, info.dest.shape[1], y.shape[-1])
    return y.gather(1, index)


def tome_merge(x: torch.Tensor, metric: torch.Tensor, r: int, size: torch.Tensor | None = None, *,
               class_token: bool = False, distill_token: bool = False,
               protected_prefix: int | None = None, source_map: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, MergeInfo]:
    """ToMe bipartite matching on ``metric`` ``(B, N, Cm)`` and size-weighted merge of
    ``x`` ``(B, N, C)``, removing ``r`` tokens.

    Returns ``(x, size, info)``: ``x`` ``(B, N - r, C)``, ``size`` ``(B, N - r, 1)`` (tokens
    per output token; input ``size`` defaults to ones), ``info`` a :class:`MergeInfo` with the
    per-token destinations, the updated ``source_map`` ``(B, N0)`` and ``info.unmerge(y)``.
    See the module docstring for the exact semantics.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, shape_doc="(B, N, C)")
    check_tensor("metric", metric, ndim=3, dtypes=FLOAT_DTYPES, shape_doc="(B, N, Cm)")
    batch, num_tokens, _ = x.shape
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric must be (B, N, Cm) = ({batch}, {num_tokens}, Cm) like x, "
                         f"got shape {tuple(metric.shape)}")
    if size is not None:
        check_tensor("size", size, ndim=3, dtypes=FLOAT_DTYPES, shape_doc="(B, N, 1)")
        if tuple(size.shape) != (batch, num_tokens, 1):
            raise ValueError(f"size must be (B, N, 1) = ({batch}, {num_tokens}, 1), got shape {tuple(size.shape)}")
    if source_map is not None:
        check_tensor("source_map", source_map, ndim=2, dtypes=(torch.int64,), shape_doc="(B, N0)")
        if source_map.shape[0] != batch:
            raise ValueError(f"source_map must be (B, N0) with B = {batch}, got shape {tuple(source_map.shape)}")
        if not torch.compiler.is_compiling() and source_map.numel():
            lo, hi = torch.stack(torch.aminmax(source_map)).tolist()  # one host sync
            if lo < 0 or hi >= num_tokens:
                raise ValueError(f"source_map values must index the N = {num_tokens} current tokens, "
                                 f"got values from {lo} to {hi}")
    check_same_device(x=x, metric=metric, size=size, source_map=source_map)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    r = int(r)
    if r < 0:
        raise ValueError(f"r must be >= 0 (tokens to remove), got {r}")

    for name, flag in (("class_token", class_token), ("distill_token", distill_token)):
        if not isinstance(flag, numbers.Integral) or flag not in (0, 1):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    class_token, distill_token = bool(class_token), bool(distill_token)

    prefix = 0
    if protected_prefix is not None:
        if class_token or distill_token:
            raise ValueError("protected_prefix already protects the leading tokens; "
                             "pass class_token=False and distill_token=False with it")
        if isinstance(protected_prefix, bool) or not isinstance(protected_prefix, numbers.Integral) or not (
                0 <= protected_prefix <= num_tokens):
            raise ValueError(f"protected_prefix must be an int in [0, N = {num_tokens}], got {protected_prefix!r}")
        prefix = int(protected_prefix)
    protected = prefix + int(class_token) + int(distill_token)
    r = capped_r(r, num_tokens, protected)

    if r <= 0:
        dest = torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
        if size is None:
            size = x.new_ones(batch, num_tokens, 1)
        new_map = dest if source_map is None else source_map
        return x, size, MergeInfo(dest, dest, new_map, 0)

    sort_kept = class_token or protected_prefix is not None  # kept A in original order
    x, size, order, dest = _tome_merge_op(
        x, metric.detach(), size, r, class_token, distill_token, prefix, sort_kept)
    new_map = dest if source_map is None else dest.gather(1, source_map)
    return x, size, MergeInfo(dest, order, new_map, r)


# --- Triton launchers (CUDA, or CPU under TRITON_INTERPRET=1) ---------------------------------

def _scores_triton(metric: torch.Tensor, class_token: bool, distill_token: bool, prefix: int):
    """Best B partner of every A token: ``(node_max fp32, node_idx int32)``, each ``(B, num_a)``."""
    from vtok_fast.kernels import tome as kt

    batch, num_tokens, channels = metric.shape
    num_a, num_b = (num_tokens - prefix + 1) // 2, (num_tokens - prefix) // 2
    node_max = torch.empty(batch, num_a, dtype=torch.float32, device=metric.device)
    node_idx = torch.empty(batch, num_a, dtype=torch.int32, device=metric.device)
    kt.tome_scores_fwd[tile_grid(num_a, more=(batch,))](
        node_max_ptr=node_max, node_idx_ptr=node_idx, metric_ptr=metric, **strides(metric, "m", "bnc"),
        num_a=num_a, num_b=num_b, channels=channels, prefix=prefix,
        NAN_SCORE=kt.NAN_SCORE, MIN_SQ=kt.MIN_SQ, PROTECT_A0=class_token, PROTECT_B0=distill_token,
        PRECISION="tf32x3" if metric.dtype == torch.float32 else "tf32")
    return node_max, node_idx


def _plan_triton(node_max, node_idx, r: int, num_tokens: int, prefix: int, sort_kept: bool,
                 distill_token: bool):
    """(order, dest, merged_src, src_start, src_count): see ``tome_plan_fwd``."""
    from vtok_fast.kernels.tome import PLAN_BLOCKS, PLAN_WARPS, tome_plan_fwd

    batch, num_a = node_max.shape
    num_b = (num_tokens - prefix) // 2
    num_out = num_tokens - r
    device = node_max.device
    order = torch.empty(batch, num_out, dtype=torch.int64, device=device)
    dest = torch.empty(batch, num_tokens, dtype=torch.int64, device=device)
    merged_src = torch.empty(batch, r, dtype=torch.int64, device=device)
    src_start = torch.empty(batch, num_out, dtype=torch.int32, device=device)
    src_count = torch.empty(batch, num_out, dtype=torch.int32, device=device)
    # chunks of the prefix and the A tokens (num_a >= num_b) per batch row
    tome_plan_fwd[tile_grid(max(num_a, prefix), more=(batch,))](
        order_ptr=order, dest_ptr=dest, merged_ptr=merged_src, start_ptr=src_start, count_ptr=src_count,
        node_max_ptr=node_max, node_idx_ptr=node_idx, num_a=num_a, num_b=num_b, prefix=prefix, r=r,
        SORT_KEPT=sort_kept, DISTILL=distill_token, num_warps=PLAN_WARPS, **PLAN_BLOCKS)
    return order, dest, merged_src, src_start, src_count


def _merge_triton(x, size, order, merged_src, src_start, src_count):
    """(y, size_out): every output slot's size-weighted mean, see ``tome_merge_fwd``."""
    from vtok_fast.kernels.tome import tome_merge_fwd

    batch, num_out = order.shape
    channels = x.shape[-1]
    y = torch.empty(batch, num_out, channels, dtype=x.dtype, device=x.device)
    size_out = torch.empty(batch, num_out, 1, dtype=x.dtype if size is None else size.dtype,
                           device=x.device)
    size_arg = optional_operand(size, size_out)  # never read without HAS_SIZE
    # one program per (output slot, channel block); at least one channel block: its programs
    # also write size_out (C = 0 included)
    tome_merge_fwd[tile_grid(max(channels, 1), row_block="BLOCK_C", lead=(batch * num_out,))](
        y_ptr=y, size_out_ptr=size_out, x_ptr=x, **strides(x, "x", "bnc"),
        size_ptr=size_arg, stride_sb=size_arg.stride(0), stride_sn=size_arg.stride(1),
        order_ptr=order, merged_ptr=merged_src, start_ptr=src_start, count_ptr=src_count,
        num_out=num_out, channels=channels, r=merged_src.shape[1], HAS_SIZE=size is not None)
    return y, size_out


# --- PyTorch path ------------------------------------------------------------------------------

class _Layout(NamedTuple):
    """Index tables of one (batch, N, r, prefix, layout) on one device."""

    a_pos: torch.Tensor  # (num_a,) input position of A token i
    b_slot: torch.Tensor  # (num_b,) output slot of B token j
    head: torch.Tensor  # (B, prefix + ...) fixed leading part of ``order``
    tail: torch.Tensor  # (B, ...) fixed trailing part of ``order``
    slots: torch.Tensor  # (B, num_out) 0..num_out-1
    base_in: torch.Tensor  # (B, 1) batch offset of the flattened input rows
    base_out: torch.Tensor  # (B, 1) batch offset of the flattened output rows


_LAYOUTS: dict = {}


def _layout(device, batch: int, num_tokens: int, r: int, prefix: int, distill_token: bool) -> _Layout:
    key = (device, batch, num_tokens, r, prefix, distill_token)
    layout = _LAYOUTS.get(key)
    if layout is None:
        num_out = num_tokens - r
        num_kept = (num_tokens - prefix + 1) // 2 - r
        ar = functools.partial(torch.arange, device=device)
        b_pos = ar(prefix + 1, num_tokens, 2)
        if distill_token:  # [A0, B0, kept A[1:], B[1:]]
            b_slot = torch.cat([ar(1, 2), num_kept + ar(1, b_pos.shape[0])])
            head, tail = b_pos[:1], b_pos[1:]
        else:  # [prefix, kept A, B]
            b_slot = prefix + num_kept + ar(b_pos.shape[0])
            head, tail = ar(prefix), b_pos
        layout = _Layout(ar(prefix, num_tokens, 2), b_slot, head.expand(batch, -1), tail.expand(batch, -1),
                         ar(num_out).expand(batch, -1), ar(batch)[:, None] * num_tokens,
                         ar(batch)[:, None] * num_out)
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def _best_edges_torch(metric: torch.Tensor, class_token: bool, distill_token: bool, prefix: int):
    """(node_max, node_idx) ``(B, num_a)``: best cosine score and B partner of every A token."""
    if prefix:
        metric = metric[:, prefix:]
    metric = unit_rows(metric)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -torch.inf
    if distill_token:
        scores[:, :, 0] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    if node_max.isnan().any():  # max propagates NaN: score again with NaN as the kernel's NAN_SCORE
        from vtok_fast.kernels.tome import NAN_SCORE

        scores.nan_to_num_(nan=NAN_SCORE, posinf=torch.inf, neginf=-torch.inf)
        node_max, node_idx = scores.max(dim=-1)
    return node_max, node_idx


def _plan_torch(node_max, node_idx, layout: _Layout, r: int, sort_kept: bool, distill_token: bool):
    """(order, dest, src_pos, src_slot): output layout, every input token's slot, and the merged
    A tokens (in descending-score order) with their destination slots."""
    batch = node_max.shape[0]
    edge = node_max.argsort(dim=-1, descending=True, stable=True)
    src_a, kept_a = edge[:, :r], edge[:, r:]
    if sort_kept:
        kept_a = kept_a.sort(dim=-1).values
    kept_pos = layout.a_pos[kept_a]
    if distill_token:
        order = torch.cat([kept_pos[:, :1], layout.head, kept_pos[:, 1:], layout.tail], dim=1)
    else:
        order = torch.cat([layout.head, kept_pos, layout.tail], dim=1)
    src_pos = layout.a_pos[src_a]
    src_slot = layout.b_slot[node_idx.gather(1, src_a)]
    dest = order.new_empty(batch, order.shape[1] + r).scatter_(1, order, layout.slots)
    dest.scatter_(1, src_pos, src_slot)
    return order, dest, src_pos, src_slot


def _merge_torch(x, size, order, src_pos, src_slot, layout: _Layout):
    """Size-weighted merge: gather every representative, then average the few destinations
    that received sources (in float32 for 16-bit x)."""
    batch, num_tokens, channels = x.shape
    num_out = order.shape[1]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    x_flat = x.reshape(batch * num_tokens, channels)
    rows = (order + layout.base_in).view(-1)
    y = x_flat.index_select(0, rows)
    src_rows = (src_pos + layout.base_in).view(-1)
    targets, group = torch.unique((src_slot + layout.base_out).view(-1), return_inverse=True)
    acc = y.index_select(0, targets).to(acc_dtype)
    x_src = x_flat.index_select(0, src_rows).to(acc_dtype)
    if size is None:
        total = torch.bincount(group, minlength=targets.shape[0]).to(acc_dtype).add_(1)
        acc.index_add_(0, group, x_src)
        size_out = torch.ones(batch * num_out, dtype=x.dtype, device=x.device)
    else:
        size_flat = size.reshape(batch * num_tokens)
        size_out = size_flat.index_select(0, rows)
        size_src = size_flat.index_select(0, src_rows).to(acc_dtype)
        total = size_out.index_select(0, targets).to(acc_dtype)
        acc.mul_(total[:, None]).index_add_(0, group, x_src.mul_(size_src[:, None]))
        total.index_add_(0, group, size_src)
    y.index_copy_(0, targets, acc.div_(total[:, None]).to(x.dtype))
    size_out.index_copy_(0, targets, total.to(size_out.dtype))
    return y.view(batch, num_out, channels), size_out.view(batch, num_out, 1)


# --- the custom op: matching + merge, differentiable in x and size ------------------------------

def _tome_merge_impl(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor | None, r: int,
                   class_token: bool, distill_token: bool, prefix: int, sort_kept: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, size_out, order, dest); ``r`` already capped and >= 1."""
    batch, num_tokens, _ = x.shape
    if use_triton(x, metric):
        node_max, node_idx = _scores_triton(metric, class_token, distill_token, prefix)
        order, dest, merged_src, src_start, src_count = _plan_triton(
            node_max, node_idx, r, num_tokens, prefix, sort_kept, distill_token)
        y, size_out = _merge_triton(x, size, order, merged_src, src_start, src_count)
        return y, size_out, order, dest
    layout = _layout(x.device, batch, num_tokens, r, prefix, distill_token)
    node_max, node_idx = _best_edges_torch(metric, class_token, distill_token, prefix)
    order, dest, src_pos, src_slot = _plan_torch(node_max, node_idx, layout, r, sort_kept, distill_token)
    y, size_out = _merge_torch(x, size, order, src_pos, src_slot, layout)
    return y, size_out, order, dest


def _tome_merge_fake(x, metric, size, r, class_token, distill_token, prefix, sort_kept):
    batch, num_tokens, channels = x.shape
    num_out = num_tokens - r
    size_dtype = x.dtype if size is None else size.dtype
    return (x.new_empty(batch, num_out, channels), x.new_empty(batch, num_out, 1, dtype=size_dtype),
            x.new_empty(batch, num_out, dtype=torch.int64), x.new_empty(batch, num_tokens, dtype=torch.int64))


def _merge_setup_context(ctx, inputs, output):
    x, _, size, *_ = inputs
    y, size_out, _, dest = output
    ctx.size_dtype = None if size is None else size.dtype
    ctx.x_dtype = x.dtype
    size_grad = size is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(dest, size, size_out, x if size_grad else None, y if size_grad else None)


def _merge_backward(ctx, grad_y, grad_size, _grad_order, _grad_dest):
    """dL/dx_i = s_i / S_g * dL/dy_g and dL/ds_i = <dL/dy_g, x_i - y_g> / S_g + dL/dS_g, with
    g = dest[i]: gathers only, so deterministic."""
    dest, size, size_out, x, y = ctx.saved_tensors
    batch, num_tokens = dest.shape
    num_out = size_out.shape[1]
    acc_dtype = torch.promote_types(ctx.x_dtype, torch.float32)
    rows = (dest + num_out * torch.arange(batch, device=dest.device)[:, None]).view(-1)
    total = size_out.reshape(-1).index_select(0, rows).to(acc_dtype)
    grad_rows = None if grad_y is None else grad_y.reshape(batch * num_out, -1).index_select(0, rows)
    grad_s = None
    if x is not None:  # size needs a gradient
        grad_s = torch.zeros(batch * num_tokens, dtype=acc_dtype, device=dest.device)
        if grad_rows is not None:
            diff = y.reshape(batch * num_out, -1).index_select(0, rows).to(acc_dtype)
            diff.neg_().add_(x.reshape(batch * num_tokens, -1))  # x_i - y_g, in a new buffer
            grad_s += diff.mul_(grad_rows).sum(-1).div_(total)
        if grad_size is not None:
            grad_s += grad_size.reshape(-1).index_select(0, rows)
        grad_s = grad_s.to(ctx.size_dtype).view(batch, num_tokens, 1)
    grad_x = None
    if grad_rows is not None:
        weight = total.reciprocal_() if size is None else size.reshape(-1).to(acc_dtype) / total
        if grad_rows.dtype == acc_dtype:
            grad_x = grad_rows.mul_(weight[:, None])
        else:  # 16-bit: weight and product in float32, one rounding
            grad_x = (grad_rows.to(acc_dtype) * weight[:, None]).to(grad_rows.dtype)
        grad_x = grad_x.view(batch, num_tokens, -1)
    return grad_x, None, grad_s, None, None, None, None, None


_tome_merge_op = define_op("tome_merge", _tome_merge_impl, fake=_tome_merge_fake,
                           setup_context=_merge_setup_context, backward=_merge_backward)
