"""The readings of the paper's silences and their measures (results/README.md, "Why full SQD loses").

Each control is one flag; each test here fails when its flag is ignored (checked by removing the
flag's effect in the code and watching the test fail). The measures are checked against hand-built
cases whose answer is counted by hand.
"""
import copy
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metrics import CollapseWatch
from sqd import SQD
from test_sqd import random_batch, tiny_cfg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from diagnostics import codebook_drift, duplicate_stats  # noqa: E402


# ----------------------------------------------------------------------------------------------
# A: the measures
# ----------------------------------------------------------------------------------------------

def test_duplicate_stats_on_a_hand_built_case():
    """Two clips, two frames, three tokens: frames (0,0) and (1,1) hold a duplicate; only the one
    of (0,0) is between two kept tokens; one of the two pairs has equal outputs."""
    codes = np.array([[[4, 4, 1], [0, 1, 2]],
                      [[3, 5, 6], [7, 2, 7]]])                             # (B=2, T=2, N=3)
    logits = np.full((2, 2, 3, 2), -5.0)                                    # (B, T, N, Kc): all dropped
    logits[0, 0, 0] = logits[0, 0, 1] = [1.0, -1.0]                         # kept, equal
    logits[1, 1, 0] = [2.0, 0.0]                                            # kept; its twin (token 2) not
    masks = np.zeros((2, 2, 3, 2, 2))                                       # (B, T, N, h, w)
    masks[1, 1, 2, 0, 0] = 1.0                                              # the (1,1) pair differs
    res = duplicate_stats(codes, logits, masks)
    assert res == {"duplicate_frame_rate": 2 / 4, "kept_duplicate_frame_rate": 1 / 4,
                   "duplicate_pairs": 2, "duplicate_pairs_equal_outputs": 1}
    # three tokens on one word: three pairs in one frame, all equal outputs
    res = duplicate_stats(np.zeros((1, 1, 3), int), np.zeros((1, 1, 3, 2)), np.zeros((1, 1, 3, 2, 2)))
    assert res["duplicate_pairs"] == 3 and res["duplicate_pairs_equal_outputs"] == 3
    assert res["duplicate_frame_rate"] == 1.0 and res["kept_duplicate_frame_rate"] == 1.0  # p = 0.5 >= 0.1
    # one token a frame (the N = 1 row): no pairs, so the rates say they are meaningless
    res = duplicate_stats(np.zeros((2, 3, 1), int), np.zeros((2, 3, 1, 2)), np.zeros((2, 3, 1, 4, 4)))
    assert res["duplicate_pairs"] == 0 and res["duplicate_pairs_equal_outputs"] == 0
    assert np.isnan(res["duplicate_frame_rate"]) and np.isnan(res["kept_duplicate_frame_rate"])


def test_codebook_drift_on_a_hand_built_case():
    start = np.zeros((4, 2))                                                # (K=4, C=2)
    end = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])        # word 0 moves 5, word 2 moves 1
    res = codebook_drift(start, end, token_norm=10.0, global_codes=np.array([[0, 0], [2, 0]]),
                         local_codes=np.array([[[2, 1]]]))
    assert res == {"drift_mean": pytest.approx(0.15), "drift_median": pytest.approx(0.05),
                   "drift_max": pytest.approx(0.5), "words_global": 2, "words_local": 2,
                   "words_both": 1, "words_neither": 1}


def test_collapse_watch_fires_once_per_path_naming_the_step():
    watch = CollapseWatch(num_tokens=3, patience=4)
    fired = [watch.update(step, "global", words) for step, words in
             enumerate([3, 3, 3, 4, 2, 3, 1, 3, 3, 3, 2], start=1)]         # a run of 4 ends at step 8
    assert [i for i, m in enumerate(fired, start=1) if m] == [8]
    assert "step 8" in fired[7] and "global" in fired[7]
    assert watch.update(12, "local", 1) is None                              # a path counts on its own
    # a watch rebuilt from a saved copy of its state (a resumed run's) fires where the unbroken one did
    state = {}
    watch = CollapseWatch(num_tokens=3, patience=4, state=state)
    assert not any(watch.update(step, "global", words) for step, words in enumerate([3, 3, 3, 4, 2], start=1))
    resumed = CollapseWatch(num_tokens=3, patience=4, state=copy.deepcopy(state))
    assert [s for s, w in [(6, 3), (7, 1), (8, 3), (9, 3)] if resumed.update(s, "global", w)] == [8]
    # called on logged steps only (1, 10, 20, ...): the run spans steps, not calls
    watch = CollapseWatch(num_tokens=3, patience=100)
    words = {s: (9 if s == 50 else 3) for s in [1] + list(range(10, 200, 10))}  # broken at step 50
    fired = [s for s, w in words.items() if watch.update(s, "global", w)]
    assert fired == [160]                                                    # since 60: 150 spans 91 steps, 160 spans 101


