"""``merge_project``: the s x s window merger family (Qwen2-VL, InternVL, Swin, LLaVA) as one op.

``merge_project(tokens, grid, *, weight, bias=None, window=2, order="swin", norm="post_concat",
norm_type="layernorm", norm_weight=None, norm_bias=None, eps=1e-5, activation=None, prefix=0)``
equals the unfused eager code of those modules (:func:`merge_project_reference`):

1. drop the first ``prefix`` tokens of every sequence (CLS, registers: they are kept apart, the
   caller still has them in ``tokens[:, :prefix]``);
2. gather each ``window x window`` window of the ``grid = (h, w)`` token grid (row-major tokens)
   into one row of ``window**2 * C`` features, window position first, channel second, with the
   positions in ``order``:

   - ``"swin"``: (row, col) = (0,0), (1,0), (0,1), (1,1) — timm's ``PatchMerging``;
   - ``"row_major"``: (0,0), (0,1), (1,0), (1,1) — InternVL's ``pixel_shuffle`` (the exact
     channel order of transformers' ``InternVLModel.pixel_shuffle`` at ``downsample_ratio = 1/s``);
   - ``"contiguous"``: every ``window**2`` consecutive tokens form a window (Qwen2-VL's processor
     already grouped them; ``grid`` may be None);

   merged rows are row-major over the ``(h / s, w / s)`` merged grid;
3. normalize: ``"pre_concat"`` per token over ``C`` before the concatenation (Qwen2-VL ``ln_q``),
   ``"post_concat"`` over the concatenated ``window**2 * C`` (Swin, InternVL), None: no norm.
   ``norm_type="rmsnorm"`` is the RMS norm (Qwen2.5-VL ``ln_q``; weight only, no bias);
4. ``activation(normalized @ weight.T + bias)`` with activation None, ``"gelu"`` (erf),
   ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.

Result ``(B, h*w / s**2, D)`` (``(R, D)`` for 2-D tokens ``(L, C)``) in the weight's dtype.

dtypes: the norm runs in fp32 whatever the tokens' dtype; its result is cast to the weight's
dtype for the product (fp32 accumulation). Without a norm the tokens must have the weight's dtype.
Under ``torch.autocast`` the Linear runs in the autocast dtype (weight, bias and, without a norm,
the tokens are cast) and the norm in fp32, exactly like ``nn.LayerNorm`` + ``nn.Linear`` there.
fp32 weights on CUDA follow ``torch.backends.cuda.matmul.allow_tf32``, like ``nn.Linear``.

Backends (``vtok_fast/_backend.py``): CUDA tensors run the Triton kernels of
``kernels/merge_project.py`` — a statistics pre-pass, then one GEMM that gathers, normalizes on
the operand load and applies bias + activation in the epilogue; the gathered or normalized
``(M, window**2 * C)`` matrix is never written. CPU tensors run a PyTorch path: one gather copy
(none for ``"contiguous"``), one fused ``native_layer_norm``, one ``addmm`` and an in-place
activation.

Backward (both backends, PyTorch ops): gradients for the tokens, the norm weight and bias and the
Linear weight and bias. The gathered, normalized operand is recomputed from the saved tokens (one
gather + one fused layer norm) instead of being saved; only the pre-activation is saved when an
activation needs it. A fused Triton backward is not written: its cost is two GEMMs
(``dW = dZ^T A``, ``dA = dZ W``, cuBLAS) plus a row-wise layer-norm backward that needs whole
``window**2 * C`` rows, which a K-tiled GEMM cannot reduce.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vtok_fast._backend import use_triton
from vtok_fast._checks import (FLOAT_DTYPES, check_choice, check_int, check_positive_real, check_same_device,
                               check_tensor)
from vtok_fast._launch import cdiv, tile_grid
from vtok_fast._op import define_op

ORDERS = ("swin", "row_major", "contiguous")
NORMS = (None, "pre_concat", "post_concat")
NORM_TYPES = ("layernorm", "rmsnorm")
ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu", "relu")


# --- reference: the eager code of the real modules --------------------------------------------------

def window_positions(window: int, order: str) -> list[tuple[int, int]]:
    """(row, col) offsets of the window positions, in concatenation order (not ``"contiguous"``)."""
    cells = range(window)
    if order == "swin":
        return [(dh, dw) for dw in cells for dh in cells]
    return [(dh, dw) for dh in cells for dw in cells]


def _rms_norm(x, weight, eps):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def merge_project_reference(tokens, grid=None, *, weight, bias=None, window=2, order="swin",
                            norm="post_concat", norm_type="layernorm", norm_weight=None,
                            norm_bias=None, eps=1e-5, activation=None, prefix=0):
    """Unfused PyTorch, written like the modules it replaces: strided slices + ``cat`` (Swin),
    ``F.layer_norm``, ``F.linear``, activation. Accepts float64 (tests build ground truth with
    it); the norm runs in the tokens' dtype promoted to at least fp32. Same arguments and result
    as :func:`merge_project` (no validation)."""
    flat = tokens.dim() == 2
    x = tokens[None] if flat else tokens
    x = x[:, prefix:]
    B, N, C = x.shape
    s = window
    if order == "contiguous":
        rows = x.reshape(B, N // (s * s), s * s, C)
    else:
        h, w = grid
        x = x.reshape(B, h, w, C)
        rows = torch.stack([x[:, dh::s, dw::s] for dh, dw in window_positions(s, order)], dim=3)
        rows = rows.reshape(B, (h // s) * (w // s), s * s, C)
    work = torch.promote_types(tokens.dtype, torch.float32)
    if norm is not None:
        rows = rows.to(work)
        if norm == "post_concat":
            rows = rows.flatten(2)
        nw = None if norm_weight is None else norm_weight.to(work)
        nb = None if norm_bias is None else norm_bias.to(work)
        if norm_type == "rmsnorm":
            rows = _rms_norm(rows, nw, eps)
        else:
            rows = F.layer_norm(rows, rows.shape[-1:], nw, nb, eps)
    y = F.linear(rows.flatten(2).to(weight.dtype), weight, bias)
    y = _activation_fn(activation)(y)
    return y[0] if flat else y


def _activation_fn(activation):
    return {
        None: lambda z: z,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
    }[activation]


# --- the window layout shared by the PyTorch forward and the backward ------------------------------

def _window_view(x: torch.Tensor, h: int, w: int, s: int, order: str) -> torch.Tensor:
    """``x`` ``(B, h*w, C)`` (any strides) as a view ``(B, ..., s, s, C)`` whose last three dims
    enumerate a merged row in concatenation order (``(B, R, s*s, C)`` for ``"contiguous"``)."""
    B, N, C = x.shape
    if order == "contiguous":
        return x.view(B, N // (s * s), s * s, C)
    v = x.view(B, h // s, s, w // s, s, C)                    # b, i, dh, j, dw, c
    return v.permute(0, 1, 3, 4, 2, 5) if order == "swin" else v.permute(0, 1, 3, 2, 4, 5)


def _gather(tokens, h, w, s, order, prefix) -> torch.Tensor:
    """``(M, s*s, C)`` merged rows (a copy unless the windows are already contiguous)."""
    C = tokens.shape[-1]
    return _window_view(tokens[:, prefix:], h, w, s, order).reshape(-1, s * s, C)


def _scatter(rows, shape, dtype, h, w, s, order, prefix) -> torch.Tensor:
    """Inverse of :func:`_gather`: ``(M, s*s, C)`` rows back to ``(B, L, C)`` tokens; the prefix
    tokens get zero."""
    out = (torch.zeros if prefix else torch.empty)(shape, dtype=dtype, device=rows.device)
    view = _window_view(out[:, prefix:], h, w, s, order)
    view.copy_(rows.view(view.shape))
    return out


def _normalize(rows, norm, rms, norm_weight, norm_bias, eps):
    """fp32 normalized ``(M, s*s, C)`` rows, and what the norm's backward needs."""
    M, G, C = rows.shape
    x = rows if norm == "pre_concat" else rows.reshape(M, 1, G * C)
    x = x.float()
    nw = None if norm_weight is None else norm_weight.float()
    if rms:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        y = x * rstd if nw is None else x * rstd * nw
        return y.view(M, G, C), (x, None, rstd)
    nb = None if norm_bias is None else norm_bias.float()
    y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], nw, nb, eps)
    return y.view(M, G, C), (x, mean, rstd)


