"""A zoo of VLMs built offline (installed as ``vtok_fast.bench.vlm_zoo``): for each family a tiny
random-weight ``...ForConditionalGeneration``, its real transformers processor, and a config with
the widths of a deployed checkpoint, all without a download.

- ``tiny(family, seed=0, **overrides)``: a random-weight model, eval mode, fp32, SDPA attention;
  the same seed gives the same weights. Widths 32 (vision) / 64 (text), 2 + 2 layers, a 256-token
  vocabulary; a forward on one small image runs in milliseconds.
- ``processor(family, config=None)``: the family's transformers processor (image processor sized to
  the vision tower of ``config``, default the tiny one; a word-level ``tokenizers`` tokenizer wrapped
  in ``TokenizersBackend`` carrying the family's special tokens, ids matching the config).
- ``inputs(family, images, prompts, config=None)``: model inputs for one prompt per image list, built
  by that processor (padded, left side); ``prompt(family)`` gives a prompt with the placeholder.
- ``real_width(family)``: the config of a deployed checkpoint (hidden sizes, heads, image size of
  the checkpoint named in ``CHECKPOINTS``) with 2 vision and 2 text layers and a 256-token
  vocabulary, for benchmarks; ``processor(family, real_width(family))`` matches it.

Families, keyed by ``config.model_type``: ``FAMILIES``. The constraints each builder keeps (from
transformers 5.25's modeling code) are in the builders' docstrings; an override that breaks one
raises ``ValueError``.

``EXTRA_FAMILIES``: Llama 4, Mistral 3, GLM-4.1V, Aya Vision and Cohere2 Vision, whose fused
projectors ``vtok_fast.patch.hf_project`` patches. ``tiny``, ``tiny_config``, ``processor``,
``inputs``, ``prompt`` and ``image_features`` take them like the others (their own processor
classes, built offline; each projector the variant its default config builds); they are not in
``FAMILIES`` (which the zoo's tests iterate; ``vtok-fast bench vlm`` names its own families) and
have no ``real_width`` config. Llama 4's image processor gives bfloat16 ``pixel_values``;
``inputs`` casts them to fp32 (the same values).

Offline processors: every family's own processor class builds offline except SmolVLM's:
``SmolVLMProcessor.__init__`` raises ``ImportError`` without ``num2words`` (absent here; it is used
only to spell frame counts in video prompts). ``processor("smolvlm")`` is therefore an
``Idefics3Processor`` over a ``SmolVLMImageProcessor``: for images it gives the same ``input_ids``,
``attention_mask``, ``pixel_values`` and ``pixel_attention_mask`` as ``SmolVLMProcessor`` (same
``<fake_token_around_image><row_i_col_j><image>...<global-img>`` layout, same image processor; the
tests compare the two). It cannot expand ``<video>``.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

VOCAB = 256  # every model's vocabulary; every tokenizer id is below it
SEED = 0
WORDS = ("USER ASSISTANT user assistant : . , ? ! ' describe the image a an of in on at to and is are "
         "what this that picture photo show tell me about please there how many who where colour color "
         "person astronaut woman man space suit flag smiling white blue red black orange background "
         "yes no one two three it its").split()
BASE_SPECIALS = ("<unk>", "<pad>", "<s>", "</s>")
QWEN_SPECIALS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
IDEFICS_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
LLAMA4_SPECIALS = ("<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>")
GLM4V_SPECIALS = ("<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>")
COHERE_IMAGE_SPECIALS = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")
# Aya Vision's tile headers: TILE_1 ... TILE_12 (at most 12 tiles before the global view), TILE_GLOBAL
AYA_TILE_SPECIALS = (*(f"TILE_{i}" for i in range(1, 13)), "TILE_GLOBAL")
# family -> (named special tokens: attribute -> token, other special tokens)
SPECIALS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "llava": ({"image_token": "<image>"}, ()),
    "llava_next": ({"image_token": "<image>"}, ()),
    "llava_onevision": ({"image_token": "<image>", "video_token": "<video>"}, ()),
    "qwen2_vl": (QWEN_SPECIALS, ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    "qwen2_5_vl": (QWEN_SPECIALS, ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    "qwen3_vl": (QWEN_SPECIALS, ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    "internvl": ({"start_image_token": "<img>", "end_image_token": "</img>",
                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}, ()),
    "gemma3": ({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>"}, ()),
    "smolvlm": ({"image_token": "<image>"}, IDEFICS_SPECIALS),
    "idefics3": ({"image_token": "<image>"}, IDEFICS_SPECIALS),
    # EXTRA_FAMILIES (built by ``tiny`` / ``inputs``, not listed in ``FAMILIES``)
    "llama4": ({"image_token": "<|image|>"}, LLAMA4_SPECIALS),
    "mistral3": ({"image_token": "[IMG]"}, ("[IMG_BREAK]", "[IMG_END]")),
    "glm4v": ({"image_token": "<|image|>", "video_token": "<|video|>"}, GLM4V_SPECIALS),
    "aya_vision": ({"image_token": "<image>"}, (*COHERE_IMAGE_SPECIALS, *AYA_TILE_SPECIALS)),
    "cohere2_vision": ({"image_token": "<|IMG_PATCH|>", "boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>",
                        "img_line_break_token": "<|IMG_LINE_BREAK|>"}, ()),
}
# family -> the text a user writes where an image goes (the processor expands it)
PLACEHOLDER = {"llava": "<image>", "llava_next": "<image>", "llava_onevision": "<image>",
               "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "internvl": "<IMG_CONTEXT>", "gemma3": "<start_of_image>", "smolvlm": "<image>",
               "idefics3": "<image>", "llama4": "<|image|>", "mistral3": "[IMG]",
               "glm4v": "<|begin_of_image|><|image|><|end_of_image|>", "aya_vision": "<image>",
               "cohere2_vision": "<|IMG_PATCH|>"}
# families whose processors take one list of images per prompt
NESTED_IMAGES = ("gemma3", "smolvlm", "idefics3")
# families whose image processors return bfloat16 ``pixel_values`` (``inputs`` casts them to fp32)
BFLOAT16_PIXELS = ("llama4",)
# family -> the deployed checkpoint whose widths ``real_width`` copies
CHECKPOINTS = {"llava": "llava-hf/llava-1.5-7b-hf", "llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf",
               "llava_onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
               "qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct", "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
               "qwen3_vl": "Qwen/Qwen3-VL-8B-Instruct", "internvl": "OpenGVLab/InternVL3-8B-hf",
               "gemma3": "google/gemma-3-4b-it", "smolvlm": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
               "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3"}


def _require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (a constraint a config must keep)."""
    if not condition:
        raise ValueError(message)


