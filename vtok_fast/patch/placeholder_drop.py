"""Drop the placeholders of removed image tokens inside a patched Hugging Face VLM's forward.

A vision compression (:mod:`vtok_fast.patch.hf_compress`) hands the language model ``M`` features
per image where the processor's normal prompt holds ``N`` placeholders. This engine lets that
prompt run unchanged: the patched ``get_placeholder_mask`` (:func:`placeholder_mask`) marks, per
image, the ``M`` placeholders its compressed tokens stand for (each token's *slot*: a kept or merged
token its own / its destination's input index, a pooled or synthesized one the first input it
holds), so ``masked_scatter`` fills those; a ``forward_pre_hook`` on the language model
(:func:`lm_pre_hook`) then drops the other placeholders from ``inputs_embeds``, the attention mask
and the position ids. Position ids are computed on the full layout (the caller's, ``generate``'s
mask cumsum, or the language model's default ``arange``) and gathered: ``positions="original"``
keeps those values, ``"compact"`` subtracts the number of placeholders dropped before each token
(the ids a prompt holding only the kept tokens would get). Rows keeping different counts are
left-padded (mask 0), never truncated; a 2-D mask is always passed on, so position jumps are never
read as packed sequences. With a cache, the prefill records on the cache which prompt column each
slot holds; later steps map the full-layout mask onto the cache's slots and shift positions in
compact mode. :func:`aligned_loss` gathers ``labels`` with the same index (-100 at pads).

The column drop itself (:func:`drop_columns`, with :func:`gather_last` / :func:`gather_4d`) is
shared: the family adapters' engine (:mod:`vtok_fast.patch.family_drop`, M-RoPE ids and Gemma 3's
mask dict) and FastV / PyramidDrop's stages (:mod:`vtok_fast.patch.lm_prune`) call it too.

Engine only: the patcher builds the replacements (:func:`pre_hook_replacements`) and owns
``run`` = ``{"drop": ..., "kept": ..., "info": ...}`` (``info["kept"]``: the last dropping
forward's ``(B, L')`` prompt columns, ``-1`` at pads). transformers is never imported here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from vtok_fast.patch.llava_common import image_token_mask

POSITIONS = ("original", "compact")
STATE = "_vtok_fast_drop"  # on a cache filled by a dropping prefill: {"columns", "length", "shift"}
IGNORE = -100


def pre_hook_replacements(module: nn.Module, hook) -> list[tuple[object, str, object]]:
    """``patch`` replacements adding ``hook`` as a ``forward_pre_hook(with_kwargs=True)`` of
    ``module``: copies of its two hook dicts, so ``restore`` (and a failing ``all_or_nothing``)
    puts the originals back. Hooks registered on ``module`` while patched go with the copies."""
    hooks = type(module._forward_pre_hooks)(module._forward_pre_hooks)  # OrderedDicts: hook handles weakref them
    with_kwargs = type(module._forward_pre_hooks_with_kwargs)(module._forward_pre_hooks_with_kwargs)
    handle = RemovableHandle(hooks)  # only for a fresh, globally unique id
    hooks[handle.id] = hook
    with_kwargs[handle.id] = True
    return [(module, "_forward_pre_hooks", hooks), (module, "_forward_pre_hooks_with_kwargs", with_kwargs)]


def slots(compressed) -> torch.Tensor:
    """``(I, M)`` int64: the input index (placeholder) each compressed token of ``I`` images stands
    for: its ``positions`` entry, else (pooled, synthesized) the first input whose ``source`` it is.
    Raises a ValueError for a token that stands for no input or two tokens on one slot."""
    positions, source = compressed.positions, compressed.source
    images, num_out = positions.shape
    num_in = source.shape[1]
    index = torch.where(source < 0, num_out, source)
    first = torch.full((images, num_out + 1), num_in, dtype=torch.long, device=source.device)
    inputs = torch.arange(num_in, device=source.device).expand(images, num_in)
    first = first.scatter_reduce(1, index, inputs, "amin")[:, :num_out]
    slot = torch.where(positions >= 0, positions, first)
    if bool((slot >= num_in).any()) or bool((slot.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("cannot place the compressed tokens on the prompt's placeholders (a token stands for no "
                         "input, or two for the same one): use configure_processor for this method")
    return slot


def placeholder_mask(llava: nn.Module, run: dict, compressed, input_ids, inputs_embeds) -> torch.Tensor:
    """The ``(B, L, 1)`` mask ``masked_scatter`` fills for a prompt holding ``N`` placeholders per
    image while the features are ``compressed`` (``M`` per image, token order): the placeholders of
    the tokens' slots. Records in ``run["drop"]`` the ``(B, L)`` keep mask (text and those
    placeholders) and, when the slots are not ascending in token order, the flat ``embed_src``
    index that moves each token from the placeholder ``masked_scatter`` gave it to its slot."""
    tokens = image_token_mask(llava, input_ids, inputs_embeds)
    batch, length = tokens.shape
    slot = slots(compressed).to(tokens.device)
    images, num_in = slot.shape[0], compressed.source.shape[1]
    keep_slots = torch.zeros(images, num_in, dtype=torch.bool, device=tokens.device).scatter(1, slot, True)
    filled = tokens.clone()
    filled[tokens] = keep_slots.flatten()
    embed_src = None
    ordered = slot.sort(dim=1).values
    if not torch.equal(ordered, slot):
        places = tokens.flatten().nonzero()[:, 0].view(images, num_in)  # each image's placeholders, in order
        embed_src = torch.arange(batch * length, device=tokens.device)
        embed_src[places.gather(1, slot).flatten()] = places.gather(1, ordered).flatten()
    run["drop"] = {"keep": ~tokens | filled, "embed_src": embed_src}
    return filled.unsqueeze(-1).to(inputs_embeds.device)


def lm_pre_hook(run: dict, positions: str, module: nn.Module, args: tuple, kwargs: dict):
    """``forward_pre_hook(with_kwargs=True)`` of the language model: after a dropping
    :func:`placeholder_mask`, gather the kept rows (prefill); at a later step on a cache such a
    prefill filled, map the mask and positions to the cache's layout; otherwise change nothing."""
    drop, run["drop"], run["kept"] = run.get("drop"), None, None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if drop is not None:
        return args, _prefill(run, drop, positions, dict(kwargs), cache)
    state = None if cache is None else cache.__dict__.get(STATE)
    if state is None:
        return None
    if cache.get_seq_length() == 0:  # a reused, emptied cache
        del cache.__dict__[STATE]
        return None
    return args, _decode(state, dict(kwargs), cache)


