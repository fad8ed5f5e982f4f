"""FastV and PyramidDrop inside the language model of every VLM family (``vtok_fast.patch.hf_fastv``
over :mod:`vtok_fast.patch.lm_prune`): tiny random-weight models of ``vtok_fast.bench.vlm_zoo``
with 4 decoder layers, their real offline processors, the astronaut photo.

Per family: ratio 0 is the unpatched model (logits and greedy ``generate``); a padded batch of two
different prompts and images gives each row's kept tokens and greedy generation as that row
alone (Qwen: the images differ in size, so the rows hold different image-token counts); the kept
tokens reach the pruned layers with their original position embeddings (Qwen: the M-RoPE ids of
the model's own ``get_rope_index`` on the uncompressed prompt); SDPA runs in every layer, the
eager attention never, and no square softmax (an ``L x L`` probability map) is built in the
language model; the kept count equals ``vtok_fast.budget.count_tokens``'s where its options can
describe the tiny processor. Refusals name the family and the reason."""
import os
import sys

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import vtok_fast.patch
from vtok_fast import budget
from vtok_fast.bench import vlm_zoo
from test_family_compress import GEOMETRY
from vtok_fast.patch import families, hf_fastv, lm_prune

IMAGE = Image.open(os.path.join(os.path.dirname(__file__), "data", "astronaut_64x48.png")).convert("RGB")
OTHER = IMAGE.transpose(Image.FLIP_LEFT_RIGHT).resize((96, 64))  # Qwen: another grid, another count
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "idefics3", "smolvlm",
            *[f for f in ("llava_next", "llava_onevision") if f in families.FAMILIES]]
LAYERS = 4
K = 2
aten = torch.ops.aten


def tiny(family):
    text = {"num_hidden_layers": LAYERS}
    if family == "gemma3":  # within the sliding window (the prompts here hold < 64 tokens)
        text.update(sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2)
    return vlm_zoo.tiny(family, text_config=text)


def patch(model, compress):
    """``vtok_fast.patch.hf`` without the fused kernels (they change the vision tower's last bits)."""
    return vtok_fast.patch.hf(model, fuse_embed=False, fuse_project=False, compress=compress)


def batch(family, rows=(0, 1)):
    prompts = [vlm_zoo.prompt(family), vlm_zoo.prompt(family, "USER : what is in this picture ? ASSISTANT :")]
    images = [IMAGE, OTHER]
    return vlm_zoo.inputs(family, [images[r] for r in rows], [prompts[r] for r in rows])


def generate(model, inputs, steps=3):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, inputs["input_ids"].shape[1]:]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def lm_of(model):
    family, inner = families.find(model)
    return inner, getattr(inner, family.language_model)


def image_counts(model, inputs):
    family, inner = families.find(model)
    return (inputs["input_ids"] == getattr(inner.config, family.image_token)).sum(dim=1)


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_the_unpatched_model(family, method):
    model, inputs = tiny(family), batch(family)
    expected, tokens = logits(model, inputs), generate(model, inputs)
    budget_ = {"layer": K, "ratio": 0.0} if method == "fastv" else {"layers": [1, 3], "ratio": 0.0}
    patch(model, (method, budget_))
    assert torch.equal(logits(model, inputs), expected)
    assert torch.equal(generate(model, inputs), tokens)
    info = getattr(model, hf_fastv.INFO[method])
    assert info["kept"].shape == inputs["input_ids"].shape
    vtok_fast.patch.unpatch(model)
    assert not any("_vtok_fast_patches" in m.__dict__ for m in model.modules())
    assert torch.equal(logits(model, inputs), expected)


def _real_kept(kept_row, offset):
    """A row's kept prompt positions past its ``offset`` left padding, numbered from there."""
    return kept_row[kept_row >= offset] - offset


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_gives_each_row_alone(family, method):
    """Two prompts and images, left-padded together: each row keeps the tokens (shifted by its
    padding) and generates the tokens it does alone."""
    model = tiny(family)
    spec = ("fastv", {"layer": K, "ratio": 0.5}) if method == "fastv" else ("pyramiddrop", {"layers": [1, 2, 3]})
    patch(model, spec)
    info = getattr(model, hf_fastv.INFO[method])
    both = batch(family)
    together = generate(model, both)
    kept, image_kept = info["kept"], (info["image_kept"] >= 0).sum(dim=1)
    counts = image_counts(model, both)
    for row, count in enumerate(counts.tolist()):
        for ratio in info["ratios"]:
            count = round(count * (1 - ratio))
        assert image_kept[row] == count
    padding = (both["attention_mask"] == 0).sum(dim=1)
    for row in (0, 1):
        alone = batch(family, rows=(row,))
        assert torch.equal(generate(model, alone)[0], together[row])
        assert torch.equal(_real_kept(kept[row], padding[row]), _real_kept(info["kept"][0], 0))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        assert counts[0] != counts[1]  # rows of different image-token counts


