"""codebook_search: Triton (interpreter on CPU) and PyTorch paths against the reference and a
float64 brute force; ties, NaN, bad input, autograd, torch.compile, memory, AOT compilation."""
import pytest
import torch
import torch.nn.functional as F

import vtok_fast
from vtok_fast import _cpu_gemm as cpu_gemm
from helpers import assert_close, compile_for_gpu, config_constexprs, tensor_core_instructions
from vtok_fast.encode import codebook_search as codebook_mod
from vtok_fast.encode.codebook_search import _search_torch, _search_triton, codebook_search, codebook_search_reference
from vtok_fast.kernels import codebook_search as kc

# Two fp32 distances closer than this (relative to the row's scale) are a near-tie: the contract
# lets implementations that sum in a different order pick either code. fp32 expansion error is a
# few 1e-7 of |x|^2 + |c|^2 for the D used here.
NEAR_TIE_RTOL = 1e-5


def float64_scores(x, codebook, metric):
    """(N, K) float64 score to minimize, and the value returned for it."""
    x64 = x.reshape(-1, x.shape[-1]).double()
    c64 = codebook.double()
    if metric == "cosine":
        sim = F.normalize(x64, dim=1) @ F.normalize(c64, dim=1).T
        return -sim, sim
    dist = torch.cdist(x64, c64) ** 2
    return dist, dist


def check_search(x, codebook, metric, k, idx, dist):
    """Indices equal to the float64 order up to near-ties; distances of the returned codes close
    to their float64 values."""
    score, value = float64_scores(x, codebook, metric)
    n, K = score.shape
    idx = idx.reshape(n, k)
    dist = dist.reshape(n, k)
    assert idx.dtype == torch.int64
    assert bool(((idx >= 0) & (idx < K)).all())
    order = torch.sort(score, dim=1, stable=True)
    got = score.gather(1, idx)
    scale = 1.0 if metric == "cosine" else float((x.double() ** 2).sum(-1).max() + (codebook.double() ** 2).sum(-1).max())
    tol = NEAR_TIE_RTOL * scale
    torch.testing.assert_close(got, order.values[:, :k], rtol=0, atol=tol)
    mismatched = idx != order.indices[:, :k]
    assert bool((~mismatched | ((got - order.values[:, :k]).abs() <= tol)).all())
    if k > 1:  # distinct codes, sorted best first
        assert bool((idx.sort(1).values.diff(dim=1) > 0).all())
        assert bool((got.diff(dim=1) >= -tol).all())
    # fp32 distance: expansion/summation error ~ resolution * sqrt(D) * scale
    assert_close(dist, value.gather(1, idx), dtype=torch.float32, reduction=codebook.shape[1],
                 msg=f"distances ({metric})")


def run(backend, x, codebook, metric="l2", k=1, **kw):
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "triton":
        return _search_triton(x2, codebook, metric, k, **kw)
    if backend == "reference":
        idx, dist = codebook_search_reference(x2, codebook, metric=metric, k=k, return_distances=True)
        return idx.reshape(-1, k), dist.reshape(-1, k)
    return _search_torch(x2, codebook, metric, k)


# --- correctness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("D", [3, 8, 64, 256, 300])
@pytest.mark.parametrize("k", [1, 4])
def test_matches_float64_fp32(backend, metric, D, k):
    x = torch.randn(45, D)
    codebook = torch.randn(150, D)  # not a multiple of any BLOCK_N
    idx, dist = run(backend, x, codebook, metric, k)
    check_search(x, codebook, metric, k, idx, dist)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("D", [8, 64, 300])
