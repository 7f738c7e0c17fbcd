"""End-to-end tests of train.py: run directory, resume, AVSBench fixtures, bad input, torchrun.

Every test runs the real command line on tiny settings (32x32 images, a handful of clips), so it
checks what a user sees: files written, exit codes, one-line error messages. The commands run in
the test process (tests/commands.py); Ctrl-C and torchrun get processes of their own. One test
calls finish_step and check_loss, the check and log line of a step, directly.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import commands
import pictures
import synthetic
import train as train_py
from fixtures import RunsCode, write_avss, write_ms3, write_s4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the runs start from the pretrained stand-ins, found in a cache made for the tests (random
# weights: tests/commands.py); building them is tested in tests/test_pretrain_*.py and below
# and a train split of 16 clips (small_runs below): 4 steps an epoch
TINY = ["--img-size", "32", "--eval-clips", "4", "--epochs", "3"]
TRAIN_CLIPS = 16


@pytest.fixture(autouse=True)
def small_runs(monkeypatch):
    """The runs of this file train on 16 synthetic clips, log every step (LOG_EVERY 1) and draw no
    curves.png (a quarter of a small run's time; test pictures: tests/conftest.py) unless a test
    asks for them (DRAW_CURVES)."""
    monkeypatch.setitem(synthetic.SYNTHETIC_SIZES, "train", TRAIN_CLIPS)
    monkeypatch.setattr(train_py, "LOG_EVERY", 1)
    monkeypatch.setattr(pictures, "draw_curves", lambda *args: {})


DRAW_CURVES = pictures.draw_curves
PROCESS_LOG_EVERY = train_py.LOG_EVERY  # a train.py process of its own logs by this, not the fixture's 1


def train(*args, check=True):
    """`python train.py ARGS`, run in this process (tests/commands.py); a CompletedProcess."""
    return commands.run(train_py.main, *args, check=check)


def losses(run_dir):
    """step -> total loss, from log.jsonl's training lines."""
    out = {}
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and "eval" not in rec:
                out[rec["step"]] = rec["loss"]
    return out


def test_synthetic_run_writes_every_file_and_resume_continues(tmp_path, monkeypatch):
    monkeypatch.setattr(train_py, "NUM_OVERLAYS", 2)
    run = tmp_path / "run"
    proc = train("--max-steps", "3", "--out", str(run), *TINY)
    for name in ("config.json", "log.jsonl", "last.pt", "best.pt", "metrics.json"):
        assert (run / name).is_file(), name
    # the codebook diagnostics are the lab's (tools/diagnostics.py): the run names the command
    for name in ("diagnostics.json", "tokens.png", "tokens_local.png"):
        assert not (run / name).exists(), name
    assert (f"a look inside the codebook: python tools/diagnostics.py {run / 'best.pt'} --out {run}"
            in proc.stdout.splitlines())
    # NUM_OVERLAYS 2: a single- and a multi-source test clip, drawn by pictures.py (PNG and GIF)
    clips = sorted(p.name for p in run.glob("clip_*"))
    assert len(clips) == 4 and all(p.startswith("clip_test_") for p in clips), clips
    assert {p[:-4] for p in clips if p.endswith(".gif")} == {p[:-4] for p in clips if p.endswith(".png")}
    assert not list(run.glob("overlay_*.png"))
    assert not list(run.glob("*.tmp*")), "a temporary checkpoint file was left behind"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["dataset"] == "synthetic" and config["model"]["dim"] == 64
    assert config["model"]["freeze_audio"] is True  # the audio stand-in, loaded and frozen
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
    # the resumed run's log goes on from the checkpoint: each step once, one final evaluation
    finals = lambda: [json.loads(line).get("eval") for line in open(run / "log.jsonl")].count("final")  # noqa: E731
    assert logged_steps(run / "log.jsonl") == [1, 2, 3, 4, 5] and finals() == 1

    # resumed into another directory, where no best.pt is yet: it picks its own (here the last model,
    # step 6, as no val falls in it) and leaves the checkpoint's folder as it was
    other = tmp_path / "other"
    train("--resume", str(run / "last.pt"), "--max-steps", "6", "--out", str(other))
    assert json.loads((other / "metrics.json").read_text())["model"]["step"] == 6
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["state"]["step"] == 5

    # --eval-only evaluates a checkpoint into a new directory
    ev = tmp_path / "eval"
    train("--eval-only", str(run / "last.pt"), "--out", str(ev), *TINY)
    assert "test" in json.loads((ev / "metrics.json").read_text())

    # a new run in the same --out starts its own log
    train("--max-steps", "2", "--out", str(run), *TINY)
    assert logged_steps(run / "log.jsonl") == [1, 2] and finals() == 1


def test_interrupted_and_resumed_run_reproduces_the_unbroken_losses(tmp_path):
    """A run stopped at the end of the quantizer warm-up (step 3, which sets the k-means codebook)
    or one step after it (k-means must not run again) and resumed reproduces the unbroken run: the
    same losses and the same codebook. The quantized steps start from the k-means centres of the
    warm-up tokens saved in the checkpoint, and the codebook moves from there."""
    warm = ["--quant-warmup-steps", "3"]
    whole = tmp_path / "whole"
    train("--max-steps", "6", "--out", str(whole), *warm, *TINY)
    codebook = lambda run: torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]["vq.codebook"]  # noqa: E731
    start = lambda run: torch.load(run / "last.pt", weights_only=True)["state"]["codebook_start"][0]  # noqa: E731
    for stop in (3, 4):
        broken = tmp_path / f"stop{stop}"
        train("--max-steps", str(stop), "--out", str(broken), *warm, *TINY)
        if stop == 3:  # the k-means codebook of the ring, computed here from the checkpoint
            from quantize import VectorQuantizer
            model = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)["model"]
            vq = VectorQuantizer(*model["vq.codebook"].shape, warmup_memory=model["vq.warmup_tokens"].shape[0])
            vq.load_state_dict({k[3:]: v for k, v in model.items() if k.startswith("vq.")})
            vq.init_from_tokens(vq.warmup_tokens[: int(vq.warmup_seen)])
            assert torch.equal(start(whole), vq.codebook.detach())
        train("--resume", str(broken / "last.pt"), "--max-steps", "6")
        a, b = losses(whole), losses(broken)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
        assert a == b, stop
        assert torch.equal(codebook(broken), codebook(whole)), stop
        assert torch.equal(start(broken), start(whole)), stop
    assert not torch.equal(codebook(whole), start(whole))  # three quantized steps moved it
    log = [json.loads(line) for line in open(whole / "log.jsonl")]
    warmup = {r["step"]: r["quant_warmup"] for r in log if "loss" in r and "eval" not in r}
    assert warmup == {1: True, 2: True, 3: True, 4: False, 5: False, 6: False}
    after = [r for r in log if r.get("step") == 4 and "loss" in r and "eval" not in r][0]
    assert after["quant_codebook"] > 0  # eq. (9) is on once the warm-up is over


