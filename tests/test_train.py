"""End-to-end tests of train.py: run directory, resume, AVSBench fixtures, bad input, torchrun.

Every test runs the real command line in a subprocess on tiny settings (32x32 images, a handful
of clips), so it checks what a user sees: files written, exit codes, one-line error messages.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fixtures import RunsCode, write_avss, write_ms3, write_s4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--img-size", "32", "--train-clips", "16", "--eval-clips", "4", "--threads", "1", "--epochs", "3",
        "--log-every", "1", "--num-overlays", "2"]


def train(*args, check=True, timeout=300):
    """Run `python train.py ARGS` from the repository root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(run_dir):
    """step -> total loss, from log.jsonl's training lines."""
    out = {}
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and "eval" not in rec:
                out[rec["step"]] = rec["loss"]
    return out


def test_synthetic_run_writes_every_file_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    train("--max-steps", "3", "--out", str(run), *TINY)
    for name in ("config.json", "log.jsonl", "last.pt", "best.pt", "metrics.json",
                 "diagnostics.json", "tokens.png", "tokens_local.png"):
        assert (run / name).is_file(), name
    # --num-overlays 2: a single- and a multi-source test clip, drawn by predict.py (PNG and GIF)
    pictures = sorted(p.name for p in run.glob("clip_*"))
    assert len(pictures) == 4 and all(p.startswith("clip_test_") for p in pictures), pictures
    assert {p[:-4] for p in pictures if p.endswith(".gif")} == {p[:-4] for p in pictures if p.endswith(".png")}
    assert not list(run.glob("overlay_*.png"))
    assert not list(run.glob("*.tmp*")), "a temporary checkpoint file was left behind"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["dataset"] == "synthetic" and config["model"]["dim"] == 64
    assert config["code_version"] and config["metric_definitions"]
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["state"]["step"] == 3
    assert ckpt["config"]["metric_definitions"] == config["metric_definitions"]
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("test", "test-unseen"):       # the three columns of Table 1 on synthetic data
        for key in ("miou_official", "f_official", "single_jf_official", "multi_jf_official"):
            assert key in metrics[split] or split == "test-unseen", (split, key)
        assert 0.0 <= metrics[split]["miou_official"] <= 1.0
    assert sorted(losses(run)) == [1, 2, 3]

    train("--resume", str(run / "last.pt"), "--max-steps", "5")
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["state"]["step"] == 5

    # --eval-only evaluates a checkpoint into a new directory
    ev = tmp_path / "eval"
    train("--eval-only", "--checkpoint", str(run / "last.pt"), "--out", str(ev), *TINY)
    assert "test" in json.loads((ev / "metrics.json").read_text())


def test_interrupted_and_resumed_run_reproduces_the_unbroken_losses(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    # the quantizer warm-up ends at step 3, where the broken run stops: the resumed run must set
    # the same k-means codebook from the warm-up tokens saved in last.pt
    warm = ["--quant-warmup-steps", "3"]
    train("--max-steps", "6", "--out", str(whole), *warm, *TINY)
    train("--max-steps", "3", "--out", str(broken), *warm, *TINY)
    train("--resume", str(broken / "last.pt"), "--max-steps", "6", "--threads", "1")
    a, b = losses(whole), losses(broken)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), (step, a[step], b[step])
    log = [json.loads(line) for line in open(whole / "log.jsonl")]
    warmup = {r["step"]: r["quant_warmup"] for r in log if "loss" in r and "eval" not in r}
    assert warmup == {1: True, 2: True, 3: True, 4: False, 5: False, 6: False}
    after = [r for r in log if r.get("step") == 4 and "loss" in r and "eval" not in r][0]
    assert after["quant_codebook"] > 0  # eq. (9) is on once the warm-up is over


def test_ctrl_c_saves_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--out", str(run), "--epochs", "50",
                             *TINY], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training has logged a few steps
        log = run / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in err
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["state"]["step"] >= 3
    assert not list(run.glob("*.tmp*"))


@pytest.mark.parametrize("name,writer", [("avss", write_avss), ("s4", write_s4),
                                         ("ms3", write_ms3)])
def test_avsbench_fixture_runs_and_writes_metrics(tmp_path, name, writer):
    root = tmp_path / "data"
    writer(str(root))
    run = tmp_path / "run"
    train("--dataset", name, "--data-root", str(root), "--preset", "cpu", "--max-steps", "2",
          "--out", str(run), "--batch-size", "1", "--img-size", "32", "--threads", "1")
    metrics = json.loads((run / "metrics.json").read_text())
    key = "miou_official" if name == "avss" else "jf_official"
    # the pictures a student can read: three panels of at least 256 px under a title
    from PIL import Image
    overlays = [Image.open(p) for p in run.glob("overlay_test_*.png")]
    assert overlays and all(o.width >= 3 * 256 and o.height > 256 for o in overlays)
    assert 0.0 <= metrics["test"][key] <= 1.0


def test_missing_root_and_broken_file_fail_with_one_message_and_exit_code_2(tmp_path):
    proc = train("--dataset", "avss", "--data-root", str(tmp_path / "nowhere"), "--preset", "cpu",
                 check=False)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr

    root = tmp_path / "data"
    write_avss(str(root))
    frames = sorted((root / "v2").glob("*/frames/3.jpg"))
    frames[0].write_bytes(frames[0].read_bytes()[:40])   # a truncated jpg
    proc = train("--dataset", "avss", "--data-root", str(root), "--preset", "cpu",
                 "--max-steps", "1", "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "3.jpg" in proc.stderr and "Traceback" not in proc.stderr

    # an impossible flag combination and a bad flag value
    proc = train("--no-gsd", "--no-shared-codebook", "--max-steps", "1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = train("--dataset", "imagenet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = train("--resume", str(tmp_path / "no.pt"), check=False)
    assert proc.returncode == 2 and "no.pt" in proc.stderr
    for flag, value in (("--quant-warmup-steps", "-1"), ("--lr", "0")):
        proc = train(flag, value, "--max-steps", "1", check=False)
        assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    proc = train("--max-steps", "3", "--out", str(tmp_path / "run"), "--lr", "1e30",
                 "--clip-grad", "1e30", *TINY, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "non-finite loss at step" in proc.stderr and "last good checkpoint" in proc.stderr


def test_torchrun_two_cpu_processes_train_and_evaluate(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "train.py", "--max-steps", "2", "--out",
                           str(run), *TINY], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    # every test clip is evaluated exactly once across the two ranks
    assert metrics["test"]["num_real_frames"] == 4 * 5
    assert sorted(losses(run)) == [1, 2]


def test_recipes_paper_for_avsbench_ours_for_synthetic_and_flags_win():
    from matcher import PAPER_LOSS_WEIGHTS
    from train import LOSS_WEIGHT_FIELDS, TrainConfig, parse_args, resolve
    paper, _ = resolve(TrainConfig(dataset="avss", data_root="AVSS"), 70)
    assert {k: getattr(paper, k) for k in LOSS_WEIGHT_FIELDS} == PAPER_LOSS_WEIGHTS  # App. D
    synthetic, _ = resolve(TrainConfig(), 12)
    assert (synthetic.loss_class, synthetic.loss_mask, synthetic.loss_dice,
            synthetic.loss_bbox, synthetic.loss_giou) == (2.0, 1.0, 0.5, 1.0, 0.5)
    flagged, _ = resolve(parse_args(["--loss-mask", "3"]), 12)
    assert flagged.loss_mask == 3.0 and flagged.loss_dice == 0.5
    # the paper's recipes: lr 1e-4, no quantizer warm-up; the synthetic one: 4e-4, 300 steps
    assert (paper.lr, paper.quant_warmup_steps) == (1e-4, 0)
    assert (synthetic.lr, synthetic.quant_warmup_steps) == (4e-4, 300)
    flagged, _ = resolve(parse_args(["--lr", "2e-4", "--quant-warmup-steps", "0"]), 12)
    assert (flagged.lr, flagged.quant_warmup_steps) == (2e-4, 0)


def test_checkpoint_of_an_older_format_or_not_a_checkpoint_exits_2(tmp_path):
    """A checkpoint saved before the length-independent encoder (no "format" key) and a file that
    is no checkpoint at all are refused in one line naming the file, not with a traceback."""
    old = tmp_path / "old.pt"
    torch.save({"model": {}, "config": {"train": {}, "model": {}}, "state": {"step": 1}}, old)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for path, words in ((old, "format 1"), (junk, "not a readable checkpoint")):
        proc = train("--eval-only", "--checkpoint", str(path), *TINY, check=False)
        assert proc.returncode == 2 and str(path) in proc.stderr and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_checkpoint_whose_unpickling_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    """A shared checkpoint is loaded with weights_only=True: one that names a Python callable (here
    open(), which would create `marker`) is refused with exit code 2 before anything is called."""
    marker = tmp_path / "code_ran"
    bad = tmp_path / "bad.pt"
    torch.save({"format": 3, "model": {}, "config": {"train": {}, "model": {}},
                "state": {"step": 0}, "payload": RunsCode(marker)}, bad)
    proc = train("--eval-only", "--checkpoint", str(bad), *TINY, check=False)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "refused" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    """get_rng_state -> torch.save -> torch.load(weights_only=True) -> set_rng_state gives back the
    same torch, numpy and Python random streams (numpy's with a cached Gaussian pending)."""
    import random

    import numpy as np

    from train import get_rng_state, set_rng_state
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()                      # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)                               # and in Python's

    def draw():
        return (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 1 << 30, 3).tolist(), random.random(), random.gauss(0, 1))

    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = draw()
    draw()                                           # move every stream on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected
