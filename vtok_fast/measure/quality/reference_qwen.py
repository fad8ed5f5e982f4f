"""The tiny Qwen2-VL-architecture reference model, its tokenizer and its processor, built offline.

The second reference model of :mod:`vtok_fast.measure.quality`: the same task and widths as the
LLaVA one, but Qwen2-VL's tower and its way of placing image tokens (16 per image: the 64 8-px
patches merged 2 x 2, one token per grid cell). Its language
model reads image tokens at M-RoPE positions (temporal, row, column ids of the merged grid; text
continues from the largest), so a compression that keeps the right tokens but misplaces their
ids answers layout and position questions wrongly here.

- ``build_tokenizer()``: a word-level ``tokenizers`` model over ``VOCAB`` (Qwen's vision special
  tokens, the prompt words and every answer), ``PreTrainedTokenizerFast`` with the vision tokens
  as special tokens (matched without spaces, as the processor repeats ``<|image_pad|>``) and as
  the named attributes ``Qwen2VLProcessor`` reads; left padding.
- ``build_processor(settings)``: a real ``Qwen2VLProcessor`` over a ``Qwen2VLImageProcessor``
  (``patch_size``, ``merge_size=2``, ``temporal_patch_size=2``, CLIP mean/std, pixel bounds that
  keep a ``image_size`` square image at its size) and that tokenizer, with a chat template that
  writes ``<|vision_start|><|image_pad|><|vision_end|> question`` (what :func:`prompt` gives), so
  ``evaluate`` and ``vtok-fast eval`` prompt it as it was trained.
- ``build_model(settings, seed)``: ``Qwen2VLForConditionalGeneration`` from ``Qwen2VLConfig``
  (vision tower ``vision_layers`` x ``vision_width`` with ``patch_size``-px patches and the 2x2
  ``PatchMerger``; Qwen2 decoder ``text_layers`` x ``text_width`` with M-RoPE sections
  ``MROPE_SECTION``), every ``initializer_range`` = ``text_init``, eval mode, SDPA.

Nothing here downloads; ``load(path)`` reads a directory written by ``save_pretrained``.
"""
from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLTextConfig, Qwen2VLVideoProcessor,
                          Qwen2VLVisionConfig)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vtok_fast.measure.quality import dataset

VISION_TOKENS = {"vision_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
                 "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"}
SPECIAL = ("<unk>", "<pad>", "<s>", "</s>") + tuple(VISION_TOKENS.values())
VOCAB = SPECIAL + dataset.QUESTION_WORDS + dataset.ANSWERS
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MERGE = 2  # Qwen2-VL's PatchMerger: 2 x 2 patches per language-model token
MROPE_SECTION = (4, 6, 6)  # rotary pairs for (temporal, row, column); sums to head_dim / 2 = 16
CLIP_MEAN, CLIP_STD = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)  # transformers' CLIP mean/std
CHAT_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}" + IMAGE + "{% else %} {{ part['text'] }}{% endif %}"
                 "{% endfor %}{% endfor %}")


def prompt(question: str) -> str:
    """The model's text: the image span, then the question (the answer is predicted at its last
    word). The processor expands ``<|image_pad|>`` into one placeholder per merged token."""
    return f"{IMAGE} {question}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over ``VOCAB`` (whitespace split, ``<unk>`` for unknown words)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS.values()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left", extra_special_tokens=dict(VISION_TOKENS))


def build_processor(settings) -> Qwen2VLProcessor:
    """A ``Qwen2VLProcessor`` that keeps an ``image_size`` square at its size: ``(image_size /
    patch_size / 2) ** 2`` placeholders per image, the count the model produces."""
    pixels = settings.image_size ** 2
    geometry = dict(patch_size=settings.patch_size, merge_size=MERGE, temporal_patch_size=2,
                    size={"shortest_edge": pixels, "longest_edge": pixels},
                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=build_tokenizer(),
                            video_processor=Qwen2VLVideoProcessor(**geometry), chat_template=CHAT_TEMPLATE)


def build_config(settings) -> Qwen2VLConfig:
    """The ``Qwen2VLConfig`` of the reference model (vocabulary = ``VOCAB``)."""
    s = settings
    vision = Qwen2VLVisionConfig(depth=s.vision_layers, embed_dim=s.vision_width, hidden_size=s.text_width,
                                 num_heads=s.vision_heads, mlp_ratio=s.mlp_ratio, patch_size=s.patch_size,
                                 spatial_merge_size=MERGE, temporal_patch_size=2, initializer_range=s.text_init)
    rope = {"rope_type": "default", "rope_theta": s.rope_theta, "mrope_section": list(MROPE_SECTION)}
    text = Qwen2VLTextConfig(vocab_size=len(VOCAB), hidden_size=s.text_width, intermediate_size=s.mlp_ratio * s.text_width,
                             num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                             num_key_value_heads=s.text_heads, max_position_embeddings=256, rope_parameters=rope,
                             pad_token_id=VOCAB.index("<pad>"), bos_token_id=VOCAB.index("<s>"),
                             eos_token_id=VOCAB.index("</s>"), initializer_range=s.text_init,
                             tie_word_embeddings=False)
    ids = {f"{name}_id": VOCAB.index(token) for name, token in VISION_TOKENS.items()}
    return Qwen2VLConfig(vision_config=vision, text_config=text, initializer_range=s.text_init,
                         tie_word_embeddings=False, **ids)


def build_model(settings, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A freshly initialised reference model (same ``seed`` -> same weights), in eval mode."""
    head_dim = settings.text_width // settings.text_heads
    if 2 * sum(MROPE_SECTION) != head_dim:
        raise ValueError(f"settings: text_width / text_heads must be {2 * sum(MROPE_SECTION)} for the M-RoPE "
                         f"sections {MROPE_SECTION}, got {head_dim}")
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(build_config(settings))
    model.set_attn_implementation("sdpa")
    return model.eval()


def load(path) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Model (eval mode, float32) and processor saved with ``save_pretrained`` in ``path``."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model, Qwen2VLProcessor.from_pretrained(path)
