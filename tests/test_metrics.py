"""Tests of metrics.py: every metric against hand-built 4x4 masks with values computed by hand (written out
below as fractions), plus random inputs against a literal re-implementation of the official loops
(`mask_iou`, `_eval_pr` / `Eval_Fmeasure`, `_batch_miou_fscore` with `torch.histc`).

Hand calculations use beta^2 = 0.3, so F = 1.3 P R / (0.3 P + R).
"""
import math
import os
import tempfile
from fractions import Fraction as Fr

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics import (METRIC_DEFINITIONS, ObjectMetrics, SemanticMetrics, binary_frame_fmeasure,
                     binary_frame_iou, codebook_stats, official_thresholds, semantic_frame_stats)


def grid(rows):
    """4x4 (or any) mask from a list of strings of digits -> (H, W) int64."""
    return torch.tensor([[int(c) for c in r] for r in rows], dtype=torch.int64)  # (H, W)


def fmeasure(p, r):
    return (1 + Fr(3, 10)) * p * r / (Fr(3, 10) * p + r)


# ----------------------------------------------------------------------------------------------------
# AVS-Object: J
# ----------------------------------------------------------------------------------------------------

def test_binary_j_hand_values_with_empty_gt():
    gt = torch.stack([grid(["1100", "1100", "0000", "0000"]),  # 4 px
                      grid(["0000", "0000", "0000", "0000"]),  # empty GT
                      grid(["0000", "0000", "0000", "0000"])])  # empty GT  (3, 4, 4)
    pred = torch.stack([grid(["1110", "1000", "1000", "0000"]),  # 5 px, 3 inside GT: I=3, U=4+5-3=6
                        grid(["0000", "0110", "0000", "0001"]),  # 3 px on an empty GT: TN = 13
                        grid(["0000", "0000", "0000", "0000"])]).bool()  # empty on empty: TN = 16  (3, 4, 4)
    iou = binary_frame_iou(pred, gt.bool())  # (3,)
    expected = [3 / (6 + 1e-7), 13 / (16 + 1e-7), 16 / (16 + 1e-7)]  # = 1/2, 13/16, 1
    assert iou.tolist() == pytest.approx(expected, rel=1e-12)

    # Through the accumulator, probabilities at 0.9 / 0.1 around the 0.5 threshold, all in one batch.
    prob = torch.where(pred, 0.9, 0.1).double()[None]  # (1, 3, 4, 4)
    m = ObjectMetrics()
    m.update(prob, gt[None], torch.ones(1, 3, dtype=torch.bool))
    out = m.compute()
    assert out["j_official"] == pytest.approx((0.5 + 13 / 16 + 1) / 3, rel=1e-6)
    assert out["j_per_frame"] == pytest.approx((0.5 + 13 / 16 + 1) / 3, rel=1e-6)


def test_binary_j_threshold_is_strict_greater_than_half():
    gt = grid(["1000", "0000", "0000", "0000"])[None, None]  # (1, 1, 4, 4)
    prob = torch.zeros(1, 1, 4, 4, dtype=torch.float64)  # (1, 1, 4, 4)
    prob[0, 0, 0, 0] = 0.5  # exactly 0.5 is NOT foreground (official: sigmoid > 0.5)
    m = ObjectMetrics()
    m.update(prob, gt)
    assert m.compute()["j_official"] == pytest.approx(0.0, abs=1e-12)  # I = 0, U = 1


def test_binary_j_official_is_mean_of_batch_means():
    # batch 1: one frame with J = 1; batch 2: three frames with J = 0.
    gt1 = grid(["1100", "0000", "0000", "0000"])[None, None]  # (1, 1, 4, 4)
    m = ObjectMetrics()
    m.update(gt1.double(), gt1)  # perfect prediction: J = 1
    gt2 = gt1.expand(1, 3, 4, 4)  # (1, 3, 4, 4)
    m.update(1.0 - gt2.double(), gt2)  # complement: I = 0 -> J = 0
    out = m.compute()
    assert out["j_official"] == pytest.approx((1 + 0) / 2, rel=1e-6)  # 1/2
    assert out["j_per_frame"] == pytest.approx((1 + 0 + 0 + 0) / 4, rel=1e-6)  # 1/4
    assert out["num_batches"] == 2 and out["num_frames"] == 4


