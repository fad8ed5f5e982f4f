"""``vtok_fast.patch.tome_state``: one typed state for timm and HF ToMe patches."""
import dataclasses

import pytest
import timm
import torch

import vtok_fast
from vtok_fast.patch import ToMeResult, ToMeState, tome_state


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3,
                             num_classes=10).eval()


def _tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=64, patch_size=16)
    return CLIPVisionModel(config).eval()


@pytest.mark.parametrize("library", ["timm", "hf"])
def test_same_fields_for_timm_and_hf(library, torch_backend):
    model = _tiny_vit() if library == "timm" else _tiny_clip()
    getattr(vtok_fast.patch, library)(model, fuse_embed=False, tome_r=4, trace_source=True)
    state = tome_state(model)
    assert isinstance(state, ToMeState) and isinstance(state.last, ToMeResult)
    assert state.last == ToMeResult()  # nothing ran yet
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64)) if library == "timm" else model(pixel_values=torch.randn(2, 3, 64, 64))
    last = tome_state(model).last
    assert last.schedule == (4, 4, 4)
    assert last.size.shape == (2, 17 - 12, 1) and last.source_map.shape == (2, 17)
    assert int(last.size.sum()) == 2 * 17
    assert [f.name for f in dataclasses.fields(ToMeResult)] == ["schedule", "size", "source_map"]


def test_settings_are_kept_apart_from_results(torch_backend):
    model = _tiny_vit()
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=4)
    state = tome_state(model)
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=2, prop_attn=False, trace_source=True)
    assert tome_state(model) is state and not state.prop_attn and state.trace_source and model.r == 2
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert state.last.schedule == (2, 2, 2) and state.last.source_map is not None


def test_unpatched_model_raises():
    with pytest.raises(ValueError, match="not patched for ToMe"):
        tome_state(_tiny_vit())


def test_repr_shows_shapes_not_values(torch_backend):
    model = _tiny_vit()
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=4, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    text = repr(tome_state(model))
    assert "\n" not in text and len(text) < 300 and "tensor(" not in text
    assert "size=Tensor(2, 5, 1) float32" in text and "source_map=Tensor(2, 17) int64" in text
    assert text.startswith("ToMeState(prop_attn=True, trace_source=True") and "schedule=(4, 4, 4)" in text
    assert repr(ToMeResult()) == "ToMeResult(schedule=(), size=None, source_map=None)"
