"""Nearest-codebook search: ``codebook_search`` and its pure-PyTorch reference.

Contract (``x`` ``(..., D)``, ``codebook`` ``(K, D)``; fp32, fp16 or bf16; mixed dtypes promote):

- ``metric="l2"``: the index minimizes the fp32 squared distance ``||x - c||^2``;
  ``metric="cosine"``: inputs and codes are l2-normalized (``F.normalize``) and the index
  maximizes their dot product.
- Returns int64 indices ``(...)`` for ``k == 1``, ``(..., k)`` sorted best first for ``1 < k <= 64``;
  with ``return_distances=True`` also fp32 squared distances (l2, clamped >= 0) or cosine
  similarities of the same shape.
- Ties go to the lowest code index.
- NaN: a NaN score ranks after every number. A query row containing NaN gets indices
  ``0, 1, ..., k-1`` and NaN distances; codes containing NaN are never chosen over a code with a
  finite score. Indices are always in ``[0, K)``.
- Memory: extra memory is O(N*k + K) (plus one bounded distance tile on CPU); no N x K matrix.

Backends: CUDA tensors run the Triton kernels (``kernels/codebook.py``): a ``tl.dot`` stream
keeping a few candidates per row (fp32 inputs: IEEE fp32 products; fp16/bf16: tensor cores with
fp32 accumulation), then an exact fp32 re-rank of the candidates in difference form. CPU tensors
run a chunked ``addmm`` + ``min``/``topk`` in fp32. Both agree with the reference except where the
best two fp32 distances are within rounding of each other (~1e-5 relative).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vtok_fast._backend import use_triton
from vtok_fast._checks import FLOAT_DTYPES, check_same_device, check_tensor

METRICS = ("l2", "cosine")
MAX_K = 64
COSINE_EPS = 1e-12  # F.normalize's default

# CPU distance tiles: rows * K_block fp32 scores per tile (16 MiB for k == 1; k > 1 also builds
# int64 sort keys, so its tile is smaller). Codes are processed in blocks of at most _CPU_K_BLOCK.
_CPU_TILE_ELEMS = 1 << 22
_CPU_TOPK_TILE_ELEMS = 1 << 20
_CPU_K_BLOCK = 1 << 16


# --- argument checks ---------------------------------------------------------------------------

def _check_search_args(x, codebook, metric, k):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES, shape_doc="2-D (K, D)")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., D), got a 0-d tensor")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    K, D = codebook.shape
    if K == 0:
        raise ValueError("codebook is empty: expected shape (K, D) with K >= 1, got K = 0")
    if D == 0 or x.shape[-1] != D:
        raise ValueError(
            f"x's last dimension must equal the codebook's D = {D} (and be >= 1), got x of shape "
            f"{tuple(x.shape)} and codebook of shape {tuple(codebook.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(K, MAX_K):
        raise ValueError(f"k must satisfy 1 <= k <= min(K, {MAX_K}) with K = {K}, got k = {k}")
    check_same_device(x=x, codebook=codebook)
    if x.dtype != codebook.dtype:
        common = torch.promote_types(x.dtype, codebook.dtype)
        x, codebook = x.to(common), codebook.to(common)
    return x, codebook


def _output_shape(lead, k):
    return tuple(lead) if k == 1 else (*lead, k)


# --- reference -----------------------------------------------------------------------------------

def codebook_search_reference(x, codebook, *, metric="l2", k=1, return_distances=False):
    """The contract written plainly: an fp32 N x K score matrix, a stable sort, the first k.

    Materializes N x K: for tests and benchmarks, not for large inputs.
    """
    x, codebook = _check_search_args(x, codebook, metric, k)
    lead, D = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, D).float()
    cf = codebook.float()
    if metric == "cosine":
        value = F.normalize(xf, dim=1, eps=COSINE_EPS) @ F.normalize(cf, dim=1, eps=COSINE_EPS).T
        score = -value
    else:
        value = (xf * xf).sum(1, keepdim=True) + (cf * cf).sum(1) - 2.0 * (xf @ cf.T)
        score = value
    score = torch.where(torch.isnan(score), torch.full_like(score, float("inf")), score)
    order = torch.sort(score, dim=1, stable=True).indices[:, :k]
    dist = value.gather(1, order)
    if metric == "l2":
        dist = dist.clamp_min(0.0)
    idx = order.reshape(_output_shape(lead, k))
    if return_distances:
        return idx, dist.reshape(_output_shape(lead, k))
    return idx


# --- PyTorch path (CPU): chunked addmm + min / topk ----------------------------------------------

def _float_order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys with the order of the fp32 ``scores`` (no NaN allowed; -0.0 == +0.0)."""
    bits = scores.view(torch.int32)
    return torch.where(bits < 0, (bits ^ 0x7FFFFFFF) + 1, bits)


def _keys_to_float(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys < 0, (keys - 1) ^ 0x7FFFFFFF, keys)
    return bits.view(torch.float32)


