"""Metrics against their reference implementations: torchmetrics, pytorch-msssim, scikit-image."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.functional.multimodal import clip_score as tm_clip_score
from torchmetrics.functional.retrieval import retrieval_recall as tm_retrieval_recall

from helpers import assert_close
from vtok_fast import tome_merge
from vtok_fast.measure.metrics import (TokenFidelity, clip_score, compression_ratio, mse, psnr,
                                       retrieval_recall, ssim, token_fidelity)

# scikit-image's astronaut photograph, resized to 64 x 48 (tests/data/LICENSES.md)
ASTRONAUT = Path(__file__).resolve().parent / "data" / "astronaut_64x48.png"


def _images(device, dtype=torch.float64, batch=3, channels=3, height=40, width=52, noise=0.1):
    """A photograph-like pair batch: the astronaut (tiled to the size) and noisy copies of it."""
    photo = torch.from_numpy(np.array(Image.open(ASTRONAUT).convert("RGB"))).permute(2, 0, 1) / 255.0
    photo = photo[:channels, :height, :width].to(dtype)
    target = torch.stack([photo.roll(7 * i, dims=-1) for i in range(batch)]).to(device)
    pred = (target + noise * torch.randn(target.shape, dtype=dtype).to(device)).clamp(0, 1)
    return pred, target


# --- mse / psnr --------------------------------------------------------------------------------

def test_mse_and_psnr_match_torchmetrics(device):
    pred, target = _images(device)
    expected_mse = torch.stack([mean_squared_error(p, t) for p, t in zip(pred, target)])
    assert_close(mse(pred, target), expected_mse)
    expected = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    got = psnr(pred, target, 1.0)
    assert got.shape == (3,) and got.dtype == torch.float64 and got.device == pred.device
    # torchmetrics keeps data_range as a float32 tensor, so its log(range) is float32-rounded
    assert_close(got, expected, dtype=torch.float32)


def test_psnr_uint8_and_per_image_range(device):
    pred, target = _images(device, dtype=torch.float32)
    pred8, target8 = (pred * 255).round().to(torch.uint8), (target * 255).round().to(torch.uint8)
    got = psnr(pred8, target8, 255)
    assert got.dtype == torch.float32  # integer images are computed in float32
    expected = peak_signal_noise_ratio(pred8.double(), target8.double(), data_range=255.0, reduction="none",
                                       dim=(1, 2, 3))
    assert_close(got, expected, dtype=torch.float32, reduction=pred[0].numel())
    ranges = torch.tensor([1.0, 2.0, 4.0], device=device)
    assert_close(psnr(pred, target, ranges), psnr(pred, target, 1.0) + 20 * torch.log10(ranges),
                 dtype=torch.float32, reduction=pred[0].numel())


def test_psnr_perfect_reconstruction_is_inf(device):
    x = torch.rand(2, 3, 8, 8, device=device)
    assert torch.isinf(psnr(x, x, 1.0)).all() and (mse(x, x) == 0).all()


def test_mse_exact_small_integers():
    pred = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 3.0]]])
    assert mse(pred, target).tolist() == [14 / 4, 4 / 4]


def test_half_inputs_compute_in_float32(device):
    pred, target = _images(device, dtype=torch.float32)
    got = mse(pred.half(), target.half())
    assert got.dtype == torch.float32
    assert_close(got, mse(pred.half().double(), target.half().double()), dtype=torch.float32,
                 reduction=pred[0].numel())


# --- ssim --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels, height, width", [(3, 40, 52), (1, 11, 30), (3, 48, 64)])
def test_ssim_matches_pytorch_msssim(device, dtype, channels, height, width):
    pred, target = _images(device, dtype=dtype, channels=channels, height=height, width=width)
    got = ssim(pred, target, 1.0)
    expected = pytorch_msssim.ssim(pred.double(), target.double(), data_range=1.0, size_average=False)
    assert got.shape == (3,) and got.dtype == dtype
    # each map value comes from 11 x 11-tap window sums (121 terms), then a mean over the map;
    # pytorch-msssim builds its gaussian window in float32, so its float64 result is float32-exact
    assert_close(got, expected, dtype=torch.float32, reduction=121)


def test_ssim_matches_scikit_image(device):
    pred, target = _images(device, noise=0.2)
    pred, target = pred * 255, target * 255
    got = ssim(pred, target, 255)
    expected = torch.tensor([
        structural_similarity(p.cpu().numpy(), t.cpu().numpy(), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255, channel_axis=0)
        for p, t in zip(pred, target)], dtype=torch.float64)
    assert_close(got.cpu(), expected, reduction=121)


def test_ssim_identical_is_one_and_range_matters(device):
    pred, target = _images(device)
    assert_close(ssim(target, target, 1.0), torch.ones(3, dtype=torch.float64, device=device), reduction=121)
    # a larger data range makes C1, C2 larger: the noisy pair looks more similar
    assert (ssim(pred, target, 4.0) > ssim(pred, target, 1.0)).all()
    per_image = ssim(pred, target, torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64, device=device))
    assert_close(per_image, torch.stack([ssim(pred, target, r)[i] for i, r in enumerate([1.0, 4.0, 1.0])]),
                 reduction=121)


def test_ssim_is_differentiable(device):
    pred, target = _images(device)
    pred.requires_grad_(True)
    ssim(pred, target, 1.0).sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ssim_custom_window_matches_pytorch_msssim(device):
    pred, target = _images(device)
    got = ssim(pred, target, 1.0, win_size=7, sigma=1.0, k1=0.02, k2=0.05)
    expected = pytorch_msssim.ssim(pred, target, data_range=1.0, size_average=False, win_size=7, win_sigma=1.0,
                                   K=(0.02, 0.05))
    assert_close(got, expected, dtype=torch.float32, reduction=49)  # its window is float32, as above


# --- compression ratio -------------------------------------------------------------------------

def test_compression_ratio(device):
    images = torch.zeros(2, 3, 336, 336, device=device)
    tokens = torch.zeros(2, 576, 8, device=device)
    got = compression_ratio(images, tokens)
    assert got.tolist() == [196.0, 196.0] and got.device == images.device and got.dtype == torch.float32
    assert compression_ratio((336, 336), 576).tolist() == [196.0]
    assert compression_ratio(336 * 336, torch.tensor([576, 144, 36])).tolist() == [196.0, 784.0, 3136.0]
    ragged = SimpleNamespace(tokens=torch.zeros(2, 144, 8), counts=torch.tensor([144, 72]))
    assert compression_ratio((336, 336), ragged).tolist() == [784.0, 1568.0]
    unragged = SimpleNamespace(tokens=torch.zeros(3, 98, 4), counts=None)
    assert compression_ratio((224, 224), unragged).tolist() == [512.0] * 3


def test_compression_ratio_errors():
    with pytest.raises(ValueError, match="pixels and tokens disagree on the batch: 2 and 3 images"):
        compression_ratio(torch.zeros(2, 3, 8, 8), torch.zeros(3, 4, 1))
    with pytest.raises(TypeError, match="pixels must be a pixel count, an \\(H, W\\) pair"):
        compression_ratio("336", 576)
    with pytest.raises(TypeError, match="tokens must be a token count"):
        compression_ratio(336, 0)
    with pytest.raises(ValueError, match="pixels must be \\(B, C, H, W\\) images or \\(B,\\) pixel counts"):
        compression_ratio(torch.zeros(3, 8, 8), 4)
    with pytest.raises(ValueError, match="tokens must be \\(B, M, D\\) tokens or \\(B,\\) counts"):
        compression_ratio(64, torch.zeros(2, 4))


# --- token fidelity ----------------------------------------------------------------------------

def test_token_fidelity_exact_values(device):
    original = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]], device=device)
    merged = SimpleNamespace(tokens=torch.tensor([[[0.5, 0.5], [2.0, 2.0]]], device=device),
                             source=torch.tensor([[0, 0, 1]], device=device))
    cosine, error = token_fidelity(original, merged)
    # tokens 0 and 1 restored as (0.5, 0.5): cosine 1/sqrt(2), squared error 0.25; token 2 exact
    assert_close(cosine.cpu(), torch.tensor([(2 * 0.5 ** 0.5 + 1) / 3], dtype=torch.float64))
    assert_close(error.cpu(), torch.tensor([(0.25 + 0.25 + 0.0) / 3], dtype=torch.float64))
    identity = token_fidelity(original, original, source=torch.tensor([[0, 1, 2]], device=device))
    assert isinstance(identity, TokenFidelity)
    assert_close(identity.cosine.cpu(), torch.ones(1, dtype=torch.float64))
    assert identity.mse.tolist() == [0.0]


def test_token_fidelity_dropped_tokens(device):
    original = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [0.0, 2.0]]], device=device)
    kept = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]], device=device)
    source = torch.tensor([[0, -1, 1]], device=device)  # token 1 pruned
    zero = token_fidelity(original, kept, source=source)
    assert_close(zero.cosine.cpu(), torch.tensor([2 / 3], dtype=torch.float64))
    # the pruned token restored as zeros: its mean square, (1 + 1) / 2 = 1
    assert_close(zero.mse.cpu(), torch.tensor([(0 + 1 + 0) / 3], dtype=torch.float64))
    ignore = token_fidelity(original, kept, source=source, dropped="ignore")
    assert_close(ignore.cosine.cpu(), torch.ones(1, dtype=torch.float64))
    assert ignore.mse.tolist() == [0.0]


def test_token_fidelity_of_tome_matches_unmerge(device):
    """Through a real ToMe source map: the restored tokens are MergeInfo.unmerge's."""
    x = torch.randn(2, 197, 32, device=device)
    merged, _, info = tome_merge(x, x[..., :16], 40, class_token=True)
    x2, _, info = tome_merge(merged, merged[..., :16], 30, class_token=True, source_map=info.source_map)
    got = token_fidelity(x, SimpleNamespace(tokens=x2, source=info.source_map, positions=None, sizes=None))
    restored = x2.double().gather(1, info.source_map.unsqueeze(-1).expand(-1, -1, 32))
    expected_cos = torch.stack([torch.tensor([F.cosine_similarity(restored[b, i], x[b, i].double(), dim=0)
                                              for i in range(197)]).mean() for b in range(2)])
    assert_close(got.cosine.cpu(), expected_cos, dtype=torch.float32, reduction=32)
    assert_close(got.mse, (restored - x.double()).square().mean((1, 2)), dtype=torch.float32, reduction=197 * 32)
    assert_close(token_fidelity(merged, merged, source=torch.arange(157, device=device).expand(2, 157)).cosine,
                 torch.ones(2, dtype=torch.float64, device=device), dtype=torch.float32, reduction=32)


