"""Drop-in fused projectors of the remaining transformers VLM families (issue 21).

Each class has the constructor, attribute names and ``state_dict`` keys of the transformers
module it replaces (``load_state_dict(original.state_dict(), strict=True)`` works) and returns
what it returns. Each ``forward`` is a module-level function (``*_forward(self, ...)``) that reads
only those attributes, so ``vtok_fast.patch.hf_project`` binds the same function onto the
original module instance:

===============================  =================================================================
``Qwen25VLPatchMerger``          ``Qwen2_5_VLPatchMerger``: RMS ``ln_q`` per token, 2x2 concat,
                                 fc-GELU fused, then ``mlp[2]``
``Qwen3VLPatchMerger``           ``Qwen3VLVisionPatchMerger`` (``merger`` and every
                                 ``deepstack_merger_list`` entry): LayerNorm before
                                 (``use_postshuffle_norm=False``) or after the 2x2 concat
``Gemma3Projector``              ``Gemma3MultiModalProjector``: AvgPool2d + Gemma RMS norm
                                 (``1 + w``) + ``mm_input_projection_weight``: one op
``PixelShuffleConnector``        ``Idefics3Connector`` / ``SmolVLMConnector``: pixel shuffle +
                                 bias-free Linear: one op
``Llama4PixelShuffleMLP``        ``Llama4VisionPixelShuffleMLP``: shuffle + fc1 + GELU in one op,
                                 fc2 + GELU in a second
``Mistral3Projector``            ``Mistral3MultiModalProjector``: RMS norm + per-image 2x2 unfold +
                                 ``merging_layer`` in one op, linear_1 + act, linear_2
``Glm4vPatchMerger``             ``Glm4vVisionPatchMerger``: proj, LayerNorm, GELU, then
                                 gate/up + SiLU-GLU in one op, down_proj
``AyaProjector``                 ``AyaVisionMultiModalProjector`` (pixel shuffle + LayerNorm +
                                 linear_1 + SwiGLU in one op, linear_2) and, with
                                 ``layer_norm=False``, ``Cohere2VisionMultiModalProjector``
===============================  =================================================================

Not covered: ``Llama4MultiModalProjector`` is one bias-free Linear (nothing to fuse); Phi-4's
``Phi4MultimodalImageEmbedding`` pools inside ``get_img_features`` and projects after a
crop rearrangement with learned separator tokens, so the pool and the GEMM are not adjacent.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast._checks import square_side
from vtok_fast.project.merge_project import merge_project
from vtok_fast.project.modules import (PatchMerger, RMSNorm, activation_module, activation_of, hf_activation,
                                       mlp_project, norm_args, unfused_linear)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMS norm: ``(x * rsqrt(mean(x^2) + eps)) * (1 + weight)`` in fp32, cast back
    (``weight`` initialized to zeros; attributes ``weight`` and ``eps`` as in transformers)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def _int_window(ratio_or_factor: float, name: str, inverse: bool = False) -> int:
    """The integer merge side of a shuffle factor (``1 / ratio`` when ``inverse``)."""
    value = 1 / ratio_or_factor if inverse else ratio_or_factor
    window = round(value)
    if window < 1 or abs(window - value) > 1e-6:
        raise ValueError(f"{name} must give an integer window side, got {ratio_or_factor}")
    return window


# --- Qwen2.5-VL ---------------------------------------------------------------------------------

class Qwen25VLPatchMerger(PatchMerger):
    """Qwen2.5-VL's ``Qwen2_5_VLPatchMerger(dim, context_dim, spatial_merge_size=2)``:
    :class:`~vtok_fast.project.modules.PatchMerger` with the RMS ``ln_q``."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2, device=None, dtype=None):
        super().__init__(dim, context_dim, spatial_merge_size, norm_type="rmsnorm", device=device, dtype=dtype)


# --- Qwen3-VL -----------------------------------------------------------------------------------

