"""``vtok_fast.patch.hf(model, tome_r=...)``: ToMe merging in Hugging Face CLIP / SigLIP vision
towers and the LLaVA vision tower, against a hand-written reference encoder built from the
reference ToMe functions with proportional attention written out (tiny random-init models)."""
import pytest
import torch
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel)

import vtok_fast.patch
from vtok_fast.patch import hf_tome
from vtok_fast.reduce.tome_reference import bipartite_soft_matching, merge_source, merge_wavg, parse_r
from vtok_fast.patch import tome_state
from helpers import assert_close

IMG = 64  # 8x8 patches of 8 pixels
TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
             image_size=IMG, patch_size=8)


def _clip(impl="eager"):
    return CLIPVisionModel(CLIPVisionConfig(**TOWER, attn_implementation=impl)).eval()


def _siglip(impl="eager"):
    return SiglipVisionModel(SiglipVisionConfig(**TOWER, attn_implementation=impl)).eval()


def reference_encoder(tower, pixels, sched, class_token, prop_attn=True):
    """(hidden states incl. the embeddings, size, source matrix [B, N, N0]) of ToMe on an
    unpatched tower: attention with ``+ log(size)`` on the keys, merge between attention and MLP."""
    h = tower.embeddings(pixels)
    if hasattr(tower, "pre_layrnorm"):
        h = tower.pre_layrnorm(h)
    hidden, size, source = [h], None, None
    for layer, r in zip(tower.encoder.layers, sched):
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        batch, n, dim = x.shape

        def heads(t):
            return t.view(batch, n, attn.num_heads, attn.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        h = h + attn.out_proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, n, dim))
        if r > 0:
            merge, _ = bipartite_soft_matching(k.mean(dim=1), r, class_token=class_token)
            source = merge_source(merge, h, source)
            h, size = merge_wavg(merge, h, size)
        h = h + layer.mlp(layer.layer_norm2(h))
        hidden.append(h)
    return hidden, size, source


def _check_info(model, expected_size, source):
    info = tome_state(model).last
    assert torch.equal(info.size, expected_size)
    one_hot = torch.nn.functional.one_hot(info.source_map, expected_size.shape[1]).transpose(1, 2)
    assert torch.equal(one_hot.to(source.dtype), source)


@pytest.mark.parametrize("build", [_clip, _siglip], ids=["clip", "siglip"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_r0_equals_unpatched(build, impl):
    model = build(impl)
    pixels = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True)
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=0)
        actual = model(pixels, output_hidden_states=True)
    assert_close(actual.last_hidden_state, expected.last_hidden_state, reduction=64)
    assert_close(actual.pooler_output, expected.pooler_output, reduction=64)
    for a, e in zip(actual.hidden_states, expected.hidden_states, strict=True):
        assert_close(a, e, reduction=64)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_clip_matches_reference(impl):
    model = _clip(impl)
    pixels = torch.randn(2, 3, IMG, IMG)
    r = (12, -1)
    sched = parse_r(3, r)
    with torch.no_grad():
        hidden, size, source = reference_encoder(model, pixels, sched, class_token=True)
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=r, trace_source=True)
        out = model(pixels, output_hidden_states=True)
        pooled = model.post_layernorm(hidden[-1][:, 0])
    assert [h.shape[1] for h in out.hidden_states] == [65, 41, 29, 29]
    for a, e in zip(out.hidden_states, hidden, strict=True):
        assert_close(a, e, reduction=64)
    assert_close(out.pooler_output, pooled, reduction=64)
    assert tome_state(model).last.schedule == tuple(sched)
    _check_info(model, size, source)


def test_siglip_matches_reference_and_pools_by_size():
    model = _siglip("sdpa")
    pixels = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        hidden, size, source = reference_encoder(model, pixels, [8, 8, 8], class_token=False)
        last = model.post_layernorm(hidden[-1])
        # the pooling head on the tokens expanded back (a token holding s patches counts s times)
        pooled = model.head(source.transpose(1, 2) @ last)
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=8, trace_source=True)
        out = model(pixels)
    assert out.last_hidden_state.shape == (2, 64 - 24, 64)
    assert_close(out.last_hidden_state, last, reduction=64)
    assert_close(out.pooler_output, pooled, reduction=64)
    _check_info(model, size, source)


def test_prop_attn_off_matches_reference():
    model = _clip()
    pixels = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        hidden = reference_encoder(model, pixels, [8, 8, 8], class_token=True, prop_attn=False)[0]
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=8, prop_attn=False)
        assert_close(model(pixels).last_hidden_state, hidden[-1], reduction=64)


def test_output_attentions_have_merged_lengths():
    model = _clip("eager")
    vtok_fast.patch.hf(model, fuse_embed=False, tome_r=10)
    with torch.no_grad():
        out = model(torch.randn(1, 3, IMG, IMG), output_attentions=True)
    assert [a.shape[-1] for a in out.attentions] == [65, 55, 45]


