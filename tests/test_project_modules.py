"""Drop-in modules of vtok_fast.project against the real ones, built from tiny configs with random
weights (no downloads): strict state_dict loading both ways, fp32 outputs and every gradient vs a
float64 copy of the original, the output dtype under autocast, and bad arguments."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from helpers import assert_close
from vtok_fast.project.modules import (MLPProjector, OpticalCompressor, PatchMerger, PixelShuffleProjector,
                                       SwinPatchMerging, activation_of, hf_activation)
from vtok_fast.project.resampler import PerceiverResampler


def _randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Random weights everywhere, so no parameter is a trivial 0 or 1: matrices and kernels scaled
    by their fan-in, 1-D weights (norm affines) around 1, biases around 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, std / math.sqrt(p[0].numel()))
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, std)
    return module


# --- the real modules and how to call them ---------------------------------------------------------------

def qwen2_vl():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Original
    orig = _randomize(Original(dim=24, context_dim=16, spatial_merge_size=2))
    return orig, PatchMerger(24, 16, 2), (torch.randn(40, 16),), {}, 4 * 16


def qwen2_5_vl():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger as Original
    orig = _randomize(Original(dim=24, context_dim=16, spatial_merge_size=2))
    return orig, PatchMerger(24, 16, 2, norm_type="rmsnorm"), (torch.randn(40, 16),), {}, 4 * 16


def _internvl_config(**kw):
    from transformers import InternVLConfig
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=[24, 24], patch_size=[4, 4])
    text = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=60, **kw)


class _InternVLShuffleProject(nn.Module):
    """What ``InternVLModel.get_image_features`` does after the tower: drop CLS, square reshape,
    ``pixel_shuffle``, ``multi_modal_projector``."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector
        self.ratio = config.downsample_ratio
        self.shuffle = InternVLModel.pixel_shuffle
        self.multi_modal_projector = InternVLMultiModalProjector(config)

    def forward(self, features):
        x = features[:, 1:]
        side = int(x.shape[1] ** 0.5)
        # explicit sizes where InternVL writes -1, which an empty batch leaves ambiguous
        x = self.shuffle(self, x.reshape(x.shape[0], side, side, x.shape[-1]), scale_factor=self.ratio)
        return self.multi_modal_projector(x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[-1]))


def internvl():
    config = _internvl_config()
    wrapper = _InternVLShuffleProject(config)
    _randomize(wrapper)
    # the projector alone is the state_dict to load; the wrapper runs shuffle + projector
    return wrapper, PixelShuffleProjector(config), (torch.randn(2, 1 + 36, 16),), {"prefix": 1}, 4 * 16


def swin(height=6, width=8):
    from timm.models.swin_transformer import PatchMerging
    orig = _randomize(PatchMerging(16, 24))
    return orig, SwinPatchMerging(16, 24), (torch.randn(2, height, width, 16),), {}, 4 * 16


def swin_odd():
    return swin(5, 7)


def _llava_config(**kw):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    return LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, num_attention_heads=2),
                       text_config=LlamaConfig(hidden_size=24, num_attention_heads=2), **kw)


def llava():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    config = _llava_config()
    return _randomize(LlavaMultiModalProjector(config)), MLPProjector(config), (torch.randn(2, 5, 16),), {}, 16


def llava_two_layers_no_bias():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    config = _llava_config(vision_feature_layer=[-2, -1], multimodal_projector_bias=False,
                           projector_hidden_act="gelu_pytorch_tanh")
    return _randomize(LlavaMultiModalProjector(config)), MLPProjector(config), (torch.randn(2, 5, 32),), {}, 32


def deepseek_ocr():
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2SamVisionConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionProj
    config = DeepseekOcr2SamVisionConfig(output_channels=8, downsample_channels=[12, 20])
    orig = _randomize(DeepseekOcr2SamVisionProj(config))
    return orig, OpticalCompressor(config), (torch.randn(2, 8, 9, 12),), {}, 9 * 12


def _perceiver(impl):
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler
    config = Idefics2PerceiverConfig(hidden_size=32, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4,
                                     resampler_head_dim=8, num_key_value_heads=2)
    config._attn_implementation = impl
    orig = _randomize(Idefics2PerceiverResampler(config))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padded inputs
    mask[2, 2:] = 0
    return orig, PerceiverResampler(config), (torch.randn(3, 7, 32), mask), {}, 4 * 32


CASES = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "internvl": internvl, "swin": swin,
         "swin_odd": swin_odd, "llava": llava, "llava_two_layers_no_bias": llava_two_layers_no_bias,
         "deepseek_ocr": deepseek_ocr, "perceiver_eager": lambda: _perceiver("eager"),
         "perceiver_sdpa": lambda: _perceiver("sdpa")}
