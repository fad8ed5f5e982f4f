"""``vtok_fast.patch.hf(model, compress=...)`` in every VLM family of ``vtok_fast.patch.families``:
the processor's normal prompt and ``generate`` run unchanged, the language model sees only the
kept image tokens. Tiny random-weight models and real offline processors of
``vtok_fast.bench.vlm_zoo``; the astronaut photograph.

Per family: keep-all is exact (logits and greedy generation), a padded batch of two images of
different sizes equals each alone, the count the language model sees is
``vtok_fast.budget.count_tokens``'s (at the checkpoints' real geometry), the kept tokens carry
their original (M-RoPE) position ids or the compact ones, SDPA stays on, ``unpatch`` restores."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import tiny_vlms
import vtok_fast.patch
from vtok_fast.bench import vlm_zoo
from vtok_fast.measure.budget import LLAVA_NEXT_PINPOINTS, OV_PINPOINTS, count_tokens
from vtok_fast.patch import families

FAMILIES = sorted(families.FAMILIES)
ASTRONAUT = Image.open(Path(__file__).resolve().parent / "data" / "astronaut_64x48.png").convert("RGB")
WIDE = ASTRONAUT.resize((112, 48))  # another size and aspect: other tiles, grids and counts
KEEP_ALL = [("tome", {"ratio": 1.0}), ("pool", {"stride": 1}), ("dart", {"ratio": 1.0})]
METHODS = [("tome", {"ratio": 0.5}), ("pool", {"stride": 2}), ("dart", {"ratio": 0.25, "pivots": 2})]
# the attention methods: the tower's CLS attention, or the attention every token receives (no CLS)
ATTENTION = [("attn_topk", {"ratio": 0.25}), ("visionzip", {"dominant": 3, "contextual": 1})]
# family -> (count_tokens name, tiny-model overrides giving the checkpoint's geometry, count_tokens options
# matching the tiny processor where the geometry stays tiny)
GEOMETRY = {
    "llava_next": ("llava-next", {"vision_config": {"image_size": 336, "patch_size": 14},
                                  "image_grid_pinpoints": [list(p) for p in LLAVA_NEXT_PINPOINTS]}, {}),
    "llava_onevision": ("llava-onevision", {"vision_config": {"image_size": 384, "patch_size": 14},
                                            "image_grid_pinpoints": [list(p) for p in OV_PINPOINTS]}, {}),
    "internvl": ("internvl", {"vision_config": {"image_size": [448, 448], "patch_size": [14, 14]}}, {}),
    "gemma3": ("gemma3", {"vision_config": {"image_size": 896, "patch_size": 14}, "mm_tokens_per_image": 256}, {}),
    "qwen2_vl": ("qwen2-vl", {}, {"patch_size": 8, "merge_size": 2, "min_pixels": 1024, "max_pixels": 4194304}),
    "qwen2_5_vl": ("qwen2.5-vl", {}, {"patch_size": 8, "merge_size": 2, "min_pixels": 1024, "max_pixels": 4194304}),
    "qwen3_vl": ("qwen3-vl", {}, {"patch_size": 8, "merge_size": 2, "min_pixels": 16384, "max_pixels": 4194304}),
    "idefics3": ("idefics3", {}, {"longest_edge": 256, "max_image_size": 64, "image_seq_len": 16, "scale_factor": 2}),
    "smolvlm": ("smolvlm", {}, {"longest_edge": 384, "max_image_size": 96, "image_seq_len": 16, "scale_factor": 3}),
}


def patched(model, method, budget):
    return vtok_fast.patch.hf(model, fuse_embed=False, fuse_project=False, compress=(method, budget))


def batch(family, images, prompts, config=None):
    return vlm_zoo.inputs(family, [[image] for image in images], prompts, config=config)


def two(family):
    """Two rows: the astronaut with the short prompt, the wide image with a longer one."""
    return batch(family, [ASTRONAUT, WIDE], [vlm_zoo.prompt(family),
                                             vlm_zoo.prompt(family, "USER : what is in this picture ? ASSISTANT :")])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, steps=3):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, inputs["input_ids"].shape[1]:]


class Spy:
    """The kwargs of every language-model call (registered after the patch's hook: what it sees)."""

    def __init__(self, model):
        self.calls = []
        lm = getattr(model.model, families.FAMILIES[model.config.model_type].language_model)
        self.handle = lm.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(dict(kwargs))


def image_tokens_seen(model, inputs) -> list[int]:
    """Image placeholders the language model saw per row at the last dropping forward."""
    kept = model._compress_info["kept"]
    ids = inputs["input_ids"].gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -1)
    return (ids == model.config.image_token_id).sum(dim=1).tolist()


