"""Shared by the GEMM kernels (patch embedding, merger + projector): the tile list, its
shared-memory estimate, the tile order and the accumulate step (device code)."""
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): BLOCK_M output rows (tokens) x BLOCK_N output
# columns (features), BLOCK_K steps of the reduction. configs[0] is what the interpreter runs (small
# tiles: several tiles on tiny shapes) and fits shared memory in every dtype; the autotuner picks by
# timing, so the order changes nothing else. The 64-row tiles keep small batches spread over the
# SMs; fp32 tiles of the widest config do not fit in shared memory (pruned: gemm_shared_memory).
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


def gemm_shared_memory(config, arch: int, a_bytes: int, b_bytes: int, *, a_in_registers: bool,
                       tensor_cores: bool, b_tiles: int = 1) -> int:
    """Bytes of shared memory one program of a K-looped GEMM tile needs: the pipeline's buffers
    of the A tile (``BLOCK_M x BLOCK_K``, ``a_bytes`` per element as loaded) and of ``b_tiles``
    B tiles (``BLOCK_K x BLOCK_N``, ``b_bytes``) -- ``num_stages`` buffers on sm_90+ tensor cores,
    ``num_stages - 1`` on sm_80 and on the IEEE fp32 (FMA) path -- plus, when the A operand is
    computed in registers (cast or normalized on the load), one ``BLOCK_M x BLOCK_K`` operand tile
    in the B dtype and 2 KiB of scratch. An upper bound of every compiled patch-embedding and
    merger kernel of the AOT tests, and below the limit wherever the compiled kernel fits."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    buffers = config.num_stages if arch >= 90 and tensor_cores else config.num_stages - 1
    size = buffers * bk * (bm * a_bytes + b_tiles * bn * b_bytes)
    if a_in_registers:
        size += bm * bk * b_bytes + 2048
    return size


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The ``(M, N)`` output tile of program ``pid``: ``rows`` (int64, ``BLOCK_M``), ``cols``
    (``BLOCK_N``) and their in-range masks. Tiles go in grouped order: ``GROUP_M`` row tiles walk
    the column tiles together, so they share the weight columns while those are in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < M, cols < N


@triton.jit
def dot_acc(a, b, acc, ALLOW_TF32: tl.constexpr):
    """``acc + a @ b``: fp32 inputs on TF32 tensor cores (``ALLOW_TF32``) or with IEEE fp32
    products; 16-bit inputs on tensor cores either way."""
    if ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc
