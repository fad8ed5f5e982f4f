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
}
# family -> the text a user writes where an image goes (the processor expands it)
PLACEHOLDER = {"llava": "<image>", "llava_next": "<image>", "llava_onevision": "<image>",
               "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "internvl": "<IMG_CONTEXT>", "gemma3": "<start_of_image>", "smolvlm": "<image>",
               "idefics3": "<image>"}
# families whose processors take one list of images per prompt
NESTED_IMAGES = ("gemma3", "smolvlm", "idefics3")
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


def _require_mrope(family: str, text: dict) -> None:
    """``mrope_section`` sums to head_dim / 2 (head_dim = hidden / heads unless given)."""
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
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
    """One row of ``FAMILIES``: the model class, the config and processor builders, and the
    (vision, text, top-level) config kwargs of the tiny and the real-width model."""
    model_class: str
    config: Callable[[dict, dict, dict], Any]
    processor: Callable[[Any], Any]
    tiny: tuple[dict, dict, dict]
    real: tuple[dict, dict, dict]


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


# --- public API --------------------------------------------------------------------------------

def _family(family: str) -> Family:
    """The ``FAMILIES`` row of ``family``; ``KeyError`` naming the known ones otherwise."""
    if family not in FAMILIES:
        raise KeyError(f"unknown VLM family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family]


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
    Qwen3-VL ``deepstack_visual_indexes``) they are moved into the 2 layers (the last; [0, 1])."""
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
    return processor(family, config)(text=list(prompts), images=flat, padding=True, return_tensors="pt")


def image_token_count(model, batch) -> torch.Tensor:
    """Placeholder tokens per row of ``batch["input_ids"]`` (``config.image_token_id``)."""
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1)


def image_features(model, batch) -> list[torch.Tensor]:
    """``model.model.get_image_features`` on ``batch`` (the arguments it names, from the processor's
    outputs) as a list of 2-D ``(tokens, D)`` tensors: one per entry of its ``pooler_output`` list
    (image or sample), or one per row of its tensor (tile or image). Their total length is the
    number of placeholders the model fills; under ``torch.no_grad``."""
    get = model.model.get_image_features
    names = inspect.signature(get).parameters
    kwargs = {name: value for name, value in batch.items() if name in names}
    with torch.no_grad():
        pooled = get(**kwargs).pooler_output
    return [feature.reshape(-1, feature.shape[-1]) for feature in pooled]
