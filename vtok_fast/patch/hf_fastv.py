"""FastV (Chen et al. 2024) in the language model of a Hugging Face LLaVA model, batched, on SDPA.

``apply(model, compress=("fastv", {"layer": K, "ratio": R}))`` (defaults ``K = 2``, ``R = 0.5``,
FastV's README) patches a ``LlavaForConditionalGeneration`` / ``LlavaModel`` in place. When a
prompt with image tokens is processed from an empty cache (the prefill of ``generate``, or any
forward without a cache), layer ``K - 1``'s attention also yields the attention each key receives
from the **last** token (the last position whose ``attention_mask`` is 1), averaged over heads:
:func:`vtok_fast.reduce.attention_scores.attention_scores` of that one query row (post-RoPE query
and keys, causal and padding masks applied), so the attention itself keeps its implementation
(``sdpa`` or ``eager``) and no ``L x L`` matrix is built. Before layer ``K`` the image tokens of
each row are pruned to the ``round(N · (1 − R))`` (Python's rounding) that receive the most attention
(:func:`vtok_fast.reduce.select.attn_topk`: ties to the earlier token), every text token is kept,
and layers ``K..`` run on the kept tokens in their original order with their **original** position
ids (RoPE angles), causal mask and padding mask. Layers ``0..K-1`` always see every token.

Generation with a ``DynamicCache``: layers ``< K`` cache every token, layers ``>= K`` only the kept
ones; decoding steps keep working with this cache (their position ids continue from the unpruned
length, ``cache.get_seq_length()`` — layer 0 — still counts every token, and the padding mask is
mapped to the pruned layers' slots, recorded on the cache). Pruning happens at the prefill only;
without a cache (``use_cache=False``) every forward is a prefill and prunes for its own last token.
Every row of a batch must hold the same number of image tokens (one image each, or the same
count), and the last token of a row must be text. The forward's outputs (logits, hidden states)
cover the kept tokens: ``model._fastv_info["kept"]`` ``(B, L')`` holds their prompt positions
(``"image_kept"``: the kept image tokens; ``"scores"``: every image token's score). ``labels=``
``(B, L)`` of a patched ``LlavaForConditionalGeneration`` are aligned to them: each kept position
is scored against the token after it in the prompt, as without pruning (``shift_labels`` of the
model's loss), and the positions pruned at layer ``K`` add no loss term. ``R = 0`` keeps every token
(outputs and loss equal the unpatched model's). ``remove(model)`` restores every method;
parameters and ``state_dict`` are never changed; a failing ``apply`` changes nothing.

What this adds over the official FastV code (which runs batch size 1 with eager attention only,
reading the full ``L x L`` attention map of layer ``K - 1``): batches (left or right padding), any
attention implementation that takes the standard mask (``sdpa`` and ``eager``) because the scores
come from a single-row computation, ``generate`` with a KV cache (prune once at the prefill,
decode on the pruned cache), GQA models, and the kept positions returned.

Supported: transformers ``TRANSFORMERS_TESTED`` (``vtok_fast.patch._common``; the patch follows
its signatures: ``LlavaModel.forward(..., cache=...)``, decoder layers and attention called with
``position_embeddings`` and ``cache``, no ``cache_position``, the model's ``apply_rotary_pos_emb``
and a loss taking ``shift_labels``; a release without them is refused at ``apply``)
``LlavaForConditionalGeneration`` / ``LlavaModel`` with the library's forward, whose language
model is ``LlamaModel`` (LLaVA-1.5), ``MistralModel`` or ``Qwen2Model`` without sliding-window
layers, with the library's decoder layers and attention, ``attn_implementation`` ``"sdpa"`` or
``"eager"``, and a ``DynamicCache`` of full-attention layers (or no cache). Anything else raises
one ``ValueError`` naming the reason: at ``apply`` for the model, at the prefill for the attention
implementation, the cache, a 4-D ``attention_mask`` or the batch's image-token counts. Greedy,
sampling and beam search decoding run (beams of one prompt are pruned alike, so reordering them
keeps the recorded cache slots valid); cache cropping or re-batching between steps (assisted
decoding) is not supported.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast.measure.budget import FASTV_DEFAULT_LAYER as DEFAULT_LAYER
from vtok_fast.measure.budget import FASTV_DEFAULT_RATIO as DEFAULT_RATIO
from vtok_fast.patch._common import Api, all_or_nothing, check_api, overridden, patch, restore
from vtok_fast.patch.llava_common import find_llava, image_token_mask, parse_spec
from vtok_fast.reduce.attention_scores import attention_scores
from vtok_fast.reduce.compress import compress as run_compress

FEATURE = "hf_fastv"
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
CACHE_STATE = "_vtok_fast_fastv"  # on a pruned DynamicCache: {"columns": (B, L'), "length": L}
_PATCHER = "vtok_fast.patch.hf FastV"


def apply(model: nn.Module, *, compress=("fastv", {})) -> nn.Module:
    """Patch the LLaVA model's language model for FastV pruning (see the module docstring).
    Re-applying replaces the previous layer / ratio; a call that raises changes nothing."""
    method, budget = parse_spec(compress)
    if method != "fastv":
        raise ValueError(f"hf_fastv handles compress=('fastv', {{...}}), got method {method!r}")
    unknown = sorted(set(budget) - {"layer", "ratio"})
    if unknown:
        raise TypeError(f"fastv takes layer= and ratio=, got {', '.join(unknown)}")
    llava = find_llava(model)
    kinds = _supported_kinds()
    if type(llava.language_model) not in kinds:
        raise ValueError(f"the language model is {type(llava.language_model).__name__}; FastV supports "
                         f"{', '.join(c.__name__ for c in kinds)}")
    num_layers = len(llava.language_model.layers)
    layer = budget.get("layer", DEFAULT_LAYER)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 1 <= layer < num_layers:
        raise ValueError(f"fastv layer must be an int in [1, {num_layers - 1}] (prune after layer K - 1 of the "
                         f"{num_layers} decoder layers), got {layer!r}")
    ratio = budget.get("ratio", DEFAULT_RATIO)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        # [0, 1), as vtok_fast.budget counts it: ratio 1 would prune every image token
        raise ValueError(f"fastv ratio must be the fraction of image tokens pruned, in [0, 1), got {ratio!r}")
    _check_signatures(model, llava)
    with all_or_nothing():
        remove(model)  # re-applying replaces the previous layer / ratio
        layers = _supported_layers(llava)

        layer, ratio = int(layer), float(ratio)
        info = {"layer": layer, "ratio": ratio, "kept": None, "image_kept": None, "scores": None}
        plan = {"layer": layer, "ratio": ratio, "info": info, "config": llava.language_model.config}
        run = {"job": None, "capture": None, "kept": None}
        scoring = layers[layer - 1].self_attn
        replacements = [(llava, "forward", functools.partial(_llava_forward, llava, plan, run)),
                        (scoring, "forward", functools.partial(_scoring_attention_forward, scoring, run)),
                        (llava, "_fastv_info", info)]
        if model is not llava:
            replacements.append((model, "_fastv_info", info))
            if _with_labels(model):
                forward = functools.partial(_labels_forward, model, run)
                forward.__signature__ = inspect.signature(model.forward)  # generate() reads it
                replacements.append((model, "forward", forward))
        for name in ("q_proj", "k_proj"):
            proj = getattr(scoring, name)
            replacements.append((proj, "forward", functools.partial(_capture_forward, proj, run, name)))
        for index in range(layer, len(layers)):
            replacements.append((layers[index], "forward",
                                 functools.partial(_pruned_layer_forward, layers[index], plan, run, index == layer)))
        patch(llava, FEATURE, replacements)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (no-op if not patched)."""
    restore(model, FEATURE)
    return model


