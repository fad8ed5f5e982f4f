"""Triton kernels of the fused window merger + projection (host code:
``vtok_fast/project/merge_project.py``).

The merged row ``m`` of image ``b`` concatenates the ``S*S`` tokens of one window of the
``(H, W)`` token grid (window position ``q`` first, channel ``c`` second: column ``q*C + c``);
``_window_token`` says which sequence index window position ``q`` reads, for each ``ORDER``:

- ``"swin"``: column-major inside the window, (0,0), (1,0), (0,1), (1,1) (timm's PatchMerging);
- ``"row_major"``: (0,0), (0,1), (1,0), (1,1) (InternVL's pixel shuffle);
- ``"contiguous"``: the windows are already consecutive tokens (Qwen2-VL's processor order).

``POOL`` replaces the concatenation by the mean of the window's ``S*S`` tokens (Gemma 3's,
Phi-4's ``AvgPool2d``): the merged row has ``C`` columns. The weight is addressed by window
position and channel separately (``stride_wq``, ``stride_wc``), so a weight flattened channel
first (a Conv2d's ``(D, C, S, S)``, ``F.unfold``'s order) is read in place.

Neither the gathered nor the normalized ``(M, S*S*C)`` matrix is ever written:

- ``_merge_project_stats``: per-row (``post`` concat: over ``S*S*C``) or per-token (``pre``
  concat: over ``C``) mean and 1/std in fp32, one read of the tokens (chunked Chan/Welford
  merge of block means and squared deviations; RMS norm: mean 0, mean of squares);
- ``_merge_project_fwd``: a GEMM whose A tile is gathered from the token grid, normalized on the
  load (``(x - mean) * rstd * (g + G_OFFSET) + beta`` in fp32, ``G_OFFSET = 1``: Gemma's
  ``1 + w``; then cast to the weight dtype), multiplied with fp32 accumulation; the epilogue adds
  the bias, optionally stores the pre-activation (for the backward) and applies the activation.
  ``HAS_GATE`` (a GLU): a second accumulator multiplies the same A tile with the gate weight, and
  the epilogue returns ``activation(gate) * up`` (SwiGLU with ``"silu"``).
"""
import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune
from vtok_fast.kernels._tiles import GEMM_CONFIGS, dot_acc, gemm_shared_memory, grouped_tile

# Statistics pre-pass: BLOCK_M merged rows per program, BLOCK_C channels per step.
STATS_BLOCK_M = 16
STATS_BLOCK_C = 128
STATS_NUM_WARPS = 4

# BLOCK_M merged rows x BLOCK_N output columns (D), BLOCK_K channels of one window position per
# step (the shared GEMM list).
FWD_CONFIGS = GEMM_CONFIGS
# GLU (two accumulators): at most 128 x 128 fp32 accumulators each, so the registers hold both.
GLU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]


def fwd_shared_memory(config, args, arch: int) -> int:
    """``shared_memory`` of the forward: gathered tokens (A: normalized, pooled or cast in
    registers unless they are already weight-dtype values) times the weight (B; the gate weight
    too with a GLU)."""
    x, w = args["x_ptr"], args["w_ptr"]
    return gemm_shared_memory(
        config, arch, x.element_size(), w.element_size(),
        a_in_registers=args["NORM"] != "none" or args["POOL"] or x.dtype != w.dtype,
        tensor_cores=w.element_size() < 4 or args["ALLOW_TF32"], b_tiles=2 if args["HAS_GATE"] else 1)


