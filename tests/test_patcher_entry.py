"""``vtok_fast.patch.hf`` / ``timm`` as entry points: one image-token count for every patch, a
failing call changes nothing, features that cannot be combined are refused at patch time whatever
the order, compression composes with the fused projector, warnings only where a user can act,
transformers' call conventions checked at ``apply``, and a clean public namespace."""
import copy
import types
import warnings

import pytest
import torch
import torch.nn as nn
import transformers

import vtok_fast.patch
import vtok_fast.project.modules
from test_patcher_hf_compress import (IMG, TEXT, assert_state_equal, offline_processor, prompts, state,
                                      tiny_llava)
from test_patcher_project import qwen2_vl, swin
from vtok_fast.patch import hf_tome
from vtok_fast.patch._common import TRANSFORMERS_TESTED

VISIONZIP = ("visionzip", {"dominant": 4, "contextual": 2})


def tower_tokens(model) -> int:
    with torch.no_grad():
        return model.model.vision_tower(torch.randn(1, 3, IMG, IMG)).last_hidden_state.shape[1]


# --- item: one count for every patch --------------------------------------------------------------

def test_image_token_count_answers_for_every_patch():
    model = tiny_llava()
    count = vtok_fast.patch.llava_image_token_count  # the former name
    assert count(model) == vtok_fast.patch.image_token_count(model) == 16  # unpatched
    vtok_fast.patch.hf(model, compress=("pool", {"stride": 2}))
    assert count(model) == 4
    vtok_fast.patch.unpatch(model)
    vtok_fast.patch.hf(model, compress=("fastv", {"layer": 2, "ratio": 0.5}))
    assert count(model) == 16  # FastV prunes inside the language model: the prompt keeps 16
    vtok_fast.patch.unpatch(model)
    vtok_fast.patch.hf(model.model, fuse_embed=False, tome_r=2)  # patched on the inner LlavaModel
    assert count(model) == count(model.model) == hf_tome.llava_image_token_count(model) == 16 + 1 - 2 * 2 - 1
    # (vision_feature_layer -2: two layers merge 2 tokens each; the CLS token is dropped)
    features = model.get_image_features(pixel_values=torch.randn(1, 3, IMG, IMG)).pooler_output
    assert features[0].shape[0] == count(model)


def test_compress_on_another_model_names_the_supported_classes():
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=IMG, patch_size=8)
    model = transformers.CLIPVisionModel(config).eval()  # its embedding is fused by this call, then rolled back
    before = state(model)
    with pytest.raises(ValueError, match=r"model must be a LlavaForConditionalGeneration or LlavaModel \(LLaVA-1\.5\)"
                                         r".*which holds no LlavaModel; compress= also runs in the families keyed by "
                                         r"config.model_type \[.*'qwen2_5_vl'.*\] \(this model's: 'clip_vision_model'\)"):
        vtok_fast.patch.hf(model, compress=("pool", {"stride": 2}))
    assert_state_equal(before, state(model))  # the fused merger of this call is rolled back too
    with pytest.raises(ValueError, match="which holds no LlavaModel"):
        vtok_fast.patch.image_token_count(model)
    qwen = qwen2_vl()[0]  # a family of the table: compressed (tests/test_family_compress.py)
    assert vtok_fast.patch.hf(qwen, compress=("pool", {"stride": 2}))._compress_info["family"] == "Qwen2-VL"


# --- bad-input sweep item 1: a failing call changes nothing -----------------------------------------

def test_failing_call_leaves_no_tome():
    model = tiny_llava()
    before = state(model)
    with pytest.raises(ValueError, match="cannot be combined"):
        vtok_fast.patch.hf(model, tome_r=2, compress=VISIONZIP)
    assert_state_equal(before, state(model))
    assert tower_tokens(model) == 17


def test_failing_budget_leaves_no_fused_embedding_or_projector():
    model = tiny_llava()
    before = state(model)
    with pytest.raises(TypeError, match="contextual"):
        vtok_fast.patch.hf(model, compress=("visionzip", {"dominant": 4}))
    assert_state_equal(before, state(model))


