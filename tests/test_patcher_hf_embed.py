"""``vtok_fast.patch.hf`` fused patch embedding: parity with unpatched Hugging Face towers.

Tiny random-init CLIP / SigLIP vision models and a LLaVA model with a tiny Llama text model
(no downloads). References are float64 copies of the unpatched models; fp32 outputs are compared
at fp32 resolution with the conv's reduction length K = C * p * p.
"""
import copy
import warnings

import pytest
import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel)

import vtok_fast.patch as vpatch
from helpers import assert_close

PATCH = 14
K = 3 * PATCH * PATCH
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
             patch_size=PATCH)
IMAGE_TOKEN = 63


def clip(device):
    return CLIPVisionModel(CLIPVisionConfig(**TOWER)).to(device).eval()


def siglip(device):
    return SiglipVisionModel(SiglipVisionConfig(**TOWER)).to(device).eval()


def llava(device):
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).to(device).eval()


TOWERS = {"clip": clip, "siglip": siglip}
# (H, W, interpolate_pos_encoding): the native size, and a second non-square size with remainder
# pixels whose table comes from HF's own interpolate_pos_encoding.
SIZES = [(28, 28, False), (45, 56, True)]


@pytest.mark.parametrize("height, width, interpolate", SIZES)
@pytest.mark.parametrize("kind", list(TOWERS))
def test_tower_fp32_parity(kind, height, width, interpolate, backend, device):
    model = TOWERS[kind](device)
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 3, height, width, device=device)
    with torch.no_grad():
        want_tokens = ref.embeddings(x.double(), interpolate_pos_encoding=interpolate)
        want = ref(x.double(), interpolate_pos_encoding=interpolate)
        vpatch.hf(model)
        assert "forward" in model.embeddings.__dict__, "embeddings were not patched"
        # HF casts the pixels to the weight dtype itself: float64 pixels into the fp32 model.
        tokens = model.embeddings(x.double(), interpolate_pos_encoding=interpolate)
        got = model(x, interpolate_pos_encoding=interpolate)
    assert tokens.dtype == torch.float32
    assert_close(tokens, want_tokens, dtype=torch.float32, reduction=K)
    assert_close(got.last_hidden_state, want.last_hidden_state, dtype=torch.float32, reduction=K)
    assert_close(got.pooler_output, want.pooler_output, dtype=torch.float32, reduction=K)


def test_llava_vision_tower_parity(backend, device):
    model = llava(device)
    ref = copy.deepcopy(model).double()
    pixels = torch.randn(1, 3, 28, 28, device=device)
    # 28 px / patch 14 = 4 patch tokens; the default strategy drops CLS, so 4 image tokens.
    input_ids = torch.tensor([[1, 2] + [IMAGE_TOKEN] * 4 + [3, 4]], device=device)
    with torch.no_grad():
        want = ref(input_ids=input_ids, pixel_values=pixels.double()).logits
        vpatch.hf(model)
        assert "forward" in model.model.vision_tower.embeddings.__dict__
        got = model(input_ids=input_ids, pixel_values=pixels).logits
    assert_close(got, want, dtype=torch.float32, reduction=K)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("interpolate", [False, True])