def _left_padded(keep: torch.Tensor) -> torch.Tensor:
    """``(B, L')`` int64: each row's kept columns ascending, right-aligned, ``-1`` before them."""
    counts = keep.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    rank = keep.long().cumsum(dim=1) - 1 + (width - counts)[:, None]
    index = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    index[rows, rank[rows, cols]] = cols
    return index


def _prefill(run: dict, drop: dict, positions: str, kwargs: dict, cache) -> dict:
    """The language model's kwargs with the dropped placeholders removed (see the module doc)."""
    embeds = kwargs.get("inputs_embeds")
    batch, length, width = embeds.shape
    mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length)):
        raise ValueError(f"dropping image placeholders needs a 2-D (B, L) = ({batch}, {length}) attention_mask "
                         f"(or none), got {getattr(mask, 'shape', type(mask).__name__)}")
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != length):
        raise ValueError(f"dropping image placeholders needs (B, L) position_ids, got {tuple(position_ids.shape)}")
    if drop["embed_src"] is not None:
        embeds = embeds.reshape(batch * length, width)[drop["embed_src"].to(embeds.device)].view(batch, length, width)
        kwargs["inputs_embeds"] = embeds
    kwargs, index = drop_columns(drop["keep"], kwargs, positions, cache=cache)
    run["kept"], run["length"] = index, length
    if run.get("info") is not None:
        run["info"]["kept"] = index
    return kwargs


def gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., B, L)`` at ``index`` ``(B, L')`` along the last dim (index clamped)."""
    lead = x.shape[:-2]
    x = x.expand(*lead, index.shape[0], x.shape[-1])
    return x.gather(-1, index.clamp(min=0).expand(*lead, *index.shape))


def gather_4d(mask: torch.Tensor | None, index: torch.Tensor, pad: torch.Tensor):
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


def drop_columns(keep: torch.Tensor, kwargs: dict, positions: str, per_token: tuple[str, ...] = (),
                 cache=None) -> tuple:
    """The language model's ``kwargs`` keeping the ``(B, L)`` ``keep`` columns, left-padded:
    ``inputs_embeds``, the attention mask (2-D, or a dict of 4-D masks: rows and columns), the
    position ids (``(B, L)`` or M-RoPE's ``(3 | 4, B, L)``, on the last dim; ``positions``:
    ``"original"`` or ``"compact"``) and the ``per_token`` ``(B, L)`` kwargs; records the kept
    columns on ``cache``. Returns ``(kwargs, index)``, ``index`` ``(B, L')`` the kept columns (-1
    at pads)."""
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
        mask = {name: gather_4d(m, index, pad) for name, m in mask.items()}
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
    new_positions = gather_last(position_ids, index)
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


def step_mask(state: dict, kwargs: dict, reference: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """A step after a dropping prefill: its full-layout 2-D mask ``(B, L + t)`` (ones when none
    is given; ``reference``: the step's ``input_ids`` or ``inputs_embeds``) and that mask mapped to
    the cache's slots (the kept prompt columns, then the tokens added since)."""
    columns, length = state["columns"], state["length"]
    batch, steps = reference.shape[:2]
    total = length + cache.get_seq_length() - columns.shape[1] + steps
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, total, dtype=torch.long, device=reference.device)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (batch, total) \
            or columns.shape[0] != batch:
        raise ValueError(f"a step after dropping image placeholders needs the full-layout 2-D attention_mask "
                         f"({columns.shape[0]}, {total}) (or none), got {getattr(mask, 'shape', type(mask).__name__)}")
    columns = columns.to(mask.device)
    prompt = mask[:, :length].gather(1, columns.clamp(min=0)).masked_fill(columns < 0, 0)
    return mask, torch.cat([prompt, mask[:, length:]], dim=1)


def _decode(state: dict, kwargs: dict, cache) -> dict:
    """A step after a dropping prefill: the full-layout mask -> the cache's slots
    (:func:`step_mask`), positions shifted in compact mode."""
    embeds = kwargs.get("inputs_embeds")
    mask, slots_mask = step_mask(state, kwargs, embeds, cache)
    steps = embeds.shape[1]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # what the language model computes on the full layout
        position_ids = (torch.arange(steps, device=embeds.device) + mask.shape[1] - steps)[None]
    shift = state["shift"].to(position_ids.device)[:, None]
    kwargs.update(attention_mask=slots_mask, position_ids=position_ids - shift)
    return kwargs


def aligned_loss(loss_function, run: dict, logits=None, labels=None, vocab_size=None, **kwargs):
    """The model's ``loss_function`` with ``labels`` ``(B, L)`` gathered at the columns the last
    dropping forward kept (``-100`` at its pads) when ``logits`` cover those; else unchanged."""
    kept = run.get("kept")
    if (kept is not None and isinstance(labels, torch.Tensor) and labels.dim() == 2 and logits is not None
            and logits.shape[1] == kept.shape[1] and labels.shape[1] == run.get("length")):
        kept = kept.to(labels.device)
        labels = labels.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, kwargs.get("ignore_index", IGNORE))
    return loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
