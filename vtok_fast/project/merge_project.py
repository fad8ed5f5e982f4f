"""``merge_project``: the s x s window merger family (Qwen2-VL, InternVL, Swin, LLaVA) as one op.

``merge_project(tokens, grid, *, weight, bias=None, window=2, order="swin", merge="concat",
norm="post_concat", norm_type="layernorm", norm_weight=None, norm_bias=None, eps=1e-5,
activation=None, gate_weight=None, gate_bias=None, weight_layout="window_major", prefix=0)``
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

   merged rows are row-major over the ``(h / s, w / s)`` merged grid. ``merge="mean"`` averages
   the window's tokens instead (``AvgPool2d(s)``: Gemma 3, Phi-4): a merged row has ``C`` features;
3. normalize: ``"pre_concat"`` per token over ``C`` before the concatenation (Qwen2-VL ``ln_q``),
   ``"post_concat"`` over the concatenated ``window**2 * C`` (Swin, InternVL), None: no norm.
   ``norm_type="rmsnorm"`` is the RMS norm (Qwen2.5-VL ``ln_q``; weight only, no bias),
   ``"gemma_rmsnorm"`` the RMS norm scaled by ``1 + weight`` (Gemma 3). With ``merge="mean"``,
   ``"post_concat"`` normalizes the pooled row (over ``C``);
4. ``activation(normalized @ weight.T + bias)`` with activation None, ``"gelu"`` (erf),
   ``"gelu_tanh"``, ``"silu"`` or ``"relu"``. With ``gate_weight`` (a GLU, e.g. SwiGLU with
   ``"silu"``): ``activation(normalized @ gate_weight.T + gate_bias) * (normalized @ weight.T + bias)``.
   ``stacked_glu`` names the order of the two projections when ``weight`` holds both.
   ``weight_layout="channel_major"`` reads the weight's columns as ``c * window**2 + q`` (a
   Conv2d's ``(D, C, s, s)`` weight flattened, ``F.unfold``'s order) instead of ``q * C + c``.

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
(none for ``"contiguous"``; a strided mean for ``merge="mean"``), one fused ``native_layer_norm``
(or the RMS norm), one GEMM (two with a gate) and an in-place activation. The GEMM is
``vtok_fast._cpu_gemm.linear``: torch's ``addmm`` or oneDNN's, whichever it measured faster for
the shape class (on AMD CPUs, where MKL takes a slower path, oneDNN by 1.3-1.5x); the backward's
GEMMs go through it too.

A second GEMM (the projector's ``linear_2``) is not fused. Fusing it saves the write and the read
of the ``(M, H)`` intermediate, ``4 * M * H`` bytes in bf16 against the second GEMM's
``2 * M * H * D`` FLOP: at ``D = 3584`` on an H200 (4.8 TB/s, ~990 dense bf16 TFLOP/s) about 10 %
of that GEMM's time at roofline, while a fused tile must hold a whole ``H``-wide row of the first
product (``H = 5120``) or recompute the first GEMM per output tile. The issue asks for a GPU
measurement before fusing; none was available when this was written, so it stays two GEMMs
(``bench/merge.py`` prints the bytes each case moves).

Backward (both backends, PyTorch ops): gradients for the tokens, the norm weight and bias and the
Linear (and gate) weight and bias. The gathered, normalized operand is recomputed from the saved tokens (one
gather + one fused layer norm) instead of being saved; only the pre-activation is saved when an
activation needs it. A fused Triton backward is not written: its cost is two GEMMs
(``dW = dZ^T A``, ``dA = dZ W``, cuBLAS) plus a row-wise layer-norm backward that needs whole
``window**2 * C`` rows, which a K-tiled GEMM cannot reduce.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from vtok_fast import _cpu_gemm as cpu_gemm
from vtok_fast._backend import use_triton
from vtok_fast._checks import (FLOAT_DTYPES, check_bias, check_choice, check_int, check_positive_real,
                               check_same_device, check_tensor)
from vtok_fast._launch import optional_operand, strides, tile_grid
from vtok_fast._op import define_op

ORDERS = ("swin", "row_major", "contiguous")
MERGES = ("concat", "mean")
NORMS = (None, "pre_concat", "post_concat")
NORM_TYPES = ("layernorm", "rmsnorm", "gemma_rmsnorm")
ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu", "relu")
WEIGHT_LAYOUTS = ("window_major", "channel_major")
STACKED_GLU = (None, "up_gate", "gate_up")


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


def _reference_windows(tokens, grid, window, order, merge, prefix):
    """``(B, R, s*s, C)`` windows (``merge="mean"``: ``(B, R, 1, C)`` their means)."""
    x = tokens[:, prefix:]
    B, N, C = x.shape
    s = window
    if order == "contiguous":
        rows = x.reshape(B, N // (s * s), s * s, C)
    else:
        h, w = grid
        x = x.reshape(B, h, w, C)
        rows = torch.stack([x[:, dh::s, dw::s] for dh, dw in window_positions(s, order)], dim=3)
        rows = rows.reshape(B, (h // s) * (w // s), s * s, C)
    return rows.mean(2, keepdim=True) if merge == "mean" else rows


def merge_project_reference(tokens, grid=None, *, weight, bias=None, window=2, order="swin", merge="concat",
                            norm="post_concat", norm_type="layernorm", norm_weight=None, norm_bias=None,
                            eps=1e-5, activation=None, gate_weight=None, gate_bias=None, stacked_glu=None,
                            weight_layout="window_major", prefix=0):
    """Unfused PyTorch, written like the modules it replaces: strided slices + ``cat`` (Swin),
    a mean (``AvgPool2d``), ``F.layer_norm`` / the RMS norm, ``F.linear``, activation. Accepts
    float64 (tests build ground truth with it); the norm runs in the tokens' dtype promoted to at
    least fp32. Same arguments and result as :func:`merge_project` (no validation)."""
    flat = tokens.dim() == 2
    x = tokens[None] if flat else tokens
    rows = _reference_windows(x, grid, window, order, merge, prefix)
    work = torch.promote_types(tokens.dtype, torch.float32)
    if norm is not None:
        rows = rows.to(work)
        if norm == "post_concat":
            rows = rows.flatten(2)
        nw = None if norm_weight is None else norm_weight.to(work)
        nb = None if norm_bias is None else norm_bias.to(work)
        if norm_type == "gemma_rmsnorm":
            rows = _rms_norm(rows, None if nw is None else 1 + nw, eps)
        elif norm_type == "rmsnorm":
            rows = _rms_norm(rows, nw, eps)
        else:
            rows = F.layer_norm(rows, rows.shape[-1:], nw, nb, eps)
    if weight_layout == "channel_major":
        rows = rows.reshape(*rows.shape[:2], -1, x.shape[-1]).transpose(-1, -2)
    a = rows.flatten(2).to(weight.dtype)
    z = F.linear(a, weight, bias)
    act = _activation_fn(activation)
    if stacked_glu is not None:  # Aya Vision's x, gate = z.chunk(2, dim=-1)
        first, second = z.chunk(2, dim=-1)
        y = act(second) * first if stacked_glu == "up_gate" else act(first) * second
    elif gate_weight is not None:
        y = act(F.linear(a, gate_weight, gate_bias)) * z
    else:
        y = act(z)
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


def _gather(tokens, h, w, s, order, prefix, pool=False) -> torch.Tensor:
    """``(M, s*s, C)`` merged rows (a copy unless the windows are already contiguous); ``pool``:
    ``(M, 1, C)`` window means, in the tokens' dtype promoted to at least fp32."""
    C = tokens.shape[-1]
    if pool:  # two one-axis sums: ~6x faster on CPU than one reduction over both strided axes
        x = tokens[:, prefix:]
        B, N, _ = x.shape
        work = torch.promote_types(tokens.dtype, torch.float32)
        if order == "contiguous":
            total = x.view(B, N // (s * s), s * s, C).sum(2, dtype=work)
        else:
            total = x.view(B, h, w // s, s, C).sum(3, dtype=work).view(B, h // s, s, w // s, C).sum(2)
        return total.div_(s * s).reshape(-1, 1, C)
    return _window_view(tokens[:, prefix:], h, w, s, order).reshape(-1, s * s, C)


def _scatter(rows, shape, dtype, h, w, s, order, prefix) -> torch.Tensor:
    """Inverse of :func:`_gather`: ``(M, s*s, C)`` rows (``(M, 1, C)`` pooled ones: spread over
    the window, divided by ``s*s``) back to ``(B, L, C)`` tokens; the prefix tokens get zero."""
    out = (torch.zeros if prefix else torch.empty)(shape, dtype=dtype, device=rows.device)
    view = _window_view(out[:, prefix:], h, w, s, order)
    M, G, C = rows.shape
    if G == 1 and s > 1:  # pooled: broadcast over the window's dims (no (M, s*s, C) copy)
        window_dims = 1 if order == "contiguous" else 2
        view.copy_((rows / (s * s)).view(*view.shape[:-1 - window_dims], *(1,) * window_dims, C))
    else:
        view.copy_(rows.reshape(view.shape))
    return out


def _operand(rows, channel_major, dtype) -> torch.Tensor:
    """``(M, K)`` GEMM operand from ``(M, G, C)`` rows, window- or channel-major, in ``dtype``."""
    M, G, C = rows.shape
    if channel_major and G > 1:
        rows = rows.transpose(1, 2)
    return rows.reshape(M, G * C).to(dtype)


def _operand_grad(da, G, C, channel_major) -> torch.Tensor:
    """Inverse layout of :func:`_operand`: ``(M, K)`` -> ``(M, G, C)``."""
    M = da.shape[0]
    return da.view(M, C, G).transpose(1, 2) if channel_major and G > 1 else da.view(M, G, C)


def _normalize(rows, norm, rms, offset, norm_weight, norm_bias, eps):
    """fp32 normalized ``(M, G, C)`` rows, and what the norm's backward needs."""
    M, G, C = rows.shape
    x = rows if norm == "pre_concat" else rows.reshape(M, 1, G * C)
    x = x.float()
    nw = None if norm_weight is None else norm_weight.float() + offset
    if rms:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        y = x * rstd if nw is None else x * rstd * nw
        return y.view(M, G, C), (x, None, rstd)
    nb = None if norm_bias is None else norm_bias.float()
    y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], nw, nb, eps)
    return y.view(M, G, C), (x, mean, rstd)


