"""Token budgets: the published counts, transformers' own arithmetic over random sizes, the CLI."""
import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import (CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor,
                          PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor)
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from vtok_fast.measure import budget_cli
from vtok_fast.measure.budget import (FASTV_DEFAULT_RATIO, LLAVA_NEXT_PINPOINTS, MAX_IMAGE_SIDE, count_tokens,
                                     parse_compress)


def _row(budget, prefix):
    """Count of the one breakdown row whose label starts with ``prefix``."""
    rows = [count for label, count in budget.breakdown if label.startswith(prefix)]
    assert len(rows) == 1, (prefix, budget.breakdown)
    return rows[0]


def _random_sizes(count, low=16, high=4000):
    sizes = torch.randint(low, high + 1, (count, 2)).tolist()
    # elongated images too: one side short, the other long
    short, long = torch.randint(16, 120, (count // 4,)), torch.randint(1000, 4000, (count // 4,))
    sizes += [[int(a), int(b)] for a, b in zip(short, long)]
    sizes += [[b, a] for a, b in sizes[-(count // 4):]]
    return sizes


# --- the reference page's numbers ---------------------------------------------------------------

@pytest.mark.parametrize("model, size, options, vit, llm", [
    ("vit-b/16", (224, 224), {}, 196, 196),
    ("vit-l/14-336", (336, 336), {}, 576, 576),
    ("llava-1.5", (336, 336), {}, 576, 576),
    ("llava-1.5", (1080, 1920), {}, 576, 576),  # the processor resizes every image to 336x336
    ("llava-next", (672, 672), {}, 5 * 576, 2928),  # 2880 = 5 x 576 raw ViT tokens
    ("llava-next", (336, 336), {}, 3 * 576, 1176),
    ("llava-next", (480, 640), {}, 5 * 576, 2340),
    ("qwen2-vl", (1080, 1920), {}, 4 * 1222, 1222),  # HF class default max_pixels 1,003,520
    ("qwen2-vl", (1080, 1920), {"max_pixels": 12_845_056}, 4 * 2691, 2691),  # Qwen's utilities
    ("qwen2-vl", (336, 336), {}, 576, 144),
    ("qwen2-vl", (672, 1008), {}, 4 * 864, 864),
    ("deepseek-ocr", (1024, 1024), {"mode": "tiny"}, 32 * 32, 73),
    ("deepseek-ocr", (1024, 1024), {"mode": "small"}, 40 * 40, 111),
    ("deepseek-ocr", (1024, 1024), {"mode": "base"}, 64 * 64, 273),
    ("deepseek-ocr", (1024, 1024), {"mode": "large"}, 80 * 80, 421),
])
def test_reference_counts(model, size, options, vit, llm):
    budget = count_tokens(model, size, **options)
    assert (budget.vit_tokens, budget.llm_tokens) == (vit, llm)
    assert budget.uncompressed_llm_tokens == llm and budget.compress is None
    assert budget.pixels_per_token == size[0] * size[1] / llm


def test_breakdown_adds_up_and_prints():
    for model, size, options in [("llava-next", (480, 640), {}), ("llava-uhd", (672, 1008), {}),
                                 ("deepseek-ocr", (1280, 1920), {}), ("qwen2-vl", (1080, 1920), {}),
                                 ("llava-next", (480, 640), {"compress": "pool:stride=2"})]:
        budget = count_tokens(model, size, **options)
        assert sum(c for label, c in budget.breakdown if label.startswith("ViT: ")) == budget.vit_tokens
        assert sum(c for label, c in budget.breakdown if label.startswith("LLM: ")) == budget.llm_tokens
        assert all(label.startswith(("ViT: ", "LLM: ")) for label, _ in budget.breakdown)
        text = str(budget)
        assert f"{budget.vit_tokens} ViT tokens, {budget.llm_tokens} LLM tokens" in text
        assert all(label in text for label, _ in budget.breakdown)


def test_compression_ratio_of_vit_l14():
    assert count_tokens("vit-l/14-336", (336, 336)).pixels_per_token == 196.0  # 336*336 / 576


def test_llava_next_breakdown_480x640():
    budget = count_tokens("llava-next", (480, 640))
    assert _row(budget, "LLM: base view") == 576
    assert _row(budget, "LLM: crops 48x48 unpadded to 36x48") == 36 * 48  # pinpoint 672x672
    assert _row(budget, "LLM: one newline per row") == 36


def test_llava_uhd_672x1008():
    budget = count_tokens("llava-uhd", (672, 1008))
    assert _row(budget, "ViT: 6 slices of 336x336 (3 cols x 2 rows)") == 3456  # the seed's ~3456
    assert budget.llm_tokens == 7 * 64 == 448  # 6 slices + the thumbnail through the resampler
    assert budget.vit_tokens == 3456 + 19 * 29  # + the thumbnail at about 576 patches, 1.5:1
    tall = count_tokens("llava-uhd", (1008, 672))
    assert _row(tall, "ViT: 6 slices of 336x336 (2 cols x 3 rows)") == 3456


def test_llava_uhd_slicing():
    small = count_tokens("llava-uhd", (224, 224))  # one slice: upsampled to 24x24, no thumbnail
    assert (small.vit_tokens, small.llm_tokens) == (576, 64)
    # the README's 6x resolution, 672x1088: 3 x 2 slices of 336x362, each 23x24 patches
    wide = count_tokens("llava-uhd", (672, 1088))
    assert _row(wide, "ViT: 6 slices of 336x362 (3 cols x 2 rows), each resized to 23x24") == 6 * 23 * 24
    # a 1:3 image below one slice's area still gets 2 slices (candidates n and n + 1 for n = 1)
    strip = count_tokens("llava-uhd", (160, 480))
    assert _row(strip, "ViT: 2 slices of 160x240 (2 cols x 1 rows)") > 0 and strip.llm_tokens == 3 * 64
    # very large: at most 6 slices, plus the n + 1 = 7 candidate of the released code
    huge = count_tokens("llava-uhd", (336, 336 * 7 * 3))
    assert _row(huge, "ViT: 7 slices") > 0 and huge.llm_tokens == 8 * 64


def test_deepseek_ocr_gundam():
    small = count_tokens("deepseek-ocr", (640, 480))  # <= 640 on both sides: the global view only
    assert (small.vit_tokens, small.llm_tokens) == (4096, 273)
    square = count_tokens("deepseek-ocr", (1024, 1024))  # 2 x 2 tiles of 640
    assert square.llm_tokens == 273 + (2 * 10 + 1) * (2 * 10) and square.vit_tokens == 4096 + 4 * 1600
    wide = count_tokens("deepseek-ocr", (1280, 1920))  # 3 cols x 2 rows: 273 + 31 * 20 = 893
    assert wide.llm_tokens == 893 and _row(wide, "ViT: 6 tiles of 640x640 (3 cols x 2 rows)") == 6 * 1600
    capped = count_tokens("deepseek-ocr", (1000, 9000))  # 9:1 -> the widest grid with at most 6 tiles
    assert _row(capped, "ViT: 6 tiles of 640x640 (6 cols x 1 rows)") == 6 * 1600
    nine = count_tokens("deepseek-ocr", (1000, 9000), max_crops=9)
    assert _row(nine, "ViT: 9 tiles of 640x640 (9 cols x 1 rows)") == 9 * 1600
    assert count_tokens("deepseek-ocr", (1000, 1000), mode="base").breakdown[1] == (
        "LLM: view: 16x16 tokens", 256)  # the 16x compressor: a 64x64 SAM map -> 16x16


# --- compression --------------------------------------------------------------------------------

@pytest.mark.parametrize("model, size, options, compress, llm", [
    ("llava-1.5", (336, 336), {}, ("pool", {"stride": 2}), 144),  # CLIP 24x24 -> 12x12
    ("vit", (378, 378), {"patch_size": 14}, ("pool", {"stride": 2, "mode": "bilinear"}), 196),  # SigLIP 27x27
    ("vit", (378, 378), {"patch_size": 14}, ("pool", {"stride": 2}), 169),  # avg-pool floors to 13x13
    ("vit", (378, 378), {"patch_size": 14}, ("pool", {"stride": 2, "mode": "max"}), 169),
    ("vit", (224, 224), {"patch_size": 4}, ("pixel_shuffle", {"stride": 2}), 784),  # Swin: 3136 -> 784
    ("vit", (224, 224), {"patch_size": 4}, ("pixel_shuffle", {"stride": 4}), 196),
    ("vit", (224, 224), {"patch_size": 4}, ("pixel_shuffle", {"stride": 8}), 49),
    ("llava-1.5", (336, 336), {}, ("pixel_shuffle", {"stride": 4}), 36),  # "optical (16x): 36"
    ("llava-1.5", (336, 336), {}, ("tome", {"keep": 72}), 72),  # "ToMe (8x): 72"
    ("llava-1.5", (336, 336), {}, ("tome", {"r": 504}), 72),
    ("llava-1.5", (336, 336), {}, ("visionzip", {"dominant": 54, "contextual": 10}), 64),
    ("llava-1.5", (336, 336), {}, ("attn_topk", {"keep": 192}), 192),  # the standard 192 / 128 / 64
    ("llava-1.5", (336, 336), {}, ("attn_topk", {"ratio": 1 / 3}), 192),  # ratio: the fraction kept
    ("llava-1.5", (336, 336), {}, ("attn_topk", {"ratio": 2 / 9}), 128),
    ("llava-1.5", (336, 336), {}, ("tome", {"ratio": 0.125}), 72),
    ("llava-1.5", (336, 336), {}, ("pool", {}), 144),  # stride 2 by default, as vtok_fast.pool
    ("vit", (378, 378), {"patch_size": 14}, ("pool", {"stride": 2, "ceil_mode": True}), 196),
    ("vit", (378, 378), {"patch_size": 14}, "pool:stride=2,mode=max,ceil_mode=true", 196),
    ("llava-1.5", (336, 336), {}, ("prumerge", {"keep": 32}), 33),  # + 1 token for the rest
    ("llava-1.5", (336, 336), {}, ("prumerge", {"ratio": 0.1}), 58 + 1),
    ("llava-1.5", (336, 336), {}, ("fastv", {"layer": 2, "ratio": 0.5}), 288),  # FastV K=2, R=50 %
    ("llava-1.5", (336, 336), {}, ("fastv", {"ratio": 0.75}), 144),  # FastV's R: the fraction pruned
    ("llava-next", (480, 640), {}, ("fastv", {"ratio": 0.5}), 1170),  # newlines are in the span
    ("llava-next", (480, 640), {}, ("tome", {"keep": 100}), 5 * 100),  # flat: 5 views, no newlines
    ("qwen2-vl", (1080, 1920), {}, ("pool", {"stride": 2}), 13 * 23),  # the 26x47 merged grid
    ("qwen2-vl", (1080, 1920), {}, ("pool", {"stride": 2, "mode": "bilinear"}), 13 * 24),
    ("deepseek-ocr", (1024, 1024), {"mode": "base"}, ("pool", {"stride": 2}), (8 + 1) * 8 + 1),
    ("deepseek-ocr", (1024, 1024), {"mode": "base"}, ("tome", {"keep": 100}), 100 + 1),
    ("deepseek-ocr", (1280, 1920), {}, ("pool", {"stride": 2}), (8 + 1) * 8 + (3 * 5 + 1) * (2 * 5) + 1),
    ("llava-uhd", (672, 1008), {}, ("attn_topk", {"keep": 32}), 7 * 32),
])
def test_compressed_counts(model, size, options, compress, llm):
    budget = count_tokens(model, size, compress=compress, **options)
    assert budget.llm_tokens == llm
    assert budget.uncompressed_llm_tokens == count_tokens(model, size, **options).llm_tokens
    assert budget.vit_tokens == count_tokens(model, size, **options).vit_tokens
    assert budget.compress == parse_compress(compress)
    assert f"-> {llm} LLM tokens" in str(budget)


def test_parse_compress_forms():
    assert parse_compress("pool:stride=2") == ("pool", {"stride": 2})
    assert parse_compress("pool") == ("pool", {"stride": 2})
    assert parse_compress("pool:ceil_mode=True") == ("pool", {"ceil_mode": True, "stride": 2})
    assert parse_compress(" pool : stride=2, mode=bilinear ") == ("pool", {"stride": 2, "mode": "bilinear"})
    assert parse_compress("attn_topk:ratio=0.75") == ("attn_topk", {"ratio": 0.75})
    assert parse_compress(["tome", {"keep": 144}]) == ("tome", {"keep": 144})
    assert parse_compress("visionzip:dominant=54,contextual=10") == ("visionzip", {"dominant": 54, "contextual": 10})
    spec = {"stride": 2}
    parse_compress(("pool", spec))[1]["mode"] = "max"
    assert spec == {"stride": 2}  # the caller's dict is copied, not kept


@pytest.mark.parametrize("compress, message", [
    ("zoom:stride=2", "compress method must be one of pool, pixel_shuffle, tome"),
    ("pool:size=2", "compress pool takes stride, mode, ceil_mode; got unknown size"),
    ("pool:stride=2,ceil_mode=1", "ceil_mode must be True or False, got 1"),
    ("pool:stride=0", "stride must be an integer >= 1, got 0"),
    ("pool:stride=2.5", "stride must be an integer >= 1, got 2.5"),
    ("pool:stride=2,mode=nearest", "mode must be one of avg, max, bilinear, got 'nearest'"),
    ("pool:stride", "expected key=value after the method name, got 'stride'"),
    ("tome", "give exactly one of keep=, r=, ratio=; got none"),
    ("tome:r=4,keep=5", "give exactly one of keep=, r=, ratio=; got keep=, r="),
    ("attn_topk:ratio=0", "ratio (the fraction kept) must be a number in (0, 1], got 0"),
    ("attn_topk:ratio=1.5", "ratio (the fraction kept) must be a number in (0, 1], got 1.5"),
    ("fastv:ratio=1", "ratio (the fraction pruned) must be a number in [0, 1), got 1"),
    ("attn_topk:keep=0", "keep must be an integer >= 1, got 0"),
    ("prumerge", "depends on the image; give keep= or ratio="),
    ("prumerge_plus:keep=32", "count depends on the image (the 96 spatial samples overlap the top 32 of "
                              "the 24x24 view by attention): between 97 and 129"),
    ("visionzip:dominant=54", "give dominant= and contextual=, got dominant="),
    ("visionzip:keep=64", "compress visionzip takes dominant, contextual; got unknown keep"),
    ("fastv:ratio=0.5,layer=0", "layer must be an integer >= 1, got 0"),
])
def test_bad_compress_specs(compress, message):
    with pytest.raises(ValueError) as info:
        count_tokens("llava-1.5", (336, 336), compress=compress)
    assert message in str(info.value)


def test_bad_compress_type():
    with pytest.raises(TypeError, match=r"compress must be \(method, \{budget\}\)"):
        count_tokens("llava-1.5", (336, 336), compress=("pool", 2))


@pytest.mark.parametrize("model, size, options, compress, message", [
    ("llava-1.5", (336, 336), {}, "tome:keep=577", "a budget of 577 tokens is more than the 576 tokens"),
    ("llava-1.5", (336, 336), {}, "tome:r=576", "r=576 removes every one of the 576 tokens"),
    ("llava-1.5", (336, 336), {}, "visionzip:dominant=500,contextual=100", "600 tokens is more than the 576"),
    ("llava-1.5", (336, 336), {}, "pool:stride=25", "stride=25 is larger than the 24x24 token grid"),
    ("llava-1.5", (336, 336), {}, "pixel_shuffle:stride=5", "stride=5 must divide the 24x24 token grid"),
    ("qwen2-vl", (1080, 1920), {}, "pixel_shuffle:stride=2", "must divide the 26x47 token grid"),
    ("llava-uhd", (672, 1008), {}, "pool:stride=2", "compress pool needs a token grid, but a view's 64"),
    ("llava-uhd", (672, 1008), {}, "tome:keep=65", "65 tokens is more than the 64 tokens"),
    ("llava-1.5", (336, 336), {}, "attn_topk:ratio=0.0001", "keeps no token of the 576"),
    ("llava-1.5", (336, 336), {}, "pool:stride=25,mode=bilinear", "stride=25 is larger than the 24x24"),
])
def test_budget_larger_than_the_tokens(model, size, options, compress, message):
    with pytest.raises(ValueError) as info:
        count_tokens(model, size, compress=compress, **options)
    assert message in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of vit-b/16, vit-l/14-336, vit, llava-1.5"):
        count_tokens("llava-2", (336, 336))
    with pytest.raises(TypeError, match=r"image_size must be \(H, W\), got 336"):
        count_tokens("llava-1.5", 336)
    with pytest.raises(ValueError, match=r"image_size must be two positive integers \(H, W\), got \(0, 3\)"):
        count_tokens("llava-1.5", (0, 3))
    with pytest.raises(ValueError, match="two positive integers"):
        count_tokens("llava-1.5", (336.0, 336))
    with pytest.raises(TypeError, match=r"count_tokens\('llava-1.5'\) got unexpected option\(s\) mode; it takes none"):
        count_tokens("llava-1.5", (336, 336), mode="tiny")
    with pytest.raises(TypeError, match="unexpected option.*it takes min_pixels, max_pixels, patch_size, merge_size"):
        count_tokens("qwen2-vl", (336, 336), max_pixel=10)
    with pytest.raises(ValueError, match=r"count_tokens\('vit'\) needs patch_size="):
        count_tokens("vit", (224, 224))
    with pytest.raises(ValueError, match="image_size 10x300 is smaller than one patch of patch_size=16"):
        count_tokens("vit-b/16", (10, 300))
    with pytest.raises(ValueError, match="Qwen2-VL needs an aspect ratio below 200, got 201.0"):
        count_tokens("qwen2-vl", (10, 2010))
    with pytest.raises(ValueError, match="min_pixels must be <= max_pixels, got 5000 > 4000"):
        count_tokens("qwen2-vl", (336, 336), min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="mode must be one of tiny, small, base, large, gundam, got 'huge'"):
        count_tokens("deepseek-ocr", (336, 336), mode="huge")
    with pytest.raises(ValueError, match="min_crops must be <= max_crops, got 4 > 3"):
        count_tokens("deepseek-ocr", (2000, 2000), min_crops=4, max_crops=3)
    with pytest.raises(ValueError, match="grid_pinpoints must be .* positive multiples of 336"):
        count_tokens("llava-next", (336, 336), grid_pinpoints=[(336, 700)])
    with pytest.raises(TypeError, match="grid_pinpoints must be"):
        count_tokens("llava-next", (336, 336), grid_pinpoints=[336])


def test_model_names_are_case_insensitive():
    assert count_tokens(" LLaVA-NeXT ", (336, 336)).model == "llava-next"


# --- transformers' own arithmetic ---------------------------------------------------------------

def _tokenizer(*special):
    """A tiny tokenizer built offline that knows the image placeholder tokens."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>")
    tokenizer.add_tokens(list(special), special_tokens=True)
    return tokenizer


def _llava_next_processor(pinpoints=LLAVA_NEXT_PINPOINTS, patch_size=14):
    """The llava-hf LLaVA-NeXT processor configuration (CLS counted then dropped by "default")."""
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                              image_grid_pinpoints=[list(p) for p in pinpoints])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=_tokenizer("<image>"),
                              patch_size=patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)


ANYRES_3X3 = tuple((336 * i, 336 * j) for i in range(1, 4) for j in range(1, 4))


@pytest.mark.parametrize("pinpoints", [LLAVA_NEXT_PINPOINTS, ANYRES_3X3], ids=["default", "3x3"])
def test_llava_next_matches_transformers(pinpoints):
    sizes = _random_sizes(400)
    processor = _llava_next_processor(pinpoints)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    for (height, width), llm in zip(sizes, expected):
        budget = count_tokens("llava-next", (height, width), grid_pinpoints=pinpoints)
        crops = image_size_to_num_patches((height, width), [list(p) for p in pinpoints], 336)
        assert (budget.vit_tokens, budget.llm_tokens) == (crops * 576, llm), (height, width)


def test_llava_next_degenerate_sizes_match_transformers():
    """A 1-pixel-high image keeps no pixel at any pinpoint: transformers still picks the first one
    (ties on zero effective resolution) and unpads the crops to nothing; so do we."""
    sizes = [[1, 4000], [4000, 1], [1, 1], [2, 3000]]
    expected = _llava_next_processor()._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert [count_tokens("llava-next", tuple(s)).llm_tokens for s in sizes] == expected
    assert count_tokens("llava-next", (1, 4000)).llm_tokens == 576  # the base view only


@pytest.mark.parametrize("stride", [2, 3])
def test_llava_next_pooled_matches_transformers(stride):
    """Pooling each crop to (24 / s)^2 tokens and unpadding the pooled grid is the arithmetic
    transformers does for a vision tower of patch 14 s."""
    sizes = _random_sizes(200)
    processor = _llava_next_processor(patch_size=14 * stride)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    for (height, width), llm in zip(sizes, expected):
        budget = count_tokens("llava-next", (height, width), compress=("pool", {"stride": stride}))
        assert budget.llm_tokens == llm, (height, width)


def test_llava_next_matches_the_model_packing():
    """``LlavaNextModel.pack_image_features`` (unpad + newline) on dummy features: its lengths are
    what the language model sees."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=336, patch_size=14),
                             image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS])
    sizes = _random_sizes(24, high=2000)
    features = [torch.zeros(image_size_to_num_patches(s, config.image_grid_pinpoints, 336), 576, 1) for s in sizes]
    _, lengths = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), features, torch.tensor(sizes),
                                                    "default", image_newline=torch.zeros(1))
    assert [count_tokens("llava-next", tuple(s)).llm_tokens for s in sizes] == lengths.tolist()


def test_llava_next_processor_end_to_end():
    processor = _llava_next_processor()
    for height, width in [(480, 640), (336, 336), (100, 900), (700, 250)]:
        image = Image.fromarray(np.zeros((height, width, 3), np.uint8))
        out = processor(images=[image], text="<image>", return_tensors="pt")
        budget = count_tokens("llava-next", (height, width))
        assert int((out["input_ids"] == processor.image_token_id).sum()) == budget.llm_tokens
        assert out["pixel_values"].shape[1] * 576 == budget.vit_tokens


def test_llava15_processor_end_to_end():
    tokenizer = _tokenizer("<image>")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                                  crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    for height, width in [(336, 336), (480, 640), (90, 1000)]:
        out = processor(images=[Image.fromarray(np.zeros((height, width, 3), np.uint8))], text="<image>",
                        return_tensors="pt")
        count = int((out["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
        assert count == count_tokens("llava-1.5", (height, width)).llm_tokens == 576


@pytest.mark.parametrize("min_pixels, max_pixels", [
    (56 * 56, 28 * 28 * 1280), (56 * 56, 12_845_056), (256 * 28 * 28, 1280 * 28 * 28), (3136, 200_000)])
def test_qwen2_vl_matches_transformers(min_pixels, max_pixels):
    processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    sizes = [s for s in _random_sizes(400, low=2) if max(s) / min(s) <= 200]
    for height, width in sizes:
        budget = count_tokens("qwen2-vl", (height, width), min_pixels=min_pixels, max_pixels=max_pixels)
        rh, rw = smart_resize(height, width, 28, min_pixels=min_pixels, max_pixels=max_pixels)
        patches = processor.get_number_of_image_patches(height, width, {})
        assert (budget.vit_tokens, budget.llm_tokens) == (patches, rh * rw // 28 ** 2), (height, width)
        assert patches == rh * rw // 14 ** 2


def test_qwen2_vl_default_is_the_hf_class_default():
    processor = Qwen2VLImageProcessor()
    for height, width in [(1080, 1920), (4000, 3000), (30, 40)]:
        assert count_tokens("qwen2-vl", (height, width)).vit_tokens == processor.get_number_of_image_patches(
            height, width, {})


def test_qwen2_vl_processor_end_to_end():
    tokenizer = _tokenizer("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    for height, width in [(1080, 1920), (336, 336), (50, 700)]:
        out = processor(images=[Image.fromarray(np.zeros((height, width, 3), np.uint8))], text="<|image_pad|>",
                        return_tensors="pt")
        budget = count_tokens("qwen2-vl", (height, width))
        assert int((out["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == budget.llm_tokens
        assert int(out["image_grid_thw"].prod()) == budget.vit_tokens


# --- the command line ---------------------------------------------------------------------------

def test_cli_prints_the_breakdown(capsys):
    assert budget_cli.main(["budget", "llava-next", "480x640"]) == 0
    out = capsys.readouterr().out
    assert "llava-next, 480x640 image (HxW): 2880 ViT tokens, 2340 LLM tokens" in out
    assert "LLM: one newline per row" in out and "36" in out


def test_cli_options_and_json(capsys):
    assert budget_cli.main(["budget", "qwen2-vl", "1080x1920", "--max-pixels", "12845056", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["llm_tokens"], record["model"], record["image_size"]) == (2691, "qwen2-vl", [1080, 1920])
    assert budget_cli.main(["budget", "deepseek-ocr", "1024", "--mode", "tiny"]) == 0
    assert "73 LLM tokens" in capsys.readouterr().out
    assert budget_cli.main(["budget", "vit", "378x378", "--patch-size", "14",
                            "--compress", "pool:stride=2,mode=bilinear"]) == 0
    assert "compressed with pool(stride=2, mode=bilinear): 729 -> 196 LLM tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["budget", "llava-1.5", "336", "--mode", "tiny"], "got unexpected option(s) mode"),
    (["budget", "llava-1.5", "336x", "--compress", "pool:stride=2"], "size must be HxW (e.g. 672x1008)"),
    (["budget", "llava-1.5", "336", "--compress", "tome:keep=1000"], "1000 tokens is more than the 576"),
    (["budget", "llava-2", "336"], "invalid choice: 'llava-2'"),
    (["budget", "qwen2-vl", "1" + "0" * 155], "image_size sides must be at most 2147483647 pixels (MAX_IMAGE_SIDE), "
                                              "got ~1e155x~1e155"),
    (["budget", "qwen2-vl", "336", "--min-pixels", "1" + "0" * 400], "min_pixels must be a positive integer <="),
])
def test_cli_errors_exit_2(argv, message, capsys):
    """Bad values and argparse's own errors alike: one line on stderr, exit status 2."""
    try:
        status = budget_cli.main(argv)
    except SystemExit as exc:  # argparse's own checks (choices) exit from parse_args
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("vtok-fast: error: ") and err.count("\n") == 1, err


def test_cli_plugs_into_a_parent_parser(capsys):
    """What vtok_fast/cli.py does: add the subcommand next to others and dispatch to run_budget."""
    parser = argparse.ArgumentParser(prog="vtok-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info")
    budget_cli.add_budget_parser(sub)
    args = parser.parse_args(["budget", "llava-uhd", "672x1008"])
    assert args.command == "budget" and budget_cli.run_budget(args) == 0
    assert "448 LLM tokens" in capsys.readouterr().out
    assert parser.parse_args(["info"]).command == "info"


def test_parse_size():
    assert budget_cli.parse_size("672x1008") == (672, 1008)
    assert budget_cli.parse_size("672×1008") == (672, 1008)
    assert budget_cli.parse_size(" 336 ") == (336, 336)
    with pytest.raises(ValueError, match="size must be HxW"):
        budget_cli.parse_size("a x b")


# --- sizes past any float: a named error ------------------------------------------------------------

@pytest.mark.parametrize("model", ["vit-b/16", "vit", "llava-1.5", "llava-next", "llava-uhd", "qwen2-vl",
                                   "deepseek-ocr"])
@pytest.mark.parametrize("size", [(10**155, 336), (336, 10**155), (10**400, 10**400), (MAX_IMAGE_SIDE + 1, 1)])
def test_huge_sides_are_a_named_error(model, size):
    """Sides up to MAX_IMAGE_SIDE count; a larger one is a ValueError naming image_size (it was an
    OverflowError from the float arithmetic at ~1e155)."""
    options = {"patch_size": 14} if model == "vit" else {}
    with pytest.raises(ValueError, match=r"image_size sides must be at most 2147483647 pixels \(MAX_IMAGE_SIDE\), got"):
        count_tokens(model, size, **options)


@pytest.mark.parametrize("model", ["vit-b/16", "llava-1.5", "llava-next", "llava-uhd", "deepseek-ocr"])
@pytest.mark.parametrize("compress", [None, "tome:keep=1", "fastv"])
def test_the_largest_sides_count(model, compress):
    for size in ((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), (MAX_IMAGE_SIDE, 336), (336, MAX_IMAGE_SIDE)):
        budget = count_tokens(model, size, compress=compress)
        assert budget.llm_tokens >= 1 and math.isfinite(budget.pixels_per_token)


def test_huge_qwen2_vl_options_are_named_errors():
    assert count_tokens("qwen2-vl", (MAX_IMAGE_SIDE // 100, MAX_IMAGE_SIDE // 100),
                        max_pixels=MAX_IMAGE_SIDE**2).llm_tokens > 0
    for name in ("min_pixels", "max_pixels"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer <= {MAX_IMAGE_SIDE**2}, got ~1e400"):
            count_tokens("qwen2-vl", (336, 336), **{name: 10**400})
    with pytest.raises(ValueError, match="grid_pinpoints must be .* up to 2147483647"):
        count_tokens("llava-next", (336, 336), grid_pinpoints=[(336 * 10**300, 336)])


# --- FastV's default ratio and what the library can run ------------------------------------------------

def test_fastv_ratio_defaults_to_half_as_the_patcher():
    """``fastv`` alone counts R = 0.5, the default of vtok_fast.patch.hf(compress=("fastv", {}))."""
    budget = count_tokens("llava-1.5", (336, 336), compress="fastv")
    assert budget.llm_tokens == 288 and budget.compress == ("fastv", {"ratio": FASTV_DEFAULT_RATIO})
    assert FASTV_DEFAULT_RATIO == 0.5
    assert count_tokens("llava-1.5", (336, 336), compress=("fastv", {"layer": 3})).llm_tokens == 288
    assert count_tokens("llava-1.5", (336, 336), compress="fastv:keep=100").compress == ("fastv", {"keep": 100})
    with pytest.raises(ValueError, match="give exactly one of keep=, ratio=; got keep=, ratio="):
        count_tokens("llava-1.5", (336, 336), compress="fastv:keep=100,ratio=0.5")


@pytest.mark.parametrize("model, compress, words", [
    ("qwen2-vl", "visionzip:dominant=54,contextual=10",
     "runs visionzip inside LLaVA-1.5 models only, not in qwen2-vl: this count is arithmetic"),
    ("qwen2-vl", "fastv", "runs fastv inside LLaVA-1.5 models only, not in qwen2-vl"),
    ("llava-next", "pool:stride=2", "runs pool inside LLaVA-1.5 models only, not in llava-next"),
    ("deepseek-ocr", "tome:keep=64", "runs tome inside LLaVA-1.5 models only, not in deepseek-ocr"),
    ("llava-uhd", "attn_topk:keep=32", "runs attn_topk inside LLaVA-1.5 models only, not in llava-uhd"),
    ("vit-b/16", "fastv", "fastv prunes inside a language model; vit-b/16 has none"),
    ("llava-1.5", "pixel_shuffle", "pixel_shuffle makes tokens stride**2 times wider"),
])
def test_a_method_the_library_cannot_run_in_the_model_gets_a_note(model, compress, words, capsys):
    budget = count_tokens(model, (672, 672), compress=compress)
    assert len(budget.notes) == 1 and words in budget.notes[0]
    assert f"\nnote: {budget.notes[0]}" in str(budget)
    assert budget_cli.main(["budget", model, "672", "--compress", compress]) == 0  # counted, not refused
    printed = capsys.readouterr().out
    assert f"note: {budget.notes[0]}" in printed and "LLM tokens" in printed
    assert budget_cli.main(["budget", model, "672", "--compress", compress, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == list(budget.notes)


@pytest.mark.parametrize("model, compress", [
    ("llava-1.5", "visionzip:dominant=54,contextual=10"), ("llava-1.5", "fastv:ratio=0.5"),
    ("llava-1.5", "pool:stride=2"), ("vit-b/16", "tome:keep=49"), ("qwen2-vl", None),
])
def test_methods_the_library_runs_have_no_note(model, compress):
    budget = count_tokens(model, (672, 672), compress=compress)
    assert budget.notes == () and "note:" not in str(budget)
