"""FastV (Chen et al. 2024) and PyramidDrop (Xing et al. 2025) inside the language model of a Hugging
Face VLM, batched, on SDPA, with ``generate`` on a KV cache.

``apply(model, compress=("fastv", {"layer": K, "ratio": R}))`` (defaults ``K = 2`` (``1`` in a
2-layer model), ``R = 0.5``, FastV's README): one pruning stage. ``apply(model,
compress=("pyramiddrop", {"layers": [K1, K2, ...], "ratios": [R1, R2, ...]}))`` or ``{"layers":
[...], "ratio": R}`` (one ratio for every stage): PyramidDrop's stages. ``R`` is always the
fraction of the image tokens *pruned* (as FastV's R and ``vtok_fast.budget``): before layer
``K_s`` each row keeps ``round(n · (1 − R_s))`` (Python's round) of the ``n`` image tokens still
there after stage ``s − 1`` (``n`` = all of them before ``K_1``), so PyramidDrop's paper setting
(λ = 0.5 kept per stage, boundaries 8, 16, 24 of 32 layers) is ``{"layers": [8, 16, 24],
"ratio": 0.5}`` and leaves ``N -> N/2 -> N/4 -> N/8`` image tokens. Defaults: ``layers`` at a
quarter, half and three quarters of the depth (``round(n·i/4)``, those in ``[1, n − 1]``),
``ratio = 0.5``. ``layers`` strictly increasing in ``[1, n − 1]``, ratios in ``[0, 1)``; anything
else raises a ValueError (a TypeError for a wrong type or an unknown key) naming the argument.

Models: ``LlavaForConditionalGeneration`` / ``LlavaModel`` (LLaVA-1.5: ``LlamaModel``,
``MistralModel`` or ``Qwen2Model`` language model) and the families of
:mod:`vtok_fast.patch.families` (by ``config.model_type``): Qwen2-VL, Qwen2.5-VL, Qwen3-VL
(M-RoPE; DeepStack features follow the kept tokens), InternVL, Gemma 3, Idefics3, SmolVLM and any
family added there whose language model is one of :func:`vtok_fast.patch.lm_prune.kinds`
(Llama, Mistral, Qwen2, Qwen3, Qwen2-VL / 2.5-VL / 3-VL text, Gemma 3 text). The mechanics, the
scores and the cache are :mod:`vtok_fast.patch.lm_prune`'s: the last token's attention at layer
``K_s − 1`` read from one query row (no ``L x L`` matrix, the attention keeps ``sdpa`` / ``eager``),
kept tokens in their original order with their **original** position ids / M-RoPE angles and
masks, layers ``< K_1`` cache every token and the later ones only their stage's kept tokens;
pruning happens at the prefill (no cache, or an empty one), decoding steps run on the pruned cache.
Rows of a batch may hold different numbers of image tokens in the families (each keeps its own
count; rows are left-padded); LLaVA-1.5 keeps FastV's rule of the same count in every row (a
ValueError). The last token of every row must be text.

The outputs (logits, hidden states) cover the kept tokens: ``model._fastv_info`` (FastV) /
``model._pyramiddrop_info`` (PyramidDrop) hold ``"kept"`` ``(B, L')`` (their prompt positions,
-1 at pads), ``"image_kept"`` (the kept image tokens, -1 pads), ``"scores"`` (every image token
still there before the last stage, NaN pads) and ``"stages"`` (the same per stage). ``labels=``
``(B, L)`` are aligned to the kept positions: each is scored against the token after it in the
prompt (``shift_labels``), the pruned ones add no term. ``R = 0`` keeps every token (outputs,
loss and generations equal the unpatched model's).

Refused (one ValueError): at ``apply``, another model or language model, sliding-window layers
(but Gemma 3's, see below), decoder layers / attention already replaced by another patch, a
transformers release whose signatures differ (``check_api``), a family model already carrying a
vision-side ``compress=`` (the pruning ranks the prompt's own placeholders); at the prefill, an
``attn_implementation`` other than ``sdpa`` / ``eager``, a cache other than a ``DynamicCache``, a
4-D ``attention_mask``, a last token that is an image token. Gemma 3 runs while the prompt and the
generated tokens fit its sliding window (``config.text_config.sliding_window``; a ValueError at
the step that would pass it): within it a sliding layer attends as a full one, beyond it a pruned
sliding layer's cache would evict by kept slots, not by distance. LLaVA with a vision-side
``compress=`` and FastV together needs the compressed count in the prompt
(``configure_processor``). ``remove(model)`` restores every method; parameters and ``state_dict``
are never changed; a failing ``apply`` changes nothing. Greedy, sampling and beam search run;
cache cropping or re-batching between steps (assisted decoding) is not supported.

What this adds over the official FastV / PyramidDrop code (batch size 1, eager attention, the full
``L x L`` map): batches with padding, SDPA, ``generate`` with a KV cache, GQA, M-RoPE, the kept
positions returned.
"""
from __future__ import annotations

