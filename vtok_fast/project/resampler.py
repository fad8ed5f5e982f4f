"""``PerceiverResampler``: query-based compression of visual tokens (Flamingo / Idefics2).

A fixed set of ``n_latents`` learned queries cross-attends to ``[context; latents]`` in each of
``depth`` layers (pre-RMS-norm attention with grouped key/value heads, then a SwiGLU MLP, both
residual), and a final RMS norm. Whatever the number of input tokens, the output has
``n_latents`` tokens per image: **the number of queries is the token budget**.

The module has the structure, attribute names and ``state_dict`` keys of transformers'
``Idefics2PerceiverResampler`` (``latents``, ``layers.{i}.input_latents_norm``,
``input_context_norm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``, ``norm``), so ``load_state_dict(hf.state_dict(), strict=True)``
works and the outputs are equal. Attention runs through ``F.scaled_dot_product_attention``
(FlashAttention / memory-efficient kernels on GPUs, ``enable_gqa`` instead of repeating the
key/value heads). ``attention_mask`` ``(B, L)`` (1 = token, 0 = padding) masks padded context
tokens; the latents are never masked, so no softmax row is empty. (The project's own attention
kernel adds a per-key bias for ToMe; SDPA's boolean mask already covers padding, so it is not
used here.)

Counting it in a token budget: a resampler emits ``n_latents`` tokens per image (Idefics2: 64;
Flamingo: 64) independent of the input resolution, and costs about
``depth * (4 * n_latents * (L + n_latents) * heads * head_dim + projections)`` FLOP.

How a BLIP-2 Q-Former differs:

- it is a BERT-base (12 post-LayerNorm layers, GELU MLPs) run on 32 learned query tokens of
  width 768; the queries self-attend among themselves (and with text tokens during
  pre-training) in every layer, and a **cross-attention to the frozen image features is inserted
  every other layer** (``cross_attention_frequency=2``): keys and values there are the image
  tokens only, not ``[image; queries]`` as in the perceiver;
- the query tokens have their own feed-forward weights (``intermediate_query``), separate from the
  text path;
- a final Linear maps the 768-wide queries to the LLM's width (``language_projection``).
Budget: 32 tokens per image (``num_query_tokens``), again independent of resolution; cost per
image: 12 self-attention layers over 32 queries plus 6 cross-attention layers of 32 queries over
the ``L`` image tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast.project.modules import RMSNorm, activation_module, hf_activation


class PerceiverAttention(nn.Module):
    """Latents attend to ``[context; latents]`` (``Idefics2PerceiverAttention``'s projections)."""

    def __init__(self, hidden_size: int, n_heads: int, head_dim: int, num_key_value_heads: int,
                 attention_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if n_heads % num_key_value_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of num_key_value_heads "
                             f"({num_key_value_heads})")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.num_key_value_heads = n_heads, head_dim, num_key_value_heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=False, **dd)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=False, **dd)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=False, **dd)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=False, **dd)

    def forward(self, latents, context, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, n, _ = latents.shape
        kv = torch.cat([context, latents], dim=-2)
        q = self.q_proj(latents).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv).view(B, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(B, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=self.num_heads != self.num_key_value_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (``Idefics2MLP``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **dd)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **dd)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **dd)
        self.act_fn = activation_module(hf_activation(hidden_act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerceiverLayer(nn.Module):
    def __init__(self, hidden_size, n_heads, head_dim, num_key_value_heads, rms_norm_eps,
                 hidden_act, attention_dropout, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.input_latents_norm = RMSNorm(hidden_size, eps=rms_norm_eps, **dd)
        self.input_context_norm = RMSNorm(hidden_size, eps=rms_norm_eps, **dd)
        self.self_attn = PerceiverAttention(hidden_size, n_heads, head_dim, num_key_value_heads,
                                            attention_dropout, **dd)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps, **dd)
        self.mlp = SwiGLU(hidden_size, 4 * hidden_size, hidden_act, **dd)

    def forward(self, latents, context, key_mask):
        latents = latents + self.self_attn(self.input_latents_norm(latents),
                                           self.input_context_norm(context), key_mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """Idefics2's perceiver resampler (see the module docstring).

    Build it from an ``Idefics2PerceiverConfig`` (``PerceiverResampler(config)``, like the
    original) or from keywords with the config's names: ``hidden_size``, ``resampler_n_latents``,
    ``resampler_depth``, ``resampler_n_heads``, ``resampler_head_dim``, ``num_key_value_heads``,
    ``rms_norm_eps``, ``hidden_act``, ``attention_dropout``.

    ``forward(context, attention_mask=None)``: ``context`` ``(B, L, hidden_size)``,
    ``attention_mask`` ``(B, L)`` with 1 for tokens and 0 for padding (None: no padding).
    Returns ``(B, resampler_n_latents, hidden_size)``.
    """

    def __init__(self, config=None, *, hidden_size: Optional[int] = None, resampler_n_latents: int = 64,
                 resampler_depth: int = 3, resampler_n_heads: int = 16, resampler_head_dim: int = 96,
                 num_key_value_heads: int = 4, rms_norm_eps: float = 1e-6, hidden_act: str = "silu",
                 attention_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if config is not None:
            hidden_size, resampler_n_latents = config.hidden_size, config.resampler_n_latents
            resampler_depth, resampler_n_heads = config.resampler_depth, config.resampler_n_heads
            resampler_head_dim, num_key_value_heads = config.resampler_head_dim, config.num_key_value_heads
            rms_norm_eps, hidden_act = config.rms_norm_eps, config.hidden_act
            attention_dropout = config.attention_dropout
        if hidden_size is None:
            raise ValueError("PerceiverResampler needs a config or hidden_size")
        dd = {"device": device, "dtype": dtype}
        self.hidden_size, self.n_latents, self.depth = hidden_size, resampler_n_latents, resampler_depth
        self.latents = nn.Parameter(torch.ones(resampler_n_latents, hidden_size, **dd))
        self.layers = nn.ModuleList([
            PerceiverLayer(hidden_size, resampler_n_heads, resampler_head_dim, num_key_value_heads,
                           rms_norm_eps, hidden_act, attention_dropout, **dd)
            for _ in range(resampler_depth)])
        self.norm = RMSNorm(hidden_size, eps=rms_norm_eps, **dd)

    def forward(self, context: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if context.dim() != 3 or context.shape[-1] != self.hidden_size:
            raise ValueError(f"context must be (B, L, hidden_size={self.hidden_size}), got shape "
                             f"{tuple(context.shape)}")
        B, L, _ = context.shape
        key_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(f"attention_mask must be (B, L) = {(B, L)}, got shape "
                                 f"{tuple(attention_mask.shape)}")
            keep = torch.cat([attention_mask.bool(),
                              attention_mask.new_ones(B, self.n_latents, dtype=torch.bool)], dim=-1)
            key_mask = keep[:, None, None, :]  # (B, 1, 1, L + n): True = attend
        latents = self.latents.unsqueeze(0).expand(B, -1, -1)
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)
