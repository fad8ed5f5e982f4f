"""vtok_fast.reduce.dart: DART against a plain per-image loop of the official rule (float64), the
per-pivot quota rule on a hand-made case, budgets, prefix, ties, non-finite tokens, empty batches,
fp16, gradients, the compress() entry, the bench's baseline, and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import vtok_fast
from vtok_fast.reduce.compress import METHODS, compress
from vtok_fast.reduce.compressed import Compressed
from vtok_fast.reduce.dart import PIVOTS, dart, dart_reference, quotas


def official_loop(tokens, keep, pivots=PIVOTS, keys=None, metric=None, prefix=0):
    """The official ``get_retained_image_token`` rule written out plainly, per image, in float64:
    pivots = top L1 norm of the keys (heads concatenated; without keys, of the similarity vectors),
    visited in ascending index order; pivot i takes ``quotas(keep, pivots)[i]`` tokens, the least
    cosine-similar to it among those nobody took yet. Returns ``(B, keep)`` kept patch indices."""
    tokens = tokens.double()
    states = (tokens if metric is None else metric.double())[:, prefix:]
    result = []
    for b in range(tokens.shape[0]):
        if keys is None:
            norm = states[b].abs().sum(-1)
        else:
            norm = keys[b].double().permute(1, 0, 2).flatten(1)[prefix:].abs().sum(-1)
        shares = quotas(keep, pivots)
        chosen = sorted(int(i) for i in norm.topk(len(shares)).indices)
        taken = set(chosen)
        for pivot, share in zip(chosen, shares):
            free = [i for i in range(states.shape[1]) if i not in taken]
            cos = [float(F.cosine_similarity(states[b, pivot], states[b, i], dim=0)) for i in free]
            order = sorted(range(len(free)), key=lambda j: (cos[j], free[j]))  # least similar, then index
            taken.update(free[j] for j in order[:share])
        result.append(sorted(taken))
    return torch.tensor(result, dtype=torch.long).view(tokens.shape[0], keep)


def check_pruned(c: Compressed, tokens, prefix, keep):
    """A pruning result: prefix first, ``keep`` patch tokens in original order, the rest dropped."""
    batch, num_tokens, _ = tokens.shape
    assert c.tokens.shape == (batch, prefix + keep, tokens.shape[2]) and c.tokens.dtype == tokens.dtype
    assert c.counts is None and (c.sizes == 1).all()
    assert torch.equal(c.positions[:, :prefix], torch.arange(prefix).expand(batch, prefix))
    assert (c.positions[:, 1:] > c.positions[:, :-1]).all()
    assert torch.equal(c.tokens, tokens.gather(1, c.positions.unsqueeze(-1).expand(-1, -1, tokens.shape[2])))
    slots = torch.arange(prefix + keep).expand(batch, -1)
    expected = torch.full((batch, num_tokens), -1).scatter_(1, c.positions, slots)
    assert torch.equal(c.source, expected)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("inputs", ["keys", "metric", "tokens"])
@pytest.mark.parametrize("keep,pivots", [(0, 4), (2, 4), (4, 4), (13, 4), (13, 1), (25, 8), (36, 3)])
def test_matches_the_official_rule(batch, prefix, inputs, keep, pivots):
    tokens = torch.randn(batch, prefix + 36, 16)
    extra = {"keys": {"keys": torch.randn(batch, 3, prefix + 36, 8)},
             "metric": {"metric": torch.randn(batch, prefix + 36, 12)}, "tokens": {}}[inputs]
    c = dart(tokens, keep, pivots=pivots, prefix=prefix, **extra)
    check_pruned(c, tokens, prefix, keep)
    assert torch.equal(c.positions[:, prefix:] - prefix, official_loop(tokens, keep, pivots, prefix=prefix, **extra))
    reference = dart_reference(tokens.double(), keep, pivots=pivots, prefix=prefix,
                               **{k: v.double() for k, v in extra.items()})
    assert torch.equal(c.tokens.double(), reference)  # the shared loop (bench baseline) agrees


def test_each_pivot_takes_its_own_least_similar_tokens():
    """The official per-pivot quotas, not "lowest maximum similarity to any pivot": pivot (10, 0)
    takes (-1, 0), pivot (0, 10) takes (0, -1); the diagonal (-0.7, -0.7), least similar to the
    pivots' closest, is not kept."""
    tokens = torch.tensor([[[-0.7, -0.7], [10.0, 0.0], [-1.0, 0.0], [0.0, 10.0], [0.0, -1.0]]])
    c = dart(tokens, 4, pivots=2)
    assert c.positions.tolist() == [[1, 2, 3, 4]] and c.source.tolist() == [[-1, 0, 1, 2, 3]]
    assert dart(tokens, 3, pivots=2).positions.tolist() == [[1, 2, 3]]  # the first pivot takes the one extra
    assert dart(tokens, 1, pivots=2).positions.tolist() == [[1]]  # keep < pivots: the largest norm first
    assert quotas(132, 4) == [32] * 4 and quotas(10, 4) == [2, 2, 1, 1] and quotas(2, 4) == [0, 0]


