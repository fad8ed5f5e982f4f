"""Patchers of the fused mergers / projectors: ``vtok_fast.patch.hf_project`` (Qwen2-VL,
Qwen2.5-VL, InternVL, LLaVA) and ``vtok_fast.patch.timm_swin`` (Swin), called directly.

Tiny random-init models built from configs (no downloads). End-to-end logits of the patched model
are compared with a float64 copy of the unpatched one at fp32 resolution; patch -> unpatch ->
patch restores and re-applies; parameters, state_dict and gradients are unchanged."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import vtok_fast.patch
import vtok_fast.patch.hf_project as hf_project
import vtok_fast.patch.timm_swin as timm_swin
from helpers import assert_close

IMAGE, START, END, VIDEO = 60, 61, 62, 59
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
# the fp32 error of a logit grows with the widest reduction on its path (the merger's 4C = 64)
REDUCTION = 64


def _qwen_inputs(t=1, h=4, w=6, patch=4):
    pixels = torch.randn(t * h * w, 3 * 2 * patch * patch)
    ids = torch.tensor([[1, 3, START] + [IMAGE] * (t * h * w // 4) + [END, 4, 5]])
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[t, h, w]]),
                mm_token_type_ids=(ids == IMAGE).long())


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                           vision_start_token_id=START, vision_end_token_id=END, video_token_id=VIDEO)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return model, _qwen_inputs(), [model.model.visual.merger]


def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                              vision_start_token_id=START, vision_end_token_id=END, video_token_id=VIDEO)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return model, _qwen_inputs(h=8, w=8), [model.model.visual.merger]


def internvl(strategy="default"):
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=[24, 24], patch_size=[4, 4])
    config = InternVLConfig(vision_config=vision, text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMAGE,
                            downsample_ratio=0.5, vision_feature_select_strategy=strategy)
    model = InternVLForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, 3] + [IMAGE] * 9 + [4, 5]] * 2)  # (24 / 4)^2 = 36 patches -> 9 tokens
    return model, dict(input_ids=ids, pixel_values=torch.randn(2, 3, 24, 24)), [model.model.multi_modal_projector]


def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=IMAGE,
                         vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, 2] + [IMAGE] * 4 + [3, 4]])
    return model, dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28)), [model.model.multi_modal_projector]


def swin():
    import timm
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1, 1, 1),
                              num_heads=(1, 2, 2, 4), window_size=2, img_size=32, num_classes=10).eval()
    return model, dict(x=torch.randn(2, 3, 32, 32)), [layer.downsample for layer in model.layers[1:]]


HF_MODELS = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "internvl": internvl, "llava": llava}
MODELS = dict(HF_MODELS, swin=swin)


def patcher(name):
    return timm_swin if name == "swin" else hf_project


def _randomize_norms(model):
    """Non-trivial norm affines (HF initializes them to 1 / 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name or name.endswith("ln_q.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _logits(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _float64(inputs):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


def _patched_methods(model):
    return sorted((name, attr) for name, m in model.named_modules() for attr in ("forward", "pixel_shuffle")
                  if attr in m.__dict__)


@pytest.mark.parametrize("name", list(MODELS))
def test_end_to_end_logits_patch_unpatch_patch(name, backend):
    model, inputs, targets = MODELS[name]()
    _randomize_norms(model)
    ref = copy.deepcopy(model).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = _logits(ref, _float64(inputs))
        unpatched = _logits(model, inputs)
        patcher(name).apply(model)
        assert all("forward" in t.__dict__ for t in targets), "not patched"
        once = _logits(model, inputs)
        patcher(name).remove(model)
        assert _patched_methods(model) == []
        restored = _logits(model, inputs)
        patcher(name).apply(model)
        patcher(name).apply(model)  # a second apply is a no-op
        twice = _logits(model, inputs)
    for got in (once, twice):
        assert_close(got, want, dtype=torch.float32, reduction=REDUCTION)
    torch.testing.assert_close(restored, unpatched, rtol=0, atol=0)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    clone = copy.deepcopy(model)  # the patch bookkeeping travels with deepcopy
    patcher(name).remove(clone)
    assert _patched_methods(clone) == [] and _patched_methods(model) != []


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_unpatched(name):
    model, inputs, targets = MODELS[name]()
    _randomize_norms(model)
    ref = copy.deepcopy(model).double()
    patcher(name).apply(model)
    _logits(model, inputs).square().mean().backward()
    _logits(ref, _float64(inputs)).square().mean().backward()
    theirs = dict(ref.named_parameters())
    for target in targets:
        for key, p in target.named_parameters():
            full = next(n for n, q in model.named_parameters() if q is p)
            assert_close(p.grad, theirs[full].grad, dtype=torch.float32, reduction=REDUCTION, msg=full)


def test_internvl_projector_still_takes_shuffled_features():
    model, _, (projector,) = internvl()
    _randomize_norms(model)
    shuffled = torch.randn(2, 9, 64)
    with torch.no_grad():
        want = projector(shuffled)
        hf_project.apply(model)
        torch.testing.assert_close(projector(shuffled), want)
        features = torch.randn(2, 6, 6, 16)
        assert torch.equal(model.model.pixel_shuffle(features), features)  # patched: the projector shuffles


def test_swin_odd_feature_map():
    import timm
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1, 1, 1),
                              num_heads=(1, 2, 2, 4), window_size=2, img_size=40, num_classes=10,
                              strict_img_size=False).eval()
    merging = model.layers[1].downsample
    x = torch.randn(2, 5, 7, 16)  # odd sides: timm pads with zeros at the bottom / right
    with torch.no_grad():
        want = merging(x)
        timm_swin.apply(model)
        assert_close(merging(x), want.double(), dtype=torch.float32, reduction=64)