FUSED = ["qwen2_vl", "qwen2_5_vl", "internvl", "swin", "swin_odd", "llava", "llava_two_layers_no_bias"]


def _state_dict_of(orig):
    """The real module's own state_dict (InternVL: the projector inside the test wrapper)."""
    return (orig.multi_modal_projector if isinstance(orig, _InternVLShuffleProject) else orig).state_dict()


def build(name):
    orig, ours, inputs, kw, reduction = CASES[name]()
    ours.load_state_dict(_state_dict_of(orig), strict=True)
    return orig, ours, inputs, kw, reduction


def _float_inputs(inputs, dtype=None, grad=False):
    out = []
    for t in inputs:
        if t.is_floating_point():
            t = t.detach().to(dtype or t.dtype).requires_grad_(grad)
        out.append(t)
    return out


# --- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_loads_strictly_both_ways(name):
    orig, ours, *_ = build(name)
    assert set(ours.state_dict()) == set(_state_dict_of(orig))
    target = orig.multi_modal_projector if isinstance(orig, _InternVLShuffleProject) else orig
    target.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True)
    for key, value in ours.state_dict().items():
        assert value.shape == _state_dict_of(orig)[key].shape, key


def _params(module):
    inner = module.multi_modal_projector if isinstance(module, _InternVLShuffleProject) else module
    return dict(inner.named_parameters())


def _check_parity(name):
    orig, ours, inputs, kw, reduction = build(name)
    ref = copy.deepcopy(orig).double()
    x = _float_inputs(inputs, grad=True)
    x64 = _float_inputs(inputs, torch.float64, grad=True)
    out = ours(*x, **kw)
    want = ref(*x64)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert_close(out, want.detach(), dtype=torch.float32, reduction=reduction, msg=f"{name} output")
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    rows = out.numel() // out.shape[-1]
    reduction = max(reduction, rows, out.shape[-1])  # gradients sum over rows or output features too
    assert_close(x[0].grad, x64[0].grad, dtype=torch.float32, reduction=reduction, msg=f"{name} input grad")
    theirs = _params(ref)
    for key, p in ours.named_parameters():
        assert p.grad is not None, key
        assert_close(p.grad, theirs[key].grad, dtype=torch.float32, reduction=reduction, msg=f"{name} grad {key}")


@pytest.mark.parametrize("name", FUSED)
def test_fused_modules_match_the_originals(name, backend):
    _check_parity(name)


@pytest.mark.parametrize("name", ["deepseek_ocr", "perceiver_eager", "perceiver_sdpa"])
def test_unfused_modules_match_the_originals(name):
    _check_parity(name)