# --- PyTorch path (CPU, or forced with VTOK_FAST_BACKEND=torch) ---------------------------------

def _activate_(z, activation):
    """``activation(z)``, in place when the autograd-free caller allows it."""
    if activation == "none":
        return z
    if activation == "relu":
        return z.relu_()
    if activation == "silu":
        return F.silu(z, inplace=True)
    return torch.ops.aten.gelu_(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def _forward_torch(tokens, norm_weight, norm_bias, weight, bias, gate_weight, gate_bias, h, w, s, order,
                   pool, norm, rms, offset, eps, activation, channel_major, prefix, save_preact):
    rows = _gather(tokens, h, w, s, order, prefix, pool)
    if norm != "none":
        rows = _normalize(rows, norm, rms, offset, norm_weight, norm_bias, eps)[0]
    a = _operand(rows, channel_major, weight.dtype)
    z = cpu_gemm.linear(a, weight, bias)
    if gate_weight is None:
        if save_preact and activation != "none":
            return _activation_fn(activation)(z), z, z.new_empty(0)
        return _activate_(z, activation), z.new_empty(0), z.new_empty(0)
    zg = cpu_gemm.linear(a, gate_weight, gate_bias)
    if save_preact:
        return _activation_fn(activation if activation != "none" else None)(zg) * z, z, zg
    return _activate_(zg, activation).mul_(z), z.new_empty(0), z.new_empty(0)


# --- Triton path (CUDA, or CPU under TRITON_INTERPRET=1) ---------------------------------------

def _weight_args(ptr: str, name: str, t, C, G, channel_major, pool) -> dict:
    """Keyword arguments of a ``(D, K)`` weight: ``<ptr>_ptr`` and the strides
    ``stride_<name>{d, q, c}`` that address column ``(q, c)`` of the kernel (window position,
    channel)."""
    sd, sk = t.stride()
    if pool:
        sq, sc = 0, sk
    else:
        sq, sc = (sk, G * sk) if channel_major else (C * sk, sk)
    return {f"{ptr}_ptr": t, f"stride_{name}d": sd, f"stride_{name}q": sq, f"stride_{name}c": sc}


def _statistics(tokens, M, R, C, prefix, w, ws, s, order, pool, kind, rms, eps):
    """fp32 ``(mean, rstd)`` ``(M, s*s)`` (pre-concat) or ``(M, 1)`` of the merged rows."""
    from vtok_fast.kernels.merge_project import STATS_BLOCK_C, STATS_BLOCK_M, STATS_NUM_WARPS, _merge_project_stats

    groups = s * s if kind == "pre" else 1
    mean = torch.empty(M, groups, dtype=torch.float32, device=tokens.device)
    rstd = torch.empty_like(mean)
    _merge_project_stats[tile_grid(M)](
        mean_ptr=mean, rstd_ptr=rstd, x_ptr=tokens, **strides(tokens, "x", "blc"),
        M=M, R=R, C=C, P=prefix, W=w, WS=ws, eps=eps,
        S=s, ORDER=order, PER_TOKEN=kind == "pre", RMS=rms, POOL=pool,
        BLOCK_M=STATS_BLOCK_M, BLOCK_C=STATS_BLOCK_C, num_warps=STATS_NUM_WARPS)
    return mean, rstd


def _forward_triton(tokens, norm_weight, norm_bias, weight, bias, gate_weight, gate_bias, h, w, s, order,
                    pool, norm, rms, offset, eps, activation, channel_major, prefix, save_preact):
    from vtok_fast.kernels.merge_project import _merge_project_fwd, _merge_project_fwd_glu

    B, L, C = tokens.shape
    D = weight.shape[0]
    R = (L - prefix) // (s * s)
    M = B * R
    glu = gate_weight is not None
    new = functools.partial(torch.empty, M, D, dtype=weight.dtype, device=tokens.device)
    out = new()
    pre, gpre = (new(), new() if glu else out) if save_preact else (out, out)
    if M == 0:
        return out, (pre if save_preact else out.new_empty(0)), (gpre if save_preact and glu else out.new_empty(0))
    ws = max(w // s, 1)
    kind = {"none": "none", "pre_concat": "pre", "post_concat": "post"}[norm]
    mean = rstd = weight  # stand-ins, never read without a norm
    if kind != "none":
        mean, rstd = _statistics(tokens, M, R, C, prefix, w, ws, s, order, pool, kind, rms, eps)
    kernel = _merge_project_fwd_glu if glu else _merge_project_fwd
    # absent operands: the weight stands in (the kernel's flags skip them)
    kernel[tile_grid(M, D)](
        out_ptr=out, **strides(out, "o", "md"), pre_ptr=pre, gpre_ptr=gpre,
        x_ptr=tokens, **strides(tokens, "x", "blc"), mean_ptr=mean, rstd_ptr=rstd,
        g_ptr=optional_operand(norm_weight, weight), beta_ptr=optional_operand(norm_bias, weight),
        **_weight_args("w", "w", weight, C, s * s, channel_major, pool),
        **_weight_args("wg", "g", gate_weight if glu else weight, C, s * s, channel_major, pool),
        bias_ptr=optional_operand(bias, weight), gbias_ptr=optional_operand(gate_bias, weight),
        M=M, R=R, D=D, C=C, P=prefix, W=w, WS=ws,
        S=s, ORDER=order, NORM=kind, POOL=pool, HAS_G=norm_weight is not None, HAS_BETA=norm_bias is not None,
        G_OFFSET=float(offset), HAS_BIAS=bias is not None, HAS_GATE=glu, ACTIVATION=activation,
        SAVE_PRE=save_preact, ALLOW_TF32=weight.dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32),
    )
    return out, (pre if save_preact else out.new_empty(0)), (gpre if save_preact and glu else out.new_empty(0))


# --- the registered op ---------------------------------------------------------------------------

def _unstack(weight, bias, gate_weight, gate_bias, stacked: str):
    """``(weight, bias, gate_weight, gate_bias)`` with a stacked GLU's halves as views."""
    if stacked == "none":
        return weight, bias, gate_weight, gate_bias
    halves = weight.chunk(2)
    bias_halves = (None, None) if bias is None else bias.chunk(2)
    first = 0 if stacked == "up_gate" else 1
    return halves[first], bias_halves[first], halves[1 - first], bias_halves[1 - first]


def _merge_project_impl(tokens: torch.Tensor, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                        weight: torch.Tensor, bias: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                        gate_bias: Optional[torch.Tensor], stacked: str, height: int, width: int, window: int,
                        order: str, pool: bool, norm: str, rms: bool, offset: float, eps: float, activation: str,
                        channel_major: bool, prefix: int, save_preact: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out ``(M, D)``, pre-activation and gate pre-activation ``(M, D)`` if ``save_preact``
    (the gate's only with a gate) else empty). ``stacked`` (``"none"``, ``"up_gate"``,
    ``"gate_up"``): ``weight`` / ``bias`` hold both GLU halves, ``gate_*`` are None."""
    weight, bias, gate_weight, gate_bias = _unstack(weight, bias, gate_weight, gate_bias, stacked)
    forward = _forward_triton if use_triton(tokens, weight, norm_weight) else _forward_torch
    with torch.autocast(tokens.device.type, enabled=False):  # dtypes were settled by the caller
        return forward(tokens, norm_weight, norm_bias, weight, bias, gate_weight, gate_bias, height, width,
                       window, order, pool, norm, rms, offset, eps, activation, channel_major, prefix,
                       save_preact)


def _merge_project_fake(tokens, norm_weight, norm_bias, weight, bias, gate_weight, gate_bias, stacked, height, width,
                        window, order, pool, norm, rms, offset, eps, activation, channel_major, prefix, save_preact):
    rows = tokens.shape[0] * ((tokens.shape[1] - prefix) // (window * window))
    glu = gate_weight is not None or stacked != "none"
    shape = (rows, weight.shape[0] // 2 if stacked != "none" else weight.shape[0])
    out = tokens.new_empty(shape, dtype=weight.dtype)
    pre = tokens.new_empty(shape if save_preact else (0,), dtype=weight.dtype)
    gpre = tokens.new_empty(shape if save_preact and glu else (0,), dtype=weight.dtype)
    return out, pre, gpre


def _setup_context(ctx, inputs, output):
    (tokens, norm_weight, norm_bias, weight, bias, gate_weight, gate_bias, stacked, h, w, s, order, pool, norm, rms,
     offset, eps, act, channel_major, prefix, _) = inputs
    ctx.layout = (h, w, s, order, prefix, pool, channel_major)
    ctx.stacked = stacked
    ctx.norm, ctx.rms, ctx.offset, ctx.eps, ctx.activation = norm, rms, offset, eps, act
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(tokens, norm_weight, norm_bias, weight, gate_weight, output[1], output[2])


def _activation_backward(grad, pre, activation):
    if activation == "none":
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if activation == "gelu_tanh" else "none")


def _projection_grads(ctx, grad, pre, gpre, glu):
    """(dz, dz_gate or None): gradients of the pre-activations of the up and gate projections."""
    needs_pre = ctx.activation != "none" or glu
    if needs_pre and pre.dim() != 2:
        raise RuntimeError("merge_project: the forward ran without saving the pre-activation (it saves "
                           "it only when grad mode is on and an input requires grad)")
    if not glu:
        return _activation_backward(grad, pre, ctx.activation), None
    act = None if ctx.activation == "none" else ctx.activation
    dz = grad * _activation_fn(act)(gpre)
    return dz, _activation_backward(grad * pre, gpre, ctx.activation)


def _norm_backward(ctx, da, saved, norm_weight, norm_bias, need):
    """(d_rows, d_norm_weight, d_norm_bias) through the norm, from the normalized rows' gradient."""
    x, mean, rstd = saved
    da = da.float().reshape(x.shape)
    nw = None if norm_weight is None else norm_weight.float() + ctx.offset
    if ctx.rms:
        d_rows, d_nw = _rms_norm_backward(da, x, rstd, nw)
        d_nb = None
    else:
        nb = None if norm_bias is None else norm_bias.float()
        d_rows, d_nw, d_nb = torch.ops.aten.native_layer_norm_backward(
            da, x, x.shape[-1:], mean, rstd, nw, nb, [need[0], nw is not None, nb is not None])
    d_nw = None if d_nw is None or not need[1] else d_nw.to(norm_weight.dtype)
    d_nb = None if d_nb is None or not need[2] else d_nb.to(norm_bias.dtype)
    return d_rows, d_nw, d_nb


def _backward(ctx, grad, _grad_pre, _grad_gpre):
    tokens, norm_weight, norm_bias, weight, gate_weight, pre, gpre = ctx.saved_tensors
    h, w, s, order, prefix, pool, channel_major = ctx.layout
    need = ctx.needs_input_grad
    dz, dzg = _projection_grads(ctx, grad, pre, gpre, gate_weight is not None or ctx.stacked != "none")
    dz = dz.to(weight.dtype)
    dzg = None if dzg is None else dzg.to(weight.dtype)
    if ctx.stacked != "none":  # one gradient for the stacked weight: its halves' columns side by side
        dz = torch.cat([dz, dzg] if ctx.stacked == "up_gate" else [dzg, dz], dim=1)
        dzg = None
    rows = _gather(tokens, h, w, s, order, prefix, pool)
    M, G, C = rows.shape
    normed = saved = None
    if ctx.norm != "none":
        normed, saved = _normalize(rows, ctx.norm, ctx.rms, ctx.offset, norm_weight, norm_bias, ctx.eps)
    grads = [None] * 7  # tokens, norm weight, norm bias, weight, bias, gate weight, gate bias
    if need[3] or need[5]:
        a = _operand(rows if normed is None else normed, channel_major, weight.dtype)
        grads[3] = cpu_gemm.linear(dz.t(), a.t()) if need[3] else None
        grads[5] = cpu_gemm.linear(dzg.t(), a.t()) if need[5] else None
    if ctx.has_bias:
        grads[4] = dz.sum(0, dtype=torch.float32).to(weight.dtype) if need[4] else None
        grads[6] = dzg.sum(0, dtype=torch.float32).to(weight.dtype) if need[6] else None
    if need[0] or need[1] or need[2]:
        da = cpu_gemm.linear(dz, weight.t())
        if dzg is not None:
            da = cpu_gemm.linear(dzg, gate_weight.t(), add=da)
        d_rows = _operand_grad(da, G, C, channel_major)
        if ctx.norm != "none":
            d_rows, grads[1], grads[2] = _norm_backward(ctx, d_rows, saved, norm_weight, norm_bias, need)
        if need[0]:
            grads[0] = _scatter(d_rows.reshape(M, G, C), tokens.shape, tokens.dtype, h, w, s, order, prefix)
    return tuple(grads) + (None,) * 14


def _rms_norm_backward(grad, x, rstd, weight):
    """(dx, dweight) of ``x * rstd * weight`` with ``rstd = rsqrt(mean(x^2) + eps)``."""
    n = x * rstd
    dweight = None if weight is None else (grad * n).flatten(0, -2).sum(0)
    dn = grad if weight is None else grad * weight
    dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx, dweight


_merge_project_op = define_op("merge_project", _merge_project_impl, fake=_merge_project_fake, backward=_backward,
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


def _check_linear(weight, bias, gate_weight, gate_bias, K, k_doc):
    """Shapes and dtypes of the (gated) Linear; ``k_doc`` says how ``K`` came about."""
    if weight.shape[1] != K:
        raise ValueError(f"weight must have {k_doc} = {K} columns, got shape {tuple(weight.shape)}")
    if gate_weight is None and gate_bias is not None:
        raise ValueError("gate_bias needs gate_weight")
    if gate_weight is not None:
        check_tensor("gate_weight", gate_weight, ndim=2, dtypes=FLOAT_DTYPES, shape_doc="(D, K)")
        if gate_weight.shape != weight.shape:
            raise ValueError(f"gate_weight must have the weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(gate_weight.shape)}")
        if gate_weight.dtype != weight.dtype:
            raise TypeError(f"gate_weight must have the weight's dtype {weight.dtype}, got {gate_weight.dtype}")
        if (bias is None) != (gate_bias is None):
            raise ValueError("bias and gate_bias must be given together (both or neither)")
    for name, b in (("bias", bias), ("gate_bias", gate_bias)):
        if b is not None:
            check_bias(name, b, weight)


def _check_stacked_glu(stacked_glu, weight, gate_weight, gate_bias):
    check_choice("stacked_glu", stacked_glu, STACKED_GLU)
    if stacked_glu is None:
        return
    if gate_weight is not None or gate_bias is not None:
        raise ValueError(f"gate_weight and gate_bias must be None with stacked_glu={stacked_glu!r} (the weight "
                         "holds both halves)")
    if weight.shape[0] % 2:
        raise ValueError(f"weight must have an even number of rows (2D: both GLU halves) with "
                         f"stacked_glu={stacked_glu!r}, got shape {tuple(weight.shape)}")


def _check_norm(norm, norm_type, norm_weight, norm_bias, width, C, window):
    if norm is None:
        if norm_weight is not None or norm_bias is not None:
            raise ValueError("norm_weight / norm_bias need norm='pre_concat' or 'post_concat', got norm=None")
        return
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, shape_doc=f"({width},)")
        if t.shape[0] != width:
            raise ValueError(f"{name} must be ({width},) for norm={norm!r} (C={C}, window={window}), "
                             f"got shape {tuple(t.shape)}")
    if norm_type != "layernorm" and norm_bias is not None:
        raise ValueError(f"norm_bias must be None for norm_type={norm_type!r} (RMS norm has no bias)")
    if norm_weight is not None and norm_bias is not None and norm_weight.dtype != norm_bias.dtype:
        raise TypeError(f"norm_bias has dtype {norm_bias.dtype} but norm_weight has {norm_weight.dtype}")


def _check_args(tokens, weight, window, order, merge, norm, norm_type, activation, weight_layout, prefix, grid):
    """Validated ``(tokens as (B, L, C), h, w, prefix)``."""
    check_tensor("tokens", tokens, ndim=(2, 3), dtypes=FLOAT_DTYPES, shape_doc="(B, L, C) or (L, C)")
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape_doc="(D, K)")
    check_int("window", window, 1)
    check_choice("order", order, ORDERS)
    check_choice("merge", merge, MERGES)
    check_choice("norm", norm, NORMS)
    check_choice("norm_type", norm_type, NORM_TYPES)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("weight_layout", weight_layout, WEIGHT_LAYOUTS)
    if merge == "mean" and norm == "pre_concat":
        raise ValueError("norm='pre_concat' needs merge='concat' (with merge='mean', 'post_concat' "
                         "normalizes the pooled row)")
    x = tokens[None] if tokens.dim() == 2 else tokens
    L, C = x.shape[1], x.shape[2]
    if C == 0:
        raise ValueError(f"tokens must have C >= 1 channels, got shape {tuple(tokens.shape)}")
    check_int("prefix", prefix, 0)
    if prefix > L:
        raise ValueError(f"prefix must be <= the sequence length {L}, got {prefix}")
    h, w = _check_grid(grid, window, order, L - prefix)
    return x, h, w


def merge_project(tokens: torch.Tensor, grid=None, *, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, window: int = 2, order: str = "swin",
                  merge: str = "concat", norm: Optional[str] = "post_concat", norm_type: str = "layernorm",
                  norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                  eps: float = 1e-5, activation: Optional[str] = None,
                  gate_weight: Optional[torch.Tensor] = None, gate_bias: Optional[torch.Tensor] = None,
                  stacked_glu: Optional[str] = None, weight_layout: str = "window_major",
                  prefix: int = 0) -> torch.Tensor:
    """Merge each ``window x window`` window of tokens, normalize, project: one fused op.

    Args:
        tokens: ``(B, L, C)`` or ``(L, C)``, ``L = prefix + h*w``, row-major over the grid (any
            strides).
        grid: ``(h, w)``, both divisible by ``window`` (0 allowed: an empty result);
            optional for ``order="contiguous"``.
        weight: ``(D, K)`` weight of the Linear, ``K = window**2 * C`` (``C`` for
            ``merge="mean"``), any strides (a transposed ``(K, D)`` matrix works as ``.t()``);
            ``bias``: ``(D,)`` or None, in the weight's dtype.
        window: merge window side ``s`` (1: no merge, a plain norm + Linear, e.g. LLaVA).
        order: ``"swin"``, ``"row_major"`` or ``"contiguous"`` (see the module docstring).
        merge: ``"concat"`` (the window's tokens side by side) or ``"mean"`` (their average).
        norm: ``"pre_concat"`` (over ``C``), ``"post_concat"`` (over the merged row) or None;
            ``norm_type``: ``"layernorm"``, ``"rmsnorm"`` or ``"gemma_rmsnorm"`` (scale
            ``1 + norm_weight``); ``norm_weight`` / ``norm_bias``: the affine, ``(C,)`` for
            pre-concat or ``merge="mean"``, ``(window**2 * C,)`` for post-concat, or None.
        eps: the norm's epsilon, a real number in ``(0, inf)``.
        activation: None, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.
        gate_weight, gate_bias: a GLU's gate projection (shapes and dtype of ``weight`` /
            ``bias``; biases both or neither): the result is ``activation(gate) * up``.
        stacked_glu: None, ``"up_gate"`` or ``"gate_up"``: ``weight`` ``(2D, K)`` and ``bias``
            ``(2D,)`` hold both GLU projections, stacked in that order (Aya Vision's ``linear_1``,
            chunked into ``x, gate``), and ``gate_*`` are None; the result has ``D`` columns.
            One parameter gets one gradient (two halves passed as ``weight[:D]`` and
            ``weight[D:]`` would be concatenated in the backward).
        weight_layout: ``"window_major"`` (column ``q * C + c``) or ``"channel_major"``
            (``c * window**2 + q``: a Conv2d / ``F.unfold`` flattening).
        prefix: leading tokens of every sequence that are not part of the grid (left out).

    Returns ``(B, R, D)`` (``(R, D)`` for 2-D tokens), ``R = h*w / window**2``, in the weight's
    dtype (the autocast dtype under ``torch.autocast``). Differentiable in every tensor argument.
    """
    x, h, w = _check_args(tokens, weight, window, order, merge, norm, norm_type, activation, weight_layout,
                          prefix, grid)
    check_same_device(tokens=tokens, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias,
                      gate_weight=gate_weight, gate_bias=gate_bias)
    C = x.shape[2]
    K = C if merge == "mean" else window * window * C
    k_doc = "C (merge='mean')" if merge == "mean" else f"window**2 * C = {window}**2 * {C}"
    _check_linear(weight, bias, gate_weight, gate_bias, K, k_doc)
    _check_stacked_glu(stacked_glu, weight, gate_weight, gate_bias)
    eps = check_positive_real("eps", eps)
    _check_norm(norm, norm_type, norm_weight, norm_bias, C if norm == "pre_concat" else K, C, window)
    device_type = tokens.device.type
    if torch.is_autocast_enabled(device_type):  # what nn.Linear does there; the norm stays fp32
        dtype = torch.get_autocast_dtype(device_type)
        weight, bias, gate_weight, gate_bias = (None if t is None else t.to(dtype)
                                                for t in (weight, bias, gate_weight, gate_bias))
        if norm is None:
            x = x.to(dtype)
    if norm is None and x.dtype != weight.dtype:
        raise TypeError(f"tokens must have the weight's dtype {weight.dtype} when norm=None, got "
                        f"{x.dtype} (with a norm, tokens of any float dtype are normalized in fp32)")
    leaves = (x, weight, bias, norm_weight, norm_bias, gate_weight, gate_bias)
    needs_grad = any(t is not None and t.requires_grad for t in leaves)
    glu = gate_weight is not None or stacked_glu is not None
    save_preact = (activation is not None or glu) and torch.is_grad_enabled() and needs_grad
    out = _merge_project_op(x, norm_weight, norm_bias, weight, bias, gate_weight, gate_bias, stacked_glu or "none",
                            h, w, window, order, merge == "mean", norm or "none", norm_type != "layernorm",
                            1.0 if norm_type == "gemma_rmsnorm" else 0.0, eps, activation or "none",
                            weight_layout == "channel_major", prefix, save_preact)[0]
    out = out.view(x.shape[0], h * w // (window * window), out.shape[1])
    return out[0] if tokens.dim() == 2 else out
