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
from transformers import (CLIPImageProcessor, Gemma3ImageProcessor, Gemma3Processor, GotOcr2ImageProcessor,
                          Idefics3ImageProcessor, Idefics3Processor, InternVLProcessor, InternVLVideoProcessor,
                          LlavaNextImageProcessor, LlavaNextProcessor, LlavaOnevisionImageProcessor,
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, LlavaProcessor,
                          PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor, SmolVLMImageProcessor)
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from vtok_fast.measure import budget_cli
from vtok_fast.measure.budget import (FASTV_DEFAULT_RATIO, LLAVA_NEXT_PINPOINTS, MAX_IMAGE_SIDE, MODEL_NAMES,
                                     OV_PINPOINTS, count_tokens, parse_compress)


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
    ("llava-onevision", (384, 384), {}, 2 * 729, 729 + 27 * 27 + 27),  # base + one crop + 27 newlines
    ("llava-onevision", (1080, 1920), {}, 16 * 729, 729 + 60 * 108 + 60),  # 75x135 shrunk by 1.25
    ("qwen2.5-vl", (1080, 1920), {}, 4 * 1222, 1222),  # as Qwen2-VL: the same image processor
    ("qwen3-vl", (1080, 1920), {}, 4 * 943, 943),  # 736x1312: 23x41 merged 32-px cells
    ("qwen3-vl", (1080, 1920), {"min_pixels": 65_536, "max_pixels": 16_777_216}, 4 * 2040, 2040),  # 1088x1920
    ("internvl", (448, 448), {}, 1024, 256),  # one tile, no thumbnail
    ("internvl", (1080, 1920), {}, 9 * 1024, 9 * 256),  # 4 x 2 tiles + the thumbnail
    ("gemma3", (896, 896), {}, 4096, 256),
    ("gemma3", (1080, 1920), {}, 4096, 256),  # every image is resized to 896x896
    ("idefics3", (364, 364), {}, 17 * 676, 17 * 169),  # resized to 1456x1456 first: 4 x 4 tiles + global
    ("smolvlm", (1080, 1920), {}, 13 * 676, 13 * 169),  # 1456x820 -> 1456x1092: 3 x 4 tiles + global
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
    ("llava-1.5", (336, 336), {}, ("dart", {"keep": 132}), 132),  # the 132 image tokens of the official LLaVA-1.5 setting
    ("llava-1.5", (336, 336), {}, ("dart", {"ratio": 0.25}), 144),
    ("llava-1.5", (336, 336), {}, ("tome", {"ratio": 0.125}), 72),
    ("llava-1.5", (336, 336), {}, ("pool", {}), 144),  # stride 2 by default, as vtok_fast.pool
    ("vit", (378, 378), {"patch_size": 14}, ("pool", {"stride": 2, "ceil_mode": True}), 196),
    ("vit", (378, 378), {"patch_size": 14}, "pool:stride=2,mode=max,ceil_mode=true", 196),
    ("llava-1.5", (336, 336), {}, ("prumerge", {"keep": 32}), 33),  # + 1 token for the rest
    ("llava-1.5", (336, 336), {}, ("prumerge", {"ratio": 0.1}), 58 + 1),
    ("llava-1.5", (336, 336), {}, ("fastv", {"layer": 2, "ratio": 0.5}), 288),  # FastV K=2, R=50 %
    ("llava-1.5", (336, 336), {}, ("fastv", {"ratio": 0.75}), 144),  # FastV's R: the fraction pruned
    ("llava-next", (480, 640), {}, ("fastv", {"ratio": 0.5}), 1170),  # newlines are in the span
    # after packing, as vtok_fast.patch.hf: the base view and the unpadded 36x48 grid each keep 100, + 36 newlines
    ("llava-next", (480, 640), {}, ("tome", {"keep": 100}), 100 + 100 + 36),
    ("qwen2-vl", (1080, 1920), {}, ("pool", {"stride": 2}), 13 * 23),  # the 26x47 merged grid
    ("qwen2-vl", (1080, 1920), {}, ("pool", {"stride": 2, "mode": "bilinear"}), 13 * 24),
    ("deepseek-ocr", (1024, 1024), {"mode": "base"}, ("pool", {"stride": 2}), (8 + 1) * 8 + 1),
    ("deepseek-ocr", (1024, 1024), {"mode": "base"}, ("tome", {"keep": 100}), 100 + 1),
    ("deepseek-ocr", (1280, 1920), {}, ("pool", {"stride": 2}), (8 + 1) * 8 + (3 * 5 + 1) * (2 * 5) + 1),
    ("llava-uhd", (672, 1008), {}, ("attn_topk", {"keep": 32}), 7 * 32),
    # after packing, as vtok_fast.patch.hf: 13x13 base + the crops' 81x135 unpadded to 75x135, shrunk by
    # sqrt(75 * 135 / (9 * 27 * 27)) to 60x108, pooled to 30x54; the 60 newlines kept
    ("llava-onevision", (1080, 1920), {}, ("pool", {"stride": 2}), 169 + 30 * 54 + 60),
    ("llava-onevision", (1080, 1920), {}, ("tome", {"keep": 100}), 100 + 100 + 60),
    ("llava-onevision", (1080, 1920), {}, ("fastv", {"ratio": 0.5}), round(7269 / 2)),
    ("qwen2.5-vl", (1080, 1920), {}, ("pool", {"stride": 2}), 13 * 23),  # the 26x47 merged grid
    ("qwen3-vl", (1080, 1920), {}, ("pool", {"stride": 2}), 11 * 20),  # the 23x41 merged grid
    ("internvl", (1080, 1920), {}, ("pool", {"stride": 2}), 9 * 8 * 8),  # per tile: 16x16 -> 8x8
    ("internvl", (1080, 1920), {}, ("tome", {"keep": 64}), 9 * 64),
    ("gemma3", (896, 896), {}, ("visionzip", {"dominant": 54, "contextual": 10}), 64),
    ("gemma3", (480, 1640), {"do_pan_and_scan": True}, ("pool", {"stride": 2}), 4 * 64),  # image + 3 crops
    ("idefics3", (1080, 1920), {}, ("pool", {"stride": 2}), 13 * 36),  # per view: 13x13 -> 6x6
    ("smolvlm", (1080, 1920), {}, ("attn_topk", {"ratio": 0.5}), 13 * 84),  # round(84.5) = 84
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
    ("llava-onevision", (480, 640), {}, "pixel_shuffle:stride=2", "stride=2 must divide the 27x27 token grid"),
    ("internvl", (1080, 1920), {}, "tome:keep=257", "a budget of 257 tokens is more than the 256 tokens"),
    ("gemma3", (896, 896), {}, "pool:stride=17", "stride=17 is larger than the 16x16 token grid"),
    ("smolvlm", (1080, 1920), {}, "pixel_shuffle:stride=2", "stride=2 must divide the 13x13 token grid"),
    ("idefics3", (336, 336), {"image_seq_len": 170}, "pool:stride=2",
     "compress pool needs a token grid, but a view's 170 tokens is 170 tokens without one"),
    ("qwen3-vl", (1080, 1920), {}, "pixel_shuffle:stride=2", "must divide the 23x41 token grid"),
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


@pytest.mark.parametrize("model, options, error, message", [
    ("llava-onevision", {"anyres_max": 0}, ValueError, "anyres_max must be a positive integer <= 2147483647, got 0"),
    ("llava-onevision", {"grid_pinpoints": [(336, 672)]}, ValueError,
     "grid_pinpoints must be (height, width) pairs of positive multiples of 384"),
    ("llava-onevision", {"grid_pinpoints": [384]}, TypeError, "grid_pinpoints must be (height, width) pairs"),
    ("llava-onevision", {"max_pixels": 10}, TypeError,
     "count_tokens('llava-onevision') got unexpected option(s) max_pixels; it takes grid_pinpoints, anyres_max"),
    ("qwen3-vl", {"min_pixels": 5000, "max_pixels": 4000}, ValueError, "min_pixels must be <= max_pixels"),
    ("qwen2.5-vl", {"patch_size": 0}, ValueError, "patch_size must be a positive integer"),
    ("internvl", {"max_patches": 0}, ValueError, "max_patches must be a positive integer <= 1024, got 0"),
    ("internvl", {"max_patches": 2000}, ValueError, "max_patches must be a positive integer <= 1024, got 2000"),
    ("internvl", {"min_patches": 1.5}, ValueError, "min_patches must be a positive integer <= 1024, got 1.5"),
    ("internvl", {"min_patches": 4, "max_patches": 3}, ValueError, "min_patches must be <= max_patches, got 4 > 3"),
    ("gemma3", {"do_pan_and_scan": "yes"}, ValueError, "do_pan_and_scan must be True or False, got 'yes'"),
    ("gemma3", {"pan_and_scan_max_num_crops": -2}, ValueError,
     "pan_and_scan_max_num_crops must be a positive integer <= 2147483647, got -2"),
    ("gemma3", {"pan_and_scan_min_ratio_to_activate": float("nan")}, ValueError,
     "pan_and_scan_min_ratio_to_activate must be a positive number, got nan"),
    ("smolvlm", {"image_seq_len": 0}, ValueError, "image_seq_len must be a positive integer"),
    ("smolvlm", {"max_image_size": 10**400}, ValueError, "max_image_size must be a positive integer <= 2147483647, "
                                                         "got ~1e400"),
    ("idefics3", {"do_image_splitting": 1}, ValueError, "do_image_splitting must be True or False, got 1"),
    ("idefics3", {"size": 1456}, TypeError, "count_tokens('idefics3') got unexpected option(s) size; it takes "
                                            "longest_edge, max_image_size, image_seq_len, scale_factor"),
])
def test_bad_options_of_the_added_families(model, options, error, message):
    """A bad option of a new family is a ValueError (or TypeError) naming the argument."""
    with pytest.raises(error) as info:
        count_tokens(model, (1080, 1920), **options)
    assert message in str(info.value)


