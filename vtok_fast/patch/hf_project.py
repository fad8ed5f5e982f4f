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
  ``linear_2``.

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
from vtok_fast.project.modules import activation_of, mlp_project, norm_args

FEATURE = "hf_project"
_PATCHER = "vtok_fast.patch.hf fused merger / projector"
MISSING = "no Qwen2-VL / Qwen2.5-VL PatchMerger, InternVLModel or LlavaMultiModalProjector inside"


def finds(model: nn.Module) -> bool:
    """Whether ``model`` holds a merger / projector this patcher targets."""
    return holds(model, tuple(cls for cls, _ in _supported_kinds()))


def apply(model: nn.Module, *, missing_ok: bool = False) -> nn.Module:
    """Patch every supported merger / projector inside ``model``; warn about any left unfused
    and, unless ``missing_ok``, when there is none."""
    return patch_every(model, FEATURE, _PATCHER, _supported_kinds(), missing_ok=missing_ok, missing=MISSING)


def remove(model: nn.Module) -> nn.Module:
    """Restore every module this feature patched inside ``model`` (no-op if none)."""
    restore(model, FEATURE)
    return model


def _supported_kinds():
    """(class, plan) pairs; a plan returns the replacements or the reason it cannot fuse.
    transformers is imported only when patching."""
    from transformers.models.internvl.modeling_internvl import InternVLModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    return ((PatchMerger, _plan_qwen_merger), (Qwen2_5_VLPatchMerger, _plan_qwen_merger),
            (InternVLModel, _plan_internvl), (LlavaMultiModalProjector, _plan_llava))


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
        return second(y)

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
    return self.linear_2(y)


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
