"""Drop-in fused projectors of issue 21 (``vtok_fast.project.vlm_projectors``) against the
transformers classes they replace: strict ``state_dict`` loading both ways, then forward and every
gradient (input and each parameter) against a float64 copy of the original, on the PyTorch path
and on the Triton kernels (interpreter); fp16 on the Triton path for the new kernel modes.

Tolerances (``helpers.assert_close``): the dtype's resolution relative, plus an absolute part
growing with the square root of the longest reduction on the path (the widest GEMM ``K``; for
gradients also the number of rows and output features they sum over)."""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import assert_close
from vtok_fast.project import vlm_projectors as vp

TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=64)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Non-trivial weights: matrices scaled by 1 / sqrt(fan-in), norm weights around 1 (Gemma's
    ``1 + w`` ones around 0), biases around 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if "mm_input" not in name
                        else torch.randn_like(p) / p.shape[0] ** 0.5)
            elif "norm" in name and name.endswith("weight") and "mm_soft" not in name:
                p.copy_(1 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return module


def qwen2_5_vl():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
    return Qwen2_5_VLPatchMerger(dim=24, context_dim=16), vp.Qwen25VLPatchMerger(24, 16), [torch.randn(24, 16)], 64


def _qwen3(post):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger
    config = Qwen3VLVisionConfig(hidden_size=16, out_hidden_size=24, spatial_merge_size=2)
    return (Qwen3VLVisionPatchMerger(config, use_postshuffle_norm=post), vp.Qwen3VLPatchMerger(config, post),
            [torch.randn(24, 16)], 64)


def gemma3():
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    config = Gemma3Config(vision_config=dict(VISION, image_size=32, patch_size=4), text_config=dict(TEXT, head_dim=12),
                          mm_tokens_per_image=4)
    # 8 x 8 patches pooled 4 x 4 -> 2 x 2 tokens; a shifted mean checks the pooled statistics
    return Gemma3MultiModalProjector(config), vp.Gemma3Projector(config), [torch.randn(2, 64, 16) + 1.0], 16


def _connector(kind, scale):
    if kind == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Connector
    else:
        from transformers import SmolVLMConfig as Config
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector as Connector
    config = Config(vision_config=dict(VISION), text_config=dict(TEXT), scale_factor=scale)
    return Connector(config), vp.PixelShuffleConnector(config), [torch.randn(2, 36, 16)], 16 * scale ** 2


def llama4():
    from transformers.models.llama4.configuration_llama4 import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionPixelShuffleMLP
    config = Llama4VisionConfig(hidden_size=16, intermediate_size=64, projector_input_dim=32,
                                projector_output_dim=32, pixel_shuffle_ratio=0.5, projector_dropout=0.0)
    return Llama4VisionPixelShuffleMLP(config), vp.Llama4PixelShuffleMLP(config), [torch.randn(2, 16, 16)], 64


def mistral3():
    from transformers import Mistral3Config
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
    config = Mistral3Config(vision_config=dict(VISION, patch_size=4, head_dim=8),
                            text_config=dict(TEXT, rms_norm_eps=1e-5), spatial_merge_size=2)
    # three images: 4 x 6, 2 x 2 and 3 x 3 patches (an odd grid: unfold drops the last row / column)
    sizes = torch.tensor([[16, 24], [8, 8], [12, 12]])
    return (Mistral3MultiModalProjector(config), vp.Mistral3Projector(config), [torch.randn(37, 16), sizes], 64)


def glm4v():
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionPatchMerger
    return (Glm4vVisionPatchMerger(dim=16, context_dim=32, hidden_act="silu", bias=True),
            vp.Glm4vPatchMerger(16, 32, "silu", bias=True), [torch.randn(12, 16)], 32)


def _aya(kind):
    if kind == "aya":
        from transformers import AyaVisionConfig as Config
        from transformers.models.aya_vision.modeling_aya_vision import AyaVisionMultiModalProjector as Projector
        text = dict(TEXT, model_type="cohere2")
    else:
        from transformers import Cohere2VisionConfig as Config
        from transformers.models.cohere2_vision.modeling_cohere2_vision import (
            Cohere2VisionMultiModalProjector as Projector)
        text = dict(TEXT, model_type="cohere2")
    config = Config(vision_config=dict(VISION, model_type="siglip_vision_model"), text_config=text,
                    downsample_factor=2, alignment_intermediate_size=40)
    return Projector(config), vp.AyaProjector(config, layer_norm=kind == "aya"), [torch.randn(2, 36, 16)], 64


CASES = {
    "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": lambda: _qwen3(False), "qwen3_vl_deepstack": lambda: _qwen3(True),
    "gemma3": gemma3, "idefics3": lambda: _connector("idefics3", 2), "smolvlm_s3": lambda: _connector("smolvlm", 3),
    "llama4": llama4, "mistral3": mistral3, "glm4v": glm4v, "aya_vision": lambda: _aya("aya"),
    "cohere2_vision": lambda: _aya("cohere2"),
}


def build(name):
    orig, ours, inputs, reduction = CASES[name]()
    _randomize(orig)
    ours.load_state_dict(orig.state_dict(), strict=True)
    return orig.eval(), ours.eval(), inputs, reduction


def _inputs(inputs, dtype=None, grad=False):
    return [t.detach().to(dtype or t.dtype).requires_grad_(grad) if t.is_floating_point() else t for t in inputs]


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_loads_strictly_both_ways(name):
    orig, ours, *_ = build(name)
    assert set(ours.state_dict()) == set(orig.state_dict())
    fresh = CASES[name]()[0]
    fresh.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_float64(name, backend):
    orig, ours, inputs, reduction = build(name)
    ref = copy.deepcopy(orig).double()
    x, x64 = _inputs(inputs, grad=True), _inputs(inputs, torch.float64, grad=True)
    out, want = ours(*x), ref(*x64)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert_close(out, want.detach(), dtype=torch.float32, reduction=reduction, msg=f"{name} output")
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    reduction = max(reduction, out.numel() // out.shape[-1], out.shape[-1])
    assert_close(x[0].grad, x64[0].grad, dtype=torch.float32, reduction=reduction, msg=f"{name} input grad")
    theirs = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        assert p.grad is not None, key
        assert_close(p.grad, theirs[key].grad, dtype=torch.float32, reduction=reduction, msg=f"{name} grad {key}")


@pytest.mark.parametrize("name", ["gemma3", "qwen3_vl_deepstack", "aya_vision", "mistral3", "idefics3"])
def test_fp16_triton_forward(name, triton_backend):
    # fp16 weights and tokens: fp32 statistics and accumulation, the normalized operand rounded to
    # fp16 before the product (as the originals' fp16 norm outputs are)
    orig, ours, inputs, reduction = build(name)
    ref = copy.deepcopy(orig).double()
    ours.half()
    with torch.no_grad():
        out = ours(*_inputs(inputs, torch.float16))
        want = ref(*_inputs(inputs, torch.float64))
    assert out.dtype == torch.float16
    assert_close(out, want, dtype=torch.float16, reduction=reduction, msg=name)


def test_glm4v_downsample_is_the_vision_models_code(backend):
    # Glm4vVisionModel.forward: post_layernorm, view(-1, s, s, C), permute NCHW, Conv2d(k=s, stride=s)
    from transformers.models.glm4v.modeling_glm4v import Glm4vRMSNorm
    norm, conv = _randomize(Glm4vRMSNorm(16, eps=1e-5)), _randomize(nn.Conv2d(16, 24, kernel_size=2, stride=2))
    x = torch.randn(20, 16, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    n64, c64 = copy.deepcopy(norm).double(), copy.deepcopy(conv).double()
    want = c64(n64(x64).view(-1, 2, 2, 16).permute(0, 3, 1, 2)).view(-1, 24)
    out = vp.glm4v_downsample(x, norm, conv)
    assert_close(out, want.detach(), dtype=torch.float32, reduction=64)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    assert_close(x.grad, x64.grad, dtype=torch.float32, reduction=64)
    assert_close(conv.weight.grad, c64.weight.grad, dtype=torch.float32, reduction=64)
    assert_close(norm.weight.grad, n64.weight.grad, dtype=torch.float32, reduction=64)


def test_llama4_dropout_trains_like_the_original():
    orig, ours, inputs, _ = build("llama4")
    ours.mlp.dropout = orig.mlp.dropout = 0.5
    ours.train()
    orig.train()
    torch.manual_seed(1)
    a = ours(inputs[0])
    torch.manual_seed(1)
    b = orig(inputs[0])
    assert_close(a, b.detach().double(), dtype=torch.float32, reduction=64)


def test_gemma3_rejects_a_grid_the_pool_cannot_tile():
    from transformers import Gemma3Config
    config = Gemma3Config(vision_config=dict(VISION, image_size=36, patch_size=4), text_config=dict(TEXT, head_dim=12),
                          mm_tokens_per_image=4)
    with pytest.raises(ValueError, match="mm_tokens_per_image=4 must pool the 9x9 patch grid"):
        vp.Gemma3Projector(config)


def test_connector_rejects_a_non_square_sequence():
    _, ours, _, _ = build("idefics3")
    with pytest.raises(ValueError, match="image_hidden_states must hold a square grid of tokens, got 35"):
        ours(torch.randn(1, 35, 16))
