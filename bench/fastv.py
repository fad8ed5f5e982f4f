"""FastV ``generate`` throughput on a small random-weight LLaVA (``vtok-fast bench fastv``).

The model is ``LlavaForConditionalGeneration`` built from a config (no download): a CLIP tower at
336 px / patch 14 (576 image tokens per image, as LLaVA-1.5) and a Llama language model; the prompt
is a few text tokens, the 576 image tokens, then a few more text tokens (rows of a batch differ in
length: left padding). Every provider runs greedy ``generate`` for a fixed number of new tokens
(``min_new_tokens = max_new_tokens``), so the times are comparable:

- ``vtok_fast``: ``vtok_fast.patch.hf_fastv`` with FastV's defaults (``layer=2``, ``ratio=0.5``),
  SDPA attention;
- ``pyramiddrop``: ``compress=("pyramiddrop", {"ratio": 0.5})``, its default stages (boundaries at
  a quarter, half and three quarters of the depth, half of the remaining image tokens pruned at
  each), SDPA attention;
- ``unpruned``: the same model unpatched (SDPA);
- ``unpruned_eager`` / ``vtok_fast_eager``: both with ``attn_implementation="eager"``, the only
  attention the official FastV code runs (its batch-1 code path is not a peer here: it cannot run
  the batched cases).

``torch.compile`` is not a provider: ``generate`` with a growing ``DynamicCache`` recompiles for
every new length (and, pruned, for every pruned length), which measures compilation, not
decoding. CPU: text width 256, 8 layers; GPU: width 2048, 16 layers, fp16. The summary prints
tokens/s and the speedup of pruning (unpruned / FastV time) per case; the issue sets no target.
"""
from __future__ import annotations

import copy

import torch

from vtok_fast.bench.harness import Case, Provider

OP = "fastv"
MODES = ("forward",)
LAYER, RATIO = 2, 0.5  # FastV's README defaults
IMAGE_TOKEN = 0  # the id the prompts use for <image>; text ids start above it

# (vision, text, batch sizes, new tokens) per setting
SETTINGS = {
    "quick": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56),
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2),
              (1, 2), 2),
    "cpu": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=336),
            dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4),
            (1, 4), 16),
    "cuda": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336),
             dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16),
             (1, 8), 32),
}
VOCAB = 1024
TEXT_BEFORE, TEXT_AFTER = 6, 10  # text tokens around the image (row b has b fewer before it)


