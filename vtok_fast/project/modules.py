"""Drop-in mergers and projectors into the LLM's space, running :func:`merge_project`.

Each module has the constructor arguments, attributes and ``state_dict`` keys of the module it
replaces (``load_state_dict(original.state_dict())`` works with ``strict=True``) and returns what
the original returns:

============================  ===================================================================
``PatchMerger``               Qwen2-VL's vision ``PatchMerger`` (``ln_q`` LayerNorm, ``mlp``);
                              ``norm_type="rmsnorm"``: Qwen2.5-VL's ``Qwen2_5_VLPatchMerger``
``PixelShuffleProjector``     InternVL's ``pixel_shuffle`` + ``InternVLMultiModalProjector``
``SwinPatchMerging``          timm's Swin ``PatchMerging`` (odd sides zero-padded, as timm does)
``MLPProjector``              LLaVA's ``LlavaMultiModalProjector`` (linear, activation, linear)
``OpticalCompressor``         DeepSeek-OCR's 16x compressor (``DeepseekOcr2SamVisionProj``)
============================  ===================================================================

The config-built originals (InternVL, LLaVA, DeepSeek-OCR) are built here from the same config
object, or from keyword dimensions for a VLM of your own. The merge, the norm, the first Linear
and its activation run as one fused op; a second Linear runs through :func:`unfused_linear`
(``nn.Linear`` on CUDA; on the CPU the faster of torch's and oneDNN's GEMM). The submodules
(``ln_q``, ``layer_norm``, ``act``, ...) hold the parameters and keep working when called alone.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtok_fast._backend import use_triton
from vtok_fast._checks import check_positive_real, square_side
from vtok_fast.project.merge_project import merge_project

# Hugging Face activation names (``config.projector_hidden_act``) -> merge_project's activation
HF_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu", "swish": "silu",
    "relu": "relu",
    "linear": None,
}


def activation_module(name: Optional[str]) -> nn.Module:
    """The ``nn`` module computing merge_project's ``activation`` ``name``."""
    return {None: nn.Identity(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
            "silu": nn.SiLU(), "relu": nn.ReLU()}[name]


def hf_activation(name: str) -> Optional[str]:
    """merge_project's activation for a Hugging Face ``hidden_act`` string (ValueError if none)."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"projector_hidden_act must be one of {sorted(HF_ACTIVATIONS)} (the activations "
                         f"the fused epilogue computes), got {name!r}")
    return HF_ACTIVATIONS[name]


def activation_of(module: nn.Module) -> tuple[bool, Optional[str]]:
    """``(fusable, activation)`` for an activation module instance (torch or Hugging Face);
    ``(False, None)`` for one the epilogue does not compute."""
    kind = type(module)
    if kind is nn.Identity:
        return True, None
    if kind is nn.GELU:
        return True, "gelu" if module.approximate == "none" else "gelu_tanh"
    if kind in (nn.SiLU, nn.ReLU) and not getattr(module, "inplace", False):
        return True, "silu" if kind is nn.SiLU else "relu"
    if kind.__module__ == "transformers.activations":
        name = {"GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                "FastGELUActivation": "gelu_tanh", "SiLUActivation": "silu"}.get(kind.__name__)
        if name is not None:
            return True, name
    return False, None


class RMSNorm(nn.Module):
    """The RMS norm of Qwen2.5-VL / Idefics2 (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``,
    computed in fp32), with their ``weight`` and ``variance_epsilon`` attributes."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# Hugging Face RMS norms computing exactly ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``
# (not Gemma's ``1 + weight``)
HF_RMS_NORMS = ("Qwen2_5_VLRMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm", "Idefics2RMSNorm", "Mistral3RMSNorm",
                "Glm4vRMSNorm")


def norm_args(norm: nn.Module) -> Optional[dict]:
    """merge_project's norm keywords for a norm module: ``nn.LayerNorm`` over the last dim, or
    :class:`RMSNorm` / one of ``HF_RMS_NORMS``; None for anything else."""
    if type(norm).forward is nn.LayerNorm.forward and len(norm.normalized_shape) == 1:
        return {"norm_type": "layernorm", "norm_weight": norm.weight, "norm_bias": norm.bias,
                "eps": float(norm.eps)}
    kind = type(norm)
    if kind is RMSNorm or (kind.__module__.startswith("transformers.") and kind.__name__ in HF_RMS_NORMS):
        return {"norm_type": "rmsnorm", "norm_weight": norm.weight, "norm_bias": None,
                "eps": float(norm.variance_epsilon)}
    return None


def _config_value(config, *names):
    for name in names:
        config = getattr(config, name)
    return config


class PatchMerger(nn.Module):
    """Qwen2-VL's vision ``PatchMerger``: ``mlp(ln_q(x).view(-1, 4C))`` with ``mlp`` =
    Linear(4C, 4C), GELU, Linear(4C, dim). ``norm_type="rmsnorm"`` gives Qwen2.5-VL's
    ``Qwen2_5_VLPatchMerger`` (``ln_q`` an RMS norm), which differs from it only there.

    ``forward(x)``: ``x`` ``(N, C)`` (or ``(..., C)``) vision tokens in the processor's order, in
    which every ``spatial_merge_size**2`` consecutive tokens form one window; returns
    ``(N / spatial_merge_size**2, dim)``.
    """

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2,
                 norm_type: str = "layernorm", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if norm_type not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm_type must be 'layernorm' or 'rmsnorm', got {norm_type!r}")
        self.spatial_merge_size = spatial_merge_size
        self.hidden_size = context_dim * spatial_merge_size ** 2
        norm = nn.LayerNorm if norm_type == "layernorm" else RMSNorm
        self.ln_q = norm(context_dim, eps=1e-6, **dd)
        self.mlp = nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size, **dd), nn.GELU(),
                                 nn.Linear(self.hidden_size, dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second = self.mlp
        y = merge_project(x.reshape(-1, x.shape[-1]), None, window=self.spatial_merge_size,
                          order="contiguous", norm="pre_concat", **norm_args(self.ln_q),
                          weight=first.weight, bias=first.bias, activation="gelu")
        return unfused_linear(y, second)


class PixelShuffleProjector(nn.Module):
    """InternVL's ``pixel_shuffle`` + ``InternVLMultiModalProjector`` (LayerNorm over the
    shuffled ``C / downsample_ratio**2`` channels, linear_1, activation, linear_2) in one module.

    Build it from an ``InternVLConfig`` (``PixelShuffleProjector(config)``, like the original)
    or from dimensions (``vision_hidden_size``, ``text_hidden_size``, ``downsample_ratio``,
    ``projector_hidden_act``). ``state_dict`` keys: ``layer_norm``, ``linear_1``, ``linear_2``.

    ``forward(vision_features, grid=None, prefix=0)``: the vision tower's tokens *before* the
    shuffle, ``(B, prefix + h*w, C)`` row-major (``prefix=1`` drops CLS, InternVL's ``"default"``
    feature strategy) or ``(B, h, w, C)``; ``grid`` defaults to a square. Returns
    ``(B, h*w * downsample_ratio**2, text_hidden_size)``, equal to
    ``projector(pixel_shuffle(x).reshape(B, -1, C / ratio**2))``.
    """

    def __init__(self, config=None, *, vision_hidden_size: Optional[int] = None,
                 text_hidden_size: Optional[int] = None, downsample_ratio: float = 0.5,
                 projector_hidden_act: str = "gelu", device=None, dtype=None):
        super().__init__()
        if config is not None:
            vision_hidden_size = _config_value(config, "vision_config", "hidden_size")
            text_hidden_size = _config_value(config, "text_config", "hidden_size")
            downsample_ratio = config.downsample_ratio
            projector_hidden_act = config.projector_hidden_act
        if vision_hidden_size is None or text_hidden_size is None:
            raise ValueError("PixelShuffleProjector needs a config or vision_hidden_size and text_hidden_size")
        ratio = check_positive_real("downsample_ratio", downsample_ratio)
        window = int(min(1 / ratio, 2 ** 31))  # InternVL's rounding; a tiny ratio fails below, no overflow
        if window < 1 or abs(window * ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio must be 1/s for an integer s >= 1, got {downsample_ratio}")
        dd = {"device": device, "dtype": dtype}
        self.window = window
        self.activation = hf_activation(projector_hidden_act)
        width = vision_hidden_size * window ** 2
        self.layer_norm = nn.LayerNorm(width, **dd)
        self.linear_1 = nn.Linear(width, text_hidden_size, **dd)
        self.act = activation_module(self.activation)
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size, **dd)

    def forward(self, vision_features: torch.Tensor, grid=None, prefix: int = 0) -> torch.Tensor:
        x = vision_features
        if x.dim() == 4:
            if grid is None:
                grid = tuple(x.shape[1:3])
            x = x.flatten(1, 2)
        if grid is None:
            side = square_side(x.shape[1] - prefix, "vision_features after the prefix (or pass grid=(h, w))")
            grid = (side, side)
        y = merge_project(x, grid, window=self.window, order="row_major", norm="post_concat",
                          **norm_args(self.layer_norm), weight=self.linear_1.weight,
                          bias=self.linear_1.bias, activation=self.activation, prefix=prefix)
        return unfused_linear(y, self.linear_2)


class SwinPatchMerging(nn.Module):
    """timm's Swin ``PatchMerging``: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), out_dim)``,
    each 2x2 window concatenated as (0,0), (1,0), (0,1), (1,1), LayerNorm over 4C, Linear without
    bias. Odd sides are zero-padded at the bottom / right first, as timm does."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer=nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim, **dd)
        if norm_args(self.norm) is None:
            raise ValueError(f"norm_layer must build an nn.LayerNorm (or an RMS norm), got "
                             f"{type(self.norm).__name__}")
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swin_merge(x, self.norm, self.reduction)


def swin_merge(x: torch.Tensor, norm: nn.Module, reduction: nn.Linear) -> torch.Tensor:
    """The fused body of Swin's patch merging (shared with the timm patcher)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, W, C), got shape {tuple(x.shape)}")
    B, H, W, C = x.shape
    if H % 2 or W % 2:
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = H + H % 2, W + W % 2
    y = merge_project(x.reshape(B, H * W, C), (H, W), window=2, order="swin", norm="post_concat",
                      **norm_args(norm), weight=reduction.weight, bias=reduction.bias)
    return y.view(B, H // 2, W // 2, y.shape[-1])  # not -1: B, H or W may be 0


class MLPProjector(nn.Module):
    """LLaVA's ``LlavaMultiModalProjector``: linear_1, activation (fused into linear_1's
    epilogue), linear_2. Build it from a ``LlavaConfig`` (``MLPProjector(config)``, like the
    original: input width = vision hidden size times the number of feature layers) or from
    ``in_features``, ``out_features``, ``bias``, ``projector_hidden_act``.
    ``forward(image_features)``: ``(..., in_features)`` -> ``(..., out_features)``."""

    def __init__(self, config=None, *, in_features: Optional[int] = None,
                 out_features: Optional[int] = None, bias: bool = True,
                 projector_hidden_act: str = "gelu", device=None, dtype=None):
        super().__init__()
        if config is not None:
            layers = config.vision_feature_layer
            in_features = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
            out_features = config.text_config.hidden_size
            bias = config.multimodal_projector_bias
            projector_hidden_act = config.projector_hidden_act
        if in_features is None or out_features is None:
            raise ValueError("MLPProjector needs a config or in_features and out_features")
        dd = {"device": device, "dtype": dtype}
        self.activation = hf_activation(projector_hidden_act)
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias, **dd)
        self.act = activation_module(self.activation)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias, **dd)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return mlp_project(image_features, self.linear_1, self.activation, self.linear_2)