def test_pivots_are_the_largest_key_l1_norms():
    tokens, keys = torch.randn(2, 1 + 30, 8), torch.randn(2, 4, 1 + 30, 6)
    keys[:, :, 0] = 100.0  # the prefix is never a pivot
    keys[0, :, 1 + 7], keys[1, 2, 1 + 20, 0] = 5.0, -500.0  # L1, every head
    c = dart(tokens, 5, pivots=1, keys=keys, prefix=1)
    assert 1 + 7 in c.positions[0].tolist() and 1 + 20 in c.positions[1].tolist()


def test_ratio_keep_all_and_prefix():
    tokens = torch.randn(2, 2 + 20, 8)
    assert torch.equal(dart(tokens, ratio=0.25, prefix=2).positions, dart(tokens, 5, prefix=2).positions)
    assert dart(tokens, ratio=0.01, prefix=2).tokens.shape == (2, 2, 8)  # round(0.2) = 0
    full = dart(tokens, 20, prefix=2)
    assert torch.equal(full.tokens, tokens) and torch.equal(full.source, torch.arange(22).expand(2, -1))
    assert torch.equal(dart(tokens, ratio=1.0, prefix=2).tokens, tokens)
    assert torch.equal(dart(tokens, 6, prefix=2).tokens[:, :2], tokens[:, :2])


def test_ties_go_to_the_lower_index():
    same = torch.ones(1, 10, 4)
    assert dart(same, 3, pivots=1).positions.tolist() == [[0, 1, 2]]
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [2.0, 0.0]]])
    # pivot: token 4 (largest norm); least similar to it: tokens 2 and 3 tie, 2 goes first
    assert dart(tokens, 2, pivots=1).positions.tolist() == [[2, 4]]


@pytest.mark.parametrize("where", ["tokens", "metric", "keys"])
def test_nonfinite_tokens_rank_last(where):
    """A NaN (or inf) token is never kept before a finite one, as a pivot or as a candidate: an
    image with f finite tokens keeps max(0, keep - f) non-finite ones, the lowest-index first."""
    tokens, metric, keys = torch.randn(2, 1 + 12, 6), torch.randn(2, 1 + 12, 5), torch.randn(2, 2, 1 + 12, 3)
    bad = ([1 + 2, 1 + 5], [1 + 2, 1 + 5, 1 + 11])
    target = {"tokens": tokens, "metric": metric, "keys": keys[:, 1]}[where]
    target[0, bad[0]], target[1, bad[1]] = float("nan"), float("inf")
    extra = {"metric": metric} if where == "metric" else {"keys": keys} if where == "keys" else {}
    for keep in (3, 9, 10, 11, 12):
        for pivots in (1, 4, 12):
            c = dart(tokens, keep, pivots=pivots, prefix=1, **extra)
            for row, bad_row in zip(c.positions.tolist(), bad):
                assert sorted(set(row) & set(bad_row)) == bad_row[:max(0, keep - (12 - len(bad_row)))]


def test_nan_pivot_takes_candidates_in_index_order():
    tokens = torch.full((1, 6, 3), float("nan"))
    tokens[0, 4] = 1.0
    # pivots: the finite token 4, then the first NaN token 0; the NaN pivot's candidates tie
    assert dart(tokens, 3, pivots=2).positions.tolist() == [[0, 1, 4]]


