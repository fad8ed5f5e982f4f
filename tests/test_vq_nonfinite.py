"""Non-finite input rows (NaN or inf) in a VQ training step: they are quantized (their outputs and
loss are whatever NaN gives) but never reach the EMA statistics, the k-means init or the dead-code
samples. A step on a batch holding such rows leaves every layer exactly as the same step on the
batch without them, for the native layers and the vector-quantize-pytorch compat layer alike."""
import copy

import pytest
import torch

from vtok_fast.compat import vector_quantize_pytorch as compat
from vtok_fast.encode.residual_vq import GroupedResidualVQ, ResidualVQ
from vtok_fast.encode.vq import VectorQuantizer

BAD_ROWS = (3, 17, 40)  # rows of a (48, 8) batch: one NaN, one +inf and one -inf value


def batches(steps=4, rows=48, dim=8, seed=0):
    """``steps`` pairs ``(with_bad, clean)``: the first batch has non-finite values in ``BAD_ROWS``;
    ``clean`` is it without those rows; later batches are clean in both."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        x = torch.randn(rows, dim, generator=gen)
        if step > 0:
            out.append((x, x))
            continue
        bad = x.clone()
        for row, value in zip(BAD_ROWS, (float("nan"), float("inf"), -float("inf"))):
            bad[row, row % dim] = value
        keep = torch.ones(rows, dtype=torch.bool)
        keep[list(BAD_ROWS)] = False
        out.append((bad, x[keep]))
    return out


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
        assert torch.equal(value, sb[name]), name


def check_matches_clean_batches(make, **forward_kwargs):
    torch.manual_seed(0)
    with_bad = make().train()
    clean = copy.deepcopy(with_bad)
    for x_bad, x_clean in batches():
        keep = torch.isfinite(x_bad).all(-1)
        _, idx_bad, _ = with_bad(x_bad, **forward_kwargs)[:3]
        _, idx_clean, _ = clean(x_clean, **forward_kwargs)[:3]
        assert torch.equal(idx_bad[keep], idx_clean)  # the finite rows got the same codes
        assert_same_state(with_bad, clean)


VQ_CONFIGS = {
    "ema": dict(),
    "kmeans": dict(kmeans_init=True, kmeans_iters=3),
    "dead-codes": dict(dead_code_threshold=2.0, ema_decay=0.5),
    "learnable-dead-codes": dict(ema_decay=None, dead_code_threshold=1.0, usage_decay=0.5),
    "heads": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True, dead_code_threshold=1.0),
    "cosine": dict(metric="cosine", kmeans_init=True),
    "projected": dict(codebook_dim=4, dead_code_threshold=1.5),
}


@pytest.mark.parametrize("config", VQ_CONFIGS)
def test_vq_nonfinite_rows_never_reach_the_codebook(config):
    check_matches_clean_batches(lambda: VectorQuantizer(8, 16, **VQ_CONFIGS[config]))


@pytest.mark.parametrize("kwargs", [dict(), dict(kmeans_init=True), dict(threshold_ema_dead_code=2)],
                         ids=["ema", "kmeans", "dead-codes"])
def test_compat_vq_nonfinite_rows_never_reach_the_codebook(kwargs):
    check_matches_clean_batches(lambda: compat.VectorQuantize(dim=8, codebook_size=16, **kwargs))


def test_compat_vq_nan_row_issue_example():
    # the reported case: one NaN row, then clean steps; the codebook used to keep a NaN code
    torch.manual_seed(0)
    vq = compat.VectorQuantize(dim=8, codebook_size=16).train()
    x = torch.randn(64, 8)
    x[5, 2] = float("nan")
    _, _, loss = vq(x)
    assert loss.isnan()  # the step itself still reports the bad input
    for _ in range(3):
        vq(torch.randn(64, 8))
    assert torch.isfinite(vq.codebook).all() and torch.isfinite(vq.embed_sum).all()


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(kmeans_init=True, kmeans_iters=2, dead_code_threshold=1.0),
    dict(shared_codebook=True, dead_code_threshold=1.0),
    dict(beam_size=3),
], ids=["greedy", "kmeans-dead-codes", "shared", "beam"])
def test_residual_vq_nonfinite_rows_never_reach_the_codebooks(kwargs):
    check_matches_clean_batches(lambda: ResidualVQ(3, 8, 16, codebook_dim=4, **kwargs))


def test_grouped_and_compat_residual_vq_nonfinite_rows():
    # a group whose slice is finite still uses the row: compare the state only for finiteness
    for make in (lambda: GroupedResidualVQ(2, 8, 16, groups=2, dead_code_threshold=1.0),
                 lambda: compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, kmeans_init=True,
                                           threshold_ema_dead_code=1)):
        torch.manual_seed(0)
        layer = make().train()
        for x_bad, _ in batches():
            layer(x_bad)
        for name, value in layer.state_dict().items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), name
    check_matches_clean_batches(lambda: compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16,
                                                          kmeans_init=True, threshold_ema_dead_code=1))


def test_all_rows_nonfinite_is_an_empty_step():
    vq = VectorQuantizer(8, 16, kmeans_init=True, dead_code_threshold=1.0).train()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    _, idx, loss = vq(torch.full((5, 8), float("nan")))
    assert idx.shape == (5,) and loss.isnan()
    for name, value in vq.state_dict().items():  # no k-means init, EMA decay or sampler draw
        assert torch.equal(value, before[name]), name
    assert not bool(vq.initted)
