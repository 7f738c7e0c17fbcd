"""Matching and losses: ground-truth tracks, the video-level Hungarian matcher and the set criterion.

What this file teaches
----------------------
SQD predicts, for every one of its N semantic tokens and every frame t, a class probability
P_{i,t}, a mask M_{i,t} and a box B_{i,t} (paper §3.4). Training needs to know which token should
explain which sounding object. The paper (§3.5) follows the set-prediction recipe of DETR and
Mask2Former, made video-level as in ReferFormer:
  * the ground truth of a clip is a set of *tracks*: one per class that sounds somewhere in the
    clip, each with a per-frame mask, box, class, and a flag saying whether it sounds in that
    frame (a track is "no object" in the frames where it is silent);
  * one assignment tokens <-> tracks per clip, found by the Hungarian algorithm
    (scipy's linear_sum_assignment) on the matching cost L_match of eq. (10), computed over the
    frames that carry labels, and again for every earlier decoder layer (auxiliary losses);
  * the segmentation loss L_segm is L_match of the matched pairs, plus the "no object" class
    loss of every other token; eq. (8) adds lambda_quant * L_quant (eq. 9, computed in
    quantize.py and passed in here).
The loss pieces are the paper's: sigmoid focal loss (Lin et al. 2017) for classes, focal + Dice
for masks (App. D: lambda_focal 5, lambda_dice 2), L1 + GIoU (Rezatofighi et al. 2019) for
boxes (lambda_L1 5, lambda_giou 2), lambda_cls 2, lambda_com 0.5, lambda_quant 1.

Reading order
-------------
 1. masks_at_resolution, extent_boxes, Tracks, track_batch    label maps (B,T,H,W) -> the tracks
                                                              of a batch, one slot per class
 2. box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou      box algebra (GIoU)
 3. sigmoid_focal_loss, dice_loss                                    the loss functions
 4. pairwise_focal_cost, pairwise_dice_cost                          the same, for all pairs
 5. stack_layers, HungarianMatcher (forward, cost_matrices)   eq. (10), one assignment per clip
                                                              and decoder layer
 6. SetCriterion (forward, losses, total)                     eq. (8): matched losses, auxiliary
                                                              layers, quantization terms

How the work is batched
-----------------------
As in DETR's matcher, the cost of eq. (10) is computed for the whole batch at once: every clip
has one track slot per class (Tracks), the tokens of every decoder layer are stacked into L*N
rows, and the cost matrices go to the host with .cpu(), where scipy solves one small problem
per clip and layer. The losses read the assignment with gathers and masks, all clips and
layers at once.

Shape alphabet
--------------
(the repository's one alphabet: docs/shapes.md)
B clips, T frames, N semantic tokens, Kc foreground classes, H, W label size,
h, w = H/4, W/4 (mask resolution of the predictions), J track slots of a batch (one per class,
J = Kc) or the tracks of one clip, L decoder layers, R = L*N token rows (every layer's tokens),
T_l frames of a clip that carry labels, Px = T*h*w pixels of a clip's volume (the T_l*h*w
labelled ones count), n, m the two sides of a pairwise cost (predicted and target boxes or masks).
Class ids: 0 = background, 1..Kc foreground; class-head logit c-1 is class id c.
"""
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# App. D: "lambda_cls = 2, lambda_L1 = 5, lambda_giou = 2, lambda_dice = 2, lambda_focal = 5".
PAPER_LOSS_WEIGHTS = {
    "loss_class": 2.0,  # lambda_cls, sigmoid focal class loss
    "loss_bbox": 5.0,  # lambda_L1
    "loss_giou": 2.0,  # lambda_giou
    "loss_mask": 5.0,  # lambda_focal, focal loss on mask pixels
    "loss_dice": 2.0,  # lambda_dice
}


