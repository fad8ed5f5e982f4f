"""DART (Wen et al. 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"): keep the tokens that duplicate the pivots least. No attention map is
read, so it runs under any attention kernel (SDPA, FlashAttention).

The rule, from the official code (github.com/ZichenWen1/DART,
``llava/model/language_model/modeling_llama_self.py``, ``get_retained_image_token``; read in the
search index's copy of the repository, ``xqy1111111/DART``), for the ``n`` patch tokens of one image:

1. Pivots: the ``pivots`` tokens with the largest **L1** norm of their keys (``keys`` ``(B, heads,
   N, d)``, heads concatenated: the official ``K_states.permute(0, 2, 1, 3).reshape(...)`` then
   ``torch.norm(p=1)``). Without ``keys``, the L1 norm of the similarity vectors (``metric``, or
   the tokens themselves) ranks them instead.
2. Each pivot in turn (ascending token index; the official code iterates a Python ``set``, whose
   order is no contract) takes its quota of the candidates least cosine-similar to it (cosine of
   ``metric`` ``(B, N, C)``, default the tokens; the official code compares the LLM's normed hidden
   states); what a pivot takes leaves the candidate pool, so the next pivot picks from the rest.
3. Kept: the pivots and every token taken, in original order. Every other token is dropped
   (``source`` ``-1``, as ``attn_topk``): the official code prunes, it merges nothing.

Defaults of the official LLaVA-1.5 scripts (``scripts/v1_5/eval/*.sh``, ``model_vqa_loader.py``):
pruned layer 2, ``pivot_image_token 4``, ``pivot_text_token 4``, ``max_num_trunction 128``, so each
of the 8 pivots takes ``128 // 8 = 16`` tokens and 4 + 128 = 132 image tokens stay. ``pivots``
defaults to the 4 image pivots; the 4 text pivots (top key L1 norm among the prompt tokens) are not
visual tokens, so ``compress`` has none. The budget differs in one documented way: ``keep`` (or
``round(ratio * n)``) counts every kept patch token, pivots included, and the ``keep - pivots``
other slots are split as evenly as possible (the first ``(keep - pivots) % pivots`` pivots take one
more), so exactly ``keep`` tokens stay where the official floor can keep fewer. With
``keep < pivots`` only the ``keep`` highest-norm pivots are kept.

Determinism: equal scores go to the lower index (pivot norms and cosines alike). A token whose
tokens, metric or keys row holds a NaN or an infinity ranks last everywhere: it becomes a pivot only
when fewer finite tokens than pivots exist, and is taken only after every finite candidate (a NaN
pivot leaves its candidates tied: they are taken in index order). fp16/bf16 inputs are ranked in
fp32. The kept tokens are gathered, so gradients flow to them (none to ``metric``/``keys``).

Batched: one ``(B, n, C) @ (B, C, pivots)`` cosine GEMM and one ranking per pivot (a Python loop
over the few pivots, never over images or tokens). No Triton kernel: that small GEMM and top-k run
as they are on every device. :func:`dart_reference` is the official per-image loop (tests, bench).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vtok_fast._checks import check_int
from vtok_fast.reduce._common import check_keys, check_metric, check_tokens, kept, resolve_keep, top_indices
from vtok_fast.reduce.compressed import Compressed

PIVOTS = 4  # the official pivot_image_token
_NAN_PIVOT = 2.0  # above every cosine: candidates of a NaN pivot tie, taken in index order
_NONFINITE = 3.0  # above that: a non-finite candidate is taken last
_EPS = 1e-12  # the norm clamp of F.normalize / F.cosine_similarity


def quotas(keep: int, pivots: int) -> list[int]:
    """Tokens each of the ``min(pivots, keep)`` pivots takes besides itself: ``keep - pivots`` split
    as evenly as possible, the first pivots taking one more."""
    count = min(pivots, keep)
    if count == 0:
        return []
    extra = keep - count
    return [extra // count + (i < extra % count) for i in range(count)]


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``(...)`` bool: no NaN or infinity in the last dimension (its sum is finite; a sum of finite
    fp32 values overflows only past 3e38)."""
    return x.sum(dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)).isfinite()