def test_qwen_aspect_ratio_errors_name_the_family():
    """smart_resize's 200:1 limit, raised with the family's own name."""
    for model, family in [("qwen2.5-vl", "Qwen2.5-VL"), ("qwen3-vl", "Qwen3-VL")]:
        with pytest.raises(ValueError, match=f"image_size 10x2010: {family} needs an aspect ratio below 200"):
            count_tokens(model, (10, 2010))


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
def test_llava_next_pooled_matches_the_model_packing(stride):
    """``vtok_fast.patch.hf`` pools after ``LlavaNextModel.pack_image_features``: the base view's
    24x24 grid and the unpadded grid each pooled (floor), every row's newline kept. The unpadded
    grid's rows and columns are read from the model's own packing of marked dummy features."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=336, patch_size=14),
                             image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS])
    sizes = _random_sizes(24, high=2000)
    features = [torch.zeros(image_size_to_num_patches(s, config.image_grid_pinpoints, 336), 576, 1) for s in sizes]
    packed, lengths = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), features,
                                                         torch.tensor(sizes), "default", image_newline=torch.ones(1))
    for size, piece, length in zip(sizes, packed, lengths.tolist()):
        rows = int(piece[576:].sum())  # one newline (the marker) per row of the unpadded grid
        cols = (length - 576) // rows - 1 if rows else 0
        expected = (24 // stride) ** 2 + (rows // stride) * (cols // stride) + rows
        if 0 < min(rows, cols) < stride:  # a pooling window larger than the grid: refused, as vtok_fast.pool
            with pytest.raises(ValueError, match="larger than"):
                count_tokens("llava-next", tuple(size), compress=("pool", {"stride": stride}))
            continue
        assert count_tokens("llava-next", tuple(size), compress=("pool", {"stride": stride})).llm_tokens == expected


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


# --- the VLM families added: transformers' own processors, built offline ------------------------

# sizes a random draw hardly gives: one pixel high or wide, tiny, odd, at a tile's edge, extreme aspect ratios
EDGE_SIZES = [[1, 1], [1, 4000], [4000, 1], [2, 3], [3, 2], [7, 5], [13, 4001], [4001, 13], [383, 385],
              [384, 384], [447, 449], [365, 363], [364, 729], [16, 3200], [3199, 16], [1, 199], [200, 1]]


def _family_sizes(count, max_aspect=None):
    """Seeded random sizes (square-ish and elongated, sides from 1 pixel) plus EDGE_SIZES; only those
    within ``max_aspect`` when given (Qwen's smart_resize refuses more than 200)."""
    sizes = _random_sizes(count, low=1) + EDGE_SIZES
    return [s for s in sizes if max_aspect is None or max(s) / min(s) <= max_aspect]


def _image(height, width):
    """A blank channels-first uint8 image (the processors take tensors as they take PIL images)."""
    return torch.zeros(3, height, width, dtype=torch.uint8)


def _named_tokenizer(named, *plain):
    """A tiny tokenizer built offline with named special tokens (``tokenizer.boi_token``,
    ``tokenizer.context_image_token_id``, ...), which the InternVL and Gemma 3 processors read."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>",
        extra_special_tokens=dict(named))
    tokenizer.add_tokens([*plain, *named.values()], special_tokens=True)
    return tokenizer


def _onevision_processor(num_image_tokens=729):
    """The llava-hf LLaVA-OneVision processor configuration: SigLIP 27x27 (no CLS), "full" features."""
    return LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(),
                                   tokenizer=_tokenizer("<image>", "<video>"),
                                   video_processor=LlavaOnevisionVideoProcessor(),
                                   num_image_tokens=num_image_tokens, vision_feature_select_strategy="full")


def test_llava_onevision_matches_transformers():
    """``LlavaOnevisionProcessor._get_num_multimodal_tokens`` (one image per sample) over random
    sizes; the views ``image_size_to_num_patches`` gives the model, 729 ViT tokens each."""
    sizes = _family_sizes(400)
    expected = _onevision_processor()._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    pinpoints = LlavaOnevisionImageProcessor().image_grid_pinpoints
    assert [list(p) for p in OV_PINPOINTS] == pinpoints  # the default is the image processor's
    shrunk = 0
    for (height, width), llm in zip(sizes, expected):
        budget = count_tokens("llava-onevision", (height, width))
        views = image_size_to_num_patches((height, width), pinpoints, 384)
        assert (budget.vit_tokens, budget.llm_tokens) == (views * 729, llm), (height, width)
        shrunk += any("shrunk bilinearly" in label for label, _ in budget.breakdown)
    assert 0 < shrunk < len(sizes)  # the anyres_max_9 shrink is exercised, and so is its absence


@pytest.mark.parametrize("stride, mode", [(2, "avg"), (2, "bilinear"), (3, "avg")])
def test_llava_onevision_pooled_matches_the_model_packing(stride, mode):
    """``vtok_fast.patch.hf`` pools after ``LlavaOnevisionModel.pack_image_features``: the base
    view's 27x27 grid and the unpadded (and shrunk) grid each pooled, every row's newline kept.
    The packed grid's rows and columns are read from the model's own packing of marked dummy
    features."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=384, patch_size=14),
                             image_grid_pinpoints=[list(p) for p in OV_PINPOINTS])
    sizes = _random_sizes(24, high=3000)
    features = [torch.zeros(image_size_to_num_patches(s, config.image_grid_pinpoints, 384), 729, 1) for s in sizes]
    packed, lengths = LlavaOnevisionModel.pack_image_features(SimpleNamespace(config=config), features,
                                                              torch.tensor(sizes), image_newline=torch.ones(1))

    def side(n):
        return -(-n // stride) if mode == "bilinear" else n // stride

    for size, piece, length in zip(sizes, packed, lengths.tolist()):
        rows = int(piece[729:].sum())  # one newline (the marker) per row of the packed grid
        cols = (length - 729) // rows - 1 if rows else 0
        spec = ("pool", {"stride": stride, "mode": mode})
        if 0 < min(rows, cols) < stride:  # a pooling window larger than the grid: refused, as vtok_fast.pool
            with pytest.raises(ValueError, match="larger than"):
                count_tokens("llava-onevision", tuple(size), compress=spec)
            continue
        expected = side(27) ** 2 + side(rows) * side(cols) + rows
        assert count_tokens("llava-onevision", tuple(size), compress=spec).llm_tokens == expected, size


def test_llava_onevision_matches_the_model_packing():
    """``LlavaOnevisionModel.pack_image_features`` (unpad, bilinear shrink, newline) on dummy
    features: its lengths are what the language model sees."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=384, patch_size=14),
                             image_grid_pinpoints=[list(p) for p in OV_PINPOINTS])
    sizes = _random_sizes(24, high=3000) + [[1, 4000], [4000, 1], [5, 7]]
    features = [torch.zeros(image_size_to_num_patches(s, config.image_grid_pinpoints, 384), 729, 1) for s in sizes]
    _, lengths = LlavaOnevisionModel.pack_image_features(SimpleNamespace(config=config), features, torch.tensor(sizes),
                                                         image_newline=torch.zeros(1))
    assert [count_tokens("llava-onevision", tuple(s)).llm_tokens for s in sizes] == lengths.tolist()


def test_llava_onevision_processor_end_to_end():
    """The ``<image>`` placeholders the processor puts in a prompt, and the views it cuts."""
    processor = _onevision_processor()
    for height, width in [(480, 640), (384, 384), (100, 900), (1080, 1920), (37, 2000)]:
        out = processor(images=[_image(height, width)], text="<image>", return_tensors="pt", do_rescale=False,
                        do_normalize=False)
        budget = count_tokens("llava-onevision", (height, width))
        assert int((out["input_ids"] == processor.image_token_id).sum()) == budget.llm_tokens
        assert out["pixel_values"].shape[1] * 729 == budget.vit_tokens


def _qwen_processor(model, **bounds):
    """Qwen2.5-VL's and Qwen3-VL's processors: both take transformers' Qwen2VLImageProcessor (its
    class defaults; Qwen3-VL with 16-px patches)."""
    tokenizer = _tokenizer("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    if model == "qwen2.5-vl":
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**bounds), tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor())
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16, **bounds), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor())


QWEN_CASES = [("qwen2.5-vl", {}), ("qwen2.5-vl", {"min_pixels": 3136, "max_pixels": 12_845_056}),  # released
              ("qwen3-vl", {}), ("qwen3-vl", {"min_pixels": 65_536, "max_pixels": 16_777_216})]  # checkpoints


@pytest.mark.parametrize("model, bounds", QWEN_CASES)
def test_qwen_vl_families_match_transformers(model, bounds):
    """The processors' ``_get_num_multimodal_tokens``: placeholder count and 14/16-px patches."""
    processor = _qwen_processor(model, **bounds)
    sizes = _family_sizes(400, max_aspect=200)
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    for (height, width), llm, patches in zip(sizes, data.num_image_tokens, data.num_image_patches):
        budget = count_tokens(model, (height, width), **bounds)
        assert (budget.vit_tokens, budget.llm_tokens) == (patches, llm), (height, width)


