"""The ToMe reference contract (vtok_fast/tome.py) against hand-computed cases, a loop-by-loop
float64 oracle written from the reference page, and the page's properties."""
import math

import pytest
import torch

from vtok_fast import bipartite_soft_matching, merge_source, merge_wavg, parse_r
from helpers import assert_close


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
    ranked = sorted(best, key=lambda e: -e[0])  # no ties in random data
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
    metric, x = torch.randn(batch, n, 8), torch.randn(batch, n, 5)
    merge, _ = bipartite_soft_matching(metric, r, class_token, distill_token)
    expected, _, _ = oracle_merge(x, metric, r, class_token, distill_token, mode=mode)
    out = merge(x, mode=mode)
    assert out.shape == expected.shape
    assert_close(out, expected, reduction=n)


@pytest.mark.parametrize("batch, n, r, class_token, distill_token", CASES)
def test_merge_wavg_and_source_match_oracle(batch, n, r, class_token, distill_token):
    metric, x = torch.randn(batch, n, 8), torch.randn(batch, n, 5)
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
    metric, x = torch.randn(1, 30, 8), torch.arange(30.0)[None, :, None]
    merge, _ = bipartite_soft_matching(metric, 5)
    m = metric[0] / metric[0].norm(dim=-1, keepdim=True)
    best = (m[::2] @ m[1::2].T).max(-1).values
    kept = (merge(x)[0, :10, 0] / 2).long()  # A positions 2i -> i
    assert kept.tolist() == best.argsort(descending=True)[5:].tolist()
    merge_cls, _ = bipartite_soft_matching(metric, 5, class_token=True)
    kept_cls = merge_cls(x)[0, :10, 0]
    assert kept_cls.tolist() == sorted(kept_cls.tolist())


@pytest.mark.parametrize("batch, n, r, class_token, distill_token", CASES)
def test_unmerge_round_trip(batch, n, r, class_token, distill_token):
    metric, x = torch.randn(batch, n, 8), torch.randn(batch, n, 5)
    merge, unmerge = bipartite_soft_matching(metric, r, class_token, distill_token)
    y = merge(x)
    back = unmerge(y)
    assert back.shape == x.shape
    assert torch.equal(merge(back), y)  # every member of a group holds the group's value
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


# --- gradients ---------------------------------------------------------------------------------

def test_merge_wavg_gradients():
    metric = torch.randn(2, 15, 8, requires_grad=True)
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
