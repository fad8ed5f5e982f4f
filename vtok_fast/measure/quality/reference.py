"""The tiny reference models, their tokenizers and their processors, built offline.

``ModelSettings.arch`` picks the architecture: ``"llava"`` (this module) or ``"qwen2_vl"``
(:mod:`reference_qwen`, the same widths; 16 merged image tokens placed at M-RoPE positions).
``build_model``, ``build_processor``, ``load``, ``prompt`` and ``dialogue`` dispatch on it (or
on the loaded config's ``model_type``). The LLaVA model:

- ``build_tokenizer()``: a word-level ``tokenizers`` model over ``VOCAB`` (special tokens, the
  prompt words, the question words and every answer of ``dataset.ANSWERS``) wrapped in
  ``PreTrainedTokenizerFast``; ``<image>`` is a special token; left padding. Every answer is one
  token.
- ``build_processor(settings)``: a real ``LlavaProcessor`` over a ``CLIPImageProcessor`` (resize
  and centre crop to ``image_size``, CLIP mean/std) and that tokenizer, with ``patch_size`` and
  ``num_additional_image_tokens=1`` (the CLS the ``"default"`` strategy drops): it inserts
  ``(image_size / patch_size) ** 2`` image tokens per image, the count the model produces.
- ``build_model(settings, seed)``: ``LlavaForConditionalGeneration`` from ``CLIPVisionConfig``,
  ``LlamaConfig`` and ``LlavaConfig`` (projector Linear-GELU-Linear, ``vision_feature_layer=-1``,
  ``"default"`` strategy), initialised from ``torch.manual_seed(seed)``, eval mode, SDPA.
- ``prompt(question)``: the text the model is trained and evaluated on.

Nothing here downloads; ``load(path)`` reads a directory written by ``save_pretrained``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from vtok_fast.measure.quality import dataset, reference_qwen

SPECIAL = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
VOCAB = SPECIAL + dataset.QUESTION_WORDS + dataset.ANSWERS
IMAGE_TOKEN = "<image>"
CLIP_MEAN, CLIP_STD = reference_qwen.CLIP_MEAN, reference_qwen.CLIP_STD


@dataclass(frozen=True)
class ModelSettings:
    """Architecture and initialisation of the reference model.

    ``vision_init`` is CLIP's ``initializer_factor`` (it scales CLIP's own per-layer init);
    ``text_init`` is Llama's ``initializer_range`` (std of every Linear/Embedding, the projector
    included); ``embed_init`` (if set) re-draws the token embeddings with that std and
    ``projector_init`` (if set) the projector's weights with std ``projector_init / sqrt(fan_in)``;
    ``position_init`` (if set) starts CLIP's learned position embeddings from a 2-D sin-cos table
    (MAE's, rows in the first half of the channels, columns in the second; the CLS row zero)
    times ``position_init``, instead of CLIP's N(0, 0.02) (with which a patch's place is ~7 % of
    its feature and position questions start from almost nothing).

    The defaults are the trained reference model's. ``text_init=0.08`` (about ``1 / sqrt(width)``)
    rather than Llama's 0.02: at 0.02 the attention logits start near zero, every token attends
    uniformly, and runs of 300-1,000 steps sat at the per-type majority answer; at 0.08 with the
    sin-cos positions the first run passed 60 % held-out by step 200.

    ``arch="qwen2_vl"`` (:func:`qwen_settings`): ``patch_size`` is the tower's patch (the 2x2
    merger makes a language-model token of 2 x 2 of them), ``text_init`` is every
    ``initializer_range``, and ``vision_init``, ``embed_init``, ``projector_init`` and
    ``position_init`` do not apply (they must be ``None`` but ``vision_init``, ignored).

    ``rope_theta``: the decoder's rotary base (LLaVA: Llama's default 10,000). Qwen2-VL's M-RoPE
    gives the temporal, row and column ids the rotary frequencies in that order
    (``reference_qwen.MROPE_SECTION``), so the column ids get the lowest ones: at 10,000 and
    ``head_dim`` 32 a column step turns them by 0.0002-0.003 rad, nothing a 2-layer decoder can
    read, and a first run at 10,000 answered ``color_at`` at 38 % (``glyph`` and ``letter_at``
    100 %). ``qwen_settings`` uses 3: a row step turns the row pairs by 0.54-0.76 rad and a column
    step the column pairs by 0.36-0.50 rad, so the four rows and columns of the merged grid are
    clearly different phases that still change monotonically across the grid (``relation``
    compares them). Held-out, the same recipe gave 94.8 % at 3, 93.4 % at 1 (all pairs 1 rad;
    with 900 steps) and 91.6 % at 10 (without the smaller drop share)."""
    arch: str = "llava"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    mlp_ratio: int = 4
    vision_init: float = 1.0
    text_init: float = 0.08
    embed_init: float | None = None
    projector_init: float | None = None
    position_init: float | None = 1.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "qwen2_vl" and any(v is not None for v in (self.embed_init, self.projector_init,
                                                                    self.position_init)):
            raise ValueError("qwen2_vl settings take no embed_init, projector_init or position_init (LLaVA's)")

    @property
    def num_image_tokens(self) -> int:
        merge = reference_qwen.MERGE if self.arch == "qwen2_vl" else 1
        return (self.image_size // self.patch_size // merge) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


ARCHS = ("llava", "qwen2_vl")


def qwen_settings(**changes) -> ModelSettings:
    """The Qwen2-VL reference model's settings: LLaVA's widths and 8-px patches, merged 2 x 2 (16
    language-model tokens from 64 px, one per grid cell), rotary base 3, none of LLaVA's init
    options."""
    return ModelSettings(**{"arch": "qwen2_vl", "position_init": None, "rope_theta": 3.0, **changes})


def prompt(question: str, arch: str = "llava") -> str:
    """The model's text: the image, then the question; the answer is predicted at the question's
    last word (no trailing template tokens: the last word carries the query). The processor
    expands the image token (``<image>``; Qwen2-VL: ``<|image_pad|>`` between its vision start and
    end tokens) into ``num_image_tokens`` placeholders."""
    return reference_qwen.prompt(question) if arch == "qwen2_vl" else f"{IMAGE_TOKEN} {question}"


def dialogue(turns, arch: str = "llava") -> tuple[str, list[int]]:
    """Training text for several ``(question, answer)`` turns about one image:
    ``<image> q1 a1 q2 a2 ... qK`` (its first turn is ``prompt(q1, arch)``), and for each turn the
    offset from the end of the sequence (0 = last token) of the position predicting its answer."""
    words, ends = [], []
    for k, (question, answer) in enumerate(turns):
        if k:
            words.append(turns[k - 1][1])
        words += question.split()
        ends.append(len(words) - 1)
    return prompt(" ".join(words), arch), [len(words) - 1 - e for e in ends]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over ``VOCAB`` (whitespace split, ``<unk>`` for unknown words)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", padding_side="left",
                                  extra_special_tokens={"image_token": IMAGE_TOKEN})
    return tok


def build_processor(settings: ModelSettings = ModelSettings()):
    """A ``LlavaProcessor`` (Qwen2-VL: ``Qwen2VLProcessor``) whose image-token count equals the
    model's feature count."""
    if settings.arch == "qwen2_vl":
        return reference_qwen.build_processor(settings)
    size = settings.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                          patch_size=settings.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def build_config(settings: ModelSettings = ModelSettings()) -> LlavaConfig:
    """The ``LlavaConfig`` of the reference model (vocabulary = ``VOCAB``)."""
    s = settings
    vision = CLIPVisionConfig(hidden_size=s.vision_width, intermediate_size=s.mlp_ratio * s.vision_width,
                              num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                              image_size=s.image_size, patch_size=s.patch_size, initializer_factor=s.vision_init)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=s.text_width, intermediate_size=s.mlp_ratio * s.text_width,
                       num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                       num_key_value_heads=s.text_heads, max_position_embeddings=256,
                       pad_token_id=VOCAB.index("<pad>"), bos_token_id=VOCAB.index("<s>"),
                       eos_token_id=VOCAB.index("</s>"), initializer_range=s.text_init, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta})
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB.index(IMAGE_TOKEN),
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", initializer_range=s.text_init)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """``(1 + grid**2, dim)``: a zero CLS row, then for patch ``(r, c)`` (row-major) ``dim/4``
    sines and cosines of ``r`` then of ``c`` at frequencies ``10000**(-k / (dim/4))``."""
    quarter = dim // 4
    freq = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    idx = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")

    def enc(x):
        angle = x.reshape(-1, 1) * freq
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    table = torch.cat([enc(rows), enc(cols)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def build_model(settings: ModelSettings = ModelSettings(), seed: int = 0):
    """A freshly initialised reference model (same ``seed`` -> same weights), in eval mode."""
    if settings.arch == "qwen2_vl":
        return reference_qwen.build_model(settings, seed)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(settings))
    with torch.no_grad():
        if settings.embed_init is not None:
            model.get_input_embeddings().weight.normal_(0.0, settings.embed_init)
        if settings.position_init is not None:
            table = sincos_2d(settings.image_size // settings.patch_size, settings.vision_width)
            model.model.vision_tower.embeddings.position_embedding.weight.copy_(settings.position_init * table)
        if settings.projector_init is not None:
            for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
                layer.weight.normal_(0.0, settings.projector_init / layer.in_features ** 0.5)
    model.set_attn_implementation("sdpa")
    return model.eval()


def load(path):
    """Model (eval mode, float32) and processor saved with ``save_pretrained`` in ``path`` (either
    architecture, by the saved config's ``model_type``)."""
    from transformers import AutoConfig

    if AutoConfig.from_pretrained(path).model_type == "qwen2_vl":
        return reference_qwen.load(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model, LlavaProcessor.from_pretrained(path)


def answer_ids(tokenizer) -> torch.Tensor:
    """Token ids of ``dataset.ANSWERS``, in that order (each answer is exactly one token)."""
    ids = [tokenizer.convert_tokens_to_ids(a) for a in dataset.ANSWERS]
    return torch.tensor(ids, dtype=torch.long)