def test_unfusable_modules_keep_their_forward_and_warn():
    from transformers.activations import ACT2FN
    model, inputs, (projector,) = llava()
    projector.act = ACT2FN["quick_gelu"]
    with pytest.warns(RuntimeWarning, match="QuickGELUActivation is not one the fused epilogue computes"):
        hf_project.apply(model)
    assert "forward" not in projector.__dict__

    model, _, (merger,) = qwen2_vl()
    merger.ln_q = nn.RMSNorm(16)  # torch's RMS norm: not one the fused op reproduces bit for bit
    with pytest.warns(RuntimeWarning, match="ln_q is RMSNorm, not nn.LayerNorm or a supported RMS norm"):
        hf_project.apply(model)
    assert "forward" not in merger.__dict__

    model, _, targets = swin()
    targets[0].forward = lambda x: x  # already replaced by someone else
    with pytest.warns(RuntimeWarning, match="already replaced"):
        timm_swin.apply(model)
    assert all("forward" in t.__dict__ for t in targets[1:])
    timm_swin.remove(model)
    assert "forward" in targets[0].__dict__  # not ours: left alone


def test_models_without_targets_warn_unless_missing_ok():
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(RuntimeWarning, match="no Qwen2-VL"):
        hf_project.apply(plain)
    with pytest.warns(RuntimeWarning, match="no timm swin_transformer.PatchMerging"):
        timm_swin.apply(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_project.apply(plain, missing_ok=True)
        timm_swin.apply(plain, missing_ok=True)
        hf_project.remove(plain)
        timm_swin.remove(plain)


def test_not_applied_warnings_point_at_the_users_call():
    # through the public patchers (two vtok_fast frames deep) and a feature module directly
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(RuntimeWarning, match="no CLIPVisionEmbeddings") as record:
        vtok_fast.patch.hf(plain, fuse_project=False)
    with pytest.warns(RuntimeWarning, match="no timm swin_transformer.PatchMerging") as direct:
        timm_swin.apply(plain)
    for w in (*record, *direct):
        assert w.filename == __file__, (w.filename, str(w.message))
