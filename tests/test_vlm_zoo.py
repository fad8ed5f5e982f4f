"""``vtok_fast.bench.vlm_zoo``: for every family the tiny random-weight model and its offline processor
run a forward and ``generate`` on a real photograph, batch two images of different sizes (padding),
and the processor's placeholder tokens match the features the model makes; the real-width configs
carry the checkpoints' widths. Nothing downloads."""
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from transformers.models.smolvlm import processing_smolvlm

from helpers import tiny_vlms
from vtok_fast.bench import vlm_zoo

FAMILIES = list(vlm_zoo.FAMILIES)
# scikit-image's astronaut photograph, resized to 64 x 48 (tests/data/LICENSES.md)
ASTRONAUT = Path(__file__).resolve().parent / "data" / "astronaut_64x48.png"


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.open(ASTRONAUT).convert("RGB")


@pytest.fixture(scope="module")
def tall(astronaut) -> Image.Image:
    """The astronaut squeezed to 24 x 72: another size and aspect (other tiles, grids, counts)."""
    return astronaut.resize((24, 72))


@pytest.fixture(scope="module")
def models():
    """One tiny model per family, built on first use and shared by the tests of this file."""
    return tiny_vlms()


def _feature_count(model, batch) -> int:
    """Rows of image features ``get_image_features`` makes for ``batch``."""
    return sum(feature.shape[0] for feature in vlm_zoo.image_features(model, batch))


def _forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_keyed_by_model_type_small_eval_fp32_sdpa(family, models):
    """The table's key is ``config.model_type``; the model is tiny, in eval mode, fp32, SDPA in the
    tower and the language model; every tokenizer id fits the vocabulary."""
    model = models(family)
    config = model.config
    assert config.model_type == family and type(model).__name__ == vlm_zoo.FAMILIES[family].model_class
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert {c._attn_implementation for c in (config, config.text_config, config.vision_config)} == {"sdpa"}
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == vlm_zoo.VOCAB and text.hidden_size == 64 and text.num_hidden_layers == 2
    assert getattr(vision, "num_hidden_layers", None) == 2 or getattr(vision, "depth", None) == 2
    assert sum(p.numel() for p in model.parameters()) < 500_000
    tokenizer = vlm_zoo.processor(family).tokenizer
    assert len(tokenizer) <= vlm_zoo.VOCAB and max(tokenizer.all_special_ids) < vlm_zoo.VOCAB
    assert tokenizer.pad_token_id == text.pad_token_id and config.image_token_id < vlm_zoo.VOCAB


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_generate_on_one_photograph(family, models, astronaut):
    """Finite logits, one placeholder per feature ``get_image_features`` makes, and greedy
    ``generate`` whose first token is the forward's argmax."""
    model = models(family)
    batch = vlm_zoo.inputs(family, [astronaut], [vlm_zoo.prompt(family)])
    logits = _forward(model, batch)
    length = batch["input_ids"].shape[1]
    assert logits.shape == (1, length, vlm_zoo.VOCAB) and torch.isfinite(logits).all()
    placeholders = vlm_zoo.image_token_count(model, batch)
    assert placeholders.item() == _feature_count(model, batch) > 0
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert length < out.shape[1] <= length + 3 and torch.equal(out[:, :length], batch["input_ids"])
    assert out[0, length].item() == logits[0, -1].argmax().item()  # prefill agrees with the forward


@pytest.mark.parametrize("family", FAMILIES)
def test_two_image_sizes_in_one_padded_batch_match_single_runs(family, models, astronaut, tall):
    """Prompts of different lengths, images of different sizes: padded on the left, every row
    gives the logits of its own unbatched run, and its placeholder count is its image's features."""
    model = models(family)
    pairs = [(astronaut, vlm_zoo.prompt(family)), (tall, vlm_zoo.prompt(family, "describe"))]
    batch = vlm_zoo.inputs(family, [image for image, _ in pairs], [text for _, text in pairs])
    assert (batch["attention_mask"] == 0).any(), "the two rows must need padding"
    logits = _forward(model, batch)
    assert torch.isfinite(logits).all()
    counts = vlm_zoo.image_token_count(model, batch).tolist()
    assert sum(counts) == _feature_count(model, batch)
    for row, (image, text) in enumerate(pairs):
        single = vlm_zoo.inputs(family, [image], [text])
        assert counts[row] == _feature_count(model, single)
        kept = batch["attention_mask"][row].bool()
        torch.testing.assert_close(logits[row, kept], _forward(model, single)[0], atol=2e-5, rtol=1e-4)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > batch["input_ids"].shape[1]