def logged_steps(log):
    """The training steps in log.jsonl so far (a line still being written is skipped)."""
    steps = []
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec and "eval" not in rec:
                steps.append(rec["step"])
    return steps


def test_ctrl_c_saves_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    # The flags after TINY win (argparse keeps the last value). A process of its own trains on the
    # whole train split: one epoch of 1,000 steps, and no step limit the run could reach, so the
    # interrupt lands inside the first epoch's training loop, never in an end-of-epoch evaluation
    # or checkpoint, nor after the run has ended.
    long_run = ["--epochs", "1000", "--max-steps", "100000000"]
    err_path = tmp_path / "stderr.txt"  # a file, not a pipe: tqdm's output can never fill it and block
    with open(err_path, "w") as err_file:
        # A shell that starts jobs in the background (`cmd &`) makes them ignore SIGINT, and Python
        # keeps an inherited SIG_IGN: Ctrl-C's default is restored for the child, as a terminal has it.
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(run),
                                 *TINY, *long_run], cwd=commands.stand_in_root(),  # its stand-ins
                                env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=subprocess.DEVNULL, stderr=err_file,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Wait for the evidence that training is under way: step LOG_EVERY in log.jsonl, written
        # after its step, inside the loop that saves last.pt on Ctrl-C. Bounded, never timed.
        deadline = time.monotonic() + 600
        while max(logged_steps(run / "log.jsonl"), default=0) < PROCESS_LOG_EVERY:
            if proc.poll() is not None:
                pytest.fail(f"train.py exited {proc.returncode} before logging step {PROCESS_LOG_EVERY}:\n"
                            f"{err_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"train.py logged no step {PROCESS_LOG_EVERY} within 600 s; stopped waiting")
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("train.py did not exit within 300 s of SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_path.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in err
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    step = ckpt["state"]["step"]
    assert step >= PROCESS_LOG_EVERY and ckpt["state"]["epoch"] == 0
    # a line every LOG_EVERY steps, written after its step is counted: the log ends at most
    # LOG_EVERY steps before the checkpoint's step, never after it
    assert step - PROCESS_LOG_EVERY <= max(logged_steps(run / "log.jsonl")) <= step
    assert not list(run.glob("*.tmp*"))


@pytest.mark.parametrize("name,writer", [("avss", write_avss), ("s4", write_s4),
                                         ("ms3", write_ms3)])
def test_avsbench_fixture_runs_and_writes_metrics(tmp_path, name, writer, monkeypatch):
    monkeypatch.setattr(train_py, "NUM_OVERLAYS", 4)  # the overlay pictures of the first test clips
    root = tmp_path / "data"
    # AVSS: the v2 test clip's audio.wav holds 1.5 s for 10 frames; the run reads it (zero-padded)
    # and says so once, naming the file (the test split is read once, at the end)
    short = {"audio_seconds": {"v2TestClip1_2000_12000": 1.5}} if name == "avss" else {}
    writer(str(root), **short)
    run = tmp_path / "run"
    proc = train("--dataset", name, "--data-root", str(root), "--preset", "cpu", "--max-steps", "2",
                 "--out", str(run), "--batch-size", "1", "--img-size", "32")
    metrics = json.loads((run / "metrics.json").read_text())
    key = "miou_official" if name == "avss" else "jf_official"
    # the pictures a student can read: three panels of at least 256 px under a title
    from PIL import Image
    overlays = [Image.open(p) for p in run.glob("overlay_test_*.png")]
    assert overlays and all(o.width >= 3 * 256 and o.height > 256 for o in overlays)
    assert 0.0 <= metrics["test"][key] <= 1.0
    wav = os.path.join(str(root), "v2", "v2TestClip1_2000_12000", "audio.wav")
    assert proc.stderr.count(f"{wav}: 1.5 s of audio; expected 9.615 s") == (name == "avss"), proc.stderr[-3000:]
    # --eval-only takes the dataset, preset and image size from the checkpoint, and the data from
    # where --data-root says it is now
    moved = tmp_path / "moved"
    root.rename(moved)
    train("--eval-only", str(run / "best.pt"), "--data-root", str(moved), "--out", str(tmp_path / "ev"))
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["test"] == metrics["test"]


@pytest.mark.parametrize("backbone", ["swin-t", "video-swin-t"])
def test_swin_backbones_train_and_evaluate_on_avss_from_a_torchvision_layout_file(tmp_path, backbone):
    """train.py --backbone swin-t / video-swin-t --backbone-weights FILE on the miniature AVSS
    layout. FILE is a state_dict of this repository's networks in torchvision's layout (the video
    one with the Kinetics (96, 3, 2, 4, 4) patch kernel). The full Swin-T is kept; the CPU preset
    around it (C = 64, SmallVGG audio) keeps the run small: with the paper preset (118 M
    parameters, two 1.4 GB checkpoints) the same run took over 20 s of CPU."""
    from encoders import SwinTransformer, VideoSwinTransformer
    root = tmp_path / "data"
    write_avss(str(root))
    torch.manual_seed(123)  # not the run's seed: the file's weights are not the model's own init
    net = SwinTransformer() if backbone == "swin-t" else VideoSwinTransformer(patch=(2, 4, 4))
    weights = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), weights)
    run = tmp_path / "run"
    train("--dataset", "avss", "--data-root", str(root), "--preset", "cpu", "--backbone", backbone,
          "--backbone-weights", str(weights), "--img-size", "64", "--max-steps", "1",
          "--batch-size", "1", "--out", str(run))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["backbone"] == backbone
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["miou_official"] <= 1.0
    assert metrics["test"]["num_real_frames"] == 5 + 5 + 10   # v1s, v1m, v2 test clips, every frame
    # the trained backbone is the file's, one AdamW step away (lr 1e-4 x 0.5 moves a weight ~5e-5);
    # the per-frame Video Swin sums the file's patch kernel over its 2 time steps
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    prefix = "visual_encoder.backbone."
    got = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    expected = net.state_dict()
    if backbone == "video-swin-t":
        expected["patch_embed.proj.weight"] = expected["patch_embed.proj.weight"].sum(2, keepdim=True)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-3, msg=key)


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
    proc = train("--resume", str(tmp_path / "a.pt"), "--eval-only", str(tmp_path / "b.pt"), check=False)
    assert proc.returncode == 2 and "give one" in proc.stderr and "Traceback" not in proc.stderr
    for flag, value in (("--quant-warmup-steps", "-1"), ("--lr", "0")):
        proc = train(flag, value, "--max-steps", "1", check=False)
        assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    proc = train("--max-steps", "3", "--out", str(tmp_path / "run"), "--lr", "1e30", *TINY, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "non-finite loss at step" in proc.stderr and "last good checkpoint" in proc.stderr


def test_torchrun_two_cpu_processes_train_and_evaluate(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: the rendezvous takes a free port from the system; a fixed --master_port
    # fails whenever another run on the same machine holds it
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", commands.train_script(tmp_path, TRAIN_CLIPS), "--max-steps", "3",
                           "--out", str(run), *TINY], cwd=commands.stand_in_root(),  # its stand-ins
                          capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    # every test clip is evaluated exactly once across the two ranks
    assert metrics["test"]["num_real_frames"] == 4 * 5
    # its own processes log every PROCESS_LOG_EVERY (10) steps and the first: step 1 of the 3
    assert sorted(losses(run)) == [s for s in (1, 2, 3) if s == 1 or s % PROCESS_LOG_EVERY == 0]
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["state"]["step"] == 3
    # 16 clips, 8 a rank, 2 steps an epoch: val after step 2 chose best.pt, which both ranks read
    # back for the final evaluation, not the last model (step 3)
    assert metrics["model"]["step"] == 2


def test_settings_that_are_no_longer_options_are_left_out_of_a_saved_config():
    """A format-6 run's config holds fields since removed (--log-every, --num-overlays,
    --finetune-audio, --device, --threads, --audio-cache, --train-clips): saved_train_config leaves them out, so
    the run resumes or is evaluated."""
    from train import TrainConfig, saved_train_config
    removed = {"log_every": 1, "num_overlays": 0, "finetune_audio": True, "device": "cpu", "threads": 1,
               "audio_cache": "runs/audio-weights", "train_clips": None}
    # the benchmark record too (a synthetic run's v2, an AVSBench run's None)
    for dataset, version in (("synthetic", "v2"), ("avss", None)):
        old = {"dataset": dataset, "benchmark": version, "seed": 3, **removed}
        saved = saved_train_config({"config": {"train": old}})
        assert saved == {"dataset": dataset, "seed": 3} and TrainConfig(**saved).seed == 3


def test_recipes_paper_for_avsbench_ours_for_synthetic_and_flags_win():
    from matcher import PAPER_LOSS_WEIGHTS
    from train import TrainConfig, loss_weights, parse_args, resolve
    paper, _ = resolve(TrainConfig(dataset="avss", data_root="AVSS"), 70)
    assert loss_weights(paper) == PAPER_LOSS_WEIGHTS == dict(  # App. D
        loss_class=2.0, loss_mask=5.0, loss_dice=2.0, loss_bbox=5.0, loss_giou=2.0)
    synthetic, _ = resolve(TrainConfig(), 12)
    assert loss_weights(synthetic) == dict(loss_class=2.0, loss_mask=1.0, loss_dice=0.5, loss_bbox=1.0,
                                           loss_giou=0.5)
    # the paper's recipes: lr 1e-4 and (not in the paper) a 300-step quantizer warm-up; the synthetic one: 4e-4, 300 steps
    assert (paper.lr, paper.quant_warmup_steps) == (1e-4, 300)
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
        proc = train("--eval-only", str(path), *TINY, check=False)
        assert proc.returncode == 2 and str(path) in proc.stderr and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_resuming_a_run_of_a_cut_train_split_is_refused(tmp_path, run_dir):
    """--train-clips is gone: a run that trained on a cut split cannot be continued on it."""
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["train"]["train_clips"] = 8
    torch.save(ckpt, tmp_path / "last.pt")
    proc = train("--resume", str(tmp_path / "last.pt"), "--max-steps", "3", check=False)
    assert proc.returncode == 2 and "--train-clips" in proc.stderr and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "log.jsonl").exists()


