"""Tests of pretrain.py's audio side (pretrain_audio, `python pretrain.py audio`): the pretraining
is a function of (seed, steps, clips) alone (not of the caller's RNG state or thread count, which it leaves as they were), it trains the
network away from its initialisation, the written file is exactly SmallVGG's state_dict and loads
through the --audio-weights mechanism, the val report counts the frames the data says, bad flags
exit 2 with one line."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from encoders import AudioEncoder, SmallVGG  # noqa: E402
from synthetic import SyntheticAVS  # noqa: E402
import pretrain  # noqa: E402
import checkpoint  # noqa: E402

TINY = dict(steps=3, train_clips=4, val_clips=2, log=None)


def test_same_seed_and_steps_give_identical_weights_whatever_the_caller_rng_and_threads():
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    first, report = pretrain.pretrain_audio(0, **TINY)
    after_first = torch.rand(3)  # the caller's stream right after the call ...
    torch.manual_seed(1)
    expected = torch.rand(3)  # ... is the one it would have drawn without the call
    assert torch.equal(after_first, expected)
    assert torch.get_num_threads() == threads
    torch.manual_seed(12345)  # another caller state, another thread count: the same weights
    torch.set_num_threads(2)
    try:
        second, _ = pretrain.pretrain_audio(0, **TINY)
    finally:
        torch.set_num_threads(threads)
    assert list(first) == list(SmallVGG().state_dict())  # SmallVGG's tensors only, no head
    assert all(torch.equal(first[k], second[k]) for k in first)
    # it trained: every tensor moved from the seeded initialisation; another seed, other weights
    torch.manual_seed(0)
    init = SmallVGG().state_dict()
    moved = [k for k in init if not torch.equal(init[k], first[k])]
    assert moved == list(init), sorted(set(init) - set(moved))
    other, _ = pretrain.pretrain_audio(1, **TINY)
    assert not torch.equal(other["features.0.weight"], first["features.0.weight"])
    assert report["steps"] == 3 and report["train_frames"] == 4 * 5


def test_val_report_counts_the_frames_of_each_number_of_sources():
    _, report = pretrain.pretrain_audio(0, steps=1, train_clips=2, val_clips=3, log=None)
    counts = {}
    for i in range(3):  # the sounding table of each val frame, read from the clip's plan
        for n in np.asarray(SyntheticAVS("val", seed=0).plan(i)["sounding"]).sum(1):
            counts[str(int(n))] = counts.get(str(int(n)), 0) + 1
    assert {k: v["frames"] for k, v in report["val"].items() if k != ">=2"} == counts
    assert report["val"].get(">=2", {}).get("frames", 0) == sum(v for k, v in counts.items() if int(k) >= 2)
    for d in report["val"].values():
        assert 0.0 <= d["accuracy"] <= 1.0
    # val-unseen: only frames in which a held-out pair sounds, so at least two sources each
    assert set(report["val-unseen"]) <= {"2", "3", ">=2"} and report["val-unseen"][">=2"]["frames"] > 0


def test_command_writes_only_the_state_dict_atomically_and_it_loads_as_audio_weights(tmp_path, capsys):
    out = tmp_path / "sub" / "small_vgg.pt"
    assert pretrain.main(["audio", "--seed", "0", "--out", str(out), "--steps", "3",
                                "--train-clips", "4", "--val-clips", "2"]) == 0
    printed = capsys.readouterr().out
    assert "val exact-set accuracy: single" in printed and ">=2" in printed and str(out) in printed
    assert os.listdir(out.parent) == ["small_vgg.pt"]  # no temporary file left
    saved = torch.load(out, map_location="cpu", weights_only=True)
    expected, _ = pretrain.pretrain_audio(0, **TINY)
    assert list(saved) == list(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)
    enc = AudioEncoder(kind="small", dim=64).load_net_weights(str(out))  # what --audio-weights does
    assert all(torch.equal(v, saved[k]) for k, v in enc.net.state_dict().items())


def test_training_runs_on_one_thread_and_the_count_comes_back(monkeypatch):
    seen, train = [], pretrain.train_classifier

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_classifier", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pretrain.pretrain_audio(0, steps=1, train_clips=1, val_clips=1, log=None)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"a": torch.zeros(2)}, str(path))
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        checkpoint.atomic_save({"a": torch.zeros(2)}, str(path))
    assert os.listdir(tmp_path) == ["w.pt"] and path.read_bytes() == b"old"


@pytest.mark.parametrize("flags, words", [(["--steps", "0"], "--steps must be >= 1"),
                                          (["--train-clips", "0"], "--train-clips must be >= 1"),
                                          (["--out-is-folder"], "is a folder")])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, words):
    out = tmp_path if flags == ["--out-is-folder"] else tmp_path / "w.pt"
    argv = ["--out", str(out)] + ([] if flags == ["--out-is-folder"] else flags)
    assert pretrain.main(["audio"] + argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []
