"""The placeholder drop for the family adapters: the language model sees only the kept image
tokens, while the caller's prompt (one placeholder per uncompressed token) and code stay as they
are.

- :func:`prefill_kwargs` (a forward pre-hook of the language model): gathers the kept rows of
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

from vtok_fast.patch.placeholder_drop import STATE, _left_padded, step_mask

POSITIONS = ("original", "compact")


def _gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., B, L)`` at ``index`` ``(B, L')`` along the last dim (index clamped)."""
    lead = x.shape[:-2]
    x = x.expand(*lead, index.shape[0], x.shape[-1])
    return x.gather(-1, index.clamp(min=0).expand(*lead, *index.shape))


def _gather_4d(mask: torch.Tensor | None, index: torch.Tensor, pad: torch.Tensor):
    """A ``(B | 1, H, L, L)`` mask at the kept rows and columns; pad columns masked, pad rows
    attending to themselves only."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"dropping image placeholders needs 4-D masks in the language model's mask dict, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    batch, width = index.shape
    safe = index.clamp(min=0)
    mask = mask.expand(batch, *mask.shape[1:])
    rows = mask.gather(2, safe[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    out = rows.gather(3, safe[:, None, None, :].expand(-1, mask.shape[1], width, -1))
    blocked = False if out.dtype == torch.bool else torch.finfo(out.dtype).min
    allowed = True if out.dtype == torch.bool else 0.0
    out = out.masked_fill(pad[:, None, None, :], blocked)
    eye = torch.eye(width, dtype=torch.bool, device=out.device)
    return out.masked_fill((pad[:, :, None] & eye)[:, None], allowed)


def prefill_kwargs(keep: torch.Tensor, kwargs: dict, positions: str, per_token: tuple[str, ...], cache) -> tuple:
    """The language model's ``kwargs`` keeping the ``(B, L)`` ``keep`` columns; returns
    ``(kwargs, index)`` with ``index`` ``(B, L')`` the kept columns (-1 at pads)."""
    embeds = kwargs["inputs_embeds"]
    batch, length, width = embeds.shape
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("dropping image placeholders needs an empty cache at the forward that holds the images")
    keep = keep.to(embeds.device)
    index = _left_padded(keep)
    pad, safe = index < 0, index.clamp(min=0)
    dropped = (~keep).long().cumsum(dim=1)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):
        mask = {name: _gather_4d(m, index, pad) for name, m in mask.items()}
    elif mask is None or (isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, length)):
        base = torch.ones(batch, length, dtype=torch.long, device=embeds.device) if mask is None else mask
        mask = base.gather(1, safe).masked_fill(pad, 0)
    else:
        raise ValueError(f"dropping image placeholders needs a 2-D (B, L) = ({batch}, {length}) attention_mask, a "
                         f"dict of 4-D masks or none, got {getattr(mask, 'shape', type(mask).__name__)}")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=embeds.device)[None]
    if position_ids.shape[-1] != length:
        raise ValueError(f"dropping image placeholders needs position ids over the {length} columns, got "
                         f"{tuple(position_ids.shape)}")
    new_positions = _gather_last(position_ids, index)
    shift = torch.zeros(batch, dtype=torch.long, device=embeds.device)
    if positions == "compact":
        new_positions = new_positions - dropped.gather(1, safe)
        shift = dropped[:, -1] if length else shift
    kwargs.update(inputs_embeds=embeds.gather(1, safe[..., None].expand(-1, -1, width)).masked_fill(pad[..., None], 0),
                  attention_mask=mask, position_ids=new_positions.masked_fill(pad, 0))
    for name in per_token:
        if isinstance(kwargs.get(name), torch.Tensor):
            kwargs[name] = kwargs[name].gather(1, safe.to(kwargs[name].device)).masked_fill(pad, False)
    if cache is not None:
        cache.__dict__[STATE] = {"columns": index, "length": length, "shift": shift}
    return kwargs, index


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
