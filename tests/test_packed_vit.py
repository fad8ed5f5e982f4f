"""PackedViT: a timm ViT on packed adaptive tokens. An all-fine image gives the unpatched model's
output; mixed lengths never attend across images; the attention implementations agree."""
import pytest
import timm
import torch
import torch.nn.functional as F

from vtok_fast.encode.packed_vit import PackedViT, attention_impl, packed_attention

MEAN, STD = (0.5, 0.4, 0.45), (0.25, 0.2, 0.3)
# fp32 through two small blocks: a few ulps of the logits' scale per matmul / softmax
RTOL, ATOL = 1e-5, 1e-5


def tiny_vit(**kwargs):
    args = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def _images(batch, side, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=gen)


def _normalized(images):
    x = images.float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("kwargs", [
    {},  # CLS token, table covering it, token pool
    dict(reg_tokens=2, no_embed_class=True, global_pool="avg", class_token=False, fc_norm=True),
    dict(reg_tokens=1, global_pool="avgmax"),
    dict(qk_norm=True, init_values=0.1, global_pool="max"),
])
def test_all_fine_image_equals_the_unpatched_model(kwargs, torch_backend):
    torch.manual_seed(0)
    model = tiny_vit(**kwargs)
    with torch.no_grad():  # random non-zero prefix / table (timm inits some at zero)
        for t in (model.cls_token, model.reg_token, model.pos_embed):
            if t is not None:
                t.normal_()
    wrapper = PackedViT(model)
    images = _images(2, 64)
    packed = wrapper.tokenize(images, thresholds=[0.0], mean=MEAN, std=STD)  # nothing coarsens
    assert packed.counts.tolist() == [model.num_prefix_tokens + 16] * 2
    with torch.no_grad():
        got = wrapper(packed)
        expected = model(_normalized(images))
        features = wrapper.forward_features(packed).to_padded()[0]
        expected_features = model.forward_features(_normalized(images))
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(features, expected_features, rtol=RTOL, atol=ATOL)


def test_another_image_size_resamples_the_table(torch_backend):
    model = tiny_vit(dynamic_img_size=True)
    images = _images(1, 96)
    with torch.no_grad():
        got = PackedViT(model)(PackedViT(model).tokenize(images, thresholds=[0.0], mean=MEAN, std=STD))
        expected = model(_normalized(images))
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_sequences_do_not_attend_across_images(torch_backend):
    model = tiny_vit()
    images = _images(3, 64, seed=1)
    images[1] = 30  # flat: coarse tokens, a shorter sequence
    images[2, :, :32] = 200
    wrapper = PackedViT(model)
    packed = wrapper.tokenize(images, thresholds=[4.5], mean=MEAN, std=STD)
    assert len(set(packed.counts.tolist())) == 3
    with torch.no_grad():
        features = wrapper.forward_features(packed).tokens
        bounds = packed.cu_seqlens.tolist()
        for b in range(3):  # each sequence alone through the model's blocks, as a batch of one
            alone = model.norm(model.blocks(packed.tokens[None, bounds[b]: bounds[b + 1]]))[0]
            torch.testing.assert_close(features[bounds[b]: bounds[b + 1]], alone, rtol=RTOL, atol=ATOL)
        logits = wrapper(packed)
    assert logits.shape == (3, 7)


@pytest.mark.parametrize("impl", ["loop", "padded"])
def test_attention_implementations_agree(impl):
    gen = torch.Generator().manual_seed(2)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    q, k, v = (torch.randn(total, 2, 8, generator=gen) for _ in range(3))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    got = packed_attention(q, k, v, cu, max(lengths), impl=impl)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):  # float64 softmax attention per sequence
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), k[s:e].double()) / 8 ** 0.5
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e].double())
        torch.testing.assert_close(got[s:e].double(), expected, rtol=1e-5, atol=1e-6)
    assert attention_impl(q) == "loop"
    with pytest.raises(ValueError, match="impl must be one of"):
        packed_attention(q, k, v, cu, 9, impl="nested")


def test_bad_models_and_modes():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        PackedViT(torch.nn.Linear(2, 2))
    wrapper = PackedViT(tiny_vit(drop_path_rate=0.1)).train()
    packed = wrapper.tokenize(_images(1, 64), thresholds=[0.0])
    with pytest.raises(RuntimeError, match="DropPath"):
        wrapper(packed)
    assert wrapper.eval()(packed).shape == (1, 7)  # identity in eval mode
    no_pool = PackedViT(tiny_vit(global_pool=""))
    with pytest.raises(ValueError, match="no global pool"):
        no_pool(no_pool.tokenize(_images(1, 64), thresholds=[0.0]))


def test_bad_images_and_tokens_get_named_errors():
    wrapper = PackedViT(tiny_vit())
    for shape in [(1, 3, 1, 1), (1, 3, 8, 64), (2, 3, 64, 31)]:  # under one 32-px patch (2 scales)
        with pytest.raises(ValueError, match=r"images must be at least the largest patch \(32x32"):
            wrapper.tokenize(torch.zeros(shape, dtype=torch.uint8), thresholds=[0.0])
    with pytest.raises(ValueError, match=r"images must be at least the largest patch \(16x16"):
        wrapper.tokenize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), num_scales=1, thresholds=[])
    with pytest.raises(ValueError, match="images must be"):
        wrapper.tokenize(torch.zeros(3, 64, 64, dtype=torch.uint8), thresholds=[0.0])
    packed = wrapper.tokenize(_images(1, 64), thresholds=[0.0])
    narrow = packed.with_tokens(torch.zeros(packed.tokens.shape[0], 5))
    for call in (wrapper, wrapper.forward_features):
        with pytest.raises(ValueError, match=r"packed.tokens must have width embed_dim = 48 \(the model's\), "
                                             r"got shape \(17, 5\)"):
            call(narrow)
    with pytest.raises(ValueError, match="features.tokens must have width embed_dim = 48"):
        wrapper.pool(narrow)
    with pytest.raises(TypeError, match="packed must be a PackedTokens, got Tensor"):
        wrapper(packed.tokens)


def test_gradients_reach_the_model(torch_backend):
    model = tiny_vit().train()
    wrapper = PackedViT(model)
    out = wrapper(wrapper.tokenize(_images(2, 64, seed=3), thresholds=[4.5]))
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert model.patch_embed.proj.weight.grad is not None and model.pos_embed.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_packed_vit(dtype):
    # fp16: FlashAttention's varlen kernel (when this PyTorch has it); fp32: padded + key mask
    model = tiny_vit().cuda().to(dtype)
    wrapper = PackedViT(model)
    images = _images(3, 64, seed=4).cuda()
    images[1] = 30
    packed = wrapper.tokenize(images, thresholds=[4.5], mean=MEAN, std=STD)
    q = packed.tokens.new_empty(1, 3, 16)
    assert attention_impl(q) in (("varlen", "padded") if dtype == torch.float16 else ("padded",))
    with torch.no_grad():
        features = wrapper.forward_features(packed).tokens
        bounds = packed.cu_seqlens.tolist()
        # fp16 rounds every op to 2**-11 relative; two blocks chain ~20 of them on O(1) values.
        # fp32 on a GPU may use TF32-free but differently ordered reductions: a few 1e-5.
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=RTOL, atol=1e-4)
        for b in range(3):
            alone = model.norm(model.blocks(packed.tokens[None, bounds[b]: bounds[b + 1]]))[0]
            torch.testing.assert_close(features[bounds[b]: bounds[b + 1]], alone, **tol)
