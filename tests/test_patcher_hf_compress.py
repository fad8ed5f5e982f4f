"""``vtok_fast.patch.hf_compress``: vision-side compression in a LLaVA model, on a tiny random-weight
``LlavaForConditionalGeneration`` with an offline tokenizer and processor (no downloads).

The builders here (``tiny_llava``, ``offline_processor``, ``prompts``) are shared with
``test_patcher_hf_fastv.py``."""
import copy

import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, MistralConfig, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config, SiglipVisionConfig)

from helpers import same_generations
import vtok_fast.patch
from vtok_fast.patch import hf_compress
from vtok_fast.reduce.attention_scores import attention_scores_reference
from vtok_fast.reduce.compress import compress

IMG, PATCH = 32, 8  # a 4x4 grid of patch tokens (+ CLS for CLIP)
GRID = (IMG // PATCH, IMG // PATCH)
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "USER", ":", "ASSISTANT", "describe", "the", "image", "a", "cat"] + [
    f"w{i}" for i in range(40)]
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=IMG,
             patch_size=PATCH)
TEXT = dict(vocab_size=len(WORDS) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, bos_token_id=2, eos_token_id=3,
            initializer_range=0.2)  # 10x the default: attention far from uniform, so pruning matters
TEXTS = ["USER : <image> describe ASSISTANT :", "USER : <image> describe the image a cat ASSISTANT :"]


def offline_tokenizer(padding_side="left") -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory, with ``<image>`` as a special token."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", padding_side=padding_side)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


IMAGE_TOKEN = len(WORDS)  # the id the tokenizer gives "<image>"


def offline_processor(strategy="default", cls=1, padding_side="left") -> LlavaProcessor:
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    return LlavaProcessor(image_processor=image_processor, tokenizer=offline_tokenizer(padding_side),
                          patch_size=PATCH, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=cls)


def tiny_llava(strategy="default", tower="clip", text="llama", impl="sdpa", **config) -> LlavaForConditionalGeneration:
    vision = (CLIPVisionConfig if tower == "clip" else SiglipVisionConfig)(**TOWER)
    text_kwargs = dict(TEXT)
    if text == "mistral":
        text_kwargs["sliding_window"] = config.pop("sliding_window", None)
    text_config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
                   "qwen3": Qwen3Config}[text](**text_kwargs)
    config.setdefault("vision_feature_layer", -2)
    llava_config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=IMAGE_TOKEN,
                               vision_feature_select_strategy=strategy, **config)
    model = LlavaForConditionalGeneration(llava_config).eval()
    model.set_attn_implementation(impl)
    return model


def images(count=2):
    return [torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8) for _ in range(count)]


def prompts(processor, count=2):
    return processor(images=images(count), text=TEXTS[:count], return_tensors="pt", padding=True)