def _topk_keys(tile: torch.Tensor, col0: int, k: int) -> torch.Tensor:
    """Best k of a score tile as int64 keys ``(score order << 32) | code index``: unique keys make
    ``topk`` exact and ties go to the lowest index."""
    tile.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    keys = _float_order_keys(tile).to(torch.int64) << 32
    keys |= torch.arange(col0, col0 + tile.shape[1], device=tile.device)
    return torch.topk(keys, k, dim=1, largest=False, sorted=True).values


def _search_torch(x: torch.Tensor, codebook: torch.Tensor, metric: str, k: int):
    """(indices (N, k) int64, distances (N, k) fp32) with fp32 math, chunked in rows and codes."""
    N, D = x.shape
    K = codebook.shape[0]
    cf = codebook.float()
    if metric == "cosine":
        # scores = -(x . c_hat): the argmin of this is the argmax of the cosine similarity
        codes_t = (-F.normalize(cf, dim=1, eps=COSINE_EPS)).T
        bias = None
    else:
        codes_t = cf.T
        bias = (cf * cf).sum(1)
    k_block = min(K, _CPU_K_BLOCK)
    rows = max(1, min(N, (_CPU_TILE_ELEMS if k == 1 else _CPU_TOPK_TILE_ELEMS) // k_block))
    buf = torch.empty(rows * k_block, device=x.device, dtype=torch.float32)
    out_idx = torch.empty((N, k), device=x.device, dtype=torch.int64)
    out_val = torch.empty((N, k), device=x.device, dtype=torch.float32)
    for r0 in range(0, N, rows):
        xr = x[r0:r0 + rows].float()
        nr = xr.shape[0]
        best_v = best_i = best_keys = None
        for c0 in range(0, K, k_block):
            kb = min(k_block, K - c0)
            tile = buf[: nr * kb].view(nr, kb)
            if bias is None:
                torch.mm(xr, codes_t[:, c0:c0 + kb], out=tile)
            else:
                torch.addmm(bias[c0:c0 + kb], xr, codes_t[:, c0:c0 + kb], alpha=-2.0, out=tile)
            if k == 1:
                v, i = torch.min(tile, dim=1)
                if torch.isnan(v).any():  # torch.min propagates NaN; rank NaN last instead
                    tile.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
                    v, i = torch.min(tile, dim=1)
                i += c0
                if best_v is None:
                    best_v, best_i = v, i
                else:
                    better = v < best_v  # strict: the earlier (lower-index) block keeps ties
                    best_v = torch.where(better, v, best_v)
                    best_i = torch.where(better, i, best_i)
            else:
                keys = _topk_keys(tile, c0, min(k, kb))
                if best_keys is not None:
                    keys = torch.topk(torch.cat([best_keys, keys], 1), k, dim=1, largest=False).values
                best_keys = keys
        if k == 1:
            best_v, best_i = best_v[:, None], best_i[:, None]
        else:
            best_i = best_keys & 0xFFFFFFFF
            best_v = _keys_to_float((best_keys >> 32).to(torch.int32))
        if metric == "cosine":
            x_norm = xr.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
            dist = -best_v / x_norm
        else:
            dist = ((xr * xr).sum(1, keepdim=True) + best_v).clamp_min(0.0)  # NaN rows stay NaN
        out_idx[r0:r0 + nr] = best_i
        out_val[r0:r0 + nr] = dist
    return out_idx, out_val


# --- Triton path ---------------------------------------------------------------------------------

def _default_splits(N: int, K: int, device: torch.device) -> int:
    """Split the code range over a second grid axis when there are too few row blocks."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = -(-N // 128)
    if row_blocks >= 2 * sms:
        return 1
    want = (2 * sms) // max(row_blocks, 1)
    cap = max(1, min(16, K // 1024))
    splits = 1
    while splits * 2 <= min(want, cap):
        splits *= 2
    return splits


def _search_triton(x: torch.Tensor, codebook: torch.Tensor, metric: str, k: int, splits: int | None = None):
    import triton

    from vtok_fast.kernels import codebook as kc

    N, D = x.shape
    K = codebook.shape[0]
    out_idx = torch.empty((N, k), device=x.device, dtype=torch.int64)
    out_val = torch.empty((N, k), device=x.device, dtype=torch.float32)
    if N == 0:
        return out_idx, out_val
    sixteen_bit = x.dtype in (torch.float16, torch.bfloat16)
    cosine = metric == "cosine"
    cf = codebook.float()
    if cosine:
        search_codes = F.normalize(cf, dim=1, eps=COSINE_EPS).to(x.dtype)
        bias = torch.zeros(K, device=x.device, dtype=torch.float32)
    else:
        search_codes = codebook
        bias = (cf * cf).sum(1)
    del cf
    block_d, num_d = kc.block_d_for(D, sixteen_bit)
    r = 2 if k == 1 else triton.next_power_of_2(k)
    splits = _default_splits(N, K, x.device) if splits is None else splits
    codes_per_split = triton.cdiv(triton.cdiv(K, splits), kc.SPLIT_ALIGN) * kc.SPLIT_ALIGN
    grid_splits = triton.next_power_of_2(triton.cdiv(K, codes_per_split))
    cand = torch.empty((N, grid_splits * r), device=x.device, dtype=torch.int32)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), grid_splits)

    args = (cand, *cand.stride(), x, *x.stride(), search_codes, *search_codes.stride(), bias,
            -1.0 if cosine else -2.0, N, K, D, codes_per_split)
    consts = dict(IEEE=not sixteen_bit, BLOCK_D=block_d,
                  NUM_D=num_d, EVEN_D=block_d * num_d == D)
    if k == 1:
        kernel = kc.codebook_argmin_tc if sixteen_bit else kc.codebook_argmin_fp32
        kernel[grid](*args, **consts)
    else:
        kernel = kc.codebook_topk_tc if sixteen_bit else kc.codebook_topk_fp32
        kernel[grid](*args, R=r, **consts)

    total = grid_splits * r
    rerank_d = min(64, max(16, triton.next_power_of_2(D)))
    rerank_m = 1
    while rerank_m * 2 <= 64 and rerank_m * 2 * total * rerank_d <= 8192:
        rerank_m *= 2
    kc._codebook_rerank_fwd[(triton.cdiv(N, rerank_m),)](
        out_idx, *out_idx.stride(), out_val, *out_val.stride(), cand, *cand.stride(),
        x, *x.stride(), codebook, *codebook.stride(), N, K, D, k,
        COSINE=cosine, R=total, BLOCK_M=rerank_m, BLOCK_D=rerank_d, num_warps=4)
    return out_idx, out_val


# --- custom op, autograd, public function -----------------------------------------------------------

@torch.library.custom_op("vtok_fast::codebook_search", mutates_args=())
def _codebook_search_op(x: torch.Tensor, codebook: torch.Tensor, metric: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, codebook):
        return _search_triton(x, codebook, metric, k)
    return _search_torch(x, codebook, metric, k)


@_codebook_search_op.register_fake
def _codebook_search_fake(x, codebook, metric, k):
    n = x.shape[0]
    return x.new_empty((n, k), dtype=torch.int64), x.new_empty((n, k), dtype=torch.float32)


def _search_setup_context(ctx, inputs, output):
    x, codebook, metric, _ = inputs
    idx, dist = output
    ctx.metric = metric
    ctx.mark_non_differentiable(idx)
    ctx.save_for_backward(x, codebook, idx, dist if metric == "cosine" else None)


def _search_backward(ctx, grad_idx, grad_dist):
    """Gradients of the returned distances / similarities w.r.t. x and the chosen codes."""
    x, codebook, idx, sim = ctx.saved_tensors
    if grad_dist is None:
        return None, None, None, None
    xf = x.float()[:, None, :]                  # (N, 1, D)
    codes = codebook.float()[idx]               # (N, k, D)
    g = grad_dist.float()[..., None]            # (N, k, 1)
    if ctx.metric == "l2":
        diff = xf - codes
        gx_rows = 2.0 * g * diff
        gc_rows = -gx_rows
    else:
        x_norm = xf.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        c_norm = codes.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        xh, ch, s = xf / x_norm, codes / c_norm, sim.float()[..., None]
        gx_rows = g * (ch - s * xh) / x_norm
        gc_rows = g * (xh - s * ch) / c_norm
    gx = gc = None
    if ctx.needs_input_grad[0]:
        gx = gx_rows.sum(1).to(x.dtype)
    if ctx.needs_input_grad[1]:
        gc = torch.zeros(codebook.shape, device=codebook.device, dtype=torch.float32)
        gc.index_add_(0, idx.reshape(-1), gc_rows.reshape(-1, codebook.shape[1]))
        gc = gc.to(codebook.dtype)
    return gx, gc, None, None


_codebook_search_op.register_autograd(_search_backward, setup_context=_search_setup_context)


def codebook_search(x, codebook, *, metric="l2", k=1, return_distances=False):
    """Nearest codes of ``x`` ``(..., D)`` in ``codebook`` ``(K, D)`` (see the module docstring).

    Returns int64 indices ``(...)`` (``(..., k)`` for ``k > 1``, best first) and, with
    ``return_distances``, fp32 squared distances (``metric="l2"``) or cosine similarities
    (``metric="cosine"``) of the same shape. Distances are differentiable w.r.t. ``x`` and
    ``codebook``.
    """
    x, codebook = _check_search_args(x, codebook, metric, k)
    lead, D = x.shape[:-1], x.shape[-1]
    idx, dist = _codebook_search_op(x.reshape(-1, D), codebook, metric, k)
    shape = _output_shape(lead, k)
    idx = idx.reshape(shape)
    if return_distances:
        return idx, dist.reshape(shape)
    return idx
