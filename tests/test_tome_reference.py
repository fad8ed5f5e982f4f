"""The ToMe reference contract (vtok_fast/reduce/tome_reference.py) against hand-computed cases, a loop-by-loop
float64 oracle written from the reference page, and the page's properties.

Tests that compare matchings computed in different ways (fp32 BLAS vs the float64 oracle, the
interpreter's numpy ``tl.dot`` vs torch) use :func:`exact_metric`, whose cosines every
implementation computes without rounding, so their exact assertions hold on any CPU and BLAS."""
import math
import re

import pytest
import torch

from vtok_fast import bipartite_soft_matching, merge_source, merge_wavg, parse_r
from vtok_fast.reduce.tome_reference import unit_rows
from helpers import assert_close


def exact_metric(*shape: int) -> torch.Tensor:
    """A float32 ``(..., C)`` metric whose cosines are computed exactly by any BLAS, summation
    order or kernel: every row holds 1, 4 or 16 entries ±1 (norm 1, 2 or 4) times a power of two
    (the rest 0), so normalizing divides by a power of two and each cosine is a multiple of 1/16,
    a short sum of exact products. Equal scores are therefore exact ties (they are frequent),
    which every implementation breaks by index."""
    *lead, channels = shape
    counts = torch.tensor([k for k in (1, 4, 16) if k <= channels])
    nonzeros = counts[torch.randint(len(counts), tuple(lead))]
    rank = torch.rand(shape).argsort(dim=-1).argsort(dim=-1)  # a random permutation per row
    signs = torch.randint(0, 2, shape) * 2 - 1
    scale = 2.0 ** torch.randint(-3, 4, (*lead, 1))
    return torch.where(rank < nonzeros[..., None], signs, 0).float() * scale


# --- an independent oracle: plain Python loops over one batch row, float64 -----------------------

