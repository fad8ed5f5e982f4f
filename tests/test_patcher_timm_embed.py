"""``vtok_fast.patch.timm`` fused patch embedding: parity with the unpatched timm models.

Models are random-init timm ViTs shrunk to one block (no downloads). References are float64
copies of the unpatched model; fp32 outputs are compared at fp32 resolution with the conv's
reduction length K = C * ph * pw.
"""
import copy
import warnings

import pytest
import timm
import torch

import vtok_fast.patch as vpatch
from helpers import assert_close

# id -> (timm name, constructor kwargs, image (H, W))
MODELS = {
    "vit_b16": ("vit_base_patch16_224", dict(img_size=32), (32, 32)),
    "vit_b16_remainder_pixels": ("vit_base_patch16_224", dict(img_size=(36, 40)), (36, 40)),
    "clip_l14_336_no_bias": ("vit_large_patch14_clip_336", dict(img_size=28), (28, 28)),
    "clip_b16_pre_norm": ("vit_base_patch16_clip_224", dict(img_size=32), (32, 32)),
    "dinov2_reg4_no_embed_class": ("vit_small_patch14_reg4_dinov2", dict(img_size=28), (28, 28)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32), (32, 32)),
    "no_class_token": ("vit_base_patch16_224", dict(img_size=32, class_token=False, global_pool="avg"), (32, 32)),
    "no_pos_embed": ("vit_base_patch16_224", dict(img_size=32, pos_embed="none"), (32, 32)),
    # dynamic_img_size: run at a second, non-square resolution (the table goes through timm's resampler)
    "dynamic_vit_b16": ("vit_base_patch16_224", dict(img_size=32, dynamic_img_size=True), (48, 64)),
    "dynamic_dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, dynamic_img_size=True), (42, 56)),
    "dynamic_deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, dynamic_img_size=True), (64, 48)),
}


def build(key, device, **extra):
    name, kwargs, hw = MODELS[key]
    model = timm.create_model(name, pretrained=False, depth=1, embed_dim=64, num_heads=2, num_classes=8,
                              **kwargs, **extra)
    return model.to(device).eval(), hw


def reduction(model):
    w = model.patch_embed.proj.weight
    return w[0].numel()

# The interpreter takes ~0.5 s per fused call: the Triton backend runs one model per distinct
# argument combination (bias or not, prefix layout, table coverage, no table, resampled table).
TRITON_MODELS = ["vit_b16_remainder_pixels", "clip_l14_336_no_bias", "dinov2_reg4_no_embed_class",
                 "deit_distilled", "no_class_token", "no_pos_embed", "dynamic_vit_b16"]
PARITY_CASES = [("torch", key) for key in MODELS] + [("triton", key) for key in TRITON_MODELS]


def embed(model, x):
    return model._pos_embed(model.patch_embed(x))


@pytest.mark.parametrize("backend_name, key", PARITY_CASES)
def test_fp32_parity(backend_name, key, request, device):
    request.getfixturevalue(f"{backend_name}_backend")
    model, hw = build(key, device)
    x = torch.randn(2, 3, *hw, device=device)
    ref = copy.deepcopy(model).double()
    x64 = x.double()
    K = reduction(model)
    with torch.no_grad():
        want_tokens = embed(ref, x64)
        want_features = ref.forward_features(x64)
        want_final, want_inter = ref.forward_intermediates(x64, indices=1)
        vpatch.timm(model)
        assert "_pos_embed" in model.__dict__, "model was not patched"
        assert_close(embed(model, x), want_tokens, dtype=torch.float32, reduction=K)
        assert_close(model.forward_features(x), want_features, dtype=torch.float32, reduction=K)
        final, inter = model.forward_intermediates(x, indices=1)
        assert_close(final, want_final, dtype=torch.float32, reduction=K)
        assert_close(inter[0], want_inter[0], dtype=torch.float32, reduction=K)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("key", ["vit_b16", "dinov2_reg4_no_embed_class", "deit_distilled", "dynamic_vit_b16",
                                 "no_pos_embed"])
def test_autocast_parity(key, amp, device):
    """Under autocast the original's conv returns the autocast dtype; ``cat`` / ``+ pos`` with the
    fp32 prefix and table promote to fp32 (no prefix and no table: the autocast dtype stays).

    Default backend only: the Triton interpreter cannot run bf16 dots (triton-notes.md).
    """
    model, hw = build(key, device)
    x = torch.randn(2, 3, *hw, device=device)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        want = embed(ref, x.double())
        with torch.autocast(device.type, dtype=amp):
            orig_tokens = embed(model, x)
            orig_features = model.forward_features(x)
            vpatch.timm(model)
            tokens = embed(model, x)
            features = model.forward_features(x)
    has_extra = model.pos_embed is not None or model.cls_token is not None
    assert tokens.dtype == orig_tokens.dtype == (torch.float32 if has_extra else amp)
    assert features.dtype == orig_features.dtype
    # Both are amp-rounded approximations of the float64 tokens (K-term products of amp-rounded
    # pixels and weights, fp32 accumulation) and differ from each other by the summation order
    # and where the one amp rounding falls (conv result vs table): amp resolution * sqrt(K) * |y|.
    K = reduction(model)
    assert_close(orig_tokens, want, dtype=amp, reduction=K)
    assert_close(tokens, want, dtype=amp, reduction=K)
    assert_close(tokens, orig_tokens, dtype=amp, reduction=K)


