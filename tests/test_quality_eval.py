"""``vtok_fast.measure.evaluate`` / ``quality.evaluate`` on a tiny untrained LLaVA (the API, the
random floor's path against the patcher's, keep-all exactness, bad input), and the plot."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vtok_fast
from vtok_fast.measure.quality import curves, dataset, drop, plot, reference
from vtok_fast.measure.quality import evaluate as ev

TINY = reference.ModelSettings(vision_width=32, vision_layers=2, vision_heads=2, text_width=32, text_layers=2,
                               text_heads=2, text_init=0.08)


@pytest.fixture(scope="module")
def tiny():
    return reference.build_model(TINY, seed=3), reference.build_processor(TINY)


@pytest.fixture(scope="module")
def samples():
    return dataset.make_dataset(10, seed=9)


def test_measure_exports_evaluate():
    assert vtok_fast.measure.evaluate is ev.evaluate
    assert "evaluate" in dir(vtok_fast.measure) and "quality" in dir(vtok_fast.measure)


def test_parse_and_format_specs():
    assert ev.parse_spec("visionzip:dominant=54,contextual=10") == ("visionzip", {"dominant": 54, "contextual": 10})
    assert ev.parse_spec("pool:stride=2,positions=compact") == ("pool", {"stride": 2, "positions": "compact"})
    assert ev.parse_spec(("fastv", {"ratio": 0.5})) == ("fastv", {"ratio": 0.5})
    assert ev.parse_spec(None) is None and ev.format_spec(None) == "none"
    assert ev.format_spec(("tome", {"keep": 8})) == "tome:keep=8"
    with pytest.raises(ValueError, match="key=value"):
        ev.parse_spec("pool:2")
    with pytest.raises(TypeError, match="compress"):
        ev.parse_spec(3)


def test_score():
    assert ev.score("Red.", "red") and ev.score(" red\nmore", "red")
    assert not ev.score("red car", "red") and ev.score("red car", "red", "prefix")
    with pytest.raises(ValueError, match="metric"):
        ev.score("a", "a", "fuzzy")


def test_keep_all_settings_reproduce_the_uncompressed_answers(tiny, samples):
    model, processor = tiny
    rows = curves.run(model, processor, samples, ratios=(1,), batch_size=5)
    assert rows[0]["method"] == "none" and len(rows) == 9  # none + 8 keep-all settings
    assert all(curves.keep_all_check(rows).values()), curves.keep_all_check(rows)
    logits = {}
    for spec in (None, ("attn_topk", {"keep": 64}), ("random", {"keep": 64})):
        res = ev.evaluate(model, processor, samples, spec)
        logits[ev.format_spec(ev.parse_spec(spec))] = res.answers
    assert len({tuple(a) for a in logits.values()}) == 1


@pytest.mark.parametrize("positions", drop.POSITIONS)
def test_random_floor_path_equals_the_patcher_on_the_same_tokens(tiny, samples, positions):
    """The floor runs through ``drop``; fed the tokens ``attn_topk`` keeps, it gives the patched
    model's logits, in both position modes: the floor and the methods are the same computation."""
    model, processor = tiny
    inputs = processor(images=[s.image for s in samples], text=[reference.prompt(s.question) for s in samples],
                       return_tensors="pt", padding=True)
    vtok_fast.patch.hf(model, fuse_embed=False, fuse_project=False,
                       compress=("attn_topk", {"keep": 16, "positions": positions}))
    try:
        with torch.no_grad():
            patched = model(**inputs).logits[:, -1]
        kept = model.model._compress_info["compressed"].positions
    finally:
        vtok_fast.patch.unpatch(model)
    keep = torch.zeros(len(samples), 64, dtype=torch.bool).scatter(1, kept, True)
    with torch.no_grad():
        floor = drop.answer_logits(model, inputs, keep, positions)
    torch.testing.assert_close(floor, patched, rtol=1e-4, atol=1e-4)


def test_evaluate_records_tokens_and_types_and_unpatches(tiny, samples):
    model, processor = tiny
    res = ev.evaluate(model, processor, samples, "pool:stride=2")
    assert res.image_tokens == 16 and res.count == 10 and res.prefill_ms > 0
    assert set(res.per_type) == set(dataset.QUESTION_TYPES) and len(res.answers) == 10
    assert ev.evaluate(model, processor, samples, ("fastv", {"layer": 1, "ratio": 0.75})).image_tokens == 16
    assert ev.evaluate(model, processor, samples, ("random", {"keep": 8, "seed": 1})).image_tokens == 8
    assert vtok_fast.patch.image_token_count(model) == 64  # every patch removed again
    rows = ev.compare(model, processor, samples, ["tome:keep=32"], batch_size=4)
    assert [r.label for r in rows] == ["none", "tome:keep=32"] and rows[0].delta == 0
    assert "tome:keep=32" in ev.format_table(rows)


def test_evaluate_generates_several_tokens(tiny, samples):
    model, processor = tiny
    for spec in (None, "pool:stride=2", ("random", {"keep": 16})):
        res = ev.evaluate(model, processor, samples[:3], spec, max_new_tokens=2)
        one = ev.evaluate(model, processor, samples[:3], spec, max_new_tokens=1)
        assert [a.split()[0] for a in res.answers] == one.answers


