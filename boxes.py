"""Boxes: the two box formats, the generalized IoU of the box loss, and the tight box of a mask.

What this file teaches
    SQD predicts a box B_{i,t} for every token and frame (paper §3.4), and the box part of the
    matching cost and the loss (eq. 10, L_box = L1 + GIoU) compares it with the box of the
    ground-truth mask. A box is written two ways: (cx, cy, w, h), the form the box head predicts
    and L1 compares, and (x0, y0, x1, y1), the form in which intersections and enclosing boxes
    are taken; all coordinates are fractions of the image in [0, 1]. DETR keeps these in its
    util/box_ops.py; matcher.py uses them.

Reading order
    box_cxcywh_to_xyxy, box_xyxy_to_cxcywh   the two formats
    generalized_box_iou                      GIoU (Rezatofighi et al. 2019), eq. (10)'s box term
    extent_boxes                             the tight box around a mask, the ground truth's boxes

Shape alphabet (the repository's one alphabet: docs/shapes.md)
    ...  any leading dimensions;  n, m the two sides of a pairwise GIoU;  H, W a mask's size
"""
import torch


def box_cxcywh_to_xyxy(boxes):
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)  # 4 x (...,)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (..., 4)


def box_xyxy_to_cxcywh(boxes):
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)  # 4 x (...,)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)  # (..., 4)


def generalized_box_iou(a, b, eps=1e-9):
    """Generalized IoU (Rezatofighi et al. 2019) of every box of a (..., n, 4) with every box of
    b (..., m, 4), both x0, y0, x1, y1 with leading dims that broadcast: (..., n, m) in [-1, 1].

    GIoU = IoU - |C minus (a union b)| / |C|, C the smallest box enclosing a and b; eps floors
    the union and enclosing areas (two empty boxes give 0, not NaN).
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


def extent_boxes(rows, cols):
    """Tight boxes around masks from the rows (..., H) and columns (..., W) each one occupies (bool).
    Returns (..., 4) float32 cxcywh in [0, 1]; all zeros where no row is occupied."""
    H, W = rows.shape[-1], cols.shape[-1]
    ys = torch.arange(H, device=rows.device)  # (H,)
    xs = torch.arange(W, device=cols.device)  # (W,)
    y0 = torch.where(rows, ys, H).amin(dim=-1)  # (...,) first occupied row
    y1 = torch.where(rows, ys, -1).amax(dim=-1) + 1  # (...,) one past the last occupied row
    x0 = torch.where(cols, xs, W).amin(dim=-1)  # (...,)
    x1 = torch.where(cols, xs, -1).amax(dim=-1) + 1  # (...,)
    # PAPER: boxes run along pixel edges (columns x0..x1-1 give [x0, x1] / W), so a one-pixel
    # object has width 1/W (docs/paper-silent.md#boxes-along-pixel-edges).
    xyxy = torch.stack([x0 / W, y0 / H, x1 / W, y1 / H], dim=-1).float()  # (..., 4)
    boxes = box_xyxy_to_cxcywh(xyxy)  # (..., 4)
    return torch.where(rows.any(dim=-1)[..., None], boxes, torch.zeros_like(boxes))  # (..., 4)
