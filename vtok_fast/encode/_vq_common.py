"""Pieces shared by the VQ layers (``vq.py``, ``residual_vq.py``): argument checks, gradient
estimators, losses, stochastic code sampling, padding masks, distributed helpers and the
vector-quantize-pytorch checkpoint key mapping."""
from __future__ import annotations

import math
import numbers
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vtok_fast._checks import check_tensor

_NORM_EPS = 1e-6  # vector-quantize-pytorch's safe_div / l2norm eps
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
MASKED_OUTPUTS = ("zeros", "input")  # what padded positions of the output get

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook", "orthogonal_reg"])
LossBreakdown.__doc__ = """Unweighted loss terms of one ``VectorQuantizer`` step: ``commitment``
(``mse(sg[q], z)``, or ``mse(q, z)`` with ``codebook_loss="joint"``), ``codebook``
(``mse(q, sg[z])``, learnable codebooks with ``codebook_loss="separate"``) and
``orthogonal_reg``; the returned loss is ``commitment_weight * commitment + codebook +
orthogonal_reg_weight * orthogonal_reg``."""


# --- argument checks ---------------------------------------------------------------------------------

def _check_int(name: str, value, *, positive: bool = True, optional: bool = False) -> int | None:
    """``value`` as an int (> 0, or >= 0 with ``positive=False``; ``None`` too when ``optional``).
    A bool is not an int here."""
    want = ("a positive int" if positive else "a non-negative int") + (" or None" if optional else "")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {want}, got {value!r} of type {type(value).__name__}")
    if value < (1 if positive else 0):
        raise ValueError(f"{name} must be {want}, got {value}")
    return int(value)


def _check_number(name: str, value, *, open_low: bool = False, high: float | None = None,
                  optional: bool = False, closed_high: bool = False) -> float | None:
    """``value`` as a finite float in ``[0, high)`` (``(0, ...`` with ``open_low``, ``..., high]`` with
    ``closed_high``; no upper bound when ``high`` is None); ``None`` too when ``optional``. A bool is
    not a number here."""
    close = "]" if closed_high else ")"
    want = f"a number in {'(' if open_low else '['}0, {'inf' if high is None else f'{high:g}'}{close}"
    want += " or None" if optional else ""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {want}, got {value!r} of type {type(value).__name__}")
    v = float(value)
    below = v < high or (closed_high and v == high) if high is not None else math.isfinite(v)
    if not (0.0 < v if open_low else 0.0 <= v) or not below:
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def _check_flag(name: str, value, *, optional: bool = False) -> bool | None:
    if not (isinstance(value, bool) or (optional and value is None)):
        want = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {want}, got {value!r} of type {type(value).__name__}")
    return value


