"""Fused mergers and projectors into the LLM's space for Hugging Face VLMs.

``apply(model)`` finds, inside ``model``, and patches on that instance (classes untouched):

- Qwen2-VL's vision ``PatchMerger`` and Qwen2.5-VL's ``Qwen2_5_VLPatchMerger`` (the same module
  with an RMS ``ln_q``): ``forward`` runs ``ln_q`` + the 2x2 concatenation + ``mlp[0]`` + GELU as
  one ``merge_project`` call (order ``"contiguous"``: the processor already grouped the windows),
  then ``mlp[2]``. Qwen2.5-VL's window permutation around the merger is untouched;
- InternVL (``InternVLModel``): ``pixel_shuffle`` returns its input unchanged (after InternVL's
  own size check) and ``multi_modal_projector.forward`` does the shuffle (order ``"row_major"``),
  the LayerNorm, ``linear_1`` and the activation in one call, then ``linear_2``. The patched
  projector still accepts already-shuffled features (their width is ``C / downsample_ratio**2``);
- LLaVA's ``LlavaMultiModalProjector``: ``linear_1`` with the activation in its epilogue, then
  ``linear_2``;
- the projectors of ``vtok_fast.project.vlm_projectors`` (Qwen3-VL's merger and deepstack mergers,
  Gemma 3, Idefics3 / SmolVLM, Llama 4's pixel-shuffle MLP, Mistral 3, GLM-4V's merger,
  Aya Vision / Cohere2 Vision): ``forward`` becomes that file's fused forward function.

:data:`FAMILIES` maps ``config.model_type`` to the classes to find and their plans; a model whose
config names one of them is searched for those classes only, any other for every class.

A module whose forward was overridden or replaced, or whose norm / activation the fused op does
not compute, keeps its forward and gets one warning line. Parameters and ``state_dict`` are
unchanged; ``remove(model)`` restores every patched method. While InternVL is patched,
``model.pixel_shuffle`` alone no longer shuffles. The replaced methods follow transformers
``TRANSFORMERS_TESTED`` (``vtok_fast.patch._common``); their call conventions are checked at
``apply`` (a ValueError, nothing patched).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from vtok_fast.patch._common import Api, bind, check_api, holds, overridden, patch_every, restore
from vtok_fast.project.merge_project import merge_project
from vtok_fast.project import vlm_projectors as vp
from vtok_fast.project.modules import activation_of, mlp_project, norm_args, unfused_linear

FEATURE = "hf_project"
_PATCHER = "vtok_fast.patch.hf fused merger / projector"
MISSING = ("no Qwen2-VL / Qwen2.5-VL PatchMerger or other merger / projector of a supported VLM family inside "
           "(vtok_fast.patch.hf_project.FAMILIES)")


def finds(model: nn.Module) -> bool:
    """Whether ``model`` holds a merger / projector this patcher targets."""
    return holds(model, tuple(cls for cls, _ in _supported_kinds(model)))


def apply(model: nn.Module, *, missing_ok: bool = False) -> nn.Module:
    """Patch every supported merger / projector inside ``model``; warn about any left unfused
    and, unless ``missing_ok``, when there is none."""
    return patch_every(model, FEATURE, _PATCHER, _supported_kinds(model), missing_ok=missing_ok, missing=MISSING)


def remove(model: nn.Module) -> nn.Module:
    """Restore every module this feature patched inside ``model`` (no-op if none)."""
    restore(model, FEATURE)
    return model


def _models(family: str) -> str:
    return f"transformers.models.{family}.modeling_{family}"


# config.model_type -> ((module, class name, plan name), ...): the classes to find and their plans
# (a table: its rows share one shape on purpose)
FAMILIES = {
    "qwen2_vl": ((_models("qwen2_vl"), "PatchMerger", "_plan_qwen_merger"),),
    "qwen2_5_vl": ((_models("qwen2_5_vl"), "Qwen2_5_VLPatchMerger", "_plan_qwen_merger"),),
    "qwen3_vl": ((_models("qwen3_vl"), "Qwen3VLVisionPatchMerger", "_plan_qwen3_merger"),),
    "internvl": ((_models("internvl"), "InternVLModel", "_plan_internvl"),),
    "llava": ((_models("llava"), "LlavaMultiModalProjector", "_plan_llava"),),
    "gemma3": ((_models("gemma3"), "Gemma3MultiModalProjector", "_plan_gemma3"),),
    "idefics3": ((_models("idefics3"), "Idefics3Connector", "_plan_connector"),),
    "smolvlm": ((_models("smolvlm"), "SmolVLMConnector", "_plan_connector"),),
    "llama4": ((_models("llama4"), "Llama4VisionPixelShuffleMLP", "_plan_llama4"),),
    "mistral3": ((_models("mistral3"), "Mistral3MultiModalProjector", "_plan_mistral3"),),
    "glm4v": ((_models("glm4v"), "Glm4vVisionPatchMerger", "_plan_glm4v"),),
    "aya_vision": ((_models("aya_vision"), "AyaVisionMultiModalProjector", "_plan_aya"),),
    "cohere2_vision": ((_models("cohere2_vision"), "Cohere2VisionMultiModalProjector", "_plan_aya"),),
}


def _supported_kinds(model: nn.Module | None = None):
    """(class, plan) pairs of ``model``'s ``config.model_type`` in :data:`FAMILIES`, or of every
    family when the model has no such config; a plan returns the replacements or the reason it
    cannot fuse. transformers is imported only when patching."""
    import importlib

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    families = [FAMILIES[model_type]] if model_type in FAMILIES else FAMILIES.values()
    kinds = {}
    for entries in families:
        for module, name, plan in entries:
            kinds[getattr(importlib.import_module(module), name)] = globals()[plan]
    return tuple(kinds.items())


def _activation_problem(act: nn.Module) -> str | None:
    if activation_of(act)[0]:
        return None
    return f"activation {type(act).__name__} is not one the fused epilogue computes"


# --- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------

def _plan_qwen_merger(merger: nn.Module, cls):
    check_api(_PATCHER, [Api(cls, "forward", ("x",), True)])
    reason = overridden(merger, cls)
    if reason:
        return reason
    mlp = merger.mlp
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(mlp[0]) is nn.Linear
            and type(mlp[2]) is nn.Linear):
        return "mlp is not Sequential(Linear, activation, Linear)"
    if norm_args(merger.ln_q) is None:
        return f"ln_q is {type(merger.ln_q).__name__}, not nn.LayerNorm or a supported RMS norm"
    reason = _activation_problem(mlp[1])
    if reason:
        return reason
    context = merger.ln_q.weight.shape[0]
    window = math.isqrt(merger.hidden_size // context)
    if window * window * context != merger.hidden_size:
        return f"hidden_size {merger.hidden_size} is not a square multiple of ln_q's width {context}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patched PatchMerger.forward: ``mlp(ln_q(x).view(-1, hidden_size))``, fused."""
        first, act, second = self.mlp
        y = merge_project(x.reshape(-1, x.shape[-1]), None, window=window, order="contiguous",
                          norm="pre_concat", **norm_args(self.ln_q), weight=first.weight,
                          bias=first.bias, activation=activation_of(act)[1])
        return unfused_linear(y, second)

    return [(merger, "forward", bind(forward, merger))]


