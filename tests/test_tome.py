"""``tome_merge`` (PyTorch path and Triton kernels under the interpreter) against the reference
ToMe functions: same tokens, order, sizes, source map, unmerge and gradients; determinism; bad
input; ahead-of-time compilation of every kernel for sm_80 / sm_90.

The matching is compared on ``exact_metric`` data (cosines that every BLAS, numpy's ``tl.dot``
in the interpreter and the kernels compute without rounding, exact ties included), so the exact
assertions hold on any CPU; ``randn`` metrics appear where both sides run the same operations."""
import pytest
import torch

from vtok_fast import bipartite_soft_matching, merge_source, merge_wavg, tome_merge
from vtok_fast.reduce.tome import MergeInfo, tome_unmerge
from helpers import assert_close, compile_for_gpu, config_constexprs, tensor_core_instructions
from test_tome_reference import exact_metric, separated_metric


def reference(x, metric, r, size=None, class_token=False, distill_token=False):
    """(x, size, source map (B, N), unmerge) from the reference functions."""
    merge, unmerge = bipartite_soft_matching(metric, r, class_token, distill_token)
    y, y_size = merge_wavg(merge, x, size)
    source_map = merge_source(merge, x).argmax(dim=1)
    return y, y_size, source_map, unmerge


CASES = [  # (B, N, C, r, class_token, distill_token)
    (2, 16, 8, 3, False, False),
    (2, 17, 8, 5, True, False),
    (1, 16, 8, 4, True, True),
    (3, 15, 8, 1, False, True),
    (2, 13, 8, 100, True, False),  # r capped at 6
    (2, 12, 8, 100, False, False),  # r capped at 6: every A token merges
    (1, 197, 24, 16, True, False),
    (2, 50, 40, 20, False, False),  # C > BLOCK_K: the K loop of the scoring kernel
]


@pytest.mark.parametrize("batch, n, c, r, class_token, distill_token", CASES)
@pytest.mark.parametrize("with_size", [False, True])
def test_matches_reference(backend, batch, n, c, r, class_token, distill_token, with_size):
    x, metric = torch.randn(batch, n, c), exact_metric(batch, n, 16)
    size = torch.randint(1, 5, (batch, n, 1)).float() if with_size else None
    y_ref, size_ref, map_ref, unmerge = reference(x, metric, r, size, class_token, distill_token)
    y, y_size, info = tome_merge(x, metric, r, size, class_token=class_token, distill_token=distill_token)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert_close(y, y_ref, reduction=n)
    assert torch.equal(y_size, size_ref)
    assert torch.equal(info.source_map, map_ref) and torch.equal(info.dest, map_ref)
    assert info.r == n - y.shape[1]
    assert torch.equal(info.unmerge(y_ref), unmerge(y_ref))
    assert torch.equal(tome_unmerge(y_ref, info), unmerge(y_ref))
    assert torch.equal(torch.gather(info.dest, 1, info.order), torch.arange(y.shape[1]).expand(batch, -1))


def test_torch_path_scores_like_the_reference(torch_backend):
    """On generic (irrational) cosines the PyTorch path runs the reference's own normalization
    and matmul, so its plan is bitwise the reference's on any BLAS."""
    x, metric = torch.randn(3, 197, 8), torch.randn(3, 197, 64)
    for kwargs in ({}, {"class_token": True}, {"class_token": True, "distill_token": True}):
        y_ref, size_ref, map_ref, _ = reference(x, metric, 16, **kwargs)
        y, y_size, info = tome_merge(x, metric, 16, **kwargs)
        assert torch.equal(info.source_map, map_ref) and torch.equal(y_size, size_ref)
        assert_close(y, y_ref, reduction=4)


