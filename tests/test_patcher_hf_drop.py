"""``vtok_fast.patch.hf(llava, compress=...)`` as a drop-in: the processor's normal prompt (one
placeholder per uncompressed token) runs unchanged; the patched model drops the placeholders of the
removed image tokens inside its forward (``vtok_fast.patch.placeholder_drop``). Tiny LLaVA-1.5 of
``vtok_fast.bench.vlm_zoo``, its real processor, the astronaut test image."""
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vtok_fast.patch
from vtok_fast.bench import vlm_zoo

IMAGE = Image.open(os.path.join(os.path.dirname(__file__), "data", "astronaut_64x48.png")).convert("RGB")
SHORT = vlm_zoo.prompt("llava")
LONG = vlm_zoo.prompt("llava", "USER : what is in this picture ? tell me about the person . ASSISTANT :")
TWO = "<image> <image> USER : describe the image . ASSISTANT :"
N = 16  # placeholders per image: the tiny tower's 4x4 grid
POOL = ("pool", {"stride": 2})


def patched(compress, model=None):
    model = vlm_zoo.tiny("llava") if model is None else model
    return vtok_fast.patch.hf(model, fuse_embed=False, fuse_project=False, compress=compress)


def batch(*prompts, images=None):
    images = images or [[IMAGE] * p.count("<image>") for p in prompts]
    if not any(images):  # a text-only prompt alone: the processor takes no empty image list
        return vlm_zoo.processor("llava")(text=list(prompts), padding=True, return_tensors="pt")
    return vlm_zoo.inputs("llava", images, list(prompts))