def test_token_fidelity_of_pooling(device):
    """2x2 average pooling of a 4x4 grid: every token is restored as its window's mean."""
    grid = torch.randn(3, 4, 4, 8, dtype=torch.float64, device=device)
    pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(3, 4, 8)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    source = ((rows // 2) * 2 + cols // 2).reshape(1, 16).expand(3, 16).to(device)
    got = token_fidelity(grid.reshape(3, 16, 8), pooled, source=source)
    window_means = grid.reshape(3, 2, 2, 2, 2, 8).mean((2, 4), keepdim=True).expand(3, 2, 2, 2, 2, 8)
    restored = window_means.reshape(3, 4, 4, 8).reshape(3, 16, 8)
    assert_close(got.mse, (restored - grid.reshape(3, 16, 8)).square().mean((1, 2)), reduction=16 * 8)
    assert_close(got.cosine, F.cosine_similarity(restored, grid.reshape(3, 16, 8), dim=-1).mean(1), reduction=8)


def test_token_fidelity_errors():
    original, tokens = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    source = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    with pytest.raises(TypeError, match="needs source="):
        token_fidelity(original, tokens)
    with pytest.raises(TypeError, match="compressed must have .tokens and .source"):
        token_fidelity(original, SimpleNamespace(tokens=tokens))
    with pytest.raises(ValueError, match=r"source values must be output token indices in \[0, 3\) or -1"):
        token_fidelity(original, tokens, source=source + 1)
    with pytest.raises(ValueError, match=r"compressed.source must be \(B, N\) = \(2, 6\), got shape \(2, 5\)"):
        token_fidelity(original, tokens, source=source[:, :5])
    with pytest.raises(ValueError, match=r"compressed.tokens must be \(B, M, D\) = \(2, M, 4\)"):
        token_fidelity(original, torch.randn(2, 3, 5), source=source)
    with pytest.raises(TypeError, match="compressed.source must be an integer tensor, got torch.float32"):
        token_fidelity(original, tokens, source=source.float())
    with pytest.raises(ValueError, match="original must be \\(B, N, D\\)"):
        token_fidelity(original[0], tokens, source=source)
    with pytest.raises(ValueError, match="dropped must be 'zero' or 'ignore', got 'skip'"):
        token_fidelity(original, tokens, source=source, dropped="skip")


# --- cross-modal alignment ---------------------------------------------------------------------

class _EmbeddingModel(torch.nn.Module):
    """Stands in for a CLIP model in torchmetrics' clip_score: "images" are the embeddings
    themselves, texts are indices into a table of text embeddings."""

    def __init__(self, text_embeds):
        super().__init__()
        self.text_embeds = text_embeds
        self.config = SimpleNamespace()

    def get_image_features(self, pixel_values):
        return pixel_values.flatten(1)

    def get_text_features(self, input_ids, attention_mask):
        return self.text_embeds[input_ids[:, 0]]


def _processor(images=None, text=None, **_):
    if images is not None:
        return {"pixel_values": torch.stack(images)}
    ids = torch.tensor([[int(t)] for t in text])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_clip_score_matches_torchmetrics():
    image_embeds = torch.randn(8, 16, dtype=torch.float64)
    text_embeds = torch.randn(8, 16, dtype=torch.float64)
    text_embeds[:4] += 2 * image_embeds[:4]  # aligned pairs
    text_embeds[7] = -image_embeds[7] + 0.1 * text_embeds[7]  # a negative cosine: scores 0
    got = clip_score(image_embeds, text_embeds)
    model = _EmbeddingModel(text_embeds)
    expected = torch.stack([tm_clip_score(image_embeds[i].view(16, 1, 1), str(i), lambda: (model, _processor))
                            for i in range(8)])
    assert_close(got, expected.double())
    assert got[7] == 0 and (got[:4] > 50).all() and (got >= 0).all() and (got <= 100).all()


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_retrieval_recall_matches_torchmetrics(direction, k, device):
    image_embeds = torch.randn(24, 16, dtype=torch.float64)
    text_embeds = image_embeds + 1.5 * torch.randn(24, 16, dtype=torch.float64)
    got = retrieval_recall(image_embeds.to(device), text_embeds.to(device), k, direction=direction)
    queries, items = (image_embeds, text_embeds) if direction == "image_to_text" else (text_embeds, image_embeds)
    similarity = F.normalize(queries, dim=-1) @ F.normalize(items, dim=-1).T
    # torchmetrics never counts a match scored <= 0; shifting every cosine by 2 keeps the ranking
    # (all recall@k depends on) and makes every score positive
    expected = torch.stack([tm_retrieval_recall(similarity[i] + 2, torch.arange(24) == i, top_k=k)
                            for i in range(24)])
    assert got.tolist() == expected.double().tolist()
    assert 0 < got.sum() <= 24


def test_retrieval_recall_ties_and_bounds():
    image_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text_embeds = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, -1.0]])  # texts 0 and 1 tie for images 0, 1
    assert retrieval_recall(image_embeds, text_embeds, 1).tolist() == [1.0, 1.0, 0.0]
    assert retrieval_recall(image_embeds, text_embeds, 3).tolist() == [1.0, 1.0, 1.0]  # k = B: all found
    assert retrieval_recall(image_embeds, text_embeds, 1, direction="text_to_image").tolist() == [1.0, 1.0, 0.0]


