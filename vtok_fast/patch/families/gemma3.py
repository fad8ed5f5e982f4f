"""Gemma 3: ``get_image_features`` returns ``(images, mm_tokens_per_image, D)``, one piece per
image or pan-and-scan crop on the square grid the projector's average pool leaves (16 x 16). The
language model takes a dict of 4-D masks (bidirectional inside each image block, sliding layers),
built on the full layout before it: the engine gathers their rows and columns. Decoding steps
build their masks from the cache, whose sliding window then counts kept tokens only: with the
original positions, a prompt longer than the window (1024 in Gemma 3 4B and larger) slides by
cache slots, not by position ids."""
from __future__ import annotations

from vtok_fast.patch.families.base import Family, stacked_rebuild, stacked_units
from vtok_fast.patch.family_scores import pooled
from vtok_fast.patch.hf_tome import encoder_of


def _attention(inner):
    return encoder_of(inner.vision_tower).layers[-1].self_attn


def _score_map(inner, scores, call: dict, units) -> list:
    """The projector's average pool on the scores (SigLIP has no CLS: each patch's received
    attention), one 16 x 16 map per image."""
    side = int(round(scores.shape[1] ** 0.5))
    per_side = int(round(inner.config.mm_tokens_per_image ** 0.5))
    return list(pooled(scores, side, side // per_side))


GEMMA3 = Family(name="Gemma 3", model_types=("gemma3",),
                inner="transformers.models.gemma3.modeling_gemma3:Gemma3Model",
                units=stacked_units("a Gemma 3 image"), rebuild=stacked_rebuild,
                sliding_window=True, attention=_attention, score_map=_score_map)
