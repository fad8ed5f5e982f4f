"""``vtok_fast.patch.hf_fastv``: FastV in the language model of a tiny random-weight LLaVA, against a
straightforward reference: an unpatched copy with eager attention, run layer by layer without a
cache, that reads the last token's attention row at layer K-1 and drops the image tokens."""
import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

from helpers import same_generations
from test_patcher_hf_compress import (IMAGE_TOKEN, assert_state_equal, offline_processor, prompts, state,
                                      tiny_llava)
from vtok_fast.patch import hf_compress, hf_fastv

K, R = 2, 0.5  # 4 decoder layers: layers 2 and 3 run pruned; 8 of the 16 image tokens are kept
# fp32 SDPA (patched) against eager attention (reference): the two order the softmax sums
# differently, a few ulp per layer over 4 layers of width 32.
ATOL = RTOL = 1e-5
# The last-token scores of the two paths differ by ~1e-8 (fp32, 20-odd keys); a kept token may
# trail a dropped one by at most this much (a near-tie in random weights can go either way).
SCORE_TOL = 1e-6


def _decoder_inputs(model, input_ids, pixel_values, attention_mask):
    llava = model.model
    embeds = llava.get_input_embeddings()(input_ids)
    features = torch.cat(llava.get_image_features(pixel_values=pixel_values).pooler_output)
    hidden = embeds.masked_scatter((input_ids == IMAGE_TOKEN)[..., None], features)
    real = attention_mask.bool()
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(~real, 0)  # what generate passes
    return hidden, real, positions


def _mask_and_rope(lm, hidden, real, positions, index):
    """Additive causal + padding mask and RoPE for the rows at original positions ``index``."""
    allowed = (index[:, None, :] <= index[:, :, None]) & real.gather(1, index)[:, None, :]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    return mask, lm.rotary_emb(hidden, positions.gather(1, index))


def reference_scores(model, input_ids, pixel_values, attention_mask, layer):
    """``(B, N)``: the attention each image token gets from the last real token at ``layer - 1``,
    read off the eager attention map (mean over heads), as the official FastV code does."""
    lm = model.model.language_model
    hidden, real, positions = _decoder_inputs(model, input_ids, pixel_values, attention_mask)
    batch, length = input_ids.shape
    index = torch.arange(length).expand(batch, length)
    last = torch.where(real, index, -1).max(dim=1).values
    mask, cos_sin = _mask_and_rope(lm, hidden, real, positions, index)
    for decoder_layer in lm.layers[:layer - 1]:
        hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=cos_sin)
    attn_layer = lm.layers[layer - 1]
    _, weights = attn_layer.self_attn(attn_layer.input_layernorm(hidden), position_embeddings=cos_sin,
                                      attention_mask=mask)
    row = weights[torch.arange(batch), :, last].mean(dim=1)  # (B, L)
    return row.gather(1, (input_ids == IMAGE_TOKEN).nonzero()[:, 1].view(batch, -1))


def reference_logits(model, input_ids, pixel_values, attention_mask, layer, prompt_kept, prompt_length=None):
    """Logits ``(B, L', V)`` of the unpatched eager ``model`` when layers ``>= layer`` see only the
    prompt positions ``prompt_kept`` ``(B, L')`` (and every token after ``prompt_length``, the
    generated ones), with their original position ids; no cache."""
    lm = model.model.language_model
    hidden, real, positions = _decoder_inputs(model, input_ids, pixel_values, attention_mask)
    batch, length = input_ids.shape
    index = torch.arange(length).expand(batch, length)
    for i, decoder_layer in enumerate(lm.layers):
        if i == layer:
            index = torch.cat([prompt_kept, torch.arange(prompt_length or length, length).expand(batch, -1)], dim=1)
            hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        mask, cos_sin = _mask_and_rope(lm, hidden, real, positions, index)
        hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=cos_sin)
    return model.lm_head(lm.norm(hidden))


