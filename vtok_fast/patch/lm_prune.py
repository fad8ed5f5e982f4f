"""Image-token pruning inside a VLM's language model, in stages: the machinery FastV (one stage)
and PyramidDrop (several) share (:mod:`vtok_fast.patch.hf_fastv` is the front end).

A plan is a list of stages ``(K_s, R_s)``, ``K_1 < K_2 < ...``: the attention of layer ``K_s - 1``
also yields the attention every key receives from the row's **last** token (its last position
whose 2-D ``attention_mask`` is 1), averaged over heads, read with
:func:`vtok_fast.reduce.attention_scores.attention_scores` from that one query row (post-norm,
post-RoPE query and keys; the row of the layer's own 4-D mask, or causal where the model passes
none), so the attention keeps its implementation (``sdpa`` / ``eager``) and no ``L x L``
probability matrix is built. Before layer ``K_s`` each row keeps the ``round(n · (1 − R_s))``
(Python's rounding) of its ``n`` remaining image tokens that receive the most (ties: the earlier
token) and every text token; layers ``K_s..`` run on the kept rows in their original order with
the **original** rows of the position embeddings (cos/sin: M-RoPE included), position ids and 4-D
masks (Gemma 3's per-layer-type masks each). Rows keeping different counts are left-padded (index
``-1``: zero hidden state, masked column, a row that attends to itself only), so the last slot of
every row stays its last token.

Seams (instance attributes set with :func:`vtok_fast.patch._common.patch`, never a copied
forward): the inner model's ``forward`` (the original, called through; it records where the image
placeholders are and whether this call is a prefill), the scoring layers' attention ``forward`` and
the ``forward`` of the modules producing their queries and keys (``q_proj``/``k_proj``, or
``q_norm``/``k_norm`` where the model normalises heads), the ``forward`` of every decoder layer
from ``K_1`` on, and Qwen3-VL's ``_deepstack_process`` (its DeepStack features are added at the
kept visual tokens only).

Cache: layers ``< K_1`` cache every token, the layers of stage ``s`` only its kept ones; the kept
columns per stage are recorded on the ``DynamicCache`` (``STATE``), and a later step maps its
full-layout mask onto each pruned layer's slots (``cache.get_seq_length()``, layer 0, counts every
token, so position ids continue from the unpruned length).
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import torch
import torch.nn as nn

from vtok_fast.patch._common import capture_forward
from vtok_fast.patch.placeholder_drop import _left_padded, gather_4d, gather_last
from vtok_fast.reduce.attention_scores import attention_scores

FEATURE = "hf_fastv"  # the patch feature of FastV / PyramidDrop (hf_fastv); hf_family_compress refuses it

STATE = "_vtok_fast_fastv"  # on a pruned DynamicCache: {"columns": [(B, L_s)], "length": L, "stage_of": [...]}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclasses.dataclass(frozen=True)
class Kind:
    """A supported language model: its decoder layer and attention classes, where the attention's
    queries and keys come from (``capture``) and their layout there (``flat``: ``(B, L, H·d)``,
    ``blhd`` / ``bhld``: per head, before / after the transpose), and the keyword parameters its
    decoder layer takes (checked at ``apply``)."""

    layer: type
    attention: type
    capture: tuple[str, str] = ("q_proj", "k_proj")
    layout: str = "flat"
    layer_params: tuple[str, ...] = ("attention_mask", "position_ids", "cache", "use_cache", "position_embeddings")


def kinds() -> dict[type, Kind]:
    """Language-model class -> :class:`Kind` (every one transformers 5.25 uses in the families)."""
    from transformers.models.gemma3 import modeling_gemma3 as gemma3
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2vl
    from transformers.models.qwen3 import modeling_qwen3 as qwen3
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3vl

    norms = ("q_norm", "k_norm")
    return {llama.LlamaModel: Kind(llama.LlamaDecoderLayer, llama.LlamaAttention),
            mistral.MistralModel: Kind(mistral.MistralDecoderLayer, mistral.MistralAttention),
            qwen2.Qwen2Model: Kind(qwen2.Qwen2DecoderLayer, qwen2.Qwen2Attention),
            qwen2vl.Qwen2VLTextModel: Kind(qwen2vl.Qwen2VLDecoderLayer, qwen2vl.Qwen2VLAttention),
            qwen25.Qwen2_5_VLTextModel: Kind(qwen25.Qwen2_5_VLDecoderLayer, qwen25.Qwen2_5_VLAttention),
            qwen3.Qwen3Model: Kind(qwen3.Qwen3DecoderLayer, qwen3.Qwen3Attention, norms, "blhd"),
            qwen3vl.Qwen3VLTextModel: Kind(qwen3vl.Qwen3VLTextDecoderLayer, qwen3vl.Qwen3VLTextAttention, norms,
                                           "blhd", ("attention_mask", "position_ids", "cache",
                                                    "position_embeddings")),
            gemma3.Gemma3TextModel: Kind(gemma3.Gemma3DecoderLayer, gemma3.Gemma3Attention, norms, "bhld",
                                         ("attention_mask", "position_ids", "cache", "position_embeddings"))}


def plan_of(stages: list[tuple[int, float]], num_layers: int, **extra) -> dict:
    """The plan :func:`replacements` installs: ``stages`` ``[(K_s, R_s)]`` (validated by the
    caller), which stage each layer belongs to (``-1`` before ``K_1``), which layer scores for
    which stage; ``extra``: ``info`` (filled at each pruning prefill), ``config`` (the language
    model's), ``image_mask`` (``(input_ids, inputs_embeds) -> (B, L) bool | None``), ``name``,
    ``window`` (Gemma 3's sliding window, or None)."""
    starts = {layer: s for s, (layer, _) in enumerate(stages)}
    stage_of, current = [], -1
    for i in range(num_layers):
        current = starts.get(i, current)
        stage_of.append(current)
    return {"stages": stages, "starts": starts, "scorers": {layer - 1: s for s, (layer, _) in enumerate(stages)},
            "stage_of": stage_of, **extra}


def replacements(inner: nn.Module, lm: nn.Module, kind: Kind, plan: dict, run: dict) -> list:
    """The ``patch`` replacements of the pruning described by ``plan`` (``run``: the per-forward
    state, ``{"job": None, "capture": None, "kept": None, "length": None}``)."""
    out = [(inner, "forward", functools.partial(_inner_forward, inner, plan, run))]
    for index, stage in plan["scorers"].items():
        attn = lm.layers[index].self_attn
        out.append((attn, "forward", functools.partial(_scoring_forward, attn, kind, plan, run, stage)))
        for name, source in zip(("q", "k"), kind.capture):
            module = getattr(attn, source)
            out.append((module, "forward", functools.partial(capture_forward, module, run, name)))
    first = plan["stages"][0][0]
    for index in range(first, len(lm.layers)):
        layer = lm.layers[index]
        out.append((layer, "forward", functools.partial(_layer_forward, layer, plan, run, index)))
    if hasattr(type(lm), "_deepstack_process"):  # Qwen3-VL
        out.append((lm, "_deepstack_process", functools.partial(_deepstack, lm, run)))
    return out


# --- per forward ----------------------------------------------------------------------------------

def _inner_forward(inner: nn.Module, plan: dict, run: dict, *args, **kwargs):
    """Patched ``forward`` of the model holding the language model: the original; at a prefill
    (no cache, or an empty one) of a prompt with image tokens it sets up the pruning job."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    input_ids = args[0] if args else kwargs.get("input_ids")
    job = None
    if cache is None or cache.get_seq_length() == 0:
        if cache is not None:
            cache.__dict__.pop(STATE, None)  # a reused, emptied cache
        image_mask = plan["image_mask"](input_ids, kwargs.get("inputs_embeds"))
        if image_mask is not None and bool(image_mask.any()):
            job = _new_job(plan, image_mask, kwargs.get("attention_mask"), cache)
    elif STATE in cache.__dict__ and plan.get("window") is not None:
        steps = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        _check_window(plan, cache.get_seq_length() + steps)
    run["job"], run["kept"] = job, None
    try:
        out = type(inner).forward(inner, *args, **kwargs)
        if job is not None and job["stage"] > 0:
            run["kept"], run["length"] = plan["info"]["kept"], job["image_mask"].shape[1]
        return out
    finally:
        run["job"] = run["capture"] = None


def _check_window(plan: dict, total: int) -> None:
    if total > plan["window"]:
        raise ValueError(f"{plan['method']} in {plan['name']} runs while the prompt and the generated tokens fit "
                         f"the sliding window ({plan['window']} tokens): its pruned sliding-window layers would "
                         f"evict by kept slots, not by distance; this sequence reaches {total} tokens")


def _new_job(plan: dict, image_mask: torch.Tensor, attention_mask, cache) -> dict:
    """Check a prefill that prunes and return its state (shared by the patched layers)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    method = plan["method"]
    impl = plan["config"]._attn_implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{method} runs with attn_implementation in {ATTENTION_IMPLEMENTATIONS}; the language "
                         f"model uses {impl!r}")
    allowed = (DynamicLayer,) if plan.get("window") is None else (DynamicLayer, DynamicSlidingWindowLayer)
    if cache is not None and not (isinstance(cache, DynamicCache)
                                  and all(type(layer) in allowed for layer in cache.layers)):
        raise ValueError(f"{method} prunes into a DynamicCache of full-attention layers, got {type(cache).__name__}")
    batch, length = image_mask.shape
    if plan.get("window") is not None:
        _check_window(plan, length)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != (batch, length)):
        raise ValueError(f"{method} needs a 2-D (B, L) = ({batch}, {length}) attention_mask (or none) at the "
                         f"prefill, got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    counts = image_mask.sum(dim=1)
    if plan.get("equal_counts") and bool((counts != counts[0]).any()):
        raise ValueError(f"{method} needs the same number of image tokens in every row of the batch in "
                         f"{plan['name']}, got {counts.tolist()}")
    positions = torch.arange(length, device=image_mask.device).expand(batch, length)
    real = None if attention_mask is None else attention_mask.to(device=image_mask.device) != 0
    last = positions.max(dim=1).values if real is None else torch.where(real, positions, -1).max(dim=1).values
    if bool((last < 0).any()) or bool(image_mask.gather(1, last.clamp(min=0)[:, None]).any()):
        raise ValueError(f"{method} ranks image tokens by the attention of each row's last token, which must be a "
                         "text token (the prompt must continue after the image)")
    plan["info"].update(kept=None, image_kept=None, scores=None, stages=[])
    return {"image_mask": image_mask, "last": last, "index": None, "stage": 0, "scores": None, "memo": {},
            "pads": False, "columns": [], "real": real}


def _scoring_forward(attn: nn.Module, kind: Kind, plan: dict, run: dict, stage: int, hidden_states, *args,
                     **kwargs):
    """Patched attention ``forward`` of layer ``K_s - 1``: the original; at a pruning prefill
    before stage ``s`` it also scores every key by the last token's attention."""
    job = run["job"]
    if job is None or job["stage"] != stage:
        return type(attn).forward(attn, hidden_states, *args, **kwargs)
    _check_length(plan, job, hidden_states.shape[1])
    run["capture"] = {}
    try:
        out = type(attn).forward(attn, hidden_states, *args, **kwargs)
        captured = run["capture"]
    finally:
        run["capture"] = None
    job["scores"] = _last_token_scores(attn, kind, captured, kwargs.get("position_embeddings"),
                                       kwargs.get("attention_mask"), job)
    return out


def _heads(x: torch.Tensor, layout: str, head_dim: int) -> torch.Tensor:
    """Captured queries / keys as ``(B, heads, L, d)``."""
    if layout == "flat":
        return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)
    return x.transpose(1, 2) if layout == "blhd" else x


