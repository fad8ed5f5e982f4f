"""Fused patch embedding: pixels -> ``[prefix tokens][patch tokens] + position table`` in one op.

``patch_embed`` computes what timm's ``PatchEmbed`` + ``VisionTransformer._pos_embed`` (and HF's
CLIP/SigLIP vision embeddings) compute with a strided conv, a flatten/transpose, a ``cat`` and an
add, as one implicit-im2col GEMM whose epilogue adds the bias and the position rows and writes
the prefix rows (CUDA: Triton kernels in ``vtok_fast.kernels.patch_embed``). CPU tensors run a
PyTorch path built from one im2col copy and one matrix product written straight into the result.

Semantics (summarized in the README, "Semantics worth knowing"):

- grid ``H // ph x W // pw``, remainder pixels dropped; patches row-major over (h, w);
  K ordered ``(c, kh, kw)`` like ``weight.reshape(D, -1)``;
- ``uint8`` pixels are scaled by 1/255; ``mean``/``std`` (per channel) normalize
  ``(x - mean) / std`` on the load; the normalized pixels are cast to the weight dtype (what HF
  does before its conv) and multiplied with fp32 accumulation;
- ``pos_covers_prefix=True`` (timm ``no_embed_class=False``): the table has ``P + N`` rows and is
  added to the prefix rows too; ``False`` (``no_embed_class=True``): ``N`` rows, patches only;
- fp32 weights follow ``torch.backends.cudnn.allow_tf32`` on CUDA (TF32 by default, exactly like
  the ``nn.Conv2d`` this op replaces); set it to False for IEEE fp32 products;
- ``patch_embed`` is not an autocast op: it computes in its arguments' dtypes inside an autocast
  region too. ``PatchEmbed`` and the model patchers apply the unfused path's autocast rules
  (``patch_embed_like_conv``): the conv's dtype is the autocast dtype, then ``cat`` / ``+ pos``
  promote with the prefix and table dtypes;
- images must hold at least one patch (``F.conv2d`` rejects an input smaller than its kernel);
  ``std`` must be positive and ``mean`` / ``std`` finite.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast._backend import use_triton
from vtok_fast._launch import cdiv, optional_operand, sm_count, strides, tile_grid
from vtok_fast._op import define_op
from vtok_fast._checks import FLOAT_DTYPES, check_bias, check_same_device, check_tensor, token_table

IMAGE_DTYPES = (*FLOAT_DTYPES, torch.uint8)
OUT_DTYPES = (*FLOAT_DTYPES, torch.float64)
ChannelStats = Optional[Union[torch.Tensor, Sequence[float], float]]


# --- reference: the unfused eager path, as timm / HF write it ----------------------------------

def _cat_prefix_add_pos(y, pos_embed, prefix, pos_covers_prefix):
    """Unfused ``_pos_embed`` on ``(B, N, D)`` patch tokens: ``cat`` the prefix, add the table."""
    pos = None if pos_embed is None else pos_embed.reshape(-1, pos_embed.shape[-1])
    if pos is not None and not pos_covers_prefix:
        y = y + pos
    if prefix is not None:
        pre = prefix.reshape(-1, prefix.shape[-1])
        y = torch.cat([pre.expand(y.shape[0], -1, -1), y], dim=1)
    if pos is not None and pos_covers_prefix:
        y = y + pos
    return y


def patch_embed_reference(images, weight, bias=None, pos_embed=None, prefix=None, *,
                          pos_covers_prefix=True, mean=None, std=None, out_dtype=None):
    """Unfused PyTorch: normalize, ``conv2d``, flatten/transpose, ``cat`` prefix, add the table.

    Accepts float64 everywhere (tests build their ground truth with it). Same arguments and
    result as :func:`patch_embed`.
    """
    x = images
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if x.dtype == torch.uint8:
        x = x.to(work) / 255
    if mean is not None or std is not None:
        x = x.to(work)
        if mean is not None:
            x = x - torch.as_tensor(mean, dtype=work, device=x.device).reshape(1, -1, 1, 1)
        if std is not None:
            x = x / torch.as_tensor(std, dtype=work, device=x.device).reshape(1, -1, 1, 1)
    x = x.to(weight.dtype)
    y = F.conv2d(x, weight, bias, stride=tuple(weight.shape[-2:]))
    y = y.flatten(2).transpose(1, 2)  # (B, N, D)
    y = _cat_prefix_add_pos(y, pos_embed, prefix, pos_covers_prefix)
    return y.to(out_dtype or weight.dtype)


# --- argument checks ---------------------------------------------------------------------------

def _stat_values(name: str, value, channels: int, default: float, images: torch.Tensor):
    """``mean`` / ``std`` as ``C`` fp32 values on the images' device.

    Accepted: a number, a sequence of numbers, or a real tensor / array (any shape) holding ``C``
    values or one value. Values must be finite, and ``std`` positive. That is checked for
    numbers, sequences and CPU tensors; a tensor on another device is not read back (that would
    synchronize every call), nor is a tensor while ``torch.compile`` traces.
    """
    if value is None:
        return torch.full((channels,), default, dtype=torch.float32, device=images.device)
    values = None  # the values as Python floats, where they can be read cheaply
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        t = torch.as_tensor(value).detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a tensor of {t.dtype}")
        if t.device.type == "meta" and images.device.type != "meta":
            raise ValueError(f"{name} is on meta (no values) but images is on {images.device}; "
                             "pass numbers or a tensor holding them")
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            values = t.reshape(-1).tolist()
    elif isinstance(value, (numbers.Real, Sequence)) and not isinstance(value, (str, bytes, bool)):
        values = [value] if isinstance(value, numbers.Real) else list(value)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            kinds = ", ".join(sorted({type(v).__name__ for v in values}))
            raise TypeError(f"{name} must be a sequence of numbers, got a {type(value).__name__} "
                            f"of {kinds}")
        values = [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float32)
    else:
        raise TypeError(f"{name} must be a number, a sequence of {channels} numbers or a tensor, "
                        f"got {type(value).__name__}")
    t = t.reshape(-1)
    if t.numel() not in (1, channels):
        raise ValueError(f"{name} must have one value per channel (C={channels}) or one value, "
                         f"got {t.numel()} values")
    if values is not None and not all(math.isfinite(v) and (v > 0 or name != "std") for v in values):
        want = "positive and finite" if name == "std" else "finite"
        raise ValueError(f"{name} values must be {want}, got {values}")
    return t.to(device=images.device, dtype=torch.float32).expand(channels)


def _channel_affine(images: torch.Tensor, mean: ChannelStats, std: ChannelStats):
    """Per-channel fp32 ``(scale, shift)`` with ``normalized = pixel * scale + shift``, or
    ``(None, None)`` for float pixels without normalization. Treated as constants (no grad)."""
    channels = images.shape[1]
    unit = 1.0 / 255 if images.dtype == torch.uint8 else 1.0
    if mean is None and std is None and unit == 1.0:
        return None, None
    m = _stat_values("mean", mean, channels, 0.0, images)
    s = _stat_values("std", std, channels, 1.0, images)
    scale = unit / s
    shift = -m / s
    return scale.contiguous(), shift.contiguous()


# --- PyTorch path (CPU, or forced with VTOK_FAST_BACKEND=torch) --------------------------------

def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # CPUs multiply fp16/bf16 slowly and no more accurately: they compute in fp32.
    return weight.dtype if x.device.type == "cuda" else torch.float32


def _patch_matrix(images: torch.Tensor, ph: int, pw: int, prefix_rows: int, dtype) -> torch.Tensor:
    """``(B, P + N, K)`` patch matrix in one copy, ``P`` leading zero rows per image."""
    B, C, H, W = images.shape
    gh, gw = H // ph, W // pw
    a = torch.empty(B, prefix_rows + gh * gw, C * ph * pw, dtype=dtype, device=images.device)
    if prefix_rows:
        a[:, :prefix_rows].zero_()
    patches = images[:, :, : gh * ph, : gw * pw].unflatten(3, (gw, pw)).unflatten(2, (gh, ph))
    a[:, prefix_rows:].view(B, gh, gw, C, ph, pw).copy_(patches.permute(0, 2, 4, 1, 3, 5))
    return a


def _channel_per_k(v: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    return v.repeat_interleave(ph * pw)


def _forward_torch(images, weight, bias, pos, prefix, scale, shift, covers, out_dtype):
    """One im2col copy, one matmul into the result, one in-place add of the row table.

    The pixel affine is folded into the weights: ``W (x*s + t) = (W*s) x + W t``.
    """
    B = images.shape[0]
    D, C, ph, pw = weight.shape
    N = (images.shape[2] // ph) * (images.shape[3] // pw)
    P = 0 if prefix is None else prefix.shape[0]
    K = C * ph * pw
    cdt = _compute_dtype(images, weight)
    w = weight.reshape(D, K).to(torch.float32)
    table = torch.zeros(P + N, D, dtype=torch.float32, device=weight.device)
    if scale is not None:
        table[P:] += w @ _channel_per_k(shift, ph, pw)
        w = w * _channel_per_k(scale, ph, pw)
    if bias is not None:
        table[P:] += bias
    if prefix is not None:
        table[:P] += prefix
    if pos is not None:
        table[(0 if covers else P):] += pos
    a = _patch_matrix(images, ph, pw, P, cdt).view(B * (P + N), K)
    out = torch.empty(B, P + N, D, dtype=out_dtype, device=images.device)
    if out_dtype == cdt:
        torch.mm(a, w.to(cdt).t(), out=out.view(B * (P + N), D))
        out.add_(table.to(cdt))
    else:
        torch.add(torch.mm(a, w.to(cdt).t()).view(B, P + N, D), table, out=out)
    return out


def _weight_grad_torch(grad, images, weight, scale, shift, P):
    """``dW = dY_patches^T im2col(x*s + t)`` = ``(dY^T im2col(x)) * s + (sum dY) t^T``."""
    D, C, ph, pw = weight.shape
    cdt = _compute_dtype(images, weight)
    a = _patch_matrix(images, ph, pw, P, cdt).flatten(0, 1)
    g = grad.to(cdt).reshape(-1, D)
    dw = (g.t() @ a).to(torch.float32)
    if scale is not None:
        dw = dw * _channel_per_k(scale, ph, pw)
        gsum = grad[:, P:].sum((0, 1), dtype=torch.float32)
        dw += gsum[:, None] * _channel_per_k(shift, ph, pw)[None, :]
    return dw.view(D, C, ph, pw).to(weight.dtype)


def _new_image_grad(grad, shape, dtype, ph, pw) -> torch.Tensor:
    """Pixel gradient buffer: zeros only when remainder pixels exist (they get no gradient)."""
    H, W = shape[-2:]
    make = torch.zeros if (H % ph or W % pw) else torch.empty
    return make(shape, dtype=dtype, device=grad.device)


def _input_grad_torch(grad, shape, dtype, weight, scale, P):
    """``dx = (dY W) * s`` scattered back to the pixels; remainder pixels get zero."""
    B, C, H, W = shape
    D, _, ph, pw = weight.shape
    gh, gw = H // ph, W // pw
    cdt = _compute_dtype(grad, weight)
    w = weight.reshape(D, -1).to(torch.float32)
    if scale is not None:
        w = w * _channel_per_k(scale, ph, pw)
    da = grad[:, P:].to(cdt) @ w.to(cdt)  # (B, N, K)
    dx = _new_image_grad(grad, shape, dtype, ph, pw)
    dst = dx[:, :, : gh * ph, : gw * pw].unflatten(3, (gw, pw)).unflatten(2, (gh, ph))
    dst.permute(0, 2, 4, 1, 3, 5).copy_(da.view(B, gh, gw, C, ph, pw))
    return dx


# --- Triton path (CUDA, or CPU under TRITON_INTERPRET=1) ---------------------------------------

def _allow_tf32(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)


def _forward_triton(images, weight, bias, pos, prefix, scale, shift, covers, out_dtype):
    from vtok_fast.kernels.patch_embed import patch_embed_fwd

    B, C, H, W = images.shape
    D, _, ph, pw = weight.shape
    gw = W // pw
    N = (H // ph) * gw
    P = 0 if prefix is None else prefix.shape[0]
    L = P + N
    out = torch.empty(B, L, D, dtype=out_dtype, device=images.device)
    if B == 0:
        return out
    M, K = B * L, C * ph * pw
    w2 = weight.reshape(D, K)
    # absent operands: the weight stands in (the kernel's flags, or P = 0 for the prefix, skip them)
    patch_embed_fwd[tile_grid(M, D)](
        out_ptr=out, **strides(out, "o", "bld"),
        img_ptr=images, **strides(images, "i", "bchw"),
        w_ptr=w2, **strides(w2, "w", "dk"),
        bias_ptr=optional_operand(bias, weight), **strides(bias, "b", "d"),
        pos_ptr=optional_operand(pos, weight), **strides(pos, "p", "ld"),
        pre_ptr=optional_operand(prefix, weight), **strides(prefix, "x", "ld"),
        scale_ptr=optional_operand(scale, weight), shift_ptr=optional_operand(shift, weight),
        M=M, D=D, K=K, L=L, P=P, GW=gw, POS_START=0 if covers else P,
        PH=ph, PW=pw, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        HAS_NORM=scale is not None, ALLOW_TF32=_allow_tf32(weight),
    )
    return out


def _dot_dtype(weight: torch.Tensor):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[weight.dtype]


# dW splits its row reduction so that about two programs per SM run; the split count is sized for
# tiles of this edge (it does not depend on the autotuned config).
_DW_SPLIT_TILE = 128


def _weight_grad_triton(grad, images, weight, scale, shift, P):
    """Split-M reduction: ``SPLIT`` programs per (D, K) tile write fp32 partials, then one sum."""
    from vtok_fast.kernels.patch_embed import patch_embed_bwd_dw

    B, C, H, W = images.shape
    D, _, ph, pw = weight.shape
    gw = W // pw
    N = (H // ph) * gw
    M, K = B * N, C * ph * pw
    if M == 0:
        return torch.zeros_like(weight)
    tiles = cdiv(D, _DW_SPLIT_TILE) * cdiv(K, _DW_SPLIT_TILE)
    split = max(1, min(cdiv(2 * sm_count(images.device), tiles), cdiv(M, 256)))
    partial = torch.empty(split, D, K, dtype=torch.float32, device=images.device)
    # (D, K) tiles of dW: the forward's BLOCK_N (D) x BLOCK_K (K)
    patch_embed_bwd_dw[tile_grid(D, K, row_block="BLOCK_N", col_block="BLOCK_K", more=(split,))](
        dw_ptr=partial, **strides(partial, "w", "sdk"),
        g_ptr=grad, **strides(grad, "g", "bld"),
        img_ptr=images, **strides(images, "i", "bchw"),
        scale_ptr=optional_operand(scale, weight), shift_ptr=optional_operand(shift, weight),
        M=M, D=D, K=K, N=N, P=P, GW=gw, SPLIT=split,
        PH=ph, PW=pw, HAS_NORM=scale is not None, ALLOW_TF32=_allow_tf32(weight),
        DOT_DTYPE=_dot_dtype(weight),
    )
    dw = partial[0] if split == 1 else partial.sum(0)
    return dw.view(D, C, ph, pw).to(weight.dtype)


def _input_grad_triton(grad, shape, dtype, weight, scale, P):
    """``dx = (dY W) * s`` written once per pixel (stride = patch: no overlaps, no atomics)."""
    from vtok_fast.kernels.patch_embed import patch_embed_bwd_dx

    B, C, H, W = shape
    D, _, ph, pw = weight.shape
    gw = W // pw
    N = (H // ph) * gw
    M, K = B * N, C * ph * pw
    dx = _new_image_grad(grad, shape, dtype, ph, pw)
    if M == 0:
        return dx
    w2 = weight.reshape(D, K)
    patch_embed_bwd_dx[tile_grid(M, K, col_block="BLOCK_K")](
        dx_ptr=dx, **strides(dx, "x", "bchw"),
        g_ptr=grad, **strides(grad, "g", "bld"),
        w_ptr=w2, **strides(w2, "w", "dk"),
        scale_ptr=optional_operand(scale, weight),
        M=M, D=D, K=K, N=N, P=P, GW=gw,
        PH=ph, PW=pw, HAS_NORM=scale is not None, ALLOW_TF32=_allow_tf32(weight),
    )
    return dx


# --- the registered op -------------------------------------------------------------------------

def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type without autocast (meta)
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def _autocast_off(device: torch.device):
    """The op is not an autocast op: its PyTorch path's matmuls must not be recast by an
    enclosing autocast region (in eager mode they would be; in a compiled graph they are not)."""
    if _autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _patch_embed_impl(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos: Optional[torch.Tensor], prefix: Optional[torch.Tensor],
                    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    pos_covers_prefix: bool, out_dtype: torch.dtype) -> torch.Tensor:
    forward = _forward_triton if use_triton(images, weight) else _forward_torch
    with _autocast_off(images.device):
        return forward(images, weight, bias, pos, prefix, scale, shift, pos_covers_prefix, out_dtype)


def _patch_embed_fake(images, weight, bias, pos, prefix, scale, shift, pos_covers_prefix, out_dtype):
    D, _, ph, pw = weight.shape
    n = (images.shape[2] // ph) * (images.shape[3] // pw)
    p = 0 if prefix is None else prefix.shape[0]
    return images.new_empty((images.shape[0], p + n, D), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos, prefix, scale, shift, covers, _ = inputs
    ctx.covers = covers
    ctx.prefix_rows = 0 if prefix is None else prefix.shape[0]
    ctx.image_shape, ctx.image_dtype = tuple(images.shape), images.dtype
    # dW reads the pixels, dx the weight (a parameter: saving it costs no memory).
    ctx.save_for_backward(images if weight.requires_grad else None, weight, scale, shift)


def _backward(ctx, grad):
    with _autocast_off(grad.device):
        return _backward_impl(ctx, grad)


def _backward_impl(ctx, grad):
    images, weight, scale, shift = ctx.saved_tensors
    need = ctx.needs_input_grad
    P, dt = ctx.prefix_rows, weight.dtype
    triton = use_triton(grad, weight)
    d_images = d_weight = d_bias = d_pos = d_prefix = None
    if need[2] or need[3] or need[4]:
        rows = grad.sum(0, dtype=torch.float32)  # (P + N, D)
        if need[2]:
            d_bias = rows[P:].sum(0).to(dt)
        if need[3]:
            d_pos = (rows if ctx.covers else rows[P:]).to(dt)
        if need[4]:
            d_prefix = rows[:P].to(dt)
    if need[1]:
        fn = _weight_grad_triton if triton else _weight_grad_torch
        d_weight = fn(grad, images, weight, scale, shift, P)
    if need[0]:
        fn = _input_grad_triton if triton else _input_grad_torch
        d_images = fn(grad, ctx.image_shape, ctx.image_dtype, weight, scale, P)
    return d_images, d_weight, d_bias, d_pos, d_prefix, None, None, None, None


_patch_embed_op = define_op("patch_embed", _patch_embed_impl, fake=_patch_embed_fake,
                            setup_context=_setup_context, backward=_backward)


# --- public API --------------------------------------------------------------------------------

def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None, prefix: Optional[torch.Tensor] = None, *,
                pos_covers_prefix: bool = True, mean: ChannelStats = None, std: ChannelStats = None,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Patch tokens with prefix tokens and position table, ``(B, P + N, D)``, in one fused op.

    Equals ``cat(prefix, conv2d(normalize(images), weight, bias, stride=(ph, pw))
    .flatten(2).transpose(1, 2)) + pos_embed`` (see the module docstring for the exact rules).

    Args:
        images: ``(B, C, H, W)`` float32/float16/bfloat16, or uint8 (scaled by 1/255); any
            strides. Float pixels are cast to the weight dtype after normalization.
        weight: ``(D, C, ph, pw)`` Conv2d weight; the patch size is read from it.
        bias: ``(D,)`` or None.
        pos_embed: ``(L, D)`` or ``(1, L, D)``; ``L = P + N`` when ``pos_covers_prefix`` else ``N``.
        prefix: ``(P, D)``, ``(1, P, D)`` or ``(D,)`` (one token): CLS / register / dist tokens,
            placed before the patches.
        pos_covers_prefix: True: the table also has rows for (and is added to) the prefix
            tokens (timm ``no_embed_class=False``); False: it covers the patches only.
        mean, std: per-channel normalization ``(x - mean) / std`` applied on the load (after
            the uint8 scaling); numbers, sequences, tensors or arrays of ``C`` values (or one
            value), finite, ``std`` > 0 (ValueError otherwise; CUDA tensors are not read back
            to check). They are constants: no gradient flows to them.
        out_dtype: result dtype (float16/bfloat16/float32/float64); default ``weight.dtype``.

    ``bias``, ``pos_embed`` and ``prefix`` must have the weight's dtype (TypeError otherwise);
    all tensors one device. Gradients flow to ``weight``, ``bias``, ``pos_embed``, ``prefix``
    and, when they require it, float ``images``.
    """
    check_tensor("images", images, ndim=4, dtypes=IMAGE_DTYPES, shape_doc="(B, C, H, W)")
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(D, C, ph, pw)")
    if weight.numel() == 0:
        raise ValueError(f"weight must be (D, C, ph, pw) with every size >= 1, got shape "
                         f"{tuple(weight.shape)}")
    check_same_device(images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix=prefix)
    if not isinstance(pos_covers_prefix, bool):
        raise TypeError(f"pos_covers_prefix must be a bool, got {type(pos_covers_prefix).__name__}")
    B, C, H, W = images.shape
    D, c_w, ph, pw = weight.shape
    if C != c_w:
        raise ValueError(f"images must have C={c_w} channels (weight.shape[1]), got shape "
                         f"{tuple(images.shape)}")
    if H < ph or W < pw:
        # F.conv2d refuses an input smaller than its kernel too (no empty grids)
        raise ValueError(f"images must be at least one patch ({ph}x{pw}) in size, got "
                         f"{H}x{W} (shape {tuple(images.shape)})")
    if bias is not None:
        check_bias("bias", bias, weight)
    pre = None
    if prefix is not None:
        pre = token_table("prefix", prefix, weight, shape_doc="(P, D), (1, P, D) or (D,)", one_row=True)
        if pre.shape[0] == 0:
            pre = None
    P = 0 if pre is None else pre.shape[0]
    N = (H // ph) * (W // pw)
    pos = None
    if pos_embed is not None:
        pos = token_table("pos_embed", pos_embed, weight, rows=P + N if pos_covers_prefix else N)
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of ({', '.join(str(d) for d in OUT_DTYPES)}), "
                        f"got {out_dtype!r}")
    scale, shift = _channel_affine(images, mean, std)
    return _patch_embed_op(images, weight, bias, pos, pre, scale, shift, pos_covers_prefix, out_dtype)