def test_two_layers_source_map(backend):
    x, metric1, metric2 = torch.randn(2, 33, 8), exact_metric(2, 33, 16), exact_metric(2, 27, 16)
    merge1, _ = bipartite_soft_matching(metric1, 6, class_token=True)
    x1_ref, size1_ref = merge_wavg(merge1, x)
    merge2, _ = bipartite_soft_matching(metric2, 6, class_token=True)
    x2_ref, size2_ref = merge_wavg(merge2, x1_ref, size1_ref)
    source_ref = merge_source(merge2, x1_ref, merge_source(merge1, x))

    x1, size1, info1 = tome_merge(x, metric1, 6, class_token=True)
    x2, size2, info2 = tome_merge(x1, metric2, 6, size1, class_token=True, source_map=info1.source_map)
    assert_close(x2, x2_ref, reduction=33)
    assert torch.equal(size2, size2_ref)
    assert torch.equal(info2.source_map, source_ref.argmax(dim=1))


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_protected_prefix(backend, prefix):
    """Prefix tokens stay in front unchanged; the rest is the reference's matching on tokens
    prefix.. with kept A tokens in original order."""
    x, metric, size = torch.randn(2, 26, 8), exact_metric(2, 26, 16), torch.randint(1, 4, (2, 26, 1)).float()
    y, y_size, info = tome_merge(x, metric, 7, size, protected_prefix=prefix)
    merge, _ = bipartite_soft_matching(metric[:, prefix:], 7)
    rest, rest_size = merge_wavg(merge, x[:, prefix:], size[:, prefix:])
    num_kept = (26 - prefix + 1) // 2 - 7
    # the reference keeps A in score order, the prefix mode in original order
    kept_pos = merge_source(merge, x[:, prefix:])[:, :num_kept].argmax(-1)
    reorder = torch.cat([kept_pos.argsort(dim=1), torch.arange(num_kept, rest.shape[1]).expand(2, -1)], dim=1)
    rest = rest.gather(1, reorder[..., None].expand_as(rest))
    rest_size = rest_size.gather(1, reorder[..., None])
    assert torch.equal(y[:, :prefix], x[:, :prefix]) and torch.equal(y_size[:, :prefix], size[:, :prefix])
    assert_close(y[:, prefix:], rest, reduction=26)
    assert torch.equal(y_size[:, prefix:], rest_size)
    assert torch.equal(info.dest[:, :prefix], torch.arange(prefix).expand(2, -1))
    kept_tokens = info.order[:, prefix:prefix + num_kept]
    assert torch.equal(kept_tokens, kept_tokens.sort(dim=1).values)


@pytest.mark.parametrize("class_token, distill_token, prefix, sort_kept", [
    (False, False, 0, False), (True, False, 0, True), (True, True, 0, True), (False, True, 0, False),
    (False, False, 3, True), (False, False, 0, True)])
def test_backends_agree_on_the_plan(monkeypatch, class_token, distill_token, prefix, sort_kept):
    """Same order/dest from both backends, and the Triton plan's grouped sources (slot by slot,
    in input order) are exactly the tokens that dest sends to each slot."""
    from vtok_fast.reduce.tome import _plan_triton, _scores_triton

    x, metric = torch.randn(3, 61, 4), exact_metric(3, 61, 16)  # exact ties: both break them by index
    outs = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("VTOK_FAST_BACKEND", name)
        outs[name] = torch.ops.vtok_fast.tome_merge(x, metric, None, 13, class_token, distill_token, prefix, sort_kept)
    for a, b in zip(outs["torch"][2:], outs["triton"][2:]):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    order, dest = outs["torch"][2:]

    node_max, node_idx = _scores_triton(metric, class_token, distill_token, prefix)
    plan = _plan_triton(node_max, node_idx, 13, 61, prefix, sort_kept, distill_token)
    _, _, merged_src, src_start, src_count = plan
    for b in range(3):
        for slot in range(61 - 13):
            members = (dest[b] == slot).nonzero().flatten()
            sources = members[members != order[b, slot]]
            start, count = int(src_start[b, slot]), int(src_count[b, slot])
            assert merged_src[b, start:start + count].tolist() == sources.tolist()


