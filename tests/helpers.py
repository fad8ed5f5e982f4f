"""Shared test helpers: dtype-aware tolerances and ahead-of-time GPU compilation."""
from __future__ import annotations

import math

import torch

# Relative resolution of each dtype (FlagGems' choice; fp32 a little above its 2**-23 epsilon).
RESOLUTION = {
    torch.float64: 1e-12,
    torch.float32: 1.3e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}


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
                    num_stages: int = 3):
    """Compile a ``@triton.jit`` kernel for ``sm_<arch>`` without a GPU; returns the kernel.

    ``signature`` maps every argument name to a Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``
    or ``"constexpr"``); ``constexprs`` gives the constexpr values.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):  # unwrap Autotuner / Heuristics down to the kernel
        fn = fn.fn
    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def tensor_core_instructions(compiled, arch: int) -> bool:
    """True when the compiled PTX uses tensor cores (``wgmma`` on sm_90, ``mma`` on sm_80)."""
    ptx = compiled.asm["ptx"]
    return ("wgmma" in ptx) if arch >= 90 else ("mma.sync" in ptx)


def config_constexprs(config) -> tuple[dict, int, int]:
    """(constexpr kwargs, num_warps, num_stages) of a ``triton.Config``."""
    return dict(config.kwargs), config.num_warps, config.num_stages
