"""``vtok-fast bench`` options: clear one-line errors, --modes validation, where results go."""
import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from vtok_fast.bench import harness
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


@pytest.mark.parametrize("command", [["demo"], ["eval", "model_dir", "--data", "q.jsonl"]])
def test_every_command_checks_cuda_alike(command, monkeypatch, tmp_path, capsys):
    # one check (_cli_errors.device_problem) for bench, demo and eval
    from vtok_fast import _cli_errors

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model_dir").mkdir()
    (tmp_path / "q.jsonl").write_text('{"image": "a.png", "question": "q", "answer": "a"}\n')
    assert main([*command, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == f"vtok-fast: error: {_cli_errors.device_problem('cuda')}"
    assert _cli_errors.device_problem("cpu") is None and _cli_errors.device_problem(None) is None
    assert _cli_errors.chosen_device(None) == torch.device("cpu")


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


def test_quick_run_outside_the_checkout_leaves_a_bench_results_folder_alone(tmp_path, capsys, monkeypatch,
                                                                            torch_backend):
    """Without ``--out``, a directory that merely holds a ``bench/results`` is not the checkout: the
    results go to ``./vtok_fast_bench_results`` and the folder's committed files stay as they were."""
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "bench" / "results" / "codebook_cpu.json"
    committed.parent.mkdir(parents=True)
    committed.write_text('{"committed": true}')
    assert main(["bench", "codebook", "--quick", "--device", "cpu", "--min-time", "0", "--no-progress"]) == 0
    assert committed.read_text() == '{"committed": true}'
    assert sorted(p.name for p in committed.parent.iterdir()) == ["codebook_cpu.json"]
    data = json.loads((tmp_path / "vtok_fast_bench_results" / "codebook_cpu_quick.json").read_text())
    assert data["quick"] is True and data["records"]
    printed = capsys.readouterr().out
    assert "results written to vtok_fast_bench_results/codebook_cpu_quick.json" in printed
    assert "quick run: no verdict" in printed and "PASS" not in printed and "FAIL" not in printed
    for provider, module in (("faiss_flat_l2", "faiss"), ("vqtorch_eval", "vector_quantize_pytorch")):
        if importlib.util.find_spec(module) is not None:  # skipped only when it cannot be imported
            assert f"{provider} on all: import failed" not in printed


def test_default_out_is_bench_results_only_in_the_checkout(tmp_path, monkeypatch):
    checkout = Path(harness.__file__).resolve().parent.parent  # bench/ of this editable checkout
    assert (checkout / "setup.py").is_file()
    assert harness.default_out_dir(checkout) == Path("bench/results")
    assert harness.default_out_dir(checkout / "bench") == Path("vtok_fast_bench_results")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    assert harness.default_out_dir(tmp_path) == Path("vtok_fast_bench_results")
    monkeypatch.chdir(checkout)
    assert harness.default_out_dir() == Path("bench/results")


@pytest.mark.parametrize("make_out, message", [
    (lambda d: (d / "file.json").write_text("{}") and d / "file.json", r"--out: '.*file.json' is not a folder"),
    (lambda d: (d / "file.json").write_text("{}") and d / "file.json" / "sub",
     r"--out: '.*file.json' is a file, so the folder '.*sub' cannot be created"),
])
def test_bench_out_naming_a_file_is_a_one_line_error(make_out, message, tmp_path, capsys):
    out = make_out(tmp_path)
    assert main(["bench", "codebook", "--device", "cpu", "--quick", "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert re.fullmatch(f"vtok-fast: error: {message}\n", captured.err), captured.err
    assert captured.out == ""
    assert main(["bench", "tome", "--profile", "--device", "cpu", "--quick", "--out", str(out)]) == 2


def _fake_bench(monkeypatch, seen):
    """A benchmark module with one tiny case whose summary records the ``quick`` it was given."""
    from vtok_fast import bench

    fake = types.ModuleType("vtok_fast_fake_timed_bench")
    fake.OP, fake.MODES = "fake", ("forward",)
    fake.cases = lambda quick, device: [Case("tiny", {}, lambda dev: {})]
    fake.providers = lambda device: [Provider("vtok_fast", lambda inputs: (lambda: torch.zeros(1)))]

    def summarize(results, device, quick=False):
        seen.append(quick)
        return f"- ratio 40.22 (target <= 1.1) {harness.verdict(False, quick, 'PASS', 'FAIL')}", None
    fake.summarize = summarize
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(bench.OPS, "fake", fake.__name__)


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("load", [0.5, 64.0])
def test_quick_runs_give_no_verdict_and_full_runs_warn_of_a_loaded_machine(quick, load, tmp_path, capsys,
                                                                           monkeypatch):
    seen = []
    _fake_bench(monkeypatch, seen)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    argv = ["bench", "fake", "--device", "cpu", "--min-time", "0", "--out", str(tmp_path), "--no-progress"]
    assert main(argv + (["--quick"] if quick else [])) == 0
    captured = capsys.readouterr()
    assert seen == [quick]
    if quick:
        assert captured.out.startswith("quick run: no verdict")
        assert "- ratio 40.22 (target <= 1.1) quick run: no verdict" in captured.out and "FAIL" not in captured.out
    else:
        assert "- ratio 40.22 (target <= 1.1) FAIL" in captured.out and "no verdict" not in captured.out
    loaded = not quick and load > 2
    assert ("vtok-fast: warning: the load average (64.0) exceeds the 2 cores" in captured.err) == loaded
    if loaded:
        assert [line for line in captured.err.splitlines() if "warning" in line] == [captured.err.splitlines()[0]]
    machine = json.loads(next(tmp_path.iterdir()).read_text())["machine"]
    assert machine["load_average"] == load and machine["cpu_cores"] == 2


def test_load_warning_only_above_the_core_count(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    for load, warns in ((3.9, False), (4.0, False), (4.1, True)):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
        assert (harness.load_warning() is not None) == warns

    def unavailable():
        raise OSError("no load average here")
    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert harness.load_warning() is None and harness.load_average() is None


def test_the_table_names_each_baseline_implementation():
    from vtok_fast.bench import compress

    result = harness.Result("compress", "llava15-pool_avg", "baseline", "forward",
                            {"baseline": "transformers LlavaNextVideoPooler"}, 2.0, 2.0, 2.0, None)
    ours = harness.Result("compress", "llava15-pool_avg", "vtok_fast", "forward", {}, 1.0, 1.0, 1.0, None)
    table = harness.format_table([ours, result])
    assert "baseline (transformers LlavaNextVideoPooler)" in table and "2.00x" in table
    for quick in (True, False):
        cases = {c.params["method"]: c.params["baseline"]
                 for c in compress.cases(quick=quick, device=torch.device("cpu")) if "method" in c.params}
        assert cases["pool_avg"] == "transformers LlavaNextVideoPooler"
        assert cases["visionzip"] == "official VisionZip, per-image loop"
        assert all(cases[m] for m in compress.LLAVA_METHODS if m != "prumerge_plus")  # prumerge_plus: untimed
    text = compress.summarize([ours, result], torch.device("cpu"))[0]
    assert "llava15-pool_avg: baseline (transformers LlavaNextVideoPooler) 2.00 ms / vtok_fast 1.00 ms" in text


# --- python -m vtok_fast, one-line errors, the import graph ---------------------------------------------

def test_python_dash_m_vtok_fast_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "vtok_fast", "budget", "llava-1.5", "336"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("llava-1.5, 336x336 image (HxW): 576 ViT tokens, 576 LLM tokens")
    proc = subprocess.run([sys.executable, "-m", "vtok_fast", "budget", "llava-2", "336"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("vtok-fast: error: argument model: invalid choice: 'llava-2'")
    assert proc.stderr.count("\n") == 1 and "usage" not in proc.stderr


@pytest.mark.parametrize("argv", [["nope"], ["bench", "nope"], ["demo", "--max-side", "x"], ["info", "--bad"]])
def test_argparse_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("vtok-fast: error: ") and err.count("\n") == 1, err


def test_the_demo_does_not_import_the_cli():
    """cli imports demo and budget_cli, never the reverse (their shared errors: vtok_fast._cli_errors)."""
    code = ("import sys, vtok_fast.measure.demo, vtok_fast.measure.budget_cli\n"
            "assert 'vtok_fast.cli' not in sys.modules, 'cycle'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