# --- what is supported -----------------------------------------------------------------------------

def _supported_kinds() -> dict:
    """language-model class -> (decoder-layer class, attention class)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return {llama.LlamaModel: (llama.LlamaDecoderLayer, llama.LlamaAttention),
            mistral.MistralModel: (mistral.MistralDecoderLayer, mistral.MistralAttention),
            qwen2.Qwen2Model: (qwen2.Qwen2DecoderLayer, qwen2.Qwen2Attention)}


def _with_labels(model: nn.Module) -> bool:
    """Whether ``model`` is a ``LlavaForConditionalGeneration`` with the library's forward (whose
    ``labels=`` the patch aligns to the kept positions)."""
    from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration

    return isinstance(model, LlavaForConditionalGeneration) and not overridden(model, LlavaForConditionalGeneration)


def _supported_layers(llava: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``llava``'s language model, or a ValueError naming what is not supported."""
    from transformers.models.llava.modeling_llava import LlavaModel

    if overridden(llava, LlavaModel):
        raise ValueError(f"{type(llava).__name__}.forward is not LlavaModel's (overridden or already patched)")
    lm = llava.language_model
    if "forward" in lm.__dict__:
        raise ValueError(f"language_model.forward ({type(lm).__name__}) is already replaced by another patch")
    layer_cls, attn_cls = _supported_kinds()[type(lm)]
    config = lm.config
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) is not None or types != {"full_attention"}:
        raise ValueError(f"the language model uses sliding-window attention (sliding_window="
                         f"{getattr(config, 'sliding_window', None)}, layer_types {sorted(types)}); FastV needs "
                         "full attention in every layer")
    for i, layer in enumerate(lm.layers):
        if type(layer) is not layer_cls or "forward" in layer.__dict__:
            raise ValueError(f"language_model.layers[{i}] is not an unpatched {layer_cls.__name__}")
        if type(layer.self_attn) is not attn_cls or "forward" in layer.self_attn.__dict__:
            raise ValueError(f"language_model.layers[{i}].self_attn is not an unpatched {attn_cls.__name__}")
    return lm.layers