class Spy(TorchDispatchMode):
    """Records, while ``active``, the square softmax outputs and the SDPA kernels that run."""

    def __init__(self):
        super().__init__()
        self.active, self.square, self.sdpa = False, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            name = func.overloadpacket.__name__
            if "softmax" in name and out.dim() >= 2 and out.shape[-1] == out.shape[-2] > 1:
                self.square.append(tuple(out.shape))
            if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
                self.sdpa += 1
        return out


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_stays_on_and_no_square_attention_map_is_built(family, method, monkeypatch):
    model = tiny(family)
    inner, lm = lm_of(model)
    attention_module = sys.modules[type(lm.layers[0].self_attn).__module__]

    def eager(*args, **kwargs):
        raise AssertionError("eager_attention_forward ran")

    monkeypatch.setattr(attention_module, "eager_attention_forward", eager)
    rows = []
    scores = lm_prune.attention_scores

    def one_row(queries, keys, scale=None, *, key_mask=None):
        rows.append(queries.shape[2])
        return scores(queries, keys, scale, key_mask=key_mask)

    monkeypatch.setattr(lm_prune, "attention_scores", one_row)
    spec = ("fastv", {"layer": K}) if method == "fastv" else ("pyramiddrop", {"layers": [1, 2, 3]})
    patch(model, spec)
    spy = Spy()
    lm.register_forward_pre_hook(lambda *a: setattr(spy, "active", True))
    lm.register_forward_hook(lambda *a: setattr(spy, "active", False))
    with spy, torch.no_grad():
        model(**batch(family))
    assert lm.config._attn_implementation == "sdpa"
    assert spy.square == []
    assert spy.sdpa == LAYERS
    assert rows == [1] * (1 if method == "fastv" else 3)  # one query row per scoring


def _layer_inputs(lm, layer):
    seen = []
    handle = lm.layers[layer].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_embeddings"]), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_their_original_positions(family):
    model, inputs = tiny(family), batch(family)
    inner, lm = lm_of(model)
    seen, handle = _layer_inputs(lm, K)
    with torch.no_grad():
        model(**inputs)  # unpatched: the full layout's cos / sin at layer K
    (full_cos, full_sin), = seen
    seen.clear()
    patch(model, ("fastv", {"layer": K, "ratio": 0.5}))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    (cos, sin), = seen
    kept = model._fastv_info["kept"]
    pad = kept < 0
    index = kept.clamp(min=0)[..., None].expand(-1, -1, cos.shape[-1])
    for got, full in ((cos, full_cos), (sin, full_sin)):
        expected = full.expand(kept.shape[0], *full.shape[1:]).gather(1, index)
        assert torch.equal(got[~pad], expected[~pad])
    if families.find(model)[0].mrope:  # the model's own M-RoPE ids of the uncompressed prompt
        names = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
        ids, _ = inner.get_rope_index(**{n: inputs[n] for n in names if n in inputs})
        expected = lm.rotary_emb(cos, ids.gather(2, kept.clamp(min=0)[None].expand(3, -1, -1)))
        assert torch.equal(cos[~pad], expected[0][~pad]) and torch.equal(sin[~pad], expected[1][~pad])
        assert bool((ids[0].gather(1, kept.clamp(min=0)).diff(dim=1)[~pad[:, 1:] & ~pad[:, :-1]] >= 0).all())


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_kept_count_is_the_budget_calculators(family, method):
    """At the geometry ``count_tokens`` describes (the checkpoint's tiles, patches and pinpoints, or
    the tiny processor's options: ``test_family_compress.GEOMETRY``), each stage keeps the
    calculator's count."""
    name, overrides, options = GEOMETRY[family]
    text = {"num_hidden_layers": LAYERS}
    if family == "gemma3":  # 256 image tokens: a window that holds the prompt
        text.update(sliding_window=512, layer_types=["sliding_attention", "full_attention"] * 2)
    model = vlm_zoo.tiny(family, text_config=text, **overrides)
    spec = ("fastv", {"layer": K, "ratio": 0.5}) if method == "fastv" else ("pyramiddrop", {"layers": [1, 2, 3],
                                                                                             "ratio": 0.5})
    inputs = vlm_zoo.inputs(family, [[IMAGE]], [vlm_zoo.prompt(family)], config=model.config)
    full = budget.count_tokens(name, (IMAGE.height, IMAGE.width), **options)
    assert full.llm_tokens == int(image_counts(model, inputs)[0])
    counted = budget.count_tokens(name, (IMAGE.height, IMAGE.width), compress=spec, **options)
    patch(model, spec)
    with torch.no_grad():
        model(**inputs)
    info = getattr(model, hf_fastv.INFO[method])
    assert int((info["image_kept"] >= 0).sum()) == counted.llm_tokens
    if method == "pyramiddrop":
        assert [int((s["image_kept"] >= 0).sum()) for s in info["stages"]] == [c for _, c in counted.stages[1:]]


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_labels_are_aligned_to_the_kept_positions(family):
    """``labels=`` of a family model: each kept position against the token after it in the prompt."""
    model, inputs = tiny(family), batch(family)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        plain = model(**inputs, labels=labels).loss
        patch(model, ("fastv", {"layer": K, "ratio": 0.0}))
        assert torch.equal(model(**inputs, labels=labels).loss, plain)
        patch(model, ("fastv", {"layer": K, "ratio": 0.5}))
        out = model(**inputs, labels=labels)
    kept = model._fastv_info["kept"]
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].gather(1, kept.clamp(min=0))
    targets = targets.masked_fill(kept < 0, -100)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_qwen3_vl_deepstack_follows_the_kept_tokens():
    """Pruning at layer 1, before DeepStack's additions after layers 1 and 2: the features of the
    kept visual tokens are added at their rows (ratio 0: exactly the unpatched model)."""
    model, inputs = tiny("qwen3_vl"), batch("qwen3_vl")
    assert len(model.config.vision_config.deepstack_visual_indexes) >= 2
    expected = logits(model, inputs)
    patch(model, ("fastv", {"layer": 1, "ratio": 0.0}))
    assert torch.equal(logits(model, inputs), expected)
    patch(model, ("fastv", {"layer": 1, "ratio": 0.5}))
    _, lm = lm_of(model)
    added = []
    original = type(lm)._deepstack_process

    def spy(self, hidden_states, visual_pos_masks, visual_embeds):
        added.append((hidden_states.shape[1], int(visual_pos_masks.sum()), visual_embeds.shape[0]))
        return original(self, hidden_states, visual_pos_masks, visual_embeds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(lm), "_deepstack_process", spy)
        with torch.no_grad():
            model(**inputs)
    kept = model._fastv_info["kept"]
    full_visual = int(image_counts(model, inputs).sum())
    assert added[0] == (inputs["input_ids"].shape[1], full_visual, full_visual)  # after layer 0: every token
    assert added[1][0] == kept.shape[1] and added[1][1] == added[1][2] == int((model._fastv_info["image_kept"] >= 0)
                                                                                .sum())