def _audio_net(state: dict) -> dict:
    """The audio network's tensors in a model state_dict, under the network's own key names."""
    prefix = "audio_encoder.net."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_frozen_audio_net_is_out_of_the_optimizer_and_unchanged_by_training_steps():
    """Three real training steps (train.forward_loss + apply_gradients, AdamW with weight decay):
    with freeze_audio every net tensor is bit-identical afterwards while emb_proj moves; without
    it every net tensor moves. The optimizer holds exactly the parameters that train."""
    from matcher import SetCriterion
    from sqd import SQD, preset
    from train import apply_gradients, forward_loss
    g = torch.Generator().manual_seed(0)
    B, T, H = 2, 5, 32
    labels = torch.zeros(B, T, H, H, dtype=torch.long)
    labels[0, :, 4:14, 4:14], labels[1, :, 16:28, 10:24] = 1, 2
    batch = dict(frames=torch.randn(B, T, 3, H, H, generator=g),
                 audio=torch.randn(B, T, 1, 96, 64, generator=g), labels=labels,
                 label_valid=torch.ones(B, T, dtype=torch.bool),
                 frame_valid=torch.ones(B, T, dtype=torch.bool))
    for freeze in (True, False):
        torch.manual_seed(0)
        model = SQD(preset("cpu", num_classes=3, dim=32, ffn_dim=64, codebook_size=8,
                           num_tokens=3, freeze_audio=freeze))
        net = list(model.audio_encoder.net.parameters())
        assert all(p.requires_grad is not freeze for p in net)
        groups = model.parameter_groups(1e-3, 0.5, 5e-4)
        in_opt = {id(p) for group in groups for p in group["params"]}
        assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
        assert in_opt.isdisjoint(map(id, net)) if freeze else in_opt.issuperset(map(id, net))
        opt = torch.optim.AdamW(groups)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        assert model.audio_encoder.net.training is not freeze
        for _ in range(3):
            total, _, _ = forward_loss(model, model, SetCriterion(3), batch, amp=False)
            apply_gradients(model, opt, total, clip_grad=0.1)
        after = model.state_dict()
        unchanged = [torch.equal(v, after[f"audio_encoder.net.{k}"])
                     for k, v in _audio_net(before).items()]
        assert all(unchanged) if freeze else not any(unchanged), (freeze, unchanged)
        for k in ("audio_encoder.emb_proj.weight", "audio_encoder.emb_norm.weight"):
            assert not torch.equal(before[k], after[k]), k