def test_bitwise_deterministic(backend):
    x, metric = torch.randn(2, 197, 32), torch.randn(2, 197, 16)
    size = torch.rand(2, 197, 1) * 3 + 1
    first = tome_merge(x, metric, 40, size, class_token=True)
    for _ in range(2):
        again = tome_merge(x, metric, 40, size, class_token=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert torch.equal(again[2].dest, first[2].dest)


@pytest.mark.parametrize("class_token, distill_token", [(False, False), (True, False), (True, True)])
def test_gradients_match_reference(backend, class_token, distill_token):
    x, metric = torch.randn(2, 21, 6), exact_metric(2, 21, 16).requires_grad_()
    size = torch.randint(1, 4, (2, 21, 1)).float()
    x_ref, s_ref = x.clone().requires_grad_(), size.clone().requires_grad_()
    x_new, s_new = x.clone().requires_grad_(), size.clone().requires_grad_()
    y_ref, size_out_ref, _, _ = reference(x_ref, metric, 6, s_ref, class_token, distill_token)
    y, size_out, _ = tome_merge(x_new, metric, 6, s_new, class_token=class_token, distill_token=distill_token)
    grad_y, grad_size = torch.randn_like(y), torch.randn_like(size_out)
    ((y_ref * grad_y).sum() + (size_out_ref * grad_size).sum()).backward()
    ((y * grad_y).sum() + (size_out * grad_size).sum()).backward()
    assert_close(x_new.grad, x_ref.grad, reduction=4)
    assert_close(s_new.grad, s_ref.grad, reduction=6 * 4)
    assert metric.grad is None  # no gradient through the matching
    assert torch.equal(x_new.detach(), x) and torch.equal(s_new.detach(), size)  # inputs untouched


def test_gradient_without_size(backend):
    x, metric = torch.randn(2, 21, 6, requires_grad=True), exact_metric(2, 21, 16)
    y, _, _ = tome_merge(x, metric, 6)
    y.sum().backward()
    merge, _ = bipartite_soft_matching(metric, 6)
    x_ref = x.detach().clone().requires_grad_()
    merge_wavg(merge, x_ref)[0].sum().backward()
    assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_x(backend, dtype):
    """fp16/bf16 tokens (fp32 metric, so the matching is the reference's): sums in fp32, one
    rounding on store, so the error is the dtype's resolution."""
    x, metric = torch.randn(2, 40, 32), exact_metric(2, 40, 16)
    size = torch.randint(1, 4, (2, 40, 1)).to(dtype)
    y_ref, size_ref, _, _ = reference(x.double(), metric, 9, size.double(), True)
    y, y_size, _ = tome_merge(x.to(dtype), metric, 9, size, class_token=True)
    assert y.dtype == dtype and y_size.dtype == dtype
    assert_close(y, y_ref, dtype=dtype, reduction=4)
    assert torch.equal(y_size.double(), size_ref)


def test_fp16_metric_triton(monkeypatch):
    """fp16 metric on the scoring kernel's fp16 tl.dot path (fp32 accumulation)."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")
    x, metric = torch.randn(2, 37, 8), exact_metric(2, 37, 32).half()  # exact in fp16 too
    y_ref, size_ref, map_ref, _ = reference(x, metric.float(), 8, None, True)
    y, y_size, info = tome_merge(x, metric, 8, class_token=True)
    assert_close(y, y_ref, reduction=4)
    assert torch.equal(y_size, size_ref) and torch.equal(info.source_map, map_ref)


# --- edge cases and defined behaviour ----------------------------------------------------------

def test_r_zero_and_capped_to_zero_is_identity(backend):
    x, metric = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    for r, kwargs in [(0, {}), (5, {"protected_prefix": 8}), (3, {"class_token": True, "distill_token": True})]:
        xx = x[:, :3] if kwargs.get("distill_token") else x
        mm = metric[:, :3] if kwargs.get("distill_token") else metric
        y, size, info = tome_merge(xx, mm, r, **kwargs)
        assert y is xx and torch.equal(size, torch.ones(2, xx.shape[1], 1)) and info.r == 0
        assert torch.equal(info.unmerge(y), xx)
        assert torch.equal(info.source_map, torch.arange(xx.shape[1]).expand(2, -1))


@pytest.mark.parametrize("with_size", [False, True])
def test_zero_channels(backend, with_size):
    """x with C = 0: an empty (B, N - r, 0) result and the sizes of the plan (the Triton merge
    used to launch no program then, leaving size uninitialised)."""
    x, metric = torch.randn(2, 30, 3), exact_metric(2, 30, 16)
    size = torch.randint(1, 4, (2, 30, 1)).float() if with_size else None
    y, y_size, info = tome_merge(x[..., :0], metric, 7, size, class_token=True)
    _, size_ref, map_ref, _ = reference(x, metric, 7, size, class_token=True)
    assert y.shape == (2, 23, 0)
    assert torch.equal(y_size, size_ref) and torch.equal(info.source_map, map_ref)


def test_empty_batch_and_tokens(backend):
    for batch, n in [(0, 12), (2, 0), (2, 1)]:
        x, metric = torch.randn(batch, n, 4), torch.randn(batch, n, 8)
        y, size, info = tome_merge(x, metric, 3, torch.ones(batch, n, 1))
        num_out = n - min(3, n // 2)
        assert y.shape == (batch, num_out, 4) and size.shape == (batch, num_out, 1)
        assert info.dest.shape == (batch, n) and info.source_map.shape == (batch, n)


def _plan(x, metric, r, **kwargs):
    y, size, info = tome_merge(x, metric, r, **kwargs)
    return y, size, info.dest, info.order


@pytest.mark.parametrize("scale", [2.0 ** 70, 2.0 ** -100, "per-row"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy,
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # before a tile is rescaled
def test_scaled_metric_merges_like_unscaled(backend, scale):
    """Cosine similarity is scale-invariant: power-of-two scales (exact in fp32) whose squares
    overflow or underflow fp32 give bitwise the unscaled merge; per-row scales mix rescaled and
    plain rows in one kernel tile (N = 150: two A blocks and two B tiles)."""
    x, metric = torch.randn(2, 150, 4), exact_metric(2, 150, 16)
    if scale == "per-row":
        scale = 2.0 ** torch.tensor([70, -100, 0, 40, -60, 90])[torch.randint(6, (2, 150, 1))]
    for kwargs in ({}, {"class_token": True, "distill_token": True}, {"protected_prefix": 3}):
        for got, want in zip(_plan(x, metric * scale, 40, **kwargs), _plan(x, metric, 40, **kwargs)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("scale", [1e19, 1e-30])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy,
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # before a tile is rescaled,
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # and on the zero rows
def test_metric_scaled_past_fp32_range_merges_like_unscaled(backend, scale):
    """The issue's scales: the norm overflows (every cosine was 0) or underflows (every cosine
    was NaN, scoring -2). On a metric far from ties the merge is unchanged, and a zero row still
    scores -2: its A token is kept alone, its B token receives nothing."""
    x, metric = torch.randn(2, 26, 4), torch.cat([separated_metric(2), torch.zeros(2, 2, 16)], dim=1)
    for got, want in zip(_plan(x, metric * scale, 9), _plan(x, metric, 9)):
        assert torch.equal(got, want)
    _, size, dest, _ = _plan(x, metric * scale, 9)
    assert (size.gather(1, dest[:, 24:, None]) == 1).all()  # A token 24 and B token 25 (zero rows)
    assert size.sum().item() == 2 * 26


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy,
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # before a tile is rescaled
def test_scores_kernel_is_scale_invariant(triton_backend):
    """The kernel's best scores and partners of rescaled rows are bitwise the unscaled ones."""
    from vtok_fast.reduce.tome import _scores_triton

    metric = exact_metric(2, 150, 40)  # C = 40 > BLOCK_K: the rescaled K loop too
    scale = 2.0 ** torch.tensor([70, -100, 0, 40, -60, 90])[torch.randint(6, (2, 150, 1))]
    for protect in (False, True):
        for got, want in zip(_scores_triton(metric * scale, protect, protect, 0),
                             _scores_triton(metric, protect, protect, 0)):
            assert torch.equal(got, want)


