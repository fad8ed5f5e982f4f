"""vtok_fast.reduce: the compression API and every method against its reference (peers' code where
importable, the official algorithms' per-image loops, or a direct definition), budgets, index
invariants, prefix handling, B=1 and B>1, and bad inputs."""
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_close
from vtok_fast.bench.compress import prumerge_official, tome_reference, visionzip_official
from vtok_fast.reduce.attention_scores import attention_scores_reference
from vtok_fast.reduce.compress import METHODS, compress
from vtok_fast.reduce.compressed import Compressed
from vtok_fast.reduce.merge import tome
from vtok_fast.reduce.pool import pixel_shuffle, pool
from vtok_fast.reduce.prumerge import prumerge, prumerge_plus, spatial_samples
from vtok_fast.reduce.select import attn_topk, visionzip

BATCHES = [1, 3]


def check_invariants(c: Compressed, tokens, prefix, *, drops=False, sorted_positions=False):
    """What every result promises: shapes and dtypes, the prefix kept, indices in range, sizes that
    count the source map (summing to N unless tokens are dropped), positions held by their slot,
    ragged padding."""
    batch, num_tokens, _ = tokens.shape
    num_out = c.tokens.shape[1]
    assert c.positions.shape == c.sizes.shape == (batch, num_out)
    assert c.source.shape == (batch, num_tokens)
    for t in (c.positions, c.sizes, c.source):
        assert t.dtype == torch.int64
    if prefix:
        assert torch.equal(c.tokens[:, :prefix], tokens[:, :prefix])
    assert torch.equal(c.positions[:, :prefix], torch.arange(prefix).expand(batch, prefix))
    assert torch.equal(c.source[:, :prefix], torch.arange(prefix).expand(batch, prefix))
    assert (c.sizes[:, :prefix] == 1).all()
    valid = torch.full((batch,), num_out) if c.counts is None else c.counts
    assert ((c.source >= -1) & (c.source < valid[:, None])).all()
    assert (drops or (c.source >= 0).all()), "a merging method dropped a token"
    held = c.source >= 0
    counted = torch.zeros(batch, num_out + 1, dtype=torch.int64).scatter_add_(
        1, torch.where(held, c.source, num_out), held.long())[:, :num_out]
    assert torch.equal(c.sizes, counted)
    assert torch.equal(c.sizes.sum(1) + (~held).sum(1), torch.full((batch,), num_tokens))
    assert ((c.positions >= -1) & (c.positions < num_tokens)).all()
    for b in range(batch):
        slots = torch.nonzero(c.positions[b] >= 0).flatten()
        assert torch.equal(c.source[b, c.positions[b, slots]], slots)  # a positioned token holds itself
        if sorted_positions:
            assert (c.positions[b, slots].diff() > 0).all()
        if c.counts is not None:
            pad = slice(int(c.counts[b]), num_out)
            assert (c.tokens[b, pad] == 0).all() and (c.positions[b, pad] == -1).all()
            assert (c.sizes[b, pad] == 0).all()


def _tokens(batch, prefix, grid, dim=16, dtype=torch.float32):
    return torch.randn(batch, prefix + grid[0] * grid[1], dim).to(dtype)


# --- pool ----------------------------------------------------------------------------------------------