@pytest.mark.parametrize("model, bounds", QWEN_CASES)
def test_qwen_vl_families_processor_end_to_end(model, bounds):
    """The ``<|image_pad|>`` tokens in a prompt and ``image_grid_thw``."""
    processor = _qwen_processor(model, **bounds)
    for height, width in [(1080, 1920), (336, 336), (50, 700), (3, 500)]:
        out = processor(images=[_image(height, width)], text="<|vision_start|><|image_pad|><|vision_end|>",
                        return_tensors="pt")
        budget = count_tokens(model, (height, width), **bounds)
        assert int((out["input_ids"] == processor.image_token_id).sum()) == budget.llm_tokens
        assert int(out["image_grid_thw"].prod()) == budget.vit_tokens


def _internvl_processor(**images_kwargs):
    """The OpenGVLab InternVL3/3.5 -hf configuration: 448x448 tiles, 256 tokens each."""
    tokenizer = _named_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    return InternVLProcessor(image_processor=GotOcr2ImageProcessor(size={"height": 448, "width": 448}, **images_kwargs),
                             tokenizer=tokenizer, video_processor=InternVLVideoProcessor(), image_seq_length=256)


@pytest.mark.parametrize("options", [{}, {"max_patches": 6}, {"min_patches": 2, "max_patches": 40},
                                     {"max_patches": 1}])
