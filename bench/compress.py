"""Token compression benchmark (``vtok-fast bench compress``), forward only.

1. Every method at LLaVA-1.5 scale: B=16 images of 577 tokens (CLS + 24×24), D=1024, the CLS
   query and the keys of a CLIP-L layer (16 heads × 64; one head × 1024 for PruMerge, as its
   official code). Baselines: the peers' own code where it is importable (transformers'
   ``LlavaNextVideoPooler`` for avg pooling, ``LlavaOnevisionModel.apply_pooling`` for bilinear,
   ``InternVLModel.pixel_shuffle``), the reference ToMe rounds (``bipartite_soft_matching`` +
   ``merge_wavg``), eager ``softmax`` + ``topk`` for ``attn_topk``, and for VisionZip and
   PruMerge a per-image loop of the official algorithm (below, written as the official code runs
   it: PruMerge materializes the full 577×577 attention and loops over the kept tokens in Python;
   VisionZip gets the attention probabilities its official code reads from the vision tower, so
   only its own steps are timed). PruMerge+ is timed alone: its official loop runs over ~4× more
   kept tokens (minutes per call at B=16 on a CPU); the tests compare it with that loop. DART
   (144 kept, 4 pivots by the keys' L1 norm, cosine of the tokens) against
   ``vtok_fast.reduce.dart.dart_reference``, the official ``get_retained_image_token`` per image.
2. The single-row attention scores (``attention_scores``: the last token's row, FastV style)
   against materializing ``softmax(Q Kᵀ)`` over all N×N (what eager attention with
   ``output_attentions`` builds and the official FastV reads), against eager ``softmax(q Kᵀ)`` of
   the query row only and its ``torch.compile``: B=1, 2 heads × 128, N = 4096 and 16384.

The summary prints the CPU targets: the single-row path's peak extra memory <= 1/10 of the
materialized path's at N=16384, and batched PruMerge >= 10× faster than the per-image loop.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from vtok_fast.bench.harness import Case, Provider, provider_label, verdict

OP = "compress"
MODES = ("forward",)

# targets from the issue (CPU): memory ratio at N=16384, PruMerge speedup at B=16
MEMORY_TARGET = 0.1
PRUMERGE_TARGET = 10.0
ATTENTION_HEADS, ATTENTION_DIM = 2, 128
NEIGHBOURS = 32  # the official PruMerge's cluster size


# --- the official algorithms, one image at a time ----------------------------------------------------

def _complement(idx: torch.Tensor, count: int) -> torch.Tensor:
    """Indices in ``range(count)`` not in ``idx`` ``(1, k)``, ascending, ``(1, count - k)``."""
    keep = torch.ones(count, dtype=torch.bool, device=idx.device)
    keep[idx.flatten()] = False
    return torch.nonzero(keep).flatten().unsqueeze(0)


def _outlier_ratio(attn: torch.Tensor) -> float:
    """Fraction of scores above Q3 + 1.5 IQR (numpy percentiles, as the official code)."""
    values = attn.to(torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)


def prumerge_official(features: torch.Tensor, q: torch.Tensor, k: torch.Tensor, plus: bool = False):
    """LLaVA-PruMerge(+) as its official ``CLIPVisionTower.token_prune_merge_advanced(_plus)``
    runs it (adaptive ratio), one image at a time: ``features`` ``(B, n, C)`` patch tokens,
    ``q``/``k`` ``(B, 1 + n, C)`` the last layer's query/key projections (CLS first). Returns,
    per image, ``(tokens (1, kept + 1, C), kept indices (1, kept))`` in the official order."""
    results = []
    for b in range(features.shape[0]):
        image, q_b, k_b = features[b:b + 1], q[b:b + 1], k[b:b + 1]
        _, n, c = image.shape
        attn = F.softmax((q_b @ k_b.transpose(-2, -1)) * c ** -0.5, dim=-1)  # full (1+n) x (1+n)
        cls_attn = attn[:, 0, 1:]
        ratio = _outlier_ratio(cls_attn)
        _, idx = torch.topk(cls_attn, int(n * ratio), dim=1, largest=True)
        if plus:  # spatially uniform samples not selected yet (575 = n - 1 in the official code)
            step = int(1 / ratio)
            samples = torch.arange(0, n - 1, int(step / 3), device=image.device)
            picked = idx.flatten()
            extra = torch.tensor([int(s) for s in samples if s not in picked], dtype=idx.dtype,
                                 device=image.device)
            idx = torch.cat([idx, extra.unsqueeze(0)], dim=1)
        index = idx.unsqueeze(-1).expand(-1, -1, c)
        keys = k_b[:, 1:]
        kept = torch.gather(image, 1, index)
        kept_attn = torch.gather(cls_attn, 1, idx)
        kept_keys = F.normalize(torch.gather(keys, 1, index), p=2, dim=-1)
        rest = _complement(idx, n)
        rest_x = torch.gather(image, 1, rest.unsqueeze(-1).expand(-1, -1, c))
        rest_keys = F.normalize(torch.gather(keys, 1, rest.unsqueeze(-1).expand(-1, -1, c)), p=2, dim=-1)
        rest_attn = torch.gather(cls_attn, 1, rest)
        updated = torch.zeros_like(kept)
        for i in range(kept.shape[1]):  # the official per-token loop
            others_x = torch.cat([kept[:, :i], kept[:, i + 1:], rest_x], dim=1)
            others_attn = torch.cat([kept_attn[:, :i], kept_attn[:, i + 1:], rest_attn], dim=1)
            others_keys = torch.cat([kept_keys[:, :i], kept_keys[:, i + 1:], rest_keys], dim=1)
            cos = torch.bmm(kept_keys[:, i:i + 1], others_keys.transpose(1, 2))
            _, near = torch.topk(cos, k=NEIGHBOURS, dim=2, largest=True)
            near = near.squeeze()
            updated[0, i] = kept[0, i] + torch.sum(others_x[:, near] * others_attn[:, near].unsqueeze(-1), dim=1)[0]
        extra_token = torch.sum(rest_x * rest_attn.unsqueeze(-1), dim=1, keepdim=True)
        results.append((torch.cat([updated, extra_token], dim=1), idx))
    return results


def visionzip_official(hidden: torch.Tensor, attn_weights: torch.Tensor, metric: torch.Tensor,
                       dominant: int, contextual: int):
    """VisionZip as its official ``CLIPVisionTower.forward`` runs it, one image at a time:
    ``hidden`` ``(B, N, D)`` (CLS first), ``attn_weights`` ``(B, H, N, N)`` the layer's attention
    probabilities, ``metric`` ``(B, N, d)`` its keys averaged over heads. Returns per image
    ``(1, 1 + dominant + contextual, D)``."""
    results = []
    for b in range(hidden.shape[0]):
        h_b, attn, m_b = hidden[b:b + 1], attn_weights[b:b + 1], metric[b:b + 1]
        num, dim = h_b.shape[1], h_b.shape[2]
        cls_attention = attn[:, :, 0, 1:].sum(dim=1)
        top = cls_attention.topk(dominant, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros(1, 1, dtype=top.dtype, device=top.device), top], dim=1)
        mask = torch.ones_like(h_b[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = h_b.masked_select(~mask.unsqueeze(-1)).view(1, dominant + 1, dim)
        remaining = num - (dominant + 1)
        m_rest = m_b[mask].view(1, remaining, m_b.shape[2])
        h_rest = h_b.masked_select(mask.unsqueeze(-1)).view(1, remaining, dim)
        m_rest = m_rest / m_rest.norm(dim=-1, keepdim=True)
        step = max(1, remaining // contextual)
        targets = torch.arange(0, remaining, step, device=h_b.device)[:contextual]
        others = ~torch.isin(torch.arange(remaining, device=h_b.device), targets)
        similarity = torch.bmm(m_rest[:, others], m_rest[:, targets].transpose(1, 2))
        assign = torch.zeros(1, int(others.sum()), contextual, dtype=h_b.dtype, device=h_b.device)
        assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
        aggregated = torch.bmm(assign.transpose(1, 2), h_rest[:, others]) / counts
        results.append(torch.cat([dominant_tokens, h_rest[:, targets] + aggregated], dim=1))
    return results


# --- eager peers and baselines -------------------------------------------------------------------------

def _transformers_pooler(mode: str, grid: int, dim: int):
    """transformers' LLaVA-NeXT-Video spatial pooler (average / max, stride 2), or None."""
    try:
        from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler
    except ImportError:
        return None
    vision = SimpleNamespace(image_size=grid, patch_size=1, hidden_size=dim)
    return LlavaNextVideoPooler(SimpleNamespace(spatial_pool_mode=mode, spatial_pool_stride=2, vision_config=vision))


