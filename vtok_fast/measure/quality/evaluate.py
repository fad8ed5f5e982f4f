"""Answer accuracy of a VLM under token compression: ``evaluate`` and ``compare``.

``evaluate(model, processor, data, compress=None, metric="exact")`` -> ``EvalResult``:

- ``model``: a model of any family ``vtok_fast.patch.hf(compress=...)`` runs (LLaVA-1.5 and the
  families of ``vtok_fast.patch.families``), eval mode; ``processor``: its processor. ``data``: a list of records -- dicts
  ``{"image": path | PIL image | (H, W, 3) uint8 array, "question": str, "answer": str}`` (an
  optional ``"type"`` groups the accuracy), or ``dataset.Sample`` -- or a JSONL path
  (:func:`load_jsonl`).
- ``compress``: ``None`` (uncompressed), a ``(method, budget)`` pair or a ``"method:key=value,..."``
  string: any method of ``vtok_fast.patch.hf(model, compress=...)`` (applied for the run, then
  removed; an earlier compression of the model is refused), or ``("random", {"keep": k,
  "positions": "original" | "compact", "seed": 0})``: ``k`` image tokens per image kept uniformly
  at random (the floor a method should beat), through :mod:`drop` (LLaVA-1.5 and Qwen2-VL models).
- The prompt: ``prompt(question)`` if given (a callable or a format string with ``{question}``),
  else the processor's chat template with one image and the question when it has one, else
  ``"<image token> question"``. Answers are greedy: ``max_new_tokens`` (default: the most tokens
  any answer takes) new tokens; with one new token, the argmax of the prefill's last logits.
- ``metric``: ``"exact"`` (the decoded answer, cut at its first newline, equals the reference
  after lower-casing and stripping spaces and a final period) or ``"prefix"`` (it starts with it).
- Recorded: accuracy overall and per ``type``; ``image_tokens``: image tokens per image the
  language model attends to (for a vision method the image columns the first row kept, else
  ``patch.image_token_count``; for FastV / PyramidDrop the count the last stage keeps, which its
  layers see; ``k`` for random); ``prefill_ms``: the prompt forward's wall time per question
  (batched, ``torch.no_grad``, synchronized on CUDA).

Layering: ``measure.quality`` is the one part of ``measure`` above ``patch`` (it evaluates patched
models; ``patch`` itself reads ``measure.budget``, below it): ``tests/test_layout.py`` states it.

``compare(model, processor, data, specs)`` evaluates the uncompressed model first, then every spec,
and sets each row's ``delta`` to its accuracy minus the uncompressed one.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import vtok_fast.patch as vpatch
from vtok_fast.measure.budget import parse_value
from vtok_fast.measure.quality import drop
from vtok_fast.patch import hf_compress, hf_family_compress, hf_fastv
from vtok_fast.patch._common import is_patched

METRICS = ("exact", "prefix")
IN_LLM = ("fastv", "pyramiddrop")  # pruned inside the language model (vtok_fast.patch.hf_fastv)


@dataclass
class EvalResult:
    """One evaluated setting: ``label`` (``"none"`` or the spec as text), accuracy, per-type
    accuracy, question count, image tokens per image, prefill ms per question, the answers."""
    label: str
    compress: tuple | None
    accuracy: float
    per_type: dict
    count: int
    image_tokens: int
    prefill_ms: float
    delta: float | None = None
    answers: list = field(default_factory=list, repr=False)

    def to_dict(self, answers: bool = False) -> dict:
        out = asdict(self)
        out["compress"] = None if self.compress is None else [self.compress[0], self.compress[1]]
        if not answers:
            out.pop("answers")
        return out


def parse_spec(spec) -> tuple[str, dict] | None:
    """``None``, ``(method, {budget})`` or ``"method:key=value,..."`` (values read as bool, int,
    float or text) as ``(method, budget)``; anything else raises a ``TypeError`` naming ``compress``."""
    if spec is None or spec in ("none", ""):
        return None
    if isinstance(spec, str):
        method, _, rest = spec.partition(":")
        budget = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, value = item.partition("=")
            if not equals or not key.strip():
                raise ValueError(f"compress={spec!r}: expected key=value after the method name, got {item!r}")
            budget[key.strip()] = parse_value(value.strip())
        return method.strip(), budget
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return spec[0], dict(spec[1])
    raise TypeError(f"compress must be None, (method, {{budget}}) or 'method:key=value,...', got {spec!r}")


def format_spec(spec) -> str:
    """``"none"`` or ``"method:key=value,..."``."""
    if spec is None:
        return "none"
    method, budget = spec
    return method + (":" + ",".join(f"{k}={v}" for k, v in budget.items()) if budget else "")


def load_jsonl(path) -> list[dict]:
    """Records of a JSONL file, one ``{"image", "question", "answer"}`` object a line (optional
    ``"type"``); relative image paths are read from the file's folder. Errors name the line."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data: {path}:{number} is not JSON ({exc.msg})") from None
        missing = [k for k in ("image", "question", "answer") if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"data: {path}:{number} lacks {', '.join(missing)}")
        image = Path(record["image"])
        record["image"] = str(image if image.is_absolute() else path.parent / image)
        records.append(record)
    if not records:
        raise ValueError(f"data: {path} holds no records")
    return records