# ----------------------------------------------------------------------------------------------
# 1. Ground truth as tracks
# ----------------------------------------------------------------------------------------------
def masks_at_resolution(masks, size):
    """Bring 0/1 masks (or a label map) from the label size (H, W) to the mask-head size (h, w).

    Args:
        masks: (J, T, H, W) float 0/1, or (B, T, H, W) float class ids.
        size: (h, w).
    Returns:
        masks: (J, T, h, w) (or (B, T, h, w)), values kept (the input itself when already at (h, w)).
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    # PAPER: the paper does not say how GT masks meet the stride-4 predictions. We keep the
    # centre pixel of every 4x4 cell, i.e. CondInst's and ReferFormer's [2::4, 2::4]
    # subsampling (the centres line up with the mask-head pixel centres and targets stay 0/1,
    # which the pairwise focal cost needs); 'nearest-exact' is that subsampling for any size.
    return F.interpolate(masks, size=tuple(size), mode="nearest-exact")  # (J, T, h, w)


def extent_boxes(rows, cols):
    """Tight boxes around masks, normalised cxcywh, from the rows and columns each mask occupies.

    Args:
        rows: (..., H) bool, row y holds a pixel of the mask; cols: (..., W) bool, the same for columns.
    Returns:
        boxes: (..., 4) float32 (cx, cy, w, h) in [0, 1]; all zeros where no row is occupied.
    """
    H, W = rows.shape[-1], cols.shape[-1]
    ys = torch.arange(H, device=rows.device)  # (H,)
    xs = torch.arange(W, device=cols.device)  # (W,)
    y0 = torch.where(rows, ys, H).amin(dim=-1)  # (...,) first occupied row
    y1 = torch.where(rows, ys, -1).amax(dim=-1) + 1  # (...,) one past the last occupied row
    x0 = torch.where(cols, xs, W).amin(dim=-1)  # (...,)
    x1 = torch.where(cols, xs, -1).amax(dim=-1) + 1  # (...,)
    # PAPER: boxes run along pixel edges (a mask covering pixel columns x0..x1-1 gives the box
    # [x0, x1] / W), so a one-pixel object has a box of width 1/W instead of 0 (GIoU stays
    # defined) and [0, 1] spans the whole image, the convention of the relative coordinates
    # of the dynamic mask head (pixel centre (j + 0.5) / w).
    xyxy = torch.stack([x0 / W, y0 / H, x1 / W, y1 / H], dim=-1).float()  # (..., 4)
    boxes = box_xyxy_to_cxcywh(xyxy)  # (..., 4)
    return torch.where(rows.any(dim=-1)[..., None], boxes, torch.zeros_like(boxes))  # (..., 4)


class Tracks(NamedTuple):
    """The ground-truth tracks of a batch as padded tensors: what the matcher and the losses read.

    Slot j of clip b holds a track when real[b, j]. track_batch gives every foreground class a
    slot (slot c-1 holds class c); the classes that do not sound in the clip are not real: they
    have empty masks and zero boxes, never sound and are never matched.
    """
    classes: torch.Tensor  # (B, J) int64 class ids in 1..Kc (a valid id in every slot)
    masks: torch.Tensor  # (B, J, T, h, w) float 0/1 at the predictions' mask resolution
    boxes: torch.Tensor  # (B, J, T, 4) cxcywh in [0, 1], zeros where the mask is empty
    sounding: torch.Tensor  # (B, J, T) bool, the track sounds in that labelled frame
    label_valid: torch.Tensor  # (B, T) bool, the frame carries ground truth
    real: torch.Tensor  # (B, J) bool, the slot holds a track


def track_batch(labels, label_valid, num_classes, size):
    """Turn per-frame label maps into the ground-truth tracks y_hat_j of eq. (10), for a whole batch.

    One track per foreground class present in a clip's labelled frames (AVSS labels carry no
    instance ids, so "the j-th sounding object" of the paper is the j-th sounding class). Every
    clip gets one slot per class (slot c-1 holds class c), and `real` says which classes sound in
    the clip's labelled frames, i.e. are its tracks; so every shape is known before the labels
    are read, and the whole batch is built at once.

    Args:
        labels: (B, T, H, W) int64 class ids, 0 = background, 1..Kc foreground; ids outside
            1..Kc (e.g. an ignore value 255) make no track.
        label_valid: (B, T) bool, True where the frame carries ground truth.
        num_classes: Kc.
        size: (h, w), the mask resolution of the predictions.
    Returns:
        Tracks with J = Kc slots; masks are zero in unlabelled frames, boxes are those of the
        masks at label resolution (H, W).
    """
    # PAPER: "the j-th sounding object" of §3.5; label maps carry no instance ids, so a track is
    # one sounding class over the clip (two objects of one class share a track).
    B, T, H, W = labels.shape
    Kc = num_classes
    valid = label_valid.bool()  # (B, T)
    ids = torch.where(valid[:, :, None, None] & (labels >= 1) & (labels <= Kc), labels, 0)  # (B, T, H, W) 0: no track
    # The rows and columns each class occupies in each frame, by a scatter over the class axis
    # (slot 0 collects background), so that no (B, Kc, T, H, W) mask is ever made.
    rows = torch.zeros(B, T, H, Kc + 1, dtype=torch.bool, device=labels.device)  # (B, T, H, Kc+1)
    rows = rows.scatter_(3, ids, True)[..., 1:].permute(0, 3, 1, 2)  # (B, Kc, T, H) row y holds class c
    cols = torch.zeros(B, T, W, Kc + 1, dtype=torch.bool, device=labels.device)  # (B, T, W, Kc+1)
    cols = cols.scatter_(3, ids.transpose(2, 3), True)[..., 1:].permute(0, 3, 1, 2)  # (B, Kc, T, W)
    sounding = rows.any(dim=-1)  # (B, Kc, T) the class has a pixel in that labelled frame
    # Masks at the prediction resolution: the label map subsampled as masks_at_resolution
    # subsamples every class mask, then compared with each class.
    small = masks_at_resolution(ids.float(), size).long()  # (B, T, h, w)
    classes = torch.arange(1, Kc + 1, device=labels.device)  # (Kc,)
    return Tracks(
        classes=classes.expand(B, Kc),  # (B, Kc)
        masks=(small[:, None] == classes[None, :, None, None, None]).float(),  # (B, Kc, T, h, w)
        boxes=extent_boxes(rows, cols),  # (B, Kc, T, 4)
        sounding=sounding,  # (B, Kc, T)
        label_valid=valid,  # (B, T)
        real=sounding.any(dim=-1),  # (B, Kc)
    )


# ----------------------------------------------------------------------------------------------
# 2. Boxes
# ----------------------------------------------------------------------------------------------
def box_cxcywh_to_xyxy(boxes):
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)  # 4 x (...,)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (..., 4)


def box_xyxy_to_cxcywh(boxes):
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)  # 4 x (...,)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)  # (..., 4)


def generalized_box_iou(a, b, eps=1e-9):
    """Generalized IoU (Rezatofighi et al. 2019) of every box of a with every box of b.

    GIoU = IoU - |C minus (a union b)| / |C|, with C the smallest box enclosing a and b.

    Args:
        a: (..., n, 4) boxes x0, y0, x1, y1 (x1 >= x0, y1 >= y0).
        b: (..., m, 4) same format; leading dims broadcast with a's.
        eps: floor on the union and enclosing areas (two empty boxes give 0, not NaN).
    Returns:
        giou: (..., n, m) in [-1, 1].
    """
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])  # (..., n)
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # (..., m)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])  # (..., n, m, 2)
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])  # (..., n, m, 2)
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (..., n, m)
    union = (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=eps)  # (..., n, m)
    iou = inter / union  # (..., n, m)
    lt_c = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])  # (..., n, m, 2)
    rb_c = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])  # (..., n, m, 2)
    enclosing = (rb_c - lt_c).clamp(min=0).prod(dim=-1).clamp(min=eps)  # (..., n, m)
    return iou - (enclosing - union) / enclosing  # (..., n, m)


# ----------------------------------------------------------------------------------------------
# 3. Loss functions (per element / per mask) and 4. their pairwise forms for the matcher
# ----------------------------------------------------------------------------------------------
def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss (Lin et al. 2017), element-wise, no reduction.

    FL = -alpha_t * (1 - p_t)^gamma * log(p_t), with p = sigmoid(x), p_t = p if t = 1 else 1 - p,
    alpha_t = alpha if t = 1 else 1 - alpha (soft targets interpolate linearly).

    Args:
        logits: (...) any shape.
        targets: (...) same shape, in [0, 1].
    Returns:
        loss: (...) same shape.
    """
    # PAPER: alpha and gamma are not given; 0.25 and 2 are the defaults of Lin et al. 2017.
    prob = logits.sigmoid()  # (...)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (...) -log(p_t)
    p_t = prob * targets + (1 - prob) * (1 - targets)  # (...)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)  # (...)
    return alpha_t * (1 - p_t) ** gamma * ce  # (...)


