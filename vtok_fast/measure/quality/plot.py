"""Accuracy-against-tokens panels drawn with PIL (no plotting library needed).

``plot_curves(rows, path, title)``: one panel for the overall accuracy and one per question type
(the keys of the rows' ``per_type``), accuracy (0..1) against the image tokens the language model
sees (log2 axis), one line per ``(method, positions)``: colour per method, solid for
``"original"`` positions, dashed for ``"compact"``; the uncompressed point (``method="none"``) is
a black dot on every panel. ``rows`` are ``curves.run`` / ``evaluate`` dicts with ``method``,
``positions``, ``image_tokens``, ``accuracy`` and ``per_type``. Writes a PNG and returns its path.
"""
from __future__ import annotations

import math
from pathlib import Path

COLOURS = {"random": (120, 120, 120), "pool": (31, 119, 180), "tome": (255, 127, 14), "attn_topk": (44, 160, 44),
           "visionzip": (214, 39, 40), "prumerge": (148, 103, 189), "dart": (140, 86, 75), "fastv": (227, 119, 194),
           "pyramiddrop": (23, 190, 207)}
PANEL_W, PANEL_H, MARGIN = 330, 250, 42


def _colour(method: str, i: int):
    palette = list(COLOURS.values())
    return COLOURS.get(method, palette[i % len(palette)])


def _dashed(draw, points, fill, width, dash: float = 7.0):
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            a, b = k / steps, min(1.0, (k + 1) / steps)
            draw.line((x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)),
                      fill=fill, width=width)


def _series(rows, key):
    """``{(method, positions): [(tokens, accuracy), ...]}`` sorted by tokens, for one panel key."""
    out = {}
    for r in rows:
        value = r["accuracy"] if key == "overall" else r["per_type"].get(key)
        if value is None or r["method"] == "none":
            continue
        out.setdefault((r["method"], r["positions"]), []).append((r["image_tokens"], value))
    return {k: sorted(v) for k, v in out.items()}


def _panel(draw, font, box, key, rows, xmin, xmax, order):
    x0, y0 = box
    left, top, right, bottom = x0 + MARGIN, y0 + 24, x0 + PANEL_W - 12, y0 + PANEL_H - 30
    span = max(math.log2(xmax) - math.log2(xmin), 1e-9)

    def xy(tokens, acc):
        return (left + (math.log2(tokens) - math.log2(xmin)) / span * (right - left), bottom - acc * (bottom - top))

    draw.text((x0 + MARGIN, y0 + 4), key, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline=(90, 90, 90))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = xy(xmin, tick)[1]
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((x0 + 6, y - 6), f"{tick:.2f}", fill="black", font=font)
    tokens = xmin
    while tokens <= xmax:
        x = xy(tokens, 0)[0]
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 6, bottom + 6), str(tokens), fill="black", font=font)
        tokens *= 2
    for (method, positions), pts in _series(rows, key).items():
        line = [xy(t, a) for t, a in pts]
        colour = _colour(method, order.index(method))
        if positions == "compact":
            _dashed(draw, line, colour, 2)
        elif len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    for r in rows:
        if r["method"] == "none":
            value = r["accuracy"] if key == "overall" else r["per_type"].get(key)
            if value is not None:
                x, y = xy(r["image_tokens"], value)
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill="black")


def plot_curves(rows: list[dict], path, title: str = "") -> Path:
    """Write the panels of ``rows`` to ``path`` (PNG); see the module docstring."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("rows must hold at least one evaluated point")
    keys = ["overall", *dict.fromkeys(t for r in rows for t in r["per_type"])]
    order = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    cols = 4
    grid_rows = math.ceil((len(keys) + 1) / cols)
    image = Image.new("RGB", (cols * PANEL_W, 30 + grid_rows * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((10, 8), title, fill="black", font=font)
    counts = [r["image_tokens"] for r in rows]
    xmin, xmax = 2 ** math.floor(math.log2(min(counts))), 2 ** math.ceil(math.log2(max(counts)))
    for i, key in enumerate(keys):
        _panel(draw, font, ((i % cols) * PANEL_W, 30 + (i // cols) * PANEL_H), key, rows, xmin, max(xmax, xmin * 2), order)
    lx, ly = (len(keys) % cols) * PANEL_W + 20, 30 + (len(keys) // cols) * PANEL_H + 20
    draw.text((lx, ly), "x: image tokens the LLM sees; y: accuracy", fill="black", font=font)
    draw.text((lx, ly + 16), "solid: original positions, dashed: compact", fill="black", font=font)
    draw.ellipse((lx, ly + 36, lx + 8, ly + 44), fill="black")
    draw.text((lx + 14, ly + 34), "uncompressed", fill="black", font=font)
    for j, method in enumerate(order):
        y = ly + 54 + 16 * j
        draw.line((lx, y + 5, lx + 24, y + 5), fill=_colour(method, j), width=3)
        draw.text((lx + 30, y), method, fill="black", font=font)
    path = Path(path)
    image.save(path)
    return path