def test_sizes_differ_where_the_family_has_variable_counts(astronaut, tall, models):
    """The tall image really is another layout: other counts or another patch grid per family."""
    for family in FAMILIES:
        batch = vlm_zoo.inputs(family, [astronaut, tall], [vlm_zoo.prompt(family)] * 2)
        counts = vlm_zoo.image_token_count(models(family), batch).tolist()
        if family.startswith("qwen"):
            grid = batch["image_grid_thw"]
            assert not torch.equal(grid[0], grid[1]), family
        elif family in ("llava", "gemma3"):  # fixed count per image
            assert counts[0] == counts[1], family
        else:
            assert counts[0] != counts[1], family


def test_seed_fixes_the_weights_and_leaves_the_global_generator_alone():
    """Same seed, same weights; another seed, other weights; the global RNG state is untouched."""
    for family in FAMILIES:
        state = torch.random.get_rng_state()
        first, again, other = (vlm_zoo.tiny(family, seed=seed).state_dict() for seed in (0, 0, 1))
        assert torch.equal(state, torch.random.get_rng_state()), family
        assert all(torch.equal(first[k], again[k]) for k in first), family
        assert any(not torch.equal(first[k], other[k]) for k in first), family


def test_overrides_update_sub_configs_and_broken_constraints_raise():
    """Sub-config overrides merge into the tiny widths; an override breaking a family constraint
    raises ``ValueError`` naming it; an unknown family raises ``KeyError`` listing the known ones."""
    config = vlm_zoo.tiny_config("llava", vision_feature_layer=-1, text_config={"num_hidden_layers": 1})
    assert config.vision_feature_layer == -1 and config.text_config.num_hidden_layers == 1
    assert config.text_config.hidden_size == 64  # the rest of the sub-config stays
    assert vlm_zoo.tiny("qwen2_vl", attn_implementation="eager").config._attn_implementation == "eager"
    broken = [("qwen2_vl", {"vision_config": {"hidden_size": 32}}, "hidden_size"),
              ("qwen2_vl", {"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 2]}}},
               "mrope_section"),
              ("qwen2_5_vl", {"vision_config": {"window_size": 8}}, "window_size"),
              ("qwen2_5_vl", {"vision_config": {"fullatt_block_indexes": [2]}}, "fullatt_block_indexes"),
              ("qwen3_vl", {"vision_config": {"num_position_embeddings": 60}}, "square"),
              ("qwen3_vl", {"vision_config": {"deepstack_visual_indexes": [3]}}, "deepstack"),
              ("llava_next", {"image_grid_pinpoints": [[32, 48]]}, "multiples"),
              ("llava_onevision", {"image_grid_pinpoints": [[40, 40]]}, "multiples"),
              ("internvl", {"vision_config": {"image_size": [56, 56]}}, "divisible"),
              ("gemma3", {"mm_tokens_per_image": 9}, "mm_tokens_per_image"),
              ("smolvlm", {"vision_config": {"image_size": 64}}, "scale_factor")]
    for family, overrides, message in broken:
        with pytest.raises(ValueError, match=message):
            vlm_zoo.tiny_config(family, **overrides)
    with pytest.raises(KeyError, match="llava"):
        vlm_zoo.tiny("llava_video")


def test_smolvlm_processor_stand_in_matches_smolvlm_processor(monkeypatch, astronaut, tall):
    """``SmolVLMProcessor`` cannot be built here (it wants ``num2words``, used only for video
    prompts); built with a stand-in for that module it gives the inputs our ``Idefics3Processor``
    gives for images."""
    ours = vlm_zoo.processor("smolvlm")
    assert isinstance(ours, transformers.Idefics3Processor)
    assert isinstance(ours.image_processor, transformers.SmolVLMImageProcessor)
    kwargs = dict(image_processor=ours.image_processor, tokenizer=vlm_zoo.tokenizer("smolvlm"),
                  video_processor=transformers.SmolVLMVideoProcessor(), image_seq_len=ours.image_seq_len)
    if processing_smolvlm.num2words is None:
        with pytest.raises(ImportError, match="num2words"):
            transformers.SmolVLMProcessor(**kwargs)
        monkeypatch.setattr(processing_smolvlm, "num2words", str)
    real = transformers.SmolVLMProcessor(**kwargs)
    texts = [vlm_zoo.prompt("smolvlm"), vlm_zoo.prompt("smolvlm", "describe")]
    ours_out = vlm_zoo.inputs("smolvlm", [astronaut, tall], texts)
    real_out = real(text=texts, images=[[astronaut], [tall]], padding=True, return_tensors="pt")
    assert sorted(ours_out) == sorted(real_out)
    assert all(torch.equal(ours_out[key], real_out[key]) for key in ours_out)


# checkpoint widths: family -> (vision width, text width, text heads, text kv heads, tokens per image or tile)
REAL = {"llava": (1024, 4096, 32, 32, 576), "llava_next": (1024, 4096, 32, 32, 576),
        "llava_onevision": (1152, 3584, 28, 4, 729), "qwen2_vl": (1280, 3584, 28, 4, None),
        "qwen2_5_vl": (1280, 3584, 28, 4, None), "qwen3_vl": (1152, 4096, 32, 8, None),
        "internvl": (1024, 3584, 28, 4, 256), "gemma3": (1152, 2560, 8, 4, 256),
        "smolvlm": (1152, 2048, 32, 32, 81), "idefics3": (1152, 4096, 32, 8, 169)}


def _tokens_per_tile(family, processor) -> int | None:
    """What the real-width processor puts per image (LLaVA, Gemma 3) or per tile (the others)."""
    side = processor.image_processor.size
    return {"llava": lambda: (side["shortest_edge"] // processor.patch_size) ** 2,
            "llava_next": lambda: (side["shortest_edge"] // processor.patch_size) ** 2,
            "llava_onevision": lambda: processor.num_image_tokens,
            "internvl": lambda: processor.image_seq_length, "gemma3": lambda: processor.image_seq_length,
            "smolvlm": lambda: processor.image_seq_len, "idefics3": lambda: processor.image_seq_len,
            }.get(family, lambda: None)()


def test_real_width_configs_carry_the_checkpoint_numbers():
    """Configs only (nothing allocated): widths, heads, 2 + 2 layers, the shrunk vocabulary, and the
    processor built for them puts the checkpoint's tokens per image or tile."""
    for family, (vision_width, width, heads, kv_heads, per_tile) in REAL.items():
        config = vlm_zoo.real_width(family)
        vision, text = config.vision_config, config.text_config
        assert config.model_type == family and text.vocab_size == vlm_zoo.VOCAB > config.image_token_id
        assert getattr(vision, "embed_dim", vision.hidden_size) == vision_width, family
        assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (width, heads, kv_heads)
        assert text.num_hidden_layers == 2 and getattr(vision, "num_hidden_layers", None) in (2, None)
        assert getattr(vision, "depth", 2) == 2
        assert _tokens_per_tile(family, vlm_zoo.processor(family, config)) == per_tile, family
    qwen25, qwen3 = vlm_zoo.real_width("qwen2_5_vl"), vlm_zoo.real_width("qwen3_vl")
    assert (qwen25.vision_config.out_hidden_size, qwen25.vision_config.intermediate_size) == (3584, 3420)
    assert qwen25.vision_config.window_size == 112 and qwen25.text_config.intermediate_size == 18944
    assert qwen3.vision_config.patch_size == 16 and qwen3.vision_config.num_position_embeddings == 2304
    assert qwen3.text_config.head_dim == 128 and qwen3.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
