"""vtok_fast._cpu_gemm: the CPU Linear GEMM (torch's or oneDNN's, measured per shape class)."""
import pytest
import torch

from helpers import assert_close
from vtok_fast import _cpu_gemm as cpu_gemm

@pytest.fixture
def fresh(monkeypatch):
    """An empty choice table and no forced provider."""
    monkeypatch.setattr(cpu_gemm, "_CHOICE", {})
    monkeypatch.setattr(cpu_gemm, "FORCE", None)
    return monkeypatch


@pytest.mark.parametrize("provider", ["torch", "onednn"])
@pytest.mark.parametrize("layout", ["plain", "x.T", "weight.T", "both.T"])
@pytest.mark.parametrize("bias", [True, False])
def test_both_providers_compute_the_linear(fresh, provider, layout, bias):
    assert cpu_gemm.ONEDNN, "this torch build has no oneDNN (every x86 wheel has): only torch's GEMM is tested"
    fresh.setattr(cpu_gemm, "FORCE", provider)
    M, K, N = 37, 70, 45  # no powers of two
    x = torch.randn(K, M).t() if layout in ("x.T", "both.T") else torch.randn(M, K)
    w = torch.randn(K, N).t() if layout in ("weight.T", "both.T") else torch.randn(N, K)
    b = torch.randn(N) if bias else None
    got = cpu_gemm.linear(x, w, b)
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert got.shape == (M, N) and got.dtype == torch.float32 and got.is_contiguous()
    assert_close(got, want, dtype=torch.float32, reduction=K)


@pytest.mark.parametrize("provider", ["torch", "onednn"])
def test_add_accumulates_in_place(fresh, provider):
    fresh.setattr(cpu_gemm, "FORCE", provider)
    x, w, acc = torch.randn(37, 70), torch.randn(70, 45).t(), torch.randn(37, 45)  # w: a backward's W.t()
    want = acc.double() + x.double() @ w.double().t()
    got = cpu_gemm.linear(x, w, add=acc)
    assert got is acc
    assert_close(got, want, dtype=torch.float32, reduction=70)


@pytest.mark.parametrize("provider", ["torch", "onednn"])
def test_empty_rows(fresh, provider):
    fresh.setattr(cpu_gemm, "FORCE", provider)
    assert cpu_gemm.linear(torch.randn(0, 8), torch.randn(5, 8), torch.randn(5)).shape == (0, 5)


@pytest.mark.parametrize("x, w", [
    (torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)),  # not fp32
    (torch.randn(4, 8).half(), torch.randn(5, 8).half()),
    (torch.randn(4, 0), torch.randn(5, 0)),  # K = 0: oneDNN has no primitive for it
    (torch.randn(4, 8), torch.randn(8, 9).t()[:5]),  # rows of a transpose: oneDNN's slow generic path
    (torch.randn(4, 10)[:, 1:9], torch.randn(5, 8)),  # columns of a matrix
])
def test_other_operands_run_torch(fresh, x, w):
    fresh.setattr(cpu_gemm, "FORCE", "onednn")
    assert cpu_gemm.choice(x, w) == "torch"
    torch.testing.assert_close(cpu_gemm.linear(x, w), x @ w.t())


def test_small_gemms_run_torch_unmeasured(fresh):
    assert cpu_gemm.choice(torch.randn(16, 32), torch.randn(16, 32)) == "torch"
    assert cpu_gemm.choices() == {}


def test_first_call_of_a_shape_class_measures_once(fresh):
    fresh.setattr(cpu_gemm, "MEASURE_FLOP", 1)
    fresh.setattr(cpu_gemm, "PROBE_COLUMNS", 8)
    timed = []
    for name in ("torch", "onednn"):
        fresh.setitem(cpu_gemm._RUNS, name, lambda x, w, b, run=cpu_gemm._RUNS[name], name=name:
                      timed.append((name, w.shape[0])) or run(x, w, b))
    x, w = torch.randn(40, 24), torch.randn(24, 20).t()  # a transposed weight view (a backward's dW)
    first = cpu_gemm.linear(x, w)
    # the measurement multiplies by PROBE_COLUMNS weight rows, then the chosen provider runs the call
    assert {n for _, n in timed[:-1]} == {8} and timed[-1][1] == 20
    assert len(timed) == 2 * (cpu_gemm._MEASURE_WARMUP + cpu_gemm._MEASURE_RUNS) + 1
    chosen = cpu_gemm.choices()
    assert list(chosen) == ["M~32 K~16 N~16 x:row weight:col"] and list(chosen.values())[0] in ("torch", "onednn")
    timed.clear()
    second = cpu_gemm.linear(torch.randn(33, 30), torch.randn(30, 20).t())  # the same class: no measurement
    assert timed == [(chosen["M~32 K~16 N~16 x:row weight:col"], 20)]
    assert first.shape == (40, 20) and second.shape == (33, 20)


def test_without_onednn_torch_runs_even_when_forced(fresh):
    fresh.setattr(cpu_gemm, "ONEDNN", False)
    fresh.setattr(cpu_gemm, "FORCE", "onednn")
    fresh.setattr(cpu_gemm, "MEASURE_FLOP", 1)
    assert cpu_gemm.choice(torch.randn(64, 64), torch.randn(64, 64)) == "torch" and cpu_gemm.choices() == {}
