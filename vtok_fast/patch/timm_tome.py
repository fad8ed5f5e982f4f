"""ToMe token merging for timm ``VisionTransformer`` and DeiT models, patched in place.

``apply(model, r=...)`` replaces, on this model instance only (its class is untouched):
- each block's ``forward``: ``x = x + drop_path1(ls1(attn(norm1(x))))``, then ToMe merges
  ``r`` tokens (``vtok_fast.tome_merge``, size-weighted average), then
  ``x = x + drop_path2(ls2(mlp(norm2(x))))``. The attention is timm's (qkv, q/k norm, fused
  SDPA or the explicit path, attention dropout, scale norm, gate) with proportional attention:
  a per-key additive bias ``log(size)`` (``[B, 1, 1, N]``) once tokens have been merged; on the
  Triton path (CUDA) a fused-attention model then runs ``vtok_fast.attention`` (flash attention
  with the key bias) unless attention dropout is active; before any merge it keeps plain SDPA. The
  matching metric is the keys averaged over heads (after ``k_norm``), as in ToMe;
- ``model.blocks.forward``: computes the schedule as a tuple ``parse_r(depth, model.r)`` at
  every call and passes each block its ``r`` (no per-layer Python list is popped: a fixed
  schedule compiles with ``torch.compile(fullgraph=True)``; changing ``model.r`` recompiles);
- ``model.pool``: pooling weighted by token size: ``avg`` is ``Σ size·x / Σ size`` over the
  pooled tokens (the mean over the original patches), ``avgmax`` uses that mean, ``map`` passes
  ``log(size)`` to ``AttentionPoolLatent`` as its attention bias; ``token``/``max``/none are
  unchanged.

Prefix tokens: a plain ``[cls]`` or DeiT ``[cls][dist]`` prefix uses ToMe's ``class_token`` /
``distill_token`` rules (outputs equal the original ToMe); with register tokens all
``num_prefix_tokens`` are kept out of matching, at the front, unchanged (``protected_prefix``).

Attributes: ``model.r`` (int, ``(r, inflection)`` or list; may be changed after patching) and
the :class:`~vtok_fast.patch.tome_common.ToMeState` read by ``vtok_fast.patch.tome_state(model)``:
its settings ``prop_attn`` and ``trace_source`` (may be toggled) and ``last``, the last forward's
``schedule`` (the tuple used), ``size`` (``[B, N, 1]`` tokens per output token, None if nothing
merged) and, with ``trace_source=True``, ``source_map``: int64 ``[B, N0]`` giving for each token
that entered the first block the index of the output token that holds it.

Not merged: ``forward_intermediates`` / ``get_intermediate_layers``, a forward given
``attn_mask`` or ``is_causal`` (the mask is for the unmerged token set), and
``set_grad_checkpointing(True)`` (timm's ``checkpoint_seq`` calls the blocks itself): these run
the original blocks. Blocks other than timm's ``Block`` with ``Attention`` are not supported:
``apply`` warns and leaves the model unchanged.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast._backend import use_triton
from vtok_fast.patch._common import bind, overridden, patch, restore, warn_not_applied
from vtok_fast.patch.tome_common import STATE_ATTR, MergeRun, ToMeState, reapply, size_bias
from vtok_fast.reduce.attention import attention

FEATURE = "timm_tome"
_PATCHER = "vtok_fast.patch.timm ToMe merging"
MISSING = "not a timm VisionTransformer"


def finds(model: nn.Module) -> bool:
    """Whether ``model`` is a model this patcher targets (a timm VisionTransformer)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


# ---------------------------------------------------------------------------------------------
# timm patch
# ---------------------------------------------------------------------------------------------

