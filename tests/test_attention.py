"""``attention`` with a per-key bias (Triton kernels under the interpreter and the SDPA path)
against a float64 eager reference and against SDPA with a float mask: output and every gradient,
fully masked rows, strided q/k/v views of one qkv tensor, torch.compile, bad input, and the
ahead-of-time compilation of every kernel config for sm_80 / sm_90."""
import math

import pytest
import torch

from helpers import assert_close, config_constexprs, tensor_core_instructions
from vtok_fast.kernels import attention as ka
from vtok_fast.reduce.attention import SUPPORTED_HEAD_DIMS, attention, attention_reference

NEG_INF = float("-inf")


def reference64(q, k, v, key_bias=None, scale=None):
    """Eager float64 attention; a row whose keys are all -inf gives zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if key_bias is not None:
        s = s + key_bias.double()[:, None, None, :]
    m = s.amax(dim=-1, keepdim=True).detach()  # softmax is shift-invariant: no gradient needed
    e = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    total = e.sum(dim=-1, keepdim=True)
    return (e / torch.where(total == 0, 1.0, total)) @ v


def make_inputs(batch, heads, n, dim, dtype, bias_kind, m=None):
    """q (B, H, m or n, d), k and v (B, H, n, d) and a (B, n) key bias (None / zero / random /
    random with some keys at -inf), all leaves that require grad."""
    q = torch.randn(batch, heads, m or n, dim).to(dtype)
    k, v = torch.randn(batch, heads, n, dim).to(dtype), torch.randn(batch, heads, n, dim).to(dtype)
    bias = None
    if bias_kind == "zero":
        bias = torch.zeros(batch, n, dtype=dtype)
    elif bias_kind in ("random", "neginf"):
        bias = (2 * torch.rand(batch, n)).log().to(dtype)  # log(size)-like, in (-inf, log 2)
        if bias_kind == "neginf":
            bias[:, torch.randperm(n)[: n // 3]] = NEG_INF
    leaves = [t.requires_grad_() for t in (q, k, v) + ((bias,) if bias is not None else ())]
    return q, k, v, bias, leaves


def grads_of(fn, leaves, grad_out):
    for t in leaves:
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in leaves]


def check_against_float64(out, grads, q, k, v, bias, grad_out, scale=None, dtype=None):
    """Output and gradients (dq, dk, dv and, if given, dbias) against the float64 reference at
    ``dtype``'s resolution: the output and dq sum over the N keys, dk and dv over the M query
    rows, the bias gradient over H * M."""
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias) if t is not None]
    ref = reference64(*leaves64[:3], leaves64[3] if bias is not None else None, scale)
    ref.backward(grad_out.double())
    heads, m, n = q.shape[1], q.shape[2], k.shape[2]
    dtype = dtype or q.dtype
    assert_close(out, ref.detach(), dtype=dtype, reduction=n, msg="out")
    for name, got, want, red in zip(("dq", "dk", "dv", "dbias"), grads, leaves64,
                                    (n, m, m, heads * m)):
        assert torch.isfinite(got).all(), name
        assert_close(got, want.grad, dtype=dtype, reduction=red, msg=name)


CASES = [  # (B, H, N, d, bias)
    (2, 3, 1, 32, "random"),  # one key
    (2, 2, 17, 64, "zero"),
    (1, 2, 197, 80, "random"),  # ViT-B/16 length; d = 80 padded to 128
    (1, 2, 577, 64, "neginf"),  # ViT-L/14@336 length; a third of the keys -inf
    (3, 1, 64, 32, None),  # exactly one tile, no bias
    (2, 2, 100, 96, "neginf"),
    (1, 1, 130, 128, "random"),
]


@pytest.mark.parametrize("batch, heads, n, dim, bias_kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64(backend, batch, heads, n, dim, bias_kind, dtype):
    q, k, v, bias, leaves = make_inputs(batch, heads, n, dim, dtype, bias_kind)
    grad_out = torch.randn(q.shape).to(dtype)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    assert out.shape == q.shape and out.dtype == dtype
    check_against_float64(out, grads, q, k, v, bias, grad_out)


@pytest.mark.parametrize("batch, heads, n, dim, bias_kind", [CASES[1], CASES[2], CASES[5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_sdpa_with_mask(triton_backend, batch, heads, n, dim, bias_kind, dtype):
    """Triton kernels against plain SDPA with the bias as a float (B, 1, 1, N) mask: both round
    independently, so the tolerance is twice the float64 one (reduction as above)."""
    q, k, v, bias, leaves = make_inputs(batch, heads, n, dim, dtype, bias_kind)
    grad_out = torch.randn(q.shape).to(dtype)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=bias[:, None, None, :])
    want, want_grads = grads_of(sdpa, leaves, grad_out)
    for name, got, ref, red in zip(("out", "dq", "dk", "dv", "dbias"), [out, *grads], [want, *want_grads],
                                   (n, n, n, n, heads * n)):
        assert_close(got, ref, dtype=dtype, reduction=4 * red, msg=name)  # 2x atol = sqrt(4 * red)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_row_gives_zeros(backend, dtype):
    """Batch row 1 has every key at -inf: zeros (not NaN) and zero gradients; row 0 is exact."""
    q, k, v, bias, leaves = make_inputs(2, 2, 70, 32, dtype, "random")
    with torch.no_grad():
        bias[1] = NEG_INF
    grad_out = torch.randn(q.shape).to(dtype)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for name, g in zip(("dq", "dk", "dv", "dbias"), grads):
        assert torch.equal(g[1], torch.zeros_like(g[1])), name
    check_against_float64(out, grads, q, k, v, bias, grad_out)


@pytest.mark.parametrize("batch, heads, m, n", [(0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)])
def test_empty_inputs(backend, batch, heads, m, n):
    """Empty B, H or M: an empty output and empty gradients; no keys (N = 0): zeros, as for a
    fully masked row, and zero gradients."""
    q = torch.randn(batch, heads, m, 32, requires_grad=True)
    k = torch.randn(batch, heads, n, 32, requires_grad=True)
    v = torch.randn(batch, heads, n, 32, requires_grad=True)
    bias = torch.zeros(batch, n, requires_grad=True)
    out = attention(q, k, v, key_bias=bias)
    assert out.shape == (batch, heads, m, 32) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v, bias):
        assert t.grad.shape == t.shape and not t.grad.any()


class _Spy:
    """Wraps a kernel: records the data pointers of the tensors of each launch, in the kernel's
    argument order (launches pass their arguments by name)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []
        fn = kernel
        while not hasattr(fn, "arg_names"):  # an autotuned kernel: unwrap
            fn = fn.fn
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            self.launches.append([named[n].data_ptr() for n in self.arg_names
                                  if isinstance(named.get(n), torch.Tensor)])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_views_of_one_qkv_tensor(triton_backend, monkeypatch, dtype):
    """q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4): the kernels read the views in
    place (their pointers are qkv's), gradients reach qkv, and the output's (B, M, H, d) storage
    makes ``out.transpose(1, 2).reshape(B, N, H * d)`` a view."""
    batch, n, heads, dim = 2, 45, 3, 32
    suffix = "_fp32" if dtype == torch.float32 else ""
    names = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
    spies = {name: _Spy(getattr(ka, name + suffix)) for name in names}
    for name, spy in spies.items():
        monkeypatch.setattr(ka, name + suffix, spy)
    qkv = torch.randn(batch, n, 3 * heads * dim).to(dtype).requires_grad_()
    bias = torch.randn(batch, n).to(dtype)
    q, k, v = qkv.reshape(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    grad_out = torch.randn(batch, heads, n, dim).to(dtype)
    out = attention(q, k, v, key_bias=bias)
    out.backward(grad_out)
    step = heads * dim * qkv.element_size()
    base = qkv.data_ptr()
    fwd, dkdv, dq = (spies[name].launches for name in names)
    assert len(fwd) == len(dkdv) == len(dq) == 1
    assert fwd[0][2:5] == [base, base + step, base + 2 * step]  # after out, lse
    assert dkdv[0][3:6] == [base, base + step, base + 2 * step]  # after dk, dv, dbias
    assert dq[0][1:4] == [base, base + step, base + 2 * step]  # after dq
    merged = out.transpose(1, 2).reshape(batch, n, heads * dim)
    assert merged.data_ptr() == out.data_ptr()
    q64 = qkv.detach().double().requires_grad_()
    ref = reference64(*q64.reshape(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0), bias)
    ref.backward(grad_out.double())
    assert_close(out, ref.detach(), reduction=n)
    assert_close(qkv.grad, q64.grad, reduction=n)


def test_cross_attention_lengths_and_scale(backend):
    """M queries over N keys (M != N) and an explicit scale."""
    q, k, v, bias, leaves = make_inputs(2, 2, 70, 32, torch.float32, "neginf", m=33)
    grad_out = torch.randn(q.shape)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias, scale=0.3), leaves, grad_out)
    check_against_float64(out, grads, q, k, v, bias, grad_out, scale=0.3)