def test_r_capped(backend):
    x, metric = torch.randn(1, 11, 4), torch.randn(1, 11, 4)
    assert tome_merge(x, metric, 50, class_token=True)[0].shape == (1, 6, 4)
    assert tome_merge(x, metric, 50, protected_prefix=3)[0].shape == (1, 7, 4)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy 0/0
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # and 1 / 0
def test_nan_metric_rows(backend):
    """NaN scores count as -2: a NaN A token merges last, a NaN B token receives nothing while
    finite scores remain; every index stays in range; both backends agree."""
    x, metric = torch.randn(2, 20, 4), torch.randn(2, 20, 8)
    metric[0, 4] = float("nan")  # A token 2
    metric[0, 7] = 0.0  # B token 3: zero norm, NaN cosine like the reference
    metric[1, 1] = float("inf")  # B token 0
    y, size, info = tome_merge(x, metric, 8, class_token=True)
    assert torch.isfinite(y).all()
    assert int(info.dest.min()) >= 0 and int(info.dest.max()) < y.shape[1]
    assert size[0, info.dest[0, 4]].item() == 1  # the NaN A token is kept alone
    assert size[0, info.dest[0, 7]].item() == 1  # nothing merged into the NaN B token
    assert size[1, info.dest[1, 1]].item() == 1
    assert size.sum().item() == 2 * 20


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_all_nan_metric_is_defined(backend):
    x, metric = torch.randn(1, 10, 4), torch.full((1, 10, 8), float("nan"))
    y, size, info = tome_merge(x, metric, 3)
    # every score ties at -2: A tokens merge in index order into the first B token
    assert info.dest[0].tolist() == [2, 2, 2, 3, 2, 4, 0, 5, 1, 6]
    assert size.flatten().tolist() == [1, 1, 4, 1, 1, 1, 1]


