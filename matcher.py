"""Matching and losses: ground-truth tracks, the video-level Hungarian matcher and the set criterion.

What this file teaches
SQD predicts, for each of its N semantic tokens and every frame t, a class probability P_{i,t},
a mask M_{i,t} and a box B_{i,t} (paper §3.4). Training must decide which token explains which
sounding object; §3.5 follows the set prediction of DETR and Mask2Former, made video-level as
in ReferFormer:
  * the ground truth of a clip is a set of tracks, one per class that sounds somewhere in the
    clip, each with a per-frame mask and box and a flag saying whether it sounds in that frame
    (a track is "no object" in the frames where it is silent);
  * one assignment tokens <-> tracks per clip and decoder layer, by the Hungarian algorithm
    (scipy's linear_sum_assignment) on the matching cost L_match of eq. (10), computed over the
    frames that carry labels;
  * L_segm is L_match of the matched pairs plus the "no object" class loss of every other
    token; eq. (8) adds lambda_quant * L_quant (eq. 9, computed in quantize.py).
Sigmoid focal loss (Lin et al. 2017) for classes, focal + Dice for masks, L1 + GIoU for boxes,
weighted by App. D's lambdas (PAPER_LOSS_WEIGHTS; lambda_com 0.5 and lambda_quant 1: SetCriterion).

The normalisers, in one place: within a clip, a class term is a mean over its labelled frames
T_l, a mask term a mean over its labelled volume (T_l*h*w pixels), a box term a mean over the
frames where the track sounds; the loss sums each term over clips and matched tokens (the class
term over every token: "no object" counts) and divides it by the batch's tracks, as DETR divides
by its boxes. The matching cost of eq. (10) uses the same per-clip means, without the division.

As DETR's matcher, everything is done for the whole batch at once: every clip has one track
slot per class (Tracks), the tokens of all decoder layers are stacked into R = L*N rows, the
costs of all rows against all slots go to the host with .cpu(), scipy solves one small problem
per clip and layer, and the losses read the assignment with gathers.

Reading order (the box formats, GIoU and a mask's box: boxes.py)
 1. track_batch (masks_at_resolution, Tracks)                    label maps -> the batch's tracks
 2. sigmoid_focal_loss, dice_loss, then pairwise_focal_cost, pairwise_dice_cost (every pair)
 3. stack_layers, HungarianMatcher (forward, cost_matrices)      eq. (10); COST_TERMS names its terms
 4. SetCriterion (forward, losses, total)                        eq. (8)

Shapes (the repository's one alphabet: docs/shapes.md)
B clips, T frames, N tokens, Kc foreground classes, H, W image (and label) size, h, w = H/4, W/4 the mask
size of the predictions, J track slots of a batch (Kc from track_batch), L decoder layers,
R = L*N token rows, T_l frames of a clip that carry labels, Px = T*h*w pixels of a clip's volume
(its T_l*h*w labelled ones count), n, m the two sides of a pairwise cost.
Class ids: 0 = background, 1..Kc foreground; class-head logit c-1 is class id c.
"""
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from boxes import box_cxcywh_to_xyxy, extent_boxes, generalized_box_iou

# App. D: "lambda_cls = 2, lambda_L1 = 5, lambda_giou = 2, lambda_dice = 2, lambda_focal = 5".
# NOT IN PAPER: §3.5 says Dice + BCE for the masks, App. D weighs a lambda_focal; read as a focal
# mask loss, as ReferFormer (docs/paper-silent.md#focal-not-bce-mask-loss).
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
class Tracks(NamedTuple):
    """The ground-truth tracks of a batch as padded tensors: what the matcher and the losses read.
    Slot j of clip b holds a track when real[b, j]; the other slots have empty masks and zero
    boxes, never sound and are never matched."""
    classes: torch.Tensor  # (B, J) int64 class ids in 1..Kc (a valid id in every slot)
    masks: torch.Tensor  # (B, J, T, h, w) float 0/1 at the predictions' mask resolution
    boxes: torch.Tensor  # (B, J, T, 4) cxcywh in [0, 1], zeros where the mask is empty
    sounding: torch.Tensor  # (B, J, T) bool, the track sounds in that labelled frame
    label_valid: torch.Tensor  # (B, T) bool, the frame carries ground truth
    real: torch.Tensor  # (B, J) bool, the slot holds a track


