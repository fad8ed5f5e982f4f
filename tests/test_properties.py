"""Property-based checks (hypothesis) of the PyTorch paths over random shapes and options.

The op-specific test files pin the named edge cases; these sweep the space between them.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtok_fast
from helpers import assert_close

# ``torch_backend`` only sets an environment variable, identical for every generated input.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(batch=st.integers(0, 3), channels=st.integers(1, 4), ph=st.integers(1, 9), pw=st.integers(1, 9),
       extra_h=st.integers(0, 8), extra_w=st.integers(0, 8), grid_h=st.integers(1, 4),
       grid_w=st.integers(1, 4), dim=st.integers(1, 24), prefix=st.integers(0, 3),
       with_bias=st.booleans(), with_pos=st.booleans(), pos_covers_prefix=st.booleans(),
       uint8=st.booleans())
def test_patch_embed_matches_float64_conv(batch, channels, ph, pw, extra_h, extra_w, grid_h, grid_w, dim,
                                          prefix, with_bias, with_pos, pos_covers_prefix, uint8, torch_backend):
    H = grid_h * ph + extra_h % ph if ph > 1 else grid_h
    W = grid_w * pw + extra_w % pw if pw > 1 else grid_w
    n = (H // ph) * (W // pw)
    if uint8:
        images = torch.randint(0, 256, (batch, channels, H, W), dtype=torch.uint8)
        mean, std = torch.rand(channels).tolist(), (torch.rand(channels) + 0.5).tolist()
    else:
        images, mean, std = torch.randn(batch, channels, H, W), None, None
    weight = torch.randn(dim, channels, ph, pw)
    bias = torch.randn(dim) if with_bias else None
    rows = n + prefix if pos_covers_prefix else n
    pos = torch.randn(rows, dim) if with_pos else None
    pre = torch.randn(prefix, dim) if prefix else None
    kwargs = dict(pos_covers_prefix=pos_covers_prefix, mean=mean, std=std)

    out = vtok_fast.patch_embed(images, weight, bias, pos, pre, **kwargs)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    expected = vtok_fast.patch_embed_reference(images if uint8 else images.double(), weight.double(),
                                               f64(bias), f64(pos), f64(pre), **kwargs)
    assert out.shape == (batch, prefix + n, dim) and out.dtype == torch.float32
    assert_close(out, expected, dtype=torch.float32, reduction=channels * ph * pw)


@SETTINGS
@given(n=st.integers(1, 40), codes=st.integers(1, 50), dim=st.integers(1, 20), k=st.integers(1, 8),
       metric=st.sampled_from(["l2", "cosine"]), duplicate=st.booleans())
def test_codebook_search_returns_the_best_codes(n, codes, dim, k, metric, duplicate, torch_backend):
    k = min(k, codes)
    x = torch.randn(n, dim)
    codebook = torch.randn(codes, dim)
    if duplicate and codes > 1:
        codebook[-1] = codebook[0]  # an exact tie: the lower index must win
    idx, dist = vtok_fast.codebook_search(x, codebook, metric=metric, k=k, return_distances=True)
    idx, dist = idx.reshape(n, k), dist.reshape(n, k)
    assert idx.dtype == torch.int64 and bool(((idx >= 0) & (idx < codes)).all())
    xd, cd = x.double(), codebook.double()
    if metric == "cosine":
        xd, cd = torch.nn.functional.normalize(xd, dim=1), torch.nn.functional.normalize(cd, dim=1)
        score = xd @ cd.T
        best = score.topk(k, dim=1).values
        got = score.gather(1, idx)
    else:
        score = torch.cdist(xd, cd) ** 2
        best = (-score).topk(k, dim=1).values.neg()
        got = score.gather(1, idx)
    # the chosen codes are as good as the best ones up to fp32 rounding of the D-term sums
    assert_close(got, best, dtype=torch.float32, reduction=dim)
    assert_close(dist, got, dtype=torch.float32, reduction=dim)
    if duplicate and codes > 1 and k == 1:
        assert not bool((idx == codes - 1).any())


@SETTINGS
@given(batch=st.integers(1, 3), n=st.integers(2, 40), channels=st.integers(1, 12), r=st.integers(0, 25),
       class_token=st.booleans(), distill_token=st.booleans(), with_size=st.booleans())
def test_tome_merge_equals_reference(batch, n, channels, r, class_token, distill_token, with_size, torch_backend):
    distill_token = distill_token and class_token and n >= 3
    x, metric = torch.randn(batch, n, channels), torch.randn(batch, n, 8)
    size = torch.randint(1, 4, (batch, n, 1)).float() if with_size else None
    merge, _ = vtok_fast.bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill_token)
    x_ref, size_ref = vtok_fast.merge_wavg(merge, x, size)
    out, out_size, info = vtok_fast.tome_merge(x, metric, r, size, class_token=class_token,
                                               distill_token=distill_token)
    assert out.shape == x_ref.shape
    assert torch.equal(out_size, size_ref)
    assert_close(out, x_ref, dtype=torch.float32, reduction=n)
    assert bool(((info.source_map >= 0) & (info.source_map < out.shape[1])).all())
