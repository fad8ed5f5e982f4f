"""Vision-side token compression in the VLM families of :mod:`vtok_fast.patch.families`
(LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, Gemma 3, Idefics3,
SmolVLM): fewer image tokens reach the language model, the caller's ``processor(...)`` ->
``model.generate(...)`` code unchanged.

``apply(model, compress=(method, budget))`` replaces, on these instances only:

- the inner model's ``get_image_features`` (and ``get_video_features`` where the adapter says
  so: Qwen): the original, then every unit of its features (a tile, an image, a video frame: the
  family adapter's grids) compressed by :func:`vtok_fast.reduce.compress.compress` with
  ``method`` and ``budget``, one batched call per distinct grid; the result keeps the full count (the kept tokens at their slots), so the model's
  own placeholder check and merge run as they are (:mod:`vtok_fast.patch.family_units`);
- the inner model's forward pre-hooks (a copy with one more): records where the image
  placeholders are (and the keep flags of features ``generate`` computed once and passes to
  every forward in ``mm_encoder_outputs``: ``use_cache=False`` drops at every step), and maps a
  decoding step's mask and positions after a dropping prefill;
- the language model's forward pre-hooks: drops the placeholders of removed tokens
  (:mod:`vtok_fast.patch.family_drop`);
- the ``...ForConditionalGeneration``'s ``loss_function``: ``labels`` gathered at the kept columns.

The compression runs on the tokens the language model receives (after each family's merger /
pixel shuffle / pooling projector): they are what costs, and their grid is the one the family's
position ids describe. Methods: ``pool`` (the grid shrinks), ``tome``, ``dart``, and the attention
methods ``attn_topk``, ``visionzip``, ``prumerge``, ``prumerge_plus``, ranked by the vision tower's
attention at the layer the features come from (:mod:`vtok_fast.patch.family_scores`: the CLS row
where the tower has one, else the attention every token receives, the substitute VisionZip's and
VisPruner's ports use), merged as the family merges its tokens; the methods that merge by a metric
use the tokens themselves. Budgets are in the method's own terms, applied per unit (``ratio=``
scales with the image). ``pixel_shuffle`` widens tokens beyond the language model's width and is
refused. Budget option ``positions``: ``"original"`` (default) or ``"compact"``
(:mod:`vtok_fast.patch.family_drop`). Videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each frame
(``video_grid_thw``'s ``t``) is a unit, compressed as an image; other families' video features
pass unchanged.

Called directly, the patched ``get_image_features`` returns that full count too: the dropped
tokens' rows are zeros, and the drop happens only inside the model's forward. The last forward's
kept prompt columns are ``model._compress_info["kept"]`` (``(B, L')``, -1 at pads).
``remove(model)`` restores everything; parameters and ``state_dict`` are never changed; a
failing ``apply`` changes nothing.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn as nn

from vtok_fast.patch import families, family_drop, family_scores, family_units, lm_prune, placeholder_drop
from vtok_fast.patch._common import Api, all_or_nothing, check_api, is_patched, patch, restore
from vtok_fast.patch.llava_common import token_mask
from vtok_fast.reduce.compress import compress as run_compress

FEATURE = "hf_family_compress"
ATTENTION_METHODS = ("attn_topk", "visionzip", "prumerge", "prumerge_plus")
RUNS = ("pool", "tome", "dart", *ATTENTION_METHODS)
_REFUSED = {"pixel_shuffle": "it makes every token stride**2 times wider than the language model takes"}
_PATCHER = "vtok_fast.patch.hf compress (family adapters)"
KEEP = "_vtok_fast_keep"  # on a compressed features output: its (Σn,) keep flags


def finds(model: nn.Module) -> bool:
    """Whether ``model`` is of a family this patcher handles (by ``config.model_type``)."""
    return families.model_type(model) in families.FAMILIES


def apply(model: nn.Module, *, method: str, budget: dict) -> nn.Module:
    """Patch ``model`` (see the module docstring); re-applying replaces the previous compression;
    a call that raises changes nothing."""
    family, inner = families.find(model)
    budget = dict(budget)
    positions = _check(family, inner, method, budget)
    with all_or_nothing():
        remove(model)
        info = {"method": method, "budget": dict(budget), "positions": positions, "kept": None, "family": family.name}
        run = {"pending": {}, "masks": None, "kept": None, "length": None, "info": info}
        plan = {"family": family, "method": method, "budget": budget, "positions": positions}
        lm = getattr(inner, family.language_model)
        replacements = [(inner, name, _features_of(inner, plan, run, name)) for name, _ in _streams(family)]
        replacements += [
                        *placeholder_drop.pre_hook_replacements(inner, functools.partial(_inner_hook, plan, run)),
                        *placeholder_drop.pre_hook_replacements(lm, functools.partial(_lm_hook, plan, run)),
                        (inner, "_compress_info", info)]
        if model is not inner:
            replacements.append((model, "_compress_info", info))
            if hasattr(model, "loss_function"):
                loss = functools.partial(placeholder_drop.aligned_loss, model.loss_function, run)
                loss.__signature__ = inspect.signature(model.loss_function)
                replacements.append((model, "_loss_function", loss))
        patch(inner, FEATURE, replacements)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (no-op if not patched)."""
    restore(model, FEATURE)
    return model


def _check(family, inner: nn.Module, method: str, budget: dict) -> str:
    """Validate the method, the budget (on a stand-in unit) and the seams; return ``positions``."""
    if method in _REFUSED:
        raise ValueError(f"compress method {method!r} is not available in {family.name}: {_REFUSED[method]}")
    if method in ATTENTION_METHODS and family.attention is None:
        raise ValueError(f"compress method {method!r} is not available in {family.name}: its adapter names no "
                         "vision attention to rank tokens by")
    if method not in RUNS:
        raise ValueError(f"compress method must be one of {list(RUNS)} in {family.name} (or 'fastv'), got {method!r}")
    positions = budget.pop("positions", "original")
    if positions not in family_drop.POSITIONS:
        raise ValueError(f"positions must be one of {family_drop.POSITIONS} (the position ids of the kept image "
                         f"tokens), got {positions!r}")
    cls = type(inner)
    if is_patched(inner, lm_prune.FEATURE):
        raise ValueError(f"a vision-side compress= cannot run with FastV / PyramidDrop in {family.name}: the language "
                         "model would rank fewer tokens than the prompt's placeholders; choose one "
                         "(vtok_fast.patch.unpatch(model) first)")
    for name, _ in _streams(family):
        if name in inner.__dict__:
            raise ValueError(f"{cls.__name__}.{name} is already replaced by another patch")
    lm = getattr(inner, family.language_model)
    check_api(_PATCHER, [Api(cls, "get_image_features", ("pixel_values",), True),
                         Api(cls, "forward", ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds")),
                         Api(type(lm), "forward", ("attention_mask", "position_ids", "cache", "inputs_embeds"))])
    # the method's own budget errors, before patching: a stand-in unit as large as a real one
    # (VisionZip's keep-all budget, all dominant and no contextual token, is valid only for a unit
    # of exactly that many tokens: its stand-in is that unit; the real units are checked per call)
    rows, cols = (1, budget["dominant"]) if method == "visionzip" and budget.get("contextual") == 0 \
        and isinstance(budget.get("dominant"), int) and budget["dominant"] > 0 else (64, 64)
    stand_in = torch.zeros(1, rows * cols, 1)
    extra = {"scores": stand_in[..., 0]} if method in ATTENTION_METHODS else {}
    if method in family_units.WITH_METRIC:
        extra["metric"] = stand_in
    run_compress(stand_in, method, grid=(rows, cols), **budget, **extra)
    return positions


def _streams(family) -> list[tuple[str, str]]:
    """``(features method, placeholder-id config attribute)`` of every compressed modality."""
    return [("get_image_features", family.image_token)] + (
        [("get_video_features", "video_token_id")] if family.videos else [])


def _features_of(inner: nn.Module, plan: dict, run: dict, name: str):
    """The replacement of ``inner.<name>`` (``get_image_features`` / ``get_video_features``)."""
    signature = inspect.signature(getattr(type(inner), name))
    family = plan["family"]
    attention = family.attention(inner) if plan["method"] in ATTENTION_METHODS else None  # the scored module

    def get_features(*args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        captured = {}
        scoring = family_scores.capture(attention, captured, family.cls) if attention is not None else None
        with scoring or contextlib.nullcontext():
            output = getattr(type(inner), name)(inner, *args, return_dict=True, **kwargs)
        call = signature.bind(inner, *args, **kwargs).arguments
        units = family.units(inner, output, call)
        scores = None
        if attention is not None:
            if "scores" not in captured:
                raise ValueError(f"the vision tower did not run {type(attention).__name__}: no attention to rank "
                                 "tokens by")
            scores = family.score_map(inner, captured["scores"], call, units)
        pieces, keep, done = family_units.compress_units(units, plan["method"], plan["budget"], scores)
        output = family.rebuild(inner, output, pieces, functools.partial(family_units.replay, done))
        output.__dict__[KEEP] = keep  # travels with the features: generate() may pass them to several forwards
        run["pending"][name] = keep
        return output if return_dict else output.to_tuple()

    get_features.__signature__ = inspect.signature(getattr(inner, name))  # generate() reads it
    return get_features


def _placeholder_masks(inner: nn.Module, plan: dict, input_ids, inputs_embeds) -> dict | None:
    """``{features method: (B, L) bool}``: where each modality's placeholders are."""
    if input_ids is None and inputs_embeds is None:
        return None
    return {name: token_mask(inner, getattr(inner.config, attribute), input_ids, inputs_embeds)
            for name, attribute in _streams(plan["family"])}


def _inner_hook(plan: dict, run: dict, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the inner model: record the placeholders; map a decoding step."""
    if args:  # the models' own callers pass keywords; a positional input_ids is the first
        kwargs = {"input_ids": args[0], **kwargs}
        args = ()
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    state = None if cache is None else cache.__dict__.get(placeholder_drop.STATE)
    if state is not None and cache.get_seq_length() == 0:  # a reused, emptied cache
        del cache.__dict__[placeholder_drop.STATE]
        state = None
    run["masks"] = _placeholder_masks(module, plan, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
    for stream, output in (kwargs.get("mm_encoder_outputs") or {}).items():  # features computed earlier
        keep = getattr(output, "__dict__", {}).get(KEEP)
        if keep is not None:
            run["pending"][f"get_{stream}_features"] = keep
    if state is None:
        return args, kwargs
    rope = getattr(module, "rope_deltas", None) if plan["family"].mrope else None
    return args, family_drop.decode_kwargs(state, dict(kwargs), cache, rope)


def _lm_hook(plan: dict, run: dict, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the language model: drop the removed tokens' placeholders at a prefill."""
    pending, masks = run["pending"], run["masks"]
    run["pending"], run["masks"], run["kept"] = {}, None, None
    keep = None
    for name, flags in pending.items():
        mask = None if masks is None else masks[name].to(kwargs["inputs_embeds"].device)
        if mask is None or int(mask.sum()) != flags.numel():
            continue  # features computed for another call (this prompt holds other placeholders)
        keep = torch.ones_like(mask) if keep is None else keep
        keep[mask] = flags.to(keep.device)
    if keep is None:
        return None
    kwargs = dict(kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    visual = kwargs.get("visual_pos_masks")
    if kwargs.get("deepstack_visual_embeds") is not None and visual is not None:
        kwargs["deepstack_visual_embeds"] = family_drop.deepstack_rows(kwargs["deepstack_visual_embeds"], visual, keep)
    kwargs, index = family_drop.drop_columns(keep, kwargs, plan["positions"], plan["family"].lm_kwargs, cache)
    run["kept"], run["length"] = index, keep.shape[1]
    run["info"]["kept"] = index
    return args, kwargs