# --- InternVL ------------------------------------------------------------------------------------

def _plan_internvl(model: nn.Module, cls):
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    check_api(_PATCHER, [Api(cls, "pixel_shuffle", ("vision_features", "scale_factor"), True),
                         Api(InternVLMultiModalProjector, "forward", ("image_features",), True)])
    reason = overridden(model, cls, "pixel_shuffle")
    if reason:
        return reason
    projector = model.multi_modal_projector
    if not isinstance(projector, InternVLMultiModalProjector):
        return f"multi_modal_projector is {type(projector).__name__}"
    reason = overridden(projector, InternVLMultiModalProjector)
    if reason:
        return f"multi_modal_projector: {reason}"
    if norm_args(projector.layer_norm) is None or norm_args(projector.layer_norm)["norm_type"] != "layernorm":
        return f"layer_norm is {type(projector.layer_norm).__name__}, not nn.LayerNorm"
    reason = _activation_problem(projector.act)
    if reason:
        return reason
    ratio = model.config.downsample_ratio
    window = int(1 / ratio)  # InternVL's rounding
    if window < 1 or abs(window * ratio - 1) > 1e-6:
        return f"downsample_ratio {ratio} is not 1/s for an integer s"
    return [(model, "pixel_shuffle", bind(_pass_unshuffled, model)),
            (projector, "forward", bind(_internvl_projector_forward, projector))]