@pytest.mark.parametrize("k", [1, 3])
def test_matches_float64_fp16_triton(metric, D, k):
    # fp16 tl.dot (tensor cores on GPU), then the exact fp32 re-rank; compared with the float64
    # search of the same fp16 values
    x = torch.randn(40, D).half()
    codebook = torch.randn(70, D).half()
    idx, dist = run("triton", x, codebook, metric, k)
    check_search(x, codebook, metric, k, idx, dist)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_float64_half_torch(dtype, metric):
    # bf16 tl.dot is garbage in the interpreter: bf16 is covered here and by the gpu test
    x = torch.randn(3, 20, 32).to(dtype)
    codebook = torch.randn(50, 32).to(dtype)
    idx, dist = codebook_search(x, codebook, metric=metric, k=2, return_distances=True)
    assert idx.shape == (3, 20, 2) and dist.dtype == torch.float32
    check_search(x, codebook, metric, 2, idx, dist)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_agrees_with_reference(backend):
    # the reference and each path may differ only at near-ties (their fp32 sums are ordered
    # differently): check_search holds every returned code to the float64 order up to near-ties
    x = torch.randn(64, 24)
    codebook = torch.randn(97, 24)
    for metric in ("l2", "cosine"):
        for k in (1, 5):
            ref_idx, ref_dist = codebook_search_reference(x, codebook, metric=metric, k=k, return_distances=True)
            idx, dist = run(backend, x, codebook, metric, k)
            check_search(x, codebook, metric, k, ref_idx, ref_dist)
            check_search(x, codebook, metric, k, idx, dist)


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("k", [1, 6])
def test_triton_code_splits(splits, k):
    # the code range split over a second grid axis; the re-rank merges all splits' candidates
    x = torch.randn(20, 16)
    codebook = torch.randn(1100, 16)
    idx, dist = _search_triton(x, codebook, "l2", k, splits=splits)
    check_search(x, codebook, "l2", k, idx, dist)


def test_triton_large_k():
    x = torch.randn(6, 16)
    codebook = torch.randn(100, 16)
    idx, dist = _search_triton(x, codebook, "l2", 64)
    check_search(x, codebook, "l2", 64, idx, dist)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_row_and_single_code(backend):
    x = torch.randn(1, 10)
    codebook = torch.randn(30, 10)
    idx, dist = run(backend, x, codebook, "l2", 3)
    check_search(x, codebook, "l2", 3, idx, dist)
    idx, dist = run(backend, torch.randn(5, 10), codebook[:1], "l2", 1)
    assert idx.eq(0).all() and (dist >= 0).all()


