"""Token drop between the projector and the decoder of a reference model, shared by training and evaluation.

LLaVA (steps below) and Qwen2-VL (:func:`mrope_inputs`: the model's own M-RoPE ids of the full
prompt, gathered by :func:`vtok_fast.patch.placeholder_drop.drop_columns`, the column drop the
family patchers use) share ``last_logits``, ``answer_logits`` and ``greedy``. The LLaVA path:

``answer_logits(model, batch, keep, positions)``:

1. ``model.model.get_image_features(pixel_values)`` -> ``(B, N, D)`` projected image features
   (every token; the vision tower is not changed).
2. The text embeddings of ``input_ids`` with the features scattered into the ``N`` placeholder
   positions of each row (what ``LlavaModel.forward`` does).
3. Keep, per row, the text tokens and the image tokens with ``keep[b, j]`` true (kept tokens stay
   in order); dropped placeholders are removed from the sequence, which is re-packed with left
   padding to the longest row (``drop_columns``, padding columns dropped too).
4. ``position_ids``: ``"original"``: every kept token keeps the position it has in the full
   sequence (text after the image continues from the full length, as if nothing were dropped);
   ``"compact"``: kept tokens are renumbered ``0..L_b-1`` (what a model sees when the processor
   inserts fewer placeholders). Padding gets position 0 and attention mask 0; an explicit 2-D
   mask is always passed, so the decoder never reads position jumps as packed sequences.
5. The decoder runs on ``inputs_embeds``; the result is the last position's logits ``(B, V)``.

With ``keep`` all true and ``"original"`` positions this is ``model(**batch).logits[:, -1]``
(up to float rounding). Gradients flow through every step (training uses the same function).
"""
from __future__ import annotations

import torch

from vtok_fast.patch.placeholder_drop import drop_columns

POSITIONS = ("original", "compact")
MROPE = ("qwen2_vl",)  # model types whose drop keeps M-RoPE ids (mrope_inputs)


def keep_mask(counts: torch.Tensor, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, num_tokens)`` bool: row ``b`` keeps ``counts[b]`` tokens chosen uniformly at random
    (a random permutation per row from ``generator``; CPU)."""
    scores = torch.rand(counts.shape[0], num_tokens, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < counts[:, None]


def _embed(model, input_ids: torch.Tensor, features: torch.Tensor, keep: torch.Tensor, positions: str):
    """``(embeds, is_image)``: the text embeddings of ``input_ids`` with ``features`` at the
    placeholders (what the model's own forward does), after checking the arguments."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    is_image = input_ids == model.config.image_token_id
    if not bool((is_image.sum(1) == features.shape[1]).all()) or keep.shape != features.shape[:2]:
        raise ValueError(f"each row needs {features.shape[1]} image placeholders and keep must be "
                         f"{tuple(features.shape[:2])}, got {is_image.sum(1).tolist()} and {tuple(keep.shape)}")
    embeds = model.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))
    return embeds, is_image


