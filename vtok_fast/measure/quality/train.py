"""Deterministic training of the reference model, and its cache.

``train(settings)`` trains ``reference.build_model(settings.model, settings.init_seed)`` for
exactly ``settings.steps`` steps of ``settings.batch_size`` fresh images: step ``s`` uses samples
``s*B .. (s+1)*B - 1`` of ``dataset`` stream ``settings.data_seed`` (``more=True``: every question
type in equal share as the first question, then up to ``turns - 1`` further questions about the
same image), through the real processor. Loss: cross-entropy of the logits at each question's last
word (whole vocabulary) against its one answer token. AdamW (betas 0.9, 0.98), linear warm-up then
cosine decay to 10 %, gradient norm clipped at 1.

``layout`` (``LAYOUTS``) decides how an image's questions are put to the model:

- ``"dialogue"`` (LLaVA): one sequence per image, ``<image> q1 a1 q2 a2 ... qK``
  (``reference.dialogue``; the first turn is exactly the evaluation prompt).
- ``"questions"`` (Qwen2-VL): every question is its own evaluation prompt ``<image> q``
  (``question_logits``: one vision pass and one decoder pass over the image's prompt prefix, whose
  key/value cache its questions share, so this costs little more than a dialogue). M-RoPE numbers
  text after an image from the image's largest id, so in a dialogue the later questions sit at
  other rotary offsets from the image than the evaluated first one; Qwen2-VL's decoder finds a
  cell from those offsets alone (its tower has no absolute positions) and, trained on dialogues,
  answered ``relation`` at chance (a 2-layer decoder would have to learn where it is in the
  dialogue first). LLaVA reads a patch's place from its features, so dialogues serve it.

The default settings are the committed checkpoints': batches of 64 images (up to 6 questions
each), lr 2e-3; LLaVA 800 steps, Qwen2-VL 900 (``default_settings``). Step times with 2 threads on
a quiet 2-core AMD machine: 0.35 and 0.31 s, 4.7 minutes each (README "Training").

Token drop (``drop.answer_logits``, the same path evaluation uses): in each step a random half of
the images (``drop_share``) keep a uniformly drawn ``ceil(min_keep * N) .. N`` of their ``N``
image tokens, chosen uniformly, with their ORIGINAL position ids; the other half keep all. The
draws come from one ``torch.Generator`` seeded with ``settings.drop_seed``, the weights from
``torch.manual_seed(settings.init_seed)``: two runs with the same settings, torch version, CPU
kind and thread count give bitwise-equal weights (BLAS reductions differ across CPU kinds and
thread counts, so other machines give a slightly different, equally good model). The committed
checkpoint was trained with ``threads=1`` (the default here).

Cache: ``reference_model(settings)`` returns the committed checkpoint (``committed(arch)``:
``vtok_fast/data/quality_llava/``, ``vtok_fast/data/quality_qwen2_vl/``) when its recorded settings
equal ``settings``, else the one under ``cache_dir()/quality/<arch>-<key>`` (``key``: a hash of the
settings), else trains and saves there
(``save_pretrained`` for model and processor, plus ``training.json``). ``retrain=True`` always
trains (and overwrites the cache). ``cache_dir()``: ``$VTOK_FAST_CACHE``, else
``$XDG_CACHE_HOME/vtok_fast``, else ``~/.cache/vtok_fast``.

Both reference models (``ModelSettings.arch``: ``"llava"``, ``"qwen2_vl"``; ``default_settings``)
train through the same drop (``drop`` keeps Qwen2-VL's M-RoPE ids). Command lines (reproduce the committed
checkpoints)::

    python -m vtok_fast.measure.quality.train --out vtok_fast/data/quality_llava
    python -m vtok_fast.measure.quality.train --arch qwen2_vl --out vtok_fast/data/quality_qwen2_vl
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vtok_fast.measure.quality import dataset, drop, reference

DATA = Path(__file__).resolve().parents[2] / "data"
COMMITTED = DATA / "quality_llava"
COMMITTED_QWEN = DATA / "quality_qwen2_vl"
FASTV_LAYER = 1  # FastV's K for the 2-layer reference decoder: layer 0 ranks, layer 1 sees the kept tokens


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights (the cache key hashes all of it)."""
    model: reference.ModelSettings = field(default_factory=reference.ModelSettings)
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 120
    weight_decay: float = 0.01
    drop_share: float = 0.5
    min_keep: float = 0.2
    turns: int = 6
    layout: str = "dialogue"
    data_seed: int = 1
    init_seed: int = 0
    drop_seed: int = 2

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        d = dict(d)
        return cls(model=reference.ModelSettings(**d.pop("model")), **d)

    def key(self) -> str:
        """A 12-hex-digit hash of the settings (and the dataset/vocabulary version)."""
        blob = json.dumps({"settings": self.to_dict(), "vocab": reference.VOCAB, "format": FORMAT_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


LAYOUTS = ("dialogue", "questions")  # how an image's questions are trained (TrainSettings.layout)
FORMAT_VERSION = 4  # bump when dataset or prompt changes alter what a setting trains


def cache_dir() -> Path:
    """``$VTOK_FAST_CACHE``, else ``$XDG_CACHE_HOME/vtok_fast``, else ``~/.cache/vtok_fast``."""
    if os.environ.get("VTOK_FAST_CACHE"):
        return Path(os.environ["VTOK_FAST_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "vtok_fast"
    return Path.home() / ".cache" / "vtok_fast"


def committed(arch: str = "llava") -> Path:
    """The committed checkpoint's folder of ``arch`` (``data/quality_<arch>``)."""
    return COMMITTED_QWEN if arch == "qwen2_vl" else COMMITTED


def batch(processor, samples, arch: str = "llava") -> dict:
    """Processor output (``input_ids``, ``attention_mask``, ``pixel_values``, ...) for ``samples``
    (one question each, ``reference.prompt``)."""
    return processor(images=[s.image for s in samples], text=[reference.prompt(s.question, arch) for s in samples],
                     return_tensors="pt", padding=True)


def _questions(sample, turns: int) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs trained on ``sample``: its own question, then up to ``turns - 1``
    of ``sample.more``."""
    return [(sample.question, sample.answer)] + [(q, a) for q, a, _ in sample.more][:turns - 1]


def dialogue_batch(processor, samples, turns: int, arch: str = "llava"):
    """Processor output for ``samples`` with up to ``turns`` questions each (the sample's own
    question first, then ``sample.more``), the answer ids ``(B, turns)`` (-100 where a sample has
    fewer) and the prediction offsets from the end ``(B, turns)``."""
    texts, answers, offsets = [], [], []
    for s in samples:
        qa = _questions(s, turns)
        text, ends = reference.dialogue(qa, arch)
        texts.append(text)
        answers.append([processor.tokenizer.convert_tokens_to_ids(a) for _, a in qa] + [-100] * (turns - len(qa)))
        offsets.append(ends + [0] * (turns - len(qa)))
    inputs = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    return inputs, torch.tensor(answers), torch.tensor(offsets)


def question_logits(model, processor, samples, questions, owner: torch.Tensor, keep: torch.Tensor, arch: str):
    """``(len(questions), V)`` logits at the last word of each question, question ``j`` asked
    alone about ``samples[owner[j]]`` with only that image's tokens in ``keep[owner[j]]``:
    ``drop.last_logits`` of the evaluation prompt ``reference.prompt(question)``, computed with one
    vision pass and one decoder pass over each image's prompt prefix (its key/value cache, selected
    per question) and one decoder pass over the question words (right-padded, continuing each
    row's position ids from ``drop.next_positions`` of the full prefix)."""
    prefix = processor(images=[s.image for s in samples], text=[reference.prompt("", arch).rstrip()] * len(samples),
                       return_tensors="pt", padding=True)
    inputs = drop.decoder_inputs(model, prefix, keep, "original")
    cache = model(**inputs, use_cache=True, logits_to_keep=1).cache
    cache.batch_select_indices(owner)
    words = processor.tokenizer(list(questions), add_special_tokens=False)["input_ids"]
    width = max(map(len, words))
    ids = torch.tensor([w + [processor.tokenizer.pad_token_id] * (width - len(w)) for w in words])
    mask = inputs["attention_mask"][owner]
    mask = torch.cat([mask, mask.new_ones(len(words), width)], dim=1)
    positions = drop.next_positions(model, prefix, inputs)[..., owner, :] + torch.arange(width)
    logits = model(input_ids=ids, cache=cache, attention_mask=mask, position_ids=positions).logits
    return logits[torch.arange(len(words)), torch.tensor([len(w) - 1 for w in words])]


def _dialogue_loss(model, processor, samples, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """``layout="dialogue"``: one sequence ``<image> q1 a1 ... qK`` per image, a loss at every answer."""
    inputs, target, offsets = dialogue_batch(processor, samples, settings.turns, settings.model.arch)
    span = int(offsets.max()) + 1
    keep = _train_keep(len(samples), settings.model.num_image_tokens, settings, gen)
    logits = drop.last_logits(model, inputs, keep, "original", span)
    picked = logits.gather(1, (span - 1 - offsets)[..., None].expand(-1, -1, logits.shape[-1]))
    return F.cross_entropy(picked.flatten(0, 1).float(), target.flatten(), ignore_index=-100)


def _questions_loss(model, processor, samples, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """``layout="questions"``: each of an image's up to ``turns`` questions is its own evaluation
    prompt (``question_logits``); the image's drop is shared by its questions."""
    owner, questions, answers = [], [], []
    for i, s in enumerate(samples):
        for question, answer in _questions(s, settings.turns):
            owner.append(i)
            questions.append(question)
            answers.append(answer)
    answers = processor.tokenizer.convert_tokens_to_ids(answers)
    keep = _train_keep(len(samples), settings.model.num_image_tokens, settings, gen)
    logits = question_logits(model, processor, samples, questions, torch.tensor(owner), keep, settings.model.arch)
    return F.cross_entropy(logits.float(), torch.tensor(answers))


_LOSSES = {"dialogue": _dialogue_loss, "questions": _questions_loss}


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _train_keep(batch_size: int, num_tokens: int, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """Keep mask of one step: ``drop_share`` of the rows keep a random count in
    ``ceil(min_keep*N)..N``, the others keep all."""
    dropping = torch.randperm(batch_size, generator=gen)[:round(settings.drop_share * batch_size)]
    low = math.ceil(settings.min_keep * num_tokens)
    counts = torch.full((batch_size,), num_tokens, dtype=torch.long)
    counts[dropping] = torch.randint(low, num_tokens + 1, (len(dropping),), generator=gen)
    return drop.keep_mask(counts, num_tokens, gen)


def train(settings: TrainSettings = TrainSettings(), threads: int | None = 1, log_every: int = 0, callback=None):
    """Train a fresh model; returns ``(model, processor, record)`` where ``record`` holds the
    settings, per-step losses, wall time, thread count and versions. ``threads`` sets
    ``torch.set_num_threads`` for the run (restored after); ``None`` leaves it. Every
    ``log_every`` steps: a progress line, and ``callback(step, model, processor)`` if given (it
    must not touch the global RNG or the model's weights)."""
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = reference.build_model(settings.model, settings.init_seed).train()
        processor = reference.build_processor(settings.model)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98),
                                weight_decay=settings.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, settings))
        gen = torch.Generator().manual_seed(settings.drop_seed)
        losses, start = [], time.perf_counter()
        bsz = settings.batch_size
        for step in range(settings.steps):
            samples = dataset.make_dataset(bsz, settings.data_seed, size=settings.model.image_size,
                                           more=settings.turns > 1, start=step * bsz)
            loss = _LOSSES[settings.layout](model, processor, samples, settings, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{settings.steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
                if callback is not None:
                    callback(step + 1, model, processor)
        record = {"settings": settings.to_dict(), "key": settings.key(), "losses": losses,
                  "wall_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor()}
        return model.eval(), processor, record
    finally:
        torch.set_num_threads(saved_threads)


def save(model, processor, record: dict, path) -> Path:
    """Write ``model`` and ``processor`` (``save_pretrained``, safetensors) and ``training.json``
    (``record`` without the per-step losses, plus their first/last values) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    summary = {k: v for k, v in record.items() if k != "losses"}
    losses = record.get("losses", [])
    summary["loss_first_last"] = [losses[0], losses[-1]] if losses else []
    (path / "training.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return path


def recorded_settings(path) -> TrainSettings | None:
    """The ``TrainSettings`` recorded in ``path/training.json``, or ``None`` if absent/unreadable."""
    try:
        return TrainSettings.from_dict(json.loads((Path(path) / "training.json").read_text())["settings"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def default_settings(arch: str = "llava") -> TrainSettings:
    """The committed checkpoint's settings of ``arch`` (``"llava"`` or ``"qwen2_vl"``).

    Qwen2-VL differs in ``layout="questions"`` (module docstring) and ``drop_share=0.25``: its 16
    tokens are whole grid cells, so a dropped token is a whole shape, and the ``count`` and
    ``relation`` answers of half the images (the LLaVA share) became unanswerable targets; with a
    quarter the same recipe went from 92.8 % to 94.0 % held-out (250 questions, rotary base 1)
    and ``steps=900``: 800 gave 94.8 % (500 questions), 900 gave 96.2 %; at 0.31 s a step (2
    threads, quiet 2-core machine) that is 4.7 minutes."""
    if arch == "qwen2_vl":
        return TrainSettings(model=reference.qwen_settings(), layout="questions", drop_share=0.25, steps=900)
    if arch != "llava":
        raise ValueError(f"arch must be one of {reference.ARCHS}, got {arch!r}")
    return TrainSettings()


def cached_path(settings: TrainSettings = TrainSettings()) -> Path:
    """Where ``reference`` caches the model trained with ``settings``."""
    return cache_dir() / "quality" / f"{settings.model.arch}-{settings.key()}"


def reference_model(settings: TrainSettings = TrainSettings(), retrain: bool = False, verbose: bool = False,
                    with_record: bool = False):
    """``(model, processor)`` trained with ``settings`` (plus the ``training.json`` record with
    ``with_record``): the committed checkpoint if it was trained with exactly these settings, else
    the cached one, else (or with ``retrain``) trained now and cached."""
    found = None
    if not retrain:
        found = next((p for p in (committed(settings.model.arch), cached_path(settings))
                      if recorded_settings(p) == settings and (p / "model.safetensors").exists()), None)
    if found is None:
        model, processor, record = train(settings, log_every=100 if verbose else 0)
        found = save(model, processor, record, cached_path(settings))
    model, processor = reference.load(found)
    if not with_record:
        return model, processor
    record = json.loads((found / "training.json").read_text())
    return model, processor, {**record, "path": str(found)}


def main(argv=None) -> int:
    """``python -m vtok_fast.measure.quality.train [--arch llava|qwen2_vl] [--retrain] [--out DIR] [--steps N]
    [--threads T]``:
    train (or load from the cache) the reference model, print held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=reference.ARCHS, default="llava", help="which reference model (default llava)")
    parser.add_argument("--retrain", action="store_true", help="train even if a cached model exists")
    parser.add_argument("--out", help="train and write the model here (e.g. the committed reference_llava/)")
    parser.add_argument("--steps", type=int, help="override the step budget (changes the cache key)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1, "
                                                               "as the committed checkpoint)")
    args = parser.parse_args(argv)
    settings = default_settings(args.arch)
    settings = settings if args.steps is None else dataclasses.replace(settings, steps=args.steps)
    if args.out:
        model, processor, record = train(settings, threads=args.threads, log_every=100)
        save(model, processor, record, args.out)
        print(f"wrote {args.out} in {record['wall_s']:.0f}s ({settings.steps} steps, {record['threads']} threads)")
    else:
        model, processor = reference_model(settings, retrain=args.retrain, verbose=True)
    from vtok_fast.measure.quality import accuracy, evaluate
    print(evaluate.format_table(accuracy.report(model, processor, accuracy.held_out())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
