"""ResidualVQ beam search: exhaustive optimum with enough beams, greedy with one, training on the
winning path, and argument checks."""
import copy
import itertools

import pytest
import torch

from vtok_fast.encode.residual_vq import ResidualVQ


def squared_error(x, q):
    return ((x - q) ** 2).sum(-1)


def exhaustive_best_error(x, codebooks):
    """Smallest ``|x - sum of one code per layer|^2`` over all ``K**L`` paths, per row (float64)."""
    L, K, _ = codebooks.shape
    cb = codebooks.double()
    sums = torch.stack([sum(cb[layer, code] for layer, code in enumerate(path))
                        for path in itertools.product(range(K), repeat=L)])  # (K**L, D)
    return torch.cdist(x.double(), sums).pow(2).min(dim=1).values


def test_enough_beams_find_the_exhaustive_optimum(backend):
    # K=5, L=3: 25 beams keep every 2-layer path, so the last layer sees all 125 paths
    rvq = ResidualVQ(3, 6, 5).eval()
    x = torch.randn(33, 6)
    q, idx, _ = rvq(x, beam_size=25)
    best = exhaustive_best_error(x, rvq.codebooks.detach())
    # errors are fp32 sums of 6 squares of O(1) values: a few ulps of their magnitude
    torch.testing.assert_close(squared_error(x, q).double(), best, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, rvq.get_output_from_indices(idx), rtol=0, atol=0)


def test_one_beam_is_the_greedy_quantizer():
    torch.manual_seed(1)
    greedy = ResidualVQ(3, 8, 16, ema_decay=0.9, dead_code_threshold=0.5)
    beam1 = copy.deepcopy(greedy)
    beam1.beam_size = 1
    for _ in range(3):  # training steps: same codes, outputs, gradients and codebook updates
        x = torch.randn(2, 9, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        qa, ia, la = greedy(xa)
        qb, ib, lb = beam1(xb)
        assert torch.equal(ia, ib) and torch.equal(qa, qb) and torch.equal(la, lb)
        (qa.sum() + la.sum()).backward()
        (qb.sum() + lb.sum()).backward()
        assert torch.equal(xa.grad, xb.grad)
    for name, value in greedy.state_dict().items():
        assert torch.equal(value, beam1.state_dict()[name]), name


def test_beams_lower_the_mean_error():
    torch.manual_seed(2)
    rvq = ResidualVQ(4, 16, 32).eval()
    x = torch.randn(512, 16)
    errors = [squared_error(x, rvq(x, beam_size=b)[0]).mean().item() for b in (1, 4, 16)]
    # more beams search a superset of paths at the last layer; on 512 rows the mean drops strictly
    assert errors[0] > errors[1] > errors[2], errors


def test_training_step_trains_on_the_winning_path():
    torch.manual_seed(3)
    rvq = ResidualVQ(2, 8, 12, ema_decay=0.8, beam_size=4)
    before = copy.deepcopy(rvq).eval()
    x = torch.randn(3, 7, 8, requires_grad=True)
    q, idx, losses = rvq(x)
    # the codes are the beam search's on the codebooks before the step
    assert torch.equal(idx, before.beam_search(x.detach(), 4))
    # the straight-through value z + (code - z) is the code up to one fp32 rounding per layer
    torch.testing.assert_close(q, before.get_output_from_indices(idx), rtol=1e-6, atol=1e-6)
    residual = x.detach()
    for i, (layer, old) in enumerate(zip(rvq.layers, before.layers)):
        counts = torch.bincount(idx[..., i].flatten(), minlength=12).float()
        torch.testing.assert_close(layer.cluster_size[0], old.cluster_size[0].lerp(counts, 0.2))
        expected_loss = ((old.codebook[idx[..., i]] - residual) ** 2).mean()
        torch.testing.assert_close(losses[i], expected_loss)
        residual = residual - old.codebook[idx[..., i]]
    q.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eval_beam_size_and_kmeans_step_is_greedy():
    torch.manual_seed(4)
    rvq = ResidualVQ(2, 8, 6, kmeans_init=True, kmeans_iters=2, beam_size=3, eval_beam_size=5)
    greedy = copy.deepcopy(rvq)
    greedy.beam_size = None
    x = torch.randn(40, 8)
    _, idx, _ = rvq(x)  # initializes the codebooks: quantized greedily, as documented
    _, idx_greedy, _ = greedy(x)
    assert torch.equal(idx, idx_greedy)
    rvq.eval()
    assert rvq.eval_beam_size == 5
    assert torch.equal(rvq(x)[1], rvq.beam_search(x, 5))


def test_empty_and_nan_rows():
    rvq = ResidualVQ(2, 4, 8).eval()
    q, idx, losses = rvq(torch.randn(0, 4), beam_size=3)
    assert q.shape == (0, 4) and idx.shape == (0, 2)
    assert torch.equal(losses, torch.zeros(2))  # a mean over no rows is 0 here, not NaN
    x = torch.randn(3, 4)
    x[1] = float("nan")
    _, idx, _ = rvq(x, beam_size=3)
    assert ((idx >= 0) & (idx < 8)).all()


def test_bad_beam_sizes():
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match=r"beam_size must be an int in \[1, 64\] or None"):
            ResidualVQ(2, 4, 8, beam_size=bad)
    with pytest.raises(ValueError, match="eval_beam_size must be an int"):
        ResidualVQ(2, 4, 8, eval_beam_size=-1)
    with pytest.raises(ValueError, match="needs metric='l2'"):
        ResidualVQ(2, 4, 8, metric="cosine", beam_size=2)
    rvq = ResidualVQ(2, 4, 8, metric="cosine")
    with pytest.raises(ValueError, match="needs metric='l2'"):
        rvq(torch.randn(3, 4), beam_size=2)
    assert rvq(torch.randn(3, 4), beam_size=1)[1].shape == (3, 2)