import functools
import inspect
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast.measure.budget import FASTV_DEFAULT_LAYER as DEFAULT_LAYER
from vtok_fast.measure.budget import FASTV_DEFAULT_RATIO as DEFAULT_RATIO
from vtok_fast.patch import families, lm_prune
from vtok_fast.patch._common import Api, all_or_nothing, check_api, is_patched, overridden, patch, restore
from vtok_fast.patch.llava_common import image_token_mask, parse_spec, token_mask

FEATURE = lm_prune.FEATURE
METHODS = ("fastv", "pyramiddrop")
ATTENTION_IMPLEMENTATIONS = lm_prune.ATTENTION_IMPLEMENTATIONS
CACHE_STATE = lm_prune.STATE
INFO = {"fastv": "_fastv_info", "pyramiddrop": "_pyramiddrop_info"}
LLAVA_KINDS = ("LlamaModel", "MistralModel", "Qwen2Model")  # LLaVA-1.5's language models
_PATCHER = "vtok_fast.patch.hf FastV / PyramidDrop"


def apply(model: nn.Module, *, compress=("fastv", {})) -> nn.Module:
    """Patch the model's language model for FastV / PyramidDrop pruning (see the module
    docstring). Re-applying replaces the previous stages; a call that raises changes nothing."""
    method, budget = parse_spec(compress)
    if method not in METHODS:
        raise ValueError(f"hf_fastv handles compress=('fastv', {{...}}) or ('pyramiddrop', {{...}}), got method "
                         f"{method!r}")
    host = _host(model)
    kind = _kind(host)
    stages = _stages(method, budget, len(host["lm"].layers))
    with all_or_nothing():
        remove(model)  # re-applying replaces the previous stages
        _check_seams(model, host, kind)
        inner, lm = host["inner"], host["lm"]
        info = {"method": method, "layers": [k for k, _ in stages], "ratios": [r for _, r in stages],
                "kept": None, "image_kept": None, "scores": None, "stages": []}
        if method == "fastv":
            info.update(layer=stages[0][0], ratio=stages[0][1])
        plan = lm_prune.plan_of(stages, len(lm.layers), method=("FastV", "PyramidDrop")[METHODS.index(method)],
                                info=info, config=lm.config, image_mask=host["image_mask"], name=host["name"],
                                window=host["window"], equal_counts=host["family"] is None)
        run = {"job": None, "capture": None, "kept": None, "length": None}
        replacements = lm_prune.replacements(inner, lm, kind, plan, run) + [(inner, INFO[method], info)]
        if model is not inner:
            replacements.append((model, INFO[method], info))
            replacements += _labels_replacements(model, host, run)
        patch(inner, FEATURE, replacements)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (no-op if not patched)."""
    restore(model, FEATURE)
    return model


# --- what is supported -----------------------------------------------------------------------------

def _host(model: nn.Module) -> dict:
    """Where the language model is: ``inner`` (the model holding it), ``lm``, ``family`` (None for
    LLaVA-1.5), ``name``, ``image_mask`` (the placeholders of a call), ``window`` (Gemma 3)."""
    from transformers.models.llava.modeling_llava import LlavaModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = families.find(model)
    if found is not None:
        family, inner = found
        lm = getattr(inner, family.language_model)
        token = getattr(inner.config, family.image_token)
        mask = functools.partial(token_mask, inner, token)
        return {"inner": inner, "lm": lm, "family": family, "name": family.name, "image_mask": mask,
                "window": _window(family, lm)}
    llavas = [m for m in model.modules() if isinstance(m, LlavaModel)]
    if len(llavas) != 1:
        names = ", ".join(sorted({f.name for f in families.FAMILIES.values()}))
        raise ValueError(f"FastV / PyramidDrop run in LlavaForConditionalGeneration / LlavaModel (LLaVA-1.5) and the "
                         f"families {names}; got {type(model).__name__} (config.model_type "
                         f"{families.model_type(model)!r})")
    llava = llavas[0]
    return {"inner": llava, "lm": llava.language_model, "family": None, "name": "LLaVA-1.5",
            "image_mask": functools.partial(image_token_mask, llava), "window": None}


def _window(family, lm: nn.Module) -> int | None:
    """The sliding window of a family whose sliding layers run within it (``Family.sliding_window``:
    Gemma 3), else None."""
    types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
    if family.sliding_window and "sliding_attention" in types:
        return int(lm.config.sliding_window)
    return None


def _kind(host: dict) -> lm_prune.Kind:
    """The language model's :class:`~vtok_fast.patch.lm_prune.Kind`, or a ValueError."""
    kinds = lm_prune.kinds()
    if host["family"] is None:
        kinds = {cls: kind for cls, kind in kinds.items() if cls.__name__ in LLAVA_KINDS}
    lm = host["lm"]
    if type(lm) not in kinds:
        raise ValueError(f"the language model is {type(lm).__name__}; FastV supports "
                         f"{', '.join(c.__name__ for c in kinds)}")
    return kinds[type(lm)]


