"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: ``get_image_features`` returns one piece per image
(``t · h/m · w/m`` tokens after the patch merger, raster order over the merged grid, frames one
after another); each frame is a unit on the merged ``(h/m, w/m)`` grid. Position ids are M-RoPE
``(3, B, L)``. Qwen3-VL's DeepStack features (one list per deepstack layer, pieces alike) are
compressed with the same selection (merged tokens: the mean of their sources)."""
from __future__ import annotations

import sys

import torch

from vtok_fast.patch.families.base import Family, Units


def _units(inner, output, call: dict) -> Units:
    merge = inner.visual.spatial_merge_size
    grid_thw = call["image_grid_thw"] if "image_grid_thw" in call else call["video_grid_thw"]
    pieces = list(output.pooler_output)
    grids = [[(int(h) // merge, int(w) // merge)] * int(t) for t, h, w in grid_thw.tolist()]
    return Units(pieces, grids)


def _rebuild(inner, output, pieces, replay):
    output.pooler_output = tuple(pieces)
    deepstack = getattr(output, "deepstack_features", None)
    if deepstack:
        output.deepstack_features = [tuple(replay(list(layer))) for layer in deepstack]
    return output


def _attention(inner):
    return inner.visual.blocks[-1].attn


def _score_map(inner, scores, call: dict, units) -> list:
    """Qwen's merger on the scores: the mean of each 2x2 block (``merge²`` consecutive patches);
    Qwen2.5-VL's window order undone as its tower does (``argsort(window_index)``)."""
    visual = inner.visual
    merged = scores.view(-1, visual.spatial_merge_size ** 2).mean(dim=-1)
    if hasattr(visual, "window_size"):
        grid_thw = call["image_grid_thw"] if "image_grid_thw" in call else call["video_grid_thw"]
        module = sys.modules[type(visual).__module__]
        window_index, _ = module.get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                         window_size=visual.window_size,
                                                         patch_size=visual.patch_size, kwargs={})
        merged = merged[torch.argsort(window_index.to(merged.device))]
    return list(merged.split([piece.shape[0] for piece in units.pieces]))


def _family(name: str, model_type: str, module: str, prefix: str) -> Family:
    return Family(name=name, model_types=(model_type,), inner=f"transformers.models.{module}:{prefix}Model",
                  units=_units, rebuild=_rebuild, mrope=True, videos=True, attention=_attention, score_map=_score_map,
                  lm_kwargs=("visual_pos_masks",) if model_type == "qwen3_vl" else ())


QWEN2_VL = _family("Qwen2-VL", "qwen2_vl", "qwen2_vl.modeling_qwen2_vl", "Qwen2VL")
QWEN2_5_VL = _family("Qwen2.5-VL", "qwen2_5_vl", "qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VL")
QWEN3_VL = _family("Qwen3-VL", "qwen3_vl", "qwen3_vl.modeling_qwen3_vl", "Qwen3VL")
