"""Launch helpers shared by every op's host code: ceiling division, device facts, interpreter
detection and ahead-of-time compilation for GPUs (which works on a CPU-only machine).

Kernel files (``vtok_fast/kernels/``) hold only ``@triton.jit`` code and their configs; everything
that sizes a launch from a tensor or a device lives here or in the op's host module.
"""
from __future__ import annotations

import functools
import os


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def tile_grid(rows: int, cols: int, row_block: str = "BM", col_block: str = "BN", *more: int):
    """The launch grid of a kernel with one program per ``(row_block, col_block)`` tile of a
    ``rows x cols`` output, the block sizes read from the autotuned config; ``more``: further
    grid axes (e.g. a split-K count)."""
    def grid(meta):
        return (cdiv(rows, meta[row_block]) * cdiv(cols, meta[col_block]), *more)
    return grid


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _device_properties(index: int):
    import torch

    return torch.cuda.get_device_properties(index)


def _cuda_index(device) -> int:
    import torch

    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for any other device)."""
    import torch

    if torch.device(device).type != "cuda":
        return 1
    return _device_properties(_cuda_index(device)).multi_processor_count


def shared_memory_per_block(device) -> int:
    """Opt-in shared memory per block of a CUDA device in bytes (unbounded off-GPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return 1 << 62
    props = _device_properties(_cuda_index(device))
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def aot_compile(kernel, signature: dict, constexprs: dict, *, arch: int, num_warps: int = 4,
                num_stages: int = 3, divisible=()):
    """Compile a ``@triton.jit`` kernel (or an autotuned / heuristics wrapper of one) for
    ``sm_<arch>`` without a GPU; returns Triton's compiled kernel (``.asm["ptx"]``, ``.metadata``).

    ``signature`` maps every non-constexpr argument name to a Triton type (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` gives the constexpr values (a unit stride passed here specializes
    as the JIT does for a stride of 1); ``divisible`` names the arguments the JIT would mark
    16-divisible (aligned pointers, sizes that are multiples of 16), which lets loads vectorize.
    Must run in a process without ``TRITON_INTERPRET``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):  # unwrap Autotuner / Heuristics down to the kernel
        fn = fn.fn
    names = fn.arg_names
    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in names}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