@pytest.mark.parametrize("kind", list(TOWERS))
def test_autocast_parity(kind, interpolate, amp, device):
    """Same dtype as the original under autocast with fp32 parameters: the conv returns the
    autocast dtype, ``cat`` with the fp32 class embedding (CLIP) and ``+`` the fp32 table promote.

    Default backend only: the Triton interpreter cannot run bf16 dots (triton-notes.md).
    """
    model = TOWERS[kind](device)
    ref = copy.deepcopy(model).double()
    height, width = (45, 56) if interpolate else (28, 28)
    x = torch.randn(2, 3, height, width, device=device)
    with torch.no_grad():
        want = ref.embeddings(x.double(), interpolate_pos_encoding=interpolate)
        with torch.autocast(device.type, dtype=amp):
            original = model.embeddings(x, interpolate_pos_encoding=interpolate)
            original_out = model(x, interpolate_pos_encoding=interpolate).last_hidden_state
            vpatch.hf(model)
            tokens = model.embeddings(x, interpolate_pos_encoding=interpolate)
            out = model(x, interpolate_pos_encoding=interpolate).last_hidden_state
    assert tokens.dtype == original.dtype == torch.float32
    assert out.dtype == original_out.dtype
    # Both are amp-rounded approximations of the float64 tokens (K-term products of amp-rounded
    # pixels and weights, fp32 accumulation) and differ from each other by the summation order
    # and where the one amp rounding falls (conv result vs table): amp resolution * sqrt(K) * |y|.
    assert_close(original, want, dtype=amp, reduction=K)
    assert_close(tokens, want, dtype=amp, reduction=K)
    assert_close(tokens, original, dtype=amp, reduction=K)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_llava_vision_tower_autocast_parity(amp, device):
    """The LLaVA tower's embeddings and the model's logits keep the original's dtypes under autocast."""
    model = llava(device)
    pixels = torch.randn(1, 3, 28, 28, device=device)
    input_ids = torch.tensor([[1, 2] + [IMAGE_TOKEN] * 4 + [3, 4]], device=device)
    tower = model.model.vision_tower
    with torch.no_grad(), torch.autocast(device.type, dtype=amp):
        original = tower.embeddings(pixels)
        original_logits = model(input_ids=input_ids, pixel_values=pixels).logits
        vpatch.hf(model)
        tokens = tower.embeddings(pixels)
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
    assert tokens.dtype == original.dtype == torch.float32
    assert logits.dtype == original_logits.dtype == amp
    # as in test_autocast_parity: one amp rounding apart, over K-term sums
    assert_close(tokens, original, dtype=amp, reduction=K)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_gradients_match(kind, backend, device):
    model = TOWERS[kind](device)
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 45, 56, device=device)
    ref(x.double(), interpolate_pos_encoding=True).last_hidden_state.square().sum().backward()
    vpatch.hf(model)
    model(x, interpolate_pos_encoding=True).last_hidden_state.square().sum().backward()
    want = dict(ref.named_parameters())
    for name, param in model.embeddings.named_parameters(prefix="embeddings"):
        # The weight gradient sums over all B*N patch rows after the whole network's backward.
        assert_close(param.grad, want[name].grad, dtype=torch.float32, reduction=K * x.shape[0],
                     msg=f"gradient of {name}")


def test_wrong_size_without_interpolation_raises_like_clip(device):
    model = clip(device)
    vpatch.hf(model)
    with pytest.raises(ValueError, match="doesn't match model"):
        model(torch.randn(1, 3, 42, 42, device=device))


def test_state_dict_unchanged_patch_twice_and_unpatch(device):
    model = llava(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(1, 3, 28, 28, device=device)
    tower = model.model.vision_tower
    with torch.no_grad():
        original = tower(pixels).last_hidden_state
        vpatch.hf(model)
        vpatch.hf(model)  # harmless
        vpatch.hf(tower)  # the tower inside is already patched: also harmless
        assert len(tower.embeddings.__dict__["_vtok_fast_patches"]) == 1
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert_close(tower(pixels).last_hidden_state, original, dtype=torch.float32, reduction=K)
        vpatch.unpatch(model)
        assert "forward" not in tower.embeddings.__dict__
        assert "_vtok_fast_patches" not in tower.embeddings.__dict__
        assert torch.equal(tower(pixels).last_hidden_state, original)
        vpatch.unpatch(model)  # no-op on an unpatched model


def test_unfusable_embedding_warns_once_and_keeps_forward(device):
    class PaddedConv(torch.nn.Conv2d):
        def forward(self, x):
            return super().forward(torch.nn.functional.pad(x, (1, 1, 1, 1)))

    model = siglip(device)
    old = model.embeddings.patch_embedding
    model.embeddings.patch_embedding = PaddedConv(3, 32, PATCH, stride=PATCH).to(device)
    model.embeddings.patch_embedding.load_state_dict(old.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vpatch.hf(model)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "embeddings" in message and "PaddedConv" in message and "\n" not in message
    assert "forward" not in model.embeddings.__dict__


def test_model_without_supported_embeddings_warns():
    with pytest.warns(RuntimeWarning, match="no CLIPVisionEmbeddings or SiglipVisionEmbeddings"):
        vpatch.hf(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_torch_compile_fullgraph_embeddings(device):
    model = clip(device)
    x = torch.randn(1, 3, 45, 56, device=device)
    with torch.no_grad():
        want = model.embeddings(x, interpolate_pos_encoding=True)
        vpatch.hf(model)
        compiled = torch.compile(model.embeddings, fullgraph=True, backend="aot_eager")
        assert_close(compiled(x, interpolate_pos_encoding=True), want, dtype=torch.float32, reduction=K)
