"""Fused patch embedding: Triton (interpreter on CPU) and PyTorch paths against float64 truth,
gradients, timm parity, bad inputs, the module and torch.compile."""
import pytest
import torch
import torch.nn as nn
from helpers import assert_close, compile_as_launched, config_constexprs, tensor_core_instructions

import vtok_fast
from vtok_fast.encode.patch_embed import PatchEmbed, patch_embed, patch_embed_reference



@pytest.fixture(autouse=True)
def _on_test_device(device):
    """Tests build their tensors on the suite's device: CPU (Triton in the interpreter), or CUDA
    with real kernels on a GPU run."""
    if device.type == "cpu":
        yield
        return
    torch.set_default_device(device)
    yield
    torch.set_default_device(None)
    torch.set_default_device(None)


# (name, B, C, H, W, ph, pw, D, prefix rows P, pos_covers_prefix, bias, pos table)
CASES = [
    ("p16_remainder", 2, 3, 40, 37, 16, 16, 32, 1, True, True, True),
    ("p14_nonsquare_B1_no_embed_class", 1, 3, 45, 30, 14, 14, 48, 2, False, True, True),
    ("patch14x16_C4_no_prefix", 2, 4, 30, 50, 14, 16, 64, 0, True, True, True),
    ("C1_no_bias_no_pos", 2, 1, 32, 32, 16, 16, 16, 1, True, False, False),
    ("no_prefix_no_pos", 1, 3, 64, 48, 16, 16, 64, 0, True, True, False),
    ("p14_cls_and_registers", 2, 3, 56, 56, 14, 14, 32, 5, True, True, True),
]
CASE_IDS = [c[0] for c in CASES]


