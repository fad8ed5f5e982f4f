"""Backend dispatch, argument checks, the benchmark harness and the CLI."""
import json
import subprocess
import sys

import pytest
import torch

from vtok_fast._backend import backend_for, forced_backend
from vtok_fast._checks import check_same_device, check_same_dtype, check_tensor
from vtok_fast.bench.harness import (Case, PeakMemory, Provider, format_table, mode_fn,
                                     run_benchmark, time_alternating, write_json)


def test_import_is_quiet_and_cheap():
    code = "import vtok_fast, sys; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == "False"  # kernels load only when an op is used


def test_backend_default_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("VTOK_FAST_BACKEND", raising=False)
    assert backend_for(torch.zeros(1)) == "torch"


def test_backend_override(monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", "torch")
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")  # the suite runs under TRITON_INTERPRET=1
    assert backend_for(torch.zeros(1)) == "triton"
    monkeypatch.setenv("VTOK_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VTOK_FAST_BACKEND"):
        forced_backend()


def test_backend_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend_for(torch.zeros(1))


def test_checks_name_argument_expected_and_received():
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor, got list"):
        check_tensor("images", [1, 2])
    with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\), got shape \(3, 4\)"):
        check_tensor("images", torch.zeros(3, 4), ndim=4, shape_doc="(B, C, H, W)")
    with pytest.raises(TypeError, match=r"x must have dtype in \(float32, float16\), got torch.int64"):
        check_tensor("x", torch.zeros(2, dtype=torch.long), dtypes=(torch.float32, torch.float16))
    with pytest.raises(ValueError, match="bias is on meta but weight is on cpu"):
        check_same_device(weight=torch.zeros(1), bias=torch.zeros(1, device="meta"))
    with pytest.raises(TypeError, match="bias has dtype torch.float16 but weight has torch.float32"):
        check_same_dtype(weight=torch.zeros(1), bias=torch.zeros(1, dtype=torch.half), pos=None)


def test_mode_fn_backward_and_full_accumulate_grads():
    w = torch.ones(3, requires_grad=True)
    mode_fn(lambda: (w * 2).sum(), "full")()
    assert torch.equal(w.grad, torch.full((3,), 2.0))
    w.grad = None
    bwd = mode_fn(lambda: (w * 3).sum(), "backward")
    bwd()
    bwd()
    assert torch.equal(w.grad, torch.full((3,), 6.0))


def test_peak_memory_sees_a_large_cpu_allocation():
    with PeakMemory(torch.device("cpu")) as pm:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del t
    assert pm.mb is not None and 60 <= pm.mb < 200