# --- tokenizer ---------------------------------------------------------------------------------

def vocabulary(family: str) -> dict[str, int]:
    """The family's token -> id table: base specials, ``WORDS``, then the family's special tokens,
    in a fixed order (ids are the same on every call and all below ``VOCAB``)."""
    named, others = SPECIALS[family]
    tokens = [*BASE_SPECIALS, *WORDS]
    for token in (*named.values(), *others):
        if token not in tokens:
            tokens.append(token)
    _require(len(tokens) <= VOCAB, f"{family}: {len(tokens)} tokens do not fit a {VOCAB}-token vocabulary")
    return {token: index for index, token in enumerate(tokens)}


def token_id(family: str, token: str) -> int:
    """The id ``tokenizer(family)`` gives ``token`` (a special token of the family or a word)."""
    return vocabulary(family)[token]


def tokenizer(family: str, padding_side: str = "left") -> transformers.TokenizersBackend:
    """A word-level tokenizer built in memory with the family's special tokens, wrapped in
    ``TokenizersBackend``: words outside ``WORDS`` map to ``<unk>``; special tokens are matched
    anywhere in the text (no spaces needed); named specials are attributes (``tokenizer.image_token``,
    ``tokenizer.image_token_id``, ...) as the family's processor expects. No BOS is added."""
    vocab = vocabulary(family)
    named, others = SPECIALS[family]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins with spaces
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token in (*BASE_SPECIALS, *named.values(), *others)])
    return transformers.TokenizersBackend(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=dict(named), padding_side=padding_side)


# --- shared widths -----------------------------------------------------------------------------

def _text_ids() -> dict[str, int]:
    """Pad/BOS/EOS ids of every tokenizer here (``<pad>``, ``<s>``, ``</s>``)."""
    return dict(pad_token_id=1, bos_token_id=2, eos_token_id=3)


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, **_text_ids())
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                     patch_size=14)
LLAMA2_7B = dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=32, **_text_ids())
QWEN2_7B = dict(vocab_size=VOCAB, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                num_attention_heads=28, num_key_value_heads=4, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1e6},
                **_text_ids())


def _grid(side: int, most: int) -> list[list[int]]:
    """``[[side*i, side*j]]`` for ``1 <= i, j <= most``, pinpoints that are multiples of the tower's
    image size (LLaVA-OneVision's anyres grid)."""
    return [[side * i, side * j] for i in range(1, most + 1) for j in range(1, most + 1)]


def _qwen_mrope(section: list[int], theta: float, **extra) -> dict[str, Any]:
    """Qwen ``rope_parameters`` with an M-RoPE ``mrope_section`` (t, h, w rotary pairs)."""
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": list(section), **extra}


# --- config builders: (vision kwargs, text kwargs, top-level kwargs) -> config --------------------

def _pinpoints_fit(family: str, vision: dict, top: dict) -> None:
    """Every anyres pinpoint (height, width) is a multiple of the tower's ``image_size``."""
    side = vision["image_size"]
    _require(all(h % side == 0 and w % side == 0 for h, w in top["image_grid_pinpoints"]),
             f"{family}: image_grid_pinpoints must be multiples of the vision image_size {side}")


def _llava_config(vision: dict, text: dict, top: dict) -> transformers.LlavaConfig:
    """LLaVA-1.5: CLIP tower (CLS kept by the tower, dropped by the "default" strategy), layer -2,
    Llama. The processor needs ``patch_size`` and ``num_additional_image_tokens=1``."""
    top = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
           "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2,
           "image_token_index": token_id("llava", "<image>"), **top}
    return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision),
                                    text_config=transformers.LlamaConfig(**text), **top)


def _llava_next_config(vision: dict, text: dict, top: dict) -> transformers.LlavaNextConfig:
    """LLaVA-NeXT: as LLaVA-1.5 plus anyres tiles; ``image_grid_pinpoints`` (in ``top``, (height,
    width) pairs) must be multiples of the tower's ``image_size``."""
    _pinpoints_fit("llava_next", vision, top)
    top = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
           "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2,
           "image_token_index": token_id("llava_next", "<image>"), **top}
    return transformers.LlavaNextConfig(vision_config=transformers.CLIPVisionConfig(**vision),
                                        text_config=transformers.LlamaConfig(**text), **top)


def _llava_onevision_config(vision: dict, text: dict, top: dict) -> transformers.LlavaOnevisionConfig:
    """LLaVA-OneVision: SigLIP tower (no CLS), last layer, "full" strategy, Qwen2; pinpoints (in
    ``top``) multiples of the tower's ``image_size``; ``anyres_max_9``."""
    _pinpoints_fit("llava_onevision", vision, top)
    top = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full",
           "vision_aspect_ratio": "anyres_max_9", "image_token_index": token_id("llava_onevision", "<image>"),
           "video_token_index": token_id("llava_onevision", "<video>"), **top}
    return transformers.LlavaOnevisionConfig(vision_config=transformers.SiglipVisionConfig(**vision),
                                             text_config=transformers.Qwen2Config(**text), **top)


def _qwen_ids(family: str) -> dict[str, int]:
    """The Qwen configs' ``image/video/vision_start/vision_end_token_id`` from the tokenizer."""
    return {f"{name}_id": token_id(family, token) for name, token in
            (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"),
             ("vision_start_token", "<|vision_start|>"), ("vision_end_token", "<|vision_end|>"))}


