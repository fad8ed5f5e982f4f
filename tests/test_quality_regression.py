"""The trained reference models as a regression test of compression inside a model.

On random weights a compression that keeps the wrong tokens or scrambles position ids still
returns tensors of the right shapes, and the answers are noise either way. The committed
reference models (``vtok_fast/data/quality_llava``: 64 image tokens at 1-D positions;
``vtok_fast/data/quality_qwen2_vl``: 16 merged tokens at M-RoPE positions) answer held-out
questions, so here, for both:

- keep-all budgets reproduce the uncompressed answers exactly (1x);
- at 4x every method keeps at least half of what the random floor (a quarter of the tokens drawn
  at random, same position mode) gains over the blind floor (no image token at all: the answer
  prior); LLaVA's three CLS-ranked methods, and on Qwen2-VL (4 whole grid cells at 4x) every
  method, only clearly above the blind floor (in the test's comments why); on Qwen2-VL in the
  default ``"original"`` mode, and its ``"compact"`` random floor must fall below the original
  one (compact ids move M-RoPE rows and columns too);
- a broken control falls clearly below the random floor: the random floor's quarter of slots
  filled with another image's tokens (the wrong tokens, still the right count and shape). (The
  emptiest quarter of the patches is no such control here: it loses only 3 points against random
  on LLaVA, whose tower spreads the scene over every patch in three layers, and none on Qwen2-VL,
  whose 16 tokens are whole grid cells);
- PyramidDrop with one stage is FastV in the 2-layer decoder: the same answers.

And for Qwen2-VL only: every image token kept, but the features shuffled among the M-RoPE ids
(the right tokens at the wrong positions) loses the letter in the named corner. The
LLaVA model does not show this (the same shuffle loses about 3 points): it reads where a patch
is from its CLIP features (the tower's position embedding), not from the decoder's position ids.
Qwen2-VL's tower has only relative (rotary) positions, so where a token is reaches its language
model through the M-RoPE ids alone.

Why not "every method beats random": the models were trained with random token drop (the one
method-agnostic augmentation), and the LLaVA CLIP [CLS] token is never read by the decoder, so the
CLS-attention rankings of attn_topk / VisionZip / PruMerge are untrained; at this scale they fall
well below random (``bench/results/quality_cpu.json``, README "What compression costs in
answers"), so for those three on LLaVA the test asks only that they stay clearly above the blind
floor.
"""
import pytest
import torch

from vtok_fast.measure.quality import accuracy, curves, drop, reference, train

QUESTIONS = 150
CLS_RANKED = ("attn_topk", "visionzip", "prumerge")


