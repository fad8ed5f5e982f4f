"""``vtok_fast.measure.viz.merge_map`` on the astronaut image with a real ToMe source map."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtok_fast import tome_merge
from vtok_fast.measure.viz import merge_map

# scikit-image's astronaut photograph, resized to 64 x 48 (tests/data/LICENSES.md)
IMAGE = Path(__file__).resolve().parent / "data" / "astronaut_64x48.png"
PATCH = 8


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(IMAGE).convert("RGB")  # 64 x 48: 8 x 6 patches of 8 px


def _source_map(image: Image.Image) -> torch.Tensor:
    """Two ToMe layers on patch colors (plus a CLS token): the (1, 1 + 48) source map."""
    pixels = torch.from_numpy(np.array(image)).float() / 255
    patches = pixels.reshape(6, PATCH, 8, PATCH, 3).permute(0, 2, 1, 3, 4).reshape(1, 48, -1)
    x = torch.cat([torch.zeros(1, 1, patches.shape[-1]), patches], dim=1)
    metric = x - x[:, 1:].mean(dim=1, keepdim=True)
    x, size, info = tome_merge(x, metric, 12, class_token=True)
    x, size, info = tome_merge(x, x - x[:, 1:].mean(dim=1, keepdim=True), 10, size, class_token=True,
                               source_map=info.source_map)
    return info.source_map


def test_groups_get_their_mean_color(image, tmp_path):
    source_map = _source_map(image)
    out = merge_map(image, source_map, PATCH, border_width=0, path=tmp_path / "map.png")
    assert isinstance(out, Image.Image) and out.size == (64, 48)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "map.png")), np.asarray(out))
    pixels, painted = np.asarray(image).astype(np.float64), np.asarray(out)
    labels = source_map[0, 1:].reshape(6, 8).numpy()
    label_pixels = np.kron(labels, np.ones((PATCH, PATCH), dtype=np.int64))
    assert len(np.unique(labels)) == 49 - 12 - 10 - 1  # CLS kept alone
    for group in np.unique(labels):
        inside = label_pixels == group
        np.testing.assert_array_equal(painted[inside], np.broadcast_to(
            pixels[inside].mean(0).round().astype(np.uint8), painted[inside].shape))


def test_borders_separate_groups(image):
    source_map = _source_map(image)
    plain = np.asarray(merge_map(image, source_map, PATCH, border_width=0))
    bordered = np.asarray(merge_map(image, source_map, PATCH, border_color=(255, 0, 255)))
    changed = (plain != bordered).any(-1)
    assert changed.any()
    labels = np.kron(source_map[0, 1:].reshape(6, 8).numpy(), np.ones((PATCH, PATCH), dtype=np.int64))
    seam = np.zeros(labels.shape, dtype=bool)
    seam[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    seam[:-1, :] |= labels[:-1, :] != labels[1:, :]
    assert np.array_equal(changed, seam & (plain != [255, 0, 255]).any(-1))
    wide = np.asarray(merge_map(image, source_map, PATCH, border_width=3))
    assert (wide != plain).any(-1).sum() > changed.sum()


def test_no_merges_is_patch_mean_colors(image):
    out = merge_map(np.asarray(image), torch.arange(48), PATCH, border_width=0)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (48, 64, 3)
    means = np.asarray(image).astype(np.float64).reshape(6, PATCH, 8, PATCH, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(out[::PATCH, ::PATCH], means.round().astype(np.uint8))


def test_tensor_image_and_prefix_tokens(image):
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    source_map = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.arange(5, 53)[None]], dim=1)
    out = merge_map(tensor, source_map, PATCH, num_prefix_tokens=5)
    assert out.shape == (48, 64, 3)
    assert np.array_equal(out, merge_map(tensor, source_map, PATCH))  # prefix inferred


def test_bad_input(image):
    with pytest.raises(ValueError, match="source_map has 40 entries but the image has 6x8 = 48 patches"):
        merge_map(image, torch.arange(40), PATCH)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        merge_map(image, torch.arange(48), 0)
    with pytest.raises(ValueError, match="source_map must be integer"):
        merge_map(image, torch.zeros(48), PATCH)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"border_color": (300, 0, 0)}, ValueError,
     r"border_color must be 3 ints \(R, G, B\) in \[0, 255\], got \(300, 0, 0\)"),
    ({"border_color": (-1, 0, 0)}, ValueError, "border_color must be 3 ints"),
    ({"border_color": (255, 0)}, ValueError, r"border_color must be 3 ints .*got \(255, 0\)"),
    ({"border_color": (0.5, 0, 0)}, ValueError, "border_color must be 3 ints"),
    ({"border_color": "red"}, ValueError, "border_color must be 3 ints .*got 'red'"),
    ({"border_width": -1}, ValueError, r"border_width must be an int >= 0 \(pixels\), got -1"),
    ({"border_width": 1.5}, ValueError, "border_width must be an int >= 0"),
    ({"num_prefix_tokens": -2}, ValueError, "num_prefix_tokens must be None or an int >= 0, got -2"),
    ({"num_prefix_tokens": 1.0}, ValueError, "num_prefix_tokens must be None or an int >= 0, got 1.0"),
    ({"path": 3}, TypeError, "path must be None, a str or an os.PathLike, got int"),
])
def test_bad_arguments_name_themselves(image, kwargs, error, message):
    with pytest.raises(error, match=message):
        merge_map(image, torch.arange(48), PATCH, **kwargs)


def test_numpy_ints_and_list_colors_are_accepted(image):
    plain = merge_map(np.asarray(image), torch.arange(48), PATCH, border_color=(255, 0, 255))
    same = merge_map(np.asarray(image), torch.arange(48), np.int64(PATCH), border_color=[np.uint8(255), 0, 255],
                     border_width=np.int32(1), num_prefix_tokens=np.int64(0))
    assert np.array_equal(plain, same)