def test_audio_weights_flag_freezes_the_net_and_resumes_exactly(tmp_path):
    from encoders import SmallVGG
    from sqd import SQD, ModelConfig
    torch.manual_seed(3)
    weights = tmp_path / "small_vgg.pt"
    state = SmallVGG().state_dict()
    torch.save(state, weights)

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train("--audio-weights", str(weights), "--max-steps", "3", "--out", str(whole), *TINY)
    train("--audio-weights", str(weights), "--max-steps", "2", "--out", str(broken), *TINY)
    config = json.loads((broken / "config.json").read_text())
    assert config["model"]["freeze_audio"] is True
    assert config["train"]["audio_weights"] == str(weights)
    train("--resume", str(broken / "last.pt"), "--max-steps", "3")
    assert json.loads((broken / "config.json").read_text())["model"]["freeze_audio"] is True
    a, b = losses(whole), losses(broken)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == b[step], (step, a[step], b[step])  # bit for bit
    for run in (whole, broken):
        ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
        net = _audio_net(ckpt["model"])
        assert net.keys() == state.keys() and all(torch.equal(net[k], state[k]) for k in state)
        # AdamW's groups hold the trainable parameters only: the model's minus the net's
        model = SQD(ModelConfig(**ckpt["config"]["model"]))
        n_opt = sum(len(group["params"]) for group in ckpt["optimizer"]["param_groups"])
        assert n_opt == len(list(model.parameters())) - len(state)


