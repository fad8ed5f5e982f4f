"""``vtok-fast bench vlm`` on tiny models: every row measured or refused with a reason, the derived
figures consistent, quick runs give no verdict, and the command writes its JSON."""
import json

import torch

from vtok_fast import cli
from vtok_fast.bench import vlm


def test_a_family_is_measured_side_by_side_with_its_unpatched_prefill():
    rows = vlm._family_rows("qwen2_vl", True, torch.device("cpu"), 1, None)
    vlm._derive(rows)
    assert rows[0]["method"] == "unpatched" and rows[0]["llm_tokens"] > 0
    for row in rows[1:]:
        assert row["target_x"] == 4
        assert 0 < row["llm_tokens"] < rows[0]["llm_tokens"]
        assert row["flops"] < rows[0]["flops"] and row["flop_ceiling"] > 1
        assert row["speedup"] == rows[0]["median_ms"] / row["median_ms"]
        assert 0 <= row["selection_share"] and row["selection_ms"] > 0
    checks = vlm._verdicts(rows, quick=True)
    assert checks["pass"] is None and "no verdict" in checks["note"]


def test_the_command_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vlm, "SETTINGS", {"cpu": {"llava": None, "gemma3": None}, "cuda": {}})
    assert cli.main(["bench", "vlm", "--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vlm prefill on cpu" in out and "quick run: no verdict" in out
    data = json.loads((tmp_path / "vlm_cpu_quick.json").read_text())
    assert data["quick"] and data["checks"]["pass"] is None
    assert {row["family"] for row in data["rows"]} == {"llava", "gemma3"}
    assert all("refused" in row or row["median_ms"] > 0 for row in data["rows"])
