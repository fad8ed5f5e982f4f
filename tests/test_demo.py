"""``vtok-fast demo``: runs on the shipped sample (shrunk) and on a user image, writes a valid PNG
panel with the expected tiles and a JSON table; bad arguments exit with status 2."""
import json
from pathlib import Path

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
    records = json.loads(table.read_text())
    assert isinstance(records, list) and len(records) == 1  # a list for one image too
    record = records[0]
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

    # one base for pixels per token: the 96 x 96 image's pixels, named under the table
    assert record["size"] == [96, 96]
    assert all(r["pixels_per_token"] == 96 * 96 / r["tokens"] for r in record["rows"]), record["rows"]
    assert "img px/token" in printed.splitlines()[2]
    assert "img px/token: pixels of the 96x96 image (as tokenized, after --max-side) per token" in printed
    assert record["pixels_per_token_base"].startswith("img px/token: pixels of the 96x96 image")

    # reproducible: a second run gives the same numbers (VQ included), whatever the global RNG holds
    image, _ = demo.load_image(demo.sample_image_path(), 96)
    scale = 96 / 512
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    rows, _ = demo.run(image, focus=tuple(v * scale for v in demo.SAMPLE_FOCUS))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    again = [{k: v for k, v in r.items() if k != "time_ms"} for r in record["rows"]]
    assert [{k: v for k, v in vars(r).items() if k != "time_ms"} for r in rows] == again


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


def _png(path, width, height, value=None):
    gen = np.random.default_rng(0)
    pixels = (gen.integers(0, 256, (height, width, 3), dtype=np.uint8) if value is None
              else np.full((height, width, 3), value, dtype=np.uint8))
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.parametrize("argv, words", [
    (["--focus", "1,2,3"], "--focus must be x0,y0,x1,y1"),
    (["--focus", "5,5,1,9"], "x0 < x1"),
    (["--focus", "0,0,1e309,5"], "--focus must be x0,y0,x1,y1"),  # not finite
    (["--focus", "600,600,700,700"], "--focus 600,600,700,700 lies outside the 512x512 image"),
    (["missing.png"], "cannot read image 'missing.png'"),
    (["--max-side", "10"], "--max-side must be >= 64"),
])
def test_bad_arguments_exit_2(argv, words, capsys, tmp_path):
    assert demo.main([*argv, "--out", str(tmp_path / "p.png")]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and captured.err.count("\n") == 1 and captured.out == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("size", [(1, 1), (3, 2000), (2000, 7)])
def test_images_under_8_px_a_side_are_a_one_line_error(size, tmp_path, capsys):
    """A 1x1 PNG, or a side under 8 px after --max-side (3x2000 -> 1x512): one line, before any work
    (was a traceback from the VQ row)."""
    path = _png(tmp_path / "tiny.png", *size)
    assert demo.main([path, "--out", str(tmp_path / "p.png"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "the demo needs at least 8 px on each side (the VQ row's patch)" in captured.err
    assert f"(file {size[0]}x{size[1]})" in captured.err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("argv, flag, words", [
    (["--out", "{tmp}/missing/p.png"], "--out", "the folder '{tmp}/missing' does not exist"),
    (["--json", "{tmp}/missing/t.json"], "--json", "the folder '{tmp}/missing' does not exist"),
    (["--out", "{tmp}"], "--out", "'{tmp}' is a folder; give a file name"),
    (["--json", "{tmp}/file.txt/t.json"], "--json", "'{tmp}/file.txt' is not a folder"),
])
def test_output_paths_are_checked_before_the_work(argv, flag, words, tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("the demo ran before checking its outputs"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert demo.main(["--no-progress", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "p.png")])) == 2
    err = capsys.readouterr().err
    assert err == f"vtok-fast: error: {flag}: {words.format(tmp=tmp_path)}\n"


def test_focus_is_clipped_with_a_warning_and_tiny_or_huge_boxes_work(tmp_path, capsys):
    """A box partly outside the image is clipped (one warning line); a huge finite box and a box that
    rounds to nothing in the 336-px view run (they raised OverflowError / ValueError)."""
    path = _png(tmp_path / "flat.png", 200, 100, value=128)
    image, box = demo._prepare(Path(path), (-5.0, 10.0, 1e300, 20.0), False, 512)
    assert box == (0.0, 10.0, 200, 20.0)
    assert capsys.readouterr().err == (f"vtok-fast: warning: --focus -5,10,1e+300,20 reaches outside the 200x100 "
                                       f"image {path!r}; clipped to 0,10,200,20\n")
    assert demo._prepare(Path(path), (99.0, 1.0, 100.0, 2.0), False, 512)[1] == (99.0, 1.0, 100.0, 2.0)
    # the 336-px view of the 200x100 image is x 50..150 at 3.36x: a 0.01-px box widens to one pixel
    x0, y0, x1, y1 = demo.view_box((99.0, 0.1, 99.01, 0.11), 100, 200, 336)
    assert (x1 - x0, y1 - y0) == (1, 1) and x0 <= 99 * 3.36 - 168 < x1 and y0 == 0
    assert capsys.readouterr().err == ""
    assert demo.view_box((0.0, 0.0, 10.0, 10.0), 100, 200, 336) is None  # left of the centre crop
    demo._prepare(Path(path), (0.0, 0.0, 10.0, 10.0), False, 512)
    assert "is outside the centre crop that the adaptive rows see" in capsys.readouterr().err
    out = tmp_path / "p.png"
    for focus in ("99.1,50.1,99.2,50.2", "0,0,1e300,1e300"):
        assert demo.main([path, "--focus", focus, "--out", str(out), "--json", str(tmp_path / "t.json"),
                          "--no-progress"]) == 0
        rows = {r["method"]: r for r in json.loads((tmp_path / "t.json").read_text())[0]["rows"]}
        plain, focused = rows["adaptive 14/28/56 px @336"]["tokens"], rows["adaptive + focus box"]["tokens"]
        assert focused > plain  # the flat image coarsens everywhere but where the box is


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
