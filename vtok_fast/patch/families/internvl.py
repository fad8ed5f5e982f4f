"""InternVL (3 / 3.5): ``get_image_features`` returns a tensor ``(tiles, g², D)``, one piece per
tile (the tiles of every image, thumbnail last) on the ``g x g`` grid after the pixel shuffle. The
CLS token is dropped before the projector (``vision_feature_select_strategy="default"``)."""
from __future__ import annotations

from vtok_fast.patch.families.base import Family, feature_layer, stacked_rebuild, stacked_units
from vtok_fast.patch.family_scores import pooled


def _attention(inner):
    layers = inner.vision_tower.encoder.layer
    return layers[feature_layer(layers, inner.config.vision_feature_layer)].attention


def _score_map(inner, scores, call: dict, units) -> list:
    """The pixel shuffle's 2x2 blocks (token (i, j) holds patches 2i..2i+1 x 2j..2j+1): the mean
    of their CLS-attention scores."""
    side = int(round(scores.shape[1] ** 0.5))
    return list(pooled(scores, side, int(round(1 / inner.config.downsample_ratio))))


INTERNVL = Family(name="InternVL", model_types=("internvl",),
                  inner="transformers.models.internvl.modeling_internvl:InternVLModel",
                  units=stacked_units("an InternVL tile"), rebuild=stacked_rebuild, cls=True,
                  attention=_attention, score_map=_score_map)
