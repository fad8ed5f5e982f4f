"""Merger / projector benchmark: the fused drop-in modules against the real ones, in one run.

Providers: ``vtok_fast`` (the drop-in module of ``vtok_fast.project.modules``, loaded with the
real module's weights); ``eager`` (the real module: transformers / timm code); ``torch.compile``
of the real module's forward; ``gemms`` (forward only): the case's GEMMs alone (``gemm_shapes``,
random operands in the case's dtype, one ``torch.mm`` each, as the eager modules run them): the
floor of an eager forward on a machine whose time the GEMMs take (on the CPU vtok_fast's own
GEMMs may be oneDNN's, ``vtok_fast._cpu_gemm``, and go below it).

Cases (GPU sizes from the issue; CPU sizes reduced so a full run stays within a few minutes):

- ``qwen2vl``: Qwen2-VL's ``PatchMerger``, N = 4,096 patches (CPU: 1,024) of C = 1,280, 2x2
  windows already contiguous, LayerNorm over C, Linear 5,120 -> 5,120, GELU, Linear -> 3,584;
- ``internvl``: InternVL's ``pixel_shuffle`` + ``InternVLMultiModalProjector`` on 1,024 tokens
  (32 x 32, plus CLS, dropped) of C = 1,024, LayerNorm over 4,096, Linear -> 4,096, GELU,
  Linear -> 4,096; B = 8 on GPU, 1 on CPU;
- ``swin_b_stage2``: timm Swin-B's ``PatchMerging`` between stages 1 and 2, (B, 56, 56, 128) ->
  (B, 28, 28, 256); B = 64 on GPU, 8 on CPU.

Issue 21, one case per family at its checkpoint's widths (``vtok_fast.project.vlm_projectors``
against the transformers class; GPU / CPU token counts):

- ``qwen2_5_vl``: Qwen2.5-VL-7B merger, RMS ``ln_q``, 1280 -> 5120 -> 3584, 4,096 / 1,024 patches;
- ``qwen3_vl``: Qwen3-VL-8B merger, LayerNorm over C, 1152 -> 4608 -> 4096, 4,096 / 1,024 patches;
- ``gemma3``: Gemma 3 4B projector, 64 x 64 SigLIP tokens of 1152 pooled 4 x 4 to 256, Gemma RMS
  norm, -> 2560; 8 / 1 images;
- ``idefics3``: Idefics3-8B connector, 26 x 26 tokens of 1152, shuffle 2 -> 4608 -> 4096; 16 / 1 images;
- ``llama4``: Llama 4 vision adapter, 24 x 24 tokens of 1408, shuffle 2 -> 5632 -> 4096 (GELU) ->
  4096 (GELU); 16 / 1 images;
- ``mistral3``: Mistral Small 3.1 projector, RMS norm, 2 x 2 unfold 4096 -> 1024, 1024 -> 5120 ->
  5120; a 64 x 64 / 32 x 32 patch image;
- ``glm4v``: GLM-4.1V merger, 4096 -> 4096, LayerNorm, GELU, SwiGLU 4096 -> 2 x 13696, -> 4096;
  4,096 / 64 merged tokens;
- ``aya_vision``: Aya Vision 8B projector, 26 x 26 (CPU: 16 x 16) tokens of 1152, shuffle 2 ->
  4608, LayerNorm, -> 28672 (SwiGLU halves) -> 4096; 8 / 1 images.

fp32 on CPU, bf16 on CUDA. The summary reports each case against its issue's targets and the bytes
a forward must move (fused kernel vs eager) against the memory-bandwidth bound:

- the first three cases (``TARGETS``): CPU: vtok_fast time <= 1.0x eager; GPU: >= 1.5x eager and
  >= 1.1x torch.compile;
- issue 21's families (``FAMILY_TARGETS``): CPU: <= 1.0x eager and never slower than
  torch.compile; GPU: >= 1.3x eager, and a forward at >= 70 % of its GEMMs' roofline (their FLOPs
  at the datasheet bf16 peak, or the fused bytes at the bandwidth, whichever takes longer).

Every case also prints vtok_fast's forward against its GEMMs alone.
"""
from __future__ import annotations

