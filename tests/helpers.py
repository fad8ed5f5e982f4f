"""Shared test helpers: dtype-aware tolerances and ahead-of-time GPU compilation."""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

# Relative resolution of each dtype (FlagGems' choice; fp32 a little above its 2**-23 epsilon).
RESOLUTION = {
    torch.float64: 1e-12,
    torch.float32: 1.3e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}


def import_peer(name: str):
    """Import the peer library a test module compares against (a test extra). On the GPU check
    (``VTOK_FAST_TEST_GPU=1``), whose image may lack the wheel, a missing peer skips the module;
    everywhere else it is an import error, so the README's test command never skips it silently."""
    if os.environ.get("VTOK_FAST_TEST_GPU", "0") == "1":
        return pytest.importorskip(name)
    return importlib.import_module(name)


def same_generations(got, expected) -> None:
    """Two ``generate(..., output_logits=True, return_dict_in_generate=True)`` outputs are
    identical: the same sequences and bit-equal logits at every step."""
    assert torch.equal(got.sequences, expected.sequences)
    for a, e in zip(got.logits, expected.logits, strict=True):
        assert torch.equal(a, e)


def tiny_vlms(unpatch: bool = False):
    """``get(family)``: one ``vlm_zoo.tiny(family)`` per family, built on first use and shared by
    the tests of a module (return it from a module-scoped fixture); ``unpatch``: every ``get``
    first removes whatever a previous test patched into the model."""
    import vtok_fast.patch
    from vtok_fast.bench import vlm_zoo

    built = {}

    def get(family):
        if family not in built:
            built[family] = vlm_zoo.tiny(family)
        if unpatch:
            vtok_fast.patch.unpatch(built[family])
        return built[family]
    return get


def tolerances(dtype: torch.dtype, reduction: int = 1, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for a result of ``dtype`` built from a sum of ``reduction`` terms.

    The relative part is the dtype's resolution; the absolute part grows like the standard
    deviation of accumulated rounding error, ``resolution * sqrt(reduction) * scale``, where
    ``scale`` is the magnitude of the result.
    """
    res = RESOLUTION[dtype]
    return res, res * math.sqrt(max(reduction, 1)) * max(scale, 1e-30)


def assert_close(actual, expected, *, dtype=None, reduction: int = 1, msg: str = ""):
    """Compare ``actual`` with a (preferably float64) ``expected`` at ``dtype``'s resolution."""
    dtype = dtype or actual.dtype
    expected = expected.to(torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    rtol, atol = tolerances(dtype, reduction, max(scale, 1.0))
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol, msg=msg or None)


# --- ahead-of-time compilation for real GPUs (works on a CPU-only machine) -----------------

def compile_for_gpu(kernel, signature: dict, constexprs: dict, *, arch: int, num_warps: int = 4,
                    num_stages: int = 3, divisible=()):
    """Compile a ``@triton.jit`` kernel for ``sm_<arch>`` without a GPU (the library's
    :func:`vtok_fast._launch.aot_compile`); must run without ``TRITON_INTERPRET`` (see
    :func:`aot_reports`)."""
    from vtok_fast._launch import aot_compile

    return aot_compile(kernel, signature, constexprs, arch=arch, num_warps=num_warps,
                       num_stages=num_stages, divisible=divisible)


def compile_as_launched(kernel, pointers: dict, values: dict, constexprs: dict, *, arch: int,
                        num_warps: int, num_stages: int, floats=()):
    """Compile ``kernel`` for ``sm_<arch>`` as the JIT specializes a launch with these run-time
    ``values``: ``pointers`` (name -> element type, 16-byte aligned as torch allocates), ``floats``
    as fp32 scalars, an integer equal to 1 as a constant, one divisible by 16 with that hint."""
    consts = dict(constexprs)
    signature, divisible = {}, list(pointers)
    for name in getattr(kernel, "arg_names", None) or kernel.fn.arg_names:
        if name in consts:
            continue
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        elif values[name] == 1:
            consts[name] = 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                divisible.append(name)
    return compile_for_gpu(kernel, signature, consts, arch=arch, num_warps=num_warps,
                           num_stages=num_stages, divisible=divisible)


def aot_reports(test_module: str, function: str = "aot_compile_all", archs=(80, 90),
                timeout: float = 900) -> dict:
    """``{arch: tests/<test_module>.py's function(arch)}``, each computed in a fresh Python.

    The suite runs under ``TRITON_INTERPRET=1``, where ``@triton.jit`` functions (Triton's own
    ``tl.sum`` combine functions too) are interpreter objects that cannot be compiled for a GPU,
    so the compiles run in subprocesses without the interpreter, one per architecture in
    parallel, each with a private Triton cache; ``function`` returns JSON-able records.
    """
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    cache = tempfile.mkdtemp(prefix="vtok_aot_")
    code = f"import json, {test_module} as t; print(json.dumps(t.{function}({{}})))"
    procs = {arch: subprocess.Popen([sys.executable, "-c", code.format(arch)], cwd=here,
                                    env=dict(env, TRITON_CACHE_DIR=os.path.join(cache, str(arch))),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in archs}
    reports = {}
    try:
        for arch, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-3000:]
            reports[arch] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return reports


def tensor_core_instructions(compiled, arch: int) -> bool:
    """True when the compiled PTX uses tensor cores (``wgmma`` on sm_90, ``mma`` on sm_80)."""
    ptx = compiled.asm["ptx"]
    return ("wgmma" in ptx) if arch >= 90 else ("mma.sync" in ptx)


def config_constexprs(config) -> tuple[dict, int, int]:
    """(constexpr kwargs, num_warps, num_stages) of a ``triton.Config``."""
    return dict(config.kwargs), config.num_warps, config.num_stages