def track_batch(labels, label_valid, num_classes, size):
    """Turn per-frame label maps into the ground-truth tracks y_hat_j of eq. (10): Tracks, J = Kc.

    labels (B, T, H, W) holds class ids (other ids than 1..Kc, e.g. an ignore value 255, make no
    track), label_valid (B, T) the frames that carry ground truth, num_classes Kc, size the
    predictions' mask resolution (h, w). A track is a foreground class present in a clip's labelled
    frames. Every clip gets one slot per class (slot c-1 holds class c) and `real` marks the classes
    that are its tracks, so every shape is known before the labels are read. Masks are zero in
    unlabelled frames; boxes are those of the masks at (H, W).
    """
    # PAPER: "the j-th sounding object" of §3.5; AVSS label maps carry no instance ids, so a track
    # is one sounding class over the clip (two objects of one class share a track).
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
    small = masks_at_resolution(ids.float(), size).long()  # (B, T, h, w) the label map at mask size
    classes = torch.arange(1, Kc + 1, device=labels.device)  # (Kc,)
    return Tracks(
        classes=classes.expand(B, Kc),  # (B, Kc)
        masks=(small[:, None] == classes[None, :, None, None, None]).float(),  # (B, Kc, T, h, w)
        boxes=extent_boxes(rows, cols),  # (B, Kc, T, 4)
        sounding=sounding,  # (B, Kc, T)
        label_valid=valid,  # (B, T)
        real=sounding.any(dim=-1),  # (B, Kc)
    )


def masks_at_resolution(masks, size):
    """0/1 masks or label maps (..., H, W) at the mask-head size (h, w): (..., h, w), values kept
    (the input itself when already at (h, w))."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    # PAPER: not said how GT masks meet the stride-4 predictions: the centre pixel of every 4x4
    # cell (CondInst, ReferFormer), which 'nearest-exact' picks at any size
    # (docs/paper-silent.md#ground-truth-at-stride-4).
    return F.interpolate(masks, size=tuple(size), mode="nearest-exact")  # (..., h, w)


# ----------------------------------------------------------------------------------------------
# 2. Loss functions, and their pairwise forms for the matcher
# ----------------------------------------------------------------------------------------------
def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss (Lin et al. 2017), element-wise: logits and targets in [0, 1] of one
    shape (...), loss (...).

    FL = -alpha_t * (1 - p_t)^gamma * log(p_t), with p = sigmoid(x), p_t = p if t = 1 else 1 - p,
    alpha_t = alpha if t = 1 else 1 - alpha (soft targets interpolate linearly).
    """
    # PAPER: alpha and gamma are not given; 0.25 and 2 are the defaults of Lin et al. 2017.
    prob = logits.sigmoid()  # (...)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (...) -log(p_t)
    p_t = prob * targets + (1 - prob) * (1 - targets)  # (...)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)  # (...)
    return alpha_t * (1 - p_t) ** gamma * ce  # (...)


def dice_loss(logits, targets, valid=None):
    """Dice loss (Milletari et al. 2016) of mask logits (..., Px) against 0/1 masks (..., Px),
    counting the pixels where valid (bool, broadcast; default all): (...).

    dice = 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(x), sums over the pixels.
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
    """Mean focal loss of every predicted mask (..., n, Px) against every 0/1 target (..., m, Px),
    over the pixels where valid (..., 1, Px) (default all): (..., n, m).

    Because the target is 0 or 1, FL(x, t) = t * FL(x, 1) + (1 - t) * FL(x, 0), so all pairs
    come from two matrix products instead of an (n, m, Px) tensor (as ReferFormer/Mask2Former).
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
    """dice_loss of every predicted mask (..., n, Px) against every target (..., m, Px): (..., n, m)."""
    prob = logits.sigmoid()  # (..., n, Px)
    if valid is not None:
        prob = torch.where(valid, prob, 0.0)  # (..., n, Px)
        targets = torch.where(valid, targets, 0.0)  # (..., m, Px)
    numerator = 2 * prob @ targets.transpose(-1, -2) + 1  # (..., n, m)
    denominator = prob.sum(dim=-1)[..., :, None] + targets.sum(dim=-1)[..., None, :] + 1  # (..., n, m)
    return 1 - numerator / denominator  # (..., n, m)


