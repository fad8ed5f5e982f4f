"""vtok_fast.compat.vector_quantize_pytorch against the real package: signatures and defaults,
argument errors, loss and eval conventions, and checkpoints (strict loading into the compat and the
native classes, bit-identical outputs).

Index comparisons use exact-arithmetic data (small integers; +-1/2 vectors for cosine similarity):
every fp32 distance is exact, so both sides see the same numbers on any BLAS or CPU, and exact ties
go to the lowest index on both.
"""
import copy
import inspect

import pytest
import torch
from helpers import import_peer

from vtok_fast.compat import vector_quantize_pytorch as compat
from vtok_fast.encode.residual_vq import GroupedResidualVQ as NativeGrouped
from vtok_fast.encode.residual_vq import ResidualVQ as NativeRVQ
from vtok_fast.encode.vq import VectorQuantizer

vqp = import_peer("vector_quantize_pytorch")


def small_ints(*shape, high=3):
    return torch.randint(-high, high + 1, shape).float()


def sparse_halves(*lead, d=8, nonzero=4):
    """Unit rows with ``nonzero`` entries of +-1/2: fp32 normalization and cosines are exact."""
    pos = torch.rand(*lead, d).argsort(-1)[..., :nonzero]
    return torch.zeros(*lead, d).scatter_(-1, pos, torch.randint(0, 2, (*lead, nonzero)).float() - 0.5)


def exact_codebooks(module, high=3):
    """Integer codes (unit rows of +-1/2 for cosine similarity) in every codebook of a real-package
    module, and matching EMA sums."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, vqp.vector_quantize_pytorch.Codebook):
                shape = m.embed.shape
                m.embed.copy_(sparse_halves(*shape[:-1], d=shape[-1]) if m.use_cosine_sim
                              else small_ints(*shape, high=high))
                m.embed_avg.copy_(m.embed)


def twins(name, **kwargs):
    """The real class and the compat one with the same arguments, the compat one loaded with the real
    one's (exact) state."""
    real = getattr(vqp, name)(**kwargs)
    exact_codebooks(real)
    ours = getattr(compat, name)(**kwargs)
    ours.load_state_dict(real.state_dict(), strict=True)
    return real, ours


def assert_same_state(ours, real):
    """``ours``'s state equals ``real``'s (their keys, loaded into a copy of ours) to fp32 rounding:
    EMA sums are added in another order (index_add vs a one-hot einsum). A learnable codebook's
    cluster sizes are left out: ours track usage (for dead codes and monitoring) on every step,
    theirs only with dead-code replacement on (documented)."""
    expected = copy.deepcopy(ours)
    expected.load_state_dict(real.state_dict(), strict=True)
    for (key, value), (_, want) in zip(ours.state_dict().items(), expected.state_dict().items()):
        if key.endswith("cluster_size") and any(m.learnable_codebook for m in ours.modules()
                                                if isinstance(m, VectorQuantizer)):
            continue
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)


# --- signatures, defaults, argument errors ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["VectorQuantize", "ResidualVQ", "GroupedResidualVQ"])
@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_same_arguments_and_defaults(name, method):
    def params(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, method)).parameters.values()]
    assert params(getattr(compat, name)) == params(getattr(vqp, name))


def test_compat_classes_are_the_native_layers():
    assert issubclass(compat.VectorQuantize, VectorQuantizer)
    assert issubclass(compat.ResidualVQ, NativeRVQ) and issubclass(compat.GroupedResidualVQ, NativeGrouped)
    rvq = compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    assert all(type(layer) is VectorQuantizer for layer in rvq.layers)


def test_their_defaults():
    vq = compat.VectorQuantize(dim=8, codebook_size=16)
    assert vq.ema_decay == 0.8 and vq.gradient == "rotation" and vq.commitment_weight == 1.0
    assert vq.dead_code_threshold == 0 and vq.eps == 1e-5 and vq.metric == "l2"
    assert not vq.eval_loss and not vq.eval_gradient and vq.codebook_loss == "joint"
    assert compat.VectorQuantize(dim=1, codebook_size=4).gradient == "ste"  # rotation only when dim > 1
    assert compat.VectorQuantize(dim=8, codebook_size=4, rotation_trick=False).gradient == "ste"
    learnable = compat.VectorQuantize(dim=8, codebook_size=4, learnable_codebook=True, ema_update=False)
    assert learnable.learnable_codebook and learnable.usage_decay == 0.8
    rvq = compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    assert rvq.beam_rank == "vqp" and rvq.layers[0].ema_decay == 0.8 and rvq.layers[0].gradient == "rotation"


