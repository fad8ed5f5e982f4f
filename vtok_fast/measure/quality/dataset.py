"""A procedural visual-question dataset whose answers depend on what token compression can lose.

Each sample is one scene and one question with a single-word answer. Scenes are ``size x size``
RGB images (``size`` a multiple of 64, default 64) on a flat background of CLIP's mean colour (so
empty patches are ~0 after the processor's normalisation), split into a 4 x 4 grid of cells. The
twelve non-corner cells may hold a shape (one of ``KINDS`` in one of ``COLOURS``, ~3/4 of a cell
wide, jittered by up to ``size/64`` px); one of the four corner cells holds a small letter (a
3 x 5 px bitmap of ``GLYPHS`` at 64 px, scaled with ``size``) drawn inside the cell's outermost
``size/8``-px square, so at 8 px patches the letter lies in a single patch. The other corners
are empty, except in ``letter_at`` scenes, which hold a letter in each corner.

Question types (``QUESTION_TYPES``); questions are a few words, the answer one word of
``ANSWERS``; in a cell word ``r<row>c<column>`` rows and columns count 0..3 from the top left:

- ``color_at`` (position): ``colour r2c3`` -> the colour of the shape in that cell (one word of
  ``CELL_WORDS`` per cell).
- ``count`` (global): ``count red`` -> how many shapes are red (``0``..``4``).
- ``glyph`` (fine detail, the thing pooling loses): ``corner letter`` -> the letter in the corner.
- ``relation`` (layout): ``red left blue`` / ``red above blue`` -> ``yes`` / ``no``: is the red
  shape left of (above) the blue one; both colours occur once, in different columns (rows).
- ``letter_at`` (query-dependent fine detail, the harder type): ``letter topright`` -> the
  letter in the named corner (one word of ``CORNER_WORDS``), with a letter in every corner: one
  patch of 64 holds the answer and the question says which, so a query-aware token selection
  should win here.

Cells and corners are named by one word each. Named by a row word and a column word (``letter r0
c3``, ``colour r2 c3``), the 2-layer reference decoders read the column word and often missed the
row word before it: ``letter_at`` 54 % held-out on LLaVA after the training budget, and on
Qwen2-VL ``color_at`` errors were almost all a shape in the asked column but another row.

Not in ``QUESTION_TYPES`` (``ALL_TYPES`` holds them; ``make_sample`` draws them): ``shape_at``
(``shape r2c3`` -> the kind of the shape in that cell) and ``count_kind`` (``count red circle``
-> 0..3, among distractors sharing one attribute). Telling the four kinds apart at 64 px with
8-px patches did not train within the reference model's budget (a first run sat at chance on
``shape_at`` after 250 steps), so the default set leaves them out.

Answers are balanced within each type (count and relation answers are drawn first, then a scene
is built that has them). ``make_sample(..., more=True)`` adds further questions about the same
scene (one per other type of ``QUESTION_TYPES``, answers not balanced) for multi-question
training.

Determinism: sample ``i`` of stream ``seed`` is drawn from ``numpy.random.default_rng([seed,
i])`` (PCG64, stable across numpy versions) and rendered with PIL's aliased (non-antialiased)
primitives, so it is the same bytes for any ``n``, machine and run; its type is
``types[i % len(types)]``, so every type has ``n // len(types)`` samples or one more. Different
seeds give independent streams (training reads one, the held-out set another).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

GRID = 4  # cells per side
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (230, 210, 40),
       "magenta": (210, 60, 200), "cyan": (40, 200, 210)}
KINDS = ("circle", "square", "triangle", "diamond")
DIGITS = tuple(str(d) for d in range(10))  # count answers
GLYPHS = ("A", "C", "E", "F", "H", "L", "P", "T", "U", "Y")  # 3 x 5 px letters, answers of ``glyph``
BACKGROUND = (123, 117, 104)  # the CLIP mean: empty patches are ~0 after normalisation
GLYPH_RGB = (255, 255, 255)
QUESTION_TYPES = ("color_at", "count", "glyph", "relation", "letter_at")
ALL_TYPES = QUESTION_TYPES + ("shape_at", "count_kind")
ANSWERS = COLOURS + KINDS + DIGITS + GLYPHS + ("yes", "no")
CORNERS = ((0, 0), (0, GRID - 1), (GRID - 1, 0), (GRID - 1, GRID - 1))
CORNER_WORDS = ("topleft", "topright", "bottomleft", "bottomright")  # one word per corner of ``CORNERS``
CELL_WORDS = tuple(f"r{r}c{c}" for r in range(GRID) for c in range(GRID))  # one word per cell, row-major
QUESTION_WORDS = ("colour", "shape", "count", "corner", "letter", "left", "above") + CELL_WORDS + CORNER_WORDS
SHAPE_CELLS = tuple((r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in CORNERS)
MAX_SHAPES = 8

# 3 x 5 bitmaps, rows top to bottom.
FONT = {"A": ("010", "101", "111", "101", "101"), "C": ("111", "100", "100", "100", "111"),
        "E": ("111", "100", "111", "100", "111"), "F": ("111", "100", "111", "100", "100"),
        "H": ("101", "101", "111", "101", "101"), "L": ("100", "100", "100", "100", "111"),
        "P": ("111", "101", "111", "100", "100"), "T": ("111", "010", "010", "010", "010"),
        "U": ("101", "101", "101", "101", "111"), "Y": ("101", "101", "010", "010", "010")}


@dataclass(frozen=True)
class Shape:
    """A shape in cell ``(row, col)``."""
    row: int
    col: int
    colour: str
    kind: str


@dataclass(frozen=True)
class Scene:
    """Shapes in distinct non-corner cells, and the letter ``glyph`` in corner ``corner`` (an
    index into ``CORNERS``) at pixel offset ``offset`` (in 64-px units) inside that corner's outer
    patch; ``jitter``: each shape's offset in 64-px units."""
    shapes: tuple[Shape, ...]
    glyph: str
    corner: int
    offset: tuple[int, int]
    jitter: tuple[tuple[int, int], ...]
    others: tuple[tuple[int, str], ...] = ()  # (corner, letter) of further corner letters


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    ``image``: ``(size, size, 3)`` uint8. ``question``: space-separated words (no image token).
    ``answer``: one word of ``ANSWERS``. ``qtype``: one of ``QUESTION_TYPES``. ``region``: the
    pixel boxes ``(x0, y0, x1, y1)`` (end-exclusive) that hold the answer, or ``()`` when the
    answer depends on the whole image (``count``, ``count_kind``). ``more``: further
    ``(question, answer, qtype)`` about the same image (``make_sample(..., more=True)``), one per
    other type when the scene allows it, answers not balanced (for multi-question training)."""
    image: np.ndarray
    question: str
    answer: str
    qtype: str
    region: tuple[tuple[int, int, int, int], ...]
    more: tuple[tuple[str, str, str], ...] = ()


def cell_word(row: int, col: int) -> str:
    """The one word that names a grid cell in questions (``r2c3``: row 2, column 3)."""
    return CELL_WORDS[row * GRID + col]


def cell_box(row: int, col: int, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` of a grid cell."""
    s = size // GRID
    return col * s, row * s, (col + 1) * s, (row + 1) * s