def _pool_windows(patches, h, w, s, mode, ceil_mode):
    """Direct definition: every s×s window (partial windows with ceil_mode) reduced by mean/max."""
    grid = patches.reshape(patches.shape[0], h, w, -1)
    oh, ow = (-(-h // s), -(-w // s)) if ceil_mode else (h // s, w // s)
    out = []
    for i in range(oh):
        for j in range(ow):
            window = grid[:, i * s:(i + 1) * s, j * s:(j + 1) * s].flatten(1, 2).double()
            out.append(window.mean(1) if mode == "avg" else window.amax(1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("mode,ceil_mode", [("avg", False), ("max", False), ("avg", True), ("max", True)])
@pytest.mark.parametrize("grid,stride", [((6, 6), 2), ((7, 5), 2), ((9, 9), 3), ((5, 8), 4)])
def test_pool_matches_window_definition(batch, prefix, mode, ceil_mode, grid, stride):
    tokens = _tokens(batch, prefix, grid)
    c = pool(tokens, stride, mode, grid=grid, prefix=prefix, ceil_mode=ceil_mode)
    expected = _pool_windows(tokens[:, prefix:], *grid, stride, mode, ceil_mode)
    torch.testing.assert_close(c.tokens[:, prefix:].double(), expected, rtol=1e-6, atol=1e-6)
    divisible = grid[0] % stride == 0 and grid[1] % stride == 0
    check_invariants(c, tokens, prefix, drops=not (ceil_mode or divisible))
    assert (c.positions[:, prefix:] == -1).all()
    h, w = grid
    rows, cols = torch.arange(h)[:, None] // stride, torch.arange(w)[None, :] // stride
    ow = c.tokens.shape[1] - prefix
    ow = ow // (-(-h // stride) if ceil_mode else h // stride)
    inside = (rows * stride + stride <= h) & (cols * stride + stride <= w) | ceil_mode
    expected_source = torch.where(inside, prefix + rows * ow + cols, -1).flatten()
    assert torch.equal(c.source[0, prefix:], expected_source)


def test_pool_counts_of_the_reference_page():
    siglip = _tokens(1, 0, (27, 27), dim=4)
    assert pool(siglip, 2, "avg").tokens.shape[1] == 169  # avg floors
    c = pool(siglip, 2, "bilinear")
    assert c.tokens.shape[1] == 196  # LLaVA-Video: bilinear with ceil
    check_invariants(c, siglip, 0)
    assert pool(_tokens(2, 1, (24, 24), dim=4), 2, prefix=1).tokens.shape[1] == 1 + 144


def _onevision_bilinear(patches, grid):
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=grid, patch_size=1)))
    return LlavaOnevisionModel.apply_pooling(owner, patches)


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("grid", [27, 24, 5])
def test_bilinear_matches_transformers_llava_onevision(prefix, grid):
    tokens = _tokens(2, prefix, (grid, grid))
    c = pool(tokens, 2, "bilinear", prefix=prefix)
    torch.testing.assert_close(c.tokens[:, prefix:], _onevision_bilinear(tokens[:, prefix:].contiguous(), grid))
    check_invariants(c, tokens, prefix)
    # every input is held by the output cell containing its centre
    oh = -(-grid // 2)
    cell = (torch.arange(grid) + 0.5) * oh / grid
    rows = cell.floor().long()
    assert torch.equal(c.source[0, prefix:], prefix + (rows[:, None] * oh + rows[None, :]).flatten())


def test_avg_and_max_match_transformers_llava_next_video_pooler():
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    tokens = _tokens(2, 0, (24, 24), dim=8)
    for mode, name in (("avg", "average"), ("max", "max")):
        vision = SimpleNamespace(image_size=24, patch_size=1, hidden_size=8)
        pooler = LlavaNextVideoPooler(SimpleNamespace(spatial_pool_mode=name, spatial_pool_stride=2,
                                                      vision_config=vision))
        torch.testing.assert_close(pool(tokens, 2, mode).tokens, pooler(tokens))


def test_pool_half_precision_and_gradient():
    tokens = _tokens(2, 1, (4, 4), dtype=torch.float16)
    assert pool(tokens, 2, prefix=1).tokens.dtype == torch.float16
    x = _tokens(2, 1, (4, 4)).requires_grad_()
    pool(x, 2, prefix=1).tokens.sum().backward()
    assert torch.equal(x.grad[:, 0], torch.ones(2, 16)) and torch.allclose(x.grad[:, 1:], torch.full((2, 16, 16), 0.25))


# --- pixel shuffle -------------------------------------------------------------------------------------

def _internvl_pixel_shuffle(patches, h, w, scale):
    from transformers.models.internvl.modeling_internvl import InternVLModel

    y = InternVLModel.pixel_shuffle(None, patches.reshape(patches.shape[0], h, w, -1), scale_factor=scale)
    return y.reshape(patches.shape[0], -1, y.shape[-1])


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("grid,stride", [((8, 8), 2), ((4, 6), 2), ((6, 6), 3)])
def test_pixel_shuffle_matches_transformers_internvl(batch, grid, stride):
    tokens = _tokens(batch, 0, grid)
    c = pixel_shuffle(tokens, stride, grid=grid)
    assert c.tokens.shape == (batch, grid[0] * grid[1] // stride ** 2, 16 * stride ** 2)
    if stride == 2:  # transformers accepts only scale factors whose float division is exact
        assert torch.equal(c.tokens, _internvl_pixel_shuffle(tokens, *grid, 0.5))
    h, w = grid  # the definition: each window's tokens concatenated row-major
    windows = [torch.cat([tokens[:, (i * stride + di) * w + j * stride + dj] for di in range(stride)
                          for dj in range(stride)], dim=-1)
               for i in range(h // stride) for j in range(w // stride)]
    assert torch.equal(c.tokens, torch.stack(windows, 1))
    check_invariants(c, tokens, 0)
    assert (c.sizes == stride ** 2).all() and (c.positions == -1).all()


def test_pixel_shuffle_channel_order():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # 4x4 grid, token value = its index
    c = pixel_shuffle(tokens)
    assert c.tokens[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


# --- ToMe ----------------------------------------------------------------------------------------------

def _groups(tokens, source, prefix):
    """{frozenset of original patch indices: output token} of the patch outputs."""
    out = {}
    for slot in source.unique().tolist():
        if slot >= prefix:
            members = frozenset(torch.nonzero(source == slot).flatten().tolist())
            out[members] = tokens[slot]
    return out


def _reference_groups(x, metric, keep, prefix):
    """Reference ToMe rounds (bipartite_soft_matching + merge_wavg) with merge_source tracking."""
    import vtok_fast

    dim = x.shape[-1]
    patches, size, source = torch.cat([x, metric], -1)[:, prefix:], None, None
    while patches.shape[1] > keep:
        r = min(patches.shape[1] - keep, patches.shape[1] // 2)
        merge, _ = vtok_fast.bipartite_soft_matching(patches[..., dim:], r)
        source = vtok_fast.merge_source(merge, patches, source)
        patches, size = vtok_fast.merge_wavg(merge, patches, size)
    return patches[..., :dim], source


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize("keep", [30, 17, 5, 1])
def test_tome_matches_reference_rounds(backend, batch, prefix, keep):
    tokens, metric = _tokens(batch, prefix, (6, 6)), _tokens(batch, prefix, (6, 6), dim=8)
    c = tome(tokens, keep, metric=metric, prefix=prefix)
    assert c.tokens.shape == (batch, prefix + keep, 16)
    check_invariants(c, tokens, prefix)
    ref_tokens, ref_source = _reference_groups(tokens, metric, keep, prefix)
    for b in range(batch):
        ours = _groups(c.tokens[b], c.source[b, prefix:], prefix)
        ref = {frozenset(torch.nonzero(row).flatten().tolist()): ref_tokens[b, i]
               for i, row in enumerate(ref_source[b])}
        assert ours.keys() == ref.keys()
        for members, value in ours.items():
            torch.testing.assert_close(value, ref[members], rtol=1e-5, atol=1e-6)
        # a merged token sits at one of its members (its destination)
        for slot in range(prefix, prefix + keep):
            assert c.source[b, c.positions[b, slot]] == slot


def test_tome_budgets_and_bench_reference(backend):
    tokens = _tokens(2, 1, (8, 8))
    assert tome(tokens, r=40, prefix=1).tokens.shape[1] == 1 + 24
    assert tome(tokens, ratio=0.25, prefix=1).tokens.shape[1] == 1 + 16
    assert tome(tokens, 64, prefix=1).tokens.shape[1] == 65  # nothing to merge
    c = tome(tokens, 10, prefix=1)  # metric defaults to the tokens
    ref = tome_reference(tokens, tokens, 10, 1)
    for b in range(2):
        ours = sorted(c.tokens[b].tolist())
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(sorted(ref[b].tolist())), rtol=1e-5, atol=1e-6)


def test_tome_gradient_flows_to_tokens():
    tokens = _tokens(2, 1, (4, 4)).requires_grad_()
    tome(tokens, 4, prefix=1).tokens.sum().backward()
    torch.testing.assert_close(tokens.grad.sum(), torch.tensor(2.0 * 5 * 16))  # weights sum to 1 per output


# --- attention-based selection ---------------------------------------------------------------------------

def _ranked_attention(batch, prefix, num_patches, heads=2, rows=2, dim=8):
    """Queries/keys whose attention ranking is exact on any BLAS: only coordinate 0 is non-zero in
    the queries (positive), keys carry distinct multiples of 1/4 there, so every head and row
    ranks the keys by that value. Returns (queries, keys, the patch ranking best first)."""
    num = prefix + num_patches
    queries = torch.zeros(batch, heads, rows, dim)
    queries[..., 0] = 1 + torch.rand(batch, heads, rows)
    keys = torch.randn(batch, heads, num, dim)
    values = torch.stack([torch.randperm(num) for _ in range(batch)]).float() / 4
    keys[..., 0] = values[:, None, :]
    if prefix:  # the prefix gets the most attention, and must still not be ranked
        keys[:, :, :prefix, 0] = num
    return queries, keys, values[:, prefix:].argsort(dim=1, descending=True)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_attn_topk_keeps_the_most_attended_in_order(backend, batch, prefix):
    tokens = _tokens(batch, prefix, (6, 6))
    queries, keys, ranking = _ranked_attention(batch, prefix, 36)
    c = attn_topk(tokens, 9, queries=queries, keys=keys, prefix=prefix)
    expected = ranking[:, :9].sort(dim=1).values + prefix
    assert torch.equal(c.positions[:, prefix:], expected)
    assert torch.equal(c.tokens, tokens.gather(1, c.positions.unsqueeze(-1).expand(-1, -1, 16)))
    check_invariants(c, tokens, prefix, drops=True, sorted_positions=True)
    assert (c.sizes == 1).all() and int((c.source == -1).sum()) == batch * 27
    # same through compress(), by ratio, and from the scores directly
    scores = attention_scores_reference(queries, keys).float()
    for other in (compress(tokens, "attn_topk", prefix=prefix, ratio=0.25, queries=queries, keys=keys),
                  attn_topk(tokens, 9, scores=scores, prefix=prefix)):
        assert torch.equal(other.positions, c.positions)


def test_attn_topk_ties_go_to_the_lower_index_and_nan_last():
    tokens = _tokens(1, 1, (2, 3))
    scores = torch.tensor([[9.0, 1.0, 2.0, 2.0, float("nan"), 2.0, 0.5]])
    assert attn_topk(tokens, 3, scores=scores, prefix=1).positions.tolist() == [[0, 2, 3, 5]]
    assert attn_topk(tokens, 6, scores=scores, prefix=1).positions.tolist() == [[0, 1, 2, 3, 4, 5, 6]]
    assert attn_topk(tokens, 0, scores=scores, prefix=1).tokens.shape == (1, 1, 16)


def test_attn_topk_fp16_and_gqa(backend):
    tokens = _tokens(2, 1, (4, 4), dtype=torch.float16)
    queries, keys, ranking = _ranked_attention(2, 1, 16, heads=4)
    c = attn_topk(tokens, 5, queries=queries.half(), keys=keys[:, :2].half(), prefix=1)
    assert torch.equal(c.positions[:, 1:], ranking[:, :5].sort(dim=1).values + 1)
    assert c.tokens.dtype == torch.float16


# --- VisionZip -------------------------------------------------------------------------------------------

def _clip_like(batch, num_patches, dim=32, heads=4):
    """tokens (CLS first), multi-head queries/keys of a layer and its attention probabilities."""
    num = 1 + num_patches
    tokens = torch.randn(batch, num, dim)
    q, k = 2 * torch.randn(batch, heads, num, dim // heads), torch.randn(batch, heads, num, dim // heads)
    attn = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)
    return tokens, q, k, attn


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dominant,contextual", [(54 * 64 // 576, 10 * 64 // 576), (20, 7), (0, 5), (63, 1), (64, 0)])
def test_visionzip_matches_the_official_loop(backend, batch, dominant, contextual):
    tokens, q, k, attn = _clip_like(batch, 64)
    c = visionzip(tokens, dominant, contextual, queries=q[:, :, :1], keys=k, prefix=1)
    assert c.tokens.shape == (batch, 1 + dominant + contextual, 32)
    check_invariants(c, tokens, 1)
    assert (c.positions[:, 1:1 + dominant].diff(dim=1) > 0).all()  # dominant: original order
    if contextual:
        official = torch.cat(visionzip_official(tokens, attn, k.mean(1), dominant, contextual))
        torch.testing.assert_close(c.tokens, official, rtol=1e-5, atol=1e-6)
    # contextual sizes: target + assigned
    assert (c.sizes[:, 1 + dominant:] >= 1).all()


def test_visionzip_scores_and_metric_inputs_and_prefix():
    tokens, q, k, _ = _clip_like(2, 36)
    scores = attention_scores_reference(q[:, :, :1], k).float()
    a = visionzip(tokens, 8, 4, queries=q[:, :, :1], keys=k, prefix=1)
    b = visionzip(tokens, 8, 4, scores=scores, metric=k.mean(1), prefix=1)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.source, b.source)
    # without a CLS token in the tokens (prefix 0) and with two register tokens (prefix 2)
    for prefix in (0, 2):
        c = visionzip(tokens[:, 1 - min(prefix, 1):], 8, 4, queries=q[:, :, :1],
                      keys=k[:, :, 1 - min(prefix, 1):], prefix=prefix)
        check_invariants(c, tokens[:, 1 - min(prefix, 1):], prefix)


# --- PruMerge ----------------------------------------------------------------------------------------------

def _prumerge_inputs(batch, num_patches=64, dim=32):
    tokens = torch.randn(batch, 1 + num_patches, dim)
    q, k = 2 * torch.randn(batch, 1 + num_patches, dim), torch.randn(batch, 1 + num_patches, dim)
    return tokens, q, k


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_matches_the_official_loop(backend, batch, plus):
    tokens, q, k = _prumerge_inputs(batch)
    fn = prumerge_plus if plus else prumerge
    c = fn(tokens, queries=q[:, None, :1], keys=k[:, None], prefix=1)
    check_invariants(c, tokens, 1, sorted_positions=True)
    assert c.counts is not None
    for b, (official, idx) in enumerate(prumerge_official(tokens[:, 1:], q, k, plus=plus)):
        kept = idx[0].sort()
        count = int(c.counts[b])
        assert count == 1 + idx.shape[1] + 1
        assert torch.equal(c.positions[b, 1:count - 1], kept.values + 1)
        torch.testing.assert_close(c.tokens[b, 1:count - 1], official[0, kept.indices], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.tokens[b, count - 1], official[0, -1], rtol=1e-5, atol=1e-5)
        assert c.sizes[b, count - 1] == 64 - idx.shape[1]  # the extra token holds the rest


def test_prumerge_fixed_budget_is_not_ragged(backend):
    tokens, q, k = _prumerge_inputs(2)
    c = prumerge(tokens, 8, queries=q[:, None, :1], keys=k[:, None], prefix=1)
    assert c.counts is None and c.tokens.shape == (2, 1 + 8 + 1, 32)
    check_invariants(c, tokens, 1, sorted_positions=True)
    top = attention_scores_reference(q[:, None, :1], k[:, None])[:, 1:].topk(8).indices.sort(1).values
    assert torch.equal(c.positions[:, 1:9], top + 1)
    assert torch.equal(compress(tokens, "prumerge", prefix=1, ratio=0.125, queries=q[:, None, :1],
                                keys=k[:, None]).positions, c.positions)


def test_prumerge_multi_head_keys_are_concatenated_and_fp16():
    tokens, q, k = _prumerge_inputs(2)
    heads = k.view(2, 65, 4, 8).transpose(1, 2)
    scores = attention_scores_reference(q[:, None, :1], k[:, None]).float()
    a = prumerge(tokens, scores=scores, keys=heads, prefix=1)
    b = prumerge(tokens, scores=scores, metric=k, prefix=1)
    assert torch.equal(a.tokens, b.tokens)
    c = prumerge(tokens.half(), scores=scores, metric=k.half(), prefix=1)
    assert c.tokens.dtype == torch.float16
    # fp16 tokens and metric: each output is a weighted sum of 33 fp16 tokens (the kept token and
    # its 32 neighbours), so fp16 resolution over a 33-term reduction
    assert_close(c.tokens, b.tokens, dtype=torch.float16, reduction=33)


@pytest.mark.parametrize("budget", [{}, {"keep": 3}, {"keep": 15}])
@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_nan_score_ranks_last(backend, plus, budget):
    """A NaN score ranks last: never an IQR outlier (the quartiles are those of the other scores),
    the last pick of a fixed budget, and no attention (weight 0) in the merge sums. One NaN score
    used to make the adaptive selection keep nothing (prefix + one NaN token)."""
    fn = prumerge_plus if plus else prumerge
    tokens = torch.randn(2, 17, 8)
    scores = 0.1 * torch.rand(2, 17)
    scores[:, [3, 9, 14]] = 1.0  # three clear outliers per image (patches 2, 8, 13)
    with_nan = scores.clone()
    with_nan[0, 6] = float("nan")
    c = fn(tokens, scores=with_nan, metric=tokens, prefix=1, **budget)
    check_invariants(c, tokens, 1, sorted_positions=True)
    assert torch.isfinite(c.tokens).all()
    if not plus:  # (PruMerge+'s spatial samples go by position alone and may take it)
        assert 6 not in c.positions[0].tolist()  # the NaN token is never selected (of 15/16: the one left)...
    if not budget and not plus:
        assert c.counts.tolist() == [5, 5] and torch.equal(c.positions[:, 1:4], torch.tensor([[3, 9, 14]] * 2))
    # ... and merges like a token that received no attention
    zero = scores.clone()
    zero[0, 6] = 0.0
    want = fn(tokens, scores=zero, metric=tokens, prefix=1, **budget)
    assert torch.equal(c.positions, want.positions) and torch.equal(c.source, want.source)
    torch.testing.assert_close(c.tokens, want.tokens)


def test_prumerge_plus_spatial_samples():
    selected = torch.zeros(3, 64, dtype=torch.bool)
    selected[1, [3, 10]] = True  # k=2: step 32, spacing 10
    selected[2, :30] = True  # k=30: step 2, spacing max(1, 0) = 1
    samples = spatial_samples(selected)
    assert not samples[0].any()  # nothing selected: no samples
    assert torch.nonzero(samples[1]).flatten().tolist() == list(range(0, 63, 10))
    assert samples[2].sum() == 63


def test_without_prefix_and_unmerge():
    tokens, q, k = _prumerge_inputs(2, 16)
    c = prumerge(tokens, 4, queries=q[:, None, :1], keys=k[:, None], prefix=1)
    d = c.without_prefix(1)
    check_invariants(d, tokens[:, 1:], 0, sorted_positions=True)
    full = c.unmerge()
    assert full.shape == tokens.shape and torch.equal(full[:, 0], tokens[:, 0])
    dropped = attn_topk(tokens, 4, scores=torch.rand(2, 17), prefix=1)
    assert (dropped.unmerge(fill=7.0)[dropped.source < 0] == 7.0).all()


# --- the dispatcher and bad inputs ----------------------------------------------------------------------

def test_compress_dispatches_every_method():
    tokens, q, k = _prumerge_inputs(2, 16, dim=8)
    heads = k.view(2, 17, 2, 4).transpose(1, 2)
    budgets = {"pool": {}, "pixel_shuffle": {}, "tome": {"keep": 4}, "attn_topk": {"keep": 4},
               "visionzip": {"dominant": 3, "contextual": 2}, "prumerge": {}, "prumerge_plus": {},
               "dart": {"keep": 4, "keys": heads}}
    assert budgets.keys() == METHODS.keys()
    for method, budget in budgets.items():
        attention = {} if method in ("pool", "pixel_shuffle", "tome", "dart") else {"queries": q[:, None, :1], "keys": k[:, None]}
        if method == "visionzip":
            attention = {"queries": heads[:, :, :1], "keys": heads}
        x, prefix = (tokens[:, 1:], 0) if method == "pixel_shuffle" else (tokens, 1)
        c = compress(x, method, prefix=prefix, grid=(4, 4), **budget, **attention)
        assert isinstance(c, Compressed)
        check_invariants(c, x, prefix, drops=method in ("attn_topk", "dart"))


# (method, budget, output width M of 16 patch tokens after prefix 1: pixel_shuffle has prefix 0)
EMPTY_BATCH_CASES = [
    ("pool", {}, 1 + 4), ("pool", {"mode": "bilinear", "stride": 3}, 1 + 4), ("pixel_shuffle", {}, 4),
    ("tome", {"keep": 4}, 1 + 4), ("tome", {"r": 5}, 1 + 11), ("attn_topk", {"keep": 4}, 1 + 4),
    ("attn_topk", {"ratio": 0.5}, 1 + 8), ("visionzip", {"dominant": 3, "contextual": 2}, 1 + 3 + 2),
    ("prumerge", {"keep": 4}, 1 + 4 + 1), ("prumerge", {"ratio": 0.25}, 1 + 4 + 1),
    ("prumerge", {}, 1 + 0 + 1), ("prumerge_plus", {"keep": 4}, 1 + 4 + 1), ("prumerge_plus", {}, 1 + 0 + 1),
]


@pytest.mark.parametrize("given", ["queries", "scores"])
@pytest.mark.parametrize("method, budget, width", EMPTY_BATCH_CASES, ids=str)
def test_empty_batch_has_the_budget_width(backend, method, budget, width, given):
    """B = 0: empty outputs of the width the budget gives (the adaptive PruMerge(+) selections:
    nothing kept, prefix + the extra token). Fixed PruMerge budgets used to lose their k slots, the
    adaptive ones failed in torch.quantile, attention_scores divided by zero."""
    tokens = torch.randn(0, 17, 8)
    heads = torch.randn(0, 2, 17, 4)
    attention = {"queries": heads[:, :, :1], "keys": heads}
    if given == "scores":
        attention = {"scores": torch.rand(0, 17), **({} if method == "attn_topk" else {"metric": tokens})}
    if method in ("pool", "pixel_shuffle", "tome"):
        attention = {}
    x, prefix = (tokens[:, 1:], 0) if method == "pixel_shuffle" else (tokens, 1)
    c = compress(x, method, prefix=prefix, grid=(4, 4), **budget, **attention)
    dim = 4 * 8 if method == "pixel_shuffle" else 8
    assert c.tokens.shape == (0, width, dim) and c.tokens.dtype == torch.float32
    assert c.positions.shape == c.sizes.shape == (0, width) and c.source.shape == (0, x.shape[1])
    ragged = method == "prumerge_plus" or (method == "prumerge" and not budget)
    assert (c.counts is not None) == ragged and (c.counts is None or c.counts.shape == (0,))
    if not ragged:  # the width of a non-empty batch
        one = torch.randn(1, *x.shape[1:])
        full = compress(one, method, prefix=prefix, grid=(4, 4), **budget,
                        **{k: torch.randn(1, *v.shape[1:]) for k, v in attention.items()})
        assert full.tokens.shape[1] == width


def test_compress_method_must_be_a_name():
    with pytest.raises(ValueError, match=r"method must be one of .*, got \['pool'\]"):
        compress(torch.randn(1, 16, 8), ["pool"])


def test_budget_arguments_are_checked_against_the_method():
    tokens = torch.randn(1, 17, 8)
    with pytest.raises(TypeError, match=r"compress\(method='visionzip'\) takes the budget arguments "
                                        r"dominant, contextual, .*\(missing contextual\)"):
        compress(tokens, "visionzip", prefix=1, dominant=4)
    with pytest.raises(TypeError, match=r"compress\(method='pool'\) .*got \['strde'\] \(unknown strde\)"):
        compress(tokens, "pool", prefix=1, strde=2)


def test_bad_inputs_name_what_is_wrong():
    tokens, q, k = _prumerge_inputs(2, 16, dim=8)
    attention = {"queries": q[:, None, :1], "keys": k[:, None]}
    cases = [
        (ValueError, r"method must be one of", lambda: compress(tokens, "fastv")),
        (ValueError, r"17 patch tokens .* not a square number: pass grid", lambda: pool(tokens)),
        (ValueError, r"grid=\(4, 5\) holds 20 tokens, but tokens has 16", lambda: pool(tokens, grid=(4, 5), prefix=1)),
        (ValueError, r"grid=\(4, 5\) holds 20 tokens", lambda: compress(tokens, "tome", grid=(4, 5), prefix=1, keep=2)),
        (ValueError, r"stride=5 is larger than the grid's shorter side", lambda: pool(tokens, 5, prefix=1)),
        (ValueError, r"mode must be one of", lambda: pool(tokens, mode="mean", prefix=1)),
        (ValueError, r"prefix tokens cannot be kept", lambda: pixel_shuffle(tokens, prefix=1)),
        (ValueError, r"divisible by stride=3", lambda: pixel_shuffle(tokens[:, 1:], 3)),
        (ValueError, r"prefix must be an int in \[0, N = 17\]", lambda: pool(tokens, prefix=18)),
        (ValueError, r"keep=17 is larger than the 16 patch tokens", lambda: attn_topk(tokens, 17, prefix=1, **attention)),
        (ValueError, r"keep=17 is larger than the 16 patch tokens", lambda: tome(tokens, 17, prefix=1)),
        (ValueError, r"keep must be >= 1", lambda: tome(tokens, 0, prefix=1)),
        (ValueError, r"r=16 is larger than the tokens ToMe can remove", lambda: tome(tokens, r=16, prefix=1)),
        (TypeError, r"exactly one budget of keep=, ratio=, r=; got keep, r", lambda: tome(tokens, 3, r=2, prefix=1)),
        (TypeError, r"exactly one budget of keep=, ratio=; got none", lambda: attn_topk(tokens, prefix=1, **attention)),
        (ValueError, r"ratio must be a fraction", lambda: attn_topk(tokens, ratio=1.5, prefix=1, **attention)),
        (TypeError, r"keep must be an int, got float", lambda: attn_topk(tokens, 2.0, prefix=1, **attention)),
        (TypeError, r"attention inputs are missing", lambda: attn_topk(tokens, 3, prefix=1)),
        (TypeError, r"attention inputs are missing", lambda: prumerge(tokens, keys=k[:, None], prefix=1)),
        (ValueError, r"must have tokens' B = 2 and N = 17", lambda: attn_topk(tokens, 3, queries=q[:, None, :1], keys=k[:, None, 1:])),
        (ValueError, r"queries .* and keys .* disagree", lambda: attn_topk(tokens, 3, queries=q[:, None, :1, :4], keys=k[:, None])),
        (ValueError, r"scores must be \(B, N\) = \(2, 17\)", lambda: attn_topk(tokens, 3, scores=torch.rand(2, 16))),
        (TypeError, r"either scores= or queries=", lambda: attn_topk(tokens, 3, scores=torch.rand(2, 17), **attention)),
        (TypeError, r"visionzip needs metric= .* or keys=", lambda: visionzip(tokens, 3, 2, scores=torch.rand(2, 17))),
        (ValueError, r"contextual=14 is larger than the tokens left after the 3 dominant ones \(13\)",
         lambda: visionzip(tokens, 3, 14, prefix=1, **attention)),
        (ValueError, r"contextual must be >= 1", lambda: visionzip(tokens, 3, 0, prefix=1, **attention)),
        (ValueError, r"metric must be \(B, N, C\)", lambda: prumerge(tokens, metric=k[:, 1:], prefix=1, **attention)),
        (TypeError, r"neighbours must be an int", lambda: prumerge(tokens, neighbours=None, prefix=1, **attention)),
        (TypeError, r"tokens must have dtype", lambda: pool(tokens.long(), prefix=1)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