def test_bad_input():
    x, metric = torch.randn(2, 10, 8), torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"metric must be \(B, N, Cm\) = \(2, 10, Cm\) like x, got shape \(2, 9, 4\)"):
        tome_merge(x, metric[:, :9], 2)
    with pytest.raises(ValueError, match=r"x must be \(B, N, C\), got shape \(10, 8\)"):
        tome_merge(x[0], metric, 2)
    with pytest.raises(ValueError, match=r"r must be >= 0.*got -1"):
        tome_merge(x, metric, -1)
    with pytest.raises(TypeError, match="r must be an int, got float"):
        tome_merge(x, metric, 2.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        tome_merge(x.long(), metric, 2)
    with pytest.raises(ValueError, match=r"size must be \(B, N, 1\), got shape \(2, 10\)"):
        tome_merge(x, metric, 2, torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"size must be \(B, N, 1\) = \(2, 10, 1\), got shape \(2, 10, 2\)"):
        tome_merge(x, metric, 2, torch.ones(2, 10, 2))
    with pytest.raises(TypeError, match="class_token must be a bool, got 'yes'"):
        tome_merge(x, metric, 2, class_token="yes")
    with pytest.raises(TypeError, match="distill_token must be a bool, got None"):
        tome_merge(x, metric, 2, distill_token=None)
    with pytest.raises(TypeError, match=r"r must be an int, got Tensor"):
        tome_merge(x, metric, torch.tensor(2))
    with pytest.raises(TypeError, match="metric must be a torch.Tensor, got NoneType"):
        tome_merge(x, None, 2)
    with pytest.raises(TypeError, match="metric must have dtype .*got torch.float64"):
        tome_merge(x, metric.double(), 2)
    with pytest.raises(TypeError, match="size must have dtype .*got torch.int64"):
        tome_merge(x, metric, 2, torch.ones(2, 10, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"source_map must be \(B, N0\), got shape \(30,\)"):
        tome_merge(x, metric, 2, source_map=torch.zeros(30, dtype=torch.long))
    with pytest.raises(ValueError, match="protected_prefix already protects"):
        tome_merge(x, metric, 2, class_token=True, protected_prefix=1)
    with pytest.raises(ValueError, match=r"protected_prefix must be an int in \[0, N = 10\], got 11"):
        tome_merge(x, metric, 2, protected_prefix=11)
    with pytest.raises(ValueError, match="source_map values must index the N = 10 current tokens"):
        tome_merge(x, metric, 2, source_map=torch.full((2, 30), 10))
    with pytest.raises(TypeError, match="source_map must have dtype"):
        tome_merge(x, metric, 2, source_map=torch.zeros(2, 30, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"y must be \(B, N - r, C\) = \(2, 8, C\), got shape \(2, 9, 8\)"):
        tome_merge(x, metric, 2)[2].unmerge(torch.zeros(2, 9, 8))


def test_info_is_a_named_tuple():
    x, metric = torch.randn(1, 9, 4), torch.randn(1, 9, 4)
    _, _, info = tome_merge(x, metric, 2)
    assert isinstance(info, MergeInfo) and info._fields == ("dest", "order", "source_map", "r")
    assert info.dest.dtype == info.order.dtype == info.source_map.dtype == torch.int64


def test_torch_compile_fullgraph(torch_backend):
    def step(x, metric, size, source_map):
        y, y_size, info = tome_merge(x, metric, 4, size, class_token=True, source_map=source_map)
        return y, y_size, info.source_map, info.unmerge(y)

    x, metric = torch.randn(2, 17, 8), torch.randn(2, 17, 8)
    size, source_map = torch.ones(2, 17, 1), torch.arange(17).expand(2, -1).contiguous()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, metric, size, source_map), step(x, metric, size, source_map)):
        assert torch.equal(got, want)


# --- ahead-of-time compilation for real GPUs ----------------------------------------------------
# The suite runs under TRITON_INTERPRET=1, and Triton's own @jit helpers (tl.sum's combine
# function, ...) are then interpreter objects that cannot be compiled: the compilation runs in a
# fresh interpreter-free Python, one per architecture, and reports back as JSON.

def _int_signature(kernel, pointers: dict) -> dict:
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(pointers)
    return sig


def aot_compile_all(arch: int) -> list[dict]:
    """Compile every kernel with every config and dtype it is launched with for sm_<arch>."""
    from vtok_fast.kernels.tome import (MIN_SQ, NAN_SCORE, PLAN_BLOCKS, PLAN_WARPS, tome_merge_fwd, tome_plan_fwd,
                                       tome_scores_fwd)

    report = []
    for dtype in ("fp32", "fp16", "bf16"):
        sig = _int_signature(tome_scores_fwd.fn, {"node_max_ptr": "*fp32", "node_idx_ptr": "*i32",
                                                   "metric_ptr": f"*{dtype}"})
        precision = "tf32x3" if dtype == "fp32" else "tf32"  # what the launcher passes
        for config in tome_scores_fwd.all_configs:
            consts, warps, stages = config_constexprs(config)
            for protect_a0, protect_b0 in [(False, False), (True, True)]:
                kernel = compile_for_gpu(tome_scores_fwd.fn, sig, dict(
                    consts, NAN_SCORE=NAN_SCORE, MIN_SQ=MIN_SQ, PROTECT_A0=protect_a0, PROTECT_B0=protect_b0,
                    PRECISION=precision),
                    arch=arch, num_warps=warps, num_stages=stages)
                report.append({"kernel": "scores", "dtype": dtype, "config": str(consts),
                               "tensor_cores": tensor_core_instructions(kernel, arch),
                               "shared": kernel.metadata.shared})

    sig = _int_signature(tome_plan_fwd, {
        "order_ptr": "*i64", "dest_ptr": "*i64", "merged_ptr": "*i64", "start_ptr": "*i32",
        "count_ptr": "*i32", "node_max_ptr": "*fp32", "node_idx_ptr": "*i32"})
    for sort_kept, distill in [(False, False), (True, False), (True, True), (False, True)]:
        compile_for_gpu(tome_plan_fwd, sig, dict(PLAN_BLOCKS, SORT_KEPT=sort_kept, DISTILL=distill),
                        arch=arch, num_warps=PLAN_WARPS)
        report.append({"kernel": "plan", "dtype": "fp32", "config": f"{sort_kept} {distill}"})

    for x_dtype in ("fp32", "fp16", "bf16"):
        # size None (output size in x's dtype), size in x's dtype, or fp32 size
        for size_dtype, has_size in sorted({(x_dtype, False), (x_dtype, True), ("fp32", True)}):
            sig = _int_signature(tome_merge_fwd.fn, {
                "y_ptr": f"*{x_dtype}", "x_ptr": f"*{x_dtype}", "size_out_ptr": f"*{size_dtype}",
                "size_ptr": f"*{size_dtype}", "order_ptr": "*i64", "merged_ptr": "*i64",
                "start_ptr": "*i32", "count_ptr": "*i32"})
            for config in tome_merge_fwd.all_configs:
                consts, warps, stages = config_constexprs(config)
                compile_for_gpu(tome_merge_fwd.fn, sig, dict(consts, HAS_SIZE=has_size), arch=arch,
                                num_warps=warps, num_stages=stages)
                report.append({"kernel": "merge", "dtype": f"{x_dtype}/{size_dtype}", "config": str(consts)})
    return report


# --- real GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 197, 768), (4, 577, 1024)])
def test_gpu_matches_reference(device, dtype, shape):
    batch, n, c = shape
    x = torch.randn(batch, n, c, device=device).to(dtype)
    metric = exact_metric(batch, n, 64).to(device)  # exact cosines: cuBLAS and tf32x3 agree bitwise
    size = torch.randint(1, 4, (batch, n, 1), device=device).to(dtype)
    y_ref, size_ref, map_ref, _ = reference(x.double(), metric.double(), 16, size.double(), True)
    y, y_size, info = tome_merge(x, metric, 16, size, class_token=True)
    assert_close(y, y_ref, dtype=dtype, reduction=4)
    assert torch.equal(y_size.double(), size_ref)
    assert torch.equal(info.source_map, map_ref)
    again = tome_merge(x, metric, 16, size, class_token=True)
    assert torch.equal(again[0], y) and torch.equal(again[1], y_size)
    # low-precision metric on tensor cores: valid plan, every original token counted once
    _, half_size, half_info = tome_merge(x, metric.to(dtype), 16, class_token=True)
    assert half_size.float().sum().item() == batch * n
    assert int(half_info.dest.max()) < n - 16


@pytest.mark.gpu
def test_gpu_scaled_metric_merges_like_unscaled(device):
    """Rows rescaled on the GPU (correctly rounded division) score bitwise like unscaled ones."""
    x, metric = torch.randn(4, 197, 64, device=device), exact_metric(4, 197, 64).to(device)
    scale = (2.0 ** torch.tensor([70, -100, 0, 40, -60, 90])[torch.randint(6, (4, 197, 1))]).to(device)
    for got, want in zip(_plan(x, metric * scale, 16, class_token=True), _plan(x, metric, 16, class_token=True)):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_gradients(device):
    x = torch.randn(4, 197, 64, device=device)
    metric, size = exact_metric(4, 197, 64).to(device), torch.randint(1, 4, (4, 197, 1), device=device).float()
    x_ref, s_ref = x.clone().requires_grad_(), size.clone().requires_grad_()
    x_new, s_new = x.clone().requires_grad_(), size.clone().requires_grad_()
    y_ref, size_out_ref, _, _ = reference(x_ref, metric, 16, s_ref, True)
    y, size_out, _ = tome_merge(x_new, metric, 16, s_new, class_token=True)
    grad_y, grad_size = torch.randn_like(y), torch.randn_like(size_out)
    ((y_ref * grad_y).sum() + (size_out_ref * grad_size).sum()).backward()
    ((y * grad_y).sum() + (size_out * grad_size).sum()).backward()
    assert_close(x_new.grad, x_ref.grad, reduction=4)
    assert_close(s_new.grad, s_ref.grad, reduction=64 * 4)