def test_fp32_bias_with_fp16_inputs(backend):
    """The bias is used at its own precision (the kernel reads it in fp32; SDPA takes an fp32
    mask with 16-bit queries); its gradient comes back in its dtype."""
    q, k, v, _, leaves = make_inputs(1, 2, 40, 64, torch.float16, None)
    bias = (3 * torch.rand(1, 40)).requires_grad_()
    grad_out = torch.randn(q.shape).half()
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves + [bias], grad_out)
    assert grads[3].dtype == torch.float32
    check_against_float64(out, grads, q, k, v, bias, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float64_bias(backend, dtype):
    """The docstring's "any float dtype" includes float64 (it used to raise a TypeError): the bias
    is rounded to fp32, the logits' precision, and its gradient comes back in float64."""
    q, k, v, _, leaves = make_inputs(2, 2, 40, 32, dtype, None)
    bias = (2 * torch.rand(2, 40, dtype=torch.float64)).log()
    bias[1, :7] = NEG_INF
    bias.requires_grad_()
    grad_out = torch.randn(q.shape).to(dtype)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves + [bias], grad_out)
    assert out.dtype == dtype and grads[3].dtype == torch.float64
    check_against_float64(out, grads, q, k, v, bias, grad_out)
    as_fp32 = bias.detach().float().requires_grad_()
    out32, grads32 = grads_of(lambda: attention(q, k, v, key_bias=as_fp32), leaves + [as_fp32], grad_out)
    assert torch.equal(out, out32)
    for got, want in zip(grads, grads32):
        assert torch.equal(got, want.to(got.dtype))


