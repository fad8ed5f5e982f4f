"""Attention with a per-key bias (``vtok-fast bench attention``): ToMe proportional attention.

Inputs as a ViT block makes them: q, k, v are the three strided views of one fused qkv
projection ``(B, N, 3, H, d)``, and the key bias is ``log(size)`` of random token sizes 1..8 (in
the inputs' dtype, as the ToMe patchers pass it). Providers, forward and forward+backward
(``full``, gradients to qkv):

- ``vtok_fast``: ``vtok_fast.reduce.attention.attention(q, k, v, key_bias=bias)``;
- ``sdpa_mask``: ``F.scaled_dot_product_attention`` with the bias as a float ``(B, 1, 1, N)``
  mask (what the ToMe patchers used; on CUDA it cannot take the flash backend);
- ``sdpa_flash_no_bias``: SDPA without a bias, restricted to the flash backend
  (``torch.nn.attention.sdpa_kernel``): the speed to match.

Cases: ViT-B (H=12, d=64) and ViT-L (H=16, d=64) at N = 197, 577, 1025. CUDA: fp16 and bf16,
B = 256 (ViT-B) / 64 (ViT-L). CPU: fp32 with small batches (in the case name), where vtok_fast
runs its SDPA reference path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vtok_fast.bench.harness import Case, Provider, verdict

OP = "attention"
MODES = ("forward", "full")

MODELS = {"vit_b": 12, "vit_l": 16}  # heads; d = 64 for both
HEAD_DIM = 64
LENGTHS = (197, 577, 1025)
GPU_BATCH = {"vit_b": 256, "vit_l": 64}
# CPU: about 50-250 ms per forward on two cores, so the whole table takes a few minutes
CPU_BATCH = {("vit_b", 197): 8, ("vit_b", 577): 2, ("vit_b", 1025): 1,
             ("vit_l", 197): 4, ("vit_l", 577): 1, ("vit_l", 1025): 1}
MAX_SIZE = 8
GPU_TARGET = 1.15  # vtok_fast with a bias / SDPA-flash without one, forward, 16-bit


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _make_case(model: str, batch: int, n: int, dtype: torch.dtype, heads: int | None = None,
               head_dim: int = HEAD_DIM) -> Case:
    heads = heads or MODELS[model]
    params = {"model": model, "B": batch, "H": heads, "N": n, "d": head_dim, "dtype": _dtype_name(dtype)}

    def make_inputs(device: torch.device) -> dict:
        gen = torch.Generator().manual_seed(0)
        qkv = torch.randn(batch, n, 3, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
        size = torch.randint(1, MAX_SIZE + 1, (batch, n), generator=gen)
        return {"qkv": qkv, "bias": size.log().to(device, dtype), "device": device}

    return Case(f"{model}-N{n}-B{batch}-{_dtype_name(dtype)}", params, make_inputs,
                flops=4.0 * batch * heads * n * n * head_dim)


def cases(quick: bool, device) -> list[Case]:
    if quick:
        return [_make_case("vit_b", 2, 17, torch.float32, heads=2),
                _make_case("vit_l", 1, 65, torch.float32, heads=2)]
    if torch.device(device).type == "cuda":
        return [_make_case(model, GPU_BATCH[model], n, dtype)
                for dtype in (torch.float16, torch.bfloat16) for model in MODELS for n in LENGTHS]
    return [_make_case(model, CPU_BATCH[model, n], n, torch.float32) for model in MODELS for n in LENGTHS]


# --- providers -------------------------------------------------------------------------------------

def _qkv(inputs):
    """q, k, v: the (B, H, N, d) strided views of the fused (B, N, 3, H, d) projection."""
    return inputs["qkv"].permute(2, 0, 3, 1, 4).unbind(0)


def _vtok(inputs):
    from vtok_fast.reduce.attention import attention

    bias = inputs["bias"]
    return lambda: attention(*_qkv(inputs), key_bias=bias)


def _sdpa_mask(inputs):
    mask = inputs["bias"][:, None, None, :]
    return lambda: F.scaled_dot_product_attention(*_qkv(inputs), attn_mask=mask)


def _sdpa_flash(inputs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*_qkv(inputs))
    return run


def providers(device=None) -> list[Provider]:
    return [
        Provider("vtok_fast", _vtok),
        Provider("sdpa_mask", _sdpa_mask),
        Provider("sdpa_flash_no_bias", _sdpa_flash),
    ]


# --- summary ----------------------------------------------------------------------------------------

def summarize(results, device, quick: bool = False) -> tuple[str, dict]:
    """Per case and mode: vtok_fast time / SDPA-flash without a bias (on CUDA the target, <= 1.15
    for the 16-bit forward) and SDPA-with-mask time / vtok_fast time (the speedup over the masked
    SDPA ToMe used). A quick run prints no verdict."""
    cuda = torch.device(device).type == "cuda"
    times = {(r.case, r.provider, r.mode): r.median_ms for r in results if r.median_ms}
    if cuda:
        head = (f"attention target on cuda: vtok_fast with a bias <= {GPU_TARGET}x SDPA-flash without one "
                "(fp16/bf16 forward)")
    else:
        head = "attention on cpu (no target: CPU tensors run vtok_fast's SDPA reference path)"
    lines, summary = [head], {}
    for case in dict.fromkeys(r.case for r in results):
        for mode in MODES:
            ours = times.get((case, "vtok_fast", mode))
            mask, flash = times.get((case, "sdpa_mask", mode)), times.get((case, "sdpa_flash_no_bias", mode))
            if not ours:
                continue
            parts = []
            if flash:
                ratio = ours / flash
                summary[f"{case}_{mode}_vs_flash_no_bias"] = ratio
                judged = ""
                if cuda and mode == "forward" and not case.endswith("float32"):
                    judged = f" {verdict(ratio <= GPU_TARGET, quick)}"
                parts.append(f"{ratio:.2f}x the time of SDPA-flash without a bias{judged}")
            if mask:
                summary[f"{case}_{mode}_speedup_vs_mask"] = mask / ours
                parts.append(f"speedup {mask / ours:.2f}x over SDPA with the mask")
            lines.append(f"  {case} {mode}: {ours:.3f} ms, " + ", ".join(parts or ["no baseline measured"]))
    return "\n".join(lines), {"summary": summary}