def test_failing_call_keeps_the_patches_of_earlier_calls():
    model, processor = tiny_llava(), offline_processor()
    vtok_fast.patch.hf(model, compress=("pool", {"stride": 2}))
    vtok_fast.patch.configure_processor(processor, model)
    inputs = prompts(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
    earlier = state(model)
    with pytest.raises(TypeError, match="contextual"):
        vtok_fast.patch.hf(model, compress=("visionzip", {"dominant": 4}))  # would replace the pooling
    with pytest.raises(ValueError, match="cannot be combined"):
        vtok_fast.patch.hf(model, tome_r=2)
    assert_state_equal(earlier, state(model))
    assert model._compress_info["method"] == "pool"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_failing_tome_update_restores_the_previous_settings():
    model = tiny_llava()
    vtok_fast.patch.hf(model, fuse_embed=False, tome_r=2)
    settings = (model.r, vtok_fast.patch.tome_state(model).trace_source)
    with pytest.raises(ValueError, match="cannot be combined"):
        vtok_fast.patch.hf(model, tome_r=3, trace_source=True, compress=VISIONZIP)
    assert (model.r, vtok_fast.patch.tome_state(model).trace_source) == settings


# --- item 20: ToMe and compression are refused in either order -------------------------------------

@pytest.mark.parametrize("first,second", [({"compress": ("pool", {"stride": 2})}, {"tome_r": 2}),
                                          ({"tome_r": 2}, {"compress": ("pool", {"stride": 2})})])
def test_tome_and_compress_are_refused_in_either_order(first, second):
    model, processor = tiny_llava(), offline_processor()
    vtok_fast.patch.hf(model, **first)
    vtok_fast.patch.configure_processor(processor, model)
    before = state(model)
    with pytest.raises(ValueError, match=r"ToMe merging .*and compress= cannot be combined; use "
                                         r"compress=\('tome', \{\.\.\.\}\)"):
        vtok_fast.patch.hf(model, **second)
    assert_state_equal(before, state(model))
    with torch.no_grad():
        assert model(**prompts(processor)).logits.shape[0] == 2  # every forward still runs


# --- item 21: compression composes with the fused projector ------------------------------------------

def _counting_merge_project(monkeypatch) -> list:
    calls = []
    real = vtok_fast.project.modules.merge_project

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(vtok_fast.project.modules, "merge_project", spy)
    return calls


@pytest.mark.parametrize("spec", [("pool", {"stride": 2}), VISIONZIP])
def test_compression_runs_the_fused_projector(spec, monkeypatch):
    model = tiny_llava()
    unfused = copy.deepcopy(model)
    calls = _counting_merge_project(monkeypatch)
    pixels = torch.randn(2, 3, IMG, IMG)
    vtok_fast.patch.hf(unfused, fuse_embed=False, fuse_project=False, compress=spec)
    vtok_fast.patch.hf(model, fuse_embed=False, compress=spec)
    with torch.no_grad():
        expected = unfused.get_image_features(pixel_values=pixels).pooler_output
        assert calls == []
        got = model.get_image_features(pixel_values=pixels).pooler_output
    count = vtok_fast.patch.image_token_count(model)
    # the compressed tokens, through merge_project: linear_1 + activation fused, then linear_2
    # (on the CPU as a one-window merge_project: its GEMM is the faster of torch's and oneDNN's)
    assert calls == [(2 * count, TEXT["hidden_size"])] * 2
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e)