def test_deterministic(triton_backend):
    q, k, v, bias, leaves = make_inputs(2, 2, 90, 32, torch.float32, "random")
    grad_out = torch.randn(q.shape)
    first = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    second = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


def test_bias_without_grad(triton_backend):
    q, k, v, _, leaves = make_inputs(1, 2, 20, 32, torch.float32, None)
    bias = torch.randn(1, 20)
    grad_out = torch.randn(q.shape)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    assert bias.grad is None
    check_against_float64(out, grads, q, k, v, bias, grad_out)  # dq, dk, dv only


@pytest.mark.parametrize("dim", [16, 48])
def test_unsupported_head_dim_runs_the_reference(triton_backend, monkeypatch, dim):
    assert dim not in SUPPORTED_HEAD_DIMS
    spy = _Spy(ka.attn_fwd_fp32)
    monkeypatch.setattr(ka, "attn_fwd_fp32", spy)
    q, k, v, bias, leaves = make_inputs(2, 2, 30, dim, torch.float32, "random")
    grad_out = torch.randn(q.shape)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    assert spy.launches == []
    check_against_float64(out, grads, q, k, v, bias, grad_out)


def test_bf16_runs_sdpa_under_the_interpreter(triton_backend):
    """The interpreter's bf16 tl.dot is wrong, so bf16 takes the PyTorch path there (the GPU
    test below runs the kernels in bf16)."""
    q, k, v, bias, leaves = make_inputs(1, 2, 50, 64, torch.bfloat16, "random")
    grad_out = torch.randn(q.shape).bfloat16()
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), leaves, grad_out)
    check_against_float64(out, grads, q, k, v, bias, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_falls_back_to_the_reference(torch_backend, dtype):
    """The custom op itself on the PyTorch path (what a graph compiled with the Triton backend
    runs under VTOK_FAST_BACKEND=torch): the reference forward and the closed-form backward,
    chunked over batch rows, with a fully masked row."""
    from vtok_fast.reduce import attention as host

    q, k, v, bias, leaves = make_inputs(3, 2, 40, 32, dtype, "neginf")
    with torch.no_grad():
        bias[2] = NEG_INF
    grad_out = torch.randn(q.shape).to(dtype)
    host._CPU_SCORE_ELEMS, saved = 2 * 40 * 40, host._CPU_SCORE_ELEMS  # one batch row per chunk
    try:
        out, grads = grads_of(lambda: host._attention_op(q, k, v, bias, 32 ** -0.5)[0], leaves, grad_out)
    finally:
        host._CPU_SCORE_ELEMS = saved
    assert out.transpose(1, 2).is_contiguous()  # the fake function's layout
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(grads[3][2], torch.zeros(40, dtype=dtype))
    check_against_float64(out, grads, q, k, v, bias, grad_out)


def test_reference_is_sdpa_with_a_float_mask():
    q, k, v, bias, _ = make_inputs(2, 2, 33, 32, torch.float32, "neginf")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])
    assert torch.equal(attention_reference(q, k, v, bias), want)