def _head_dim(text: dict) -> int:
    """``head_dim`` of a text config's kwargs (``hidden_size / num_attention_heads`` unless given)."""
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def _require_mrope(family: str, text: dict) -> None:
    """``mrope_section`` sums to head_dim / 2 (``_head_dim``)."""
    head_dim = _head_dim(text)
    _require(2 * sum(text["rope_parameters"]["mrope_section"]) == head_dim,
             f"{family}: mrope_section must sum to head_dim / 2 = {head_dim // 2}")


def _qwen2_vl_config(vision: dict, text: dict, top: dict) -> transformers.Qwen2VLConfig:
    """Qwen2-VL: the tower's ``hidden_size`` is its output width and must equal the text
    ``hidden_size``; ``mrope_section`` (in ``text["rope_parameters"]``) sums to head_dim / 2."""
    _require(vision["hidden_size"] == text["hidden_size"],
             "qwen2_vl: vision hidden_size must equal the text hidden_size")
    _require_mrope("qwen2_vl", text)
    return transformers.Qwen2VLConfig(
        vision_config=transformers.Qwen2VLVisionConfig(**vision),
        text_config=transformers.Qwen2VLTextConfig(**text), **{**_qwen_ids("qwen2_vl"), **top})


def _qwen2_5_vl_config(vision: dict, text: dict, top: dict) -> transformers.Qwen2_5_VLConfig:
    """Qwen2.5-VL: ``out_hidden_size`` = text width; ``window_size`` >= patch * merge (a window of
    whole merge units); ``fullatt_block_indexes`` below ``depth``."""
    _require(vision["out_hidden_size"] == text["hidden_size"],
             "qwen2_5_vl: out_hidden_size must equal the text hidden_size")
    _require(vision["window_size"] >= vision["patch_size"] * vision.get("spatial_merge_size", 2),
             "qwen2_5_vl: window_size must be at least patch_size * spatial_merge_size")
    _require(all(index < vision["depth"] for index in vision["fullatt_block_indexes"]),
             "qwen2_5_vl: fullatt_block_indexes must be below depth")
    _require_mrope("qwen2_5_vl", text)
    return transformers.Qwen2_5_VLConfig(
        vision_config=transformers.Qwen2_5_VLVisionConfig(**vision),
        text_config=transformers.Qwen2_5_VLTextConfig(**text), **{**_qwen_ids("qwen2_5_vl"), **top})


def _qwen3_vl_config(vision: dict, text: dict, top: dict) -> transformers.Qwen3VLConfig:
    """Qwen3-VL: ``out_hidden_size`` = text width; ``num_position_embeddings`` a square (a learned
    grid, interpolated); ``deepstack_visual_indexes`` below ``depth`` (one deepstack feature per
    index, added after text layers 0, 1, ...); interleaved M-RoPE, sections sum to head_dim / 2."""
    _require(vision["out_hidden_size"] == text["hidden_size"],
             "qwen3_vl: out_hidden_size must equal the text hidden_size")
    _require(round(vision["num_position_embeddings"] ** 0.5) ** 2 == vision["num_position_embeddings"],
             "qwen3_vl: num_position_embeddings must be a square")
    _require(all(index < vision["depth"] for index in vision["deepstack_visual_indexes"]),
             "qwen3_vl: deepstack_visual_indexes must be below depth")
    _require_mrope("qwen3_vl", text)
    return transformers.Qwen3VLConfig(
        vision_config=transformers.Qwen3VLVisionConfig(**vision),
        text_config=transformers.Qwen3VLTextConfig(**text), **{**_qwen_ids("qwen3_vl"), **top})


def _first(size) -> int:
    """The first entry of a (height, width) size, or the size itself."""
    return size[0] if isinstance(size, (list, tuple)) else size


def _internvl_config(vision: dict, text: dict, top: dict) -> transformers.InternVLConfig:
    """InternVL: InternViT (CLS dropped), pixel shuffle by ``downsample_ratio`` 0.5 (patches per
    side divisible by 2), Qwen2; ``image_seq_length`` = (side / patch)^2 / 4 tokens per tile."""
    side = _first(vision["image_size"]) // _first(vision["patch_size"])
    ratio = top.get("downsample_ratio", 0.5)
    _require(side % round(1 / ratio) == 0, "internvl: patches per side must be divisible by 1 / downsample_ratio")
    top = {"image_token_id": token_id("internvl", "<IMG_CONTEXT>"), "image_seq_length": round((side * ratio) ** 2),
           "downsample_ratio": ratio, "vision_feature_layer": -1, "vision_feature_select_strategy": "default", **top}
    return transformers.InternVLConfig(vision_config=transformers.InternVLVisionConfig(**vision),
                                       text_config=transformers.Qwen2Config(**text), **top)


def _gemma3_config(vision: dict, text: dict, top: dict) -> transformers.Gemma3Config:
    """Gemma 3: SigLIP (no CLS, no head), features average-pooled to ``mm_tokens_per_image`` (in
    ``top``): a square whose root divides the patches per side; ``head_dim`` shrunk with the width."""
    side = vision["image_size"] // vision["patch_size"]
    per_side = round(top["mm_tokens_per_image"] ** 0.5)
    _require(per_side ** 2 == top["mm_tokens_per_image"] and side % per_side == 0,
             "gemma3: mm_tokens_per_image must be a square whose root divides the patches per side")
    top = {"boi_token_index": token_id("gemma3", "<start_of_image>"),
           "eoi_token_index": token_id("gemma3", "<end_of_image>"),
           "image_token_index": token_id("gemma3", "<image_soft_token>"), **top}
    return transformers.Gemma3Config(vision_config=transformers.SiglipVisionConfig(**{"vision_use_head": False,
                                                                                      **vision}),
                                     text_config=transformers.Gemma3TextConfig(**text), **top)


