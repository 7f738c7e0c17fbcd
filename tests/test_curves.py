"""Tests of curves.png (pictures.draw_curves): what it plots from a hand-written log.jsonl, and a run
without matplotlib, which says once that it skipped the picture and writes none.

The plotted series are read back from the figure's lines and compared to the values written by
hand in the log; the PNG is checked by reading it back with Pillow.
"""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import commands  # noqa: E402
import pictures  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402

K = 8  # codebook size of the hand-written log


def write_log(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def training_line(step, loss_class, usage, local_usage, warmup):
    """A training line as finish_step writes it: eq. (8) terms, an auxiliary layer's (_0), the
    eq. (9) terms, the warm-up flag (a bool, not a curve) and the codebook statistics."""
    return {"step": step, "epoch": 0, "loss": 10.0 + step, "loss_class": loss_class, "loss_mask": 0.5 * step,
            "loss_class_0": 99.0, "loss_mask_0": 98.0, "quant_codebook": 0.0 if warmup else 0.25,
            "quant_commit_global": 0.125, "lr": 1e-4, "grad_norm": 1.0, "clips_per_s": 3.0,
            "quant_warmup": warmup, "codebook_usage": usage, "codebook_perplexity": 2.0,
            "local_codebook_usage": local_usage}


def test_draw_curves_plots_the_logged_terms_val_score_and_words_in_use(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    log, png = tmp_path / "log.jsonl", tmp_path / "curves.png"
    write_log(log, [
        training_line(1, 2.0, 0.125, 0.25, True),
        training_line(2, 1.5, 0.25, 0.5, True),
        {"eval": "val", "epoch": 1, "step": 2, "miou_official": 0.125, "f_official": 0.5},
        {"step": 3, "warning": "the global codebook uses 1 word"},
        training_line(3, 1.0, 0.375, 0.75, False),
        {"eval": "val", "epoch": 2, "step": 3, "miou_official": 0.25, "f_official": 0.75},
        {"eval": "final", "step": 3, "test": {"miou_official": 0.5}},
    ])
    plotted = pictures.draw_curves(str(log), str(png), K)
    assert set(plotted) == {"eq. (8): segmentation loss terms", "eq. (9): quantization terms",
                            "val mIoU (picks best.pt)", f"codebook words in use (of K = {K})"}
    steps = [1, 2, 3]
    # the last decoder layer's terms only (no _0), with the logged values
    assert plotted["eq. (8): segmentation loss terms"] == {
        "loss_class": (steps, [2.0, 1.5, 1.0]), "loss_mask": (steps, [0.5, 1.0, 1.5])}
    # eq. (9) terms; quant_warmup is a flag, not a term
    assert plotted["eq. (9): quantization terms"] == {
        "quant_codebook": (steps, [0.0, 0.0, 0.25]), "quant_commit_global": (steps, [0.125] * 3)}
    assert plotted["val mIoU (picks best.pt)"] == {"val mIoU": ([2, 3], [0.125, 0.25])}
    # usage is a fraction of K: 0.125 of 8 words is 1 word
    assert plotted[f"codebook words in use (of K = {K})"] == {
        "global": (steps, [1.0, 2.0, 3.0]), "local": (steps, [2.0, 4.0, 6.0])}

    image = Image.open(png)
    assert image.format == "PNG" and image.size == (1100, 700)   # figsize (11, 7) at 100 dpi
    # not a blank canvas: lines, text and axes in several colours
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    assert not list(tmp_path.glob("*.tmp*"))

    # an S4/MS3 log: the val panel shows J&F, the score that picks best.pt there
    write_log(log, [training_line(1, 2.0, 0.125, 0.25, False),
                    {"eval": "val", "epoch": 1, "step": 1, "j_official": 0.25, "jf_official": 0.375}])
    plotted = pictures.draw_curves(str(log), str(png), K)
    assert plotted["val J&F (picks best.pt)"] == {"val J&F": ([1], [0.375])}
    # a log without a val line yet names no measure
    write_log(log, [training_line(1, 2.0, 0.125, 0.25, False)])
    plotted = pictures.draw_curves(str(log), str(png), K)
    assert plotted["val score (picks best.pt)"] == {"val score": ([], [])}


def test_a_run_without_matplotlib_says_once_that_it_skipped_the_picture(tmp_path, monkeypatch):
    # matplotlib unimportable, its submodules too (an earlier test may have imported them)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = tmp_path / "run"
    # 4 clips of 4: one step an epoch, two epochs, so val is evaluated twice, then the end
    monkeypatch.setitem(synthetic.SYNTHETIC_SIZES, "train", 4)
    proc = commands.run(train.main, "--epochs", "2", "--batch-size", "4",
                        "--eval-clips", "4", "--img-size", "32", "--out", run)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("eval") == "val"] == [1, 2]  # three redraws asked for
    message = "curves.png skipped: matplotlib is not installed"
    assert (proc.stdout + proc.stderr).count(message) == 1, proc.stdout
    assert not (run / "curves.png").exists() and (run / "metrics.json").is_file()