def _transformers_bilinear(grid: int):
    """transformers' LLaVA-OneVision ``apply_pooling`` (bilinear, ceil), or None."""
    try:
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    except ImportError:
        return None
    owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=grid, patch_size=1)))
    return lambda x: LlavaOnevisionModel.apply_pooling(owner, x)


def _transformers_pixel_shuffle(grid: int):
    try:
        from transformers.models.internvl.modeling_internvl import InternVLModel
    except ImportError:
        return None

    def run(x):
        batch, _, dim = x.shape
        y = InternVLModel.pixel_shuffle(None, x.reshape(batch, grid, grid, dim), scale_factor=0.5)
        return y.reshape(batch, -1, y.shape[-1])
    return run


def tome_reference(x: torch.Tensor, metric: torch.Tensor, keep: int, prefix: int) -> torch.Tensor:
    """Reference ToMe (``bipartite_soft_matching`` + ``merge_wavg``) rounds on the patch tokens."""
    from vtok_fast.reduce.tome_reference import bipartite_soft_matching, merge_wavg

    dim = x.shape[-1]
    patches, size = torch.cat([x, metric.to(x.dtype)], dim=-1)[:, prefix:], None
    while patches.shape[1] > keep:
        r = min(patches.shape[1] - keep, patches.shape[1] // 2)
        merge, _ = bipartite_soft_matching(patches[..., dim:], r)
        patches, size = merge_wavg(merge, patches, size)
    return torch.cat([x[:, :prefix], patches[..., :dim]], dim=1)


def _eager_rows(queries, keys):
    """softmax(q Kᵀ / sqrt(d)) of the query rows only, averaged over heads and rows."""
    s = queries @ keys.transpose(-1, -2) * queries.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1).mean(dim=(1, 2))


