"""Token budgets: how many tokens one image costs in a vision encoder and in a VLM's language model.

``count_tokens(model, (H, W), *, compress=None, **options) -> TokenBudget`` reproduces each
model's own preprocessing arithmetic (resizing, crops, slices, tiles, unpadding, separators):

- ``"vit-b/16"``, ``"vit-l/14-336"``, ``"vit"``: a fixed patch grid on the image as given,
  ``(H // p) * (W // p)`` (floor: remainder pixels dropped, as timm and HF patchify; resize the
  image first to model a processor). ``patch_size=`` overrides p; ``"vit"`` needs it. There is no
  language model: ``llm_tokens`` is what the encoder hands on (CLS excluded).
- ``"llava-1.5"``: every image is resized to CLIP ViT-L/14's 336x336: 24x24 = 576 tokens, CLS
  dropped.
- ``"llava-next"``: anyres as ``transformers``' ``LlavaNextProcessor``: the pinpoint
  (``grid_pinpoints=``, default ``LLAVA_NEXT_PINPOINTS``, (height, width) multiples of 336) with
  the largest effective resolution ``min(int(W*s) * int(H*s), W*H)``, ``s = min(w/W, h/H)``
  (ties: least waste) is cut into 336x336 crops; ViT tokens = (1 base view + crops) x 576; LLM
  tokens = 576 (base) + the crops' grid unpadded to the image's aspect ratio + one newline per
  row.
- ``"llava-uhd"``: LLaVA-UHD v1 (its released ``slice_logic.py``): ``ceil(W*H / 336**2)`` slices
  (capped at 6; the candidates n-1, n, n+1, or n, n+1 for n <= 2, factorized into cols x rows),
  the grid with the smallest ``|log(W/H) - log(cols/rows)|``; every slice, and the thumbnail when
  there are several slices, is resized to about 576 patches of 14 px keeping its aspect ratio,
  and the resampler hands 64 tokens per view to the LLM. (The paper's ``,``/``\\n`` spatial-schema
  separators are not inserted by the released code and not counted.)
- ``"qwen2-vl"``: ``smart_resize`` (factor ``patch_size * merge_size`` = 28; ``min_pixels=`` and
  ``max_pixels=``, defaults the HF ``Qwen2VLImageProcessor``'s 3,136 and 1,003,520; Qwen's own
  utilities use ``max_pixels=12_845_056``); ViT tokens = 14-px patches, LLM tokens = after the
  2x2 merger. ``<|vision_start|>``/``<|vision_end|>`` are not counted.
- ``"qwen2.5-vl"``, ``"qwen3-vl"``: as ``"qwen2-vl"`` (the same ``Qwen2VLImageProcessor`` and its
  class defaults, ``min_pixels=`` 3,136 and ``max_pixels=`` 1,003,520), with 14-px (2.5) and 16-px
  (3, factor 32) patches. The released checkpoints' ``preprocessor_config.json`` set other bounds:
  Qwen2.5-VL ``max_pixels=12_845_056``, Qwen3-VL ``min_pixels=65_536, max_pixels=16_777_216``.
- ``"llava-onevision"``: anyres as ``transformers``' ``LlavaOnevisionProcessor`` for one image in
  the sample (with several, each gets the base view and a newline, 730 tokens): the pinpoint
  (``grid_pinpoints=``, default the 6x6 grid of multiples of 384) cut into 384x384 crops of SigLIP
  27x27 = 729 tokens; LLM tokens = 729 (base) + the crops' grid unpadded, shrunk bilinearly
  (``anyres_max=9``: when ``r = sqrt(h * w / (9 * 27**2)) > 1.1`` the grid becomes
  ``int(h // r) x int(w // r)``) + one newline per row.
- ``"internvl"`` (InternVL3/3.5): ``GotOcr2ImageProcessor.crop_to_patches``: ``min_patches=`` 1 to
  ``max_patches=`` 12 tiles of 448x448 in the grid closest to the aspect ratio, plus a thumbnail
  when there is more than one; InternViT 32x32 patches per tile, pixel shuffle to 16x16 = 256 LLM
  tokens per tile (``<img>``/``</img>`` not counted).
- ``"gemma3"``: every image resized to 896x896, SigLIP 64x64 patches, pooled to 16x16 = 256 LLM
  tokens. ``do_pan_and_scan=True`` (off by default, as in ``Gemma3Processor``) adds the crops of
  ``Gemma3ImageProcessor``'s pan-and-scan (``pan_and_scan_min_crop_size=`` 256,
  ``pan_and_scan_max_num_crops=`` 4, ``pan_and_scan_min_ratio_to_activate=`` 1.2), 256 tokens each
  (the prompt text and begin/end markers around each are not counted).
- ``"idefics3"``, ``"smolvlm"``: ``Idefics3ImageProcessor``/``SmolVLMImageProcessor``'s
  ``split_images`` with their class defaults: the longest side resized to ``longest_edge=`` 1456,
  sides rounded up to multiples of ``max_image_size=`` 364, then ``ceil(H/364) x ceil(W/364)``
  tiles plus the global image (just the global image when neither side exceeds 364, or with
  ``do_image_splitting=False``); ``image_seq_len=`` 169 LLM tokens per view (``<image>``
  placeholders; the ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>`` and
  ``\\n`` text tokens around them are not counted), ``image_seq_len * scale_factor**2`` (2) ViT
  tokens per view. Real checkpoints differ: SmolVLM-Instruct 384/1536 and 81 (scale 3), SmolVLM2
  512/2048 and 64 (scale 4).
- ``"deepseek-ocr"``: ``mode=`` ``"tiny"`` (512), ``"small"`` (640), ``"base"`` (1024),
  ``"large"`` (1280): one view, SAM 16-px patches, a 16x conv compressor to q x q (q = size/64),
  then ``(q + 1) * q + 1`` LLM tokens (a newline per row and a view separator). ``"gundam"``
  (default, the official configuration): a 1024 global view (273 tokens) plus, for an image
  larger than 640 on a side, 640x640 tiles chosen as InternVL's ``dynamic_preprocess``
  (``min_crops=2``, ``max_crops=6``), laid out as one grid with a newline per row.

``compress=`` counts the tokens after a vision-side compression of each view's tokens (each
crop, slice or tile: what the encoder/projector hands on, before the model adds newlines or
separators). It is ``(method, {budget})`` or the string ``"method:key=value,..."``, the budget in
the method's own terms, those of ``vtok_fast.compress`` (same names, defaults and rounding):

- ``("pool", {"stride": s, "mode": "avg" | "max" | "bilinear", "ceil_mode": False})``: s x s
  pooling of the token grid (default s = 2, mode ``"avg"``); avg/max floor odd grids (SigLIP
  27x27 -> 13x13) unless ``ceil_mode=True``; bilinear ceils them (LLaVA-Video: 27x27 -> 14x14).
- ``("pixel_shuffle", {"stride": s})``: s x s space-to-depth (default 2); s must divide the grid.
- ``("tome", {"keep": k})``, ``{"r": r}`` or ``{"ratio": f}``: merging to ``k``, ``n - r`` or
  ``round(f * n)`` tokens.
- ``("attn_topk" | "dart" | "prumerge", {"keep": k})`` or ``{"ratio": f}``: ``f`` is the fraction kept,
  ``round(f * n)`` (Python's round); ``prumerge`` adds its one token for the tokens not kept
  (``k + 1``). PruMerge's own budget (the IQR outliers) and PruMerge+'s spatial samples depend on
  the image: ``prumerge`` needs ``keep=`` or ``ratio=`` here, ``prumerge_plus`` is refused with
  the range of its possible counts.
- ``("visionzip", {"dominant": d, "contextual": c})``: ``d + c`` tokens (LLaVA-1.5's 64 = 54 +
  10; the official VisionZip code also forwards the CLS token).
- ``("fastv", {"ratio": R, "layer": K})`` (or ``keep=``): in the language model; FastV's ``R`` is
  the fraction *pruned* (default 0.5, ``FASTV_DEFAULT_RATIO``): from layer K on (default 2) the
  LLM sees ``round(N * (1 - R))`` of the N image tokens, newlines included.
- ``("pyramiddrop", {"layers": [K1, K2, ...], "ratios": [R1, R2, ...]})`` or ``{"ratio": R}`` (one
  for every stage; default 0.5, three stages, PyramidDrop's 4 stages of 8 layers at 32): in the
  language model, FastV in stages; ``R_s`` is the fraction of the *remaining* image tokens pruned
  at boundary ``s`` (PyramidDrop's λ = 1 − R_s kept): ``n_0 = N``, ``n_s = round(n_{s-1} * (1 −
  R_s))``. ``llm_tokens`` is the last stage's ``n``; ``stages`` lists every stage's count (the
  layers are labels only: the counts do not depend on the depth).

Grid methods keep a grid, so the model's layout is recomputed on the reduced grid (LLaVA-NeXT
and LLaVA-OneVision unpad the pooled crops, OneVision's ``anyres_max`` shrink then compares with
9 pooled views, DeepSeek-OCR adds a newline per pooled row). The views are LLaVA's 24x24,
OneVision's 27x27, Qwen's merged grid, InternVL's and Gemma 3's 16x16 (after the pixel shuffle
or the pooling) and Idefics3/SmolVLM's ``sqrt(image_seq_len)`` square, one per tile, crop or
thumbnail. Token-count methods leave no grid: LLaVA-NeXT and LLaVA-OneVision then use the
``flat`` layout (views concatenated, no unpadding, shrinking or newlines), DeepSeek-OCR drops its
row newlines (the view separator stays), and LLaVA-UHD's 64 resampler queries per view (not a
grid) accept only token-count methods. Keep counts are per view.

The count is arithmetic: it does not say the library can run the method inside that model.
``vtok_fast.patch.hf(model, compress=...)`` runs the vision methods in LLaVA-1.5 models
(``LlavaForConditionalGeneration``), and FastV / PyramidDrop in LLaVA-1.5 and the families of
``IN_LLM_FAMILIES`` (Gemma 3: while the sequence fits its sliding window, a note says so); for any
other model a compressed budget carries a ``notes`` line saying so (``vtok-fast budget`` prints it), as it does for ``fastv`` on
a ViT (no language model) and ``pixel_shuffle`` in LLaVA-1.5 (its projector takes 1024-channel
tokens, not the 4x wider ones).

Image sides are at most ``MAX_IMAGE_SIDE`` (2**31 - 1) pixels, so that every model's float
arithmetic stays finite.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

CLIP_SIZE = 336  # CLIP ViT-L/14-336: input side of LLaVA and of every LLaVA-NeXT crop
CLIP_PATCH = 14
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
UHD_MAX_PATCHES = 576  # LLaVA-UHD resizes every slice to about this many 14-px patches
UHD_MAX_SLICES = 6
UHD_QUERIES = 64  # resampler tokens per slice
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280
DEEPSEEK_OCR_MODES = {"tiny": 512, "small": 640, "base": 1024, "large": 1280, "gundam": None}
DEEPSEEK_OCR_PATCH = 16
DEEPSEEK_OCR_DOWNSAMPLE = 4  # the 16x compressor: two stride-2 convs, 4x per side
DEEPSEEK_OCR_GLOBAL = 1024  # gundam: global view side
DEEPSEEK_OCR_TILE = 640  # gundam: local tile side
SIGLIP_PATCH = 14
OV_TILE = 384  # LLaVA-OneVision: SigLIP-400M/14 at 384 px, 27x27 = 729 tokens per view
OV_PINPOINTS = tuple((OV_TILE * i, OV_TILE * j) for i in range(1, 7) for j in range(1, 7))
OV_ANYRES_MAX = 9  # "anyres_max_9"
QWEN3_VL_PATCH = 16
INTERNVL_TILE = 448
INTERNVL_PATCH = 14
INTERNVL_MAX_PATCHES_LIMIT = 1024  # the largest max_patches= counted (the tile search is quadratic)
GEMMA3_SIZE = 896
GEMMA3_TOKENS_SIDE = 16  # mm_tokens_per_image = 256: the 64x64 SigLIP map average-pooled 4x4
IDEFICS3_LONGEST_EDGE = 4 * 364  # Idefics3ImageProcessor / SmolVLMImageProcessor class defaults
IDEFICS3_TILE = 364
IDEFICS3_SEQ_LEN = 169  # Idefics3Processor / SmolVLMProcessor image_seq_len default
IDEFICS3_MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE for Idefics3/SmolVLM resizing

POOL_MODES = ("avg", "max", "bilinear")
GRID_METHODS = ("pool", "pixel_shuffle")
# method -> the budget terms it takes
BUDGET_TERMS = {
    "pool": ("stride", "mode", "ceil_mode"),
    "pixel_shuffle": ("stride",),
    "tome": ("keep", "r", "ratio"),
    "attn_topk": ("keep", "ratio"),
    "visionzip": ("dominant", "contextual"),
    "prumerge": ("keep", "ratio"),
    "prumerge_plus": ("keep", "ratio"),
    "dart": ("keep", "ratio", "pivots"),  # pivots does not change the count
    "fastv": ("keep", "ratio", "layer"),
    "pyramiddrop": ("layers", "ratios", "ratio"),
}
LLM_METHODS = ("fastv", "pyramiddrop")  # pruned inside the language model: the vision side is unchanged
PYRAMIDDROP_DEFAULT_RATIO = 0.5  # the fraction of the remaining image tokens pruned per stage (lambda = 0.5 kept)
PYRAMIDDROP_DEFAULT_STAGES = 3  # boundaries (4 stages), as the paper's layers 8, 16, 24 of 32
FASTV_DEFAULT_LAYER = 2
FASTV_DEFAULT_RATIO = 0.5  # FastV's R (the fraction pruned); vtok_fast.patch.hf_fastv's default too
MAX_IMAGE_SIDE = 2**31 - 1
# model families whose Hugging Face model vtok_fast.patch.hf(model, compress=...) can run a method in
IN_MODEL_FAMILIES = ("llava-1.5",)
# where vtok_fast.patch.hf compresses the image tokens after the family's projector (patch.families)
VISION_FAMILIES = ("llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl", "gemma3",
                   "idefics3", "smolvlm")
VISION_FAMILY_METHODS = ("pool", "tome", "dart", "attn_topk", "visionzip", "prumerge", "prumerge_plus")
# models whose Hugging Face model vtok_fast.patch.hf runs fastv / pyramiddrop in (vtok_fast.patch.hf_fastv)
IN_LLM_FAMILIES = (*IN_MODEL_FAMILIES, *VISION_FAMILIES)
VIT_MODELS = ("vit-b/16", "vit-l/14-336", "vit")


@dataclass(frozen=True)
class TokenBudget:
    """Token counts of one image.

    ``vit_tokens``: patch tokens the encoder produces, all views (crops, slices, tiles, base or
    thumbnail view) included, CLS excluded. ``llm_tokens``: image tokens the language model sees,
    the newline and separator tokens the model inserts included, begin/end-of-image markers
    excluded (after ``compress``). ``pixels_per_token``: ``H * W / llm_tokens`` of the image as
    given. ``breakdown``: ``(label, count)`` rows; the ``"ViT: "`` rows add up to ``vit_tokens``,
    the ``"LLM: "`` rows to ``llm_tokens``. ``stages``: ``(label, count)`` of the image tokens each
    stage of the language model sees (``pyramiddrop`` only, the first row the uncompressed span).
    ``uncompressed_llm_tokens``: ``llm_tokens`` without
    ``compress``; ``compress``: the normalized ``(method, {budget})`` or None. ``notes``: lines
    about the compression, e.g. that the library cannot run it inside this model.
    """

    model: str
    image_size: tuple[int, int]
    vit_tokens: int
    llm_tokens: int
    pixels_per_token: float
    breakdown: tuple[tuple[str, int], ...]
    uncompressed_llm_tokens: int
    compress: tuple[str, dict] | None = None
    notes: tuple[str, ...] = ()
    stages: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        height, width = self.image_size
        lines = [f"{self.model}, {height}x{width} image (HxW): {self.vit_tokens} ViT tokens, "
                 f"{self.llm_tokens} LLM tokens, {self.pixels_per_token:.1f} pixels per LLM token"]
        if self.compress is not None:
            lines.append(f"compressed with {format_compress(self.compress)}: "
                         f"{self.uncompressed_llm_tokens} -> {self.llm_tokens} LLM tokens")
        wide = max(len(label) for label, _ in self.breakdown)
        lines += [f"  {label:<{wide}}  {count:>7}" for label, count in self.breakdown]
        lines += [f"  stage {label}: {count} image tokens" for label, count in self.stages]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# --- compression specs -----------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_value(text: str):
    """A ``key=value`` value of a compress spec string: a bool, an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _need_int(method: str, key: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"compress {method}: {key} must be an integer >= {minimum}, got {value!r}")