def _idefics_config(family: str, vision: dict, text: dict, top: dict):
    """SmolVLM / Idefics3 config (``top`` holds ``scale_factor``); see ``_smolvlm_config``."""
    side = vision["image_size"] // vision["patch_size"]
    _require(side % top["scale_factor"] == 0, f"{family}: patches per side must be divisible by scale_factor")
    config_class, vision_class = {
        "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMVisionConfig),
        "idefics3": (transformers.Idefics3Config, transformers.Idefics3VisionConfig)}[family]
    return config_class(vision_config=vision_class(**vision), text_config=transformers.LlamaConfig(**text),
                        **{"image_token_id": token_id(family, "<image>"), **top})


def _smolvlm_config(vision: dict, text: dict, top: dict) -> transformers.SmolVLMConfig:
    """SmolVLM: SigLIP-like tower, pixel shuffle by ``scale_factor`` (patches per side divisible by
    it), Llama; ``(side / patch)^2 / scale^2`` tokens per tile."""
    return _idefics_config("smolvlm", vision, text, top)


def _idefics3_config(vision: dict, text: dict, top: dict) -> transformers.Idefics3Config:
    """Idefics3: as SmolVLM (the same connector and tiling)."""
    return _idefics_config("idefics3", vision, text, top)


# --- processor builders: config -> processor -----------------------------------------------------

def _side(config) -> tuple[int, int]:
    """(image side, patch side) of the vision tower of ``config``."""
    return _first(config.vision_config.image_size), _first(config.vision_config.patch_size)


def _llava_processor(config) -> transformers.LlavaProcessor:
    """CLIP image processor (shortest edge resized to the tower's side, centre crop), one
    ``<image>`` per patch; the CLS counts as one extra token that the "default" strategy drops."""
    side, patch = _side(config)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer("llava"), patch_size=patch, num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy)


def _llava_next_processor(config) -> transformers.LlavaNextProcessor:
    """Anyres tiles over ``config.image_grid_pinpoints``, placeholders from the unpadded grid."""
    side, patch = _side(config)
    images = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=config.image_grid_pinpoints)
    return transformers.LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer("llava_next"), patch_size=patch, num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy)


def _llava_onevision_processor(config) -> transformers.LlavaOnevisionProcessor:
    """Anyres tiles (SigLIP normalisation), ``num_image_tokens`` per tile; a video processor is
    required by the constructor."""
    side, patch = _side(config)
    images = transformers.LlavaOnevisionImageProcessor(size={"height": side, "width": side},
                                                       image_grid_pinpoints=config.image_grid_pinpoints)
    videos = transformers.LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    return transformers.LlavaOnevisionProcessor(
        image_processor=images, tokenizer=tokenizer("llava_onevision"), video_processor=videos,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio)


def _qwen_processor(family: str, config, processor_class, video_class, min_tokens: int, **norm):
    """``smart_resize`` to multiples of patch * merge between ``min_tokens`` and 16384 merged tokens
    (the checkpoints' pixel bounds: 4 and 16384 for Qwen2/2.5-VL, 64 and 16384 for Qwen3-VL, so
    Qwen3-VL upscales small images); the image processor is told the tower's patch size (its
    default, 14, is wrong for Qwen3-VL's 16 and for the tiny towers' 8)."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    geometry = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                    temporal_patch_size=vision.temporal_patch_size)
    size = {"shortest_edge": min_tokens * factor ** 2, "longest_edge": 16384 * factor ** 2}
    images = transformers.Qwen2VLImageProcessor(size=size, **geometry, **norm)
    videos = video_class(size=size, **geometry, **norm)
    return processor_class(image_processor=images, tokenizer=tokenizer(family), video_processor=videos)


def _qwen2_vl_processor(config) -> transformers.Qwen2VLProcessor:
    """Qwen2-VL: ``Qwen2VLImageProcessor`` (CLIP normalisation), 4 to 16384 merged tokens."""
    return _qwen_processor("qwen2_vl", config, transformers.Qwen2VLProcessor, transformers.Qwen2VLVideoProcessor, 4)


def _qwen2_5_vl_processor(config) -> transformers.Qwen2_5_VLProcessor:
    """Qwen2.5-VL: as Qwen2-VL (the same image processor)."""
    return _qwen_processor("qwen2_5_vl", config, transformers.Qwen2_5_VLProcessor,
                           transformers.Qwen2VLVideoProcessor, 4)


def _qwen3_vl_processor(config) -> transformers.Qwen3VLProcessor:
    """Qwen3-VL: ``Qwen2VLImageProcessor`` with 0.5 mean/std, 64 to 16384 merged tokens."""
    return _qwen_processor("qwen3_vl", config, transformers.Qwen3VLProcessor, transformers.Qwen3VLVideoProcessor, 64,
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _internvl_processor(config) -> transformers.InternVLProcessor:
    """GotOcr2 tiling (1-12 tiles of the tower's side + a thumbnail when more than one, ImageNet
    normalisation), ``<img>`` + ``<IMG_CONTEXT>`` x ``image_seq_length`` per tile + ``</img>``."""
    side, _ = _side(config)
    norm = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    images = transformers.GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True,
                                                min_patches=1, max_patches=12, **norm)
    videos = transformers.InternVLVideoProcessor(size={"height": side, "width": side}, **norm)
    return transformers.InternVLProcessor(image_processor=images, tokenizer=tokenizer("internvl"),
                                          video_processor=videos, image_seq_length=config.image_seq_length)


def _gemma3_processor(config) -> transformers.Gemma3Processor:
    """Resize to the tower's side (no pan and scan); ``<start_of_image>`` in the prompt becomes
    boi + ``mm_tokens_per_image`` x ``<image_soft_token>`` + eoi."""
    side, _ = _side(config)
    images = transformers.Gemma3ImageProcessor(size={"height": side, "width": side})
    return transformers.Gemma3Processor(image_processor=images, tokenizer=tokenizer("gemma3"),
                                        image_seq_length=config.mm_tokens_per_image)


def _idefics_processor(family: str, config) -> transformers.Idefics3Processor:
    """Longest edge resized to 4 tower sides, split into tower-side tiles + a global view; each
    tile ``(side / patch)^2 / scale^2`` ``<image>`` tokens. SmolVLM gets ``Idefics3Processor`` too
    (``SmolVLMProcessor`` needs ``num2words``; the image prompt strings are identical)."""
    side, patch = _side(config)
    image_class = {"smolvlm": transformers.SmolVLMImageProcessor,
                   "idefics3": transformers.Idefics3ImageProcessor}[family]
    images = image_class(size={"longest_edge": 4 * side}, max_image_size={"longest_edge": side},
                         do_image_splitting=True)
    seq_len = (side // patch) ** 2 // config.scale_factor ** 2
    return transformers.Idefics3Processor(image_processor=images, tokenizer=tokenizer(family), image_seq_len=seq_len)


def _smolvlm_processor(config) -> transformers.Idefics3Processor:
    """SmolVLM: ``Idefics3Processor`` over ``SmolVLMImageProcessor`` (see the module docstring)."""
    return _idefics_processor("smolvlm", config)


def _idefics3_processor(config) -> transformers.Idefics3Processor:
    """Idefics3: its own processor over ``Idefics3ImageProcessor``."""
    return _idefics_processor("idefics3", config)


# --- the table ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """One row of ``FAMILIES`` (or ``EXTRA_FAMILIES``): the model class, the config and processor
    builders, and the (vision, text, top-level) config kwargs of the tiny and the real-width model
    (``real`` None: no real-width config)."""
    model_class: str
    config: Callable[[dict, dict, dict], Any]
    processor: Callable[[Any], Any]
    tiny: tuple[dict, dict, dict]
    real: tuple[dict, dict, dict] | None


def _tiny_vision(**extra) -> dict:
    """``TINY_VISION`` widths with the tower's image and patch size."""
    return {**TINY_VISION, **extra}