import time

import torch

from vtok_fast.bench.harness import Case, Provider, bf16_peak_tflops, find_median, verdict

OP = "merge"
MODES = ("forward", "full")
TARGETS = {"cpu_vs_eager": 1.0, "gpu_vs_eager": 1.5, "gpu_vs_compile": 1.1}
FAMILY_TARGETS = {"cpu_vs_eager": 1.0, "cpu_vs_compile": 1.0, "gpu_vs_eager": 1.3, "gpu_roofline": 0.7}
GPU_BANDWIDTH_GBS = 4800.0  # H200 HBM3e; H100 SXM: 3350


def _sizes(name: str, quick: bool, gpu: bool) -> dict:
    """Problem sizes: tokens in, merged rows R, first Linear K -> H, second H -> D (0: none)."""
    if name in FAMILY_SIZES:
        return _family_sizes(name, quick, gpu)
    if name == "qwen2vl":
        n, c, d = (64, 64, 96) if quick else (4096 if gpu else 1024, 1280, 3584)
        return dict(B=1, N=n, C=c, R=n // 4, K=4 * c, H=4 * c, D=d, gather=False, act=True)
    if name == "internvl":
        b, side, c, d = (1, 8, 32, 64) if quick else (8 if gpu else 1, 32, 1024, 4096)
        return dict(B=b, N=b * (side * side + 1), C=c, side=side, R=b * side * side // 4, K=4 * c, H=d, D=d,
                    gather=True, act=True)
    b, side, c = (1, 8, 16) if quick else (64 if gpu else 8, 56, 128)
    return dict(B=b, N=b * side * side, C=c, side=side, R=b * side * side // 4, K=4 * c, H=2 * c, D=0,
                gather=True, act=False, pad=True)


def _randomized(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.02 if p.dim() > 1 else 1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
    return module


def _make_inputs(name: str, sizes: dict):
    def make(device: torch.device) -> dict:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        if name in FAMILY_SIZES:
            return _family_inputs(name, sizes, gen, device, dtype)
        if name == "qwen2vl":
            from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Real

            from vtok_fast.project.modules import PatchMerger
            real = Real(dim=sizes["D"], context_dim=sizes["C"])
            ours = PatchMerger(sizes["D"], sizes["C"])
            x = torch.randn(sizes["N"], sizes["C"], generator=gen)

            def real_fn(t):
                return real(t)
        elif name == "internvl":
            from transformers import InternVLConfig
            from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

            from vtok_fast.project.modules import PixelShuffleProjector
            config = InternVLConfig(vision_config=dict(hidden_size=sizes["C"], num_attention_heads=8),
                                    text_config=dict(model_type="qwen2", hidden_size=sizes["D"],
                                                     num_attention_heads=32, num_key_value_heads=8))
            real = InternVLMultiModalProjector(config)
            ours = PixelShuffleProjector(config)
            side, b = sizes["side"], sizes["B"]
            x = torch.randn(b, side * side + 1, sizes["C"], generator=gen)

            def real_fn(t):  # InternVLModel.get_image_features after the tower ("default": CLS dropped)
                t = t[:, 1:].reshape(b, side, side, -1)
                t = InternVLModel.pixel_shuffle(None, t, scale_factor=config.downsample_ratio)
                return real(t.reshape(b, -1, t.shape[-1]))
        else:
            from timm.models.swin_transformer import PatchMerging

            from vtok_fast.project.modules import SwinPatchMerging
            real = PatchMerging(sizes["C"], sizes["H"])
            ours = SwinPatchMerging(sizes["C"], sizes["H"])
            x = torch.randn(sizes["B"], sizes["side"], sizes["side"], sizes["C"], generator=gen)

            def real_fn(t):
                return real(t)
        _randomized(real, gen)
        ours.load_state_dict(real.state_dict(), strict=True)
        real.to(device, dtype)
        ours.to(device, dtype)
        kw = {"prefix": 1} if name == "internvl" else {}
        return dict(x=x.to(device, dtype).requires_grad_(), real=real_fn, ours=lambda t: ours(t, **kw),
                    sizes=sizes, name=name)
    return make


def gemm_shapes(name: str, sizes: dict) -> list[list[int]]:
    """``[M, K, N]`` of each GEMM one forward of case ``name`` runs (``sizes`` from ``_sizes``)."""
    R, K, H, D = (sizes[k] for k in ("R", "K", "H", "D"))
    if name == "glm4v":  # proj K -> K; gate and up K -> H (two halves); down H/2 -> D
        return [[R, K, K], [R, K, H], [R, H // 2, D]]
    if name == "mistral3":  # merging_layer K -> C (= H here), linear_1 C -> D, linear_2 D -> D
        return [[R, K, H], [R, H, D], [R, D, D]]
    if name == "aya_vision":  # linear_2 reads the SwiGLU's H/2
        return [[R, K, H], [R, H // 2, D]]
    return [[R, K, H]] + ([[R, H, D]] if D else [])


def cases(quick: bool, device) -> list[Case]:
    gpu = torch.device(device).type == "cuda"
    out = []
    for name in ("qwen2vl", "internvl", "swin_b_stage2", *FAMILY_SIZES):
        s = _sizes(name, quick, gpu)
        params = {k: v for k, v in s.items() if isinstance(v, (int, bool))}
        params["gemms"] = gemm_shapes(name, s)
        flops = sum(2.0 * m * k * n for m, k, n in params["gemms"])
        out.append(Case(name, params, _make_inputs(name, s), flops=flops))
    return out


# --- issue 21: the remaining transformers families -------------------------------------------------

# name -> (images or rows (GPU, CPU, quick), grid side, C, s, K, H, D, act) at checkpoint widths
FAMILY_SIZES = {
    "qwen2_5_vl": ((4096, 1024, 64), 0, 1280, 2, 5120, 5120, 3584, True),
    "qwen3_vl": ((4096, 1024, 64), 0, 1152, 2, 4608, 4608, 4096, True),
    "gemma3": ((8, 1, 1), 64, 1152, 4, 1152, 2560, 0, False),
    "idefics3": ((16, 1, 1), 26, 1152, 2, 4608, 4096, 0, False),
    "llama4": ((16, 1, 1), 24, 1408, 2, 5632, 4096, 4096, True),
    "mistral3": ((1, 1, 1), 64, 1024, 2, 4096, 1024, 5120, True),  # H: the merging layer's C
    "glm4v": ((4096, 64, 16), 0, 4096, 1, 4096, 2 * 13696, 4096, True),
    "aya_vision": ((8, 1, 1), 26, 1152, 2, 4608, 28672, 4096, True),
}
QUICK_WIDTHS = {"C": 16, "H": 32, "D": 24}


def _family_sizes(name: str, quick: bool, gpu: bool) -> dict:
    """Sizes of an issue-21 case (quick: the same structure at widths 16 / 32 / 24)."""
    counts, side, C, s, K, H, D, act = FAMILY_SIZES[name]
    count = counts[2] if quick else counts[0] if gpu else counts[1]
    if not gpu:  # CPU: fewer tokens, same widths (a run stays within minutes on 2 cores)
        side = {"mistral3": 32, "aya_vision": 16}.get(name, side)
    if quick:
        side = {"gemma3": 8, "idefics3": 4, "llama4": 4, "mistral3": 4, "aya_vision": 4}.get(name, 0)
        C, H, D = QUICK_WIDTHS["C"], QUICK_WIDTHS["H"], QUICK_WIDTHS["D"] if D else 0
        D = H if name == "llama4" else D  # fc2 is square: projector_output_dim = projector_input_dim
        K = C if name == "gemma3" else C * s * s
    B = count if side else 1
    N = B * side * side if side else count * s * s
    R = N // (s * s)
    H = C if name == "mistral3" else H  # merging K -> C, linear_1 C -> D, linear_2 D -> D
    return dict(B=B, N=N, C=C, side=side, s=s, R=R, K=K, H=H, D=D, gather=name != "glm4v", act=act)


def _family_modules(name: str, sz: dict):
    """(transformers module, vtok_fast drop-in) of an issue-21 case, built from its config."""
    import transformers
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionPatchMerger
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    from vtok_fast.project import vlm_projectors as vp
    C, s, K, H, D, side = sz["C"], sz["s"], sz["K"], sz["H"], sz["D"], sz["side"]
    if name == "qwen2_5_vl":
        return Qwen2_5_VLPatchMerger(dim=D, context_dim=C), vp.Qwen25VLPatchMerger(D, C)
    if name == "glm4v":
        real = Glm4vVisionPatchMerger(dim=K, context_dim=H // 2, hidden_act="silu")
        return real, vp.Glm4vPatchMerger(K, H // 2, "silu")
    vision = dict(hidden_size=C)
    if name == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionConfig, Qwen3VLVisionPatchMerger
        config = Qwen3VLVisionConfig(hidden_size=C, out_hidden_size=D, spatial_merge_size=s)
        return Qwen3VLVisionPatchMerger(config), vp.Qwen3VLPatchMerger(config)
    if name == "llama4":
        from transformers.models.llama4.modeling_llama4 import Llama4VisionConfig, Llama4VisionPixelShuffleMLP
        config = Llama4VisionConfig(hidden_size=C, intermediate_size=K, projector_input_dim=H, projector_output_dim=D,
                                    pixel_shuffle_ratio=1 / s, projector_dropout=0.0)
        return Llama4VisionPixelShuffleMLP(config), vp.Llama4PixelShuffleMLP(config)
    if name == "gemma3":
        config = transformers.Gemma3Config(vision_config=dict(vision, image_size=side * 14, patch_size=14),
                                           text_config=dict(hidden_size=H), mm_tokens_per_image=(side // s) ** 2)
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector as Real
        return Real(config), vp.Gemma3Projector(config)
    if name == "idefics3":
        config = transformers.Idefics3Config(vision_config=vision, text_config=dict(hidden_size=H), scale_factor=s)
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Real
        return Real(config), vp.PixelShuffleConnector(config)
    if name == "mistral3":
        config = transformers.Mistral3Config(vision_config=dict(vision, patch_size=14), text_config=dict(hidden_size=D),
                                             spatial_merge_size=s)
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector as Real
        return Real(config), vp.Mistral3Projector(config)
    config = transformers.AyaVisionConfig(vision_config=vision, text_config=dict(hidden_size=D), downsample_factor=s,
                                          alignment_intermediate_size=H)
    from transformers.models.aya_vision.modeling_aya_vision import AyaVisionMultiModalProjector as Real
    return Real(config), vp.AyaProjector(config)


def _family_inputs(name: str, sz: dict, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> dict:
    real, ours = _family_modules(name, sz)
    _randomized(real, gen)
    ours.load_state_dict(real.state_dict(), strict=True)
    real.to(device, dtype).eval()
    ours.to(device, dtype).eval()
    side, C = sz["side"], sz["C"]
    if name == "mistral3":
        x = torch.randn(side * side, C, generator=gen)
        extra = (torch.tensor([[side * 14, side * 14]]),)
    elif side:
        x = torch.randn(sz["B"], side * side, C, generator=gen)
        extra = ()
    else:
        x = torch.randn(sz["N"], C, generator=gen)
        extra = ()
    return dict(x=x.to(device, dtype).requires_grad_(), real=lambda t: real(t, *extra), ours=lambda t: ours(t, *extra),
                sizes=sz, name=name)


def _vtok(inputs):
    fn, x = inputs["ours"], inputs["x"]
    return lambda: fn(x)


def _eager(inputs):
    fn, x = inputs["real"], inputs["x"]
    return lambda: fn(x)


def _compiled(inputs):
    # one graph per (case, grad mode): keep them all
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fn, x = torch.compile(inputs["real"]), inputs["x"]
    return lambda: fn(x)


def _gemms(inputs):
    """The case's GEMMs alone: ``(M, K) @ (K, N)`` per ``gemm_shapes`` entry, the second operand
    a transposed ``(N, K)`` weight as ``nn.Linear`` reads it; random operands like the tokens'."""
    x = inputs["x"]
    new = dict(device=x.device, dtype=x.dtype)
    operands = [(torch.randn(m, k, **new), torch.randn(n, k, **new).t())
                for m, k, n in gemm_shapes(inputs["name"], inputs["sizes"])]
    return lambda: [a @ b for a, b in operands]


def providers(device=None) -> list[Provider]:
    return [Provider("vtok_fast", _vtok), Provider("eager", _eager), Provider("torch.compile", _compiled),
            Provider("gemms", _gemms, modes=("forward",))]


# --- bytes moved and the memory-bandwidth bound -------------------------------------------------------

def bytes_moved(params: dict, element: int) -> dict:
    """Bytes a forward must move through memory (each tensor written / read once).

    ``fused``: the fused kernel's traffic: the tokens twice (statistics pass + GEMM), the
    weights (``params["gemms"]``, norm and bias vectors), the first Linear's output (written,
    then read by the second Linear) and the result.
    ``eager``: the real module's, adding the gathered copy (written + read), the normalized copy
    (written + read), the pre-activation (written + read) and Swin's zero-pad copy.
    """
    R, K, H, D, N, C = (params[k] for k in ("R", "K", "H", "D", "N", "C"))
    weights = sum(k * n for _, k, n in params["gemms"]) + 2 * K + H + D
    out = R * H + (2 * R * H + R * D if D else 0)  # first output (+ read and second output)
    fused = element * (2 * N * C + weights + out)
    extra = 2 * R * K * (2 if params["gather"] else 1)
    extra += 2 * R * H if params["act"] else 0
    extra += 2 * N * C if params.get("pad") else 0
    return {"fused": fused, "eager": fused - element * N * C + element * extra}


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Measured device-memory bandwidth (read + write of a 256 MiB copy), GB/s."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def _ratio_targets(case: str, ours: float, eager: float, compiled: float | None,
                   gpu: bool) -> tuple[dict, str, bool]:
    """(summary entry, printed text, met) of one (case, mode) against its issue's time ratios."""
    family = case in FAMILY_SIZES
    if gpu:
        s_eager, s_comp = eager / ours, (compiled / ours if compiled else None)
        if family:
            ok = s_eager >= FAMILY_TARGETS["gpu_vs_eager"]
        else:
            ok = s_eager >= TARGETS["gpu_vs_eager"] and (s_comp is None or s_comp >= TARGETS["gpu_vs_compile"])
        comp = "" if s_comp is None else f", {s_comp:.2f}x vs torch.compile"
        return {"speedup_vs_eager": s_eager, "speedup_vs_compile": s_comp}, f"{s_eager:.2f}x vs eager{comp}", ok
    ratio, r_comp = ours / eager, (ours / compiled if compiled else None)
    ok = ratio <= TARGETS["cpu_vs_eager"]
    if family and r_comp is not None:
        ok = ok and r_comp <= FAMILY_TARGETS["cpu_vs_compile"]
    comp = f" (torch.compile / eager {compiled / eager:.2f})" if compiled else ""
    return {"ratio_vs_eager": ratio, "ratio_vs_compile": r_comp}, f"ratio {ratio:.2f}{comp}", ok


def summarize(results, device, bandwidth_gbs: float | None = None, quick: bool = False,
              peak_tflops: float | None = None) -> tuple[str, dict]:
    """Ratios against the issue's targets (a quick run: no verdict, ``target_met`` None), the
    forward against its GEMMs alone (and on a GPU their roofline at ``peak_tflops``, default the
    device's datasheet bf16 peak), and bytes moved against the bandwidth bound."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    if bandwidth_gbs is None:
        bandwidth_gbs = GPU_BANDWIDTH_GBS if gpu else copy_bandwidth_gbs(device)
    element = 2 if gpu else 4
    lines, summary = [], {"bandwidth_gbs": bandwidth_gbs}
    if gpu:
        lines.append(f"GPU targets (bf16): vtok_fast >= {TARGETS['gpu_vs_eager']}x eager and "
                     f">= {TARGETS['gpu_vs_compile']}x torch.compile; issue 21's families: "
                     f">= {FAMILY_TARGETS['gpu_vs_eager']}x eager and a forward at "
                     f">= {FAMILY_TARGETS['gpu_roofline']:.0%} of its GEMMs' roofline")
    else:
        lines.append(f"CPU target: vtok_fast / eager time ratio <= {TARGETS['cpu_vs_eager']:.1f}; issue 21's "
                     f"families also vtok_fast / torch.compile <= {FAMILY_TARGETS['cpu_vs_compile']:.1f}")
    params = {r.case: r.params for r in results}
    moved = {case: bytes_moved(p, element) for case, p in params.items()}
    bound_ms = {case: m["fused"] / (bandwidth_gbs * 1e9) * 1e3 for case, m in moved.items()}
    for case in params:
        for mode in MODES:
            ours = find_median(results, case, "vtok_fast", mode)
            eager = find_median(results, case, "eager", mode)
            if not (ours and eager):
                continue
            entry, text, ok = _ratio_targets(case, ours, eager, find_median(results, case, "torch.compile", mode), gpu)
            summary[f"{case}/{mode}"] = dict(entry, target_met=None if quick else ok)
            lines.append(f"  {case + '/' + mode:<24} {text}  {verdict(ok, quick, failed='MISSED')}")
    peak = peak_tflops if peak_tflops is not None or not gpu else bf16_peak_tflops(device)
    lines.append("Forward against its GEMMs alone (the `gemms` row)"
                 + (f" and their roofline ({peak} TFLOP/s bf16, {bandwidth_gbs:.0f} GB/s):" if peak else ":"))
    for case, p in params.items():
        ours = find_median(results, case, "vtok_fast", "forward")
        gemms = find_median(results, case, "gemms", "forward")
        if not (ours and gemms):
            continue
        entry = {"gemms_ms": gemms, "forward_vs_gemms": ours / gemms}
        text = (f"  {case:<16} vtok_fast forward {ours:.3f} ms = {ours / gemms:.2f}x the GEMMs alone by torch.mm "
                f"({gemms:.3f} ms)")
        if peak:
            flops = sum(2.0 * m * k * n for m, k, n in p["gemms"])
            roofline_ms = max(flops / (peak * 1e12) * 1e3, bound_ms[case])
            ok = roofline_ms / ours >= FAMILY_TARGETS["gpu_roofline"]
            entry.update(roofline_ms=roofline_ms, roofline_fraction=roofline_ms / ours,
                         target_met=None if quick or case not in FAMILY_SIZES else ok)
            text += f"; roofline {roofline_ms:.3f} ms = {roofline_ms / ours:.0%} of the forward"
            if case in FAMILY_SIZES:
                text += f"  {verdict(ok, quick, failed='MISSED')}"
        summary[f"{case}/gemms"] = entry
        lines.append(text)
    lines.append(f"Bytes moved per forward vs the memory-bandwidth bound ({bandwidth_gbs:.0f} GB/s"
                 f"{'' if gpu else ', measured copy'}):")
    for case in params:
        ours = find_median(results, case, "vtok_fast", "forward")
        summary[f"{case}/bytes"] = dict(moved[case], bound_ms=bound_ms[case], forward_ms=ours)
        share = f", vtok_fast forward {ours:.2f} ms = {bound_ms[case] / ours:.0%} of it" if ours else ""
        lines.append(f"  {case:<16} fused {moved[case]['fused'] / 2**20:7.1f} MiB, eager "
                     f"{moved[case]['eager'] / 2**20:7.1f} MiB; bandwidth bound {bound_ms[case]:.3f} ms{share}")
    lines.append("  (the GEMMs dominate these cases: their FLOP bound, not bytes, sets the floor)")
    return "\n".join(lines), {"summary": summary}