@pytest.mark.parametrize("build", [
    lambda: compat.VectorQuantize(dim=8, codebook_size=16, decay_rate=0.9),
    lambda: compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, decay_rate=0.9),
    lambda: compat.GroupedResidualVQ(dim=8, num_quantizers=2, codebook_size=16, decay_rate=0.9),
])
def test_unknown_argument_is_a_type_error_naming_it(build):
    with pytest.raises(TypeError, match="decay_rate"):
        build()


UNSUPPORTED = {
    "layernorm_after_project_in": True, "commitment_use_cross_entropy_loss": True,
    "codebook_diversity_loss_weight": 0.1, "codebook_diversity_temperature": 10.0, "straight_through": True,
    "sync_affine_param": True, "vq_bridge": torch.nn.Identity(), "manual_ema_update": True,
    "in_place_codebook_optimizer": torch.optim.SGD, "manual_in_place_optimizer_update": True,
    "affine_param": True, "affine_param_batch_decay": 0.9, "affine_param_codebook_decay": 0.8,
    "sync_update_v": 0.5,
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unimplemented_argument_is_a_not_implemented_error_naming_it(name):
    with pytest.raises(NotImplementedError, match=name):
        compat.VectorQuantize(dim=8, codebook_size=16, **{name: UNSUPPORTED[name]})
    with pytest.raises(NotImplementedError, match=name):
        compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **{name: UNSUPPORTED[name]})


@pytest.mark.parametrize("kwargs, match", [
    (dict(implicit_neural_codebook=True), "implicit_neural_codebook"),
    (dict(mlp_kwargs=dict(depth=2)), "mlp_kwargs"),
    (dict(stochastic_sample_codes=True, beam_size=2), "stochastic_sample_codes"),
    (dict(sync_kmeans=False), "sync_kmeans"),
    (dict(ema_update=False), "ema_update=False without learnable_codebook"),
])
def test_unimplemented_residual_arguments(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda vq, x: vq(x, indices=torch.zeros(2, 5, dtype=torch.long)), "indices"),
    (lambda vq, x: vq(x, topk=2), "topk"),
    (lambda vq, x: vq(x, codebook_transform_fn=lambda c: c), "codebook_transform_fn"),
    (lambda vq, x: vq(x, ema_update_weight=torch.ones(16)), "ema_update_weight"),
    (lambda vq, x: vq(x, accum_ema_update=True), "accum_ema_update"),
    (lambda vq, x: vq(x, ema_update=False), "ema_update"),
])
def test_unimplemented_forward_arguments(call, match):
    with pytest.raises(NotImplementedError, match=match):
        call(compat.VectorQuantize(dim=8, codebook_size=16), torch.randn(2, 5, 8))
    assert compat.VectorQuantize(dim=8, codebook_size=16)(torch.randn(2, 5, 8), ema_update=True)[0].shape == (2, 5, 8)
    with pytest.raises(NotImplementedError, match="indices"):
        compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)(torch.randn(2, 5, 8), indices=torch.zeros(2, 5, 2))
    with pytest.raises(NotImplementedError, match="indices"):
        compat.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16)(
            torch.randn(2, 5, 8), indices=(torch.zeros(2, 5, 2),) * 2)


@pytest.mark.parametrize("name, kwargs, match", [
    ("VectorQuantize", dict(use_cosine_sim=True, learnable_codebook=True, ema_update=False), "use_cosine_sim"),
    ("VectorQuantize", dict(rotation_trick=True, directional_reparam=True, threshold_ema_dead_code=1),
     "rotation_trick and directional_reparam"),
    ("VectorQuantize", dict(directional_reparam=True), "threshold_ema_dead_code"),
    ("VectorQuantize", dict(learnable_codebook=True), "learnable_codebook=True needs ema_update=False"),
    ("ResidualVQ", dict(num_quantizers=2, heads=2), "heads must be 1"),
    ("ResidualVQ", dict(num_quantizers=2, eval_beam_size=2), "eval_beam_size needs beam_size"),
    ("GroupedResidualVQ", dict(num_quantizers=2, groups=3), "divisible by groups"),
])
def test_their_assertions_are_value_errors(name, kwargs, match):
    with pytest.raises(AssertionError):  # the original refuses the same combination
        getattr(vqp, name)(dim=8, codebook_size=16, **kwargs)
    with pytest.raises(ValueError, match=match):
        getattr(compat, name)(dim=8, codebook_size=16, **kwargs)


NATIVE_NAMES = ("ema_decay", "usage_decay", "dead_code_threshold", "diveq_variance", "beam_score_weights")


