"""Triton kernel of the adaptive-patch score (host code: ``vtok_fast/encode/adaptive.py``).

``patch_entropy_fwd``: the Shannon entropy (bits) of the grayscale histogram of every patch at
every scale, in one launch. One program per (patch, image): it walks its patch in steps of
``BLOCK_K`` pixels, maps each pixel to its histogram bin with integer arithmetic and accumulates
``tl.histogram`` counts (a per-program histogram in registers / shared memory, no one-hot).
The entropy is then read from a fixed-point table of ``c * log2(c)`` (int64), summed exactly
(integers: any summation order gives the same bits) and divided once in fp64, so the kernel and
the PyTorch reference agree bit for bit on every device.

Programs are ordered coarsest scale first (the largest patches start first) with the image
index fastest.
"""
import triton
import triton.language as tl

from vtok_fast.kernels._autotune import autotune

# BLOCK_K pixels per step of the histogram; p=16 base patches (256 pixels) take one step, 4p
# patches 16.
ENTROPY_CONFIGS = [
    triton.Config({"BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_K": 512}, num_warps=4),
    triton.Config({"BLOCK_K": 1024}, num_warps=8),
]


@triton.jit
def _intensity(v):
    t = tl.floor(v.to(tl.float32) * 255.0 + 0.5)
    t = tl.where(t == t, t, 0.0)
    return tl.minimum(tl.maximum(t, 0.0), 255.0)


@autotune(configs=ENTROPY_CONFIGS, key=["P", "NUM_SCALES", "IS_FLOAT"])
@triton.jit
def patch_entropy_fwd(
    out_ptr, stride_ob, stride_ot,  # (B, T) fp32: entropy of patch t (scales concatenated)
    img_ptr, stride_ib, stride_ic, stride_ih, stride_iw,  # (B, 3, H, W) uint8 or float RGB
    table_ptr,  # (n_max + 1,) int64: round(c * log2(c) * 2**FRAC_BITS)
    B, H, W, T, P,  # P: base patch side; scale s has patches of side P << s
    NUM_SCALES: tl.constexpr, IS_FLOAT: tl.constexpr,
    GRAY_R: tl.constexpr, GRAY_G: tl.constexpr, GRAY_B: tl.constexpr, BIN_DIVISOR: tl.constexpr,
    NUM_BINS: tl.constexpr, FRAC_BITS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid % B
    t = T - 1 - pid // B  # coarsest scale first

    # which scale holds patch t: scale s covers [first_s, first_s + (H // side_s) * (W // side_s))
    scale = t * 0
    first = t * 0
    offset = t * 0
    for s in tl.static_range(NUM_SCALES):
        side_s = P * (1 << s)
        here = t >= offset
        scale = tl.where(here, s, scale)
        first = tl.where(here, offset, first)
        offset += (H // side_s) * (W // side_s)
    side = P << scale
    grid_w = W // side
    local = t - first
    y0 = (local // grid_w) * side
    x0 = (local % grid_w) * side
    n = side * side

    base = img_ptr + b * stride_ib
    hist = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for k0 in range(0, n, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        inside = offs < n
        ptrs = base + (y0 + offs // side) * stride_ih + (x0 + offs % side) * stride_iw
        r = tl.load(ptrs, mask=inside, other=0)
        g = tl.load(ptrs + stride_ic, mask=inside, other=0)
        bl = tl.load(ptrs + 2 * stride_ic, mask=inside, other=0)
        if IS_FLOAT:  # intensity = clamp(floor(v * 255 + 0.5), 0, 255), NaN -> 0 (fp32, no FMA)
            r = _intensity(r)
            g = _intensity(g)
            bl = _intensity(bl)
        gray = GRAY_R * r.to(tl.int32) + GRAY_G * g.to(tl.int32) + GRAY_B * bl.to(tl.int32)
        hist += tl.histogram((gray * NUM_BINS) // BIN_DIVISOR, NUM_BINS, mask=inside)

    # H = (n log2 n - sum_c c log2 c) / n, the sums in fixed point
    terms = tl.load(table_ptr + hist, mask=hist > 0, other=0)
    numerator = tl.load(table_ptr + n) - tl.sum(terms, axis=0)
    entropy = numerator.to(tl.float64) / (n.to(tl.float64) * (1 << FRAC_BITS))
    tl.store(out_ptr + b * stride_ob + t * stride_ot, entropy.to(tl.float32))