def _records(data) -> list[dict]:
    if isinstance(data, (str, Path)):
        return load_jsonl(data)
    if not isinstance(data, (list, tuple)) or not data:
        raise TypeError(f"data must be a non-empty list of records or a JSONL path, got {type(data).__name__}")
    out = []
    for item in data:
        if hasattr(item, "qtype"):  # dataset.Sample
            out.append({"image": item.image, "question": item.question, "answer": item.answer, "type": item.qtype})
        elif isinstance(item, dict) and all(k in item for k in ("image", "question", "answer")):
            out.append(item)
        else:
            raise TypeError(f"data: each record needs image, question and answer, got {item!r:.80}")
    return out


def _image(value):
    from PIL import Image

    if isinstance(value, (str, Path)):
        with Image.open(value) as img:
            return img.convert("RGB")
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return value


def _prompt_fn(processor, prompt):
    if callable(prompt):
        return prompt
    if isinstance(prompt, str):
        return lambda q: prompt.format(question=q)
    if prompt is not None:
        raise TypeError(f"prompt must be None, a format string or a callable, got {type(prompt).__name__}")
    if getattr(processor, "chat_template", None):
        def chat(question):
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(turn, add_generation_prompt=True)
        return chat
    return lambda q: f"{processor.image_token} {q}"


def tokens_per_image(model, processor, data, prompt=None) -> int:
    """Image placeholders the processor writes for the first record of ``data`` (the image
    tokens an uncompressed model gives its language model for that image)."""
    record = _records(data)[0]
    inputs = processor(images=[[_image(record["image"])]], text=[_prompt_fn(processor, prompt)(record["question"])],
                       return_tensors="pt")
    return int((inputs["input_ids"][0] == model.config.image_token_id).sum())


def _normalize(text: str) -> str:
    return " ".join(text.split("\n")[0].strip().lower().rstrip(".").split())


def score(prediction: str, answer: str, metric: str = "exact") -> bool:
    """Whether ``prediction`` answers ``answer`` under ``metric`` (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    pred, ref = _normalize(prediction), _normalize(str(answer))
    return pred == ref if metric == "exact" else pred.startswith(ref)


def _max_new_tokens(processor, records) -> int:
    tok = processor.tokenizer
    return max(len(tok(" " + str(r["answer"]).strip(), add_special_tokens=False)["input_ids"]) for r in records)


def _sync(model) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _answer_batch(model, inputs, spec, new_tokens: int, generator) -> tuple[list[list[int]], float]:
    """Greedy new token ids per row and the prefill's wall time (s)."""
    random_drop = spec is not None and spec[0] == "random"
    keep = None
    if random_drop:
        n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
        counts = torch.full((inputs["input_ids"].shape[0],), spec[1]["keep"], dtype=torch.long)
        keep = drop.keep_mask(counts, n, generator).to(inputs["input_ids"].device)
    _sync(model)
    start = time.perf_counter()
    if random_drop:
        logits = drop.answer_logits(model, inputs, keep, spec[1].get("positions", "original"))
    else:
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
    _sync(model)
    elapsed = time.perf_counter() - start
    if new_tokens == 1:
        return [[int(i)] for i in logits.argmax(-1)], elapsed
    if random_drop:
        ids = drop.greedy(model, inputs, keep, spec[1].get("positions", "original"), new_tokens)
    else:
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        ids = out[:, inputs["input_ids"].shape[1]:]
    return ids.tolist(), elapsed


def _check_random(spec, num_tokens: int) -> None:
    budget = spec[1]
    unknown = sorted(set(budget) - {"keep", "positions", "seed"})
    keep = budget.get("keep")
    if unknown or not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= num_tokens:
        raise ValueError(f"compress random takes keep= (an integer in 1..{num_tokens}), positions= and seed=; "
                         f"got {budget}")
    if budget.get("positions", "original") not in drop.POSITIONS:
        raise ValueError(f"compress random: positions must be one of {drop.POSITIONS}, got {budget['positions']!r}")


def _image_tokens(model, spec, num_tokens: int, input_ids: torch.Tensor) -> int:
    if spec is None:
        return num_tokens
    if spec[0] == "random":
        return spec[1]["keep"]
    if spec[0] in IN_LLM:  # the image tokens the last pruning stage keeps (first row)
        name = "_fastv_info" if spec[0] == "fastv" else "_pyramiddrop_info"
        info = next((m.__dict__[name] for m in model.modules() if name in m.__dict__), None)
        return int((info["image_kept"][0] >= 0).sum())
    kept = (getattr(model, "_compress_info", None) or {}).get("kept")
    if kept is not None:  # the placeholders were dropped inside the forward: the kept image columns
        columns = kept[0][kept[0] >= 0].to(input_ids.device)
        return int((input_ids[0, columns] == model.config.image_token_id).sum())
    return vpatch.image_token_count(model)


