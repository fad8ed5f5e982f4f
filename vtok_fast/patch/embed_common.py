"""One call of the fused patch embedding on a host model's ``nn.Conv2d``, with its dtype rules.

Shared by the timm and Hugging Face patchers. The unfused path is
``cat(prefix, conv2d(images).flatten(2).transpose(1, 2)) + pos``; its result dtype, with and
without autocast, is what the fused call returns (the rules:
``vtok_fast.encode.patch_embed.patch_embed_like_conv``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vtok_fast.encode.patch_embed import patch_embed_like_conv


def conv_is_plain_patchify(proj: nn.Module, patch_size: tuple[int, int]) -> str | None:
    """None when ``proj`` is an ``nn.Conv2d`` that cuts ``patch_size`` patches; else the reason."""
    if not isinstance(proj, nn.Conv2d) or type(proj).forward is not nn.Conv2d.forward:
        return f"the projection is {type(proj).__name__}, not a plain nn.Conv2d"
    if tuple(proj.kernel_size) != tuple(patch_size) or tuple(proj.stride) != tuple(patch_size):
        return (f"the projection has kernel {tuple(proj.kernel_size)} and stride {tuple(proj.stride)}, "
                f"not the patch size {tuple(patch_size)}")
    padding = proj.padding if isinstance(proj.padding, str) else tuple(proj.padding)
    if padding not in ("valid", (0, 0)) or tuple(proj.dilation) != (1, 1) or proj.groups != 1:
        return "the projection pads, dilates or groups its input"
    return None


def embed_tokens(images: torch.Tensor, proj: nn.Conv2d, prefix: torch.Tensor | None,
                 pos_embed: torch.Tensor | None, *, pos_covers_prefix: bool) -> torch.Tensor:
    """``[B, P+N, D]`` tokens: prefix ``(P, D)``/``(1, P, D)`` then patches, plus ``pos_embed``.

    ``pos_embed`` is ``(L, D)`` or ``(1, L, D)`` with ``L = P+N`` when ``pos_covers_prefix`` else
    ``N``; ``None`` skips the add. The dtype matches what the unfused modules return.
    """
    if not images.is_floating_point():
        # nn.Conv2d rejects integer pixels; the fused op would rescale uint8 by 1/255 instead.
        raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
    return patch_embed_like_conv(images, proj.weight, proj.bias, pos_embed, prefix,
                                 pos_covers_prefix=pos_covers_prefix)
