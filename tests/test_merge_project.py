"""merge_project: Triton (interpreter on CPU) and PyTorch paths against the eager reference and a
float64 ground truth; window orders, norms, prefix, tails, every gradient, autocast,
torch.compile, bad input, and ahead-of-time compilation for sm_80 / sm_90."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import assert_close, compile_as_launched, config_constexprs, tensor_core_instructions
from vtok_fast.project.merge_project import merge_project, merge_project_reference, window_positions

# (norm, norm_type) combinations of the real modules: none (LLaVA), Qwen2-VL / Qwen2.5-VL
# (pre-concat LayerNorm / RMS), Swin / InternVL (post-concat LayerNorm), and post-concat RMS.
NORMS = [(None, "layernorm"), ("pre_concat", "layernorm"), ("pre_concat", "rmsnorm"),
         ("post_concat", "layernorm"), ("post_concat", "rmsnorm")]
ORDERS = ["swin", "row_major", "contiguous"]


def make_inputs(B, h, w, C, D, s, *, prefix=0, norm="post_concat", norm_type="layernorm", bias=True,
                dtype=torch.float32, shift=0.0, merge="concat", gate=False):
    """Tokens ``(B, prefix + h*w, C)`` and the op's parameters, all leaves requiring grad.
    ``shift`` offsets the tokens (a large mean tests the norm's statistics); ``gate`` adds a GLU
    gate projection."""
    K = C if merge == "mean" else s * s * C
    p = {"tokens": torch.randn(B, prefix + h * w, C) + shift, "weight": torch.randn(D, K) / K ** 0.5}
    p["bias"] = torch.randn(D) if bias else None
    if gate:
        p["gate_weight"] = torch.randn(D, K) / K ** 0.5
        p["gate_bias"] = torch.randn(D) if bias else None
    if norm is not None:
        width = C if norm == "pre_concat" else K
        p["norm_weight"] = 1 + 0.5 * torch.randn(width)
        p["norm_bias"] = 0.5 * torch.randn(width) if norm_type == "layernorm" else None
        if norm_type == "gemma_rmsnorm":  # scale 1 + w: Gemma's weights sit around 0
            p["norm_weight"] = 0.5 * torch.randn(width)
    p = {k: (None if v is None else v.to(dtype).requires_grad_()) for k, v in p.items()}
    return p


def call(fn, p, grid, **kw):
    tensors = {k: v for k, v in p.items() if k != "tokens"}
    return fn(p["tokens"], grid, **tensors, **kw)


def float64_copy(p):
    return {k: (None if v is None else v.detach().double().requires_grad_()) for k, v in p.items()}


def grads(out, p, g):
    leaves = [k for k, v in p.items() if v is not None]
    return dict(zip(leaves, torch.autograd.grad(out, [p[k] for k in leaves], g)))


def check_against_float64(p, grid, dtype, *, check_grads=True, **kw):
    """Output (and every gradient) of merge_project vs the float64 reference; output also vs the
    eager reference at the same dtype."""
    out = call(merge_project, p, grid, **kw)
    p64 = float64_copy(p)
    want = call(merge_project_reference, p64, grid, **kw)
    K = p["weight"].shape[1]
    assert out.dtype == p["weight"].dtype and out.shape == want.shape
    assert_close(out, want.detach(), dtype=dtype, reduction=K, msg="output vs float64")
    same_dtype = call(merge_project_reference, {k: (None if v is None else v.detach()) for k, v in p.items()},
                      grid, **kw)
    assert_close(out, same_dtype.double(), dtype=dtype, reduction=K, msg="output vs eager reference")
    if not check_grads:
        return
    g = torch.randn_like(out)
    got, expected = grads(out, p, g), grads(want, p64, g.double())
    # gradients reduce over the merged rows (weight, biases, norm affine) or over D then the norm
    # row (tokens): the longest of those sums sets the fp32 error growth
    reduction = max(out.numel() // out.shape[-1], p["weight"].shape[0], K)
    for name in got:
        assert got[name].dtype == p[name].dtype, name
        assert_close(got[name], expected[name], dtype=dtype, reduction=reduction, msg=f"grad {name}")


# --- correctness -------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("norm, norm_type", NORMS)
@pytest.mark.parametrize("window", [2, 3])
def test_matches_float64_fp32(backend, order, norm, norm_type, window):
    s = window
    p = make_inputs(2, 2 * s, 3 * s, 24, 20, s, prefix=1, norm=norm, norm_type=norm_type)
    check_against_float64(p, (2 * s, 3 * s), torch.float32, window=s, order=order, norm=norm,
                          norm_type=norm_type, activation="gelu", prefix=1)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("norm", ["pre_concat", "post_concat"])
def test_several_tiles_and_channel_tails(backend, order, norm):
    # Triton tiles under the interpreter: BM = BN = 64, BK = 32. M = 2 * 8 * 9 = 144 rows (3 row
    # tiles), D = 80 (2 column tiles), C = 40 (a full and a masked 8-wide channel step per window
    # position); a large token mean checks the chunked statistics.
    p = make_inputs(2, 16, 18, 40, 80, 2, norm=norm, shift=20.0)
    check_against_float64(p, (16, 18), torch.float32, window=2, order=order, norm=norm, activation="silu")


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu", "relu"])
def test_activations(backend, activation):
    p = make_inputs(1, 4, 4, 8, 16, 2, norm="pre_concat", bias=activation != "relu")
    check_against_float64(p, (4, 4), torch.float32, window=2, order="swin", norm="pre_concat",
                          activation=activation)


@pytest.mark.parametrize("norm, norm_type", NORMS)
def test_fp16_triton(triton_backend, norm, norm_type):
    # fp16 tokens and weights: tensor-core products on GPUs, fp32 statistics and accumulation.
    # The normalized operand is rounded to fp16 before the product (as nn.LayerNorm's fp16 output
    # is before nn.Linear), so the float64 comparison is at fp16 resolution.
    p = make_inputs(2, 4, 6, 40, 24, 2, prefix=2, norm=norm, norm_type=norm_type, dtype=torch.float16)
    check_against_float64(p, (4, 6), torch.float16, window=2, order="row_major", norm=norm,
                          norm_type=norm_type, activation="gelu", prefix=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_torch_path(torch_backend, dtype):
    # bf16 tl.dot is wrong in the interpreter: bf16 runs the PyTorch path here (and on GPU tests)
    p = make_inputs(2, 4, 4, 16, 24, 2, norm="post_concat", dtype=dtype)
    check_against_float64(p, (4, 4), dtype, window=2, order="swin", norm="post_concat", activation="gelu")


def test_bf16_under_the_interpreter_runs_the_torch_path(triton_backend):
    p = make_inputs(1, 4, 4, 16, 8, 2, dtype=torch.bfloat16)
    check_against_float64(p, (4, 4), torch.bfloat16, window=2, check_grads=False)


def test_backends_agree(monkeypatch):
    p = make_inputs(2, 6, 4, 12, 16, 2, prefix=1, norm="post_concat")
    outs = []
    for name in ("torch", "triton"):
        monkeypatch.setenv("VTOK_FAST_BACKEND", name)
        outs.append(call(merge_project, p, (6, 4), window=2, order="swin", activation="gelu", prefix=1))
    assert_close(outs[1], outs[0].detach().double(), dtype=torch.float32, reduction=4 * 12)


def test_gather_orders_are_the_real_modules(torch_backend):
    # integer channels = token index: the merged rows list exactly the tokens the real modules
    # concatenate (Swin: column-major windows, InternVL: row-major, Qwen: consecutive)
    h, w, s = 4, 6, 2
    tokens = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)
    eye = torch.eye(s * s)
    rows = {o: merge_project(tokens, (h, w), weight=eye, window=s, order=o, norm=None)[0] for o in ORDERS}
    assert rows["swin"][0].tolist() == [0, 6, 1, 7] and rows["swin"][1].tolist() == [2, 8, 3, 9]
    assert rows["row_major"][0].tolist() == [0, 1, 6, 7] and rows["row_major"][3].tolist() == [12, 13, 18, 19]
    assert rows["contiguous"][1].tolist() == [4, 5, 6, 7]
    grid = tokens.view(1, h, w, 1)
    swin = grid.reshape(1, h // 2, 2, w // 2, 2, 1).permute(0, 1, 3, 4, 2, 5).flatten(3)  # timm >= 1.0
    assert torch.equal(rows["swin"], swin.reshape(-1, 4))
    assert window_positions(2, "swin") == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_window_one_is_a_plain_linear(backend):
    x = torch.randn(3, 5, 16)
    weight, bias = torch.randn(8, 16), torch.randn(8)
    out = merge_project(x.reshape(-1, 16), None, weight=weight, bias=bias, window=1, order="contiguous",
                        norm=None, activation="gelu")
    assert_close(out, F.gelu(F.linear(x.double(), weight.double(), bias.double())).reshape(15, 8),
                 dtype=torch.float32, reduction=16)


def test_contiguous_2d_tokens_without_grid(backend):
    p = make_inputs(1, 4, 4, 8, 12, 2, norm="pre_concat")
    flat = p["tokens"].detach()[0].requires_grad_()
    out = merge_project(flat, None, weight=p["weight"], bias=p["bias"], window=2, order="contiguous",
                        norm="pre_concat", norm_weight=p["norm_weight"], norm_bias=p["norm_bias"])
    want = call(merge_project, p, (4, 4), window=2, order="contiguous", norm="pre_concat")
    assert out.shape == (4, 12)
    torch.testing.assert_close(out, want[0])


def test_prefix_tokens_are_kept_apart(backend):
    p = make_inputs(2, 4, 4, 8, 12, 2, prefix=3)
    out = call(merge_project, p, (4, 4), window=2, activation="gelu", prefix=3)
    body = dict(p, tokens=p["tokens"].detach()[:, 3:])
    torch.testing.assert_close(out, call(merge_project, body, (4, 4), window=2, activation="gelu"))
    changed = dict(p, tokens=p["tokens"].detach().clone())
    changed["tokens"][:, :3] = 1e4
    torch.testing.assert_close(out, call(merge_project, changed, (4, 4), window=2, activation="gelu", prefix=3))
    (d_tokens,) = torch.autograd.grad(out.sum(), p["tokens"])
    assert d_tokens[:, :3].eq(0).all() and d_tokens[:, 3:].abs().sum() > 0


def test_strided_tokens(backend):
    base = torch.randn(2, 16, 24)
    x = base[:, :, 4:20]  # channel stride 1, token stride 24: read in place
    p = make_inputs(2, 4, 4, 16, 8, 2)
    p["tokens"] = x.requires_grad_(False)
    check_against_float64(p, (4, 4), torch.float32, window=2, check_grads=False)


def test_no_grad_and_inference_mode(backend):
    p = make_inputs(1, 4, 4, 8, 8, 2)
    with torch.no_grad():
        a = call(merge_project, p, (4, 4), activation="gelu")
    with torch.inference_mode():
        b = call(merge_project, p, (4, 4), activation="gelu")
    torch.testing.assert_close(a, b)
    assert not a.requires_grad


def test_empty_batch(backend):
    p = make_inputs(1, 4, 4, 8, 8, 2)
    p["tokens"] = torch.randn(0, 16, 8)
    assert call(merge_project, p, (4, 4)).shape == (0, 4, 8)


@pytest.mark.parametrize("grid", [(0, 4), (4, 0), (0, 0)])
def test_empty_grid(backend, grid):
    """A grid side of 0 (Swin's PatchMerging on a (B, 0, W, C) map): an empty result and zero
    gradients, like the eager reference."""
    p = make_inputs(2, *grid, 8, 6, 2, prefix=1)
    check_against_float64(p, grid, torch.float32, prefix=1, activation="gelu")
    out = call(merge_project, p, grid, prefix=1, activation="gelu")
    assert out.shape == (2, 0, 6)
    out.sum().backward()
    assert all(not t.grad.any() for t in p.values() if t is not None)


def test_autocast_matches_eager_modules():
    # LayerNorm in fp32, Linear in bf16: the dtype and values of nn.LayerNorm + nn.Linear
    ln, lin = torch.nn.LayerNorm(32), torch.nn.Linear(32, 16)
    x = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = merge_project(x, (4, 4), weight=lin.weight, bias=lin.bias, norm_weight=ln.weight,
                            norm_bias=ln.bias, activation="gelu")
        rows = x.view(2, 2, 2, 2, 2, 8).permute(0, 1, 3, 4, 2, 5).reshape(2, 4, 32)
        want = F.gelu(lin(ln(rows)))
        # without a norm the fp32 tokens are cast too, as nn.Linear's input is
        plain = merge_project(rows, None, weight=lin.weight, norm=None, window=1, order="contiguous")
    assert out.dtype == want.dtype == torch.bfloat16 and plain.dtype == torch.bfloat16
    assert_close(out, want.detach().double(), dtype=torch.bfloat16, reduction=32)


def test_torch_compile_fullgraph(backend):
    p = make_inputs(2, 4, 4, 8, 12, 2, norm="post_concat")

    def fn(t, w, b, g, beta):
        return merge_project(t, (4, 4), weight=w, bias=b, norm_weight=g, norm_bias=beta, activation="gelu")

    args = (p["tokens"], p["weight"], p["bias"], p["norm_weight"], p["norm_bias"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch.testing.assert_close(out, fn(*args))
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, args, g), torch.autograd.grad(fn(*args), args, g))


# --- bad input ----------------------------------------------------------------------------------------

# --- the projectors of issue 21: mean pooling, Gemma's 1 + w, channel-major weights, GLU epilogue ---

@pytest.mark.parametrize("order", ["row_major", "contiguous"])
@pytest.mark.parametrize("norm, norm_type", [(None, "layernorm"), ("post_concat", "layernorm"),
                                             ("post_concat", "rmsnorm"), ("post_concat", "gemma_rmsnorm")])
@pytest.mark.parametrize("window", [2, 3])
def test_mean_merge_matches_float64(backend, order, norm, norm_type, window):
    # Gemma 3 / Phi-4: AvgPool2d(s) then the norm over C; C = 40 spans a full and a masked channel
    # step of both kernels; a shifted mean checks the pooled statistics
    s = window
    p = make_inputs(2, 2 * s, 4 * s, 40, 24, s, prefix=1, norm=norm, norm_type=norm_type, merge="mean", shift=3.0)
    check_against_float64(p, (2 * s, 4 * s), torch.float32, window=s, order=order, merge="mean", norm=norm,
                          norm_type=norm_type, prefix=1)


def test_mean_merge_is_avg_pool2d(backend):
    # Gemma3MultiModalProjector's pooling: NCHW AvgPool2d over the row-major token grid
    x = torch.randn(2, 8 * 12, 16)
    eye = torch.eye(16)
    got = merge_project(x, (8, 12), weight=eye, window=4, order="row_major", merge="mean", norm=None)
    want = F.avg_pool2d(x.transpose(1, 2).reshape(2, 16, 8, 12), 4).flatten(2).transpose(1, 2)
    assert_close(got, want.double(), dtype=torch.float32, reduction=16)


@pytest.mark.parametrize("norm", ["pre_concat", "post_concat"])
def test_gemma_rmsnorm_scales_by_one_plus_weight(backend, norm):
    p = make_inputs(1, 4, 4, 12, 10, 2, norm=norm, norm_type="gemma_rmsnorm")
    check_against_float64(p, (4, 4), torch.float32, window=2, order="swin", norm=norm, norm_type="gemma_rmsnorm")
    q = {k: (None if v is None else v.detach()) for k, v in p.items()}
    plain = dict(q, norm_weight=1 + q["norm_weight"])
    torch.testing.assert_close(call(merge_project, q, (4, 4), window=2, norm=norm, norm_type="gemma_rmsnorm"),
                               call(merge_project, plain, (4, 4), window=2, norm=norm, norm_type="rmsnorm"))


@pytest.mark.parametrize("norm, norm_type", [(None, "layernorm"), ("pre_concat", "rmsnorm"),
                                             ("post_concat", "layernorm")])
@pytest.mark.parametrize("order", ["row_major", "contiguous"])
def test_channel_major_weight(backend, norm, norm_type, order):
    # GLM-4V's Conv2d(k=s, stride=s) downsample and Mistral 3's F.unfold: column c * s*s + q
    p = make_inputs(2, 4, 6, 40, 20, 2, norm=norm, norm_type=norm_type)
    check_against_float64(p, (4, 6), torch.float32, window=2, order=order, norm=norm, norm_type=norm_type,
                          weight_layout="channel_major")


def test_channel_major_is_the_conv2d_flattening(backend):
    # the GLM-4V vision model: tokens (N, C) viewed (-1, s, s, C), permuted NCHW, Conv2d(k=s, stride=s)
    conv = nn.Conv2d(16, 24, kernel_size=2, stride=2)
    x = torch.randn(5 * 4, 16)
    with torch.no_grad():
        want = conv(x.view(-1, 2, 2, 16).permute(0, 3, 1, 2)).view(-1, 24)
        got = merge_project(x, None, weight=conv.weight.flatten(1), bias=conv.bias, window=2, order="contiguous",
                            norm=None, weight_layout="channel_major")
    assert_close(got, want.double(), dtype=torch.float32, reduction=64)


@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_glu_epilogue(backend, activation, bias):
    # Aya / Cohere2 / GLM-4V: activation(a @ gate.T) * (a @ up.T); D = 80: two column tiles
    p = make_inputs(2, 8, 6, 24, 80, 2, norm="post_concat", bias=bias, gate=True)
    check_against_float64(p, (8, 6), torch.float32, window=2, order="row_major", activation=activation)


@pytest.mark.parametrize("stacked", ["up_gate", "gate_up"])
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_glu_is_the_chunked_linear(backend, stacked, bias):
    # Aya Vision: x, gate = linear_1(a).chunk(2); act(gate) * x, from one (2D, K) weight
    p = make_inputs(2, 8, 6, 24, 160, 2, norm="post_concat", bias=bias)
    check_against_float64(p, (8, 6), torch.float32, window=2, order="row_major", activation="silu",
                          stacked_glu=stacked)
    with torch.no_grad():  # and the same numbers as the two halves passed as weight / gate_weight
        halves = p["weight"].chunk(2)
        bias_halves = p["bias"].chunk(2) if bias else (None, None)
        up = 0 if stacked == "up_gate" else 1
        got = call(merge_project, p, (8, 6), window=2, order="row_major", activation="silu", stacked_glu=stacked)
        q = dict(p, weight=halves[up], bias=bias_halves[up], gate_weight=halves[1 - up], gate_bias=bias_halves[1 - up])
        torch.testing.assert_close(got, call(merge_project, q, (8, 6), window=2, order="row_major", activation="silu"),
                                   rtol=0, atol=0)


def test_stacked_glu_weight_gets_one_gradient(torch_backend):
    # the stacked weight is one operand of the op: its gradient is the op's own (2D, K) tensor,
    # not the concatenation autograd builds for two views of it
    p = make_inputs(1, 4, 4, 8, 32, 2, norm=None)
    out = call(merge_project, p, (4, 4), window=2, norm=None, activation="silu", stacked_glu="up_gate")
    assert out.shape == (1, 4, 16) and "SplitBackward0" not in _graph_nodes(out)
    up, gate = p["weight"].split(16)
    up_bias, gate_bias = p["bias"].split(16)
    halves = merge_project(p["tokens"], (4, 4), window=2, norm=None, activation="silu", weight=up, bias=up_bias,
                           gate_weight=gate, gate_bias=gate_bias)
    assert "SplitBackward0" in _graph_nodes(halves)  # what the stacked form avoids


def _graph_nodes(out) -> set:
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn.name() not in seen:
            seen.add(fn.name())
            todo.extend(f for f, _ in fn.next_functions)
    return seen


@pytest.mark.parametrize("gate", [False, True])
def test_onednn_cpu_gemm(torch_backend, monkeypatch, gate):
    # the PyTorch path's GEMMs (forward, dA = dZ W, dW = dZ^T A) on oneDNN, which the CPU path
    # takes where it measures faster than torch's (vtok_fast._cpu_gemm); tests force each provider
    from vtok_fast import _cpu_gemm

    assert _cpu_gemm.ONEDNN, "this torch build has no oneDNN: only torch's GEMM is tested"
    used = []
    monkeypatch.setattr(_cpu_gemm, "FORCE", "onednn")
    monkeypatch.setitem(_cpu_gemm._RUNS, "onednn", lambda *a: used.append(1) or _cpu_gemm._onednn(*a))
    p = make_inputs(2, 6, 4, 12, 40, 2, prefix=1, norm="pre_concat", gate=gate)
    check_against_float64(p, (6, 4), torch.float32, window=2, order="swin", norm="pre_concat", activation="gelu",
                          prefix=1)
    assert len(used) >= (3 if not gate else 6)


@pytest.mark.parametrize("case", ["mean", "glu", "channel_major"])
def test_fp16_triton_new_modes(triton_backend, case):
    kw = {"mean": dict(merge="mean", norm_type="gemma_rmsnorm"), "glu": dict(activation="silu"),
          "channel_major": dict(weight_layout="channel_major", norm="pre_concat", norm_type="rmsnorm")}[case]
    norm = kw.pop("norm", "post_concat")
    p = make_inputs(2, 4, 6, 40, 24, 2, norm=norm, norm_type=kw.get("norm_type", "layernorm"),
                    merge=kw.get("merge", "concat"), gate=case == "glu", dtype=torch.float16)
    check_against_float64(p, (4, 6), torch.float16, window=2, order="row_major", norm=norm, **kw)


def test_new_modes_under_torch_compile(backend):
    p = make_inputs(1, 4, 4, 8, 16, 2, norm="post_concat", merge="mean", norm_type="gemma_rmsnorm", gate=True)
    q = {k: (None if v is None else v.detach()) for k, v in p.items()}

    def fn(t, w, b, g, gw, gb):
        return merge_project(t, (4, 4), weight=w, bias=b, norm_weight=g, merge="mean", window=2,
                             norm_type="gemma_rmsnorm", gate_weight=gw, gate_bias=gb, activation="silu")

    args = (q["tokens"], q["weight"], q["bias"], q["norm_weight"], q["gate_weight"], q["gate_bias"])
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*args), fn(*args))


def _bad(**overrides):
    kw = dict(tokens=torch.randn(2, 16, 8), grid=(4, 4), weight=torch.randn(6, 32), bias=None,
              norm_weight=None, norm_bias=None)
    kw.update(overrides)
    tokens, grid = kw.pop("tokens"), kw.pop("grid")
    return lambda: merge_project(tokens, grid, **kw)


@pytest.mark.parametrize("call_, err, words", [
    (_bad(grid=(5, 4), tokens=torch.randn(2, 20, 8)), ValueError,
     r"grid sides must be divisible by window=2, got grid \(5, 4\)"),
    (_bad(grid=(4, 4), tokens=torch.randn(2, 15, 8)), ValueError, "needs 16 after the prefix, got 15"),
    (_bad(grid=(3, 3), window=3, tokens=torch.randn(2, 10, 8), prefix=2), ValueError,
     "needs 9 after the prefix, got 8"),
    (_bad(weight=torch.randn(6, 30)), ValueError, r"weight must have window\*\*2 \* C = 2\*\*2 \* 8 = 32 columns"),
    (_bad(bias=torch.randn(5)), ValueError, "bias must be"),
    (_bad(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias must have the weight's dtype"),
    (_bad(norm="pre_concat", norm_weight=torch.randn(32)), ValueError, r"norm_weight must be \(8,\)"),
    (_bad(norm_weight=torch.randn(8)), ValueError, r"norm_weight must be \(32,\)"),
    (_bad(norm_weight=torch.randn(32), norm_bias=torch.randn(32).half()), TypeError, "norm_bias has dtype"),
    (_bad(norm=None, tokens=torch.randn(2, 16, 8).half()), TypeError, "tokens must have the weight's dtype"),
    (_bad(norm=None, norm_weight=torch.randn(32)), ValueError, "need norm="),
    (_bad(norm_type="rmsnorm", norm_bias=torch.randn(32)), ValueError, "norm_bias must be None"),
    (_bad(order="col_major"), ValueError, "order must be one of"),
    (_bad(norm="after"), ValueError, "norm must be one of"),
    (_bad(norm_type="batchnorm"), ValueError, "norm_type must be one of"),
    (_bad(activation="tanh"), ValueError, "activation must be one of"),
    (_bad(window=0), ValueError, "window must be >= 1"),
    (_bad(window=2.0), TypeError, "window must be an int"),
    (_bad(prefix=-1), ValueError, "prefix must be >= 0"),
    (_bad(prefix=17), ValueError, "prefix must be <="),
    (_bad(grid=None), ValueError, "grid .* is required for order='swin'"),
    (_bad(grid=(4,)), TypeError, "grid must be a pair"),
    (_bad(grid=None, order="contiguous", tokens=torch.randn(2, 18, 8)), ValueError, "whole number of windows"),
    (_bad(tokens=torch.randint(0, 3, (2, 16, 8))), TypeError, "tokens must have dtype"),
    (_bad(tokens=torch.randn(16, 8, 1, 1)), ValueError, "tokens must be"),
    (_bad(weight=torch.randn(32)), ValueError, "weight must be"),
    (_bad(tokens=torch.randn(2, 16, 0), weight=torch.randn(6, 0)), ValueError, "C >= 1"),
    (_bad(eps=-1.0), ValueError, r"eps must be a number in \(0, inf\), got -1.0"),
    (_bad(eps=0.0), ValueError, r"eps must be a number in \(0, inf\), got 0.0"),
    (_bad(eps=float("nan")), ValueError, r"eps must be a number in \(0, inf\), got nan"),
    (_bad(eps=float("inf")), ValueError, r"eps must be a number in \(0, inf\), got inf"),
    (_bad(eps=None), TypeError, "eps must be a real number, got NoneType None"),
    (_bad(eps="1e-5"), TypeError, "eps must be a real number, got str '1e-5'"),
    (_bad(eps=True), TypeError, "eps must be a real number, got bool True"),
    (_bad(grid=(-2, 4)), TypeError, r"grid must be a pair of non-negative ints \(h, w\), got \(-2, 4\)"),
    (_bad(weight=torch.randn(6, 32, device="meta")), ValueError, "weight is on meta"),
    ([1.0], TypeError, "torch.Tensor"),
    (_bad(merge="max"), ValueError, "merge must be one of"),
    (_bad(merge="mean", norm="pre_concat", norm_weight=torch.randn(8)), ValueError, "needs merge='concat'"),
    (_bad(merge="mean"), ValueError, r"weight must have C \(merge='mean'\) = 8 columns"),
    (_bad(weight_layout="c_major"), ValueError, "weight_layout must be one of"),
    (_bad(norm_type="gemma_rmsnorm", norm_bias=torch.randn(32)), ValueError, "norm_bias must be None"),
    (_bad(stacked_glu="gate"), ValueError, "stacked_glu must be one of"),
    (_bad(stacked_glu="up_gate", gate_weight=torch.randn(6, 32)), ValueError, "must be None with stacked_glu"),
    (_bad(stacked_glu="up_gate", weight=torch.randn(7, 32)), ValueError, "even number of rows"),
    (_bad(gate_bias=torch.randn(6)), ValueError, "gate_bias needs gate_weight"),
    (_bad(gate_weight=torch.randn(6, 16)), ValueError, "gate_weight must have the weight's shape"),
    (_bad(gate_weight=torch.randn(6, 32).half()), TypeError, "gate_weight must have the weight's dtype"),
    (_bad(gate_weight=torch.randn(6, 32), bias=torch.randn(6)), ValueError, "both or neither"),
    (_bad(gate_weight=torch.randn(6, 32), gate_bias=torch.randn(6), bias=torch.randn(6).half()), TypeError,
     "bias must have the weight's dtype"),
])
def test_bad_input(call_, err, words):
    fn = call_ if callable(call_) else (lambda: merge_project(call_, (4, 4), weight=torch.randn(6, 32)))
    with pytest.raises(err, match=words):
        fn()


# --- ahead-of-time compilation for sm_80 / sm_90 -------------------------------------------------------
# The suite runs with TRITON_INTERPRET=1; the compiles run in interpreter-free subprocesses that call
# aot_compile_all() below (tests/helpers.py's aot_reports).

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# Qwen2-VL scale launch (tokens viewed (1, L, C)): the run-time integers the JIT specializes on
QWEN = dict(B=1, L=4096, C=1280, D=5120, s=2)

# (tokens, weight) dtypes the host launches: matching halves, fp32 tokens into a bf16 Linear
# (autocast), fp32 with IEEE and with TF32 products
FWD_VARIANTS = [("fp16", "fp16", False), ("bf16", "bf16", False), ("fp32", "bf16", False),
                ("fp32", "fp32", False), ("fp32", "fp32", True)]
# module flavours: the constexprs each family's launch sets (besides the tiles and dtypes)
_BASE = dict(S=2, POOL=False, G_OFFSET=0.0, HAS_GATE=False)
FLAVOURS = {
    "qwen": dict(_BASE, ORDER="contiguous", NORM="pre", ACTIVATION="gelu", HAS_BIAS=True, SAVE_PRE=True),
    "swin": dict(_BASE, ORDER="swin", NORM="post", ACTIVATION="none", HAS_BIAS=False, SAVE_PRE=False),
    "internvl": dict(_BASE, ORDER="row_major", NORM="post", ACTIVATION="gelu", HAS_BIAS=True, SAVE_PRE=False),
    "llava": dict(_BASE, S=1, ORDER="contiguous", NORM="none", ACTIVATION="gelu", HAS_BIAS=True, SAVE_PRE=True),
    # Gemma 3: 4x4 AvgPool, RMS norm scaled by 1 + w, no bias
    "gemma3": dict(_BASE, S=4, ORDER="row_major", NORM="post", POOL=True, G_OFFSET=1.0, ACTIVATION="none",
                   HAS_BIAS=False, SAVE_PRE=False),
    # GLM-4V's downsample: per-token RMS norm, Conv2d weight read channel-major
    "glm4v": dict(_BASE, ORDER="contiguous", NORM="pre", ACTIVATION="none", HAS_BIAS=True, SAVE_PRE=False,
                  stride_wq=1, stride_wc=4, stride_gq=1, stride_gc=4),
    # Aya: pixel shuffle, LayerNorm, SwiGLU epilogue (the GLU configs)
    "aya": dict(_BASE, ORDER="row_major", NORM="post", ACTIVATION="silu", HAS_BIAS=True, SAVE_PRE=True,
                HAS_GATE=True),
}
STATS_VARIANTS = [("contiguous", True, False, False), ("swin", False, False, False),
                  ("row_major", False, True, False), ("row_major", False, True, True)]  # order, per-token, RMS, POOL


def fwd_configs(flavour: str) -> list:
    """The tile configs compiled for a flavour: every one of its kernel for Qwen and Aya."""
    from vtok_fast.kernels import merge_project as km

    if flavour == "aya":
        return km.GLU_CONFIGS
    return km.FWD_CONFIGS if flavour == "qwen" else km.FWD_CONFIGS[:1]


def aot_record_count() -> int:
    return 3 * len(STATS_VARIANTS) + len(FWD_VARIANTS) * sum(len(fwd_configs(f)) for f in FLAVOURS)


def _values():
    B, L, C, D, s = QWEN["B"], QWEN["L"], QWEN["C"], QWEN["D"], QWEN["s"]
    K, M = s * s * C, B * L // (s * s)
    return dict(stride_om=D, stride_od=1, stride_xb=L * C, stride_xl=C, stride_xc=1, stride_wd=K, stride_wq=C,
                stride_wc=1, stride_gd=K, stride_gq=C, stride_gc=1, M=M, R=M, D=D, C=C, P=0, W=64, WS=32)


def _compile(kernel, pointers, consts, arch, num_warps, num_stages, floats=()):
    """Compile as launched; ``stride_*`` entries of ``consts`` are run-time values (JIT-specialized
    like any launch argument), the rest constexprs."""
    values = dict(_values(), **{k: v for k, v in consts.items() if k.startswith("stride_") and v != 1})
    consts = {k: v for k, v in consts.items() if k not in values or v == 1}
    return compile_as_launched(kernel, pointers, values, consts, arch=arch, num_warps=num_warps,
                               num_stages=num_stages, floats=floats)


def aot_compile_all(arch: int) -> list[dict]:
    """Compile the statistics kernel and every forward config x dtype x module flavour for
    ``sm_<arch>``; one record per compile."""
    from vtok_fast.kernels import merge_project as km

    records = []

    def run(what, kind, fn):
        rec = {"what": what, "kind": kind}
        try:
            compiled = fn()
            rec.update(shared=compiled.metadata.shared, tensor_cores=tensor_core_instructions(compiled, arch),
                       any_mma="mma" in compiled.asm["ptx"])
        except Exception as exc:  # reported by the test
            rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        records.append(rec)

    for tokens in ("fp32", "fp16", "bf16"):
        for order, per_token, rms, pool in STATS_VARIANTS:
            consts = dict(S=2, ORDER=order, PER_TOKEN=per_token, RMS=rms, POOL=pool, BLOCK_M=km.STATS_BLOCK_M,
                          BLOCK_C=km.STATS_BLOCK_C, stride_xc=1)
            run(f"stats {tokens} {order} per_token={per_token} rms={rms} pool={pool}", "stats",
                lambda consts=consts, tokens=tokens: _compile(
                    km._merge_project_stats, dict(mean_ptr="fp32", rstd_ptr="fp32", x_ptr=tokens), consts,
                    arch, km.STATS_NUM_WARPS, 1, floats=("eps",)))

    for tokens, weight, tf32 in FWD_VARIANTS:
        for flavour, flags in FLAVOURS.items():
            for config in fwd_configs(flavour):
                tuned, warps, stages = config_constexprs(config)
                norm = flags["NORM"] != "none"
                consts = dict(tuned, HAS_G=norm, HAS_BETA=norm and flags["G_OFFSET"] == 0.0 and flavour != "glm4v",
                              ALLOW_TF32=tf32, stride_od=1, stride_xc=1, stride_wc=1, stride_gc=1)
                consts.update(flags)
                pointers = dict(out_ptr=weight, pre_ptr=weight, gpre_ptr=weight, x_ptr=tokens, mean_ptr="fp32",
                                rstd_ptr="fp32", g_ptr=tokens, beta_ptr=tokens, w_ptr=weight, wg_ptr=weight,
                                bias_ptr=weight, gbias_ptr=weight)
                kind = "fwd_ieee" if weight == "fp32" and not tf32 else "fwd"
                run(f"fwd {tokens}->{weight} tf32={tf32} {flavour} {tuned} warps={warps}", kind,
                    lambda consts=consts, pointers=pointers, warps=warps, stages=stages: _compile(
                        km._merge_project_fwd_kernel, pointers, consts, arch, warps, stages))
    return records


# --- real GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order, norm", [("contiguous", "pre_concat"), ("swin", "post_concat"),
                                         ("row_major", "post_concat")])
def test_cuda_matches_float64(dtype, order, norm):
    p = make_inputs(2, 32, 24, 200, 300, 2, prefix=1, norm=norm)
    p = {k: (None if v is None else v.detach().to("cuda", dtype).requires_grad_()) for k, v in p.items()}
    check_against_float64(p, (32, 24), dtype, window=2, order=order, norm=norm, activation="gelu", prefix=1)