def test_recompressing_fuses_a_projector_left_unfused(monkeypatch):
    model = tiny_llava()
    vtok_fast.patch.hf(model, fuse_project=False, compress=("pool", {"stride": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already replaced by another patch" for our own wrapper
        vtok_fast.patch.hf(model, compress=VISIONZIP)
    calls = _counting_merge_project(monkeypatch)
    with torch.no_grad():
        model.get_image_features(pixel_values=torch.randn(1, 3, IMG, IMG))
    assert len(calls) == 2 and model._compress_info["method"] == "visionzip"  # linear_1 fused, linear_2
    vtok_fast.patch.unpatch(model)
    assert all(not {"forward", "_vtok_fast_patches"} & set(m.__dict__) for m in model.modules())


# --- item 6: warnings only where a user can act ---------------------------------------------------

def test_fused_merger_without_an_embedding_does_not_warn():
    qwen, swin_model = qwen2_vl()[0], swin()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vtok_fast.patch.hf(qwen)
        vtok_fast.patch.timm(swin_model)
    assert "forward" in qwen.model.visual.merger.__dict__
    assert all("forward" in layer.downsample.__dict__ for layer in swin_model.layers[1:])


@pytest.mark.parametrize("call,expected", [
    (lambda m: vtok_fast.patch.hf(m), ["no CLIPVisionEmbeddings or SiglipVisionEmbeddings inside",
                                       "no Qwen2-VL / Qwen2.5-VL PatchMerger"]),
    (lambda m: vtok_fast.patch.hf(m, fuse_embed=False, tome_r=4), ["no Qwen2-VL", "no CLIPVisionModel"]),
    (lambda m: vtok_fast.patch.timm(m), ["not a timm VisionTransformer", "no timm swin_transformer.PatchMerging"]),
])
def test_a_model_where_nothing_applies_gets_one_warning(call, expected):
    model = nn.Sequential(nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(model)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert all(part in message for part in expected) and "\n" not in message
    assert caught[0].filename == __file__


# --- drift: transformers' call conventions are checked at apply --------------------------------------

def _drifted(name):
    """(module path, class, method, a replacement with another signature, hf() kwargs)."""
    from transformers.models.clip import modeling_clip
    from transformers.models.llava import modeling_llava

    return {
        "get_placeholder_mask": (modeling_llava.LlavaModel, "get_placeholder_mask",
                                 lambda self, ids, embeds, features: None, {"compress": ("pool", {"stride": 2})},
                                 r"LlavaModel\.get_placeholder_mask takes \(ids, embeds, features\), not "
                                 r"\(input_ids, inputs_embeds, image_features, \.\.\.\) first"),
        "get_image_features": (modeling_llava.LlavaModel, "get_image_features",
                               lambda self, pixel_values, **kwargs: None, {"compress": ("pool", {"stride": 2})},
                               "get_image_features takes no vision_feature_layer, vision_feature_select_strategy"),
        "encoder_layer": (modeling_clip.CLIPEncoderLayer, "forward", lambda self, x, mask=None: None,
                          {"tome_r": 2}, r"CLIPEncoderLayer\.forward takes \(x, mask\)"),
        "embeddings": (modeling_clip.CLIPVisionEmbeddings, "forward", lambda self, pixel_values: None, {},
                       r"CLIPVisionEmbeddings\.forward takes \(pixel_values\)"),
        "projector": (modeling_llava.LlavaMultiModalProjector, "forward", lambda self, features: None,
                      {"fuse_embed": False}, r"LlavaMultiModalProjector\.forward takes \(features\)"),
        "decoder_layer": (transformers.models.llama.modeling_llama.LlamaDecoderLayer, "forward",
                          lambda self, hidden_states, past_key_values=None: None,
                          {"compress": ("fastv", {})}, "LlamaDecoderLayer.forward takes no attention_mask"),
    }[name]


@pytest.mark.parametrize("name", ["get_placeholder_mask", "get_image_features", "encoder_layer", "embeddings",
                                  "projector", "decoder_layer"])
def test_a_drifted_signature_is_refused_at_apply_and_nothing_is_patched(name, monkeypatch):
    owner, method, fake, kwargs, detail = _drifted(name)
    model = tiny_llava()
    before = state(model)
    monkeypatch.setattr(owner, method, fake)
    version = transformers.__version__.replace(".", r"\.")
    tested = TRANSFORMERS_TESTED.replace(".", r"\.")
    with pytest.raises(ValueError, match=f"transformers {version} is installed, but this patch follows "
                                         f"transformers {tested} \\(tested\\): .*{detail}"):
        vtok_fast.patch.hf(model, **kwargs)
    assert_state_equal(before, state(model))


def test_tested_range_is_stated_once():
    import pathlib

    folder = pathlib.Path(vtok_fast.patch.__file__).parent
    assert TRANSFORMERS_TESTED == "5.24-5.25"
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert "5.24" not in text or path.name == "_common.py", path.name


# --- item 11: the public namespace ---------------------------------------------------------------

def test_public_namespace_holds_only_the_api_and_submodules():
    names = {n for n in dir(vtok_fast.patch) if not n.startswith("_")}
    modules = {n for n in names if isinstance(getattr(vtok_fast.patch, n), types.ModuleType)}
    assert names - modules == set(vtok_fast.patch.__all__)
    assert all(getattr(vtok_fast.patch, n).__name__ == f"vtok_fast.patch.{n}" for n in modules)
    assert not {"annotations", "importlib", "nn"} & names
    doc = vtok_fast.patch.configure_processor.__doc__
    assert ":func:`remove`" not in doc and "vtok_fast.patch.unpatch" in doc