def exact_codebook(K, D):
    """K distinct codes with small-integer entries: every product and sum of the search (and of
    queries that are codes plus multiples of 1/8) is exact in fp32, so ties are ties on any
    BLAS, CPU or thread count."""
    codes = torch.randint(-4, 5, (4 * K, D)).float().unique(dim=0)
    return codes[torch.randperm(codes.shape[0])[:K]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_go_to_lowest_index(backend):
    codebook = exact_codebook(40, 16)
    codebook[25] = codebook[7]   # duplicates (as after dead-code replacement)
    codebook[33] = codebook[7]
    # within 1/8 per entry of code 7 (squared distance <= 16/64); any other code differs by >= 1
    # in some entry, so it is at least (7/8)^2 away
    x = codebook[7] + torch.randint(-1, 2, (12, 16)).float() / 8
    idx, _ = run(backend, x, codebook, "l2", 1)
    assert idx.eq(7).all()
    idx, _ = run(backend, x, codebook, "l2", 3)
    assert idx.tolist() == [[7, 25, 33]] * 12
    # cosine: parallel codes of norm 2, 4, 8 normalize to the same exact (+-0.5) entries
    codebook[7] = torch.tensor([1.0, -1.0, 1.0, 1.0] + [0.0] * 12)
    codebook[25], codebook[33] = 2 * codebook[7], 4 * codebook[7]
    x = 3 * codebook[7] + torch.cat([torch.zeros(12, 4), torch.randint(-1, 2, (12, 12)) / 8], 1)
    cos64 = F.normalize(x.double(), dim=1) @ F.normalize(codebook.double(), dim=1).T
    assert bool((cos64[:, 7] > cos64[:, [i for i in range(40) if i not in (7, 25, 33)]].max(1).values + 1e-3).all())
    idx, _ = run(backend, x, codebook, "cosine", 3)
    assert idx.tolist() == [[7, 25, 33]] * 12
    # a zero codebook: every code ties
    idx, dist = run(backend, x, torch.zeros(300, 16), "l2", 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 12
    # exact match: distance exactly 0 (integer arithmetic), and each code finds itself
    idx, dist = run(backend, codebook[:5], codebook, "l2", 1)
    assert idx.reshape(-1).tolist() == [0, 1, 2, 3, 4] and dist.eq(0).all()


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("k", [1, 3])
def test_duplicate_codes_resolve_low_with_any_rounding(gemm, k, monkeypatch):
    # random-valued copies: a BLAS may round the copies' columns differently (OpenBLAS does,
    # depending on their position in its blocks); the CPU path still returns the lowest copies
    monkeypatch.setattr(codebook_mod, "_GEMM_FORCE", gemm)
    codebook = torch.randn(300, 24)
    copies = [5, 77, 150, 299]
    codebook[copies] = codebook[5].clone()
    x = codebook[5] + 0.01 * torch.randn(50, 24)
    idx, dist = _search_torch(x, codebook, "l2", k)
    assert idx.tolist() == [copies[:k]] * 50
    # the CPU path's distance is ||x||^2 + (||c||^2 - 2 x.c): its fp32 error scales with ||x||^2,
    # not with the (tiny) distance itself
    expected = ((x - codebook[5]) ** 2).sum(1, keepdim=True).expand(50, k)
    torch.testing.assert_close(dist, expected, rtol=0, atol=NEAR_TIE_RTOL * float((x * x).sum(1).max()))
    # k > 1 with copies spread over the list: the group takes its lowest indices, in order
    first = codebook_mod._duplicate_firsts(codebook)
    got = codebook_mod._lowest_duplicates(torch.tensor([[299, 3, 77], [150, 5, 299]]), first)
    assert got.tolist() == [[5, 3, 77], [5, 77, 150]]
    assert codebook_mod._duplicate_firsts(torch.randn(300, 24)) is None
    signed_zero = torch.zeros(3, 4)
    signed_zero[2, 1] = -0.0
    assert codebook_mod._duplicate_firsts(signed_zero).tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nan_behaviour(backend, metric):
    codebook = torch.randn(50, 8)
    x = torch.randn(6, 8)
    x[2, 3] = float("nan")
    for k in (1, 3):
        idx, dist = run(backend, x, codebook, metric, k)
        assert idx[2].tolist() == list(range(k))          # NaN row: indices 0..k-1
        assert torch.isnan(dist[2]).all()
        keep = torch.tensor([0, 1, 3, 4, 5])
        check_search(x[keep], codebook, metric, k, idx[keep], dist[keep])
    # NaN codes are never chosen over finite ones
    bad = codebook.clone()
    bad[::2, 1] = float("nan")
    idx, dist = run(backend, torch.randn(9, 8), bad, metric, 2)
    assert (idx % 2 == 1).all() and not torch.isnan(dist).any()


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpu_gemm_providers(gemm, metric, monkeypatch):
    # both CPU GEMM providers (torch addmm, oneDNN linear of x with packed -2c and bias ||c||^2)
    # on strided and fp16 queries, several code blocks and a ragged last row tile
    assert cpu_gemm.ONEDNN, "this torch build has no oneDNN: only torch's GEMM is tested"
    monkeypatch.setattr(codebook_mod, "_GEMM_FORCE", gemm)
    monkeypatch.setattr(codebook_mod, "_CPU_K_BLOCK", 64)
    monkeypatch.setattr(codebook_mod, "_CPU_ARGMIN_K_BLOCK", 64)
    monkeypatch.setattr(codebook_mod, "_CPU_TILE_ELEMS", 64 * 16)
    monkeypatch.setattr(codebook_mod, "_CPU_TOPK_TILE_ELEMS", 64 * 8)
    x = torch.randn(45, 40)[:, ::2]
    codebook = torch.randn(150, 20)
    for k in (1, 4):
        idx, dist = _search_torch(x, codebook, metric, k)
        check_search(x, codebook, metric, k, idx, dist)
    idx, dist = _search_torch(x.half(), codebook.half(), metric, 3)
    check_search(x.half(), codebook.half(), metric, 3, idx, dist)
    # inputs that require grad (the numpy argmin needs detached arrays)
    xg, cg = x.clone().requires_grad_(), codebook.clone().requires_grad_()
    _, dist = codebook_search(xg, cg, metric=metric, k=2, return_distances=True)
    dist.sum().backward()
    assert xg.grad.shape == xg.shape and cg.grad.shape == cg.shape


def test_cpu_gemm_choice_measured_once_per_shape_class(monkeypatch):
    choices = {}
    monkeypatch.setattr(codebook_mod, "_GEMM_CHOICE", choices)
    monkeypatch.setattr(codebook_mod, "_GEMM_MEASURE_FLOP", 1 << 16)
    calls = []
    measure = codebook_mod._TileSearch._measure
    monkeypatch.setattr(codebook_mod._TileSearch, "_measure", lambda self, *a: calls.append(a[0]) or measure(self, *a))
    x, codebook = torch.randn(300, 32), torch.randn(200, 32)
    idx, dist = _search_torch(x, codebook, "l2", 1)
    assert len(calls) == 1 and set(choices.values()) <= {"torch", "onednn"}
    [(name, choice)] = codebook_mod.cpu_gemm_choices().items()
    assert name == "l2 k=1 rows~256 codes~128 D~32"
    # the measuring call returns exactly what the chosen provider returns from then on
    again = _search_torch(x, codebook, "l2", 1)
    assert len(calls) == 1 and torch.equal(again[0], idx) and torch.equal(again[1], dist)
    monkeypatch.setattr(codebook_mod, "_GEMM_FORCE", choice)
    forced = _search_torch(x, codebook, "l2", 1)
    assert torch.equal(forced[0], idx) and torch.equal(forced[1], dist)
    # tiles under the threshold are not measured: torch's GEMM
    monkeypatch.setattr(codebook_mod, "_GEMM_FORCE", None)
    _search_torch(x[:8], codebook[:4], "l2", 1)
    assert len(calls) == 1 and len(choices) == 1


@pytest.mark.parametrize("onednn_time, expected", [(1.05, "torch"), (0.95, "onednn")])
def test_cpu_gemm_choice_takes_the_faster_provider(onednn_time, expected, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(codebook_mod.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(codebook_mod, "_GEMM_CHOICE", {})
    monkeypatch.setattr(codebook_mod, "_GEMM_MEASURE_FLOP", 1 << 16)
    for name, cost in (("_torch", 1.0), ("_onednn", onednn_time)):
        real = getattr(codebook_mod._TileSearch, name)

        def timed(self, *a, real=real, cost=cost):
            clock[0] += cost
            return real(self, *a)
        monkeypatch.setattr(codebook_mod._TileSearch, name, timed)
    x, codebook = torch.randn(300, 32), torch.randn(200, 32)
    _search_torch(x, codebook, "l2", 1)
    assert list(codebook_mod.cpu_gemm_choices().values()) == [expected]


def test_cpu_search_without_onednn_uses_torch_gemm(monkeypatch):
    # a torch build without oneDNN: torch's GEMM, never measured, even when oneDNN is forced
    monkeypatch.setattr(cpu_gemm, "ONEDNN", False)
    monkeypatch.setattr(codebook_mod, "_GEMM_CHOICE", {})
    monkeypatch.setattr(codebook_mod, "_GEMM_MEASURE_FLOP", 1 << 16)
    monkeypatch.setattr(codebook_mod, "_GEMM_FORCE", "onednn")
    used = []
    step = codebook_mod._TileSearch._onednn
    monkeypatch.setattr(codebook_mod._TileSearch, "_onednn", lambda self, *a: used.append(1) or step(self, *a))
    x, codebook = torch.randn(300, 32), torch.randn(200, 32)
    idx, dist = _search_torch(x, codebook, "l2", 1)
    check_search(x, codebook, "l2", 1, idx, dist)
    assert not used and not codebook_mod.cpu_gemm_choices()

NONFINITE = (float("nan"), float("inf"), float("-inf"))
PATHS = ["torch", "triton", "reference"]


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nonfinite_query_rows(backend, metric):
    # one rule on every path: a row with any NaN or +-inf gets 0..k-1 and NaN distances (an inf
    # row used to get whichever codes its inf * c products happened to favour)
    codebook = torch.randn(50, 8)
    x = torch.randn(8, 8)
    x[1, 3], x[3, 0], x[5, 7] = NONFINITE
    x[6] = float("inf")
    x[7, 2], x[7, 5] = float("inf"), float("-inf")
    bad, keep = [1, 3, 5, 6, 7], [0, 2, 4]
    for k in (1, 3):
        idx, dist = run(backend, x, codebook, metric, k)
        assert idx[bad].tolist() == [list(range(k))] * len(bad)
        assert torch.isnan(dist[bad]).all()
        check_search(x[keep], codebook, metric, k, idx[keep], dist[keep])


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nonfinite_codes_rank_last(backend, metric):
    codebook = torch.randn(12, 8)
    bad = [0, 3, 4, 9]
    codebook[bad, [1, 0, 7, 2]] = torch.tensor([*NONFINITE, float("nan")])
    good = [i for i in range(12) if i not in bad]
    x = torch.randn(10, 8)
    # enough finite codes: only finite ones are returned, correctly ranked
    idx, dist = run(backend, x, codebook, metric, 8)
    assert idx.sort(1).values.tolist() == [good] * 10 and not torch.isnan(dist).any()
    remap = torch.tensor(good)
    check_search(x, codebook[good], metric, 8, torch.searchsorted(remap, idx.contiguous()), dist)
    # fewer finite codes than k: the finite ones (ranked), then the lowest non-finite ones with
    # NaN distances, on every path (the Triton re-rank used to fill in codes 2, 3)
    few = codebook.clone()
    few[[1, 2, 5, 6, 8, 10], 4] = float("nan")  # finite codes left: 7 and 11
    idx, dist = run(backend, x, few, metric, 4)
    assert idx[:, :2].sort(1).values.tolist() == [[7, 11]] * 10 and idx[:, 2:].tolist() == [[0, 1]] * 10
    check_search(x, few[[7, 11]], metric, 2, (idx[:, :2] == 11).long(), dist[:, :2])
    assert torch.isnan(dist[:, 2:]).all()
    # no finite code at all: 0..k-1, NaN distances
    idx, dist = run(backend, x, torch.full((6, 8), float("nan")), metric, 3)
    assert idx.tolist() == [[0, 1, 2]] * 10 and torch.isnan(dist).all()


def float64_ranking_check(x, codebook, metric, k, idx, dist):
    """For inputs with huge finite values: every returned code's float64 score is within rounding
    of the float64 order's (fp32 rounding for the rows searched in fp32, float64 rounding for the
    rows the huge-value rule sends to float64) and its distance is the float64 value in fp32
    (``inf`` beyond the fp32 range)."""
    safe = vtok_fast.encode.codebook_search.SAFE_SQ_NORM
    exact = ~((x * x).sum(1) <= safe) | bool((~((codebook * codebook).sum(1) <= safe)).any())
    x64, c64 = x.double(), codebook.double()
    if metric == "cosine":
        value = F.normalize(x64, dim=1) @ F.normalize(c64, dim=1).T
        score, mag = -value, torch.ones_like(value)
    else:
        # ranked without ||x||^2, which would swamp a huge row's float64 resolution
        cc = (c64 * c64).sum(1)
        score = cc - 2.0 * (x64 @ c64.T)
        mag = cc + 2.0 * x64.norm(dim=1, keepdim=True) * c64.norm(dim=1)
        mag = mag + torch.where(exact, 0.0, (x64 * x64).sum(1))[:, None]
        value = torch.cdist(x64, c64, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    best = torch.sort(score, dim=1, stable=True)
    rel = torch.where(exact, 1e-12, NEAR_TIE_RTOL)[:, None]
    tol = rel * mag.gather(1, best.indices[:, :k])
    assert bool(((score.gather(1, idx) - best.values[:, :k]).abs() <= tol).all())
    want = value.gather(1, idx)
    torch.testing.assert_close(dist[exact].double(), want[exact].float().double(), rtol=1e-6, atol=0)
    if (~exact).any():
        assert_close(dist[~exact], want[~exact], dtype=torch.float32, reduction=codebook.shape[1])


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("where", ["queries", "codes", "both"])
@pytest.mark.parametrize("scale", [4e18, 1e30])
def test_huge_finite_values_do_not_overflow(backend, metric, where, scale):
    # 4e18: squared norms still finite in fp32, but 2 x.c overflows; 1e30: they overflow too.
    # Such rows used to get index 0 (every fp32 score inf/NaN) on some paths
    x = torch.randn(20, 16)
    codebook = torch.randn(60, 16)
    if where in ("queries", "both"):
        x[::2] *= scale
    if where in ("codes", "both"):
        codebook[::3] *= scale
    for k in (1, 4):
        idx, dist = run(backend, x, codebook, metric, k)
        float64_ranking_check(x, codebook, metric, k, idx, dist)


def test_public_shapes_and_dtype_promotion():
    x = torch.randn(2, 3, 4, 16)
    codebook = torch.randn(20, 16)
    assert codebook_search(x, codebook).shape == (2, 3, 4)
    idx, dist = codebook_search(x, codebook, k=5, return_distances=True)
    assert idx.shape == dist.shape == (2, 3, 4, 5)
    # mixed dtypes promote (bf16 x, fp32 codebook -> fp32 search)
    idx16 = codebook_search(x.bfloat16(), codebook)
    assert torch.equal(idx16, codebook_search(x.bfloat16().float(), codebook))
    assert codebook_search(torch.randn(0, 16), codebook).shape == (0,)
    assert vtok_fast.codebook_search is codebook_search


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_distance_gradients(backend, metric, monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    x = torch.randn(7, 12, requires_grad=True)
    codebook = torch.randn(30, 12, requires_grad=True)
    idx, dist = codebook_search(x, codebook, metric=metric, k=2, return_distances=True)
    g = torch.randn_like(dist)
    gx, gc = torch.autograd.grad(dist, (x, codebook), g)
    if metric == "l2":
        expected = ((x[:, None, :] - codebook[idx]) ** 2).sum(-1)
    else:
        expected = (F.normalize(x, dim=-1)[:, None, :] * F.normalize(codebook, dim=-1)[idx]).sum(-1)
    ex, ec = torch.autograd.grad(expected, (x, codebook), g)
    torch.testing.assert_close(gx, ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gc, ec, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph():
    x = torch.randn(33, 16)
    codebook = torch.randn(40, 16)

    def fn(a, c):
        idx, dist = codebook_search(a, c, k=2, return_distances=True)
        return idx, dist.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    idx, total = compiled(x, codebook)
    ref_idx, ref_total = fn(x, codebook)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(total, ref_total)


def test_cpu_path_memory_is_bounded():
    # 4096 x 16384 fp32 distances would be 256 MiB; the chunked path keeps one 16 MiB tile
    from vtok_fast.bench.harness import PeakMemory

    x = torch.randn(4096, 32)
    codebook = torch.randn(16384, 32)
    _search_torch(x[:8], codebook, "l2", 1)
    with PeakMemory(torch.device("cpu")) as pm:
        _search_torch(x, codebook, "l2", 1)
    if pm.mb is not None:
        assert pm.mb < 64, f"peak extra memory {pm.mb:.1f} MiB"


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, err, words", [
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 9)), ValueError, "D = 9"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(0, 8)), ValueError, "empty"),
    (lambda: codebook_search(torch.randint(0, 5, (4, 8)), torch.randn(10, 8)), TypeError, "x must have dtype"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randint(0, 5, (10, 8))), TypeError, "codebook must have dtype"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8), k=11), ValueError, "k must satisfy"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(100, 8), k=65), ValueError, "k must satisfy"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8), k=0), ValueError, "k must satisfy"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8), k=2.0), TypeError, "k must be an int"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8), metric="dot"), ValueError, "metric"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8, 1)), ValueError, "2-D"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8, device="meta")), ValueError, "device"),
    (lambda: codebook_search([1.0], torch.randn(10, 8)), TypeError, "torch.Tensor"),
    # used to fail deep inside with RuntimeError / NotImplementedError, or to be taken as truthy
    (lambda: codebook_search(torch.randn(4, 8).to_sparse(), torch.randn(10, 8)), TypeError, "x must be a dense"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8).to_sparse()), TypeError, "codebook must be a dense"),
    (lambda: codebook_search(torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)]), torch.randn(10, 8)),
     TypeError, "x must be a dense .* got a nested"),
    (lambda: codebook_search(torch.randn(4, 8), torch.randn(10, 8), return_distances="yes"), TypeError,
     "return_distances must be a bool, got str"),
    (lambda: codebook_search_reference(torch.randn(4, 8), torch.randn(10, 8), return_distances=1), TypeError,
     "return_distances must be a bool, got int"),
])
def test_bad_input(call, err, words):
    with pytest.raises(err, match=words):
        call()


