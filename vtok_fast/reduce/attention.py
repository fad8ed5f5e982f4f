"""Attention with a per-key bias (ToMe proportional attention): ``attention`` and its reference.

Contract (``q`` ``(B, H, M, d)``, ``k`` and ``v`` ``(B, H, N, d)`` as
``F.scaled_dot_product_attention`` takes them; fp32, fp16 or bf16, one dtype; ``key_bias``
``(B, N)`` in any float dtype, float64 included: it is rounded to fp32, the precision of the
logits, and its gradient comes back in its own dtype):

- ``out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j] + key_bias[b, j]) v[b, h, j]``,
  ``scale`` defaulting to ``1 / sqrt(d)``. The bias of a key is added to every logit of that key,
  for every head and query row (ToMe passes ``log(size)``); ``key_bias=None`` is plain attention.
- Keys with a ``-inf`` bias get zero weight. A batch row whose keys are all ``-inf`` has no
  defined softmax: its output is zero (not NaN), and so are its gradients.
- Differentiable in ``q``, ``k``, ``v`` and ``key_bias`` (``d key_bias[b, j]`` = sum over heads and
  query rows of the logit gradients of key ``j``); no double backward.
- Strided inputs (for instance the three views ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``
  of one fused projection) are read in place, without copies. The Triton path stores its
  ``(B, H, M, d)`` output as ``(B, M, H, d)``, so ``out.transpose(1, 2).reshape(B, M, H * d)`` is
  free (SDPA does the same for such views).

Backends: CUDA tensors with ``d`` in ``SUPPORTED_HEAD_DIMS`` run the Triton kernels
(``kernels/attention.py``: FlashAttention-2 style, online softmax in fp32, nothing of size
``M x N`` stored; 16-bit inputs on tensor cores, fp32 inputs with IEEE fp32 products). CPU tensors
and any other head dim run :func:`attention_reference`, i.e. ``F.scaled_dot_product_attention``
with the bias as a float mask ``(B, 1, 1, N)``, differentiated by SDPA's own backward (it is
called directly, not through the custom op, whose implementation runs below autograd). The op
``vtok_fast::attention`` itself also falls back to the reference when it meets such tensors
(for instance a graph compiled under another ``VTOK_FAST_BACKEND``), with a closed-form
backward. Forward and backward choose their path at run time alike (``VTOK_FAST_BACKEND`` must
not change between a forward and its backward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vtok_fast._backend import use_triton
from vtok_fast._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from vtok_fast._launch import optional_operand, strides, tile_grid
from vtok_fast._op import define_op

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)  # Triton kernels; 80 and 96 run padded to 128
LOG2E = math.log2(math.e)
BIAS_DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64 is rounded to fp32 (the logits' precision)


# --- reference (the PyTorch path) -------------------------------------------------------------------

def attention_reference(q, k, v, key_bias=None, scale=None):
    """``F.scaled_dot_product_attention`` with ``key_bias`` as a float mask ``(B, 1, 1, N)``, and
    zeros (output and gradients) for a batch row whose biases are all ``-inf``."""
    if key_bias is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # SDPA takes a float mask in fp32 or in the query's dtype
    bias = key_bias if key_bias.dtype in (q.dtype, torch.float32) else key_bias.float()
    dead = torch.isneginf(bias).all(dim=-1)  # (B,): no key left, softmax undefined
    if not torch.compiler.is_compiling() and not bool(dead.any()):
        # eager and nothing fully masked: skip the extra pass over the output (a graph keeps it)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :], scale=scale)
    mask = bias.masked_fill(dead[:, None], 0.0)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(dead[:, None, None, None], 0.0)


def _empty_bmhd(like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialized ``(B, H, L, d)`` tensor stored as ``(B, L, H, d)``."""
    batch, heads, length, dim = shape
    return like.new_empty(batch, length, heads, dim).transpose(1, 2)


