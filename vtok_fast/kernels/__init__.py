"""Triton device code for vtok_fast: ``@triton.jit`` kernels and their launch configurations.

Host code (references, launchers, autograd Functions) lives in ``vtok_fast/``.
"""
