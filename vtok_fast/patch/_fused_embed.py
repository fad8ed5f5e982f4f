"""One call of the fused patch embedding on a host model's ``nn.Conv2d``, with its dtype rules.

Shared by the timm and Hugging Face patchers. The unfused path is
``cat(prefix, conv2d(images).flatten(2).transpose(1, 2)) + pos``; its result dtype is what the
fused call must return:
- without autocast the conv runs in the weight's dtype;
- under autocast the conv (on the lower-precision list on CUDA and CPU) casts images, weight and
  bias to the autocast dtype, and ``cat`` / ``+ pos`` then promote to the dtype of the prefix and
  position parameters (fp32 parameters under bf16 autocast give an fp32 result).
The fused op is not an autocast op and wants its tables in the weight's dtype, so the casts are
made here and the promoted dtype is passed as ``out_dtype``. Under autocast the position table
and prefix are therefore rounded to the autocast dtype while the conv output is not: the two
paths differ by about one rounding of the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vtok_fast.patch_embedding import patch_embed, patch_embed_reference


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
    weight, bias = proj.weight, proj.bias
    compute = weight.dtype
    device_type = images.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype != torch.float64:
        compute = torch.get_autocast_dtype(device_type)
    out_dtype = compute
    for extra in (prefix, pos_embed):
        if extra is not None:
            out_dtype = torch.promote_types(out_dtype, extra.dtype)
    # The op multiplies in the weight's dtype (pixels are cast on load, as autocast would cast
    # them) and takes its tables in that dtype; it writes ``out_dtype`` directly.
    weight = weight.to(compute)
    bias = None if bias is None else bias.to(compute)
    prefix = None if prefix is None else prefix.to(compute)
    pos_embed = None if pos_embed is None else pos_embed.to(compute)
    # float64 models (not a kernel dtype) run the unfused reference, which is their original math.
    fn = patch_embed_reference if compute == torch.float64 else patch_embed
    return fn(images, weight, bias, pos_embed, prefix, pos_covers_prefix=pos_covers_prefix, out_dtype=out_dtype)