def oracle_groups(metric_row, r, class_token=False, distill_token=False):
    """Output tokens of one row as lists of input positions, representative first, in the
    reference output order. Written from the reference page, points 2-9."""
    n = metric_row.shape[0]
    r = min(r, (n - class_token - distill_token) // 2)
    if r <= 0:
        return [[i] for i in range(n)]
    m = metric_row.double()
    m = m / m.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    best = []  # (score, A index, B index)
    for ai, ap in enumerate(a_pos):
        scores = []
        for bj, bp in enumerate(b_pos):
            s = float(m[ap] @ m[bp])
            if (class_token and ai == 0) or (distill_token and bj == 0):
                s = -math.inf
            scores.append(s)
        top = max(scores)
        best.append((top, ai, scores.index(top)))
    ranked = sorted(best, key=lambda e: -e[0])  # stable: equal scores by index
    merged, kept = ranked[:r], ranked[r:]
    if class_token:
        kept = sorted(kept, key=lambda e: e[1])
    b_groups = [[bp] for bp in b_pos]
    for _, ai, bj in sorted(merged, key=lambda e: e[1]):
        b_groups[bj].append(a_pos[ai])
    a_groups = [[a_pos[ai]] for _, ai, _ in kept]
    if distill_token:
        return a_groups[:1] + b_groups[:1] + a_groups[1:] + b_groups[1:]
    return a_groups + b_groups


def oracle_merge(x, metric, r, class_token=False, distill_token=False, mode="mean", size=None):
    """(merged x, merged size, groups per row) in float64."""
    outs, sizes, groups = [], [], []
    for b in range(x.shape[0]):
        g = oracle_groups(metric[b], r, class_token, distill_token)
        groups.append(g)
        xb = x[b].double()
        sb = torch.ones(x.shape[1], 1, dtype=torch.float64) if size is None else size[b].double()
        rows, srows = [], []
        for members in g:
            vals, w = xb[members], sb[members]
            if mode == "mean":
                rows.append(vals.mean(0))
            elif mode == "sum":
                rows.append(vals.sum(0))
            elif mode == "amax":
                rows.append(vals.max(0).values)
            elif mode == "wavg":
                rows.append((vals * w).sum(0) / w.sum())
            srows.append(w.sum(0))
        outs.append(torch.stack(rows))
        sizes.append(torch.stack(srows))
    return torch.stack(outs), torch.stack(sizes), groups


def separated_metric(batch: int, groups: int = 12) -> torch.Tensor:
    """A float32 ``(batch, 2 * groups, 16)`` metric whose matching is far from any tie: in a
    random plane, B token j at angle 30°·j and A token i at 30°·σ(i) ± 1.1°·(π(i) + 1) (σ, π
    random permutations), length 16. Each A token's best cosine beats its second best by > 0.016
    and the best cosines differ by > 5e-4, far above fp32 rounding, so the matching is the same
    however (and at whatever scale) it is computed."""
    frame, _ = torch.linalg.qr(torch.randn(batch, 16, 2, dtype=torch.float64))
    b_angle = torch.arange(groups, dtype=torch.float64) * 30
    offset = (torch.stack([torch.randperm(groups) for _ in range(batch)]) + 1) * 1.1
    sign = torch.randint(0, 2, (batch, groups)) * 2 - 1
    a_angle = torch.stack([torch.randperm(groups) for _ in range(batch)]) * 30 + sign * offset
    angles = torch.stack([a_angle, b_angle.expand(batch, groups)], dim=-1).reshape(batch, 2 * groups)
    plane = torch.stack([angles.deg2rad().cos(), angles.deg2rad().sin()], dim=-1) * 16
    return (plane @ frame.transpose(1, 2)).float()


CASES = [  # (B, N, r, class_token, distill_token)
    (2, 16, 3, False, False),
    (2, 17, 5, True, False),
    (1, 16, 4, True, True),
    (3, 15, 1, False, True),
    (2, 13, 100, True, False),  # capped at (13 - 1) // 2 = 6
    (2, 12, 100, False, False),  # capped at 6: every A token merges
    (1, 197, 16, True, False),
]


# --- hand-computed cases -------------------------------------------------------------------------

def _angles_metric(degrees):
    t = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([t.cos(), t.sin()], dim=-1)[None].float()


# A = positions 0, 2, 4 at 0°, 80°, 200°; B = positions 1, 3, 5 at 90°, 5°, 180°.
# Best partners: A0→pos3 (cos 5° = .996), A1→pos1 (cos 10° = .985), A2→pos5 (cos 20° = .940).
HAND_METRIC = _angles_metric([0, 90, 80, 5, 200, 180])
HAND_X = torch.arange(6, dtype=torch.float32)[None, :, None]


@pytest.mark.parametrize("r, class_token, distill_token, expected", [
    (1, False, False, [2, 4, 1, 1.5, 5]),  # A0 into pos3; kept A in score order: pos2, pos4
    (2, False, False, [4, 1.5, 1.5, 5]),  # A0 into pos3 and A1 (pos2) into pos1
    (1, True, False, [0, 4, 1.5, 3, 5]),  # CLS protected: A1 into pos1; kept A sorted
    (1, True, True, [0, 1, 2, 3, 4.5]),  # B0 protected too: A1 prefers pos3 (.259) < A2's .940
])
def test_hand_computed(r, class_token, distill_token, expected):
    merge, _ = bipartite_soft_matching(HAND_METRIC, r, class_token, distill_token)
    assert merge(HAND_X).flatten().tolist() == expected


def test_hand_computed_modes_and_unmerge():
    merge, unmerge = bipartite_soft_matching(HAND_METRIC, 1)
    assert merge(HAND_X, mode="sum").flatten().tolist() == [2, 4, 1, 3, 5]
    assert merge(HAND_X, mode="amax").flatten().tolist() == [2, 4, 1, 3, 5]
    # merged A0 gets a copy of its destination (pos3); all other tokens return to their slots
    assert unmerge(merge(HAND_X)).flatten().tolist() == [1.5, 1, 2, 1.5, 4, 5]


# --- parity with the oracle on random fp32 metrics -----------------------------------------------

@pytest.mark.parametrize("batch, n, r, class_token, distill_token", CASES)
@pytest.mark.parametrize("mode", ["mean", "sum", "amax"])
def test_merge_matches_oracle(batch, n, r, class_token, distill_token, mode):
    metric, x = exact_metric(batch, n, 8), torch.randn(batch, n, 5)
    merge, _ = bipartite_soft_matching(metric, r, class_token, distill_token)
    expected, _, _ = oracle_merge(x, metric, r, class_token, distill_token, mode=mode)
    out = merge(x, mode=mode)
    assert out.shape == expected.shape
    assert_close(out, expected, reduction=n)


@pytest.mark.parametrize("batch, n, r, class_token, distill_token", CASES)
def test_merge_wavg_and_source_match_oracle(batch, n, r, class_token, distill_token):
    metric, x = exact_metric(batch, n, 8), torch.randn(batch, n, 5)
    size = torch.randint(1, 4, (batch, n, 1)).float()
    merge, _ = bipartite_soft_matching(metric, r, class_token, distill_token)
    expected, expected_size, groups = oracle_merge(x, metric, r, class_token, distill_token,
                                                   mode="wavg", size=size)
    out, out_size = merge_wavg(merge, x, size)
    assert_close(out, expected, reduction=n)
    assert torch.equal(out_size, expected_size.float())

    source = merge_source(merge, x)
    assert source.dtype == torch.float32 and source.shape == (batch, len(groups[0]), n)
    for b, row_groups in enumerate(groups):
        for g, members in enumerate(row_groups):
            assert source[b, g].nonzero().flatten().tolist() == sorted(members)


def test_default_size_is_ones_in_x_dtype():
    metric, x = torch.randn(2, 10, 4), torch.randn(2, 10, 3, dtype=torch.float64)
    merge, _ = bipartite_soft_matching(metric, 2)
    out, size = merge_wavg(merge, x)
    assert size.dtype == torch.float64 and size.shape == (2, 8, 1)
    assert size.sum().item() == 2 * 10  # every original token is counted once


def test_two_layers_compose_sizes_and_sources():
    metric1, x = torch.randn(2, 21, 8), torch.randn(2, 21, 4)
    merge1, _ = bipartite_soft_matching(metric1, 4, class_token=True)
    x1, size1 = merge_wavg(merge1, x)
    source1 = merge_source(merge1, x)
    metric2 = torch.randn(2, 17, 8)
    merge2, _ = bipartite_soft_matching(metric2, 4, class_token=True)
    x2, size2 = merge_wavg(merge2, x1, size1)
    source2 = merge_source(merge2, x1, source1)
    assert torch.equal(source2.sum(-1, keepdim=True), size2)  # size = patches in the token
    assert torch.equal(source2.sum(1), torch.ones(2, 21))  # each patch in exactly one token
    # the size-weighted average over two layers is the plain mean of the original patches
    assert_close(x2, (source2.double() @ x.double()) / size2.double(), reduction=21)


# --- edge cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0, -3])
def test_r_not_positive_is_identity(r):
    metric, x = torch.randn(2, 9, 4), torch.randn(2, 9, 3)
    merge, unmerge = bipartite_soft_matching(metric, r)
    assert merge(x) is x and merge(x, mode="sum") is x and unmerge(x) is x
    out, size = merge_wavg(merge, x)
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 9, 1))