def _last_local(job: dict) -> torch.Tensor:
    """``(B,)``: the slot of each row's last token among the current rows."""
    if job["index"] is None:
        return job["last"]
    return (job["index"] == job["last"][:, None]).long().argmax(dim=1)


def _key_mask(mask, rows: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``(B, L)`` bool: the keys the last token sees, read off the layer's own 4-D mask (bool or
    additive), causal where the model passes none."""
    if mask is None:
        return torch.arange(length, device=rows.device)[None] <= rows[:, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"FastV / PyramidDrop read 4-D attention masks, the language model built "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    row = mask.expand(batch, *mask.shape[1:])[torch.arange(batch, device=mask.device), 0, rows.to(mask.device)]
    row = row[:, -length:]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _last_token_scores(attn: nn.Module, kind: Kind, captured: dict, position_embeddings, mask, job) -> torch.Tensor:
    """``(B, L)`` fp32: softmax of the last token's post-RoPE query over the post-RoPE keys (the
    layer's mask), averaged over heads, as in the attention itself."""
    head_dim = attn.head_dim
    query, keys = _heads(captured["q"], kind.layout, head_dim), _heads(captured["k"], kind.layout, head_dim)
    batch, _, length, _ = keys.shape
    rows = _last_local(job).to(keys.device)
    cos, sin = (t.expand(batch, length, t.shape[-1]) for t in position_embeddings)
    pick = rows.view(batch, 1, 1, 1).expand(batch, query.shape[1], 1, head_dim)
    query = query.expand(batch, *query.shape[1:]).gather(2, pick)  # (B, heads, 1, d)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
    cos_last, sin_last = (t.gather(1, rows.view(batch, 1, 1).expand(batch, 1, t.shape[-1])) for t in (cos, sin))
    query = rotary(query, query, cos_last, sin_last)[0]  # it rotates a (q, k) pair: each is rotated alone
    keys = rotary(keys, keys, cos, sin)[1]
    key_mask = _key_mask(mask, rows, batch, length)
    if job["index"] is not None:
        key_mask = key_mask & (job["index"] >= 0).to(key_mask.device)
    return attention_scores(query, keys, attn.scaling, key_mask=key_mask.to(keys.device))