def test_run_benchmark_table_and_json(tmp_path):
    cases = [Case("tiny", {"n": 8}, lambda dev: {"x": torch.randn(8, 8, device=dev, requires_grad=True)},
                  flops=2 * 8**3)]
    providers = [
        Provider("vtok_fast", lambda inp: (lambda: inp["x"] @ inp["x"])),
        Provider("eager", lambda inp: (lambda: torch.mm(inp["x"], inp["x"]))),
        Provider("absent", lambda inp: None),
        Provider("broken", lambda inp: (lambda: torch.mm(inp["x"], torch.zeros(3, 3)))),
    ]
    results = run_benchmark("toy", cases, providers, modes=("forward", "full"), device=torch.device("cpu"),
                            min_time_s=0.01)
    assert {(r.provider, r.mode) for r in results} == {
        (p, m) for p in ("vtok_fast", "eager", "broken") for m in ("forward", "full")}
    assert all(r.median_ms > 0 for r in results if r.provider != "broken")
    assert all(r.error for r in results if r.provider == "broken")
    table = format_table(results)
    assert "vtok speedup" in table and "eager" in table and "error" in table
    path = write_json("toy", results, torch.device("cpu"), tmp_path)
    data = json.loads(path.read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu"]
    assert len(data["records"]) == len(results)


def test_time_alternating_interleaves_rounds_and_keeps_a_failure_apart():
    calls = []

    def provider(name):
        return lambda: calls.append(name)

    def broken():
        calls.append("broken")
        raise RuntimeError("no kernel")

    times = time_alternating({"a": provider("a"), "b": provider("b"), "broken": broken}, min_time_s=0.0,
                             rounds=4, warmup=1)
    assert isinstance(times["broken"], RuntimeError)
    assert len(times["a"]) == len(times["b"]) == 4 and all(t >= 0 for t in times["a"] + times["b"])
    # one warm-up call each (the failing one fails there), then rounds starting one provider later
    assert calls == ["a", "b", "broken", "a", "b", "b", "a", "a", "b", "b", "a"]


def test_cli_info_runs():
    proc = subprocess.run([sys.executable, "-m", "vtok_fast.cli", "info"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "backend" in proc.stdout


def test_cli_bench_quick_runs_every_op(tmp_path, capsys, torch_backend):
    from vtok_fast.bench import OPS
    from vtok_fast.cli import main

    assert main(["bench", "all", "--quick", "--device", "cpu", "--out", str(tmp_path),
                 "--min-time", "0.01", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for op in OPS:
        data = json.loads((tmp_path / f"{op}_cpu_quick.json").read_text())
        assert data["records"], op
        failed = [(r["case"], r["provider"], r["error"]) for r in data["records"] if r["error"]]
        assert not failed, failed
        assert f"## {op} on cpu" in printed


# --- bf16 under the interpreter: the PyTorch path, even with VTOK_FAST_BACKEND=triton ----------
# The interpreter's bf16 tl.dot returns wrong values, so backend_for sends any call with a bf16
# tensor to the PyTorch path. Small-integer values keep every product and sum exact in fp32 and
# bf16 (|sums| <= 256), so the results are bitwise equal on any CPU and BLAS.

def _small_ints(*shape, dtype=torch.float32, low=-2, high=3):
    return torch.randint(low, high, shape).to(dtype)


@pytest.mark.parametrize("image_dtype", [torch.float32, torch.bfloat16])
def test_bf16_patch_embed_with_forced_triton_equals_torch_path(image_dtype, monkeypatch):
    from vtok_fast.encode.patch_embed import patch_embed, patch_embed_reference

    bf = torch.bfloat16
    images = _small_ints(2, 3, 8, 12, dtype=image_dtype).requires_grad_()    # 2 x 3 patches of 4x4
    params = [_small_ints(5, 3, 4, 4, dtype=bf, low=-1, high=2), _small_ints(5, dtype=bf),
              _small_ints(1, 7, 5, dtype=bf), _small_ints(1, 1, 5, dtype=bf)]  # K = 48: |y| <= 100
    params = [p.requires_grad_() for p in params]
    grad = _small_ints(2, 7, 5, dtype=bf, low=-1, high=2)
    runs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
        assert backend_for(images, params[0]) == "torch"
        out = patch_embed(images, *params)
        out.backward(grad)
        runs[backend] = [out.detach()] + [t.grad.clone() for t in (images, *params)]
        for t in (images, *params):
            t.grad = None
    for a, b in zip(runs["triton"], runs["torch"]):
        assert torch.equal(a, b)
    with torch.no_grad():
        expected = patch_embed_reference(images, *params)
    assert runs["triton"][0].dtype == bf and torch.equal(runs["triton"][0], expected)


@pytest.mark.parametrize("k", [1, 4])
def test_bf16_codebook_search_with_forced_triton_equals_reference(k, monkeypatch):
    from vtok_fast.encode.codebook_search import codebook_search, codebook_search_reference

    monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")
    x = _small_ints(37, 16, dtype=torch.bfloat16, low=-4, high=5)   # squared distances <= 1024:
    codebook = _small_ints(50, 16, dtype=torch.bfloat16, low=-4, high=5)  # exact in fp32
    assert backend_for(x, codebook) == "torch"
    idx, dist = codebook_search(x, codebook, k=k, return_distances=True)
    ref_idx, ref_dist = codebook_search_reference(x, codebook, k=k, return_distances=True)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    monkeypatch.setenv("VTOK_FAST_BACKEND", "torch")
    assert torch.equal(codebook_search(x, codebook, k=k), idx)


def test_bf16_tome_merge_with_forced_triton_equals_torch_path(monkeypatch):
    from vtok_fast.reduce.tome import tome_merge

    x = _small_ints(2, 17, 8, dtype=torch.bfloat16)
    metric = _small_ints(2, 17, 4, dtype=torch.bfloat16)
    runs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("VTOK_FAST_BACKEND", backend)
        assert backend_for(x, metric) == "torch"
        merged, size, info = tome_merge(x, metric, 5, class_token=True)
        runs[backend] = (merged, size, info.dest, info.order)
    for a, b in zip(runs["triton"], runs["torch"]):
        assert torch.equal(a, b)
    assert runs["triton"][0].shape == (2, 12, 8)
