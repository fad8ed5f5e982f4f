"""Attention scores of the vision tower for the attention methods (``attn_topk``, ``visionzip``,
``prumerge``, ``prumerge_plus``) in the VLM families, on the tokens the language model receives.

The family adapter names the attention module of the layer its features come from
(``Family.attention``); :func:`capture` hooks that module while the tower runs, and right after
each call :func:`tower_scores` recomputes its queries and keys from the call's inputs (the
module's own projections, norms and rotary embedding) and scores every token with
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
def capture(module: nn.Module, store: dict, cls: bool):
    """While the block runs, each call of ``module`` (the tower's attention) leaves its token
    scores in ``store["scores"]`` (:func:`tower_scores`), computed as soon as the call returns, so
    that its inputs are not kept alive while the rest of the tower and the projector run."""
    def hook(attn, args, kwargs, output):
        store["scores"] = tower_scores(attn, args, kwargs, cls)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H·d)`` -> ``(B, H, N, d)``."""
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


QUERY_CHUNK = 1024  # query rows projected at once: the scores never hold all N queries and N keys


def _mean_over_rows(queries_of, rows: int, keys: torch.Tensor, scale) -> torch.Tensor:
    """``attention_scores`` averaged over all ``rows`` query rows, taken ``QUERY_CHUNK`` at a time
    (``queries_of(start, end)`` projects rows ``start:end``), so that only the keys and one chunk
    of queries are alive at once."""
    total = None
    for start in range(0, rows, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, rows)
        part = attention_scores(queries_of(start, end), keys, scale) * (end - start)
        total = part if total is None else total + part
    return total / rows


def _projected_scores(attn: nn.Module, hidden: torch.Tensor, cls: bool) -> torch.Tensor:
    """``(B, N')`` scores of a ``q_proj`` / ``k_proj`` attention (CLIP, SigLIP, InternViT), one
    view (tile, image) at a time."""
    views = [_view_scores(attn, hidden[b:b + 1], cls) for b in range(hidden.shape[0])]
    return torch.cat(views) if views else hidden.new_zeros(0, hidden.shape[1] - int(cls), dtype=torch.float32)


def _view_scores(attn: nn.Module, hidden: torch.Tensor, cls: bool) -> torch.Tensor:
    """:func:`_projected_scores` of one view ``(1, N, C)``."""
    norm_q = getattr(attn, "q_norm", None)  # InternViT's optional qk-norm over the full width
    key = attn.k_proj(hidden)
    if norm_q is not None:
        key = attn.k_norm(key)
    heads = attn.num_heads
    key = _heads(key, heads)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None)

    def queries(start: int, end: int) -> torch.Tensor:
        query = attn.q_proj(hidden[:, start:end])
        return _heads(norm_q(query) if norm_q is not None else query, heads)

    if cls:
        return attention_scores(queries(0, 1), key, scale)[:, 1:]
    return _mean_over_rows(queries, hidden.shape[1], key, scale)


def _qkv_scores(attn: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(N,)`` scores of Qwen's fused-``qkv`` attention with its 2-D rotary embedding, each
    attention segment (``cu_seqlens``) alone: the keys of a segment at once, its queries a chunk
    at a time (the value third of ``qkv`` is never computed)."""
    width, heads = hidden.shape[-1], attn.num_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias

    def project(rows: slice, part: int) -> torch.Tensor:  # part 0: queries, 1: keys; (n, H, d)
        part_bias = None if bias is None else bias[part * width:(part + 1) * width]
        out = torch.nn.functional.linear(hidden[rows], weight[part * width:(part + 1) * width], part_bias)
        return out.view(out.shape[0], heads, -1)

    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    cos, sin = kwargs["position_embeddings"]
    bounds = kwargs["cu_seqlens"].tolist()
    scores = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        key = project(slice(start, end), 1)
        key = rotary(key, key, cos[start:end], sin[start:end])[1].transpose(0, 1)[None]  # (1, H, n, d)

        def queries(a: int, b: int, start=start) -> torch.Tensor:
            query = project(slice(start + a, start + b), 0)
            rows = slice(start + a, start + b)
            return rotary(query, query, cos[rows], sin[rows])[0].transpose(0, 1)[None]

        scores.append(_mean_over_rows(queries, end - start, key, attn.scaling)[0])
    return torch.cat(scores)


def tower_scores(attn: nn.Module, args: tuple, kwargs: dict, cls: bool) -> torch.Tensor:
    """The scores of the tokens one attention call saw (its ``args`` / ``kwargs``): ``(B, N)``
    (``N`` without the CLS token), or ``(N,)`` for Qwen's packed sequences."""
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