@pytest.mark.parametrize("method_keep", [("keep", 4), ("ratio", 0.5)])
def test_empty_batch_has_the_budget_width(method_keep):
    name, value = method_keep
    for extra in ({}, {"keys": torch.randn(0, 2, 17, 4)}, {"metric": torch.randn(0, 17, 3)}):
        c = compress(torch.randn(0, 17, 8), "dart", prefix=1, **{name: value}, **extra)
        width = 1 + (4 if name == "keep" else 8)
        assert c.tokens.shape == (0, width, 8) and c.positions.shape == c.sizes.shape == (0, width)
        assert c.source.shape == (0, 17) and c.counts is None
        reference = dart_reference(torch.randn(0, 17, 8), **{name: value}, prefix=1)
        assert torch.equal(reference, torch.zeros(0, width, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ranks_in_fp32(dtype):
    tokens, keys = torch.randn(3, 1 + 40, 32).to(dtype), torch.randn(3, 2, 1 + 40, 8).to(dtype)
    c = dart(tokens, 10, keys=keys, prefix=1)
    assert c.tokens.dtype == dtype
    check_pruned(c, tokens, 1, 10)
    assert torch.equal(c.positions[:, 1:] - 1, official_loop(tokens, 10, keys=keys, prefix=1))


def test_gradients_flow_to_the_kept_tokens():
    tokens = torch.randn(2, 1 + 16, 8, requires_grad=True)
    metric = torch.randn(2, 1 + 16, 4, requires_grad=True)
    c = dart(tokens, 5, metric=metric, prefix=1)
    (c.tokens * torch.arange(1.0, 9.0)).sum().backward()
    kept = torch.zeros(2, 17, dtype=torch.bool).scatter_(1, c.positions, True)
    assert torch.equal(tokens.grad[kept], torch.arange(1.0, 9.0).expand(int(kept.sum()), -1))
    assert (tokens.grad[~kept] == 0).all() and metric.grad is None  # the selection is not differentiable


def test_compress_entry_export_and_other_keys_layouts():
    tokens, keys = torch.randn(2, 1 + 16, 8), torch.randn(2, 4, 1 + 16, 2)
    assert METHODS["dart"] is dart and vtok_fast.dart is dart
    c = compress(tokens, "dart", grid=(4, 4), prefix=1, keep=6, pivots=2, keys=keys)
    assert torch.equal(c.positions, dart(tokens, 6, pivots=2, keys=keys, prefix=1).positions)
    assert torch.equal(dart(tokens, 6, keys=keys.transpose(1, 2).reshape(2, 1, 17, 8), prefix=1).positions,
                       dart(tokens, 6, keys=keys, prefix=1).positions)  # heads concatenated: one L1 norm
    assert c.without_prefix(1).tokens.shape == (2, 6, 8)
    assert (c.unmerge(fill=3.0)[c.source < 0] == 3.0).all()


def test_bad_inputs_name_what_is_wrong():
    tokens = torch.randn(2, 17, 8)
    cases = [
        (ValueError, r"keep=17 is larger than the 16 patch tokens", lambda: dart(tokens, 17, prefix=1)),
        (TypeError, r"exactly one budget of keep=, ratio=; got none", lambda: dart(tokens, prefix=1)),
        (TypeError, r"exactly one budget of keep=, ratio=; got keep, ratio", lambda: dart(tokens, 3, ratio=0.5)),
        (ValueError, r"ratio must be a fraction", lambda: dart(tokens, ratio=0.0)),
        (TypeError, r"keep must be an int, got float", lambda: dart(tokens, 2.0)),
        (ValueError, r"pivots must be >= 1", lambda: dart(tokens, 3, pivots=0)),
        (TypeError, r"pivots must be an int, got NoneType", lambda: dart(tokens, 3, pivots=None)),
        (ValueError, r"must have tokens' B = 2 and N = 17",
         lambda: dart(tokens, 3, keys=torch.randn(2, 2, 16, 4))),
        (ValueError, r"keys must be \(B, heads, N, d\)", lambda: dart(tokens, 3, keys=torch.randn(2, 17, 4))),
        (ValueError, r"metric must be \(B, N, C\) with tokens' \(B, N\)",
         lambda: dart(tokens, 3, metric=tokens[:, 1:])),
        (TypeError, r"metric must have dtype", lambda: dart(tokens, 3, metric=tokens.long())),
        (TypeError, r"tokens must have dtype", lambda: dart(tokens.double(), 3)),
        (ValueError, r"prefix must be an int in \[0, N = 17\]", lambda: dart(tokens, 0, prefix=18)),
        (TypeError, r"compress\(method='dart'\) takes the budget arguments keep, ratio, pivots, keys, metric; "
                    r"got \['pivot'\] \(unknown pivot\)", lambda: compress(tokens, "dart", pivot=2)),
        (ValueError, r"grid=\(4, 5\) holds 20 tokens",
         lambda: compress(tokens, "dart", grid=(4, 5), prefix=1, keep=2)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