def test_alignment_errors():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"image_embeds and text_embeds must both be \(B, D\)"):
        clip_score(a, b[:3])
    with pytest.raises(ValueError, match=r"text_embeds must be \(B, D\)"):
        clip_score(a, b[0])
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, B\] = \[1, 4\], got 5"):
        retrieval_recall(a, b, 5)
    with pytest.raises(ValueError, match="direction must be one of image_to_text, text_to_image, got 'both'"):
        retrieval_recall(a, b, 1, direction="both")


# --- input validation --------------------------------------------------------------------------

def test_image_metric_errors():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"must have the same shape, got \(2, 3, 16, 16\) and \(2, 3, 16, 15\)"):
        mse(x, x[..., :15])
    with pytest.raises(TypeError, match="target must be a torch.Tensor, got ndarray"):
        psnr(x, x.numpy(), 1.0)
    with pytest.raises(TypeError, match="pred must hold real numbers"):
        mse(x > 0.5, x > 0.5)
    with pytest.raises(ValueError, match="data_range must be a positive finite number"):
        psnr(x, x, 0)
    with pytest.raises(TypeError, match="data_range must be a number or a tensor, got str"):
        psnr(x, x, "255")
    with pytest.raises(ValueError, match=r"data_range must be a number or a tensor of shape \(\) or \(B,\) = \(2,\)"):
        psnr(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="data_range must be positive"):
        psnr(x, x, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"pred must be \(B, C, H, W\), got shape \(3, 16, 16\)"):
        ssim(x[0], x[0], 1.0)
    with pytest.raises(ValueError, match="at least win_size=11 pixels high and wide .* got 10x16"):
        ssim(x[:, :, :10], x[:, :, :10], 1.0)
    with pytest.raises(ValueError, match="win_size must be an odd positive integer, got 10"):
        ssim(x, x, 1.0, win_size=10)
    with pytest.raises(ValueError, match="pred and target must be \\(B, ...\\) with at least one value per image"):
        mse(torch.rand(4), torch.rand(4))


