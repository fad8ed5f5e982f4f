"""Vision-side token compression in a Hugging Face LLaVA model: fewer image tokens reach the LLM.

``apply(model, compress=(method, budget))`` patches a ``LlavaForConditionalGeneration`` (or its
``LlavaModel``) in place so that the features the vision tower hands to the projector are reduced
by :func:`vtok_fast.reduce.compress.compress` with ``method`` (any of its methods: ``pool``,
``pixel_shuffle``, ``tome``, ``attn_topk``, ``visionzip``, ``prumerge``) and ``budget`` (that
method's own arguments, e.g. ``("pool", {"stride": 2})``, ``("visionzip", {"dominant": 54,
"contextual": 10})``, ``("prumerge", {"keep": 32})``). ``compress=("fastv", {...})`` is FastV in the
language model instead (:mod:`vtok_fast.patch.hf_fastv`). A model of a family of
:mod:`vtok_fast.patch.families` (LLaVA-NeXT, OneVision, Qwen2/2.5/3-VL, InternVL, Gemma 3, Idefics3,
SmolVLM; by ``config.model_type``) is compressed by :mod:`vtok_fast.patch.hf_family_compress`
instead. In a LLaVA-1.5 model, replaced on these instances only:

- ``vision_tower.forward``: the original forward; it records the pixel grid (``H // p, W // p``)
  and, for the attention methods, the query (CLS row) and key projections of one encoder layer;
- that layer's ``self_attn.q_proj.forward`` / ``k_proj.forward`` (attention methods only): the
  original projection, whose output is kept while the tower runs;
- ``multi_modal_projector.forward``: compresses its input, then runs the projector's forward as
  it was (the fused one of ``vtok_fast.patch.hf(model)``, else the class's: compression and fusion
  compose; remove the compression first, as ``unpatch`` does);
- ``get_placeholder_mask``: a prompt holding the compressed count is filled as before; a prompt
  holding the uncompressed count (the processor's normal prompt) gets the placeholders of the kept
  tokens filled, and the language model drops the others (:mod:`vtok_fast.patch.placeholder_drop`);
  any other count raises a ValueError naming :func:`image_token_count` / :func:`configure_processor`;
- the language model's forward pre-hooks (a copy with one more: the placeholder drop), and the
  ``LlavaForConditionalGeneration``'s ``loss_function`` (``labels`` gathered with the kept index).

The tokens compressed are exactly what the projector receives: the selected layer's patch tokens,
with the CLS token as a kept prefix under ``vision_feature_select_strategy="full"``. The attention
methods use the CLS row's attention over all keys (CLS included) of encoder layer ``attn_layer``
(a budget option of the patcher): ``attn_topk`` and ``visionzip`` per head (averaged over heads,
the layer's own scale; VisionZip's metric is the keys averaged over heads), default the layer that
produces ``vision_feature_layer`` (``-2`` → ``layers[-2]``, as VisionZip); ``prumerge`` as one
full-width head (scale ``C ** -0.5``, metric the ``k_proj`` output), default the last layer (as
PruMerge). ``tome`` merges by the features themselves (``compress``'s default metric).

Drop-in: the processor's normal prompt (``N`` placeholders per image) runs unchanged through
``model(...)`` and ``model.generate(...)``: each compressed token fills the placeholder of its slot
(its own / its destination's index, a pooled token its window's first), the other placeholders are
dropped from the embeddings, attention mask, position ids and labels before the language model.
Budget option ``positions``: ``"original"`` (default: the kept tokens keep the position ids of the
full layout) or ``"compact"`` (renumbered consecutively, as a prompt holding only the kept tokens),
e.g. ``("pool", {"stride": 2, "positions": "compact"})``. Rows keeping different counts are
left-padded. Alternatively the prompt holds as many ``<image>`` tokens as the projector returns per
image: :func:`image_token_count` gives that count, and :func:`configure_processor` sets a
``LlavaProcessor`` (``num_additional_image_tokens``) to insert it (no drop happens then). Methods
whose count depends on the image (PruMerge's adaptive IQR selection, ``prumerge_plus``) are
refused: a LLaVA prompt has a fixed count. The last forward's
:class:`~vtok_fast.reduce.compressed.Compressed` (positions / source for visualisation) is in
``model._compress_info["compressed"]``. ``remove(model)`` restores every method;
parameters and ``state_dict`` are never changed; a failing ``apply`` changes nothing.

Supported: transformers ``TRANSFORMERS_TESTED`` (``vtok_fast.patch._common``; the patch relies on
``LlavaModel.get_image_features`` calling the vision tower, then the projector on the selected
layer, and on ``get_placeholder_mask(input_ids, inputs_embeds, image_features)``: checked at
``apply``) ``LlavaForConditionalGeneration`` / ``LlavaModel`` whose ``get_image_features`` is the
library's, with a ``CLIPVisionModel`` tower (every method) or a ``SiglipVisionModel`` tower (no CLS
token: the grid and merge methods only), and an int ``vision_feature_layer``. Anything else
(LLaVA-NeXT / OneVision anyres models, a ``vision_feature_layer`` list, a tower patched for ToMe
merging) raises one ``ValueError`` naming the reason; nothing is ever left silently unpatched.
"""
from __future__ import annotations

