"""Backend dispatch: which implementation runs for a given set of tensors.

CUDA tensors run the Triton kernels, CPU tensors the PyTorch path. ``VTOK_FAST_BACKEND=triton``
or ``=torch`` forces one. Triton on CPU tensors is only possible under ``TRITON_INTERPRET=1``
(that is how the test suite exercises the kernels without a GPU).
"""
from __future__ import annotations

import functools
import os

import torch

from vtok_fast._launch import interpreting

_CHOICES = ("triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency, but be gentle
        return False
    return True


def forced_backend() -> str | None:
    value = os.environ.get("VTOK_FAST_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in _CHOICES:
        raise ValueError(f"VTOK_FAST_BACKEND must be one of {_CHOICES} or 'auto', got {value!r}")
    return value


def backend_for(tensor: torch.Tensor, *others: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"``: the implementation that handles ``tensor`` (and the
    ``others`` of the same call).

    Under the interpreter, a call with any bf16 tensor runs the PyTorch path even when Triton is
    forced: the interpreter's bf16 ``tl.dot`` returns wrong values, and a wrong answer is never
    an option.
    """
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if interpreting() and any(t is not None and t.dtype == torch.bfloat16 for t in (tensor, *others)):
        return "torch"
    if forced == "triton":
        if tensor.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "VTOK_FAST_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                f"tensors); got a tensor on {tensor.device}"
            )
        return "triton"
    if tensor.device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def use_triton(tensor: torch.Tensor, *others: torch.Tensor | None) -> bool:
    return backend_for(tensor, *others) == "triton"


def default_backend() -> str:
    """The backend a CUDA tensor would get here, for ``vtok-fast info``."""
    forced = forced_backend()
    if forced:
        return forced
    return "triton (CUDA tensors), torch (CPU tensors)" if triton_available() else "torch"
