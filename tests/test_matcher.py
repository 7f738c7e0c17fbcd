"""Tests of matcher.py: tracks, loss functions, the Hungarian matcher (eq. 10) and the criterion (eq. 8).

Every test compares with something computed independently: brute force over all permutations,
scalar formulas written out with `math`, hand-computed boxes, masks and GIoU values, explicit
Python loops over frames, tokens, classes and pixels, and the tracks, matcher and criterion
written clip by clip (tests/oracles.py). The copies to the host are counted by wrapping the
torch.Tensor methods that make the host wait for a GPU.
"""
import itertools
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou  # noqa: E402
from matcher import (  # noqa: E402
    HungarianMatcher,
    SetCriterion,
    Tracks,
    dice_loss,
    masks_at_resolution,
    pairwise_dice_cost,
    pairwise_focal_cost,
    sigmoid_focal_loss,
    stack_layers,
    track_batch,
)
from oracles import PerClipHungarianMatcher, PerClipSetCriterion, build_tracks, pack_tracks  # noqa: E402

ALPHA, GAMMA = 0.25, 2.0
PAPER_WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_dice": 2.0, "loss_mask": 5.0}


# ----------------------------------------------------------------------------------------------
# Independent scalar references
# ----------------------------------------------------------------------------------------------
def focal_scalar(x, t):
    """Lin et al. 2017 for one logit and a 0/1 target, written out with math."""
    p = 1.0 / (1.0 + math.exp(-x))
    if t == 1:
        return ALPHA * (1 - p) ** GAMMA * -math.log(p)
    return (1 - ALPHA) * p ** GAMMA * -math.log(1 - p)


def giou_scalar(a, b):
    """GIoU of two xyxy boxes given as Python lists."""
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area(a) + area(b) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclosing - union) / enclosing


def xyxy(box):
    cx, cy, w, h = box
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference_pair_losses(logits, masks, boxes, target, i, j):
    """Eq. (10) terms of token i vs track j of one clip, by explicit loops.

    logits (T,N,Kc), masks (T,N,h,w), boxes (T,N,4); target masks at (h, w).
    """
    T = logits.shape[0]
    valid = target["label_valid"].tolist()
    sounding = target["sounding"][j].tolist()
    c = int(target["classes"][j]) - 1
    frames = [t for t in range(T) if valid[t]]
    sound_frames = [t for t in frames if sounding[t]]
    cls = sum(focal_scalar(float(logits[t, i, c]), 1) - focal_scalar(float(logits[t, i, c]), 0)
              for t in sound_frames) / len(frames)
    l1 = sum(sum(abs(float(boxes[t, i, k]) - float(target["boxes"][j, t, k])) for k in range(4))
             for t in sound_frames) / len(sound_frames)
    giou = sum(1 - giou_scalar(xyxy(boxes[t, i].tolist()), xyxy(target["boxes"][j, t].tolist()))
               for t in sound_frames) / len(sound_frames)
    focal_sum, inter, psum, tsum, count = 0.0, 0.0, 0.0, 0.0, 0
    for t in frames:
        for y in range(masks.shape[2]):
            for x in range(masks.shape[3]):
                logit, tgt = float(masks[t, i, y, x]), int(target["masks"][j, t, y, x])
                focal_sum += focal_scalar(logit, tgt)
                p = sigmoid(logit)
                inter += p * tgt
                psum += p
                tsum += tgt
                count += 1
    mask = focal_sum / count
    dice = 1 - (2 * inter + 1) / (psum + tsum + 1)
    return {"loss_class": cls, "loss_bbox": l1, "loss_giou": giou, "loss_mask": mask, "loss_dice": dice}


def random_clip_targets(gen, J, T, h, w, Kc, some_unlabelled=True):
    """Random tracks at mask resolution: silent frames, unlabelled frames, valid boxes."""
    valid = torch.ones(T, dtype=torch.bool)
    if some_unlabelled:
        valid[torch.randint(T, (1,), generator=gen)] = False
    if not valid.any():
        valid[0] = True
    sounding = (torch.rand(J, T, generator=gen) < 0.6) & valid[None]
    for j in range(J):  # every track sounds in at least one labelled frame
        if not sounding[j].any():
            sounding[j, int(valid.nonzero()[0])] = True
    masks = (torch.rand(J, T, h, w, generator=gen) < 0.4).double() * sounding[:, :, None, None]
    masks[:, :, 0, 0] = torch.maximum(masks[:, :, 0, 0], sounding.double())  # never empty where sounding
    centres = 0.25 + 0.5 * torch.rand(J, T, 2, generator=gen, dtype=torch.float64)
    sizes = 0.1 + 0.4 * torch.rand(J, T, 2, generator=gen, dtype=torch.float64)
    boxes = torch.cat([centres, sizes], dim=-1) * sounding[:, :, None]
    classes = torch.randperm(Kc, generator=gen)[:J] + 1
    return {"classes": classes, "masks": masks, "boxes": boxes, "sounding": sounding, "label_valid": valid}


def run_matcher(layers, targets, matcher=None):
    """matcher.HungarianMatcher on track dicts (packed by the oracle's pack_tracks, so that slot k
    of a clip is its track k). Returns, per layer, a list of B pairs (pred_idx (J',), tgt_idx (J',))
    int64, token pred_idx[k] matched to track tgt_idx[k], pred_idx ascending; and the assignment
    (B, L*N) itself."""
    size = layers[0]["pred_masks"].shape[-2:]
    rows = stack_layers(layers)  # (B, T, L*N, Kc), (B, T, L*N, h, w), (B, T, L*N, 4)
    assignment = (matcher or HungarianMatcher())(*rows, pack_tracks(targets, size), len(layers))  # (B, L*N)
    N = layers[0]["pred_logits"].shape[2]
    indices = []
    for layer in range(len(layers)):
        rows = assignment[:, layer * N:(layer + 1) * N]  # (B, N) the track of each token, -1 if none
        indices.append([(torch.nonzero(row >= 0)[:, 0], row[row >= 0]) for row in rows])
    return indices, assignment


def random_outputs(gen, B, T, N, Kc, h, w, requires_grad=False):
    out = {
        "pred_logits": torch.randn(B, T, N, Kc, generator=gen, dtype=torch.float64),
        "pred_masks": 2 * torch.randn(B, T, N, h, w, generator=gen, dtype=torch.float64),
        "pred_boxes": torch.rand(B, T, N, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.2,
    }
    if requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


# ----------------------------------------------------------------------------------------------
# eq. (10): the matcher
# ----------------------------------------------------------------------------------------------
def test_eq10_matcher_equals_brute_force_over_permutations():
    Kc, h, w = 6, 4, 4
    matcher = HungarianMatcher()
    cases = 0
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        N = int(torch.randint(1, 6, (1,), generator=gen))  # 1..5 tokens
        T = int(torch.randint(2, 4, (1,), generator=gen))  # 2..3 frames
        # J <= N for most clips; the last seeds also try more tracks than tokens.
        Js = [int(torch.randint(1, N + 1, (1,), generator=gen)), N + 1 if seed >= 6 else N]
        targets = [random_clip_targets(gen, J, T, h, w, Kc) for J in Js]
        outputs = random_outputs(gen, len(Js), T, N, Kc, h, w)
        indices = run_matcher([outputs], targets, matcher)[0][0]
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            J = Js[b]
            cost = [[sum(PAPER_WEIGHTS[k] * v for k, v in reference_pair_losses(
                outputs["pred_logits"][b], outputs["pred_masks"][b], outputs["pred_boxes"][b], targets[b], i, j
            ).items()) for j in range(J)] for i in range(N)]
            if J <= N:  # every track gets a distinct token
                best = min(itertools.permutations(range(N), J),
                           key=lambda tokens: sum(cost[tokens[j]][j] for j in range(J)))
                expected = sorted((best[j], j) for j in range(J))
            else:  # every token gets a distinct track
                best = min(itertools.permutations(range(J), N),
                           key=lambda tracks: sum(cost[i][tracks[i]] for i in range(N)))
                expected = [(i, best[i]) for i in range(N)]
            got = list(zip(pred_idx.tolist(), tgt_idx.tolist()))
            assert len(got) == min(N, J)
            assert got == expected, (seed, b, got, expected)
            assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
            cases += 1
    assert cases == 16


def test_eq10_cost_matrix_equals_loops():
    gen = torch.Generator().manual_seed(3)
    T, N, J, Kc, h, w = 3, 4, 3, 5, 4, 4
    target = random_clip_targets(gen, J, T, h, w, Kc)
    out = random_outputs(gen, 1, T, N, Kc, h, w)
    weights = dict(cost_class=1.5, cost_mask=3.0, cost_dice=0.5, cost_bbox=4.0, cost_giou=1.0)
    matcher = HungarianMatcher(**weights)
    cost, _ = matcher.cost_matrices(out["pred_logits"], out["pred_masks"], out["pred_boxes"],
                                    pack_tracks([target], (h, w)))
    cost = cost[0]  # (N, J) the one clip
    key = {"loss_class": "cost_class", "loss_mask": "cost_mask", "loss_dice": "cost_dice",
           "loss_bbox": "cost_bbox", "loss_giou": "cost_giou"}
    for i in range(N):
        for j in range(J):
            ref = reference_pair_losses(out["pred_logits"][0], out["pred_masks"][0], out["pred_boxes"][0], target, i, j)
            assert float(cost[i, j]) == pytest.approx(sum(weights[key[k]] * v for k, v in ref.items()), rel=1e-9)


def test_eq10_clip_without_targets_and_full_resolution_targets():
    gen = torch.Generator().manual_seed(0)
    T, N, Kc, h, w = 2, 3, 4, 4, 4
    labels = torch.zeros(2, T, 4 * h, 4 * w, dtype=torch.int64)
    labels[1, :, 4:12, 0:8] = 2  # clip 1: one track; clip 0: background only
    tracks = build_tracks(labels, torch.ones(2, T, dtype=torch.bool), Kc)
    out = random_outputs(gen, 2, T, N, Kc, h, w)
    indices = run_matcher([out], tracks)[0][0]
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 1
    # Targets at label resolution give the same matching as targets subsampled by hand.
    small = [dict(t, masks=t["masks"][..., 2::4, 2::4]) for t in tracks]
    assert [(p.tolist(), q.tolist()) for p, q in run_matcher([out], small)[0][0]] == \
           [(p.tolist(), q.tolist()) for p, q in indices]


@pytest.mark.parametrize("key,term", [("pred_logits", "cost_class"), ("pred_boxes", "cost_bbox"),
                                      ("pred_masks", "cost_mask")])
def test_eq10_nan_prediction_names_the_cost_term(key, term):
    gen = torch.Generator().manual_seed(1)
    T, N, Kc, h, w = 2, 3, 4, 4, 4
    target = random_clip_targets(gen, 2, T, h, w, Kc, some_unlabelled=False)
    target["sounding"][:] = True
    target["masks"][:, :, 0, 0] = 1.0
    target["boxes"][:] = torch.tensor([0.5, 0.5, 0.2, 0.2], dtype=torch.float64)
    out = random_outputs(gen, 1, T, N, Kc, h, w)
    out[key][0, 0, 0] = float("nan")  # token 0, frame 0 (a labelled frame where both tracks sound)
    with pytest.raises(ValueError, match=term):
        run_matcher([out], [target])


# ----------------------------------------------------------------------------------------------
# eq. (8): the total loss
# ----------------------------------------------------------------------------------------------
def _labels_batch():
    """B=3 clips, T=3, 16x16 labels, Kc=4: many tracks, zero tracks, one unlabelled frame."""
    labels = torch.zeros(3, 3, 16, 16, dtype=torch.int64)
    valid = torch.ones(3, 3, dtype=torch.bool)
    labels[0, 0, 0:8, 0:8] = 1
    labels[0, 0, 8:16, 8:16] = 2
    labels[0, 1, 0:4, 8:16] = 3
    labels[0, 1, 8:12, 0:4] = 4  # clip 0: four tracks (more than N = 3 tokens)
    labels[0, 2, 4:8, 4:8] = 2
    valid[0, 2] = False  # ... and an unlabelled frame whose pixels must not count
    labels[2, 0, 2:10, 3:9] = 3
    labels[2, 2, 6:14, 1:5] = 3  # clip 2: one track, silent in frame 1
    return labels, valid


def test_eq08_total_is_weighted_sum_of_logged_parts():
    gen = torch.Generator().manual_seed(0)
    labels, valid = _labels_batch()
    Kc, N, T, h, w = 4, 3, 3, 4, 4
    tracks = pack_tracks(build_tracks(labels, valid, Kc), (h, w))
    out = random_outputs(gen, 3, T, N, Kc, h, w)
    out["aux_outputs"] = [random_outputs(gen, 3, T, N, Kc, h, w) for _ in range(2)]
    out["quant"] = {"quant_codebook": torch.tensor(0.7, dtype=torch.float64),
                    "quant_commit_global": torch.tensor(0.3, dtype=torch.float64),
                    "quant_commit_local": torch.tensor(0.9, dtype=torch.float64),
                    "quant_codebook_local": torch.tensor(0.2, dtype=torch.float64)}
    for lambda_quant, lambda_com in [(1.0, 0.5), (0.6, 0.25)]:
        criterion = SetCriterion(Kc, lambda_quant=lambda_quant, lambda_com=lambda_com)
        total, parts = criterion(out, tracks)
        hand_weights = {}
        for suffix in ["", "_0", "_1"]:
            hand_weights.update({name + suffix: wt for name, wt in PAPER_WEIGHTS.items()})
        hand_weights["quant_codebook"] = lambda_quant
        hand_weights["quant_commit_global"] = lambda_quant * lambda_com
        hand_weights["quant_commit_local"] = lambda_quant * lambda_com
        hand_weights["quant_codebook_local"] = lambda_quant
        assert set(parts) == set(hand_weights)
        expected = sum(hand_weights[k] * float(v) for k, v in parts.items())
        assert float(total) == pytest.approx(expected, rel=1e-12)
        assert all(criterion.weight_dict[k] == hand_weights[k] for k in parts if k in criterion.weight_dict)
        assert float(parts["quant_commit_local"]) == 0.9
    # Without aux losses only the last layer is logged.
    _, parts = SetCriterion(Kc, aux_loss=False)(out, tracks)
    assert not any(k.endswith("_0") for k in parts)


def test_criterion_losses_equal_explicit_loops():
    gen = torch.Generator().manual_seed(5)
    labels, valid = _labels_batch()
    Kc, N, T, h, w = 4, 3, 3, 4, 4
    tracks = build_tracks(labels, valid, Kc)
    out = random_outputs(gen, 3, T, N, Kc, h, w)
    criterion = SetCriterion(Kc, aux_loss=False)
    _, parts = criterion(out, pack_tracks(tracks, (h, w)))
    small = [dict(t, masks=t["masks"][..., 2::4, 2::4]) for t in tracks]  # CondInst subsampling by hand
    indices = run_matcher([out], small, criterion.matcher)[0][0]
    num_tracks = sum(len(t["classes"]) for t in tracks)
    assert num_tracks == 5
    ref = {k: 0.0 for k in PAPER_WEIGHTS}
    for b in range(3):
        t = small[b]
        match = dict(zip(indices[b][0].tolist(), indices[b][1].tolist()))  # token -> track
        frames = [f for f in range(T) if bool(t["label_valid"][f])]
        cls_sum = 0.0
        for f in frames:
            for i in range(N):
                for k in range(Kc):
                    j = match.get(i)
                    target = int(j is not None and bool(t["sounding"][j, f]) and int(t["classes"][j]) == k + 1)
                    cls_sum += focal_scalar(float(out["pred_logits"][b, f, i, k]), target)
        ref["loss_class"] += cls_sum / len(frames)
        for i, j in match.items():
            pair = reference_pair_losses(out["pred_logits"][b], out["pred_masks"][b], out["pred_boxes"][b], t, i, j)
            for k in ["loss_mask", "loss_dice", "loss_bbox", "loss_giou"]:
                ref[k] += pair[k]
    for k in ref:
        assert float(parts[k]) == pytest.approx(ref[k] / num_tracks, rel=1e-9), k
    assert len(indices[0][0]) == N  # 4 tracks, 3 tokens: min(N, J) matched


def test_criterion_gradients_and_zero_targets():
    gen = torch.Generator().manual_seed(2)
    labels, valid = _labels_batch()
    Kc, N, T, h, w = 4, 3, 3, 4, 4
    out = random_outputs(gen, 3, T, N, Kc, h, w, requires_grad=True)
    total, parts = SetCriterion(Kc)(out, pack_tracks(build_tracks(labels, valid, Kc), (h, w)))
    total.backward()
    for key in ["pred_logits", "pred_masks", "pred_boxes"]:
        grad = out[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key
    # The unlabelled frame of clip 0 gets no gradient at all.
    assert out["pred_logits"].grad[0, 2].abs().sum() == 0 and out["pred_masks"].grad[0, 2].abs().sum() == 0

    # A batch without any track: every token is no-object, mask and box losses are exactly 0.
    out = random_outputs(gen, 2, T, N, Kc, h, w, requires_grad=True)
    empty = build_tracks(torch.zeros(2, T, 16, 16, dtype=torch.int64), torch.ones(2, T, dtype=torch.bool), Kc)
    total, parts = SetCriterion(Kc)(out, pack_tracks(empty, (h, w)))
    assert torch.isfinite(total)
    for k in ["loss_mask", "loss_dice", "loss_bbox", "loss_giou"]:
        assert parts[k].item() == 0.0
    expected_class = sum(focal_scalar(float(x), 0) for x in out["pred_logits"].detach().flatten()) / T  # / 1 track floor
    assert parts["loss_class"].item() == pytest.approx(expected_class, rel=1e-9)
    total.backward()
    for key in ["pred_logits", "pred_masks", "pred_boxes"]:
        assert out[key].grad is not None and torch.isfinite(out[key].grad).all()


# ----------------------------------------------------------------------------------------------
# Loss functions against closed forms and hand values
# ----------------------------------------------------------------------------------------------
def test_sigmoid_focal_loss_closed_form():
    # x = 0, t = 1: p = 1/2, alpha (1-p)^2 (-log p) = 0.25 * 0.25 * ln 2
    got = sigmoid_focal_loss(torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    assert float(got) == pytest.approx(math.log(2) / 16, rel=1e-12)
    # x = ln 3, t = 0: p = 3/4, (1-alpha) p^2 (-log(1-p)) = 0.75 * 9/16 * ln 4
    got = sigmoid_focal_loss(torch.tensor([math.log(3)], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    assert float(got) == pytest.approx(0.75 * 9 / 16 * math.log(4), rel=1e-12)
    x = torch.linspace(-6, 6, 13, dtype=torch.float64)
    for t in [0, 1]:
        got = sigmoid_focal_loss(x, torch.full_like(x, float(t)))
        assert got.tolist() == pytest.approx([focal_scalar(float(v), t) for v in x], rel=1e-10)


def test_dice_loss_hand_masks():
    # logits 0 -> p = 1/2 everywhere; target [1, 1, 0, 0]: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4
    got = dice_loss(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    assert float(got) == pytest.approx(0.4, rel=1e-12)
    # p = [3/4, 3/4, 1/4], target [1, 0, 0]: 1 - (2*0.75 + 1) / (1.75 + 1 + 1) = 1 - 2.5/3.75 = 1/3
    logits = torch.tensor([[math.log(3), math.log(3), -math.log(3)]], dtype=torch.float64)
    got = dice_loss(logits, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert float(got) == pytest.approx(1 / 3, rel=1e-12)


def test_pairwise_costs_equal_loops():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    targets = (torch.rand(2, 10, generator=gen) < 0.5).double()
    focal, dice = pairwise_focal_cost(logits, targets), pairwise_dice_cost(logits, targets)
    for i in range(3):
        for j in range(2):
            assert float(focal[i, j]) == pytest.approx(
                sum(focal_scalar(float(logits[i, p]), int(targets[j, p])) for p in range(10)) / 10, rel=1e-10)
            assert float(dice[i, j]) == pytest.approx(float(dice_loss(logits[i:i + 1], targets[j:j + 1])), rel=1e-12)


def test_generalized_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    got = generalized_box_iou(a, b)
    # overlap 1, union 7, enclosing 3x3 = 9: 1/7 - 2/9 = -5/63
    assert float(got[0, 0]) == pytest.approx(-5 / 63, rel=1e-12)
    # [0,0,1,1] vs [2,0,3,1]: disjoint, union 2, enclosing 3: -1/3
    assert float(got[1, 1]) == pytest.approx(-1 / 3, rel=1e-12)
    assert float(got[0, 2]) == pytest.approx(1.0, rel=1e-12)  # identical boxes
    # [0,0,1,1] inside [0,0,2,2]: IoU 1/4, enclosing = union
    assert float(got[1, 2]) == pytest.approx(0.25, rel=1e-12)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert float(got[i, j]) == pytest.approx(giou_scalar(a[i].tolist(), b[j].tolist()), rel=1e-12)


def test_box_conversions_hand_values():
    box = torch.tensor([[0.5, 0.25, 0.2, 0.1]], dtype=torch.float64)
    assert box_cxcywh_to_xyxy(box)[0].tolist() == pytest.approx([0.4, 0.2, 0.6, 0.3])
    assert box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(box))[0].tolist() == pytest.approx(box[0].tolist())


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------
def test_build_tracks_hand_label_map():
    T, H, W, Kc = 3, 8, 8, 3
    labels = torch.zeros(2, T, H, W, dtype=torch.int64)
    labels[0, 0, 1:3, 2:5] = 1  # rows 1-2, cols 2-4
    labels[0, 0, 5:7, 0:2] = 2  # rows 5-6, cols 0-1
    labels[0, 0, 7, 7] = 255  # not a class id: no track
    labels[0, 1, 4, 7] = 1  # one pixel
    labels[0, 2, 0:2, 0:2] = 3  # frame 2 carries no label: ignored
    labels[0, 2, 3:5, 3:5] = 2
    label_valid = torch.tensor([[True, True, False], [True, True, True]])
    tracks = build_tracks(labels, label_valid, Kc)
    t = tracks[0]
    assert t["classes"].tolist() == [1, 2]
    assert t["sounding"].tolist() == [[True, True, False], [True, False, False]]
    assert t["label_valid"].tolist() == [True, True, False]
    expected_masks = torch.zeros(2, T, H, W)
    expected_masks[0, 0, 1:3, 2:5] = 1
    expected_masks[0, 1, 4, 7] = 1
    expected_masks[1, 0, 5:7, 0:2] = 1
    assert torch.equal(t["masks"], expected_masks)
    expected_boxes = torch.zeros(2, T, 4)
    expected_boxes[0, 0] = torch.tensor([3.5 / 8, 2 / 8, 3 / 8, 2 / 8])  # x 2..5, y 1..3 (pixel edges)
    expected_boxes[0, 1] = torch.tensor([7.5 / 8, 4.5 / 8, 1 / 8, 1 / 8])  # x 7..8, y 4..5
    expected_boxes[1, 0] = torch.tensor([1 / 8, 6 / 8, 2 / 8, 2 / 8])  # x 0..2, y 5..7
    assert torch.allclose(t["boxes"], expected_boxes, atol=1e-7)
    empty = tracks[1]  # background only
    assert empty["classes"].shape == (0,) and empty["masks"].shape == (0, T, H, W)
    assert empty["boxes"].shape == (0, T, 4) and empty["sounding"].shape == (0, T)


def test_masks_at_resolution_is_condinst_subsampling():
    masks = (torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    assert torch.equal(masks_at_resolution(masks, (4, 6)), masks[..., 2::4, 2::4])
    assert masks_at_resolution(masks, (16, 24)) is masks
    assert masks_at_resolution(torch.zeros(0, 3, 16, 24), (4, 6)).shape == (0, 3, 4, 6)


# ----------------------------------------------------------------------------------------------
# The batched matcher and criterion: the per-clip reference, brute force, the copies to the host
# ----------------------------------------------------------------------------------------------
def random_layers(gen, B, T, N, Kc, h, w, num_layers, dtype=torch.float64, requires_grad=False):
    """Outputs of num_layers decoder layers: the final one with the others in "aux_outputs"."""
    layers = [random_outputs(gen, B, T, N, Kc, h, w) for _ in range(num_layers)]
    layers = [{k: v.to(dtype).requires_grad_(requires_grad) for k, v in layer.items()} for layer in layers]
    return dict(layers[0], aux_outputs=layers[1:])


def drop_frame(target, frame):
    """Mark a frame of a track dict unlabelled (no mask, box or sound there), as build_tracks does."""
    target["label_valid"][frame] = False
    target["sounding"][:, frame] = False
    target["masks"][:, frame] = 0.0
    target["boxes"][:, frame] = 0.0
    target["sounding"][:, int(target["label_valid"].nonzero()[0])] = True  # every track still sounds


def pairs(indices):
    return [(p.tolist(), q.tolist()) for p, q in indices]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_matcher_and_losses_equal_the_per_clip_reference(dtype):
    Kc, T, N, h, w, L = 7, 3, 4, 4, 4, 3
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        Js = [0, 1, 3, N, N + 2]  # no track, fewer, as many and more tracks than tokens
        Js = [Js[i] for i in torch.randperm(len(Js), generator=gen).tolist()]
        targets = [random_clip_targets(gen, J, T, h, w, Kc) for J in Js]
        out = random_layers(gen, len(Js), T, N, Kc, h, w, L, dtype, requires_grad=True)
        layers = [out] + out["aux_outputs"]

        indices, assignment = run_matcher(layers, targets)
        reference = PerClipHungarianMatcher()
        for layer, outputs in enumerate(layers):
            expected = reference(outputs, targets)
            assert pairs(indices[layer]) == pairs(expected), (seed, layer)
            for b, (pred_idx, tgt_idx) in enumerate(expected):  # the assignment rows agree
                row = assignment[b, layer * N:(layer + 1) * N]  # (N,) slot = track index here
                assert row[pred_idx].tolist() == tgt_idx.tolist()
                assert int((row >= 0).sum()) == len(pred_idx) == min(N, Js[b])

        total, parts = SetCriterion(Kc)(out, pack_tracks(targets, (h, w)))
        total_ref, parts_ref = PerClipSetCriterion(Kc)(out, targets)
        assert list(parts) == list(parts_ref)  # same terms, same order (_0, _1 for the aux layers)
        assert len(parts) == 5 * L
        for k in parts:
            assert float(parts[k].detach()) == pytest.approx(float(parts_ref[k].detach()), rel=1e-6, abs=1e-7), (seed, k)
        assert float(total.detach()) == pytest.approx(float(total_ref.detach()), rel=1e-6)
        # the same function: the same gradients for every layer's predictions
        grads = torch.autograd.grad(total, [x for o in layers for x in o.values() if torch.is_tensor(x)])
        grads_ref = torch.autograd.grad(total_ref, [x for o in layers for x in o.values() if torch.is_tensor(x)])
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        for g, g_ref in zip(grads, grads_ref):
            assert torch.allclose(g, g_ref, rtol=tol, atol=tol * 1e-2)


def test_batched_matcher_equals_brute_force_over_layers_and_clips():
    Kc, T, N, h, w, L = 6, 2, 3, 3, 3, 2
    gen = torch.Generator().manual_seed(11)
    Js = [2, 0, 3, 4]  # fewer tracks than tokens, none, as many, more
    targets = [random_clip_targets(gen, J, T, h, w, Kc) for J in Js]
    out = random_layers(gen, len(Js), T, N, Kc, h, w, L)
    layers = [out] + out["aux_outputs"]
    indices, _ = run_matcher(layers, targets)
    for layer, outputs in enumerate(layers):
        for b, J in enumerate(Js):
            cost = [[sum(PAPER_WEIGHTS[k] * v for k, v in reference_pair_losses(
                outputs["pred_logits"][b], outputs["pred_masks"][b], outputs["pred_boxes"][b], targets[b], i, j
            ).items()) for j in range(J)] for i in range(N)]
            if J <= N:
                best = min(itertools.permutations(range(N), J),
                           key=lambda tokens: sum(cost[tokens[j]][j] for j in range(J)))
                expected = sorted((best[j], j) for j in range(J))
            else:
                best = min(itertools.permutations(range(J), N),
                           key=lambda tracks: sum(cost[i][tracks[i]] for i in range(N)))
                expected = [(i, best[i]) for i in range(N)]
            assert list(zip(*pairs(indices[layer])[b])) == expected, (layer, b)


def test_track_batch_equals_packed_build_tracks():
    Kc, T = 5, 3
    labels, valid = _labels_batch()  # 3 clips: four tracks, none, one; an unlabelled frame
    labels = labels.clone()
    labels[0, 0, 12:16, 0:3] = 255  # an ignore value: no track
    labels[1, 1, 0:5, 0:5] = 5  # clip 1 gets a track in its middle frame ...
    labels[1, 0, 10:12, 10:12] = 4  # ... and a class only in a frame without labels
    valid[1, 0] = False
    out_size = (4, 4)
    for size in (out_size, (16, 16)):
        dense = track_batch(labels, valid, Kc, size)
        packed = pack_tracks(build_tracks(labels, valid, Kc), size)
        assert isinstance(dense, Tracks) and dense.masks.shape == (3, Kc, T, *size)
        assert torch.equal(dense.label_valid, packed.label_valid)
        assert dense.real.sum(dim=1).tolist() == packed.real.sum(dim=1).tolist() == [4, 1, 1]
        for b in range(3):
            slots = dense.real[b].nonzero()[:, 0]  # the clip's classes - 1
            J = int(packed.real[b].sum())
            assert torch.equal(dense.classes[b, slots], packed.classes[b, :J])
            assert torch.equal(dense.masks[b, slots], packed.masks[b, :J])
            assert torch.equal(dense.boxes[b, slots], packed.boxes[b, :J])
            assert torch.equal(dense.sounding[b, slots], packed.sounding[b, :J])
            absent = ~dense.real[b]  # every other class slot: empty, never sounds
            assert dense.masks[b, absent].sum() == 0 and dense.boxes[b, absent].abs().sum() == 0
            assert not dense.sounding[b, absent].any()
    # and the loss does not notice the difference
    gen = torch.Generator().manual_seed(3)
    out = random_layers(gen, 3, T, 3, Kc, *out_size, 2)
    _, parts = SetCriterion(Kc)(out, pack_tracks(build_tracks(labels, valid, Kc), out_size))
    _, parts_dense = SetCriterion(Kc)(out, track_batch(labels, valid, Kc, out_size))
    for k in parts:
        assert float(parts_dense[k]) == pytest.approx(float(parts[k]), rel=1e-12, abs=1e-15), k


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["pred_logits", "pred_boxes", "pred_masks"])
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("clip,frame", [(0, 0), (1, 1), (2, 2), (2, 1)])
def test_non_finite_costs_raise_as_the_per_clip_matcher(value, key, layer, clip, frame):
    # clip 1 has no track; frame 1 of clip 2 carries no label: a NaN there reaches no cost
    Kc, T, N, h, w = 5, 3, 3, 4, 4
    gen = torch.Generator().manual_seed(7)
    targets = [random_clip_targets(gen, J, T, h, w, Kc, some_unlabelled=False) for J in (2, 0, 3)]
    drop_frame(targets[2], 1)
    out = random_layers(gen, 3, T, N, Kc, h, w, 3)
    layers = [out] + out["aux_outputs"]
    layers[layer][key][clip, frame, 1] = value  # token 1 of one layer, clip and frame

    def outcome(run):
        try:
            return run()
        except ValueError as e:
            return str(e)

    expected = outcome(lambda: [pairs(PerClipHungarianMatcher()(o, targets)) for o in layers])
    got = outcome(lambda: [pairs(i) for i in run_matcher(layers, targets)[0]])
    assert got == expected
    assert isinstance(got, str) == (clip != 1 and (clip, frame) != (2, 1))  # raised where a cost is hit


@pytest.fixture
def host_waits(monkeypatch):
    """Counts the torch.Tensor calls that make the host wait for a GPU, while `active` is True.

    copies: copies to the host (.cpu(), .to("cpu") without non_blocking); other: reads of values
    (.item(), .tolist(), bool/int/float(tensor), .numpy() of anything but a copy just made) and
    shapes that depend on the data (nonzero, unique, masked_select, boolean-mask indexing).
    """
    log = SimpleNamespace(active=False, copies=0, other=[], host=[])

    def patch(owner, name, kind):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if log.active:
                if kind == "copy":
                    log.copies += 1
                    out = original(*args, **kwargs)
                    log.host.append(out)
                    return out
                if not (kind == "numpy" and any(args[0] is x for x in log.host)):
                    log.other.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapped)

    patch(torch.Tensor, "cpu", "copy")
    patch(torch.Tensor, "numpy", "numpy")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__array__",
                 "nonzero", "unique", "masked_select"):
        patch(torch.Tensor, name, "read")
    for name in ("nonzero", "unique", "masked_select"):
        patch(torch, name, "read")
    to, getitem = torch.Tensor.to, torch.Tensor.__getitem__

    def to_wrapped(t, *args, **kwargs):
        targets = [a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))]
        if log.active and any(torch.device(a).type == "cpu" for a in targets) and not kwargs.get("non_blocking"):
            log.copies += 1
        return to(t, *args, **kwargs)

    def getitem_wrapped(t, index):
        items = index if isinstance(index, tuple) else (index,)
        if log.active and any(torch.is_tensor(i) and i.dtype == torch.bool for i in items):
            log.other.append("boolean mask")
        return getitem(t, index)
    monkeypatch.setattr(torch.Tensor, "to", to_wrapped)
    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem_wrapped)
    return log


def test_the_step_copies_to_the_host_two_tensors_whatever_the_batch(host_waits):
    Kc, T, N, h, w, L, B = 5, 3, 3, 4, 4, 3, 4
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, Kc + 1, (B, T, 4 * h, 4 * w), generator=gen)  # (B, T, H, W)
    labels[1] = 0  # a clip without any track
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, 1] = False
    batch = {"labels": labels, "label_valid": valid, "frames": torch.zeros(B, T, 3, 4 * h, 4 * w)}
    out = random_layers(gen, B, T, N, Kc, h, w, L, torch.float32, requires_grad=True)
    out["quant"], out["indices"] = {"quant_codebook": torch.tensor(0.5)}, {}
    model = SimpleNamespace(cfg=SimpleNamespace(num_classes=Kc))  # forward_loss reads Kc from it

    criterion = SetCriterion(Kc)
    host_waits.active = True  # the forward half of train.py's step, the model's forward left out
    total, parts, _ = train.forward_loss(model, lambda b: out, criterion, batch, False)
    host_waits.active = False
    # the matcher's copies, one each for every clip and layer at once: the cost matrices and which
    # slots hold tracks (the non-finite counts per term only when a cost is not finite); nothing
    # else reads the device
    assert host_waits.copies == 2 and host_waits.other == []

    tracks = build_tracks(labels, valid, Kc)  # (its torch.unique would count)
    packed = pack_tracks(tracks, (h, w))
    host_waits.active = True  # the matcher alone, the oracle's tracks in: the same two copies
    HungarianMatcher()(*stack_layers([out]), packed, 1)
    host_waits.active = False
    assert host_waits.copies == 4 and host_waits.other == []

    # The counter sees the waits of the per-clip reference: a copy per clip and layer, and more.
    host_waits.copies = 0
    host_waits.active = True
    total_ref, parts_ref = PerClipSetCriterion(Kc)(out, tracks)
    host_waits.active = False
    assert host_waits.copies >= B * L  # .cpu() of each cost matrix, plus blocking .to(device)
    assert {"__bool__", "nonzero", "boolean mask"} <= set(host_waits.other)
    assert float(total.detach()) == pytest.approx(float(total_ref.detach()), rel=1e-6)