def glyph_box(corner: int, size: int) -> tuple[int, int, int, int]:
    """Pixel box of the outer ``size/8``-px square of a corner cell, where its letter is drawn."""
    p = size // 8
    row, col = CORNERS[corner]
    x0 = 0 if col == 0 else size - p
    y0 = 0 if row == 0 else size - p
    return x0, y0, x0 + p, y0 + p


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, jitter: tuple[int, int], size: int) -> None:
    k = size // 64
    x0, y0, _, _ = cell_box(shape.row, shape.col, size)
    x0, y0 = x0 + (2 + jitter[0]) * k, y0 + (2 + jitter[1]) * k
    w = 12 * k - 1
    fill = RGB[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x0 + w, y0 + w), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0 + k, y0 + k, x0 + w - k, y0 + w - k), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon(((x0 + w / 2, y0), (x0 + w, y0 + w), (x0, y0 + w)), fill=fill)
    else:  # diamond
        draw.polygon(((x0 + w / 2, y0), (x0 + w, y0 + w / 2), (x0 + w / 2, y0 + w), (x0, y0 + w / 2)), fill=fill)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a ``(size, size, 3)`` uint8 array (``size`` a positive multiple of 64)."""
    if size <= 0 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, jit in zip(scene.shapes, scene.jitter):
        _draw_shape(draw, shape, jit, size)
    pixels = np.array(image)
    k = size // 64
    for corner, letter in ((scene.corner, scene.glyph), *scene.others):
        x0, y0, _, _ = glyph_box(corner, size)
        bitmap = np.array([[ch == "1" for ch in row] for row in FONT[letter]])
        bitmap = bitmap.repeat(k, 0).repeat(k, 1)
        ox, oy = x0 + scene.offset[0] * k, y0 + scene.offset[1] * k
        pixels[oy:oy + bitmap.shape[0], ox:ox + bitmap.shape[1]][bitmap] = GLYPH_RGB
    return pixels


def _scene(rng: np.random.Generator, shapes: list[tuple[str, str]], first_cells=()) -> Scene:
    """Place ``(colour, kind)`` pairs in distinct non-corner cells, with a random letter. The first
    pairs go to ``first_cells`` (indices into ``SHAPE_CELLS``), the rest to random free cells."""
    free = [c for c in rng.permutation(len(SHAPE_CELLS)).tolist() if c not in first_cells]
    cells = list(first_cells) + free[:len(shapes) - len(first_cells)]
    placed = tuple(Shape(*SHAPE_CELLS[c], colour, kind) for c, (colour, kind) in zip(cells, shapes))
    jitter = tuple((int(a), int(b)) for a, b in rng.integers(-1, 2, size=(len(shapes), 2)))
    glyph = GLYPHS[rng.integers(len(GLYPHS))]
    corner = int(rng.integers(4))
    offset = (2, 1)  # a 3x5 glyph inside the 8x8 corner patch
    return Scene(placed, glyph, corner, offset, jitter)


def _random_shapes(rng: np.random.Generator, n: int, colours=COLOURS, kinds=KINDS) -> list[tuple[str, str]]:
    return [(colours[rng.integers(len(colours))], kinds[rng.integers(len(kinds))]) for _ in range(n)]


def _q_at(rng: np.random.Generator, attribute: str):
    """``color_at`` / ``shape_at``: an attribute of the shape in a named cell."""
    scene = _scene(rng, _random_shapes(rng, int(rng.integers(3, MAX_SHAPES + 1))))
    target = scene.shapes[int(rng.integers(len(scene.shapes)))]
    word = "colour" if attribute == "colour" else "shape"
    answer = target.colour if attribute == "colour" else target.kind
    return scene, f"{word} {cell_word(target.row, target.col)}", answer, [(target.row, target.col)]


def _q_count(rng: np.random.Generator):
    """``count``: shapes of one colour, the count drawn uniformly from 0..4 first."""
    colour, k = COLOURS[rng.integers(len(COLOURS))], int(rng.integers(0, 5))
    others = [c for c in COLOURS if c != colour]
    n_other = int(rng.integers(max(0, 2 - k), MAX_SHAPES - k + 1))
    shapes = _random_shapes(rng, k, (colour,)) + _random_shapes(rng, n_other, others)
    return _scene(rng, shapes), f"count {colour}", str(k), []


def _q_count_kind(rng: np.random.Generator):
    """``count_kind``: shapes of one colour and one kind (0..3), among 2-4 distractors that share
    exactly one of the two attributes and 0-2 that share neither."""
    colour, kind, k = COLOURS[rng.integers(len(COLOURS))], KINDS[rng.integers(len(KINDS))], int(rng.integers(0, 4))
    other_c, other_k = [c for c in COLOURS if c != colour], [t for t in KINDS if t != kind]
    shapes = [(colour, kind)] * k
    for _ in range(int(rng.integers(2, 5))):
        same_colour = bool(rng.integers(2))
        shapes += _random_shapes(rng, 1, (colour,), other_k) if same_colour else _random_shapes(rng, 1, other_c, (kind,))
    shapes += _random_shapes(rng, int(rng.integers(0, 3)), other_c, other_k)
    return _scene(rng, shapes), f"count {colour} {kind}", str(k), []


def _q_glyph(rng: np.random.Generator):
    """``glyph``: the letter drawn small in whichever corner holds it."""
    scene = _scene(rng, _random_shapes(rng, int(rng.integers(3, MAX_SHAPES + 1))))
    return scene, "corner letter", scene.glyph, "glyph"


def _q_relation(rng: np.random.Generator):
    """``relation``: is colour A left of (above) colour B; both occur once, in different columns
    (rows); the answer is drawn first."""
    a, b = (COLOURS[i] for i in rng.permutation(len(COLOURS))[:2])
    axis = int(rng.integers(2))  # 0: left of (columns), 1: above (rows)
    yes = bool(rng.integers(2))
    while True:
        i, j = (int(x) for x in rng.permutation(len(SHAPE_CELLS))[:2])
        if SHAPE_CELLS[i][1 - axis] != SHAPE_CELLS[j][1 - axis]:
            break
    if (SHAPE_CELLS[i][1 - axis] < SHAPE_CELLS[j][1 - axis]) != yes:
        i, j = j, i
    others = [c for c in COLOURS if c not in (a, b)]
    shapes = _random_shapes(rng, 1, (a,)) + _random_shapes(rng, 1, (b,))
    shapes += _random_shapes(rng, int(rng.integers(1, MAX_SHAPES - 1)), others)
    word = "left" if axis == 0 else "above"
    return _scene(rng, shapes, (i, j)), f"{a} {word} {b}", "yes" if yes else "no", [SHAPE_CELLS[i], SHAPE_CELLS[j]]


def _q_letter_at(rng: np.random.Generator):
    """``letter_at`` (query-dependent fine detail): a letter in each of the four corners; the
    question names one corner's cell."""
    scene = _scene(rng, _random_shapes(rng, int(rng.integers(3, MAX_SHAPES + 1))))
    letters = [GLYPHS[i] for i in rng.integers(len(GLYPHS), size=3)]
    others = tuple((c, letter) for c, letter in zip([c for c in range(4) if c != scene.corner], letters))
    scene = Scene(scene.shapes, scene.glyph, scene.corner, scene.offset, scene.jitter, others)
    target = int(rng.integers(4))
    letter = dict(((scene.corner, scene.glyph), *others))[target]
    return scene, f"letter {CORNER_WORDS[target]}", letter, "corner:" + str(target)


