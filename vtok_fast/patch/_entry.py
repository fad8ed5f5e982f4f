"""The public entry points of :mod:`vtok_fast.patch`: ``timm``, ``hf`` and ``unpatch``.

Each call is all or nothing: a call that raises leaves the model as it found it (patches of
earlier calls stay; see ``_common.all_or_nothing``). The default features (fused embedding, fused
mergers / projectors) apply where the model has such modules and are silent where it has none;
a module found but not fusable warns with its reason, ToMe asked for on a model without a
supported tower warns, and a model where no requested feature finds anything at all gets one
warning line saying so.
"""
from __future__ import annotations

import torch.nn as nn

from vtok_fast.patch import hf_compress, hf_embed, hf_fastv, hf_project, hf_tome, timm_embed, timm_swin, timm_tome
from vtok_fast.patch._common import all_or_nothing, warn_not_applied
from vtok_fast.patch.llava_common import parse_spec

_NAMES = ("vtok_fast.patch.timm", "vtok_fast.patch.hf")
_EMBED, _PROJECT, _TOME = (timm_embed, hf_embed), (timm_swin, hf_project), (timm_tome, hf_tome)


def _check_module(library: int, model) -> None:
    if not isinstance(model, nn.Module):
        kind = ("a timm VisionTransformer", "a Hugging Face vision model")[library]
        raise TypeError(f"model must be an nn.Module ({kind}), got {type(model).__name__}")


def _apply(library: int, model: nn.Module, fuse_embed, tome_r, trace_source, prop_attn, fuse_project) -> None:
    """Apply the chosen features with the patchers of ``library`` (0: timm, 1: HF)."""
    requested = []
    if fuse_embed:
        requested.append((_EMBED[library], {"missing_ok": True}))
    if fuse_project:
        requested.append((_PROJECT[library], {"missing_ok": True}))
    if tome_r is not None:
        requested.append((_TOME[library], {"r": tome_r, "trace_source": trace_source, "prop_attn": prop_attn}))
    if requested and not any(patcher.finds(model) for patcher, _ in requested):
        warn_not_applied(_NAMES[library], model, "; ".join(patcher.MISSING for patcher, _ in requested))
        return
    for patcher, kwargs in requested:
        patcher.apply(model, **kwargs)


def timm(model: nn.Module, *, fuse_embed: bool = True, tome_r=None, trace_source: bool = False,
         prop_attn: bool = True, fuse_merge: bool = True) -> nn.Module:
    """Patch a timm VisionTransformer (or DeiT) or Swin model in place; returns it.

    ``fuse_embed``: patch embedding + position embedding run as one fused op (ViT/DeiT).
    ``tome_r``: ToMe merging schedule (int, ``(r, inflection)`` or list); None = no merging.
    ``trace_source``: keep the int64 source map ``(B, N0)`` in ``tome_state(model).last``.
    ``prop_attn``: proportional attention (``log(size)`` key bias) once tokens are merged.
    ``fuse_merge``: Swin's ``PatchMerging`` runs as one fused gather + LayerNorm + Linear.
    A call that raises changes nothing.
    """
    _check_module(0, model)
    with all_or_nothing():
        _apply(0, model, fuse_embed, tome_r, trace_source, prop_attn, fuse_merge)
    return model


def hf(model: nn.Module, *, fuse_embed: bool = True, tome_r=None, trace_source: bool = False,
       prop_attn: bool = True, fuse_project: bool = True, compress=None) -> nn.Module:
    """Patch a Hugging Face model in place and return it: CLIP / SigLIP vision towers (fused
    embedding, ToMe), also inside LLaVA; ``fuse_project``: the Qwen2-VL / Qwen2.5-VL patch mergers,
    InternVL's pixel shuffle + projector and LLaVA's projector run as one fused op; ``compress``: a
    method name or ``(method, budget)`` reducing the image tokens a LLaVA model's projector
    receives (any ``vtok_fast.compress`` method; it composes with the fused projector and replaces
    an earlier vision compression), or ``("fastv", {"layer": K, "ratio": R})`` pruning them inside
    its language model. With a vision method the processor's normal prompt runs unchanged (the
    model drops the placeholders of removed tokens; budget option ``positions="original"`` or
    ``"compact"``), or ``image_token_count`` / ``configure_processor`` give the processor the new
    count. ``tome_r`` and a vision ``compress`` cannot be combined (a ValueError, whatever
    the order of the calls). Other arguments as :func:`timm`; a call that raises changes nothing."""
    _check_module(1, model)
    method = None if compress is None else parse_spec(compress)[0]
    with all_or_nothing():
        if method not in (None, "fastv", "pyramiddrop"):
            hf_compress.remove(model)  # replaced below: the projector is fused first, then wrapped
        _apply(1, model, fuse_embed, tome_r, trace_source, prop_attn, fuse_project)
        if compress is not None:
            hf_compress.apply(model, compress=compress)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo every vtok_fast patch on ``model`` (a no-op for an unpatched model); returns it."""
    for patcher in (hf_compress, hf_fastv, *_EMBED, *_TOME, *_PROJECT):
        patcher.remove(model)
    return model
