"""The RVQ codec and loss features (mask / lens, per-layer codebook sizes, shared codebooks,
quantizer dropout, stochastic sampling, GroupedResidualVQ, return_all_codes, orthogonal
regularization, loss breakdown, frozen codebooks, beam_rank="vqp", DiVeQ, quant_grad_frac)
against vector-quantize-pytorch on the same codebooks and inputs: equal indices and outputs in
eval, equal state after a training step where the feature is deterministic; the stochastic ones
(dropout levels, sampled codes, DiVeQ noise) by their distribution and the seeds' determinism.

Index comparisons use exact-arithmetic data (small integers): every fp32 distance is exact on any
BLAS or CPU, and exact ties go to the lowest index on both sides.
"""
import copy
import math

import pytest
import torch
from helpers import import_peer

from vtok_fast.compat import vector_quantize_pytorch as compat
from vtok_fast.encode._vq_common import gumbel_sample_codes, orthogonal_loss
from vtok_fast.encode.residual_vq import GroupedResidualVQ, ResidualVQ
from vtok_fast.encode.vq import VectorQuantizer

vqp = import_peer("vector_quantize_pytorch")


def small_ints(*shape, high=3, generator=None):
    return torch.randint(-high, high + 1, shape, generator=generator).float()


def twins(name, high=3, **kwargs):
    """The real class and the compat one, both with the same integer codebooks."""
    real = getattr(vqp, name)(**kwargs)
    with torch.no_grad():
        for m in real.modules():
            if isinstance(m, vqp.vector_quantize_pytorch.Codebook):
                m.embed.copy_(small_ints(*m.embed.shape, high=high))
                m.embed_avg.copy_(m.embed)
    ours = getattr(compat, name)(**kwargs)
    ours.load_state_dict(real.state_dict(), strict=True)
    return real, ours


def assert_same_state(ours, real):
    """Equal state to fp32 rounding (EMA sums in another order: index_add vs one-hot einsum)."""
    expected = copy.deepcopy(ours)
    expected.load_state_dict(real.state_dict(), strict=True)
    for (key, value), (_, want) in zip(ours.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)