def check_selection(info, input_ids, scores, ratio):
    """The patched model's scores equal the reference's and its kept image tokens are a top-k of
    them (``round(N (1 - R))``, up to ``SCORE_TOL`` at a near-tie); every text token is kept, in order."""
    torch.testing.assert_close(info["scores"], scores, atol=SCORE_TOL, rtol=0)
    image = input_ids == IMAGE_TOKEN
    batch, num_image = scores.shape
    keep = round(num_image * (1 - ratio))
    image_positions = image.nonzero()[:, 1].view(batch, -1)
    chosen = (image_positions[:, :, None] == info["image_kept"][:, None, :]).any(dim=2)  # (B, N)
    assert bool((chosen.sum(dim=1) == keep).all())
    if 0 < keep < num_image:
        lowest_kept = scores.masked_fill(~chosen, float("inf")).amin(dim=1)
        highest_dropped = scores.masked_fill(chosen, -float("inf")).amax(dim=1)
        assert bool((lowest_kept >= highest_dropped - SCORE_TOL).all())
    expected = (~image).scatter(1, info["image_kept"], True).nonzero()[:, 1].view(batch, -1)
    assert torch.equal(info["kept"], expected)


def patched_and_reference(text="llama", strategy="default"):
    model = tiny_llava(strategy, text=text, impl="sdpa")
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    return model, reference