def state(model):
    """Everything a patch could leave behind: every module's instance attributes and the weights."""
    return ({name: sorted(m.__dict__) for name, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_state_equal(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


# --- a reference: the method applied by hand to the unpatched tower's features ---------------------

def reference_features(model, pixels, method, budget, attn_layer=None):
    """``get_image_features`` of the unpatched ``model``, rebuilt by hand: the selected hidden state
    (CLS included), compressed with ``prefix=1`` from queries / keys hooked off ``attn_layer``,
    the CLS dropped for the "default" strategy, then the projector."""
    llava = model.model
    tower = llava.vision_tower
    hooked = {}
    handles = []
    if attn_layer is not None:
        attn = tower.encoder.layers[attn_layer].self_attn
        for name in ("q_proj", "k_proj"):
            handles.append(getattr(attn, name).register_forward_hook(
                lambda mod, args, out, name=name: hooked.__setitem__(name, out)))
    try:
        hidden = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
    finally:
        for handle in handles:
            handle.remove()
    extra = {}
    if attn_layer is not None:
        batch, num, width = hooked["k_proj"].shape
        if method in ("attn_topk", "visionzip"):
            heads = attn.num_heads
            extra = dict(queries=hooked["q_proj"][:, :1].view(batch, 1, heads, -1).transpose(1, 2),
                         keys=hooked["k_proj"].view(batch, num, heads, -1).transpose(1, 2), scale=attn.scale)
        else:  # PruMerge: one head of full width
            extra = dict(queries=hooked["q_proj"][:, None, :1], keys=hooked["k_proj"][:, None])
    result = compress(hidden, method, grid=GRID, prefix=1, **budget, **extra)
    if model.config.vision_feature_select_strategy == "default":
        result = result.without_prefix(1)
    return llava.multi_modal_projector(result.tokens)


SPECS = [
    ("pool", {"stride": 2}, None),
    ("pool", {"stride": 3, "mode": "bilinear"}, None),
    ("tome", {"keep": 7}, None),
    ("attn_topk", {"keep": 5}, 1),  # vision_feature_layer -2 of 3 layers -> layers[1]
    ("visionzip", {"dominant": 4, "contextual": 3}, 1),
    ("prumerge", {"keep": 3, "neighbours": 4}, 2),  # the last layer
]


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("method,budget,attn_layer", SPECS, ids=[f"{m}-{b}" for m, b, _ in SPECS])
def test_projector_gets_the_compressed_tokens(method, budget, attn_layer, strategy):
    model = tiny_llava(strategy)
    pixels = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = reference_features(model, pixels, method, budget, attn_layer)
        hf_compress.apply(model, compress=(method, budget))
        features = model.get_image_features(pixel_values=pixels).pooler_output
    assert model._compress_info["attn_layer"] == attn_layer
    count = hf_compress.image_token_count(model)
    assert [f.shape for f in features] == [(count, TEXT["hidden_size"])] * 2 == [tuple(expected.shape[1:])] * 2
    for got, want in zip(features, expected, strict=True):
        assert torch.equal(got, want)  # the same ops on the same inputs
    info = model._compress_info["compressed"]
    assert info.positions.shape == (2, count)


@pytest.mark.parametrize("method,budget", [("pool", {"stride": 2}), ("visionzip", {"dominant": 4, "contextual": 2}),
                                           ("prumerge", {"ratio": 0.25})])
def test_generate_end_to_end_with_the_processor(method, budget):
    model, processor = tiny_llava(), offline_processor()
    hf_compress.apply(model, compress=(method, budget))
    hf_compress.configure_processor(processor, model)
    count = hf_compress.image_token_count(model)
    inputs = prompts(processor)
    assert ((inputs["input_ids"] == IMAGE_TOKEN).sum(dim=1) == count).all()
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    unpatched = offline_processor()
    assert (prompts(unpatched)["input_ids"] == IMAGE_TOKEN).sum() == 2 * GRID[0] * GRID[1]
    assert count < GRID[0] * GRID[1]


@pytest.mark.parametrize("method,budget", [("pool", {"stride": 1}), ("tome", {"r": 0}), ("attn_topk", {"ratio": 1.0})])
def test_identity_compression_equals_the_unpatched_model(method, budget):
    model, processor = tiny_llava(), offline_processor()
    inputs = prompts(processor)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**inputs, **kwargs)
    hf_compress.apply(model, compress=(method, budget))
    assert hf_compress.configure_processor(processor, model).num_additional_image_tokens == 1  # unchanged
    same_generations(model.generate(**inputs, **kwargs), expected)


def test_remove_restores_exactly():
    model, processor = tiny_llava(), offline_processor()
    inputs = prompts(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
    before = state(model)
    hf_compress.apply(model, compress=("visionzip", {"dominant": 3, "contextual": 2}))
    hf_compress.configure_processor(processor, model)
    assert processor.num_additional_image_tokens == 1 + 5 - 16
    hf_compress.apply(model, compress=("pool", {"stride": 2}))  # re-applying replaces
    assert model._compress_info["method"] == "pool" and hf_compress.image_token_count(model) == 4
    hf_compress.remove(model)
    assert_state_equal(before, state(model))
    hf_compress.remove(model)  # a no-op now
    assert hf_compress.configure_processor(processor, model).num_additional_image_tokens == 1
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_siglip_tower_without_cls():
    model = tiny_llava("full", tower="siglip")
    processor = offline_processor("full", cls=0)
    assert hf_compress.image_token_count(model) == 16
    hf_compress.apply(model, compress=("pool", {"stride": 2}))
    hf_compress.configure_processor(processor, model)
    inputs = prompts(processor)
    assert ((inputs["input_ids"] == IMAGE_TOKEN).sum(dim=1) == 4).all()
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2
    with pytest.raises(ValueError, match="no CLS token"):
        hf_compress.apply(model, compress=("attn_topk", {"keep": 4}))


def test_pixel_shuffle_needs_a_wider_projector():
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"4x wider \(128 channels\), but the projector takes 32"):
        hf_compress.apply(model, compress=("pixel_shuffle", {"stride": 2}))
    model.model.multi_modal_projector.linear_1 = nn.Linear(4 * TOWER["hidden_size"], TEXT["hidden_size"])
    hf_compress.apply(model, compress=("pixel_shuffle", {"stride": 2}))
    assert hf_compress.image_token_count(model) == 4
    features = model.get_image_features(pixel_values=torch.randn(1, 3, IMG, IMG)).pooler_output
    assert features[0].shape == (4, TEXT["hidden_size"])


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_attention_scores_backends(path, monkeypatch):
    """The CLS scores come from ``attention_scores``: on its Triton kernel (the interpreter here)
    and on its PyTorch path the dominant tokens are a top-k of the float64 reference scores."""
    model = tiny_llava()
    pixels = torch.randn(2, 3, IMG, IMG)
    attn = model.model.vision_tower.encoder.layers[1].self_attn
    hooked = {}
    handles = [getattr(attn, n).register_forward_hook(lambda m, a, out, n=n: hooked.__setitem__(n, out))
               for n in ("q_proj", "k_proj")]
    monkeypatch.setenv("VTOK_FAST_BACKEND", path)
    hf_compress.apply(model, compress=("visionzip", {"dominant": 6, "contextual": 3}))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
    for handle in handles:
        handle.remove()
    assert [f.shape for f in features] == [(9, TEXT["hidden_size"])] * 2
    heads = attn.num_heads
    q = hooked["q_proj"][:, :1].view(2, 1, heads, -1).transpose(1, 2)
    k = hooked["k_proj"].view(2, -1, heads, attn.head_dim).transpose(1, 2)
    scores = attention_scores_reference(q, k, attn.scale)[:, 1:]  # float64, patch tokens
    dominant = model._compress_info["compressed"].positions[:, :6]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, dominant, True)
    # fp32 scores over 17 keys are within ~1e-7 of float64; a near-tie may go either way
    lowest = scores.masked_fill(~chosen, float("inf")).amin(dim=1)
    highest = scores.masked_fill(chosen, -float("inf")).amax(dim=1)
    assert bool((lowest >= highest - 1e-6).all())


def test_attn_layer_option_and_counts():
    model = tiny_llava()
    hf_compress.apply(model, compress=("attn_topk", {"keep": 6, "attn_layer": -1}))
    assert model._compress_info["attn_layer"] == 2 and hf_compress.image_token_count(model) == 6
    pixels = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        expected = reference_features(model_copy_unpatched(model), pixels, "attn_topk", {"keep": 6}, 2)
        got = model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert torch.equal(got, expected[0])


def model_copy_unpatched(model):
    clone = copy.deepcopy(model)
    hf_compress.remove(clone)
    return clone


def test_image_token_count_without_this_patch():
    model = tiny_llava()
    assert hf_compress.image_token_count(model) == 16
    assert hf_compress.image_token_count(tiny_llava("full")) == 17
    assert hf_compress.image_token_count(model, (48, 32)) == 24
    vtok_fast.patch.hf(model, fuse_embed=False, tome_r=2)  # ToMe in the tower: followed
    from vtok_fast.patch import hf_tome
    assert hf_compress.image_token_count(model) == hf_tome.llava_image_token_count(model) < 16
    with pytest.raises(ValueError, match="already patched"):
        hf_compress.apply(model, compress=("pool", {}))


def test_bad_models_and_budgets():
    model = tiny_llava()
    with pytest.raises(TypeError, match="nn.Module"):
        hf_compress.apply("llava", compress="pool")
    with pytest.raises(ValueError, match="LlavaModel"):
        hf_compress.apply(nn.Linear(2, 2), compress="pool")
    with pytest.raises(TypeError, match="compress must be"):
        hf_compress.apply(model, compress=("pool", 2))
    with pytest.raises(ValueError, match="must be one of"):
        hf_compress.apply(model, compress="bogus")
    with pytest.raises(ValueError, match="keeps a different number of tokens per image"):
        hf_compress.apply(model, compress="prumerge")
    with pytest.raises(ValueError, match="keeps a different number"):
        hf_compress.apply(model, compress=("prumerge_plus", {"keep": 4}))
    with pytest.raises(ValueError, match="keep=17 is larger than the 16 patch tokens"):
        hf_compress.apply(model, compress=("attn_topk", {"keep": 17}))
    with pytest.raises(TypeError, match="must not contain keys, scores"):
        hf_compress.apply(model, compress=("attn_topk", {"keep": 2, "scores": None, "keys": None}))
    with pytest.raises(TypeError, match="attn_layer= is for the attention methods"):
        hf_compress.apply(model, compress=("pool", {"attn_layer": 1}))
    with pytest.raises(ValueError, match=r"attn_layer must be an encoder layer index in \[-3, 2\]"):
        hf_compress.apply(model, compress=("visionzip", {"dominant": 2, "contextual": 2, "attn_layer": 3}))
    assert "_vtok_fast_patches" not in model.model.__dict__  # failed applies leave nothing behind
    listed = tiny_llava(vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match="concatenates several layers"):
        hf_compress.apply(listed, compress="pool")
    embeddings = tiny_llava(vision_feature_layer=0)
    with pytest.raises(ValueError, match="pass attn_layer="):
        hf_compress.apply(embeddings, compress=("attn_topk", {"keep": 2}))


def test_configure_processor_checks_the_processor():
    model = tiny_llava()
    with pytest.raises(TypeError, match="LlavaProcessor"):
        hf_compress.configure_processor(offline_tokenizer(), model)
    processor = offline_processor()
    processor.patch_size = 4
    with pytest.raises(ValueError, match="patch_size=4"):
        hf_compress.configure_processor(processor, model)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        hf_compress.configure_processor(offline_processor("full"), model)


def test_projector_outside_the_tower_and_stale_prompts():
    model, processor = tiny_llava(), offline_processor()
    full = prompts(processor)  # built for 16 image tokens: the patched model drops the removed placeholders
    hf_compress.apply(model, compress=("attn_topk", {"keep": 4}))
    with torch.no_grad():
        assert model(**full).logits.shape[1] == full["input_ids"].shape[1] - 12  # 12 per row
    stale = dict(full, input_ids=full["input_ids"][:, 1:], attention_mask=full["attention_mask"][:, 1:])
    stale["input_ids"][0, -3] = IMAGE_TOKEN  # 33 <image> tokens: neither count
    with pytest.raises(ValueError, match=r"the prompt holds 33 <image> tokens, but its images give 8 image features"
                                         r".*image_token_count\(model\).*configure_processor\(processor, model\)"):
        model(**stale)
    with pytest.raises(ValueError, match="needs the vision tower's attention"):
        model.model.multi_modal_projector(torch.randn(1, 16, TOWER["hidden_size"]))
    with pytest.raises(ValueError, match="received 5 tokens per image"):
        hf_compress.apply(model, compress=("pool", {}))
        model.model.multi_modal_projector(torch.randn(1, 5, TOWER["hidden_size"]))
    assert model.model.multi_modal_projector(torch.randn(1, 16, TOWER["hidden_size"])).shape == (1, 4, 32)


@pytest.mark.parametrize("compress", [("pool", {"stride": 2}), ("fastv", {"layer": 2, "ratio": 0.5})])
def test_public_hf_entry_point_and_unpatch(compress):
    """``vtok_fast.patch.hf(model, compress=...)`` dispatches vision methods and FastV;
    ``vtok_fast.patch.unpatch`` restores the model exactly."""
    import vtok_fast.patch

    model, processor = tiny_llava(), offline_processor()
    inputs = prompts(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
    before = state(model)
    vtok_fast.patch.hf(model, fuse_embed=False, fuse_project=False, compress=compress)
    vtok_fast.patch.configure_processor(processor, model)
    with torch.no_grad():
        patched = model(**prompts(processor)).logits
    assert patched.shape[0] == 2
    vtok_fast.patch.unpatch(model)
    assert_state_equal(before, state(model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