@pytest.mark.parametrize("n, class_token, distill_token, cap", [
    (2, True, False, 0), (3, True, True, 0), (4, True, True, 1), (9, False, False, 4), (9, True, False, 4),
])
def test_r_is_capped(n, class_token, distill_token, cap):
    metric, x = torch.randn(1, n, 4), torch.randn(1, n, 3)
    merge, _ = bipartite_soft_matching(metric, 50, class_token, distill_token)
    assert merge(x).shape[1] == n - cap


@pytest.mark.parametrize("batch, n, r, class_token, distill_token", CASES)
def test_protected_tokens_are_never_merged(batch, n, r, class_token, distill_token):
    metric, x = torch.randn(batch, n, 8), torch.randn(batch, n, 5)
    merge, _ = bipartite_soft_matching(metric, r, class_token, distill_token)
    out = merge(x)
    if class_token:
        assert torch.equal(out[:, 0], x[:, 0])
    if distill_token:
        assert torch.equal(out[:, 1], x[:, 1])


def test_kept_a_order_is_descending_score_without_class_token():
    metric, x = exact_metric(1, 30, 8), torch.arange(30.0)[None, :, None]
    merge, _ = bipartite_soft_matching(metric, 5)
    m = metric[0] / metric[0].norm(dim=-1, keepdim=True)
    best = (m[::2] @ m[1::2].T).max(-1).values
    kept = (merge(x)[0, :10, 0] / 2).long()  # A positions 2i -> i
    assert kept.tolist() == best.argsort(descending=True, stable=True)[5:].tolist()  # ties by index
    merge_cls, _ = bipartite_soft_matching(metric, 5, class_token=True)
    kept_cls = merge_cls(x)[0, :10, 0]
    assert kept_cls.tolist() == sorted(kept_cls.tolist())