def test_gemma3_beyond_the_sliding_window_is_refused_clearly():
    model = vlm_zoo.tiny("gemma3")  # sliding_window 16, prompts of 26 tokens
    patch(model, "fastv")
    with pytest.raises(ValueError, match=r"FastV in Gemma 3 runs while the prompt and the generated tokens fit the "
                                         r"sliding window \(16 tokens\)"):
        logits(model, batch("gemma3"))
    model = tiny("gemma3")  # window 64: generation stops being prunable past it
    patch(model, "fastv")
    inputs = batch("gemma3")
    with pytest.raises(ValueError, match="sliding window"):
        generate(model, inputs, steps=64)


def test_vision_compress_and_fastv_together_are_refused_in_a_family():
    model = tiny("qwen2_vl")
    patch(model, ("pool", {"stride": 2}))
    with pytest.raises(ValueError, match="cannot run with a vision-side compress= in Qwen2-VL"):
        hf_fastv.apply(model, compress="fastv")
    vtok_fast.patch.unpatch(model)
    hf_fastv.apply(model, compress="fastv")
    with pytest.raises(ValueError, match="cannot run with FastV / PyramidDrop in Qwen2-VL"):  # the other order
        patch(model, ("pool", {"stride": 2}))
    assert "get_image_features" not in model.model.__dict__  # nothing of the refused call stays


def test_unsupported_arguments_are_refused_at_apply():
    model = tiny("qwen2_vl")
    with pytest.raises(ValueError, match=r"fastv layer must be an int in \[1, 3\]"):
        hf_fastv.apply(model, compress=("fastv", {"layer": 4}))
    with pytest.raises(ValueError, match="sliding-window attention"):
        hf_fastv.apply(vlm_zoo.tiny("qwen2_vl", text_config={"use_sliding_window": True, "sliding_window": 8,
                                                            "max_window_layers": 0}), compress="fastv")
    with pytest.raises(ValueError, match="FastV / PyramidDrop run in LlavaForConditionalGeneration"):
        hf_fastv.apply(torch.nn.Linear(2, 2), compress="fastv")
    assert not any("_vtok_fast_patches" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_triton_scores_keep_the_torch_tokens(family, monkeypatch):
    """The scoring row through the Triton kernels (the interpreter here) keeps the same image
    tokens as the PyTorch path in every family, with the same logits, for both methods."""
    model, inputs = tiny(family), batch(family)
    for method, budget_ in (("fastv", {"layer": K, "ratio": 0.5}), ("pyramiddrop", {"layers": [1, 2], "ratio": 0.5})):
        patch(model, (method, budget_))
        monkeypatch.setenv("VTOK_FAST_BACKEND", "torch")
        expected = logits(model, inputs)
        kept = getattr(model, hf_fastv.INFO[method])["kept"].clone()
        monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")
        torch.testing.assert_close(logits(model, inputs), expected, atol=2e-5, rtol=1e-4)
        assert torch.equal(getattr(model, hf_fastv.INFO[method])["kept"], kept)
