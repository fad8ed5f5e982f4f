"""Helpers shared by the GEMM kernels (device code only): tile order and the accumulate step."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """The ``(M, N)`` output tile of program ``pid``: ``rows`` (int64, ``BM``), ``cols``
    (``BN``) and their in-range masks. Tiles go in grouped order: ``GROUP_M`` row tiles walk the
    column tiles together, so they share the weight columns while those are in L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
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