@pytest.mark.parametrize("name, kwargs, err, words", [
    ("VectorQuantize", dict(threshold_ema_dead_code=-1), ValueError, "threshold_ema_dead_code must be"),
    ("VectorQuantize", dict(threshold_ema_dead_code="1"), TypeError, "threshold_ema_dead_code must be"),
    ("VectorQuantize", dict(decay=1.5), ValueError, "decay must be a number in [0, 1), got 1.5"),
    ("VectorQuantize", dict(decay=1.5, learnable_codebook=True, ema_update=False), ValueError, "decay must be"),
    ("VectorQuantize", dict(decay="0.9"), TypeError, "decay must be"),
    ("VectorQuantize", dict(directional_reparam=True, threshold_ema_dead_code=1, directional_reparam_variance=-1),
     ValueError, "directional_reparam_variance must be"),
    ("VectorQuantize", dict(dim="8"), TypeError, "dim must be a positive int, got '8'"),
    ("ResidualVQ", dict(num_quantizers=2, decay=2), ValueError, "decay must be"),
    ("ResidualVQ", dict(num_quantizers=2, threshold_ema_dead_code=-2), ValueError, "threshold_ema_dead_code must"),
    ("ResidualVQ", dict(num_quantizers=2, codebook_dim="4"), TypeError, "codebook_dim must be a positive int"),
    ("ResidualVQ", dict(num_quantizers=2, codebook_dim=0), ValueError, "codebook_dim must be a positive int"),
    ("ResidualVQ", dict(num_quantizers=2, beam_size=2, beam_score_quantizer_weights=[1.0]), ValueError,
     "beam_score_quantizer_weights must have one weight per layer (num_quantizers = 2), got 1"),
    ("ResidualVQ", dict(num_quantizers=2, beam_size=2, beam_score_quantizer_weights=[1.0, -1]), ValueError,
     "beam_score_quantizer_weights[1] must be"),
    ("ResidualVQ", dict(num_quantizers=2, stochastic_sample_codes=True, beam_size="2"), ValueError,
     "beam_size must be an int"),
    ("GroupedResidualVQ", dict(num_quantizers=2, groups=2.0), TypeError, "groups must be a positive int, got 2.0"),
    ("GroupedResidualVQ", dict(num_quantizers=2, groups=0), ValueError, "groups must be a positive int, got 0"),
    ("GroupedResidualVQ", dict(num_quantizers=2, groups=2, dim="8"), TypeError, "dim must be a positive int"),
    ("GroupedResidualVQ", dict(num_quantizers=2, groups=2, decay=-1), ValueError, "decay must be"),
])
def test_errors_name_their_argument(name, kwargs, err, words):
    kwargs = dict(dict(dim=8, codebook_size=16), **kwargs)
    with pytest.raises(err) as info:
        getattr(compat, name)(**kwargs)
    message = str(info.value)
    assert words in message
    assert not any(native in message for native in NATIVE_NAMES), message


# --- conventions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(),                                                               # EMA, rotation trick
    dict(rotation_trick=False, commitment_weight=0.25),                   # EMA, STE
    dict(learnable_codebook=True, ema_update=False, commitment_weight=0.25),
    dict(use_cosine_sim=True),
    dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
])
def test_training_step_matches(config):
    real, ours = twins("VectorQuantize", dim=8, codebook_size=16, **config)
    cosine = config.get("use_cosine_sim", False)
    x = sparse_halves(2, 24) if cosine else small_ints(2, 24, 8)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    qr, ir, lr = real(xr)
    qo, io, lo = ours(xo)
    assert torch.equal(io, ir)
    torch.testing.assert_close(qo, qr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-7)
    g = torch.randn_like(qr)
    ((qr * g).sum() + lr).backward()
    ((qo * g).sum() + lo).backward()
    # the rotation trick in another fp32 order (their batched matmuls vs our dot products)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    if config.get("learnable_codebook"):
        torch.testing.assert_close(ours.embed.grad, real._codebook.embed.grad, rtol=1e-5, atol=1e-7)
    assert_same_state(ours, real)


def test_eval_loss_is_zero_without_gradient_path():
    real, ours = twins("VectorQuantize", dim=8, codebook_size=16)
    real.eval()
    ours.eval()
    x = small_ints(3, 7, 8).requires_grad_()
    for module in (real, ours):
        q, idx, loss = module(x)
        assert loss.shape == () and not loss.any() and not loss.requires_grad
        assert not q.requires_grad  # the codes, no estimator in eval
    assert torch.equal(ours(x)[1], real(x)[1])
    native = VectorQuantizer(8, 16).eval()  # the native convention: the training loss and estimator
    q, _, loss = native(x)
    assert q.requires_grad and loss.requires_grad and loss > 0
    silent = VectorQuantizer(8, 16, eval_loss=False, eval_gradient=False).eval()
    q, _, loss = silent(x)
    assert not q.requires_grad and not loss.requires_grad and not loss.any()


