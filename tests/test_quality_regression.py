"""The trained reference model as a regression test of compression inside a model.

On random weights a compression that keeps the wrong tokens or scrambles position ids still
returns tensors of the right shapes, and the answers are noise either way. The committed
reference model (``vtok_fast/data/quality_llava``) answers held-out questions, so here:

- keep-all budgets reproduce the uncompressed answers exactly (1x);
- at 4x every method keeps at least half of what the random floor (16 random tokens, same
  position mode) gains over the blind floor (no image token at all: the answer prior);
- a broken control falls clearly below the random floor: the 16 emptiest patches (the wrong
  tokens, still 16 of the right shape);
- PyramidDrop with one stage is FastV in the 2-layer decoder: the same answers.

Not asserted: that scrambled position ids break answers. The same random tokens with their
features shuffled among their position ids lose only about 3 points: this LLaVA reads where a
patch is from its CLIP features (the tower's position embedding), not from the decoder's position
ids, so position-id handling is what the Qwen2-VL reference model (M-RoPE) is for.

Why not "every method beats random": the model was trained with random token drop (the one
method-agnostic augmentation), and its CLIP [CLS] token is never read by the decoder, so the
CLS-attention rankings of attn_topk / VisionZip / PruMerge are untrained; at this scale they fall
below random (``bench/results/quality_cpu.json``, README "What compression costs in answers").
"""
import pytest
import torch

from vtok_fast.measure.quality import accuracy, curves, drop, reference, train

QUESTIONS = 150


@pytest.fixture(scope="module")
def model_and_processor():
    return train.reference_model()


@pytest.fixture(scope="module")
def held():
    return accuracy.held_out(QUESTIONS)


@pytest.fixture(scope="module")
def rows(model_and_processor, held):
    model, processor = model_and_processor
    return curves.run(model, processor, held, ratios=(1, 4), fastv_layer=train.FASTV_LAYER, batch_size=150)


@pytest.fixture(scope="module")
def inputs(model_and_processor, held):
    model, processor = model_and_processor
    batch = processor(images=[s.image for s in held], text=[reference.prompt(s.question) for s in held],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        features = torch.stack(list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    return batch, features


def _accuracy(model, processor, held, inputs, keep) -> float:
    batch, features = inputs
    with torch.no_grad():
        embeds = drop.drop_inputs(model, batch["input_ids"], batch["attention_mask"], features, keep, "original")
        ids = model(**embeds, logits_to_keep=1).logits[:, -1].argmax(-1)
    answers = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    return sum(a == s.answer for a, s in zip(answers, held)) / len(held)


def test_keep_all_budgets_reproduce_the_uncompressed_answers(rows):
    check = curves.keep_all_check(rows)
    assert len(check) == 8 and all(check.values()), check


def test_every_method_at_4x_keeps_half_the_random_floors_gain(model_and_processor, held, inputs, rows):
    model, processor = model_and_processor
    blind = _accuracy(model, processor, held, inputs, torch.zeros(len(held), 64, dtype=torch.bool))
    floor = {r["positions"]: r["accuracy"] for r in rows if r["method"] == "random" and r["ratio"] == 4}
    assert floor["original"] > blind + 0.25, (floor, blind)
    low = [(r["method"], r["positions"], round(r["accuracy"], 3)) for r in rows if r["ratio"] == 4
           and r["method"] not in ("none", "random")
           and r["accuracy"] < blind + 0.5 * (floor[r["positions"]] - blind)]
    assert not low, (low, floor, blind)


def test_the_wrong_tokens_fall_below_the_random_floor(model_and_processor, held, inputs, rows):
    model, processor = model_and_processor
    keep = drop.keep_mask(torch.full((len(held),), 16), 64, torch.Generator().manual_seed(0))
    right = _accuracy(model, processor, held, inputs, keep)
    floor = next(r["accuracy"] for r in rows if r["method"] == "random" and r["ratio"] == 4
                 and r["positions"] == "original")
    assert right == floor  # the same draw as the bench's floor (seed 0)
    pixels = torch.stack([torch.from_numpy(s.image).float() for s in held])  # (B, 64, 64, 3)
    spread = pixels.unfold(1, 8, 8).unfold(2, 8, 8).reshape(len(held), 64, -1).std(-1)
    emptiest = torch.zeros(len(held), 64, dtype=torch.bool).scatter(1, spread.argsort(1)[:, :16], True)
    assert _accuracy(model, processor, held, inputs, emptiest) < right - 0.1


def test_pyramiddrop_with_one_stage_is_fastv(rows):
    by = {(r["method"], r["ratio"]): r["answers"] for r in rows}
    assert by[("pyramiddrop", 4)] == by[("fastv", 4)]