def dice_loss(logits, targets, valid=None):
    """Dice loss (Milletari et al. 2016; Li et al. 2019) with +1 smoothing, as in DETR.

    dice = 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(x), sums over the pixels.

    Args:
        logits: (..., Px) mask logits, one mask per row.
        targets: (..., Px) 0/1 masks.
        valid: optional (..., Px) bool (broadcast), the pixels that count; default all.
    Returns:
        loss: (...)
    """
    # PAPER: the smoothing constant is not given; +1 as DETR.
    prob = logits.sigmoid()  # (..., Px)
    if valid is not None:
        prob = torch.where(valid, prob, 0.0)  # (..., Px) pixels outside the labelled volume: nothing
        targets = torch.where(valid, targets, 0.0)  # (..., Px)
    numerator = 2 * (prob * targets).sum(dim=-1) + 1  # (...)
    denominator = prob.sum(dim=-1) + targets.sum(dim=-1) + 1  # (...)
    return 1 - numerator / denominator  # (...)


def pairwise_focal_cost(logits, targets, valid=None, alpha=0.25, gamma=2.0):
    """Mean sigmoid focal loss of every predicted mask against every 0/1 target mask.

    Because the target is 0 or 1, FL(x, t) = t * FL(x, 1) + (1 - t) * FL(x, 0), so all pairs
    come from two matrix products instead of an (n, m, Px) tensor (as ReferFormer/Mask2Former).

    Args:
        logits: (..., n, Px) predicted mask logits.
        targets: (..., m, Px) 0/1 target masks; leading dims broadcast with logits'.
        valid: optional (..., 1, Px) bool, the pixels that count (the mean is over them); default all.
    Returns:
        cost: (..., n, m), cost[i, j] = mean over counted p of FL(logits[i, p], targets[j, p]).
    """
    loss_pos = sigmoid_focal_loss(logits, torch.ones_like(logits), alpha, gamma)  # (..., n, Px)
    loss_neg = sigmoid_focal_loss(logits, torch.zeros_like(logits), alpha, gamma)  # (..., n, Px)
    count = logits.shape[-1]
    if valid is not None:
        loss_pos = torch.where(valid, loss_pos, 0.0)  # (..., n, Px)
        loss_neg = torch.where(valid, loss_neg, 0.0)  # (..., n, Px)
        count = valid.sum(dim=-1, keepdim=True).clamp(min=1)  # (..., 1, 1)
    cost = loss_pos @ targets.transpose(-1, -2) + loss_neg @ (1 - targets).transpose(-1, -2)  # (..., n, m)
    return cost / count  # (..., n, m)


def pairwise_dice_cost(logits, targets, valid=None):
    """Dice loss of every predicted mask against every target mask.

    Args:
        logits: (..., n, Px) predicted mask logits.
        targets: (..., m, Px) 0/1 target masks; leading dims broadcast with logits'.
        valid: optional (..., 1, Px) bool, the pixels that count; default all.
    Returns:
        cost: (..., n, m), cost[i, j] = dice_loss(logits[i], targets[j], valid).
    """
    prob = logits.sigmoid()  # (..., n, Px)
    if valid is not None:
        prob = torch.where(valid, prob, 0.0)  # (..., n, Px)
        targets = torch.where(valid, targets, 0.0)  # (..., m, Px)
    numerator = 2 * prob @ targets.transpose(-1, -2) + 1  # (..., n, m)
    denominator = prob.sum(dim=-1)[..., :, None] + targets.sum(dim=-1)[..., None, :] + 1  # (..., n, m)
    return 1 - numerator / denominator  # (..., n, m)



# ----------------------------------------------------------------------------------------------
# 5. The video-level Hungarian matcher, eq. (10)
# ----------------------------------------------------------------------------------------------
def stack_layers(layers):
    """The outputs of L decoder layers as L*N token rows, layer-major (row l*N + i: token i of layer l).

    Args:
        layers: list of L dicts with "pred_logits" (B, T, N, Kc), "pred_masks" (B, T, N, h, w),
            "pred_boxes" (B, T, N, 4).
    Returns:
        logits (B, T, R, Kc), masks (B, T, R, h, w), boxes (B, T, R, 4), R = L*N.
    """
    def rows(key):
        return torch.cat([layer[key] for layer in layers], dim=2)  # (B, T, R, ...)
    return rows("pred_logits"), rows("pred_masks"), rows("pred_boxes")


# The five terms of eq. (10), in the order in which a non-finite one is reported.
COST_TERMS = ("cost_class", "cost_bbox", "cost_giou", "cost_mask", "cost_dice")