def apply(model: nn.Module, *, r, trace_source: bool = False, prop_attn: bool = True) -> nn.Module:
    """Patch ``model`` for ToMe merging with schedule ``r`` (re-applying updates the settings);
    warn and change nothing when it is unsupported."""
    if reapply(model, FEATURE, r, prop_attn=prop_attn, trace_source=trace_source):
        return model
    reason = _unsupported_reason(model)
    if reason is not None:
        warn_not_applied(_PATCHER, model, reason)
        return model
    replacements = [(blk, "forward", bind(_block_forward, blk)) for blk in model.blocks]
    replacements += [
        (model.blocks, "forward", functools.partial(_run_blocks, model)),
        (model, "pool", bind(_size_weighted_pool, model)),
        (model, "r", r),
        (model, STATE_ATTR, ToMeState(bool(prop_attn), bool(trace_source), _merge_kwargs(model))),
    ]
    patch(model, FEATURE, replacements)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Restore the original methods and drop ``r`` and the ToMe state (no-op if not patched)."""
    restore(model, FEATURE)
    return model


def _unsupported_reason(model: nn.Module) -> str | None:
    from timm.layers import Attention, AttentionPoolLatent
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        return MISSING
    if type(model.blocks) is not nn.Sequential or "forward" in model.blocks.__dict__:
        return "model.blocks is not a plain nn.Sequential"
    if not hasattr(type(model), "pool"):
        return "this timm version has no VisionTransformer.pool (a newer timm 1.0.x is needed)"
    for i, blk in enumerate(model.blocks):
        if overridden(blk, Block):
            return f"blocks[{i}] is {type(blk).__name__}, not timm's Block"
        if type(blk.attn).forward is not Attention.forward:
            return f"blocks[{i}].attn is {type(blk.attn).__name__}, not timm's Attention"
    if model.attn_pool is not None and not (
            isinstance(model.attn_pool, AttentionPoolLatent)
            and "attn_mask" in inspect.signature(model.attn_pool.forward).parameters):
        return (f"global_pool={model.global_pool!r} ({type(model.attn_pool).__name__}) takes no attention bias "
                f"for the token sizes")
    return None


def _merge_kwargs(model: nn.Module) -> dict:
    """ToMe's class/distill-token rules for a [cls] or [cls][dist] prefix, else protect all."""
    num_prefix = int(model.num_prefix_tokens)
    has_cls = getattr(model, "cls_token", None) is not None
    has_dist = getattr(model, "dist_token", None) is not None
    if getattr(model, "num_reg_tokens", 0) == 0 and num_prefix == int(has_cls) + int(has_dist) \
            and (has_cls or not has_dist):
        return {"class_token": has_cls, "distill_token": has_dist}
    return {"protected_prefix": num_prefix}


def _run_blocks(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patched ``model.blocks.forward``: every block with its ``r`` and the shared merge state."""
    state = model.__dict__[STATE_ATTR]
    run = state.start(model.r, len(model.blocks))
    num_input = x.shape[1]
    for blk, r in zip(model.blocks, run.schedule):
        x = blk(x, tome_r=r, tome_run=run)
    run.publish(state, x, num_input)
    return x


def _block_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                   *, tome_r: int = 0, tome_run: MergeRun | None = None) -> torch.Tensor:
    """Patched ``Block.forward``: attention, ToMe merge of ``tome_r`` tokens, MLP.

    Called without ``tome_run`` (``forward_intermediates``, masked or checkpointed forwards)
    it is timm's original block.
    """
    if tome_run is None:
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    attn_out, metric = _attention(self.attn, self.norm1(x), tome_run.attention_bias(), tome_r > 0)
    x = x + self.drop_path1(self.ls1(attn_out))
    if tome_r > 0:
        x = tome_run.merge(x, metric, tome_r)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, need_metric: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Attention.forward`` with an additive key bias ``[B, 1, 1, N]``; also returns the
    ToMe metric (keys averaged over heads, ``[B, N, head_dim]``) when ``need_metric``."""
    B, N, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if bias is not None and attn.fused_attn and dropout == 0.0 and B > 0 and use_triton(q):
        # merged tokens on the Triton path: flash attention with the per-key size bias
        out = attention(q, k, v, key_bias=bias[:, 0, 0, :], scale=attn.scale)
    elif attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        out = attn.attn_drop(scores.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)  # no -1: B may be 0
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, (k.mean(dim=1) if need_metric else None)


def _size_weighted_pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """Patched ``VisionTransformer.pool``: ``avg``/``avgmax``/``map`` weighted by token size."""
    size = self.__dict__[STATE_ATTR].last.size
    if size is None:
        return type(self).pool(self, x, pool_type)
    if size.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"x has {tuple(x.shape[:2])} (batch, tokens) but the last merged forward produced "
            f"{tuple(size.shape[:2])}: pool the features of the latest forward_features call")
    pool_type = self.global_pool if pool_type is None else pool_type
    if self.attn_pool is None and pool_type not in ("avg", "avgmax"):
        return type(self).pool(self, x, pool_type)  # token / max / none do not depend on size
    if not self.pool_include_prefix:
        x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
    if self.attn_pool is not None:
        return self.attn_pool(x, attn_mask=size_bias(size).to(x.dtype))
    mean = (x * size).sum(dim=1) / size.sum(dim=1)
    return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)