def _need_one(method: str, params: dict, *keys: str) -> None:
    given = [k for k in keys if k in params]
    if len(given) != 1:
        raise ValueError(f"compress {method}: give exactly one of {', '.join(f'{k}=' for k in keys)}; "
                         f"got {', '.join(f'{k}=' for k in given) or 'none'}")


def _stage_ratios(params: dict) -> list:
    """PyramidDrop's fraction pruned at each stage boundary: ``ratios``, else ``ratio`` for each of
    the ``layers`` (default ``PYRAMIDDROP_DEFAULT_STAGES`` boundaries)."""
    if "ratios" in params:
        return params["ratios"]
    layers = params.get("layers")
    return [params["ratio"]] * (len(layers) if layers is not None else PYRAMIDDROP_DEFAULT_STAGES)


def _check_pyramiddrop(params: dict) -> None:
    if "ratio" in params and "ratios" in params:
        raise ValueError("compress pyramiddrop: give ratio= (every stage) or ratios= (one per stage), not both")
    layers = params.get("layers")
    if layers is not None:
        layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if not layers or not all(_is_int(k) and k >= 1 for k in layers) or any(a >= b for a, b in
                                                                                 zip(layers, layers[1:])):
            raise ValueError(f"compress pyramiddrop: layers must be strictly increasing integers >= 1, got "
                             f"{params['layers']!r}")
        params["layers"] = layers
    if "ratios" in params:
        ratios = list(params["ratios"]) if isinstance(params["ratios"], (list, tuple)) else [params["ratios"]]
        stages = len(layers) if layers is not None else len(ratios)
        if len(ratios) != stages or not ratios:
            raise ValueError(f"compress pyramiddrop: ratios must give one fraction per stage ({stages}), got "
                             f"{params['ratios']!r}")
        params["ratios"] = ratios
    else:
        params.setdefault("ratio", PYRAMIDDROP_DEFAULT_RATIO)
    ratios = _stage_ratios(params)
    if not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 <= r < 1 for r in ratios):
        raise ValueError(f"compress pyramiddrop: ratios (the fraction of the remaining image tokens pruned per "
                         f"stage) must be numbers in [0, 1), got {params.get('ratios', params.get('ratio'))!r}")


