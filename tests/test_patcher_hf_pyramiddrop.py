"""``compress=("pyramiddrop", {...})``: FastV in stages (``vtok_fast.patch.hf_fastv`` over
``vtok_fast.patch.lm_prune``) in a tiny random-weight LLaVA of 4 decoder layers, against a
straightforward reference: an unpatched eager copy run layer by layer without a cache, that reads
the last token's attention row at each layer ``K_s - 1`` and keeps the tokens the patch kept."""
import copy

import pytest
import torch
from transformers import DynamicCache

from helpers import same_generations
from test_patcher_hf_compress import IMAGE_TOKEN, offline_processor, prompts, tiny_llava
from test_patcher_hf_fastv import ATOL, RTOL, SCORE_TOL, _decoder_inputs, _mask_and_rope
from vtok_fast import budget
from vtok_fast.patch import hf_compress, hf_fastv

LAYERS = [1, 2, 3]  # 4 decoder layers: 16 -> 8 -> 4 -> 2 image tokens


def reference(model, inputs, stages):
    """Logits ``(B, L', V)`` of the eager ``model`` when each layer ``K_s`` on sees only the prompt
    positions ``stages[s]["kept"]``, and the last token's attention row at each ``K_s - 1``
    (mean over heads, ``(B, L_s)`` over the rows there)."""
    lm = model.model.language_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    hidden, real, positions = _decoder_inputs(model, ids, inputs["pixel_values"], mask)
    batch, length = ids.shape
    index = torch.arange(length).expand(batch, length)
    last = torch.where(real, index, -1).max(dim=1).values
    boundaries = [s["layer"] for s in stages]
    rows = []
    for i, layer in enumerate(lm.layers):
        if i in boundaries:
            kept = stages[boundaries.index(i)]["kept"]
            local = (index[:, None, :] == kept[:, :, None]).long().argmax(dim=-1)
            hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))
            index = kept
        attention_mask, cos_sin = _mask_and_rope(lm, hidden, real, positions, index)
        if i + 1 in boundaries:
            _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=cos_sin,
                                         attention_mask=attention_mask)
            slot = (index == last[:, None]).long().argmax(dim=1)
            rows.append((index, weights[torch.arange(batch), :, slot].mean(dim=1)))
        hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=cos_sin)
    return model.lm_head(lm.norm(hidden)), rows


def test_every_stage_matches_the_eager_reference():
    model = tiny_llava(impl="sdpa")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    inputs = prompts(offline_processor())  # two prompts, the first left-padded
    hf_fastv.apply(model, compress=("pyramiddrop", {"layers": LAYERS, "ratio": 0.5}))
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=[IMAGE_TOKEN])
    info = model._pyramiddrop_info
    stages = info["stages"]
    assert [s["layer"] for s in stages] == LAYERS and info["ratios"] == [0.5] * 3
    assert [s["image_kept"].shape[1] for s in stages] == [8, 4, 2]
    with torch.no_grad():
        logits, rows = reference(eager, inputs, stages)
    image = inputs["input_ids"] == IMAGE_TOKEN
    for stage, (index, row) in zip(stages, rows):
        here = image.gather(1, index)  # the image tokens still there before this stage
        scores = row[here].view(2, -1)
        torch.testing.assert_close(stage["scores"], scores, atol=SCORE_TOL, rtol=0)
        positions = index[here].view(2, -1)
        chosen = (positions[:, :, None] == stage["image_kept"][:, None, :]).any(dim=2)
        lowest_kept = scores.masked_fill(~chosen, float("inf")).amin(dim=1)
        highest_dropped = scores.masked_fill(chosen, -float("inf")).amax(dim=1)
        assert bool((lowest_kept >= highest_dropped - SCORE_TOL).all())
    torch.testing.assert_close(out.logits[0], logits[:, -1], atol=ATOL, rtol=RTOL)
    assert info["kept"].shape == (2, inputs["input_ids"].shape[1] - 14)


