"""Fused patch + position embedding for timm ``VisionTransformer`` and DeiT distilled models.

``apply(model)`` patches two methods of this model instance (its class is untouched):
- ``model.patch_embed.forward`` checks the image size exactly as timm's ``PatchEmbed`` does and
  returns the pixels unchanged;
- ``model._pos_embed(pixels)`` runs projection, prefix tokens (``[cls][reg...]``, DeiT
  ``[cls][dist]``) and the position add as one ``vtok_fast.patch_embed`` call, then ``pos_drop``.
``forward``, ``forward_features`` and ``forward_intermediates`` call these two in that order, so
``patch_drop``, ``norm_pre`` and everything after run unchanged. With ``dynamic_img_size`` the
table comes from timm's own ``resample_abs_pos_embed``, called as ``_pos_embed`` calls it.
After patching, ``model.patch_embed`` alone no longer projects; ``remove`` restores it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vtok_fast.patch._common import bind, is_patched, patch, restore, warn_not_applied
from vtok_fast.patch.embed_common import conv_is_plain_patchify, embed_tokens

FEATURE = "timm_embed"
_PATCHER = "vtok_fast.patch.timm fused patch embedding"
MISSING = "not a timm VisionTransformer"


def finds(model: nn.Module) -> bool:
    """Whether ``model`` is a model this patcher targets (a timm VisionTransformer)."""
    return isinstance(model, _timm_classes()[0])


def apply(model: nn.Module, *, missing_ok: bool = False) -> nn.Module:
    """Fuse ``model``'s patch and position embedding in place; warn and do nothing if not exact
    (not a VisionTransformer: silent with ``missing_ok``)."""
    if is_patched(model, FEATURE) or (missing_ok and not finds(model)):
        return model
    reason = _unfusable_reason(model)
    if reason is not None:
        warn_not_applied(_PATCHER, model, reason)
        return model
    _, VisionTransformerDistilled, _, _ = _timm_classes()
    distilled = type(model)._pos_embed is VisionTransformerDistilled._pos_embed
    patch(model, FEATURE, [
        (model.patch_embed, "forward", bind(_check_size_pass_pixels, model.patch_embed)),
        (model, "_pos_embed", bind(_fused_pos_embed_distilled if distilled else _fused_pos_embed, model)),
    ])
    return model


def remove(model: nn.Module) -> nn.Module:
    """Restore the original methods (a no-op on a model this feature did not patch)."""
    restore(model, FEATURE)
    return model


def _timm_classes():
    from timm.layers import Format, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer, VisionTransformerDistilled, PatchEmbed, Format


def _unfusable_reason(model: nn.Module) -> str | None:
    """Why the fused op would not reproduce ``model``'s embedding exactly; None if it would."""
    VisionTransformer, VisionTransformerDistilled, PatchEmbed, Format = _timm_classes()
    if not isinstance(model, VisionTransformer):
        return MISSING
    if type(model)._pos_embed not in (VisionTransformer._pos_embed, VisionTransformerDistilled._pos_embed):
        return f"{type(model).__name__} overrides _pos_embed"
    if "_pos_embed" in model.__dict__ or "forward" in getattr(model.patch_embed, "__dict__", {}):
        return "_pos_embed or patch_embed.forward is already replaced by another patch"
    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed) or type(pe).forward is not PatchEmbed.forward:
        return f"patch_embed is {type(pe).__name__}, not timm PatchEmbed"
    if not isinstance(pe.norm, nn.Identity):
        return f"patch_embed.norm is {type(pe.norm).__name__}: it runs between projection and position add"
    if pe.dynamic_img_pad:
        return "patch_embed.dynamic_img_pad pads the image before the projection"
    if model.dynamic_img_size:
        layout_ok = not pe.flatten and pe.output_fmt == Format.NHWC
    else:
        layout_ok = (pe.flatten and pe.output_fmt == Format.NCHW) or (not pe.flatten and pe.output_fmt == Format.NLC)
    if not layout_ok:
        return (f"patch_embed output format {pe.output_fmt.value} (flatten={pe.flatten}) is not the token "
                f"layout _pos_embed expects")
    return conv_is_plain_patchify(pe.proj, pe.patch_size)


def _check_size_pass_pixels(self, x: torch.Tensor) -> torch.Tensor:
    """Patched ``PatchEmbed.forward``: timm's image-size checks, then the pixels unchanged."""
    _, _, H, W = x.shape
    if self.img_size is not None:
        if self.strict_img_size:
            torch._assert(H == self.img_size[0], f"Input height ({H}) doesn't match model ({self.img_size[0]}).")
            torch._assert(W == self.img_size[1], f"Input width ({W}) doesn't match model ({self.img_size[1]}).")
        else:
            torch._assert(H % self.patch_size[0] == 0,
                          f"Input height ({H}) should be divisible by patch size ({self.patch_size[0]}).")
            torch._assert(W % self.patch_size[1] == 0,
                          f"Input width ({W}) should be divisible by patch size ({self.patch_size[1]}).")
    return x


def _fused_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """Patched ``VisionTransformer._pos_embed``: pixels ``[B, C, H, W]`` in, ``[cls][reg...]`` tokens out."""
    prefix = [t for t in (self.cls_token, self.reg_token) if t is not None]
    return _embed_and_drop(self, x, prefix)


def _fused_pos_embed_distilled(self, x: torch.Tensor) -> torch.Tensor:
    """Patched ``VisionTransformerDistilled._pos_embed``: pixels in, ``[cls][dist]`` tokens out."""
    return _embed_and_drop(self, x, [self.cls_token, self.dist_token])


def _embed_and_drop(model: nn.Module, x: torch.Tensor, prefix: list[torch.Tensor]) -> torch.Tensor:
    pos_embed = model.pos_embed
    if pos_embed is not None and model.dynamic_img_size:
        from timm.layers import resample_abs_pos_embed  # timm is imported lazily: unpatch() imports us

        patch_h, patch_w = model.patch_embed.patch_size
        pos_embed = resample_abs_pos_embed(
            pos_embed,
            new_size=(x.shape[-2] // patch_h, x.shape[-1] // patch_w),
            old_size=model.patch_embed.grid_size,
            num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
        )
    prefix_tokens = None
    if prefix:
        prefix_tokens = prefix[0] if len(prefix) == 1 else torch.cat(prefix, dim=1)
    tokens = embed_tokens(x, model.patch_embed.proj, prefix_tokens, pos_embed,
                          pos_covers_prefix=not model.no_embed_class)
    return model.pos_drop(tokens)
