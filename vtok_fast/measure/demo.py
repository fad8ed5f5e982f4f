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

PSNR (dB, data range 1) and SSIM come from ``vtok_fast.measure.metrics``. ``time`` is one call of
the method (its input tokens already computed). ``--out`` writes a PNG panel: the image, the
adaptive grid plain and with the focus box, the ToMe merge map, the VQ reconstruction and the
pooled grid, each titled with its token count; ``--json`` writes the table.
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

from vtok_fast.cli import _error

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
    and the scale applied to the file's pixel coordinates."""
    Image, _, _ = _pil()
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = min(1.0, max_side / max(im.size))
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(im).copy())
    return pixels.permute(2, 0, 1).float() / 255, scale


def _view(image: torch.Tensor, side: int) -> tuple[torch.Tensor, float, tuple[float, float]]:
    """CLIP's view: shortest side resized to ``side``, centre crop; ``(1, 3, side, side)``, the
    scale and the crop offset (to map boxes)."""
    _, H, W = image.shape
    f = side / min(H, W)
    h, w = max(side, round(H * f)), max(side, round(W * f))
    x = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (h - side) // 2, (w - side) // 2
    return x[:, :, top: top + side, left: left + side].clamp(0, 1), f, (left, top)


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


def _quality(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    from vtok_fast.measure import metrics

    pred, target = pred.float().clamp(0, 1), target[..., : pred.shape[2], : pred.shape[3]].float()
    return float(metrics.psnr(pred, target, 1.0)[0]), float(metrics.ssim(pred, target, 1.0)[0])


def run(image: torch.Tensor, *, focus=None, device="cpu", progress: bool = False, seed: int = 0):
    """Tokenize ``image`` ``(3, H, W)`` (floats in [0, 1]) every way; returns ``(rows, tiles)``,
    ``tiles`` a list of ``(title, (H, W, 3) uint8)``. ``focus``: ``(x0, y0, x1, y1)`` in the
    image's pixels (None: its centre half)."""
    from vtok_fast import viz
    from vtok_fast.encode.adaptive import adaptive_tokenize, box_relevance
    from vtok_fast.encode.patch_embed import patch_embed
    from vtok_fast.encode.pyramid import pyramid_tokenize
    from vtok_fast.encode.vq import VectorQuantizer
    from vtok_fast.measure.metrics import token_fidelity
    from vtok_fast.reduce.compress import compress

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    _, H, W = image.shape
    if focus is None:
        focus = (W / 4, H / 4, 3 * W / 4, 3 * H / 4)
    image = image.to(device)

    def weight(side_patch_dim):
        _, p, d = side_patch_dim
        w = torch.randn(d, 3, p, p, generator=gen) / math.sqrt(3 * p * p)
        return w.to(device), (torch.randn(d, generator=gen) * 0.02).to(device)

    w_b, b_b = weight(VIT_B)
    w_l, b_l = weight(VIT_L)
    view_b = _view(image, VIT_B[0])[0]
    view_l, f, (ox, oy) = _view(image, VIT_L[0])
    box_l = ((focus[0] * f - ox), (focus[1] * f - oy), (focus[2] * f - ox), (focus[3] * f - oy))
    p_l = VIT_L[1]
    grid_l = VIT_L[0] // p_l
    rows: list[Row] = []
    tiles: list[tuple[str, np.ndarray]] = []
    steps = _Progress(8, progress)

    def fixed(view, w, b, label):
        tokens, ms = _timed(lambda: patch_embed(view, w, b), device)
        rows.append(Row(label, tokens.shape[1], view.shape[2] * view.shape[3] / tokens.shape[1], time_ms=ms))
        return tokens

    steps.step("fixed patches, ViT-B/16 @224", lambda: fixed(view_b, w_b, b_b, "fixed ViT-B/16 @224"))
    tokens_l = steps.step("fixed patches, ViT-L/14 @336",
                          lambda: fixed(view_l, w_l, b_l, "fixed ViT-L/14 @336"))
    view_px = VIT_L[0] ** 2
    pixels_l = _to_uint8(view_l)
    tiles.append((f"image {W}x{H}", _to_uint8(image)))

    def adaptive(relevance, label, tile):
        packed, ms = _timed(lambda: adaptive_tokenize(view_l, w_l, b_l, num_scales=3,
                                                      thresholds=list(ADAPTIVE_THRESHOLDS),
                                                      relevance=relevance), device)
        n = int(packed.counts[0])
        psnr, ssim = _quality(_adaptive_recon(view_l, packed), view_l)
        rows.append(Row(label, n, view_px / n, psnr, ssim, time_ms=ms))
        drawn = _draw_cells(pixels_l, packed.cell_index()[0].cpu().numpy(), p_l)
        if relevance is not None:
            drawn = _draw_box(drawn, box_l)
        tiles.append((f"{tile}: {n} tokens", drawn))

    steps.step("adaptive patches", lambda: adaptive(None, "adaptive 14/28/56 px @336", "adaptive"))
    relevance = box_relevance(VIT_L[0], VIT_L[0], box_l, device=device)
    steps.step("adaptive patches with the focus box",
               lambda: adaptive(relevance, "adaptive + focus box", "adaptive + focus"))

    def pyramid():
        seq, ms = _timed(lambda: pyramid_tokenize(image[None], w_b, b_b, levels=PYRAMID_LEVELS, concat=True), device)
        rows.append(Row("pyramid 8+16+32 (ViT-B/16)", seq.shape[1], H * W / seq.shape[1], time_ms=ms))

    steps.step("pyramid", pyramid)

    def vq():
        q = VQ_PATCH
        x = image[None, :, : H // q * q, : W // q * q]
        gh, gw = x.shape[2] // q, x.shape[3] // q
        patches = x.reshape(3, gh, q, gw, q).permute(1, 3, 0, 2, 4).reshape(1, gh * gw, 3 * q * q)
        codes = max(2, min(VQ_CODES, gh * gw // 4))
        quantizer = VectorQuantizer(3 * q * q, codes, kmeans_init=True, kmeans_init_in_eval=True).to(device).eval()
        with torch.no_grad():
            (quantized, _, _), ms = _timed(lambda: quantizer(patches), device, repeat=1)
        recon = quantized.reshape(gh, gw, 3, q, q).permute(2, 0, 3, 1, 4).reshape(1, 3, gh * q, gw * q)
        psnr, ssim = _quality(recon, x)
        rows.append(Row(f"VQ codes {q}x{q} px, K={codes} k-means", gh * gw, q * q, psnr, ssim, time_ms=ms))
        tiles.append((f"VQ ({codes} codes): {gh * gw} tokens", _to_uint8(recon)))

    steps.step("VQ codebook (k-means on the image's patches)", vq)

    with torch.no_grad():
        def tome():
            for keep, _ in BUDGETS:
                merged, ms = _timed(lambda: compress(tokens_l, "tome", keep=keep), device)
                cosine = float(token_fidelity(tokens_l, merged).cosine[0])
                rows.append(Row(f"ToMe 576 -> {keep}", keep, view_px / keep, token_cosine=cosine, time_ms=ms))
                if keep == BUDGETS[0][0]:
                    drawn = viz.merge_map(pixels_l, merged.source[0].cpu(), p_l)
                    tiles.append((f"ToMe: {keep} tokens", drawn))

        steps.step("ToMe merging to 144 / 64", tome)

        def pooling():
            for keep, stride in BUDGETS:
                pooled, ms = _timed(lambda: compress(tokens_l, "pool", grid=(grid_l, grid_l), stride=stride),
                                    device)
                n = pooled.tokens.shape[1]
                cosine = float(token_fidelity(tokens_l, pooled).cosine[0])
                recon = _block_recon(view_l, p_l, stride)
                psnr, ssim = _quality(recon, view_l)
                rows.append(Row(f"avg-pool {stride}x{stride} 576 -> {n}", n, view_px / n, psnr, ssim,
                                cosine, ms))
                if keep == BUDGETS[0][0]:
                    labels = pooled.source[0].reshape(grid_l, grid_l).cpu().numpy()
                    tiles.append((f"avg-pool {stride}x{stride}: {n} tokens",
                                  _draw_cells(_to_uint8(recon), labels, p_l)))

        steps.step("average pooling to 144 / 64", pooling)
    return rows, tiles


# --- output ----------------------------------------------------------------------------------------

def format_table(rows: list[Row]) -> str:
    def fmt(v, spec):
        return "" if v is None else ("inf" if v == math.inf else format(v, spec))
    table = [("method", "tokens", "px/token", "PSNR dB", "SSIM", "token cos", "time ms")]
    table += [(r.method, str(r.tokens), fmt(r.pixels_per_token, ".1f"), fmt(r.psnr, ".2f"), fmt(r.ssim, ".3f"),
               fmt(r.token_cosine, ".3f"), fmt(r.time_ms, ".2f")) for r in rows]
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
                        help="relevance box in the image's pixels for query-aware adaptive patches "
                             "(default: the sample's face, the centre of another image)")
    parser.add_argument("--out", default="vtok_demo.png",
                        help="PNG panel (several images: NAME_1.png, ...; default vtok_demo.png)")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help=f"shrink larger images to this longer side first (default {MAX_SIDE})")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _panel_path(out: str, index: int, count: int) -> Path:
    path = Path(out)
    return path if count == 1 else path.with_name(f"{path.stem}_{index + 1}{path.suffix or '.png'}")


def run_demo(args) -> int:
    """Run the demo for parsed ``demo`` arguments: table on stdout, panel PNG, optional JSON."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: no CUDA device is available here; use --device cpu")
    if args.max_side < 64:
        return _error(f"--max-side must be >= 64 pixels, got {args.max_side}")
    try:
        focus = None if args.focus is None else parse_focus(args.focus)
    except ValueError as exc:
        return _error(str(exc))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    paths = [Path(p) for p in args.images] or [sample_image_path()]
    records = []
    for i, path in enumerate(paths):
        try:
            image, scale = load_image(path, args.max_side)
        except (OSError, ValueError) as exc:
            return _error(f"cannot read image {str(path)!r}: {exc}")
        box = focus if focus is not None else (SAMPLE_FOCUS if not args.images else None)
        box = None if box is None else tuple(v * scale for v in box)
        start = time.perf_counter()
        rows, tiles = run(image, focus=box, device=device, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        panel = _panel_path(args.out, i, len(paths))
        compose_panel(tiles, panel)
        print(f"\n## {path.name}: {image.shape[2]}x{image.shape[1]} px on {device} ({seconds:.1f} s)")
        print(format_table(rows))
        print(f"panel written to {panel}")
        records.append({"image": str(path), "size": [image.shape[1], image.shape[2]], "device": str(device),
                        "seconds": seconds, "rows": [dataclasses.asdict(r) for r in rows],
                        "tiles": [title for title, _ in tiles], "panel": str(panel)})
    if args.json:
        Path(args.json).write_text(json.dumps(records if len(records) > 1 else records[0], indent=1,
                                              default=lambda v: None))
        print(f"table written to {args.json}")
    return 0


def main(argv=None) -> int:
    """``demo`` alone: ``python -m vtok_fast.measure.demo [IMAGE ...]``."""
    parser = argparse.ArgumentParser(prog="vtok-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    return run_demo(parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
