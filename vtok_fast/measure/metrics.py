"""Quality metrics for visual tokens: one value per image, ``(B,)``.

Pure torch ops on the inputs' device (CPU, CUDA, ...), vectorized over the batch (no Python loop
over images or tokens) and differentiable. Integer images (uint8, ...) and fp16/bf16 are computed
in float32, float64 in float64; the result has that dtype.

An empty batch (B = 0) gives an empty ``(0,)`` result from ``mse``, ``psnr`` and ``ssim``, as
pytorch-msssim (``size_average=False``) and torchmetrics (``reduction="none"``) return per-image
values; each image must still hold at least one value.

- ``mse(pred, target)``: mean squared error over every non-batch dimension.
- ``psnr(pred, target, data_range)``: ``10 * log10(data_range**2 / mse)`` per image, with the
  data range given (a number, or one per image). torchmetrics' ``PeakSignalNoiseRatio`` by default
  infers the range from the target and pools the MSE over the whole batch; this is torchmetrics
  with ``data_range=L, reduction="none", dim=(1, 2, 3)``. A perfect reconstruction gives ``inf``.
  Computed as ``20 * log10(data_range) - 10 * log10(mse)`` with the range's log in float64, so
  any positive finite range is exact (``data_range**2`` would underflow in float32 below ~1e-19).
- ``ssim(pred, target, data_range)``: SSIM as pytorch-msssim and scikit-image
  (``gaussian_weights=True, use_sample_covariance=False``) compute it: an 11-tap gaussian window,
  sigma 1.5, no padding (only the ``(H - 10) x (W - 10)`` positions where the window fits),
  ``C1 = (0.01 L)**2``, ``C2 = (0.03 L)**2``, the map averaged over positions and channels.
  Recent torchmetrics averages a reflect-padded map instead, which differs near the borders.
  A range whose constants ``C1``/``C2`` are not normal numbers of the compute dtype (float32:
  ``data_range`` below ~1e-17 or above ~1e20) is refused: pass float64 images.
- ``compression_ratio(pixels, tokens)``: pixels per token (ViT-L/14 at 336x336: 196); every
  count must be positive (a zero count, int or tensor, is refused, never a ratio of inf).
  DeepSeek-OCR's "compression ratio" is text tokens per vision token, a different quantity.
- ``token_fidelity(original, compressed)``: cosine similarity and MSE between the unmerged /
  unpooled tokens (every input token replaced by the output token that holds it, read through
  ``compressed.source``) and the originals.
- ``clip_score(image_embeds, text_embeds)``: ``100 * max(cos, 0)`` per pair, torchmetrics'
  CLIPScore convention (torchmetrics returns the batch mean of the scores before the ``max``).
- ``retrieval_recall(image_embeds, text_embeds, k)``: cross-modal recall@k, pair i matching i, by
  cosine rank (image -> text by default, ``direction="text_to_image"`` the other way). A pair
  whose cosine is NaN (a NaN or infinite embedding) is never a hit, as its ``clip_score`` is NaN.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vtok_fast._checks import check_same_device, check_tensor

SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DIRECTIONS = ("image_to_text", "text_to_image")


def _compute_dtype(**tensors) -> torch.dtype:
    for name, t in tensors.items():
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold real numbers (a float or integer dtype), got {t.dtype}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32


def _pair(pred, target, *, ndim=None, shape_doc=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``pred``/``target`` of one shape, cast to the compute dtype."""
    check_tensor("pred", pred, ndim=ndim, shape_doc=shape_doc)
    check_tensor("target", target, ndim=ndim, shape_doc=shape_doc)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if pred.dim() < 2 or pred.shape[1:].numel() == 0:
        raise ValueError(f"pred and target must be (B, ...) with at least one value per image, got "
                         f"shape {tuple(pred.shape)}")
    check_same_device(pred=pred, target=target)
    dtype = _compute_dtype(pred=pred, target=target)
    return pred.to(dtype), target.to(dtype)


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _data_range(data_range, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``data_range`` as a ``(B,)`` tensor on ``like``'s device, in float64 (``_wide_dtype``) so
    that its log or square neither underflows nor overflows before it is used."""
    wide = _wide_dtype(like.device)
    if isinstance(data_range, torch.Tensor):
        if data_range.dim() > 1 or data_range.numel() not in (1, batch):
            raise ValueError(f"data_range must be a number or a tensor of shape () or (B,) = ({batch},), "
                             f"got shape {tuple(data_range.shape)}")
        if data_range.dtype == torch.bool or data_range.is_complex():
            raise TypeError(f"data_range must hold real numbers, got {data_range.dtype}")
        value = data_range.to(like.device, wide).reshape(-1).expand(batch)
        if not bool(((value > 0) & value.isfinite()).all()):  # also rejects NaN
            raise ValueError("data_range must be positive and finite (the span of the pixel values), got "
                             f"{data_range.tolist()}")
        return value
    if not isinstance(data_range, numbers.Real) or isinstance(data_range, bool):
        raise TypeError(f"data_range must be a number or a tensor, got {type(data_range).__name__}")
    if not data_range > 0 or data_range == float("inf"):
        raise ValueError(f"data_range must be a positive finite number (e.g. 1.0 or 255), got {data_range}")
    return torch.full((batch,), float(data_range), dtype=wide, device=like.device)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: ``(B, ...)`` x2 -> ``(B,)`` (``(0,)`` for an empty batch)."""
    pred, target = _pair(pred, target)
    return (pred - target).square().flatten(1).mean(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: ``10 * log10(data_range**2 / mse)``, ``(B,)``.

    ``data_range``: the span of the pixel values (1.0 for [0, 1] images, 255 for uint8), a
    positive finite number or a ``(B,)`` tensor; its log is taken in float64, so no range
    underflows. ``(0,)`` for an empty batch.
    """
    error = mse(pred, target)
    log_range = torch.log10(_data_range(data_range, error.shape[0], error)).to(error.dtype)
    return 20 * log_range - 10 * torch.log10(error)


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    window = torch.exp(-offsets.square() / (2 * sigma * sigma))
    return window / window.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range, *, win_size: int = SSIM_WIN_SIZE,
         sigma: float = SSIM_SIGMA, k1: float = SSIM_K1, k2: float = SSIM_K2) -> torch.Tensor:
    """Structural similarity per image, ``(B, C, H, W)`` x2 -> ``(B,)`` (see the module docstring).

    The five local statistics (means, second moments, cross moment) are filtered together by one
    separable grouped convolution, valid positions only.
    """
    pred, target = _pair(pred, target, ndim=4, shape_doc="(B, C, H, W)")
    batch, channels, height, width = pred.shape
    if not (isinstance(win_size, numbers.Integral) and win_size >= 1 and win_size % 2 == 1):
        raise ValueError(f"win_size must be an odd positive integer, got {win_size!r}")
    if not (isinstance(sigma, numbers.Real) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    for name, value in (("k1", k1), ("k2", k2)):
        if not (isinstance(value, numbers.Real) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if height < win_size or width < win_size:
        raise ValueError(f"pred and target must be at least win_size={win_size} pixels high and wide "
                         f"(SSIM uses no padding), got {height}x{width}")
    span = _data_range(data_range, batch, pred).view(batch, 1, 1, 1)
    c1, c2 = (k1 * span).square(), (k2 * span).square()
    info = torch.finfo(pred.dtype)
    for name, c in (("(k1 * data_range)**2", c1), ("(k2 * data_range)**2", c2)):
        if not bool(((c >= info.tiny) & (c <= info.max)).all()):
            raise ValueError(f"data_range {span.flatten().tolist()[:4]} is out of range for SSIM in {pred.dtype}: "
                             f"the constant {name} is not a normal {pred.dtype} number; pass float64 images")
    c1, c2 = c1.to(pred.dtype), c2.to(pred.dtype)
    window = _gaussian_window(int(win_size), float(sigma), pred)
    stats = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    groups = stats.shape[1]
    stats = F.conv2d(stats, window.view(1, 1, 1, -1).expand(groups, 1, 1, win_size), groups=groups)
    stats = F.conv2d(stats, window.view(1, 1, -1, 1).expand(groups, 1, win_size, 1), groups=groups)
    mu_x, mu_y, xx, yy, xy = stats.split(channels, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    contrast_structure = (2 * (xy - mu_xy) + c2) / ((xx - mu_xx) + (yy - mu_yy) + c2)
    luminance = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1)
    return (luminance * contrast_structure).flatten(1).mean(1)


def _pixel_counts(pixels):
    """``pixels`` as pixels per image: an int, an (H, W) pair, (B, C, H, W) images or (B,) counts."""
    if isinstance(pixels, torch.Tensor):
        if pixels.dim() == 4:
            return torch.full((pixels.shape[0],), pixels.shape[2] * pixels.shape[3], device=pixels.device)
        if pixels.dim() == 1:
            return pixels
        raise ValueError(f"pixels must be (B, C, H, W) images or (B,) pixel counts, got shape "
                         f"{tuple(pixels.shape)}")
    if isinstance(pixels, (tuple, list)) and len(pixels) == 2:
        pixels = pixels[0] * pixels[1]
    if isinstance(pixels, numbers.Integral) and not isinstance(pixels, bool) and pixels > 0:
        return torch.tensor([int(pixels)])
    raise TypeError(f"pixels must be a pixel count, an (H, W) pair, (B, C, H, W) images or (B,) "
                    f"counts, got {pixels!r}")


def _token_counts(tokens):
    """``tokens`` as tokens per image: an int, (B, M, D) tokens, (B,) counts, or a result with
    ``.tokens`` (and ``.counts`` where outputs are ragged)."""
    if hasattr(tokens, "tokens") and not isinstance(tokens, torch.Tensor):
        counts = getattr(tokens, "counts", None)
        return _token_counts(counts if counts is not None else tokens.tokens)
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 3:
            return torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
        if tokens.dim() == 1:
            return tokens
        raise ValueError(f"tokens must be (B, M, D) tokens or (B,) counts, got shape {tuple(tokens.shape)}")
    if isinstance(tokens, numbers.Integral) and not isinstance(tokens, bool) and tokens > 0:
        return torch.tensor([int(tokens)])
    raise TypeError(f"tokens must be a token count, (B, M, D) tokens, (B,) counts or a compression "
                    f"result with .tokens, got {tokens!r}")


def _positive(name: str, counts: torch.Tensor) -> torch.Tensor:
    """``counts`` if every count is a positive finite number (a zero count would give a ratio of
    0 or inf)."""
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"{name} counts must be integer or float numbers, got {counts.dtype}")
    good = counts > 0 if not counts.is_floating_point() else (counts > 0) & counts.isfinite()
    if not bool(good.all()):
        raise ValueError(f"{name} must count at least one per image (positive, finite), got counts "
                         f"{counts.flatten()[:8].tolist()}{' ...' if counts.numel() > 8 else ''}")
    return counts


def compression_ratio(pixels, tokens) -> torch.Tensor:
    """Pixels per token, ``(B,)`` float32 (``(1,)`` when neither argument has a batch).

    ``pixels``: pixels per image (channels not counted): an int, an ``(H, W)`` pair,
    ``(B, C, H, W)`` images or ``(B,)`` counts. ``tokens``: an int, ``(B, M, D)`` tokens, ``(B,)``
    counts, or a compression result (``.counts`` when it has them, else ``.tokens.shape[1]``;
    prefix tokens the result keeps are counted). Every count must be positive: a zero count
    (an int, a tensor entry, an image of no pixels or no tokens) is a ``ValueError``.
    """
    px, nt = _positive("pixels", _pixel_counts(pixels)), _positive("tokens", _token_counts(tokens))
    if px.numel() != nt.numel() and 1 not in (px.numel(), nt.numel()):
        raise ValueError(f"pixels and tokens disagree on the batch: {px.numel()} and {nt.numel()} images")
    device = nt.device if nt.device.type != "cpu" else px.device
    return px.to(device, torch.float32) / nt.to(device, torch.float32)


class TokenFidelity(NamedTuple):
    """``cosine``: mean cosine similarity of each token with its restored value, ``(B,)``;
    ``mse``: mean squared error of the restored tokens, ``(B,)``."""

    cosine: torch.Tensor
    mse: torch.Tensor


def token_fidelity(original: torch.Tensor, compressed, source: torch.Tensor | None = None, *,
                   dropped: str = "zero") -> TokenFidelity:
    """How well compressed tokens stand for the originals, per image.

    ``original``: ``(B, N, D)``. ``compressed``: a result with ``.tokens`` ``(B, M, D)`` and
    ``.source`` ``(B, N)`` (which output token holds each input token; -1: none, a dropped token),
    or the ``(B, M, D)`` tokens with ``source=`` given. Every input token is restored as the output
    token that holds it (ToMe's unmerge; for pooling, the pooled token); ``cosine`` and ``mse``
    compare the restored ``(B, N, D)`` with ``original``, averaged over tokens (and features for
    the MSE). ``dropped="zero"`` restores a dropped token as zeros (cosine 0, error its mean
    square); ``dropped="ignore"`` averages over held tokens only (NaN where none is held).
    """
    if source is None:
        if isinstance(compressed, torch.Tensor):
            raise TypeError("token_fidelity(original, tokens) needs source=: which output token holds "
                            "each input token")
        try:
            tokens, source = compressed.tokens, compressed.source
        except AttributeError:
            raise TypeError("compressed must have .tokens and .source (a compression result) or be a "
                            f"(B, M, D) tensor with source= given, got {type(compressed).__name__}") from None
    else:
        tokens = compressed
    if dropped not in ("zero", "ignore"):
        raise ValueError(f"dropped must be 'zero' or 'ignore', got {dropped!r}")
    check_tensor("original", original, ndim=3, shape_doc="(B, N, D)")
    check_tensor("compressed.tokens", tokens, ndim=3, shape_doc="(B, M, D)")
    check_tensor("compressed.source", source, ndim=2, shape_doc="(B, N)")
    check_same_device(original=original, tokens=tokens, source=source)
    batch, n, dim = original.shape
    if tokens.shape[0] != batch or tokens.shape[2] != dim:
        raise ValueError(f"compressed.tokens must be (B, M, D) = ({batch}, M, {dim}) like original, got "
                         f"shape {tuple(tokens.shape)}")
    if tuple(source.shape) != (batch, n):
        raise ValueError(f"compressed.source must be (B, N) = ({batch}, {n}), got shape {tuple(source.shape)}")
    if source.is_floating_point() or source.dtype == torch.bool or source.is_complex():
        raise TypeError(f"compressed.source must be an integer tensor, got {source.dtype}")
    if bool(((source < -1) | (source >= tokens.shape[1])).any()):
        raise ValueError(f"compressed.source values must be output token indices in [0, {tokens.shape[1]}) "
                         "or -1 (dropped)")
    dtype = _compute_dtype(original=original, tokens=tokens)
    original, tokens = original.to(dtype), tokens.to(dtype)
    held = source >= 0
    restored = tokens.gather(1, source.clamp(min=0).long().unsqueeze(-1).expand(batch, n, dim))
    restored = restored * held.unsqueeze(-1)
    cosine = F.cosine_similarity(restored, original, dim=-1)
    error = (restored - original).square().mean(-1)
    if dropped == "zero":
        return TokenFidelity(cosine.mean(1), error.mean(1))
    count = held.sum(1)
    return TokenFidelity((cosine * held).sum(1) / count, (error * held).sum(1) / count)


def _embeddings(image_embeds, text_embeds) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("image_embeds", image_embeds, ndim=2, shape_doc="(B, D)")
    check_tensor("text_embeds", text_embeds, ndim=2, shape_doc="(B, D)")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds and text_embeds must both be (B, D) with pair i matching i, got "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    if image_embeds.shape[0] == 0:
        raise ValueError("image_embeds and text_embeds must hold at least one pair, got B = 0")
    check_same_device(image_embeds=image_embeds, text_embeds=text_embeds)
    dtype = _compute_dtype(image_embeds=image_embeds, text_embeds=text_embeds)
    return F.normalize(image_embeds.to(dtype), dim=-1), F.normalize(text_embeds.to(dtype), dim=-1)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP score per pair: ``100 * max(cos(image_embeds[i], text_embeds[i]), 0)``, ``(B,)``."""
    image, text = _embeddings(image_embeds, text_embeds)
    return 100 * (image * text).sum(-1).clamp(min=0)


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, k: int, *,
                     direction: str = "image_to_text") -> torch.Tensor:
    """Recall@k per query, ``(B,)`` of 0/1: is the matching item among the k most similar?

    Pair i matches i; similarity is the cosine. ``direction="image_to_text"`` (default): each
    image queries the B texts; ``"text_to_image"``: each text queries the B images. Averaging the
    result gives the usual recall@k. A query's rank is the number of candidates strictly more
    similar than its match (ties count in the match's favour). Only the ranking counts: unlike
    torchmetrics' ``retrieval_recall``, which never counts a match whose score is <= 0, a match with
    a negative cosine is found when it ranks in the top k. A match whose cosine is NaN (a NaN or
    infinite embedding on either side; ``clip_score`` gives NaN for it) is never a hit.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    image, text = _embeddings(image_embeds, text_embeds)
    batch = image.shape[0]
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= batch:
        raise ValueError(f"k must be an integer in [1, B] = [1, {batch}], got {k!r}")
    similarity = image @ text.T if direction == "image_to_text" else text @ image.T
    match = similarity.diagonal()
    found = ((similarity > match.unsqueeze(1)).sum(1) < k) & match.isfinite()  # NaN: never a hit
    return found.to(image.dtype)
