"""The placeholder drop for the family adapters: the language model sees only the kept image
tokens, while the caller's prompt (one placeholder per uncompressed token) and code stay as they
are.

- :func:`placeholder_drop.drop_columns` (at the language model's forward pre-hook): gathers the kept rows of
  ``inputs_embeds``, the attention mask (2-D, or the dict of 4-D masks Gemma 3 builds before its
  language model: rows and columns), the position ids (``(B, L)``, or M-RoPE's ``(3 | 4, B, L)``
  along the last dim), the family's per-token kwargs (Qwen3-VL's ``visual_pos_masks``) and
  Qwen3-VL's DeepStack rows; rows keeping different counts are left-padded; records the kept
  columns on the cache.
- :func:`decode_kwargs` (a forward pre-hook of the model holding the language model, before it
  builds masks or M-RoPE ids): at a later step on such a cache, maps the full-layout 2-D mask to
  the cache's slots and supplies full-layout position ids (less the dropped count in compact
  mode).

Positions: ``"original"`` (default) keeps every kept token's position ids of the full layout;
``"compact"`` subtracts from every column (each M-RoPE row alike) the number of dropped columns
before it, as a prompt holding only the kept tokens would number its text.
"""
from __future__ import annotations

import torch

from vtok_fast.patch.placeholder_drop import POSITIONS, drop_columns, step_mask

__all__ = ["POSITIONS", "decode_kwargs", "deepstack_rows", "drop_columns"]


def deepstack_rows(embeds: list[torch.Tensor], visual: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    """Qwen3-VL's DeepStack features ``(n_visual, D)`` (rows in the order of the ``(B, L)``
    ``visual`` mask) at the visual tokens ``keep`` keeps."""
    kept = keep.to(visual.device)[visual]
    return [e[kept.to(e.device)] for e in embeds]


def decode_kwargs(state: dict, kwargs: dict, cache, rope_deltas=None) -> dict:
    """The inner model's kwargs at a step after a dropping prefill: the full-layout 2-D mask
    ``(B, L + t)`` mapped to the cache's slots (:func:`placeholder_drop.step_mask`); position ids
    of the full layout (given ones, or the mask's cumsum as ``generate`` makes them, plus
    ``rope_deltas`` for M-RoPE), shifted in compact mode."""
    ids = kwargs.get("input_ids")
    reference = ids if ids is not None else kwargs.get("inputs_embeds")
    mask, slots_mask = step_mask(state, kwargs, reference, cache)
    steps = reference.shape[1]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        full = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -steps:]
        position_ids = full if rope_deltas is None else (full + rope_deltas.to(full.device))[None].expand(3, -1, -1)
    shift = state["shift"].to(position_ids.device)[:, None]
    kwargs.update(attention_mask=slots_mask, position_ids=position_ids - shift)
    return kwargs
