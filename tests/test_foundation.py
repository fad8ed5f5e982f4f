"""Backend dispatch, argument checks, the benchmark harness and the CLI."""
import json
import subprocess
import sys

import pytest
import torch

from vtok_fast._backend import backend_for, forced_backend
from vtok_fast._checks import check_same_device, check_same_dtype, check_tensor
from vtok_fast.bench.harness import (Case, PeakMemory, Provider, format_table, mode_fn,
                                     run_benchmark, write_json)


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
        data = json.loads((tmp_path / f"{op}_cpu.json").read_text())
        assert data["records"], op
        failed = [(r["case"], r["provider"], r["error"]) for r in data["records"] if r["error"]]
        assert not failed, failed
        assert f"## {op} on cpu" in printed