def _fraction(name: str, value, method: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        # [0, 1), as vtok_fast.budget counts it: ratio 1 would prune every image token
        raise ValueError(f"{method} {name} must be the fraction of image tokens pruned, in [0, 1), got {value!r}")
    return float(value)


def _stages(method: str, budget: dict, num_layers: int) -> list[tuple[int, float]]:
    """``[(K_s, R_s)]`` from the budget, validated (see the module docstring)."""
    if method == "fastv":
        unknown = sorted(set(budget) - {"layer", "ratio"})
        if unknown:
            raise TypeError(f"fastv takes layer= and ratio=, got {', '.join(unknown)}")
        layer = budget.get("layer", min(DEFAULT_LAYER, num_layers - 1))
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 1 <= layer < num_layers:
            raise ValueError(f"fastv layer must be an int in [1, {num_layers - 1}] (prune after layer K - 1 of the "
                             f"{num_layers} decoder layers), got {layer!r}")
        return [(int(layer), _fraction("ratio", budget.get("ratio", DEFAULT_RATIO), method))]
    unknown = sorted(set(budget) - {"layers", "ratios", "ratio"})
    if unknown:
        raise TypeError(f"pyramiddrop takes layers=, ratios= and ratio=, got {', '.join(unknown)}")
    if "ratio" in budget and "ratios" in budget:
        raise TypeError("pyramiddrop takes ratio= (one for every stage) or ratios= (one per stage), not both")
    layers = budget.get("layers", default_layers(num_layers))
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"pyramiddrop layers must be a list of ints (the first layer of each pruned stage), got "
                        f"{layers!r}")
    if (not layers or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < num_layers
                          for k in layers) or any(a >= b for a, b in zip(layers, layers[1:]))):
        raise ValueError(f"pyramiddrop layers must be strictly increasing ints in [1, {num_layers - 1}] (the "
                         f"{num_layers} decoder layers: stage s prunes before layer K_s), got {layers!r}")
    ratios = budget.get("ratios", [budget.get("ratio", DEFAULT_RATIO)] * len(layers))
    if not isinstance(ratios, (list, tuple)):
        raise TypeError(f"pyramiddrop ratios must be a list of fractions (one per stage), got {ratios!r}")
    if len(ratios) != len(layers):
        raise ValueError(f"pyramiddrop ratios must give one fraction per stage ({len(layers)} layers), got "
                         f"{len(ratios)}")
    return [(int(k), _fraction("ratio" if "ratio" in budget else "ratios", r, method))
            for k, r in zip(layers, ratios)]


def default_layers(num_layers: int) -> list[int]:
    """PyramidDrop's stage boundaries scaled to ``num_layers`` (8, 16, 24 of 32: a quarter, half
    and three quarters of the depth), those in ``[1, num_layers - 1]``."""
    return sorted({round(num_layers * i / 4) for i in (1, 2, 3)} & set(range(1, num_layers)))


def _check_seams(model: nn.Module, host: dict, kind: lm_prune.Kind) -> None:
    """The modules and call conventions the patch relies on (ValueError at ``apply``)."""
    from vtok_fast.patch import hf_family_compress

    inner, lm, family = host["inner"], host["lm"], host["family"]
    if family is None:
        from transformers.models.llava.modeling_llava import LlavaModel

        if overridden(inner, LlavaModel):
            raise ValueError(f"{type(inner).__name__}.forward is not LlavaModel's (overridden or already patched)")
    elif "forward" in inner.__dict__:
        raise ValueError(f"{type(inner).__name__}.forward is already replaced by another patch")
    elif is_patched(inner, hf_family_compress.FEATURE):
        raise ValueError(f"FastV / PyramidDrop cannot run with a vision-side compress= in {family.name}: the "
                         "language model would receive fewer tokens than the prompt's placeholders it ranks; "
                         "choose one (vtok_fast.patch.unpatch(model) first)")
    if "forward" in lm.__dict__:
        raise ValueError(f"language_model.forward ({type(lm).__name__}) is already replaced by another patch")
    config = lm.config
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if host["window"] is None and (getattr(config, "sliding_window", None) is not None or types != {"full_attention"}):
        raise ValueError(f"the language model uses sliding-window attention (sliding_window="
                         f"{getattr(config, 'sliding_window', None)}, layer_types {sorted(types)}); FastV needs "
                         "full attention in every layer")
    for i, layer in enumerate(lm.layers):
        if type(layer) is not kind.layer or "forward" in layer.__dict__:
            raise ValueError(f"language_model.layers[{i}] is not an unpatched {kind.layer.__name__}")
        if type(layer.self_attn) is not kind.attention or "forward" in layer.self_attn.__dict__:
            raise ValueError(f"language_model.layers[{i}].self_attn is not an unpatched {kind.attention.__name__}")
    check_api(_PATCHER, _apis(model, host, kind))


def _apis(model: nn.Module, host: dict, kind: lm_prune.Kind) -> list[Api]:
    """The private signatures of transformers the patch follows."""
    import sys

    inner, lm = host["inner"], host["lm"]
    inner_params = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds")
    apis = [Api(type(inner), "forward", inner_params),
            Api(kind.layer, "forward", ("hidden_states",), True),
            Api(kind.layer, "forward", kind.layer_params),
            Api(kind.attention, "forward", ("hidden_states",), True),
            Api(kind.attention, "forward", ("position_embeddings", "attention_mask", "cache")),
            Api(sys.modules[kind.attention.__module__], "apply_rotary_pos_emb", ("q", "k", "cos", "sin"), True)]
    if hasattr(type(lm), "_deepstack_process"):
        apis.append(Api(type(lm), "_deepstack_process", ("hidden_states", "visual_pos_masks", "visual_embeds"), True))
    if host["family"] is None and model is not inner and _with_labels(model):
        from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration

        apis += [Api(LlavaForConditionalGeneration, "forward", ("labels", "logits_to_keep")),
                 Api(model, "loss_function", ("logits", "labels", "vocab_size", "shift_labels"))]
    elif host["family"] is not None and hasattr(model, "loss_function"):
        apis.append(Api(model, "loss_function", ("logits", "labels", "vocab_size", "shift_labels")))
    return apis


def _with_labels(model: nn.Module) -> bool:
    """Whether ``model`` is a ``LlavaForConditionalGeneration`` with the library's forward (whose
    ``labels=`` the patch aligns to the kept positions)."""
    from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration

    return isinstance(model, LlavaForConditionalGeneration) and not overridden(model, LlavaForConditionalGeneration)


def _labels_replacements(model: nn.Module, host: dict, run: dict) -> list:
    """LLaVA: the ``forward`` taking ``labels``; a family: its ``loss_function`` (the property
    returns ``_loss_function``), both aligning ``labels`` to the kept positions."""
    if host["family"] is None:
        if not _with_labels(model):
            return []
        forward = functools.partial(_labels_forward, model, run)
        forward.__signature__ = inspect.signature(model.forward)  # generate() reads it
        return [(model, "forward", forward)]
    if not hasattr(model, "loss_function"):
        return []
    loss = functools.partial(_aligned_loss, model.loss_function, run)
    loss.__signature__ = inspect.signature(model.loss_function)
    return [(model, "_loss_function", loss)]


def _kept_targets(labels: torch.Tensor, kept, ignore: int) -> torch.Tensor:
    """The ``shift_labels`` of a pruned forward: at each kept position (``kept`` ``(B, L')``, -1 at
    pads; None: every position) the label of the token after it in the prompt, ``ignore`` at pads
    and after the last token."""
    targets = F.pad(labels, (0, 1), value=ignore)[:, 1:]
    if kept is None:
        return targets
    kept = kept.to(targets.device)
    return targets.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, ignore)


def _aligned_loss(loss_function, run: dict, logits=None, labels=None, vocab_size=None, **kwargs):
    """A family model's loss when its last forward pruned: each kept position against the token
    after it in the prompt (``shift_labels``), pads and pruned positions adding nothing."""
    kept = run.get("kept")
    if (kept is not None and isinstance(labels, torch.Tensor) and labels.dim() == 2 and logits is not None
            and logits.shape[1] == kept.shape[1] and labels.shape[1] == run.get("length")
            and kwargs.get("shift_labels") is None):
        kwargs["shift_labels"] = _kept_targets(labels, kept, kwargs.get("ignore_index", -100))
    return loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)


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
    targets = _kept_targets(labels, run["kept"], extra.get("ignore_index", -100))
    logits = out[0] if isinstance(out, tuple) else out.logits
    loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.text_config.vocab_size,
                               shift_labels=targets, **extra)
    return (loss, *out) if isinstance(out, tuple) else type(out)(loss=loss, **out)