def qwen3_merger_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``linear_fc2(GELU(linear_fc1(norm(...))))`` over each ``s**2`` consecutive tokens
    (``s**2 = hidden_size / C``); ``x`` ``(N, C)`` -> ``(N / s**2, out_hidden_size)``."""
    C = x.shape[-1]
    window = math.isqrt(self.hidden_size // C)
    if window * window * C != self.hidden_size:
        raise ValueError(f"x must have C channels with hidden_size = s**2 * C = {self.hidden_size}, got shape "
                         f"{tuple(x.shape)}")
    y = merge_project(x.reshape(-1, C), None, window=window, order="contiguous",
                      norm="post_concat" if self.use_postshuffle_norm else "pre_concat", **norm_args(self.norm),
                      weight=self.linear_fc1.weight, bias=self.linear_fc1.bias,
                      activation=activation_of(self.act_fn)[1])
    return unfused_linear(y, self.linear_fc2)


class Qwen3VLPatchMerger(nn.Module):
    """Qwen3-VL's ``Qwen3VLVisionPatchMerger(config, use_postshuffle_norm=False)`` (a
    ``Qwen3VLVisionConfig``: ``hidden_size``, ``spatial_merge_size``, ``out_hidden_size``). The
    default builds the final ``merger`` (LayerNorm over C before the shuffle); the deepstack
    mergers use ``use_postshuffle_norm=True`` (LayerNorm over the 4C shuffled features)."""

    def __init__(self, config, use_postshuffle_norm: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.spatial_merge_size = config.spatial_merge_size
        self.hidden_size = config.hidden_size * config.spatial_merge_size ** 2
        self.use_postshuffle_norm = use_postshuffle_norm
        self.norm = nn.LayerNorm(self.hidden_size if use_postshuffle_norm else config.hidden_size, eps=1e-6, **dd)
        self.linear_fc1 = nn.Linear(self.hidden_size, self.hidden_size, **dd)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.hidden_size, config.out_hidden_size, **dd)

    forward = qwen3_merger_forward


# --- Gemma 3 ------------------------------------------------------------------------------------

def gemma3_projector_forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:
    """``(B, patches_per_image**2, C)`` -> ``(B, tokens_per_side**2, D)`` in the input's dtype."""
    side = self.patches_per_image
    y = merge_project(vision_outputs, (side, side), window=self.kernel_size, order="row_major", merge="mean",
                      norm="post_concat", norm_type="gemma_rmsnorm", norm_weight=self.mm_soft_emb_norm.weight,
                      eps=float(self.mm_soft_emb_norm.eps), weight=self.mm_input_projection_weight.t())
    return y.type_as(vision_outputs)


class Gemma3Projector(nn.Module):
    """Gemma 3's ``Gemma3MultiModalProjector(config)`` (a ``Gemma3Config``): the SigLIP tokens'
    ``(patches/side)**2`` grid average-pooled to ``mm_tokens_per_image``, Gemma's RMS norm, then
    ``@ mm_input_projection_weight`` ``(C, D)``, all one op."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        vision = config.vision_config
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision.hidden_size,
                                                                   config.text_config.hidden_size, **dd))
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, eps=vision.layer_norm_eps, **dd)
        self.patches_per_image = int(vision.image_size // vision.patch_size)
        self.tokens_per_side = int(config.mm_tokens_per_image ** 0.5)
        self.kernel_size = self.patches_per_image // self.tokens_per_side
        if self.kernel_size < 1 or self.kernel_size * self.tokens_per_side != self.patches_per_image:
            raise ValueError(f"mm_tokens_per_image={config.mm_tokens_per_image} must pool the "
                             f"{self.patches_per_image}x{self.patches_per_image} patch grid exactly")
        self.avg_pool = nn.AvgPool2d(kernel_size=self.kernel_size, stride=self.kernel_size)

    forward = gemma3_projector_forward


# --- Idefics3 / SmolVLM -------------------------------------------------------------------------

def connector_forward(self, image_hidden_states: torch.Tensor) -> torch.Tensor:
    """Pixel shuffle (``scale_factor``, row-major windows) + ``modality_projection.proj``:
    ``(B, seq, C)`` with a square grid -> ``(B, seq / scale_factor**2, D)``."""
    side = square_side(image_hidden_states.shape[1], "image_hidden_states")
    return merge_project(image_hidden_states, (side, side), window=self.scale_factor, order="row_major",
                         norm=None, weight=self.modality_projection.proj.weight,
                         bias=self.modality_projection.proj.bias)


class _SimpleMLP(nn.Module):
    def __init__(self, in_features, out_features, **dd):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False, **dd)


class PixelShuffleConnector(nn.Module):
    """``Idefics3Connector`` / ``SmolVLMConnector`` (config: ``scale_factor``,
    ``vision_config.hidden_size``, ``text_config.hidden_size``); key ``modality_projection.proj``."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = _SimpleMLP(config.vision_config.hidden_size * config.scale_factor ** 2,
                                              config.text_config.hidden_size, device=device, dtype=dtype)

    forward = connector_forward


# --- Llama 4 ------------------------------------------------------------------------------------