QWEN2_VISION_TINY = dict(patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
QWEN_TINY_TEXT = {**TINY_TEXT, "rope_parameters": _qwen_mrope([2, 3, 3], 1e6)}
QWEN2_7B_MROPE = {**QWEN2_7B, "rope_parameters": _qwen_mrope([16, 24, 24], 1e6)}
NEXT_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

FAMILIES: dict[str, Family] = {
    "llava": Family(
        "LlavaForConditionalGeneration", _llava_config, _llava_processor,
        tiny=(_tiny_vision(image_size=32, patch_size=8), TINY_TEXT, {}),
        real=(CLIP_L336, LLAMA2_7B, {})),
    "llava_next": Family(
        "LlavaNextForConditionalGeneration", _llava_next_config, _llava_next_processor,
        tiny=(_tiny_vision(image_size=32, patch_size=8), TINY_TEXT,
              {"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}),
        real=(CLIP_L336, LLAMA2_7B, {"image_grid_pinpoints": NEXT_PINPOINTS_336})),
    "llava_onevision": Family(
        "LlavaOnevisionForConditionalGeneration", _llava_onevision_config, _llava_onevision_processor,
        tiny=(_tiny_vision(image_size=32, patch_size=8), TINY_TEXT, {"image_grid_pinpoints": _grid(32, 3)}),
        real=({**SIGLIP_SO400M, "image_size": 384}, QWEN2_7B, {"image_grid_pinpoints": _grid(384, 6)})),
    "qwen2_vl": Family(
        "Qwen2VLForConditionalGeneration", _qwen2_vl_config, _qwen2_vl_processor,
        tiny=(dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **QWEN2_VISION_TINY),
              QWEN_TINY_TEXT, {}),
        real=(dict(depth=2, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14),
              QWEN2_7B_MROPE, {})),
    "qwen2_5_vl": Family(
        "Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl_config, _qwen2_5_vl_processor,
        tiny=(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   window_size=32, fullatt_block_indexes=[1], **QWEN2_VISION_TINY), QWEN_TINY_TEXT, {}),
        real=(dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   patch_size=14, window_size=112, fullatt_block_indexes=[1]), QWEN2_7B_MROPE, {})),
    "qwen3_vl": Family(
        "Qwen3VLForConditionalGeneration", _qwen3_vl_config, _qwen3_vl_processor,
        tiny=(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   num_position_embeddings=64, deepstack_visual_indexes=[0, 1], **QWEN2_VISION_TINY),
              {**TINY_TEXT, "head_dim": 16, "rope_parameters": _qwen_mrope([4, 2, 2], 5e6, mrope_interleaved=True)},
              {}),
        real=(dict(depth=2, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                   patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[0, 1]),
              dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=12288, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   rope_parameters=_qwen_mrope([24, 20, 20], 5e6, mrope_interleaved=True), **_text_ids()),
              {})),
    "internvl": Family(
        "InternVLForConditionalGeneration", _internvl_config, _internvl_processor,
        tiny=(_tiny_vision(image_size=[64, 64], patch_size=[8, 8]), TINY_TEXT, {}),
        real=(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                   image_size=[448, 448], patch_size=[14, 14]), QWEN2_7B, {})),
    "gemma3": Family(
        "Gemma3ForConditionalGeneration", _gemma3_config, _gemma3_processor,
        tiny=(_tiny_vision(image_size=64, patch_size=8),
              {**TINY_TEXT, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
               "layer_types": ["sliding_attention", "full_attention"]}, {"mm_tokens_per_image": 16}),
        real=({**SIGLIP_SO400M, "image_size": 896},
              dict(vocab_size=VOCAB, hidden_size=2560, intermediate_size=10240, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=1024, layer_types=["sliding_attention", "full_attention"], **_text_ids()),
              {"mm_tokens_per_image": 256})),
    "smolvlm": Family(
        "SmolVLMForConditionalGeneration", _smolvlm_config, _smolvlm_processor,
        tiny=(_tiny_vision(image_size=96, patch_size=8), TINY_TEXT, {"scale_factor": 3}),
        real=({**SIGLIP_SO400M, "image_size": 384},
              dict(vocab_size=VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=32,
                   rope_parameters={"rope_type": "default", "rope_theta": 130000.0}, **_text_ids()),
              {"scale_factor": 3})),
    "idefics3": Family(
        "Idefics3ForConditionalGeneration", _idefics3_config, _idefics3_processor,
        tiny=(_tiny_vision(image_size=64, patch_size=8), TINY_TEXT, {"scale_factor": 2}),
        real=({**SIGLIP_SO400M, "image_size": 364},
              dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=8,
                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **_text_ids()),
              {"scale_factor": 2})),
}


