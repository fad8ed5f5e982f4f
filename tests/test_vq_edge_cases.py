"""VectorQuantizer / ResidualVQ edge cases: empty batches (zero loss, no state change, also over
torch.distributed ranks), index validation in ``get_codes_from_indices`` /
``get_output_from_indices``, and argument errors that name the argument."""
import datetime
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vtok_fast.encode.residual_vq import ResidualVQ
from vtok_fast.encode.vq import VectorQuantizer


def snapshot(module):
    """Every parameter and buffer (``perplexity`` / ``usage`` too), cloned."""
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():  # bitwise, NaN == NaN (perplexity starts as NaN)
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def assert_zero_loss(loss, x, shape=()):
    assert loss.shape == shape and loss.dtype == torch.float32
    assert torch.equal(loss, torch.zeros(shape))
    assert loss.requires_grad  # still in the graph: backward works and gives a zero gradient
    (gx,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    assert gx is None or (gx.shape == x.shape and not gx.any())


# --- empty batches ------------------------------------------------------------------------------

VQ_CONFIGS = {
    "ema": dict(),
    "kmeans": dict(kmeans_init=True, kmeans_iters=2),
    "learnable": dict(ema_decay=None, dead_code_threshold=0.5),
    "dead-codes": dict(dead_code_threshold=2.0, ema_decay=0.5),
    "heads": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
    "cosine-rotation": dict(metric="cosine", gradient="rotation"),
}


@pytest.mark.parametrize("config", VQ_CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("warm", [False, True])
def test_empty_batch_vq(config, training, warm):
    vq = VectorQuantizer(8, 16, **VQ_CONFIGS[config])
    if warm:  # a step with data first: the empty one must not undo or repeat anything
        vq(torch.randn(3, 5, 8))
    vq.train(training)
    before = snapshot(vq)
    for shape in [(0, 8), (2, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        q, idx, loss = vq(x)
        assert q.shape == x.shape and idx.shape == (*shape[:-1], *((2,) if vq.heads > 1 else ()))
        assert idx.dtype == torch.int64
        assert_zero_loss(loss, x)
        assert_unchanged(vq, before)  # no EMA decay, no k-means init, no sampler draw
    channel_first = VectorQuantizer(8, 16, channel_last=False, **VQ_CONFIGS[config]).train(training)
    before = snapshot(channel_first)
    x = torch.randn(0, 8, 3, requires_grad=True)
    q, _, loss = channel_first(x)
    assert q.shape == x.shape
    assert_zero_loss(loss, x)
    assert_unchanged(channel_first, before)


def test_empty_batch_keeps_kmeans_for_the_first_real_batch():
    vq = VectorQuantizer(4, 8, kmeans_init=True, kmeans_iters=3)
    fresh = VectorQuantizer(4, 8, kmeans_init=True, kmeans_iters=3)
    fresh.load_state_dict(vq.state_dict())
    vq(torch.randn(0, 4))
    x = torch.randn(50, 4)
    assert torch.equal(vq(x)[1], fresh(x)[1])  # same draw, same init, as if the empty step never ran
    for name, value in fresh.state_dict().items():
        assert torch.equal(vq.state_dict()[name], value), name


@pytest.mark.parametrize("beam_size", [None, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kmeans_init", [False, True])
def test_empty_batch_residual_vq(beam_size, training, kmeans_init):
    rvq = ResidualVQ(3, 8, 16, codebook_dim=4, beam_size=beam_size, kmeans_init=kmeans_init,
                     dead_code_threshold=1.0).train(training)
    before = snapshot(rvq)
    x = torch.randn(0, 8, requires_grad=True)
    q, idx, losses = rvq(x)
    assert q.shape == (0, 8) and idx.shape == (0, 3)
    assert_zero_loss(losses, x, shape=(3,))
    assert_unchanged(rvq, before)
    q, _, losses = rvq(torch.randn(2, 0, 8), beam_size=2)
    assert q.shape == (2, 0, 8) and torch.equal(losses, torch.zeros(3))
    assert_unchanged(rvq, before)


# --- empty batches over torch.distributed ranks ----------------------------------------------------

WORLD = 2
# rows per rank and step: none anywhere (before and after init), none on one rank only
STEPS = [(0, 0), (0, 20), (0, 0), (15, 0), (7, 9), (0, 0)]


def make_dist_vq():
    torch.manual_seed(int(os.environ.get("VTOK_FAST_TEST_SEED", "0")))
    return VectorQuantizer(4, 8, kmeans_init=True, kmeans_iters=2, dead_code_threshold=3.0, ema_decay=0.8)


def step_batches():
    gen = torch.Generator().manual_seed(7)
    return [[torch.randn(n, 4, generator=gen) for n in step] for step in STEPS]


def _empty_worker(rank, init_file, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    vq = make_dist_vq().train()
    states = []
    for step in step_batches():
        _, _, loss = vq(step[rank])
        states.append({**snapshot(vq), "loss": loss.detach()})
    torch.save(states, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # see tests/test_vq_distributed.py: finish every collective, then leave at once
    dist.destroy_process_group()
    os._exit(0)


def test_empty_batches_over_two_ranks(tmp_path):
    ctx = mp.start_processes(_empty_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:  # a rank skipping a collective the other takes hangs
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed VectorQuantizer hung on an empty batch")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = make_dist_vq().train()
    previous = snapshot(single)  # the ranks' state before the first step (same seed, same init)
    for i, (step, batches) in enumerate(zip(STEPS, step_batches())):
        losses = [ranks[r][i].pop("loss") for r in range(WORLD)]  # each over its rank's own rows
        for r, rows in enumerate(step):
            assert rows > 0 or torch.equal(losses[r], torch.zeros(())), (i, r)
        single(torch.cat(batches))
        expected = snapshot(single)
        for name, value in ranks[0][i].items():
            torch.testing.assert_close(ranks[1][i][name], value, rtol=0, atol=0, equal_nan=True,
                                       msg=f"step {i}: ranks differ in {name}")
            # fp32 summation order differs (per-rank partial sums + all-reduce vs one index_add)
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, equal_nan=True,
                                       msg=f"step {i}: {name}")
        if sum(step) == 0:  # no rows on any rank: nothing moved, not even the sampler
            for name, value in previous.items():
                torch.testing.assert_close(ranks[0][i][name], value, rtol=0, atol=0, equal_nan=True,
                                           msg=f"step {i}: {name} changed")
        previous = ranks[0][i]
    assert bool(single.initted)


# --- indices -------------------------------------------------------------------------------------

def test_get_codes_rejects_bad_indices():
    vq = VectorQuantizer(8, 16)
    for bad in ([-1, 3], [0, 16]):
        for fn in (vq.get_codes_from_indices, vq.get_output_from_indices):
            with pytest.raises(ValueError, match=r"indices must have shape \(\.\.\.\) and values in "
                                                 r"\[0, codebook_size\) = \[0, 16\), got values from"):
                fn(torch.tensor(bad))
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match="indices must have dtype in"):
            vq.get_codes_from_indices(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match="indices must be a torch.Tensor, got list"):
        vq.get_codes_from_indices([1, 2])
    for dtype in (torch.int32, torch.uint8):  # other integer dtypes index like int64 (uint8 is no mask)
        assert torch.equal(vq.get_codes_from_indices(torch.tensor([3, 0], dtype=dtype)), vq.codebook[[3, 0]])
    assert vq.get_codes_from_indices(torch.zeros(0, dtype=torch.long)).shape == (0, 8)

    heads = VectorQuantizer(8, 16, heads=2, codebook_dim=4, separate_codebook_per_head=True)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., heads\) with heads = 2 .*got shape \(3,\)"):
        heads.get_codes_from_indices(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"got values from 0 to 16"):
        heads.get_output_from_indices(torch.tensor([[0, 16]]))
    assert heads.get_codes_from_indices(torch.tensor([[1, 2]])).shape == (1, 8)

    channel_first = VectorQuantizer(8, 16, channel_last=False)
    with pytest.raises(ValueError, match=r"shape \(B, \.\.\.\) .*got shape \(\)"):
        channel_first.get_codes_from_indices(torch.tensor(3))


def test_residual_get_codes_rejects_bad_indices():
    rvq = ResidualVQ(2, 8, 16)
    for fn in (rvq.get_codes_from_indices, rvq.get_output_from_indices):
        with pytest.raises(ValueError, match=r"indices must have shape \(\.\.\., num_quantizers\) with "
                                             r"num_quantizers = 2 .*got shape \(1, 3\)"):
            fn(torch.tensor([[1, 2, 3]]))  # an extra column is an error, not ignored
        with pytest.raises(ValueError, match=r"\[0, 16\), got values from -1 to 2"):
            fn(torch.tensor([[-1, 2]]))
        with pytest.raises(ValueError, match=r"\[0, 16\), got values from 1 to 16"):
            fn(torch.tensor([[1, 16]]))
        with pytest.raises(TypeError, match="indices must have dtype in"):
            fn(torch.tensor([[1.0, 2.0]]))
    assert rvq.get_codes_from_indices(torch.tensor([[1, 2]])).shape == (2, 1, 8)
    with pytest.raises(ValueError, match=r"shape \(B, \.\.\., num_quantizers\)"):
        ResidualVQ(2, 8, 16, channel_last=False).get_output_from_indices(torch.tensor([1, 2]))


# --- argument errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dim=True), TypeError, "dim must be a positive int, got True of type bool"),
    (dict(dim=8.0), TypeError, "dim must be a positive int, got 8.0 of type float"),
    (dict(dim=0), ValueError, "dim must be a positive int, got 0"),
    (dict(codebook_size=True), TypeError, "codebook_size must be a positive int, got True"),
    (dict(codebook_size=-3), ValueError, "codebook_size must be a positive int, got -3"),
    (dict(codebook_dim=0), ValueError, "codebook_dim must be a positive int or None, got 0"),
    (dict(codebook_dim=-2), ValueError, "codebook_dim must be a positive int or None, got -2"),
    (dict(heads=True), TypeError, "heads must be a positive int, got True of type bool"),
    (dict(heads=0), ValueError, "heads must be a positive int, got 0"),
    (dict(kmeans_iters=2.5), TypeError, "kmeans_iters must be a non-negative int, got 2.5"),
    (dict(kmeans_iters=-1), ValueError, "kmeans_iters must be a non-negative int, got -1"),
    (dict(commitment_weight=-0.1), ValueError, r"commitment_weight must be a number in \[0, inf\), got -0.1"),
    (dict(commitment_weight=float("nan")), ValueError, r"commitment_weight must be a number in \[0, inf\), got nan"),
    (dict(commitment_weight="1"), TypeError, "commitment_weight must be a number in .* of type str"),
    (dict(eps=0.0), ValueError, r"eps must be a number in \(0, inf\), got 0.0"),
    (dict(dead_code_threshold=-1.0), ValueError, r"dead_code_threshold must be a number in \[0, inf\), got -1.0"),
    (dict(dead_code_threshold=True), TypeError, "dead_code_threshold must be a number in .* of type bool"),
    (dict(ema_decay=1.0), ValueError, r"ema_decay must be a number in \[0, 1\) or None, got 1.0"),
    (dict(ema_decay="0.9"), TypeError, r"ema_decay must be a number in \[0, 1\) or None, got '0.9'"),
    (dict(kmeans_init=1), TypeError, "kmeans_init must be a bool, got 1 of type int"),
    (dict(separate_codebook_per_head="yes"), TypeError, "separate_codebook_per_head must be a bool"),
    (dict(sync_codebook=0), TypeError, "sync_codebook must be a bool or None, got 0"),
    (dict(channel_last=None), TypeError, "channel_last must be a bool, got None"),
    (dict(search_dtype=torch.float64), TypeError, "search_dtype must be one of .* or None, got torch.float64"),
])
def test_vq_argument_errors_name_the_argument(kwargs, error, message):
    args = dict(dim=8, codebook_size=16)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        VectorQuantizer(args.pop("dim"), args.pop("codebook_size"), **args)


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((0, 8, 16), {}, ValueError, "num_quantizers must be a positive int, got 0"),
    ((True, 8, 16), {}, TypeError, "num_quantizers must be a positive int, got True of type bool"),
    ((2, 0, 16), {}, ValueError, "dim must be a positive int, got 0"),
    ((2, 8.0, 16), {}, TypeError, "dim must be a positive int, got 8.0 of type float"),
    ((2, 8, 16), dict(codebook_dim=0), ValueError, "codebook_dim must be a positive int or None, got 0"),
    ((2, 8, 16), dict(codebook_dim=-2), ValueError, "codebook_dim must be a positive int or None, got -2"),
    ((2, 8, 0), {}, ValueError, "codebook_size must be a positive int, got 0"),
    ((2, 8, 16), dict(channel_last=1), TypeError, "channel_last must be a bool, got 1"),
    ((2, 8, 16), dict(heads=2), ValueError, "ResidualVQ supports heads=1 only, got heads=2"),
])
def test_residual_vq_argument_errors_name_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        ResidualVQ(*args, **kwargs)


def test_input_shape_errors_name_x():
    vq = VectorQuantizer(8, 16)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., dim\) with dim = 8, got shape \(\)"):
        vq(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"x must have shape \(B, dim, \.\.\.\) with dim = 8 "
                                         r"\(channel_last=False\), got shape \(2, 7, 3\)"):
        VectorQuantizer(8, 16, channel_last=False)(torch.randn(2, 7, 3))
    rvq = ResidualVQ(2, 8, 16, codebook_dim=4)
    for bad in (torch.randn(4, 7), torch.tensor(1.0)):
        message = f"x must have shape (..., dim) with dim = 8, got shape {tuple(bad.shape)}"
        with pytest.raises(ValueError, match=re.escape(message)):
            rvq(bad)
    with pytest.raises(ValueError, match=r"x must have shape \(B, dim, \.\.\.\) with dim = 8"):
        ResidualVQ(2, 8, 16, channel_last=False)(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        rvq(torch.zeros(2, 8, dtype=torch.long))
    q, idx, _ = ResidualVQ(2, 8, 16, channel_last=False).eval()(torch.randn(2, 8, 3))
    assert q.shape == (2, 8, 3) and idx.shape == (2, 3, 2)
