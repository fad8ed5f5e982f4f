"""pyramid_tokenize: the seed's 8x8 + 16x16 + 32x32 = 1344 example, per-level tables, level
embedding, one shared weight or one per level, uint8 + mean/std, bad input."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from vtok_fast.encode.patch_embed import patch_embed_reference
from vtok_fast.encode.pyramid import pyramid_tokenize


def test_seed_example_1344_tokens(backend):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    weight = torch.randn(8, 3, 2, 2, generator=gen)
    bias = torch.randn(8, generator=gen)
    tables = [torch.randn(g * g, 8, generator=gen) for g in (8, 16, 32)]
    level_embed = torch.randn(3, 8, generator=gen)
    prefix = torch.randn(1, 8, generator=gen)
    seq = pyramid_tokenize(images, weight, bias, tables, levels=(8, 16, 32), prefix=prefix,
                           level_embed=level_embed, concat=True)
    assert seq.shape == (2, 1 + 64 + 256 + 1024, 8)
    # every level: the image box-filtered to its grid (64 px = as is; 32 and 16 px pooled), the
    # level's table and its level embedding
    start = 1
    for level, (g, table) in enumerate(zip((8, 16, 32), tables)):
        x = F.interpolate(images.double(), size=(2 * g, 2 * g), mode="area")
        expected = patch_embed_reference(x, weight.double(), bias.double(),
                                         table.double() + level_embed[level].double())
        assert_close(seq[:, start: start + g * g], expected, dtype=torch.float32, reduction=12)
        start += g * g
    assert_close(seq[:, 0], prefix.double().expand(2, 8))

    levels = pyramid_tokenize(images, weight, bias, tables, levels=(8, 16, 32), prefix=prefix,
                              level_embed=level_embed)
    assert [t.shape[1] for t in levels] == [65, 257, 1025]  # each level led by the prefix
    # the same tokens, bit for bit: every level runs the same call in both layouts
    assert torch.equal(torch.cat([levels[0]] + [t[:, 1:] for t in levels[1:]], dim=1), seq)


def test_one_weight_per_level_embeds_the_image_as_is(backend):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=gen)
    weights = [torch.randn(4, 3, p, p, generator=gen) for p in (8, 4, 2)]
    norm = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    out = pyramid_tokenize(images, weights, levels=(4, 8, 16), **norm)
    for w, tokens in zip(weights, out):
        expected = patch_embed_reference(images, w.double(), **norm)  # uint8 read directly
        assert_close(tokens, expected, dtype=torch.float32, reduction=w[0].numel())


def test_non_nested_sizes_and_a_resampled_table(torch_backend):
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 30, 45), dtype=torch.uint8, generator=gen)
    weight = torch.randn(6, 3, 3, 3, generator=gen)
    table = torch.randn(16, 6, generator=gen)  # a 4x4 grid
    out = pyramid_tokenize(images, weight, pos_embeds=table, levels=((5, 7), 4))
    x = images.float() / 255
    shrunk = F.interpolate(x, size=(15, 21), mode="bilinear", antialias=True, align_corners=False)
    resampled = F.interpolate(table.reshape(4, 4, 6).permute(2, 0, 1)[None], size=(5, 7),
                              mode="bicubic", antialias=True, align_corners=False)[0]
    expected = patch_embed_reference(shrunk.double(), weight.double(),
                                     pos_embed=resampled.permute(1, 2, 0).reshape(35, 6).double())
    assert_close(out[0], expected, dtype=torch.float32, reduction=27)
    # 12 x 12 does not divide 15 x 21: resampled from the input (the table's own grid: as is)
    small = F.interpolate(x, size=(12, 12), mode="bilinear", antialias=True, align_corners=False)
    assert_close(out[1], patch_embed_reference(small.double(), weight.double(), pos_embed=table.double()),
                 dtype=torch.float32, reduction=27)
    # growing: bilinear without antialiasing
    big = pyramid_tokenize(images, weight, levels=(20,))[0]
    grown = F.interpolate(x, size=(60, 60), mode="bilinear", align_corners=False)
    assert_close(big, patch_embed_reference(grown.double(), weight.double()), dtype=torch.float32,
                 reduction=27)


def test_every_level_is_resampled_from_the_input(torch_backend):
    # 50 -> 20 bilinear (antialiased), 50 -> 10 and 50 -> 5 box filters of the input itself, never
    # pooled from the 20-px level
    images = torch.rand(1, 3, 50, 50)
    weight = torch.randn(4, 3, 1, 1)
    out = pyramid_tokenize(images, weight, levels=(5, 10, 20))
    for g, tokens in zip((5, 10, 20), out):
        if 50 % g:
            x = F.interpolate(images.double(), size=(g, g), mode="bilinear", antialias=True,
                              align_corners=False)
        else:
            x = F.avg_pool2d(images.double(), 50 // g)
        assert_close(tokens, patch_embed_reference(x, weight.double()), dtype=torch.float32, reduction=3)


@pytest.mark.parametrize("uint8", [False, True])
def test_a_level_does_not_depend_on_the_other_levels(uint8, backend):
    # the reported case: level 1 of a 37x45 image moved by 0.02-0.04 when level 3 was requested too
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 37, 45, generator=gen)
    if uint8:
        images = (images * 255).to(torch.uint8)
    weight = torch.randn(6, 3, 8, 8, generator=gen)
    bias = torch.randn(6, generator=gen)
    table = torch.randn(16, 6, generator=gen)  # one square table, resampled per level
    prefix = torch.randn(2, 6, generator=gen)
    args = dict(biases=bias, pos_embeds=table, prefix=prefix, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    alone = {g: pyramid_tokenize(images, weight, levels=(g,), **args)[0] for g in (1, 2, 3, 4)}
    for levels in [(3, 1), (1, 3), (4, 2, 1, 3), (2, 4), (1, 1, 2)]:
        for concat in (False, True):
            out = pyramid_tokenize(images, weight, levels=levels, concat=concat, **args)
            if concat:
                sizes = [g * g for g in levels]
                starts = [2 + sum(sizes[:i]) for i in range(len(levels))]
                out = [torch.cat([out[:, :2], out[:, s: s + n]], dim=1) for s, n in zip(starts, sizes)]
            for g, tokens in zip(levels, out):
                assert torch.equal(tokens, alone[g]), (levels, concat, g)


@pytest.mark.parametrize("call, err, words", [
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), [w, w], levels=(2, 4, 8)), ValueError,
     "weights must have one entry per level (3)"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), w, levels=()), ValueError, "non-empty"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), w, levels=(0,)), ValueError, "levels[0]"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), w, levels=((2, 3, 4),)), ValueError, "levels[0]"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), [w, torch.zeros(5, 3, 2, 2)], levels=(2, 4)),
     ValueError, "weights[1] must be (D, C, p, p) = (4, 3, p, p)"),
    (lambda w: pyramid_tokenize(torch.rand(1, 1, 16, 16), w), ValueError, "C=3"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), w, None, [torch.zeros(4, 4)], levels=(4,)),
     ValueError, "pos_embeds[0] must have 16 rows"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), w, None, torch.zeros(15, 4), levels=(4,)),
     ValueError, "square number"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), w, levels=(4, 8), level_embed=torch.zeros(3, 4)),
     ValueError, "level_embed must have 2 rows"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), None), TypeError, "weights must be a tensor"),
    (lambda w: pyramid_tokenize(torch.rand(1, 3, 16, 16), w, concat=1), TypeError, "concat must be a bool"),
])
def test_bad_input(call, err, words):
    with pytest.raises(err) as info:
        call(torch.zeros(4, 3, 2, 2))
    assert words in str(info.value)