def test_internvl_matches_transformers(options):
    """``InternVLProcessor._get_num_multimodal_tokens`` (``crop_to_patches`` on) over random
    sizes, for the default 1-12 tiles and other tile ranges; 32x32 ViT patches per view."""
    processor = _internvl_processor(**options)
    sizes = _family_sizes(400)
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    for (height, width), llm, views in zip(sizes, data.num_image_tokens, data.num_image_patches):
        budget = count_tokens("internvl", (height, width), **options)
        assert (budget.vit_tokens, budget.llm_tokens) == (views * 32 * 32, llm), (height, width)


def test_internvl_processor_end_to_end():
    """The ``<IMG_CONTEXT>`` tokens in a prompt and the tiles (+ thumbnail) it cuts."""
    processor = _internvl_processor()
    for height, width in [(1080, 1920), (448, 448), (100, 100), (60, 2000), (2000, 900)]:
        out = processor(images=[_image(height, width)], text="<IMG_CONTEXT>", return_tensors="pt", do_rescale=False,
                        do_normalize=False)
        budget = count_tokens("internvl", (height, width))
        assert int((out["input_ids"] == processor.image_token_id).sum()) == budget.llm_tokens
        assert out["pixel_values"].shape[0] * 32 * 32 == budget.vit_tokens


def _gemma3_processor():
    """The google/gemma-3 processor configuration: 896x896, 256 tokens per image."""
    tokenizer = _named_tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"})
    return Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 896, "width": 896}),
                           tokenizer=tokenizer)


@pytest.mark.parametrize("options", [{}, {"pan_and_scan_min_crop_size": 100, "pan_and_scan_max_num_crops": 7,
                                          "pan_and_scan_min_ratio_to_activate": 1.5}])
