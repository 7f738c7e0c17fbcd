"""Test oracles for matcher.py: the ground truth built clip by clip, and the per-clip matcher and criterion.

What this file is for
    matcher.py builds the ground-truth tracks of a whole batch at once (track_batch: one slot per
    class), prices every clip and decoder layer in one pass and computes the losses of all of
    them with gathers. This file holds the same eq. (10) and eq. (8) written the direct way, one
    clip at a time, as the reference tests/test_matcher.py checks matcher.py against:
      * build_tracks: one dict per clip holding only the classes present in it (torch.unique,
        boolean indexing), and pack_tracks, those dicts padded into matcher.Tracks;
      * PerClipHungarianMatcher: one cost matrix per clip and layer, each term checked for
        NaN, each matrix copied to the host on its own;
      * PerClipSetCriterion: the losses gathered clip by clip with boolean indexing.
    Nothing outside tests/ imports it; the numbers agree with matcher.py to float rounding.

Reading order
    masks_to_boxes, build_tracks, tracks_at_resolution, pack_tracks, PerClipHungarianMatcher
    (forward, clip_cost), PerClipSetCriterion (forward, layer_losses).

Shapes (the repository's one shape alphabet: docs/shapes.md)
    B clips, T frames, N semantic tokens (the mask decoder's queries), Kc foreground classes,
    H, W label size, h, w mask resolution (H/4, W/4), J ground-truth tracks of a clip (or track
    slots of a padded batch), J' = min(N, J) matched tracks of a clip, T_l frames of a clip that
    carry labels, L decoder layers. The per-clip mask terms flatten a clip's labelled volume:
    T_l*h*w pixels (matcher.py's Px is the whole T*h*w volume).
"""
import torch
from scipy.optimize import linear_sum_assignment

from boxes import box_cxcywh_to_xyxy, extent_boxes, generalized_box_iou
from matcher import (
    PAPER_LOSS_WEIGHTS,
    HungarianMatcher,
    SetCriterion,
    Tracks,
    dice_loss,
    masks_at_resolution,
    pairwise_dice_cost,
    pairwise_focal_cost,
    sigmoid_focal_loss,
)


# ----------------------------------------------------------------------------------------------
# Ground truth, one clip at a time
# ----------------------------------------------------------------------------------------------
def masks_to_boxes(masks):
    """Tight boxes around binary masks, normalised cxcywh.

    Args:
        masks: (..., H, W) bool or 0/1.
    Returns:
        boxes: (..., 4) float32 (cx, cy, w, h) in [0, 1]; all zeros where a mask is empty.
    """
    masks = masks.bool()  # (..., H, W)
    return extent_boxes(masks.any(dim=-1), masks.any(dim=-2))  # (..., 4)


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


def tracks_at_resolution(targets, size):
    """Copy of the track dicts with masks at (h, w) (see matcher.masks_at_resolution)."""
    return [dict(t, masks=masks_at_resolution(t["masks"], size)) for t in targets]


def pack_tracks(targets, size):
    """The track dicts of build_tracks (one per clip) as one matcher.Tracks, padded to the largest clip.

    Real slots come first, in the order of the dicts, so slot k of a clip is its track k.

    Args:
        targets: list of B track dicts ("classes" (J_b,), "masks" (J_b, T, H, W) at label or mask
            resolution, "boxes" (J_b, T, 4), "sounding" (J_b, T), "label_valid" (T,)).
        size: (h, w), the mask resolution of the predictions.
    Returns:
        Tracks with J = max(1, max_b J_b) slots (one slot at least, so that gathers stay in range).
    """
    targets = tracks_at_resolution(targets, size)
    J = max([1] + [t["classes"].shape[0] for t in targets])

    def pad(x, value=0):  # (J_b, ...) -> (J, ...), filled with value
        return torch.cat([x, x.new_full((J - x.shape[0], *x.shape[1:]), value)])

    valid = torch.stack([t["label_valid"].bool() for t in targets])  # (B, T)
    return Tracks(
        classes=torch.stack([pad(t["classes"].long(), 1) for t in targets]),  # (B, J)
        masks=torch.stack([pad(t["masks"]) for t in targets]),  # (B, J, T, h, w)
        boxes=torch.stack([pad(t["boxes"]) for t in targets]),  # (B, J, T, 4)
        sounding=torch.stack([pad(t["sounding"].bool(), False) for t in targets]) & valid[:, None],  # (B, J, T)
        label_valid=valid,  # (B, T)
        real=torch.stack([pad(torch.ones_like(t["classes"], dtype=torch.bool), False) for t in targets]),  # (B, J)
    )


# ----------------------------------------------------------------------------------------------
# The matcher and the criterion, one clip and one decoder layer at a time
# ----------------------------------------------------------------------------------------------
def _check_finite(name, cost, clip):
    """Stop with a clear message if a cost term holds NaN or inf (scipy would fail obscurely)."""
    if not torch.isfinite(cost).all():
        bad = (~torch.isfinite(cost)).sum().item()
        raise ValueError(
            f"HungarianMatcher: cost term '{name}' has {bad} non-finite entries in clip {clip}; "
            f"the predictions feeding it contain NaN or inf (check the loss scale, lr, AMP)."
        )


class PerClipHungarianMatcher(HungarianMatcher):
    """matcher.HungarianMatcher, one clip at a time: a cost matrix and a copy to the host each."""

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
        # NOT IN PAPER: §3.5 says "Dice and BCE", App. D gives lambda_focal = 5 and lambda_dice = 2; we
        # use focal + Dice (as ReferFormer) on the whole labelled volume, not per frame, so a
        # silent frame asks the matched token for an empty mask.
        pred_masks = masks.to(dtype)[valid].transpose(0, 1).flatten(1)  # (N, T_l*h*w)
        tgt_masks = target["masks"].to(dtype)[:, valid].flatten(1)  # (J, T_l*h*w)
        cost_mask = pairwise_focal_cost(pred_masks, tgt_masks)  # (N, J)
        _check_finite("cost_mask", cost_mask, clip)
        cost_dice = pairwise_dice_cost(pred_masks, tgt_masks)  # (N, J)
        _check_finite("cost_dice", cost_dice, clip)

        # eq. (10): L_match = lambda_box L_box + lambda_cls L_cls + lambda_mask L_mask
        return (self.cost_bbox * cost_bbox + self.cost_giou * cost_giou + self.cost_class * cost_class
                + self.cost_mask * cost_mask + self.cost_dice * cost_dice)  # (N, J)


class PerClipSetCriterion(SetCriterion):
    """matcher.SetCriterion with the per-clip matcher, one decoder layer and one clip at a time."""

    def __init__(self, num_classes, weights=None, **kwargs):
        w = dict(PAPER_LOSS_WEIGHTS, **(weights or {}))
        matcher = PerClipHungarianMatcher(cost_class=w["loss_class"], cost_mask=w["loss_mask"],
                                          cost_dice=w["loss_dice"], cost_bbox=w["loss_bbox"],
                                          cost_giou=w["loss_giou"])
        super().__init__(num_classes, matcher=matcher, weights=weights, **kwargs)

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
        parts.update(outputs.get("quant", {}))  # the unweighted eq. (9) terms

        return self.total(parts), parts  # eq. (8), as SetCriterion

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
            src = src.transpose(0, 1).flatten(1)  # (J', T_l*h*w)
            tgt = t["masks"][tgt_idx][:, frames].to(dtype).flatten(1)  # (J', T_l*h*w)
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