import functools
import inspect
import numbers

import torch
import torch.nn as nn

from vtok_fast.patch import families, hf_family_compress, hf_fastv, hf_tome, placeholder_drop
from vtok_fast.patch._common import Api, all_or_nothing, capture_forward, check_api, is_patched, patch, restore
from vtok_fast.patch.hf_tome import encoder_of, num_prefix_tokens, tower_classes
from vtok_fast.patch.llava_common import find_llava, image_token_mask, pair, parse_spec, placeholder_apis
from vtok_fast.reduce.attention_scores import attention_scores
from vtok_fast.reduce.compress import METHODS, compress as run_compress

FEATURE = "hf_compress"
ATTENTION_METHODS = ("attn_topk", "visionzip", "prumerge", "prumerge_plus")
PER_HEAD = ("attn_topk", "visionzip")  # the others read one full-width head, as PruMerge
WITH_METRIC = ("visionzip", "prumerge", "prumerge_plus")
_COMPUTED = ("queries", "keys", "scores", "metric", "scale", "grid", "prefix")  # the patcher supplies these
_PATCHER = "vtok_fast.patch.hf compress"


def apply(model: nn.Module, *, compress) -> nn.Module:
    """Patch the LLaVA model so that the projector receives ``compress``-ed vision tokens (see the
    module docstring); ``("fastv", {...})`` patches the language model instead. Re-applying
    replaces the previous compression; a call that raises changes nothing."""
    method, budget = parse_spec(compress)
    if method in hf_fastv.METHODS:
        return hf_fastv.apply(model, compress=compress)
    if method not in METHODS:
        raise ValueError(f"compress method must be one of {sorted(METHODS) + ['fastv']}, got {method!r}")
    if hf_family_compress.finds(model):
        return hf_family_compress.apply(model, method=method, budget=budget)
    try:
        llava = find_llava(model)
    except ValueError as error:  # neither LLaVA-1.5 nor a family of the table
        raise ValueError(f"{error}; compress= also runs in the families keyed by config.model_type "
                         f"{sorted(families.FAMILIES)} (this model's: {families.model_type(model)!r})") from None
    plan = _checked_plan(llava, method, budget)
    with all_or_nothing():
        remove(model)
        info = {"method": method, "budget": dict(plan["budget"]), "attn_layer": plan["attn_layer"],
                "positions": plan["positions"], "compressed": None, "kept": None}
        plan["info"] = info
        run = {"grid": None, "capture": None, "captured": None, "drop": None, "kept": None, "info": info}
        tower, projector = llava.vision_tower, llava.multi_modal_projector
        project = projector.forward  # the fused projector of hf(model), else the class's forward
        replacements = [(tower, "forward", functools.partial(_tower_forward, tower, plan, run)),
                        (projector, "forward", functools.partial(_projector_forward, project, plan, run)),
                        (llava, "get_placeholder_mask", functools.partial(_placeholder_mask, llava, run)),
                        *placeholder_drop.pre_hook_replacements(
                            llava.language_model, functools.partial(placeholder_drop.lm_pre_hook, run,
                                                                    plan["positions"])),
                        (llava, "_compress_info", info), (llava, "_compress_plan", plan)]
        if model is not llava:
            replacements.append((model, "_compress_info", info))
            if hasattr(model, "loss_function"):
                loss = functools.partial(placeholder_drop.aligned_loss, model.loss_function, run)
                loss.__signature__ = inspect.signature(model.loss_function)  # hf_fastv's check_api reads it
                replacements.append((model, "_loss_function", loss))  # what the loss_function property returns
        if plan["attn_layer"] is not None:
            attn = _encoder_layers(tower)[plan["attn_layer"]].self_attn
            for name in ("q_proj", "k_proj"):
                proj = getattr(attn, name)
                rows = 1 if name == "q_proj" else None  # the queries: the CLS row only
                replacements.append((proj, "forward", functools.partial(capture_forward, proj, run, name, rows=rows)))
        patch(llava, FEATURE, replacements)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (no-op if not patched)."""
    restore(model, FEATURE)
    hf_family_compress.remove(model)
    return model


def image_token_count(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> int:
    """How many ``<image>`` tokens per image the prompt of this LLaVA model needs now: what its
    ``get_image_features`` returns for images of ``image_size`` pixels (default: the vision
    config's ``image_size``), under every vtok_fast patch (vision compression, ToMe merging in the
    tower; FastV and the fused kernels keep the count) or none. Exported as
    ``vtok_fast.patch.image_token_count`` and, its former name, ``llava_image_token_count``."""
    llava = find_llava(model)
    config = llava.config
    vision = config.vision_config
    height, width = pair(image_size or vision.image_size, "image_size")
    grid = (height // vision.patch_size, width // vision.patch_size)
    cls = num_prefix_tokens(llava.vision_tower)
    prefix = cls if config.vision_feature_select_strategy == "full" else 0
    if is_patched(llava, FEATURE):
        return _probe(llava._compress_plan, grid, prefix).positions.shape[1]
    if hf_tome.tome_root(model) is not None:
        return hf_tome.llava_image_token_count(model, (height, width))
    return grid[0] * grid[1] + prefix


def configure_processor(processor, model: nn.Module, image_size: int | tuple[int, int] | None = None):
    """Set a ``LlavaProcessor``'s ``num_additional_image_tokens`` so that it inserts
    :func:`image_token_count` ``<image>`` tokens per image; returns the processor. The size is the
    processor's center-crop size (else ``image_size``, else the vision config's). Call it again
    after ``vtok_fast.patch.unpatch(model)`` to get the original count back."""
    missing = [a for a in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")
               if not hasattr(processor, a)]
    if missing:
        raise TypeError(f"processor must be a LlavaProcessor (it has no {', '.join(missing)}), got "
                        f"{type(processor).__name__}")
    llava = find_llava(model)
    config = llava.config
    if processor.patch_size != config.vision_config.patch_size:
        raise ValueError(f"processor.patch_size={processor.patch_size} differs from the vision tower's patch size "
                         f"{config.vision_config.patch_size}")
    if processor.vision_feature_select_strategy != config.vision_feature_select_strategy:
        raise ValueError(f"processor.vision_feature_select_strategy={processor.vision_feature_select_strategy!r} "
                         f"differs from the model's {config.vision_feature_select_strategy!r}")
    image_processor = getattr(processor, "image_processor", None)
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = (crop["height"], crop["width"]) if crop else pair(image_size or config.vision_config.image_size,
                                                             "image_size")
    count = image_token_count(model, size)
    patches = (size[0] // processor.patch_size) * (size[1] // processor.patch_size)
    # LlavaProcessor inserts patches + num_additional_image_tokens (- 1 for "default") tokens per image
    processor.num_additional_image_tokens = count - patches + (processor.vision_feature_select_strategy == "default")
    return processor


# --- planning (at apply time) ------------------------------------------------------------------

def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    return encoder_of(tower).layers


def _checked_plan(llava: nn.Module, method: str, budget: dict) -> dict:
    """Check that ``llava`` is supported and ``budget`` valid; return what the patched forwards need."""
    from transformers.models.llava.modeling_llava import LlavaModel

    tower, config = llava.vision_tower, llava.config
    if type(llava).get_image_features is not LlavaModel.get_image_features:
        raise ValueError(f"{type(llava).__name__} overrides get_image_features; only LlavaModel's is supported")
    if not isinstance(tower, tower_classes()):
        raise ValueError(f"the vision tower is {type(tower).__name__}; supported: CLIPVisionModel, SiglipVisionModel")
    check_api(_PATCHER, [Api(LlavaModel, "get_image_features",
                             ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")),
                         Api(type(tower), "forward", ("pixel_values",), True), *placeholder_apis(),
                         *_drop_apis(llava)])
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer={config.vision_feature_layer!r} concatenates several layers; "
                         "compression needs one int layer")
    if any("forward" in layer.__dict__ for layer in _encoder_layers(tower)):
        raise ValueError("the vision encoder's layers are already patched (ToMe merging, tome_r=?): ToMe merging "
                         "and compress= cannot be combined; use compress=('tome', {...}) instead")
    positions = budget.pop("positions", "original")
    if positions not in placeholder_drop.POSITIONS:
        raise ValueError(f"positions must be one of {placeholder_drop.POSITIONS} (the position ids of the kept image "
                         f"tokens when a full prompt is given), got {positions!r}")
    given = sorted(set(budget) & set(_COMPUTED))
    if given:
        raise TypeError(f"compress budget must not contain {', '.join(given)}: the patcher computes them from the "
                        "model")
    attn_layer = budget.pop("attn_layer", None)
    num_layers = len(_encoder_layers(tower))
    cls = num_prefix_tokens(tower)
    if method in ATTENTION_METHODS:
        if not cls:
            raise ValueError(f"{method} ranks tokens by the CLS token's attention, but {type(tower).__name__} has no "
                             "CLS token")
        if attn_layer is None:
            attn_layer = num_layers - 1 if method not in PER_HEAD else (
                config.vision_feature_layer % (num_layers + 1)) - 1
            if attn_layer < 0:
                raise ValueError(f"vision_feature_layer={config.vision_feature_layer} selects the embeddings, which "
                                 f"have no attention: pass attn_layer= (an encoder layer index) in the budget")
        if isinstance(attn_layer, bool) or not isinstance(attn_layer, numbers.Integral) or not (
                -num_layers <= attn_layer < num_layers):
            raise ValueError(f"attn_layer must be an encoder layer index in [{-num_layers}, {num_layers - 1}], "
                             f"got {attn_layer!r}")
        attn_layer = int(attn_layer) % num_layers
    elif attn_layer is not None:
        raise TypeError(f"attn_layer= is for the attention methods {ATTENTION_METHODS}, not {method!r}")

    attn = _encoder_layers(tower)[attn_layer].self_attn if attn_layer is not None else None
    if attn is not None:
        check_api(_PATCHER, [Api(attn, name) for name in ("q_proj", "k_proj", "num_heads", "head_dim", "scale")])
    vision = config.vision_config
    grid = (vision.image_size // vision.patch_size,) * 2
    plan = {"method": method, "budget": budget, "attn_layer": attn_layer, "cls": cls, "attn": attn,
            "patch_size": vision.patch_size, "native_grid": grid, "positions": positions}
    prefix = cls if config.vision_feature_select_strategy == "full" else 0
    probe = _probe(plan, grid, prefix)  # validates the budget on the native grid
    if probe.counts is not None:
        raise ValueError(f"{method} with budget {budget} keeps a different number of tokens per image, but a LLaVA "
                         "prompt holds a fixed number of <image> tokens: give a fixed budget (prumerge: keep= or "
                         "ratio=)")
    width = probe.tokens.shape[-1]  # the probe's channels are 1: the method widens tokens this many times
    linear = getattr(llava.multi_modal_projector, "linear_1", None)
    if width != 1 and isinstance(linear, nn.Linear) and linear.in_features != width * vision.hidden_size:
        raise ValueError(f"{method} makes tokens {width}x wider ({width * vision.hidden_size} channels), but the "
                         f"projector takes {linear.in_features}")
    return plan


def _drop_apis(llava: nn.Module) -> list[Api]:
    """The call conventions the placeholder drop relies on: ``LlavaModel.forward`` passes the
    language model ``attention_mask`` / ``position_ids`` / ``cache`` / ``inputs_embeds`` by keyword
    (read by a forward pre-hook with kwargs)."""
    from transformers.models.llava.modeling_llava import LlavaModel

    lm = llava.language_model
    params = ("attention_mask", "position_ids", "cache", "inputs_embeds")
    return [Api(LlavaModel, "forward", ("input_ids",) + params), Api(type(lm), "forward", params),
            Api(lm, "_forward_pre_hooks"), Api(lm, "_forward_pre_hooks_with_kwargs")]


def _probe(plan: dict, grid: tuple[int, int], prefix: int):
    """``compress`` of a one-image stand-in (zeros) on ``grid``: the output count and width."""
    num_tokens = prefix + grid[0] * grid[1]
    extra = {}
    if plan["method"] in ATTENTION_METHODS:
        extra["scores"] = torch.zeros(1, num_tokens)
    if plan["method"] in WITH_METRIC:
        extra["metric"] = torch.zeros(1, num_tokens, 1)
    return run_compress(torch.zeros(1, num_tokens, 1), plan["method"], grid=grid, prefix=prefix,
                        **plan["budget"], **extra)


# --- the patched forwards ----------------------------------------------------------------------

def _tower_forward(tower: nn.Module, plan: dict, run: dict, *args, **kwargs):
    """Patched vision-tower ``forward``: the original, recording the grid and (attention methods)
    the chosen layer's CLS query and keys."""
    pixel_values = args[0] if args else kwargs.get("pixel_values")
    if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
        run["grid"] = (pixel_values.shape[-2] // plan["patch_size"], pixel_values.shape[-1] // plan["patch_size"])
    run["capture"] = {} if plan["attn_layer"] is not None else None
    try:
        out = type(tower).forward(tower, *args, **kwargs)
    except BaseException:
        run["capture"] = None
        raise
    run["captured"], run["capture"] = run["capture"], None
    return out


def _projector_forward(project, plan: dict, run: dict, image_features: torch.Tensor):
    """Patched ``multi_modal_projector.forward``: compress the tokens, then ``project`` them (the
    projector's forward before this patch: fused or not)."""
    compressed = _compress_features(image_features, plan, run)
    plan["info"]["compressed"] = compressed
    return project(compressed.tokens)


def _placeholder_mask(llava: nn.Module, run: dict, input_ids, inputs_embeds=None, image_features=None):
    """Patched ``get_placeholder_mask``: a prompt holding the compressed count gets transformers'
    mask; one holding the uncompressed count (the processor's normal prompt) gets the placeholders
    of the kept tokens (:func:`placeholder_drop.placeholder_mask`: the language model then drops the
    others); any other count raises a ValueError naming both counts."""
    run["drop"] = None
    original = type(llava).get_placeholder_mask
    if torch.compiler.is_compiling():  # a compiled graph keeps transformers' own check
        return original(llava, input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
    tokens = int(image_token_mask(llava, input_ids, inputs_embeds).sum())
    features = image_features.shape[0]
    compressed = run["info"]["compressed"]
    full = None if compressed is None or compressed.positions.numel() != features else compressed.source.numel()
    if tokens != features and tokens == full:
        if is_patched(llava, hf_fastv.FEATURE):
            raise ValueError("FastV runs on the prompt's layout: with compress= and FastV together, give the prompt "
                             "the compressed count (vtok_fast.patch.configure_processor(processor, model))")
        return placeholder_drop.placeholder_mask(llava, run, compressed, input_ids, inputs_embeds)
    if tokens != features:
        raise ValueError(
            f"the prompt holds {tokens} <image> tokens, but its images give {features} image features under "
            f"vtok_fast's patch ({full} uncompressed): give the processor's normal prompt, or put "
            "vtok_fast.patch.image_token_count(model) <image> tokens per image in the prompt "
            "(vtok_fast.patch.configure_processor(processor, model) makes a LlavaProcessor do it)")
    return original(llava, input_ids, inputs_embeds=inputs_embeds, image_features=image_features)


def _compress_features(features: torch.Tensor, plan: dict, run: dict):
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError(f"the projector's input must be (B, N, C) vision tokens, got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    grid = run.get("grid") or plan["native_grid"]  # the projector called on its own: the native grid
    cls, patches = plan["cls"], grid[0] * grid[1]
    num = features.shape[1]
    if num == patches + cls:
        prefix = cls
    elif num == patches:
        prefix = 0
    else:
        raise ValueError(f"the projector received {num} tokens per image, but the vision tower's {grid[0]}x{grid[1]} "
                         f"grid has {patches} patch tokens (+{cls} CLS)")
    extra = {}
    if plan["attn_layer"] is not None:
        captured, run["captured"] = run.get("captured"), None
        if not captured or captured.get("k_proj") is None or captured["k_proj"].shape[0] != features.shape[0]:
            raise ValueError(f"{plan['method']} needs the vision tower's attention: call the projector through "
                             "get_image_features / the model's forward, right after the tower")
        extra = _attention_inputs(plan, captured, start=cls - prefix)
    return run_compress(features, plan["method"], grid=grid, prefix=prefix, **plan["budget"], **extra)


def _attention_inputs(plan: dict, captured: dict, start: int) -> dict:
    """``scores`` (and ``metric``) for the projector's tokens from the captured CLS query and keys;
    ``start`` = 1 when the CLS token is not among those tokens (softmax still over every key)."""
    query, keys = captured["q_proj"], captured["k_proj"]  # (B, 1, C), (B, N, C)
    batch, num_keys, width = keys.shape
    attn = plan["attn"]
    if plan["method"] in PER_HEAD:
        heads, head_dim = attn.num_heads, attn.head_dim
        q = query.view(batch, 1, heads, head_dim).transpose(1, 2)
        k = keys.view(batch, num_keys, heads, head_dim).transpose(1, 2)
        scores = attention_scores(q, k, attn.scale)
        metric = k.mean(dim=1)
    else:  # one head at full width, scale C ** -0.5 (PruMerge)
        scores = attention_scores(query.unsqueeze(1), keys.unsqueeze(1))
        metric = keys
    out = {"scores": scores[:, start:]}
    if plan["method"] in WITH_METRIC:
        out["metric"] = metric[:, start:]
    return out