def patch_embed_like_conv(images: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None,
                          pos_embed: Optional[torch.Tensor] = None,
                          prefix: Optional[torch.Tensor] = None, *, pos_covers_prefix: bool = True,
                          mean: ChannelStats = None, std: ChannelStats = None) -> torch.Tensor:
    """:func:`patch_embed` with the dtypes of the unfused ``conv2d`` -> ``cat`` / ``+ pos`` path
    it replaces (what the module and the model patchers call).

    - Without autocast the conv runs in the weight's dtype. Under autocast (CPU or CUDA, for the
      images' device) the conv is on the lower-precision list: pixels, weight and bias are cast
      to the autocast dtype (float64 weights are never cast), and so is its result.
    - ``cat`` with the prefix and ``+ pos_embed`` then promote that dtype with the prefix's and
      the table's: fp32 parameters under bf16 autocast give fp32 tokens, no prefix or table
      gives the conv's dtype.

    The fused op is not an autocast op and takes its tables in the weight's dtype, so the casts
    are made here and the promoted dtype is its ``out_dtype``. Under autocast the prefix and table
    are therefore rounded to the autocast dtype while the conv result is not: the two paths
    differ by about one rounding of that dtype. float64 weights (not a kernel dtype) run the
    unfused reference, which is the original math.
    """
    compute = weight.dtype
    amp = _autocast_dtype(images.device)
    if amp is not None and weight.dtype != torch.float64:
        compute = amp
    out_dtype = compute
    for extra in (prefix, pos_embed):
        if isinstance(extra, torch.Tensor):
            out_dtype = torch.promote_types(out_dtype, extra.dtype)
    cast = [None if t is None else t.to(compute) if isinstance(t, torch.Tensor) else t
            for t in (weight, bias, pos_embed, prefix)]
    fn = patch_embed_reference if compute == torch.float64 else patch_embed
    return fn(images, *cast, pos_covers_prefix=pos_covers_prefix, mean=mean, std=std,
              out_dtype=out_dtype)