def test_bad_audio_weights_exit_2_naming_the_file(tmp_path):
    from encoders import SmallVGG
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    narrow = tmp_path / "narrow_vgg.pt"
    torch.save(SmallVGG(widths=(8, 16, 32, 32)).state_dict(), narrow)
    for path, reason in ((tmp_path / "missing.pt", "does not exist"), (garbage, "cannot be read"),
                         (narrow, "wrong shapes")):
        proc = train("--audio-weights", str(path), "--max-steps", "1", "--out",
                     str(tmp_path / "run"), *TINY, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert str(path) in proc.stderr and reason in proc.stderr, proc.stderr[-2000:]
        assert "--audio-weights" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written
    # both flags at once; the VGGish flag on the CPU preset's small network
    # the CPU preset's network given VGGish's keys and shapes
    from encoders import VGGish
    vggish = tmp_path / "vggish.pt"
    torch.save(VGGish().state_dict(), vggish)
    proc = train("--audio-weights", str(vggish), "--max-steps", "1", *TINY, check=False)
    assert proc.returncode == 2 and "--audio-weights" in proc.stderr and str(vggish) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_backbone_weights_file_exits_2_naming_it(tmp_path):
    garbage = tmp_path / "resnet.pth"
    garbage.write_bytes(b"not a torch file")
    wrong = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)  # a state_dict of another network
    for path in (garbage, wrong):
        proc = train("--backbone", "resnet18", "--backbone-weights", str(path), "--max-steps", "1",
                     "--out", str(tmp_path / "run"), *TINY, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"--backbone-weights {path}: not a torchvision state_dict of --backbone resnet18" in proc.stderr


def test_loaded_audio_weights_set_freeze_audio():
    from train import parse_args, resolve
    for flags, frozen in (([], True),                       # the synthetic default: the audio stand-in
                          (["--preset", "paper"], False),   # no weights: the network trains
                          (["--audio-weights", "w.pt"], True), (["--preset", "paper", "--audio-weights", "w.pt"], True)):
        assert resolve(parse_args(flags), 12)[1].freeze_audio is frozen, flags


def test_a_run_builds_the_audio_stand_in_once_loads_it_frozen_and_resumes_exactly(tmp_path, monkeypatch):
    """The synthetic default: the audio stand-in is pretrained on first use, cached, found by the
    next run and by a resumed one, loaded and frozen; the run's own randomness is the same either
    way. (The visual stand-in is placed in the cache, so only the audio one is built here.)"""
    import shutil

    import pretrain
    monkeypatch.setattr(pretrain, "DEFAULT_AUDIO_STEPS", 3)
    monkeypatch.setattr(pretrain, "DEFAULT_AUDIO_CLIPS", 4)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(pretrain, "STAND_IN_DIR", str(cache))
    visual = pretrain.visual_cache_name(__import__("sqd").preset("cpu", num_classes=24), 0,
                                        pretrain.DEFAULT_VISUAL_STEPS)
    shutil.copy(os.path.join(commands.stand_in_cache(), visual), cache / visual)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    first = train("--max-steps", "3", "--out", str(whole), *TINY)
    built = cache / "v2-s0-3-c4.pt"
    assert "audio pretraining (v2, seed 0, 3 steps)" in first.stdout and f"wrote {built}" in first.stdout
    assert sorted(os.listdir(cache)) == ["v2-s0-3-c4.pt", visual]
    weights = torch.load(built, map_location="cpu", weights_only=True)
    # the file is what the command makes (python pretrain.py audio, same seed, steps, clips)
    expected, _ = pretrain.pretrain_audio(0, steps=3, train_clips=4, val_clips=4, log=None)
    assert list(weights) == list(expected) and all(torch.equal(weights[k], expected[k]) for k in weights)
    stamp = (built.stat().st_mtime_ns, built.read_bytes())

    second = train("--max-steps", "2", "--out", str(broken), *TINY)  # found
    assert "audio pretraining" not in second.stdout and f"{built} (cached)" in second.stdout
    assert (built.stat().st_mtime_ns, built.read_bytes()) == stamp
    config = json.loads((broken / "config.json").read_text())
    assert config["model"]["freeze_audio"] is True
    assert config["train"]["audio_weights"] is None  # the stand-in, not the flag, named the weights
    third = train("--resume", str(broken / "last.pt"), "--max-steps", "3")
    assert "audio pretraining" not in third.stdout  # a resumed run takes its weights from last.pt
    # building the weights in the run or finding them leaves the run's own randomness alone, and
    # the resumed run continues exactly
    a, b = losses(whole), losses(broken)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == b[step], (step, a[step], b[step])  # bit for bit
    for run in (whole, broken):  # loaded and frozen: the net in the checkpoint is the cached file
        net = _audio_net(torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"])
        assert net.keys() == weights.keys() and all(torch.equal(net[k], weights[k]) for k in weights)


def test_zero_audio_zeroes_every_clips_audio_and_nothing_else_also_in_a_worker():
    import pickle

    from train import make_dataset, parse_args
    plain = make_dataset(parse_args(["--eval-clips", "2"]), "val", train=False)
    zeroed = make_dataset(parse_args(["--eval-clips", "2", "--zero-audio"]), "val", train=False)
    assert (len(zeroed), zeroed.num_classes, zeroed.class_names) == (len(plain), plain.num_classes, plain.class_names)
    for dataset in (zeroed, pickle.loads(pickle.dumps(zeroed))):  # as a DataLoader worker gets it
        a, b = plain[1], dataset[1]
        assert a["audio"].abs().sum() > 0 and torch.equal(b["audio"], torch.zeros_like(a["audio"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a
                                            if k != "audio" and isinstance(a[k], torch.Tensor))


def test_defaults_are_v2_and_the_stand_ins_only_on_the_synthetic_cpu_preset():
    from pretrained import uses_stand_ins
    from train import make_dataset, parse_args, resolve
    assert make_dataset(parse_args(["--eval-clips", "1"]), "val", train=False)[0]["meta"]["benchmark"] == "v2"
    for flags, expected in (([], True), (["--audio-weights", "w.pt"], True),  # the visual one still
                            (["--preset", "paper"], False),
                            (["--dataset", "avss", "--data-root", "AVSS"], False)):
        assert uses_stand_ins(resolve(parse_args(flags), 12)[0]) is expected, flags


def test_finish_step_checks_and_logs_every_log_every_steps(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from metrics import CollapseWatch
    from train import TrainConfig, UserError, check_loss, finish_step
    monkeypatch.setattr(train_py, "LOG_EVERY", 10)
    bar = SimpleNamespace(set_postfix=lambda **kwargs: None)
    ctx = {"cfg": TrainConfig(), "main_proc": True, "out_dir": str(tmp_path),
           "model": SimpleNamespace(cfg=SimpleNamespace(codebook_size=4)),
           "collapse_watch": CollapseWatch(num_tokens=2)}
    log = tmp_path / "log.jsonl"
    parts = {"loss_class": torch.tensor(0.75), "quant_codebook": torch.tensor(0.125)}
    done = {"step": 10, "epoch": 1, "warmup": False, "lr": 1e-4, "rate": 3.0, "parts": parts,
            "loss": torch.tensor(2.5), "grad_norm": torch.tensor(0.25), "grad_norm_global": None,
            "indices": {"global": torch.tensor([[0, 0], [1, 3]])}}
    finish_step(ctx, done, str(log), bar)  # a log step: the values are read here
    finish_step(ctx, dict(done, step=11), str(log), bar)  # not a log step: no line
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    # codes 0, 0, 1, 3 of K = 4: 3 used, p = (1/2, 1/4, 0, 1/4), perplexity 2^1.5
    expected = {"step": 10, "epoch": 1, "loss": 2.5, "loss_class": 0.75, "quant_codebook": 0.125,
                "lr": 1e-4, "grad_norm": 0.25, "clips_per_s": 3.0, "quant_warmup": False,
                "codebook_usage": 0.75, "codebook_perplexity": pytest.approx(2 ** 1.5),
                "codebook_dead": 1.0}
    assert lines == [expected]
    assert list(lines[0]) == list(expected)  # the keys in the order of the log
    # a non-finite loss stops the run with the step, the bad terms and the last checkpoint: on a
    # log step, and in check_loss (the last step of an epoch or of the run); between log steps the
    # loss is not read
    bad = dict(done, loss=torch.tensor(float("inf")), parts=dict(parts, quant_codebook=torch.tensor(float("nan"))))
    finish_step(ctx, dict(bad, step=11), str(log), bar)
    with pytest.raises(UserError, match=r"non-finite loss at step 12 \(terms: \['quant_codebook'\]\); "
                                        r"last good checkpoint: none written yet"):
        check_loss(ctx, dict(bad, step=12))
    with pytest.raises(UserError, match=r"non-finite loss at step 20 \(terms: \['quant_codebook'\]\); "
                                        r"last good checkpoint: none written yet"):
        finish_step(ctx, dict(bad, step=20), str(log), bar)
    assert len(log.read_text().splitlines()) == 1  # nothing written for the bad steps


def test_checkpoint_whose_unpickling_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    """A shared checkpoint is loaded with weights_only=True: one that names a Python callable (here
    open(), which would create `marker`) is refused with exit code 2 before anything is called."""
    marker = tmp_path / "code_ran"
    bad = tmp_path / "bad.pt"
    torch.save({"format": 3, "model": {}, "config": {"train": {}, "model": {}},
                "state": {"step": 0}, "payload": RunsCode(marker)}, bad)
    proc = train("--eval-only", str(bad), *TINY, check=False)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "refused" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_final_evaluation_is_of_best_pt(tmp_path, monkeypatch):
    monkeypatch.setattr(pictures, "draw_curves", DRAW_CURVES)
    run = tmp_path / "run"
    # 8 clips of 4: 2 steps an epoch, 2 epochs, val evaluated after steps 2 and 4
    monkeypatch.setitem(synthetic.SYNTHETIC_SIZES, "train", 8)
    proc = train("--epochs", "2", "--lr-drop-epoch", "2", "--batch-size", "4", "--eval-clips", "4",
                 "--img-size", "32", "--seed", "1", "--out", str(run))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # each step logs the learning rate it trained with: x0.1 from epoch 2 (steps 3 and 4) on
    assert [r["lr"] for r in log if "loss" in r and "eval" not in r] == pytest.approx([4e-4, 4e-4, 4e-5, 4e-5])
    vals = [r for r in log if r.get("eval") == "val"]
    assert [(r["epoch"], r["step"]) for r in vals] == [(1, 2), (2, 4)]
    best = max(vals, key=lambda r: r["miou_official"])  # the first of equal scores, as best.pt keeps
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == {"checkpoint": "best.pt", "step": best["step"], "epoch": best["epoch"],
                                "val": best["miou_official"]}
    assert torch.load(run / "best.pt", weights_only=True)["state"]["step"] == best["step"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("eval", "epoch", "step")}  # noqa: E731
    assert metrics["val"] == strip(best)
    # the printed table says which weights it shows, and where the last model's numbers come from
    last = "it is the last model" if best["step"] == 4 else "the last model's numbers: --eval-only last.pt"
    assert (f"model: best.pt (step {best['step']}, epoch {best['epoch']}, "
            f"val mIoU {best['miou_official']:.3f}); {last}") in proc.stdout
    assert (run / "curves.png").is_file() and (run / "curves.png").stat().st_size > 10_000
    splits = ["test", "test-seen-multi", "test-unseen", "val-unseen"]
    assert sorted(k for k, v in metrics.items() if isinstance(v, dict) and "miou_official" in v) == sorted(splits + ["val"])
    # tools/ablate.py reads its columns from the splits of metrics.json, val included
    from tools import ablate
    row = ablate.collect_run({"out": str(run), "name": "full", "seed": 0, "start": time.time()})
    assert row["metrics"]["val mIoU"] == best["miou_official"]
    assert row["metrics"]["test mIoU"] == metrics["test"]["miou_official"]
    # the table's numbers are best.pt's: --eval-only of that file gives them again, on the run's
    # image size, seed and --eval-clips (its clips) without those flags
    ev = tmp_path / "eval"
    train("--eval-only", str(run / "best.pt"), "--out", str(ev))
    again = json.loads((ev / "metrics.json").read_text())
    for split in splits:
        assert again[split] == metrics[split], split
    assert again["model"] == metrics["model"] and again["val"] == metrics["val"]


def test_final_print_is_a_small_table_of_the_headline_numbers():
    from metrics import summary
    synthetic = {"dataset": "synthetic", "metric_definitions": {"x": "y"}, "train": {"steps": 3},
                 "test": {"miou_official": 0.25, "f_official": 0.5, "single_jf_official": 0.125,
                          "multi_jf_official": 0.375, "single_num_frames": 10, "multi_num_frames": 10,
                          "num_real_frames": 20},
                 "test-unseen": {"miou_official": 0.0625, "f_official": 0.75, "single_jf_official": 0.0,
                                 "multi_jf_official": 0.5, "single_num_frames": 0, "multi_num_frames": 10},
                 "codebook": {"held_signatures": 3}}
    lines = summary(synthetic).splitlines()
    assert len(lines) == 4 and lines[1].split() == ["split", "mIoU", "F", "single-source", "J&F",
                                                     "multi-source", "J&F"]
    assert lines[2].split() == ["test", "0.250", "0.500", "0.125", "0.375"]
    assert lines[3].split() == ["test-unseen", "0.062", "0.750", "-", "0.500"]  # no single-source frame
    s4 = {"dataset": "s4", "metric_definitions": {}, "test": {"j_official": 0.5, "f_official": 0.25,
                                                             "jf_official": 0.375, "num_frames": 4}}
    assert summary(s4).splitlines()[2].split() == ["test", "0.500", "0.250", "0.375"]
    # a training run names the evaluated weights above the table; "model" and "train" are no splits
    s4.update(model={"checkpoint": "best.pt", "step": 26, "epoch": 2, "val": 0.625}, train={"steps": 39})
    lines = summary(s4).splitlines()
    assert len(lines) == 4 and lines[3].split() == ["test", "0.500", "0.250", "0.375"]
    assert lines[1] == "  model: best.pt (step 26, epoch 2, val J&F 0.625); the last model's numbers: --eval-only last.pt"
    s4.update(model=dict(s4["model"], val=None), train={"steps": 26})
    assert summary(s4).splitlines()[1] == "  model: best.pt (step 26, epoch 2, no val score); it is the last model"


# the keys of diagnostics.json (tools/diagnostics.py) for the full model past the warm-up
DIAGNOSTICS_KEYS = {
    "category_codeword_table", "clips", "decomposition_recall", "distinct_signatures", "drift_max",
    "drift_mean", "drift_median", "duplicate_frame_rate", "duplicate_pairs",
    "duplicate_pairs_equal_outputs", "frames_two_or_more_sounding", "global_codebook",
    "held_signatures", "held_signatures_fit_count", "held_signatures_null_p95", "held_signatures_p",
    "kept_duplicate_frame_rate", "local_codebook", "local_decomposition_recall",
    "local_distinct_signatures", "local_frame_recall", "local_own_signatures",
    "local_signature_codeword_per_index", "own_signatures", "signature_codeword",
    "specific_signatures", "words_both", "words_global", "words_local", "words_neither"}


def test_runs_past_the_warmup_write_codebook_start_and_its_drift_or_none_without_a_codebook(tmp_path):
    """A synthetic run that passes the end of the quantizer warm-up keeps the codebook it starts
    from in its checkpoints, and `tools/diagnostics.py RUN/best.pt --out RUN` reports the drift
    from it with every other diagnostic (train.py computes none of them); the Table 2 baseline has
    no codebook, keeps none and still finishes (it once failed reading an empty list at the end),
    and has nothing to diagnose."""
    for name, flags in (("full", []), ("baseline", ["--no-gsd", "--no-avsr", "--no-lsd"])):
        out = tmp_path / name
        train(*TINY, "--quant-warmup-steps", "1", "--max-steps", "2", "--out", str(out), *flags)
        state = torch.load(out / "best.pt", weights_only=True)["state"]
        metrics = json.loads((out / "metrics.json").read_text())
        assert "codebook" not in metrics and not (out / "diagnostics.json").exists()
        from tools import diagnostics
        proc = commands.run(diagnostics.main, out / "best.pt", "--out", out)
        if name == "full":
            assert state["step"] == 2 and [c.shape for c in state["codebook_start"]] == [(128, 64)]
            diag = json.loads((out / "diagnostics.json").read_text())
            assert set(diag) == DIAGNOSTICS_KEYS
            assert diag["drift_max"] > 0                                  # one quantized step moved it
            assert sum(diag["clips"].values()) == 4                      # the run's --eval-clips 4
            assert (out / "tokens.png").is_file() and (out / "tokens_local.png").is_file()
            assert '"drift_max"' in proc.stdout                           # the summary, printed
        else:
            assert "codebook_start" not in state and not (out / "diagnostics.json").exists()
            assert "no global tokens" in proc.stdout