# --- ahead-of-time compilation for sm_80 / sm_90 ---------------------------------------------------------
# This suite runs with TRITON_INTERPRET=1, where even triton.language's own jit functions
# (tl.min, tl.sum, ...) are interpreted objects that cannot be compiled for a GPU. So the
# compiles run in subprocesses without the interpreter (one per arch, concurrently), which call
# aot_compile_all() below and report back as JSON.

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
STAGE1_SIGNATURE = {"cand_ptr": "*i32", "stride_cn": "i64", "stride_cs": "i64", "x_ptr": "*{t}",
                    "stride_xn": "i64", "c_ptr": "*{t}", "stride_ck": "i64", "bias_ptr": "*fp32",
                    "scale": "fp32", "N": "i32", "K": "i32", "D": "i32", "codes_per_split": "i32"}
RERANK_SIGNATURE = {"idx_ptr": "*i64", "stride_in": "i64", "stride_ik": "i64", "dist_ptr": "*fp32",
                    "stride_dn": "i64", "stride_dk": "i64", "xx_ptr": "*fp32", "cand_ptr": "*i32", "stride_cn": "i64",
                    "stride_cr": "i64", "x_ptr": "*{t}", "stride_xn": "i64", "stride_xd": "i64",
                    "c_ptr": "*{t}", "stride_ck": "i64", "stride_cd": "i64", "N": "i32", "K": "i32",
                    "D": "i32", "k_out": "i32"}