def drop_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor,
                keep: torch.Tensor, positions: str = "original") -> dict:
    """``inputs_embeds``, ``attention_mask`` and ``position_ids`` of the sequences with only the
    kept image tokens (steps 2-4 above). ``input_ids``/``attention_mask``: ``(B, L)`` left-padded,
    each row with exactly ``N`` image placeholders; ``features``: ``(B, N, D)``; ``keep``: ``(B, N)``."""
    embeds, is_image = _embed(model, input_ids, features, keep, positions)
    valid = attention_mask.bool()
    kept = (valid & ~is_image).masked_scatter(is_image, keep.to(valid.device))
    # the ids of each mode, computed here (padding is dropped too) and gathered by the shared column drop
    pos = ((valid if positions == "original" else kept).long().cumsum(1) - 1).clamp(min=0)
    inputs, _ = drop_columns(kept, {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": pos},
                             "original")
    return inputs


def _features(model, batch) -> torch.Tensor:
    """``(B, N, D)`` projected image features of ``batch`` (one image per row)."""
    extra = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
    features = model.model.get_image_features(pixel_values=batch["pixel_values"], **extra).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def mrope_inputs(model, batch, features: torch.Tensor, keep: torch.Tensor, positions: str = "original") -> dict:
    """Qwen2-VL: ``inputs_embeds``, ``attention_mask`` and ``(3, B, L')`` ``position_ids`` of
    ``batch`` (a processor output with ``mm_token_type_ids`` and ``image_grid_thw``) keeping the
    image tokens in ``keep`` ``(B, N)``. The ids are the model's ``get_rope_index`` of the full
    prompt, gathered (``"original"``) or less the placeholders dropped before each token
    (``"compact"``, each M-RoPE row alike), as ``patch.hf(compress=...)`` does."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds, is_image = _embed(model, input_ids, features, keep, positions)
    position_ids, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                                 image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    columns = (~is_image).masked_scatter(is_image, keep.to(is_image.device))
    inputs, _ = drop_columns(columns, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids},
                             positions)
    return inputs


def feature_inputs(model, batch, features: torch.Tensor, keep: torch.Tensor, positions: str = "original") -> dict:
    """The decoder's inputs of ``batch`` with ``features`` ``(B, N, D)`` at its image placeholders,
    keeping those in ``keep`` ``(B, N)``: ``mrope_inputs`` for M-RoPE models, else ``drop_inputs``."""
    if model.config.model_type in MROPE:
        return mrope_inputs(model, batch, features, keep, positions)
    return drop_inputs(model, batch["input_ids"], batch["attention_mask"], features, keep, positions)


def decoder_inputs(model, batch, keep: torch.Tensor | None = None, positions: str = "original") -> dict:
    """The decoder's inputs (``inputs_embeds``, ``attention_mask``, ``position_ids``) of ``batch``
    keeping the image tokens in ``keep`` (default: all)."""
    features = _features(model, batch)
    if keep is None:
        keep = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    return feature_inputs(model, batch, features, keep, positions)


def next_positions(model, batch, inputs: dict) -> torch.Tensor:
    """Position ids of a token appended to each row of ``batch`` (the full prompt), given its
    ``"original"``-mode decoder inputs ``inputs`` (``decoder_inputs(model, batch, keep)``); the same
    ids whatever ``keep`` dropped. 1-D ids: ``(B, 1)``, the row's token count. M-RoPE ``(3, B, 1)``:
    one past the row's largest id, read from ``inputs``: text after an image continues from the
    image's largest id, so a prompt ending in text (Qwen2-VL's ``<|vision_end|>`` follows every
    image) holds its largest id in its last token, which is never dropped (checked)."""
    if model.config.model_type not in MROPE:
        return batch["attention_mask"].sum(1, keepdim=True)
    if bool((batch["input_ids"][:, -1] == model.config.image_token_id).any()):
        raise ValueError("batch: an M-RoPE prompt must end in a text token, got an image placeholder last")
    return inputs["position_ids"].amax(-1, keepdim=True) + 1


def last_logits(model, batch, keep: torch.Tensor | None = None, positions: str = "original",
                num_last: int = 1) -> torch.Tensor:
    """Logits ``(B, num_last, V)`` of the last ``num_last`` positions of ``batch`` (a processor
    output: ``input_ids``, ``attention_mask``, ``pixel_values``, and Qwen2-VL's
    ``image_grid_thw`` / ``mm_token_type_ids``; left-padded) with only the image tokens in ``keep``
    (default: all). Text tokens are never dropped, so a text token's offset from the end is the
    same with and without the drop."""
    return model(**decoder_inputs(model, batch, keep, positions), logits_to_keep=num_last).logits


def answer_logits(model, batch, keep: torch.Tensor | None = None, positions: str = "original") -> torch.Tensor:
    """Last-position logits ``(B, V)``: ``last_logits(...)[:, -1]``."""
    return last_logits(model, batch, keep, positions, 1)[:, -1]


@torch.no_grad()
def greedy(model, batch, keep: torch.Tensor, positions: str, steps: int) -> torch.Tensor:
    """``(B, steps)`` greedy new token ids of ``batch`` with only the image tokens in ``keep``:
    each step re-runs the whole (short) sequence without a cache, the new token at the next
    position id of its row (every M-RoPE row alike)."""
    inputs = decoder_inputs(model, batch, keep, positions)
    embeds, mask, pos = inputs["inputs_embeds"], inputs["attention_mask"], inputs["position_ids"]
    new = []
    for _ in range(steps):
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1)
        new.append(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    return torch.stack(new, dim=1)