def test_learnable_loss_conventions():
    x = small_ints(2, 10, 8)
    separate = VectorQuantizer(8, 16, ema_decay=None, commitment_weight=0.25)
    joint = copy.deepcopy(separate)
    joint.codebook_loss = "joint"
    codes = separate.codebook.detach()[separate(x)[1]]
    mse = torch.nn.functional.mse_loss(codes, x)
    torch.testing.assert_close(separate(x)[2], 1.25 * mse)  # native: commitment + codebook loss
    loss = joint(x)[2]
    torch.testing.assert_close(loss, 0.25 * mse)            # theirs: one term, gradients to both
    (g,) = torch.autograd.grad(loss, joint.embed)
    assert g.abs().sum() > 0


# --- checkpoints ------------------------------------------------------------------------------------------

def exact_state(state, cosine=False):
    """A trained state with exact-arithmetic codes (multiples of 1/8; for cosine similarity unit rows
    of +-1/2 entries) and integer projections; the EMA statistics stay as trained."""
    out = dict(state)
    for key, value in state.items():
        if key.endswith("_codebook.embed"):
            out[key] = sparse_halves(*value.shape[:-1], d=value.shape[-1]) if cosine else torch.round(value * 8) / 8
        elif key.endswith("project_in.weight"):
            out[key] = torch.randint(-1, 2, value.shape).float()
        elif key.endswith("project_in.bias"):
            out[key] = torch.zeros_like(value)
    return out


@pytest.mark.parametrize("config", [
    dict(),
    dict(codebook_dim=4),
    dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
    dict(learnable_codebook=True, ema_update=False),
    dict(kmeans_init=True),
    dict(use_cosine_sim=True, threshold_ema_dead_code=1),
])
def test_vqp_checkpoint_loads_strictly_with_bit_identical_outputs(config):
    real = vqp.VectorQuantize(dim=8, codebook_size=16, **config)
    real(torch.randn(4, 20, 8))  # a trained (k-means-initialized, EMA-updated) state
    real.load_state_dict(exact_state(real.state_dict(), config.get("use_cosine_sim", False)), strict=True)
    state = real.state_dict()
    ours = compat.VectorQuantize(dim=8, codebook_size=16, **config)
    native = VectorQuantizer(8, 16, codebook_dim=config.get("codebook_dim"), heads=config.get("heads", 1),
                             separate_codebook_per_head=config.get("separate_codebook_per_head", False),
                             ema_decay=None if config.get("learnable_codebook") else 0.8,
                             metric="cosine" if config.get("use_cosine_sim") else "l2",
                             kmeans_init=config.get("kmeans_init", False))
    x = sparse_halves(3, 9) if config.get("use_cosine_sim") else small_ints(3, 9, 8)
    real.eval()
    q_real, i_real, _ = real(x)
    for module in (ours, native):
        result = module.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(module.codebook, real.codebook)
        assert torch.equal(module.cluster_size, real._codebook.cluster_size)
        module.eval()
        with torch.no_grad():
            q, idx, _ = module(x)
        assert torch.equal(idx, i_real)
        assert torch.equal(q, q_real)  # the same rows through the same projection: bit-identical
    if not config.get("learnable_codebook"):
        assert torch.equal(native.embed_sum, real._codebook.embed_avg)


def test_vqp_checkpoint_unknown_feature_keys_fail_strict_loading():
    state = vqp.VectorQuantize(dim=8, codebook_size=16, affine_param=True).state_dict()
    with pytest.raises(RuntimeError, match="_codebook.codebook_mean"):
        VectorQuantizer(8, 16, ema_decay=0.8).load_state_dict(state, strict=True)


@pytest.mark.parametrize("name, kwargs", [
    ("ResidualVQ", dict(dim=8, num_quantizers=3, codebook_size=16)),
    ("ResidualVQ", dict(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True)),
    ("ResidualVQ", dict(dim=8, codebook_size=(16, 8, 4), codebook_dim=4)),
    ("GroupedResidualVQ", dict(dim=8, groups=2, num_quantizers=2, codebook_size=16)),
])
def test_residual_checkpoints_load_strictly(name, kwargs):
    real = getattr(vqp, name)(**kwargs)
    real(torch.randn(2, 30, 8))
    real.load_state_dict(exact_state(real.state_dict()), strict=True)
    state = real.state_dict()
    ours = getattr(compat, name)(**kwargs)
    args = dict(kwargs)
    dim, sizes = args.pop("dim"), args.pop("codebook_size")
    if name == "GroupedResidualVQ":
        native = NativeGrouped(args.pop("num_quantizers"), dim, sizes, ema_decay=0.8, **args)
    else:
        native = NativeRVQ(args.pop("num_quantizers", None), dim, sizes, ema_decay=0.8, **args)
    x = small_ints(2, 11, 8)
    real.eval()
    q_real, i_real, _ = real(x)
    for module in (ours, native):
        module.load_state_dict(state, strict=True)
        module.eval()
        with torch.no_grad():
            q, idx, _ = module(x)
        assert torch.equal(idx, i_real)
        assert torch.equal(q, q_real)