@pytest.fixture(scope="module")
def tiny():
    return tiny_vlms(unpatch=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,budget", KEEP_ALL, ids=[m for m, _ in KEEP_ALL])
def test_keep_all_is_the_unpatched_model(family, method, budget, tiny):
    model = tiny(family)
    inputs = two(family)
    expected, tokens = logits(model, inputs), generate(model, inputs)
    patched(model, method, budget)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    assert torch.equal(generate(model, inputs), tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,budget", METHODS + ATTENTION[:1], ids=[m for m, _ in METHODS + ATTENTION[:1]])
def test_a_padded_batch_is_each_row_alone(family, method, budget, tiny):
    """Rows of different images and prompts keep what they keep alone (rows padded on the left,
    never truncated), with the same logits at their real positions and the same generation."""
    model = patched(tiny(family), method, budget)
    inputs = two(family)
    out, tokens = logits(model, inputs), generate(model, inputs)
    logits(model, inputs)
    kept, seen = model._compress_info["kept"], image_tokens_seen(model, inputs)
    prompts = [vlm_zoo.prompt(family), vlm_zoo.prompt(family, "USER : what is in this picture ? ASSISTANT :")]
    assert seen[0] != seen[1] or family in ("gemma3", "internvl"), "the two images must keep different counts"
    for row, (image, text) in enumerate(zip([ASTRONAUT, WIDE], prompts)):
        single = batch(family, [image], [text])
        alone = logits(model, single)
        assert image_tokens_seen(model, single) == [seen[row]]
        real = (kept[row] >= 0) & (inputs["attention_mask"][row].gather(0, kept[row].clamp(min=0)) == 1)
        torch.testing.assert_close(out[row, real.nonzero()[:, 0]], alone[0], atol=5e-5, rtol=1e-4)
        assert torch.equal(generate(model, single)[0], tokens[row])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,budget", METHODS + ATTENTION[1:], ids=[m for m, _ in METHODS + ATTENTION[1:]])
def test_the_count_is_the_budget_calculators(family, method, budget):
    """At the checkpoint's geometry (tile and patch sizes, pinpoints, pooled grid) or with the tiny
    processor's options, the image tokens the language model sees are ``count_tokens``'s."""
    name, overrides, options = GEOMETRY[family]
    model = patched(vlm_zoo.tiny(family, **overrides), method, budget)
    for image in (ASTRONAUT, WIDE):
        inputs = batch(family, [image], [vlm_zoo.prompt(family)], config=model.config)
        logits(model, inputs)
        expected = count_tokens(name, (image.height, image.width), compress=(method, budget), **options)
        assert image_tokens_seen(model, inputs) == [expected.llm_tokens]


def reference_positions(model, inputs) -> torch.Tensor:
    """The unpatched model's position ids of ``inputs`` (``(3, B, L)`` M-RoPE from the model's own
    ``get_rope_index``; ``(1, B, L)`` otherwise: the language model's ``arange``)."""
    if families.FAMILIES[model.config.model_type].mrope:
        names = ("image_grid_thw", "mm_token_type_ids", "attention_mask")
        return model.model.get_rope_index(inputs["input_ids"], **{n: inputs[n] for n in names})[0]
    batch_size, length = inputs["input_ids"].shape
    return torch.arange(length).expand(1, batch_size, length)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_kept_tokens_carry_their_position_ids(family, positions, tiny):
    model = tiny(family)
    inputs = two(family)
    full = reference_positions(model, inputs)
    patched(model, "tome", {"ratio": 0.5, "positions": positions})
    spy = Spy(model)
    logits(model, inputs)
    spy.handle.remove()
    seen = spy.calls[0]["position_ids"]
    seen = seen[-full.shape[0]:] if seen.dim() == 3 else seen[None]  # M-RoPE: without the text row
    kept = model._compress_info["kept"]
    real = kept >= 0
    expected = full.expand(full.shape[0], *kept.shape[:1], full.shape[-1]).gather(
        -1, kept.clamp(min=0).expand(full.shape[0], *kept.shape))
    if positions == "compact":
        keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool).scatter(1, kept.clamp(min=0), real)
        dropped_before = (~keep).long().cumsum(dim=1).gather(1, kept.clamp(min=0))
        expected = expected - dropped_before
    assert torch.equal(seen.expand_as(expected)[:, real], expected[:, real])
    image = inputs["input_ids"].gather(1, kept.clamp(min=0)) == model.config.image_token_id
    assert int((image & real).sum()) < int((inputs["input_ids"] == model.config.image_token_id).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_stays_on_and_no_eager_attention_runs(family, tiny, monkeypatch):
    model = patched(tiny(family), "dart", {"ratio": 0.5})
    lm = getattr(model.model, families.FAMILIES[family].language_model)
    assert lm.config._attn_implementation == "sdpa"
    import sys

    module = sys.modules[type(lm.layers[0].self_attn).__module__]

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran in the language model")

    monkeypatch.setattr(module, "eager_attention_forward", eager)
    generate(model, two(family), steps=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_and_state_dict_never_changes(family, tiny):
    model = tiny(family)
    inputs = two(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, inputs)
    patched(model, "pool", {"stride": 2})
    assert model.state_dict().keys() == state.keys()
    assert logits(model, inputs).shape[1] < expected.shape[1]
    vtok_fast.patch.unpatch(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    assert "get_image_features" not in model.model.__dict__ and "_compress_info" not in model.__dict__


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "smolvlm"])
def test_labels_are_aligned_to_the_kept_columns(family, tiny):
    """Keep-all gives the unpatched loss; a compressed forward scores only the kept columns."""
    model = tiny(family)
    inputs = two(family)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss
        patched(model, "tome", {"ratio": 1.0})
        torch.testing.assert_close(model(**inputs, labels=labels).loss, expected, rtol=1e-6, atol=1e-6)
        patched(model, "tome", {"ratio": 0.5})
        out = model(**inputs, labels=labels)
    kept = model._compress_info["kept"]
    gathered = labels.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
    shifted = torch.nn.functional.pad(gathered, (0, 1), value=-100)[:, 1:]
    manual = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_is_refused_naming_the_family(tiny):
    model = tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="pixel_shuffle.*Qwen2.5-VL.*wider"):
        patched(model, "pixel_shuffle", {})
    assert "get_image_features" not in model.model.__dict__


def test_bad_budgets_raise_before_anything_is_patched(tiny):
    model = tiny("internvl")
    with pytest.raises(ValueError, match="positions must be one of"):
        patched(model, "tome", {"ratio": 0.5, "positions": "shuffled"})
    with pytest.raises(TypeError, match="budget arguments"):
        patched(model, "tome", {"stride": 2})
    patched(model, "pool", {"stride": 2})
    with pytest.raises(TypeError):
        patched(model, "dart", {"keep_all": True})  # the earlier patch stays, as it was
    assert model._compress_info["method"] == "pool"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_triton_kernels_give_the_torch_results(family, tiny, monkeypatch):
    """The reducers' Triton kernels (the interpreter here) keep the same tokens as the PyTorch path
    inside every family: the same kept columns and the same logits."""
    model = tiny(family)
    inputs = two(family)
    for method, budget in METHODS + ATTENTION:
        patched(model, method, budget)
        monkeypatch.setenv("VTOK_FAST_BACKEND", "torch")
        expected, kept = logits(model, inputs), model._compress_info["kept"]
        monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")
        torch.testing.assert_close(logits(model, inputs), expected, atol=2e-5, rtol=1e-4)
        assert torch.equal(model._compress_info["kept"], kept)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_videos_are_compressed_frame_by_frame(family, tiny):
    """A batch holding an image and two videos of 2 and 1 temporal frames: keep-all is exact, and
    ``pool`` (stride 2) keeps each frame's pooled grid (original positions, as for images)."""
    model = tiny(family)
    processor = vlm_zoo.processor(family)
    frames = [ASTRONAUT.rotate(10 * i) for i in range(4)]
    text = ["<|vision_start|><|video_pad|><|vision_end|> USER : describe the image . ASSISTANT :",
            "<|vision_start|><|image_pad|><|vision_end|> <|vision_start|><|video_pad|><|vision_end|> USER : what ? "
            "ASSISTANT :"]
    inputs = processor(text=text, images=[ASTRONAUT], videos=[frames, frames[:2]], padding=True, return_tensors="pt")
    expected, tokens = logits(model, inputs), generate(model, inputs)
    patched(model, "tome", {"ratio": 1.0})
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    assert torch.equal(generate(model, inputs), tokens)
    patched(model, "pool", {"stride": 2})
    logits(model, inputs)
    kept = model._compress_info["kept"]
    seen = inputs["input_ids"].gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -1)
    merge = model.model.visual.spatial_merge_size
    frames_grid = [(t, h // merge // 2, w // merge // 2) for t, h, w in inputs["video_grid_thw"].tolist()]
    assert (seen == model.config.video_token_id).sum(dim=1).tolist() == [t * h * w for t, h, w in frames_grid]


def _eager_reference_scores(model, inputs, family) -> torch.Tensor:
    """The tower's last attention probabilities, recorded from its eager attention function: the
    CLS row without the CLS key (CLS towers), else the mean over all query rows; heads averaged."""
    import sys

    attn = families.FAMILIES[family].attention(model.model)
    module = sys.modules[type(attn).__module__]
    recorded = []
    original = module.eager_attention_forward

    def record(module_, *args, **kwargs):
        out, weights = original(module_, *args, **kwargs)
        if module_ is attn:
            recorded.append(weights.detach())
        return out, weights

    config = model.config.vision_config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    module.eager_attention_forward = record
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        module.eager_attention_forward = original
        config._attn_implementation = previous
    if families.FAMILIES[family].cls:
        return torch.cat([w[:, :, 0, 1:].mean(dim=1) for w in recorded])
    return torch.cat([w.mean(dim=(1, 2)).flatten() for w in recorded])


def _scores_and_reference(model, family, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores ``attn_topk`` ranks by in one forward on the astronaut, and the eager reference."""
    from vtok_fast.patch import family_scores

    inputs = batch(family, [ASTRONAUT], [vlm_zoo.prompt(family)])
    expected = _eager_reference_scores(model, inputs, family)
    seen = []
    original = family_scores.tower_scores
    monkeypatch.setattr(family_scores, "tower_scores", lambda *a: seen.append(original(*a)) or seen[-1])
    patched(model, "attn_topk", {"ratio": 0.5})
    logits(model, inputs)
    return seen[0], expected


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "idefics3",
                                    "llava_next", "llava_onevision"])
def test_scores_are_the_towers_attention(family, tiny, monkeypatch):
    """The scores the attention methods rank by are the tower's own attention probabilities (its
    eager attention, recorded), before the family's merge."""
    seen, expected = _scores_and_reference(tiny(family), family, monkeypatch)
    torch.testing.assert_close(seen.flatten(), expected.flatten(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_scores_follow_the_merger_and_window_order(family, tiny):
    """A score that is each patch's row in the image, merged by the adapter, is each merged
    token's row (its 2x2 block's mean) in raster order: the merger's grouping and Qwen2.5-VL's
    window order are undone as the features are."""
    import sys

    model = tiny(family)
    visual, merge = model.model.visual, model.model.visual.spatial_merge_size
    grid_thw = torch.tensor([[1, 8, 12], [1, 4, 8]])
    module = sys.modules[type(visual).__module__]
    rows = []
    for t, h, w in grid_thw.tolist():  # the processor's block-major patch order
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        rows.append(r.permute(0, 2, 1, 3).flatten().float())
    tower = torch.cat(rows)
    if hasattr(visual, "window_size"):
        window_index, _ = module.get_vision_window_index(grid_thw, spatial_merge_size=merge,
                                                         window_size=visual.window_size,
                                                         patch_size=visual.patch_size, kwargs={})
        tower = tower.view(-1, merge * merge)[window_index].flatten()  # the tower's window order
    units = families.Units([torch.zeros(h * w // merge // merge, 1) for _, h, w in grid_thw.tolist()],
                           [[(h // merge, w // merge)] for _, h, w in grid_thw.tolist()])
    merged = families.FAMILIES[family].score_map(model.model, tower, {"image_grid_thw": grid_thw}, units)
    for piece, (_, h, w) in zip(merged, grid_thw.tolist()):
        expected = (torch.arange(h // merge).float() * merge + (merge - 1) / 2)[:, None].expand(-1, w // merge)
        assert torch.equal(piece, expected.flatten())


@pytest.mark.parametrize("family", ["internvl", "idefics3"])
def test_pixel_shuffle_scores_are_the_shuffles_blocks(family, tiny):
    """The s x s blocks the adapter pools scores over are the ones the family's pixel shuffle
    concatenates into one token."""
    from vtok_fast.patch.family_scores import pooled

    inner = tiny(family).model
    side = 8
    rc = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).float()
    if family == "internvl":
        shuffled, scale = inner.pixel_shuffle(rc[None], scale_factor=inner.config.downsample_ratio), 2
    else:
        scale = inner.config.scale_factor
        shuffled = inner.connector.pixel_shuffle(rc.view(1, side * side, 2), scale)
    blocks = shuffled.reshape(-1, scale * scale, 2).mean(dim=1)  # each token's patches: mean (row, col)
    for channel in range(2):
        assert torch.equal(pooled(rc[..., channel].reshape(1, -1), side, scale)[0], blocks[:, channel])


def test_adaptive_prumerge_keeps_a_count_per_image(tiny):
    """PruMerge's own budget (IQR outliers) keeps a different count per unit: rows padded."""
    model = patched(tiny("gemma3"), "prumerge", {})
    inputs = two("gemma3")
    logits(model, inputs)
    seen = image_tokens_seen(model, inputs)
    assert all(0 < n < 16 for n in seen)
    generate(model, inputs, steps=2)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_scores_taken_a_chunk_of_queries_at_a_time_are_the_same(family, tiny, monkeypatch):
    """The attention received, summed over query chunks (5 rows: the last one partial), equals it
    taken over every query row at once."""
    from vtok_fast.patch import family_scores

    monkeypatch.setattr(family_scores, "QUERY_CHUNK", 5)
    seen, expected = _scores_and_reference(tiny(family), family, monkeypatch)
    torch.testing.assert_close(seen.flatten(), expected.flatten(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_generate_without_a_cache_drops_at_every_step(family, tiny):
    """``generate(use_cache=False)`` reruns the whole prompt at every step on the features it
    computed once: each of those forwards drops the same placeholders, so the tokens equal the
    cached generation's."""
    model = patched(tiny(family), "pool", {"stride": 2})
    inputs = two(family)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(uncached, cached)