def test_r_change_and_unpatch():
    model = _siglip()
    pixels = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        expected = model(pixels)
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=4)
        assert model(pixels).last_hidden_state.shape[1] == 64 - 12
        model.r = [16]
        assert model(pixels).last_hidden_state.shape[1] == 64 - 16
        vtok_fast.patch.unpatch(model)
        actual = model(pixels)
    assert torch.equal(actual.pooler_output, expected.pooler_output)
    assert not hasattr(model, "r") and not hasattr(model, "_tome_state")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_clip_model_patches_only_the_vision_tower():
    config = CLIPConfig(text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, vocab_size=50),
                        vision_config=CLIPVisionConfig(**TOWER), projection_dim=16)
    model = CLIPModel(config).eval()
    pixels, ids = torch.randn(2, 3, IMG, IMG), torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids).pooler_output
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=8)
        image = model.get_image_features(pixel_values=pixels)
        assert torch.equal(model.get_text_features(input_ids=ids).pooler_output, text)
    assert image.last_hidden_state.shape == (2, 65 - 24, 64) and image.pooler_output.shape == (2, 16)


def test_encoder_attention_mask_is_refused_while_merging():
    model = _clip()
    vtok_fast.patch.hf(model, fuse_embed=False, tome_r=4)
    embeds = torch.randn(1, 65, 64)
    with pytest.raises(ValueError, match="attention_mask"):
        model.encoder(inputs_embeds=embeds, attention_mask=torch.zeros(1, 1, 65, 65))


@pytest.mark.parametrize("build", [_clip, _siglip], ids=["clip", "siglip"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("r", [0, 4])
def test_empty_batch(build, impl, r, backend):
    """An empty batch gives empty outputs with the merged lengths (transformers' own attention
    reshapes with -1 and fails on 0 elements; the patched layers do not)."""
    model = build(impl)
    vtok_fast.patch.hf(model, fuse_embed=False, tome_r=r, trace_source=True)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(0, 3, IMG, IMG), output_hidden_states=True)
    prefix = int(build is _clip)
    lengths = [64 + prefix - k * r for k in range(4)]
    assert [tuple(h.shape) for h in out.hidden_states] == [(0, n, 64) for n in lengths]
    assert out.pooler_output.shape == (0, 64)
    assert tome_state(model).last.source_map.shape == (0, 64 + prefix)
    if r:
        assert tome_state(model).last.size.shape == (0, lengths[-1], 1)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module .*got NoneType"):
        vtok_fast.patch.hf(None, tome_r=4)


def test_not_a_vision_model_warns():
    with pytest.warns(RuntimeWarning, match="no CLIPVisionModel or SiglipVisionModel"):
        vtok_fast.patch.hf(torch.nn.Linear(2, 2), fuse_embed=False, tome_r=4)


def _llava(strategy="default"):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63,
                         vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_tower_returns_fewer_image_tokens(strategy):
    model = _llava(strategy)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        original = model.get_image_features(pixel_values=pixels).pooler_output
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=3)
        count = hf_tome.llava_image_token_count(model)
        features = model.get_image_features(pixel_values=pixels).pooler_output
        # 16 patches + CLS -> 14 -> 11 at vision_feature_layer=-2, minus CLS for "default"
        assert count == (10 if strategy == "default" else 11)
        assert [f.shape for f in features] == [(count, 32)] * 2
        ids = torch.tensor([[1, 2] + [63] * count + [3, 4]] * 2)
        logits = model(input_ids=ids, pixel_values=pixels).logits
        assert logits.shape == (2, count + 4, 64)
        stale = torch.tensor([[1] + [63] * original[0].shape[0]] * 2)  # the unmerged count no longer fits
        with pytest.raises(ValueError, match="image_token_count.*configure_processor"):
            model(input_ids=stale, pixel_values=pixels)
        vtok_fast.patch.unpatch(model)
        for a, e in zip(model.get_image_features(pixel_values=pixels).pooler_output, original, strict=True):
            assert torch.equal(a, e)


def test_llava_image_token_count_needs_a_patched_llava():
    with pytest.raises(ValueError, match="not patched"):
        hf_tome.llava_image_token_count(_llava())
    clip = _clip()
    vtok_fast.patch.hf(clip, fuse_embed=False, tome_r=2)
    with pytest.raises(ValueError, match="LLaVA"):
        hf_tome.llava_image_token_count(clip)


@pytest.mark.parametrize("make", [_clip, _siglip])
def test_merged_layers_run_the_bias_attention_kernel(make, triton_backend, monkeypatch):
    """With an sdpa model on the Triton path, layers after the first merge run
    ``vtok_fast.attention`` with the size bias (the interpreter on CPU), equal to the reference."""
    calls = []
    real = hf_tome.attention

    def spy(q, k, v, *, key_bias=None, scale=None):
        calls.append(tuple(q.shape))
        return real(q, k, v, key_bias=key_bias, scale=scale)

    monkeypatch.setattr(hf_tome, "attention", spy)
    model = make("sdpa")
    pixels = torch.randn(2, 3, IMG, IMG)
    class_token = make is _clip
    with torch.no_grad():
        hidden, _, _ = reference_encoder(model, pixels, [4, 4, 4], class_token)
        expected = hidden[-1] if class_token else model.post_layernorm(hidden[-1])  # SigLIP's last norm
        vtok_fast.patch.hf(model, fuse_embed=False, tome_r=4)
        out = model(pixel_values=pixels).last_hidden_state
    assert len(calls) == 2
    assert_close(out, expected, reduction=64)