# ----------------------------------------------------------------------------------------------
# 3. The video-level Hungarian matcher, eq. (10)
# ----------------------------------------------------------------------------------------------
def stack_layers(layers):
    """L decoder layers' outputs (dicts of pred_logits, pred_masks, pred_boxes: (B, T, N, ...)) as
    R = L*N token rows, row l*N + i token i of layer l (l = 0 the final layer, l >= 1 aux layer l-1)."""
    return tuple(torch.cat([layer[key] for layer in layers], dim=2)  # (B, T, R, ...)
                 for key in ("pred_logits", "pred_masks", "pred_boxes"))


# The five terms of eq. (10), in the order in which a non-finite one is reported.
COST_TERMS = ("cost_class", "cost_bbox", "cost_giou", "cost_mask", "cost_dice")


class HungarianMatcher(nn.Module):
    """One assignment tokens <-> ground-truth tracks per clip and decoder layer (eq. 10).

    Token i is matched to track j for the whole clip, as in ReferFormer. The cost of the pair is

        C[i, j] = w_class * cost_class + w_bbox * cost_bbox + w_giou * cost_giou
                + w_mask * cost_mask + w_dice * cost_dice,

    each term over the frames that carry labels, and each the increase of the corresponding loss
    of SetCriterion if token i takes track j (up to constants), so matching and loss agree.
    """

    def __init__(self, cost_class=PAPER_LOSS_WEIGHTS["loss_class"], cost_mask=PAPER_LOSS_WEIGHTS["loss_mask"],
                 cost_dice=PAPER_LOSS_WEIGHTS["loss_dice"], cost_bbox=PAPER_LOSS_WEIGHTS["loss_bbox"],
                 cost_giou=PAPER_LOSS_WEIGHTS["loss_giou"]):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, logits, masks, boxes, targets, num_layers):
        """logits, masks, boxes: the token rows of num_layers = L decoder layers (stack_layers);
        targets: Tracks at their mask size. Returns the assignment (B, L*N) int64: row l*N + i holds
        the slot that token i of layer l is matched to, -1 if none (min(N, tracks) per clip and layer).
        A non-finite cost raises a ValueError naming its term and clip, where scipy would fail obscurely."""
        B, R, L = logits.shape[0], logits.shape[2], num_layers
        N, J = R // L, targets.classes.shape[1]
        # Costs in full precision even inside an AMP region (matmuls would otherwise run in half).
        with torch.autocast(device_type=logits.device.type, enabled=False):
            cost, terms = self.cost_matrices(logits, masks, boxes, targets)  # (B, R, J), 5 x (B, R, J)
        # As DETR: scipy runs on the host, one small problem per clip and layer.
        cost = cost.cpu().numpy()  # (B, R, J)
        is_track = targets.real.cpu().numpy()  # (B, J)
        if not np.isfinite(cost[np.broadcast_to(is_track[:, None, :], cost.shape)]).all():
            # the rare error path: which term, layer and clip (a non-finite term makes the sum non-finite)
            real = targets.real[:, None, :]  # (B, 1, J)
            bad = torch.stack([(~torch.isfinite(term) & real).reshape(B, L, N * J).sum(dim=-1)
                               for term in terms], dim=-1).cpu().numpy()  # (B, L, 5) non-finite entries per term
            if not bad.any():  # every term finite, their weighted sum not (an overflow)
                raise ValueError("HungarianMatcher: the weighted cost overflows; check the cost weights.")
            layer, b, k = np.argwhere(bad.transpose(1, 0, 2))[0]  # the first: layers, clips, terms in order
            raise ValueError(
                f"HungarianMatcher: cost term '{COST_TERMS[k]}' has {int(bad[b, layer, k])} "
                f"non-finite entries in clip {b}; the predictions feeding it contain NaN "
                f"or inf (check the loss scale, lr, AMP).")
        assignment = np.full((B, R), -1, dtype=np.int64)  # (B, R)
        for b in range(B):
            slots = np.flatnonzero(is_track[b])  # the clip's tracks, in slot order
            for layer in range(L):
                block = cost[b, layer * N:(layer + 1) * N][:, slots]  # (N, tracks of the clip)
                pred_idx, tgt_idx = linear_sum_assignment(block)  # Hungarian (Kuhn 1955)
                assignment[b, layer * N + pred_idx] = slots[tgt_idx]
        return torch.as_tensor(assignment, device=logits.device)  # (B, R)

    def cost_matrices(self, logits, masks, boxes, targets):
        """The eq. (10) cost (B, R, J) of every token row against every track slot of its clip, and
        the five unweighted terms, each (B, R, J), in COST_TERMS order. Slots that hold no track get
        a cost as well; forward ignores them."""
        B, T, R = logits.shape[:3]
        J = targets.classes.shape[1]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # no half-precision costs
        valid = targets.label_valid  # (B, T)
        sounding = targets.sounding & valid[:, None]  # (B, J, T)
        sounds = sounding.transpose(1, 2)[:, :, None, :]  # (B, T, 1, J)
        num_labelled = valid.sum(dim=1).clamp(min=1)[:, None, None]  # (B, 1, 1) T_l
        num_sounding = sounding.sum(dim=2).clamp(min=1)[:, None, :]  # (B, 1, J)

        # Class term: the focal cost of Deformable-DETR, FL(x, 1) - FL(x, 0) on the track's class
        # logit, over the frames where the track sounds.
        # PAPER: eq. (10) gives no video form; divided by all labelled frames T_l, the cost is the
        # exact change of loss_class (docs/paper-silent.md#class-terms-over-frames).
        class_idx = (targets.classes - 1)[:, None, None, :].expand(B, T, R, J)  # (B, T, R, J)
        x = logits.to(dtype).gather(3, class_idx)  # (B, T, R, J) logit of each track's class
        focal_gain = sigmoid_focal_loss(x, torch.ones_like(x)) - sigmoid_focal_loss(x, torch.zeros_like(x))  # (B, T, R, J)
        focal_gain = torch.where(sounds, focal_gain, torch.zeros_like(focal_gain))  # (B, T, R, J)
        cost_class = focal_gain.sum(dim=1) / num_labelled  # (B, R, J)

        # Box terms: L1 and 1 - GIoU, averaged over the frames where the track sounds (has a box).
        pred_boxes = boxes.to(dtype)  # (B, T, R, 4)
        tgt_boxes = targets.boxes.to(dtype).transpose(1, 2)  # (B, T, J, 4)
        l1 = (pred_boxes[:, :, :, None, :] - tgt_boxes[:, :, None, :, :]).abs().sum(dim=-1)  # (B, T, R, J)
        l1 = torch.where(sounds, l1, torch.zeros_like(l1))  # (B, T, R, J)
        cost_bbox = l1.sum(dim=1) / num_sounding  # (B, R, J)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))  # (B, T, R, J)
        giou_loss = torch.where(sounds, 1 - giou, torch.zeros_like(giou))  # (B, T, R, J)
        cost_giou = giou_loss.sum(dim=1) / num_sounding  # (B, R, J)

        # Mask terms on the whole labelled volume (T_l, h, w): silent frames ask for empty masks.
        # NOT IN PAPER: focal + Dice (§3.5: Dice + BCE; docs/paper-silent.md#focal-not-bce-mask-loss).
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
# 4. The set criterion, eq. (8)
# ----------------------------------------------------------------------------------------------
class SetCriterion(nn.Module):
    """The training loss of eq. (8): L = lambda_quant * L_quant + L_segm.

    For every decoder layer (the last one and, with aux_loss, each earlier one as in DETR and
    ReferFormer, with an assignment of its own), the tokens are matched to the tracks and
      * loss_class: sigmoid focal loss on every token's Kc logits in every labelled frame; the
        target is the track's class where the matched track sounds and all zeros elsewhere
        (unmatched tokens, silent frames: "no object");
      * loss_mask, loss_dice: focal and Dice loss of each matched token's masks against its
        track on the clip's labelled volume;
      * loss_bbox, loss_giou: L1 and 1 - GIoU of each matched token's box, on the frames where
        its track sounds.
    Unlabelled frames contribute nothing; the normalisers are the file docstring's. The unweighted
    eq. (9) terms come in outputs["quant"]. weight_dict gives every term its weight (an auxiliary
    layer's term, suffix _0 .. _{L-2}, has its base term's), and total == sum(weight(k) * parts[k]).

    forward = losses with the matcher's assignment; losses also takes one fixed in advance
    (pretrain.pretrain_visual, with pretrain.fixed_assignment).
    """

    def __init__(self, num_classes, matcher=None, weights=None, lambda_quant=1.0, lambda_com=0.5, aux_loss=True):
        """num_classes: Kc; matcher: a HungarianMatcher, by default one whose cost weights are the
        loss weights; weights: dict overriding PAPER_LOSS_WEIGHTS; lambda_quant, lambda_com: the
        weights of eq. (8) and eq. (9); aux_loss: add the losses of outputs["aux_outputs"]."""
        super().__init__()
        self.num_classes = num_classes
        weights = dict(PAPER_LOSS_WEIGHTS, **(weights or {}))
        if matcher is None:
            # PAPER: App. D gives one set of lambdas; we use them both for the matching cost
            # (eq. 10) and for the loss (L_segm), as DETR-family code does.
            matcher = HungarianMatcher(
                cost_class=weights["loss_class"], cost_mask=weights["loss_mask"], cost_dice=weights["loss_dice"],
                cost_bbox=weights["loss_bbox"], cost_giou=weights["loss_giou"])
        self.matcher = matcher
        self.lambda_quant = lambda_quant
        self.aux_loss = aux_loss
        self.weight_dict = dict(
            weights,
            quant_codebook=lambda_quant,  # eq. (8) x eq. (9) first term
            quant_commit_global=lambda_quant * lambda_com,  # eq. (9) second term
            quant_commit_local=lambda_quant * lambda_com,  # eq. (9) third term
            # NOT IN PAPER: the local codebook term (no SC, Table 2), weighted as eq. (9)'s first term.
            quant_codebook_local=lambda_quant)

    def forward(self, outputs, targets):
        """outputs: the model's dict (pred_logits, pred_masks, pred_boxes; optional aux_outputs, and
        quant, the unweighted eq. (9) terms); targets: Tracks at its mask size. Returns total, the
        scalar of eq. (8), and parts, name -> unweighted scalar: every loss_* and quant_* term."""
        return self.losses(outputs, targets)

    def losses(self, outputs, targets, assignment=None):
        """Eq. (8) for the matched tokens of every decoder layer, all layers and clips at once, as
        forward. assignment: (B, L*N) int64 fixed in advance, or None for the matcher's (eq. 10)."""
        # NOT IN PAPER: losses on every earlier decoder layer, as DETR and ReferFormer (aux_loss).
        layers = [outputs] + (list(outputs.get("aux_outputs", [])) if self.aux_loss else [])
        logits, pred_masks, pred_boxes = stack_layers(layers)  # (B, T, R, Kc), (B, T, R, h, w), (B, T, R, 4)
        B, T, R, Kc = logits.shape
        L = len(layers)
        if assignment is None:
            assignment = self.matcher(logits, pred_masks, pred_boxes, targets, L)  # (B, R) eq. (10)
        h, w = pred_masks.shape[-2:]
        dtype = torch.promote_types(logits.dtype, torch.float32)

        # PAPER: no normaliser given; as DETR divides by its boxes, we divide by the batch's tracks.
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
            # (unmatched rows give 0 and a zero gradient: a batch without any track is defined too)
            return torch.where(matched, loss, 0.0).reshape(B, L, -1).sum(dim=(0, 2))

        # Class loss: one-hot target where a matched track sounds, all zeros everywhere else.
        class_ids = torch.arange(1, Kc + 1, device=logits.device)  # (Kc,)
        one_hot = (targets.classes[clip, slot][..., None] == class_ids).to(dtype)  # (B, R, Kc) the slot's class
        target_classes = one_hot[:, None] * sounding.transpose(1, 2)[..., None]  # (B, T, R, Kc)
        focal = sigmoid_focal_loss(logits.to(dtype), target_classes)  # (B, T, R, Kc)
        focal = focal.reshape(B, T, L, -1).sum(dim=-1)  # (B, T, L) over each layer's N*Kc logits
        focal = torch.where(valid[..., None], focal, torch.zeros_like(focal))  # (B, T, L) unlabelled frames: nothing
        # PAPER: the class loss's normaliser is not given: per clip, the mean over labelled frames,
        # cost_class's form plus no-object terms (docs/paper-silent.md#class-terms-over-frames).
        loss_class = (focal.sum(dim=1) / valid.sum(dim=1).clamp(min=1)[:, None]).sum(dim=0)  # (L,)

        # Mask losses of the matched pairs on the clip's labelled volume.
        src = pred_masks.to(dtype).transpose(1, 2).flatten(2)  # (B, R, Px)
        tgt = targets.masks[clip, slot].to(dtype).flatten(2)  # (B, R, Px) the matched track's masks
        pixels = valid[:, None, :, None, None].expand(B, 1, T, h, w).flatten(2)  # (B, 1, Px) labelled pixels
        num_pixels = pixels.sum(dim=-1).clamp(min=1)  # (B, 1) T_l*h*w
        focal = torch.where(pixels, sigmoid_focal_loss(src, tgt), 0.0).sum(dim=-1) / num_pixels  # (B, R) focal, mean over volume
        loss_mask = per_layer(focal)  # (L,)
        loss_dice = per_layer(dice_loss(src, tgt, pixels))  # (L,)

        # Box losses of the matched pairs on the frames where the track sounds.
        num_sounding = sounding.sum(dim=2).clamp(min=1)  # (B, R)
        src_boxes = pred_boxes.to(dtype).transpose(1, 2)  # (B, R, T, 4)
        tgt_boxes = targets.boxes[clip, slot].to(dtype)  # (B, R, T, 4)
        l1 = (src_boxes - tgt_boxes).abs().sum(dim=-1)  # (B, R, T)
        l1 = torch.where(sounding, l1, torch.zeros_like(l1))  # (B, R, T) only where it sounds
        loss_bbox = per_layer(l1.sum(dim=2) / num_sounding)  # (L,)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src_boxes)[..., None, :],
                                   box_cxcywh_to_xyxy(tgt_boxes)[..., None, :])[..., 0, 0]  # (B, R, T)
        giou_loss = torch.where(sounding, 1 - giou, torch.zeros_like(giou))  # (B, R, T)
        loss_giou = per_layer(giou_loss.sum(dim=2) / num_sounding)  # (L,)

        per_term = {name: value / num_tracks for name, value in (
            ("loss_class", loss_class), ("loss_mask", loss_mask), ("loss_dice", loss_dice),
            ("loss_bbox", loss_bbox), ("loss_giou", loss_giou))}  # name -> (L,)
        parts = {}
        for layer in range(L):
            suffix = "" if layer == 0 else f"_{layer - 1}"
            parts.update({name + suffix: value[layer] for name, value in per_term.items()})
        parts.update(outputs.get("quant", {}))  # the unweighted eq. (9) terms
        return self.total(parts), parts

    def total(self, parts):
        """Eq. (8): L = L_segm + lambda_quant * L_quant (lambda_com inside L_quant), the weighted
        sum of the unweighted parts; "loss_dice_0" has the weight of "loss_dice". A scalar tensor."""
        return sum(self.weight_dict[name if name in self.weight_dict else name.rsplit("_", 1)[0]] * value
                   for name, value in parts.items())  # ()
