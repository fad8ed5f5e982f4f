"""``vtok_fast.patch.timm(model, tome_r=...)``: ToMe merging inside timm ViT / DeiT blocks.

The patched model is checked against a hand-written reference forward built from the reference
ToMe functions (``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``) with proportional
attention written out, on tiny random-init models: plain CLS, LayerScale + q/k norm, register
tokens, average / MAP pooling, DeiT distilled, the explicit (non-SDPA) attention path.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import vtok_fast.patch
from vtok_fast._backend import use_triton
from vtok_fast.reduce.tome_reference import bipartite_soft_matching, merge_source, merge_wavg, parse_r
from vtok_fast.patch import tome_state
from helpers import assert_close

IMG = 64  # 8x8 patches of 8 pixels: 64 patch tokens + prefix


def _vit(**kw):
    args = dict(pretrained=False, img_size=IMG, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    args.update(kw)
    name = args.pop("name", "vit_base_patch16_224")
    return timm.create_model(name, **args).eval()


def _layer_scale_qk_norm():
    model = _vit(init_values=1e-5, qk_norm=True)
    for blk in model.blocks:  # LayerScale far from identity, so dropping it would show
        nn.init.uniform_(blk.ls1.gamma, 0.5, 1.5)
        nn.init.uniform_(blk.ls2.gamma, 0.5, 1.5)
    return model


def _unfused():
    model = _vit()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


# name -> (builder, prefix rule of the reference: "cls" / "cls+dist" / "none" / ("prefix", P))
VARIANTS = {
    "cls_token_pool": (_vit, "cls"),
    "layer_scale_qk_norm": (_layer_scale_qk_norm, "cls"),
    "unfused_attention": (_unfused, "cls"),
    "reg_tokens_avg": (lambda: _vit(reg_tokens=4, class_token=False, global_pool="avg"), ("prefix", 4)),
    "cls_reg_tokens": (lambda: _vit(reg_tokens=4), ("prefix", 5)),
    "map_pool": (lambda: _vit(class_token=False, global_pool="map"), "none"),
    "avgmax_pool_no_cls": (lambda: _vit(class_token=False, global_pool="avgmax"), "none"),
    "deit_distilled": (lambda: _vit(name="deit_tiny_distilled_patch16_224"), "cls+dist"),
}


# --- the hand-written reference --------------------------------------------------------------

def _reference_merge(metric, r, rule):
    """ToMe's merge for a prefix rule. ``("prefix", P)``: tokens 0..P-1 stay in front, the rest
    is matched without protection and its kept A tokens are put back in original order."""
    if rule in ("cls", "cls+dist", "none"):
        return bipartite_soft_matching(metric, r, class_token=rule != "none", distill_token=rule == "cls+dist")[0]
    num_prefix = rule[1]
    merge_rest, _ = bipartite_soft_matching(metric[:, num_prefix:], r)
    batch, n = metric.shape[0], metric.shape[1] - num_prefix
    num_kept = (n + 1) // 2 - min(r, n // 2)
    positions = torch.arange(n, dtype=metric.dtype, device=metric.device).expand(batch, n)[..., None]
    order = merge_rest(positions, mode="amax")[:, :num_kept, 0].argsort(dim=1)

    def merge(x, mode="mean"):
        y = merge_rest(x[:, num_prefix:], mode)
        kept = y[:, :num_kept].gather(1, order[..., None].expand(-1, -1, y.shape[-1]))
        return torch.cat([x[:, :num_prefix], kept, y[:, num_kept:]], dim=1)

    return merge


def reference_forward(model, images, sched, rule, prop_attn=True):
    """(logits, token count after each block, size, source matrix [B, N, N0]) of ToMe on an
    unpatched ``model``: attention with ``+ log(size)`` on the keys, merge between attention and
    MLP, and the head applied to the tokens expanded back to the original ones (a token that
    holds ``s`` originals counts ``s`` times: size-weighted average, MAP with log-size bias)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size, source, counts = None, None, []
    for blk, r in zip(model.blocks, sched):
        attn = blk.attn
        h = blk.norm1(x)
        batch, n, dim = h.shape
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        h = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, n, dim)
        x = x + blk.ls1(attn.proj(h))
        if r > 0:
            merge = _reference_merge(k.mean(dim=1), r, rule)
            source = merge_source(merge, x, source)
            x, size = merge_wavg(merge, x, size)
        counts.append(x.shape[1])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    expanded = x if source is None else source.transpose(1, 2) @ x
    return model.forward_head(expanded), counts, size, source