class HungarianMatcher(nn.Module):
    """One assignment tokens <-> ground-truth tracks per clip (paper eq. 10, Hungarian algorithm).

    A token i is matched to a track j for the whole clip, as in ReferFormer: token i in every
    frame explains track j. The cost of the pair is eq. (10) with the App. D weights,

        C[i, j] = w_class * cost_class + w_bbox * cost_bbox + w_giou * cost_giou
                + w_mask * cost_mask + w_dice * cost_dice,

    each term computed only over the frames that carry labels:
      * cost_class: focal cost of Deformable-DETR, FL(x, 1) - FL(x, 0) on the track's class logit,
        summed over the frames where the track sounds and divided by T_l (a silent frame adds 0:
        its target is "no object" whichever token takes the track);
      * cost_bbox, cost_giou: L1 and 1 - GIoU of the boxes, averaged over the sounding frames
        (the only frames with a box);
      * cost_mask, cost_dice: focal and Dice on the clip's labelled volume (T_l, h, w), as
        ReferFormer, so a token is also asked to be empty where its track is silent.
    Each term is thus the increase of the corresponding loss of SetCriterion if token i takes
    track j (up to constants), so matching and loss agree.

    `forward` does every clip and decoder layer at once: the costs of all L*N token rows against
    all track slots on the device, copied to the host with .cpu(), then scipy per clip and layer.
    """

    def __init__(self, cost_class=2.0, cost_mask=5.0, cost_dice=2.0, cost_bbox=5.0, cost_giou=2.0):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, layers, targets):
        """
        Args:
            layers: list of L output dicts, the final decoder layer first, then the others, each with
                "pred_logits": (B, T, N, Kc) class logits,
                "pred_masks":  (B, T, N, h, w) mask logits,
                "pred_boxes":  (B, T, N, 4) boxes cxcywh in [0, 1].
            targets: Tracks at the predictions' mask size (track_batch).
        Returns:
            assignment: (B, L*N) int64 on the predictions' device; row l*N + i holds the slot of
                `targets` that token i of layer l is matched to, -1 if none. In every clip and
                layer min(N, J) tokens are matched, J the clip's tracks.
        Raises:
            ValueError naming the term and the clip when a cost term has a non-finite entry
            (scipy would fail obscurely), layers in the order given, clips in order.
        """
        logits, masks, boxes = stack_layers(layers)  # (B, T, R, Kc), (B, T, R, h, w), (B, T, R, 4)
        B, R, L = logits.shape[0], logits.shape[2], len(layers)
        N, J = R // L, targets.classes.shape[1]
        # Costs in full precision even inside an AMP region (matmuls would otherwise run in half).
        with torch.autocast(device_type=logits.device.type, enabled=False):
            cost, terms = self.cost_matrices(logits, masks, boxes, targets)  # (B, R, J), 5 x (B, R, J)
        real = targets.real[:, None, :]  # (B, 1, J)
        bad = torch.stack([(~torch.isfinite(term) & real).reshape(B, L, N * J).sum(dim=-1)
                           for term in terms], dim=-1).cpu().numpy()  # (B, L, 5) non-finite entries per term
        for layer in range(L):
            for b in range(B):
                for k, name in enumerate(COST_TERMS):
                    if bad[b, layer, k] > 0:
                        raise ValueError(
                            f"HungarianMatcher: cost term '{name}' has {int(bad[b, layer, k])} "
                            f"non-finite entries in clip {b}; the predictions feeding it contain NaN "
                            f"or inf (check the loss scale, lr, AMP).")

        # As DETR: scipy runs on the host, so the batch's cost matrices go there in one copy and
        # are split per clip and layer.
        cost = cost.cpu().numpy()  # (B, R, J)
        is_track = targets.real.cpu().numpy()  # (B, J)
        assignment = np.full((B, R), -1, dtype=np.int64)  # (B, R)
        for b in range(B):
            slots = np.flatnonzero(is_track[b])  # (J,) the clip's tracks, in class order
            for layer in range(L):
                block = cost[b, layer * N:(layer + 1) * N][:, slots]  # (N, J) the clip's tracks only
                pred_idx, tgt_idx = linear_sum_assignment(block)  # Hungarian (Kuhn 1955)
                assignment[b, layer * N + pred_idx] = slots[tgt_idx]
        return torch.as_tensor(assignment, device=logits.device)  # (B, R)

    def cost_matrices(self, logits, masks, boxes, targets):
        """The eq. (10) cost of every token row against every track slot of its clip.

        Args:
            logits: (B, T, R, Kc); masks: (B, T, R, h, w); boxes: (B, T, R, 4) cxcywh.
            targets: Tracks with masks at (h, w).
        Returns:
            cost: (B, R, J) float, and the five unweighted terms, each (B, R, J), in COST_TERMS
            order. Slots that hold no track get a cost as well; forward ignores them.
        """
        B, T, R = logits.shape[:3]
        J = targets.classes.shape[1]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # no half-precision costs
        valid = targets.label_valid  # (B, T)
        sounding = targets.sounding & valid[:, None]  # (B, J, T)
        sounds = sounding.transpose(1, 2)[:, :, None, :]  # (B, T, 1, J)
        num_labelled = valid.sum(dim=1).clamp(min=1)[:, None, None]  # (B, 1, 1) T_l
        num_sounding = sounding.sum(dim=2).clamp(min=1)[:, None, :]  # (B, 1, J)

        # Class term: focal cost on the track's class logit, frames where it sounds.
        # PAPER: eq. (10) names the terms, not their video form. As ReferFormer we average over
        # frames; a frame where the track is silent has target "no object" whoever takes the
        # track, so it adds 0, and we divide by all labelled frames T_l so the cost is the exact
        # change of loss_class (Deformable-DETR's FL(x,1) - FL(x,0), here without its 1e-8 eps).
        class_idx = (targets.classes - 1)[:, None, None, :].expand(B, T, R, J)  # (B, T, R, J)
        x = logits.to(dtype).gather(3, class_idx)  # (B, T, R, J) logit of each track's class
        focal_gain = sigmoid_focal_loss(x, torch.ones_like(x)) - sigmoid_focal_loss(x, torch.zeros_like(x))  # (B, T, R, J)
        focal_gain = torch.where(sounds, focal_gain, torch.zeros_like(focal_gain))  # (B, T, R, J)
        cost_class = focal_gain.sum(dim=1) / num_labelled  # (B, R, J)

        # Box terms: L1 and 1 - GIoU, averaged over the frames where the track sounds.
        pred_boxes = boxes.to(dtype)  # (B, T, R, 4)
        tgt_boxes = targets.boxes.to(dtype).transpose(1, 2)  # (B, T, J, 4)
        l1 = (pred_boxes[:, :, :, None, :] - tgt_boxes[:, :, None, :, :]).abs().sum(dim=-1)  # (B, T, R, J)
        l1 = torch.where(sounds, l1, torch.zeros_like(l1))  # (B, T, R, J)
        cost_bbox = l1.sum(dim=1) / num_sounding  # (B, R, J)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))  # (B, T, R, J)
        giou_loss = torch.where(sounds, 1 - giou, torch.zeros_like(giou))  # (B, T, R, J)
        cost_giou = giou_loss.sum(dim=1) / num_sounding  # (B, R, J)

        # Mask terms on the labelled volume (T_l, h, w).
        # PAPER: §3.5 says "Dice and BCE", App. D gives lambda_focal = 5 and lambda_dice = 2; we
        # use focal + Dice (as ReferFormer) on the whole labelled volume, not per frame, so a
        # silent frame asks the matched token for an empty mask.
        h, w = masks.shape[-2:]
        pred_masks = masks.to(dtype).transpose(1, 2).flatten(2)  # (B, R, Px)
        tgt_masks = targets.masks.to(dtype).flatten(2)  # (B, J, Px)
        pixels = valid[:, None, :, None, None].expand(B, 1, T, h, w).flatten(2)  # (B, 1, Px) labelled pixels
        cost_mask = pairwise_focal_cost(pred_masks, tgt_masks, pixels)  # (B, R, J)
        cost_dice = pairwise_dice_cost(pred_masks, tgt_masks, pixels)  # (B, R, J)

        # eq. (10): L_match = lambda_box L_box + lambda_cls L_cls + lambda_mask L_mask
        cost = (self.cost_bbox * cost_bbox + self.cost_giou * cost_giou + self.cost_class * cost_class
                + self.cost_mask * cost_mask + self.cost_dice * cost_dice)  # (B, R, J)
        return cost, (cost_class, cost_bbox, cost_giou, cost_mask, cost_dice)


