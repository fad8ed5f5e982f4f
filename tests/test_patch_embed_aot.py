"""Every patch-embedding kernel, with every autotune config and every dtype combination the host
launches, compiles for sm_80 and sm_90 and multiplies on tensor cores (no GPU needed).

Launches on realistic shapes specialize like Triton does at run time: unit strides become
constants and arguments divisible by 16 carry that divisibility (this is what lets the gathers
vectorize and the loads pipeline), so the tests compile those specializations.

The suite runs under TRITON_INTERPRET=1, where ``@triton.jit`` functions are interpreter objects
that cannot be compiled: the compilation runs in a fresh interpreter-free Python, one per
architecture (in parallel), and reports back as JSON.
"""

import pytest
from helpers import aot_reports, compile_for_gpu, config_constexprs, tensor_core_instructions

pytestmark = pytest.mark.aot

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
    values = _shape_values(p)
    tuned, num_warps, num_stages = config_constexprs(config)
    consts = dict(constexprs, **tuned, PH=p, PW=p)
    signature, divisible = {}, list(pointers)  # torch allocations are 16-byte aligned
    for name in kernel.fn.arg_names:
        if name in consts:
            continue
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif values[name] == 1:
            consts[name] = 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                divisible.append(name)
    return compile_for_gpu(kernel, signature, consts, arch=arch, num_warps=num_warps,
                           num_stages=num_stages, divisible=divisible)


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


def aot_report(arch: int) -> list[dict]:
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


@pytest.fixture(scope="module")
def reports():
    return aot_reports("test_patch_embed_aot")


def _configs(name):
    from vtok_fast.kernels import patch_embed as kernels

    return getattr(kernels, name)


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_config_and_dtype_compiles(reports, arch):
    entries = reports[arch]
    for kernel, variants, configs in (("fwd", FWD_VARIANTS, "FWD_CONFIGS"), ("dw", DW_VARIANTS, "DW_CONFIGS"),
                                      ("dx", DX_VARIANTS, "DX_CONFIGS")):
        for variant in variants:
            got = {e["config"] for e in entries if e["kernel"] == kernel and e["variant"] == "-".join(variant)}
            assert got == {str(c.kwargs) for c in _configs(configs)}, (kernel, variant)
    assert any(e["kernel"] == "fwd" and e["p"] == 14 for e in entries)


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_use_tensor_cores_and_fit_shared_memory(reports, arch):
    too_big = []
    for e in reports[arch]:
        # IEEE fp32 products have no tensor-core instruction; everything else must use them
        assert e["tensor_cores"] == (e["kernel"] != "fwd_ieee"), e
        if e["shared"] > SHARED_LIMIT[arch]:
            too_big.append(e)
    # only fp32 forward tiles may exceed shared memory (the autotuner skips them: OutOfResources),
    # and at most one config per variant, so every variant keeps launchable configs
    assert all(e["kernel"] == "fwd" and e["variant"].split("-")[1] == "fp32" for e in too_big), too_big
    assert len({(e["variant"], e["p"]) for e in too_big}) == len(too_big), too_big