@pytest.mark.parametrize("text", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_the_reference(batch, text):
    model, reference = patched_and_reference(text)
    inputs = prompts(offline_processor(), batch)  # B=2: the first prompt is left-padded
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
    steps = 4
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=[IMAGE_TOKEN])  # random weights: keep generated ids text
    prompt_length = inputs["input_ids"].shape[1]
    info = model._fastv_info
    with torch.no_grad():
        scores = reference_scores(reference, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], K)
        check_selection(info, inputs["input_ids"], scores, R)
        assert info["image_kept"].shape == (batch, 8)
        logits = reference_logits(reference, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                  K, info["kept"])[:, -1]
        torch.testing.assert_close(out.logits[0], logits, atol=ATOL, rtol=RTOL)
        for step in range(1, steps):  # decoding on the pruned cache
            sequence = out.sequences[:, :prompt_length + step]
            mask = torch.cat([inputs["attention_mask"], torch.ones(batch, step, dtype=torch.long)], dim=1)
            logits = reference_logits(reference, sequence, inputs["pixel_values"], mask, K, info["kept"],
                                      prompt_length)[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=ATOL, rtol=RTOL)
        unpruned = reference(**inputs).logits[:, -1]
    assert not torch.allclose(out.logits[0], unpruned, atol=1e-3)  # pruning changed the answer


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_forward_matches_the_reference_with_padding(padding_side):
    model, reference = patched_and_reference()
    inputs = prompts(offline_processor(padding_side=padding_side))
    hf_fastv.apply(model, compress=("fastv", {"layer": 1, "ratio": 0.75}))
    info = model._fastv_info
    with torch.no_grad():
        out = model(**inputs)
        scores = reference_scores(reference, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 1)
        check_selection(info, inputs["input_ids"], scores, 0.75)
        logits = reference_logits(reference, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                  1, info["kept"])
    assert info["kept"].shape == (2, inputs["input_ids"].shape[1] - 12)
    assert logits.shape[:2] == info["kept"].shape
    last = torch.where(inputs["attention_mask"].bool(), torch.arange(inputs["attention_mask"].shape[1]), -1).amax(1)
    row = (info["kept"] == last[:, None]).long().argmax(dim=1)  # the last real token among the kept ones
    assert padding_side == "right" or bool((row == info["kept"].shape[1] - 1).all())
    rows = torch.arange(2)
    torch.testing.assert_close(out.logits[rows, row], logits[rows, row], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_scores_from_either_attention_scores_path(path, monkeypatch):
    """The last-token scores go through ``attention_scores``: its Triton kernel (the interpreter
    here) and its PyTorch path both give the eager reference's scores and selection."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", path)
    model, reference = patched_and_reference()
    inputs = prompts(offline_processor())
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
    with torch.no_grad():
        out = model(**inputs).logits[:, -1]
        scores = reference_scores(reference, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], K)
        check_selection(model._fastv_info, inputs["input_ids"], scores, R)
        logits = reference_logits(reference, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                  K, model._fastv_info["kept"])[:, -1]
    torch.testing.assert_close(out, logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_ratio_zero_equals_the_unpatched_model(impl):
    model = tiny_llava(impl=impl)
    inputs = prompts(offline_processor())
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**inputs, **kwargs)
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": 0.0}))
    got = model.generate(**inputs, **kwargs)
    same_generations(got, expected)  # the same computation on the same rows
    assert model._fastv_info["kept"].shape == inputs["input_ids"].shape


def test_kept_tokens_keep_their_position_ids():
    model = tiny_llava()
    inputs = prompts(offline_processor())
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
    lm = model.model.language_model
    seen = []
    handle = lm.layers[K].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["position_ids"], kwargs["position_embeddings"])),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    finally:
        handle.remove()
    (position_ids, (cos, sin)), = seen
    kept = model._fastv_info["kept"]
    original = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0).gather(1, kept)
    assert torch.equal(position_ids, original)
    expected_cos, expected_sin = lm.rotary_emb(cos, original)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert bool((original.diff(dim=1) > 1).any())  # there are gaps where image tokens were dropped


def test_decoding_with_an_explicit_cache_and_inputs_embeds():
    model = tiny_llava()
    inputs = prompts(offline_processor())
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate numbers them
        first = model(**inputs, position_ids=positions, cache=cache, use_cache=True)
        length = inputs["input_ids"].shape[1]
        assert cache.get_seq_length(0) == length and cache.get_seq_length(K) == length - 8
        step = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        position = mask.sum(dim=1, keepdim=True) - 1
        second = model(input_ids=step, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
        generated = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(generated.logits[1], second.logits[:, -1], atol=ATOL, rtol=RTOL)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"],
                          attention_mask=inputs["attention_mask"], position_ids=positions)
    torch.testing.assert_close(by_embeds.logits[:, -1], first.logits[:, -1], atol=ATOL, rtol=RTOL)
    assert model._fastv_info["kept"].shape == (2, length - 8)
    cache.reset()  # a reused cache is a fresh prefill
    with torch.no_grad():
        again = model(**inputs, position_ids=positions, cache=cache, use_cache=True)
    torch.testing.assert_close(again.logits, first.logits, atol=ATOL, rtol=RTOL)


def test_beam_search_and_sampling_run():
    model = tiny_llava()
    inputs = prompts(offline_processor())
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
    beams = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    sampled = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=True, top_k=5)
    assert beams.shape == sampled.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_with_vision_compression_and_remove_restores_exactly():
    model, processor = tiny_llava(), offline_processor()
    inputs = prompts(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
    before = state(model)
    hf_compress.apply(model, compress=("pool", {"stride": 2}))
    hf_compress.configure_processor(processor, model)
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
    hf_compress.apply(model, compress=("fastv", {"layer": 1, "ratio": 0.5}))  # re-applying replaces
    assert model._fastv_info["layer"] == 1
    pooled = prompts(processor)
    out = model.generate(**pooled, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, pooled["input_ids"].shape[1] + 2)
    assert model._fastv_info["image_kept"].shape == (2, 2)  # 4 pooled image tokens, half kept
    hf_fastv.remove(model)
    hf_compress.remove(model)
    assert_state_equal(before, state(model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_text_only_prompts_are_not_pruned():
    model = tiny_llava()
    ids = torch.tensor([[4, 5, 7, 6, 5]])
    expected = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    hf_fastv.apply(model, compress="fastv")
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=3, do_sample=False), expected)
    assert model._fastv_info["kept"] is None


def test_unsupported_models_and_arguments(monkeypatch):
    model = tiny_llava()
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    with monkeypatch.context() as patched:  # a release whose layers still take past_key_values
        patched.setattr(LlamaDecoderLayer, "forward", lambda self, hidden_states, past_key_values=None: None)
        with pytest.raises(ValueError, match=r"transformers .* is installed, but this patch follows transformers "
                                             r"5\.24-5\.25 .*LlamaDecoderLayer\.forward takes no attention_mask, "
                                             r"position_ids, cache, use_cache, position_embeddings"):
            hf_fastv.apply(model, compress="fastv")
    with pytest.raises(ValueError, match="layer must be an int in \\[1, 3\\]"):
        hf_fastv.apply(model, compress=("fastv", {"layer": 0}))
    with pytest.raises(ValueError, match="layer must be an int in \\[1, 3\\]"):
        hf_fastv.apply(model, compress=("fastv", {"layer": 4}))
    for ratio in (1.5, 1, -0.1):  # [0, 1), as the budget counts it
        with pytest.raises(ValueError, match=r"ratio must be the fraction of image tokens pruned, in \[0, 1\)"):
            hf_fastv.apply(model, compress=("fastv", {"ratio": ratio}))
    with pytest.raises(TypeError, match="fastv takes layer= and ratio=, got keep"):
        hf_fastv.apply(model, compress=("fastv", {"keep": 3}))
    with pytest.raises(ValueError, match="hf_fastv handles"):
        hf_fastv.apply(model, compress="pool")
    with pytest.raises(ValueError, match="the language model is Qwen3Model; FastV supports LlamaModel"):
        hf_fastv.apply(tiny_llava(text="qwen3"), compress="fastv")  # q/k norms: not the Llama attention
    with pytest.raises(ValueError, match="sliding-window attention"):
        hf_fastv.apply(tiny_llava(text="mistral", sliding_window=64), compress="fastv")
    model.model.language_model.layers[1].forward = lambda *a, **k: None  # someone else's patch
    with pytest.raises(ValueError, match=r"layers\[1\] is not an unpatched LlamaDecoderLayer"):
        hf_fastv.apply(model, compress="fastv")
    assert "_vtok_fast_patches" not in model.model.__dict__


def test_unsupported_inputs_get_clear_errors():
    model = tiny_llava()
    inputs = prompts(offline_processor())
    hf_fastv.apply(model, compress="fastv")
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == IMAGE_TOKEN).nonzero()[0, 0]] = 7  # row 0 loses an image token
    with pytest.raises(ValueError, match="same number of image tokens in every row"):
        model(input_ids=ids, attention_mask=inputs["attention_mask"])
    ids = torch.tensor([[4, 5] + [IMAGE_TOKEN] * 16])
    with pytest.raises(ValueError, match="must be a text token"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"][:1])
    one = {k: v[1:] for k, v in inputs.items()}
    with pytest.raises(ValueError, match="DynamicCache"):
        model(**one, cache=StaticCache(config=model.config.text_config, max_cache_len=64), use_cache=True)
    with pytest.raises(ValueError, match="2-D"):
        model(**{**one, "attention_mask": one["attention_mask"][:, None, None, :].bool()})
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation in \\('sdpa', 'eager'\\)"):
        model(**one)


def _labels(inputs):
    """Causal-LM labels of the prompts: the text tokens after the first; image and padding
    positions ignored (so no padding row, whose logits are arbitrary, is scored)."""
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    labels[torch.arange(labels.shape[0]), inputs["attention_mask"].argmax(dim=1)] = -100
    return labels.masked_fill(inputs["attention_mask"] == 0, -100)


def test_labels_are_aligned_to_the_kept_positions():
    """With ``labels=`` the loss scores each kept position against the token after it in the
    prompt (its target without pruning), as the eager reference's logits of those rows do."""
    model, reference = patched_and_reference()
    inputs = prompts(offline_processor())
    labels = _labels(inputs)
    hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        kept = model._fastv_info["kept"]
        logits = reference_logits(reference, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                  K, kept)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].gather(1, kept)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert out.logits.shape[:2] == kept.shape
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=RTOL)
    as_tuple = model(**inputs, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss, atol=0, rtol=0)


def test_labels_with_nothing_pruned_give_the_unpatched_loss():
    model = tiny_llava()
    inputs = prompts(offline_processor())
    labels = _labels(inputs)
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss
        hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": 0.0}))
        assert torch.equal(model(**inputs, labels=labels).loss, expected)
        text = {"input_ids": torch.tensor([[4, 5, 7, 6, 5]])}  # no image: no pruning
        hf_fastv.remove(model)
        plain = model(**text, labels=text["input_ids"]).loss
        hf_fastv.apply(model, compress=("fastv", {"layer": K, "ratio": R}))
        assert torch.equal(model(**text, labels=text["input_ids"]).loss, plain)