def _check_budget(method: str, params: dict) -> None:
    if method == "pyramiddrop":
        _check_pyramiddrop(params)
        return
    if method in GRID_METHODS:
        _need_int(method, "stride", params.setdefault("stride", 2), 1)
        if params.get("mode", "avg") not in POOL_MODES:
            raise ValueError(f"compress pool: mode must be one of {', '.join(POOL_MODES)}, "
                             f"got {params['mode']!r}")
        if not isinstance(params.get("ceil_mode", False), bool):
            raise ValueError(f"compress pool: ceil_mode must be True or False, got {params['ceil_mode']!r}")
        return
    if method == "visionzip":
        if "dominant" not in params or "contextual" not in params:
            raise ValueError("compress visionzip: give dominant= and contextual=, got "
                             f"{', '.join(f'{k}=' for k in params) or 'none'}")
        _need_int(method, "dominant", params["dominant"], 0)
        _need_int(method, "contextual", params["contextual"], 0)
        if params["dominant"] + params["contextual"] < 1:
            raise ValueError("compress visionzip: dominant + contextual must be >= 1, got 0")
        return
    if method in ("prumerge", "prumerge_plus") and "keep" not in params and "ratio" not in params:
        raise ValueError(f"compress {method}: its own budget (the CLS-attention IQR outliers, about "
                         "32 of 576 on LLaVA-1.5) depends on the image; give keep= or ratio= to count "
                         "a fixed budget")
    if method == "fastv" and "keep" not in params:
        params.setdefault("ratio", FASTV_DEFAULT_RATIO)
    _need_one(method, params, *(("keep", "r", "ratio") if method == "tome" else ("keep", "ratio")))
    if "r" in params:
        _need_int(method, "r", params["r"], 0)
    if "keep" in params:
        _need_int(method, "keep", params["keep"], 1)
    if "layer" in params:
        _need_int(method, "layer", params["layer"], 1)
    if "ratio" in params:
        ratio = params["ratio"]
        number = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool)
        if method == "fastv" and not (number and 0 <= ratio < 1):
            raise ValueError(f"compress fastv: ratio (the fraction pruned) must be a number in [0, 1), "
                             f"got {ratio!r}")
        if method != "fastv" and not (number and 0 < ratio <= 1):
            raise ValueError(f"compress {method}: ratio (the fraction kept) must be a number in (0, 1], "
                             f"got {ratio!r}")


