"""VectorQuantizer / ResidualVQ: gradients, EMA, dead codes, k-means init, heads, autocast,
torch.compile, and agreement with vector-quantize-pytorch.

Tests that compare chosen codes exactly (with a brute-force reference or with
vector-quantize-pytorch) use data whose fp32 distances are exact (small integers; for cosine,
vectors of +-1/2 entries): random floats would leave the index of a near-tie to the BLAS's
rounding, which differs by CPU, thread count and library. Exact data also has exact ties, which
both sides must break alike (lowest index).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import vtok_fast
from helpers import assert_close, import_peer
from vtok_fast.encode.residual_vq import ResidualVQ
from vtok_fast.encode.vq import VectorQuantizer, rotation_trick, straight_through
from vtok_fast.encode.vq_sync import sample_rows

vqtorch = import_peer("vector_quantize_pytorch")


def nearest(z, codebook):
    """Brute-force nearest codes in float64 (exact for the data below; ties -> lowest index)."""
    return (z.double()[..., None, :] - codebook.double()).pow(2).sum(-1).argmin(-1)


def small_ints(*shape, high=3):
    """Integers in [-high, high] as fp32: every fp32 product and sum in a distance is exact."""
    return torch.randint(-high, high + 1, shape).float()


def sparse_halves(n, d, nonzero=4):
    """Unit rows with ``nonzero`` entries of +-1/2: fp32 normalization and cosines are exact."""
    pos = torch.rand(n, d).argsort(1)[:, :nonzero]
    return torch.zeros(n, d).scatter_(1, pos, torch.randint(0, 2, (n, nonzero)).float() - 0.5)


# --- gradients --------------------------------------------------------------------------------------

def test_straight_through_gradient_is_identity():
    vq = VectorQuantizer(16, 32, commitment_weight=0.0)
    x = torch.randn(2, 9, 16, requires_grad=True)
    codebook = vq.codebook.clone()  # training updates the codebook after the codes are taken
    q, idx, loss = vq(x)
    torch.testing.assert_close(q.detach(), codebook[idx])
    g = torch.randn_like(q)
    (q * g).sum().backward()
    torch.testing.assert_close(x.grad, g)


def test_commitment_loss_and_gradient():
    vq = VectorQuantizer(16, 32, commitment_weight=0.25)
    x = torch.randn(3, 5, 16, requires_grad=True)
    codebook = vq.codebook.clone()
    q, idx, loss = vq(x)
    codes = codebook[idx]
    torch.testing.assert_close(loss, 0.25 * F.mse_loss(codes, x.detach()))
    (gx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(gx, 0.25 * 2 * (x.detach() - codes) / x.numel())


def test_rotation_gradient_matches_formula_and_vqtorch():
    from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

    vq = VectorQuantizer(12, 40, gradient="rotation", commitment_weight=0.0)
    x = torch.randn(4, 6, 12, requires_grad=True)
    codebook = vq.codebook.clone()
    q, idx, _ = vq(x)
    codes = codebook[idx]
    torch.testing.assert_close(q.detach(), codes, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(q)
    (gx,) = torch.autograd.grad(q, x, g)
    # formula: d out / d x = (|q| / |x|) R^T with R = I - 2 w w^T + 2 v u^T
    u = F.normalize(x.detach(), dim=-1)
    v = F.normalize(codes, dim=-1)
    w = F.normalize(u + v, dim=-1)
    rt_g = g - 2 * (g * w).sum(-1, keepdim=True) * w + 2 * (g * v).sum(-1, keepdim=True) * u
    expected = rt_g * codes.norm(dim=-1, keepdim=True) / x.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(gx, expected, rtol=1e-4, atol=1e-5)
    x2 = x.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(rotate_to(x2, codes), x2, g)
    torch.testing.assert_close(gx, g_ref, rtol=1e-5, atol=1e-6)


def test_estimators_have_quantized_values():
    z = torch.randn(10, 8, requires_grad=True)
    q = torch.randn(10, 8)
    torch.testing.assert_close(straight_through(z, q), q)
    torch.testing.assert_close(rotation_trick(z, q), q, rtol=1e-5, atol=1e-5)


# --- EMA ------------------------------------------------------------------------------------------------

def test_ema_update_matches_formulas():
    K, d, decay, eps = 24, 8, 0.9, 1e-5
    vq = VectorQuantizer(d, K, ema_decay=decay, eps=eps)
    vq.codebook = small_ints(K, d)
    vq.embed_sum.copy_(vq.codebook)  # the initial state: cluster sizes 1, embed_sum = embed
    embed0 = vq.codebook.clone()
    x = small_ints(2, 50, d)
    q, idx, _ = vq(x)
    z = x.reshape(-1, d)
    assert torch.equal(idx.reshape(-1), nearest(z, embed0))
    torch.testing.assert_close(q, embed0[idx])   # codes from the codebook before the update
    counts = torch.bincount(idx.reshape(-1), minlength=K).float()
    sums = torch.zeros(K, d).index_add_(0, idx.reshape(-1), z)
    cluster_size = torch.ones(K) * decay + counts * (1 - decay)
    embed_sum = embed0 * decay + sums * (1 - decay)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    torch.testing.assert_close(vq.cluster_size[0], cluster_size)
    torch.testing.assert_close(vq.embed_sum[0], embed_sum)
    torch.testing.assert_close(vq.codebook, embed_sum / smoothed[:, None])
    probs = counts / counts.sum()
    torch.testing.assert_close(vq.perplexity, torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))
    torch.testing.assert_close(vq.usage, (counts > 0).float().mean())


def test_eval_does_not_update():
    vq = VectorQuantizer(8, 16).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(3, 7, 8))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ema_training_matches_vqtorch(metric):
    torch.manual_seed(3)
    dim, K = 16, 32
    ref = vqtorch.VectorQuantize(dim=dim, codebook_size=K, decay=0.8, rotation_trick=False,
                                 use_cosine_sim=metric == "cosine")
    ours = VectorQuantizer(dim, K, ema_decay=0.8, metric=metric)
    ours.codebook = ref.codebook.detach()
    ours.embed_sum.copy_(ref._codebook.embed_avg)
    for _ in range(3):
        x = torch.randn(2, 40, dim)
        q_ref, i_ref, loss_ref = ref(x)
        q, i, loss = ours(x)
        assert torch.equal(i, i_ref)
        torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.codebook, ref.codebook, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.cluster_size, ref._codebook.cluster_size)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_eval_matches_vqtorch_same_codebook(metric):
    dim, K = 24, 64
    ref = vqtorch.VectorQuantize(dim=dim, codebook_size=K, use_cosine_sim=metric == "cosine").eval()
    ours = VectorQuantizer(dim, K, metric=metric).eval()
    if metric == "cosine":  # unit codes, inputs of norm 2
        ref.codebook, x = sparse_halves(K, dim), 2 * sparse_halves(90, dim).reshape(3, 30, dim)
    else:
        ref.codebook, x = small_ints(K, dim), small_ints(3, 30, dim)
    ours.codebook = ref.codebook.detach()
    q_ref, i_ref, _ = ref(x)
    q, i, _ = ours(x)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(q, q_ref)


# --- dead codes, k-means ------------------------------------------------------------------------------

def test_dead_codes_are_replaced_by_batch_vectors():
    # cluster sizes start at 1; with decay 0.5 an unused code falls to 0.5 < 0.6
    vq = VectorQuantizer(8, 16, dead_code_threshold=0.6, ema_decay=0.5)
    with torch.no_grad():
        vq.codebook = torch.randn(16, 8) + 100.0   # far from every input: all codes but one die
    x = torch.randn(1, 64, 8)
    vq(x)
    rows = x.reshape(-1, 8)
    dead_before = vq.cluster_size[0] == 0.6  # reset to the threshold
    assert dead_before.sum() >= 10
    replaced = vq.codebook[dead_before]
    assert all(bool((rows == code).all(-1).any()) for code in replaced)  # each one is a batch vector
    assert len({tuple(c.tolist()) for c in replaced}) == replaced.shape[0]  # without replacement
    torch.testing.assert_close(vq.embed_sum[0][dead_before], replaced * 0.6)
    assert not vq.dead_codes().any()


def test_kmeans_init_finds_clusters():
    centers = 5.0 * torch.eye(4)
    labels = torch.arange(400) % 4
    x = centers[labels] + 0.1 * torch.randn(400, 4)
    vq = VectorQuantizer(4, 4, kmeans_init=True, kmeans_iters=10, ema_decay=0.5)
    # Lloyd's iterations from 4 random rows stall with two codes in one cluster for about 9 draws
    # in 10, so the outcome of one draw is luck. Peek at the layer's own draw (on a copy) for seeds
    # of its sampler and keep one with a row of every cluster: from there the codes must end at
    # the cluster means, whatever the seed. Clusters are 7 apart, rows within ~0.5 of their center:
    # no assignment is anywhere near a tie.
    for seed in range(1000):
        vq.rng_state[0] = seed
        start_cluster = nearest(sample_rows(copy.deepcopy(vq), x, 4, sync=False), centers)
        if start_cluster.unique().numel() == 4:
            break
    else:
        pytest.fail("no draw with a row of every cluster in 1000 sampler seeds")
    assert not bool(vq.initted)
    vq(x[None])  # k-means init, then this step's EMA update (same assignment: the codes stay put)
    assert bool(vq.initted)
    means = torch.stack([x[labels == c].double().mean(0) for c in range(4)])
    # the sampled rows were ~0.2 from the means; code i is the fp32 mean of its 100 rows
    assert_close(vq.codebook, means[start_cluster], dtype=torch.float32, reduction=100)
    assert torch.equal(vq.cluster_size[0], torch.full((4,), 100.0))


@pytest.mark.parametrize("ema_decay", [0.9, None])
def test_kmeans_init_cosine_and_learnable(ema_decay):
    vq = VectorQuantizer(8, 8, kmeans_init=True, metric="cosine", ema_decay=ema_decay)
    vq(torch.randn(2, 64, 8))
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(8), rtol=1e-5, atol=1e-5)


# --- learnable codebook, heads, layouts ------------------------------------------------------------------

def test_learnable_codebook_gets_codebook_loss_gradient():
    vq = VectorQuantizer(8, 16, ema_decay=None, commitment_weight=0.25)
    x = torch.randn(2, 20, 8, requires_grad=True)
    q, idx, loss = vq(x)
    codes = vq.codebook.detach()[idx]  # learnable: no in-forward update
    torch.testing.assert_close(loss, 1.25 * F.mse_loss(codes, x.detach()))
    loss.backward()
    assert isinstance(vq.embed, torch.nn.Parameter)
    expected = torch.zeros(16, 8).index_add_(0, idx.reshape(-1), (2 * (codes - x.detach()) / x.numel()).reshape(-1, 8))
    torch.testing.assert_close(vq.embed.grad[0], expected)


@pytest.mark.parametrize("separate", [False, True])
def test_heads(separate):
    vq = VectorQuantizer(32, 20, heads=4, codebook_dim=8, separate_codebook_per_head=separate).eval()
    assert isinstance(vq.project_in, torch.nn.Identity)
    vq.codebook = small_ints(*vq.codebook.shape)
    x = small_ints(2, 7, 32)
    q, idx, _ = vq(x)
    assert idx.shape == (2, 7, 4)
    assert vq.codebook.shape == ((4, 20, 8) if separate else (20, 8))
    torch.testing.assert_close(q, vq.get_output_from_indices(idx))
    parts = x.reshape(2, 7, 4, 8)
    for h in range(4):
        book = vq.codebook[h] if separate else vq.codebook
        assert torch.equal(idx[..., h], nearest(parts[..., h, :], book))


def test_channel_first_and_projection():
    vq = VectorQuantizer(12, 10, codebook_dim=4, channel_last=False)
    x = torch.randn(2, 12, 5, 6)
    q, idx, loss = vq(x)
    assert q.shape == x.shape and idx.shape == (2, 5, 6)
    assert isinstance(vq.project_in, torch.nn.Linear)
    assert vq.get_codes_from_indices(idx).shape == (2, 4, 5, 6)
    vq.eval()
    q, idx, _ = vq(x)
    torch.testing.assert_close(q, vq.get_output_from_indices(idx))


def test_autocast_searches_in_fp32():
    vq = VectorQuantizer(16, 64, codebook_dim=8).eval()
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, idx, loss = vq(x)
        z = vq.project_in(x)
    assert z.dtype == torch.bfloat16
    assert torch.equal(idx, nearest(z.float(), vq.codebook))
    assert q.dtype == x.dtype and loss.dtype == torch.float32


def test_torch_compile_eval_fullgraph_and_train():
    vq = VectorQuantizer(16, 32, gradient="rotation").eval()
    x = torch.randn(2, 10, 16)
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x), vq(x)):
        torch.testing.assert_close(a, b)
    # training: EMA buffers updated in place, same result as eager
    torch.manual_seed(0)
    eager = VectorQuantizer(16, 32).train()
    traced = VectorQuantizer(16, 32).train()
    traced.load_state_dict(eager.state_dict())
    step = torch.compile(traced, backend="aot_eager")
    for _ in range(2):
        xb = torch.randn(2, 10, 16, requires_grad=True)
        out_e, out_c = eager(xb), step(xb)
        torch.testing.assert_close(out_c[0], out_e[0])
    torch.testing.assert_close(traced.codebook, eager.codebook)


# --- residual VQ ---------------------------------------------------------------------------------------

def test_residual_vq():
    rvq = ResidualVQ(3, 16, 32, codebook_dim=8, ema_decay=0.9)
    x = torch.randn(2, 11, 16, requires_grad=True)
    q, idx, losses = rvq(x)
    assert q.shape == x.shape and idx.shape == (2, 11, 3) and losses.shape == (3,)
    assert rvq.codebooks.shape == (3, 32, 8)
    (q.sum() + losses.sum()).backward()
    assert x.grad is not None
    rvq.eval()
    with torch.no_grad():  # exact data: integer projection, codes and inputs
        rvq.project_in.weight.copy_(small_ints(8, 16, high=1))
        rvq.project_in.bias.zero_()
        for layer in rvq.layers:
            layer.codebook = small_ints(32, 8)
    x = small_ints(2, 11, 16).requires_grad_()
    q, idx, _ = rvq(x)
    torch.testing.assert_close(q, rvq.get_output_from_indices(idx), rtol=1e-5, atol=1e-5)
    # each layer quantizes the residual the previous layers left
    z = rvq.project_in(x.detach())
    residual = z
    for i, layer in enumerate(rvq.layers):
        assert torch.equal(idx[..., i], nearest(residual, layer.codebook))
        residual = residual - layer.codebook[idx[..., i]]
    assert vtok_fast.ResidualVQ is ResidualVQ and vtok_fast.VectorQuantizer is VectorQuantizer


def test_residual_vq_matches_vqtorch_eval():
    ref = vqtorch.ResidualVQ(dim=16, num_quantizers=2, codebook_size=24).eval()
    ours = ResidualVQ(2, 16, 24).eval()
    for layer, ref_layer in zip(ours.layers, ref.layers):
        ref_layer.codebook = small_ints(24, 16)
        layer.codebook = ref_layer.codebook.detach()
    x = small_ints(2, 15, 16)
    q_ref, i_ref, _ = ref(x)
    q, i, _ = ours(x)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------------

def test_bad_input():
    vq = VectorQuantizer(8, 16)
    with pytest.raises(ValueError, match="dim = 8"):
        vq(torch.randn(2, 3, 9))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.randint(0, 3, (2, 3, 8)))
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(8, 16, metric="dot")
    with pytest.raises(ValueError, match="gradient"):
        VectorQuantizer(8, 16, gradient="gumbel")
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(8, 0)
    with pytest.raises(ValueError, match="kmeans_iters must be a non-negative int, got -1"):
        VectorQuantizer(8, 16, kmeans_iters=-1)
    with pytest.raises(RuntimeError, match="sync_codebook=True"):
        VectorQuantizer(8, 16, sync_codebook=True)(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="heads=1"):
        ResidualVQ(2, 8, 16, heads=2)