# what the JIT specializes at launch: unit feature strides, 16-divisible pointers and sizes
# (without these the loads are not vectorized or pipelined, and shared memory is misjudged)
UNIT_STRIDES = {"stride_xd": 1, "stride_cd": 1}
DIVISIBLE = ("cand_ptr", "x_ptr", "c_ptr", "bias_ptr", "stride_xn", "stride_ck", "K", "D", "codes_per_split")


class _FakeX:
    def __init__(self, dtype):
        self.dtype = dtype

    def element_size(self):
        return torch.tensor([], dtype=self.dtype).element_size()


def _stage1_jobs():
    """(kernel, configs, dtype, D, extra constexprs): every config and dtype launched, at the
    largest single-tile D (where shared memory binds), plus the looped-D and padded tiny-D paths."""
    jobs = []
    for dtype in (torch.float16, torch.bfloat16):
        jobs.append(("argmin", kc.ARGMIN_TC_CONFIGS, dtype, 256, {}))
        jobs.append(("topk", kc.TOPK_TC_CONFIGS, dtype, 64, {"R": 8}))
    jobs.append(("argmin", kc.ARGMIN_FP32_CONFIGS, torch.float32, 64, {}))
    jobs.append(("topk", kc.TOPK_FP32_CONFIGS, torch.float32, 64, {"R": 8}))
    jobs.append(("argmin", kc.ARGMIN_TC_CONFIGS[:1], torch.bfloat16, 300, {}))
    jobs.append(("argmin", kc.ARGMIN_TC_CONFIGS[:1], torch.float16, 3, {}))
    jobs.append(("topk", kc.TOPK_TC_CONFIGS[:1], torch.bfloat16, 8, {"R": 64}))
    return jobs


