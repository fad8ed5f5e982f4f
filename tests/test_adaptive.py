"""Adaptive patch sizes: the entropy kernel against its reference (bit for bit), quadtree coverage
(hypothesis), packing round trips, the extremes, relevance maps, bad input and AOT compiles."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_close
from vtok_fast.encode import adaptive as A
from vtok_fast.encode.adaptive import (adaptive_tokenize, adaptive_tokenize_reference, box_relevance,
                                       patch_entropy, patch_entropy_reference, quadtree_select, scale_grids)
from vtok_fast.encode.packed import PackedTokens
from vtok_fast.encode.patch_embed import patch_embed

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def exact_weights(dim, p, gen=None):
    """Weights, bias, table and prefix in multiples of 1/8 with small magnitudes: with pixels in
    multiples of 1/64 every product and sum is exact in fp32, in any order."""
    def draw(*shape):
        return torch.randint(-4, 5, shape, generator=gen).float() / 8
    return draw(dim, 3, p, p), draw(dim), draw


def exact_images(batch, h, w, gen=None):
    """Float pixels k/16 in [0, 1) (exact; their 2x2 / 4x4 means are exact too)."""
    return torch.randint(0, 16, (batch, 3, h, w), generator=gen).float() / 16


def structured_uint8(batch, h, w, gen):
    """Noise with a flat block and a two-tone block: low- and high-entropy regions."""
    x = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=gen)
    x[:, :, : h // 2, : w // 2] = 90
    x[:, :, h // 2:, : w // 3] = torch.tensor([0, 255], dtype=torch.uint8).repeat(w)[: w // 3]
    return x


# --- the score ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
@pytest.mark.parametrize("p, scales, size", [(4, 3, (21, 18)), (3, 2, (7, 13))])
def test_entropy_kernel_equals_reference_exactly(dtype, p, scales, size, backend):
    gen = torch.Generator().manual_seed(0)
    x = structured_uint8(2, *size, gen)
    images = x if dtype == torch.uint8 else (x.float() / 255).to(dtype)
    images = images.to(memory_format=torch.channels_last)  # strides are honoured
    got = A._patch_entropy_op(images, p, scales)
    expected = patch_entropy_reference(images.contiguous(), p, scales)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)
    # x / 255 scores exactly like x (float pixels are read as round(v * 255))
    assert torch.equal(patch_entropy_reference(x.float() / 255, p, scales),
                       patch_entropy_reference(x, p, scales))


def test_out_of_range_pixels_are_clamped_and_nan_is_zero(backend):
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(1, 3, 8, 8, generator=gen) * 1.6 - 0.3  # some below 0, some above 1
    x[0, :, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    expected = x.nan_to_num(nan=0.0).clamp(0, 1)
    got = A._patch_entropy_op(x, 4, 2)
    assert torch.equal(got, patch_entropy_reference(x, 4, 2))
    assert torch.equal(got, patch_entropy_reference(expected, 4, 2))


def test_entropy_known_values(backend):
    x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)  # gray = pixel value: R = G = B
    x[..., :4, 4:8] = 255  # top right: white
    x[..., 4:6, 4:8] = 255  # bottom right: half white, half black
    x[..., 4:8, 0:4] = torch.tensor([0, 60, 120, 200], dtype=torch.uint8)  # bottom left: 4 values
    fine, coarse = patch_entropy(x, 4, 2)
    assert fine[0].tolist() == [[0.0, 0.0], [2.0, 1.0]]  # exact, in bits
    counts = torch.tensor([16 + 8 + 4, 16 + 8, 4, 4, 4], dtype=torch.float64)  # 0, 255, 60, 120, 200
    probs = counts / 64
    assert coarse.shape == (1, 1, 1)
    assert coarse.item() == pytest.approx(float(-(probs * probs.log2()).sum()), abs=1e-6)


def test_entropy_is_bits_of_512_bins():
    # 512 pixels, one per bin, is the largest entropy: 9 bits
    gray = torch.arange(512) * 255 * 10_000 // 512 + 1  # 1e4 * gray in every bin
    assert torch.equal(gray * 512 // A.BIN_DIVISOR, torch.arange(512))
    bins = torch.arange(512).view(1, 1, 512)
    table = A.entropy_table(512, "cpu")
    counts = torch.zeros(1, 1, 512, dtype=torch.int64).scatter_add_(2, bins, torch.ones_like(bins))
    assert A._entropy_from_counts(counts, 512, table).item() == 9.0


# --- the quadtree -----------------------------------------------------------------------------------

def quadtree_by_recursion(entropy, thresholds, grids):
    """The reference page's rule for one image, top-down: {(scale, r, c)} of the chosen patches.
    Roots: every complete patch not inside a complete patch one scale up."""
    chosen = set()

    def visit(s, r, c):
        if s == 0 or entropy[s][r][c] < thresholds[s - 1]:
            chosen.add((s, r, c))
            return
        for dr in (0, 1):
            for dc in (0, 1):
                visit(s - 1, 2 * r + dr, 2 * c + dc)

    S = len(grids)
    for s in range(S - 1, -1, -1):
        gh, gw = grids[s]
        up = grids[s + 1] if s + 1 < S else (0, 0)
        for r in range(gh):
            for c in range(gw):
                if r >= 2 * up[0] or c >= 2 * up[1]:
                    visit(s, r, c)
    return chosen


def coverage(packed: PackedTokens):
    """(B, gh, gw) count of tokens covering each base cell, from the token metadata alone."""
    gh, gw = packed.grid_size
    counts = torch.zeros(packed.batch_size, gh, gw, dtype=torch.long)
    image = packed.seq_index()
    for t in range(packed.tokens.shape[0]):
        s = int(packed.scale[t])
        if s < 0:
            continue
        k = 1 << s
        r, c = int(packed.row[t]), int(packed.col[t])
        assert r % k == 0 and c % k == 0  # a patch of its scale's grid
        counts[image[t], r: r + k, c: c + k] += 1
    return counts


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), p=st.integers(1, 3), scales=st.integers(2, 3),
       extra_h=st.integers(0, 9), extra_w=st.integers(0, 9), batch=st.integers(1, 2),
       levels=st.sampled_from([1, 2, 4, 256]),
       thresholds=st.lists(st.one_of(st.floats(0, 9.5), st.just(math.inf)), min_size=2, max_size=2))
def test_quadtree_covers_every_pixel_exactly_once(seed, p, scales, extra_h, extra_w, batch, levels,
                                                 thresholds, torch_backend):
    gen = torch.Generator().manual_seed(seed)
    largest = p << (scales - 1)
    H, W = largest + extra_h * p + extra_h % p, largest + extra_w * p
    x = torch.randint(0, levels, (batch, 3, H, W), generator=gen) * (255 // max(levels - 1, 1))
    x = x.to(torch.uint8)
    weight, bias, _ = exact_weights(2, p, gen)
    thresholds = thresholds[: scales - 1]
    packed = adaptive_tokenize(x, weight, bias, num_scales=scales, thresholds=thresholds)

    gh, gw = H // p, W // p
    assert packed.grid_size == (gh, gw)
    assert bool((coverage(packed) == 1).all())  # every pixel of the base grid exactly once
    assert bool((packed.cell_index() >= 0).all())
    entropy = patch_entropy(x, p, scales)
    grids = scale_grids(H, W, p, scales)
    image = packed.seq_index()
    for b in range(batch):
        rows = image == b
        got = {(int(s), int(r) >> int(s), int(c) >> int(s)) for s, r, c in
               zip(packed.scale[rows], packed.row[rows], packed.col[rows]) if s >= 0}
        assert got == quadtree_by_recursion([e[b].tolist() for e in entropy], thresholds, grids)


def test_thresholds_at_the_extremes(backend):
    gen = torch.Generator().manual_seed(1)
    p, S = 2, 3
    x = structured_uint8(2, 18, 13, gen)  # 9x6 base grid; 4p grid 2x1; 2p grid 4x3
    weight, bias, draw = exact_weights(4, p, gen)
    pos = draw(1 + 9 * 6, 4)
    prefix = draw(1, 4)
    fine = adaptive_tokenize(x, weight, bias, pos, num_scales=S, thresholds=[0.0, 0.0], prefix=prefix)
    assert fine.counts.tolist() == [1 + 54] * 2
    # all-fine: exactly the fixed-grid patch embedding, in the same order
    expected = patch_embed(x, weight, bias, pos, prefix)
    assert_close(fine.tokens, expected.reshape(-1, 4).double(), reduction=3 * p * p)
    assert fine.scale.tolist() == ([-1] + [0] * 54) * 2

    coarse = adaptive_tokenize(x, weight, bias, num_scales=S, thresholds=[math.inf, math.inf])
    # all-coarse: the 2x1 grid of 8-px patches; the 4-px grid (4x3) adds its column 2, which no
    # 8-px patch covers; the base grid (9x6) adds its row 8, which no 4-px patch covers
    scales = coarse.scale[: int(coarse.counts[0])].tolist()
    assert scales.count(2) == 2 and scales.count(1) == 4 * 3 - 2 * 4 and scales.count(0) == 6
    assert bool((coverage(coarse) == 1).all())


def test_flat_image_gets_fewer_tokens_than_noise(backend):
    gen = torch.Generator().manual_seed(2)
    noisy = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=gen)
    flat = torch.full_like(noisy, 128)
    weight, bias, _ = exact_weights(4, 4, gen)
    n = [adaptive_tokenize(x, weight, bias, num_scales=2, thresholds=[4.5]).counts.item()
         for x in (flat, noisy)]
    assert n == [4, 16]


def test_relevance_keeps_its_region_fine(torch_backend):
    p = 2
    x = torch.full((1, 3, 16, 16), 40, dtype=torch.uint8)  # flat: everything coarsens
    weight, bias, _ = exact_weights(4, p)
    kwargs = dict(num_scales=3, thresholds=[4.5, 4.5])
    assert adaptive_tokenize(x, weight, bias, **kwargs).counts.item() == 4  # four 8-px patches
    fine_cells = []
    for box in [(0, 0, 3, 3), (12, 10, 16, 16)]:
        rel = box_relevance(16, 16, box)
        packed = adaptive_tokenize(x, weight, bias, relevance=rel, **kwargs)
        grid_scale = packed.scale[packed.cell_index()[0]]  # (gh, gw) scale covering each cell
        x0, y0, x1, y1 = box
        inside = grid_scale[y0 // p: -(-y1 // p), x0 // p: -(-x1 // p)]
        assert bool((inside == 0).all())  # the box's cells are base patches
        fine_cells.append(set(map(tuple, (grid_scale == 0).nonzero().tolist())))
        assert bool((coverage(packed) == 1).all())
    assert fine_cells[0] and fine_cells[1] and not fine_cells[0] & fine_cells[1]
    # a per-base-patch map gives the same result as the pixel map it summarizes
    rel_cells = torch.zeros(8, 8)
    rel_cells[5:, 6:] = 1
    a = adaptive_tokenize(x, weight, bias, relevance=rel_cells, **kwargs)
    b = adaptive_tokenize(x, weight, bias, relevance=box_relevance(16, 16, (12, 10, 16, 16)), **kwargs)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.row, b.row)
    # a soft map adds relevance_weight * relevance bits
    half = torch.full((16, 16), 0.5)
    assert adaptive_tokenize(x, weight, bias, relevance=half, **kwargs).counts.item() == 64  # 0 + 5 bits
    assert adaptive_tokenize(x, weight, bias, relevance=half, relevance_weight=1.0,
                             **kwargs).counts.item() == 4  # 0 + 0.5 bits < 4.5


def test_fast_path_equals_reference(backend):
    gen = torch.Generator().manual_seed(3)
    p, S = 2, 3
    x = structured_uint8(2, 17, 12, gen)
    images = (x.float() / 255 * 16).floor() / 16  # multiples of 1/16: exact sums
    weight, bias, draw = exact_weights(4, p, gen)
    pos, prefix = draw(2 + 8 * 6, 4), draw(2, 4)
    kwargs = dict(num_scales=S, thresholds=[4.0, 3.0], prefix=prefix)
    got = adaptive_tokenize(images, weight, bias, pos, **kwargs)
    ref = adaptive_tokenize_reference(images, weight, bias, pos, **kwargs)
    for name in ("cu_seqlens", "scale", "row", "col"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert set(got.scale.tolist()) == {-1, 0, 1, 2}  # every kind of token is there
    assert torch.equal(got.tokens, ref.tokens)  # exact arithmetic: bit for bit


def test_uint8_with_mean_std_matches_reference(backend):
    gen = torch.Generator().manual_seed(4)
    x = structured_uint8(2, 16, 20, gen)
    weight = torch.randn(6, 3, 4, 4, generator=gen)
    pos = torch.randn(20, 6, generator=gen)
    kwargs = dict(num_scales=2, thresholds=[6.0], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    got = adaptive_tokenize(x, weight, None, pos, **kwargs)
    ref = adaptive_tokenize_reference(x, weight, None, pos, **kwargs)
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.cu_seqlens, ref.cu_seqlens)
    assert got.tokens.dtype == torch.float32
    assert_close(got.tokens, ref.tokens.double(), reduction=48)
    # the score reads raw pixels: normalization does not change the selection
    plain = adaptive_tokenize(x, weight, num_scales=2, thresholds=[6.0])
    assert torch.equal(plain.scale, got.scale)


def test_tokens_get_gradients(torch_backend):
    x = structured_uint8(1, 8, 8, torch.Generator().manual_seed(5))
    weight = torch.randn(4, 3, 2, 2, requires_grad=True)
    pos = torch.randn(16, 4, requires_grad=True)
    prefix = torch.randn(1, 4, requires_grad=True)
    packed = adaptive_tokenize(x, weight, None, pos, num_scales=2, thresholds=[3.0], prefix=prefix)
    packed.tokens.sum().backward()
    assert weight.grad is not None and prefix.grad.tolist() == [[1.0] * 4]
    # a token's position row is the mean of its k x k cells' rows: each cell gets 1 / k**2
    k = 1 << packed.scale[packed.cell_index()[0]]  # (4, 4) patch side of the covering token
    assert set(k.flatten().tolist()) == {1, 2}
    assert torch.equal(pos.grad, (1.0 / k.float() ** 2).reshape(16, 1).expand(16, 4))


# --- packing ------------------------------------------------------------------------------------

def test_packed_round_trips(torch_backend):
    gen = torch.Generator().manual_seed(6)
    x = structured_uint8(3, 12, 16, gen)
    x[1] = 7  # a flat image: a different length
    weight, bias, draw = exact_weights(5, 2, gen)
    packed = adaptive_tokenize(x, weight, bias, num_scales=3, thresholds=[5.0, 4.0], prefix=draw(1, 5))
    counts = packed.counts
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens[0] == 0
    assert len(set(counts.tolist())) > 1 and packed.max_seqlen == int(counts.max())

    grid = packed.to_grid()  # (B, gh, gw, D)
    assert grid.shape == (3, 6, 8, 5)
    image = packed.seq_index()
    for t in range(packed.tokens.shape[0]):
        s = int(packed.scale[t])
        if s >= 0:
            k = 1 << s
            r, c = int(packed.row[t]), int(packed.col[t])
            cells = grid[image[t], r: r + k, c: c + k]
            assert torch.equal(cells, packed.tokens[t].expand_as(cells))

    padded, mask = packed.to_padded()
    assert padded.shape == (3, packed.max_seqlen, 5) and mask.sum(1).tolist() == counts.tolist()
    assert torch.equal(padded[mask], packed.tokens)
    assert bool((padded[~mask] == 0).all())

    source = packed.source_map()  # (B, 1 + gh * gw), numbered within each image
    assert source.shape == (3, 1 + 48)
    starts = packed.cu_seqlens.long()[:-1, None]
    assert torch.equal(source[:, 1:] + starts, packed.cell_index().flatten(1))
    assert torch.equal(packed.to_grid(packed.tokens * 2), grid * 2)


def small_packed(**overrides):
    """Two images on a 2x2 grid, one prefix token each: image 0 as four base tokens, image 1 as
    one scale-1 token."""
    fields = dict(tokens=torch.randn(7, 3), cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32),
                  scale=torch.tensor([-1, 0, 0, 0, 0, -1, 1]), row=torch.tensor([-1, 0, 0, 1, 1, -1, 0]),
                  col=torch.tensor([-1, 0, 1, 0, 1, -1, 0]), grid_size=(2, 2), patch_size=4,
                  num_prefix_tokens=1, num_scales=2)
    fields.update({k: torch.tensor(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return PackedTokens(**fields)


@pytest.mark.parametrize("overrides, err, words", [
    (dict(cu_seqlens=[0, 5, 6]), ValueError, "cu_seqlens must rise from 0 to the token count 7"),
    (dict(cu_seqlens=[0, 5, 8]), ValueError, "token count 7"),
    (dict(cu_seqlens=[1, 5, 7]), ValueError, "cu_seqlens must rise from 0"),
    (dict(cu_seqlens=[0, 6, 5, 7]), ValueError, "without ever decreasing, got [0, 6, 5, 7]"),
    (dict(cu_seqlens=[0.0, 5.0, 7.0]), TypeError, "cu_seqlens must have dtype"),
    (dict(row=[-1, 0, 0, 2, 1, -1, 0]), ValueError, "inside the 2x2 grid; got token 3 with scale 0, row 2"),
    (dict(col=[-1, 0, -1, 0, 1, -1, 0]), ValueError, "inside the 2x2 grid; got token 2"),
    # a scale-1 square at col 1 would spill into the next row's cells (silently, before)
    (dict(col=[-1, 0, 1, 0, 1, -1, 1]), ValueError, "inside the 2x2 grid; got token 6 with scale 1"),
    (dict(scale=[-1, 0, 0, 0, 0, -1, 2]), ValueError, "scale must be -1 (prefix) or in [0, num_scales)"),
    (dict(scale=[0, -1, 0, 0, 0, -1, 1]), ValueError, "first num_prefix_tokens = 1 tokens"),
    (dict(row=[0, 0, 0, 1, 1, -1, 0]), ValueError, "prefix tokens must have row = col = -1"),
    (dict(row=[-1, 0, 0, 0, 1, -1, 0]), ValueError, "image 0's cell (row 0, col 0) is covered 2 times"),
    (dict(grid_size=(2, 3)), ValueError, "cell (row 0, col 2) is covered 0 times"),
    (dict(grid_size=(2, 0)), ValueError, "grid_size[1] must be >= 1"),
    (dict(num_scales=2.0), TypeError, "num_scales must be an int"),
])
def test_packed_tokens_checks_its_layout(overrides, err, words):
    small_packed()  # the unchanged layout is valid
    with pytest.raises(err) as info:
        small_packed(**overrides)
    assert words in str(info.value)


def test_packed_tokens_with_tokens_checks_the_rows():
    packed = small_packed()
    assert torch.equal(packed.with_tokens(torch.ones(7, 5)).to_grid()[1], torch.ones(2, 2, 5))
    with pytest.raises(ValueError, match=r"tokens must have one row per packed token \(7\)"):
        packed.with_tokens(torch.ones(6, 5))


def test_empty_batch(backend):
    weight, bias, draw = exact_weights(4, 4)
    for fn in (adaptive_tokenize, adaptive_tokenize_reference):
        packed = fn(torch.zeros(0, 3, 16, 16, dtype=torch.uint8), weight, bias, num_scales=2,
                    thresholds=[4.5], prefix=draw(1, 4))
        assert packed.tokens.shape == (0, 4) and packed.cu_seqlens.tolist() == [0]
        assert packed.to_grid().shape == (0, 4, 4, 4) and packed.to_padded()[0].shape == (0, 0, 4)


# --- bad input ----------------------------------------------------------------------------------

def _call(**overrides):
    args = dict(images=torch.zeros(1, 3, 16, 16, dtype=torch.uint8), weight=torch.zeros(4, 3, 4, 4),
                num_scales=2, thresholds=[4.5])
    args.update(overrides)
    images, weight = args.pop("images"), args.pop("weight")
    return adaptive_tokenize(images, weight, **args)


@pytest.mark.parametrize("overrides, err, words", [
    (dict(thresholds=[4.5, 3.0]), ValueError, "thresholds must have num_scales - 1 = 1 values"),
    (dict(num_scales=3, thresholds=[4.5]), ValueError, "num_scales - 1 = 2"),
    (dict(thresholds="4.5"), TypeError, "thresholds must be a sequence"),
    (dict(thresholds=[float("nan")]), ValueError, "NaN"),
    (dict(images=torch.zeros(1, 3, 16, 7, dtype=torch.uint8)), ValueError, "at least the largest patch (8x8"),
    (dict(num_scales=4, thresholds=[1, 1, 1]), ValueError, "largest patch (32x32"),
    (dict(images=torch.zeros(1, 1, 16, 16)), ValueError, "images must be RGB"),
    (dict(images=torch.zeros(1, 4, 16, 16)), ValueError, "4 channels"),
    (dict(images=torch.zeros(3, 16, 16)), ValueError, "(B, 3, H, W)"),
    (dict(images=torch.zeros(1, 3, 16, 16, dtype=torch.int32)), TypeError, "images must have dtype"),
    (dict(relevance=torch.zeros(15, 16)), ValueError, "relevance must be (H, W) = (16, 16) per pixel"),
    (dict(relevance=torch.zeros(2, 16, 16)), ValueError, "batch 1 or B = 1"),
    (dict(relevance=torch.full((4, 4), 2.0)), ValueError, "relevance values must be in [0, 1]"),
    (dict(relevance=torch.zeros(4, 4, dtype=torch.long)), TypeError, "float or bool"),
    (dict(patch_size=8), ValueError, "patch_size must be the weight's patch side 4"),
    (dict(pos_embed=torch.zeros(15, 4)), ValueError, "pos_embed must have gh * gw = 16 rows"),
    (dict(pos_embed=torch.zeros(16, 5)), ValueError, "width D=4"),
    (dict(prefix=torch.zeros(1, 4, dtype=torch.float16)), TypeError, "prefix must have the weight's dtype"),
    (dict(relevance_weight=-1.0), ValueError, "relevance_weight"),
    (dict(weight=torch.zeros(4, 3, 4, 2)), ValueError, "square patch"),
])
def test_bad_input(overrides, err, words):
    with pytest.raises(err) as info:
        _call(**overrides)
    assert words in str(info.value)


def test_box_relevance():
    rel = box_relevance(4, 6, (1, 2, 3, 9))
    assert rel.sum().item() == 4 and rel[2:, 1:3].eq(1).all()
    with pytest.raises(ValueError, match="x0 < x1"):
        box_relevance(4, 4, (3, 0, 1, 2))
    with pytest.raises(ValueError, match="4 numbers"):
        box_relevance(4, 4, (0, 0, 1))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_box_relevance_refuses_non_finite_coordinates(value):
    for i in range(4):
        box = [0.0, 0.0, 3.0, 3.0]
        box[i] = value
        with pytest.raises(ValueError, match=r"box must be 4 finite numbers \(x0, y0, x1, y1\)"):
            box_relevance(4, 4, box)


def test_box_relevance_checks_its_size():
    with pytest.raises(TypeError, match="height must be an int"):
        box_relevance(4.0, 4, (0, 0, 1, 1))
    with pytest.raises(ValueError, match="width must be >= 0"):
        box_relevance(4, -1, (0, 0, 1, 1))


def test_quadtree_select_needs_two_scales():
    with pytest.raises(ValueError, match="at least two scales"):
        quadtree_select([None], [], [(2, 2)])


def test_entropy_op_compiles_fullgraph(torch_backend):
    images = structured_uint8(1, 8, 8, torch.Generator().manual_seed(7))
    compiled = torch.compile(lambda x: A._patch_entropy_op(x, 2, 2), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(images), patch_entropy_reference(images, 2, 2))


# --- ahead-of-time compilation for sm_80 / sm_90 ---------------------------------------------------

IMAGE_TYPES = {"uint8": "*u8", "float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def aot_compile_all(arch: int) -> list[dict]:
    """Every config x image dtype of the entropy kernel, compiled as launched (unit pixel stride
    specialized, no FMA contraction); one record per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from helpers import config_constexprs
    from vtok_fast.kernels.adaptive import ENTROPY_CONFIGS, patch_entropy_fwd

    fn = patch_entropy_fwd.fn
    records = []
    for config in ENTROPY_CONFIGS:
        for dtype, ptr in IMAGE_TYPES.items():
            consts, warps, stages = config_constexprs(config)
            consts.update(NUM_SCALES=3, IS_FLOAT=dtype != "uint8", GRAY_R=A.GRAY_WEIGHTS[0],
                          GRAY_G=A.GRAY_WEIGHTS[1], GRAY_B=A.GRAY_WEIGHTS[2], BIN_DIVISOR=A.BIN_DIVISOR,
                          NUM_BINS=A.NUM_BINS, FRAC_BITS=A.FRAC_BITS, stride_iw=1, stride_ot=1)
            types = dict(out_ptr="*fp32", img_ptr=ptr, table_ptr="*i64")
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            names = fn.arg_names
            src = ASTSource(fn=fn, signature=sig,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            rec = {"what": f"{consts['BLOCK_K']} warps={warps} {dtype}", "dtype": dtype}
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": warps, "num_stages": stages,
                                                   "enable_fp_fusion": False})
                ptx = compiled.asm["ptx"]
                rec.update(shared=compiled.metadata.shared, fma="fma.rn.f32" in ptx)
            except Exception as exc:  # reported by the test
                rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
            records.append(rec)
    return records


# --- real GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_cuda_entropy_equals_reference(dtype):
    gen = torch.Generator().manual_seed(8)
    x = structured_uint8(4, 336, 336, gen)
    images = (x if dtype == torch.uint8 else (x.float() / 255).to(dtype)).cuda()
    got = A._patch_entropy_op(images, 14, 3)
    assert torch.equal(got.cpu(), patch_entropy_reference(images.cpu(), 14, 3))
    weight = torch.randn(64, 3, 14, 14, generator=gen).cuda()
    packed = adaptive_tokenize(images, weight, num_scales=3, thresholds=[6.0, 4.0])
    ref = adaptive_tokenize_reference(images.cpu(), weight.cpu(), num_scales=3, thresholds=[6.0, 4.0])
    assert torch.equal(packed.scale.cpu(), ref.scale) and torch.equal(packed.row.cpu(), ref.row)
    assert_close(packed.tokens.cpu(), ref.tokens.double(), dtype=torch.float32, reduction=588)
