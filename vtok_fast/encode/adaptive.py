"""Adaptive patch sizes (APT, arXiv 2510.18091): big patches where the image is simple, small
ones where it is detailed, fine ones wherever a relevance map says the question looks.

``adaptive_tokenize(images, weight, bias, pos_embed, *, patch_size, num_scales, thresholds, ...)
-> PackedTokens``. The rules, in order:

1. **Scales.** Scale ``s`` (``0 <= s < num_scales``) has square patches of side ``p * 2**s``
   on the grid ``(H // (p * 2**s), W // (p * 2**s))``: only complete patches exist, so an
   incomplete border patch never coarsens (its pixels stay at the finest scale that tiles them).
   Pixels beyond the base grid ``(H // p) * p x (W // p) * p`` are dropped, as in ``patch_embed``.
2. **Score.** The Shannon entropy in bits of each patch's 512-bin histogram of grayscale
   intensities: ``gray = 0.2989 R + 0.5870 G + 0.1140 B`` on [0, 255], bin
   ``floor(gray * 512 / 255)``. uint8 pixels are the intensities; a float pixel ``v`` (images in
   [0, 1]) is read as ``clamp(floor(v * 255 + 0.5), 0, 255)`` (NaN as 0), so ``x.float() / 255``
   scores exactly like ``x``. ``mean``/``std`` never change the score (it reads the raw pixels). The
   arithmetic is integer up to one final fp64 division, so the Triton kernel
   (``vtok_fast.kernels.adaptive``) and the PyTorch reference agree bit for bit.
3. **Relevance (query-aware).** ``relevance`` is a map in [0, 1] per pixel ``(H, W)`` or per base
   patch ``(H // p, W // p)`` (a text-image similarity map, a box mask). A patch's relevance is
   the **maximum** over the pixels (cells) it covers, and its score becomes
   ``entropy + relevance_weight * relevance``. With the default weight 10 (the largest possible
   entropy is 9 bits) a patch that touches a relevance-1 region stays fine under any threshold up
   to 10 bits; ``relevance_weight=float("inf")`` makes any positive relevance a veto.
4. **Quadtree.** ``thresholds[i]`` is the threshold of scale ``i + 1`` (patch side
   ``p * 2**(i + 1)``). From the coarsest scale down, a patch is used where its score is
   strictly below its scale's threshold and no coarser patch above it is used; base patches fill
   every cell left. Every pixel of the base grid is covered exactly once. Thresholds ``<= 0``
   keep every patch fine; ``inf`` coarsens every complete patch at the coarsest scale.
5. **Tokens.** A patch of scale ``s`` is box-filtered to ``p x p`` (the mean of each
   ``2**s x 2**s`` pixel block: for a 2x step exactly the bilinear downsample) and embedded by
   the fused ``patch_embed`` op (``mean``/``std`` fused, uint8 accepted); its position row is
   the position table average-pooled to that scale's grid (the mean of the rows of the base
   cells it covers). Prefix tokens go first (plus the table's prefix rows when the table has
   ``P + gh * gw`` rows).
6. **Order.** Per image: prefix, base tokens row-major, then scale-1 tokens row-major, then
   scale 2, ...; images one after the other (``cu_seqlens``).

``adaptive_tokenize_reference`` is the same contract in plain PyTorch (histograms by
``scatter_add``, ``conv2d`` embedding of every downsampled image, one image at a time).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vtok_fast._backend import use_triton
from vtok_fast._checks import FLOAT_DTYPES, check_int, check_same_device, check_tensor, token_table
from vtok_fast._launch import interpreting, strides
from vtok_fast._op import define_op
from vtok_fast.encode.packed import PackedTokens

NUM_BINS = 512
# grayscale weights in units of 1e-4: 1e4 * gray = 2989 R + 5870 G + 1140 B (exact integers)
GRAY_WEIGHTS = (2989, 5870, 1140)
# bin = floor(gray * 512 / 255) = (1e4 * gray * 512) // (255 * 1e4); the product fits int32
BIN_DIVISOR = 255 * 10_000
FRAC_BITS = 24  # fixed-point bits of the c * log2(c) table (n log2 n * 2**24 < 2**53 for n < 2**23)
DEFAULT_RELEVANCE_WEIGHT = 10.0
IMAGE_DTYPES = (*FLOAT_DTYPES, torch.uint8)


# --- scales ------------------------------------------------------------------------------------

def scale_grids(height: int, width: int, patch_size: int, num_scales: int) -> list[tuple[int, int]]:
    """``[(H // (p * 2**s), W // (p * 2**s)) for s in range(num_scales)]``: complete patches."""
    return [(height // (patch_size << s), width // (patch_size << s)) for s in range(num_scales)]


# --- score: entropy of every patch at every scale ----------------------------------------------

def gray_bins(images: torch.Tensor) -> torch.Tensor:
    """Histogram bin of every pixel, ``(B, H, W)`` int32 in ``[0, 512)`` (module docstring, 2)."""
    if images.dtype == torch.uint8:
        q = images.to(torch.int32)
    else:
        q = torch.floor(images.to(torch.float32) * 255.0 + 0.5)
        q = q.nan_to_num_(nan=0.0).clamp_(0, 255).to(torch.int32)
    wr, wg, wb = GRAY_WEIGHTS
    gray = q[:, 0] * wr  # in place from here: one buffer, not one per term
    gray.add_(q[:, 1], alpha=wg).add_(q[:, 2], alpha=wb)
    return gray.mul_(NUM_BINS).floor_divide_(BIN_DIVISOR)


@functools.lru_cache(maxsize=16)
def _entropy_table(n_max: int, device: str) -> torch.Tensor:
    if device != "cpu":
        return _entropy_table(n_max, "cpu").to(device)
    c = torch.arange(n_max + 1, dtype=torch.float64)
    terms = c * torch.log2(c.clamp(min=1)) * 2.0**FRAC_BITS
    return terms.round().to(torch.int64)


def entropy_table(n_max: int, device) -> torch.Tensor:
    """``round(c * log2(c) * 2**24)`` for ``c = 0..n_max``, int64, cached per device (built on
    the CPU, so every device reads the same table)."""
    return _entropy_table(int(n_max), str(torch.device(device)))


def _entropy_from_counts(counts: torch.Tensor, n: int, table: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of histograms ``(..., NUM_BINS)`` of ``n`` samples: the kernel's exact
    arithmetic (integer sum, one fp64 division)."""
    numerator = table[n] - table[counts.long()].sum(-1)
    return (numerator.to(torch.float64) / (n * 2.0**FRAC_BITS)).to(torch.float32)


def patch_entropy_reference(images: torch.Tensor, patch_size: int, num_scales: int) -> torch.Tensor:
    """``(B, T)`` fp32 entropies, the scales' row-major grids concatenated (scale 0 first)."""
    B, _, H, W = images.shape
    bins = gray_bins(images).long()
    grids = scale_grids(H, W, patch_size, num_scales)
    table = entropy_table((patch_size << (num_scales - 1)) ** 2, images.device)
    out = []
    for s, (gh, gw) in enumerate(grids):
        side = patch_size << s
        patches = bins[:, : gh * side, : gw * side].reshape(B, gh, side, gw, side)
        patches = patches.permute(0, 1, 3, 2, 4).reshape(B, gh * gw, side * side)
        counts = torch.zeros(B, gh * gw, NUM_BINS, dtype=torch.int64, device=images.device)
        counts.scatter_add_(2, patches, torch.ones_like(patches))
        out.append(_entropy_from_counts(counts, side * side, table))
    return torch.cat(out, dim=1)


def _entropy_triton(images: torch.Tensor, patch_size: int, num_scales: int) -> torch.Tensor:
    from vtok_fast.kernels.adaptive import patch_entropy_fwd

    B, _, H, W = images.shape
    T = sum(gh * gw for gh, gw in scale_grids(H, W, patch_size, num_scales))
    out = torch.empty(B, T, dtype=torch.float32, device=images.device)
    if B * T == 0:
        return out
    table = entropy_table((patch_size << (num_scales - 1)) ** 2, images.device)
    # enable_fp_fusion=False: v * 255 + 0.5 must round twice, as PyTorch does (no FMA)
    options = {} if interpreting() else {"enable_fp_fusion": False}
    patch_entropy_fwd[(B * T,)](  # one program per (patch, image): not tiled
        out_ptr=out, **strides(out, "o", "bt"), img_ptr=images, **strides(images, "i", "bchw"),
        table_ptr=table, B=B, H=H, W=W, T=T, P=patch_size, NUM_SCALES=num_scales,
        IS_FLOAT=images.dtype != torch.uint8,
        GRAY_R=GRAY_WEIGHTS[0], GRAY_G=GRAY_WEIGHTS[1], GRAY_B=GRAY_WEIGHTS[2],
        BIN_DIVISOR=BIN_DIVISOR, NUM_BINS=NUM_BINS, FRAC_BITS=FRAC_BITS, **options,
    )
    return out


def _patch_entropy_impl(images: torch.Tensor, patch_size: int, num_scales: int) -> torch.Tensor:
    if use_triton(images):
        return _entropy_triton(images, patch_size, num_scales)
    return patch_entropy_reference(images, patch_size, num_scales)  # the PyTorch path


def _patch_entropy_fake(images, patch_size, num_scales):
    B, _, H, W = images.shape
    T = sum(gh * gw for gh, gw in scale_grids(H, W, patch_size, num_scales))
    return images.new_empty((B, T), dtype=torch.float32)


_patch_entropy_op = define_op("patch_entropy", _patch_entropy_impl, fake=_patch_entropy_fake)


def _check_images(images, patch_size: int, num_scales: int) -> None:
    check_tensor("images", images, ndim=4, dtypes=IMAGE_DTYPES, shape_doc="(B, 3, H, W)")
    if images.shape[1] != 3:
        raise ValueError(f"images must be RGB (B, 3, H, W), got shape {tuple(images.shape)} "
                         f"({images.shape[1]} channels)")
    largest = patch_size << (num_scales - 1)
    H, W = images.shape[2:]
    if H < largest or W < largest:
        raise ValueError(f"images must be at least the largest patch ({largest}x{largest} for "
                         f"patch_size={patch_size}, num_scales={num_scales}), got {H}x{W}")


def patch_entropy(images: torch.Tensor, patch_size: int, num_scales: int = 2) -> list[torch.Tensor]:
    """Entropy (bits) of every complete patch at every scale: ``[(B, gh_s, gw_s)] * num_scales``
    fp32 (module docstring, rule 2). One Triton launch for all scales on CUDA."""
    patch_size = check_int("patch_size", patch_size, 1)
    num_scales = check_int("num_scales", num_scales, 1)
    _check_images(images, patch_size, num_scales)
    flat = _patch_entropy_op(images, patch_size, num_scales)
    grids = scale_grids(images.shape[2], images.shape[3], patch_size, num_scales)
    sizes = [gh * gw for gh, gw in grids]
    return [t.view(-1, gh, gw) for t, (gh, gw) in zip(flat.split(sizes, dim=1), grids)]


# --- selection -----------------------------------------------------------------------------------

def _refine(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ``(B, h, w)`` mask of one scale on the next finer ``grid`` (each cell -> 2x2; the border
    row / column the coarse grid does not reach is False)."""
    up = mask.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    out = mask.new_zeros((mask.shape[0], *grid))
    out[:, : up.shape[1], : up.shape[2]] = up
    return out


def quadtree_select(scores: Sequence[Optional[torch.Tensor]], thresholds: Sequence[float],
                    grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Which patch of each scale becomes a token, ``[(B, gh_s, gw_s)] * S`` bool (rule 4).

    ``scores[s]`` (``s >= 1``; ``scores[0]`` is ignored) are ``(B, gh_s, gw_s)``;
    ``thresholds[s - 1]`` is scale ``s``'s threshold."""
    S = len(grids)
    if S < 2:
        raise ValueError(f"quadtree_select needs at least two scales, got {S}")
    masks: list[Optional[torch.Tensor]] = [None] * S
    covered = None  # cells of the current scale inside a used coarser patch
    for s in range(S - 1, 0, -1):
        chosen = scores[s].to(torch.float64) < thresholds[s - 1]  # the threshold as given
        if covered is not None:
            chosen &= ~covered
            covered = covered | chosen
        else:
            covered = chosen
        masks[s] = chosen
        covered = _refine(covered, grids[s - 1])
    masks[0] = ~covered
    return masks


def _check_thresholds(thresholds, num_scales: int) -> list[float]:
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().reshape(-1).tolist()
    elif isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        thresholds = [thresholds]
    elif not isinstance(thresholds, Sequence) or isinstance(thresholds, (str, bytes)):
        raise TypeError(f"thresholds must be a sequence of {num_scales - 1} numbers (one per scale "
                        f"above the base), got {type(thresholds).__name__}")
    values = list(thresholds)
    if len(values) != num_scales - 1:
        raise ValueError(f"thresholds must have num_scales - 1 = {num_scales - 1} values (one per "
                         f"scale above the base), got {len(values)}: {values}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise TypeError(f"thresholds must be numbers, got {values}")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"thresholds must not be NaN, got {values}")
    return [float(v) for v in values]


def _relevance_cells(relevance, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``relevance`` as ``(B or 1, gh, gw)`` fp32: the max over each base patch (rule 3)."""
    B, _, H, W = images.shape
    gh, gw = H // patch_size, W // patch_size
    doc = (f"(H, W) = ({H}, {W}) per pixel or (H // p, W // p) = ({gh}, {gw}) per base patch, "
           "optionally with leading (B,) or (B, 1)")
    check_tensor("relevance", relevance, ndim=(2, 3, 4), shape_doc=doc)
    if relevance.dtype not in (*FLOAT_DTYPES, torch.float64, torch.bool):
        raise TypeError(f"relevance must be a float or bool tensor, got {relevance.dtype}")
    check_same_device(images=images, relevance=relevance)
    rel = relevance
    if rel.dim() == 4:
        if rel.shape[1] != 1:
            raise ValueError(f"relevance must be {doc}, got shape {tuple(relevance.shape)}")
        rel = rel[:, 0]
    if rel.dim() == 2:
        rel = rel[None]
    if rel.shape[0] not in (1, B):
        raise ValueError(f"relevance must have batch 1 or B = {B}, got shape {tuple(relevance.shape)}")
    rel = rel.to(torch.float32)
    if not torch.compiler.is_compiling() and bool(((rel < 0) | (rel > 1) | rel.isnan()).any()):
        raise ValueError("relevance values must be in [0, 1]")
    if tuple(rel.shape[1:]) == (H, W):
        rel = F.max_pool2d(rel[:, None, : gh * patch_size, : gw * patch_size], patch_size)[:, 0]
    elif tuple(rel.shape[1:]) != (gh, gw):
        raise ValueError(f"relevance must be {doc}, got shape {tuple(relevance.shape)}")
    return rel


def _scores(entropy: list[torch.Tensor], relevance: Optional[torch.Tensor], weight: float):
    """Entropy plus the relevance term per scale (``None`` at the base, which never coarsens)."""
    out: list[Optional[torch.Tensor]] = [None]
    for s in range(1, len(entropy)):
        score = entropy[s]
        if relevance is not None:
            rel = F.max_pool2d(relevance[:, None], 1 << s)[:, 0]  # floor: complete patches
            # weight * 0 is 0 even for an infinite weight
            score = score + torch.where(rel > 0, weight * rel, torch.zeros_like(rel))
        out.append(score)
    return out


# --- tokens ------------------------------------------------------------------------------------

def _patch_view(images: torch.Tensor, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, gh, gw, C, side, side)`` view of the complete patches of one scale."""
    gh, gw = grid
    crop = images[:, :, : gh * side, : gw * side]
    return crop.unflatten(3, (gw, side)).unflatten(2, (gh, side)).permute(0, 2, 4, 1, 3, 5)


def _to_base_size(pixels: torch.Tensor, factor: int, like: torch.Tensor) -> torch.Tensor:
    """Box-filter ``(n, C, k p, k p)`` patches to ``(n, C, p, p)`` (rule 5). uint8 pixels come
    out as fp32 in [0, 1]; float pixels keep their dtype."""
    x = pixels.to(torch.float32)
    if pixels.dtype == torch.uint8:
        x = x / 255
    x = F.avg_pool2d(x, factor)
    return x if like.dtype == torch.uint8 else x.to(like.dtype)


class _Setup:
    """Validated arguments shared by the fast path and the reference."""

    def __init__(self, images, weight, bias, pos_embed, patch_size, num_scales, thresholds,
                 relevance, relevance_weight, prefix):
        check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(D, 3, p, p)")
        D, c_w, ph, pw = weight.shape
        if ph != pw:
            raise ValueError(f"weight must have a square patch (D, 3, p, p), got shape {tuple(weight.shape)}")
        if patch_size is None:
            patch_size = ph
        self.p = check_int("patch_size", patch_size, 1)
        if self.p != ph:
            raise ValueError(f"patch_size must be the weight's patch side {ph} (weight.shape[-1]), "
                             f"got {patch_size}")
        self.S = check_int("num_scales", num_scales, 1)
        _check_images(images, self.p, self.S)
        if c_w != 3:
            raise ValueError(f"weight must take 3 (RGB) channels, got shape {tuple(weight.shape)}")
        check_same_device(images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix=prefix)
        self.thresholds = _check_thresholds(thresholds, self.S)
        if not isinstance(relevance_weight, numbers.Real) or isinstance(relevance_weight, bool) \
                or not relevance_weight >= 0:
            raise ValueError(f"relevance_weight must be a number >= 0, got {relevance_weight!r}")
        self.relevance_weight = float(relevance_weight)
        B, _, H, W = images.shape
        self.B, self.D = B, D
        self.grids = scale_grids(H, W, self.p, self.S)
        gh, gw = self.grids[0]
        self.prefix = None if prefix is None else token_table("prefix", prefix, weight,
                                                              one_row=True)
        self.P = 0 if self.prefix is None else self.prefix.shape[0]
        self.pos_prefix = self.pos_grid = None
        if pos_embed is not None:
            pos = token_table("pos_embed", pos_embed, weight, one_row=True)
            if pos.shape[0] == self.P + gh * gw and self.P:
                self.pos_prefix, pos = pos[: self.P], pos[self.P:]
            elif pos.shape[0] != gh * gw:
                raise ValueError(f"pos_embed must have gh * gw = {gh * gw} rows (the base grid "
                                 f"{gh}x{gw}) or P + gh * gw = {self.P + gh * gw}, got shape "
                                 f"{tuple(pos_embed.shape)}")
            self.pos_grid = pos.view(gh, gw, D)
        self.relevance = None if relevance is None else _relevance_cells(relevance, images, self.p)
        self.bias = bias

    def pos_table(self, s: int) -> Optional[torch.Tensor]:
        """Scale ``s``'s position table ``(gh_s, gw_s, D)``: the base table average-pooled."""
        if self.pos_grid is None:
            return None
        if s == 0:
            return self.pos_grid
        t = self.pos_grid.permute(2, 0, 1).to(torch.float32)[None]
        return F.avg_pool2d(t, 1 << s)[0].permute(1, 2, 0).to(self.pos_grid.dtype)

    def select(self, entropy: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.S == 1:
            return [torch.ones_like(entropy[0], dtype=torch.bool)]
        scores = _scores(entropy, self.relevance, self.relevance_weight)
        return quadtree_select(scores, self.thresholds, self.grids)

    def prefix_rows(self) -> Optional[torch.Tensor]:
        if self.prefix is None:
            return None
        return self.prefix if self.pos_prefix is None else self.prefix + self.pos_prefix


def _pack(setup: _Setup, masks: list[torch.Tensor], prefix_rows, parts, device) -> PackedTokens:
    """Assemble per-scale tokens (``parts[s]``: ``(n_s, D)`` in ``masks[s].nonzero()`` order)."""
    B, P = setup.B, setup.P
    counts = torch.stack([m.flatten(1).sum(1) for m in masks], dim=1)  # (B, S)
    lengths = P + counts.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int64, device=device)
    cu[1:] = lengths.cumsum(0)
    # where scale s of image b starts in the packed rows
    scale_start = cu[:-1, None] + P + counts.cumsum(1) - counts  # (B, S)
    before = counts.cumsum(0) - counts  # tokens of scale s in earlier images
    rows = [torch.full((B * P,), -1, dtype=torch.long, device=device)]
    cols = [rows[0]]
    scales = [rows[0]]
    dest = [(cu[:-1, None] + torch.arange(P, device=device)).reshape(-1)]
    for s, mask in enumerate(masks):
        b, r, c = mask.nonzero().unbind(1)
        j = torch.arange(b.shape[0], device=device)
        dest.append(scale_start[b, s] + j - before[b, s])
        k = 1 << s
        rows.append(r * k)
        cols.append(c * k)
        scales.append(torch.full_like(r, s))
    order = torch.empty(int(cu[-1]), dtype=torch.long, device=device)
    dest = torch.cat(dest)
    order[dest] = torch.arange(dest.shape[0], device=device)
    pieces = [] if prefix_rows is None else [prefix_rows.expand(B, P, setup.D).reshape(B * P, setup.D)]
    tokens = torch.cat([*pieces, *parts])[order]
    return PackedTokens(tokens=tokens, cu_seqlens=cu.to(torch.int32),
                        scale=torch.cat(scales)[order], row=torch.cat(rows)[order],
                        col=torch.cat(cols)[order], grid_size=setup.grids[0], patch_size=setup.p,
                        num_prefix_tokens=P, num_scales=setup.S)


def adaptive_tokenize(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      pos_embed: Optional[torch.Tensor] = None, *, patch_size: Optional[int] = None,
                      num_scales: int = 2, thresholds, mean=None, std=None,
                      relevance: Optional[torch.Tensor] = None,
                      relevance_weight: float = DEFAULT_RELEVANCE_WEIGHT,
                      prefix: Optional[torch.Tensor] = None) -> PackedTokens:
    """Adaptive-size patch tokens of a batch, packed (rules in the module docstring).

    Args:
        images: ``(B, 3, H, W)`` uint8 in [0, 255] or float in [0, 1], at least one patch of the
            largest scale (``p * 2**(num_scales - 1)``) in size.
        weight: ``(D, 3, p, p)`` Conv2d weight of the base patch; ``bias`` ``(D,)`` or None.
        pos_embed: ``(N, D)`` / ``(1, N, D)`` for the base grid ``N = (H // p) * (W // p)``, or
            ``P + N`` rows whose first ``P`` are added to the prefix tokens; None: no table.
        patch_size: the base patch side ``p`` (must be the weight's; default: read from it).
        num_scales: patch sides ``p, 2p, ..., p * 2**(num_scales - 1)``.
        thresholds: ``num_scales - 1`` entropy thresholds in bits, for scales 1, 2, ... (APT's
            defaults: ``[4.5]`` for two scales, ``[6.0, 4.0]`` for three).
        mean, std: per-channel normalization for the embedding (as in ``patch_embed``).
        relevance: ``(H, W)`` per pixel or ``(H // p, W // p)`` per base patch, optionally with a
            leading ``(B,)``/``(B, 1)``, values in [0, 1] (float or bool); relevant regions stay fine.
        relevance_weight: bits added to a patch's score per unit of its (max) relevance.
        prefix: ``(P, D)``, ``(1, P, D)`` or ``(D,)`` tokens placed first in every sequence.

    Returns a :class:`PackedTokens` whose ``tokens`` have the weight's dtype.
    """
    setup = _Setup(images, weight, bias, pos_embed, patch_size, num_scales, thresholds,
                   relevance, relevance_weight, prefix)
    from vtok_fast.encode.patch_embed import patch_embed

    masks = setup.select(patch_entropy(images, setup.p, setup.S))
    parts = []
    for s, mask in enumerate(masks):
        idx = mask.nonzero()
        side = setup.p << s
        pixels = _patch_view(images, side, setup.grids[s])[idx[:, 0], idx[:, 1], idx[:, 2]]
        if s:
            pixels = _to_base_size(pixels, 1 << s, images)
        tokens = patch_embed(pixels, weight, bias, mean=mean, std=std)[:, 0]
        table = setup.pos_table(s)
        if table is not None:
            tokens = tokens + table[idx[:, 1], idx[:, 2]]
        parts.append(tokens)
    return _pack(setup, masks, setup.prefix_rows(), parts, images.device)


def adaptive_tokenize_reference(images: torch.Tensor, weight: torch.Tensor,
                                bias: Optional[torch.Tensor] = None,
                                pos_embed: Optional[torch.Tensor] = None, *,
                                patch_size: Optional[int] = None, num_scales: int = 2, thresholds,
                                mean=None, std=None, relevance: Optional[torch.Tensor] = None,
                                relevance_weight: float = DEFAULT_RELEVANCE_WEIGHT,
                                prefix: Optional[torch.Tensor] = None) -> PackedTokens:
    """:func:`adaptive_tokenize` in plain PyTorch: reference entropies, every scale's whole
    downsampled image embedded by ``conv2d`` (``patch_embed_reference``), tokens picked and
    packed one image at a time."""
    from vtok_fast.encode.patch_embed import patch_embed_reference

    setup = _Setup(images, weight, bias, pos_embed, patch_size, num_scales, thresholds,
                   relevance, relevance_weight, prefix)
    flat = patch_entropy_reference(images, setup.p, setup.S)
    entropy = [t.view(-1, gh, gw) for t, (gh, gw) in
               zip(flat.split([gh * gw for gh, gw in setup.grids], dim=1), setup.grids)]
    masks = setup.select(entropy)
    grids_tokens = []
    for s in range(setup.S):
        x = images if s == 0 else _to_base_size(images, 1 << s, images)
        y = patch_embed_reference(x, weight, bias, mean=mean, std=std)
        gh, gw = setup.grids[s]
        y = y.view(setup.B, x.shape[2] // setup.p, x.shape[3] // setup.p, setup.D)[:, :gh, :gw]
        table = setup.pos_table(s)
        grids_tokens.append(y if table is None else y + table)
    prefix_rows = setup.prefix_rows()
    seqs, scales, rows, cols = [], [], [], []
    for b in range(setup.B):
        if prefix_rows is not None:
            seqs.append(prefix_rows)
            scales += [-1] * setup.P
            rows += [-1] * setup.P
            cols += [-1] * setup.P
        for s in range(setup.S):
            for r, c in masks[s][b].nonzero().tolist():
                seqs.append(grids_tokens[s][b, r, c][None])
                scales.append(s)
                rows.append(r << s)
                cols.append(c << s)
    lengths = [setup.P + sum(int(m[b].sum()) for m in masks) for b in range(setup.B)]
    cu = torch.tensor([0, *lengths], device=images.device).cumsum(0).to(torch.int32)
    long = functools.partial(torch.tensor, dtype=torch.long, device=images.device)
    tokens = torch.cat(seqs) if seqs else weight.new_empty((0, setup.D))
    return PackedTokens(tokens=tokens, cu_seqlens=cu, scale=long(scales), row=long(rows),
                        col=long(cols), grid_size=setup.grids[0], patch_size=setup.p,
                        num_prefix_tokens=setup.P, num_scales=setup.S)


def box_relevance(height: int, width: int, box, *, device=None) -> torch.Tensor:
    """A ``(H, W)`` float relevance map: 1 inside ``box = (x0, y0, x1, y1)`` (pixels, ``x1``/``y1``
    exclusive, clipped to the image), 0 elsewhere."""
    height, width = check_int("height", height, 0), check_int("width", width, 0)
    if not isinstance(box, Sequence) or len(box) != 4 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box):
        raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1) in pixels, got {box!r}")
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1) in pixels, got {tuple(box)}")
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box must have x0 < x1 and y0 < y1, got {tuple(box)}")
    out = torch.zeros(height, width, device=device)
    out[max(y0, 0): max(y1, 0), max(x0, 0): max(x1, 0)] = 1
    return out