def test_binary_invalid_frames_are_not_scored():
    torch.manual_seed(0)
    prob = torch.rand(2, 3, 4, 4, dtype=torch.float64)  # (B, T, H, W)
    gt = (torch.rand(2, 3, 4, 4) > 0.5).long()  # (B, T, H, W)
    valid = torch.tensor([[True, False, True], [False, True, True]])  # (B, T)
    a = ObjectMetrics()
    a.update(prob, gt, valid)
    b = ObjectMetrics()
    b.update(prob[valid][None], gt[valid][None])  # the same 4 frames as one clip  (1, 4, H, W)
    assert a.compute() == b.compute()
    assert a.compute()["num_frames"] == 4


def test_binary_j_matches_official_mask_iou_loop():
    torch.manual_seed(1)
    logits = torch.randn(6, 8, 8)  # (N, H, W)
    gt = (torch.rand(6, 8, 8) > 0.6).float()  # (N, H, W)
    gt[2] = 0  # one empty-GT frame
    # Literal re-implementation of the official mask_iou.
    p = (torch.sigmoid(logits) > 0.5).int()
    inter = (p * gt).sum(2).sum(1)
    union = torch.max(p, gt).sum(2).sum(1)
    inter_no_obj = ((1 - gt) * (1 - p)).sum(2).sum(1)
    no_obj = gt.sum(2).sum(1) == 0
    inter[no_obj] = inter_no_obj[no_obj]
    union[no_obj] = 64
    official = (torch.sum(inter / (union + 1e-7)) / 6).item()
    m = ObjectMetrics()
    m.update(torch.sigmoid(logits)[None], gt[None])
    assert m.compute()["j_official"] == pytest.approx(official, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# AVS-Object: F-measure
# ----------------------------------------------------------------------------------------------------

def _frames_a_b():
    """Two frames, GT = the top row (4 px) in both; probabilities 0, 0.25, 0.75.

    Thresholds t_k ~ k/254: t = 0 selects every pixel, 0 < t <= 0.25 selects p >= 0.25, 0.25 < t <= 0.75
    selects p >= 0.75, t > 0.75 selects nothing.
    A: p = .75 on 2 GT px, .25 on the other 2 GT px and 6 background px, 0 elsewhere.
       all:  P = 4/16, R = 1 -> F = 13/43;  mid: P = 4/10, R = 1 -> 13/28;  high: P = 1, R = 1/2 -> 13/16.
    B: p = .25 on the 4 GT px, .75 on one background px.
       all:  13/43;  mid: P = 4/5, R = 1 -> 26/31;  high: TP = 0 -> 0.
    """
    gt = grid(["1111", "0000", "0000", "0000"])  # (4, 4)
    pa = torch.tensor([[.75, .75, .25, .25],
                       [.25, .25, .25, .25],
                       [.25, .25, 0, 0],
                       [0, 0, 0, 0]], dtype=torch.float64)  # (4, 4)
    pb = torch.tensor([[.25, .25, .25, .25],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0],
                       [0, 0, 0, .75]], dtype=torch.float64)  # (4, 4)
    return pa, pb, gt