def test_the_cache_holds_each_stages_tokens_and_decoding_matches_generate():
    model = tiny_llava()
    inputs = prompts(offline_processor())
    hf_fastv.apply(model, compress=("pyramiddrop", {"layers": LAYERS, "ratios": [0.5, 0.5, 0.5]}))
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        cache = DynamicCache(config=model.config.text_config)
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        first = model(**inputs, position_ids=positions, cache=cache, use_cache=True)
        assert [cache.get_seq_length(i) for i in range(4)] == [length, length - 8, length - 12, length - 14]
        step = generated.sequences[:, length:length + 1]  # generate's token (min_new_tokens bars EOS)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        second = model(input_ids=step, attention_mask=mask, position_ids=mask.sum(dim=1, keepdim=True) - 1,
                       cache=cache, use_cache=True)
    torch.testing.assert_close(generated.logits[0], first.logits[:, -1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(generated.logits[1], second.logits[:, -1], atol=ATOL, rtol=RTOL)


def test_one_stage_is_fastv_and_ratio_zero_is_the_unpatched_model():
    model = tiny_llava()
    inputs = prompts(offline_processor())
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**inputs, **kwargs)
    hf_fastv.apply(model, compress=("pyramiddrop", {"layers": LAYERS, "ratio": 0.0}))
    got = model.generate(**inputs, **kwargs)
    same_generations(got, expected)
    hf_fastv.apply(model, compress=("fastv", {"layer": 2, "ratio": 0.5}))
    fastv = model.generate(**inputs, **kwargs)
    hf_compress.apply(model, compress=("pyramiddrop", {"layers": [2], "ratios": [0.5]}))  # routed to hf_fastv
    assert not hasattr(model, "_fastv_info")  # re-applying replaces FastV
    staged = model.generate(**inputs, **kwargs)
    same_generations(staged, fastv)
    hf_fastv.remove(model)
    assert torch.equal(model.generate(**inputs, **kwargs).sequences, expected.sequences)


def test_default_stages_scale_with_the_depth():
    assert hf_fastv.default_layers(32) == [8, 16, 24]  # the paper's LLaVA-1.5 7B boundaries
    assert hf_fastv.default_layers(28) == [7, 14, 21]  # Qwen2-VL 7B
    assert hf_fastv.default_layers(4) == [1, 2, 3]
    assert hf_fastv.default_layers(2) == [1]
    model = tiny_llava()
    hf_fastv.apply(model, compress="pyramiddrop")
    assert model._pyramiddrop_info["layers"] == [1, 2, 3] and model._pyramiddrop_info["ratios"] == [0.5] * 3


@pytest.mark.parametrize("spec", [{"layers": [1, 2, 3], "ratio": 0.5}, {"layers": [1, 3], "ratios": [0.25, 0.75]},
                                  {"layers": [2], "ratio": 0.1}])
def test_stage_counts_are_the_budget_calculators(spec):
    """The tiny LLaVA's 16 image tokens per row, as the calculator counts 16 tokens (a 16x16 image
    of 4-px patches) with the same spec."""
    model = tiny_llava()
    inputs = prompts(offline_processor())
    hf_fastv.apply(model, compress=("pyramiddrop", spec))
    with torch.no_grad():
        model(**inputs)
    counted = budget.count_tokens("vit", (16, 16), patch_size=4, compress=("pyramiddrop", spec))
    stages = model._pyramiddrop_info["stages"]
    assert [c for _, c in counted.stages] == [16] + [s["image_kept"].shape[1] for s in stages]
    assert counted.llm_tokens == stages[-1]["image_kept"].shape[1]


def test_arguments_are_checked_at_apply():
    model = tiny_llava()
    cases = [({"layer": 2}, TypeError, "pyramiddrop takes layers=, ratios= and ratio=, got layer"),
             ({"ratio": 0.5, "ratios": [0.5]}, TypeError, "ratio= .* or ratios= .*, not both"),
             ({"layers": 2}, TypeError, "layers must be a list of ints"),
             ({"layers": []}, ValueError, r"layers must be strictly increasing ints in \[1, 3\]"),
             ({"layers": [2, 1]}, ValueError, r"layers must be strictly increasing ints in \[1, 3\]"),
             ({"layers": [0, 2]}, ValueError, r"layers must be strictly increasing ints in \[1, 3\]"),
             ({"layers": [1, 4]}, ValueError, r"layers must be strictly increasing ints in \[1, 3\]"),
             ({"layers": [1, 2.0]}, ValueError, "layers must be strictly increasing ints"),
             ({"layers": [1, 2], "ratios": 0.5}, TypeError, "ratios must be a list of fractions"),
             ({"layers": [1, 2], "ratios": [0.5]}, ValueError, r"ratios must give one fraction per stage \(2 layers\)"),
             ({"layers": [1, 2], "ratios": [0.5, 1.0]}, ValueError, r"ratios must be the fraction .* in \[0, 1\)"),
             ({"ratio": -0.1}, ValueError,
              r"pyramiddrop ratio must be the fraction of image tokens pruned, in \[0, 1\)"),
             ({"ratio": True}, ValueError, "pyramiddrop ratio must be"),
             ]
    for budget_, error, words in cases:
        with pytest.raises(error, match=words):
            hf_fastv.apply(model, compress=("pyramiddrop", budget_))
    assert "_vtok_fast_patches" not in model.model.__dict__


def test_budget_parses_pyramiddrop():
    counted = budget.count_tokens("llava-1.5", (336, 336), compress="pyramiddrop")
    assert [c for _, c in counted.stages] == [576, 288, 144, 72] and counted.llm_tokens == 72
    assert counted.notes == ()
    counted = budget.count_tokens("qwen2-vl", (336, 336), compress=("pyramiddrop", {"layers": [7, 14, 21]}))
    assert counted.stages[-1] == ("from layer 21 on", 18) and "stage from layer 7 on: 72 image tokens" in str(counted)
    with pytest.raises(ValueError, match="ratios must give one fraction per stage"):
        budget.count_tokens("llava-1.5", (336, 336), compress=("pyramiddrop", {"layers": [8, 16], "ratios": [0.5]}))
    with pytest.raises(ValueError, match="not both"):
        budget.count_tokens("llava-1.5", (336, 336), compress=("pyramiddrop", {"ratio": 0.5, "ratios": [0.5]}))
    with pytest.raises(ValueError, match=r"must be numbers in \[0, 1\)"):
        budget.count_tokens("llava-1.5", (336, 336), compress="pyramiddrop:ratio=1")