# --- EXTRA_FAMILIES: whole tiny models of the projector families outside FAMILIES ------------------
# Built by ``tiny`` / ``processor`` / ``inputs`` like the others, but not listed in ``FAMILIES`` (which
# tests/test_vlm_zoo.py iterates): they carry no ``real_width`` config, ``vtok_fast.patch.families``
# has no adapter for them; ``vtok_fast.patch.hf_project`` patches their projectors.

def _llama4_config(vision: dict, text: dict, top: dict) -> transformers.Llama4Config:
    """Llama 4: its ViT (unfold patch embedding, a CLS appended then dropped, 2-D RoPE over the
    ``image_size`` tile grid), whose ``vision_adapter`` (``Llama4VisionPixelShuffleMLP``) pixel-shuffles
    by ``pixel_shuffle_ratio`` (0.5) then runs fc1 (from ``intermediate_size``, which must be
    ``hidden_size / ratio^2``; the tower's MLPs share that width), GELU, fc2, GELU; fc2 is square
    (``projector_input_dim = projector_output_dim``) and ``multi_modal_projector`` reads
    ``vision_output_dim`` = that width; tile patches per side divisible by ``1 / ratio``. MoE text
    model (every layer, as the default ``interleave_moe_layer_step`` 1)."""
    ratio = vision.get("pixel_shuffle_ratio", 0.5)
    window = round(1 / ratio)
    _require(abs(window * ratio - 1) < 1e-9 and (vision["image_size"] // vision["patch_size"]) % window == 0,
             "llama4: patches per side must be divisible by 1 / pixel_shuffle_ratio")
    _require(vision["intermediate_size"] == vision["hidden_size"] * window ** 2,
             "llama4: intermediate_size must be hidden_size / pixel_shuffle_ratio**2 (fc1's input)")
    _require(vision["projector_input_dim"] == vision["projector_output_dim"] == vision["vision_output_dim"],
             "llama4: projector_input_dim, projector_output_dim and vision_output_dim must be equal")
    top = {"boi_token_index": token_id("llama4", "<|image_start|>"),
           "eoi_token_index": token_id("llama4", "<|image_end|>"),
           "image_token_index": token_id("llama4", "<|patch|>"), **top}
    return transformers.Llama4Config(vision_config=transformers.Llama4VisionConfig(**vision),
                                     text_config=transformers.Llama4TextConfig(**text), **top)


def _mistral3_config(vision: dict, text: dict, top: dict) -> transformers.Mistral3Config:
    """Mistral 3 (Mistral-Small-3.1): Pixtral tower (any image size up to ``image_size``, 2-D RoPE,
    the images of a batch in one sequence), last layer; ``Mistral3MultiModalProjector``: RMS norm,
    ``spatial_merge_size`` 2 ``patch_merger`` (unfold over each image's own grid), linear_1, GELU,
    linear_2; Mistral text model. ``image_size`` a multiple of patch * merge."""
    _require(vision["image_size"] % (vision["patch_size"] * top.get("spatial_merge_size", 2)) == 0,
             "mistral3: image_size must be a multiple of patch_size * spatial_merge_size")
    top = {"image_token_index": token_id("mistral3", "[IMG]"), "vision_feature_layer": -1,
           "spatial_merge_size": 2, **top}
    return transformers.Mistral3Config(vision_config=transformers.PixtralVisionConfig(**vision),
                                       text_config=transformers.MistralConfig(**text), **top)


def _glm4v_config(vision: dict, text: dict, top: dict) -> transformers.Glm4vConfig:
    """GLM-4.1V: Qwen-style flat patches (``image_grid_thw``), post-norm + stride-2 Conv2d
    ``downsample`` to ``out_hidden_size`` (= the text width), then ``Glm4vVisionPatchMerger`` (proj,
    LayerNorm, GELU, SiLU-GLU over ``intermediate_size``, down_proj); M-RoPE over half of each head
    (``partial_rotary_factor`` 0.5): ``mrope_section`` sums to head_dim / 4."""
    _require(vision["out_hidden_size"] == text["hidden_size"],
             "glm4v: out_hidden_size must equal the text hidden_size")
    rope = text["rope_parameters"]
    rotary = round(_head_dim(text) * rope.get("partial_rotary_factor", 1.0))
    _require(2 * sum(rope["mrope_section"]) == rotary,
             f"glm4v: mrope_section must sum to head_dim * partial_rotary_factor / 2 = {rotary // 2}")
    ids = {f"{name}_id": token_id("glm4v", token) for name, token in
           (("image_token", "<|image|>"), ("video_token", "<|video|>"), ("image_start_token", "<|begin_of_image|>"),
            ("image_end_token", "<|end_of_image|>"), ("video_start_token", "<|begin_of_video|>"),
            ("video_end_token", "<|end_of_video|>"))}
    return transformers.Glm4vConfig(vision_config=transformers.Glm4vVisionConfig(**vision),
                                    text_config=transformers.Glm4vTextConfig(**text), **{**ids, **top})


def _aya_config(family: str, config_class, vision: dict, text: dict, top: dict):
    """Aya Vision / Cohere2 Vision config: SigLIP tower, Cohere2 text model; patches per side
    divisible by ``downsample_factor``; ``alignment_intermediate_size`` even (SwiGLU halves)."""
    top = {"downsample_factor": 2, "image_token_id": token_id(family, "<|IMG_PATCH|>"), **top}
    _require((vision["image_size"] // vision["patch_size"]) % top["downsample_factor"] == 0,
             f"{family}: patches per side must be divisible by downsample_factor")
    _require(top.get("alignment_intermediate_size", 0) % 2 == 0, f"{family}: alignment_intermediate_size must be even")
    return config_class(vision_config=transformers.SiglipVisionConfig(**vision),
                        text_config=transformers.Cohere2Config(**text), **top)


def _aya_vision_config(vision: dict, text: dict, top: dict) -> transformers.AyaVisionConfig:
    """Aya Vision: SigLIP (no head), last layer, "full" strategy; ``AyaVisionMultiModalProjector``:
    pixel shuffle by ``downsample_factor`` 2, LayerNorm, linear_1 to ``alignment_intermediate_size``,
    SwiGLU over its halves, linear_2; Cohere2 text model."""
    vision = {"vision_use_head": False, **vision}
    top = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full", **top}
    return _aya_config("aya_vision", transformers.AyaVisionConfig, vision, text, top)


def _cohere2_vision_config(vision: dict, text: dict, top: dict) -> transformers.Cohere2VisionConfig:
    """Cohere2 Vision (Command A Vision): SigLIP (its default head kept, unused), last hidden state;
    ``Cohere2VisionMultiModalProjector``: as Aya Vision's without the LayerNorm."""
    return _aya_config("cohere2_vision", transformers.Cohere2VisionConfig, vision, text, top)


def _llama4_processor(config) -> transformers.Llama4Processor:
    """``Llama4ImageProcessor``: the image fitted (no distortion, padded) onto a canvas of up to
    ``max_patches`` 16 tower-side tiles + a global tile when more than one; each tile
    ``(side / patch)^2 * ratio^2`` ``<|patch|>`` tokens, the layout ``<|image_start|>`` tiles with
    ``<|tile_x_separator|>`` / ``<|tile_y_separator|>``, ``<|image|>``, the global tile,
    ``<|image_end|>``. Its ``pixel_values`` are bfloat16 (rescaled and normalised in bfloat16)."""
    side, patch = _side(config)
    images = transformers.Llama4ImageProcessor(size={"height": side, "width": side})
    return transformers.Llama4Processor(image_processor=images, tokenizer=tokenizer("llama4"), patch_size=patch,
                                        pixel_shuffle_ratio=config.vision_config.pixel_shuffle_ratio)


def _mistral3_processor(config) -> transformers.PixtralProcessor:
    """``PixtralProcessor`` (Mistral-Small-3.1's): longest edge down to the tower's ``image_size``,
    sides rounded up to patch * merge; per row of merged tokens ``[IMG]`` x width + ``[IMG_BREAK]``,
    the last ``[IMG_END]``; ``pixel_values`` padded to the batch's largest image, ``image_sizes``."""
    side, patch = _side(config)
    images = transformers.PixtralImageProcessor(size={"longest_edge": side}, patch_size=patch)
    return transformers.PixtralProcessor(image_processor=images, tokenizer=tokenizer("mistral3"), patch_size=patch,
                                         spatial_merge_size=config.spatial_merge_size)


def _glm4v_processor(config) -> transformers.Glm4vProcessor:
    """``Glm4vImageProcessor``: ``smart_resize`` to multiples of patch * merge between 16 and 15000
    merged tokens (the class defaults, 112^2 to 28^2 * 15000 pixels at patch 14), patches flattened
    Qwen-style (``image_grid_thw``); ``<|image|>`` x merged tokens; ``mm_token_type_ids``."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    geometry = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                    temporal_patch_size=vision.temporal_patch_size)
    size = {"shortest_edge": 16 * factor ** 2, "longest_edge": 15000 * factor ** 2}
    return transformers.Glm4vProcessor(image_processor=transformers.Glm4vImageProcessor(size=size, **geometry),
                                       tokenizer=tokenizer("glm4v"),
                                       video_processor=transformers.Glm4vVideoProcessor(size=size, **geometry))


def _aya_vision_processor(config) -> transformers.AyaVisionProcessor:
    """GotOcr2 tiling (1-12 tower-side tiles + a global one when more than one, 0.5 mean / std);
    ``<|START_OF_IMG|>``, per tile ``TILE_i`` (``TILE_GLOBAL`` last) + ``(side / patch / f)^2``
    ``<|IMG_PATCH|>``, ``<|END_OF_IMG|>``."""
    side, patch = _side(config)
    images = transformers.GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True,
                                                min_patches=1, max_patches=12, image_mean=[0.5, 0.5, 0.5],
                                                image_std=[0.5, 0.5, 0.5])
    return transformers.AyaVisionProcessor(image_processor=images, tokenizer=tokenizer("aya_vision"), patch_size=patch,
                                           img_size=side, downsample_factor=config.downsample_factor)


def _cohere2_vision_processor(config) -> transformers.Cohere2VisionProcessor:
    """``Cohere2VisionImageProcessor`` tiling (1-12 tower-side tiles + a global one when more than
    one, CLIP normalisation); ``<|START_OF_IMG|>``, per tile ``(side / patch / f)^2``
    ``<|IMG_PATCH|>`` + ``<|IMG_LINE_BREAK|>``, ``<|END_OF_IMG|>``. The image processor's
    ``patch_size`` is those tokens per tile side (16 for the checkpoint's 512 / 16 / 2)."""
    side, patch = _side(config)
    images = transformers.Cohere2VisionImageProcessor(size={"height": side, "width": side}, crop_to_patches=True,
                                                      min_patches=1, max_patches=12)
    images.patch_size = side // patch // config.downsample_factor
    return transformers.Cohere2VisionProcessor(image_processor=images, tokenizer=tokenizer("cohere2_vision"))


COHERE2_TINY_TEXT = {**TINY_TEXT, "layer_types": ["sliding_attention", "full_attention"]}
AYA_TINY_VISION = _tiny_vision(image_size=64, patch_size=8)

EXTRA_FAMILIES: dict[str, Family] = {
    "llama4": Family(
        "Llama4ForConditionalGeneration", _llama4_config, _llama4_processor,
        tiny=(dict(TINY_VISION, intermediate_size=128, image_size=64, patch_size=8, projector_input_dim=64,
                   projector_output_dim=64, vision_output_dim=64),
              {**TINY_TEXT, "intermediate_size_mlp": 128, "head_dim": 16, "num_local_experts": 4}, {}),
        real=None),
    "mistral3": Family(
        "Mistral3ForConditionalGeneration", _mistral3_config, _mistral3_processor,
        tiny=(_tiny_vision(image_size=64, patch_size=8, head_dim=16), {**TINY_TEXT, "head_dim": 16}, {}),
        real=None),
    "glm4v": Family(
        "Glm4vForConditionalGeneration", _glm4v_config, _glm4v_processor,
        tiny=(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, image_size=64,
                   patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
              {**TINY_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}}, {}),
        real=None),
    "aya_vision": Family(
        "AyaVisionForConditionalGeneration", _aya_vision_config, _aya_vision_processor,
        tiny=(AYA_TINY_VISION, COHERE2_TINY_TEXT, {"alignment_intermediate_size": 128}), real=None),
    "cohere2_vision": Family(
        "Cohere2VisionForConditionalGeneration", _cohere2_vision_config, _cohere2_vision_processor,
        tiny=(AYA_TINY_VISION, COHERE2_TINY_TEXT, {"alignment_intermediate_size": 128}), real=None),
}


# --- public API --------------------------------------------------------------------------------

def _family(family: str) -> Family:
    """The ``FAMILIES`` or ``EXTRA_FAMILIES`` row of ``family``; ``KeyError`` naming the known ones
    otherwise."""
    row = FAMILIES.get(family) or EXTRA_FAMILIES.get(family)
    if row is None:
        raise KeyError(f"unknown VLM family {family!r}; known: {sorted(FAMILIES)}, "
                       f"and outside FAMILIES {sorted(EXTRA_FAMILIES)}")
    return row


def _build(family: str, widths: tuple[dict, dict, dict], overrides: dict):
    """The family's config from ``widths`` with ``overrides`` applied: ``vision_config`` /
    ``text_config`` dicts update the sub-config kwargs, any other key is a top-level kwarg."""
    vision, text, top = (copy.deepcopy(part) for part in widths)
    overrides = dict(overrides)
    vision.update(overrides.pop("vision_config", {}))
    text.update(overrides.pop("text_config", {}))
    top.update(overrides)
    return _family(family).config(vision, text, top)


def tiny_config(family: str, **overrides):
    """The tiny config of ``family`` (see ``tiny`` for ``overrides``)."""
    return _build(family, _family(family).tiny, overrides)


def real_width(family: str, **overrides):
    """A config with the widths, heads, image size and patch of ``CHECKPOINTS[family]`` but 2
    vision and 2 text layers and a ``VOCAB``-token vocabulary (the placeholder ids are ours, not the
    checkpoint's). Not instantiated here; a model of it holds a few hundred million parameters.
    Where the checkpoint's layer indexes point past layer 2 (Qwen2.5-VL ``fullatt_block_indexes``,
    Qwen3-VL ``deepstack_visual_indexes``) they are moved into the 2 layers (the last; [0, 1]).
    ``EXTRA_FAMILIES`` have none (``KeyError``)."""
    if _family(family).real is None:
        raise KeyError(f"{family}: no real-width config (EXTRA_FAMILIES are tiny only)")
    return _build(family, _family(family).real, overrides)


def tiny(family: str, seed: int = SEED, attn_implementation: str = "sdpa", **overrides):
    """A tiny random-weight ``...ForConditionalGeneration`` of ``family`` in eval mode, fp32, with
    ``attn_implementation`` (SDPA) everywhere; the same ``seed`` gives the same weights, and the
    global RNG is left as it was. ``overrides``: ``vision_config={...}`` and ``text_config={...}``
    update the sub-config kwargs, other keys are top-level config kwargs. ``processor(family)``
    matches the default widths; after overriding sizes pass the model's config to ``processor``."""
    config = tiny_config(family, **overrides)
    model_class = getattr(transformers, _family(family).model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def processor(family: str, config=None):
    """The transformers processor of ``family`` built offline for ``config`` (default the tiny
    config): image processor sized to its vision tower, ``tokenizer(family)`` (ids = the config's).
    ``processor(text=[prompt(family)], images=[image], return_tensors="pt")`` gives inputs the model
    takes. SmolVLM: an ``Idefics3Processor`` (see the module docstring)."""
    return _family(family).processor(tiny_config(family) if config is None else config)


def prompt(family: str, text: str = "USER : describe the image . ASSISTANT :") -> str:
    """``text`` with the family's image placeholder in front (one image)."""
    return f"{PLACEHOLDER[family]} {text}"


def inputs(family: str, images: list, prompts: list[str], config=None):
    """Model inputs (``BatchFeature`` of tensors) for ``prompts``, each holding as many placeholders
    as its images: ``images`` is one image per prompt, or one list of images per prompt. Prompts
    are padded on the left. Built by ``processor(family, config)``."""
    if images and not isinstance(images[0], (list, tuple)):
        images = [[image] for image in images]
    _require(len(images) == len(prompts), "inputs: one image (or one list of images) per prompt")
    nested = family in NESTED_IMAGES
    flat = images if nested else [image for group in images for image in group]
    batch = processor(family, config)(text=list(prompts), images=flat, padding=True, return_tensors="pt")
    if family in BFLOAT16_PIXELS:  # bfloat16 values, held exactly in the fp32 the tiny model takes
        batch["pixel_values"] = batch["pixel_values"].float()
    return batch


def image_token_count(model, batch) -> torch.Tensor:
    """Placeholder tokens per row of ``batch["input_ids"]`` (``config.image_token_id``)."""
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1)


def image_features(model, batch) -> list[torch.Tensor]:
    """``model.model.get_image_features`` on ``batch`` (the arguments it names, from the processor's
    outputs) as a list of 2-D ``(tokens, D)`` tensors: one per entry of its ``pooler_output`` list
    (image or sample), or one per row of its tensor (tile or image). Their total length is the
    number of placeholders the model fills; under ``torch.no_grad``. (Llama 4 has no ``model.model``:
    its ``get_image_features`` is the top model's.)"""
    get = getattr(model, "model", model).get_image_features
    names = inspect.signature(get).parameters
    kwargs = {name: value for name, value in batch.items() if name in names}
    with torch.no_grad():
        pooled = get(**kwargs).pooler_output
    return [feature.reshape(-1, feature.shape[-1]) for feature in pooled]
