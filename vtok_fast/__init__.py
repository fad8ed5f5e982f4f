"""vtok_fast: Triton kernels for the visual-token pipeline of ViTs and VLMs.

CUDA tensors run Triton kernels, CPU tensors the PyTorch path (``VTOK_FAST_BACKEND=triton|torch``
forces one). Public names are imported lazily so ``import vtok_fast`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # fused patch embedding
    "patch_embed": "vtok_fast.patch_embedding",
    "patch_embed_reference": "vtok_fast.patch_embedding",
    "PatchEmbed": "vtok_fast.patch_embedding",
    # nearest-codebook search and vector quantization
    "codebook_search": "vtok_fast.codebook",
    "codebook_search_reference": "vtok_fast.codebook",
    "VectorQuantizer": "vtok_fast.encode.vq",
    "ResidualVQ": "vtok_fast.encode.vq",
    # ToMe token merging
    "bipartite_soft_matching": "vtok_fast.tome",
    "merge_wavg": "vtok_fast.tome",
    "merge_source": "vtok_fast.tome",
    "parse_r": "vtok_fast.tome",
    "tome_merge": "vtok_fast.tome_fused",
    # subpackages
    "patch": "vtok_fast.patch",
    "viz": "vtok_fast.viz",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vtok_fast' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