def mlp_project(x: torch.Tensor, first: nn.Linear, activation: Optional[str], second: nn.Linear):
    """``second(activation(first(x)))`` with the activation in ``first``'s epilogue."""
    y = merge_project(x.reshape(-1, x.shape[-1]), None, window=1, order="contiguous", norm=None,
                      weight=first.weight, bias=first.bias, activation=activation)
    return unfused_linear(y.view(*x.shape[:-1], y.shape[-1]), second)  # not -1: x may be empty


def unfused_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(x)`` for a projector's Linear that the fused op does not absorb (a second Linear,
    GLM-4V's ``proj`` before its LayerNorm). On the PyTorch path
    a plain ``nn.Linear`` (no subclass, no forward hooks) runs as :func:`merge_project` with a
    window of 1 and no norm, whose CPU GEMM is the faster of torch's and oneDNN's
    (``vtok_fast._cpu_gemm``); on the Triton path it stays ``nn.Linear`` (cuBLAS), since running
    it in the fused kernel is unmeasured on a GPU."""
    plain = type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks)
    if not plain or use_triton(x, linear.weight):
        return linear(x)
    y = merge_project(x.reshape(-1, x.shape[-1]), None, window=1, order="contiguous", norm=None,
                      weight=linear.weight, bias=linear.bias)
    return y.view(*x.shape[:-1], y.shape[-1])


class OpticalCompressor(nn.Module):
    """DeepSeek-OCR's 16x token compressor (``DeepseekOcr2SamVisionProj``): two Conv2d k3 s2 p1
    without bias, ``in_channels`` -> ``channels[0]`` -> ``channels[1]`` (DeepSeek-OCR:
    256 -> 512 -> 1024; DeepSeek-OCR 2's config default: 256 -> 512 -> 896). Each conv halves
    both sides, so ``(B, 256, H, W)`` -> ``(B, 1024, ceil(H/4), ceil(W/4))``: 16x fewer tokens.

    Build it from a ``DeepseekOcr2SamVisionConfig`` (``output_channels``, ``downsample_channels``)
    or from ``in_channels`` / ``channels``; ``state_dict`` keys ``conv1.weight``, ``conv2.weight``.
    ``forward(x)`` returns NCHW like the original; ``tokens(x)`` returns ``(B, H*W/16, C)``.

    Why PyTorch convolutions and no Triton kernel: unlike the mergers, a 3x3 stride-2 window
    overlaps its neighbours (each pixel is read by up to four windows), so there is no gather to
    fuse away; cuDNN / oneDNN already run the conv as an implicit GEMM without materializing the
    im2col matrix; and the op is compute-bound (9 * 256 * 512 MACs per output pixel of conv1
    against 2 KiB of fp16 input around it), so a custom implicit-GEMM kernel could at best match
    them. Fusing both convs would need a halo of recomputed conv1 outputs per tile.
    """

    def __init__(self, config=None, *, in_channels: int = 256, channels: Sequence[int] = (512, 1024),
                 device=None, dtype=None):
        super().__init__()
        if config is not None:
            in_channels = config.output_channels
            channels = config.downsample_channels
        if len(channels) != 2:
            raise ValueError(f"channels must hold two output widths (conv1, conv2), got {channels!r}")
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=2, padding=1, bias=False, **dd)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=3, stride=2, padding=1, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` feature map -> ``(B, ceil(H/4) * ceil(W/4), channels[1])`` tokens."""
        return self.forward(x).flatten(2).transpose(1, 2)