def _check_input(x, dim: int, channel_last: bool) -> torch.Tensor:
    """``x`` in channel-last layout, after checking it is a float tensor with ``dim`` features."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if channel_last:
        if x.dim() < 1 or x.shape[-1] != dim:
            raise ValueError(f"x must have shape (..., dim) with dim = {dim}, got shape {tuple(x.shape)}")
        return x
    if x.dim() < 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (B, dim, ...) with dim = {dim} (channel_last=False), "
                         f"got shape {tuple(x.shape)}")
    return x.movedim(1, -1)


def _check_indices(indices, codebook_size: int, *, min_dim: int, last: int | None,
                   shape_doc: str, missing_ok: bool = False) -> torch.Tensor:
    """``indices`` as int64, after checking its dtype, its shape (at least ``min_dim`` dims, the last
    of size ``last`` when given) and that every value is in ``[0, codebook_size)`` (or -1, "no code",
    with ``missing_ok``)."""
    check_tensor("indices", indices, dtypes=INDEX_DTYPES)
    low = -1 if missing_ok else 0
    values = f"values in [{low}, codebook_size) = [{low}, {codebook_size})" + (" (-1: no code)" if missing_ok else "")
    want = f"indices must have shape {shape_doc} and {values}"
    if indices.dim() < min_dim or (last is not None and indices.shape[-1] != last):
        raise ValueError(f"{want}, got shape {tuple(indices.shape)}")
    if indices.numel():
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one host sync
        if lo < low or hi >= codebook_size:
            raise ValueError(f"{want}, got values from {lo} to {hi} (shape {tuple(indices.shape)})")
    return indices.long()


def _row_mask(mask, lens, lead: torch.Size, device) -> torch.Tensor | None:
    """The flat bool mask of the rows to quantize (``None``: all of them), from ``mask`` (bool, shape
    ``lead``, True = a real position) or ``lens`` (ints ``(B,)``: the first ``lens[b]`` of the ``N``
    positions of a ``(B, N, dim)`` input are real)."""
    if mask is not None and lens is not None:
        raise ValueError("pass mask or lens, not both")
    if lens is not None:
        check_tensor("lens", lens, ndim=1, dtypes=INDEX_DTYPES, shape_doc="(B,)")
        if len(lead) != 2 or lens.shape[0] != lead[0]:
            raise ValueError(f"lens needs an input of shape (B, N, dim) and lens of shape (B,), got input "
                             f"positions {tuple(lead)} and lens of shape {tuple(lens.shape)}")
        return (torch.arange(lead[1], device=device) < lens.to(device)[:, None]).reshape(-1)
    if mask is None:
        return None
    check_tensor("mask", mask, dtypes=(torch.bool,))
    if mask.shape != lead:
        raise ValueError(f"mask must have the shape of x without its feature dim, {tuple(lead)}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(device).reshape(-1)


def _finite_rows(z: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``z`` ``(books, rows, d)`` with no NaN or inf in any book, as a bool ``(rows,)``
    mask, or None when that is all of them (one host sync)."""
    ok = torch.isfinite(z).all(-1).all(0)
    return None if bool(ok.all()) else ok


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(a, b)``, but 0 for empty inputs (a sum over no terms, still in the autograd graph)
    where the mean would be NaN."""
    return F.mse_loss(a, b) if a.numel() else (a - b).square().sum()


# --- gradient estimators -----------------------------------------------------------------------------

def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q``, gradient of the identity w.r.t. ``z``."""
    return z + (q - z).detach()


def rotation_trick(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024, sec. 4.2): value ``q``; the gradient reaching ``z`` is the
    upstream gradient rotated by the (detached) rotation taking ``z``'s direction to ``q``'s and
    scaled by ``|q| / |z|``.

    With ``u = z/|z|``, ``v = q/|q|``, ``w = (u + v)/|u + v|`` (all detached):
    ``out = (z - 2 (z.w) w + 2 (z.u) v) * |q| / |z|``.
    """
    z_norm = z.norm(dim=-1, keepdim=True)
    q_norm = q.norm(dim=-1, keepdim=True)
    u = (z / z_norm.clamp_min(_NORM_EPS)).detach()
    v = (q / q_norm.clamp_min(_NORM_EPS)).detach()
    w = F.normalize(u + v, dim=-1, eps=_NORM_EPS).detach()
    rotated = z - 2.0 * (z * w).sum(-1, keepdim=True) * w + 2.0 * (z * u).sum(-1, keepdim=True) * v
    return rotated * (q_norm / z_norm.clamp_min(_NORM_EPS)).detach()


def directional_reparam(z: torch.Tensor, q: torch.Tensor, variance: float = 5e-3) -> torch.Tensor:
    """DiVeQ (directional reparameterization): ``z + dir * |q - z|`` with ``dir`` the (detached) unit
    direction of ``q - z + sqrt(variance) * noise``. The value is ``z`` moved by the true error's length
    in a noisy direction; gradients reach ``z`` and, through ``|q - z|``, a learnable ``q``."""
    err = q - z
    noised = err + math.sqrt(variance) * torch.randn_like(err)
    return z + F.normalize(noised, dim=-1, eps=_NORM_EPS).detach() * err.norm(dim=-1, keepdim=True)


def frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    """Value ``t``; a fraction ``frac`` of the gradient passes."""
    return t.detach() if frac <= 0 else frac * t + (1.0 - frac) * t.detach()


# --- losses and sampling -----------------------------------------------------------------------------

def orthogonal_loss(codes: torch.Tensor) -> torch.Tensor:
    """Orthogonality regularizer (Shin et al. 2021, eq. 2) of ``codes`` ``(books, n, d)``:
    ``sum_ij cos(c_i, c_j)^2 / (books * n^2) - 1/n``. The sum of squared cosines is the squared
    Frobenius norm of the Gram matrix, computed as ``|C^T C|_F^2`` (d x d) when ``n > d``, so the extra
    memory is ``O(min(n, d)^2)``, never the n x n matrix. 0 when there are no codes."""
    books, n, d = codes.shape
    if n == 0:
        return codes.sum() * 0.0
    unit = F.normalize(codes, dim=-1, eps=_NORM_EPS)
    gram = unit.transpose(1, 2) @ unit if n > d else unit @ unit.transpose(1, 2)
    return gram.square().sum() / (books * n * n) - 1.0 / n


_SAMPLE_CHUNK = 1 << 22  # logits per chunk of rows: two fp32 buffers of 16 MiB, whatever N


def gumbel_sample_codes(z: torch.Tensor, codebook: torch.Tensor, metric: str, temperature: float) -> torch.Tensor:
    """Codes drawn with ``P(k) = softmax(logits / temperature)``, Gumbel-max over chunks of rows (the
    extra memory is two buffers of ``_SAMPLE_CHUNK`` logits, not N x K). Logits as in
    vector-quantize-pytorch: ``-|z - c|`` (l2; the square root of the fp32 squared distance, clamped at
    1e-8) or ``z . c`` (cosine, unit vectors). Noise from torch's global generator."""
    z, codebook = z.detach().float(), codebook.detach().float()
    n, k = z.shape[0], codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    step = max(1, _SAMPLE_CHUNK // max(k, 1))
    code_sq = codebook.square().sum(-1)
    for start in range(0, n, step):
        rows = z[start:start + step]
        logits = rows @ codebook.T
        if metric != "cosine":  # in place: -sqrt(max(|z|^2 + |c|^2 - 2 z.c, 1e-8))
            logits.mul_(-2.0).add_(code_sq).add_(rows.square().sum(-1, keepdim=True))
            logits.clamp_min_(1e-8).sqrt_().neg_()
        noise = torch.rand_like(logits).clamp_min_(1e-20).log_().neg_().clamp_min_(1e-20).log_().neg_()
        out[start:start + step] = logits.div_(temperature).add_(noise).argmax(-1)
    return out


# --- distributed helpers -----------------------------------------------------------------------------

def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (``t`` must be contiguous: reducing a copy syncs nothing)."""
    if not t.is_contiguous():
        raise RuntimeError("all_reduce needs a contiguous tensor; reducing a temporary copy syncs nothing")
    dist.all_reduce(t)
    return t


# --- vector-quantize-pytorch checkpoints ---------------------------------------------------------------

# their Codebook buffer -> ours (embed_avg is the EMA of per-code vector sums, our embed_sum)
VQP_KEYS = {"embed": "embed", "embed_avg": "embed_sum", "cluster_size": "cluster_size", "initted": "initted"}


def load_vqp_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                  error_msgs) -> None:
    """``load_state_dict`` pre-hook of ``VectorQuantizer``: renames a vector-quantize-pytorch
    ``VectorQuantize`` state (``<prefix>_codebook.embed`` ...) to ours, in place. ``embed_avg`` is
    dropped for a learnable codebook (which keeps no sums); our ``rng_state`` (absent there) keeps
    its current value. Keys of features we lack (``_codebook.batch_mean``, ...) stay, so strict
    loading reports them as unexpected."""
    if prefix + "_codebook.embed" not in state_dict:
        return
    for theirs, ours in VQP_KEYS.items():
        value = state_dict.pop(prefix + "_codebook." + theirs, None)
        if value is not None and not (ours == "embed_sum" and not hasattr(module, "embed_sum")):
            state_dict[prefix + ours] = value
    state_dict.setdefault(prefix + "rng_state", module.rng_state.detach().clone())
