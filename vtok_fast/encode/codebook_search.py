"""Nearest-codebook search: ``codebook_search`` and its pure-PyTorch reference.

Contract (``x`` ``(..., D)``, ``codebook`` ``(K, D)``; fp32, fp16 or bf16; mixed dtypes promote):

- ``metric="l2"``: the index minimizes the fp32 squared distance ``||x - c||^2``;
  ``metric="cosine"``: inputs and codes are l2-normalized (``F.normalize``) and the index
  maximizes their dot product.
- Returns int64 indices ``(...)`` for ``k == 1``, ``(..., k)`` sorted best first for ``1 < k <= 64``;
  with ``return_distances=True`` also fp32 squared distances (l2, clamped >= 0) or cosine
  similarities of the same shape.
- Ties (equal scores) go to the lowest code index; codes that are exact copies of each other
  always resolve to the lowest indices, whatever the BLAS rounds.
- Non-finite values. A query row containing NaN or +-inf gets indices ``0, 1, ..., k-1`` and NaN
  distances. A code containing NaN or +-inf ranks after every finite code (among themselves:
  lowest index first) and gets a NaN distance when it is returned (only when fewer than k codes
  are finite). Indices are always in ``[0, K)``.
- Huge finite values do not overflow: a finite row (or code) whose fp32 squared norm exceeds
  ``SAFE_SQ_NORM`` = 2**125 (entries around 1e18 and up) is searched in float64 (every finite row
  is, when the codebook has such a code), so it gets its true nearest codes; its l2 distance is
  the float64 value rounded to fp32 (``inf`` beyond the fp32 range). Below that bound every fp32
  score of the fast paths is finite (``|x.c| <= sqrt(xx * cc) <= 2**125``).
- Memory: extra memory is O(N*k + K) (plus bounded tiles and a codebook-sized copy); no N x K
  matrix.

Backends: CUDA tensors run the Triton kernels (``kernels/codebook_search.py``): a ``tl.dot`` stream
keeping a few candidates per row (fp32 inputs: IEEE fp32 products; fp16/bf16: tensor cores with
fp32 accumulation), then an exact fp32 re-rank of the candidates in difference form. CPU tensors
run a chunked GEMM + ``argmin``/``topk`` in fp32, the GEMM by torch's MKL or by the oneDNN
inside torch, whichever a one-time measurement per process and tile shape class finds faster
(MKL takes a slow path on AMD CPUs). Both agree with the reference except where the
best two fp32 distances are within rounding of each other (~1e-5 relative). The non-finite and
huge-value rules are applied after the fast search, to the few rows that need them, behind one
cheap check (a single host sync on CUDA).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from vtok_fast import _cpu_gemm as cpu_gemm
from vtok_fast._backend import use_triton
from vtok_fast._checks import FLOAT_DTYPES, check_dense, check_same_device, check_tensor
from vtok_fast._launch import cdiv, sm_count, strides, tile_grid
from vtok_fast._op import define_op

METRICS = ("l2", "cosine")
MAX_K = 64
COSINE_EPS = 1e-12  # F.normalize's default
# fp32 squared norms up to this keep every fp32 score (and ||x||^2 + score) below 2**127:
# |cc - 2 x.c| <= cc + 2 sqrt(xx * cc) <= 3 * 2**125. Rows/codes above it are searched in float64.
SAFE_SQ_NORM = 2.0 ** 125

# CPU distance tiles: rows * K_block fp32 scores per tile (4 MiB for k == 1; k > 1 also builds
# int64 sort keys). Codes are processed in blocks of at most _CPU_K_BLOCK (k > 1) or
# _CPU_ARGMIN_K_BLOCK (k == 1), so a k == 1 tile is 1024 x 1024 at most: measured on Zen 4, both
# GEMMs run it 10-20 % faster than a 4096 x 1024 tile (it stays in cache for the argmin).
_CPU_TILE_ELEMS = 1 << 20
_CPU_TOPK_TILE_ELEMS = 1 << 20
_CPU_K_BLOCK = 1 << 16
_CPU_ARGMIN_K_BLOCK = 1 << 10
# CPU GEMM provider ("torch" or "onednn") per tile shape class, measured once per process.
# Tiles under _GEMM_MEASURE_FLOP (about 0.1 ms) always use torch: call overhead dominates there.
_GEMM_CHOICE: dict[tuple, str] = {}
_GEMM_MEASURE_FLOP = 1 << 24
_MEASURE_WARMUP, _MEASURE_RUNS = 3, 6
_GEMM_FORCE: str | None = None  # tests: force one provider


# --- argument checks ---------------------------------------------------------------------------

def _check_search_args(x, codebook, metric, k):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES, shape_doc="2-D (K, D)")
    check_dense("x", x)
    check_dense("codebook", codebook)
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


def _check_return_distances(return_distances):
    if not isinstance(return_distances, bool):
        raise TypeError(f"return_distances must be a bool, got {type(return_distances).__name__}")


def _output_shape(lead, k):
    return tuple(lead) if k == 1 else (*lead, k)


# --- reference -----------------------------------------------------------------------------------

def codebook_search_reference(x, codebook, *, metric="l2", k=1, return_distances=False):
    """The contract written plainly: an N x K score matrix (fp32, or float64 for the rows the
    huge-value rule names), non-finite rows and codes masked, a stable sort, the first k.

    Materializes N x K: for tests and benchmarks, not for large inputs.
    """
    x, codebook = _check_search_args(x, codebook, metric, k)
    _check_return_distances(return_distances)
    lead, D = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, D).float()
    cf = codebook.float()
    x64, c64 = xf.double(), cf.double()
    if metric == "cosine":
        value32 = F.normalize(xf, dim=1, eps=COSINE_EPS) @ F.normalize(cf, dim=1, eps=COSINE_EPS).T
        value64 = F.normalize(x64, dim=1, eps=COSINE_EPS) @ F.normalize(c64, dim=1, eps=COSINE_EPS).T
        score32, score64 = -value32, -value64
    else:
        value32 = (xf * xf).sum(1, keepdim=True) + (cf * cf).sum(1) - 2.0 * (xf @ cf.T)
        value64 = torch.cdist(x64, c64, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        # float64 ranks by ||c||^2 - 2 x.c: adding ||x||^2 would swamp a huge row's resolution
        score32, score64 = value32, (c64 * c64).sum(1) - 2.0 * (x64 @ c64.T)
    row_finite, code_finite = torch.isfinite(xf).all(1), torch.isfinite(cf).all(1)
    exact = row_finite & ~((xf * xf).sum(1) <= SAFE_SQ_NORM)
    if bool((code_finite & ~((cf * cf).sum(1) <= SAFE_SQ_NORM)).any()):
        exact = row_finite
    value = torch.where(exact[:, None], value64, value32.double())
    score = torch.where(exact[:, None], score64, score32.double())
    score = score.masked_fill(~(row_finite[:, None] & code_finite), float("inf"))
    order = torch.sort(score, dim=1, stable=True).indices[:, :k]
    dist = value.gather(1, order).float()
    dist = dist.masked_fill(~code_finite[order] | ~row_finite[:, None], float("nan"))
    if metric == "l2":
        dist = dist.clamp_min(0.0)  # NaN stays NaN
    idx = order.reshape(_output_shape(lead, k))
    if return_distances:
        return idx, dist.reshape(_output_shape(lead, k))
    return idx


# --- non-finite and huge values (both paths, after the fast search) ----------------------------

def _apply_value_rules(x, codebook, metric, k, idx, val, row_sq, code_sq):
    """Make ``idx``/``val`` of the fast search follow the non-finite and huge-value rules.

    ``row_sq``/``code_sq``: fp32 squared norms of the rows and codes, which the fast paths
    compute anyway; NaN, inf and huge entries all fail ``<= SAFE_SQ_NORM``, so one check (one
    host sync) covers the common case where nothing needs fixing."""
    if bool(((row_sq <= SAFE_SQ_NORM).all() & (code_sq <= SAFE_SQ_NORM).all()).item()):
        return idx, val
    K = codebook.shape[0]
    row_finite = torch.isfinite(x).all(1)
    code_finite = torch.isfinite(codebook).all(1)
    exact = row_finite & ~(row_sq <= SAFE_SQ_NORM)
    if bool((code_finite & ~(code_sq <= SAFE_SQ_NORM)).any()):
        exact = row_finite
    bad_codes = (~code_finite).nonzero().squeeze(1)
    finite_codes = K - bad_codes.numel()
    if finite_codes < k:  # every row returns all finite codes, then the lowest non-finite ones
        idx[:, finite_codes:] = bad_codes[:k - finite_codes]
    rows = exact.nonzero().squeeze(1)
    if rows.numel():
        idx[rows], val[rows] = _search_float64(x[rows], codebook, metric, k, code_finite)
    val.masked_fill_(~code_finite[idx], float("nan"))
    idx[~row_finite] = torch.arange(k, device=idx.device)
    val[~row_finite] = float("nan")
    return idx, val


def _search_float64(x, codebook, metric, k, code_finite):
    """The search in float64 (no fp32 overflow for finite values), chunked in rows and codes;
    non-finite codes rank last; l2 distances in difference form."""
    n, D = x.shape
    K = codebook.shape[0]
    cosine = metric == "cosine"
    kb = min(K, max(k, _CPU_TOPK_TILE_ELEMS // D))
    rows = max(1, _CPU_TOPK_TILE_ELEMS // max(kb + k, D))
    out_idx = torch.empty((n, k), device=x.device, dtype=torch.int64)
    out_val = torch.empty((n, k), device=x.device, dtype=torch.float32)
    for r0 in range(0, n, rows):
        xr = x[r0:r0 + rows].double()
        xs = F.normalize(xr, dim=1, eps=COSINE_EPS) if cosine else xr
        best_s = best_i = None
        for c0 in range(0, K, kb):
            c = codebook[c0:c0 + kb].double()
            if cosine:
                s = -(xs @ F.normalize(c, dim=1, eps=COSINE_EPS).T)
            else:
                s = (c * c).sum(1) - 2.0 * (xs @ c.T)  # ||x||^2 is the same for every code
            s.masked_fill_(~code_finite[c0:c0 + kb], float("inf"))
            i = torch.arange(c0, c0 + c.shape[0], device=x.device).expand_as(s)
            if best_s is not None:  # earlier (lower) codes first: the stable sort keeps ties low
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
            order = torch.sort(s, dim=1, stable=True).indices[:, :k]
            best_s, best_i = s.gather(1, order), i.gather(1, order)
        out_idx[r0:r0 + rows] = best_i
        if cosine:
            out_val[r0:r0 + rows] = -best_s
        else:
            for j in range(k):
                out_val[r0:r0 + rows, j] = ((xr - codebook[best_i[:, j]].double()) ** 2).sum(1)
    return out_idx, out_val


# --- exact duplicate codes (CPU path) -------------------------------------------------------------

def _duplicate_firsts(codes: torch.Tensor) -> torch.Tensor | None:
    """(K,) int64 ``first``: the lowest index of a code equal to each code (-0.0 == +0.0), or None
    when all codes differ. An exact integer hash of the bits of up to 32 evenly spread columns
    (order-independent, so equal rows hash equally) finds the candidates; ``torch.unique`` on
    the candidates' full rows confirms them."""
    K, D = codes.shape
    if K < 2:
        return None
    cols = torch.arange(0, D, max(1, D // 32), device=codes.device)[:32]
    bits = (codes[:, cols] + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> +0.0
    gen = torch.Generator().manual_seed(0x5EED)
    mult = torch.randint(1, 2**31, (2, len(cols)), generator=gen, dtype=torch.int64).to(codes.device)
    h = ((bits >> 16) * mult[0] + (bits & 0xFFFF) * mult[1]).sum(1)  # < 64 * 2**47: no overflow
    sh, order = torch.sort(h)
    same = sh[1:] == sh[:-1]
    if not bool(same.any()):
        return None
    involved = torch.zeros(K, dtype=torch.bool, device=codes.device)
    involved[1:] |= same
    involved[:-1] |= same
    cand = order[involved]
    _, group = torch.unique(codes[cand] + 0.0, dim=0, return_inverse=True)
    low = torch.full((int(group.max()) + 1,), K, device=codes.device).scatter_reduce(0, group, cand, "amin")
    first = torch.arange(K, device=codes.device)
    first[cand] = low[group]
    return first if bool((first[cand] != cand).any()) else None


def _lowest_duplicates(idx: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Each row's entries from one duplicate group take that group's lowest indices, ascending
    (the group's codes have equal distances, so this is the tie rule, whatever the GEMM rounded)."""
    k = idx.shape[1]
    if k == 1:
        return first[idx]
    K = first.numel()
    codes = torch.arange(K, device=idx.device)
    by_group = torch.argsort(first * K + codes)  # groups contiguous, members ascending
    pos = torch.empty_like(by_group)
    pos[by_group] = codes  # a group's slot run starts at its lowest member's slot
    earlier = torch.ones(k, k, dtype=torch.bool, device=idx.device).tril(-1)
    out = torch.empty_like(idx)
    step = max(1, _CPU_TOPK_TILE_ELEMS // (k * k))
    for r0 in range(0, idx.shape[0], step):
        gid = first[idx[r0:r0 + step]]
        rank = ((gid[:, :, None] == gid[:, None, :]) & earlier).sum(2)
        out[r0:r0 + step] = by_group[pos[gid] + rank]
    return out


# --- PyTorch path (CPU): chunked GEMM + min / topk -----------------------------------------------

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


class _TileSearch:
    """One call's score tiles and their per-row reduction. Each tile's GEMM is torch's
    (``addmm``, MKL on x86) or oneDNN's (``mkldnn._linear_pointwise`` on prepacked code blocks,
    the bias fused), whichever was measured faster for the tile's shape class: MKL takes a slower
    path on AMD CPUs, oneDNN does not. Both run on torch's OpenMP threads; a second thread pool
    (numpy's OpenBLAS) was tried and dropped: its threads spin after each GEMM and slow torch's
    next parallel region (measured: 0.3 ms -> 4 ms). k == 1 tiles are reduced by numpy's argmin,
    single-threaded SIMD and 5x ``torch.min(dim=1)`` on a tile."""

    def __init__(self, codes: torch.Tensor, bias: torch.Tensor | None, rows: int, k_block: int, k: int):
        self.codes, self.bias, self.rows, self.k_block, self.k = codes, bias, rows, k_block, k
        self.cpu = codes.device.type == "cpu"
        self.onednn_ok = self.cpu and cpu_gemm.ONEDNN
        self._packed: dict[int, tuple] = {}  # code block start -> (oneDNN weights, bias)
        self._buf = None  # torch's GEMM output tile (oneDNN returns its own)
        self.xr = None

    def set_row_tile(self, xr: torch.Tensor) -> None:
        """The row tile that the following calls score (against code blocks)."""
        self.xr = xr

    def _reduce(self, scores, c0, kb):
        if self.k > 1:
            return _topk_keys(scores, c0, min(self.k, kb))
        if self.cpu:
            return self._argmin(scores.numpy(), c0)
        v, i = torch.min(scores, dim=1)
        if torch.isnan(v).any():  # torch.min propagates NaN; rank NaN last instead
            scores.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
            v, i = torch.min(scores, dim=1)
        return v, i + c0

    def _torch(self, c0, kb):
        if self._buf is None:
            self._buf = torch.empty(self.rows * self.k_block, device=self.codes.device, dtype=torch.float32)
        nr = self.xr.shape[0]
        tile = self._buf[: nr * kb].view(nr, kb)
        codes_t = self.codes[c0:c0 + kb].T
        if self.bias is None:
            torch.mm(self.xr, codes_t, out=tile)
        else:
            torch.addmm(self.bias[c0:c0 + kb], self.xr, codes_t, alpha=-2.0, out=tile)
        return self._reduce(tile, c0, kb)

    def _onednn(self, c0, kb):
        block = self._packed.get(c0)
        if block is None:  # packed on first use: the call holds one codebook-sized copy
            w = self.codes[c0:c0 + kb].detach()
            bias = None
            if self.bias is not None:  # x . (-2c) + ||c||^2; the factor -2 is exact in fp32
                w, bias = w * -2.0, self.bias[c0:c0 + kb].detach()
            block = (torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), self.rows), bias)
            self._packed[c0] = block
        scores = torch.ops.mkldnn._linear_pointwise(self.xr.detach(), block[0], block[1], "none", [], "")
        return self._reduce(scores, c0, kb)

    @staticmethod
    def _argmin(t: np.ndarray, c0: int):
        """Each row's lowest score and its code index (+ ``c0``), NaN ranked last."""
        i = t.argmin(1)
        v = np.take_along_axis(t, i[:, None], 1)[:, 0]
        if np.isnan(v).any():  # NaN wins argmin; rank NaN last instead
            np.nan_to_num(t, copy=False, nan=np.inf, posinf=np.inf, neginf=-np.inf)
            i = t.argmin(1)
            v = np.take_along_axis(t, i[:, None], 1)[:, 0]
        return torch.from_numpy(v), torch.from_numpy(i) + c0

    def __call__(self, c0, kb):
        """The row tile's reduction over codes ``[c0, c0 + kb)``: ``(best score, code index)``
        for k == 1, else the best sort keys."""
        nr, D = self.xr.shape
        key = (self.bias is not None, self.k > 1, nr.bit_length(), kb.bit_length(), D.bit_length())
        if not self.onednn_ok:
            choice = "torch"
        elif _GEMM_FORCE:
            choice = _GEMM_FORCE
        elif 2 * nr * kb * D < _GEMM_MEASURE_FLOP:
            choice = "torch"
        else:
            choice = _GEMM_CHOICE.get(key)
            if choice is None:
                return self._measure(key, c0, kb)
        return self._onednn(c0, kb) if choice == "onednn" else self._torch(c0, kb)

    def _measure(self, key, c0, kb):
        """Time both providers' whole tile step, alternating, keep the faster one for the shape
        class and return its result. Each runs _MEASURE_WARMUP untimed steps first (oneDNN's
        first calls pack the codes and build its kernel: measured 2x slower) and then
        _MEASURE_RUNS timed ones, of which the fastest counts (the machine's speed drifts)."""
        runs = {"torch": self._torch, "onednn": self._onednn}
        best = dict.fromkeys(runs, float("inf"))
        out = {}
        for step in range(_MEASURE_WARMUP + _MEASURE_RUNS):
            for name, run in runs.items():
                t0 = time.perf_counter()
                out[name] = run(c0, kb)
                if step >= _MEASURE_WARMUP:
                    best[name] = min(best[name], time.perf_counter() - t0)
        choice = "onednn" if best["onednn"] < best["torch"] else "torch"
        _GEMM_CHOICE[key] = choice
        return out[choice]  # fresh tensors, not views of the shared tile


def cpu_gemm_choices() -> dict[str, str]:
    """The CPU provider measured for each tile shape class so far in this process
    (``"l2|cosine k=1|k>1 rows~R codes~C D~E"`` -> ``"torch"`` | ``"onednn"``; powers of two)."""
    return {f"{'l2' if l2 else 'cosine'} k{'>' if topk else '='}1 rows~{1 << (r - 1)} "
            f"codes~{1 << (c - 1)} D~{1 << (d - 1)}": v
            for (l2, topk, r, c, d), v in _GEMM_CHOICE.items()}


def _row_sq(xr: torch.Tensor) -> torch.Tensor:
    """fp32 ``||x||^2`` per row; on the CPU by numpy's einsum (no tile-sized temporary)."""
    if xr.device.type == "cpu":
        a = xr.detach().numpy()
        return torch.from_numpy(np.einsum("ij,ij->i", a, a))
    return (xr * xr).sum(1)


def _search_torch(x: torch.Tensor, codebook: torch.Tensor, metric: str, k: int):
    """(indices (N, k) int64, distances (N, k) fp32) with fp32 math, chunked in rows and codes."""
    N, D = x.shape
    K = codebook.shape[0]
    cf = codebook.float()
    code_sq = (cf * cf).sum(1)
    first = _duplicate_firsts(cf)
    cosine = metric == "cosine"
    k_block = min(K, _CPU_ARGMIN_K_BLOCK if k == 1 else _CPU_K_BLOCK)
    rows = max(1, min(N, (_CPU_TILE_ELEMS if k == 1 else _CPU_TOPK_TILE_ELEMS) // max(k_block, D + 1)))
    if cosine:  # scores = -(x . c_hat): the argmin of this is the argmax of the cosine similarity
        search = _TileSearch(-F.normalize(cf, dim=1, eps=COSINE_EPS), None, rows, k_block, k)
    else:
        search = _TileSearch(cf, code_sq, rows, k_block, k)
    out_idx = torch.empty((N, k), device=x.device, dtype=torch.int64)
    out_val = torch.empty((N, k), device=x.device, dtype=torch.float32)
    row_sq = torch.empty(N, device=x.device, dtype=torch.float32)
    for r0 in range(0, N, rows):
        xr = x[r0:r0 + rows].float()
        nr = xr.shape[0]
        search.set_row_tile(xr)
        best_v = best_i = best_keys = None
        for c0 in range(0, K, k_block):
            kb = min(k_block, K - c0)
            found = search(c0, kb)
            if k > 1:
                if best_keys is not None:
                    found = torch.topk(torch.cat([best_keys, found], 1), k, dim=1, largest=False).values
                best_keys = found
            elif best_v is None:
                best_v, best_i = found
            else:
                better = found[0] < best_v  # strict: the earlier (lower-index) block keeps ties
                best_v = torch.where(better, found[0], best_v)
                best_i = torch.where(better, found[1], best_i)
        if k == 1:
            best_v, best_i = best_v[:, None], best_i[:, None]
        else:
            best_i = best_keys & 0xFFFFFFFF
            best_v = _keys_to_float((best_keys >> 32).to(torch.int32))
        xx = _row_sq(xr)
        row_sq[r0:r0 + nr] = xx
        if cosine:
            dist = -best_v / xx.sqrt().clamp_min(COSINE_EPS)[:, None]
        else:
            dist = (xx[:, None] + best_v).clamp_min(0.0)
        out_idx[r0:r0 + nr] = best_i
        out_val[r0:r0 + nr] = dist
    out_idx, out_val = _apply_value_rules(x, codebook, metric, k, out_idx, out_val, row_sq, code_sq)
    if first is not None:
        out_idx = _lowest_duplicates(out_idx, first)
    return out_idx, out_val


# --- Triton path ---------------------------------------------------------------------------------

def _default_splits(N: int, K: int, device: torch.device) -> int:
    """Split the code range over a second grid axis when there are too few row blocks."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    row_blocks = cdiv(N, 128)
    if row_blocks >= 2 * sms:
        return 1
    want = (2 * sms) // max(row_blocks, 1)
    cap = max(1, min(16, K // 1024))
    splits = 1
    while splits * 2 <= min(want, cap):
        splits *= 2
    return splits


def _block_d_for(D: int, sixteen_bit: bool) -> tuple[int, int]:
    """(BLOCK_D, NUM_D) of the stage-1 kernels for a feature size D: one tile up to the kernel's
    single-tile cap (fp16/bf16), else chunks; tiny D padded (masked loads) to the dot's minimum."""
    import triton

    from vtok_fast.kernels import codebook_search as kc

    pad = max(kc.MIN_BLOCK_D, triton.next_power_of_2(D))
    if sixteen_bit:
        if pad <= kc.MAX_SINGLE_BLOCK_D:
            return pad, 1
        return kc.LOOP_BLOCK_D, cdiv(D, kc.LOOP_BLOCK_D)
    block = min(pad, kc.FP32_BLOCK_D)
    return block, cdiv(D, block)


def _rerank_blocks(D: int, candidates: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the re-rank: D chunks of 16 to 64, and as many rows (up to 64) as
    keep a chunk of every row's candidates within 8192 elements."""
    import triton

    from vtok_fast.kernels import codebook_search as kc

    block_d = min(64, max(kc.MIN_BLOCK_D, triton.next_power_of_2(D)))
    block_m = 1
    while block_m * 2 <= 64 and block_m * 2 * candidates * block_d <= 8192:
        block_m *= 2
    return block_m, block_d


def _search_triton(x: torch.Tensor, codebook: torch.Tensor, metric: str, k: int, splits: int | None = None):
    import triton

    from vtok_fast.kernels import codebook_search as kc

    N, D = x.shape
    K = codebook.shape[0]
    out_idx = torch.empty((N, k), device=x.device, dtype=torch.int64)
    out_val = torch.empty((N, k), device=x.device, dtype=torch.float32)
    if N == 0:
        return out_idx, out_val
    sixteen_bit = x.dtype in (torch.float16, torch.bfloat16)
    cosine = metric == "cosine"
    cf = codebook.float()
    code_sq = (cf * cf).sum(1)
    if cosine:
        search_codes = F.normalize(cf, dim=1, eps=COSINE_EPS).to(x.dtype)
        bias = torch.zeros(K, device=x.device, dtype=torch.float32)
    else:
        search_codes = codebook
        bias = code_sq
    del cf
    block_d, num_d = _block_d_for(D, sixteen_bit)
    r = 2 if k == 1 else triton.next_power_of_2(k)
    splits = _default_splits(N, K, x.device) if splits is None else splits
    codes_per_split = cdiv(cdiv(K, splits), kc.SPLIT_ALIGN) * kc.SPLIT_ALIGN
    grid_splits = triton.next_power_of_2(cdiv(K, codes_per_split))
    cand = torch.empty((N, grid_splits * r), device=x.device, dtype=torch.int32)
    args = dict(cand_ptr=cand, **strides(cand, "c", "ns"), x_ptr=x, **strides(x, "x", "nd"),
                c_ptr=search_codes, **strides(search_codes, "c", "kd"), bias_ptr=bias,
                scale=-1.0 if cosine else -2.0, N=N, K=K, D=D, codes_per_split=codes_per_split,
                IEEE=not sixteen_bit, BLOCK_D=block_d, NUM_D=num_d, EVEN_D=block_d * num_d == D)
    if k == 1:
        kernel = kc.codebook_argmin_tc if sixteen_bit else kc.codebook_argmin_fp32
    else:
        kernel = kc.codebook_topk_tc if sixteen_bit else kc.codebook_topk_fp32
        args["R"] = r
    kernel[tile_grid(N, more=(grid_splits,))](**args)

    total = grid_splits * r
    rerank_m, rerank_d = _rerank_blocks(D, total)
    row_sq = torch.empty(N, device=x.device, dtype=torch.float32)
    kc.codebook_rerank_fwd[tile_grid(N)](
        idx_ptr=out_idx, **strides(out_idx, "i", "nk"), dist_ptr=out_val, **strides(out_val, "d", "nk"),
        xx_ptr=row_sq, cand_ptr=cand, **strides(cand, "c", "nr"), x_ptr=x, **strides(x, "x", "nd"),
        c_ptr=codebook, **strides(codebook, "c", "kd"), N=N, K=K, D=D, k_out=k,
        COSINE=cosine, R=total, BLOCK_M=rerank_m, BLOCK_D=rerank_d, num_warps=4)
    return _apply_value_rules(x, codebook, metric, k, out_idx, out_val, row_sq, code_sq)


# --- custom op, autograd, public function -----------------------------------------------------------

def _codebook_search_impl(x: torch.Tensor, codebook: torch.Tensor, metric: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, codebook):
        return _search_triton(x, codebook, metric, k)
    return _search_torch(x, codebook, metric, k)


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


_codebook_search_op = define_op("codebook_search", _codebook_search_impl, fake=_codebook_search_fake,
                                setup_context=_search_setup_context, backward=_search_backward)


def codebook_search(x, codebook, *, metric="l2", k=1, return_distances=False):
    """Nearest codes of ``x`` ``(..., D)`` in ``codebook`` ``(K, D)`` (see the module docstring).

    Returns int64 indices ``(...)`` (``(..., k)`` for ``k > 1``, best first) and, with
    ``return_distances``, fp32 squared distances (``metric="l2"``) or cosine similarities
    (``metric="cosine"``) of the same shape. Distances are differentiable w.r.t. ``x`` and
    ``codebook``.
    """
    x, codebook = _check_search_args(x, codebook, metric, k)
    _check_return_distances(return_distances)
    lead, D = x.shape[:-1], x.shape[-1]
    idx, dist = _codebook_search_op(x.reshape(-1, D), codebook, metric, k)
    shape = _output_shape(lead, k)
    idx = idx.reshape(shape)
    if return_distances:
        return idx, dist.reshape(shape)
    return idx
