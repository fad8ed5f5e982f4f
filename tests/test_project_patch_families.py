"""``vtok_fast.patch.hf_project`` on the issue-21 families.

Whole tiny models (``vtok_fast.bench.vlm_zoo``: random weights, offline processors) of Qwen3-VL
(final merger + deepstack mergers), Gemma 3, Idefics3 and SmolVLM: logits of the patched model
equal the float64 unpatched model's at fp32 resolution; ``remove`` restores the exact logits,
the ``state_dict`` and every module's class and ``forward``. Llama 4, Mistral 3, GLM-4V, Aya
Vision and Cohere2 Vision are patched at the projector level (the module itself handed to the
patcher): their tiny whole models need tower-specific inputs the zoo does not build yet.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import test_project_families as families
import vtok_fast.patch.hf_project as hf_project
from helpers import assert_close
from vtok_fast.bench import vlm_zoo

WHOLE = {"qwen3_vl": "Qwen3VLVisionPatchMerger", "gemma3": "Gemma3MultiModalProjector",
         "idefics3": "Idefics3Connector", "smolvlm": "SmolVLMConnector"}
MODULE_LEVEL = ["llama4", "mistral3", "glm4v", "aya_vision", "cohere2_vision"]


def _image(side=96):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("mm_input_projection_weight"):
                p.copy_(torch.randn_like(p) / p.shape[0] ** 0.5)
    return model


def _patched(model):
    return sorted(name for name, m in model.named_modules() if "forward" in m.__dict__)


def _float64(batch):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}


@pytest.mark.parametrize("family", list(WHOLE))
def test_whole_model_logits_unchanged_and_unpatch_restores(family, backend):
    model = _randomize_norms(vlm_zoo.tiny(family))
    batch = dict(vlm_zoo.inputs(family, [_image()], [vlm_zoo.prompt(family)]))
    ref = copy.deepcopy(model).double()
    classes = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = ref(**_float64(batch)).logits
        before = model(**batch).logits
        hf_project.apply(model)
        targets = [m for m in model.modules() if type(m).__name__ == WHOLE[family]]
        assert targets and all("forward" in m.__dict__ for m in targets), "not patched"
        fused = model(**batch).logits
        hf_project.remove(model)
        after = model(**batch).logits
    if family == "qwen3_vl":
        assert len(targets) == 1 + len(model.config.vision_config.deepstack_visual_indexes)
    # the widest reduction on the logits' path: the projector's K (Qwen3: 4C = 128; Gemma: C)
    assert_close(fused, want, dtype=torch.float32, reduction=256)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert _patched(model) == []
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", MODULE_LEVEL)
def test_projector_patch_matches_and_unpatch_restores(name, backend):
    orig, _, inputs, reduction = families.build(name)
    ref = copy.deepcopy(orig).double()
    with torch.no_grad():
        before = orig(*inputs)
        want = ref(*[t.double() if t.is_floating_point() else t for t in inputs])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hf_project.apply(orig)
        assert "forward" in orig.__dict__
        fused = orig(*inputs)
        hf_project.remove(orig)
        after = orig(*inputs)
    assert_close(fused, want, dtype=torch.float32, reduction=reduction)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert "forward" not in orig.__dict__


def test_dispatch_table_names_every_family():
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava", "gemma3", "idefics3", "smolvlm", "llama4",
            "mistral3", "glm4v", "aya_vision", "cohere2_vision"} <= set(hf_project.FAMILIES)
    kinds = hf_project._supported_kinds(vlm_zoo.tiny("gemma3"))
    assert [cls.__name__ for cls, _ in kinds] == ["Gemma3MultiModalProjector"]


def test_unfusable_config_keeps_its_module_with_one_warning():
    orig, *_ = families.build("aya_vision")
    orig.act = torch.nn.Tanh()
    with pytest.warns(RuntimeWarning) as caught:
        hf_project.apply(orig)
    assert "forward" not in orig.__dict__
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "activation Tanh is not one the fused epilogue computes" in messages[0]
