"""LLaVA-NeXT and LLaVA-OneVision: ``get_image_features`` returns one piece per image, packed by
``pack_image_features``: the base view's ``g x g`` tokens, then (anyres, more than one view) the
unpadded grid of the high-resolution views with an ``image_newline`` token closing every row
(LLaVA-OneVision shrinks a grid above ``anyres_max_N`` views bilinearly first), or (one view) a
single ``image_newline``. Units: the base grid, then the unpadded grid whose newline column is
kept as it is. The layout is recomputed with the family's own ``get_anyres_image_grid_shape`` and
``unpad_image``."""
from __future__ import annotations

import importlib
import inspect
import math

import torch

from vtok_fast.patch.families.base import Family, Units, feature_layer, listed_rebuild
from vtok_fast.patch.hf_tome import encoder_of


def _unpadded(inner, module, image_size, ratio_name: str | None) -> tuple[int, int]:
    """``(rows, cols)`` of an image's unpadded high-resolution grid, as ``pack_image_features``."""
    vision = inner.config.vision_config
    side = vision.image_size // vision.patch_size
    rows, cols = module.get_anyres_image_grid_shape(image_size, inner.config.image_grid_pinpoints,
                                                    vision.image_size)
    shape = module.unpad_image(torch.empty(1, rows * side, cols * side), image_size).shape[1:]
    if ratio_name is not None:  # LLaVA-OneVision's anyres_max_N shrink
        most = int(ratio_name.strip("anyres_max_"))
        ratio = math.sqrt(shape[0] * shape[1] / (most * side ** 2))
        if ratio > 1.1:
            shape = (int(shape[0] // ratio), int(shape[1] // ratio))
    return int(shape[0]), int(shape[1])


def _units_for(module_name: str, onevision: bool):
    def units(inner, output, call: dict) -> Units:
        module = importlib.import_module(module_name)
        vision = inner.config.vision_config
        side = vision.image_size // vision.patch_size
        newline = int(getattr(inner, "image_newline", None) is not None)
        ratio_name = None
        if onevision:
            ratio_name = call.get("vision_aspect_ratio") or inner.config.vision_aspect_ratio
        pieces, grids = list(output.pooler_output), []
        for piece, size in zip(pieces, call["image_sizes"]):
            if piece.shape[0] == side * side + newline:
                grids.append([(side, side), (1, 0, newline)] if newline else [(side, side)])
                continue
            rows, cols = _unpadded(inner, module, size, ratio_name)
            grids.append([(side, side), (rows, cols, newline)])
        return Units(pieces, grids)

    return units


def _attention(inner):
    layers = encoder_of(inner.vision_tower).layers
    return layers[feature_layer(layers, inner.config.vision_feature_layer)].self_attn


def _score_map_for(module_name: str):
    def score_map(inner, scores, call: dict, units) -> list:
        """``pack_image_features`` itself on the per-view scores (one channel, no newline): the
        base view's grid, then the unpadded (OneVision: shrunk) grid, as the features."""
        module = importlib.import_module(module_name)
        vision = inner.config.vision_config
        counts = [module.image_size_to_num_patches(image_size=size, grid_pinpoints=inner.config.image_grid_pinpoints,
                                                   patch_size=vision.image_size) for size in call["image_sizes"]]
        if sum(counts) != scores.shape[0]:  # OneVision with several images per sample: base views only
            counts = [1] * scores.shape[0]
        views = list(torch.split(scores[..., None], counts))
        names = inspect.signature(inner.pack_image_features).parameters
        options = {"image_newline": None}
        if "vision_feature_select_strategy" in names:
            options["vision_feature_select_strategy"] = inner.config.vision_feature_select_strategy
        if "vision_aspect_ratio" in names:
            options["vision_aspect_ratio"] = call.get("vision_aspect_ratio") or inner.config.vision_aspect_ratio
        packed, _ = inner.pack_image_features(views, call["image_sizes"], **options)
        return [p[:, 0] for p in packed]

    return score_map


LLAVA_NEXT = Family(name="LLaVA-NeXT", model_types=("llava_next",),
                    inner="transformers.models.llava_next.modeling_llava_next:LlavaNextModel",
                    units=_units_for("transformers.models.llava_next.modeling_llava_next", False),
                    rebuild=listed_rebuild, cls=True, attention=_attention,
                    score_map=_score_map_for("transformers.models.llava_next.modeling_llava_next"))
LLAVA_ONEVISION = Family(name="LLaVA-OneVision", model_types=("llava_onevision",),
                         inner="transformers.models.llava_onevision.modeling_llava_onevision:LlavaOnevisionModel",
                         units=_units_for("transformers.models.llava_onevision.modeling_llava_onevision", True),
                         rebuild=listed_rebuild, attention=_attention,
                         score_map=_score_map_for("transformers.models.llava_onevision.modeling_llava_onevision"))
