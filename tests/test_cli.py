"""``vtok-fast bench`` options: clear one-line errors, --modes validation, where results go."""
import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from vtok_fast.bench.harness import Case, Provider, results_path
from vtok_fast.cli import _parse_modes, main


def test_cuda_without_a_gpu_is_a_one_line_error():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, on any machine
    proc = subprocess.run([sys.executable, "-m", "vtok_fast.cli", "bench", "codebook", "--device", "cuda",
                           "--quick", "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("vtok-fast: error: --device cuda: no CUDA device is available")


@pytest.mark.parametrize("argv,message", [
    (["codebook", "--modes", "bogus"], r"--modes: codebook has modes forward; got 'bogus'"),
    (["codebook", "--modes", "full"], r"--modes: codebook has modes forward; got 'full'"),
    (["tome", "--modes", "forward,backward"], r"--modes: tome has modes forward, full; got 'backward'"),
    # every op's modes together (the list grows with the benchmarks)
    (["all", "--modes", "forward,bogus"], r"--modes: the benchmarks have modes [a-z, ]*forward[a-z, ]*; got 'bogus'"),
    (["codebook", "--modes", "forward,"], r"--modes must be a comma-separated list of modes, got 'forward,'"),
    (["codebook", "--min-time", "-1"], r"--min-time must be >= 0 seconds, got -1\.0"),
])
def test_bad_options_exit_2_before_measuring(argv, message, tmp_path, capsys):
    assert main(["bench", *argv, "--device", "cpu", "--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert re.fullmatch(f"vtok-fast: error: {message}\n", captured.err), captured.err
    assert captured.out == ""  # no table, no summary ("import failed" for providers never run)
    assert not any(tmp_path.iterdir())


def test_modes_for_all_ops_run_the_subset_each_has():
    op_modes = {"patch-embed": ("forward", "backward", "full"), "codebook": ("forward",),
                "tome": ("forward", "full")}
    assert _parse_modes(None, op_modes) == op_modes
    assert _parse_modes("full,forward,full", op_modes) == {
        "patch-embed": ("full", "forward"), "codebook": ("forward",), "tome": ("full", "forward")}
    assert _parse_modes(" backward ", op_modes) == {"patch-embed": ("backward",), "codebook": (), "tome": ()}


def test_nothing_measured_exits_1_without_a_summary(tmp_path, capsys, monkeypatch):
    """A run where no provider applies prints no table and no summary (which would report every
    provider as missing) and writes no results."""
    from vtok_fast import bench

    summaries = []
    fake = types.ModuleType("vtok_fast_fake_bench")
    fake.OP, fake.MODES = "fake", ("forward",)
    fake.cases = lambda quick, device: [Case("tiny", {}, lambda dev: {})]
    fake.providers = lambda device: [Provider("vtok_fast", lambda inputs: None)]
    fake.summarize = lambda results, device: summaries.append(results) or ("", None)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(bench.OPS, "fake", fake.__name__)
    assert main(["bench", "fake", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "fake: no provider ran on any case (nothing measured)" in captured.err
    assert not summaries and not any(tmp_path.iterdir())


def test_quick_results_never_replace_full_results():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert results_path("codebook", cpu, "bench/results").as_posix() == "bench/results/codebook_cpu.json"
    assert results_path("tome", gpu, "out", quick=True).as_posix() == "out/tome_gpu_quick.json"
    # one .gitignore line keeps every quick result out of the repository, and no full one
    for op in ("patch-embed", "codebook", "tome"):
        for device in (cpu, gpu):
            assert fnmatch.fnmatch(results_path(op, device, "bench/results", quick=True).name, "*_quick.json")
            assert not fnmatch.fnmatch(results_path(op, device, "bench/results").name, "*_quick.json")


def test_quick_run_with_the_default_out_keeps_the_committed_results(tmp_path, capsys, monkeypatch, torch_backend):
    """``--quick`` from the repository root (default ``--out bench/results``) writes
    ``<op>_cpu_quick.json`` next to the committed ``<op>_cpu.json`` and leaves it alone."""
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "bench" / "results" / "codebook_cpu.json"
    committed.parent.mkdir(parents=True)
    committed.write_text('{"committed": true}')
    assert main(["bench", "codebook", "--quick", "--device", "cpu", "--min-time", "0", "--no-progress"]) == 0
    assert committed.read_text() == '{"committed": true}'
    data = json.loads((committed.parent / "codebook_cpu_quick.json").read_text())
    assert data["quick"] is True and data["records"]
    printed = capsys.readouterr().out
    assert "results written to bench/results/codebook_cpu_quick.json" in printed
    for provider, module in (("faiss_flat_l2", "faiss"), ("vqtorch_eval", "vector_quantize_pytorch")):
        if importlib.util.find_spec(module) is not None:  # skipped only when it cannot be imported
            assert f"{provider} on all: import failed" not in printed