def _as_bmhd(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the ``(B, L, H, d)`` storage order of :func:`_empty_bmhd` (a copy only if needed)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _runs_triton(q, k, v, key_bias) -> bool:
    return q.shape[-1] in SUPPORTED_HEAD_DIMS and use_triton(q, k, v, key_bias)


# --- Triton path -------------------------------------------------------------------------------------

def _launch_args(q, k, key_bias):
    """(kernel module, fp32?, keyword arguments every tiled launch shares: the bias operand, the
    sizes and the constexprs)."""
    from vtok_fast.kernels import attention as ka

    _, heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    shared = dict(bias_ptr=optional_operand(key_bias, q),  # q: never read without HAS_BIAS
                  **strides(key_bias, "b", "bn"), heads=heads, seq_q=seq_q, seq_k=seq_k,
                  seq_bucket=1 << (max(seq_q, seq_k) - 1).bit_length(),  # the tuning bucket
                  HAS_BIAS=key_bias is not None, PRECISION="ieee", HEAD_D=dim,
                  BLOCK_D=max(32, 1 << (dim - 1).bit_length()))
    return ka, q.dtype == torch.float32, shared


def _qkv(q, k, v):
    """Keyword arguments of the q, k, v operands."""
    return dict(q_ptr=q, **strides(q, "q", "bhmd"), k_ptr=k, **strides(k, "k", "bhnd"),
                v_ptr=v, **strides(v, "v", "bhnd"))


def _forward_triton(q, k, v, key_bias, scale):
    ka, fp32, shared = _launch_args(q, k, key_bias)
    batch, heads, seq_q, _ = q.shape
    out = _empty_bmhd(q, q.shape)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    kernel = ka.attn_fwd_fp32 if fp32 else ka.attn_fwd
    kernel[tile_grid(seq_q, per=batch * heads)](
        out_ptr=out, **strides(out, "o", "bhmd"), lse_ptr=lse, **_qkv(q, k, v), qk_scale=scale * LOG2E,
        **shared)
    return out, lse


def _backward_triton(grad, q, k, v, key_bias, out, lse, scale):
    ka, fp32, shared = _launch_args(q, k, key_bias)
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    delta = torch.empty_like(lse)
    ka.attn_bwd_delta[tile_grid(seq_q, per=batch * heads)](
        delta_ptr=delta, out_ptr=out, **strides(out, "o", "bhmd"), do_ptr=grad, **strides(grad, "do", "bhmd"),
        heads=heads, seq_q=seq_q, HEAD_D=shared["HEAD_D"], BLOCK_D=shared["BLOCK_D"],
        BLOCK_M=ka.DELTA_BLOCK_M, num_warps=ka.DELTA_WARPS)
    dq, dk, dv = _empty_bmhd(q, q.shape), _empty_bmhd(k, k.shape), _empty_bmhd(v, v.shape)
    # per-head column sums of dS, reduced over heads below: deterministic, no atomics
    dbias = lse if key_bias is None else lse.new_empty(batch, heads, seq_k)
    inputs = dict(**_qkv(q, k, v), do_ptr=grad, **strides(grad, "do", "bhmd"), lse_ptr=lse, delta_ptr=delta,
                  scale=scale, qk_scale=scale * LOG2E, **shared)
    kernel = ka.attn_bwd_dkdv_fp32 if fp32 else ka.attn_bwd_dkdv
    kernel[tile_grid(seq_k, row_block="BLOCK_N", per=batch * heads)](
        dk_ptr=dk, **strides(dk, "dk", "bhnd"), dv_ptr=dv, **strides(dv, "dv", "bhnd"), dbias_ptr=dbias,
        **inputs)
    kernel = ka.attn_bwd_dq_fp32 if fp32 else ka.attn_bwd_dq
    kernel[tile_grid(seq_q, per=batch * heads)](dq_ptr=dq, **strides(dq, "dq", "bhmd"), **inputs)
    dbias = q.new_empty(0) if key_bias is None else dbias.sum(dim=1).to(key_bias.dtype)
    return dq, dk, dv, dbias


# --- PyTorch path -------------------------------------------------------------------------------------

_CPU_SCORE_ELEMS = 1 << 24  # fp32 scores per chunk of the PyTorch backward (64 MiB)


def _backward_torch(grad, q, k, v, key_bias, scale):
    """The op's fallback backward: gradients of :func:`attention_reference` in closed form (``P``
    recomputed per chunk of batch rows, in fp32 for 16-bit inputs; a fully masked row has
    ``P = 0``)."""
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = _empty_bmhd(q, q.shape), _empty_bmhd(k, k.shape), _empty_bmhd(v, v.shape)
    dbias = None if key_bias is None else torch.empty(batch, seq_k, dtype=key_bias.dtype, device=q.device)
    chunk = max(1, _CPU_SCORE_ELEMS // (heads * seq_q * seq_k))
    for b0 in range(0, batch, chunk):
        rows = slice(b0, b0 + chunk)
        qc, kc, vc, gc = (t[rows].to(acc) for t in (q, k, v, grad))
        s = scale * (qc @ kc.transpose(-1, -2))
        if key_bias is not None:
            s += key_bias[rows, None, None, :].to(acc)
        p = torch.softmax(s, dim=-1)
        if key_bias is not None:
            p.masked_fill_(torch.isneginf(key_bias[rows]).all(dim=-1)[:, None, None, None], 0.0)
        dv[rows] = p.transpose(-1, -2) @ gc
        dp = gc @ vc.transpose(-1, -2)
        ds = p.mul_(dp - (p * dp).sum(dim=-1, keepdim=True))  # dS = P (dP - rowsum(P dP))
        dq[rows] = scale * (ds @ kc)
        dk[rows] = scale * (ds.transpose(-1, -2) @ qc)
        if dbias is not None:
            dbias[rows] = ds.sum(dim=(1, 2))
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias


# --- the ops --------------------------------------------------------------------------------------------

def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): ``lse`` is the log2-domain log-sum-exp the Triton backward needs (+inf for a
    fully masked row); the PyTorch path does not compute it (NaN): its backward recomputes ``P``."""
    if _runs_triton(q, k, v, key_bias):
        return _forward_triton(q, k, v, key_bias, scale)
    out = _as_bmhd(attention_reference(q, k, v, key_bias, scale))
    return out, torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)


def _attention_fake(q, k, v, key_bias, scale):
    return _empty_bmhd(q, q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_backward_impl(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_bias: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); ``dbias`` is empty without a bias. Chooses the path like the forward
    (at run time, so a compiled graph follows ``VTOK_FAST_BACKEND`` in both directions alike)."""
    if _runs_triton(q, k, v, key_bias):
        return _backward_triton(grad, q, k, v, key_bias, out, lse, scale)
    return _backward_torch(grad, q, k, v, key_bias, scale)


def _attention_backward_fake(grad, q, k, v, key_bias, out, lse, scale):
    dbias = q.new_empty(0) if key_bias is None else key_bias.new_empty(key_bias.shape)
    return _empty_bmhd(q, q.shape), _empty_bmhd(k, k.shape), _empty_bmhd(v, v.shape), dbias


_attention_backward_op = define_op("attention_backward", _attention_backward_impl, fake=_attention_backward_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, key_bias, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, key_bias, out, lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, key_bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = _attention_backward_op(grad_out, q, k, v, key_bias, out, lse, ctx.scale)
    return dq, dk, dv, dbias if key_bias is not None and ctx.needs_input_grad[3] else None, None


_attention_op = define_op("attention", _attention_impl, fake=_attention_fake, backward=_backward,
                          setup_context=_setup_context)


# --- public ---------------------------------------------------------------------------------------------

def _check_args(q, k, v, key_bias, scale) -> float:
    """Validate the arguments; returns the scale to use."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="4-D (B, H, M, d)")
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="4-D (B, H, N, d)")
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="4-D (B, H, N, d)")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v, key_bias=key_bias)
    batch, _, _, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != dim:
        raise ValueError("k and v must have shape (B, H, N, d) with q's B, H and d, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if dim == 0:
        raise ValueError(f"q, k and v must have head dim d >= 1, got q {tuple(q.shape)}")
    if key_bias is not None:
        check_tensor("key_bias", key_bias, ndim=2, dtypes=BIAS_DTYPES, shape_doc="2-D (B, N)")
        if tuple(key_bias.shape) != (batch, k.shape[2]):
            raise ValueError(f"key_bias must have shape (B, N) = {(batch, k.shape[2])}, got "
                             f"{tuple(key_bias.shape)}")
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _attention_empty(q, k, v, key_bias, scale):
    """Attention when B, H, M or N is 0 (so the logits are empty): the plain formula, whose
    gradients reach every input (SDPA's give none to the bias here). N == 0 sums no values: zeros."""
    logits = scale * (q @ k.transpose(-1, -2))
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].to(logits.dtype)
    return (logits.softmax(dim=-1) @ v).to(q.dtype)


def attention(q, k, v, *, key_bias=None, scale=None):
    """Attention with a per-key bias: ``softmax(scale * q k^T + key_bias[:, None, None, :]) v``.

    ``q`` ``(B, H, M, d)``, ``k``/``v`` ``(B, H, N, d)`` (any strides), ``key_bias`` ``(B, N)``
    (any float dtype) or None, ``scale`` default ``1 / sqrt(d)``. Returns ``(B, H, M, d)`` in q's
    dtype. A batch row whose keys are all ``-inf``, or that has no keys (``N == 0``), gives zeros;
    an empty ``B``, ``H`` or ``M`` gives an empty output. See the module docstring.
    """
    scale = _check_args(q, k, v, key_bias, scale)
    if key_bias is not None and key_bias.dtype == torch.float64:
        key_bias = key_bias.float()  # differentiable: the gradient returns in float64
    if q.numel() == 0 or k.shape[2] == 0:
        return _attention_empty(q, k, v, key_bias, scale)
    if not _runs_triton(q, k, v, key_bias):  # SDPA
        return attention_reference(q, k, v, key_bias, scale)
    return _attention_op(q, k, v, key_bias, scale)[0]
