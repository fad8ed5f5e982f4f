"""Launch helpers shared by every op's host code: ceiling division, launch grids, keyword
arguments of strides, device facts, interpreter detection and ahead-of-time compilation for GPUs
(which works on a CPU-only machine).

Kernel files (``vtok_fast/kernels/``) hold the ``@triton.jit`` code, its configs and what follows
from a config alone (tile caps, shared-memory estimates); everything that sizes a launch from a
tensor or a device lives here or in the op's host module. The device facts a kernel file's
autotuner reads at launch to prune its configs (shared memory per block, compute capability)
come from here too (``vtok_fast/kernels/_autotune.py``).

Every launch passes its arguments by name (``kernel[grid](out_ptr=out, **strides(out, "o", "bld"),
...)``), so host and kernel cannot drift apart by position.
"""
from __future__ import annotations

import functools
import os


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def tile_grid(rows: int, cols: int | None = None, *, row_block: str = "BLOCK_M",
              col_block: str = "BLOCK_N", per: int = 1, lead: tuple[int, ...] = (),
              more: tuple[int, ...] = ()):
    """The grid of a launch with one program per tile, a function of the launch's constexprs
    (``meta``: the autotuned config and the keyword arguments), so block sizes are read by name,
    never repeated: the tile axis holds ``cdiv(rows, meta[row_block])`` tiles (times
    ``cdiv(cols, meta[col_block])`` with ``cols``: a 2-D output whose tile order the kernel decodes)
    for each of ``per`` independent problems (batch x heads), the tiles of one problem adjacent;
    ``lead``: grid axes before it (then it is not axis 0), ``more``: grid axes after it (a batch,
    a split count)."""
    def grid(meta):
        tiles = cdiv(rows, meta[row_block])
        if cols is not None:
            tiles *= cdiv(cols, meta[col_block])
        return (*lead, tiles * per, *more)
    return grid


def strides(tensor, name: str, dims: str) -> dict:
    """A tensor's strides as a launch's keyword arguments: ``stride_<name><d>`` for each letter
    ``d`` of ``dims`` (one per dim; ``strides(out, "o", "bld")`` -> ``stride_ob``, ``stride_ol``,
    ``stride_od``). ``tensor=None`` (an absent operand, never read) gives zeros."""
    if tensor is None:
        return {f"stride_{name}{d}": 0 for d in dims}
    if tensor.dim() != len(dims):
        raise ValueError(f"strides: {len(dims)} dims named ({dims!r}) for a {tensor.dim()}-D tensor")
    return {f"stride_{name}{d}": s for d, s in zip(dims, tensor.stride())}


def optional_operand(tensor, stand_in):
    """A launch's pointer argument for an optional operand: the tensor, or ``stand_in`` (a tensor
    of the same launch) when it is absent; the kernel never reads it then (a constexpr flag, or
    a size of 0, skips it)."""
    return stand_in if tensor is None else tensor


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


def compute_capability(device) -> int:
    """``10 * major + minor`` of a CUDA device (80: A100, 90: H100); 0 for any other device."""
    import torch

    if torch.device(device).type != "cuda":
        return 0
    props = _device_properties(_cuda_index(device))
    return 10 * props.major + props.minor


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