def test_gemma3_matches_transformers(options):
    """Without pan-and-scan: the processor's count. With it: one more 256-token view per crop that
    ``Gemma3ImageProcessor.pan_and_scan_batched`` cuts (called on a zero-copy view of the size)."""
    sizes = _family_sizes(400)
    expected = _gemma3_processor()._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    image_processor, cropped = Gemma3ImageProcessor(), 0
    settings = {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2, **options}  # the processor's defaults, then others
    for (height, width), llm in zip(sizes, expected):
        assert (count_tokens("gemma3", (height, width), **options).llm_tokens, llm) == (256, 256)
        crops = len(image_processor.pan_and_scan_batched(torch.zeros(1, 1, 1, 1).expand(1, 3, height, width),
                                                         **settings))
        budget = count_tokens("gemma3", (height, width), do_pan_and_scan=True, **options)
        assert (budget.vit_tokens, budget.llm_tokens) == ((1 + crops) * 4096, (1 + crops) * 256), (height, width)
        cropped += crops > 0
    assert 0 < cropped < len(sizes)


def test_gemma3_processor_end_to_end():
    """The ``<image_soft_token>`` tokens in a prompt, with and without pan-and-scan."""
    processor = _gemma3_processor()
    for height, width in [(480, 1640), (896, 896), (3000, 700), (100, 5000), (300, 400)]:
        for pan_and_scan in (False, True):
            out = processor(images=[_image(height, width)], text="<start_of_image>", return_tensors="pt",
                            do_pan_and_scan=pan_and_scan, do_rescale=False, do_normalize=False)
            budget = count_tokens("gemma3", (height, width), do_pan_and_scan=pan_and_scan)
            assert int((out["input_ids"] == processor.tokenizer.image_token_id).sum()) == budget.llm_tokens
            assert out["pixel_values"].shape[0] * 4096 == budget.vit_tokens


def _idefics3_processor(longest_edge=1456, max_image_size=364, image_seq_len=169, do_image_splitting=True):
    """The Idefics3 processor (class defaults unless given), with the tokens it looks up."""
    tokenizer = _tokenizer("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                           *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
    image_processor = Idefics3ImageProcessor(size={"longest_edge": longest_edge},
                                             max_image_size={"longest_edge": max_image_size},
                                             do_image_splitting=do_image_splitting)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len)


@pytest.mark.parametrize("options", [
    {}, {"do_image_splitting": False},
    {"longest_edge": 1536, "max_image_size": 384, "image_seq_len": 81},  # SmolVLM-Instruct's sizes
    {"longest_edge": 6000, "max_image_size": 1000},  # past transformers' 4096 cap
])
def test_idefics3_matches_transformers(options):
    """``Idefics3Processor._get_num_multimodal_tokens`` over random sizes: class defaults,
    no splitting, SmolVLM-Instruct's sizes, and a longest edge past the 4096 cap."""
    processor = _idefics3_processor(**options)
    assert Idefics3ImageProcessor().size == {"longest_edge": 1456}  # the defaults count_tokens uses
    sizes = _family_sizes(400)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    for (height, width), llm in zip(sizes, expected):
        assert count_tokens("idefics3", (height, width), **options).llm_tokens == llm, (height, width)


def test_idefics3_processor_end_to_end():
    """The ``<image>`` tokens in a prompt and the views (tiles + global) the processor cuts."""
    processor = _idefics3_processor()
    for height, width in [(1080, 1920), (1, 1), (20, 1500), (1500, 20), (364, 364), (700, 365)]:
        out = processor(images=[_image(height, width)], text="<image>", return_tensors="pt", do_pad=False,
                        do_rescale=False, do_normalize=False, input_data_format="channels_first")
        budget = count_tokens("idefics3", (height, width))
        assert int((out["input_ids"] == processor.image_token_id).sum()) == budget.llm_tokens
        assert out["pixel_values"].shape[1] * 676 == budget.vit_tokens