def test_binary_f_hand_values_per_frame_curve():
    pa, pb, gt = _frames_a_b()
    f = binary_frame_fmeasure(torch.stack([pa, pb]), torch.stack([gt, gt]).bool())  # (2, 255)
    t = official_thresholds().double()  # (255,)
    all_ = t == 0
    mid = (t > 0) & (t <= 0.25)
    high = (t > 0.25) & (t <= 0.75)
    none = t > 0.75
    assert f[0, all_].tolist() == pytest.approx([13 / 43], rel=1e-9)
    assert f[0, mid].allclose(torch.full_like(f[0, mid], 13 / 28))
    assert f[0, high].allclose(torch.full_like(f[0, high], 13 / 16))
    assert f[1, mid].allclose(torch.full_like(f[1, mid], 26 / 31))
    assert (f[1, high] == 0).all() and (f[:, none] == 0).all()
    # the hand fractions themselves
    assert float(fmeasure(Fr(4, 10), Fr(1))) == pytest.approx(13 / 28)
    assert float(fmeasure(Fr(1), Fr(1, 2))) == pytest.approx(13 / 16)
    assert float(fmeasure(Fr(4, 5), Fr(1))) == pytest.approx(26 / 31)


def test_binary_f_official_changes_with_batch_size_whole_set_does_not():
    pa, pb, gt = _frames_a_b()
    prob = torch.stack([pa, pb])[:, None]  # (B=2, T=1, 4, 4)
    gts = torch.stack([gt, gt])[:, None]  # (2, 1, 4, 4)

    together = ObjectMetrics()  # one batch of 2 clips: best threshold in the mid range
    together.update(prob, gts)
    apart = ObjectMetrics()  # two batches of 1 clip: each frame picks its own best threshold
    apart.update(prob[:1], gts[:1])
    apart.update(prob[1:], gts[1:])
    t, a = together.compute(), apart.compute()

    # batch of 2: max(13/43, (13/28 + 26/31)/2, (13/16 + 0)/2) = 1131/1736
    assert t["f_official"] == pytest.approx(1131 / 1736, rel=1e-9)
    # batches of 1: (13/16 + 26/31) / 2 = 819/992
    assert a["f_official"] == pytest.approx(819 / 992, rel=1e-9)
    assert a["f_official"] > t["f_official"] + 0.1
    # batch-independent: the same for both batchings, and equal to the one-batch official value
    assert t["f_whole_set"] == pytest.approx(1131 / 1736, rel=1e-9)
    assert a["f_whole_set"] == pytest.approx(1131 / 1736, rel=1e-9)
    # first threshold of the best (mid) range is t_1 = (1 - 1e-10) / 254
    assert a["f_whole_set_threshold"] == pytest.approx(1 / 254, rel=1e-6)
    # J: A has P = {2 GT px} -> 2/4; B has P = {1 background px} -> 0/5.
    assert t["j_official"] == pytest.approx(0.25, rel=1e-6)
    assert a["j_official"] == pytest.approx(0.25, rel=1e-6)
    assert t["jf_official"] == pytest.approx((0.25 + 1131 / 1736) / 2, rel=1e-6)
    assert a["jf_official"] == pytest.approx((0.25 + 819 / 992) / 2, rel=1e-6)
    assert a["jf_whole_set"] == pytest.approx(t["jf_whole_set"], rel=1e-12)


def test_binary_f_empty_gt_frames_skipped_and_empty_batch_scores_zero():
    pa, pb, gt = _frames_a_b()
    empty = torch.zeros(4, 4, dtype=torch.int64)  # (4, 4)
    m = ObjectMetrics()
    # batch 1: frame A plus an empty-GT frame predicted empty: F skips the empty frame -> 13/16
    m.update(torch.stack([pa, torch.zeros(4, 4, dtype=torch.float64)])[None], torch.stack([gt, empty])[None])
    # batch 2: only an empty-GT frame: official F scores this batch 0, J scores TN fraction 16/16
    m.update(torch.zeros(1, 1, 4, 4, dtype=torch.float64), empty[None, None])
    out = m.compute()
    assert out["f_official"] == pytest.approx((13 / 16 + 0) / 2, rel=1e-9)
    assert out["f_whole_set"] == pytest.approx(13 / 16, rel=1e-9)  # only frame A has non-empty GT
    # J: A = 2/4; empty frame predicted empty = 1 -> batch 1 mean 3/4; batch 2 = 1
    assert out["j_official"] == pytest.approx((3 / 4 + 1) / 2, rel=1e-6)
    assert out["j_per_frame"] == pytest.approx((1 / 2 + 1 + 1) / 3, rel=1e-6)


def _official_fmeasure_loop(prob, gt):
    """Literal re-implementation of the official Eval_Fmeasure / _eval_pr (float32). prob, gt: (N, H, W)."""
    thlist = torch.linspace(0, 1 - 1e-10, 255)
    avg_f, img_num, score = 0.0, 0, torch.zeros(255)
    for n in range(prob.shape[0]):
        if torch.mean(gt[n]) == 0.0:
            continue
        prec, recall = torch.zeros(255), torch.zeros(255)
        for i in range(255):
            y = (prob[n] >= thlist[i]).float()
            tp = (y * gt[n]).sum()
            prec[i], recall[i] = tp / (y.sum() + 1e-20), tp / (gt[n].sum() + 1e-20)
        f = 1.3 * prec * recall / (0.3 * prec + recall)
        f[f != f] = 0
        avg_f = avg_f + f
        img_num += 1
        score = avg_f / img_num
    return score.max().item()


def test_binary_f_matches_official_loop_on_random_batches():
    torch.manual_seed(2)
    prob = torch.sigmoid(3 * torch.randn(2, 3, 8, 8))  # (B, T, H, W) float32
    gt = (torch.rand(2, 3, 8, 8) > 0.6).float()  # (B, T, H, W)
    gt[1, 1] = 0  # an empty-GT frame
    m = ObjectMetrics()
    expected = []
    for b in range(2):  # two official batches of one clip each
        m.update(prob[b:b + 1], gt[b:b + 1])
        expected.append(_official_fmeasure_loop(prob[b], gt[b]))
    assert m.compute()["f_official"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    whole = _official_fmeasure_loop(prob.flatten(0, 1), gt.flatten(0, 1))  # the whole set as one batch
    assert m.compute()["f_whole_set"] == pytest.approx(whole, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# AVSS
# ----------------------------------------------------------------------------------------------------

def _semantic_clip():
    """One clip, Kc = 3 (ids 0..3), T = 3: two real labelled frames and one padded slot.

    Frame 1: GT class 1 on a 2x2 block; prediction hits 3 of its px and puts class 2 on 2 background px.
      class 0: A = 11, L = 12, I = 10, U = 13 -> IoU 10/13, F(P=10/11, R=5/6) = 65/73
      class 1: A = 3,  L = 4,  I = 3,  U = 4  -> IoU 3/4,   F(P=1, R=3/4)    = 13/14
      class 2: A = 2,  L = 0,  I = 0,  U = 2  -> IoU 0, F 0, counted (prediction only)
    Frame 2: GT class 2 on a 2x2 block; prediction all background.
      class 0: A = 16, L = 12, I = 12, U = 16 -> IoU 3/4, F(P=3/4, R=1) = 39/49
      class 2: A = 0, L = 4, U = 4 -> IoU 0, F 0, counted (GT only)
    Class 3 is never in a GT or a prediction: N_3 = 0 -> counts 0 in the mean.
    Padded slot: the model predicts class 1 everywhere and the label holds junk (2); the official protocol
    scores it as background predicted background: class 0 IoU 1, F 1.
    """
    gt = torch.stack([grid(["0011", "0011", "0000", "0000"]),
                      grid(["0000", "0220", "0220", "0000"]),
                      grid(["2222", "2222", "2222", "2222"])])[None]  # (1, 3, 4, 4)
    pred = torch.stack([grid(["0011", "0010", "0000", "2200"]),
                        grid(["0000", "0000", "0000", "0000"]),
                        grid(["1111", "1111", "1111", "1111"])])[None]  # (1, 3, 4, 4)
    frame_valid = torch.tensor([[True, True, False]])  # (1, 3)
    label_valid = torch.tensor([[True, True, False]])  # (1, 3)
    return pred, gt, frame_valid, label_valid


def test_semantic_frame_stats_hand_values():
    pred, gt, _, _ = _semantic_clip()
    s = semantic_frame_stats(pred[0, :2], gt[0, :2], num_ids=4)  # dict of (2, 4)
    assert s["inter"].tolist() == [[10, 3, 0, 0], [12, 0, 0, 0]]
    assert s["union"].tolist() == [[13, 4, 2, 0], [16, 0, 4, 0]]
    assert s["seen"].tolist() == [[1, 1, 1, 0], [1, 0, 1, 0]]
    iou = torch.tensor([[10 / 13, 3 / 4, 0, 0], [3 / 4, 0, 0, 0]], dtype=torch.float64)  # (2, 4)
    f = torch.tensor([[65 / 73, 13 / 14, 0, 0], [39 / 49, 0, 0, 0]], dtype=torch.float64)  # (2, 4)
    torch.testing.assert_close(s["iou"], iou, rtol=1e-12, atol=0)
    torch.testing.assert_close(s["f"], f, rtol=1e-12, atol=0)
    assert float(fmeasure(Fr(10, 11), Fr(10, 12))) == pytest.approx(65 / 73)
    assert float(fmeasure(Fr(3, 4), Fr(1))) == pytest.approx(39 / 49)


def test_semantic_miou_f_official_vs_real_frames_and_never_seen_class():
    m = SemanticMetrics(num_classes=3)
    m.update(*_semantic_clip())
    out, pc = m.compute(), m.per_class()
    # real frames: class 0 (10/13 + 3/4)/2 = 79/104, class 1 3/4, class 2 (0 + 0)/2, class 3 never seen -> 0
    assert pc["iou_real_frames"] == pytest.approx([79 / 104, 3 / 4, 0, 0], rel=1e-12)
    assert out["miou_real_frames"] == pytest.approx(157 / 416, rel=1e-12)  # (79/104 + 3/4 + 0 + 0) / 4
    # official: the padded slot adds IoU 1 to background: (10/13 + 3/4 + 1)/3 = 131/156
    assert pc["iou_official"] == pytest.approx([131 / 156, 3 / 4, 0, 0], rel=1e-12)
    assert out["miou_official"] == pytest.approx(31 / 78, rel=1e-12)  # (131/156 + 3/4) / 4
    f0_real = (65 / 73 + 39 / 49) / 2
    f0_off = (65 / 73 + 39 / 49 + 1) / 3
    assert pc["f_real_frames"] == pytest.approx([f0_real, 13 / 14, 0, 0], rel=1e-12)
    assert out["f_real_frames"] == pytest.approx((f0_real + 13 / 14) / 4, rel=1e-12)
    assert out["f_official"] == pytest.approx((f0_off + 13 / 14) / 4, rel=1e-12)
    # not official: sum I / sum U: class 0 22/29, class 1 3/4, class 2 0/6, class 3 0
    assert out["miou_accumulated_real_frames"] == pytest.approx((22 / 29 + 3 / 4) / 4, rel=1e-12)
    assert out["num_official_frames"] == 3 and out["num_real_frames"] == 2


def test_semantic_unlabelled_real_frame_counts_as_background_gt_officially():
    # One real frame without a label: official protocol scores it against an all-background GT.
    pred = grid(["1100", "0000", "0000", "0000"])[None, None]  # (1, 1, 4, 4)
    gt = torch.full((1, 1, 4, 4), 2, dtype=torch.int64)  # junk in the label map  (1, 1, 4, 4)
    m = SemanticMetrics(num_classes=2)
    m.update(pred, gt, torch.tensor([[True]]), torch.tensor([[False]]))
    pc, out = m.per_class(), m.compute()
    # class 0: I = 14, U = 16 -> 7/8; class 1: predicted only -> 0, counted; class 2: never -> 0
    assert pc["iou_official"] == pytest.approx([7 / 8, 0, 0], rel=1e-12)
    assert out["miou_official"] == pytest.approx(7 / 24, rel=1e-12)
    assert out["num_real_frames"] == 0 and out["miou_real_frames"] == 0.0


def _official_avss_loop(pred, target, nclass):
    """Literal re-implementation of the official `_batch_miou_fscore` + aggregation in test.py.
    pred, target: (BF, H, W) int64 ids 0..nclass-1. Returns (miou, fscore)."""
    predict = pred.float() + 1
    target = target.float() + 1
    intersection = predict * (predict == target).float()
    ious, fscores, cls_count = torch.zeros(nclass), torch.zeros(nclass), torch.zeros(nclass)
    for i in range(target.shape[0]):
        area_inter = torch.histc(intersection[i], bins=nclass, min=1, max=nclass)
        area_pred = torch.histc(predict[i], bins=nclass, min=1, max=nclass)
        area_lab = torch.histc(target[i], bins=nclass, min=1, max=nclass)
        area_union = area_pred + area_lab - area_inter
        ious += area_inter / (2.220446049250313e-16 + area_union)
        cls_count[torch.nonzero(area_union).squeeze(-1)] += 1
        precision, recall = area_inter / area_pred, area_inter / area_lab
        fscore = 1.3 * precision * recall / (0.3 * precision + recall)
        fscore[fscore != fscore] = 0
        fscores += fscore
    miou = ious / cls_count
    miou[torch.isnan(miou)] = 0
    f = fscores / cls_count
    f[torch.isnan(f)] = 0
    return miou.mean().item(), f.mean().item()


def test_semantic_matches_official_histc_loop_on_random_clips():
    torch.manual_seed(3)
    kc, B, T = 5, 3, 10
    gt = torch.randint(0, kc + 1, (B, T, 6, 6))  # (B, T, H, W)
    gt[gt == 4] = 0  # class 4 never in the GT
    pred = torch.where(torch.rand(B, T, 6, 6) < 0.6, gt, torch.randint(0, kc, (B, T, 6, 6)))  # (B, T, H, W)
    frame_valid = torch.ones(B, T, dtype=torch.bool)  # (B, T)
    frame_valid[0, 5:] = False  # a v1 clip padded to 10
    frame_valid[2, 5:] = False
    label_valid = frame_valid.clone()  # (B, T)
    m = SemanticMetrics(num_classes=kc)
    for b in range(B):
        m.update(pred[b:b + 1], gt[b:b + 1], frame_valid[b:b + 1], label_valid[b:b + 1])
    out = m.compute()
    # official: padded slots are zero logits -> prediction 0, zero labels
    pad = ~frame_valid[:, :, None, None]  # (B, T, 1, 1)
    miou, f = _official_avss_loop(pred.masked_fill(pad, 0).flatten(0, 1), gt.masked_fill(pad, 0).flatten(0, 1),
                                  kc + 1)
    assert out["miou_official"] == pytest.approx(miou, rel=1e-5)
    assert out["f_official"] == pytest.approx(f, rel=1e-5)
    real = frame_valid.flatten()  # (B*T,)
    miou_r, f_r = _official_avss_loop(pred.flatten(0, 1)[real], gt.flatten(0, 1)[real], kc + 1)
    assert out["miou_real_frames"] == pytest.approx(miou_r, rel=1e-5)
    assert out["f_real_frames"] == pytest.approx(f_r, rel=1e-5)
    assert out["miou_official"] != pytest.approx(out["miou_real_frames"], rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# Merging and distributed reduction
# ----------------------------------------------------------------------------------------------------

def _random_object_batches(n=4, seed=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prob = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)  # (B, T, H, W)
        gt = (torch.rand(2, 3, 8, 8, generator=g) > 0.7).long()  # (B, T, H, W)
        gt[0, 0] = 0
        valid = torch.rand(2, 3, generator=g) > 0.2  # (B, T)
        out.append((prob, gt, valid))
    return out


def _random_semantic_batches(n=4, seed=5, kc=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        gt = torch.randint(0, kc + 1, (2, 4, 6, 6), generator=g)  # (B, T, H, W)
        pred = torch.randint(0, kc + 1, (2, 4, 6, 6), generator=g)  # (B, T, H, W)
        fv = torch.tensor([[True, True, False, False], [True, True, True, True]])  # (B, T)
        lv = fv & (torch.rand(2, 4, generator=g) > 0.2)  # (B, T)
        out.append((pred, gt, fv, lv))
    return out


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-15), k


def test_merge_of_two_accumulators_equals_one_over_all_data():
    for make, batches in [(ObjectMetrics, _random_object_batches()),
                          (lambda: SemanticMetrics(num_classes=4), _random_semantic_batches())]:
        whole, first, second = make(), make(), make()
        for i, b in enumerate(batches):
            whole.update(*b)
            (first if i < 2 else second).update(*b)
        merged = make().merge(first).merge(second.state())  # an accumulator or a state dict
        _assert_same(merged.compute(), whole.compute())
        restored = make()
        restored.load_state(whole.state())
        _assert_same(restored.compute(), whole.compute())
        whole.reset()
        assert all((v == 0).all() for v in whole.state().values())


def test_all_reduce_is_a_no_op_without_torch_distributed():
    assert not dist.is_initialized()
    m = ObjectMetrics()
    m.update(*_random_object_batches(1)[0])
    before = m.compute()
    m.all_reduce()
    assert m.compute() == before


def _ddp_worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        obj, sem = ObjectMetrics(), SemanticMetrics(num_classes=4)
        for i, b in enumerate(_random_object_batches()):
            if i % world_size == rank:
                obj.update(*b)
        for i, b in enumerate(_random_semantic_batches()):
            if i % world_size == rank:
                sem.update(*b)
        obj.all_reduce()
        sem.all_reduce()
        torch.save({"object": obj.compute(), "semantic": sem.compute()}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_equals_single_process():
    single_obj, single_sem = ObjectMetrics(), SemanticMetrics(num_classes=4)
    for b in _random_object_batches():
        single_obj.update(*b)
    for b in _random_semantic_batches():
        single_sem.update(*b)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_ddp_worker, args=(2, init_file, result_file), nprocs=2, join=True)
        for rank in range(2):  # every rank holds the global result
            res = torch.load(f"{result_file}.{rank}")
            _assert_same(res["object"], single_obj.compute())
            _assert_same(res["semantic"], single_sem.compute())


def test_metric_definitions_cover_every_reported_number():
    obj = ObjectMetrics()
    obj.update(*_random_object_batches(1)[0])
    sem = SemanticMetrics(num_classes=4)
    sem.update(*_random_semantic_batches(1)[0])
    assert set(obj.compute()) == set(METRIC_DEFINITIONS["ObjectMetrics"]) == set(ObjectMetrics.definitions)
    assert set(sem.compute()) == set(METRIC_DEFINITIONS["SemanticMetrics"])
    assert all(isinstance(v, str) and v for d in METRIC_DEFINITIONS.values() for v in d.values())


# ----------------------------------------------------------------------------------------------------
# The codebook of a run: usage, perplexity, dead codes
# ----------------------------------------------------------------------------------------------------

def test_codebook_stats_hand_values():
    stats = codebook_stats(torch.tensor([[0, 0], [1, 3]]), num_codes=5)
    # histogram p = (1/2, 1/4, 0, 1/4, 0): entropy = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert math.isclose(stats["perplexity"], 2.0 ** 1.5, rel_tol=1e-12)
    assert stats["usage"] == 3 / 5 and stats["dead"] == 2
    uniform = codebook_stats(torch.arange(8).repeat(3), num_codes=8)
    assert math.isclose(uniform["perplexity"], 8.0, rel_tol=1e-12) and uniform["dead"] == 0
    collapsed = codebook_stats(torch.full((10,), 2), num_codes=8)
    assert collapsed["perplexity"] == 1.0 and collapsed["usage"] == 1 / 8 and collapsed["dead"] == 7
