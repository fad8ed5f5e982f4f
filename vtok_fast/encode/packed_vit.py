"""Running a timm ViT on adaptive (variable-length) token sequences: ``PackedViT(model)``.

``PackedViT(model).tokenize(images, thresholds=...)`` embeds images with the model's own patch
embedding, position table and prefix tokens through ``adaptive_tokenize``; ``forward(packed)``
runs the model's blocks on the packed ``(total, D)`` rows and returns the head's output
``(B, num_classes)`` (``forward_features``: the packed features after the final norm).

Everything but attention is per token (norms, MLP, projections: one matmul over all rows, no
padding). Attention must stay inside each image: ``packed_attention`` computes the
block-diagonal attention that ``cu_seqlens`` describes, choosing the fastest exact way for the
tensors at hand:

- ``"varlen"`` (CUDA, fp16/bf16, PyTorch with ``torch.nn.attention.varlen``): FlashAttention's
  variable-length kernel reads ``cu_seqlens`` directly: one launch, no padding, no mask.
- ``"loop"`` (CPU): one ``scaled_dot_product_attention`` per image on its own rows. No padded
  FLOPs and no mask, so SDPA keeps its fast unmasked kernel. Measured on the 2-core CPU for 8
  images of 60-197 tokens, 12 heads of 64: loop 170 ms, padded + key mask 181 ms, one
  block-diagonal mask over the packed sequence 207 ms, nested (jagged) tensors 1160 ms.
- ``"padded"`` (CUDA otherwise, e.g. fp32): the rows scattered into ``(B, max_len)`` with a key
  mask, one memory-efficient SDPA launch (a loop would launch B kernels per layer).

For an image whose tokens are all base patches the result equals the unpatched model's (up to
float rounding). Pooling: ``"token"`` takes each sequence's first token; ``"avg"`` / ``"max"``
/ ``"avgmax"`` reduce over each sequence's patch tokens (prefix included when the model's
``pool_include_prefix`` says so), every token weighing the same whatever its size. In training
mode dropout acts per token as usual; stochastic depth (``DropPath``), which drops whole
samples, is refused.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast._checks import check_int
from vtok_fast.encode.adaptive import DEFAULT_RELEVANCE_WEIGHT, _check_images, adaptive_tokenize
from vtok_fast.encode.packed import PackedTokens

IMPLS = ("varlen", "loop", "padded")


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def attention_impl(q: torch.Tensor, dropout_p: float = 0.0) -> str:
    """The implementation ``packed_attention`` uses for ``q`` (see the module docstring)."""
    if q.device.type != "cuda":
        return "loop"
    if q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0 and _varlen_attn() is not None:
        return "varlen"
    return "padded"


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, bounds: Optional[Sequence[int]] = None,
                     scale: Optional[float] = None, dropout_p: float = 0.0,
                     impl: Optional[str] = None) -> torch.Tensor:
    """Block-diagonal attention over packed sequences: ``q``, ``k``, ``v`` ``(total, H, hd)``,
    sequence ``b`` on rows ``cu_seqlens[b]:cu_seqlens[b + 1]``; returns ``(total, H, hd)``.

    ``bounds``: ``cu_seqlens`` as a Python list (pass it to save a device sync per call);
    ``impl``: ``"varlen"``, ``"loop"`` or ``"padded"`` (default: :func:`attention_impl`)."""
    impl = attention_impl(q, dropout_p) if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "varlen":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return _varlen_attn()(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)
    bounds = cu_seqlens.tolist() if bounds is None else list(bounds)
    if impl == "loop":
        outs = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1), dropout_p=dropout_p,
                                               scale=scale).transpose(0, 1)
                for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs) if outs else q.new_empty(q.shape)
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=q.device)
    batch, total = len(lengths), q.shape[0]
    image = torch.arange(batch, device=q.device).repeat_interleave(lengths, output_size=total)
    position = torch.arange(total, device=q.device) - torch.tensor(bounds[:-1], device=q.device)[image]

    def pad(t):
        out = t.new_zeros(batch, max_seqlen, *t.shape[1:])
        return out.index_put((image, position), t).transpose(1, 2)  # (B, H, L, hd)

    keys = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keys[:, None, None, :],
                                         dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)[image, position]


def _check_model(model: nn.Module) -> None:
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"model.blocks[{i}] must be timm's Block with its Attention (pre-norm ViT), "
                            f"got {type(blk).__name__} / {type(getattr(blk, 'attn', None)).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("models with an attention-pooling head (global_pool='map') are not supported")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        raise TypeError("model.patch_embed has a norm layer: its tokens cannot come from adaptive_tokenize")


class PackedViT(nn.Module):
    """A timm ``VisionTransformer`` (parameters shared, not copied) run on :class:`PackedTokens`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _check_model(model)
        self.model = model

    # --- tokens ----------------------------------------------------------------------------

    def _pos_table(self, grid: tuple[int, int]) -> Optional[torch.Tensor]:
        m = self.model
        if m.pos_embed is None:
            return None
        prefix_rows = 0 if m.no_embed_class else m.num_prefix_tokens
        table = m.pos_embed
        if tuple(m.patch_embed.grid_size) != tuple(grid):
            from timm.layers import resample_abs_pos_embed

            table = resample_abs_pos_embed(table, new_size=list(grid), old_size=m.patch_embed.grid_size,
                                           num_prefix_tokens=prefix_rows)
        return table[0]

    def tokenize(self, images: torch.Tensor, *, thresholds, num_scales: int = 2, mean=None, std=None,
                 relevance: Optional[torch.Tensor] = None,
                 relevance_weight: float = DEFAULT_RELEVANCE_WEIGHT) -> PackedTokens:
        """``adaptive_tokenize`` with the model's patch embedding, table and prefix tokens.

        ``images`` are raw pixels (uint8, or floats in [0, 1]); ``mean``/``std`` default to the
        model's ``pretrained_cfg`` ones (pass ``mean=0, std=1`` for none). A table for another
        grid is resampled as timm does for dynamic image sizes. Images smaller than the largest
        patch (``p * 2**(num_scales - 1)`` pixels a side) raise a ``ValueError``."""
        m = self.model
        cfg = getattr(m, "pretrained_cfg", None) or {}
        mean = cfg.get("mean") if mean is None else mean
        std = cfg.get("std") if std is None else std
        proj = m.patch_embed.proj
        p = proj.weight.shape[-1]
        _check_images(images, p, check_int("num_scales", num_scales, 1))  # before the table's resampling
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        prefix = [t for t in (m.cls_token, m.reg_token) if t is not None]
        prefix = torch.cat(prefix, dim=1) if prefix else None
        return adaptive_tokenize(images, proj.weight, proj.bias, self._pos_table(grid), patch_size=p,
                                 num_scales=num_scales, thresholds=thresholds, mean=mean, std=std,
                                 relevance=relevance, relevance_weight=relevance_weight, prefix=prefix)

    # --- blocks ----------------------------------------------------------------------------

    def _attention(self, attn: nn.Module, x: torch.Tensor, packed: PackedTokens, bounds: list[int],
                   max_seqlen: int) -> torch.Tensor:
        total = x.shape[0]
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(total, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.unbind(1)
        # timm's q/k norms act on the head dim, (B, H, N, hd) there, (total, H, hd) here
        q, k = attn.q_norm(q), attn.k_norm(k)
        dropout = attn.attn_drop.p if self.training else 0.0
        o = packed_attention(q, k, v, packed.cu_seqlens, max_seqlen, bounds=bounds, scale=attn.scale,
                             dropout_p=dropout)
        o = o.reshape(total, attn.num_heads * attn.head_dim)
        o = getattr(attn, "norm", nn.Identity())(o)
        if gate is not None:
            o = o * gate
        return attn.proj_drop(attn.proj(o))

    def _check_packed(self, name: str, packed) -> None:
        if not isinstance(packed, PackedTokens):
            raise TypeError(f"{name} must be a PackedTokens, got {type(packed).__name__}")
        width = self.model.embed_dim
        if packed.tokens.shape[1] != width:
            raise ValueError(f"{name}.tokens must have width embed_dim = {width} (the model's), got "
                             f"shape {tuple(packed.tokens.shape)}")

    def forward_features(self, packed: PackedTokens) -> PackedTokens:
        """The model's ``forward_features`` on packed tokens: ``(total, D)`` after the final norm,
        in the same layout."""
        from timm.layers import DropPath

        m = self.model
        self._check_packed("packed", packed)
        if self.training and any(isinstance(mod, DropPath) and mod.drop_prob > 0 for mod in m.modules()):
            raise RuntimeError("stochastic depth (DropPath) drops whole samples and cannot run on packed "
                               "tokens; set drop_path_rate=0 or call .eval()")
        if self.training and not isinstance(m.patch_drop, nn.Identity):
            raise RuntimeError("patch dropout cannot run on packed tokens; call .eval()")
        bounds = packed.cu_seqlens.tolist()
        max_seqlen = max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0)
        x = m.norm_pre(packed.tokens)
        for blk in m.blocks:
            x = x + blk.drop_path1(blk.ls1(self._attention(blk.attn, blk.norm1(x), packed, bounds,
                                                           max_seqlen)))
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return packed.with_tokens(m.norm(x))

    def pool(self, features: PackedTokens) -> torch.Tensor:
        """The model's global pool per sequence, ``(B, D)``."""
        m = self.model
        self._check_packed("features", features)
        x = features.tokens
        starts = features.cu_seqlens.long()[:-1]
        if m.global_pool == "token":
            return x[starts]
        if not m.global_pool:
            raise ValueError("the model has no global pool (global_pool=''): use forward_features")
        image, rows = features.seq_index(), x
        if not getattr(m, "pool_include_prefix", False):  # patch tokens only
            keep = features.scale >= 0
            image, rows = image[keep], x[keep]
        shape = (features.batch_size, x.shape[1])
        index = image[:, None].expand_as(rows)
        pooled = {}
        if m.global_pool in ("avg", "avgmax"):
            pooled["avg"] = rows.new_zeros(shape).scatter_reduce(0, index, rows, "mean", include_self=False)
        if m.global_pool in ("max", "avgmax"):
            pooled["max"] = rows.new_zeros(shape).scatter_reduce(0, index, rows, "amax", include_self=False)
        if not pooled:
            raise ValueError(f"global_pool={m.global_pool!r} is not supported on packed tokens")
        return 0.5 * (pooled["avg"] + pooled["max"]) if len(pooled) == 2 else next(iter(pooled.values()))

    def forward_head(self, features: PackedTokens, pre_logits: bool = False) -> torch.Tensor:
        m = self.model
        x = m.head_drop(m.fc_norm(self.pool(features)))
        return x if pre_logits else m.head(x)

    def forward(self, packed: PackedTokens) -> torch.Tensor:
        """``(B, num_classes)``: the model's output for each packed image."""
        return self.forward_head(self.forward_features(packed))