def test_evaluate_bad_input(tiny, samples, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="metric"):
        ev.evaluate(model, processor, samples, metric="bleu")
    with pytest.raises(ValueError, match="batch_size"):
        ev.evaluate(model, processor, samples, batch_size=0)
    with pytest.raises(TypeError, match="data"):
        ev.evaluate(model, processor, [])
    with pytest.raises(TypeError, match="data"):
        ev.evaluate(model, processor, [{"image": 1}])
    with pytest.raises(ValueError, match="keep"):
        ev.evaluate(model, processor, samples, ("random", {"keep": 65}))
    with pytest.raises(ValueError, match="positions"):
        ev.evaluate(model, processor, samples, ("random", {"keep": 4, "positions": "shuffled"}))
    with pytest.raises(ValueError):
        ev.evaluate(model, processor, samples, "nonesuch:keep=4")
    vtok_fast.patch.hf(model, fuse_embed=False, fuse_project=False, compress=("pool", {"stride": 2}))
    try:
        with pytest.raises(ValueError, match="unpatch"):
            ev.evaluate(model, processor, samples)
    finally:
        vtok_fast.patch.unpatch(model)


def test_load_jsonl(tmp_path, tiny):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "count red", "answer": "0"}) + "\n\n")
    records = ev.load_jsonl(path)
    assert records[0]["image"] == str(tmp_path / "a.png")
    model, processor = tiny
    assert ev.evaluate(model, processor, path).count == 1
    path.write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="q.jsonl:1 lacks question, answer"):
        ev.load_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        ev.load_jsonl(path)


def test_curve_settings():
    names = {(s.method, s.positions) for s in curves.settings(64, 4)}
    assert ("pool", "compact") in names and ("fastv", "original") in names and ("fastv", "compact") not in names
    assert all(s.method != "pool" for s in curves.settings(64, 8))  # 8 is not a square
    zip4 = next(s for s in curves.settings(64, 4) if s.method == "visionzip")
    assert zip4.spec[1]["dominant"] + zip4.spec[1]["contextual"] == 16
    assert next(s for s in curves.settings(64, 16) if s.method == "prumerge").spec[1]["keep"] == 3
    # Qwen2-VL's 16 tokens: VisionZip keeps one contextual token at 8x and has no budget at 16x
    zip8 = next(s for s in curves.settings(16, 8) if s.method == "visionzip")
    assert (zip8.spec[1]["dominant"], zip8.spec[1]["contextual"]) == (1, 1)
    assert all(s.method not in ("visionzip", "prumerge") for s in curves.settings(16, 16))
    with pytest.raises(ValueError, match="ratio"):
        curves.settings(64, 3)


def test_plot_writes_a_png(tmp_path):
    rows = [{"method": "none", "positions": "original", "image_tokens": 64, "accuracy": 0.9, "per_type": {"a": 0.9}},
            {"method": "pool", "positions": "original", "image_tokens": 16, "accuracy": 0.5, "per_type": {"a": 0.4}},
            {"method": "pool", "positions": "compact", "image_tokens": 16, "accuracy": 0.4, "per_type": {"a": 0.3}},
            {"method": "pool", "positions": "original", "image_tokens": 4, "accuracy": 0.3, "per_type": {"a": 0.2}}]
    path = plot.plot_curves(rows, tmp_path / "c.png", "title")
    with Image.open(path) as img:
        assert img.size[0] > 600 and img.mode == "RGB"
    with pytest.raises(ValueError, match="rows"):
        plot.plot_curves([], tmp_path / "d.png")


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_evaluate_runs_any_family_and_counts_what_its_language_model_sees(family):
    """A family model of ``vtok_fast.patch.families`` (random weights: the mechanics, not the
    answers): a vision method's image tokens are the kept image columns, the model is left
    unpatched, and the uncompressed count is the processor's."""
    from vtok_fast.bench import vlm_zoo
    from vtok_fast.measure.budget import count_tokens

    model, processor = vlm_zoo.tiny(family), vlm_zoo.processor(family)
    image = np.zeros((48, 64, 3), np.uint8)
    data = [{"image": image, "question": "what colour", "answer": "red"}] * 2
    prompt = vlm_zoo.prompt(family, "USER : {question} ? ASSISTANT :")
    full = ev.evaluate(model, processor, data, prompt=prompt, max_new_tokens=1)
    pooled = ev.evaluate(model, processor, data, compress=("pool", {"stride": 2}), prompt=prompt, max_new_tokens=1)
    if family == "qwen2_vl":  # the tiny processor's options (see tests/test_family_compress.py)
        options = {"patch_size": 8, "merge_size": 2, "min_pixels": 1024, "max_pixels": 4194304}
        expected = count_tokens("qwen2-vl", (48, 64), compress=("pool", {"stride": 2}), **options).llm_tokens
    else:
        expected = full.image_tokens // 4  # 4x4 -> 2x2 per image
    assert pooled.image_tokens == expected < full.image_tokens
    assert "_compress_info" not in model.__dict__ and 0 <= pooled.accuracy <= 1
    if family == "qwen2_vl":  # the random floor drops between projector and decoder, at the M-RoPE ids
        floor = ev.evaluate(model, processor, data, compress=("random", {"keep": 2}), prompt=prompt, max_new_tokens=1)
        assert floor.image_tokens == 2 and 0 <= floor.accuracy <= 1
    else:
        with pytest.raises(ValueError, match=f"random.*LLaVA-1.5 or Qwen2-VL.*{family}"):
            ev.evaluate(model, processor, data, compress=("random", {"keep": 2}), prompt=prompt, max_new_tokens=1)