def _cosine(tokens, keys, metric, prefix: int, pivots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cosine, pivot_index)``: the ranking key ``(B, n, p)`` of every patch token against each
    of the ``p = pivots`` pivots ``(B, p)`` (ascending index), see the module docstring."""
    patches = tokens[:, prefix:].detach()  # a ranking: no autograd graph
    similarity = patches if metric is None else check_metric(tokens, metric, prefix).detach()
    x = similarity.to(torch.promote_types(similarity.dtype, torch.float32))
    good = _finite_rows(x) if metric is None else _finite_rows(x) & _finite_rows(patches)
    if keys is None:
        score = torch.linalg.vector_norm(x, ord=1, dim=-1)
    else:
        check_keys(tokens, keys)
        key_rows = keys[:, :, prefix:].detach()
        score = torch.linalg.vector_norm(key_rows, ord=1, dim=(1, 3), dtype=x.dtype)  # heads concatenated
        good = good & score.isfinite()
    pivot_index = top_indices(score.masked_fill(~good, math.nan), pivots)
    norm = torch.linalg.vector_norm(x, dim=-1).clamp(min=_EPS)  # F.normalize's clamp
    anchors = x.gather(1, pivot_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    dots = x @ anchors.transpose(1, 2)  # (B, n, p): one small GEMM, no normalized copy of x
    cosine = dots / (norm.unsqueeze(-1) * norm.gather(1, pivot_index).unsqueeze(1))
    cosine = cosine.nan_to_num(nan=_NAN_PIVOT).masked_fill(~good.unsqueeze(-1), _NONFINITE)
    return cosine, pivot_index


def _select(cosine: torch.Tensor, pivot_index: torch.Tensor, keep: int) -> torch.Tensor:
    """``(B, keep)`` kept patch indices, ascending: the pivots, then each pivot in turn takes its
    quota of the untaken candidates least similar to it (ties: lower index)."""
    taken = torch.zeros(cosine.shape[:2], dtype=torch.bool, device=cosine.device).scatter_(1, pivot_index, True)
    for i, share in enumerate(quotas(keep, pivot_index.shape[1])):
        if share:
            rank = cosine[:, :, i].masked_fill(taken, math.inf)
            taken = taken.scatter(1, rank.argsort(dim=1, stable=True)[:, :share], True)
    return (~taken).to(torch.int8).argsort(dim=1, stable=True)[:, :keep]  # the kept, in order


def dart(tokens: torch.Tensor, keep: int | None = None, *, ratio: float | None = None, pivots: int = PIVOTS,
         keys: torch.Tensor | None = None, metric: torch.Tensor | None = None, prefix: int = 0) -> Compressed:
    """DART: keep ``keep`` (or ``round(ratio * n)``) patch tokens, pivots included: the
    ``pivots`` tokens of largest key L1 norm (``keys`` ``(B, heads, N, d)``; without keys, of
    ``metric``/the tokens), each followed by its share of the tokens least cosine-similar to it
    (by ``metric`` ``(B, N, C)``, default the tokens), in original order; the rest are dropped
    (``source`` ``-1``). Prefix tokens are kept first. See the module docstring."""
    _, _, num_patches = check_tokens(tokens, prefix)
    count = resolve_keep(keep, ratio, num_patches)
    pivots = check_int("pivots", pivots, 1)
    cosine, pivot_index = _cosine(tokens, keys, metric, prefix, min(pivots, count))
    return kept(tokens, prefix, _select(cosine, pivot_index, count))


def dart_reference(tokens: torch.Tensor, keep: int | None = None, *, ratio: float | None = None,
                   pivots: int = PIVOTS, keys: torch.Tensor | None = None, metric: torch.Tensor | None = None,
                   prefix: int = 0) -> torch.Tensor:
    """DART as the official ``get_retained_image_token`` runs it, one image at a time (Python sets,
    ``F.cosine_similarity``, ``topk``), in the inputs' dtype, with this module's budget split and
    ascending pivot order. Returns the kept tokens ``(B, prefix + k, D)``: the prefix, then the
    kept patch tokens in original order. No NaN handling and no tie rule (``topk``'s)."""
    batch, num_tokens, dim = tokens.shape
    num_patches = num_tokens - prefix
    count = resolve_keep(keep, ratio, num_patches)
    shares = quotas(count, pivots)
    states = (tokens if metric is None else metric)[:, prefix:]
    out = []
    for b in range(batch):
        if keys is None:
            norms = torch.norm(states[b], p=1, dim=-1)
        else:
            k_states = keys[b].permute(1, 0, 2).reshape(num_tokens, -1)[prefix:]
            norms = torch.norm(k_states, p=1, dim=-1)
        pivot_list = sorted(norms.topk(len(shares)).indices.tolist())
        indices_set = set(pivot_list)
        valid = set(range(num_patches)).difference(pivot_list)
        for item, share in zip(pivot_list, shares):
            valid_list = sorted(valid)
            cos_sim = -F.cosine_similarity(states[b, item], states[b, valid_list], dim=-1)
            picked = [valid_list[i] for i in cos_sim.topk(share).indices.tolist()]
            indices_set.update(picked)
            valid.difference_update(picked)
        index = torch.tensor(sorted(indices_set), dtype=torch.long, device=tokens.device) + prefix
        out.append(torch.cat([tokens[b, :prefix], tokens[b, index]]))
    return torch.stack(out) if out else tokens.new_zeros(0, prefix + count, dim)