def make_inputs(B, C, H, W, ph, pw, D, P, covers, has_bias, has_pos, dtype, *, image_grad=True):
    N = (H // ph) * (W // pw)
    x = torch.randn(B, C, H, W)
    w = torch.randn(D, C, ph, pw) / (C * ph * pw) ** 0.5
    b = torch.randn(D) if has_bias else None
    pos = torch.randn(1, (P if covers else 0) + N, D) if has_pos else None
    pre = torch.randn(1, P, D) if P else None
    params = [w, b, pos, pre]
    params = [None if t is None else t.to(dtype).requires_grad_() for t in params]
    x.requires_grad_(image_grad)
    return x, params


def float64_copies(x, params):
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    return leaf(x), [leaf(t) for t in params]


def run_with_grads(fn, x, params, grad, **kw):
    out = fn(x, *params, **kw)
    out.backward(grad)
    grads = [None if t is None else t.grad for t in [x, *params]]
    return out.detach(), grads


def check_against_float64(out, grads, out64, grads64, dtype, B, N, D, K):
    assert_close(out, out64, dtype=dtype, reduction=K, msg="forward")
    # reduction length of each gradient: pixels over D, weight and bias over the B*N patch rows,
    # position rows and prefix tokens over the batch
    for name, g, g64, red in zip(("images", "weight", "bias", "pos", "prefix"), grads, grads64,
                                 (D, B * N, B * N, B, B)):
        if g64 is None:
            assert g is None, name
            continue
        assert g is not None, name
        assert g.dtype == (torch.float32 if name == "images" else dtype), name
        assert_close(g, g64, dtype=dtype, reduction=red, msg=f"grad {name}")


BACKEND_DTYPES = [("triton", torch.float32), ("triton", torch.float16),
                  ("torch", torch.float32), ("torch", torch.float16), ("torch", torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_grads_match_float64(case, backend, dtype, monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    _, B, C, H, W, ph, pw, D, P, covers, has_bias, has_pos = case
    N, K = (H // ph) * (W // pw), C * ph * pw
    x, params = make_inputs(B, C, H, W, ph, pw, D, P, covers, has_bias, has_pos, dtype)
    grad = torch.randn(B, P + N, D).to(dtype)

    out, grads = run_with_grads(patch_embed, x, params, grad, pos_covers_prefix=covers)
    assert out.shape == (B, P + N, D) and out.dtype == dtype
    x64, params64 = float64_copies(x, params)
    out64, grads64 = run_with_grads(patch_embed_reference, x64, params64, grad.double(),
                                    pos_covers_prefix=covers)
    check_against_float64(out, grads, out64, grads64, dtype, B, N, D, K)
    if backend == "triton":
        # the unfused reference in the same dtype sits within the same tolerance
        with torch.no_grad():
            ref = patch_embed_reference(x, *params, pos_covers_prefix=covers)
        assert_close(ref, out64, dtype=dtype, reduction=K)


def test_weight_grad_split_over_rows(triton_backend, monkeypatch):
    """dW reduces M = B*N rows in several programs per tile (fp32 partials, then one sum),
    with an uneven last slice."""
    import vtok_fast.encode.patch_embed as host

    monkeypatch.setattr(host, "sm_count", lambda device: 64)
    B, C, H, W, p, D = 5, 3, 160, 160, 16, 32
    N, K = (H // p) * (W // p), C * p * p  # M = 500 rows: two slices of 256 and 244
    x, params = make_inputs(B, C, H, W, p, p, D, 1, True, True, True, torch.float32, image_grad=False)
    grad = torch.randn(B, 1 + N, D)
    out, grads = run_with_grads(patch_embed, x, params, grad)
    _, params64 = float64_copies(None, params)
    out64, grads64 = run_with_grads(patch_embed_reference, x.double(), params64, grad.double())
    check_against_float64(out, grads, out64, grads64, torch.float32, B, N, D, K)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uint8_images_with_mean_std(backend, dtype, monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    B, C, H, W, p, D, P = 2, 3, 50, 44, 14, 32, 1
    N, K = (H // p) * (W // p), C * p * p
    x = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)
    _, params = make_inputs(B, C, H, W, p, p, D, P, True, True, True, dtype, image_grad=False)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    grad = torch.randn(B, P + N, D).to(dtype)
    out, grads = run_with_grads(patch_embed, x, params, grad, mean=mean, std=std)
    _, params64 = float64_copies(None, params)
    out64, grads64 = run_with_grads(patch_embed_reference, x, params64, grad.double(), mean=mean, std=std)
    check_against_float64(out, grads, out64, grads64, dtype, B, N, D, K)
    # uint8 without mean/std: scaled by 1/255 only
    out = patch_embed(x, *[t.detach() for t in params])
    assert_close(out, patch_embed_reference(x, *[t.detach().double() for t in params]),
                 dtype=dtype, reduction=K)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float_images_mean_std_image_grad_and_remainder(backend, monkeypatch):
    """Normalization on the load: the pixel gradient carries 1/std; dropped pixels get 0."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    B, C, H, W, p, D = 2, 3, 37, 35, 16, 32
    N, K = (H // p) * (W // p), C * p * p
    x, params = make_inputs(B, C, H, W, p, p, D, 1, False, True, True, torch.float32)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.5, 2.0])
    grad = torch.randn(B, 1 + N, D)
    out, grads = run_with_grads(patch_embed, x, params, grad, pos_covers_prefix=False, mean=mean, std=std)
    x64, params64 = float64_copies(x, params)
    out64, grads64 = run_with_grads(patch_embed_reference, x64, params64, grad.double(),
                                    pos_covers_prefix=False, mean=mean, std=std)
    check_against_float64(out, grads, out64, grads64, torch.float32, B, N, D, K)
    assert torch.all(grads[0][:, :, 2 * p:, :] == 0) and torch.all(grads[0][:, :, :, 2 * p:] == 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend, monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    B, C, H, W, p, D, P = 2, 3, 32, 48, 16, 32, 2
    N, K = (H // p) * (W // p), C * p * p
    x = torch.randn(B, C, H, 2 * W)[..., ::2]                      # strided width
    w = torch.randn(C, D, p, p).transpose(0, 1) / K ** 0.5          # (D, C, p, p), permuted
    b = torch.randn(2 * D)[::2]
    pos = torch.randn(1, P + N, 2 * D)[..., :D]
    pre = torch.randn(P, 3 * D)[:, D:2 * D]
    for t in (w, b, pos, pre):
        t.requires_grad_()
    xc = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(B, P + N, D)[:, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    for images in (x, xc):
        params = [w, b, pos, pre]
        for t in params:
            t.grad = None
        out, grads = run_with_grads(patch_embed, images, params, grad)
        _, params64 = float64_copies(None, params)
        out64, grads64 = run_with_grads(patch_embed_reference, images.double(), params64, grad.double())
        check_against_float64(out, grads, out64, grads64, torch.float32, B, N, D, K)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend, monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    x, params = make_inputs(0, 3, 32, 32, 16, 16, 16, 1, True, True, True, torch.float32)
    out = patch_embed(x, *params)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert torch.all(params[0].grad == 0) and torch.all(params[2].grad == 0)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend,weight_dtype,out_dtype", [
    ("triton", torch.float32, torch.float16), ("triton", torch.float16, torch.float32),
    ("triton", torch.float32, torch.float64), ("torch", torch.float32, torch.bfloat16),
    ("torch", torch.bfloat16, torch.float32), ("torch", torch.float16, torch.float64)])
def test_out_dtype(backend, weight_dtype, out_dtype, monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    B, C, H, W, p, D, P = 2, 3, 32, 32, 16, 32, 1
    x, params = make_inputs(B, C, H, W, p, p, D, P, True, True, True, weight_dtype, image_grad=False)
    out = patch_embed(x, *params, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    out64 = patch_embed_reference(x.double(), *[t.detach().double() for t in params])
    coarser = max((weight_dtype, out_dtype), key=lambda d: torch.finfo(d).eps)
    assert_close(out.detach(), out64, dtype=coarser, reduction=C * p * p)
    out.float().sum().backward()
    assert params[0].grad.dtype == weight_dtype


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["vit", "vit_no_embed_class_regs", "vit_no_cls", "deit_distilled"])
def test_matches_timm_vision_transformer(variant, backend, monkeypatch):
    """Same tokens as timm's ``_pos_embed(patch_embed(x))`` for its prefix / table layouts."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=(48, 32), patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    if variant == "vit":
        model = VisionTransformer(**kw)
    elif variant == "vit_no_embed_class_regs":
        model = VisionTransformer(**kw, no_embed_class=True, reg_tokens=4)
    elif variant == "vit_no_cls":
        model = VisionTransformer(**kw, class_token=False, global_pool="avg")
    else:
        model = VisionTransformerDistilled(**kw)
    model.eval()
    for prm in model.parameters():
        nn.init.normal_(prm, std=0.5)
    prefix = [getattr(model, n) for n in ("cls_token", "reg_token", "dist_token") if getattr(model, n, None) is not None]
    prefix = torch.cat(prefix, dim=1) if prefix else None
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        expected = model._pos_embed(model.patch_embed(x))
        proj = model.patch_embed.proj
        out = patch_embed(x, proj.weight, proj.bias, model.pos_embed, prefix,
                          pos_covers_prefix=not model.no_embed_class)
    assert_close(out, expected.double(), dtype=torch.float32, reduction=3 * 16 * 16)


def test_public_name_is_callable():
    x = torch.randn(1, 3, 32, 32)
    w = torch.randn(8, 3, 16, 16)
    torch.testing.assert_close(vtok_fast.patch_embed(x, w), patch_embed(x, w))


# --- bad inputs ---------------------------------------------------------------------------------

def _bad_case(**override):
    args = dict(images=torch.randn(2, 3, 32, 32), weight=torch.randn(8, 3, 16, 16), bias=torch.randn(8),
                pos_embed=torch.randn(1, 5, 8), prefix=torch.randn(1, 1, 8))
    args.update(override)
    return args


# each override builds its tensors when the test runs (on the test device)
BAD_INPUTS = [
    ("images_rank", lambda: dict(images=torch.randn(3, 32, 32)), ValueError, r"images must be \(B, C, H, W\), got shape \(3, 32, 32\)"),
    ("images_dtype", lambda: dict(images=torch.zeros(2, 3, 32, 32, dtype=torch.int32)), TypeError, r"images must have dtype in .*got torch.int32"),
    ("weight_rank", lambda: dict(weight=torch.randn(8, 768)), ValueError, r"weight must be \(D, C, ph, pw\), got shape \(8, 768\)"),
    ("channels", lambda: dict(images=torch.randn(2, 4, 32, 32)), ValueError, r"images must have C=3 channels .*got shape \(2, 4, 32, 32\)"),
    ("smaller_than_patch", lambda: dict(images=torch.randn(2, 3, 15, 32)), ValueError, r"at least one patch \(16x16\).*got 15x32"),
    ("bias_shape", lambda: dict(bias=torch.randn(9)), ValueError, r"bias must be \(D,\) with D=8, got shape \(9,\)"),
    ("bias_dtype", lambda: dict(bias=torch.randn(8, dtype=torch.float16)), TypeError, r"bias must have the weight's dtype torch.float32, got torch.float16"),
    ("pos_rows", lambda: dict(pos_embed=torch.randn(1, 4, 8)), ValueError, r"pos_embed must have 5 rows, got shape \(1, 4, 8\)"),
    ("pos_width", lambda: dict(pos_embed=torch.randn(5, 7)), ValueError, r"pos_embed must have width D=8 .*got shape \(5, 7\)"),
    ("pos_batch", lambda: dict(pos_embed=torch.randn(2, 5, 8)), ValueError, r"pos_embed must be \(L, D\) or \(1, L, D\), got shape \(2, 5, 8\)"),
    ("pos_dtype", lambda: dict(pos_embed=torch.randn(1, 5, 8, dtype=torch.bfloat16)), TypeError, r"pos_embed must have the weight's dtype torch.float32, got torch.bfloat16"),
    ("prefix_width", lambda: dict(prefix=torch.randn(1, 1, 9)), ValueError, r"prefix must have width D=8 .*got shape \(1, 1, 9\)"),
    ("prefix_dtype", lambda: dict(prefix=torch.randn(1, 8, dtype=torch.float16)), TypeError, r"prefix must have the weight's dtype"),
    ("device", lambda: dict(bias=torch.randn(8, device="meta")), ValueError, r"bias is on meta but images is on (cpu|cuda)"),
    ("images_float64", lambda: dict(images=torch.randn(2, 3, 32, 32, dtype=torch.float64)), TypeError, r"images must have dtype in .*got torch.float64"),
    ("images_list", lambda: dict(images=[[0.0]]), TypeError, r"images must be a torch.Tensor, got list"),
    ("empty_patch_height", lambda: dict(weight=torch.randn(8, 3, 0, 16)), ValueError, r"weight must be \(D, C, ph, pw\) with every size >= 1, got shape \(8, 3, 0, 16\)"),
    ("empty_patch_width", lambda: dict(weight=torch.randn(8, 3, 16, 0)), ValueError, r"weight must be .*every size >= 1, got shape \(8, 3, 16, 0\)"),
    ("empty_embed_dim", lambda: dict(weight=torch.randn(0, 3, 16, 16)), ValueError, r"weight must be .*every size >= 1, got shape \(0, 3, 16, 16\)"),
    ("bias_rank", lambda: dict(bias=torch.randn(1, 8)), ValueError, r"bias must be \(D,\) with D=8, got shape \(1, 8\)"),
    ("pos_rank", lambda: dict(pos_embed=torch.randn(1, 1, 5, 8)), ValueError, r"pos_embed must be \(L, D\) or \(1, L, D\), got shape \(1, 1, 5, 8\)"),
    ("prefix_rank", lambda: dict(prefix=torch.randn(1, 1, 1, 8)), ValueError, r"prefix must be \(P, D\), \(1, P, D\) or \(D,\), got shape \(1, 1, 1, 8\)"),
    ("prefix_batch", lambda: dict(prefix=torch.randn(2, 1, 8)), ValueError, r"prefix must be \(P, D\), \(1, P, D\) or \(D,\), got shape \(2, 1, 8\)"),
    ("prefix_token_width", lambda: dict(prefix=torch.randn(9)), ValueError, r"prefix must have width D=8 .*got shape \(9,\)"),
    ("prefix_list", lambda: dict(prefix=[0.0] * 8), TypeError, r"prefix must be a torch.Tensor, got list"),
    ("zero_height", lambda: dict(images=torch.randn(2, 3, 0, 32)), ValueError, r"at least one patch \(16x16\).*got 0x32"),
]


@pytest.mark.parametrize("override,exc,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(override, exc, match):
    with pytest.raises(exc, match=match):
        patch_embed(**_bad_case(**override()))


def test_bad_options_raise_clear_errors():
    args = _bad_case()
    with pytest.raises(ValueError, match=r"pos_embed must have 4 rows"):
        patch_embed(**args, pos_covers_prefix=False)
    with pytest.raises(ValueError, match=r"mean must have one value per channel \(C=3\) or one value, got 2"):
        patch_embed(**args, mean=[0.5, 0.5])
    with pytest.raises(TypeError, match=r"out_dtype must be one of .*got torch.int64"):
        patch_embed(**args, out_dtype=torch.int64)
    with pytest.raises(TypeError, match=r"out_dtype must be one of .*got 'float16'"):
        patch_embed(**args, out_dtype="float16")
    with pytest.raises(TypeError, match=r"weight must have dtype in .*got torch.float64"):
        patch_embed(args["images"], args["weight"].double())
    with pytest.raises(TypeError, match=r"pos_covers_prefix must be a bool, got str"):
        patch_embed(**args, pos_covers_prefix="no")


# mean/std: (keyword arguments, exception, message); each builds its values when the test runs
BAD_STATS = [
    ("mean_str", lambda: dict(mean="abc"), TypeError, r"mean must be a number, a sequence of 3 numbers or a tensor, got str"),
    ("mean_bool", lambda: dict(mean=True), TypeError, r"mean must be a number, .*got bool"),
    ("mean_dict", lambda: dict(mean={"r": 0.5}), TypeError, r"mean must be a number, .*got dict"),
    ("mean_strings", lambda: dict(mean=["0.5", "0.4", "0.3"]), TypeError, r"mean must be a sequence of numbers, got a list of str"),
    ("mean_complex", lambda: dict(mean=torch.zeros(3, dtype=torch.complex64)), TypeError, r"mean must hold real numbers, got a tensor of torch.complex64"),
    ("mean_meta", lambda: dict(mean=torch.zeros(3, device="meta")), ValueError, r"mean is on meta \(no values\) but images is on (cpu|cuda)"),
    ("std_meta", lambda: dict(std=torch.ones(3, device="meta")), ValueError, r"std is on meta \(no values\) but images is on"),
    ("mean_length", lambda: dict(mean=[0.5, 0.5]), ValueError, r"mean must have one value per channel \(C=3\) or one value, got 2 values"),
    ("mean_empty", lambda: dict(mean=[]), ValueError, r"mean must have one value per channel \(C=3\) or one value, got 0 values"),
    ("std_length", lambda: dict(std=torch.ones(4)), ValueError, r"std must have one value per channel \(C=3\) or one value, got 4 values"),
    ("std_zero", lambda: dict(std=0.0), ValueError, r"std values must be positive and finite, got \[0.0\]"),
    ("std_zero_channel", lambda: dict(std=[0.5, 0.0, 0.5]), ValueError, r"std values must be positive and finite, got \[0.5, 0.0, 0.5\]"),
    ("std_negative", lambda: dict(std=torch.tensor([0.5, -0.25, 0.5])), ValueError, r"std values must be positive and finite, got \[0.5, -0.25, 0.5\]"),
    ("std_nan", lambda: dict(std=float("nan")), ValueError, r"std values must be positive and finite, got \[nan\]"),
    ("mean_inf", lambda: dict(mean=[0.0, float("inf"), 0.0]), ValueError, r"mean values must be finite, got \[0.0, inf, 0.0\]"),
]


@pytest.mark.parametrize("stats,exc,match", [c[1:] for c in BAD_STATS], ids=[c[0] for c in BAD_STATS])
def test_bad_mean_std_raise_clear_errors(stats, exc, match):
    with pytest.raises(exc, match=match):
        patch_embed(**_bad_case(), **stats())


def test_mean_std_accepted_forms():
    """Numbers, sequences, numpy arrays, (C, 1, 1) tensors (torchvision's layout) and float64 or
    integer tensors all give the same per-channel normalization."""
    import numpy as np

    args = _bad_case()
    want = patch_embed(**args, mean=[1.0, 2.0, 3.0], std=[0.5, 0.25, 2.0])
    for mean, std in [((1, 2, 3), np.array([0.5, 0.25, 2.0])),
                      (torch.tensor([1, 2, 3]), torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64)),
                      (torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1), torch.tensor([[0.5, 0.25, 2.0]]))]:
        torch.testing.assert_close(patch_embed(**args, mean=mean, std=std), want, rtol=0, atol=0)


def test_edge_shapes_give_correct_results():
    """Accepted edge cases: one-patch images, a 1-D prefix token (HF CLIP's class_embedding),
    scalar mean/std, a 0-row prefix."""
    w, b = torch.randn(8, 3, 16, 16), torch.randn(8)
    x = torch.randn(2, 3, 16, 31)
    out = patch_embed(x, w, b, prefix=torch.ones(8), mean=0.5, std=0.25)
    ref = patch_embed_reference(x.double(), w.double(), b.double(), prefix=torch.ones(1, 8).double(),
                                mean=[0.5] * 3, std=[0.25] * 3)
    assert out.shape == (2, 2, 8)
    assert_close(out, ref, dtype=torch.float32, reduction=768)
    assert patch_embed(x, w, prefix=torch.zeros(0, 8)).shape == (2, 1, 8)


# --- the nn.Module ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(), dict(bias=False), dict(output_fmt="NHWC"), dict(flatten=False),
    dict(norm_layer=nn.LayerNorm), dict(img_size=(32, 48), patch_size=(16, 8)),
    dict(img_size=None)], ids=["default", "no_bias", "NHWC", "NCHW", "norm", "rect", "any_size"])
def test_module_loads_timm_state_dict_and_matches(kwargs):
    from timm.layers import PatchEmbed as TimmPatchEmbed

    kw = dict(img_size=32, patch_size=16, in_chans=3, embed_dim=24)
    kw.update(kwargs)
    theirs = TimmPatchEmbed(**kw).eval()
    ours = PatchEmbed(**kw).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert (ours.grid_size, ours.num_patches) == (theirs.grid_size, theirs.num_patches)
    size = kw["img_size"] or (48, 32)
    x = torch.randn(2, 3, *((size, size) if isinstance(size, int) else size))
    with torch.no_grad():
        expected, out = theirs(x), ours(x)
    assert out.shape == expected.shape
    assert_close(out, expected.double(), dtype=torch.float32, reduction=768)


MODULE_VARIANTS = {"default": dict(), "no_bias": dict(bias=False), "NHWC": dict(output_fmt="NHWC"),
                   "NCHW": dict(flatten=False), "norm": dict(norm_layer=nn.LayerNorm)}
# (variant, autocast dtype, parameter dtype); timm's LayerNorm itself fails on bf16 parameters
# under fp16 autocast, so that one combination has no original to compare with
AUTOCAST_CASES = [(v, amp, p) for v in MODULE_VARIANTS for amp in (torch.bfloat16, torch.float16)
                  for p in (torch.float32, torch.bfloat16)
                  if not (v == "norm" and amp == torch.float16 and p == torch.bfloat16)]


@pytest.mark.parametrize("variant,amp,param_dtype", AUTOCAST_CASES,
                         ids=[f"{v}-{str(a)[6:]}-{str(p)[6:]}_params" for v, a, p in AUTOCAST_CASES])
def test_module_under_autocast_returns_what_timm_returns(variant, amp, param_dtype, device):
    """Under autocast timm's conv runs in the autocast dtype and so does its result: the module
    returns that dtype, not the parameters'."""
    from timm.layers import PatchEmbed as TimmPatchEmbed

    kw = dict(img_size=32, patch_size=16, in_chans=3, embed_dim=24, **MODULE_VARIANTS[variant])
    theirs = TimmPatchEmbed(**kw).to(param_dtype).eval()
    ours = PatchEmbed(**kw).to(param_dtype).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp):
        expected, out = theirs(x), ours(x)
    assert out.dtype == expected.dtype == amp
    # Both multiply amp-rounded pixels and weights with fp32 accumulation; they differ in the
    # summation order of the K = 768 products and in where the result (and bias) is rounded to
    # amp: the amp resolution, plus resolution * sqrt(K) * |y| for the sums.
    assert_close(out, expected, dtype=amp, reduction=768)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_module_tokens_under_autocast_promote_like_timm_pos_embed(amp, device):
    """``forward(x, pos_embed, prefix)`` returns what timm's ``_pos_embed(patch_embed(x))``
    returns: an amp-dtype conv result, then ``cat`` / ``+`` promote with fp32 parameters."""
    ours = PatchEmbed(img_size=32, patch_size=16, embed_dim=16)
    normed = PatchEmbed(img_size=32, patch_size=16, embed_dim=16, norm_layer=nn.LayerNorm)
    normed.proj.load_state_dict(ours.proj.state_dict())
    x, pre, pos = torch.randn(2, 3, 32, 32), torch.randn(1, 1, 16), torch.randn(1, 5, 16)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp):
        conv = ours.proj(x).flatten(2).transpose(1, 2)
        expected = torch.cat([pre.expand(2, -1, -1), conv], dim=1) + pos
        expected_normed = torch.cat([pre.expand(2, -1, -1), normed.norm(conv)], dim=1) + pos
        only_prefix = torch.cat([pre.expand(2, -1, -1).to(amp), conv], dim=1)
        out, out_normed = ours(x, pos, pre), normed(x, pos, pre)
        out_prefix = ours(x, prefix=pre.to(amp))
    assert out.dtype == expected.dtype == torch.float32
    assert out_normed.dtype == expected_normed.dtype == torch.float32
    assert out_prefix.dtype == only_prefix.dtype == amp
    # amp-rounded products summed over K = 768 (see above); the fused op rounds the table and
    # prefix to amp where the unfused add keeps them in fp32: one more amp rounding of |y|.
    assert_close(out, expected, dtype=amp, reduction=768)
    assert_close(out_normed, expected_normed, dtype=amp, reduction=768)
    assert_close(out_prefix, only_prefix, dtype=amp, reduction=768)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_op_ignores_autocast(amp, backend, monkeypatch, device):
    """``patch_embed`` itself is not an autocast op: inside an autocast region it computes (and
    differentiates) exactly as outside it, in its arguments' dtypes."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
    x, params = make_inputs(2, 3, 32, 48, 16, 16, 16, 1, True, True, True, torch.float32)
    grad = torch.randn(2, 7, 16)
    runs = []
    for enabled in (False, True):
        with torch.autocast(device.type, dtype=amp, enabled=enabled):
            out, grads = run_with_grads(patch_embed, x, params, grad, mean=0.5, std=0.25)
        runs.append([out, *grads])
        for t in (x, *params):
            t.grad = None
    assert runs[1][0].dtype == torch.float32
    for plain, under_autocast in zip(*runs):
        assert torch.equal(plain, under_autocast)


def test_module_under_autocast_compiled_equals_eager(torch_backend, device):
    model = TinyEmbed()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        eager_out, compiled_out = model(x), compiled(x)
    assert compiled_out.dtype == eager_out.dtype
    assert torch.equal(compiled_out, eager_out)


def test_module_float64_runs_the_original_math(device):
    from timm.layers import PatchEmbed as TimmPatchEmbed

    theirs = TimmPatchEmbed(img_size=32, patch_size=16, embed_dim=24).double().eval()
    ours = PatchEmbed(img_size=32, patch_size=16, embed_dim=24).double().eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):  # float64 is never cast
        out, expected = ours(x), theirs(x)
    assert out.dtype == torch.float64
    assert_close(out, expected, dtype=torch.float64, reduction=768)


def test_module_fuses_pos_and_prefix_and_norm_fallback():
    ours = PatchEmbed(img_size=32, patch_size=16, embed_dim=16)
    x, pre, pos = torch.randn(2, 3, 32, 32), torch.randn(1, 1, 16), torch.randn(1, 5, 16)
    proj = ours.proj
    with torch.no_grad():
        expected = patch_embed_reference(x, proj.weight, proj.bias, pos, pre)
    assert_close(ours(x, pos, pre).detach(), expected.double(), dtype=torch.float32, reduction=768)
    normed = PatchEmbed(img_size=32, patch_size=16, embed_dim=16, norm_layer=nn.LayerNorm)
    normed.proj.load_state_dict(proj.state_dict())
    with torch.no_grad():
        tokens = normed.norm(patch_embed_reference(x, proj.weight, proj.bias))
        expected = torch.cat([pre.expand(2, -1, -1), tokens], 1) + pos
    assert_close(normed(x, pos, pre).detach(), expected.double(), dtype=torch.float32, reduction=768)


def test_module_errors():
    with pytest.raises(ValueError, match="dynamic_img_pad=True is not supported"):
        PatchEmbed(dynamic_img_pad=True)
    m = PatchEmbed(img_size=32, patch_size=16, embed_dim=8)
    with pytest.raises(ValueError, match=r"images must be 32x32 .*got 48x32"):
        m(torch.randn(1, 3, 48, 32))
    loose = PatchEmbed(img_size=32, patch_size=16, embed_dim=8, strict_img_size=False)
    with pytest.raises(ValueError, match=r"divisible by the patch size .*got 40x32"):
        loose(torch.randn(1, 3, 40, 32))
    assert loose(torch.randn(1, 3, 48, 32)).shape == (1, 6, 8)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        PatchEmbed(img_size=32, embed_dim=8, output_fmt="NHWC")(torch.randn(1, 3, 32, 32), prefix=torch.randn(1, 8))


# --- torch.compile ------------------------------------------------------------------------------

class TinyEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=32, patch_size=16, embed_dim=16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16))

    def forward(self, x):
        tokens = self.patch_embed(x, self.pos_embed, self.cls_token)
        # the package-level name works inside a compiled graph too
        direct = vtok_fast.patch_embed(x, self.patch_embed.proj.weight, mean=0.5, std=0.5)
        return tokens[:, 1:] * direct


def test_torch_compile_fullgraph_forward_backward(torch_backend):
    model = TinyEmbed()
    x = torch.randn(2, 3, 32, 32)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


# --- real kernels on a GPU (collected with VTOK_FAST_TEST_GPU=1) --------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 3, 224, 224, 16, 768, 1, True), (2, 3, 336, 330, 14, 1024, 5, False)],
                         ids=["vitb16", "clipl14_regs"])
def test_cuda_kernels_match_float64(shape, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 contract: IEEE products
    B, C, H, W, p, D, P, covers = shape
    N, K = (H // p) * (W // p), C * p * p
    x, params = make_inputs(B, C, H, W, p, p, D, P, covers, True, True, dtype)
    x = x.detach().cuda().requires_grad_()
    params = [t.detach().cuda().requires_grad_() for t in params]
    grad = torch.randn(B, P + N, D, device="cuda").to(dtype)
    out, grads = run_with_grads(patch_embed, x, params, grad, pos_covers_prefix=covers)
    x64, params64 = float64_copies(x, params)
    out64, grads64 = run_with_grads(patch_embed_reference, x64, params64, grad.double(),
                                    pos_covers_prefix=covers)
    check_against_float64(out, grads, out64, grads64, dtype, B, N, D, K)
    u8 = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device="cuda")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    with torch.no_grad():
        out = patch_embed(u8, *params, pos_covers_prefix=covers, mean=mean, std=std)
        ref = patch_embed_reference(u8, *params64, pos_covers_prefix=covers, mean=mean, std=std)
    assert_close(out, ref, dtype=dtype, reduction=K)


# --- ahead-of-time compilation jobs (checked in tests/test_aot.py) --------------------------------
# Every patch-embedding kernel, with every autotune config and every dtype combination the host
# launches, compiled for sm_80 / sm_90. Launches on realistic shapes specialize like Triton does at
# run time: unit strides become constants and arguments divisible by 16 carry that divisibility
# (this is what lets the gathers vectorize and the loads pipeline).

# shared memory per block (opt-in maximum) of each target
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _shape_values(p: int) -> dict:
    """Run-time integer arguments of a ViT-B/16@224 (p=16) or CLIP-L/14@336 (p=14) launch."""
    B, C, side, D, P = 8, 3, (224 if p == 16 else 336), 768, 1
    gw = side // p
    N, K = gw * gw, C * p * p
    L = P + N
    return dict(
        stride_ob=L * D, stride_ol=D, stride_od=1, stride_ib=C * side * side, stride_ic=side * side,
        stride_ih=side, stride_iw=1, stride_wd=K, stride_wk=1, stride_bd=1, stride_pl=D, stride_pd=1,
        stride_xl=D, stride_xd=1, stride_ws=D * K, stride_gb=L * D, stride_gl=D, stride_gd=1,
        stride_xb=C * side * side, stride_xc=side * side, stride_xh=side, stride_xw=1,
        M=B * L, D=D, K=K, L=L, P=P, N=N, GW=gw, POS_START=0, SPLIT=8,
    )


def compile_launch(kernel, pointers: dict, constexprs: dict, config, arch: int, p: int):
    """Compile ``kernel`` (autotuned) for ``sm_<arch>`` as a launch with ``config`` would."""
    tuned, num_warps, num_stages = config_constexprs(config)
    return compile_as_launched(kernel, pointers, _shape_values(p), dict(constexprs, **tuned, PH=p, PW=p),
                               arch=arch, num_warps=num_warps, num_stages=num_stages)


# (images, weight, out) dtypes the host launches: matching floats, fp32 pixels into bf16 weights,
# uint8 pixels (always normalized)
FWD_VARIANTS = [("fp32", "fp32", "fp32"), ("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"),
                ("fp32", "bf16", "fp32"), ("u8", "bf16", "bf16")]
# weight gradient: (images, weight, output gradient)
DW_VARIANTS = [("fp32", "fp32", "fp32"), ("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"),
               ("fp32", "bf16", "bf16"), ("u8", "bf16", "bf16")]
# pixel gradient (float images only): (images, weight, output gradient)
DX_VARIANTS = [("fp32", "fp32", "fp32"), ("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"),
               ("fp32", "bf16", "bf16")]


def aot_compile_all(arch: int) -> list[dict]:
    """Compile every kernel x launched config x dtype variant for ``sm_<arch>``."""
    import triton.language as tl

    from vtok_fast.kernels.patch_embed import (DW_CONFIGS, DX_CONFIGS, FWD_CONFIGS, patch_embed_bwd_dw,
                                               patch_embed_bwd_dx, patch_embed_fwd)

    dot_dtype = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    report = []

    def add(kernel, variant, config, p, compiled, **extra):
        report.append(dict(kernel=kernel, variant="-".join(variant), config=str(config.kwargs), p=p,
                           tensor_cores=tensor_core_instructions(compiled, arch),
                           shared=compiled.metadata.shared, **extra))

    for variant in FWD_VARIANTS:
        img, weight, out = variant
        norm = img == "u8"
        pointers = dict(out_ptr=out, img_ptr=img, w_ptr=weight, bias_ptr=weight, pos_ptr=weight,
                        pre_ptr=weight, scale_ptr="fp32" if norm else weight,
                        shift_ptr="fp32" if norm else weight)
        flags = dict(HAS_BIAS=True, HAS_POS=True, HAS_NORM=norm, ALLOW_TF32=weight == "fp32")
        for i, config in enumerate(FWD_CONFIGS):
            # p=16 with every config; CLIP-style p=14 (K=588, masked) with the first config of the
            # 16-bit-weight variants
            for p in ((16, 14) if i == 0 and weight != "fp32" else (16,)):
                add("fwd", variant, config, p,
                    compile_launch(patch_embed_fwd, pointers, flags, config, arch, p))
    # optional operands absent, IEEE fp32 products
    pointers = {name: "fp32" for name in ("out_ptr", "img_ptr", "w_ptr", "bias_ptr", "pos_ptr",
                                          "pre_ptr", "scale_ptr", "shift_ptr")}
    flags = dict(HAS_BIAS=False, HAS_POS=False, HAS_NORM=True, ALLOW_TF32=False)
    add("fwd_ieee", ("fp32", "fp32", "fp32"), FWD_CONFIGS[-1], 16,
        compile_launch(patch_embed_fwd, pointers, flags, FWD_CONFIGS[-1], arch, 16))

    for variant in DW_VARIANTS:
        img, weight, grad = variant
        norm = img == "u8"
        pointers = dict(dw_ptr="fp32", g_ptr=grad, img_ptr=img, scale_ptr="fp32" if norm else weight,
                        shift_ptr="fp32" if norm else weight)
        flags = dict(HAS_NORM=norm, ALLOW_TF32=weight == "fp32", DOT_DTYPE=dot_dtype[weight])
        for config in DW_CONFIGS:
            add("dw", variant, config, 16, compile_launch(patch_embed_bwd_dw, pointers, flags, config, arch, 16))

    for variant in DX_VARIANTS:
        img, weight, grad = variant
        pointers = dict(dx_ptr=img, g_ptr=grad, w_ptr=weight, scale_ptr="fp32")
        flags = dict(HAS_NORM=True, ALLOW_TF32=weight == "fp32")
        for config in DX_CONFIGS:
            add("dx", variant, config, 16, compile_launch(patch_embed_bwd_dx, pointers, flags, config, arch, 16))
    return report