def aot_compile_all(arch: int) -> list[dict]:
    """Compile every stage-1 job and the re-rank kernel for ``sm_<arch>``; one record per compile."""
    from vtok_fast.kernels._autotune import shared_memory_prune

    records = []
    limit = SHARED_MEMORY_LIMIT[arch]
    for name, configs, dtype, D, extra in _stage1_jobs():
        kernel = kc._codebook_argmin_fwd if name == "argmin" else kc._codebook_topk_fwd
        prune = shared_memory_prune(kc.argmin_shared_memory if name == "argmin" else kc.topk_shared_memory,
                                    limit, arch)
        sixteen = dtype != torch.float32
        block_d, num_d = codebook_mod._block_d_for(D, sixteen)
        kept = prune(configs, {"x_ptr": _FakeX(dtype)}, BLOCK_D=block_d, NUM_D=num_d, **extra)
        signature = {k: v.format(t=TRITON_TYPE[dtype]) for k, v in STAGE1_SIGNATURE.items()}
        for config in configs:
            consts, warps, stages = config_constexprs(config)
            # a config pruned at this D on this GPU is launched (so compiled) only at smaller D
            d_used = D if config in kept else 64
            bd, nd = codebook_mod._block_d_for(d_used, sixteen)
            consts.update(IEEE=not sixteen, BLOCK_D=bd, NUM_D=nd, EVEN_D=bd * nd == d_used,
                          **extra, **UNIT_STRIDES)
            rec = {"what": f"{name} {consts} warps={warps} stages={stages} {dtype}", "dtype": str(dtype),
                   "estimate": kc.shared_memory_estimate(config, bd, nd, _FakeX(dtype).element_size(), name == "topk")}
            try:
                compiled = compile_for_gpu(kernel, signature, consts, arch=arch, num_warps=warps,
                                           num_stages=stages, divisible=DIVISIBLE)
                rec.update(shared=compiled.metadata.shared,
                           tensor_cores=tensor_core_instructions(compiled, arch),
                           any_mma="mma" in compiled.asm["ptx"])
            except Exception as exc:  # reported by the test
                rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
            records.append(rec)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        signature = {k: v.format(t=TRITON_TYPE[dtype]) for k, v in RERANK_SIGNATURE.items()}
        for cosine, r, bm in ((dtype != torch.float32, 64, 2),):
            rec = {"what": f"rerank cosine={cosine} R={r} {dtype}", "dtype": "rerank"}
            try:
                compiled = compile_for_gpu(kc.codebook_rerank_fwd, signature,
                                           dict(COSINE=cosine, R=r, BLOCK_M=bm, BLOCK_D=64),
                                           arch=arch, num_warps=4)
                rec.update(shared=compiled.metadata.shared)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
            records.append(rec)
    return records


# --- real GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_matches_float64(dtype, metric):
    torch.manual_seed(1)
    # few distinct D tiles: each new one autotunes (compiles) every config
    for n, K, D, k in ((3000, 1000, 64, 1), (64, 700, 3, 1), (300, 2000, 300, 8), (500, 300, 64, 64)):
        x = torch.randn(n, D, device="cuda").to(dtype)
        codebook = torch.randn(K, D, device="cuda").to(dtype)
        idx, dist = codebook_search(x, codebook, metric=metric, k=k, return_distances=True)
        check_search(x.cpu(), codebook.cpu(), metric, k, idx.cpu(), dist.cpu())
    codebook = torch.randn(64, 64, device="cuda").to(dtype)
    codebook[40] = codebook[3]
    x = codebook[3] + 0.001 * torch.randn(50, 64, device="cuda").to(dtype)
    x[7, 0] = float("nan")
    idx = codebook_search(x, codebook, metric=metric, k=2)
    assert idx[7].tolist() == [0, 1]
    rows = torch.arange(50, device="cuda") != 7
    assert idx[rows].tolist() == [[3, 40]] * 49
