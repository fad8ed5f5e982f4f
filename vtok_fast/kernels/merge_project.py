"""Triton kernels of the fused window merger + projection (host code:
``vtok_fast/project/merge_project.py``).

The merged row ``m`` of image ``b`` concatenates the ``S*S`` tokens of one window of the
``(H, W)`` token grid (window position ``q`` first, channel ``c`` second: column ``q*C + c``);
``_window_token`` says which sequence index window position ``q`` reads, for each ``ORDER``:

- ``"swin"``: column-major inside the window, (0,0), (1,0), (0,1), (1,1) (timm's PatchMerging);
- ``"row_major"``: (0,0), (0,1), (1,0), (1,1) (InternVL's pixel shuffle);
- ``"contiguous"``: the windows are already consecutive tokens (Qwen2-VL's processor order).

Neither the gathered nor the normalized ``(M, S*S*C)`` matrix is ever written:

- ``_merge_project_stats``: per-row (``post`` concat: over ``S*S*C``) or per-token (``pre``
  concat: over ``C``) mean and 1/std in fp32, one read of the tokens (chunked Chan/Welford
  merge of block means and squared deviations; RMS norm: mean 0, mean of squares);
- ``_merge_project_fwd``: a GEMM whose A tile is gathered from the token grid, normalized on the
  load (``(x - mean) * rstd * g + beta`` in fp32, then cast to the weight dtype), multiplied with
  fp32 accumulation; the epilogue adds the bias, optionally stores the pre-activation (for the
  backward) and applies the activation.
"""
import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune
from vtok_fast.kernels._tiles import dot_acc, grouped_tile

# Statistics pre-pass: BLOCK_M merged rows per program, BLOCK_C channels per step.
STATS_BLOCK_M = 16
STATS_BLOCK_C = 128
STATS_NUM_WARPS = 4

# (BM, BN, BK): BM merged rows x BN output columns, BK channels of one window position per step.
# The first config is the one the interpreter runs (small tiles: several tiles on tiny shapes).
FWD_CONFIGS = [
    triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


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
def _merge_project_stats(
    mean_ptr, rstd_ptr,                        # (M, G) fp32; G = S*S (PER_TOKEN) or 1
    x_ptr, stride_xb, stride_xl, stride_xc,    # (B, L, C) tokens
    M, R, C, P, W, WS, eps,                    # R merged rows per image, M = B * R
    S: tl.constexpr, ORDER: tl.constexpr, PER_TOKEN: tl.constexpr, RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < M
    b = rows // R
    r = rows % R
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum of squared deviations (RMS: of squares)
    count = 0.0
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
            x = x.to(tl.float32)
            if RMS:
                m2 += tl.sum(x * x, axis=1)
                count += tl.minimum(C - c0, BLOCK_C).to(tl.float32)
            else:
                n_blk = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
                blk_mean = tl.sum(x, axis=1) / n_blk
                d = tl.where(mask, x - blk_mean[:, None], 0.0)
                total = count + n_blk
                delta = blk_mean - mean
                mean += delta * (n_blk / total)
                m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n_blk / total)
                count = total
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


@autotune(configs=FWD_CONFIGS, key=["M", "D", "C"])
@triton.jit
def _merge_project_fwd(
    out_ptr, stride_om, stride_od,             # (M, D) merged, projected, activated tokens
    pre_ptr, stride_pm, stride_pd,             # (M, D) pre-activation (written if SAVE_PRE)
    x_ptr, stride_xb, stride_xl, stride_xc,    # (B, L, C) tokens
    mean_ptr, rstd_ptr,                        # (M, G) fp32 statistics (NORM != "none")
    g_ptr, beta_ptr,                           # (C,) "pre" or (S*S*C,) "post" norm affine
    w_ptr, stride_wd, stride_wk,               # (D, S*S*C) Linear weight
    bias_ptr,                                  # (D,)
    M, R, D, C, P, W, WS,                      # R merged rows per image, M = B * R
    S: tl.constexpr, ORDER: tl.constexpr, NORM: tl.constexpr,
    HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, SAVE_PRE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, cols, row_in, col_in = grouped_tile(tl.program_id(0), M, D, BM, BN, GROUP_M)
    b = rows // R
    r = rows % R
    if NORM == "post":
        mean = tl.load(mean_ptr + rows, mask=row_in, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_in, other=0.0)

    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for q in range(S * S):
        row_off = b * stride_xb + _window_token(r, q, P, W, WS, S, ORDER) * stride_xl
        if NORM == "pre":
            mean = tl.load(mean_ptr + rows * (S * S) + q, mask=row_in, other=0.0)
            rstd = tl.load(rstd_ptr + rows * (S * S) + q, mask=row_in, other=0.0)
        for c0 in range(0, C, BK):
            cs = c0 + tl.arange(0, BK)
            c_in = cs < C
            a = tl.load(x_ptr + row_off[:, None] + cs[None, :] * stride_xc,
                        mask=row_in[:, None] & c_in[None, :], other=0.0)  # (BM, BK)
            if NORM != "none":
                a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
                k_norm = cs if NORM == "pre" else q * C + cs
                if HAS_G:
                    a = a * tl.load(g_ptr + k_norm, mask=c_in, other=0.0).to(tl.float32)[None, :]
                if HAS_BETA:
                    a = a + tl.load(beta_ptr + k_norm, mask=c_in, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_ptr + cols[None, :] * stride_wd + (q * C + cs)[:, None] * stride_wk,
                        mask=c_in[:, None] & col_in[None, :], other=0.0)  # (BK, BN)
            acc = dot_acc(a.to(dot_dtype), w, acc, ALLOW_TF32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    out_mask = row_in[:, None] & col_in[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pd,
                 acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    acc = _activate(acc, ACTIVATION)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)
