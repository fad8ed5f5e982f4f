"""``vtok-fast eval`` end to end on the trained reference model saved to a temporary directory,
and ``vtok-fast bench quality --quick``."""
import json

import pytest
from PIL import Image

from vtok_fast.bench.harness import QUICK_NO_VERDICT
from vtok_fast.cli import main
from vtok_fast.measure.quality import accuracy, evaluate, train


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The committed reference model saved with ``save_pretrained`` and a JSONL of 30 held-out
    questions with PNG images."""
    root = tmp_path_factory.mktemp("eval")
    model, processor = train.reference_model()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    lines = []
    for i, s in enumerate(accuracy.held_out(30)):
        Image.fromarray(s.image).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": s.question, "answer": s.answer, "type": s.qtype}))
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    return root, model, processor


def test_eval_command_end_to_end(saved, capsys):
    root, model, processor = saved
    out_json, out_png = root / "r.json", root / "r.png"
    status = main(["eval", str(root / "model"), "--data", str(root / "q.jsonl"), "--compress",
                   "visionzip:dominant=14,contextual=2", "--compress", "random:keep=16,positions=compact",
                   "--json", str(out_json), "--plot", str(out_png), "--batch-size", "8"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "visionzip:dominant=14,contextual=2" in captured.out and "30/30" in captured.err
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["label"] for r in rows] == ["none", "visionzip:dominant=14,contextual=2",
                                          "random:keep=16,positions=compact"]
    assert [r["image_tokens"] for r in rows] == [64, 16, 16]
    direct = evaluate.evaluate(model, processor, evaluate.load_jsonl(root / "q.jsonl"))
    assert rows[0]["accuracy"] == direct.accuracy and set(rows[0]["per_type"]) == set(direct.per_type)
    assert rows[1]["delta"] == pytest.approx(rows[1]["accuracy"] - rows[0]["accuracy"])
    assert out_png.stat().st_size > 1000


def test_eval_command_on_the_qwen2_vl_reference(saved, tmp_path, capsys):
    """The committed Qwen2-VL model (its own processor and chat template) through the command: a
    family method and the random floor at M-RoPE ids."""
    root, _, _ = saved
    status = main(["eval", str(train.committed("qwen2_vl")), "--data", str(root / "q.jsonl"), "--compress",
                   "pool:stride=2", "--compress", "random:keep=4", "--json", str(tmp_path / "r.json"),
                   "--plot", str(tmp_path / "r.png"), "--no-progress"])
    assert status == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["image_tokens"] for r in rows] == [16, 4, 4]
    assert rows[0]["accuracy"] >= 0.5  # 77 % on 500 held-out questions


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent", "--data", "x.jsonl"], "MODEL_DIR"),
    (["eval", "{model}", "--data", "/nonexistent.jsonl"], "--data"),
    (["eval", "{model}", "--data", "{data}", "--compress", "pool:2"], "key=value"),
    (["eval", "{model}", "--data", "{data}", "--batch-size", "0"], "--batch-size"),
    (["eval", "{model}", "--data", "{data}", "--json", "/nonexistent/x.json"], "--json"),
    (["eval", "{model}", "--data", "{data}", "--compress", "random:keep=99", "--limit", "2"], "keep"),
])
def test_eval_command_errors_are_one_line(saved, capsys, args, message):
    root, _, _ = saved
    args = [a.format(model=root / "model", data=root / "q.jsonl") for a in args]
    assert main(args + ["--no-progress", "--json", str(root / "e.json"), "--plot", str(root / "e.png")]
                if "--json" not in args else args + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtok-fast: error:") and message in err and "\n" not in err


def test_bench_quality_quick(tmp_path, capsys):
    assert main(["bench", "quality", "--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert QUICK_NO_VERDICT in out and "MISMATCH" not in out
    data = json.loads((tmp_path / "quality_cpu_quick.json").read_text())
    assert data["quick"] and data["ratios"] == [1, 4] and data["records"][0]["method"] == "none"
    assert {r["method"] for r in data["records"]} >= {"random", "pool", "visionzip", "fastv"}
    assert (tmp_path / "quality_cpu_quick.png").exists()
    qwen = json.loads((tmp_path / "quality_qwen2_vl_cpu_quick.json").read_text())
    assert qwen["model"] == "qwen2_vl" and qwen["records"][0]["image_tokens"] == 16
    assert (tmp_path / "quality_qwen2_vl_cpu_quick.png").exists()
    assert main(["bench", "quality", "--quick", "--profile"]) == 2