@pytest.mark.parametrize("batch, n, r, class_token, distill_token", CASES)
def test_unmerge_round_trip(batch, n, r, class_token, distill_token):
    metric, x = exact_metric(batch, n, 8), torch.randn(batch, n, 5)
    merge, unmerge = bipartite_soft_matching(metric, r, class_token, distill_token)
    y = merge(x)
    back = unmerge(y)
    assert back.shape == x.shape
    # every member of a group holds the group's value ("amax": the mean of k equal fp32 values is
    # not always exactly that value, e.g. 7 copies, and exact ties make such groups common)
    assert torch.equal(merge(back, mode="amax"), y)
    _, _, groups = oracle_merge(x, metric, r, class_token, distill_token)
    for b in range(batch):
        for g, members in enumerate(groups[b]):
            for p in members:
                assert torch.equal(back[b, p], y[b, g])


def test_zero_metric_row_is_nan_like_reference():
    metric = torch.randn(1, 8, 4)
    metric[0, 3] = 0  # no eps in the normalization: this B token's scores are NaN
    merge, _ = bipartite_soft_matching(metric, 1)
    out = merge(torch.randn(1, 8, 2))
    assert out.shape == (1, 7, 2)


def test_exact_metric_scores_are_exact():
    """The premise of the exact tests: fp32 scores (torch BLAS, numpy) equal the float64 ones."""
    import numpy as np

    metric = exact_metric(3, 40, 16)
    unit = unit_rows(metric)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    exact = unit_rows(metric.double())
    expected = exact[:, ::2] @ exact[:, 1::2].transpose(1, 2)
    assert torch.equal(scores.double(), expected)
    assert np.array_equal(np.matmul(unit[:, ::2].numpy(), unit[:, 1::2].transpose(1, 2).numpy()), scores.numpy())
    assert torch.equal(scores * 16, (scores * 16).round())  # multiples of 1/16: ties are exact


def test_equal_scores_rank_by_index():
    """A stable ranking: equal scores keep index order (ToMe's unstable sort reorders them from
    about 50 A tokens on)."""
    num_a = 80
    metric = torch.ones(1, 2 * num_a, 4)
    positions = torch.arange(2.0 * num_a)[None, :, None]
    merge, _ = bipartite_soft_matching(metric, 10)
    # the first 10 A tokens merge into B0; the kept A follow in index order
    assert merge(positions, mode="amax").flatten().tolist()[:num_a - 10] == [2.0 * i for i in range(10, num_a)]
    source = merge_source(merge, positions)
    assert source[0, num_a - 10].nonzero().flatten().tolist() == sorted([2 * i for i in range(10)] + [1])


