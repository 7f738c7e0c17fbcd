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
    frames that carry labels;
  * the segmentation loss L_segm is L_match of the matched pairs, plus the "no object" class
    loss of every other token; eq. (8) adds lambda_quant * L_quant (eq. 9, computed in
    quantize.py and passed in here).
The loss pieces are the paper's: sigmoid focal loss (Lin et al. 2017) for classes, focal + Dice
for masks (App. D: lambda_focal 5, lambda_dice 2), L1 + GIoU (Rezatofighi et al. 2019) for
boxes (lambda_L1 5, lambda_giou 2), lambda_cls 2, lambda_com 0.5, lambda_quant 1.

Reading order
-------------
 1. masks_to_boxes, build_tracks      label maps (B,T,H,W) -> one dict of tracks per clip
 2. box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou      box algebra (GIoU)
 3. sigmoid_focal_loss, dice_loss                                    the loss functions
 4. pairwise_focal_cost, pairwise_dice_cost                          the same, for all pairs
 5. masks_at_resolution, tracks_at_resolution                        GT masks -> stride 4
 6. HungarianMatcher          eq. (10), one assignment per clip
 7. SetCriterion              eq. (8): matched losses, auxiliary layers, quantization terms

Shape alphabet
--------------
B clips, T frames, N semantic tokens, Kc foreground classes, H, W label size,
h, w = H/4, W/4 (mask resolution of the predictions), J ground-truth tracks of one clip,
J' matched tracks of one clip (min(N, J)), T_l frames of a clip that carry labels,
P = T_l*h*w pixels of a clip's labelled volume, n, m numbers of boxes or masks.
Class ids: 0 = background, 1..Kc foreground; class-head logit c-1 is class id c.
"""
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
def masks_to_boxes(masks):
    """Tight boxes around binary masks, normalised cxcywh.

    Args:
        masks: (..., H, W) bool or 0/1.
    Returns:
        boxes: (..., 4) float32 (cx, cy, w, h) in [0, 1]; all zeros where a mask is empty.
    """
    masks = masks.bool()  # (..., H, W)
    H, W = masks.shape[-2:]
    rows = masks.any(dim=-1)  # (..., H) row holds a pixel
    cols = masks.any(dim=-2)  # (..., W) column holds a pixel
    ys = torch.arange(H, device=masks.device)  # (H,)
    xs = torch.arange(W, device=masks.device)  # (W,)
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


def build_tracks(labels, label_valid, num_classes):
    """Turn per-frame label maps into the ground-truth tracks y_hat_j of eq. (10).

    One track per foreground class present in the clip's labelled frames (AVSS labels carry no
    instance ids, so "the j-th sounding object" of the paper is the j-th sounding class).

    Args:
        labels: (B, T, H, W) int64 class ids, 0 = background, 1..Kc foreground; ids outside
            1..Kc (e.g. an ignore value 255) make no track.
        label_valid: (B, T) bool, True where the frame carries ground truth.
        num_classes: Kc.
    Returns:
        a list of B dicts, each with
            "classes":     (J,) int64 class ids in 1..Kc, ascending,
            "masks":       (J, T, H, W) float32 0/1, the class's pixels (zero in unlabelled frames),
            "boxes":       (J, T, 4) float32 cxcywh in [0, 1], zeros where the mask is empty,
            "sounding":    (J, T) bool, the class is present in that labelled frame,
            "label_valid": (T,) bool, copied from the input.
    """
    # PAPER: "the j-th sounding object" of §3.5; label maps carry no instance ids, so a track is
    # one sounding class over the clip (two objects of one class share a track).
    tracks = []
    for b in range(labels.shape[0]):
        clip = labels[b]  # (T, H, W)
        valid = label_valid[b].bool()  # (T,)
        present = torch.unique(clip[valid])  # (#ids,) ids seen in labelled frames
        classes = present[(present >= 1) & (present <= num_classes)]  # (J,)
        masks = clip[None] == classes[:, None, None, None]  # (J, T, H, W)
        masks = masks & valid[None, :, None, None]  # (J, T, H, W) nothing in unlabelled frames
        sounding = masks.flatten(2).any(dim=-1)  # (J, T)
        tracks.append({
            "classes": classes.long(),  # (J,)
            "masks": masks.float(),  # (J, T, H, W)
            "boxes": masks_to_boxes(masks),  # (J, T, 4)
            "sounding": sounding,  # (J, T)
            "label_valid": valid,  # (T,)
        })
    return tracks


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


def dice_loss(logits, targets):
    """Dice loss (Milletari et al. 2016; Li et al. 2019) with +1 smoothing, as in DETR.

    dice = 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(x).

    Args:
        logits: (n, P) mask logits, one mask per row.
        targets: (n, P) 0/1 masks.
    Returns:
        loss: (n,)
    """
    # PAPER: the smoothing constant is not given; +1 as DETR.
    prob = logits.sigmoid()  # (n, P)
    numerator = 2 * (prob * targets).sum(dim=-1) + 1  # (n,)
    denominator = prob.sum(dim=-1) + targets.sum(dim=-1) + 1  # (n,)
    return 1 - numerator / denominator  # (n,)


def pairwise_focal_cost(logits, targets, alpha=0.25, gamma=2.0):
    """Mean sigmoid focal loss of every predicted mask against every 0/1 target mask.

    Because the target is 0 or 1, FL(x, t) = t * FL(x, 1) + (1 - t) * FL(x, 0), so all pairs
    come from two matrix products instead of an (n, m, P) tensor (as ReferFormer/Mask2Former).

    Args:
        logits: (n, P) predicted mask logits.
        targets: (m, P) 0/1 target masks.
    Returns:
        cost: (n, m), cost[i, j] = mean_p FL(logits[i, p], targets[j, p]).
    """
    loss_pos = sigmoid_focal_loss(logits, torch.ones_like(logits), alpha, gamma)  # (n, P)
    loss_neg = sigmoid_focal_loss(logits, torch.zeros_like(logits), alpha, gamma)  # (n, P)
    cost = loss_pos @ targets.T + loss_neg @ (1 - targets).T  # (n, m)
    return cost / logits.shape[-1]  # (n, m)


def pairwise_dice_cost(logits, targets):
    """Dice loss of every predicted mask against every target mask.

    Args:
        logits: (n, P) predicted mask logits.
        targets: (m, P) 0/1 target masks.
    Returns:
        cost: (n, m), cost[i, j] = dice_loss(logits[i], targets[j]).
    """
    prob = logits.sigmoid()  # (n, P)
    numerator = 2 * prob @ targets.T + 1  # (n, m)
    denominator = prob.sum(dim=-1)[:, None] + targets.sum(dim=-1)[None, :] + 1  # (n, m)
    return 1 - numerator / denominator  # (n, m)


# ----------------------------------------------------------------------------------------------
# 5. Ground-truth masks at the prediction resolution
# ----------------------------------------------------------------------------------------------
def masks_at_resolution(masks, size):
    """Bring 0/1 masks from the label size (H, W) to the mask-head size (h, w).

    Args:
        masks: (J, T, H, W) float 0/1.
        size: (h, w).
    Returns:
        masks: (J, T, h, w) float 0/1 (the input itself when already at (h, w)).
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    # PAPER: the paper does not say how GT masks meet the stride-4 predictions. We keep the
    # centre pixel of every 4x4 cell, i.e. CondInst's and ReferFormer's [2::4, 2::4]
    # subsampling (the centres line up with the mask-head pixel centres and targets stay 0/1,
    # which the pairwise focal cost needs); 'nearest-exact' is that subsampling for any size.
    return F.interpolate(masks, size=tuple(size), mode="nearest-exact")  # (J, T, h, w)