def _materialized(queries_all, keys):
    """Full N×N attention probabilities (eager attention with output_attentions), last row."""
    s = queries_all @ keys.transpose(-1, -2) * queries_all.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1)[:, :, -1].mean(dim=1)


# --- cases ---------------------------------------------------------------------------------------------

LLAVA_METHODS = ("pool_avg", "pool_bilinear", "pixel_shuffle", "tome", "attn_topk", "visionzip",
                 "prumerge", "prumerge_plus", "dart")
# the implementation the "baseline" provider runs for each method (printed in the table)
BASELINES = {
    "pool_avg": "transformers LlavaNextVideoPooler",
    "pool_bilinear": "transformers LlavaOnevisionModel.apply_pooling",
    "pixel_shuffle": "transformers InternVLModel.pixel_shuffle",
    "tome": "ToMe reference rounds: bipartite_soft_matching + merge_wavg",
    "attn_topk": "eager softmax + topk",
    "visionzip": "official VisionZip, per-image loop",
    "prumerge": "official PruMerge, per-image loop",
    "prumerge_plus": None,  # not timed (see the module docstring)
    "dart": "official DART, per-image loop",
}


def _llava_inputs(method: str, batch: int, grid: int, dim: int, heads: int):
    def make(device: torch.device) -> dict:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        num = 1 + grid * grid
        tokens = torch.randn(batch, num, dim, generator=gen)
        q = torch.randn(batch, num, dim, generator=gen)
        k = torch.randn(batch, num, dim, generator=gen)
        inputs = {"kind": "llava", "method": method, "grid": grid, "tokens": tokens, "q": q, "k": k}
        if method == "visionzip":  # the attention probabilities the official code reads, per head
            qh = q.view(batch, num, heads, -1).transpose(1, 2)
            kh = k.view(batch, num, heads, -1).transpose(1, 2)
            inputs["attn_weights"] = torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, dim=-1)
        inputs = {key: v.to(device, dtype) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}
        # LLaVA-1.5's budgets (144 = a 2x2 pool of 576; VisionZip's 54 + 10), scaled to the grid
        n = grid * grid
        inputs.update(heads=heads, keep=n // 4, dominant=max(1, 54 * n // 576), contextual=max(1, 10 * n // 576))
        return inputs
    return make


def _attention_inputs(num_keys: int):
    def make(device: torch.device) -> dict:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        shape = (1, ATTENTION_HEADS, num_keys, ATTENTION_DIM)
        queries = torch.randn(*shape, generator=gen).to(device, dtype)
        keys = torch.randn(*shape, generator=gen).to(device, dtype)
        return {"kind": "attention", "queries_all": queries, "queries": queries[:, :, -1:], "keys": keys}
    return make


def cases(quick: bool, device) -> list[Case]:
    batch, grid, dim, heads = (2, 8, 64, 4) if quick else (16, 24, 1024, 16)
    out = [Case(f"llava15-{m}", {"B": batch, "N": 1 + grid * grid, "D": dim, "heads": heads, "method": m,
                                 "baseline": BASELINES[m]},
                _llava_inputs(m, batch, grid, dim, heads)) for m in LLAVA_METHODS]
    for n in ((512,) if quick else (4096, 16384)):
        out.append(Case(f"attention-N{n}", {"B": 1, "heads": ATTENTION_HEADS, "Q": 1, "N": n, "d": ATTENTION_DIM},
                        _attention_inputs(n)))
    return out


# --- providers -------------------------------------------------------------------------------------------

def _heads(inputs, name):
    """(B, heads, N, C / heads) view of ``inputs[name]`` (CLIP's head split)."""
    x = inputs[name]
    return x.view(x.shape[0], x.shape[1], inputs["heads"], -1).transpose(1, 2)


def _vtok(inputs):
    import vtok_fast.reduce.compress as reduce

    if inputs["kind"] == "attention":
        from vtok_fast.reduce.attention_scores import attention_scores

        queries, keys = inputs["queries"], inputs["keys"]
        return lambda: attention_scores(queries, keys)
    method, x = inputs["method"], inputs["tokens"]
    if method == "pool_avg":
        return lambda: reduce.pool(x, 2, "avg", prefix=1).tokens
    if method == "pool_bilinear":
        return lambda: reduce.pool(x, 2, "bilinear", prefix=1).tokens
    if method == "pixel_shuffle":
        patches = x[:, 1:]
        return lambda: reduce.pixel_shuffle(patches, 2).tokens
    keys = _heads(inputs, "k")
    cls_query = _heads(inputs, "q")[:, :, :1]
    if method == "tome":
        metric = keys.mean(dim=1)
        return lambda: reduce.tome(x, inputs["keep"], metric=metric, prefix=1).tokens
    if method == "attn_topk":
        return lambda: reduce.attn_topk(x, inputs["keep"], queries=cls_query, keys=keys, prefix=1).tokens
    if method == "visionzip":
        dominant, contextual = inputs["dominant"], inputs["contextual"]
        return lambda: reduce.visionzip(x, dominant, contextual, queries=cls_query, keys=keys, prefix=1).tokens
    if method == "dart":
        return lambda: reduce.dart(x, inputs["keep"], keys=keys, prefix=1).tokens
    q1, k1 = inputs["q"][:, None, :1], inputs["k"][:, None]  # one head at full width
    fn = reduce.prumerge if method == "prumerge" else reduce.prumerge_plus
    return lambda: fn(x, queries=q1, keys=k1, prefix=1).tokens


def _baseline(inputs):
    """The eager peer or official loop of each case (None for the attention cases)."""
    if inputs["kind"] != "llava":
        return None
    method, x, grid = inputs["method"], inputs["tokens"], inputs["grid"]
    patches = x[:, 1:]
    if method == "pool_avg":
        pooler = _transformers_pooler("average", grid, x.shape[-1])
        return None if pooler is None else (lambda: pooler(patches))
    if method == "pool_bilinear":
        bilinear = _transformers_bilinear(grid)
        return None if bilinear is None else (lambda: bilinear(patches))
    if method == "pixel_shuffle":
        shuffle = _transformers_pixel_shuffle(grid)
        return None if shuffle is None else (lambda: shuffle(patches))
    if method == "tome":
        metric = _heads(inputs, "k").mean(dim=1)
        return lambda: tome_reference(x, metric, inputs["keep"], 1)
    if method == "attn_topk":
        keys, cls_query = _heads(inputs, "k"), _heads(inputs, "q")[:, :, :1]

        def topk():
            top = _eager_rows(cls_query, keys)[:, 1:].topk(inputs["keep"], dim=1).indices.sort(dim=1).values + 1
            return x.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return topk
    if method == "visionzip":
        attn, metric = inputs["attn_weights"], _heads(inputs, "k").mean(dim=1)
        dominant, contextual = inputs["dominant"], inputs["contextual"]
        return lambda: visionzip_official(x, attn, metric, dominant, contextual)[-1]
    if method == "prumerge_plus":  # not timed (see the module docstring)
        return None
    if method == "dart":
        from vtok_fast.reduce.dart import dart_reference

        keys = _heads(inputs, "k")
        return lambda: dart_reference(x, inputs["keep"], keys=keys, prefix=1)
    q, k = inputs["q"], inputs["k"]
    return lambda: prumerge_official(patches, q, k)[-1][0]


def _attention(build):
    def provider(inputs):
        return build(inputs) if inputs["kind"] == "attention" else None
    return provider


def _compiled_rows(inputs):
    compiled = torch.compile(_eager_rows, dynamic=False)
    queries, keys = inputs["queries"], inputs["keys"]
    return lambda: compiled(queries, keys)


def providers(device=None) -> list[Provider]:
    return [
        Provider("vtok_fast", _vtok, modes=MODES),
        Provider("baseline", _baseline, modes=MODES),
        Provider("materialized", _attention(lambda i: (lambda: _materialized(i["queries_all"], i["keys"]))),
                 modes=MODES),
        Provider("eager_rows", _attention(lambda i: (lambda: _eager_rows(i["queries"], i["keys"]))), modes=MODES),
        Provider("torch_compile", _attention(_compiled_rows), modes=MODES),
    ]


def summarize(results, device, quick: bool = False) -> tuple[str, dict]:
    """Baseline / vtok_fast time per case (each baseline named by its implementation), the
    attention memory ratio and the two CPU targets (a quick run: no verdict)."""
    ok = {(r.case, r.provider): r for r in results if r.median_ms}
    lines, summary = ["compress: baseline time / vtok_fast time (> 1: vtok_fast faster)"], {}
    for case in dict.fromkeys(r.case for r in results):
        ours = ok.get((case, "vtok_fast"))
        if ours is None:
            continue
        for name in ("baseline", "materialized", "eager_rows", "torch_compile"):
            other = ok.get((case, name))
            if other is not None:
                ratio = other.median_ms / ours.median_ms
                summary[f"{case}_{name}_speedup"] = ratio
                lines.append(f"  {case}: {provider_label(other)} {other.median_ms:.2f} ms / vtok_fast "
                             f"{ours.median_ms:.2f} ms = {ratio:.2f}x")
    big = max((r.params["N"] for r in results if r.case.startswith("attention-")), default=None)
    ours, full = ok.get((f"attention-N{big}", "vtok_fast")), ok.get((f"attention-N{big}", "materialized"))
    if ours and full and ours.peak_mem_mb is not None and full.peak_mem_mb:
        ratio = ours.peak_mem_mb / full.peak_mem_mb
        summary["attention_memory_ratio"] = ratio
        lines.append(f"  target: single-row attention at N={big}: {ours.peak_mem_mb:.2f} MiB vs materialized "
                     f"{full.peak_mem_mb:.1f} MiB extra = {ratio:.4f} (<= {MEMORY_TARGET}) "
                     f"{verdict(ratio <= MEMORY_TARGET, quick)}")
    else:
        lines.append("  target: single-row attention memory: not measured")
    prumerge = summary.get("llava15-prumerge_baseline_speedup")
    batch = next((r.params["B"] for r in results if r.case == "llava15-prumerge"), None)
    if prumerge is None:
        lines.append("  target: batched PruMerge vs per-image loop: not measured")
    else:
        lines.append(f"  target: batched PruMerge at B={batch}: {prumerge:.1f}x faster than the official "
                     f"per-image loop (>= {PRUMERGE_TARGET:.0f}x) {verdict(prumerge >= PRUMERGE_TARGET, quick)}")
    return "\n".join(lines), {"summary": summary}
