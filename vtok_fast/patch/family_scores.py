"""Attention scores of the vision tower for the attention methods (``attn_topk``, ``visionzip``,
``prumerge``, ``prumerge_plus``) in the VLM families, on the tokens the language model receives.

The family adapter names the attention module of the layer its features come from
(``Family.attention``); :func:`capture` records that module's inputs while the tower runs, and
:func:`tower_scores` recomputes its queries and keys (the module's own projections, norms and
rotary embedding) and scores every token with
:func:`vtok_fast.reduce.attention_scores.attention_scores` (no ``N x N`` matrix is stored):

- towers with a CLS token (CLIP in LLaVA-NeXT, InternViT): the CLS row's attention, averaged over
  heads, with the CLS key's share left out (as VisionZip and PruMerge in LLaVA);
- towers without one (SigLIP, Qwen's ViT): the attention every token receives, averaged over all
  queries and heads: the substitute VisionZip's and VisPruner's ports use for such towers ("global
  attention"), within each attention segment (image, window) of the layer.

The adapter's ``score_map`` then applies the family's own merge to the scores (Qwen's 2x2 merger
and window order, a pixel shuffle's s x s blocks, Gemma 3's average pool, LLaVA-NeXT's packing),
as the ports do, so each score belongs to one token the language model sees.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn as nn

from vtok_fast.reduce.attention_scores import attention_scores


@contextlib.contextmanager
def capture(module: nn.Module, store: dict):
    """While the block runs, ``store["args"]`` / ``store["kwargs"]`` hold ``module``'s last inputs."""
    def hook(_, args, kwargs):
        store["args"], store["kwargs"] = args, kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H·d)`` -> ``(B, H, N, d)``."""
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


def _projected_scores(attn: nn.Module, hidden: torch.Tensor, cls: bool) -> torch.Tensor:
    """``(B, N')`` scores of a ``q_proj`` / ``k_proj`` attention (CLIP, SigLIP, InternViT)."""
    query, key = attn.q_proj(hidden), attn.k_proj(hidden)
    if hasattr(attn, "q_norm"):  # InternViT's optional qk-norm over the full width
        query, key = attn.q_norm(query), attn.k_norm(key)
    heads = attn.num_heads
    query, key = _heads(query, heads), _heads(key, heads)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None)
    if cls:
        return attention_scores(query[:, :, :1], key, scale)[:, 1:]
    return attention_scores(query, key, scale)


def _qkv_scores(attn: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(N,)`` scores of Qwen's fused-``qkv`` attention with its 2-D rotary embedding, each
    attention segment (``cu_seqlens``) alone."""
    length = hidden.shape[0]
    query, key, _ = attn.qkv(hidden).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = kwargs["position_embeddings"]
    query, key = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(query, key, cos, sin)
    bounds = kwargs["cu_seqlens"].tolist()
    scores = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = query[start:end].transpose(0, 1)[None]  # (1, H, n, d)
        k = key[start:end].transpose(0, 1)[None]
        scores.append(attention_scores(q, k, attn.scaling)[0])
    return torch.cat(scores)


def tower_scores(attn: nn.Module, store: dict, cls: bool) -> torch.Tensor:
    """The scores of the tokens the captured attention call saw: ``(B, N)`` (``N`` without the
    CLS token), or ``(N,)`` for Qwen's packed sequences."""
    if "args" not in store:
        raise ValueError(f"the vision tower did not run {type(attn).__name__}: no attention to rank tokens by")
    args, kwargs = store["args"], store["kwargs"]
    hidden = args[0] if args else kwargs["hidden_states"]
    with torch.no_grad():
        if hasattr(attn, "qkv"):
            return _qkv_scores(attn, hidden, {**kwargs, **dict(zip(("cu_seqlens",), args[1:2]))})
        return _projected_scores(attn, hidden, cls)


def pooled(scores: torch.Tensor, side: int, window: int) -> torch.Tensor:
    """``(B, side²)`` scores of a square grid averaged over ``window x window`` blocks (a pixel
    shuffle's or an average pool's grouping), row-major: ``(B, (side / window)²)``."""
    grid = scores.view(scores.shape[0], 1, side, side)
    return torch.nn.functional.avg_pool2d(grid, window).flatten(1)
