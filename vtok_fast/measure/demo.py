"""``vtok-fast demo [IMAGE ...]``: what every tokenizer of vtok_fast does to one image.

Without arguments it runs on the sample image shipped in the package (``vtok_fast/data``, public
domain), with no downloads: every model is random-initialized from a fixed seed. Token counts,
pixels per token and the pixel metrics do not depend on trained weights; the token-space
fidelity compares random projections of the patches (which keep their cosine similarities).

Rows of the table (token counts are patch tokens, no CLS):

- **fixed** patches: ViT-B/16 on the 224-px view, ViT-L/14 on the 336-px view (CLIP's view:
  shortest side resized, centre crop), through the fused ``patch_embed``;
- **adaptive** (``adaptive_tokenize``, 14/28/56-px patches, APT's thresholds ``[6.0, 4.0]``) on
  the 336-px view, and the same with a relevance box (``--focus x0,y0,x1,y1`` in the image's
  pixels; default the sample's face, or the centre of another image); pixel reconstruction: each
  coarse patch box-filtered to 14 px and upsampled (bilinear) back;
- **pyramid** (``pyramid_tokenize``): grids 8, 16 and 32 of ViT-B/16 patches (1344 tokens);
- **VQ**: 8x8-px patches quantized by a ``VectorQuantizer`` whose codebook (up to 256 codes) is
  fitted by k-means on the image's own patches; reconstruction: the codes;
- **ToMe** (``vtok_fast.reduce.compress(..., "tome", keep=k)``) and 2x2 / 3x3 **average pooling**
  (``"pool"``) of the 576 ViT-L/14 tokens, LLaVA-1.5's budgets 144 and 64; token-space fidelity
  (mean cosine of each unmerged token with the original); pooling's pixel reconstruction is that
  of an all-coarse adaptive grid (each pooled block box-filtered to 14 px, upsampled).

``img px/token`` is one base for every row: the pixels of the image as tokenized (after
``--max-side``) divided by the row's tokens, as ``vtok-fast budget``'s pixels per token (a view's
crop or a floor grid covers less of the image, and says so by a larger number). PSNR (dB, data
range 1) and SSIM come from ``vtok_fast.measure.metrics``. ``time`` is one call of the method (its
input tokens already computed). A run is reproducible: every random draw (the random
projections, the VQ layer's k-means sampling seed) comes from ``seed``, so two runs on one
machine print the same quality numbers.

Images must be at least 8 px (the VQ patch) on each side after ``--max-side``; SSIM is left
blank where the VQ grid is under its 11-px window. A ``--focus`` box reaching outside the image
is clipped to it (with a warning); one that misses the image is refused. Output paths (``--out``,
``--json``) are checked before any work. ``--out`` writes a PNG panel: the image, the
adaptive grid plain and with the focus box, the ToMe merge map, the VQ reconstruction and the
pooled grid, each titled with its token count; ``--json`` writes the table, always as a list
(one record per image).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from vtok_fast._cli_errors import (OneLineParser, chosen_device, device_problem, error as _error, output_file_problem,
                                  warn)

SAMPLE = "astronaut.png"
SAMPLE_FOCUS = (150, 20, 300, 190)  # the face, in the sample's 512 x 512 pixels
VIT_B = (224, 16, 768)  # side, patch, width
VIT_L = (336, 14, 1024)
ADAPTIVE_THRESHOLDS = (6.0, 4.0)  # APT's defaults for three scales
PYRAMID_LEVELS = (8, 16, 32)
VQ_PATCH, VQ_CODES = 8, 256
BUDGETS = ((144, 2), (64, 3))  # LLaVA-1.5's 576 tokens -> (tokens, pooling stride)
TILE = 336
TITLE_HEIGHT = 22
MAX_SIDE = 512
PX_BASE = "img px/token: pixels of the {w}x{h} image (as tokenized, after --max-side) per token, every row"


@dataclasses.dataclass
class Row:
    method: str
    tokens: int
    pixels_per_token: float
    psnr: Optional[float] = None
    ssim: Optional[float] = None
    token_cosine: Optional[float] = None
    time_ms: Optional[float] = None


# --- images --------------------------------------------------------------------------------------

def sample_image_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / SAMPLE


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:  # pragma: no cover - Pillow is in the viz/test extras
        raise RuntimeError("vtok-fast demo needs Pillow: pip install pillow") from exc
    return Image, ImageDraw, ImageFont


def load_image(path, max_side: int = MAX_SIDE) -> tuple[torch.Tensor, float]:
    """``(3, H, W)`` float pixels in [0, 1], shrunk so the longer side is at most ``max_side``,
    and the scale applied to the file's pixel coordinates (the file's own size:
    ``file_size``)."""
    Image, _, _ = _pil()
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = min(1.0, max_side / max(im.size))
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(im).copy())
    return pixels.permute(2, 0, 1).float() / 255, scale


def file_size(path) -> tuple[int, int]:
    """``(width, height)`` of an image file (its header only)."""
    Image, _, _ = _pil()
    with Image.open(path) as im:
        return im.size


def _view_geometry(height: int, width: int, side: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """CLIP's view of an image: the scale, the resized ``(h, w)`` and the crop offset ``(left, top)``."""
    f = side / min(height, width)
    h, w = max(side, round(height * f)), max(side, round(width * f))
    return f, (h, w), ((w - side) // 2, (h - side) // 2)


def _view(image: torch.Tensor, side: int) -> torch.Tensor:
    """CLIP's view: shortest side resized to ``side``, centre crop; ``(1, 3, side, side)`` (boxes
    map into it by ``view_box``)."""
    _, (h, w), (left, top) = _view_geometry(*image.shape[1:], side)
    x = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x[:, :, top: top + side, left: left + side].clamp(0, 1)


def clip_box(box, width: float, height: float):
    """``box = (x0, y0, x1, y1)`` clipped to a ``width`` x ``height`` image; None when nothing of
    it is inside."""
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def view_box(box, height: int, width: int, side: int):
    """``box`` (in the pixels of a ``height`` x ``width`` image) in the pixels of its ``side``-px
    CLIP view, widened to the whole pixels it touches and clipped to the view: integer
    ``(x0, y0, x1, y1)``, or None when the box misses the view (the centre crop)."""
    box = clip_box(box, width, height)
    if box is None:
        return None
    f, _, (left, top) = _view_geometry(height, width, side)
    x0, y0 = (math.floor(v * f - o) for v, o in zip(box[:2], (left, top)))
    x1, y1 = (math.ceil(v * f - o) for v, o in zip(box[2:], (left, top)))
    return clip_box((x0, y0, x1, y1), side, side)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(1 or 3, H, W)`` or ``(1, 3, H, W)`` floats in [0, 1] -> ``(H, W, 3)`` uint8."""
    x = x.detach().float().cpu().reshape(-1, *x.shape[-2:])
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def parse_focus(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        box = tuple(float(v) for v in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"--focus must be x0,y0,x1,y1 in pixels with x0 < x1 and y0 < y1, got {text!r}")
    return box


# --- reconstructions and drawings ------------------------------------------------------------------

def _block_recon(x: torch.Tensor, patch: int, factor: int) -> torch.Tensor:
    """Every ``factor * patch`` block of ``x`` ``(1, C, H, W)`` box-filtered to ``patch`` pixels
    and upsampled back (bilinear, within the block); covers the complete blocks only."""
    side = patch * factor
    gh, gw = x.shape[2] // side, x.shape[3] // side
    C = x.shape[1]
    down = F.avg_pool2d(x[:, :, : gh * side, : gw * side], factor)
    blocks = down.reshape(C, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(-1, C, patch, patch)
    up = F.interpolate(blocks, scale_factor=factor, mode="bilinear", align_corners=False)
    return up.reshape(gh, gw, C, side, side).permute(2, 0, 3, 1, 4).reshape(1, C, gh * side, gw * side)


def _adaptive_recon(x: torch.Tensor, packed) -> torch.Tensor:
    """The view as the adaptive tokens see it: base patches as they are, each coarse patch
    box-filtered to the base size and upsampled back."""
    p = packed.patch_size
    cell_scale = packed.scale[packed.cell_index()[0]]  # (gh, gw)
    pixel_scale = cell_scale.repeat_interleave(p, 0).repeat_interleave(p, 1)
    out = x[:, :, : pixel_scale.shape[0], : pixel_scale.shape[1]].clone()
    for s in range(1, packed.num_scales):
        coarse = _block_recon(x, p, 1 << s)
        h, w = coarse.shape[2:]
        out[:, :, :h, :w] = torch.where(pixel_scale[:h, :w] == s, coarse, out[:, :, :h, :w])
    return out


def _draw_cells(pixels: np.ndarray, labels: np.ndarray, patch: int, color=(255, 255, 255)) -> np.ndarray:
    """``pixels`` with a line wherever two neighbouring base cells belong to different tokens."""
    lab = np.repeat(np.repeat(labels, patch, axis=0), patch, axis=1)
    out = pixels[: lab.shape[0], : lab.shape[1]].copy()
    edge = np.zeros(lab.shape, dtype=bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    out[edge] = color
    return out


def _draw_box(pixels: np.ndarray, box, color=(255, 60, 40), width: int = 2) -> np.ndarray:
    out = pixels.copy()
    H, W = out.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1 = max(0, min(x0, W - 1)), max(0, min(x1 - 1, W - 1))
    y0, y1 = max(0, min(y0, H - 1)), max(0, min(y1 - 1, H - 1))
    out[y0: y0 + width, x0: x1 + 1] = color
    out[max(y1 - width + 1, 0): y1 + 1, x0: x1 + 1] = color
    out[y0: y1 + 1, x0: x0 + width] = color
    out[y0: y1 + 1, max(x1 - width + 1, 0): x1 + 1] = color
    return out


# --- the run -----------------------------------------------------------------------------------

class _Progress:
    """``[i/n] label ... 0.42 s`` on stderr (``enabled=False``: silent)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0

    def step(self, label: str, fn: Callable):
        self.done += 1
        if self.enabled:
            sys.stderr.write(f"[{self.done}/{self.total}] {label} ...")
            sys.stderr.flush()
        t = time.perf_counter()
        result = fn()
        if self.enabled:
            sys.stderr.write(f" {time.perf_counter() - t:.2f} s\n")
            sys.stderr.flush()
        return result


def _timed(fn: Callable, device: torch.device, repeat: int = 2):
    """``(result, ms)``: the best of ``repeat`` calls (the first one warms up caches / kernels)."""
    best, result = math.inf, None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t) * 1e3)
    return result, best