class Spy:
    """Records the kwargs the language model is called with (registered after the patch's hook)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def generate(model, inputs, steps=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, inputs["input_ids"].shape[1]:]


def test_keep_all_is_the_unpatched_model():
    model, inputs = vlm_zoo.tiny("llava"), batch(SHORT, LONG)
    expected, tokens = logits(model, inputs), generate(model, inputs)
    patched(("tome", {"keep": N}), model)
    torch.testing.assert_close(logits(model, inputs), expected)
    assert torch.equal(generate(model, inputs), tokens)


@pytest.mark.parametrize("compress,slots", [(POOL, [0, 2, 8, 10]), (("attn_topk", {"keep": N // 4}), None)])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_the_language_model_gets_the_compressed_count_with_gathered_positions(compress, slots, positions):
    inputs = batch(SHORT, LONG)
    reference = vlm_zoo.tiny("llava")
    spy = Spy(reference)
    generate(reference, inputs, steps=1)
    full_positions = spy.calls[0]["position_ids"]  # generate's, on the full layout (mask cumsum)
    method, budget = compress
    model = patched((method, {**budget, "positions": positions}))
    spy = Spy(model)
    out = generate(model, inputs, steps=3)
    assert out.shape == (2, 3)
    prefill = spy.calls[0]
    image = inputs["input_ids"] == model.config.image_token_id
    kept = model._compress_info["kept"]
    assert prefill["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1] - (N - N // 4)
    assert kept.shape == prefill["position_ids"].shape and bool((kept >= 0).all())  # same kept count: no pad
    assert torch.equal(image.gather(1, kept).sum(dim=1), torch.tensor([N // 4] * 2))
    if slots is None:
        slots = model._compress_info["compressed"].positions.sort(dim=1).values.tolist()[0]
    start = image.long().argmax(dim=1)
    kept_slots = [[c - int(start[r]) for c in kept[r].tolist() if image[r, c]] for r in range(2)]
    assert kept_slots[0] == list(slots)
    real = prefill["attention_mask"].bool()
    if positions == "original":
        assert torch.equal(prefill["position_ids"][real], full_positions.gather(1, kept)[real])
    else:
        for row in range(2):
            ids = prefill["position_ids"][row][real[row]]
            assert torch.equal(ids, torch.arange(len(ids)))
    steps = [call["position_ids"] for call in spy.calls[1:]]
    assert [s.shape for s in steps] == [(2, 1)] * 2
    assert torch.equal(steps[1] - steps[0], torch.ones(2, 1, dtype=torch.long))
    if positions == "compact":
        assert torch.equal(steps[0][:, 0], real.sum(dim=1))


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("prompts", [(SHORT, LONG), (TWO, SHORT), (SHORT, "USER : tell me a color . ASSISTANT :")])
def test_a_batch_gives_what_each_row_gives_alone(prompts, positions):
    model = patched(("attn_topk", {"keep": N // 4, "positions": positions}))
    images = [[IMAGE] * p.count("<image>") for p in prompts]
    together = batch(*prompts, images=images)
    last, tokens = logits(model, together)[:, -1], generate(model, together)
    for row, prompt in enumerate(prompts):
        alone = batch(prompt, images=[images[row]])
        torch.testing.assert_close(logits(model, alone)[0, -1], last[row], atol=1e-4, rtol=1e-4)
        assert torch.equal(generate(model, alone)[0], tokens[row])


def test_rows_keeping_different_counts_are_left_padded_not_truncated():
    model = patched(POOL)
    inputs = batch(TWO, SHORT)
    spy = Spy(model)
    logits(model, inputs)
    kept = model._compress_info["kept"]
    lengths = inputs["attention_mask"].sum(dim=1) - torch.tensor([2 * (N - 4), N - 4])
    assert torch.equal(spy.calls[0]["attention_mask"].sum(dim=1), lengths)
    width = inputs["input_ids"].shape[1] - (N - 4)  # the row dropping fewer sets the width (its own pads stay)
    assert kept.shape[1] == width and bool((kept[0, :N - 4] < 0).all()) and bool((kept[0, N - 4:] >= 0).all())
    assert bool((kept[1] >= 0).all())


def test_labels_are_gathered_with_the_kept_index():
    model = patched(POOL)
    inputs = batch(TWO, SHORT)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    kept = model._compress_info["kept"]
    targets = labels.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_a_prompt_holding_the_compressed_count_still_works():
    model = patched(("pool", {"stride": 2, "positions": "compact"}))
    full = batch(SHORT, LONG)
    processor = vtok_fast.patch.configure_processor(vlm_zoo.processor("llava"), model)
    short = processor(text=[SHORT, LONG], images=[IMAGE, IMAGE], padding=True, return_tensors="pt")
    assert int((short["input_ids"] == model.config.image_token_id).sum()) == 2 * 4
    expected = logits(model, short)
    torch.testing.assert_close(logits(model, full), expected, atol=1e-5, rtol=1e-5)  # same layout, same ids
    assert torch.equal(generate(model, full), generate(model, short))
    wrong = dict(short, input_ids=short["input_ids"].clone())
    image = wrong["input_ids"] == model.config.image_token_id
    wrong["input_ids"][0, int(image[0].long().argmax())] = vlm_zoo.token_id("llava", "image")
    with pytest.raises(ValueError, match=r"holds 7 <image> tokens, but its images give 8 image features .*32 "
                                         r"uncompressed.*configure_processor"):
        logits(model, wrong)


def test_sdpa_stays_on(monkeypatch):
    model = patched(POOL)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    generate(model, batch(TWO, SHORT), steps=2)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert len(calls) >= 3 * len(model.model.language_model.layers)


def _attributes(model):
    return ({name: dict(m.__dict__) for name, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def test_unpatch_restores_exactly_and_a_failing_apply_changes_nothing():
    model, inputs = vlm_zoo.tiny("llava"), batch(TWO, SHORT)
    expected = logits(model, inputs)
    before_dicts, before_state = _attributes(model)
    lm = model.model.language_model
    hooks = lm._forward_pre_hooks
    with pytest.raises(ValueError, match="positions must be one of"):
        patched(("pool", {"stride": 2, "positions": "shifted"}), model)
    assert lm._forward_pre_hooks is hooks and "_loss_function" not in model.__dict__
    patched(POOL, model)
    assert model.state_dict().keys() == before_state.keys()
    with pytest.raises(ValueError, match="positions must be one of"):
        patched(("pool", {"stride": 2, "positions": "shifted"}), model)
    assert logits(model, inputs).shape[1] < inputs["input_ids"].shape[1]  # the earlier patch stays
    vtok_fast.patch.unpatch(model)
    after_dicts, after_state = _attributes(model)
    assert {n: sorted(d) for n, d in before_dicts.items()} == {n: sorted(d) for n, d in after_dicts.items()}
    assert lm._forward_pre_hooks is hooks and not hooks and not lm._forward_pre_hooks_with_kwargs
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert torch.equal(logits(model, inputs), expected)
