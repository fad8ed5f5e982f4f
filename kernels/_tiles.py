"""Tile-order helpers shared by the GEMM kernels (device code only)."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: ``GROUP_M`` row tiles walk
    the column tiles together, so they share the weight columns while those are in L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m