def test_a_hand_made_collapse_in_training_prints_one_warning_and_logs_it(tmp_path, capsys, monkeypatch):
    """finish_step, the log of a training step, fed 120 quantized steps whose 4 x 5 global tokens
    all use the same 5 words and whose local tokens use many: one warning, at step 100, global only."""
    import train
    from train import TrainConfig, finish_step
    monkeypatch.setattr(train, "LOG_EVERY", 10)  # the watch reads the logged steps: 1, 10, ..., 120
    bar = SimpleNamespace(set_postfix=lambda **kwargs: None)
    ctx = {"cfg": TrainConfig(), "main_proc": True, "out_dir": str(tmp_path),
           "model": SimpleNamespace(cfg=SimpleNamespace(codebook_size=128)),
           "collapse_watch": CollapseWatch(num_tokens=5)}
    collapsed = torch.arange(5).repeat(4, 1)                                 # (B=4, N=5): words 0..4
    spread = torch.arange(100).view(4, 5, 5)                                 # (B, T, N): 100 words
    log = tmp_path / "log.jsonl"
    for step in range(1, 121):
        done = {"step": step, "epoch": 0, "warmup": False, "lr": 1e-4, "rate": 1.0, "parts": {},
                "loss": torch.tensor(1.0), "grad_norm": torch.tensor(1.0), "grad_norm_global": None,
                "indices": {"global": collapsed, "local": spread}}
        finish_step(ctx, done, str(log), bar)
    err = capsys.readouterr().err
    assert err.count("warning: codebook collapse") == 1 and "at step 100: the global tokens" in err
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line for line in lines if "warning" in line] == [
        {"step": 100, "warning": err.strip().removeprefix("warning: ")}]


def test_global_decoder_gradient_norm_is_the_norm_of_its_parameters_gradients():
    from matcher import SetCriterion
    from train import apply_gradients, forward_loss
    torch.manual_seed(0)
    model = SQD(tiny_cfg()).eval()                                           # no dropout: two equal forwards
    opt = torch.optim.SGD(model.parameters(), lr=0.0)                        # lr 0: weights stay
    total, _, _ = forward_loss(model, model, SetCriterion(3), random_batch(), amp=False)
    _, g = apply_gradients(model, opt, total, clip_grad=1e-3)               # clipping after the measure
    total, _, _ = forward_loss(model, model, SetCriterion(3), random_batch(), amp=False)
    model.zero_grad()
    total.backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.global_asd.parameters()
                              if p.grad is not None))
    assert g.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# B: slot positions, the control that val chose (the others: tag silent-choices)
# ----------------------------------------------------------------------------------------------

def test_slot_positions_tell_two_equal_queries_apart():
    """Without slot positions, two tokens with the same content give the same class, box and mask;
    with them they differ, and the positions reach self- and cross-attention as DETR's do."""
    from decoders import SemanticMaskDecoder
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 3, 16)                          # (B, T, N=3, C) one content
    memory, feats = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 8, 4, 4)      # (B, T, S, C), (B, T, Cm, h, w)
    for slots, equal in ((None, True), (3, False)):
        torch.manual_seed(1)
        dec = SemanticMaskDecoder(16, 2, 2, 2, 32, num_slots=slots).eval()
        out = dec(q, memory, None, feats)
        same = [torch.allclose(out[k][0, 0, 0], out[k][0, 0, 1], atol=1e-6)
                for k in ("pred_logits", "pred_boxes", "pred_masks")]
        assert all(same) if equal else not any(same), (slots, same)


def test_every_row_has_slot_positions_by_default():
    from train import TrainConfig, resolve
    for flags in (dict(), dict(no_gsd=True, no_avsr=True, no_lsd=True)):  # full model, baseline
        _, cfg = resolve(TrainConfig(**flags), 3)
        assert SQD(cfg).mask_decoder.slot_pos.shape == (cfg.num_tokens, cfg.dim)
    assert SQD(tiny_cfg(slot_positions=False)).mask_decoder.slot_pos is None  # the visual pretraining's
