"""What a family adapter says about one VLM family of transformers (``Family``), and the ``Units``
its image features split into.

An adapter is data plus two small functions, never a copy of a forward:

- ``inner``: the class of the model that holds the vision tower, the projector and the language
  model (``Qwen2VLModel``, ``Gemma3Model``, ...), whose ``get_image_features`` and forward are
  the seams the engine hooks;
- ``language_model``: the attribute holding the decoder (its decoder layers are ``.layers``);
- ``image_token``: the config attribute with the placeholder id;
- ``units(inner, output, call)``: the features ``get_image_features`` returned, as ``Units``:
  the pieces in the order the model scatters them into the placeholders, and each piece cut into
  consecutive runs of tokens on a grid (a tile, an image, a frame);
- ``rebuild(inner, output, pieces, replay)``: the same output with its pieces replaced (the
  engine passes full-count pieces: kept tokens at their slots, zeros elsewhere); ``replay``
  applies the same compression to other per-token features (Qwen3-VL's DeepStack);
- ``mrope``: position ids are ``(3, B, L)`` (or ``(4, B, L)`` with the text row) and decoding
  adds ``inner.rope_deltas``;
- ``cls``: whether the tokens came from a tower with a CLS token (CLS-attention methods);
- ``sliding_window``: FastV / PyramidDrop may run its language model's sliding-window layers,
  while the sequence fits the window (Gemma 3; :mod:`vtok_fast.patch.hf_fastv`);
- ``videos``: ``get_video_features`` (placeholders ``video_token_id``) splits like images, one
  unit per frame, and is compressed the same way;
- ``attention`` / ``score_map``: for the attention methods, the vision attention module whose
  scores rank the tokens, and the family's own merge applied to those scores
  (:mod:`vtok_fast.patch.family_scores`).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, NamedTuple

import torch

from vtok_fast._checks import square_side


class Units(NamedTuple):
    """``pieces``: tensors ``(n_i, D)`` in placeholder order; ``grids[i]``: the grids that cut piece
    ``i`` into consecutive runs (their token counts sum to ``n_i``): ``(h, w)`` for ``h·w`` tokens
    row-major, or ``(h, w, extra)`` for rows of ``w`` grid tokens each followed by ``extra`` tokens
    kept as they are (LLaVA-NeXT's ``image_newline``; ``w = 0``: only kept tokens)."""

    pieces: list[torch.Tensor]
    grids: list[list[tuple[int, int]]]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # what errors and the README call it
    model_types: tuple[str, ...]
    inner: str  # "module:Class" of transformers
    units: Callable
    rebuild: Callable
    language_model: str = "language_model"
    image_token: str = "image_token_id"
    mrope: bool = False
    cls: bool = False
    sliding_window: bool = False  # FastV / PyramidDrop run its sliding layers within the window (Gemma 3)
    lm_kwargs: tuple[str, ...] = ()  # per-token (B, L) kwargs of the language model gathered with the rows
    videos: bool = False  # get_video_features / video_token_id: video frames are compressed like images
    attention: Callable | None = None  # inner -> the vision attention module the features' layer runs
    score_map: Callable | None = None  # (inner, tower scores, call, units) -> per piece, a score per grid token

    def inner_class(self) -> type:
        module, name = self.inner.split(":")
        return getattr(importlib.import_module(module), name)


def square(count: int, what: str) -> tuple[int, int]:
    """``(g, g)`` for ``count = g * g`` tokens, else a ValueError naming ``what``."""
    side = square_side(count, what)
    return side, side


def feature_layer(layers, index: int) -> int:
    """The position in ``layers`` of the layer whose output is ``hidden_states[index]`` (the
    embeddings are ``hidden_states[0]``)."""
    return index - 1 if index >= 0 else len(layers) + index


def stacked_units(what: str):
    """``units`` of a family whose ``pooler_output`` is one tensor ``(views, g², D)``: one piece per
    view (tile, image, crop) on its square grid; ``what`` names a view in errors."""
    def units(inner, output, call: dict) -> Units:
        views = output.pooler_output
        grid = square(views.shape[1], what)
        return Units(list(views), [[grid]] * views.shape[0])

    return units


def stacked_rebuild(inner, output, pieces, replay):
    """``rebuild`` of a family whose ``pooler_output`` is one tensor: the pieces stacked back."""
    output.pooler_output = torch.stack(pieces) if pieces else output.pooler_output
    return output


def listed_rebuild(inner, output, pieces, replay):
    """``rebuild`` of a family whose ``pooler_output`` is a list of pieces: the new list."""
    output.pooler_output = list(pieces)
    return output