def _check_signatures(model: nn.Module, llava: nn.Module) -> None:
    """The call conventions of transformers this patch relies on (ValueError at ``apply``)."""
    from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel

    layer_cls, attn_cls = _supported_kinds()[type(llava.language_model)]
    apis = [Api(LlavaModel, "forward", ("input_ids", "pixel_values", "attention_mask", "position_ids", "cache",
                                        "inputs_embeds")),
            Api(layer_cls, "forward", ("hidden_states",), True),
            Api(layer_cls, "forward", ("attention_mask", "position_ids", "cache", "use_cache", "position_embeddings")),
            Api(attn_cls, "forward", ("hidden_states",), True),
            Api(attn_cls, "forward", ("position_embeddings", "attention_mask", "cache")),
            Api(sys.modules[attn_cls.__module__], "apply_rotary_pos_emb", ("q", "k", "cos", "sin"), True)]
    if model is not llava and _with_labels(model):
        apis += [Api(LlavaForConditionalGeneration, "forward", ("labels", "logits_to_keep")),
                 Api(model, "loss_function", ("logits", "labels", "vocab_size", "shift_labels"))]
    check_api(_PATCHER, apis)


# --- the patched forwards -------------------------------------------------------------------------


def _new_job(plan: dict, image_mask: torch.Tensor, attention_mask, cache) -> dict:
    """Check a prefill that prunes and return its state (shared by the patched layers)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    impl = plan["config"]._attn_implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"FastV runs with attn_implementation in {ATTENTION_IMPLEMENTATIONS}; the language model "
                         f"uses {impl!r}")
    if cache is not None and not (isinstance(cache, DynamicCache)
                                  and all(type(layer) is DynamicLayer for layer in cache.layers)):
        raise ValueError(f"FastV prunes into a DynamicCache of full-attention layers, got {type(cache).__name__}")
    batch, length = image_mask.shape
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != (batch, length)):
        raise ValueError(f"FastV needs a 2-D (B, L) = ({batch}, {length}) attention_mask (or none) at the prefill, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    counts = image_mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"FastV needs the same number of image tokens in every row of the batch, got "
                         f"{counts.tolist()}")
    positions = torch.arange(length, device=image_mask.device).expand(batch, length)
    real = None if attention_mask is None else attention_mask.to(device=image_mask.device) != 0
    last = positions.max(dim=1).values if real is None else torch.where(real, positions, -1).max(dim=1).values
    if bool((last < 0).any()) or bool(image_mask.gather(1, last.clamp(min=0)[:, None]).any()):
        raise ValueError("FastV ranks image tokens by the attention of each row's last token, which must be a "
                         "text token (the prompt must continue after the image)")
    key_mask = positions <= last[:, None]
    if real is not None:
        key_mask = key_mask & real
    num_image = int(counts[0])
    return {"image_mask": image_mask, "last": last, "key_mask": key_mask, "scores": None, "pruned": None,
            "keep": round(num_image * (1 - plan["ratio"]))}


def _llava_forward(llava: nn.Module, plan: dict, run: dict, input_ids=None, pixel_values=None, attention_mask=None,
                   position_ids=None, cache=None, inputs_embeds=None, **kwargs):
    """Patched ``LlavaModel.forward``: at a prefill with image tokens, set up the pruning."""
    if cache is None and "past_key_values" in kwargs:  # the deprecated name
        cache = kwargs.pop("past_key_values")
    job = None
    if cache is None or cache.get_seq_length() == 0:
        if cache is not None:
            cache.__dict__.pop(CACHE_STATE, None)  # a reused, emptied cache
        image_mask = image_token_mask(llava, input_ids, inputs_embeds)
        if image_mask is not None and bool(image_mask.any()):
            job = _new_job(plan, image_mask, attention_mask, cache)
    run["job"], run["kept"] = job, None
    try:
        out = type(llava).forward(llava, input_ids=input_ids, pixel_values=pixel_values,
                                  attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                  inputs_embeds=inputs_embeds, **kwargs)
        run["kept"] = None if job is None else job.get("kept")
        return out
    finally:
        run["job"] = None
        run["capture"] = None


def _labels_forward(model: nn.Module, run: dict, *args, labels=None, **kwargs):
    """Patched ``LlavaForConditionalGeneration.forward``: given ``labels``, the loss over the
    positions this forward kept, each against the token after it in the prompt (its target
    without pruning); otherwise the original."""
    keep = kwargs.get("logits_to_keep", 0)
    if labels is None or args or not (isinstance(keep, int) and keep == 0):
        return type(model).forward(model, *args, labels=labels, **kwargs)
    out = type(model).forward(model, **kwargs)
    named = inspect.signature(type(model).forward).parameters
    extra = {k: v for k, v in kwargs.items() if k not in named}  # what the original passes to its loss
    targets = F.pad(labels, (0, 1), value=extra.get("ignore_index", -100))[:, 1:]
    if run["kept"] is not None:
        targets = targets.gather(1, run["kept"].to(targets.device))
    logits = out[0] if isinstance(out, tuple) else out.logits
    loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.text_config.vocab_size,
                               shift_labels=targets, **extra)
    return (loss, *out) if isinstance(out, tuple) else type(out)(loss=loss, **out)


def _capture_forward(proj: nn.Module, run: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """Patched ``q_proj`` / ``k_proj`` ``forward`` of layer ``K - 1``: the original; while scores
    are wanted its output is kept."""
    y = type(proj).forward(proj, x)
    if run["capture"] is not None:
        run["capture"][name] = y
    return y


def _scoring_attention_forward(attn: nn.Module, run: dict, hidden_states: torch.Tensor,
                               position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """Patched attention ``forward`` of layer ``K - 1``: the original; at a pruning prefill it also
    scores every key by the last token's attention."""
    job = run["job"]
    if job is None:
        return type(attn).forward(attn, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    run["capture"] = {}
    try:
        out = type(attn).forward(attn, hidden_states, position_embeddings=position_embeddings,
                                 attention_mask=attention_mask, cache=cache, **kwargs)
        captured = run["capture"]
    finally:
        run["capture"] = None
    job["scores"] = _last_token_scores(attn, captured["q_proj"], captured["k_proj"], position_embeddings, job)
    return out


def _last_token_scores(attn: nn.Module, queries: torch.Tensor, keys: torch.Tensor, position_embeddings,
                       job: dict) -> torch.Tensor:
    """``(B, L)`` fp32: softmax of the last token's post-RoPE query over the post-RoPE keys (causal
    and padding masks), averaged over heads, as in the attention itself."""
    batch, length, _ = keys.shape
    head_dim = attn.head_dim
    rows = job["last"].view(batch, 1, 1)
    cos, sin = (t.expand(batch, length, t.shape[-1]) for t in position_embeddings)
    query = queries.gather(1, rows.expand(batch, 1, queries.shape[-1]))
    query = query.view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, heads, 1, d)
    keys = keys.view(batch, length, -1, head_dim).transpose(1, 2)  # (B, kv heads, L, d)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
    cos_last, sin_last = (t.gather(1, rows.expand(batch, 1, t.shape[-1])) for t in (cos, sin))
    query = rotary(query, query, cos_last, sin_last)[0]  # it rotates a (q, k) pair: each is rotated alone
    keys = rotary(keys, keys, cos, sin)[1]
    return attention_scores(query, keys, attn.scaling, key_mask=job["key_mask"])


