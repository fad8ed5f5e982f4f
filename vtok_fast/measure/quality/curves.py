"""Accuracy-versus-tokens curves: every compression method of the library at 1x..16x.

``settings(num_tokens, ratio, fastv_layer)`` lists the ``Setting`` s measured at one ratio (``keep =
num_tokens // ratio`` image tokens per image):

- ``random`` (the floor: ``keep`` tokens drawn uniformly, seed 0, :mod:`drop`), ``pool`` (avg,
  ``stride = sqrt(ratio)``: only at square ratios), ``tome`` (``keep``), ``attn_topk`` (``keep``),
  ``visionzip`` (``keep`` split as LLaVA-1.5's 54 + 10: ``dominant = round(keep * 54 / 64)``, at
  least 1 and at most ``keep - 1``, the rest contextual; none below 2 tokens), ``prumerge`` (``keep - 1`` selected plus its extra token), ``dart``
  (``keep``): each with ``positions="original"`` and ``"compact"`` (at 1x only ``"original"``: the
  two are the same sequence);
- ``fastv`` (``layer=fastv_layer``, ``ratio = 1 - keep / num_tokens``: it prunes in the language
  model, always at the original positions; layers before ``fastv_layer`` see every token) and
  ``pyramiddrop`` with one stage at the same layer and ratio (in the 2-layer reference decoder
  there is room for one stage only, so it must give FastV's answers: a check of the two paths).

At 1x the methods run with a keep-all budget (``prumerge`` has none: it always adds a merged
token): each must reproduce the uncompressed answers exactly (``keep_all_check``).

``run(model, processor, samples, ratios, fastv_layer, progress)`` evaluates the uncompressed model
and every setting (``evaluate.evaluate``) and returns one dict per point: ``method``,
``positions``, ``ratio``, ``spec`` (text), ``accuracy``, ``per_type``, ``image_tokens``,
``prefill_ms``, ``delta`` (to uncompressed). ``beats_random(rows, ratio)`` compares each method
with the random floor of the same ratio and position mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from vtok_fast.measure.quality import drop
from vtok_fast.measure.quality import evaluate as ev

RATIOS = (1, 2, 4, 8, 16)
METHODS = ("random", "pool", "tome", "attn_topk", "visionzip", "prumerge", "dart", "fastv", "pyramiddrop")
VISION = METHODS[:-2]
POSITIONS = drop.POSITIONS


@dataclass(frozen=True)
class Setting:
    """One curve point: ``method``, ``positions`` mode, ``ratio`` and the ``compress`` spec."""
    method: str
    positions: str
    ratio: int
    spec: tuple


def _budget(method: str, keep: int, ratio: int) -> dict | None:
    """``method``'s own budget for ``keep`` tokens at ``ratio``, or ``None`` where it has none."""
    if method in ("random", "tome", "attn_topk", "dart"):
        return {"keep": keep}
    if method == "pool":
        stride = math.isqrt(ratio)
        return {"stride": stride} if stride * stride == ratio else None
    if method == "visionzip":
        if ratio == 1:
            return {"dominant": keep, "contextual": 0}
        if keep < 2:  # it needs one dominant and one contextual token
            return None
        dominant = min(keep - 1, max(1, round(keep * 54 / 64)))
        return {"dominant": dominant, "contextual": keep - dominant}
    if method == "prumerge":
        return None if ratio == 1 or keep < 2 else {"keep": keep - 1}
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def settings(num_tokens: int, ratio: int, fastv_layer: int = 1) -> list[Setting]:
    """Every setting measured at ``ratio`` (see the module docstring)."""
    if not isinstance(ratio, int) or ratio < 1 or num_tokens % ratio:
        raise ValueError(f"ratio must be a positive integer dividing num_tokens={num_tokens}, got {ratio!r}")
    keep = num_tokens // ratio
    out = []
    for positions in POSITIONS[:1] if ratio == 1 else POSITIONS:
        for method in VISION:
            budget = _budget(method, keep, ratio)
            if budget is not None:
                budget = {**budget, "positions": positions}
                if method == "random":
                    budget["seed"] = 0
                out.append(Setting(method, positions, ratio, (method, budget)))
    pruned = 1 - keep / num_tokens
    out.append(Setting("fastv", "original", ratio, ("fastv", {"layer": fastv_layer, "ratio": pruned})))
    out.append(Setting("pyramiddrop", "original", ratio,
                       ("pyramiddrop", {"layers": [fastv_layer], "ratio": pruned})))
    return out


def run(model, processor, samples, ratios=RATIOS, fastv_layer: int = 1, progress=None, batch_size: int = 200) -> list[dict]:
    """The uncompressed point (``method="none"``) then every setting of every ratio, as dicts
    (see the module docstring). ``progress(label, done, total)`` after each batch."""
    num_tokens = ev.tokens_per_image(model, processor, samples)
    points = [None] + [s for r in ratios for s in settings(num_tokens, r, fastv_layer)]
    rows = []
    for i, setting in enumerate(points):
        label = "none" if setting is None else f"{setting.method}/{setting.positions} {setting.ratio}x"
        step = None if progress is None else (lambda d, t, label=f"[{i + 1}/{len(points)}] {label}": progress(label, d, t))
        res = ev.evaluate(model, processor, samples, None if setting is None else setting.spec,
                          batch_size=batch_size, progress=step)
        rows.append({"method": "none" if setting is None else setting.method,
                     "positions": "original" if setting is None else setting.positions,
                     "ratio": 1 if setting is None else setting.ratio, "spec": res.label,
                     "accuracy": res.accuracy, "per_type": res.per_type, "image_tokens": res.image_tokens,
                     "prefill_ms": res.prefill_ms, "delta": res.accuracy - (rows[0]["accuracy"] if rows else res.accuracy),
                     "answers": res.answers})
    return rows


def keep_all_check(rows: list[dict]) -> dict:
    """``{method: True/False}``: whether each 1x (keep-all) method gave exactly the uncompressed
    answers."""
    base = rows[0]["answers"]
    return {r["method"]: r["answers"] == base for r in rows[1:] if r["ratio"] == 1}


def beats_random(rows: list[dict], ratio: int) -> list[dict]:
    """At ``ratio``: each method's accuracy minus the random floor's of the same position mode
    (FastV against ``random/original``), overall and per type."""
    floor = {r["positions"]: r for r in rows if r["method"] == "random" and r["ratio"] == ratio}
    out = []
    for r in rows:
        if r["ratio"] != ratio or r["method"] in ("none", "random") or r["positions"] not in floor:
            continue
        f = floor[r["positions"]]
        out.append({"method": r["method"], "positions": r["positions"], "margin": r["accuracy"] - f["accuracy"],
                    "per_type": {t: a - f["per_type"][t] for t, a in r["per_type"].items()}})
    return out
