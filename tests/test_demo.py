"""``vtok-fast demo``: runs on the shipped sample (shrunk) and on a user image, writes a valid PNG
panel with the expected tiles and a JSON table; bad arguments exit with status 2."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vtok_fast.measure import demo

METHODS = ["fixed ViT-B/16 @224", "fixed ViT-L/14 @336", "adaptive 14/28/56 px @336", "adaptive + focus box",
           "pyramid 8+16+32 (ViT-B/16)", "VQ codes", "ToMe 576 -> 144", "ToMe 576 -> 64",
           "avg-pool 2x2 576 -> 144", "avg-pool 3x3 576 -> 64"]


def test_sample_image_is_shipped_with_its_license():
    path = demo.sample_image_path()
    with Image.open(path) as im:
        assert im.mode == "RGB" and max(im.size) <= 512
    assert "public domain" in (path.parent / "LICENSES.md").read_text()


def test_demo_on_the_sample(tmp_path, capsys):
    out, table = tmp_path / "panel.png", tmp_path / "table.json"
    assert demo.main(["--max-side", "96", "--out", str(out), "--json", str(table), "--no-progress"]) == 0
    record = json.loads(table.read_text())
    rows = {r["method"].split(",")[0] if r["method"].startswith("VQ") else r["method"]: r for r in record["rows"]}
    assert [m for m in METHODS if not any(k.startswith(m) for k in rows)] == []
    assert rows["fixed ViT-B/16 @224"]["tokens"] == 196 and rows["fixed ViT-L/14 @336"]["tokens"] == 576
    assert rows["pyramid 8+16+32 (ViT-B/16)"]["tokens"] == 1344
    assert rows["ToMe 576 -> 64"]["tokens"] == 64 and rows["avg-pool 2x2 576 -> 144"]["tokens"] == 144
    adaptive = rows["adaptive 14/28/56 px @336"]
    assert 144 <= adaptive["tokens"] <= 576 and adaptive["psnr"] > 20 and 0 < adaptive["ssim"] <= 1
    assert rows["adaptive + focus box"]["tokens"] >= adaptive["tokens"]  # the box only keeps cells fine
    assert 0 < rows["ToMe 576 -> 144"]["token_cosine"] <= 1
    vq = next(r for k, r in rows.items() if k.startswith("VQ"))
    assert vq["tokens"] == (96 // 8) ** 2 and vq["psnr"] > 10

    # the panel: image, adaptive, adaptive + focus / VQ, ToMe, pooling, each titled with its count
    titles = record["tiles"]
    assert [t.split(":")[0] for t in titles] == [titles[0].split(":")[0], "adaptive", "adaptive + focus",
                                                 "VQ (36 codes)", "ToMe", "avg-pool 2x2"]
    assert titles[1] == f"adaptive: {adaptive['tokens']} tokens" and titles[4] == "ToMe: 144 tokens"
    with Image.open(out) as panel:
        panel.verify()
    with Image.open(out) as panel:
        assert panel.format == "PNG" and panel.size == (3 * demo.TILE, 2 * (demo.TILE + demo.TITLE_HEIGHT))
        pixels = np.asarray(panel.convert("RGB"))
    tile = pixels[demo.TITLE_HEIGHT: demo.TITLE_HEIGHT + demo.TILE, demo.TILE: 2 * demo.TILE]
    assert tile.std() > 10  # a drawn tile, not blank
    printed = capsys.readouterr().out
    assert "adaptive + focus box" in printed and f"panel written to {out}" in printed


def test_demo_on_a_user_image_with_focus(tmp_path, capsys):
    gen = np.random.default_rng(0)
    pixels = np.full((80, 120, 3), 200, dtype=np.uint8)  # flat, with a noisy corner
    pixels[:30, :40] = gen.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "mine.png"
    Image.fromarray(pixels).save(path)
    out = tmp_path / "demo.png"
    assert demo.main([str(path), str(path), "--focus", "60,40,110,75", "--out", str(out),
                      "--json", str(tmp_path / "t.json")]) == 0
    records = json.loads((tmp_path / "t.json").read_text())
    assert len(records) == 2 and (tmp_path / "demo_1.png").exists() and (tmp_path / "demo_2.png").exists()
    rows = {r["method"]: r for r in records[0]["rows"]}
    # the flat image coarsens a lot; the focus box keeps its region fine
    assert rows["adaptive 14/28/56 px @336"]["tokens"] < 576 / 2
    assert rows["adaptive + focus box"]["tokens"] > rows["adaptive 14/28/56 px @336"]["tokens"]
    assert "[3/8] adaptive patches" in capsys.readouterr().err  # progress on stderr


@pytest.mark.parametrize("argv, words", [
    (["--focus", "1,2,3"], "--focus must be x0,y0,x1,y1"),
    (["--focus", "5,5,1,9"], "x0 < x1"),
    (["missing.png"], "cannot read image 'missing.png'"),
    (["--max-side", "10"], "--max-side must be >= 64"),
])
def test_bad_arguments_exit_2(argv, words, capsys):
    assert demo.main(argv) == 2
    assert words in capsys.readouterr().err


def test_cuda_without_a_gpu_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_parser_plugs_into_a_cli():
    import argparse

    parser = argparse.ArgumentParser(prog="vtok-fast")
    demo.add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "a.png", "--focus", "1,2,3,4", "--json", "x.json"])
    assert args.images == ["a.png"] and args.focus == "1,2,3,4" and args.out == "vtok_demo.png"