def llama4_adapter_forward(self, encoded_patches: torch.Tensor) -> torch.Tensor:
    """Pixel shuffle (ratio 1/s) + fc1 + GELU in one op, dropout, fc2 + GELU in a second."""
    mlp = self.mlp
    side = square_side(encoded_patches.shape[1], "encoded_patches")
    window = _int_window(self.pixel_shuffle_ratio, "pixel_shuffle_ratio", inverse=True)
    act = activation_of(mlp.activation_fn)[1]
    y = merge_project(encoded_patches, (side, side), window=window, order="row_major", norm=None,
                      weight=mlp.fc1.weight, bias=mlp.fc1.bias, activation=act)
    y = F.dropout(y, p=mlp.dropout, training=mlp.training)
    B, R, H = y.shape
    out = merge_project(y.reshape(B * R, H), None, window=1, order="contiguous", norm=None,
                        weight=mlp.fc2.weight, bias=mlp.fc2.bias, activation=act)
    return out.view(B, R, out.shape[-1])


class _Llama4MLP2(nn.Module):
    def __init__(self, config, **dd):
        super().__init__()
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False, **dd)
        self.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False, **dd)
        self.activation_fn = nn.GELU()
        self.dropout = config.projector_dropout


class Llama4PixelShuffleMLP(nn.Module):
    """Llama 4's ``Llama4VisionPixelShuffleMLP(config)`` (a ``Llama4VisionConfig``): pixel
    shuffle by ``pixel_shuffle_ratio`` then ``mlp`` = fc1, GELU, fc2, GELU (no biases)."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        self.inner_dim = int(config.projector_input_dim // (self.pixel_shuffle_ratio ** 2))
        self.output_dim = config.projector_output_dim
        self.mlp = _Llama4MLP2(config, device=device, dtype=dtype)

    forward = llama4_adapter_forward


# --- Mistral 3 ----------------------------------------------------------------------------------

def mistral3_projector_forward(self, image_features: torch.Tensor, image_sizes) -> torch.Tensor:
    """``image_features`` ``(sum h_i*w_i, C)`` of the images ``image_sizes`` (pixels, ``(n, 2)``):
    RMS norm + per-image 2x2 unfold + ``merging_layer`` in one op per image size, then linear_1,
    act, linear_2 (act fused into linear_1's epilogue)."""
    merger = self.patch_merger
    s, p = merger.spatial_merge_size, merger.patch_size
    sizes = [(int(hw[0]) // p, int(hw[1]) // p) for hw in image_sizes]
    parts, start = [], 0
    for h, w in sizes:
        tokens = image_features[start:start + h * w]
        start += h * w
        if h % s or w % s:  # F.unfold drops the last row / column of windows
            tokens = tokens.view(h, w, -1)[: h - h % s, : w - w % s].reshape(-1, tokens.shape[-1])
            h, w = h - h % s, w - w % s
        parts.append(merge_project(tokens, (h, w), window=s, order="row_major", norm="pre_concat",
                                   **norm_args(self.norm), weight=merger.merging_layer.weight,
                                   bias=merger.merging_layer.bias, weight_layout="channel_major"))
    merged = torch.cat(parts, dim=0) if len(parts) != 1 else parts[0]
    return mlp_project(merged, self.linear_1, activation_of(self.act)[1], self.linear_2)


class _Mistral3PatchMerger(nn.Module):
    def __init__(self, config, **dd):
        super().__init__()
        hidden = config.vision_config.hidden_size
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_size = config.vision_config.patch_size
        self.merging_layer = nn.Linear(hidden * self.spatial_merge_size ** 2, hidden, bias=False, **dd)


class Mistral3Projector(nn.Module):
    """Mistral 3's ``Mistral3MultiModalProjector(config)`` (a ``Mistral3Config``): RMS ``norm``,
    ``patch_merger.merging_layer``, ``linear_1``, ``act``, ``linear_2``.
    ``forward(image_features, image_sizes)`` like the original."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden, text = config.vision_config.hidden_size, config.text_config.hidden_size
        layers = config.vision_feature_layer
        self.norm = RMSNorm(hidden, eps=config.text_config.rms_norm_eps, **dd)
        self.patch_merger = _Mistral3PatchMerger(config, **dd)
        self.num_feature_layers = 1 if isinstance(layers, int) else len(layers)
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(hidden * self.num_feature_layers, text, bias=bias, **dd)
        self.act = activation_module(hf_activation(config.projector_hidden_act))
        self.linear_2 = nn.Linear(text, text, bias=bias, **dd)

    forward = mistral3_projector_forward


# --- GLM-4V -------------------------------------------------------------------------------------

def glm4v_merger_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    """proj, LayerNorm, GELU (PyTorch), then ``act_fn(gate_proj(h)) * up_proj(h)`` as one GLU
    GEMM (both projections share the operand load), then down_proj."""
    h = self.act1(self.post_projection_norm(unfused_linear(hidden_state, self.proj)))
    flat = h.reshape(-1, h.shape[-1])
    y = merge_project(flat, None, window=1, order="contiguous", norm=None, weight=self.up_proj.weight,
                      bias=self.up_proj.bias, gate_weight=self.gate_proj.weight, gate_bias=self.gate_proj.bias,
                      activation=activation_of(self.act_fn)[1])
    return unfused_linear(y.view(*h.shape[:-1], y.shape[-1]), self.down_proj)


class Glm4vPatchMerger(nn.Module):
    """GLM-4V's ``Glm4vVisionPatchMerger(dim, context_dim, hidden_act, bias=False)``."""

    def __init__(self, dim: int, context_dim: int, hidden_act: str, bias: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Linear(dim, dim, bias=bias, **dd)
        self.post_projection_norm = nn.LayerNorm(dim, **dd)
        self.gate_proj = nn.Linear(dim, context_dim, bias=bias, **dd)
        self.up_proj = nn.Linear(dim, context_dim, bias=bias, **dd)
        self.down_proj = nn.Linear(context_dim, dim, bias=bias, **dd)
        self.act1 = nn.GELU()
        self.act_fn = activation_module(hf_activation(hidden_act))

    forward = glm4v_merger_forward


def glm4v_downsample(hidden_states: torch.Tensor, post_layernorm: nn.Module, downsample: nn.Conv2d) -> torch.Tensor:
    """The GLM-4V vision model's ``post_layernorm`` + ``view(-1, s, s, C)`` + stride-``s`` Conv2d
    as one op: ``(N, C)`` tokens (windows consecutive) -> ``(N / s**2, out_hidden_size)``."""
    s = downsample.kernel_size[0]
    return merge_project(hidden_states, None, window=s, order="contiguous", norm="pre_concat",
                         **norm_args(post_layernorm), weight=downsample.weight.flatten(1), bias=downsample.bias,
                         weight_layout="channel_major")


# --- Aya Vision / Cohere2 Vision ----------------------------------------------------------------

def aya_projector_forward(self, image_features: torch.Tensor) -> torch.Tensor:
    """``(B, S, C)`` square grid -> ``(B, side/f, side/f, D)``: pixel shuffle, LayerNorm (Aya),
    linear_1 with the SwiGLU ``act(gate) * x`` in its epilogue, linear_2."""
    side = square_side(image_features.shape[1], "image_features")
    f = self.downsample_factor
    layer_norm = getattr(self, "layernorm", None)
    norm = {"norm": None} if layer_norm is None else dict(norm="post_concat", **norm_args(layer_norm))
    # linear_1's weight whole (stacked_glu), so its gradient is one GEMM's, not two halves concatenated
    y = merge_project(image_features, (side, side), window=f, order="row_major", **norm,
                      weight=self.linear_1.weight, bias=self.linear_1.bias, stacked_glu="up_gate",
                      activation=activation_of(self.act)[1])
    y = unfused_linear(y, self.linear_2)
    return y.view(y.shape[0], side // f, side // f, y.shape[-1])


class AyaProjector(nn.Module):
    """``AyaVisionMultiModalProjector(config)`` (``layer_norm=True``) or
    ``Cohere2VisionMultiModalProjector(config)`` (``layer_norm=False``): pixel shuffle by
    ``downsample_factor``, (LayerNorm), linear_1 to ``alignment_intermediate_size``, SwiGLU over
    its two halves (``x, gate``), linear_2."""

    def __init__(self, config, layer_norm: bool = True, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.config = config
        self.downsample_factor = config.downsample_factor
        width = config.vision_config.hidden_size * config.downsample_factor ** 2
        inter = getattr(config, "alignment_intermediate_size", config.text_config.hidden_size)
        if layer_norm:
            self.alignment_intermediate_size = inter
            self.layernorm = nn.LayerNorm(width, eps=config.adapter_layer_norm_eps, **dd)
        else:
            self.intermediate_size = inter
        self.linear_1 = nn.Linear(width, inter, bias=True, **dd)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(inter // 2, config.text_config.hidden_size, bias=True, **dd)

    forward = aya_projector_forward