_MAKERS = {"color_at": lambda rng: _q_at(rng, "colour"), "count": _q_count, "glyph": _q_glyph,
           "relation": _q_relation, "shape_at": lambda rng: _q_at(rng, "kind"), "count_kind": _q_count_kind,
           "letter_at": _q_letter_at}


def _unique_pair(rng: np.random.Generator, scene: Scene, axis: int):
    """Two shapes whose colours occur once in ``scene``, in different columns (axis 0) or rows
    (axis 1), or ``None``."""
    colours = [s.colour for s in scene.shapes]
    single = [s for s in scene.shapes if colours.count(s.colour) == 1]
    pairs = [(a, b) for a in single for b in single
             if (a.col, a.row)[axis] != (b.col, b.row)[axis]]
    return pairs[int(rng.integers(len(pairs)))] if pairs else None


def scene_questions(rng: np.random.Generator, scene: Scene, skip: str) -> list[tuple[str, str, str]]:
    """One ``(question, answer, qtype)`` per type other than ``skip`` about ``scene`` (relation
    only when two single-colour shapes differ in the drawn axis), in random order."""
    out = []
    target = scene.shapes[int(rng.integers(len(scene.shapes)))]
    out.append((f"colour {cell_word(target.row, target.col)}", target.colour, "color_at"))
    target = scene.shapes[int(rng.integers(len(scene.shapes)))]
    out.append((f"shape {cell_word(target.row, target.col)}", target.kind, "shape_at"))
    colour = COLOURS[rng.integers(len(COLOURS))]
    out.append((f"count {colour}", str(sum(s.colour == colour for s in scene.shapes)), "count"))
    probe = scene.shapes[int(rng.integers(len(scene.shapes)))]
    colour, kind = (probe.colour, probe.kind) if rng.integers(2) else (colour, KINDS[rng.integers(len(KINDS))])
    out.append((f"count {colour} {kind}", str(sum(s.colour == colour and s.kind == kind for s in scene.shapes)),
                "count_kind"))
    if scene.others:
        corner, letter = ((scene.corner, scene.glyph), *scene.others)[int(rng.integers(4))]
        out.append((f"letter {CORNER_WORDS[corner]}", letter, "letter_at"))
    else:
        out.append(("corner letter", scene.glyph, "glyph"))
        out.append((f"letter {CORNER_WORDS[scene.corner]}", scene.glyph, "letter_at"))
    axis = int(rng.integers(2))
    pair = _unique_pair(rng, scene, axis)
    if pair:
        a, b = pair
        yes = (a.col, a.row)[axis] < (b.col, b.row)[axis]
        out.append((f"{a.colour} {('left', 'above')[axis]} {b.colour}", "yes" if yes else "no", "relation"))
    out = [q for q in out if q[2] != skip and q[2] in QUESTION_TYPES and q[1] in ANSWERS]
    return [out[i] for i in rng.permutation(len(out))]