@pytest.mark.parametrize("key", ["dinov2_reg4_no_embed_class", "deit_distilled", "clip_b16_pre_norm"])
def test_gradients_match(key, backend, device):
    model, hw = build(key, device)
    x = torch.randn(2, 3, *hw, device=device)
    ref = copy.deepcopy(model).double()
    ref(x.double()).square().sum().backward()
    vpatch.timm(model)
    model(x).square().sum().backward()
    want = dict(ref.named_parameters())
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "reg_token",
                 "dist_token"):
        param = dict(model.named_parameters()).get(name)
        if param is None:
            continue
        # The weight gradient sums over all B*N patch rows after the whole network's backward.
        assert_close(param.grad, want[name].grad, dtype=torch.float32, reduction=reduction(model) * x.shape[0],
                     msg=f"gradient of {name}")


def test_train_mode_keeps_pos_drop_and_patch_drop(device):
    """Same RNG stream, same dropout masks: pos_drop and patch_drop still run after the fused op."""
    model, hw = build("dinov2_reg4_no_embed_class", device, pos_drop_rate=0.5, patch_drop_rate=0.5)
    model.train()
    x = torch.randn(2, 3, *hw, device=device)
    with torch.no_grad():
        torch.manual_seed(1)
        want = model.forward_features(x)
        vpatch.timm(model)
        torch.manual_seed(1)
        got = model.forward_features(x)
    assert got.shape == want.shape
    assert_close(got, want, dtype=torch.float32, reduction=reduction(model))


def test_state_dict_and_parameters_unchanged(device):
    model, _ = build("dinov2_reg4_no_embed_class", device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    vpatch.timm(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert [id(p) for p in model.parameters()] == params


def test_patch_twice_then_unpatch_restores_original(device):
    model, hw = build("deit_distilled", device)
    x = torch.randn(1, 3, *hw, device=device)
    with torch.no_grad():
        original = model(x)
        vpatch.timm(model)
        vpatch.timm(model)  # harmless
        assert len(model.__dict__["_vtok_fast_patches"]) == 1
        assert_close(model(x), original, dtype=torch.float32, reduction=reduction(model))
        vpatch.unpatch(model)
        assert "_pos_embed" not in model.__dict__
        assert "forward" not in model.patch_embed.__dict__
        assert "_vtok_fast_patches" not in model.__dict__
        assert torch.equal(model(x), original)  # the original code path again, bit for bit
        vpatch.unpatch(model)  # no-op on an unpatched model
        vpatch.timm(model)  # and it can be patched again
        assert "_pos_embed" in model.__dict__
        assert_close(model(x), original, dtype=torch.float32, reduction=reduction(model))


def test_deepcopy_of_patched_model_is_independent(device):
    model, hw = build("vit_b16", device)
    vpatch.timm(model)
    clone = copy.deepcopy(model)
    assert clone._pos_embed.__self__ is clone
    assert clone.patch_embed.forward.__self__ is clone.patch_embed
    vpatch.unpatch(clone)
    assert "_pos_embed" in model.__dict__ and "_pos_embed" not in clone.__dict__


@pytest.mark.parametrize("extra, reason", [
    (dict(embed_norm_layer="layernorm"), "patch_embed.norm is LayerNorm"),
    (dict(dynamic_img_pad=True), "dynamic_img_pad"),
])
def test_unfusable_model_warns_once_and_keeps_forward(extra, reason, device):
    model, hw = build("vit_b16", device, **extra)
    x = torch.randn(1, 3, *hw, device=device)
    with torch.no_grad():
        original = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vpatch.timm(model)
        assert len(caught) == 1 and reason in str(caught[0].message)
        assert "\n" not in str(caught[0].message)
        assert "_pos_embed" not in model.__dict__
        assert torch.equal(model(x), original)


def test_not_a_vision_transformer_warns():
    with pytest.warns(RuntimeWarning, match="not a timm VisionTransformer"):
        vpatch.timm(torch.nn.Linear(2, 2))


def test_size_checks_and_integer_pixels_raise_like_timm(device):
    model, _ = build("vit_b16", device)
    vpatch.timm(model)
    with pytest.raises(AssertionError, match="Input height"):
        model(torch.randn(1, 3, 48, 32, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device))
    dynamic, _ = build("dynamic_vit_b16", device)
    vpatch.timm(dynamic)
    with pytest.raises(AssertionError, match="divisible by patch size"):
        dynamic(torch.randn(1, 3, 40, 32, device=device))


def test_torch_compile_fullgraph(device):
    model, hw = build("dynamic_dinov2_reg4", device)
    x = torch.randn(2, 3, *hw, device=device)
    with torch.no_grad():
        want = model(x)
        vpatch.timm(model)
        compiled = torch.compile(model, fullgraph=True)
        assert_close(compiled(x), want, dtype=torch.float32, reduction=reduction(model))