# --- scale invariance ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2.0 ** 70, 2.0 ** -100, "per-row"])
def test_scaled_metric_merges_like_unscaled(scale):
    """Cosine similarity is scale-invariant: with power-of-two scales (exact in fp32) whose
    squares overflow (2**140) or underflow (2**-200) the merge is bitwise the unscaled one."""
    metric, x = exact_metric(2, 40, 16), torch.randn(2, 40, 5)
    if scale == "per-row":  # rows over- and underflowing and normal rows, side by side
        scale = 2.0 ** torch.tensor([70, -100, 0, 40, -60, 90])[torch.randint(6, (2, 40, 1))]
    for kwargs in ({}, {"class_token": True}, {"class_token": True, "distill_token": True}):
        merge, unmerge = bipartite_soft_matching(metric, 9, **kwargs)
        merge_s, unmerge_s = bipartite_soft_matching(metric * scale, 9, **kwargs)
        assert torch.equal(merge_s(x), merge(x))
        assert torch.equal(merge_source(merge_s, x), merge_source(merge, x))
        assert torch.equal(unmerge_s(merge(x)), unmerge(merge(x)))


@pytest.mark.parametrize("scale", [1e19, 1e-30])
def test_metric_scaled_past_fp32_range_merges_like_unscaled(scale):
    """The issue's scales (not powers of two): the norm overflows to inf (every cosine was 0) or
    underflows to 0 (every cosine was NaN); on a metric far from ties the merge is unchanged."""
    metric, x = separated_metric(2), torch.randn(2, 24, 5)
    assert not torch.isfinite((metric * scale).norm(dim=-1)).all() or (metric * scale).norm(dim=-1).eq(0).all()
    merge, _ = bipartite_soft_matching(metric, 7, class_token=True)
    merge_s, _ = bipartite_soft_matching(metric * scale, 7, class_token=True)
    assert torch.equal(merge_source(merge_s, x), merge_source(merge, x))
    assert torch.equal(merge_s(x), merge(x))


def test_unit_rows_is_tomes_normalization_on_normal_rows():
    metric = torch.randn(4, 50, 64) * torch.logspace(-12, 12, 50)[:, None]
    assert torch.equal(unit_rows(metric), metric / metric.norm(dim=-1, keepdim=True))
    half = (torch.randn(4, 50, 64) * torch.logspace(-3, 2, 50)[:, None]).half()  # norms within fp16
    assert torch.equal(unit_rows(half), half / half.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_unit_rows_rescues_extreme_rows(dtype):
    """Rows whose norm over- or underflows get the unit vector; a zero row stays NaN."""
    info = torch.finfo(dtype)
    row = torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=torch.float64)
    rows = torch.stack([row / 12 * info.max, row / 12 * info.tiny, row, torch.zeros(4, dtype=torch.float64)])
    unit = unit_rows(rows.to(dtype)[None])[0]
    assert torch.isfinite(rows.to(dtype)).all()
    assert_close(unit[:3], (row / 13).expand(3, 4), dtype=dtype, reduction=4)
    assert unit[3].isnan().all()


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    metric, x = torch.randn(2, 10, 4), torch.randn(2, 10, 6)
    with pytest.raises(ValueError, match=r"metric must be \(B, N, C\), got shape \(10, 4\)"):
        bipartite_soft_matching(metric[0], 2)
    with pytest.raises(TypeError, match="metric must have dtype in .*got torch.int64"):
        bipartite_soft_matching(metric.long(), 2)
    with pytest.raises(TypeError, match="r must be an int .*got float"):
        bipartite_soft_matching(metric, 2.0)
    for r in (3, 0):  # merging and identity functions both know their metric's (B, N)
        merge, unmerge = bipartite_soft_matching(metric, r)
        for bad in (x[:, :9], torch.randn(2, 12, 6), torch.randn(3, 10, 6)):
            expected = re.escape(f"x must be (B, N, C) = (2, 10, C), the batch and tokens of the metric the merge "
                                 f"was built on, got shape {tuple(bad.shape)}")
            with pytest.raises(ValueError, match=expected):
                merge(bad)
            with pytest.raises(ValueError, match=r"x must be \(B, N, C\) = \(2, 10, C\)"):
                merge_wavg(merge, bad)
            with pytest.raises(ValueError, match=r"x must be \(B, N, C\) = \(2, 10, C\)"):
                merge_source(merge, bad)
        with pytest.raises(ValueError, match=rf"y must be \(B, N - r, C\) = \(2, {10 - r}, C\).*got shape \(2, 9, 6\)"):
            unmerge(torch.randn(2, 9, 6))
        with pytest.raises(ValueError, match=r"x must be \(B, N, C\) = \(2, 10, C\), got shape \(10, 6\)"):
            merge(x[0])
        with pytest.raises(ValueError, match=r"size must be \(B, N, 1\) = \(2, 10, 1\).*got shape \(2, 9, 1\)"):
            merge_wavg(merge, x, torch.ones(2, 9, 1))
        with pytest.raises(ValueError, match=r"size must be \(B, N, 1\) = \(2, 10, 1\), got shape \(2, 10, 2\)"):
            merge_wavg(merge, x, torch.ones(2, 10, 2))
        with pytest.raises(ValueError, match=r"source must be \(B, N, N0\) = \(2, 10, N0\).*got shape \(2, 9, 10\)"):
            merge_source(merge, x, torch.ones(2, 9, 10))