def small_llava(vision: dict, text: dict):
    """A random-weight LLaVA-1.5-shaped model: CLIP tower (patch 14) + Llama, from configs."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(patch_size=14, **vision),
                         text_config=LlamaConfig(vocab_size=VOCAB, pad_token_id=VOCAB - 1, bos_token_id=1,
                                                 eos_token_id=2, **text),
                         image_token_id=IMAGE_TOKEN, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def prompts(batch: int, num_image: int, generator: torch.Generator) -> dict:
    """``input_ids`` / ``attention_mask`` (left padding): row ``b`` has ``b`` fewer text tokens before
    the image than row 0."""
    rows = []
    for b in range(batch):
        before = torch.randint(3, VOCAB - 1, (TEXT_BEFORE - min(b, TEXT_BEFORE - 1),), generator=generator)
        after = torch.randint(3, VOCAB - 1, (TEXT_AFTER,), generator=generator)
        rows.append(torch.cat([torch.tensor([1]), before, torch.full((num_image,), IMAGE_TOKEN), after]))
    length = max(len(r) for r in rows)
    ids = torch.full((batch, length), VOCAB - 1)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _inputs(setting: str, batch: int, new_tokens: int):
    def make(device: torch.device) -> dict:
        from vtok_fast.patch.hf_compress import image_token_count

        vision, text, _, _ = SETTINGS[setting]
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        model = small_llava(vision, text).to(device, dtype)
        gen = torch.Generator().manual_seed(0)
        prompt = prompts(batch, image_token_count(model), gen)
        prompt = {k: v.to(device) for k, v in prompt.items()}
        size = vision["image_size"]
        prompt["pixel_values"] = torch.randn(batch, 3, size, size, generator=gen).to(device, dtype)
        return {"model": model, "prompt": prompt, "new_tokens": new_tokens}
    return make


def cases(quick: bool, device) -> list[Case]:
    setting = "quick" if quick else ("cuda" if torch.device(device).type == "cuda" else "cpu")
    vision, text, batches, new_tokens = SETTINGS[setting]
    image_tokens = (vision["image_size"] // 14) ** 2
    return [Case(f"llava_generate_b{batch}",
                 {"B": batch, "image_tokens": image_tokens, "new_tokens": new_tokens, "text_width": text["hidden_size"],
                  "text_layers": text["num_hidden_layers"], "layer": LAYER, "ratio": RATIO},
                 _inputs(setting, batch, new_tokens))
            for batch in batches]


def _generate(inputs: dict, *, impl: str, fastv: bool, method: str = "fastv"):
    """Greedy ``generate`` closure on a copy of the case's model (``run.model`` is that copy)."""
    model = copy.deepcopy(inputs["model"])
    model.set_attn_implementation(impl)
    if fastv:
        from vtok_fast.patch import hf_fastv

        budget = {"layer": LAYER, "ratio": RATIO} if method == "fastv" else {"ratio": RATIO}
        hf_fastv.apply(model, compress=(method, budget))
    prompt, steps = inputs["prompt"], inputs["new_tokens"]

    def run():
        return model.generate(**prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    run.model = model
    return run


def providers(device=None) -> list[Provider]:
    return [
        Provider("vtok_fast", lambda inp: _generate(inp, impl="sdpa", fastv=True), modes=MODES),
        Provider("unpruned", lambda inp: _generate(inp, impl="sdpa", fastv=False), modes=MODES),
        Provider("pyramiddrop", lambda inp: _generate(inp, impl="sdpa", fastv=True, method="pyramiddrop"),
                 modes=MODES),
        Provider("vtok_fast_eager", lambda inp: _generate(inp, impl="eager", fastv=True), modes=MODES),
        Provider("unpruned_eager", lambda inp: _generate(inp, impl="eager", fastv=False), modes=MODES),
    ]


def summarize(results, device, quick: bool = False) -> tuple[str, dict]:
    """Generated tokens per second of every provider and the speedups of pruning, per case. No target, so no
    verdict, quick run or not."""
    times = {(r.case, r.provider): r.median_ms for r in results if r.median_ms and r.mode == "forward"}
    params = {r.case: r.params for r in results}
    lines, summary = [f"FastV (layer={LAYER}, ratio={RATIO}) generate throughput on {torch.device(device).type}"], {}
    for case in sorted(params, key=lambda c: params[c]["B"]):
        p = params[case]
        tokens = p["B"] * p["new_tokens"]
        rates = {prov: tokens / ms * 1e3 for (c, prov), ms in times.items() if c == case}
        for prov, rate in rates.items():
            summary[f"{case}_{prov}_tokens_per_s"] = rate
        pairs = [("vtok_fast", "unpruned", "SDPA"), ("vtok_fast_eager", "unpruned_eager", "eager"),
                 ("vtok_fast", "unpruned_eager", "FastV on SDPA vs unpruned eager"),
                 ("pyramiddrop", "unpruned", "PyramidDrop on SDPA")]
        parts = []
        for ours, base, label in pairs:
            if ours in rates and base in rates:
                ratio = times[(case, base)] / times[(case, ours)]
                summary[f"{case}_speedup_{ours}_vs_{base}"] = ratio
                parts.append(f"{label} {ratio:.2f}x")
        shown = ", ".join(f"{prov} {rate:.1f}" for prov, rate in rates.items())
        speedups = f"; pruning speedup: {', '.join(parts)}" if parts else ""
        lines.append(f"  B={p['B']}, {p['image_tokens']} image tokens, {p['new_tokens']} new tokens: "
                     f"tokens/s {shown or 'not measured'}{speedups}")
    return "\n".join(lines), {"summary": summary}