def parse_compress(spec) -> tuple[str, dict]:
    """Normalize a compression spec to ``(method, {budget})`` and validate it.

    Accepts ``(method, {budget})`` or ``"method:key=value,..."`` (``"pool:stride=2"``,
    ``"attn_topk:ratio=0.25"``, ``"pool:stride=2,mode=bilinear"``).
    """
    if isinstance(spec, str):
        method, _, rest = spec.partition(":")
        params = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, value = item.partition("=")
            if not equals:
                raise ValueError(f"compress={spec!r}: expected key=value after the method name, got {item!r}")
            params[key.strip()] = parse_value(value.strip())
    elif (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
          and isinstance(spec[1], dict)):
        method, params = spec[0], dict(spec[1])
    else:
        raise TypeError("compress must be (method, {budget}) or 'method:key=value,...', "
                        f"got {spec!r}")
    method = method.strip()
    if method not in BUDGET_TERMS:
        raise ValueError(f"compress method must be one of {', '.join(BUDGET_TERMS)}, got {method!r}")
    unknown = sorted(set(params) - set(BUDGET_TERMS[method]))
    if unknown:
        raise ValueError(f"compress {method} takes {', '.join(BUDGET_TERMS[method])}; "
                         f"got unknown {', '.join(unknown)}")
    _check_budget(method, params)
    return method, params


def format_compress(spec: tuple[str, dict]) -> str:
    method, params = spec
    return f"{method}({', '.join(f'{k}={v}' for k, v in params.items())})"


def _budget(method: str, params: dict, n: int, what: str) -> int:
    """The count a token-count budget asks for out of ``n`` tokens."""
    if "r" in params:
        if params["r"] >= n:
            raise ValueError(f"compress tome: r={params['r']} removes every one of the {n} tokens of {what}")
        return n - params["r"]
    if "ratio" in params:  # FastV's R is the fraction pruned; the vision methods' the fraction kept
        kept = 1 - params["ratio"] if method == "fastv" else params["ratio"]
        keep = round(n * kept)
        if keep < 1:
            raise ValueError(f"compress {method}: ratio={params['ratio']} keeps no token of the {n} of {what}")
        return keep
    keep = params["keep"] if "keep" in params else params["dominant"] + params["contextual"]
    if keep > n:
        raise ValueError(f"compress {method}: a budget of {keep} tokens is more than the {n} tokens of {what}")
    return keep


