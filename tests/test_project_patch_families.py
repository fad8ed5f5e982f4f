"""``vtok_fast.patch.hf_project`` on the issue-21 families.

Whole tiny models (``vtok_fast.bench.vlm_zoo``: random weights, each family's own transformers
processor built offline) of Qwen3-VL (final merger + deepstack mergers), Gemma 3, Idefics3, SmolVLM
and, from the zoo's ``EXTRA_FAMILIES``, Llama 4 (the vision adapter's pixel-shuffle MLP, tiles +
global tile), Mistral 3 (RMS norm + per-image patch merger over ``image_sizes``), GLM-4V (the merger
after the downsampling conv, ``image_grid_thw`` + ``mm_token_type_ids``), Aya Vision and Cohere2
Vision (pixel shuffle + (LayerNorm) + SwiGLU over tiles): logits of the patched model equal the
float64 unpatched model's at fp32 resolution (and the projector's weights perturbed by 0.1 % move
them past that tolerance: the comparison sees the projector); ``remove`` restores the exact logits,
the ``state_dict`` and every module's class and ``forward``. The five extra families stay out of
``vlm_zoo.FAMILIES`` (which tests/test_vlm_zoo.py iterates).

The projector-level test hands the module itself to the patcher with every weight and bias
random (the whole models keep transformers' small init) and covers what the zoo's processors never
produce: Mistral 3 images with an odd patch grid (``unfold`` drops the last row / column), GLM-4V's
merger with biases; and ``apply`` raises no warning.
"""
import copy
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import test_project_families as families
import vtok_fast.patch.hf_project as hf_project
from helpers import assert_close, tolerances
from vtok_fast.bench import vlm_zoo

# family -> the class patched inside its whole tiny model
WHOLE = {"qwen3_vl": "Qwen3VLVisionPatchMerger", "gemma3": "Gemma3MultiModalProjector",
         "idefics3": "Idefics3Connector", "smolvlm": "SmolVLMConnector",
         "llama4": "Llama4VisionPixelShuffleMLP", "mistral3": "Mistral3MultiModalProjector",
         "glm4v": "Glm4vVisionPatchMerger", "aya_vision": "AyaVisionMultiModalProjector",
         "cohere2_vision": "Cohere2VisionMultiModalProjector"}
# the widest reduction on the logits' path: the projectors' K (Qwen3-VL, Llama 4, Mistral 3, Aya: 4C = 128)
# and the text MLPs' (128), with room
REDUCTION = 256
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


def _whole(family):
    """The tiny model (norms randomized), its inputs for one 96 x 96 image, and a float64 copy."""
    model = _randomize_norms(vlm_zoo.tiny(family))
    batch = dict(vlm_zoo.inputs(family, [_image()], [vlm_zoo.prompt(family)]))
    return model, batch, copy.deepcopy(model).double()


def _tolerance(want):
    """The absolute part of ``assert_close(..., dtype=torch.float32, reduction=REDUCTION)`` on ``want``."""
    return tolerances(torch.float32, REDUCTION, max(float(want.abs().max()), 1.0))[1]


@pytest.mark.parametrize("family", list(WHOLE))
def test_whole_model_logits_unchanged_and_unpatch_restores(family, backend):
    model, batch, ref = _whole(family)
    classes = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = ref(**_float64(batch)).logits
        before = model(**batch).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a module left unfused warns
            hf_project.apply(model)
        targets = [m for m in model.modules() if type(m).__name__ == WHOLE[family]]
        assert targets and all("forward" in m.__dict__ for m in targets), "not patched"
        fused = model(**batch).logits
        hf_project.remove(model)
        after = model(**batch).logits
    deepstack = getattr(model.config.vision_config, "deepstack_visual_indexes", [])  # Qwen3-VL's
    assert len(targets) == 1 + len(deepstack)
    assert_close(fused, want, dtype=torch.float32, reduction=REDUCTION)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert _patched(model) == []
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("family", list(WHOLE))
def test_whole_model_logits_see_the_projector(family):
    # each weight of the patched modules scaled by 1 + 1e-3 * N(0, 1) moves the float64 logits by
    # more than the absolute tolerance above (5x for Aya Vision, >= 30x for the others): a projector
    # computed wrong cannot hide behind the rest of the model
    _, batch, ref = _whole(family)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        want = ref(**_float64(batch)).logits
        for module in ref.modules():
            if type(module).__name__ == WHOLE[family]:
                for p in module.parameters():
                    p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        moved = (ref(**_float64(batch)).logits - want).abs().max()
    assert moved > _tolerance(want), f"{family}: {float(moved):.3g}"


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
    for family, name in WHOLE.items():  # a model of a known model_type is searched for its classes only
        kinds = hf_project._supported_kinds(types.SimpleNamespace(config=vlm_zoo.tiny_config(family)))
        assert [cls.__name__ for cls, _ in kinds] == [name], family


def test_zoo_extra_families_are_whole_models_outside_the_iterated_table():
    # tests/test_vlm_zoo.py iterates vlm_zoo.FAMILIES: the extra families stay out of it; their
    # placeholders are the features the model makes (Llama 4: get_image_features on the top model)
    assert set(vlm_zoo.EXTRA_FAMILIES) == set(MODULE_LEVEL) and not set(vlm_zoo.FAMILIES) & set(MODULE_LEVEL)
    for family in MODULE_LEVEL:
        model = vlm_zoo.tiny(family)
        batch = vlm_zoo.inputs(family, [_image(), _image(40)], [vlm_zoo.prompt(family)] * 2)
        assert type(model).__name__ == vlm_zoo.EXTRA_FAMILIES[family].model_class
        assert batch["pixel_values"].dtype == torch.float32
        rows = sum(feature.shape[0] for feature in vlm_zoo.image_features(model, batch))
        assert int(vlm_zoo.image_token_count(model, batch).sum()) == rows > 0, family
        with pytest.raises(KeyError, match="no real-width config"):
            vlm_zoo.real_width(family)


def test_unfusable_config_keeps_its_module_with_one_warning():
    orig, *_ = families.build("aya_vision")
    orig.act = torch.nn.Tanh()
    with pytest.warns(RuntimeWarning) as caught:
        hf_project.apply(orig)
    assert "forward" not in orig.__dict__
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "activation Tanh is not one the fused epilogue computes" in messages[0]