@pytest.mark.parametrize("bias_kind", [None, "random", "dead row"])
def test_torch_compile_fullgraph(backend, bias_kind):
    q, k, v, bias, leaves = make_inputs(2, 2, 40, 32, torch.float32, bias_kind and "random")
    if bias_kind == "dead row":
        with torch.no_grad():
            bias[1] = NEG_INF

    def step(q, k, v, bias):
        return attention(q, k, v, key_bias=bias).transpose(1, 2).reshape(2, 40, 64) * 2

    grad_out = torch.randn(2, 40, 64)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_grads = grads_of(lambda: compiled(q, k, v, bias), leaves, grad_out)
    want, want_grads = grads_of(lambda: step(q, k, v, bias), leaves, grad_out)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)


def test_bad_input():
    q = torch.randn(2, 3, 10, 32)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match=r"k must be 4-D \(B, H, N, d\), got shape \(3, 10, 32\)"):
        attention(q, q[0], q)
    with pytest.raises(TypeError, match="v must have dtype in"):
        attention(q, q, q.long())
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="k and v must have shape"):
        attention(q, q, torch.randn(2, 3, 11, 32))
    with pytest.raises(ValueError, match="k and v must have shape"):
        attention(q, torch.randn(2, 4, 10, 32), torch.randn(2, 4, 10, 32))
    with pytest.raises(ValueError, match=r"head dim d >= 1, got q \(2, 3, 10, 0\)"):
        attention(q[..., :0], q[..., :0], q[..., :0])
    with pytest.raises(ValueError, match=r"key_bias must have shape \(B, N\) = \(2, 10\), got \(2, 9\)"):
        attention(q, q, q, key_bias=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="key_bias must be 2-D"):
        attention(q, q, q, key_bias=torch.zeros(2, 1, 1, 10))
    with pytest.raises(TypeError, match=r"key_bias must have dtype in \(float32, float16, bfloat16, float64\), "
                                         "got torch.int64"):
        attention(q, q, q, key_bias=torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_bias is on meta but q is on cpu"):
        attention(q, q, q, key_bias=torch.zeros(2, 10, device="meta"))
    for scale in (True, "0.1", float("inf"), torch.tensor(0.1)):
        with pytest.raises(TypeError, match="scale must be a finite float"):
            attention(q, q, q, scale=scale)


# --- ahead-of-time compilation for sm_80 / sm_90 ----------------------------------------------------------
# Under TRITON_INTERPRET=1 the jit functions cannot be compiled for a GPU, so aot_compile_all runs in
# subprocesses without the interpreter (helpers.aot_reports).

SMALLEST_SHARED_MEMORY = 99 * 1024  # opt-in limit of sm_86 / sm_89, the smallest of sm_80+ GPUs
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FP32_BUFFERS = ("lse_ptr", "delta_ptr", "dbias_ptr")


def _signature(kernel, dtype) -> tuple[dict, dict, list]:
    """(signature, unit strides, 16-divisible args) as the JIT sees a launch on contiguous-d
    views of a (B, N, 3, H, d) qkv tensor: unit head-dim and bias strides, aligned pointers and
    16-divisible row and head strides."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # an autotuned kernel: unwrap
        kernel = kernel.fn
    names = kernel.arg_names
    sig, units = {}, {}
    for name in names:
        if name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_BUFFERS else f"*{TRITON_TYPE[dtype]}"
        elif name in ("scale", "qk_scale"):
            sig[name] = "fp32"
        elif name.startswith("stride_") and name.endswith(("d", "bn")):
            units[name] = 1
        else:
            sig[name] = "i32"
    divisible = [n for n in names if n.endswith("_ptr") or (n.startswith("stride_") and n not in units)]
    return sig, units, divisible


def aot_jobs():
    """(label, kernel, dtype, constexprs, config): every config of every kernel: 16-bit configs in
    fp16 at d = 128 (BLOCK_D = 128, where shared memory binds) with a bias and in bf16 at d = 64
    without, the fp32 config at d = 80 (padded to 128); the forward also at d = 32 and at a padded
    16-bit d = 96; the delta kernel."""
    jobs = []
    for label, kernel16, configs16, kernel32, configs32 in [
        ("fwd", ka.attn_fwd, ka.FWD_CONFIGS, ka.attn_fwd_fp32, ka.FWD_FP32_CONFIGS),
        ("dkdv", ka.attn_bwd_dkdv, ka.DKDV_CONFIGS, ka.attn_bwd_dkdv_fp32, ka.DKDV_FP32_CONFIGS),
        ("dq", ka.attn_bwd_dq, ka.DQ_CONFIGS, ka.attn_bwd_dq_fp32, ka.DQ_FP32_CONFIGS),
    ]:
        for config in configs16:
            jobs.append((label, kernel16, torch.float16, dict(HEAD_D=128, BLOCK_D=128, HAS_BIAS=True),
                         config))
            jobs.append((label, kernel16, torch.bfloat16, dict(HEAD_D=64, BLOCK_D=64, HAS_BIAS=False),
                         config))
        for config in configs32:
            jobs.append((label, kernel32, torch.float32, dict(HEAD_D=80, BLOCK_D=128, HAS_BIAS=True), config))
    for dim, block_d in ((32, 32), (96, 128)):
        jobs.append(("fwd", ka.attn_fwd, torch.float16, dict(HEAD_D=dim, BLOCK_D=block_d, HAS_BIAS=True),
                     ka.FWD_CONFIGS[0]))
    for dtype, dim, block_d in ((torch.float16, 64, 64), (torch.float32, 80, 128)):
        consts = dict(HEAD_D=dim, BLOCK_D=block_d, BLOCK_M=ka.DELTA_BLOCK_M)
        jobs.append(("delta", ka.attn_bwd_delta, dtype, consts, None))
    return jobs


def aot_compile_all(arch: int) -> list[dict]:
    from vtok_fast._launch import aot_compile

    records = []
    for label, kernel, dtype, consts, config in aot_jobs():
        sig, units, divisible = _signature(kernel, dtype)
        tiles, warps, stages = config_constexprs(config) if config else ({}, ka.DELTA_WARPS, 1)
        consts = dict(consts, **tiles, **units)
        if label != "delta":
            consts["PRECISION"] = "ieee"
        rec = {"what": f"{label} {dtype} {consts} warps={warps} stages={stages}", "dtype": str(dtype),
               "dot": label != "delta", "estimate": 1024 if config is None else ka.shared_memory_estimate(
                   label, config, consts["BLOCK_D"], torch.tensor([], dtype=dtype).element_size())}
        try:
            compiled = aot_compile(kernel, sig, consts, arch=arch, num_warps=warps, num_stages=stages,
                                   divisible=divisible)
            rec.update(shared=compiled.metadata.shared, tensor_cores=tensor_core_instructions(compiled, arch),
                       any_mma="mma" in compiled.asm["ptx"])
        except Exception as exc:  # reported by the test
            rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        records.append(rec)
    return records


@pytest.mark.parametrize("kind, configs16, configs32", [
    ("fwd", ka.FWD_CONFIGS, ka.FWD_FP32_CONFIGS), ("dkdv", ka.DKDV_CONFIGS, ka.DKDV_FP32_CONFIGS),
    ("dq", ka.DQ_CONFIGS, ka.DQ_FP32_CONFIGS)])
def test_first_and_fp32_configs_fit_every_gpu(kind, configs16, configs32):
    """What the launch-time pruning always keeps (configs[0], the single fp32 config) fits the
    smallest shared memory at the largest head-dim tile; the estimate bounds the compiled kernels
    (test_kernels_compile_for_gpu)."""
    first = ka.shared_memory_estimate(kind, configs16[0], 128, 2)
    assert first <= SMALLEST_SHARED_MEMORY
    assert all(ka.shared_memory_estimate(kind, c, 128, 2) > first for c in configs16[1:])  # the fallback
    assert len(configs32) == 1
    assert ka.shared_memory_estimate(kind, configs32[0], 128, 4) <= SMALLEST_SHARED_MEMORY


def test_launch_prunes_configs_to_the_shared_memory(monkeypatch):
    import vtok_fast._launch as launch

    q = torch.empty(1, dtype=torch.float16)
    for limit, kept in ((99 * 1024, 1), (227 * 1024, len(ka.FWD_CONFIGS)), (1024, 1)):
        monkeypatch.setattr(launch, "shared_memory_per_block", lambda device: limit)
        pruned = ka.attn_fwd.early_config_prune(ka.FWD_CONFIGS, {"q_ptr": q}, BLOCK_D=128)
        assert pruned == ka.FWD_CONFIGS[:kept]  # at least the smallest, configs[0]


# --- real GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, dim", [(197, 64), (577, 64), (1025, 64), (50, 80), (300, 128), (7, 32)])
def test_cuda_matches_float64(dtype, n, dim):
    torch.manual_seed(1)
    q, k, v, bias, leaves = make_inputs(4, 3, n, dim, dtype, "neginf")
    q, k, v, bias = (t.detach().cuda().requires_grad_() for t in (q, k, v, bias))
    grad_out = torch.randn(q.shape, device="cuda").to(dtype)
    out, grads = grads_of(lambda: attention(q, k, v, key_bias=bias), [q, k, v, bias], grad_out)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    check_against_float64(cpu(out), [cpu(g) for g in grads], cpu(q), cpu(k), cpu(v), cpu(bias), cpu(grad_out))