@pytest.mark.parametrize("name", list(CASES))
def test_autocast_dtype_matches(name):
    orig, ours, inputs, kw, reduction = build(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(*inputs, **kw)
        want = orig(*inputs)
    assert out.dtype == want.dtype, (out.dtype, want.dtype)
    assert_close(out, want.double(), dtype=torch.bfloat16, reduction=reduction)


def test_perceiver_padding_is_masked():
    _, ours, (context, mask), _, _ = build("perceiver_sdpa")
    with torch.no_grad():
        full = ours(context, mask)
        assert full.shape == (3, 5, 32)  # n_latents tokens whatever L
        torch.testing.assert_close(full[2:], ours(context[2:, :2]))  # padding = shorter input
        torch.testing.assert_close(ours(context), ours(context, torch.ones(3, 7)))
        garbage = context.clone()
        garbage[1, 5:] = 1e3
        torch.testing.assert_close(ours(garbage, mask), full)


def test_perceiver_keywords_equal_config():
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    config = Idefics2PerceiverConfig(hidden_size=32, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4,
                                     resampler_head_dim=8, num_key_value_heads=2)
    a = PerceiverResampler(config)
    b = PerceiverResampler(hidden_size=32, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4,
                           resampler_head_dim=8, num_key_value_heads=2)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_keyword_construction_matches_config_construction():
    config = _internvl_config()
    a = PixelShuffleProjector(config)
    b = PixelShuffleProjector(vision_hidden_size=16, text_hidden_size=32, downsample_ratio=0.5)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    c = MLPProjector(_llava_config())
    d = MLPProjector(in_features=16, out_features=24)
    assert {k: v.shape for k, v in c.state_dict().items()} == {k: v.shape for k, v in d.state_dict().items()}
    assert OpticalCompressor().conv2.weight.shape == (1024, 512, 3, 3)  # DeepSeek-OCR: 256 -> 512 -> 1024


EMPTY_INPUTS = [(name, 0) for name in FUSED] + [("swin", 1), ("swin", 2), ("swin_odd", 2), ("llava", 1)]


@pytest.mark.parametrize("name, dim", EMPTY_INPUTS, ids=str)
def test_empty_inputs_match_the_originals(name, dim, backend):
    """An input with a zero-size dim (``dim`` 0: the batch; Swin's H or W; LLaVA's token count)
    gives what the original gives (shape and dtype; SwinPatchMerging and MLPProjector used to
    fail in a reshape), and backward gives zero gradients of the right shapes."""
    orig, ours, inputs, kw, _ = build(name)
    shape = list(inputs[0].shape)
    shape[dim] = 0
    x = torch.randn(shape, requires_grad=True)
    out, want = ours(x, **kw), orig(x)
    assert out.shape == want.shape and out.dtype == want.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape
    for key, p in ours.named_parameters():
        assert p.grad is not None and not p.grad.any(), key


def test_pixel_shuffle_projector_takes_grids():
    _, ours, (x,), _, _ = build("internvl")
    with torch.no_grad():
        want = ours(x, prefix=1)
        torch.testing.assert_close(ours(x[:, 1:].reshape(2, 6, 6, 16)), want)
        torch.testing.assert_close(ours(x[:, 1:], grid=(6, 6)), want)
    assert ours(torch.randn(1, 4 * 8, 16), grid=(4, 8)).shape == (1, 8, 32)


def test_optical_compressor_is_16x():
    oc = OpticalCompressor(in_channels=8, channels=(12, 20))
    tokens = oc.tokens(torch.randn(1, 8, 16, 16))
    assert tokens.shape == (1, 16, 20)  # 256 positions -> 16 tokens


def test_activation_names():
    from transformers.activations import ACT2FN
    for name in ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "silu", "relu"):
        fusable, act = activation_of(ACT2FN[name])
        assert fusable and act == hf_activation(name), name
        x = torch.randn(100, dtype=torch.float64)
        from vtok_fast.project.merge_project import _activation_fn
        torch.testing.assert_close(_activation_fn(act)(x), ACT2FN[name](x), rtol=1e-12, atol=1e-12)
    assert activation_of(ACT2FN["quick_gelu"]) == (False, None)
    assert activation_of(nn.ReLU(inplace=True)) == (False, None)


@pytest.mark.parametrize("make, err, words", [
    (lambda: PatchMerger(8, 4, norm_type="batch"), ValueError, "norm_type"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, downsample_ratio=0.4), ValueError,
     "downsample_ratio must be 1/s"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4), ValueError, "text_hidden_size"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, downsample_ratio=0), ValueError,
     r"downsample_ratio must be a number in \(0, inf\), got 0"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, downsample_ratio=float("nan")),
     ValueError, r"downsample_ratio must be a number in \(0, inf\), got nan"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, downsample_ratio=-0.5), ValueError,
     r"downsample_ratio must be a number in \(0, inf\), got -0.5"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, downsample_ratio=1e-320), ValueError,
     "downsample_ratio must be 1/s"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, downsample_ratio="0.5"), TypeError,
     "downsample_ratio must be a real number, got str '0.5'"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, downsample_ratio=None), TypeError,
     "downsample_ratio must be a real number, got NoneType None"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8, projector_hidden_act="quick_gelu"),
     ValueError, "projector_hidden_act must be one of"),
    (lambda: MLPProjector(in_features=4), ValueError, "out_features"),
    (lambda: SwinPatchMerging(4, norm_layer=nn.BatchNorm1d), ValueError, "norm_layer must build an nn.LayerNorm"),
    (lambda: OpticalCompressor(channels=(8,)), ValueError, "channels must hold two"),
    (lambda: PerceiverResampler(), ValueError, "hidden_size"),
    (lambda: PerceiverResampler(hidden_size=8, resampler_n_heads=3, num_key_value_heads=2), ValueError, "multiple"),
    (lambda: SwinPatchMerging(4)(torch.randn(2, 4, 4)), ValueError, "4-D"),
    (lambda: PixelShuffleProjector(vision_hidden_size=4, text_hidden_size=8)(torch.randn(1, 12, 4)), ValueError,
     "square grid"),
    (lambda: PerceiverResampler(hidden_size=8, resampler_n_heads=2, resampler_head_dim=4,
                                num_key_value_heads=1)(torch.randn(2, 3, 8), torch.ones(2, 4)), ValueError,
     "attention_mask must be"),
    (lambda: PerceiverResampler(hidden_size=8, resampler_n_heads=2, resampler_head_dim=4,
                                num_key_value_heads=1)(torch.randn(2, 3, 6)), ValueError, "context must be"),
])
def test_bad_arguments(make, err, words):
    with pytest.raises(err, match=words):
        make()
