"""Visualize ToMe merging: ``merge_map(image, source_map, patch_size)``.

Like the figures of the ToMe paper: every group of merged patches is painted with the mean color
of its pixels, and a border is drawn where two neighbouring patches belong to different groups.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def _to_uint8_hwc(image) -> tuple[np.ndarray, bool]:
    """(H, W, 3) uint8 array and whether the input was a PIL image."""
    try:
        from PIL import Image
    except ImportError:  # Pillow is optional: arrays and tensors work without it
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")), True
    if isinstance(image, torch.Tensor):  # (3, H, W) floats in [0, 1], or uint8
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        array = image.detach().cpu().permute(1, 2, 0).numpy()
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        image = array
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 1|3|4) or a PIL image, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    array = array[..., :3] if array.shape[-1] >= 3 else np.repeat(array, 3, axis=-1)
    return array, False


def _is_int(value) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _shift(mask: np.ndarray, offset: int, axis: int) -> np.ndarray:
    """``mask`` moved by ``offset`` pixels along ``axis``, filling with False."""
    out = np.zeros_like(mask)
    n = mask.shape[axis]
    if abs(offset) >= n:
        return out
    src = [slice(None)] * 2
    dst = [slice(None)] * 2
    src[axis] = slice(0, n - offset) if offset >= 0 else slice(-offset, n)
    dst[axis] = slice(offset, n) if offset >= 0 else slice(0, n + offset)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def merge_map(image, source_map, patch_size: int, *, num_prefix_tokens: int | None = None,
              border_color=(255, 255, 255), border_width: int = 1, path: str | os.PathLike | None = None):
    """Paint the merged groups of ``source_map`` over ``image``.

    ``image``: PIL image, ``(H, W, 3)`` array (uint8, or floats in [0, 1]) or ``(3, H, W)``
    tensor. ``source_map``: int ``(N0,)`` or ``(1, N0)`` (e.g. ``info.source_map[i]`` from
    ``tome_merge``): the token holding each original token; patches are in row-major order after
    ``num_prefix_tokens`` leading tokens (CLS, registers), inferred as
    ``N0 - (H // patch_size) * (W // patch_size)`` when None. The image is cropped to whole
    patches. Each group is filled with its mean color; ``border_width`` pixels of
    ``border_color`` separate neighbouring groups (0: no borders).

    Returns a PIL image when ``image`` is one, else an ``(H', W', 3)`` uint8 array; ``path``
    also saves it (PNG by extension; needs Pillow).
    """
    pixels, was_pil = _to_uint8_hwc(image)
    if not _is_int(patch_size) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if num_prefix_tokens is not None and (not _is_int(num_prefix_tokens) or num_prefix_tokens < 0):
        raise ValueError(f"num_prefix_tokens must be None or an int >= 0, got {num_prefix_tokens!r}")
    if not _is_int(border_width) or border_width < 0:
        raise ValueError(f"border_width must be an int >= 0 (pixels), got {border_width!r}")
    color = tuple(border_color) if isinstance(border_color, (tuple, list, np.ndarray)) else None
    if color is None or len(color) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in color):
        raise ValueError(f"border_color must be 3 ints (R, G, B) in [0, 255], got {border_color!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be None, a str or an os.PathLike, got {type(path).__name__}")
    grid_h, grid_w = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    if grid_h == 0 or grid_w == 0:
        raise ValueError(f"image of {pixels.shape[0]}x{pixels.shape[1]} pixels holds no {patch_size}px patch")

    groups = source_map.detach().cpu().numpy() if isinstance(source_map, torch.Tensor) else np.asarray(source_map)
    if groups.ndim == 2 and groups.shape[0] == 1:
        groups = groups[0]
    if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"source_map must be integer (N0,) or (1, N0), got {groups.dtype} shape {groups.shape}")
    num_patches = grid_h * grid_w
    prefix = groups.shape[0] - num_patches if num_prefix_tokens is None else num_prefix_tokens
    if prefix < 0 or groups.shape[0] != prefix + num_patches:
        raise ValueError(f"source_map has {groups.shape[0]} entries but the image has {grid_h}x{grid_w} = "
                         f"{num_patches} patches of {patch_size}px (+ num_prefix_tokens = {num_prefix_tokens})")

    _, labels = np.unique(groups[prefix:], return_inverse=True)  # dense group ids 0..G-1
    labels = labels.reshape(grid_h, grid_w)
    pixels = pixels[: grid_h * patch_size, : grid_w * patch_size]
    pixel_labels = np.repeat(np.repeat(labels, patch_size, axis=0), patch_size, axis=1)

    flat = pixel_labels.ravel()
    counts = np.bincount(flat)
    means = np.stack([np.bincount(flat, weights=pixels[..., ch].ravel().astype(np.float64)) / counts
                      for ch in range(3)], axis=-1)
    out = means.round().astype(np.uint8)[pixel_labels]

    if border_width > 0:
        # pixels just before a vertical / horizontal seam between two groups
        before_v = np.zeros(pixel_labels.shape, dtype=bool)
        before_v[:, :-1] = pixel_labels[:, :-1] != pixel_labels[:, 1:]
        before_h = np.zeros(pixel_labels.shape, dtype=bool)
        before_h[:-1, :] = pixel_labels[:-1, :] != pixel_labels[1:, :]
        edge = np.zeros(pixel_labels.shape, dtype=bool)
        for k in range(border_width):  # widen across the seam: 0, +1, -1, +2, ...
            offset = (k + 1) // 2 if k % 2 else -(k // 2)
            edge |= _shift(before_v, offset, axis=1) | _shift(before_h, offset, axis=0)
        out[edge] = np.asarray(color, dtype=np.uint8)

    result = out
    if was_pil or path is not None:
        from PIL import Image

        pil = Image.fromarray(out)
        if path is not None:
            pil.save(path)
        if was_pil:
            result = pil
    return result