def _layer_forward(layer: nn.Module, plan: dict, run: dict, index: int, hidden_states, *args, **kwargs):
    """Patched ``forward`` of decoder layers ``K_1..``: at a pruning prefill, the first layer of a
    stage drops image tokens and every one runs on the kept rows of the mask, position ids and
    position embeddings; at a later step on a pruned cache, the mask's columns are mapped to the
    layer's cached slots."""
    job = run["job"]
    stage = plan["stage_of"][index]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if job is not None:
        if plan["starts"].get(index) is not None:
            hidden_states = _prune(plan, job, stage, hidden_states, cache)
        kwargs = _gathered(job, kwargs)
    elif cache is not None and STATE in cache.__dict__:
        kwargs = _decode_kwargs(cache.__dict__[STATE], stage, index, cache, hidden_states.shape[1], kwargs)
    return type(layer).forward(layer, hidden_states, *args, **kwargs)


def _top(scores: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool: per row the ``keep[b]`` image tokens with the highest scores (ties: the
    earlier token)."""
    order = scores.masked_fill(~image, -float("inf")).sort(dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                             .expand_as(order).contiguous())
    return image & (ranks < keep[:, None])


def _prune(plan: dict, job: dict, stage: int, hidden_states: torch.Tensor, cache) -> torch.Tensor:
    """Stage ``stage``'s selection on the current rows; returns the kept hidden states and
    records the kept columns (job, info, cache)."""
    if job["stage"] != stage or job["scores"] is None:
        raise RuntimeError(f"{plan['method']}: layer {plan['stages'][stage][0] - 1} did not score the tokens "
                           f"before layer {plan['stages'][stage][0]}")
    batch, length, width = hidden_states.shape
    device = hidden_states.device
    index = job["index"]
    _check_length(plan, job, length)
    if index is None:
        index = torch.arange(length, device=device).expand(batch, length)
    valid = index >= 0
    image = job["image_mask"].to(device).gather(1, index.clamp(min=0)) & valid
    ratio = plan["stages"][stage][1]
    keep = torch.tensor([round(int(n) * (1 - ratio)) for n in image.sum(dim=1).tolist()], device=device)
    scores = job["scores"].to(device)
    chosen = _top(scores, image, keep)
    local = _left_padded((valid & ~image) | chosen)
    pad = local < 0
    new_index = index.gather(1, local.clamp(min=0)).masked_fill(pad, -1)
    picked = _left_padded(chosen)
    image_kept = index.gather(1, picked.clamp(min=0)).masked_fill(picked < 0, -1)
    rows = _left_padded(image)
    image_scores = scores.gather(1, rows.clamp(min=0)).masked_fill(rows < 0, float("nan"))
    identity = job["index"] is None and new_index.shape[1] == length and not bool(pad.any())
    job.update(index=None if identity else new_index, stage=stage + 1, scores=None, memo={},
               pads=bool(pad.any()) or job["pads"])
    job["columns"].append(None if identity else new_index)  # None: nothing pruned yet, the layer is unchanged
    record = {"layer": plan["stages"][stage][0], "ratio": ratio, "kept": new_index, "image_kept": image_kept,
              "scores": image_scores}
    plan["info"]["stages"].append(record)
    plan["info"].update(kept=new_index, image_kept=image_kept, scores=image_scores)
    if cache is not None:
        cache.__dict__[STATE] = {"columns": job["columns"], "length": job["image_mask"].shape[1],
                                 "pads": job["pads"], "real": job["real"], "rebuild": plan.get("window") is not None}
    if identity:
        return hidden_states
    return hidden_states.gather(1, local.clamp(min=0)[..., None].expand(-1, -1, width)).masked_fill(pad[..., None], 0)


def _check_length(plan: dict, job: dict, length: int) -> None:
    """The language model must receive the prompt's own layout (no other patch dropping tokens)."""
    if job["index"] is None and length != job["image_mask"].shape[1]:
        raise ValueError(f"{plan['method']}: the language model received {length} tokens for a prompt of "
                         f"{job['image_mask'].shape[1]}: another patch dropped tokens before it (a vision-side "
                         f"compress= in {plan['name']}); FastV / PyramidDrop cannot be combined with it")


def _causal(index: torch.Tensor) -> torch.Tensor:
    """``(B, 1, L', L')`` bool causal mask over original positions ``index`` (pads: self only)."""
    pad = index < 0
    allowed = (index[:, None, :] <= index[:, :, None]) & ~pad[:, None, :]
    eye = torch.eye(index.shape[1], dtype=torch.bool, device=index.device)
    return (allowed | (pad[:, :, None] & eye))[:, None]


def _gathered(job: dict, kwargs: dict) -> dict:
    """The layer's kwargs at the current rows (each full-layout tensor gathered once per stage)."""
    index = job["index"]
    if index is None:  # nothing pruned yet
        return kwargs
    memo, kwargs = job["memo"], dict(kwargs)
    for name in ("attention_mask", "position_ids", "position_embeddings"):
        value = kwargs.get(name)
        key = (name, id(value))
        if key not in memo:
            pad = index < 0
            if name == "attention_mask":
                if value is None:
                    new = _causal(index) if job["pads"] else None
                elif isinstance(value, torch.Tensor) and value.dim() == 4:
                    new = gather_4d(value, index.to(value.device), pad.to(value.device))
                else:
                    raise ValueError(f"FastV / PyramidDrop prune 4-D attention masks, the language model built "
                                     f"{getattr(value, 'shape', type(value).__name__)}")
            elif value is None:
                new = None
            elif name == "position_ids":
                new = gather_last(value, index.to(value.device))
            else:
                new = tuple(t.expand(index.shape[0], *t.shape[1:]).gather(
                    1, index.clamp(min=0).to(t.device)[..., None].expand(-1, -1, t.shape[-1])) for t in value)
            memo[key] = (value, new)  # holding value keeps its id unique
        kwargs[name] = memo[key][1]
    return kwargs


def _decode_kwargs(state: dict, stage: int, index: int, cache, steps: int, kwargs: dict) -> dict:
    """A step on a pruned cache: the layer's mask over every token -> over its cached slots (the
    stage's kept prompt columns, then the tokens added since the prefill)."""
    columns, length = state["columns"][stage], state["length"]
    if columns is None:  # the stage pruned nothing: the layer caches every token
        return kwargs
    batch = columns.shape[0]
    mask = kwargs.get("attention_mask")
    kwargs = dict(kwargs)
    if state["rebuild"] or (mask is None and state["pads"]):
        kwargs["attention_mask"] = _decode_mask(state, columns, cache.layers[index].get_seq_length(), steps, mask)
    elif isinstance(mask, torch.Tensor):
        total = mask.shape[-1]
        if mask.dim() != 4 or mask.shape[0] not in (1, batch) or total < length:
            raise ValueError(f"FastV / PyramidDrop cannot map a decoding mask of shape {tuple(mask.shape)} onto a "
                             f"cache pruned from {length} tokens for a batch of {batch}")
        added = torch.arange(length, total, device=mask.device).expand(batch, total - length)
        slots = torch.cat([columns.to(mask.device), added], dim=1)
        mask = mask.expand(batch, *mask.shape[1:])
        out = mask.gather(3, slots.clamp(min=0)[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
        blocked = False if out.dtype == torch.bool else torch.finfo(out.dtype).min
        kwargs["attention_mask"] = out.masked_fill((slots < 0)[:, None, None, :], blocked)
    return kwargs


def _decode_mask(state: dict, columns: torch.Tensor, cached: int, steps: int, like) -> torch.Tensor:
    """``(B, 1, steps, cached + steps)``: a step's mask over a pruned layer's slots, built from the
    prefill's kept columns (their padding) and causal over the tokens added since: SDPA's
    causal shortcut (no mask) with padded rows, and Gemma 3's sliding layers within the window
    (where a sliding layer attends as a full one), whose masks transformers sizes by another layer."""
    batch, kept = columns.shape
    added = cached - kept  # tokens cached since the prefill
    valid = columns >= 0
    if state["real"] is not None:
        valid = valid & state["real"].to(columns.device).gather(1, columns.clamp(min=0))
    allowed = torch.ones(batch, 1, steps, cached + steps, dtype=torch.bool, device=columns.device)
    allowed[..., :kept] = valid[:, None, None, :]
    allowed[..., kept + added:] = torch.ones(steps, steps, dtype=torch.bool, device=columns.device).tril()
    if isinstance(like, torch.Tensor) and like.dtype != torch.bool:  # eager's additive masks
        return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
            ~allowed.to(like.device), torch.finfo(like.dtype).min)
    return allowed


def _deepstack(lm: nn.Module, run: dict, hidden_states, visual_pos_masks, visual_embeds):
    """Patched Qwen3-VL ``_deepstack_process``: after a pruning, the DeepStack features of the
    kept visual tokens are added at their (pruned) rows."""
    job = run["job"]
    if job is not None and job["index"] is not None and visual_pos_masks is not None:
        index = job["index"].to(visual_pos_masks.device)
        pad = index < 0
        kept = torch.zeros(visual_pos_masks.shape, dtype=torch.long, device=index.device)
        kept = kept.scatter_add(1, index.clamp(min=0), (~pad).long()) > 0
        visual_embeds = visual_embeds[kept[visual_pos_masks].to(visual_embeds.device)]
        visual_pos_masks = visual_pos_masks.gather(1, index.clamp(min=0)) & ~pad
    return type(lm)._deepstack_process(lm, hidden_states, visual_pos_masks, visual_embeds)