def _quality(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, Optional[float]]:
    """PSNR and SSIM of ``pred`` against the same pixels of ``target``; SSIM None when ``pred`` is
    smaller than SSIM's window (a VQ grid of a tiny image)."""
    from vtok_fast.measure import metrics

    pred, target = pred.float().clamp(0, 1), target[..., : pred.shape[2], : pred.shape[3]].float()
    fits = min(pred.shape[2:]) >= metrics.SSIM_WIN_SIZE
    return (float(metrics.psnr(pred, target, 1.0)[0]),
            float(metrics.ssim(pred, target, 1.0)[0]) if fits else None)


@dataclasses.dataclass
class _Inputs:
    """What the steps of :func:`run` share: the image, its views and the random patch weights
    (``w_*``, ``b_*``: ViT-B/16 and ViT-L/14), all drawn before the first step. The steps run in
    ``STEPS``' order: the ViT-L/14 step leaves its tokens in ``tokens_l`` for ToMe and pooling."""
    image: torch.Tensor  # (3, H, W) on device
    device: torch.device
    gen: torch.Generator  # every random draw of the run
    image_px: int  # the one base of every row's pixels per token
    w_b: torch.Tensor
    b_b: torch.Tensor
    w_l: torch.Tensor
    b_l: torch.Tensor
    view_b: torch.Tensor  # (1, 3, 224, 224)
    view_l: torch.Tensor  # (1, 3, 336, 336)
    pixels_l: np.ndarray  # view_l as (336, 336, 3) uint8
    box_l: Optional[tuple]  # the focus box in view_l's pixels; None: it misses the view
    tokens_l: Optional[torch.Tensor] = None  # set by the ViT-L/14 step