def test_smolvlm_matches_the_image_processor():
    """``SmolVLMProcessor`` cannot be built here (it needs ``num2words``, absent in this
    environment), so the count is checked against ``SmolVLMImageProcessor``'s outputs: the tiles
    (rows x cols, each max_image_size square) and the global image it returns, times the
    processor's default ``image_seq_len`` of 169; then against its ``get_number_of_image_patches``
    over many sizes."""
    image_processor = SmolVLMImageProcessor()
    sizes = _random_sizes(12, low=1, high=2000) + [[1, 1], [1, 4000], [4000, 1], [7, 5], [365, 363], [364, 364]]
    for height, width in sizes:  # (no padding, rescaling or normalizing: they change no count, and cost time)
        out = image_processor(images=[_image(height, width)], return_row_col_info=True, do_rescale=False,
                              do_normalize=False, do_pad=False, input_data_format="channels_first",
                              return_tensors="pt")
        views, rows, cols = out["pixel_values"].shape[1], out["rows"][0][0], out["cols"][0][0]
        assert tuple(out["pixel_values"].shape[-2:]) == (364, 364) and views == rows * cols + 1
        budget = count_tokens("smolvlm", (height, width))
        assert (budget.vit_tokens, budget.llm_tokens) == (views * 676, views * 169), (height, width)
        if rows:
            assert _row(budget, f"ViT: {rows * cols} tiles of 364x364 ({rows} rows x {cols} cols)") == rows * cols * 676
    for height, width in _family_sizes(400):
        _, rows, cols = image_processor.get_number_of_image_patches(height, width, {})
        assert count_tokens("smolvlm", (height, width)).llm_tokens == 169 * (rows * cols + 1), (height, width)
    no_split = count_tokens("smolvlm", (1080, 1920), do_image_splitting=False)
    assert (no_split.vit_tokens, no_split.llm_tokens) == (676, 169)


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


def test_cli_takes_every_model_of_the_table(capsys):
    """The CLI's choices are count_tokens' table: every family added there runs here."""
    for name in MODEL_NAMES:
        assert budget_cli.main(["budget", name, "448x640"] + (["--patch-size", "14"] if name == "vit" else [])) == 0
        assert f"{name}, 448x640 image (HxW): " in capsys.readouterr().out


def test_cli_options_of_the_added_families(capsys):
    """``--max-patches``, ``--pan-and-scan``, Qwen bounds and a compressed OneVision budget."""
    assert budget_cli.main(["budget", "internvl", "1080x1920", "--max-patches", "6"]) == 0
    assert "768 LLM tokens" in capsys.readouterr().out  # 2 x 1 tiles + the thumbnail
    assert budget_cli.main(["budget", "gemma3", "480x1640", "--pan-and-scan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["llm_tokens"] == 4 * 256  # the image + 3 crops
    assert budget_cli.main(["budget", "qwen3-vl", "1080x1920", "--min-pixels", "65536", "--max-pixels",
                            "16777216"]) == 0
    assert "8160 ViT tokens, 2040 LLM tokens" in capsys.readouterr().out
    assert budget_cli.main(["budget", "llava-onevision", "1080x1920", "--compress", "pool:stride=2"]) == 0
    out = capsys.readouterr().out
    assert "compressed with pool(stride=2): 7269 -> 1849 LLM tokens" in out and "\nnote: " not in out


@pytest.mark.parametrize("argv, message", [
    (["budget", "llava-1.5", "336", "--mode", "tiny"], "got unexpected option(s) mode"),
    (["budget", "llava-1.5", "336x", "--compress", "pool:stride=2"], "size must be HxW (e.g. 672x1008)"),
    (["budget", "llava-1.5", "336", "--compress", "tome:keep=1000"], "1000 tokens is more than the 576"),
    (["budget", "llava-2", "336"], "invalid choice: 'llava-2'"),
    (["budget", "qwen2-vl", "1" + "0" * 155], "image_size sides must be at most 2147483647 pixels (MAX_IMAGE_SIDE), "
                                              "got ~1e155x~1e155"),
    (["budget", "qwen2-vl", "336", "--min-pixels", "1" + "0" * 400], "min_pixels must be a positive integer <="),
    (["budget", "gemma3", "336", "--max-patches", "6"], "count_tokens('gemma3') got unexpected option(s) max_patches"),
    (["budget", "internvl", "336", "--pan-and-scan"], "got unexpected option(s) do_pan_and_scan"),
    (["budget", "internvl", "336", "--max-patches", "0"], "max_patches must be a positive integer <= 1024, got 0"),
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
                                   "deepseek-ocr", "llava-onevision", "qwen2.5-vl", "qwen3-vl", "internvl", "gemma3",
                                   "smolvlm", "idefics3"])
@pytest.mark.parametrize("size", [(10**155, 336), (336, 10**155), (10**400, 10**400), (MAX_IMAGE_SIDE + 1, 1)])
def test_huge_sides_are_a_named_error(model, size):
    """Sides up to MAX_IMAGE_SIDE count; a larger one is a ValueError naming image_size (it was an
    OverflowError from the float arithmetic at ~1e155)."""
    options = {"patch_size": 14} if model == "vit" else {}
    with pytest.raises(ValueError, match=r"image_size sides must be at most 2147483647 pixels \(MAX_IMAGE_SIDE\), got"):
        count_tokens(model, size, **options)


@pytest.mark.parametrize("model", ["vit-b/16", "llava-1.5", "llava-next", "llava-uhd", "deepseek-ocr",
                                   "llava-onevision", "internvl", "gemma3", "smolvlm", "idefics3"])
@pytest.mark.parametrize("compress", [None, "tome:keep=1", "fastv"])
def test_the_largest_sides_count(model, compress):
    options = {"do_pan_and_scan": True} if model == "gemma3" else {}
    for size in ((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), (MAX_IMAGE_SIDE, 336), (336, MAX_IMAGE_SIDE)):
        budget = count_tokens(model, size, compress=compress, **options)
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
    ("llava-uhd", "fastv", "runs fastv in llava-1.5, llava-next, llava-onevision, qwen2-vl"),
    ("deepseek-ocr", "tome:keep=64", "runs tome inside LLaVA-1.5 models only, not in deepseek-ocr"),
    ("llava-uhd", "attn_topk:keep=32", "runs attn_topk inside LLaVA-1.5 models only, not in llava-uhd"),
    ("vit-b/16", "fastv", "fastv prunes inside a language model; vit-b/16 has none"),
    ("llava-1.5", "pixel_shuffle", "pixel_shuffle makes tokens stride**2 times wider"),
    ("deepseek-ocr", "pyramiddrop", "smolvlm models, not in deepseek-ocr: this count is arithmetic"),
    ("qwen2.5-vl", "pixel_shuffle:stride=2", "image tokens of qwen2.5-vl, not pixel_shuffle"),
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
    ("llava-onevision", None), ("qwen2.5-vl", None), ("qwen3-vl", None), ("internvl", None), ("gemma3", None),
    ("smolvlm", None), ("idefics3", None), ("llava-next", "pool:stride=2"), ("llava-onevision", "pool:stride=2"),
    ("qwen3-vl", "tome:keep=64"), ("idefics3", "pool:stride=2,mode=bilinear"), ("gemma3", "dart:ratio=0.25"),
    ("internvl", "visionzip:dominant=54,contextual=10"), ("gemma3", "attn_topk:ratio=0.5"), ("smolvlm", "prumerge:keep=32"),
    ("qwen2-vl", "visionzip:dominant=54,contextual=10"),
])
def test_methods_the_library_runs_have_no_note(model, compress):
    budget = count_tokens(model, (672, 672), compress=compress)
    assert budget.notes == () and "note:" not in str(budget)


