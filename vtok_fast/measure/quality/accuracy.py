"""The held-out questions of the reference model and a one-call accuracy report.

``held_out(n, seed=HELD_OUT_SEED)`` is the fixed held-out set: stream ``HELD_OUT_SEED`` of
``dataset.make_dataset`` (every type in equal share), a stream training never reads (training
uses ``TrainSettings.data_seed``). ``report(model, processor, samples, ratios)`` evaluates the
uncompressed model and the random-drop floor at each ratio in both position modes
(``evaluate.evaluate`` with ``("random", {"keep": N // ratio, "positions": ...})``).
"""
from __future__ import annotations

from vtok_fast.measure.quality import dataset, drop
from vtok_fast.measure.quality import evaluate as ev

HELD_OUT_SEED = 12345


def held_out(n: int = 600, seed: int = HELD_OUT_SEED, size: int = 64) -> list[dataset.Sample]:
    """The held-out questions: ``dataset.make_dataset(n, seed, size=size)``."""
    return dataset.make_dataset(n, seed, size=size)


def report(model, processor, samples, ratios=(2, 4, 8)) -> list[ev.EvalResult]:
    """Uncompressed, then random drop at each ratio in both position modes (``delta`` set)."""
    num = ev.tokens_per_image(model, processor, samples)
    specs = [("random", {"keep": num // r, "positions": p, "seed": 0}) for r in ratios for p in drop.POSITIONS]
    return ev.compare(model, processor, samples, specs, batch_size=200)