# --- bad-input sweep ----------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("side", ["image_embeds", "text_embeds"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_retrieval_recall_nan_is_never_a_hit(direction, side, bad):
    """A pair whose cosine is NaN (clip_score: NaN) is never found, whatever k; the other pairs
    keep their ranks."""
    image_embeds, text_embeds = torch.eye(3, 4), torch.eye(3, 4)
    {"image_embeds": image_embeds, "text_embeds": text_embeds}[side][1, 2] = bad
    assert torch.isnan(clip_score(image_embeds, text_embeds)[1])
    for k in (1, 3):
        got = retrieval_recall(image_embeds, text_embeds, k, direction=direction)
        assert got.tolist() == [1.0, 0.0, 1.0], (k, got)


@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_empty_batch_gives_empty_results(metric, device):
    """B = 0 gives (0,), as pytorch-msssim (size_average=False) and torchmetrics (reduction="none")."""
    empty = torch.rand(0, 3, 16, 16, device=device)
    args = () if metric is mse else (1.0,)
    got = metric(empty, empty, *args)
    assert got.shape == (0,) and got.dtype == torch.float32 and got.device == empty.device
    assert pytorch_msssim.ssim(empty.cpu(), empty.cpu(), data_range=1.0, size_average=False).shape == (0,)
    if metric is not mse:
        assert metric(empty, empty, torch.ones(0, device=device)).shape == (0,)
    with pytest.raises(ValueError, match="at least one value per image"):
        metric(torch.rand(0, 3, 0, 16), torch.rand(0, 3, 0, 16), *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_psnr_of_a_tiny_or_huge_range_is_exact(dtype):
    """psnr(data_range=1e-30) was -inf in float32 (data_range**2 underflows): it is the same PSNR
    600 dB lower; scale-equivariant data in float64 gives the PSNR of the unscaled data."""
    pred, target = _images("cpu", dtype)
    base = psnr(pred, target, 1.0)
    for data_range, shift in ((1e-30, -600.0), (1e-50, -1000.0), (1e30, 600.0)):
        got = psnr(pred, target, data_range)
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, base + shift, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(psnr(pred, target, torch.full((3,), data_range, dtype=torch.float64)), got)
    if dtype == torch.float64:
        torch.testing.assert_close(psnr(pred * 1e-30, target * 1e-30, 1e-30), base, rtol=1e-9, atol=1e-9)


def test_ssim_refuses_a_range_its_dtype_cannot_hold():
    pred, target = _images("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"data_range \[1e-30.*out of range for SSIM in torch.float32: the "
                                         r"constant \(k1 \* data_range\)\*\*2 is not a normal torch.float32 "
                                         r"number; pass float64"):
        ssim(pred, target, 1e-30)
    with pytest.raises(ValueError, match=r"\(k2 \* data_range\)\*\*2 is not a normal"):
        ssim(pred, target, 1e21)  # (0.01e21)**2 fits float32, (0.03e21)**2 does not
    wide = ssim(pred.double() * 1e-30, target.double() * 1e-30, 1e-30)
    torch.testing.assert_close(wide, ssim(pred.double(), target.double(), 1.0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pixels, tokens", [
    (100, torch.tensor([0, 2])),
    (torch.tensor([100, 0]), 4),
    (100, torch.tensor([2.0, float("nan")])),
    (torch.zeros(2, 3, 0, 8), 4),
    (100, torch.zeros(2, 0, 8)),
    (100, SimpleNamespace(tokens=torch.zeros(2, 4, 8), counts=torch.tensor([4, 0]))),
])
def test_compression_ratio_refuses_zero_counts_as_an_int_zero(pixels, tokens):
    """compression_ratio(100, tensor([0, 2])) returned inf where compression_ratio(100, 0) is refused."""
    with pytest.raises(ValueError, match=r"(pixels|tokens) must count at least one per image \(positive, finite\), "
                                         r"got counts \["):
        compression_ratio(pixels, tokens)
