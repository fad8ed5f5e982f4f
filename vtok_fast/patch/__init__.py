"""Drop-in patchers for timm and Hugging Face vision models.

``timm(model, ...)`` and ``hf(model, ...)`` patch in place and return the model; each feature
(fused patch embedding, ToMe merging, fused token mergers / projectors) can be used alone.
``unpatch(model)`` restores the original forward methods. Parameters and ``state_dict`` are never
changed. ``tome_state(model)`` reads the ToMe settings and last-forward results of a patched model.
"""
from __future__ import annotations

import importlib

import torch.nn as nn

from vtok_fast.patch.hf_compress import configure_processor, image_token_count
from vtok_fast.patch.hf_tome import llava_image_token_count
from vtok_fast.patch.tome_common import ToMeResult, ToMeState, tome_state

__all__ = ["timm", "hf", "unpatch", "tome_state", "ToMeState", "ToMeResult", "llava_image_token_count",
           "image_token_count", "configure_processor"]

# feature -> (timm patcher module, HF patcher module); each has apply(model, **kw) and remove(model)
_FEATURES = {
    "embed": ("vtok_fast.patch.timm_embed", "vtok_fast.patch.hf_embed"),
    "tome": ("vtok_fast.patch.timm_tome", "vtok_fast.patch.hf_tome"),
    "project": ("vtok_fast.patch.timm_swin", "vtok_fast.patch.hf_project"),
}
# HF-only features: token compression before the LLaVA projector, and FastV inside its LLM
_HF_ONLY = ("vtok_fast.patch.hf_compress", "vtok_fast.patch.hf_fastv")


def _module(name: str):
    return importlib.import_module(name)


def _apply(library: int, model, fuse_embed, tome_r, trace_source, prop_attn, fuse_project) -> nn.Module:
    """Apply the chosen features with the patchers of ``library`` (0: timm, 1: HF)."""
    if not isinstance(model, nn.Module):
        kind = ("a timm VisionTransformer", "a Hugging Face vision model")[library]
        raise TypeError(f"model must be an nn.Module ({kind}), got {type(model).__name__}")
    if fuse_embed:
        _module(_FEATURES["embed"][library]).apply(model)
    if fuse_project:  # only where the model has such modules: no warning for a plain ViT
        _module(_FEATURES["project"][library]).apply(model, missing_ok=True)
    if tome_r is not None:
        _module(_FEATURES["tome"][library]).apply(model, r=tome_r, trace_source=trace_source,
                                                  prop_attn=prop_attn)
    return model


def timm(model: nn.Module, *, fuse_embed: bool = True, tome_r=None, trace_source: bool = False,
         prop_attn: bool = True, fuse_merge: bool = True) -> nn.Module:
    """Patch a timm VisionTransformer (or DeiT) or Swin model in place.

    ``fuse_embed``: patch embedding + position embedding run as one fused op (ViT/DeiT).
    ``tome_r``: ToMe merging schedule (int, ``(r, inflection)`` or list); None = no merging.
    ``trace_source``: keep the int64 source map ``(B, N0)`` in ``tome_state(model).last``.
    ``prop_attn``: proportional attention (``log(size)`` key bias) once tokens are merged.
    ``fuse_merge``: Swin's ``PatchMerging`` runs as one fused gather + LayerNorm + Linear.
    """
    return _apply(0, model, fuse_embed, tome_r, trace_source, prop_attn, fuse_merge)


def hf(model: nn.Module, *, fuse_embed: bool = True, tome_r=None, trace_source: bool = False,
       prop_attn: bool = True, fuse_project: bool = True, compress=None) -> nn.Module:
    """Patch a Hugging Face model in place: CLIP / SigLIP vision towers (fused embedding, ToMe),
    also inside LLaVA; ``fuse_project``: the Qwen2-VL / Qwen2.5-VL patch mergers, InternVL's pixel
    shuffle + projector and LLaVA's projector run as one fused op; ``compress``: a method name or
    ``(method, budget)`` reducing the image tokens a LLaVA model's projector receives (any
    ``vtok_fast.compress`` method), or ``("fastv", {"layer": K, "ratio": R})`` pruning them inside
    its language model; ``image_token_count`` / ``configure_processor`` then give the processor
    the new count. Other arguments as :func:`timm`."""
    _apply(1, model, fuse_embed, tome_r, trace_source, prop_attn, fuse_project)
    if compress is not None:
        _module(_HF_ONLY[0]).apply(model, compress=compress)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo every vtok_fast patch on ``model`` (a no-op for an unpatched model)."""
    for name in (*_HF_ONLY, *(mod for pair in _FEATURES.values() for mod in pair)):
        _module(name).remove(model)
    return model