@pytest.mark.parametrize("r, message", [
    ("4", "r must be an int, an \\(r, inflection\\) tuple or a list of ints, got str"),
    (4.0, "r must be an int, an .* got float"),
    ((1, 2, 3), "r as a tuple must be \\(r: int, inflection: float\\), got \\(1, 2, 3\\)"),
    ((1.5, 0.5), "r as a tuple must be"),
    ([1, "2"], "r as a list must hold ints, got \\[1, '2'\\]"),
    (True, "r must be an int, .* got bool"),
])
def test_parse_r_bad_input(r, message):
    with pytest.raises(TypeError, match=message):
        parse_r(3, r)


def test_parse_r_bad_num_layers():
    with pytest.raises(TypeError, match="num_layers must be an int, got str"):
        parse_r("3", 4)
    with pytest.raises(ValueError, match="num_layers must be >= 0, got -1"):
        parse_r(-1, 4)


# --- gradients ---------------------------------------------------------------------------------

def test_merge_wavg_gradients():
    metric = exact_metric(2, 15, 8).requires_grad_()
    x = torch.randn(2, 15, 4, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 15, 1)).double().requires_grad_()
    merge, _ = bipartite_soft_matching(metric, 5, class_token=True)
    torch.autograd.gradcheck(lambda x_, s_: merge_wavg(merge, x_, s_), (x, size))
    out, out_size = merge_wavg(merge, x, size)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    assert metric.grad is None  # no gradient through the matching
    # dL/dx_i = s_i / S_g * dL/dy_g, with g the token that holds i
    _, _, groups = oracle_merge(x.detach(), metric.detach(), 5, True)
    for b in range(2):
        for g, members in enumerate(groups[b]):
            for p in members:
                expected = size[b, p] / out_size[b, g] * grad[b, g]
                torch.testing.assert_close(x.grad[b, p], expected.detach())


# --- the r schedule ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers, r, expected", [
    (12, (16, -1), [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]),
    (12, 16, [16] * 12),
    (4, (8, 0), [8, 8, 8, 8]),
    (5, (8, 1), [0, 4, 8, 12, 16]),
    (5, (10, 0.5), [5, 7, 10, 12, 15]),
    (4, [3, 2], [3, 2, 0, 0]),
    (2, [3, 2, 1], [3, 2, 1]),
    (1, 7, [7]),
])
def test_parse_r(num_layers, r, expected):
    assert parse_r(num_layers, r) == expected


def test_vit_b16_token_counts_with_cap():
    counts, n = [197], 197
    for r in parse_r(12, 16):
        n -= min(r, (n - 1) // 2)
        counts.append(n)
    assert counts == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
