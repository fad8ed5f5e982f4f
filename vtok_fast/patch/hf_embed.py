"""Fused patch + position embedding for Hugging Face CLIP and SigLIP vision towers.

``apply(model)`` finds every ``CLIPVisionEmbeddings`` and ``SiglipVisionEmbeddings`` inside
``model`` (a ``CLIPVisionModel``, ``SiglipVisionModel``, ``CLIPModel``, or the vision tower of a
``LlavaForConditionalGeneration``) and replaces that instance's ``forward`` with one
``vtok_fast.patch_embed`` call. Semantics kept from the originals:
- pixels are cast to the conv weight's dtype first (then to the autocast dtype under autocast);
- CLIP: ``class_embedding`` (``[D]``) is the one prefix token and the position table covers
  it; a wrong image size without ``interpolate_pos_encoding`` raises the same ValueError.
  SigLIP: no prefix token; the conv has a bias;
- ``interpolate_pos_encoding=True`` takes the table from the module's own
  ``interpolate_pos_encoding`` (bicubic, no antialias, parameter dtype);
- otherwise the table is ``position_embedding.weight``, which equals
  ``position_embedding(position_ids)`` since ``position_ids`` is ``arange(num_positions)``.
The patched methods follow transformers ``TRANSFORMERS_TESTED`` (``vtok_fast.patch._common``);
their call conventions are checked at ``apply`` (a ValueError, nothing patched).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vtok_fast.patch._common import Api, bind, check_api, holds, overridden, patch_every, restore
from vtok_fast.patch.embed_common import conv_is_plain_patchify, embed_tokens

FEATURE = "hf_embed"
_PATCHER = "vtok_fast.patch.hf fused patch embedding"
MISSING = "no CLIPVisionEmbeddings or SiglipVisionEmbeddings inside"


def finds(model: nn.Module) -> bool:
    """Whether ``model`` holds an embedding this patcher targets."""
    return holds(model, tuple(cls for cls, _ in _supported_kinds()))


def apply(model: nn.Module, *, missing_ok: bool = False) -> nn.Module:
    """Fuse every supported vision embedding inside ``model``; warn about any left unfused and,
    unless ``missing_ok``, when there is none."""
    return patch_every(model, FEATURE, _PATCHER, _supported_kinds(), missing=MISSING, missing_ok=missing_ok)


def remove(model: nn.Module) -> nn.Module:
    """Restore every embedding this feature patched inside ``model`` (no-op if none)."""
    restore(model, FEATURE)
    return model


def _supported_kinds():
    """(embedding class, plan) pairs; transformers is imported only when patching."""
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings
    return ((CLIPVisionEmbeddings, _make_plan(_clip_forward)), (SiglipVisionEmbeddings, _make_plan(_siglip_forward)))


def _make_plan(fused_forward):
    """A plan for one embedding class: the forward replacement, or why it cannot be fused."""
    def plan(module: nn.Module, cls):
        check_api(_PATCHER, [Api(cls, "forward", ("pixel_values", "interpolate_pos_encoding"), True),
                             Api(cls, "interpolate_pos_encoding", ("embeddings", "height", "width"), True)])
        reason = overridden(module, cls)
        if reason:
            return reason
        patch_size = module.patch_size
        patch_size = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
        reason = conv_is_plain_patchify(module.patch_embedding, patch_size)
        return reason or [(module, "forward", bind(fused_forward, module))]
    return plan


def _shape_only(like: torch.Tensor, num_tokens: int, dim: int) -> torch.Tensor:
    """A ``[1, num_tokens, dim]`` view without storage: ``interpolate_pos_encoding`` reads only shapes."""
    return like[:1, :1].expand(1, num_tokens, dim)


def _position_table(module: nn.Module, height: int, width: int, num_prefix: int, interpolate) -> torch.Tensor:
    table = module.position_embedding.weight
    if not interpolate:
        return table
    num_tokens = num_prefix + (height // module.patch_size) * (width // module.patch_size)
    return module.interpolate_pos_encoding(_shape_only(table, num_tokens, module.embed_dim), height, width)


def _clip_forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding=False) -> torch.Tensor:
    """Patched ``CLIPVisionEmbeddings.forward``: ``[B, 1+N, D]``."""
    _, _, height, width = pixel_values.shape
    if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
        raise ValueError(
            f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size})."
        )
    images = pixel_values.to(dtype=self.patch_embedding.weight.dtype)
    pos_embed = _position_table(self, height, width, 1, interpolate_pos_encoding)
    return embed_tokens(images, self.patch_embedding, self.class_embedding.view(1, -1), pos_embed,
                        pos_covers_prefix=True)


def _siglip_forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding=False) -> torch.Tensor:
    """Patched ``SiglipVisionEmbeddings.forward``: ``[B, N, D]``."""
    _, _, height, width = pixel_values.shape
    images = pixel_values.to(dtype=self.patch_embedding.weight.dtype)
    pos_embed = _position_table(self, height, width, 0, interpolate_pos_encoding)
    return embed_tokens(images, self.patch_embedding, None, pos_embed, pos_covers_prefix=True)