@pytest.mark.parametrize("model", ["llava-1.5", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl",
                                   "internvl", "idefics3", "smolvlm"])
@pytest.mark.parametrize("compress", ["fastv", "pyramiddrop", "pyramiddrop:layers=8,ratio=0.25"])
def test_fastv_and_pyramiddrop_in_the_families_the_library_runs_them_in_have_no_note(model, compress):
    """vtok_fast.patch.hf runs both inside these models' language models (vtok_fast.patch.hf_fastv)."""
    assert count_tokens(model, (672, 672), compress=compress).notes == ()


def test_gemma3_fastv_notes_the_sliding_window():
    assert "sliding window" in count_tokens("gemma3", (672, 672), compress="pyramiddrop").notes[0]


def test_pyramiddrop_counts_every_stage():
    """n_s = round(n_{s-1} * (1 - R_s)) from the image span; llm_tokens is the last stage's."""
    budget = count_tokens("llava-1.5", (336, 336), compress=("pyramiddrop", {"layers": [8, 16, 24],
                                                                              "ratios": [0.5, 0.25, 0.75]}))
    assert [c for _, c in budget.stages] == [576, 288, 216, 54] and budget.llm_tokens == 54
    assert budget.stages[1] == ("from layer 8 on", 288) and budget.uncompressed_llm_tokens == 576
    assert sum(c for label, c in budget.breakdown if label.startswith("LLM: ")) == budget.llm_tokens
    assert count_tokens("llava-1.5", (336, 336), compress="pyramiddrop").compress == ("pyramiddrop", {"ratio": 0.5})
    with pytest.raises(ValueError, match="keep no image token"):
        count_tokens("llava-1.5", (336, 336), compress=("pyramiddrop", {"ratios": [0.99, 0.99, 0.99]}))
    with pytest.raises(ValueError, match="layers must be strictly increasing integers >= 1"):
        count_tokens("llava-1.5", (336, 336), compress=("pyramiddrop", {"layers": [16, 8]}))