# ----------------------------------------------------------------------------------------------
# 6. The set criterion, eq. (8)
# ----------------------------------------------------------------------------------------------
class SetCriterion(nn.Module):
    """The training loss of eq. (8): L = lambda_quant * L_quant + L_segm.

    For every decoder layer (the last one and, with aux_loss, each earlier one as in DETR and
    ReferFormer, with an assignment of its own per layer), the tokens are matched to the tracks and
      * loss_class: sigmoid focal loss on every token's Kc logits in every labelled frame; the
        target is the track's class where the matched track sounds and all zeros elsewhere
        (unmatched tokens, silent frames: "no object");
      * loss_mask, loss_dice: focal and Dice loss of each matched token's masks against its
        track on the clip's labelled volume;
      * loss_bbox, loss_giou: L1 and 1 - GIoU of each matched token's box, on the frames where
        its track sounds.
    Frames with label_valid False contribute nothing. Every term is normalised by the number
    of ground-truth tracks in the batch (at least 1), as DETR normalises by the number of boxes.
    The unweighted eq. (9) terms come in outputs["quant"] and are weighted here.

    `weight_dict` maps every term to its weight; an auxiliary layer's term (suffix _0 .. _{L-2})
    has the weight of its base term, and total == sum(weight(k) * parts[k]).

    forward = the matcher (every layer's assignment) + losses (all layers and clips at once);
    losses also takes an assignment fixed in advance (tools/pretrain_visual.py).
    """

    def __init__(self, num_classes, matcher=None, weights=None, lambda_quant=1.0, lambda_com=0.5, aux_loss=True):
        """
        Args:
            num_classes: Kc.
            matcher: a HungarianMatcher; by default one whose cost weights are the loss weights
                (eq. 10 uses the same lambdas to match and to train).
            weights: dict overriding PAPER_LOSS_WEIGHTS (keys loss_class, loss_bbox, loss_giou,
                loss_mask, loss_dice).
            lambda_quant, lambda_com: the weights of eq. (8) and eq. (9).
            aux_loss: add the losses of every earlier decoder layer (outputs["aux_outputs"]).
        """
        super().__init__()
        self.num_classes = num_classes
        self.weights = dict(PAPER_LOSS_WEIGHTS, **(weights or {}))
        if matcher is None:
            # PAPER: App. D gives one set of lambdas; we use them both for the matching cost
            # (eq. 10) and for the loss (L_segm), as DETR-family code does.
            matcher = HungarianMatcher(
                cost_class=self.weights["loss_class"], cost_mask=self.weights["loss_mask"],
                cost_dice=self.weights["loss_dice"], cost_bbox=self.weights["loss_bbox"],
                cost_giou=self.weights["loss_giou"],
            )
        self.matcher = matcher
        self.lambda_quant = lambda_quant
        self.lambda_com = lambda_com
        self.aux_loss = aux_loss
        self.weight_dict = dict(self.weights)
        self.weight_dict["quant_codebook"] = lambda_quant  # eq. (8) x eq. (9) first term
        self.weight_dict["quant_commit_global"] = lambda_quant * lambda_com  # eq. (9) second term
        self.weight_dict["quant_commit_local"] = lambda_quant * lambda_com  # eq. (9) third term
        # NOT IN PAPER: the codebook term of a local path that trains its own codebook (Table 2's
        # row without SC), weighted as eq. (9)'s codebook term.
        self.weight_dict["quant_codebook_local"] = lambda_quant

    def forward(self, outputs, targets):
        """
        Args:
            outputs: dict with
                "pred_logits": (B, T, N, Kc), "pred_masks": (B, T, N, h, w), "pred_boxes": (B, T, N, 4);
                optional "aux_outputs": list of L-1 dicts with the same three keys (earlier layers);
                optional "quant": dict name -> scalar tensor, the unweighted eq. (9) terms
                (quant_codebook, quant_commit_global, quant_commit_local, quant_codebook_local).
            targets: Tracks at the predictions' mask size (h, w) (track_batch).
        Returns:
            total: scalar, eq. (8).
            parts: dict name -> unweighted scalar: loss_class, loss_mask, loss_dice, loss_bbox,
                loss_giou, the same with suffix _l for aux layer l, and every quant_* term.
        """
        assignment = self.matcher(self.layers(outputs), targets)  # (B, L*N) eq. (10)
        return self.losses(outputs, targets, assignment)

    def layers(self, outputs):
        """The decoder layers that get a loss: the final one, then the earlier ones in order."""
        # NOT IN PAPER: auxiliary losses on every earlier decoder layer are not in the paper; on by
        # default, as DETR and ReferFormer (aux_loss=False switches them off).
        return [outputs] + (list(outputs.get("aux_outputs", [])) if self.aux_loss else [])

    def losses(self, outputs, targets, assignment):
        """Eq. (8) for the matched tokens of every decoder layer, all layers and clips at once.

        Args:
            outputs: as forward; targets: Tracks as forward; assignment: (B, L*N) int64 as
                HungarianMatcher returns it (row l*N + i: the slot of token i of layer l, -1 if none).
        Returns:
            total, parts: as forward.
        """
        layers = self.layers(outputs)
        logits, pred_masks, pred_boxes = stack_layers(layers)  # (B, T, R, Kc), (B, T, R, h, w), (B, T, R, 4)
        B, T, R, Kc = logits.shape
        L = len(layers)
        N = R // L
        h, w = pred_masks.shape[-2:]
        dtype = torch.promote_types(logits.dtype, torch.float32)

        # PAPER: the paper does not give the normaliser; as DETR divides by the number of boxes,
        # we divide every term by the number of ground-truth tracks in the batch (at least 1).
        num_tracks = targets.real.sum().to(dtype)  # ()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # As DETR: normalise by the mean number of tracks per GPU, so every rank agrees.
            torch.distributed.all_reduce(num_tracks)
            num_tracks = num_tracks / torch.distributed.get_world_size()
        num_tracks = num_tracks.clamp(min=1)  # ()

        matched = assignment >= 0  # (B, R) the token row has a track
        slot = assignment.clamp(min=0)  # (B, R) its slot (any slot when unmatched: masked below)
        clip = torch.arange(B, device=logits.device)[:, None]  # (B, 1)
        valid = targets.label_valid  # (B, T)
        sounding = (targets.sounding & valid[:, None])[clip, slot] & matched[..., None]  # (B, R, T)

        def per_layer(loss):  # (B, R) loss of each token row -> (L,) summed over clips and matched tokens
            return torch.where(matched, loss, 0.0).reshape(B, L, N).sum(dim=(0, 2))

        def zero_per_layer(x):  # (B, T, R, ...) -> (L,) zeros tied to the graph, so that a batch
            # without any track still gives defined (zero) losses and gradients
            return x.reshape(B, T, L, -1).sum(dim=(0, 1, 3)) * 0.0

        # Class loss: one-hot target where a matched track sounds, all zeros everywhere else.
        class_ids = torch.arange(1, Kc + 1, device=logits.device)  # (Kc,)
        one_hot = (targets.classes[clip, slot][..., None] == class_ids).to(dtype)  # (B, R, Kc) the slot's class
        target_classes = one_hot[:, None] * sounding.transpose(1, 2)[..., None]  # (B, T, R, Kc)
        focal = sigmoid_focal_loss(logits.to(dtype), target_classes)  # (B, T, R, Kc)
        focal = focal.reshape(B, T, L, N * Kc).sum(dim=-1)  # (B, T, L)
        focal = torch.where(valid[..., None], focal, torch.zeros_like(focal))  # (B, T, L) unlabelled frames: nothing
        # PAPER: the paper does not say how the class loss is normalised; per clip we average over
        # the labelled frames (the video form of Deformable-DETR's sum / number of boxes) so that
        # it is the sum over tracks of cost_class in HungarianMatcher, plus the no-object terms.
        loss_class = (focal.sum(dim=1) / valid.sum(dim=1).clamp(min=1)[:, None]).sum(dim=0) / num_tracks  # (L,)

        # Mask losses of the matched pairs on the clip's labelled volume.
        src = pred_masks.to(dtype).transpose(1, 2).flatten(2)  # (B, R, Px)
        tgt = targets.masks[clip, slot].to(dtype).flatten(2)  # (B, R, Px) the matched track's masks
        pixels = valid[:, None, :, None, None].expand(B, 1, T, h, w).flatten(2)  # (B, 1, Px) labelled pixels
        num_pixels = pixels.sum(dim=-1).clamp(min=1)  # (B, 1) T_l*h*w
        focal = torch.where(pixels, sigmoid_focal_loss(src, tgt), 0.0).sum(dim=-1) / num_pixels  # (B, R) focal, mean over volume
        loss_mask = zero_per_layer(pred_masks) + per_layer(focal)  # (L,)
        loss_dice = zero_per_layer(pred_masks) + per_layer(dice_loss(src, tgt, pixels))  # (L,)

        # Box losses of the matched pairs on the frames where the track sounds.
        num_sounding = sounding.sum(dim=2).clamp(min=1)  # (B, R)
        src_boxes = pred_boxes.to(dtype).transpose(1, 2)  # (B, R, T, 4)
        tgt_boxes = targets.boxes[clip, slot].to(dtype)  # (B, R, T, 4)
        l1 = (src_boxes - tgt_boxes).abs().sum(dim=-1)  # (B, R, T)
        l1 = torch.where(sounding, l1, torch.zeros_like(l1))  # (B, R, T) only where it sounds
        loss_bbox = zero_per_layer(pred_boxes) + per_layer(l1.sum(dim=2) / num_sounding)  # (L,)
        giou = generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes)[..., None, :], box_cxcywh_to_xyxy(tgt_boxes)[..., None, :]
        )[..., 0, 0]  # (B, R, T) GIoU of each frame's pair
        giou_loss = torch.where(sounding, 1 - giou, torch.zeros_like(giou))  # (B, R, T)
        loss_giou = zero_per_layer(pred_boxes) + per_layer(giou_loss.sum(dim=2) / num_sounding)  # (L,)

        per_term = {"loss_class": loss_class, "loss_mask": loss_mask / num_tracks,
                    "loss_dice": loss_dice / num_tracks, "loss_bbox": loss_bbox / num_tracks,
                    "loss_giou": loss_giou / num_tracks}  # name -> (L,)
        parts = {}
        for layer in range(L):
            suffix = "" if layer == 0 else f"_{layer - 1}"
            parts.update({name + suffix: value[layer] for name, value in per_term.items()})
        parts.update(outputs.get("quant", {}))  # the unweighted eq. (9) terms

        return self.total(parts), parts

    def total(self, parts):
        """Eq. (8): L = L_segm + lambda_quant * L_quant, with L_quant = eq. (9) (lambda_com inside),
        the weighted sum of the unweighted parts; an auxiliary layer's term "loss_dice_0" has the
        weight of "loss_dice". Returns a scalar tensor."""
        return sum(self.weight_dict[name if name in self.weight_dict else name.rsplit("_", 1)[0]] * value
                   for name, value in parts.items())  # ()