def _keep(method: str, params: dict, n: int, what: str) -> int:
    """Tokens out of ``n`` after a token-count method (PruMerge adds its token for the rest)."""
    keep = _budget(method, params, n, what)
    if method == "prumerge_plus":
        step = max(1, int(int(1 / (keep / n)) / 3))
        samples = -(-(n - 1) // step)
        raise ValueError(f"compress prumerge_plus: its count depends on the image (the {samples} spatial "
                         f"samples overlap the top {keep} of {what} by attention): between "
                         f"{max(keep, samples) + 1} and {keep + samples + 1}; count prumerge for a fixed one")
    return keep + 1 if method == "prumerge" else keep


def _reduce_grid(spec, h: int, w: int, what: str) -> tuple[int, tuple[int, int] | None]:
    """``(count, grid)`` of an h x w token grid after ``spec``; grid None when no longer a grid."""
    if spec is None or spec[0] in LLM_METHODS:
        return h * w, (h, w)
    method, params = spec
    if method in GRID_METHODS:
        s = params["stride"]
        if method == "pool":
            if s > h or s > w:
                raise ValueError(f"compress pool: stride={s} is larger than the {h}x{w} token grid of {what}")
            ceil = params.get("mode", "avg") == "bilinear" or params.get("ceil_mode", False)
            grid = (-(-h // s), -(-w // s)) if ceil else (h // s, w // s)
        else:
            if h % s or w % s:
                raise ValueError(f"compress pixel_shuffle: stride={s} must divide the {h}x{w} token "
                                 f"grid of {what}")
            grid = (h // s, w // s)
        return grid[0] * grid[1], grid
    return _keep(method, params, h * w, what), None


def _reduce_count(spec, n: int, what: str) -> int:
    """Tokens left of ``n`` tokens that form no grid."""
    if spec is None or spec[0] in LLM_METHODS:
        return n
    if spec[0] in GRID_METHODS:
        raise ValueError(f"compress {spec[0]} needs a token grid, but {what} is {n} tokens without one")
    return _keep(*spec, n, what)


def _grid_text(spec, h: int, w: int, n: int, grid) -> str:
    """How an h x w grid came out of the compression, for the breakdown."""
    if spec is None or spec[0] in LLM_METHODS:
        return f"{h}x{w}"
    if grid is not None:
        return f"{grid[0]}x{grid[1]} ({format_compress(spec)} of {h}x{w})"
    return f"{n} of {h}x{w} ({format_compress(spec)})"


def _notes(model: str, spec) -> tuple[str, ...]:
    """What the library can and cannot run of ``spec`` in ``model`` (the budget counts either)."""
    if spec is None:
        return ()
    method = spec[0]
    if model in VIT_MODELS:
        if method not in LLM_METHODS:
            return ()  # vtok_fast.compress runs every vision method on the encoder's tokens
        return (f"{method} prunes inside a language model; {model} has none: the count is what one placed after "
                "this encoder would see from layer K on",)
    if method in LLM_METHODS and model in IN_LLM_FAMILIES:
        if model == "gemma3":
            return (f"vtok_fast.patch.hf runs {method} in Gemma 3 while the prompt and the generated tokens fit "
                    "its sliding window (1024 tokens in Gemma 3 4B and larger; a ValueError beyond it)",)
        return ()
    if method in LLM_METHODS:
        return (f"vtok_fast.patch.hf(model, compress=...) runs {method} in {', '.join(IN_LLM_FAMILIES)} models, not "
                f"in {model}: this count is arithmetic, the library cannot run {method} in that model",)
    if model in VISION_FAMILIES:
        if method in VISION_FAMILY_METHODS:
            return ()
        return (f"vtok_fast.patch.hf runs {', '.join(VISION_FAMILY_METHODS)} on the image tokens of {model}, not "
                f"{method} (it makes tokens wider than the language model takes): this count is arithmetic",)
    if model not in IN_MODEL_FAMILIES:
        return (f"vtok_fast.patch.hf(model, compress=...) runs {method} inside LLaVA-1.5 models only, not in "
                f"{model}: this count is arithmetic, the library cannot run {method} in that model",)
    if method == "pixel_shuffle":
        return ("pixel_shuffle makes tokens stride**2 times wider: vtok_fast.patch.hf runs it in a LLaVA model "
                "only when the projector takes that width (LLaVA-1.5's takes 1024 channels)",)
    return ()


# --- models ----------------------------------------------------------------------------------

def _fixed_grid(size, spec, *, patch_size):
    height, width = size
    if not _is_int(patch_size) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    gh, gw = height // patch_size, width // patch_size
    if gh == 0 or gw == 0:
        raise ValueError(f"image_size {height}x{width} is smaller than one patch of patch_size={patch_size}")
    n, grid = _reduce_grid(spec, gh, gw, "the patch grid")
    vit = [(f"{gh}x{gw} patches of {patch_size} px (CLS not counted)", gh * gw)]
    llm = [(f"{_grid_text(spec, gh, gw, n, grid)} tokens handed on (no language model)", n)]
    return vit, llm


def _llava15(size, spec):
    g = CLIP_SIZE // CLIP_PATCH
    n, grid = _reduce_grid(spec, g, g, "the 24x24 view")
    vit = [(f"{CLIP_SIZE}x{CLIP_SIZE} view (every image is resized to it), {g}x{g} patches of "
            f"{CLIP_PATCH} px (CLS dropped)", g * g)]
    return vit, [(f"{_grid_text(spec, g, g, n, grid)} image tokens", n)]


def _best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's pinpoint choice: largest effective resolution, then least waste."""
    best, best_effective, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = h * w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best  # never None: a zero effective resolution still ties with the initial 0


def _unpad(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """The crops' token grid with LLaVA-NeXT's padding rows (or columns) removed."""
    if width / height > grid_w / grid_h:  # the image is wider: rows were padded
        new_h = int(round(height * (grid_w / width), 7))
        return grid_h - 2 * ((grid_h - new_h) // 2), grid_w
    new_w = int(round(width * (grid_h / height), 7))
    return grid_h, grid_w - 2 * ((grid_w - new_w) // 2)


def _pinpoints(value, tile: int = CLIP_SIZE) -> tuple[tuple[int, int], ...]:
    """``grid_pinpoints=`` as (height, width) pairs of positive multiples of ``tile``."""
    try:
        points = tuple((h, w) for h, w in value)
    except (TypeError, ValueError):
        raise TypeError(f"grid_pinpoints must be (height, width) pairs, got {value!r}") from None
    if not points or any(not (_is_int(v) and 0 < v <= MAX_IMAGE_SIDE and v % tile == 0)
                         for p in points for v in p):
        raise ValueError(f"grid_pinpoints must be (height, width) pairs of positive multiples of "
                         f"{tile} up to {MAX_IMAGE_SIDE}, got {value!r}")
    return points


def _anyres_views(size, pinpoints, tile: int, patch: int):
    """LLaVA-NeXT / OneVision anyres: ``(rows, cols, g, vit)`` for the pinpoint closest to
    ``size``: a rows x cols grid of ``tile``-px crops besides the base view, g x g patches each,
    and the ViT lines of the breakdown."""
    best_h, best_w = _best_resolution(*size, pinpoints)
    rows, cols = best_h // tile, best_w // tile
    crops, g = rows * cols, tile // patch
    vit = [(f"base view {tile}x{tile}, {g}x{g} patches of {patch} px", g * g),
           (f"{crops} crops of {tile}x{tile} ({rows}x{cols} for the {best_h}x{best_w} "
            f"pinpoint), {g}x{g} patches each", crops * g * g)]
    return rows, cols, g, vit


def _anyres_llm(spec, g: int, uh: int, uw: int, label: str) -> list[tuple[str, int]]:
    """The LLM lines of an anyres image: the base view's g x g grid and the unpadded uh x uw grid
    of the crops (``label``), each reduced by ``spec`` as ``vtok_fast.patch.hf`` does (after the
    projector and the packing: the newline closing each of the uh rows is kept)."""
    n, grid = _reduce_grid(spec, g, g, f"the base view's {g}x{g} grid")
    if uh * uw == 0:  # no grid token of the crops survives unpadding (a sliver of an image): newlines only
        return [(f"base view {_grid_text(spec, g, g, n, grid)}", n), ("one newline per row", uh)]
    m, crops = _reduce_grid(spec, uh, uw, f"the crops' unpadded {uh}x{uw} grid")
    return [(f"base view {_grid_text(spec, g, g, n, grid)}", n), (f"{label}: {_grid_text(spec, uh, uw, m, crops)}", m),
            ("one newline per row", uh)]


def _llava_next(size, spec, *, grid_pinpoints=LLAVA_NEXT_PINPOINTS):
    height, width = size
    rows, cols, g, vit = _anyres_views(size, _pinpoints(grid_pinpoints), CLIP_SIZE, CLIP_PATCH)
    uh, uw = _unpad(height, width, rows * g, cols * g)
    return vit, _anyres_llm(spec, g, uh, uw, f"crops {rows * g}x{cols * g} unpadded to {uh}x{uw}")


def _uhd_grid(height: int, width: int) -> tuple[int, int]:
    """LLaVA-UHD's slice grid ``(cols, rows)``."""
    n = min(math.ceil(width * height / (CLIP_SIZE * CLIP_SIZE)), UHD_MAX_SLICES)
    candidates = (n, n + 1) if n <= 2 else (n - 1, n, n + 1)
    log_ratio = math.log(width / height)
    best, best_error = (1, 1), math.inf
    for count in candidates:
        for cols in range(1, count + 1):
            if count % cols == 0:
                error = abs(math.log(cols / (count / cols)) - log_ratio)
                if error < best_error:
                    best, best_error = (cols, count // cols), error
    return best


def _uhd_patches(height: int, width: int) -> tuple[int, int]:
    """Patch grid LLaVA-UHD resizes a slice to: about 576 patches, the slice's aspect ratio."""
    scale = math.sqrt(UHD_MAX_PATCHES * (CLIP_PATCH / height) * (CLIP_PATCH / width))
    return (max(min(math.floor(scale * height / CLIP_PATCH), UHD_MAX_PATCHES), 1),
            max(min(math.floor(scale * width / CLIP_PATCH), UHD_MAX_PATCHES), 1))


def _llava_uhd(size, spec):
    height, width = size
    cols, rows = _uhd_grid(height, width)
    n = _reduce_count(spec, UHD_QUERIES, f"a view's {UHD_QUERIES} resampler tokens")
    if cols * rows == 1:
        ph, pw = _uhd_patches(height, width)
        return ([(f"one slice (the image) resized to {ph}x{pw} patches of {CLIP_PATCH} px", ph * pw)],
                [(f"{n} resampler tokens", n)])
    slices = cols * rows
    sh, sw = _uhd_patches(height // rows, width // cols)
    th, tw = _uhd_patches(height, width)
    vit = [(f"{slices} slices of {height // rows}x{width // cols} ({cols} cols x {rows} rows), each "
            f"resized to {sh}x{sw} patches of {CLIP_PATCH} px", slices * sh * sw),
           (f"thumbnail resized to {th}x{tw} patches", th * tw)]
    return vit, [(f"{slices} slices x {n} resampler tokens", slices * n),
                 (f"thumbnail: {n} resampler tokens", n)]


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                  family: str = "Qwen2-VL"):
    """Qwen2-VL's resize: multiples of ``factor``, pixel count in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image_size {height}x{width}: {family} needs an aspect ratio below 200, "
                         f"got {max(height, width) / min(height, width):.1f}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _qwen_vl(family: str, size, spec, *, min_pixels, max_pixels, patch_size, merge_size):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL: ``smart_resize`` then the merger (``family`` names errors)."""
    area, side = MAX_IMAGE_SIDE**2, MAX_IMAGE_SIDE
    for name, value, limit in (("min_pixels", min_pixels, area), ("max_pixels", max_pixels, area),
                               ("patch_size", patch_size, side), ("merge_size", merge_size, side)):
        if not _is_int(value) or not 1 <= value <= limit:
            shown = _short(value) if _is_int(value) else repr(value)
            raise ValueError(f"{name} must be a positive integer <= {limit}, got {shown}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels must be <= max_pixels, got {min_pixels} > {max_pixels}")
    rh, rw = _smart_resize(*size, patch_size * merge_size, min_pixels, max_pixels, family)
    gh, gw = rh // patch_size, rw // patch_size
    mh, mw = gh // merge_size, gw // merge_size
    n, grid = _reduce_grid(spec, mh, mw, f"the {mh}x{mw} merged grid")
    vit = [(f"resized to {rh}x{rw} (smart_resize to {min_pixels}..{max_pixels} pixels), {gh}x{gw} "
            f"patches of {patch_size} px", gh * gw)]
    return vit, [(f"{_grid_text(spec, mh, mw, n, grid)} after the {merge_size}x{merge_size} merger", n)]


def _qwen2_vl(size, spec, **options):
    """Qwen2-VL: 14-px patches, factor 28."""
    return _qwen_vl("Qwen2-VL", size, spec, **options)


def _qwen25_vl(size, spec, **options):
    """Qwen2.5-VL: the same arithmetic as Qwen2-VL (window attention does not change the count)."""
    return _qwen_vl("Qwen2.5-VL", size, spec, **options)


def _qwen3_vl(size, spec, **options):
    """Qwen3-VL: 16-px patches, factor 32 (DeepStack adds features, not tokens)."""
    return _qwen_vl("Qwen3-VL", size, spec, **options)


def _need_positive(name: str, value, limit: int = MAX_IMAGE_SIDE) -> None:
    """A ValueError naming ``name`` unless ``value`` is an integer in [1, limit]."""
    if not _is_int(value) or not 1 <= value <= limit:
        shown = ("-" if value < 0 else "") + _short(abs(value)) if _is_int(value) else repr(value)
        raise ValueError(f"{name} must be a positive integer <= {limit}, got {shown}")


def _need_bool(name: str, value) -> None:
    """A ValueError naming ``name`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _llava_onevision(size, spec, *, grid_pinpoints=OV_PINPOINTS, anyres_max=OV_ANYRES_MAX):
    """LLaVA-OneVision, one image: ``LlavaOnevisionProcessor._get_number_of_features``."""
    height, width = size
    _need_positive("anyres_max", anyres_max)
    rows, cols, g, vit = _anyres_views(size, _pinpoints(grid_pinpoints, OV_TILE), OV_TILE, SIGLIP_PATCH)
    uh, uw = _unpad(height, width, rows * g, cols * g)
    label = f"crops {rows * g}x{cols * g} unpadded to {uh}x{uw}"
    ratio = math.sqrt(uh * uw / (anyres_max * g * g))  # the processor's formula, float for float
    if ratio > 1.1:
        uh, uw = int(uh // ratio), int(uw // ratio)
        label += f", shrunk bilinearly to {uh}x{uw} (anyres_max_{anyres_max})"
    return vit, _anyres_llm(spec, g, uh, uw, label)


def _got_ocr2_canvas(height: int, width: int, min_tiles: int, max_tiles: int, tile: int):
    """``(columns, rows)`` as transformers' ``get_optimal_tiled_canvas`` (the InternVL tiling):
    the grid whose aspect ratio is closest to the image's; on a tie the later (larger) grid
    while the image covers more than half of it."""
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles // w + 1)
             if w * h >= min_tiles]
    grids.sort(key=lambda grid: grid[0] * grid[1])  # stable, as transformers' sorted list
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


def _internvl(size, spec, *, min_patches=1, max_patches=12):
    """InternVL3/3.5: ``GotOcr2ImageProcessor`` tiles (+ thumbnail), 256 tokens per tile."""
    height, width = size
    _need_positive("min_patches", min_patches, INTERNVL_MAX_PATCHES_LIMIT)
    _need_positive("max_patches", max_patches, INTERNVL_MAX_PATCHES_LIMIT)
    if min_patches > max_patches:
        raise ValueError(f"min_patches must be <= max_patches, got {min_patches} > {max_patches}")
    cols = rows = 1
    if max_patches > 1:
        cols, rows = _got_ocr2_canvas(height, width, min_patches, max_patches, INTERNVL_TILE)
    tiles = rows * cols
    views = tiles + 1 if tiles > 1 else 1
    g = INTERNVL_TILE // INTERNVL_PATCH
    q = g // 2  # pixel_shuffle(0.5)
    n, grid = _reduce_grid(spec, q, q, f"a tile's {q}x{q} tokens")
    if tiles > 1:
        vit = [(f"{tiles} tiles of {INTERNVL_TILE}x{INTERNVL_TILE} ({cols} cols x {rows} rows) + the "
                f"thumbnail, {g}x{g} patches of {INTERNVL_PATCH} px each (CLS dropped)", views * g * g)]
    else:
        vit = [(f"one {INTERNVL_TILE}x{INTERNVL_TILE} tile (the image resized), {g}x{g} patches of "
                f"{INTERNVL_PATCH} px (CLS dropped)", g * g)]
    what = _grid_text(spec, q, q, n, grid)
    return vit, [(f"{views} view{'s' if views > 1 else ''} x {what} tokens after the pixel shuffle", views * n)]


def _pan_and_scan(height: int, width: int, min_crop: int, max_crops: int, min_ratio) -> tuple[int, int]:
    """``(rows, cols)`` of ``Gemma3ImageProcessor.pan_and_scan_batched``'s crops; (0, 0) for none."""
    if width >= height:
        if width / height < min_ratio:
            return 0, 0
        cols = min(int(math.floor(width / min_crop)), int(math.floor(width / height + 0.5)))
        rows, cols = 1, min(max_crops, max(2, cols))
    else:
        if height / width < min_ratio:
            return 0, 0
        rows = min(int(math.floor(height / min_crop)), int(math.floor(height / width + 0.5)))
        rows, cols = min(max_crops, max(2, rows)), 1
    if min(int(math.ceil(width / cols)), int(math.ceil(height / rows))) < min_crop:
        return 0, 0
    return rows, cols


def _gemma3(size, spec, *, do_pan_and_scan=False, pan_and_scan_min_crop_size=256,
            pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2):
    """Gemma 3: 256 tokens per 896x896 view; pan-and-scan crops when asked."""
    _need_bool("do_pan_and_scan", do_pan_and_scan)
    _need_positive("pan_and_scan_min_crop_size", pan_and_scan_min_crop_size)
    _need_positive("pan_and_scan_max_num_crops", pan_and_scan_max_num_crops)
    ratio = pan_and_scan_min_ratio_to_activate
    if not (isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0 < ratio < math.inf):
        raise ValueError(f"pan_and_scan_min_ratio_to_activate must be a positive number, got {ratio!r}")
    rows = cols = 0
    if do_pan_and_scan:
        rows, cols = _pan_and_scan(*size, pan_and_scan_min_crop_size, pan_and_scan_max_num_crops, ratio)
    crops, g, q = rows * cols, GEMMA3_SIZE // SIGLIP_PATCH, GEMMA3_TOKENS_SIDE
    n, grid = _reduce_grid(spec, q, q, f"a view's {q}x{q} tokens")
    vit = [(f"the image resized to {GEMMA3_SIZE}x{GEMMA3_SIZE}, {g}x{g} patches of {SIGLIP_PATCH} px", g * g)]
    llm = [(f"the image: {_grid_text(spec, q, q, n, grid)} tokens after the {g // q}x{g // q} pooling", n)]
    if crops:
        vit.append((f"{crops} pan-and-scan crops ({rows} rows x {cols} cols), each resized to "
                    f"{GEMMA3_SIZE}x{GEMMA3_SIZE}, {g}x{g} patches", crops * g * g))
        llm.append((f"{crops} crops x {n} tokens", crops * n))
    return vit, llm


def _idefics3_resize(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The ``size`` resize of Idefics3/SmolVLM: the longest side to ``longest_edge`` (the other
    rounded up to even), then below transformers' 4096 cap; as their ``_resize_output_size_*``."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > IDEFICS3_MAX_SIDE:
        width, height = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
    elif height > width and height > IDEFICS3_MAX_SIDE:
        height, width = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def _idefics3(size, spec, *, longest_edge=IDEFICS3_LONGEST_EDGE, max_image_size=IDEFICS3_TILE,
              image_seq_len=IDEFICS3_SEQ_LEN, scale_factor=2, do_image_splitting=True):
    """Idefics3 and SmolVLM: ``split_images`` tiles + the global image, ``image_seq_len`` each."""
    for name, value in (("longest_edge", longest_edge), ("max_image_size", max_image_size),
                        ("image_seq_len", image_seq_len), ("scale_factor", scale_factor)):
        _need_positive(name, value)
    _need_bool("do_image_splitting", do_image_splitting)
    rows = cols = 0
    if do_image_splitting:
        height, width = _idefics3_resize(*size, longest_edge)
        rh = math.ceil(height / max_image_size) * max_image_size
        rw = math.ceil(width / max_image_size) * max_image_size
        if rh > max_image_size or rw > max_image_size:
            rows, cols = math.ceil(rh / max_image_size), math.ceil(rw / max_image_size)
    q = math.isqrt(image_seq_len)
    what = f"a view's {image_seq_len} tokens"
    if q * q == image_seq_len:
        n, grid = _reduce_grid(spec, q, q, what)
        text = f"{_grid_text(spec, q, q, n, grid)} tokens"
    else:
        n = _reduce_count(spec, image_seq_len, what)
        text = f"{n} of {image_seq_len} tokens" if n != image_seq_len else f"{n} tokens"
    per_view = image_seq_len * scale_factor**2
    side = f"{max_image_size}x{max_image_size}"
    glob = (f"global image {side}", f"global image: {text}")
    if rows == 0:
        return [(f"{glob[0]} (no split), {per_view} patches", per_view)], [(glob[1], n)]
    tiles = rows * cols
    vit = [(f"{tiles} tiles of {side} ({rows} rows x {cols} cols), {per_view} patches each", tiles * per_view),
           (f"{glob[0]}, {per_view} patches", per_view)]
    return vit, [(f"{tiles} tiles x {text} (the <row_i_col_j> text tokens not counted)", tiles * n),
                 (glob[1], n)]


def _closest_tiles(height: int, width: int, min_crops: int, max_crops: int, tile: int):
    """InternVL's ``dynamic_preprocess`` tile grid ``(cols, rows)``, as DeepSeek-OCR uses it."""
    ratios = {(i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1)
              for j in range(1, n + 1) if min_crops <= i * j <= max_crops}
    aspect = width / height
    best, best_diff = (1, 1), math.inf
    for i, j in sorted(ratios, key=lambda r: r[0] * r[1]):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def _ocr_rows(spec, q: int, tiles_h: int, tiles_w: int, what: str):
    """LLM rows of a (tiles_h x tiles_w) layout of q x q views, with a newline per token row."""
    n, grid = _reduce_grid(spec, q, q, what)
    views = tiles_h * tiles_w
    if grid is None:
        return [(f"{views} x {_grid_text(spec, q, q, n, grid)} tokens (no grid left: no row newlines)",
                 views * n)]
    gh, gw = tiles_h * grid[0], tiles_w * grid[1]
    label = _grid_text(spec, q, q, n, grid)
    if views > 1:
        label = f"{gh}x{gw} ({tiles_h} rows x {tiles_w} cols of {label} tiles)"
    return [(f"{label} tokens", gh * gw), ("one newline per row", gh)]


def _deepseek_ocr(size, spec, *, mode="gundam", min_crops=2, max_crops=6):
    if mode not in DEEPSEEK_OCR_MODES:
        raise ValueError(f"mode must be one of {', '.join(DEEPSEEK_OCR_MODES)}, got {mode!r}")
    for name, value in (("min_crops", min_crops), ("max_crops", max_crops)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if min_crops > max_crops:
        raise ValueError(f"min_crops must be <= max_crops, got {min_crops} > {max_crops}")
    side = DEEPSEEK_OCR_MODES[mode] or DEEPSEEK_OCR_GLOBAL
    per_side = side // DEEPSEEK_OCR_PATCH
    q = math.ceil(per_side / DEEPSEEK_OCR_DOWNSAMPLE)
    vit = [(f"{'global ' if mode == 'gundam' else ''}{side}x{side} view: SAM {per_side}x{per_side} "
            f"patches of {DEEPSEEK_OCR_PATCH} px, 16x compressor to {q}x{q}", per_side * per_side)]
    llm = [(f"{'global ' if mode == 'gundam' else ''}view: {label}", count)
           for label, count in _ocr_rows(spec, q, 1, 1, f"the {q}x{q} view")]
    height, width = size
    if mode == "gundam" and (height > DEEPSEEK_OCR_TILE or width > DEEPSEEK_OCR_TILE):
        cols, rows = _closest_tiles(height, width, min_crops, max_crops, DEEPSEEK_OCR_TILE)
        t_side = DEEPSEEK_OCR_TILE // DEEPSEEK_OCR_PATCH
        tq = math.ceil(t_side / DEEPSEEK_OCR_DOWNSAMPLE)
        vit.append((f"{rows * cols} tiles of {DEEPSEEK_OCR_TILE}x{DEEPSEEK_OCR_TILE} ({cols} cols x "
                    f"{rows} rows), SAM {t_side}x{t_side} patches each", rows * cols * t_side * t_side))
        llm += [(f"tiles: {label}", count)
                for label, count in _ocr_rows(spec, tq, rows, cols, f"a {tq}x{tq} tile")]
    llm.append(("view separator", 1))
    return vit, llm


# name -> (function, default options)
_MODELS = {
    "vit-b/16": (_fixed_grid, {"patch_size": 16}),
    "vit-l/14-336": (_fixed_grid, {"patch_size": 14}),
    "vit": (_fixed_grid, {"patch_size": None}),
    "llava-1.5": (_llava15, {}),
    "llava-next": (_llava_next, {"grid_pinpoints": LLAVA_NEXT_PINPOINTS}),
    "llava-uhd": (_llava_uhd, {}),
    "qwen2-vl": (_qwen2_vl, {"min_pixels": QWEN2_VL_MIN_PIXELS, "max_pixels": QWEN2_VL_MAX_PIXELS,
                             "patch_size": CLIP_PATCH, "merge_size": 2}),
    "deepseek-ocr": (_deepseek_ocr, {"mode": "gundam", "min_crops": 2, "max_crops": 6}),
    "llava-onevision": (_llava_onevision, {"grid_pinpoints": OV_PINPOINTS, "anyres_max": OV_ANYRES_MAX}),
    "qwen2.5-vl": (_qwen25_vl, {"min_pixels": QWEN2_VL_MIN_PIXELS, "max_pixels": QWEN2_VL_MAX_PIXELS,
                                "patch_size": CLIP_PATCH, "merge_size": 2}),
    "qwen3-vl": (_qwen3_vl, {"min_pixels": QWEN2_VL_MIN_PIXELS, "max_pixels": QWEN2_VL_MAX_PIXELS,
                             "patch_size": QWEN3_VL_PATCH, "merge_size": 2}),
    "internvl": (_internvl, {"min_patches": 1, "max_patches": 12}),
    "gemma3": (_gemma3, {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
                         "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}),
    "smolvlm": (_idefics3, {"longest_edge": IDEFICS3_LONGEST_EDGE, "max_image_size": IDEFICS3_TILE,
                            "image_seq_len": IDEFICS3_SEQ_LEN, "scale_factor": 2, "do_image_splitting": True}),
    "idefics3": (_idefics3, {"longest_edge": IDEFICS3_LONGEST_EDGE, "max_image_size": IDEFICS3_TILE,
                             "image_seq_len": IDEFICS3_SEQ_LEN, "scale_factor": 2, "do_image_splitting": True}),
}
MODEL_NAMES = tuple(_MODELS)


def _short(value: int) -> str:
    """An int as written, or as ``~1e155`` when it has more than 15 digits."""
    return str(value) if value < 10**15 else f"~1e{int(math.log10(value))}"


def _image_size(value) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"image_size must be (H, W), got {value!r}")
    if not all(_is_int(v) and v > 0 for v in value):
        raise ValueError(f"image_size must be two positive integers (H, W), got {value!r}")
    if max(value) > MAX_IMAGE_SIDE:
        raise ValueError(f"image_size sides must be at most {MAX_IMAGE_SIDE} pixels (MAX_IMAGE_SIDE), got "
                         f"{_short(value[0])}x{_short(value[1])}")
    return int(value[0]), int(value[1])


def count_tokens(model: str, image_size, *, compress=None, **options) -> TokenBudget:
    """Token counts of one ``image_size = (H, W)`` image for ``model`` (see the module docstring).

    ``options``: ``patch_size`` (ViTs, Qwen), ``grid_pinpoints`` (LLaVA-NeXT, LLaVA-OneVision),
    ``anyres_max`` (LLaVA-OneVision), ``min_pixels``, ``max_pixels``, ``merge_size`` (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL), ``min_patches``, ``max_patches`` (InternVL), ``do_pan_and_scan``,
    ``pan_and_scan_min_crop_size``, ``pan_and_scan_max_num_crops``,
    ``pan_and_scan_min_ratio_to_activate`` (Gemma 3), ``longest_edge``, ``max_image_size``,
    ``image_seq_len``, ``scale_factor``, ``do_image_splitting`` (Idefics3, SmolVLM), ``mode``,
    ``min_crops``, ``max_crops`` (DeepSeek-OCR). ``compress``: ``(method, {budget})`` or
    ``"method:key=value,..."``.
    """
    if not isinstance(model, str) or model.strip().lower() not in _MODELS:
        raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {model!r}")
    name = model.strip().lower()
    size = _image_size(image_size)
    function, defaults = _MODELS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"count_tokens({name!r}) got unexpected option(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(defaults) or 'none'}")
    kwargs = {**defaults, **options}
    if name == "vit" and kwargs["patch_size"] is None:
        raise ValueError("count_tokens('vit') needs patch_size=")
    spec = parse_compress(compress) if compress is not None else None
    vit, llm = function(size, spec, **kwargs)
    uncompressed = sum(c for _, c in function(size, None, **kwargs)[1]) if spec else sum(c for _, c in llm)
    if spec is not None and spec[0] == "fastv":
        seen = sum(c for _, c in llm)
        layer = spec[1].get("layer", FASTV_DEFAULT_LAYER)
        keep = _keep("fastv", spec[1], seen, "the image span")
        llm = [(f"image tokens from layer {layer} on (layers 0..{layer - 1} see all {seen})", keep)]
    stages = ()
    if spec is not None and spec[0] == "pyramiddrop":
        llm, stages = _pyramiddrop(spec[1], sum(c for _, c in llm))
    vit_tokens, llm_tokens = sum(c for _, c in vit), sum(c for _, c in llm)
    breakdown = tuple([(f"ViT: {label}", c) for label, c in vit] + [(f"LLM: {label}", c) for label, c in llm])
    return TokenBudget(model=name, image_size=size, vit_tokens=vit_tokens, llm_tokens=llm_tokens,
                       pixels_per_token=size[0] * size[1] / llm_tokens, breakdown=breakdown,
                       uncompressed_llm_tokens=uncompressed, compress=spec, notes=_notes(name, spec), stages=stages)


def _pyramiddrop(params: dict, seen: int) -> tuple[list, tuple]:
    """The LLM line and the per-stage counts of PyramidDrop over ``seen`` image tokens."""
    layers = params.get("layers")
    ratios = _stage_ratios(params)
    labels = [f"from layer {k} on" for k in layers] if layers else [f"{s + 1}" for s in range(len(ratios))]
    counts, n = [], seen
    for ratio in ratios:
        n = round(n * (1 - ratio))
        counts.append(n)
    if n < 1:
        raise ValueError(f"compress pyramiddrop: ratios {ratios} keep no image token of the {seen} of the image span")
    first = f"before layer {layers[0]}" if layers else "0"
    stages = ((first, seen), *zip(labels, counts))
    last = f"from layer {layers[-1]} on" if layers else f"in the last of {len(ratios) + 1} stages"
    return [(f"image tokens {last} (stages: {' -> '.join(str(c) for _, c in stages)})", n)], stages
