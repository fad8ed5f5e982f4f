"""ToMe token merging for Hugging Face CLIP / SigLIP vision towers (also inside LLaVA).

``apply(model, r=...)`` finds every ``CLIPVisionModel`` / ``SiglipVisionModel`` inside
``model`` (itself, ``CLIPModel.vision_model``, ``SiglipModel.vision_model``, a LLaVA
``vision_tower``) and replaces, on these instances only:
- each encoder layer's ``forward``: ``residual + self_attn(layer_norm1(x))`` with the
  proportional-attention bias ``log(size)`` (``[B, 1, 1, N]``) as the attention mask, then the
  ToMe merge of ``r`` tokens (``vtok_fast.tome_merge``, metric = keys averaged over heads), then
  ``residual + mlp(layer_norm2(x))``. CLIP keeps its CLS token (``class_token=True``); SigLIP
  has no prefix token;
- each layer's ``self_attn.forward``: the model's own q/k/v projections and attention
  implementation (``eager`` or ``sdpa``; a flash implementation, which takes no additive mask,
  runs through ``sdpa`` while a size bias is present); on the Triton path (CUDA), once tokens are
  merged and the size bias is the only mask, a non-eager model runs ``vtok_fast.attention``
  (flash attention with the key bias) instead; it also hands the keys to the merge;
- the encoder's ``forward``: computes the schedule ``parse_r(num_layers, model.r)`` at each call
  and runs the original encoder loop, so ``output_hidden_states`` / ``output_attentions`` keep
  working, with the **merged** lengths: ``hidden_states[i]`` has the tokens left after layer i;
- SigLIP's attention-pooling head (``pooler_output``): the probe attends with the ``log(size)``
  bias, i.e. as if every merged token were repeated ``size`` times. CLIP's pooler (the CLS
  token) needs nothing.

``model.r`` (int, ``(r, inflection)`` or list) may be changed after patching;
``vtok_fast.patch.tome_state(model).last`` holds the last forward's ``schedule``, ``size`` ``[B, N, 1]`` and,
with ``trace_source=True``, ``source_map`` (int64 ``[B, N0]``: output token holding each
embedding token), as in ``timm_tome``.

The tower returns fewer tokens. For LLaVA the language model's ``<image>`` placeholders must
match: ``vtok_fast.patch.image_token_count(model)`` gives the count per image and
``vtok_fast.patch.configure_processor(processor, model)`` makes a ``LlavaProcessor`` insert it; a
prompt with another count raises a ValueError naming them (``get_placeholder_mask`` of each
``LlavaModel`` whose tower is patched). A vision tower patched by ``compress=`` is refused (a
ValueError: use ``compress=("tome", {...})``), as ``compress=`` refuses a ToMe-patched tower.
transformers ``TRANSFORMERS_TESTED`` (``vtok_fast.patch._common``) is tested; the call conventions
the patched methods rely on are checked at ``apply`` (a ValueError, nothing patched).
A ``vision_feature_layer`` list (several layers concatenated) only works when the selected
layers have the same length. Patched layers do not use gradient checkpointing, and an
``attention_mask`` passed to the encoder is refused while merging (it is for the unmerged
tokens). An empty batch returns empty outputs with the merged lengths (the patched attention
runs the eager function for it: transformers' sdpa and flash wrappers fail on 0 elements, and
so does the unpatched tower).
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn as nn

from vtok_fast._backend import use_triton
from vtok_fast.patch._common import (Api, check_api, holds, is_patched, overridden, patch, replaced_by, restore,
                                     warn_not_applied)
from vtok_fast.patch.llava_common import placeholder_apis, prompt_check
from vtok_fast.patch.tome_common import (STATE_ATTR, MergeRun, ToMeState, reapply, schedule, size_bias,
                                         tokens_after)
from vtok_fast.reduce.attention import attention

FEATURE = "hf_tome"
_PATCHER = "vtok_fast.patch.hf ToMe merging"
MISSING = "no CLIPVisionModel or SiglipVisionModel inside"


def finds(model: nn.Module) -> bool:
    """Whether ``model`` holds a vision tower this patcher targets."""
    return holds(model, tower_classes())


def apply(model: nn.Module, *, r, trace_source: bool = False, prop_attn: bool = True) -> nn.Module:
    """Patch every CLIP / SigLIP vision tower in ``model`` for ToMe merging with schedule ``r``;
    warn and change nothing when there is none or one is unsupported; a ValueError for a tower
    patched by ``compress=`` or a transformers release whose call conventions differ."""
    if reapply(model, FEATURE, r, prop_attn=prop_attn, trace_source=trace_source):
        return model
    towers = [m for m in model.modules() if isinstance(m, tower_classes())]
    if not towers:
        warn_not_applied(_PATCHER, model, MISSING)
        return model
    for tower in towers:
        feature = replaced_by(model, tower, "forward")
        if feature is not None:
            raise ValueError(f"the vision tower ({type(tower).__name__}) is patched by vtok_fast ({feature}: "
                             "compress=...): ToMe merging (tome_r=) and compress= cannot be combined; use "
                             "compress=('tome', {...}) instead")
        reason = _unsupported_reason(tower)
        if reason is not None:
            warn_not_applied(_PATCHER, model, f"{type(tower).__name__}: {reason}")
            return model
    llavas = _llavas_of(model, towers)
    check_api(_PATCHER, _apis(towers) + (placeholder_apis() if llavas else []))
    replacements = [(model, "r", r), (model, STATE_ATTR, ToMeState(bool(prop_attn), bool(trace_source)))]
    for tower in towers:
        replacements += _tower_replacements(model, tower)
    replacements += [prompt_check(llava) for llava in llavas]
    patch(model, FEATURE, replacements)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Restore the original methods and drop ``r`` and the ToMe state (no-op if not patched)."""
    restore(model, FEATURE)
    return model


def tome_root(model: nn.Module) -> nn.Module | None:
    """The module of ``model`` (itself included) that ``hf(..., tome_r=...)`` patched, or None."""
    return next((m for m in model.modules() if is_patched(m, FEATURE)), None)


def llava_image_token_count(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> int:
    """Image features per image that ``get_image_features`` of a ToMe-patched LLaVA model returns
    (``vtok_fast.patch.image_token_count`` answers for every patch, and for none).

    ``model``: a ``LlavaForConditionalGeneration`` / ``LlavaModel`` patched with ``hf(...)``;
    ``image_size``: the pixel size fed to the tower (default: the vision config's). Follows the
    model's ``vision_feature_layer`` and ``vision_feature_select_strategy`` and the current
    ``model.r``.
    """
    root = tome_root(model)
    if root is None:
        raise ValueError("model is not patched with vtok_fast.patch.hf(model, tome_r=...); "
                         "vtok_fast.patch.image_token_count(model) answers for every patch")
    config = getattr(model, "config", None)
    towers = [m for m in model.modules() if isinstance(m, tower_classes())]
    if len(towers) != 1 or not hasattr(config, "vision_feature_layer"):
        raise ValueError(f"model must be a LLaVA model with one vision tower, got {type(model).__name__}")
    vision = config.vision_config
    height, width = (image_size, image_size) if isinstance(image_size, int) else (
        image_size or (vision.image_size, vision.image_size))
    prefix = num_prefix_tokens(towers[0])
    num_tokens = (height // vision.patch_size) * (width // vision.patch_size) + prefix
    num_layers = len(encoder_of(towers[0]).layers)
    sched = schedule(root.r, num_layers)
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    counts = {tokens_after(num_tokens, sched[:k % (num_layers + 1)], prefix) for k in layers}
    if len(counts) != 1:
        raise ValueError(f"vision_feature_layer={config.vision_feature_layer} selects layers of different "
                         f"merged lengths {sorted(counts)}; they cannot be concatenated")
    count = counts.pop()
    return count - 1 if config.vision_feature_select_strategy == "default" else count


# ---------------------------------------------------------------------------------------------

def tower_classes() -> tuple[type, ...]:
    """The vision towers the HF patchers support (transformers is imported only when patching)."""
    from transformers.models.clip.modeling_clip import CLIPVisionModel
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel
    return CLIPVisionModel, SiglipVisionModel


def _layer_classes() -> tuple[type, ...]:
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
    return CLIPEncoderLayer, SiglipEncoderLayer


def _attention_classes() -> tuple[type, ...]:
    from transformers.models.clip.modeling_clip import CLIPAttention
    from transformers.models.siglip.modeling_siglip import SiglipAttention
    return CLIPAttention, SiglipAttention


def encoder_of(tower: nn.Module) -> nn.Module:
    """A CLIP/SigLIP vision tower's encoder (transformers 5.x layout, or the older one)."""
    return tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder


def num_prefix_tokens(tower: nn.Module) -> int:
    """1 for CLIP (its class token), 0 for SigLIP."""
    from transformers.models.clip.modeling_clip import CLIPVisionModel
    return 1 if isinstance(tower, CLIPVisionModel) else 0


def _llavas_of(model: nn.Module, towers: list[nn.Module]) -> list[nn.Module]:
    """The ``LlavaModel``s of ``model`` whose vision tower is one of ``towers``."""
    from transformers.models.llava.modeling_llava import LlavaModel

    return [m for m in model.modules()
            if isinstance(m, LlavaModel) and any(m.vision_tower is tower for tower in towers)]


def _apis(towers: list[nn.Module]) -> list[Api]:
    """The call conventions of transformers the patched tower methods rely on."""
    apis = []
    for tower in towers:
        encoder = encoder_of(tower)
        layer = encoder.layers[0] if len(encoder.layers) else None
        apis.append(Api(type(encoder), "forward", ("inputs_embeds", "attention_mask"), True))
        if layer is not None:
            attn_cls = type(layer.self_attn)
            apis += [Api(type(layer), "forward", ("hidden_states", "attention_mask"), True),
                     Api(attn_cls, "forward", ("hidden_states", "attention_mask"), True),
                     Api(sys.modules[attn_cls.__module__], "eager_attention_forward",
                         ("module", "query", "key", "value", "attention_mask"), True)]
        head = getattr(tower, "head", None)
        if head is not None:
            apis.append(Api(type(head), "forward", ("hidden_state",), True))
    return apis


def _unsupported_reason(tower: nn.Module) -> str | None:
    encoder = encoder_of(tower)
    if "forward" in encoder.__dict__:
        return "the encoder forward is already replaced by another patch"
    layer_classes = _layer_classes()
    attention_forwards = tuple(c.forward for c in _attention_classes())
    for i, layer in enumerate(encoder.layers):
        base = next((c for c in layer_classes if isinstance(layer, c)), None)
        if base is None or overridden(layer, base):
            return f"encoder.layers[{i}] is {type(layer).__name__}, not a CLIP/SigLIP encoder layer"
        attn = layer.self_attn
        if type(attn).forward not in attention_forwards or "forward" in attn.__dict__:
            return f"encoder.layers[{i}].self_attn is {type(attn).__name__}, not CLIP/SigLIP attention"
    return None


def _tower_replacements(root: nn.Module, tower: nn.Module) -> list:
    encoder = encoder_of(tower)
    run = _ActiveRun()
    merge_kwargs = {"class_token": num_prefix_tokens(tower) == 1}
    replacements = [(encoder, "forward", functools.partial(_encoder_forward, root, encoder, run, merge_kwargs))]
    for index, layer in enumerate(encoder.layers):
        replacements.append((layer, "forward", functools.partial(_layer_forward, layer, run, index)))
        replacements.append((layer.self_attn, "forward",
                             functools.partial(_attention_forward, layer.self_attn, run)))
    head = getattr(tower, "head", None)
    if head is not None and getattr(tower, "use_head", True):
        replacements.append((head, "forward", functools.partial(_siglip_head_forward, head, root)))
    return replacements


class _ActiveRun:
    """The tower's merge run while its patched encoder runs (None outside it)."""

    run: MergeRun | None = None


def _encoder_forward(root: nn.Module, encoder: nn.Module, active: _ActiveRun, merge_kwargs: dict,
                     inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """Patched encoder ``forward``: start a merge run, run the original loop, publish."""
    state = root.__dict__[STATE_ATTR]
    run = state.start(root.r, len(encoder.layers), merge_kwargs)
    if attention_mask is not None and any(run.schedule):
        raise ValueError("attention_mask is given to a ToMe-patched vision encoder: the mask is for the "
                         "unmerged tokens; set model.r = 0 to use it")
    active.run = run
    try:
        out = type(encoder).forward(encoder, inputs_embeds, attention_mask, **kwargs)
    finally:
        active.run = None
    last = out[0] if isinstance(out, tuple) else out.last_hidden_state
    run.publish(state, last, inputs_embeds.shape[1])
    return out


def _layer_forward(layer: nn.Module, active: _ActiveRun, index: int, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
    """Patched encoder-layer ``forward``: attention with the size bias, merge, MLP."""
    run = active.run
    if run is None:  # called outside the patched encoder: the original layer
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    r = run.schedule[index]
    bias = run.attention_bias()
    if bias is not None:
        bias = bias.to(hidden_states.dtype)
        run.key_bias = bias if attention_mask is None else None  # the size bias is the only mask
        attention_mask = bias if attention_mask is None else attention_mask + bias
    residual = hidden_states
    hidden_states, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden_states),
                                       attention_mask=attention_mask, **kwargs)
    hidden_states = residual + hidden_states
    keys, run.metric = run.metric, None
    if r > 0:
        hidden_states = run.merge(hidden_states, keys.mean(dim=1), r)
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


def _attention_forward(attn: nn.Module, active: _ActiveRun, hidden_states: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, **kwargs):
    """Patched CLIP/SigLIP attention ``forward``: the original computation, and inside the
    patched encoder it leaves the keys (the ToMe metric, once averaged over heads) in the merge run."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, attn.num_heads, attn.head_dim)  # no -1: the batch may be empty
    queries = attn.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    keys = attn.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    values = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    run = active.run
    if run is not None:  # the layer averages them over heads only where it merges
        run.metric = keys
    kwargs.setdefault("is_causal", getattr(attn, "is_causal", False))
    if (run is not None and run.key_bias is not None and attention_mask is run.key_bias
            and not kwargs["is_causal"] and not (attn.training and attn.dropout > 0)
            and (attn.config._attn_implementation or "eager") != "eager"
            and hidden_states.numel() > 0 and use_triton(queries)):
        # merged tokens on the Triton path: flash attention with the per-key size bias
        out = attention(queries, keys, values, key_bias=run.key_bias[:, 0, 0, :], scale=attn.scale)
        attn_output = out.transpose(1, 2).reshape(*input_shape, attn.num_heads * attn.head_dim)
        return attn.out_proj(attn_output), None
    attn_output, attn_weights = _attention_interface(attn, attention_mask, hidden_states.numel() == 0)(
        attn, queries, keys, values, attention_mask, scaling=attn.scale,
        dropout=0.0 if not attn.training else attn.dropout, **kwargs)
    attn_output = attn_output.reshape(*input_shape, attn.num_heads * attn.head_dim).contiguous()
    return attn.out_proj(attn_output), attn_weights


def _attention_interface(attn: nn.Module, attention_mask: torch.Tensor | None, empty: bool):
    """The attention function the model's config selects; flash (no additive mask) → sdpa; an
    empty batch → eager (transformers' sdpa and flash wrappers reshape with -1 and fail on it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attn).__module__].eager_attention_forward
    impl = attn.config._attn_implementation or "eager"
    if attention_mask is not None and impl.startswith("flash"):
        impl = "sdpa"
    if impl == "eager" or empty:
        return eager
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return ALL_ATTENTION_FUNCTIONS[impl]


def _siglip_head_forward(head: nn.Module, root: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """Patched ``SiglipMultiheadAttentionPoolingHead.forward``: the probe attends with ``log(size)``."""
    size = root.__dict__[STATE_ATTR].last.size
    if size is None:
        return type(head).forward(head, hidden_state)
    batch, num_tokens, _ = hidden_state.shape
    if tuple(size.shape[:2]) != (batch, num_tokens):
        raise ValueError(f"hidden_state has {batch} x {num_tokens} tokens but the last merged forward produced "
                         f"{tuple(size.shape[:2])}")
    heads = head.attention.num_heads
    bias = size_bias(size).to(hidden_state.dtype).expand(batch, heads, 1, num_tokens)
    probe = head.probe.repeat(batch, 1, 1)
    hidden_state = head.attention(probe, hidden_state, hidden_state,
                                  attn_mask=bias.reshape(batch * heads, 1, num_tokens))[0]
    residual = hidden_state
    hidden_state = head.mlp(head.layernorm(hidden_state))
    return (residual + hidden_state)[:, 0]