def _pass_unshuffled(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """Patched ``InternVLModel.pixel_shuffle``: InternVL's size check, then the features
    unchanged; the patched projector shuffles while it loads them."""
    _, width, height, _ = vision_features.size()
    if height % scale_factor != 0 or width % scale_factor != 0:
        raise ValueError("Height and width must be divisible by scale_factor for proper downsampling.")
    return vision_features


def _internvl_projector_forward(self, image_features: torch.Tensor) -> torch.Tensor:
    """Patched ``InternVLMultiModalProjector.forward``: ``(B, h*w, C)`` unshuffled features
    (square grid, as ``get_image_features`` builds it) or ``(B, N, C * s**2)`` shuffled ones."""
    width = self.layer_norm.normalized_shape[0]
    channels = image_features.shape[-1]
    window = math.isqrt(width // channels) if width % channels == 0 else 0
    if window * window * channels != width:
        raise ValueError(f"image_features must have {width} channels (shuffled) or {width} / s**2 "
                         f"(unshuffled), got shape {tuple(image_features.shape)}")
    tokens = image_features.shape[1]
    side = math.isqrt(tokens)
    grid = (side, side) if window > 1 else (tokens, 1)
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"unshuffled image_features must hold a square grid of tokens, got {tokens}")
    y = merge_project(image_features, grid, window=window, order="row_major", norm="post_concat",
                      **norm_args(self.layer_norm), weight=self.linear_1.weight, bias=self.linear_1.bias,
                      activation=activation_of(self.act)[1])
    return unfused_linear(y, self.linear_2)


# --- LLaVA ---------------------------------------------------------------------------------------

def _plan_llava(projector: nn.Module, cls):
    check_api(_PATCHER, [Api(cls, "forward", ("image_features",), True)])
    reason = overridden(projector, cls)
    if reason:
        return reason
    reason = _activation_problem(projector.act)
    if reason:
        return reason
    return [(projector, "forward", bind(_llava_projector_forward, projector))]


def _llava_projector_forward(self, image_features: torch.Tensor) -> torch.Tensor:
    """Patched ``LlavaMultiModalProjector.forward``: linear_1 + activation fused, then linear_2."""
    return mlp_project(image_features, self.linear_1, activation_of(self.act)[1], self.linear_2)


# --- the families of vtok_fast.project.vlm_projectors --------------------------------------------

def _forward_plan(module: nn.Module, cls, params: tuple, fused, problems) -> object:
    """Replace ``module.forward`` with ``fused`` unless ``problems(module)`` names a reason."""
    check_api(_PATCHER, [Api(cls, "forward", params, True)])
    reason = overridden(module, cls) or problems(module)
    return reason or [(module, "forward", bind(fused, module))]


def _linear_problem(module: nn.Module, *names: str) -> str | None:
    for name in names:
        owner = module
        for part in name.split("."):
            owner = getattr(owner, part, None)
        if type(owner) is not nn.Linear:
            return f"{name} is {type(owner).__name__}, not nn.Linear"
    return None


def _plan_qwen3_merger(merger: nn.Module, cls):
    def problems(m):
        if type(m.norm).forward is not nn.LayerNorm.forward:
            return f"norm is {type(m.norm).__name__}, not nn.LayerNorm"
        return _linear_problem(m, "linear_fc1", "linear_fc2") or _activation_problem(m.act_fn)
    return _forward_plan(merger, cls, ("x",), vp.qwen3_merger_forward, problems)


def _plan_gemma3(projector: nn.Module, cls):
    def problems(m):
        norm = m.mm_soft_emb_norm
        if type(norm).__name__ != "Gemma3RMSNorm" or "forward" in norm.__dict__:
            return f"mm_soft_emb_norm is {type(norm).__name__}, not Gemma3RMSNorm"
        if m.kernel_size < 1 or m.kernel_size * m.tokens_per_side != m.patches_per_image:
            return (f"mm_tokens_per_image does not pool the {m.patches_per_image}x{m.patches_per_image} "
                    "patch grid exactly")
        return None
    return _forward_plan(projector, cls, ("vision_outputs",), vp.gemma3_projector_forward, problems)


def _plan_connector(connector: nn.Module, cls):
    def problems(m):
        if not isinstance(m.scale_factor, int) or m.scale_factor < 1:
            return f"scale_factor {m.scale_factor!r} is not a positive int"
        if "forward" in m.modality_projection.__dict__ or not hasattr(m.modality_projection, "proj"):
            return "modality_projection is not the plain Linear wrapper"
        return _linear_problem(m, "modality_projection.proj")
    return _forward_plan(connector, cls, ("image_hidden_states",), vp.connector_forward, problems)


def _plan_llama4(adapter: nn.Module, cls):
    def problems(m):
        window = 1 / m.pixel_shuffle_ratio
        if abs(window - round(window)) > 1e-6:
            return f"pixel_shuffle_ratio {m.pixel_shuffle_ratio} is not 1/s for an integer s"
        return _linear_problem(m, "mlp.fc1", "mlp.fc2") or _activation_problem(m.mlp.activation_fn)
    return _forward_plan(adapter, cls, ("encoded_patches",), vp.llama4_adapter_forward, problems)


def _plan_mistral3(projector: nn.Module, cls):
    def problems(m):
        args = norm_args(m.norm)
        if args is None or args["norm_type"] != "rmsnorm":
            return f"norm is {type(m.norm).__name__}, not a supported RMS norm"
        if m.num_feature_layers != 1:
            return "several vision feature layers (linear_1 is wider than the patch merger's output)"
        if "forward" in m.patch_merger.__dict__ or type(m.patch_merger).__name__ != "Mistral3PatchMerger":
            return f"patch_merger is {type(m.patch_merger).__name__}"
        problem = _linear_problem(m, "patch_merger.merging_layer", "linear_1", "linear_2")
        return problem or _activation_problem(m.act)
    return _forward_plan(projector, cls, ("image_features", "image_sizes"), vp.mistral3_projector_forward, problems)


def _plan_glm4v(merger: nn.Module, cls):
    def problems(m):
        return _linear_problem(m, "gate_proj", "up_proj") or _activation_problem(m.act_fn)
    return _forward_plan(merger, cls, ("hidden_state",), vp.glm4v_merger_forward, problems)


def _plan_aya(projector: nn.Module, cls):
    def problems(m):
        norm = getattr(m, "layernorm", None)
        if norm is not None and type(norm).forward is not nn.LayerNorm.forward:
            return f"layernorm is {type(norm).__name__}, not nn.LayerNorm"
        if not isinstance(m.downsample_factor, int) or m.downsample_factor < 1:
            return f"downsample_factor {m.downsample_factor!r} is not a positive int"
        problem = _linear_problem(m, "linear_1", "linear_2") or _activation_problem(m.act)
        if problem is None and m.linear_1.out_features % 2:
            problem = "linear_1 has an odd width: no SwiGLU halves"
        return problem or (None if "pixel_shuffle" not in m.__dict__ else "pixel_shuffle is replaced")
    return _forward_plan(projector, cls, ("image_features",), vp.aya_projector_forward, problems)