_Tiles = list[tuple[str, np.ndarray]]


def _inputs(image: torch.Tensor, focus, device: torch.device, seed: int) -> _Inputs:
    gen = torch.Generator().manual_seed(seed)
    _, H, W = image.shape
    image = image.to(device)

    def weight(side_patch_dim):
        _, p, d = side_patch_dim
        w = torch.randn(d, 3, p, p, generator=gen) / math.sqrt(3 * p * p)
        return w.to(device), (torch.randn(d, generator=gen) * 0.02).to(device)

    w_b, b_b = weight(VIT_B)
    w_l, b_l = weight(VIT_L)
    view_l = _view(image, VIT_L[0])
    return _Inputs(image, device, gen, H * W, w_b, b_b, w_l, b_l, _view(image, VIT_B[0]), view_l,
                   _to_uint8(view_l), view_box(focus, H, W, VIT_L[0]))


def _fixed(inp: _Inputs, view, w, b, label) -> tuple[torch.Tensor, list[Row]]:
    from vtok_fast.encode.patch_embed import patch_embed

    tokens, ms = _timed(lambda: patch_embed(view, w, b), inp.device)
    return tokens, [Row(label, tokens.shape[1], inp.image_px / tokens.shape[1], time_ms=ms)]


def _step_fixed_b(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    _, rows = _fixed(inp, inp.view_b, inp.w_b, inp.b_b, "fixed ViT-B/16 @224")
    return rows, []


def _step_fixed_l(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    inp.tokens_l, rows = _fixed(inp, inp.view_l, inp.w_l, inp.b_l, "fixed ViT-L/14 @336")
    return rows, []


def _adaptive(inp: _Inputs, relevance, label: str, tile: str) -> tuple[list[Row], _Tiles]:
    from vtok_fast.encode.adaptive import adaptive_tokenize

    packed, ms = _timed(lambda: adaptive_tokenize(inp.view_l, inp.w_l, inp.b_l, num_scales=3,
                                                  thresholds=list(ADAPTIVE_THRESHOLDS),
                                                  relevance=relevance), inp.device)
    n = int(packed.counts[0])
    psnr, ssim = _quality(_adaptive_recon(inp.view_l, packed), inp.view_l)
    drawn = _draw_cells(inp.pixels_l, packed.cell_index()[0].cpu().numpy(), VIT_L[1])
    if relevance is not None and inp.box_l is not None:
        drawn = _draw_box(drawn, inp.box_l)
    return [Row(label, n, inp.image_px / n, psnr, ssim, time_ms=ms)], [(f"{tile}: {n} tokens", drawn)]


def _step_adaptive(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    return _adaptive(inp, None, "adaptive 14/28/56 px @336", "adaptive")


def _step_adaptive_focus(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    from vtok_fast.encode.adaptive import box_relevance

    side = VIT_L[0]
    relevance = (box_relevance(side, side, inp.box_l, device=inp.device) if inp.box_l is not None
                 else torch.zeros(side, side, device=inp.device))  # the box misses the view
    return _adaptive(inp, relevance, "adaptive + focus box", "adaptive + focus")


def _step_pyramid(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    from vtok_fast.encode.pyramid import pyramid_tokenize

    seq, ms = _timed(lambda: pyramid_tokenize(inp.image[None], inp.w_b, inp.b_b, levels=PYRAMID_LEVELS,
                                              concat=True), inp.device)
    return [Row("pyramid 8+16+32 (ViT-B/16)", seq.shape[1], inp.image_px / seq.shape[1], time_ms=ms)], []


def _step_vq(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    from vtok_fast.encode.vq import VectorQuantizer

    q, (_, H, W) = VQ_PATCH, inp.image.shape
    x = inp.image[None, :, : H // q * q, : W // q * q]
    gh, gw = x.shape[2] // q, x.shape[3] // q
    patches = x.reshape(3, gh, q, gw, q).permute(1, 3, 0, 2, 4).reshape(1, gh * gw, 3 * q * q)
    codes = max(2, min(VQ_CODES, gh * gw // 4))
    # the layer draws its k-means sampling seed from the global RNG when built: seed that draw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=inp.gen)))
        quantizer = VectorQuantizer(3 * q * q, codes, kmeans_init=True, kmeans_init_in_eval=True)
    quantizer = quantizer.to(inp.device).eval()
    with torch.no_grad():
        (quantized, _, _), ms = _timed(lambda: quantizer(patches), inp.device, repeat=1)
    recon = quantized.reshape(gh, gw, 3, q, q).permute(2, 0, 3, 1, 4).reshape(1, 3, gh * q, gw * q)
    psnr, ssim = _quality(recon, x)
    row = Row(f"VQ codes {q}x{q} px, K={codes} k-means", gh * gw, inp.image_px / (gh * gw), psnr, ssim, time_ms=ms)
    return [row], [(f"VQ ({codes} codes): {gh * gw} tokens", _to_uint8(recon))]


@torch.no_grad()
def _step_tome(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    from vtok_fast.measure import viz
    from vtok_fast.measure.metrics import token_fidelity
    from vtok_fast.reduce.compress import compress

    rows, tiles, tokens = [], [], inp.tokens_l
    for keep, _ in BUDGETS:
        merged, ms = _timed(lambda: compress(tokens, "tome", keep=keep), inp.device)
        cosine = float(token_fidelity(tokens, merged).cosine[0])
        rows.append(Row(f"ToMe 576 -> {keep}", keep, inp.image_px / keep, token_cosine=cosine, time_ms=ms))
        if keep == BUDGETS[0][0]:
            tiles.append((f"ToMe: {keep} tokens", viz.merge_map(inp.pixels_l, merged.source[0].cpu(), VIT_L[1])))
    return rows, tiles


@torch.no_grad()
def _step_pooling(inp: _Inputs) -> tuple[list[Row], _Tiles]:
    from vtok_fast.measure.metrics import token_fidelity
    from vtok_fast.reduce.compress import compress

    rows, tiles, tokens = [], [], inp.tokens_l
    p, grid = VIT_L[1], VIT_L[0] // VIT_L[1]
    for keep, stride in BUDGETS:
        pooled, ms = _timed(lambda: compress(tokens, "pool", grid=(grid, grid), stride=stride), inp.device)
        n = pooled.tokens.shape[1]
        cosine = float(token_fidelity(tokens, pooled).cosine[0])
        recon = _block_recon(inp.view_l, p, stride)
        psnr, ssim = _quality(recon, inp.view_l)
        rows.append(Row(f"avg-pool {stride}x{stride} 576 -> {n}", n, inp.image_px / n, psnr, ssim, cosine, ms))
        if keep == BUDGETS[0][0]:
            labels = pooled.source[0].reshape(grid, grid).cpu().numpy()
            tiles.append((f"avg-pool {stride}x{stride}: {n} tokens", _draw_cells(_to_uint8(recon), labels, p)))
    return rows, tiles


# The rows of the table, in order: (progress label, step); each step returns its rows and tiles.
STEPS: tuple[tuple[str, Callable[[_Inputs], tuple[list[Row], _Tiles]]], ...] = (
    ("fixed patches, ViT-B/16 @224", _step_fixed_b),
    ("fixed patches, ViT-L/14 @336", _step_fixed_l),
    ("adaptive patches", _step_adaptive),
    ("adaptive patches with the focus box", _step_adaptive_focus),
    ("pyramid", _step_pyramid),
    ("VQ codebook (k-means on the image's patches)", _step_vq),
    ("ToMe merging to 144 / 64", _step_tome),
    ("average pooling to 144 / 64", _step_pooling),
)


def run(image: torch.Tensor, *, focus=None, device="cpu", progress: bool = False, seed: int = 0):
    """Tokenize ``image`` ``(3, H, W)`` (floats in [0, 1], at least ``VQ_PATCH`` px per side)
    every way (``STEPS``); returns ``(rows, tiles)``, ``tiles`` a list of ``(title, (H, W, 3)
    uint8)``, the image first. ``focus``: ``(x0, y0, x1, y1)`` in the image's pixels (None: its
    centre half; the part outside the 336-px view is ignored). Every random draw comes from
    ``seed``: two runs give the same rows (times aside), and the global RNG is left as it was."""
    _, H, W = image.shape
    if min(H, W) < VQ_PATCH:
        raise ValueError(f"image must be at least {VQ_PATCH} px on each side (the VQ patch), got {W}x{H}")
    if focus is None:
        focus = (W / 4, H / 4, 3 * W / 4, 3 * H / 4)
    inp = _inputs(image, focus, torch.device(device), seed)
    rows: list[Row] = []
    tiles: _Tiles = [(f"image {W}x{H}", _to_uint8(inp.image))]
    progress_bar = _Progress(len(STEPS), progress)
    for label, step in STEPS:
        step_rows, step_tiles = progress_bar.step(label, lambda step=step: step(inp))
        rows += step_rows
        tiles += step_tiles
    return rows, tiles


# --- output ----------------------------------------------------------------------------------------

def format_table(rows: list[Row]) -> str:
    """The rows as a text table; ``img px/token`` is ``Row.pixels_per_token`` (see ``PX_BASE``)."""
    def fmt(v, spec):
        return "" if v is None else ("inf" if v == math.inf else format(v, spec))
    table = [("method", "tokens", "img px/token", "PSNR dB", "SSIM", "token cos", "time ms")]
    table += [(r.method, str(r.tokens), fmt(r.pixels_per_token, ".1f" if r.pixels_per_token >= 1 else ".2g"),
               fmt(r.psnr, ".2f"), fmt(r.ssim, ".3f"), fmt(r.token_cosine, ".3f"), fmt(r.time_ms, ".2f"))
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compose_panel(tiles: list[tuple[str, np.ndarray]], path, columns: int = 3):
    """Tiles (resized to ``TILE`` px squares) under their titles, ``columns`` per row; saves a PNG
    and returns the PIL image."""
    Image, ImageDraw, ImageFont = _pil()
    rows = -(-len(tiles) // columns)
    panel = Image.new("RGB", (columns * TILE, rows * (TILE + TITLE_HEIGHT)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    for i, (title, pixels) in enumerate(tiles):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + TITLE_HEIGHT)
        tile = Image.fromarray(pixels)
        tile.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
        panel.paste(tile, (x + (TILE - tile.width) // 2, y + TITLE_HEIGHT + (TILE - tile.height) // 2))
        draw.text((x + 6, y + 4), title, fill=(0, 0, 0), font=font)
    panel.save(path)
    return panel


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "demo", help="tokenize an image every way vtok_fast knows: a table and a PNG panel",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files (default: the sample image shipped in the package)")
    parser.add_argument("--focus", metavar="x0,y0,x1,y1",
                        help="relevance box in the image's pixels for query-aware adaptive patches, "
                             "clipped to the image (default: the sample's face, the centre of another image)")
    parser.add_argument("--out", default="vtok_demo.png",
                        help="PNG panel (several images: NAME_1.png, ...; default vtok_demo.png)")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON (a list: one record per image)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help=f"shrink larger images to this longer side first (default {MAX_SIDE})")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _panel_path(out: str, index: int, count: int) -> Path:
    path = Path(out)
    return path if count == 1 else path.with_name(f"{path.stem}_{index + 1}{path.suffix or '.png'}")


def _fmt_box(box) -> str:
    return ",".join(f"{v:g}" for v in box)


def _prepare(path: Path, focus, is_sample: bool, max_side: int):
    """``(image, box)`` for one image, or an error message: the image loaded and shrunk, and the
    focus box clipped to it (a warning when clipped or outside the view) in its shrunk pixels."""
    try:
        image, scale = load_image(path, max_side)
        width, height = file_size(path)
    except (OSError, ValueError) as exc:
        return f"cannot read image {str(path)!r}: {exc}"
    _, h, w = image.shape
    if min(h, w) < VQ_PATCH:
        return (f"image {str(path)!r} is {w}x{h} px after --max-side {max_side} (file {width}x{height}); the "
                f"demo needs at least {VQ_PATCH} px on each side (the VQ row's patch)")
    box = focus if focus is not None else (SAMPLE_FOCUS if is_sample else None)
    if box is None:
        return image, None
    clipped = clip_box(box, width, height)
    if clipped is None:
        return f"--focus {_fmt_box(box)} lies outside the {width}x{height} image {str(path)!r}"
    if clipped != tuple(box):
        warn(f"--focus {_fmt_box(box)} reaches outside the {width}x{height} image {str(path)!r}; "
             f"clipped to {_fmt_box(clipped)}")
    box = tuple(v * scale for v in clipped)
    if view_box(box, h, w, VIT_L[0]) is None:
        warn(f"--focus {_fmt_box(clipped)} is outside the centre crop that the adaptive rows see in "
             f"{str(path)!r}: 'adaptive + focus box' runs with no relevance")
    return image, box


def run_demo(args) -> int:
    """Run the demo for parsed ``demo`` arguments: table on stdout, panel PNG, optional JSON (a
    list, one record per image). Every argument, image and output path is checked before the
    work starts; a problem is one line on stderr and exit status 2."""
    problem = device_problem(args.device)
    if problem:
        return _error(problem)
    if args.max_side < 64:
        return _error(f"--max-side must be >= 64 pixels, got {args.max_side}")
    try:
        focus = None if args.focus is None else parse_focus(args.focus)
    except ValueError as exc:
        return _error(str(exc))
    device = chosen_device(args.device)
    paths = [Path(p) for p in args.images] or [sample_image_path()]
    panels = [_panel_path(args.out, i, len(paths)) for i in range(len(paths))]
    outputs = [("--out", panel) for panel in panels] + ([("--json", args.json)] if args.json else [])
    for flag, path in outputs:
        problem = output_file_problem(flag, path)
        if problem:
            return _error(problem)
    prepared = []
    for path in paths:
        item = _prepare(path, focus, not args.images, args.max_side)
        if isinstance(item, str):
            return _error(item)
        prepared.append(item)
    records = []
    for path, panel, (image, box) in zip(paths, panels, prepared):
        start = time.perf_counter()
        rows, tiles = run(image, focus=box, device=device, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        compose_panel(tiles, panel)
        height, width = image.shape[1:]
        print(f"\n## {path.name}: {width}x{height} px on {device} ({seconds:.1f} s)")
        print(format_table(rows))
        print(PX_BASE.format(w=width, h=height))
        print(f"panel written to {panel}")
        records.append({"image": str(path), "size": [height, width], "device": str(device),
                        "seconds": seconds, "pixels_per_token_base": PX_BASE.format(w=width, h=height),
                        "rows": [dataclasses.asdict(r) for r in rows],
                        "tiles": [title for title, _ in tiles], "panel": str(panel)})
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1, default=lambda v: None))
        print(f"table written to {args.json}")
    return 0


def main(argv=None) -> int:
    """``demo`` alone: ``python -m vtok_fast.measure.demo [IMAGE ...]``."""
    parser = OneLineParser(prog="vtok-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    return run_demo(parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