# --- PyTorch path (CPU, or forced with VTOK_FAST_BACKEND=torch) ---------------------------------

def _forward_torch(tokens, norm_weight, norm_bias, weight, bias, h, w, s, order, norm, rms, eps,
                   activation, prefix, save_preact):
    rows = _gather(tokens, h, w, s, order, prefix)
    if norm != "none":
        rows = _normalize(rows, norm, rms, norm_weight, norm_bias, eps)[0]
    a = rows.reshape(rows.shape[0], weight.shape[1]).to(weight.dtype)
    z = a @ weight.t() if bias is None else torch.addmm(bias, a, weight.t())
    if activation == "none":
        return z, z.new_empty(0)
    if save_preact:
        return _activation_fn(activation)(z), z
    if activation == "relu":
        return z.relu_(), z.new_empty(0)
    if activation == "silu":
        return F.silu(z, inplace=True), z.new_empty(0)
    return torch.ops.aten.gelu_(z, approximate="tanh" if activation == "gelu_tanh" else "none"), z.new_empty(0)


# --- Triton path (CUDA, or CPU under TRITON_INTERPRET=1) ---------------------------------------

def _forward_triton(tokens, norm_weight, norm_bias, weight, bias, h, w, s, order, norm, rms, eps,
                    activation, prefix, save_preact):
    from vtok_fast.kernels.merge_project import (STATS_BLOCK_C, STATS_BLOCK_M, STATS_NUM_WARPS,
                                                 _merge_project_fwd, _merge_project_stats)

    B, L, C = tokens.shape
    D = weight.shape[0]
    R = (L - prefix) // (s * s)
    M = B * R
    out = torch.empty(M, D, dtype=weight.dtype, device=tokens.device)
    pre = torch.empty(M, D, dtype=weight.dtype, device=tokens.device) if save_preact else out
    if M == 0:
        return out, (pre if save_preact else out.new_empty(0))
    ws = max(w // s, 1)
    kind = {"none": "none", "pre_concat": "pre", "post_concat": "post"}[norm]
    mean = rstd = weight  # stand-ins, never read without a norm
    if kind != "none":
        groups = s * s if kind == "pre" else 1
        mean = torch.empty(M, groups, dtype=torch.float32, device=tokens.device)
        rstd = torch.empty_like(mean)
        _merge_project_stats[(cdiv(M, STATS_BLOCK_M),)](
            mean, rstd, tokens, *tokens.stride(), M, R, C, prefix, w, ws, eps,
            S=s, ORDER=order, PER_TOKEN=kind == "pre", RMS=rms,
            BLOCK_M=STATS_BLOCK_M, BLOCK_C=STATS_BLOCK_C, num_warps=STATS_NUM_WARPS)
    g = weight if norm_weight is None else norm_weight
    beta = weight if norm_bias is None else norm_bias
    _merge_project_fwd[tile_grid(M, D)](
        out, *out.stride(), pre, *pre.stride(), tokens, *tokens.stride(), mean, rstd, g, beta,
        weight, *weight.stride(), weight if bias is None else bias,
        M, R, D, C, prefix, w, ws,
        S=s, ORDER=order, NORM=kind, HAS_G=norm_weight is not None, HAS_BETA=norm_bias is not None,
        HAS_BIAS=bias is not None, ACTIVATION=activation, SAVE_PRE=save_preact,
        ALLOW_TF32=weight.dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32),
    )
    return out, (pre if save_preact else out.new_empty(0))


# --- the registered op ---------------------------------------------------------------------------

def _impl(tokens: torch.Tensor, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
          weight: torch.Tensor, bias: Optional[torch.Tensor], height: int, width: int, window: int,
          order: str, norm: str, rms: bool, eps: float, activation: str, prefix: int,
          save_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``(M, D)``, pre-activation ``(M, D)`` if ``save_preact`` else empty)."""
    forward = _forward_triton if use_triton(tokens, weight, norm_weight) else _forward_torch
    with torch.autocast(tokens.device.type, enabled=False):  # dtypes were settled by the caller
        return forward(tokens, norm_weight, norm_bias, weight, bias, height, width, window, order,
                       norm, rms, eps, activation, prefix, save_preact)


def _fake(tokens, norm_weight, norm_bias, weight, bias, height, width, window, order, norm, rms,
          eps, activation, prefix, save_preact):
    rows = tokens.shape[0] * ((tokens.shape[1] - prefix) // (window * window))
    out = tokens.new_empty((rows, weight.shape[0]), dtype=weight.dtype)
    pre = tokens.new_empty((rows, weight.shape[0]) if save_preact else (0,), dtype=weight.dtype)
    return out, pre


def _setup_context(ctx, inputs, output):
    tokens, norm_weight, norm_bias, weight, bias, h, w, s, order, norm, rms, eps, act, prefix, _ = inputs
    ctx.layout = (h, w, s, order, prefix)
    ctx.norm, ctx.rms, ctx.eps, ctx.activation = norm, rms, eps, act
    ctx.has_bias = bias is not None
    pre = output[1]
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(tokens, norm_weight, norm_bias, weight, pre)


def _activation_backward(grad, pre, activation):
    if activation == "none":
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if activation == "gelu_tanh" else "none")


def _backward(ctx, grad, _grad_pre):
    tokens, norm_weight, norm_bias, weight, pre = ctx.saved_tensors
    h, w, s, order, prefix = ctx.layout
    need = ctx.needs_input_grad
    if ctx.activation != "none" and pre.dim() != 2:
        raise RuntimeError("merge_project: the forward ran without saving the pre-activation (it saves "
                           "it only when grad mode is on and an input requires grad)")
    dz = _activation_backward(grad, pre, ctx.activation).to(weight.dtype)
    rows = _gather(tokens, h, w, s, order, prefix)
    M, G, C = rows.shape
    normed = None
    if ctx.norm != "none":
        normed, saved = _normalize(rows, ctx.norm, ctx.rms, norm_weight, norm_bias, ctx.eps)
    d_tokens = d_norm_weight = d_norm_bias = d_weight = d_bias = None
    if need[3]:
        a = (rows if normed is None else normed).reshape(M, G * C).to(weight.dtype)
        d_weight = dz.t() @ a
    if need[4] and ctx.has_bias:
        d_bias = dz.sum(0, dtype=torch.float32).to(weight.dtype)
    if need[0] or need[1] or need[2]:
        da = dz @ weight  # (M, G * C)
        if ctx.norm == "none":
            d_rows = da.view(M, G, C)
        else:
            x, mean, rstd = saved
            da = da.float().view(x.shape)
            nw = None if norm_weight is None else norm_weight.float()
            if ctx.rms:
                d_rows, d_norm_weight = _rms_norm_backward(da, x, rstd, nw)
            else:
                nb = None if norm_bias is None else norm_bias.float()
                d_rows, d_norm_weight, d_norm_bias = torch.ops.aten.native_layer_norm_backward(
                    da, x, x.shape[-1:], mean, rstd, nw, nb, [need[0], nw is not None, nb is not None])
            d_norm_weight = None if d_norm_weight is None or not need[1] else d_norm_weight.to(norm_weight.dtype)
            d_norm_bias = None if d_norm_bias is None or not need[2] else d_norm_bias.to(norm_bias.dtype)
        if need[0]:
            d_tokens = _scatter(d_rows.reshape(M, G, C), tokens.shape, tokens.dtype, h, w, s, order, prefix)
    return (d_tokens, d_norm_weight, d_norm_bias, d_weight, d_bias) + (None,) * 10


def _rms_norm_backward(grad, x, rstd, weight):
    """(dx, dweight) of ``x * rstd * weight`` with ``rstd = rsqrt(mean(x^2) + eps)``."""
    n = x * rstd
    dweight = None if weight is None else (grad * n).flatten(0, -2).sum(0)
    dn = grad if weight is None else grad * weight
    dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx, dweight


_merge_project_op = define_op("merge_project", _impl, fake=_fake, backward=_backward,
                              setup_context=_setup_context)


# --- public API ------------------------------------------------------------------------------------

def _check_grid(grid, window, order, tokens_per_image):
    """(h, w) of the token grid. Without a grid ("contiguous" only) any (h, w) with h * w = N and
    both divisible by the window stands in: the contiguous order never reads them."""
    s = window
    if grid is None:
        if order != "contiguous":
            raise ValueError(f"grid (h, w) is required for order={order!r} (None only for 'contiguous')")
        if tokens_per_image % (s * s):
            raise ValueError(f"tokens must hold a whole number of windows of window**2 = {s * s} tokens "
                             f"after the prefix (order='contiguous'), got {tokens_per_image}")
        return tokens_per_image // s, s
    if (not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in grid)):
        raise TypeError(f"grid must be a pair of non-negative ints (h, w), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h % s or w % s:
        raise ValueError(f"grid sides must be divisible by window={s}, got grid ({h}, {w}) "
                         "(pad the grid first, as timm's PatchMerging does)")
    if h * w != tokens_per_image:
        raise ValueError(f"tokens must have prefix + h*w tokens per sequence: grid ({h}, {w}) needs "
                         f"{h * w} after the prefix, got {tokens_per_image}")
    return h, w


def merge_project(tokens: torch.Tensor, grid=None, *, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, window: int = 2, order: str = "swin",
                  norm: Optional[str] = "post_concat", norm_type: str = "layernorm",
                  norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                  eps: float = 1e-5, activation: Optional[str] = None, prefix: int = 0) -> torch.Tensor:
    """Merge each ``window x window`` window of tokens, normalize, project: one fused op.

    Args:
        tokens: ``(B, L, C)`` or ``(L, C)``, ``L = prefix + h*w``, row-major over the grid (any
            strides).
        grid: ``(h, w)``, both divisible by ``window`` (0 allowed: an empty result);
            optional for ``order="contiguous"``.
        weight: ``(D, window**2 * C)`` weight of the first Linear; ``bias``: ``(D,)`` or None, in
            the weight's dtype.
        window: merge window side ``s`` (1: no merge, a plain norm + Linear, e.g. LLaVA).
        order: ``"swin"``, ``"row_major"`` or ``"contiguous"`` (see the module docstring).
        norm: ``"pre_concat"`` (over ``C``), ``"post_concat"`` (over ``window**2 * C``) or None;
            ``norm_type``: ``"layernorm"`` or ``"rmsnorm"``; ``norm_weight`` / ``norm_bias``: the
            affine, ``(C,)`` for pre-concat, ``(window**2 * C,)`` for post-concat, or None.
        eps: the norm's epsilon, a real number in ``(0, inf)``.
        activation: None, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.
        prefix: leading tokens of every sequence that are not part of the grid (left out).

    Returns ``(B, R, D)`` (``(R, D)`` for 2-D tokens), ``R = h*w / window**2``, in the weight's
    dtype (the autocast dtype under ``torch.autocast``). Differentiable in every tensor argument.
    """
    check_tensor("tokens", tokens, ndim=(2, 3), dtypes=FLOAT_DTYPES, shape_doc="(B, L, C) or (L, C)")
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape_doc="(D, window**2 * C)")
    check_same_device(tokens=tokens, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias)
    check_int("window", window, 1)
    check_choice("order", order, ORDERS)
    check_choice("norm", norm, NORMS)
    check_choice("norm_type", norm_type, NORM_TYPES)
    check_choice("activation", activation, ACTIVATIONS)
    flat = tokens.dim() == 2
    x = tokens[None] if flat else tokens
    L, C = x.shape[1], x.shape[2]
    if C == 0:
        raise ValueError(f"tokens must have C >= 1 channels, got shape {tuple(tokens.shape)}")
    check_int("prefix", prefix, 0)
    if prefix > L:
        raise ValueError(f"prefix must be <= the sequence length {L}, got {prefix}")
    h, w = _check_grid(grid, window, order, L - prefix)
    K = window * window * C
    if weight.shape[1] != K:
        raise ValueError(f"weight must have window**2 * C = {window}**2 * {C} = {K} columns, got shape "
                         f"{tuple(weight.shape)}")
    D = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, shape_doc="(D,)")
        if bias.shape[0] != D:
            raise ValueError(f"bias must be (D,) with D={D} (weight.shape[0]), got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")
    eps = check_positive_real("eps", eps)
    if norm is None:
        if norm_weight is not None or norm_bias is not None:
            raise ValueError("norm_weight / norm_bias need norm='pre_concat' or 'post_concat', got norm=None")
    else:
        width = C if norm == "pre_concat" else K
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            if t is None:
                continue
            check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, shape_doc=f"({width},)")
            if t.shape[0] != width:
                raise ValueError(f"{name} must be ({width},) for norm={norm!r} (C={C}, window={window}), "
                                 f"got shape {tuple(t.shape)}")
        if norm_type == "rmsnorm" and norm_bias is not None:
            raise ValueError("norm_bias must be None for norm_type='rmsnorm' (RMS norm has no bias)")
        if norm_weight is not None and norm_bias is not None and norm_weight.dtype != norm_bias.dtype:
            raise TypeError(f"norm_bias has dtype {norm_bias.dtype} but norm_weight has {norm_weight.dtype}")
    device_type = tokens.device.type
    if torch.is_autocast_enabled(device_type):  # what nn.Linear does there; the norm stays fp32
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if norm is None:
            x = x.to(dtype)
    if norm is None and x.dtype != weight.dtype:
        raise TypeError(f"tokens must have the weight's dtype {weight.dtype} when norm=None, got "
                        f"{x.dtype} (with a norm, tokens of any float dtype are normalized in fp32)")
    needs_grad = any(t is not None and t.requires_grad for t in (x, weight, bias, norm_weight, norm_bias))
    save_preact = activation is not None and torch.is_grad_enabled() and needs_grad
    out, _ = _merge_project_op(x, norm_weight, norm_bias, weight, bias, h, w, window, order,
                               norm or "none", norm_type == "rmsnorm", eps,
                               activation or "none", prefix, save_preact)
    out = out.view(x.shape[0], h * w // (window * window), D)
    return out[0] if flat else out
