"""Tests of tools/probe_synthetic.py: the exact-set accuracy against hand values, the all-background
mIoU against its closed form, the linear probe on a problem with a known answer, the frame table's
held-out flags on the splits that must (not) have them."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import probe_synthetic as probe  # noqa: E402
from synthetic import SyntheticAVS  # noqa: E402


def test_exact_set_accuracy_by_number_of_sources_hand_values():
    true = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=bool)
    pred = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1], [1, 0, 1]], dtype=bool)
    # frames with 0 / 1 / 2 / 3 true categories: 1 / 2 / 2 / 1; exact: frame 3 / 0 / 2 / 4
    out = probe.exact_set_accuracy(pred, true)
    assert out == {"0": {"accuracy": 1.0, "frames": 1}, "1": {"accuracy": 0.5, "frames": 2},
                   "2": {"accuracy": 0.5, "frames": 2}, "3": {"accuracy": 1.0, "frames": 1},
                   ">=2": {"accuracy": pytest.approx(2 / 3), "frames": 3}}
    # a superset or a subset of the true set is wrong; only single-source frames -> no ">=2"
    out = probe.exact_set_accuracy([[1, 1, 0], [0, 0, 0]], [[1, 0, 0], [0, 1, 0]])
    assert out == {"1": {"accuracy": 0.0, "frames": 2}}


def test_all_background_miou_is_the_background_fraction_over_the_class_count():
    # Predicting 0 everywhere: background's IoU in a frame is its pixel fraction and it counts in
    # every frame; a foreground class scores 0 wherever it is; the mean runs over Kc + 1 classes.
    ds = SyntheticAVS("test-unseen", img_size=24, seed=1, num_clips=3)
    fractions = [(ds.generate(i)["labels"][t] == 0).mean() for i in range(3) for t in range(ds.frames)]
    expected = np.mean(fractions) / (ds.num_classes + 1)
    assert probe.all_background_miou(ds, 3) == pytest.approx(expected, rel=1e-6)


def test_linear_probe_recovers_a_linearly_separable_rule():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 10)) * 3 + 1  # (F, D) not standardised: the probe does it
    y = np.stack([x[:, 0] > 1, x[:, 1] + x[:, 2] > 2, x[:, 3] < 1], axis=1)  # (F, 3)
    test = rng.standard_normal((300, 10)) * 3 + 1
    truth = np.stack([test[:, 0] > 1, test[:, 1] + test[:, 2] > 2, test[:, 3] < 1], axis=1)
    pred, = probe.linear_probe(x, y, [test])
    assert pred.shape == truth.shape and pred.dtype == bool
    assert (pred == truth).mean() > 0.97
    # a rule that is not linear (XOR of two signs) stays near chance
    xor = (x[:, 0] > 1) ^ (x[:, 1] > 1)
    pred, = probe.linear_probe(x, xor[:, None], [test])
    assert (pred[:, 0] == ((test[:, 0] > 1) ^ (test[:, 1] > 1))).mean() < 0.7


def test_frame_table_flags_held_out_frames_only_where_a_held_out_pair_sounds():
    unseen = probe.frame_table(SyntheticAVS("test-unseen", seed=0), range(6))
    seen = probe.frame_table(SyntheticAVS("test-seen-multi", seed=0), range(6))
    assert unseen["log_mel"].shape == (30, 96, 64) and unseen["sounding"].shape == (30, 24)
    assert unseen["held_out"].reshape(6, 5).any(1).all()  # each test-unseen clip has such a frame
    assert (unseen["sounding"][unseen["held_out"]].sum(1) >= 2).all()
    assert not seen["held_out"].any()
    assert unseen["multi"].all() and seen["multi"].all()


def test_mean_std_features():
    log_mel = np.arange(2 * 96 * 64, dtype=np.float32).reshape(2, 96, 64)
    f = probe.mean_std_features(log_mel)
    assert f.shape == (2, 128)
    assert np.allclose(f[1, :64], log_mel[1].mean(0)) and np.allclose(f[0, 64:], np.std(log_mel[0], axis=0))