def _count_tokens(model):
    counts = []
    hooks = [blk.register_forward_hook(lambda mod, args, out: counts.append(out.shape[1])) for blk in model.blocks]
    return counts, hooks


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r0_equals_unpatched(variant, device):
    model = VARIANTS[variant][0]().to(device)
    images = torch.randn(2, 3, IMG, IMG, device=device)
    with torch.no_grad():
        expected = model(images)
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=0)
        actual = model(images)
    assert_close(actual, expected, reduction=64)
    assert tome_state(model).last.size is None and tome_state(model).last.schedule == (0, 0, 0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_reference(variant, device):
    build, rule = VARIANTS[variant]
    model = build().to(device)
    images = torch.randn(2, 3, IMG, IMG, device=device)
    r = (12, -1)
    sched = parse_r(len(model.blocks), r)
    with torch.no_grad():
        expected, expected_counts, expected_size, source = reference_forward(model, images, sched, rule)
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=r, trace_source=True)
        counts, hooks = _count_tokens(model)
        actual = model(images)
    for hook in hooks:
        hook.remove()
    assert counts == expected_counts
    info = tome_state(model).last
    assert info.schedule == tuple(sched)
    assert torch.equal(info.size, expected_size)
    num_out = counts[-1]
    assert torch.equal(nn.functional.one_hot(info.source_map, num_out).transpose(1, 2).to(source.dtype), source)
    assert_close(actual, expected, reduction=64)


def test_token_counts_follow_the_schedule():
    model = _vit(depth=4)
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=20)
    counts, _ = _count_tokens(model)
    with torch.no_grad():
        model(torch.randn(1, 3, IMG, IMG))
    # 65 tokens, CLS protected: r is capped at (N - 1) // 2 in the last two layers
    assert counts == [45, 25, 13, 7]


def test_prop_attn_off_matches_reference():
    model = _vit()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = reference_forward(model, images, [8, 8, 8], "cls", prop_attn=False)[0]
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=8, prop_attn=False)
        assert_close(model(images), expected, reduction=64)


def test_gradients_match_reference():
    model = _layer_scale_qk_norm().train()  # no dropout / drop path configured: deterministic
    images = torch.randn(2, 3, IMG, IMG)
    reference_forward(model, images, [10, 10, 10], "cls")[0].square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=10)
    model(images).square().sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, expected[name], reduction=64, msg=name)


def test_r_can_change_after_patching():
    model = _vit()
    images = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        unpatched = model(images)
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=4)
        counts, _ = _count_tokens(model)
        model(images)
        model.r = [8, 0]  # list: padded with zeros
        model(images)
        model.r = (8, -1)
        model(images)
        model.r = 0
        assert_close(model(images), unpatched, reduction=64)
    assert counts[:9] == [61, 57, 53, 57, 57, 57, 49, 41, 41]
    assert tome_state(model).last.schedule == (0, 0, 0)


def test_unpatch_restores_original():
    model = _vit(reg_tokens=2, global_pool="avg")
    images = torch.randn(2, 3, IMG, IMG)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images)
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=6)
        assert model(images).shape == expected.shape
        vtok_fast.patch.unpatch(model)
        vtok_fast.patch.unpatch(model)  # a second unpatch is a no-op
        actual = model(images)
    assert torch.equal(actual, expected)
    assert not hasattr(model, "r") and not hasattr(model, "_tome_state")
    assert all("forward" not in blk.__dict__ for blk in model.blocks)
    assert "forward" not in model.blocks.__dict__ and "pool" not in model.__dict__
    assert state.keys() == model.state_dict().keys()


def test_patch_twice_updates_settings():
    model = _vit()
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=4)
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=6, trace_source=True)
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, IMG, IMG))
    assert model.r == 6 and out.shape[1] == 65 - 18
    assert tome_state(model).last.source_map.shape == (1, 65)


def test_trace_source_without_merging_is_identity():
    model = _vit()
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=0, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, IMG, IMG))
    assert torch.equal(tome_state(model).last.source_map, torch.arange(65).expand(2, 65))


def test_forward_head_needs_the_latest_features():
    model = _vit(class_token=False, global_pool="avg")
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=5)
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, IMG, IMG))
        assert model.forward_head(features).shape == (2, 10)
        with pytest.raises(ValueError, match="latest forward_features"):
            model.forward_head(features[:1])


def test_forward_intermediates_and_masked_forward_run_unmerged():
    model = _vit()
    images = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        expected = model.forward_intermediates(images, intermediates_only=True)
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=8)
        actual = model.forward_intermediates(images, intermediates_only=True)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_deepcopy_is_independent():
    model = _vit()
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=4)
    clone = copy.deepcopy(model)
    clone.r = 8
    images = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        model.forward_features(images)
        clone.forward_features(images)
    assert tome_state(model).last.schedule == (4, 4, 4) and tome_state(clone).last.schedule == (8, 8, 8)


def test_fused_embedding_and_tome_together():
    model = _vit()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=6)
        expected = model(images)
        vtok_fast.patch.unpatch(model)
        vtok_fast.patch.timm(model, fuse_embed=True, tome_r=6)
        actual = model(images)
    assert_close(actual, expected, reduction=3 * 8 * 8)


def test_bad_schedule_raises():
    model = _vit()
    with pytest.raises(TypeError, match="tome_r"):
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r="16")
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=2)
    model.r = [1.5, 2]
    with pytest.raises(TypeError, match="model.r"):
        model(torch.randn(1, 3, IMG, IMG))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("r", [0, 8])
def test_empty_batch(variant, r, backend):
    """An empty batch gives (0, num_classes), like the unpatched model."""
    model = VARIANTS[variant][0]()
    images = torch.randn(0, 3, IMG, IMG)
    with torch.no_grad():
        expected = model(images)
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=r, trace_source=True)
        actual = model(images)
    assert expected.shape == actual.shape == (0, 10)
    assert tome_state(model).last.source_map.shape[0] == 0


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module .*got NoneType"):
        vtok_fast.patch.timm(None)
    with pytest.raises(TypeError, match="model must be an nn.Module .*got str"):
        vtok_fast.patch.timm("vit_base_patch16_224", tome_r=4)


def test_unsupported_models_warn_and_stay_unpatched():
    with pytest.warns(RuntimeWarning, match="not a timm VisionTransformer"):
        linear = vtok_fast.patch.timm(nn.Linear(2, 2), fuse_embed=False, tome_r=4)
    assert not hasattr(linear, "r")
    post_norm = _vit(block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.warns(RuntimeWarning, match="ResPostBlock"):
        vtok_fast.patch.timm(post_norm, fuse_embed=False, tome_r=4)
    assert not hasattr(post_norm, "r")


def test_torch_compile_fullgraph():
    model = _vit(depth=2, reg_tokens=1, global_pool="avg")
    images = torch.randn(2, 3, IMG, IMG)
    vtok_fast.patch.timm(model, fuse_embed=False, tome_r=(8, -1), trace_source=True)
    with torch.no_grad():
        expected = model(images)
        expected_map = tome_state(model).last.source_map.clone()
        compiled = torch.compile(model, fullgraph=True)
        actual = compiled(images)
    assert_close(actual, expected, reduction=64)
    assert torch.equal(tome_state(model).last.source_map, expected_map)


def test_triton_kernels_in_the_patched_model(triton_backend, device):
    """The merge runs the Triton kernels (the interpreter on CPU) inside a patched model."""
    model = _vit(depth=2, reg_tokens=2).to(device)
    images = torch.randn(1, 3, IMG, IMG, device=device)
    assert use_triton(images)
    with torch.no_grad():
        expected = reference_forward(model, images, [8, 8], ("prefix", 3))[0]
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=8)
        actual = model(images)
    assert_close(actual, expected, reduction=64)


def test_merged_blocks_run_the_bias_attention_kernel(triton_backend, device, monkeypatch):
    """Once tokens are merged, the Triton path runs ``vtok_fast.attention`` with the size bias
    (the interpreter on CPU); the first block, before any merge, keeps plain SDPA."""
    from vtok_fast.patch import timm_tome

    calls = []
    real = timm_tome.attention

    def spy(q, k, v, *, key_bias=None, scale=None):
        calls.append(tuple(q.shape))
        return real(q, k, v, key_bias=key_bias, scale=scale)

    monkeypatch.setattr(timm_tome, "attention", spy)
    model = _vit(depth=3).to(device)
    images = torch.randn(2, 3, IMG, IMG, device=device)
    with torch.no_grad():
        expected = reference_forward(model, images, [8, 8, 8], "cls")[0]
        vtok_fast.patch.timm(model, fuse_embed=False, tome_r=8)
        actual = model(images)
    assert len(calls) == 2 and calls[0][2] == 65 - 8  # blocks 2 and 3, on the merged tokens
    assert_close(actual, expected, reduction=64)