def tracks_at_resolution(targets, size):
    """Copy of the track dicts with masks at (h, w) (see masks_at_resolution)."""
    return [dict(t, masks=masks_at_resolution(t["masks"], size)) for t in targets]


# ----------------------------------------------------------------------------------------------
# 6. The video-level Hungarian matcher, eq. (10)
# ----------------------------------------------------------------------------------------------
def _check_finite(name, cost, clip):
    """Stop with a clear message if a cost term holds NaN or inf (scipy would fail obscurely)."""
    if not torch.isfinite(cost).all():
        bad = (~torch.isfinite(cost)).sum().item()
        raise ValueError(
            f"HungarianMatcher: cost term '{name}' has {bad} non-finite entries in clip {clip}; "
            f"the predictions feeding it contain NaN or inf (check the loss scale, lr, AMP)."
        )


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
    """

    def __init__(self, cost_class=2.0, cost_mask=5.0, cost_dice=2.0, cost_bbox=5.0, cost_giou=2.0):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: dict with
                "pred_logits": (B, T, N, Kc) class logits,
                "pred_masks":  (B, T, N, h, w) mask logits,
                "pred_boxes":  (B, T, N, 4) boxes cxcywh in [0, 1].
            targets: list of B track dicts from build_tracks ("classes" (J,), "masks" (J, T, H, W)
                at label or mask resolution, "boxes" (J, T, 4), "sounding" (J, T), "label_valid" (T,)),
                on the predictions' device.
        Returns:
            a list of B pairs (pred_idx (J',), tgt_idx (J',)) int64, J' = min(N, J): token
            pred_idx[k] is matched to track tgt_idx[k]; pred_idx is ascending.
        """
        h, w = outputs["pred_masks"].shape[-2:]
        targets = tracks_at_resolution(targets, (h, w))
        indices = []
        for b, target in enumerate(targets):
            # Costs in full precision even inside an AMP region (matmuls would otherwise run in half).
            with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
                cost = self.clip_cost(
                    outputs["pred_logits"][b], outputs["pred_masks"][b], outputs["pred_boxes"][b], target, clip=b
                )  # (N, J)
            pred_idx, tgt_idx = linear_sum_assignment(cost.cpu().numpy())  # Hungarian (Kuhn 1955)
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices

    def clip_cost(self, logits, masks, boxes, target, clip=0):
        """The eq. (10) cost matrix of one clip.

        Args:
            logits: (T, N, Kc); masks: (T, N, h, w); boxes: (T, N, 4) cxcywh.
            target: one track dict with masks already at (h, w).
            clip: index used in error messages.
        Returns:
            cost: (N, J) float; (N, 0) when the clip has no track.
        """
        T, N = logits.shape[:2]
        J = target["classes"].shape[0]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # no half-precision costs
        if J == 0:
            return logits.new_zeros((N, 0), dtype=dtype)  # linear_sum_assignment -> empty
        valid = target["label_valid"].bool()  # (T,)
        sounding = target["sounding"].bool() & valid[None]  # (J, T)
        num_labelled = valid.sum().clamp(min=1)  # T_l
        num_sounding = sounding.sum(dim=1).clamp(min=1)  # (J,)

        # Class term: focal cost on the track's class logit, frames where it sounds.
        # PAPER: eq. (10) names the terms, not their video form. As ReferFormer we average over
        # frames; a frame where the track is silent has target "no object" whoever takes the
        # track, so it adds 0, and we divide by all labelled frames T_l so the cost is the exact
        # change of loss_class (Deformable-DETR's FL(x,1) - FL(x,0), here without its 1e-8 eps).
        x = logits.to(dtype)[:, :, target["classes"] - 1]  # (T, N, J) logit of each track's class
        focal_gain = sigmoid_focal_loss(x, torch.ones_like(x)) - sigmoid_focal_loss(x, torch.zeros_like(x))  # (T, N, J)
        focal_gain = torch.where(sounding.T[:, None, :], focal_gain, torch.zeros_like(focal_gain))  # (T, N, J)
        cost_class = focal_gain.sum(dim=0) / num_labelled  # (N, J)
        _check_finite("cost_class", cost_class, clip)

        # Box terms: L1 and 1 - GIoU, averaged over the frames where the track sounds.
        pred_boxes = boxes.to(dtype)  # (T, N, 4)
        tgt_boxes = target["boxes"].to(dtype).transpose(0, 1)  # (T, J, 4)
        l1 = (pred_boxes[:, :, None, :] - tgt_boxes[:, None, :, :]).abs().sum(dim=-1)  # (T, N, J)
        l1 = torch.where(sounding.T[:, None, :], l1, torch.zeros_like(l1))  # (T, N, J)
        cost_bbox = l1.sum(dim=0) / num_sounding  # (N, J)
        _check_finite("cost_bbox", cost_bbox, clip)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))  # (T, N, J)
        giou_loss = torch.where(sounding.T[:, None, :], 1 - giou, torch.zeros_like(giou))  # (T, N, J)
        cost_giou = giou_loss.sum(dim=0) / num_sounding  # (N, J)
        _check_finite("cost_giou", cost_giou, clip)

        # Mask terms on the labelled volume (T_l, h, w).
        # PAPER: §3.5 says "Dice and BCE", App. D gives lambda_focal = 5 and lambda_dice = 2; we
        # use focal + Dice (as ReferFormer) on the whole labelled volume, not per frame, so a
        # silent frame asks the matched token for an empty mask.
        pred_masks = masks.to(dtype)[valid].transpose(0, 1).flatten(1)  # (N, P)
        tgt_masks = target["masks"].to(dtype)[:, valid].flatten(1)  # (J, P)
        cost_mask = pairwise_focal_cost(pred_masks, tgt_masks)  # (N, J)
        _check_finite("cost_mask", cost_mask, clip)
        cost_dice = pairwise_dice_cost(pred_masks, tgt_masks)  # (N, J)
        _check_finite("cost_dice", cost_dice, clip)

        # eq. (10): L_match = lambda_box L_box + lambda_cls L_cls + lambda_mask L_mask
        return (self.cost_bbox * cost_bbox + self.cost_giou * cost_giou + self.cost_class * cost_class
                + self.cost_mask * cost_mask + self.cost_dice * cost_dice)  # (N, J)