class _Compressed:
    """Context: ``model`` patched with ``spec`` (a ``patch.hf`` method) inside, unpatched after."""

    def __init__(self, model, spec):
        self.model, self.spec = model, spec

    def __enter__(self):
        if self.spec is not None and self.spec[0] != "random":
            vpatch.hf(self.model, fuse_embed=False, fuse_project=False, compress=self.spec)
        return self.model

    def __exit__(self, *exc):
        if self.spec is not None and self.spec[0] != "random":
            (hf_fastv if self.spec[0] in IN_LLM else hf_compress).remove(self.model)


def _check_unpatched(model) -> None:
    for feature in (hf_compress.FEATURE, hf_family_compress.FEATURE, hf_fastv.FEATURE):
        if any(is_patched(m, feature) for m in model.modules()):
            raise ValueError("model already carries a compress= patch: evaluate applies each compression itself; "
                             "call vtok_fast.patch.unpatch(model) first")


def evaluate(model, processor, data, compress=None, metric: str = "exact", *, batch_size: int = 32,
             max_new_tokens: int | None = None, prompt=None, progress=None) -> EvalResult:
    """Accuracy of ``model`` on ``data`` with ``compress`` (see the module docstring).
    ``progress(done, total)`` is called after each batch."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    records, spec, make_prompt = _records(data), parse_spec(compress), _prompt_fn(processor, prompt)
    new_tokens = _max_new_tokens(processor, records) if max_new_tokens is None else max_new_tokens
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    _check_unpatched(model)
    model_type = getattr(model.config, "model_type", None)
    if spec is not None and spec[0] == "random" and model_type not in ("llava", *drop.MROPE):
        raise ValueError(f"compress random (the floor) drops tokens between the projector and the decoder of a "
                         f"LLaVA-1.5 or Qwen2-VL model (vtok_fast.measure.quality.drop); got a model of model_type "
                         f"{model_type!r}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(spec[1].get("seed", 0)) if spec and spec[0] == "random" else 0)
    answers, seconds, tokens = [], 0.0, None
    with _Compressed(model, spec):
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = [[_image(r["image"])] for r in chunk]  # one list per prompt: every family's processor takes it
            inputs = processor(images=images, text=[make_prompt(r["question"]) for r in chunk], return_tensors="pt",
                               padding=True).to(device)
            if tokens is None:
                num = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
                if spec is not None and spec[0] == "random":
                    _check_random(spec, num)
            ids, elapsed = _answer_batch(model, inputs, spec, new_tokens, generator)
            if tokens is None:
                tokens = _image_tokens(model, spec, num, inputs["input_ids"])
            seconds += elapsed
            answers += processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            if progress is not None:
                progress(min(start + batch_size, len(records)), len(records))
    correct = [score(a, r["answer"], metric) for a, r in zip(answers, records)]
    per_type = {}
    for qtype in dict.fromkeys(r["type"] for r in records if "type" in r):
        hits = [c for c, r in zip(correct, records) if r.get("type") == qtype]
        per_type[qtype] = sum(hits) / len(hits)
    return EvalResult(format_spec(spec), spec, sum(correct) / len(correct), per_type, len(records), tokens,
                      1000 * seconds / len(records), answers=answers)


def compare(model, processor, data, specs, metric: str = "exact", **options) -> list[EvalResult]:
    """``evaluate`` uncompressed, then with each of ``specs``; each row's ``delta`` is its
    accuracy minus the uncompressed accuracy (0 for the first row). ``options`` go to ``evaluate``
    (``progress(label, done, total)`` here)."""
    progress = options.pop("progress", None)
    data = _records(data)
    rows = []
    for spec in [None, *specs]:
        label = format_spec(parse_spec(spec))
        step = None if progress is None else (lambda done, total, label=label: progress(label, done, total))
        rows.append(evaluate(model, processor, data, spec, metric, progress=step, **options))
        rows[-1].delta = rows[-1].accuracy - rows[0].accuracy
    return rows


def format_table(rows: list[EvalResult]) -> str:
    """Plain-text table: method, accuracy, delta to uncompressed, image tokens, prefill ms."""
    width = max(12, *(len(r.label) for r in rows))
    lines = [f"{'method':<{width}} {'accuracy':>8} {'delta':>7} {'tokens':>6} {'prefill ms/q':>12}"]
    for r in rows:
        delta = "" if r.delta is None else f"{100 * r.delta:+.1f}"
        lines.append(f"{r.label:<{width}} {100 * r.accuracy:7.1f}% {delta:>7} {r.image_tokens:>6} {r.prefill_ms:12.2f}")
    return "\n".join(lines)