def make_sample(seed: int, index: int, qtype: str, size: int = 64, more: bool = False) -> Sample:
    """Sample ``index`` of the stream ``seed``, of type ``qtype``, rendered at ``size`` px; with
    ``more``, also ``scene_questions`` about the same scene (drawn from a separate stream, so
    the sample itself is the same with or without them)."""
    if qtype not in _MAKERS:
        raise ValueError(f"qtype must be one of {ALL_TYPES}, got {qtype!r}")
    rng = np.random.default_rng([seed, index])
    scene, question, answer, cells = _MAKERS[qtype](rng)
    if isinstance(cells, str):  # "glyph": the letter's corner; "corner:i": corner i
        region = (glyph_box(scene.corner if cells == "glyph" else int(cells[7:]), size),)
    else:
        region = tuple(cell_box(r, c, size) for r, c in cells)
    extra = tuple(scene_questions(np.random.default_rng([seed, index, 1]), scene, qtype)) if more else ()
    return Sample(render(scene, size), question, answer, qtype, region, extra)


def make_dataset(n: int, seed: int, types: tuple[str, ...] = QUESTION_TYPES, size: int = 64, more: bool = False,
                 start: int = 0) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of stream ``seed``; sample ``i`` has type
    ``types[i % len(types)]``."""
    if n < 0 or not types:
        raise ValueError(f"need n >= 0 and at least one type, got n={n}, types={types}")
    return [make_sample(seed, i, types[i % len(types)], size, more) for i in range(start, start + n)]
