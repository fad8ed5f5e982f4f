"""``vtok_fast.measure.quality.dataset``: the procedural visual-question dataset (no model needed)."""
import numpy as np
import pytest

from vtok_fast.measure.quality import dataset


def test_deterministic_from_seed():
    a, b = dataset.make_dataset(36, seed=7), dataset.make_dataset(36, seed=7)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image)
        assert (x.question, x.answer, x.qtype, x.region) == (y.question, y.answer, y.qtype, y.region)
    # sample i does not depend on n, and another seed is another stream
    assert dataset.make_dataset(40, seed=7)[35].question == a[35].question
    other = dataset.make_dataset(36, seed=8)
    assert sum(np.array_equal(x.image, y.image) for x, y in zip(a, other)) == 0


def test_every_type_in_equal_share_with_balanced_answers():
    samples = dataset.make_dataset(600, seed=0)
    types = [s.qtype for s in samples]
    assert {t: types.count(t) for t in dataset.QUESTION_TYPES} == {t: 120 for t in dataset.QUESTION_TYPES}
    for qtype in dataset.QUESTION_TYPES:
        answers = [s.answer for s in samples if s.qtype == qtype]
        top = max(answers.count(a) for a in set(answers))
        assert len(set(answers)) >= 2 and top <= 0.6 * len(answers), (qtype, answers)
    assert all(s.answer in dataset.ANSWERS for s in samples)


@pytest.mark.parametrize("size", [64, 128])
def test_images(size):
    for s in dataset.make_dataset(12, seed=3, size=size):
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        for x0, y0, x1, y1 in s.region:
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


def _cells_of(image, colour):
    """Grid cells holding a pixel of exactly ``colour``."""
    s = image.shape[0] // dataset.GRID
    hit = (image == np.array(dataset.RGB[colour], dtype=np.uint8)).all(-1)
    return {(r, c) for r in range(dataset.GRID) for c in range(dataset.GRID) if hit[r * s:(r + 1) * s, c * s:(c + 1) * s].any()}


def _cell(word: str) -> tuple[int, int]:
    """``(row, col)`` of a cell word ``r<row>c<col>``."""
    assert word[0] == "r" and word[2] == "c" and len(word) == 4, word
    return int(word[1]), int(word[3])


def test_answers_match_the_pixels():
    """Colour, count and relation answers checked against the rendered pixels."""
    for s in dataset.make_dataset(240, seed=11):
        words = s.question.split()
        if s.qtype == "color_at":
            cell = _cell(words[1])
            assert [c for c in dataset.COLOURS if cell in _cells_of(s.image, c)] == [s.answer]
        elif s.qtype == "count":
            assert len(_cells_of(s.image, words[1])) == int(s.answer)
        elif s.qtype == "relation":
            (ra, ca), = _cells_of(s.image, words[0])
            (rb, cb), = _cells_of(s.image, words[2])
            truth = ca < cb if words[1] == "left" else ra < rb
            assert s.answer == ("yes" if truth else "no")
        elif s.qtype == "letter_at":  # four letters, the named corner's is the answer
            (x0, y0, x1, y1), = s.region
            white = (s.image[y0:y1, x0:x1] == 255).all(-1)
            assert white.sum() == sum(row.count("1") for row in dataset.FONT[s.answer])
            row, col = dataset.CORNERS[dataset.CORNER_WORDS.index(words[1])]
            assert (x0 // 16, y0 // 16) == (col, row)
        elif s.qtype == "glyph":
            (x0, y0, x1, y1), = s.region
            patch = s.image[y0:y1, x0:x1]
            white = (patch == 255).all(-1)
            assert white.sum() == sum(row.count("1") for row in dataset.FONT[s.answer])
            assert (s.image == 255).all(-1).sum() == white.sum()  # the only white pixels


def test_glyph_lies_in_one_patch():
    """At 8-px patches the corner letter is inside a single patch (what pooling mixes away)."""
    for s in dataset.make_dataset(60, seed=5, types=("glyph",)):
        ys, xs = np.nonzero((s.image == 255).all(-1))
        assert len({(y // 8, x // 8) for y, x in zip(ys, xs)}) == 1


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        dataset.make_sample(0, 0, "nope")
    with pytest.raises(ValueError):
        dataset.make_dataset(3, 0, size=100)
    with pytest.raises(ValueError):
        dataset.make_dataset(-1, 0)


def test_harder_types_stay_available():
    """``shape_at`` and ``count_kind`` are not in the default set (the reference model does not learn
    shape kinds within its budget) but still render consistent samples."""
    for qtype in ("shape_at", "count_kind"):
        s = dataset.make_sample(0, 3, qtype)
        assert s.qtype == qtype and s.answer in dataset.ANSWERS


def test_more_questions_agree_with_the_pixels():
    """``more=True`` adds questions about the same image; the sample itself does not change."""
    plain, rich = dataset.make_dataset(30, seed=4), dataset.make_dataset(30, seed=4, more=True)
    for p, r in zip(plain, rich):
        assert np.array_equal(p.image, r.image) and (p.question, p.answer) == (r.question, r.answer)
        assert 2 <= len(r.more) <= 5 and r.qtype not in [t for _, _, t in r.more]
        assert {t for _, _, t in r.more} <= set(dataset.QUESTION_TYPES)
        for question, answer, qtype in r.more:
            words = question.split()
            assert answer in dataset.ANSWERS
            if qtype == "count":
                assert len(_cells_of(r.image, words[1])) == int(answer)
            elif qtype == "color_at":
                assert _cell(words[1]) in _cells_of(r.image, answer)
