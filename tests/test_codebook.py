"""codebook_search: Triton (interpreter on CPU) and PyTorch paths against the reference and a
float64 brute force; ties, NaN, bad input, autograd, torch.compile, memory, AOT compilation."""
import pytest
import torch
import torch.nn.functional as F

import vtok_fast
from helpers import aot_reports, assert_close, compile_for_gpu, config_constexprs, tensor_core_instructions
from vtok_fast.codebook import _search_torch, _search_triton, codebook_search, codebook_search_reference
from vtok_fast.kernels import codebook as kc

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
    x = torch.randn(64, 24)
    codebook = torch.randn(97, 24)
    for metric in ("l2", "cosine"):
        for k in (1, 5):
            ref_idx, ref_dist = codebook_search_reference(x, codebook, metric=metric, k=k, return_distances=True)
            idx, dist = run(backend, x, codebook, metric, k)
            check_search(x, codebook, metric, k, ref_idx, ref_dist)
            assert (idx.reshape(ref_idx.shape) == ref_idx).float().mean() > 0.99
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_go_to_lowest_index(backend):
    codebook = torch.randn(40, 16)
    codebook[25] = codebook[7]   # duplicates (as after dead-code replacement)
    codebook[33] = codebook[7]
    x = codebook[7] + 0.01 * torch.randn(12, 16)
    idx, _ = run(backend, x, codebook, "l2", 1)
    assert idx.eq(7).all()
    idx, _ = run(backend, x, codebook, "l2", 3)
    assert idx.tolist() == [[7, 25, 33]] * 12
    # a zero codebook: every code ties
    idx, dist = run(backend, x, torch.zeros(300, 16), "l2", 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 12
    # exact match: distance exactly 0 (clamped, never negative)
    _, dist = run(backend, codebook[:5], codebook, "l2", 1)
    assert dist.min() >= 0 and dist.max() < 1e-4


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
                    "stride_dn": "i64", "stride_dk": "i64", "cand_ptr": "*i32", "stride_cn": "i64",
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
    records = []
    limit = SHARED_MEMORY_LIMIT[arch]
    prune = kc.prune_for_shared_memory(limit)
    for name, configs, dtype, D, extra in _stage1_jobs():
        kernel = kc._codebook_argmin_fwd if name == "argmin" else kc._codebook_topk_fwd
        sixteen = dtype != torch.float32
        block_d, num_d = kc.block_d_for(D, sixteen)
        kept = prune(configs, {"x_ptr": _FakeX(dtype)}, BLOCK_D=block_d, NUM_D=num_d, **extra)
        signature = {k: v.format(t=TRITON_TYPE[dtype]) for k, v in STAGE1_SIGNATURE.items()}
        for config in configs:
            consts, warps, stages = config_constexprs(config)
            # a config pruned at this D on this GPU is launched (so compiled) only at smaller D
            d_used = D if config in kept else 64
            bd, nd = kc.block_d_for(d_used, sixteen)
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
                compiled = compile_for_gpu(kc._codebook_rerank_fwd, signature,
                                           dict(COSINE=cosine, R=r, BLOCK_M=bm, BLOCK_D=64),
                                           arch=arch, num_warps=4)
                rec.update(shared=compiled.metadata.shared)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
            records.append(rec)
    return records


@pytest.fixture(scope="module")
def aot_records():
    return aot_reports("test_codebook", "aot_compile_all")


@pytest.mark.aot
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch, aot_records):
    records = aot_records[arch]
    assert len(records) >= 15
    for rec in records:
        assert "error" not in rec, f"{rec['what']}: {rec.get('error')}"
        assert rec["shared"] <= SHARED_MEMORY_LIMIT[arch], rec["what"]
        if rec["dtype"] == "rerank":
            continue
        assert rec["shared"] <= rec["estimate"], f"{rec['what']}: estimate {rec['estimate']} < {rec['shared']}"
        if rec["dtype"] == str(torch.float32):  # exact fp32 contract: IEEE products, no TF32 mma
            assert not rec["any_mma"], rec["what"]
        else:
            assert rec["tensor_cores"], f"{rec['what']} does not use tensor cores"


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