@pytest.fixture(scope="module", params=reference.ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model_and_processor(arch):
    return train.reference_model(train.default_settings(arch))


@pytest.fixture(scope="module")
def held():
    return accuracy.held_out(QUESTIONS)


@pytest.fixture(scope="module")
def rows(model_and_processor, held):
    model, processor = model_and_processor
    return curves.run(model, processor, held, ratios=(1, 4), fastv_layer=train.FASTV_LAYER, batch_size=150)


@pytest.fixture(scope="module")
def inputs(model_and_processor, held, arch):
    model, processor = model_and_processor
    batch = train.batch(processor, held, arch)
    with torch.no_grad():
        features = drop._features(model, batch)
    return batch, features


def _answers(model, processor, batch, features, keep) -> list[str]:
    """Greedy one-token answers of ``batch`` with ``features`` at its placeholders, ``keep`` kept."""
    with torch.no_grad():
        built = drop.feature_inputs(model, batch, features, keep, "original")
        ids = model(**built, logits_to_keep=1).logits[:, -1].argmax(-1)
    return processor.tokenizer.convert_ids_to_tokens(ids.tolist())


def _accuracy(model, processor, held, inputs, keep, features=None) -> float:
    batch, computed = inputs
    answers = _answers(model, processor, batch, computed if features is None else features, keep)
    return sum(a == s.answer for a, s in zip(answers, held)) / len(held)


def _tokens(inputs) -> int:
    return inputs[1].shape[1]


def test_keep_all_budgets_reproduce_the_uncompressed_answers(rows):
    check = curves.keep_all_check(rows)
    assert len(check) == 8 and all(check.values()), check


def test_every_method_at_4x_keeps_half_the_random_floors_gain(model_and_processor, held, inputs, rows, arch):
    model, processor = model_and_processor
    blind = _accuracy(model, processor, held, inputs, torch.zeros(len(held), _tokens(inputs), dtype=torch.bool))
    floor = {r["positions"]: r["accuracy"] for r in rows if r["method"] == "random" and r["ratio"] == 4}
    assert floor["original"] > blind + 0.25, (floor, blind)
    at4 = [r for r in rows if r["ratio"] == 4 and r["method"] not in ("none", "random")]
    # LLaVA's CLS-attention rankings (attn_topk, VisionZip's dominant tokens, PruMerge) read a
    # [CLS] row the decoder never sees, so training never shaped it: on the committed model they
    # keep 56-61 % at 4x against the floor's 59 % (bench quality), and 24-39 % on an earlier one.
    # For them this test asks only that the kept tokens still carry the image (clearly above the
    # blind floor).
    # Qwen2-VL keeps 4 whole grid cells at 4x, so one cell chosen differently moves whole answer
    # types (DART's diverse cells miss the named corner: letter_at 12 %, the method at 51 %
    # against the floor's 58 % on 500 questions): there every method is held only clearly above
    # the blind floor, in the default mode. Compact ids shift the kept tokens' row
    # and column ids too (each M-RoPE row alike), which puts them at the wrong cells: the compact
    # floor itself must fall below the original one (the model sees positions).
    untrained = CLS_RANKED if arch == "llava" else tuple(r["method"] for r in at4)
    modes = ("original", "compact") if arch == "llava" else ("original",)
    if arch == "qwen2_vl":
        assert floor["compact"] < floor["original"] - 0.1, floor
    low = [(r["method"], r["positions"], round(r["accuracy"], 3)) for r in at4 if r["method"] not in untrained
           and r["positions"] in modes and r["accuracy"] < blind + 0.5 * (floor[r["positions"]] - blind)]
    assert not low, (low, floor, blind)
    blind_like = [(r["method"], r["positions"], round(r["accuracy"], 3)) for r in at4 if r["method"] in untrained
                  and r["positions"] in modes and r["accuracy"] < blind + 0.05]
    assert not blind_like, (blind_like, blind)


def test_the_wrong_tokens_fall_below_the_random_floor(model_and_processor, held, inputs, rows):
    model, processor = model_and_processor
    n = _tokens(inputs)
    keep = drop.keep_mask(torch.full((len(held),), n // 4), n, torch.Generator().manual_seed(0))
    right = _accuracy(model, processor, held, inputs, keep)
    floor = next(r["accuracy"] for r in rows if r["method"] == "random" and r["ratio"] == 4
                 and r["positions"] == "original")
    assert right == floor  # the same draw as the bench's floor (seed 0)
    # the same quarter of the same slots, filled with the next question's image tokens
    others = inputs[1].roll(1, dims=0)
    assert _accuracy(model, processor, held, inputs, keep, others) < right - 0.2


def test_pyramiddrop_with_one_stage_is_fastv(rows):
    by = {(r["method"], r["ratio"]): r["answers"] for r in rows}
    assert by[("pyramiddrop", 4)] == by[("fastv", 4)]



@pytest.fixture(scope="module")
def qwen(held):
    model, processor = train.reference_model(train.default_settings("qwen2_vl"))
    batch = train.batch(processor, held, "qwen2_vl")
    with torch.no_grad():
        return model, processor, batch, drop._features(model, batch)


def test_qwen_reads_where_a_token_is_from_its_mrope_ids(qwen, held):
    """Qwen2-VL: every token kept, but its features moved to another token's M-RoPE ids (a fixed
    permutation of the grid): the colour in the named cell and the letter in the named corner are
    lost (on the committed model 100 % -> 13 % and 100 % -> 27 % of the 30 each, chance 17 % and
    10 %), while the answers that do not depend on where a token is (the one corner letter of a
    ``glyph`` question, ``count``) stay. (LLaVA does not show this: module docstring.)"""
    model, processor, batch, features = qwen
    n = features.shape[1]
    everything = torch.ones(len(held), n, dtype=torch.bool)
    shuffled = features[:, torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    right = _accuracy_by_type(model, processor, held, batch, features, everything)
    moved = _accuracy_by_type(model, processor, held, batch, shuffled, everything)
    assert moved["color_at"] < right["color_at"] - 0.5 and moved["letter_at"] < right["letter_at"] - 0.5, (right, moved)
    assert moved["glyph"] > right["glyph"] - 0.1 and moved["count"] > right["count"] - 0.1, (right, moved)


def _accuracy_by_type(model, processor, held, batch, features, keep) -> dict:
    answers = _answers(model, processor, batch, features, keep)
    out = {}
    for qtype in dict.fromkeys(s.qtype for s in held):
        hits = [a == s.answer for a, s in zip(answers, held) if s.qtype == qtype]
        out[qtype] = sum(hits) / len(hits)
    return out