def _pruned_layer_forward(layer: nn.Module, plan: dict, run: dict, first: bool, hidden_states: torch.Tensor,
                          attention_mask=None, position_ids=None, cache=None, use_cache=False,
                          position_embeddings=None, **kwargs):
    """Patched ``forward`` of decoder layers ``K..``: at a pruning prefill, the first one drops the
    image tokens and every one runs on the kept rows of the mask and position embeddings; at a
    decoding step on a pruned cache, the mask's columns are mapped to the cached slots."""
    job = run["job"]
    if job is not None:
        if first:
            hidden_states = _prune(plan, job, hidden_states, attention_mask, position_ids, position_embeddings,
                                   cache)
        attention_mask, position_ids, position_embeddings = job["pruned"]
    elif isinstance(attention_mask, torch.Tensor) and cache is not None and CACHE_STATE in cache.__dict__:
        attention_mask = _map_columns(attention_mask, cache.__dict__[CACHE_STATE])
    return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)


def _rows(x: torch.Tensor | None, kept: torch.Tensor, dim: int = 1) -> torch.Tensor | None:
    """``x`` (batch 1 or B) at the ``kept`` ``(B, L')`` indices along ``dim``."""
    if x is None:
        return None
    batch = kept.shape[0]
    x = x.expand(batch, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = batch, kept.shape[1]
    index = kept.view(shape).expand(*x.shape[:dim], kept.shape[1], *x.shape[dim + 1:])
    return x.gather(dim, index)


def _prune(plan: dict, job: dict, hidden_states, attention_mask, position_ids, position_embeddings, cache):
    if job["scores"] is None:
        raise RuntimeError("FastV: layer K - 1 did not run its attention before layer K")
    image_mask = job["image_mask"]
    batch, length = image_mask.shape
    image_positions = image_mask.nonzero()[:, 1].view(batch, -1)  # (B, N), ascending
    image_scores = job["scores"].gather(1, image_positions)
    picked = run_compress(_rows(hidden_states, image_positions), "attn_topk", keep=job["keep"], scores=image_scores)
    image_kept = image_positions.gather(1, picked.positions)
    keep_mask = (~image_mask).scatter(1, image_kept, True)
    kept = keep_mask.nonzero()[:, 1].view(batch, -1)  # (B, L'), ascending
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
            raise ValueError(f"FastV prunes 4-D attention masks, the language model built "
                             f"{type(attention_mask).__name__}")
        attention_mask = _rows(_rows(attention_mask, kept, 2), kept, 3)
    job["pruned"] = (attention_mask, _rows(position_ids, kept),
                     None if position_embeddings is None else tuple(_rows(t, kept) for t in position_embeddings))
    if cache is not None:
        cache.__dict__[CACHE_STATE] = {"columns": kept, "length": length}
    job["kept"] = kept
    plan["info"].update(kept=kept, image_kept=image_kept, scores=image_scores)
    return _rows(hidden_states, kept)


def _map_columns(attention_mask: torch.Tensor, state: dict) -> torch.Tensor:
    """A decoding step's mask over every token (layer 0's cache) -> over a pruned layer's slots:
    the kept prompt columns, then the tokens added since the prefill."""
    columns, length = state["columns"], state["length"]
    batch, total = columns.shape[0], attention_mask.shape[-1]
    if attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, batch) or total < length:
        raise ValueError(f"FastV cannot map a decoding mask of shape {tuple(attention_mask.shape)} onto a cache "
                         f"pruned from {length} tokens for a batch of {batch}")
    added = torch.arange(length, total, device=columns.device).expand(batch, total - length)
    return _rows(attention_mask, torch.cat([columns, added], dim=1), 3)