# ----------------------------------------------------------------------------------------------
# 7. The set criterion, eq. (8)
# ----------------------------------------------------------------------------------------------
class SetCriterion(nn.Module):
    """The training loss of eq. (8): L = lambda_quant * L_quant + L_segm.

    For every decoder layer (the last one and, with aux_loss, each earlier one as in DETR and
    ReferFormer, with the matcher re-run per layer), the tokens are matched to the tracks and
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

    `weight_dict` maps every logged term to its weight, and total == sum(weight_dict[k] * parts[k]).
    Keys of auxiliary layers (suffix _0 .. _{L-2}) and unforeseen quant_ keys are added to it the
    first time they are seen.
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

    def weight_of(self, name):
        """The weight of a logged term (adds aux-layer and new quant_ keys to weight_dict)."""
        if name not in self.weight_dict:
            base = name.rsplit("_", 1)[0]
            if name.startswith("quant_commit"):
                self.weight_dict[name] = self.lambda_quant * self.lambda_com  # a commitment term of eq. (9)
            elif name.startswith("quant_"):
                # PAPER: eq. (9) has only the codebook and two commitment terms; any other quant_
                # term (e.g. quant_codebook_local of the separate-codebook ablation) is taken as
                # part of L_quant with weight lambda_quant, like the codebook term.
                self.weight_dict[name] = self.lambda_quant
            elif base in self.weights:
                self.weight_dict[name] = self.weights[base]  # auxiliary layer, same weight as the last
            else:
                raise KeyError(f"SetCriterion: no weight for the term '{name}'")
        return self.weight_dict[name]

    def forward(self, outputs, targets):
        """
        Args:
            outputs: dict with
                "pred_logits": (B, T, N, Kc), "pred_masks": (B, T, N, h, w), "pred_boxes": (B, T, N, 4);
                optional "aux_outputs": list of L-1 dicts with the same three keys (earlier layers);
                optional "quant": dict name -> scalar tensor, the unweighted eq. (9) terms
                (quant_codebook, quant_commit_global, quant_commit_local; only quant_* keys are used).
            targets: list of B track dicts from build_tracks (masks at label resolution H, W).
        Returns:
            total: scalar, eq. (8).
            parts: dict name -> unweighted scalar: loss_class, loss_mask, loss_dice, loss_bbox,
                loss_giou, the same with suffix _l for aux layer l, and every quant_* term.
        """
        h, w = outputs["pred_masks"].shape[-2:]
        targets = tracks_at_resolution(targets, (h, w))  # GT masks to the prediction resolution
        # PAPER: the paper does not give the normaliser; as DETR divides by the number of boxes,
        # we divide every term by the number of ground-truth tracks in the batch (at least 1).
        num_tracks = float(sum(int(t["classes"].shape[0]) for t in targets))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # As DETR: normalise by the mean number of tracks per GPU, so every rank agrees.
            count = torch.tensor(num_tracks, device=outputs["pred_masks"].device)  # ()
            torch.distributed.all_reduce(count)
            num_tracks = count.item() / torch.distributed.get_world_size()
        num_tracks = max(num_tracks, 1.0)

        parts = self.layer_losses(outputs, targets, num_tracks)
        # PAPER: auxiliary losses on every earlier decoder layer are not in the paper; on by
        # default, as DETR and ReferFormer (aux_loss=False switches them off).
        if self.aux_loss:
            for layer, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_parts = self.layer_losses(aux, targets, num_tracks)
                parts.update({f"{name}_{layer}": value for name, value in aux_parts.items()})
        for name, value in outputs.get("quant", {}).items():
            if name.startswith("quant_"):
                parts[name] = value

        # eq. (8): L = L_segm + lambda_quant * L_quant, with L_quant = eq. (9) (lambda_com inside)
        total = sum(self.weight_of(name) * value for name, value in parts.items())  # ()
        return total, parts

    def layer_losses(self, outputs, targets, num_tracks):
        """Unweighted losses of one decoder layer.

        Args:
            outputs: dict with "pred_logits" (B, T, N, Kc), "pred_masks" (B, T, N, h, w),
                "pred_boxes" (B, T, N, 4).
            targets: B track dicts with masks at (h, w).
            num_tracks: the normaliser (number of tracks in the batch, at least 1; averaged over
                GPUs under torch.distributed).
        Returns:
            dict loss_class, loss_mask, loss_dice, loss_bbox, loss_giou -> scalar.
        """
        logits = outputs["pred_logits"]  # (B, T, N, Kc)
        pred_masks = outputs["pred_masks"]  # (B, T, N, h, w)
        pred_boxes = outputs["pred_boxes"]  # (B, T, N, 4)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        indices = self.matcher(outputs, targets)

        # Class loss: one-hot target where a matched track sounds, all zeros everywhere else.
        target_classes = torch.zeros_like(logits, dtype=dtype)  # (B, T, N, Kc)
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            t = targets[b]
            pred_idx, tgt_idx = pred_idx.to(logits.device), tgt_idx.to(logits.device)  # (J',) each
            sounding = t["sounding"][tgt_idx] & t["label_valid"][None]  # (J', T)
            k, frame = sounding.nonzero(as_tuple=True)  # (#sounding pairs,) each
            target_classes[b, frame, pred_idx[k], t["classes"][tgt_idx[k]] - 1] = 1.0
        focal = sigmoid_focal_loss(logits.to(dtype), target_classes).sum(dim=(2, 3))  # (B, T)
        valid = torch.stack([t["label_valid"].bool() for t in targets])  # (B, T)
        focal = torch.where(valid, focal, torch.zeros_like(focal))  # (B, T) unlabelled frames: nothing
        # PAPER: the paper does not say how the class loss is normalised; per clip we average over
        # the labelled frames (the video form of Deformable-DETR's sum / number of boxes) so that
        # it is the sum over tracks of cost_class in HungarianMatcher, plus the no-object terms.
        loss_class = (focal.sum(dim=1) / valid.sum(dim=1).clamp(min=1)).sum() / num_tracks  # ()

        # Mask and box losses of the matched pairs; they start as zeros tied to the graph so that
        # a batch without any track still gives defined (zero) losses and gradients.
        loss_mask = pred_masks.sum() * 0.0  # ()
        loss_dice = pred_masks.sum() * 0.0  # ()
        loss_bbox = pred_boxes.sum() * 0.0  # ()
        loss_giou = pred_boxes.sum() * 0.0  # ()
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            if len(pred_idx) == 0:
                continue
            t = targets[b]
            pred_idx, tgt_idx = pred_idx.to(logits.device), tgt_idx.to(logits.device)  # (J',) each
            frames = t["label_valid"].bool()  # (T,)
            src = pred_masks[b][frames][:, pred_idx].to(dtype)  # (T_l, J', h, w)
            src = src.transpose(0, 1).flatten(1)  # (J', P)
            tgt = t["masks"][tgt_idx][:, frames].to(dtype).flatten(1)  # (J', P)
            loss_mask = loss_mask + sigmoid_focal_loss(src, tgt).mean(dim=1).sum()  # () focal, mean over volume
            loss_dice = loss_dice + dice_loss(src, tgt).sum()  # ()

            sounding = t["sounding"][tgt_idx] & frames[None]  # (J', T)
            num_sounding = sounding.sum(dim=1).clamp(min=1)  # (J',)
            src_boxes = pred_boxes[b][:, pred_idx].transpose(0, 1).to(dtype)  # (J', T, 4)
            tgt_boxes = t["boxes"][tgt_idx].to(dtype)  # (J', T, 4)
            l1 = (src_boxes - tgt_boxes).abs().sum(dim=-1)  # (J', T)
            l1 = torch.where(sounding, l1, torch.zeros_like(l1))  # (J', T) only where it sounds
            loss_bbox = loss_bbox + (l1.sum(dim=1) / num_sounding).sum()  # ()
            giou = generalized_box_iou(
                box_cxcywh_to_xyxy(src_boxes)[..., None, :], box_cxcywh_to_xyxy(tgt_boxes)[..., None, :]
            )[..., 0, 0]  # (J', T) GIoU of each frame's pair
            giou_loss = torch.where(sounding, 1 - giou, torch.zeros_like(giou))  # (J', T)
            loss_giou = loss_giou + (giou_loss.sum(dim=1) / num_sounding).sum()  # ()

        return {
            "loss_class": loss_class,
            "loss_mask": loss_mask / num_tracks,
            "loss_dice": loss_dice / num_tracks,
            "loss_bbox": loss_bbox / num_tracks,
            "loss_giou": loss_giou / num_tracks,
        }