_FORMATS = ("NLC", "NCHW", "NHWC", "NCL")


def _as_hw(v) -> tuple[int, int]:
    """``(h, w)`` ints from a pair, or from one int for a square (timm's ``to_2tuple``)."""
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed`` (same constructor, attributes and ``state_dict`` keys
    ``proj.weight`` / ``proj.bias``) running the fused op.

    ``forward(x)`` returns what timm's does, in the same dtype (under autocast: the autocast
    dtype, like timm's conv; float64 modules run the unfused math). Extra optional arguments
    fuse the ViT's ``_pos_embed`` too: ``forward(x, pos_embed, prefix, pos_covers_prefix=...,
    mean=, std=)`` returns ``(B, P + N, D)`` tokens (NLC output only), in the dtype timm's
    ``_pos_embed(patch_embed(x))`` returns (``cat`` / ``+`` promote with the prefix and table).

    Only ``norm_layer=None`` (Identity) is fully fused. With a norm layer the fused op computes
    the projection (+ bias), the norm is applied to it, and prefix / position table are then
    added in plain PyTorch (the norm must run before the position add).
    ``dynamic_img_pad=True`` is not supported (ValueError).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer=None, flatten: bool = True, output_fmt: Optional[str] = None,
                 bias: bool = True, strict_img_size: bool = True, dynamic_img_pad: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if dynamic_img_pad:
            raise ValueError("dynamic_img_pad=True is not supported by vtok_fast.PatchEmbed "
                             "(pad the images to a multiple of the patch size yourself)")
        dd = {"device": device, "dtype": dtype}
        self.patch_size = _as_hw(patch_size)
        self.img_size, self.grid_size, self.num_patches = None, None, None
        if img_size is not None:
            self.img_size = _as_hw(img_size)
            self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        if output_fmt is not None:
            fmt = str(getattr(output_fmt, "value", output_fmt))
            if fmt not in _FORMATS:
                raise ValueError(f"output_fmt must be one of {_FORMATS}, got {output_fmt!r}")
            self.flatten, self.output_fmt = False, fmt
        else:
            self.flatten, self.output_fmt = flatten, ("NLC" if flatten else "NCHW")
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = False
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size,
                              stride=self.patch_size, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def _check_size(self, x: torch.Tensor) -> None:
        if self.img_size is None or x.dim() != 4:
            return
        H, W = x.shape[-2:]
        if self.strict_img_size:
            if (H, W) != self.img_size:
                raise ValueError(f"images must be {self.img_size[0]}x{self.img_size[1]} "
                                 f"(img_size, strict_img_size=True), got {H}x{W}")
        elif H % self.patch_size[0] or W % self.patch_size[1]:
            raise ValueError(f"images must have sides divisible by the patch size {self.patch_size}"
                             f" (strict_img_size=False), got {H}x{W}")

    def forward(self, x: torch.Tensor, pos_embed: Optional[torch.Tensor] = None,
                prefix: Optional[torch.Tensor] = None, *, pos_covers_prefix: bool = True,
                mean: ChannelStats = None, std: ChannelStats = None) -> torch.Tensor:
        self._check_size(x)
        tokens_extra = pos_embed is not None or prefix is not None
        if tokens_extra and self.output_fmt != "NLC":
            raise ValueError(f"pos_embed / prefix need output_fmt='NLC', got {self.output_fmt!r}")
        w, b = self.proj.weight, self.proj.bias
        if isinstance(self.norm, nn.Identity):
            y = patch_embed_like_conv(x, w, b, pos_embed, prefix,
                                      pos_covers_prefix=pos_covers_prefix, mean=mean, std=std)
            return self._format(y, x)
        y = self.norm(self._format(patch_embed_like_conv(x, w, b, mean=mean, std=std), x))
        return _cat_prefix_add_pos(y, pos_embed, prefix, pos_covers_prefix)

    def _format(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.output_fmt == "NLC":
            return y
        if self.output_fmt == "NCL":
            return y.transpose(1, 2)
        gh, gw = self.dynamic_feat_size(tuple(x.shape[-2:]))
        y = y.view(y.shape[0], gh, gw, y.shape[-1])
        return y if self.output_fmt == "NHWC" else y.permute(0, 3, 1, 2)