def step_both(real, ours, x, **kwargs):
    out_real, out_ours = real(x.clone(), **kwargs), ours(x.clone(), **kwargs)
    assert len(out_real) == len(out_ours)
    assert torch.equal(out_ours[1], out_real[1])
    torch.testing.assert_close(out_ours[0], out_real[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_ours[2], out_real[2], rtol=1e-5, atol=1e-7)
    return out_real, out_ours


def lengths_mask(lens, n):
    return torch.arange(n) < lens[:, None]


# --- mask / lens ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zeros", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_vq_mask_matches(zeros, training):
    real, ours = twins("VectorQuantize", dim=8, codebook_size=16, rotation_trick=False,
                       return_zeros_for_masked_padding=zeros)
    real.train(training)
    ours.train(training)
    x = small_ints(3, 10, 8)
    lens = torch.tensor([10, 4, 0])
    _, (q, idx, _) = step_both(real, ours, x, mask=lengths_mask(lens, 10))
    assert (idx[1, 4:] == -1).all() and (idx[2] == -1).all() and (idx[0] >= 0).all()
    assert not q[2].any() if zeros else torch.equal(q[2], x[2])
    assert_same_state(ours, real)  # padding left out of the EMA statistics on both sides
    lens_out = ours.eval()(x, lens=lens)
    mask_out = ours(x, mask=lengths_mask(lens, 10))
    for a, b in zip(lens_out, mask_out):
        assert torch.equal(a, b)


def test_native_mask_is_the_unmasked_rows_alone():
    torch.manual_seed(5)
    vq = VectorQuantizer(8, 16, dead_code_threshold=0.9, ema_decay=0.5, kmeans_init=True, kmeans_iters=2)
    alone = copy.deepcopy(vq)
    x = torch.randn(4, 6, 8, requires_grad=True)
    mask = torch.rand(4, 6) > 0.4
    q, idx, loss = vq(x, mask=mask)
    q_alone, idx_alone, loss_alone = alone(x[mask])  # k-means, EMA, dead codes: the same rows
    assert torch.equal(idx[mask], idx_alone) and (idx[~mask] == -1).all()
    assert torch.equal(q[mask], q_alone) and not q[~mask].any()
    assert torch.equal(loss, loss_alone)
    for name, value in alone.state_dict().items():
        assert torch.equal(vq.state_dict()[name], value), name
    q.sum().backward()
    assert not x.grad[~mask].any()


def test_mask_errors_name_the_argument():
    vq = VectorQuantizer(8, 16)
    with pytest.raises(ValueError, match=r"mask must have the shape of x without its feature dim, \(2, 5\)"):
        vq(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype in"):
        vq(torch.randn(2, 5, 8), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"lens needs an input of shape \(B, N, dim\)"):
        vq(torch.randn(5, 8), lens=torch.tensor([3]))
    with pytest.raises(ValueError, match="mask or lens, not both"):
        vq(torch.randn(2, 5, 8), mask=torch.ones(2, 5, dtype=torch.bool), lens=torch.tensor([1, 2]))


def test_residual_mask_matches():
    real, ours = twins("ResidualVQ", dim=8, num_quantizers=3, codebook_size=16, rotation_trick=False)
    x = small_ints(2, 9, 8)
    mask = lengths_mask(torch.tensor([9, 5]), 9)
    step_both(real, ours, x, mask=mask)
    assert_same_state(ours, real)
    real.eval()
    ours.eval()
    _, (q, idx, _) = step_both(real, ours, x, mask=mask)
    assert (idx[1, 5:] == -1).all() and not q[1, 5:].any()


# --- per-layer sizes, shared codebook, all codes ------------------------------------------------------------

def test_per_layer_codebook_sizes_match():
    real, ours = twins("ResidualVQ", dim=8, codebook_size=(16, 8, 4), rotation_trick=False)
    assert ours.num_quantizers == 3 and ours.codebook_sizes == (16, 8, 4)
    assert [c.shape[0] for c in ours.codebooks] == [16, 8, 4]
    x = small_ints(2, 12, 8)
    step_both(real, ours, x)
    assert_same_state(ours, real)
    real.eval()
    ours.eval()
    (q_real, i_real, _, codes_real), (q, idx, _, codes) = step_both(real, ours, x, return_all_codes=True)
    torch.testing.assert_close(codes, codes_real, rtol=0, atol=0)
    assert codes.shape == (3, 2, 12, 8)
    torch.testing.assert_close(ours.get_output_from_indices(idx), q, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"indices\[\.\.\., 2\] must be in \[-1, 4\)"):
        ours.get_codes_from_indices(torch.tensor([[1, 1, 7]]))
    with pytest.raises(ValueError, match="one size per layer"):
        ResidualVQ(2, 8, (16, 8, 4))


def test_shared_codebook_matches():
    real, ours = twins("ResidualVQ", dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True,
                       rotation_trick=False)
    assert ours.layers[0] is ours.layers[2]
    x = small_ints(2, 15, 8)
    step_both(real, ours, x)  # every layer searches the step's starting codebook; one update at the end
    assert_same_state(ours, real)
    step_both(real, ours, small_ints(2, 15, 8))
    with pytest.raises(ValueError, match="shared_codebook=True needs one codebook size"):
        ResidualVQ(None, 8, (16, 8), shared_codebook=True)


def test_shared_codebook_expires_dead_codes_from_every_layer():
    rvq = ResidualVQ(3, 4, 32, shared_codebook=True, dead_code_threshold=0.95, ema_decay=0.9)
    with torch.no_grad():
        rvq.layers[0].codebook = torch.randn(32, 4) * 0.01  # ~ all codes unused: cluster sizes 0.9
    x = torch.randn(50, 4)
    _, idx, _ = rvq(x)
    used = torch.zeros(32, dtype=torch.bool)
    used[idx.unique()] = True
    replaced = rvq.layers[0].cluster_size[0] == 0.95
    assert replaced.sum() >= 32 - used.sum() - 1 and not rvq.layers[0].dead_codes().any()


# --- quantizer dropout --------------------------------------------------------------------------------------

def test_quantize_dropout_fixed_seed_matches():
    real, ours = twins("ResidualVQ", dim=8, num_quantizers=6, codebook_size=16, rotation_trick=False,
                       quantize_dropout=True, quantize_dropout_cutoff_index=1)
    x = small_ints(2, 7, 8)
    for seed in (3, 11, 42):
        (_, idx_real, losses_real), (_, idx, losses) = step_both(real, ours, x, rand_quantize_dropout_fixed_seed=seed)
        active = 6 - int((idx[0, 0] == -1).sum())
        assert (idx[..., active:] == -1).all() and (idx[..., :active] >= 0).all()
        assert not losses[active:].any()
    assert_same_state(ours, real)  # the dropped layers were not updated, on both sides
    ours.eval()
    assert (ours(x)[1] >= 0).all()  # no dropout in eval


def test_quantize_dropout_distribution_and_seeds():
    rvq = ResidualVQ(8, 4, 8, quantize_dropout=True, quantize_dropout_cutoff_index=2)
    x = torch.randn(3, 4)
    for seed in range(5):  # a step runs the drawn number of layers
        torch.manual_seed(seed)
        active = rvq._active_layers(None, x.device)
        torch.manual_seed(seed)
        idx = rvq(x)[1]
        assert (idx[:, :active] >= 0).all() and (idx[:, active:] == -1).all()
    draws = 6000
    counts = torch.bincount(torch.tensor([rvq._active_layers(None, x.device) for _ in range(draws)]), minlength=9)
    # uniform over 3..8 active layers: 5 sigma of a binomial(draws, 1/6)
    assert counts[:3].sum() == 0
    assert ((counts[3:] - draws / 6).abs() < 5 * math.sqrt(draws * (1 / 6) * (5 / 6))).all(), counts
    rounded = ResidualVQ(8, 4, 8, quantize_dropout=True, quantize_dropout_multiple_of=4)
    assert {rounded._active_layers(None, x.device) for _ in range(60)} == {4, 8}
    again = copy.deepcopy(rvq)
    torch.manual_seed(123)
    first = [rvq(x)[1] for _ in range(5)]
    torch.manual_seed(123)
    assert all(torch.equal(a, again(x)[1]) for a in first)  # torch's seed fixes the draws
    codes = rvq.get_codes_from_indices(torch.tensor([[1, 2, -1]]))  # fewer columns, -1: zeros
    assert codes.shape == (8, 1, 4) and not codes[2:].any()
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index must be below num_quantizers = 3"):
        ResidualVQ(3, 4, 8, quantize_dropout=True, quantize_dropout_cutoff_index=3)


# --- stochastic sampling ------------------------------------------------------------------------------------

def test_sampled_codes_follow_the_softmax(monkeypatch):
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    z = torch.tensor([[0.5, 0.5]]).expand(40_000, 2)
    temperature = 0.7
    expected = torch.softmax(-(z[0] - codebook).norm(dim=-1) / temperature, 0)
    for chunk in (1 << 22, 16):  # one chunk, and many: the same distribution
        monkeypatch.setattr("vtok_fast.encode._vq_common._SAMPLE_CHUNK", chunk)
        freq = torch.bincount(gumbel_sample_codes(z, codebook, "l2", temperature), minlength=4) / z.shape[0]
        sigma = (expected * (1 - expected) / z.shape[0]).sqrt()
        assert ((freq - expected).abs() < 5 * sigma).all(), (freq, expected)


def test_stochastic_layer_matches_their_distribution_and_is_seeded():
    real, ours = twins("VectorQuantize", dim=4, codebook_size=6, high=1, stochastic_sample_codes=True,
                       sample_codebook_temp=0.5, rotation_trick=False)
    x = small_ints(1, 12_000, 4, high=1)[:, :1].expand(1, 12_000, 4).contiguous()  # one vector, many times
    freq_real = torch.bincount(real(x)[1].flatten(), minlength=6) / 12_000
    freq_ours = torch.bincount(ours(x)[1].flatten(), minlength=6) / 12_000
    # same softmax of -|z - c| / 0.5 on both sides: 5 sigma of the difference of two frequencies
    sigma = (2 * freq_real * (1 - freq_real) / 12_000).sqrt().clamp_min(1e-3)
    assert ((freq_ours - freq_real).abs() < 5 * sigma).all(), (freq_ours, freq_real)
    vq = VectorQuantizer(4, 6, stochastic_sample_codes=True, sample_codebook_temp=0.5, ema_decay=None)
    torch.manual_seed(9)
    a = vq(x)[1]
    torch.manual_seed(9)
    assert torch.equal(vq(x)[1], a)
    assert not torch.equal(vq(x)[1], a)
    nearest = vq.eval()(x)[1]  # eval, and temperature 0 in training: the nearest code
    assert torch.equal(vq.train()(x, sample_codebook_temp=0.0)[1], nearest)


# --- grouped residual VQ ------------------------------------------------------------------------------------

def test_grouped_residual_vq_matches():
    real, ours = twins("GroupedResidualVQ", dim=8, groups=2, num_quantizers=3, codebook_size=16,
                       rotation_trick=False)
    x = small_ints(2, 9, 8)
    (_, idx_real, losses_real, *_), (_, idx, losses, *_) = step_both(real, ours, x)
    assert idx.shape == (2, 2, 9, 3) and losses.shape == (2, 3)
    assert_same_state(ours, real)
    real.eval()
    ours.eval()
    (_, _, _, codes_real), (q, idx, _, codes) = step_both(real, ours, x, return_all_codes=True)
    assert isinstance(codes, tuple) and len(codes) == 2  # theirs: one tensor per group
    for a, b in zip(codes, codes_real):
        assert torch.equal(a, b)
    torch.testing.assert_close(ours.get_output_from_indices(idx), q, rtol=1e-6, atol=1e-6)
    assert ours.codebooks.shape == real.codebooks.shape == (2, 3, 16, 4)
    native = GroupedResidualVQ(3, 8, 16, groups=2, channel_last=False).eval()
    q, idx, losses = native(torch.randn(2, 8, 5))
    assert q.shape == (2, 8, 5) and idx.shape == (2, 2, 5, 3)


# --- losses: orthogonal regularization, breakdown, frozen codebook -------------------------------------------

def test_orthogonal_loss_is_the_gram_formula():
    codes = torch.randn(2, 7, 5, dtype=torch.float64)  # n > d and n < d take different products
    for t in (codes, codes[:, :3]):
        unit = torch.nn.functional.normalize(t, dim=-1)
        cos = unit @ unit.transpose(1, 2)
        n = t.shape[1]
        torch.testing.assert_close(orthogonal_loss(t), (cos ** 2).sum() / (2 * n * n) - 1 / n)


@pytest.mark.parametrize("options", [dict(), dict(orthogonal_reg_active_codes_only=True),
                                     dict(orthogonal_reg_max_codes=5)])
def test_orthogonal_reg_matches(options):
    real, ours = twins("VectorQuantize", dim=8, codebook_size=16, orthogonal_reg_weight=10.0,
                       rotation_trick=False, **options)
    assert isinstance(ours.embed, torch.nn.Parameter) and ours.ema_decay == 0.8  # still EMA-updated
    x = small_ints(2, 10, 8)
    seed = torch.initial_seed() + 1
    torch.manual_seed(seed)  # the same random code subset (max_codes) on both sides
    q_real, i_real, loss_real, parts_real = real(x.clone(), return_loss_breakdown=True)
    torch.manual_seed(seed)
    q, idx, loss, parts = ours(x.clone(), return_loss_breakdown=True)
    assert torch.equal(idx, i_real)
    # the sum of squared cosines in another order (Gram of the codes vs of the dimensions)
    torch.testing.assert_close(parts.orthogonal_reg, parts_real.orthogonal_reg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.commitment, parts_real.commitment, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, loss_real, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_real.backward()
    torch.testing.assert_close(ours.embed.grad, real._codebook.embed.grad, rtol=1e-4, atol=1e-7)
    assert_same_state(ours, real)


def test_loss_breakdown_matches():
    real, ours = twins("VectorQuantize", dim=8, codebook_size=16, learnable_codebook=True, ema_update=False,
                       commitment_weight=0.5)
    x = small_ints(2, 10, 8)
    parts_real, parts = real(x, return_loss_breakdown=True)[3], ours(x, return_loss_breakdown=True)[3]
    assert type(parts).__name__ == "LossBreakdown" and parts._fields == parts_real._fields
    for a, b in zip(parts, parts_real):
        torch.testing.assert_close(a, b)
    real.eval()
    ours.eval()
    assert not any(t.any() for t in ours(x, return_loss_breakdown=True)[3])
    native = VectorQuantizer(8, 16, ema_decay=None, commitment_weight=0.5)
    _, _, loss, parts = native(x, return_loss_breakdown=True)
    torch.testing.assert_close(loss, 0.5 * parts.commitment + parts.codebook)


@pytest.mark.parametrize("learnable", [False, True])
def test_freeze_codebook_matches(learnable):
    config = dict(learnable_codebook=True, ema_update=False) if learnable else dict()
    real, ours = twins("VectorQuantize", dim=8, codebook_size=16, freeze_codebook=True, rotation_trick=False,
                       threshold_ema_dead_code=5, **config)
    before = copy.deepcopy(ours.state_dict())
    x = small_ints(2, 10, 8)
    _, (_, _, loss) = step_both(real, ours, x)
    assert_same_state(ours, real)
    for key, value in ours.state_dict().items():  # no EMA step, no dead-code expiry
        assert torch.equal(value, before[key]), key
    if learnable:  # no loss gradient reaches a frozen codebook
        ours(x.clone().requires_grad_())[2].backward()
        assert ours.embed.grad is None or not ours.embed.grad.any()
    step_both(real, ours, x, freeze_codebook=False)  # the forward argument overrides
    assert not torch.equal(ours.state_dict()["cluster_size"], before["cluster_size"])


# --- beams ranked their way -----------------------------------------------------------------------------------

def spread_ints(*shape, generator):
    """Integers in [-511, 511]: squared distances of 4-vectors stay below 2^24 (exact in fp32) and
    are spread enough that these fixed draws have no ties for the beams to break differently."""
    return torch.randint(-511, 512, shape, generator=generator).float()


@pytest.mark.parametrize("training", [False, True])
def test_beam_rank_vqp_reproduces_their_tokens(training):
    gen = torch.Generator().manual_seed(2024)  # fixed data, independent of the test seed
    kwargs = dict(dim=4, num_quantizers=3, codebook_size=16, beam_size=4, rotation_trick=False,
                  beam_score_quantizer_weights=[1.0, 0.5, 2.0], commitment_weight=0.25)
    real = vqp.ResidualVQ(**kwargs).train(training)
    with torch.no_grad():
        for layer in real.layers:
            layer._codebook.embed.copy_(spread_ints(1, 16, 4, generator=gen))
            layer._codebook.embed_avg.copy_(layer._codebook.embed)
    ours = compat.ResidualVQ(**kwargs).train(training)
    ours.load_state_dict(real.state_dict(), strict=True)
    x = spread_ints(64, 4, generator=gen)
    error_ranked = copy.deepcopy(ours)
    error_ranked.beam_rank = "error"
    (q_real, _, _), (q, idx, _) = step_both(real, ours, x)  # eval: their losses are the beam scores'
    if training:
        # The first layer's update is theirs. Their step then updates no other layer (it takes
        # [..., 0, :] of a (rows, beams, layers, d) tensor: the first layer's inputs only); ours
        # trains every layer on the winning path.
        expected = copy.deepcopy(ours)
        expected.load_state_dict(real.state_dict(), strict=True)
        for key in ("embed", "embed_sum", "cluster_size"):
            torch.testing.assert_close(ours.layers[0].get_buffer(key), expected.layers[0].get_buffer(key),
                                       rtol=1e-5, atol=1e-6)
        for i, layer in enumerate(ours.layers):
            counts = torch.bincount(idx[:, i], minlength=16).float()
            torch.testing.assert_close(layer.cluster_size[0], torch.ones(16).lerp(counts, 0.2))
    else:  # the native ranking keeps the lower error; it picks other paths on some rows
        q_err = error_ranked(x)[0]
        assert ((x - q_err) ** 2).sum() <= ((x - q) ** 2).sum()


# --- DiVeQ, gradient fractions --------------------------------------------------------------------------------

def test_diveq_residual_matches_with_the_same_seed():
    real, ours = twins("ResidualVQ", dim=8, num_quantizers=2, codebook_size=16, diveq=True)
    assert ours.diveq and ours.layers[0].gradient == "none" and ours.layers[0].learnable_codebook
    x = small_ints(2, 10, 8)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    seed = torch.initial_seed() + 2
    torch.manual_seed(seed)  # the one noise draw, at the end of both forwards
    q_real, i_real, l_real = real(xr)
    torch.manual_seed(seed)
    q, idx, losses = ours(xo)
    assert torch.equal(idx, i_real) and not losses.any() and not l_real.any()
    torch.testing.assert_close(q, q_real, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(q)
    (q * g).sum().backward()
    (q_real * g).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for layer, ref in zip(ours.layers, real.layers):
        torch.testing.assert_close(layer.embed.grad, ref._codebook.embed.grad, rtol=1e-5, atol=1e-6)


def test_diveq_keeps_the_error_length_and_roughly_its_direction():
    vq = VectorQuantizer(8, 16, gradient="diveq", ema_decay=None, commitment_weight=0.0)
    x = torch.randn(4000, 8, requires_grad=True)
    codes = vq.codebook.detach()[vq.eval()(x)[1]]
    q = vq.train()(x)[0]
    err, moved = codes - x.detach(), q.detach() - x.detach()
    torch.testing.assert_close(moved.norm(dim=-1), err.norm(dim=-1), rtol=1e-5, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(moved, err, dim=-1)
    # noise of variance 5e-3 per dimension on errors of length ~1-3: directions within a few degrees
    assert cos.mean() > 0.98
    q.sum().backward()
    assert vq.embed.grad.abs().sum() > 0  # the codebook learns through |q - z|


def test_quant_grad_frac_matches():
    real, ours = twins("ResidualVQ", dim=8, num_quantizers=3, codebook_size=16, rotation_trick=False,
                       quant_grad_frac=0.5, commitment_weight=0.5)
    x = small_ints(2, 10, 8)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_real, _, l_real = real(xr)
    q, _, losses = ours(xo)
    (q_real.sum() + l_real.sum()).backward()
    (q.sum() + losses.sum()).backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-7)


def test_kmeans_init_in_eval():
    vq = VectorQuantizer(4, 8, kmeans_init=True).eval()
    vq(torch.randn(40, 4))
    assert not bool(vq.initted)  # the native default: k-means on the first training batch
    vq.kmeans_init_in_eval = True
    vq(torch.randn(40, 4))
    assert bool(vq.initted)


def test_fully_masked_batch_is_an_empty_batch():
    vq = VectorQuantizer(8, 16, kmeans_init=True, dead_code_threshold=1.0)
    before = copy.deepcopy(vq.state_dict())
    x = torch.randn(2, 5, 8, requires_grad=True)
    q, idx, loss = vq(x, lens=torch.tensor([0, 0]))
    assert not q.any() and (idx == -1).all() and loss.requires_grad and not loss.any()
    for key, value in vq.state_dict().items():  # no k-means init, EMA step or sampler draw
        assert torch.equal(value, before[key]), key


def test_residual_lens_and_masked_input_output():
    rvq = ResidualVQ(2, 8, 16, codebook_dim=4, masked_output="input").eval()
    x = torch.randn(2, 6, 8)
    q, idx, _ = rvq(x, lens=torch.tensor([6, 2]))
    assert torch.equal(q[1, 2:], x[1, 2:]) and (idx[1, 2:] == -1).all() and (idx[0] >= 0).all()
    q_alone, idx_alone, _ = rvq(x[1:, :2])
    assert torch.equal(idx[1:, :2], idx_alone) and torch.equal(q[1:, :2], q_alone)


def test_compat_residual_vq_takes_feature_maps():
    # vector-quantize-pytorch's ResidualVQ fails on these layouts; the compat one quantizes them
    rvq = compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, accept_image_fmap=True).eval()
    fmap = torch.randn(2, 8, 3, 5)
    q, idx, losses = rvq(fmap)
    assert q.shape == fmap.shape and idx.shape == (2, 3, 5, 2) and losses.shape == (2,)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q)
