"""What the patchers of a Hugging Face LLaVA model share (vision compression, FastV, ToMe inside
LLaVA): finding its ``LlavaModel``, reading a ``compress=`` spec, where the image tokens of a
prompt are, and the prompt check that names ``image_token_count`` / ``configure_processor``.

transformers is imported only when a function runs.
"""
from __future__ import annotations

import functools
import numbers

import torch
import torch.nn as nn

from vtok_fast.patch._common import Api

SUPPORTED = "LlavaForConditionalGeneration or LlavaModel (LLaVA-1.5)"


def parse_spec(compress) -> tuple[str, dict]:
    """``compress`` as ``(method, budget)``: a method name, or a ``(name, dict)`` pair."""
    if isinstance(compress, str):
        return compress, {}
    if (isinstance(compress, (tuple, list)) and len(compress) == 2 and isinstance(compress[0], str)
            and isinstance(compress[1], dict)):
        return compress[0], dict(compress[1])
    raise TypeError(f"compress must be a method name or a (name, budget dict) pair such as ('pool', {{'stride': 2}}) "
                    f"or ('fastv', {{'layer': 2, 'ratio': 0.5}}), got {compress!r}")


def find_llava(model) -> nn.Module:
    """The one ``LlavaModel`` of ``model`` (itself or ``LlavaForConditionalGeneration.model``);
    any other model raises a ValueError naming the supported classes."""
    from transformers.models.llava.modeling_llava import LlavaModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module ({SUPPORTED}), got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, LlavaModel)]
    if len(found) != 1:
        holds = "holds no LlavaModel" if not found else f"holds {len(found)} LlavaModels"
        raise ValueError(f"model must be a {SUPPORTED}, the models compress= and image_token_count support; got "
                         f"{type(model).__name__}, which {holds}")
    return found[0]


def pair(size, name: str) -> tuple[int, int]:
    """``size`` (an int or a pair of ints, positive) as ``(height, width)``."""
    pair_ = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if len(pair_) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                                  for s in pair_):
        raise ValueError(f"{name} must be a positive int or an (height, width) pair, got {size!r}")
    return int(pair_[0]), int(pair_[1])


def token_mask(model: nn.Module, token: int, input_ids, inputs_embeds) -> torch.Tensor | None:
    """``(B, L)`` bool: where ``token`` is in a prompt, from ``input_ids`` or, without them, by
    comparing ``inputs_embeds`` with the token's embedding (as transformers' placeholder masks
    do); None without either input."""
    if input_ids is not None:
        return input_ids == token
    if inputs_embeds is None:  # the model's forward raises its own error
        return None
    embedding = model.get_input_embeddings()(torch.tensor(token, device=inputs_embeds.device))
    return (inputs_embeds == embedding).all(dim=-1)


def image_token_mask(llava: nn.Module, input_ids, inputs_embeds) -> torch.Tensor | None:
    """``(B, L)`` bool: where the image tokens are (as ``LlavaModel.get_placeholder_mask``); None
    without either input."""
    return token_mask(llava, llava.config.image_token_id, input_ids, inputs_embeds)


def placeholder_apis() -> list[Api]:
    """The call convention :func:`prompt_check` replaces (transformers' ``get_placeholder_mask``)."""
    from transformers.models.llava.modeling_llava import LlavaModel

    return [Api(LlavaModel, "get_placeholder_mask", ("input_ids", "inputs_embeds", "image_features"), True)]


def prompt_check(llava: nn.Module) -> tuple[nn.Module, str, object]:
    """The replacement of ``llava.get_placeholder_mask`` for a patch that changes the number of
    image features: a prompt whose ``<image>`` count differs raises a ValueError naming
    ``image_token_count`` / ``configure_processor`` before transformers' own check."""
    return llava, "get_placeholder_mask", functools.partial(_checked_placeholder_mask, llava)


def _checked_placeholder_mask(llava: nn.Module, input_ids, inputs_embeds=None, image_features=None):
    if not torch.compiler.is_compiling():  # a compiled graph keeps transformers' own check
        tokens = int(image_token_mask(llava, input_ids, inputs_embeds).sum())
        features = image_features.shape[0]
        if tokens != features:
            raise ValueError(
                f"the prompt holds {tokens} <image> tokens, but its images give {features} image features under "
                "vtok_fast's patch: put vtok_fast.patch.image_token_count(model) <image> tokens per image in the "
                "prompt (vtok_fast.patch.configure_processor(processor, model) makes a LlavaProcessor do it)")
    return type(llava).get_placeholder_mask(llava, input_ids, inputs_embeds=inputs_embeds,
                                            image_features=image_features)
