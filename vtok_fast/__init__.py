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
    "patch_embed": "vtok_fast.encode.patch_embed",
    "patch_embed_reference": "vtok_fast.encode.patch_embed",
    "PatchEmbed": "vtok_fast.encode.patch_embed",
    # nearest-codebook search and vector quantization
    "codebook_search": "vtok_fast.encode.codebook_search",
    "codebook_search_reference": "vtok_fast.encode.codebook_search",
    "VectorQuantizer": "vtok_fast.encode.vq",
    "ResidualVQ": "vtok_fast.encode.residual_vq",
    "GroupedResidualVQ": "vtok_fast.encode.residual_vq",
    "LossBreakdown": "vtok_fast.encode.vq",
    # adaptive, query-aware and pyramid tokens
    "adaptive_tokenize": "vtok_fast.encode.adaptive",
    "adaptive_tokenize_reference": "vtok_fast.encode.adaptive",
    "patch_entropy": "vtok_fast.encode.adaptive",
    "patch_entropy_reference": "vtok_fast.encode.adaptive",
    "box_relevance": "vtok_fast.encode.adaptive",
    "packed_attention": "vtok_fast.encode.packed_vit",
    "PackedTokens": "vtok_fast.encode.packed",
    "PackedViT": "vtok_fast.encode.packed_vit",
    "pyramid_tokenize": "vtok_fast.encode.pyramid",
    # ToMe token merging
    "bipartite_soft_matching": "vtok_fast.reduce.tome_reference",
    "merge_wavg": "vtok_fast.reduce.tome_reference",
    "merge_source": "vtok_fast.reduce.tome_reference",
    "parse_r": "vtok_fast.reduce.tome_reference",
    "tome_merge": "vtok_fast.reduce.tome",
    "tome_unmerge": "vtok_fast.reduce.tome",
    "MergeInfo": "vtok_fast.reduce.tome",
    "compress": "vtok_fast.reduce.compress",
    "Compressed": "vtok_fast.reduce.compressed",
    "pool": "vtok_fast.reduce.pool",
    "pixel_shuffle": "vtok_fast.reduce.pool",
    "attn_topk": "vtok_fast.reduce.select",
    "visionzip": "vtok_fast.reduce.select",
    "prumerge": "vtok_fast.reduce.prumerge",
    "prumerge_plus": "vtok_fast.reduce.prumerge",
    "dart": "vtok_fast.reduce.dart",
    "attention_scores": "vtok_fast.reduce.attention_scores",
    "attention_scores_reference": "vtok_fast.reduce.attention_scores",
    "attention": "vtok_fast.reduce.attention",
    "attention_reference": "vtok_fast.reduce.attention",
    # tokens -> LLM space
    "merge_project": "vtok_fast.project.merge_project",
    "merge_project_reference": "vtok_fast.project.merge_project",
    "PatchMerger": "vtok_fast.project.modules",
    "PixelShuffleProjector": "vtok_fast.project.modules",
    "SwinPatchMerging": "vtok_fast.project.modules",
    "MLPProjector": "vtok_fast.project.modules",
    "OpticalCompressor": "vtok_fast.project.modules",
    "PerceiverResampler": "vtok_fast.project.resampler",
    # measurement
    "count_tokens": "vtok_fast.measure.budget",
    "TokenBudget": "vtok_fast.measure.budget",
}

# public name -> module exposed under that name
_MODULES = {
    "patch": "vtok_fast.patch",
    "viz": "vtok_fast.measure.viz",
    "measure": "vtok_fast.measure",
    "compat": "vtok_fast.compat",
    "budget": "vtok_fast.measure.budget",
    "metrics": "vtok_fast.measure.metrics",
}

__all__ = sorted({*_EXPORTS, *_MODULES})


def __getattr__(name: str):
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'vtok_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