@triton.jit
def _window_token(r, q, P, W, WS, S: tl.constexpr, ORDER: tl.constexpr):
    """Sequence index of window position ``q`` of merged token ``r`` (row-major over the
    ``(H/S, W/S)`` merged grid of width ``WS``); ``P`` prefix tokens come first."""
    if ORDER == "contiguous":
        return P + r * (S * S) + q
    if ORDER == "swin":
        dh = q % S
        dw = q // S
    else:  # row_major
        dh = q // S
        dw = q % S
    return P + ((r // WS) * S + dh) * W + (r % WS) * S + dw


@triton.jit
def _pooled_tile(x_ptr, b, r, cs, mask, stride_xb, stride_xl, stride_xc, P, W, WS,
                 S: tl.constexpr, ORDER: tl.constexpr):
    """fp32 mean of the ``S*S`` tokens of each window at channels ``cs`` (``mask``'s shape)."""
    a = tl.zeros(mask.shape, dtype=tl.float32)
    for q in range(S * S):
        row_off = b * stride_xb + _window_token(r, q, P, W, WS, S, ORDER) * stride_xl
        a += tl.load(x_ptr + row_off[:, None] + cs[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    return a * (1.0 / (S * S))


@triton.jit
def _accumulate_stats(x, mask, n_left, mean, m2, count, RMS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fold one fp32 block ``x`` (``n_left`` valid channels from its start) into the running
    (mean, sum of squared deviations, count); RMS: mean stays 0, ``m2`` sums squares."""
    n_blk = tl.minimum(n_left, BLOCK_C).to(tl.float32)
    if RMS:
        m2 += tl.sum(x * x, axis=1)
        count += n_blk
    else:
        blk_mean = tl.sum(x, axis=1) / n_blk
        d = tl.where(mask, x - blk_mean[:, None], 0.0)
        total = count + n_blk
        delta = blk_mean - mean
        mean += delta * (n_blk / total)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n_blk / total)
        count = total
    return mean, m2, count


@triton.jit
def _merge_project_stats(
    mean_ptr, rstd_ptr,                        # (M, G) fp32; G = S*S (PER_TOKEN) or 1
    x_ptr, stride_xb, stride_xl, stride_xc,    # (B, L, C) tokens
    M, R, C, P, W, WS, eps,                    # R merged rows per image, M = B * R
    S: tl.constexpr, ORDER: tl.constexpr, PER_TOKEN: tl.constexpr, RMS: tl.constexpr,
    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < M
    b = rows // R
    r = rows % R
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum of squared deviations (RMS: of squares)
    count = 0.0
    if POOL:  # statistics of the pooled rows (over C)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            mask = row_in[:, None] & (cs < C)[None, :]
            x = _pooled_tile(x_ptr, b, r, cs, mask, stride_xb, stride_xl, stride_xc, P, W, WS, S, ORDER)
            mean, m2, count = _accumulate_stats(x, mask, C - c0, mean, m2, count, RMS, BLOCK_C)
    else:
        for q in range(S * S):
            if PER_TOKEN:
                mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
                m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
                count = 0.0
            row_off = b * stride_xb + _window_token(r, q, P, W, WS, S, ORDER) * stride_xl
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                mask = row_in[:, None] & (cs < C)[None, :]
                x = tl.load(x_ptr + row_off[:, None] + cs[None, :] * stride_xc, mask=mask, other=0.0)
                mean, m2, count = _accumulate_stats(x.to(tl.float32), mask, C - c0, mean, m2, count,
                                                    RMS, BLOCK_C)
            if PER_TOKEN:
                tl.store(mean_ptr + rows * (S * S) + q, mean, mask=row_in)
                tl.store(rstd_ptr + rows * (S * S) + q, 1.0 / tl.sqrt(m2 / count + eps), mask=row_in)
    if not PER_TOKEN:
        tl.store(mean_ptr + rows, mean, mask=row_in)
        tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(m2 / count + eps), mask=row_in)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """fp32 activation of the epilogue (the formulas of torch.nn.functional)."""
    if ACTIVATION == "gelu":
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * tl.sigmoid(2.0 * u)  # 0.5 * (1 + tanh(u)) = sigmoid(2u)
    elif ACTIVATION == "silu":
        z = z * tl.sigmoid(z)
    elif ACTIVATION == "relu":
        z = tl.maximum(z, 0.0)
    return z


@triton.jit
def _normalized(a, mean, rstd, g_ptr, beta_ptr, k_norm, c_in, HAS_G: tl.constexpr,
                HAS_BETA: tl.constexpr, G_OFFSET: tl.constexpr):
    """``(a - mean) * rstd * (g + G_OFFSET) + beta`` in fp32 (affine at columns ``k_norm``)."""
    a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
    if HAS_G:
        a = a * (tl.load(g_ptr + k_norm, mask=c_in, other=0.0).to(tl.float32) + G_OFFSET)[None, :]
    if HAS_BETA:
        a = a + tl.load(beta_ptr + k_norm, mask=c_in, other=0.0).to(tl.float32)[None, :]
    return a


@triton.jit
def _merge_project_fwd_kernel(
    out_ptr, stride_om, stride_od,             # (M, D) merged, projected, activated tokens
    pre_ptr, gpre_ptr,                         # (M, D) pre-activations of up / gate (SAVE_PRE)
    x_ptr, stride_xb, stride_xl, stride_xc,    # (B, L, C) tokens
    mean_ptr, rstd_ptr,                        # (M, G) fp32 statistics (NORM != "none")
    g_ptr, beta_ptr,                           # (C,) "pre" / POOL, or (S*S*C,) "post" norm affine
    w_ptr, stride_wd, stride_wq, stride_wc,    # (D, K) weight: column (q, c) at q*stride_wq + c*stride_wc
    wg_ptr, stride_gd, stride_gq, stride_gc,   # (D, K) gate weight (HAS_GATE)
    bias_ptr, gbias_ptr,                       # (D,) biases of up / gate
    M, R, D, C, P, W, WS,                      # R merged rows per image, M = B * R
    S: tl.constexpr, ORDER: tl.constexpr, NORM: tl.constexpr, POOL: tl.constexpr,
    HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, G_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_PRE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, cols, row_in, col_in = grouped_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_N, GROUP_M)
    b = rows // R
    r = rows % R
    if NORM == "post":
        mean = tl.load(mean_ptr + rows, mask=row_in, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_in, other=0.0)

    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    accg = tl.zeros((BLOCK_M, BLOCK_N) if HAS_GATE else (16, 16), dtype=tl.float32)
    for q in range(1 if POOL else S * S):
        row_off = b * stride_xb + _window_token(r, q, P, W, WS, S, ORDER) * stride_xl
        if NORM == "pre":
            mean = tl.load(mean_ptr + rows * (S * S) + q, mask=row_in, other=0.0)
            rstd = tl.load(rstd_ptr + rows * (S * S) + q, mask=row_in, other=0.0)
        for c0 in range(0, C, BLOCK_K):
            cs = c0 + tl.arange(0, BLOCK_K)
            c_in = cs < C
            a_mask = row_in[:, None] & c_in[None, :]
            if POOL:
                a = _pooled_tile(x_ptr, b, r, cs, a_mask, stride_xb, stride_xl, stride_xc, P, W, WS, S, ORDER)
            else:
                a = tl.load(x_ptr + row_off[:, None] + cs[None, :] * stride_xc, mask=a_mask, other=0.0)
            if NORM != "none":
                k_norm = cs if NORM == "pre" or POOL else q * C + cs
                a = _normalized(a, mean, rstd, g_ptr, beta_ptr, k_norm, c_in, HAS_G, HAS_BETA, G_OFFSET)
            a = a.to(dot_dtype)
            w_mask = c_in[:, None] & col_in[None, :]
            w = tl.load(w_ptr + cols[None, :] * stride_wd + q * stride_wq + cs[:, None] * stride_wc,
                        mask=w_mask, other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = dot_acc(a, w, acc, ALLOW_TF32)
            if HAS_GATE:
                wg = tl.load(wg_ptr + cols[None, :] * stride_gd + q * stride_gq + cs[:, None] * stride_gc,
                             mask=w_mask, other=0.0)
                accg = dot_acc(a, wg, accg, ALLOW_TF32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        if HAS_GATE:
            accg += tl.load(gbias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    out_mask = row_in[:, None] & col_in[None, :]
    out_off = rows[:, None] * stride_om + cols[None, :] * stride_od
    if SAVE_PRE:  # pre-activations share the output's layout
        tl.store(pre_ptr + out_off, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
        if HAS_GATE:
            tl.store(gpre_ptr + out_off, accg.to(gpre_ptr.dtype.element_ty), mask=out_mask)
    if HAS_GATE:
        acc = _activate(accg, ACTIVATION) * acc
    else:
        acc = _activate(acc, ACTIVATION)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


_tuning = {"key": ["M", "D", "C"], "shared_memory": fwd_shared_memory}
_merge_project_fwd = autotune(FWD_CONFIGS, **_tuning)(_merge_project_fwd_kernel)
_merge_project_fwd_glu = autotune(GLU_CONFIGS, **_tuning)(_merge_project_fwd_kernel)
