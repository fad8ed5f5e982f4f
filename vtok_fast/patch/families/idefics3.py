"""Idefics3 and SmolVLM: ``get_image_features`` returns one piece per batch sample, its real tiles
(image splitting: the row-major tiles, then the global view) one after another, each
``image_seq_len`` tokens on the square grid the connector's pixel shuffle leaves."""
from __future__ import annotations

import torch

from vtok_fast.patch.families.base import Family, Units, listed_rebuild, square
from vtok_fast.patch.family_scores import pooled


def _units(inner, output, call: dict) -> Units:
    pieces = list(output.pooler_output)
    scale = inner.config.scale_factor
    vision = inner.config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2 // (scale * scale)
    grid = square(per_tile, "an Idefics3 tile")
    grids = []
    for piece in pieces:
        if piece.shape[0] % per_tile:
            raise ValueError(f"an Idefics3 sample's {piece.shape[0]} image features are not whole tiles of "
                             f"{per_tile}")
        grids.append([grid] * (piece.shape[0] // per_tile))
    return Units(pieces, grids)


def _attention(inner):
    return inner.vision_model.encoder.layers[-1].self_attn


def _score_map(inner, scores, call: dict, units) -> list:
    """The connector's pixel shuffle on the scores (its s x s blocks), the real tiles of each
    sample one after another, as the features."""
    side = int(round(scores.shape[1] ** 0.5))
    tiles = pooled(scores, side, inner.config.scale_factor)
    counts = [len(grids) for grids in units.grids]
    return [t.flatten() for t in torch.split(tiles, counts)]


def _family(name: str, model_type: str, module: str, prefix: str) -> Family:
    return Family(name=name, model_types=(model_type,), inner=f"transformers.models.{module}:{prefix}Model",
                  units=_units, rebuild=listed_rebuild, language_model="text_model", attention=_attention,
                  score_map=_score_map)


IDEFICS3 = _family("Idefics3", "idefics3", "idefics3.modeling_idefics3", "Idefics3")
SMOLVLM = _family("SmolVLM", "smolvlm", "smolvlm.modeling_smolvlm", "SmolVLM")
