"""What the timm and Hugging Face ToMe patchers share: the public :class:`ToMeState` of a patched
model, the per-forward :class:`MergeRun`, the schedule and the proportional-attention bias.

A patched model holds ``model.r`` (the schedule as ToMe takes it: an int, ``(r, inflection)`` or
a list; it may be changed between forwards) and a :class:`ToMeState`, read with
``vtok_fast.patch.tome_state(model)``. Each forward threads one fresh :class:`MergeRun` through
its layers and publishes its results in ``ToMeState.last``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vtok_fast.patch._common import is_patched, record
from vtok_fast.reduce.tome_reference import capped_r, check_r, parse_r

STATE_ATTR = "_tome_state"


def _describe(value) -> str:
    """A tensor as its shape and dtype (never its values); anything else as ``repr``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return repr(value)


@dataclass
class ToMeResult:
    """What the last forward of a patched model did.

    ``schedule``: the merge count of every layer used; ``size``: ``(B, N, 1)`` input tokens per
    output token (None when nothing was merged); ``source_map``: int64 ``(B, N0)``, the output
    token holding each token that entered the first layer (with ``trace_source`` only).
    """

    schedule: tuple[int, ...] = ()
    size: torch.Tensor | None = None
    source_map: torch.Tensor | None = None

    def __repr__(self) -> str:
        """One line: the schedule, and the tensors' shapes and dtypes."""
        return (f"ToMeResult(schedule={self.schedule!r}, size={_describe(self.size)}, "
                f"source_map={_describe(self.source_map)})")


@dataclass
class ToMeState:
    """ToMe settings of a patched model, and the results of its last forward (``last``).

    ``prop_attn``: proportional attention (``log(size)`` key bias) once tokens are merged;
    ``trace_source``: keep ``last.source_map``; both may be toggled between forwards.
    ``merge_kwargs``: how the model's prefix tokens are kept out of matching (``class_token`` /
    ``distill_token`` as in ToMe, or ``protected_prefix``), fixed at patch time.
    """

    prop_attn: bool = True
    trace_source: bool = False
    merge_kwargs: dict = field(default_factory=dict)
    last: ToMeResult = field(default_factory=ToMeResult)

    def __repr__(self) -> str:
        """One line: the settings and ``last`` (shapes, not values)."""
        return (f"ToMeState(prop_attn={self.prop_attn!r}, trace_source={self.trace_source!r}, "
                f"merge_kwargs={self.merge_kwargs!r}, last={self.last!r})")

    def start(self, r, num_layers: int, merge_kwargs: dict | None = None) -> MergeRun:
        """A fresh :class:`MergeRun` for one forward with schedule ``r`` over ``num_layers``
        (``merge_kwargs``: a tower's own prefix rule, default the model's)."""
        return MergeRun(schedule(r, num_layers), self.prop_attn, self.trace_source,
                        self.merge_kwargs if merge_kwargs is None else merge_kwargs)


@dataclass
class MergeRun:
    """The merge state of one forward, threaded through its layers."""

    schedule: tuple[int, ...]
    prop_attn: bool
    trace_source: bool
    merge_kwargs: dict
    size: torch.Tensor | None = None
    source_map: torch.Tensor | None = None
    metric: torch.Tensor | None = None  # HF: the keys an attention module hands to its layer
    key_bias: torch.Tensor | None = None  # HF: the layer's size bias when it is the only mask

    def attention_bias(self) -> torch.Tensor | None:
        """The additive key bias a layer uses: ``log(size)`` once merged, if ``prop_attn``."""
        return size_bias(self.size) if self.prop_attn else None

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int) -> torch.Tensor:
        """Merge ``r`` tokens of ``x`` ``(B, N, C)`` by ``metric`` ``(B, N, c)``."""
        from vtok_fast.reduce.tome import tome_merge

        x, self.size, info = tome_merge(x, metric, r, self.size,
                                        source_map=self.source_map if self.trace_source else None,
                                        **self.merge_kwargs)
        if self.trace_source:
            self.source_map = info.source_map
        return x

    def publish(self, state: ToMeState, x: torch.Tensor, num_input: int) -> None:
        """Store this forward's results in ``state.last``."""
        source_map = self.source_map
        if self.trace_source and source_map is None:  # nothing merged: every token is its own
            source_map = torch.arange(num_input, device=x.device).expand(x.shape[0], num_input)
        state.last = ToMeResult(self.schedule, self.size, source_map)


def schedule(r, num_layers: int, name: str = "model.r") -> tuple[int, ...]:
    """The per-layer merge counts for ``num_layers`` layers as a tuple (ToMe's ``parse_r``)."""
    check_r(r, name)
    counts = parse_r(num_layers, r)  # parse_r returns a new list and never changes r
    return tuple(max(int(v), 0) for v in counts[:num_layers])


def tokens_after(num_tokens: int, sched: tuple[int, ...], protected: int) -> int:
    """Tokens left after running ``sched`` on ``num_tokens`` tokens."""
    for r in sched:
        num_tokens -= capped_r(r, num_tokens, protected)
    return num_tokens


def size_bias(size: torch.Tensor | None) -> torch.Tensor | None:
    """Proportional-attention bias ``log(size)`` as ``(B, 1, 1, N)`` (None before any merge)."""
    if size is None:
        return None
    return size[..., 0].log()[:, None, None, :]


def tome_state(model: nn.Module) -> ToMeState:
    """The :class:`ToMeState` of a model patched with ``tome_r=...``."""
    state = model.__dict__.get(STATE_ATTR)
    if not isinstance(state, ToMeState):
        raise ValueError(f"model ({type(model).__name__}) is not patched for ToMe merging: "
                         "patch it with vtok_fast.patch.timm(model, tome_r=...) or hf(model, tome_r=...)")
    return state


def reapply(model: nn.Module, feature: str, r, *, prop_attn: bool, trace_source: bool) -> bool:
    """The start of ``apply``: check ``r``; if ``feature`` is already applied on ``model``, update
    ``model.r`` and the settings (undone if the enclosing ``all_or_nothing`` block fails) and
    return True (nothing else to do)."""
    check_r(r, "tome_r")
    if not is_patched(model, feature):
        return False
    state = tome_state(model)
    before = (model.r, state.prop_attn, state.trace_source)

    def undo():
        model.r, state.prop_attn, state.trace_source = before

    model.r = r
    state.prop_attn, state.trace_source = bool(prop_attn), bool(trace_source)
    record(undo)
    return True
