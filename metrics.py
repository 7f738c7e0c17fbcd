"""The official AVSBench metrics, as accumulators a trainer can feed one batch at a time.

What this file teaches
----------------------
How the numbers in the paper's Table 1 are computed, and why the definitions matter:

* AVS-Object (S4 = single source, MS3 = multi source), binary masks:
  region similarity J (the "mIoU" of the AVSBench v1 paper), the F-measure with beta^2 = 0.3, and J&F,
  their mean (paper §4 "Metrics": J and F as in Pont-Tuset et al. 2017; the numbers are produced by the
  official AVSBench code, `avs_s4/utils/utility.py::mask_iou` and `Eval_Fmeasure`).
* AVS-Semantic (AVSS): mIoU and F over all classes including background, computed the way the official
  code `avss/utils/compute_color_metrics.py` does it (NOT the Sigma-intersection / Sigma-union mIoU).

The official definitions have three traps that change leaderboard numbers; each is reproduced here and
paired with a number that does not have it, under its own name (see `METRIC_DEFINITIONS`):

1. J: a frame with an empty ground truth scores its true-negative pixel fraction (not 0/0), and the
   reported J is the mean of per-batch means.
2. F (AVS-Object): the best of 255 thresholds is picked *per test batch*, so the number depends on the
   test batch size (official: 4 clips = 20 frames). `f_whole_set` picks one threshold for the whole set.
3. AVSS: v1 clips are padded to 10 frames and the padded frames count as perfect background frames.
   `miou_real_frames` scores only the real, labelled frames.

Distributed evaluation: every accumulator keeps *sums and counts* (float64), never means, in a dict of
tensors. Sums add, so `merge()` of two accumulators, or `torch.distributed.all_reduce(SUM)` of the
tensors, gives exactly what one process would have accumulated over all the batches; `compute()`
divides only at the end. (The per-batch numbers `j_official` / `f_official` are exact per batch; under
DDP each rank forms its own batches, so which clips share a batch differs from a single-process run and
`f_official` can differ slightly; the whole-set numbers do not depend on batching at all.)

Reading order
-------------
1. `METRIC_DEFINITIONS`       one line per reported number, per accumulator (saved in every checkpoint).
2. `binary_frame_iou`         J of each frame (official `mask_iou`).
3. `binary_frame_fmeasure`    F of each frame at each of the 255 thresholds (official `_eval_pr`).
4. `class ObjectMetrics`      AVS-Object accumulator: J, F, J&F, official and batch-independent.
5. `semantic_frame_stats`     per frame and class: intersection, union, IoU, F (official `_batch_miou_fscore`).
6. `class SemanticMetrics`    AVSS accumulator: official padded-frame protocol and real frames only.
7. `class _SumAccumulator`    the state / merge / all_reduce machinery both accumulators share.
8. `headline`, `summary`      the score that picks train.py's best.pt, and the table a run prints.
9. `codebook_stats`, `CollapseWatch`  not AVSBench's: the share of the K codewords a run's tokens use
                              (usage, perplexity, dead codes), and train.py's warning when N tokens
                              use <= N words (the quantizer itself: quantize.py).

Shape alphabet
--------------
The repository's one shape alphabet: docs/shapes.md. Letters used here: B clips, T frames,
H, W image size (the size of the scored maps), Kc foreground classes (Kc+1 class ids, 0 = background).
Counts written as words: frames (frames flattened from (B, T): B*T, or the scored ones among them,
after dropping frames that are not scored), thresholds (the 255 thresholds of the F-measure).
All reported values are fractions in [0, 1] (the paper prints them x100).
"""
from __future__ import annotations

import torch

# Official constants (the official files named in the docstring above).
BETA2 = 0.3  # beta^2 of every F-measure
NUM_THRESHOLDS = 255  # thresholds of the AVS-Object F-measure
IOU_EPS_BINARY = 1e-7  # eps in the denominator of the binary J (official mask_iou)
PR_EPS_BINARY = 1e-20  # eps in precision / recall of the binary F (official _eval_pr)
IOU_EPS_SEMANTIC = 2.220446049250313e-16  # eps in the AVSS IoU denominator (official _batch_miou_fscore)
OFFICIAL_OBJECT_TEST_BATCH = 4  # clips per S4 / MS3 test batch (AVSBench test.sh); one ObjectMetrics.update each

METRIC_DEFINITIONS = {
    # AVS-Object (S4, MS3): keys of ObjectMetrics.compute()
    "ObjectMetrics": {
        "j_official": "AVSBench J ('mIoU'): per frame IoU of (prob > 0.5) vs GT, an empty-GT frame scores its "
                      "true-negative fraction TN/(H*W); mean over the frames of a test batch, then mean over "
                      "batches",
        "f_official": "AVSBench F-measure: beta^2=0.3, 255 thresholds linspace(0,1-1e-10); per test batch the "
                      "mean F over its non-empty-GT frames, max over thresholds; mean over batches (a batch "
                      "with no non-empty GT frame scores 0); depends on the test batch size (official: 4 clips)",
        "jf_official": "(j_official + f_official) / 2",
        "j_per_frame": "J as in j_official, but the mean over all scored frames (independent of batching)",
        "f_whole_set": "F-measure as in f_official with the whole set as one batch: mean F over all "
                       "non-empty-GT frames, max over the 255 thresholds (independent of batching)",
        "f_whole_set_threshold": "the threshold that gives f_whole_set",
        "jf_whole_set": "(j_per_frame + f_whole_set) / 2",
        "num_frames": "number of scored (valid) frames",
        "num_batches": "number of test batches with at least one scored frame",
    },
    # AVS-Semantic: keys of SemanticMetrics.compute()
    "SemanticMetrics": {
        "miou_official": "AVSBench AVSS mIoU: IoU per frame and class; per class the mean over the frames where "
                         "the class is in the GT or the prediction; mean over all Kc+1 classes incl. background, "
                         "a class never seen counts 0; every slot of the 10-frame padded clip counts, a padded "
                         "slot as a background frame predicted background",
        "f_official": "AVSBench AVSS F: beta^2=0.3 F per frame and class of the argmax prediction, averaged like "
                      "miou_official (same frame counts, NaN -> 0)",
        "miou_real_frames": "as miou_official over the real, labelled frames only (no padding slots)",
        "f_real_frames": "as f_official over the real, labelled frames only",
        "miou_accumulated_real_frames": "NOT official, for comparison: per class sum of intersections / sum of "
                                        "unions over the real labelled frames, mean over all Kc+1 classes",
        "num_official_frames": "number of frame slots scored by the official protocol (padding included)",
        "num_real_frames": "number of real, labelled frames scored",
    },
}


# ----------------------------------------------------------------------------------------------------
# AVS-Object (binary)
# ----------------------------------------------------------------------------------------------------

def binary_frame_iou(pred_fg: torch.Tensor, gt_fg: torch.Tensor) -> torch.Tensor:
    """J of each frame, as the official `mask_iou`.

    Args:
        pred_fg: (frames, H, W) bool, the binarised prediction (prob > 0.5).
        gt_fg:   (frames, H, W) bool, the ground truth.
    Returns:
        (frames,) float64: |P & G| / (|P | G| + 1e-7), or for a frame whose GT is empty the true-negative
        fraction |~P & ~G| / (H*W + 1e-7), so an empty prediction of an empty GT scores 1.
    """
    num_pixels = pred_fg.shape[-1] * pred_fg.shape[-2]
    inter = (pred_fg & gt_fg).flatten(1).sum(1).double()  # (frames,)
    union = (pred_fg | gt_fg).flatten(1).sum(1).double()  # (frames,)
    true_neg = (~pred_fg & ~gt_fg).flatten(1).sum(1).double()  # (frames,)
    empty_gt = gt_fg.flatten(1).sum(1) == 0  # (frames,) bool
    iou = inter / (union + IOU_EPS_BINARY)  # (frames,)
    iou_empty = true_neg / (num_pixels + IOU_EPS_BINARY)  # (frames,)
    return torch.where(empty_gt, iou_empty, iou)  # (frames,)


def official_thresholds(num_thresholds: int = NUM_THRESHOLDS) -> torch.Tensor:
    """The official thresholds t_k = linspace(0, 1 - 1e-10, 255), in float32 as the official code makes them
    (in float32 the last one rounds to exactly 1.0). Returns (thresholds,) float32."""
    return torch.linspace(0, 1 - 1e-10, num_thresholds, dtype=torch.float32)  # (thresholds,)


def binary_frame_fmeasure(prob: torch.Tensor, gt_fg: torch.Tensor,
                          num_thresholds: int = NUM_THRESHOLDS, beta2: float = BETA2) -> torch.Tensor:
    """F-measure of each frame at each threshold, as the official `_eval_pr` + `Eval_Fmeasure`.

    For threshold t_k: Y = (prob >= t_k), TP = |Y & G|, prec = TP / (|Y| + 1e-20), rec = TP / (|G| + 1e-20),
    F = (1 + beta2) prec rec / (beta2 prec + rec), NaN -> 0.

    Args:
        prob:  (frames, H, W) float in [0, 1], foreground probability.
        gt_fg: (frames, H, W) bool ground truth (callers pass non-empty frames only, as the official code skips
               empty ones; an empty frame here gives F = 0 at every threshold).
    Returns:
        (frames, thresholds) float64.
    """
    thresholds = official_thresholds(num_thresholds).to(device=prob.device, dtype=prob.dtype)  # (thresholds,)
    p = prob.flatten(1)  # (frames, H*W)
    g = gt_fg.flatten(1).double()  # (frames, H*W)
    # Instead of one comparison per threshold and pixel (a (frames, thresholds, H*W) tensor), find for
    # every pixel how many thresholds it passes: level = #{k : t_k <= p}; the pixel is in Y_k exactly
    # when k < level.
    level = torch.searchsorted(thresholds, p.contiguous(), right=True)  # (frames, H*W) int64 in 0..thresholds
    # (frames, thresholds+1): one histogram bin per level
    hist_all = torch.zeros(p.shape[0], num_thresholds + 1, dtype=torch.float64, device=p.device)
    hist_all.scatter_add_(1, level, torch.ones_like(g))  # (frames, thresholds+1) pixels per level
    hist_fg = torch.zeros_like(hist_all).scatter_add_(1, level, g)  # (frames, thresholds+1) GT pixels per level
    # |Y_k| = pixels with level > k = sum of the histogram above k (reverse cumulative sum).
    num_pos = hist_all.flip(1).cumsum(1).flip(1)[:, 1:]  # (frames, thresholds)
    tp = hist_fg.flip(1).cumsum(1).flip(1)[:, 1:]  # (frames, thresholds)
    num_gt = g.sum(1, keepdim=True)  # (frames, 1)
    prec = tp / (num_pos + PR_EPS_BINARY)  # (frames, thresholds)
    rec = tp / (num_gt + PR_EPS_BINARY)  # (frames, thresholds)
    f = (1 + beta2) * prec * rec / (beta2 * prec + rec)  # (frames, thresholds), 0/0 = NaN where tp = 0
    return torch.nan_to_num(f, nan=0.0)  # (frames, thresholds)


class _SumAccumulator:
    """Shared machinery: the state is a dict of float64 tensors that only ever get *added to*.

    Because every entry is a sum (of scores, of counts), two accumulators combine by adding their states
    (`merge`), and `torch.distributed.all_reduce(SUM)` over ranks gives the state one process would have
    built from all the batches. Means are formed only in `compute()`.
    """

    def _init_state(self, shapes: dict):
        self._state = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}

    def reset(self):
        """Zero every sum."""
        for v in self._state.values():
            v.zero_()

    def state(self) -> dict:
        """A copy of the sums: dict name -> float64 CPU tensor (save it, send it, merge it)."""
        return {k: v.clone() for k, v in self._state.items()}

    def load_state(self, state: dict):
        """Replace the sums by `state` (as returned by `state()`)."""
        for k in self._state:
            self._state[k] = state[k].detach().to(dtype=torch.float64, device="cpu").clone()

    def merge(self, other) -> "_SumAccumulator":
        """Add the sums of `other` (an accumulator of the same kind and settings, or its `state()`)."""
        other_state = other.state() if isinstance(other, _SumAccumulator) else other
        for k in self._state:
            self._state[k] += other_state[k].to(dtype=torch.float64, device="cpu")
        return self

    def all_reduce(self) -> "_SumAccumulator":
        """Sum the state over all ranks when torch.distributed is initialised; no-op otherwise.

        All sums are packed into one vector, so this is a single collective. NCCL needs a CUDA tensor, gloo
        takes a CPU one. Every rank ends with the global sums, so every rank's `compute()` agrees.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        names = list(self._state)
        flat = torch.cat([self._state[k].flatten() for k in names])  # (total,) float64
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flat = flat.to(device)  # (total,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()  # (total,)
        offset = 0
        for k in names:
            n = self._state[k].numel()
            self._state[k] = flat[offset:offset + n].view_as(self._state[k]).clone()  # original shape
            offset += n
        return self


class ObjectMetrics(_SumAccumulator):
    """AVS-Object (S4 / MS3) accumulator: J, F-measure and J&F, official and batch-independent.

    One `update` call must be one official test batch (4 clips x 5 frames for the paper's numbers), because
    the official J and F are means of per-batch values and F's best threshold is chosen per batch.

    Args (constructor):
        num_thresholds: the number of F thresholds (official 255).
        beta2: beta^2 of the F-measure (official 0.3).
        threshold: foreground probability above which a pixel is foreground for J (official 0.5, strict >).

    `update(fg_prob, gt, valid)`:
        fg_prob: (B, T, H, W) float foreground probability in [0, 1] (sigmoid of the logit).
        gt:      (B, T, H, W) ground truth, nonzero = foreground (int or float {0, 1}).
        valid:   (B, T) bool, frames to score (real frames that carry ground truth); None = all.

    `compute() -> dict` of floats, keys and meanings in `METRIC_DEFINITIONS`: j_official, f_official,
    jf_official, j_per_frame, f_whole_set, f_whole_set_threshold, jf_whole_set, num_frames, num_batches.
    With nothing accumulated every value is 0.
    """

    definitions = METRIC_DEFINITIONS["ObjectMetrics"]

    def __init__(self, num_thresholds: int = NUM_THRESHOLDS, beta2: float = BETA2, threshold: float = 0.5):
        self.num_thresholds = num_thresholds
        self.beta2 = beta2
        self.threshold = threshold
        self._init_state({
            "j_batch_sum": (),  # sum over batches of the batch-mean J
            "f_batch_sum": (),  # sum over batches of the batch's best-threshold F
            "num_batches": (),  # batches with at least one scored frame
            "j_frame_sum": (),  # sum over frames of J
            "num_frames": (),  # scored frames
            "f_frame_sum": (num_thresholds,),  # (thresholds,) sum over non-empty-GT frames of F at each threshold
            "num_nonempty_frames": (),  # frames with non-empty GT (the frames F is averaged over)
        })

    @torch.no_grad()
    def update(self, fg_prob: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None):
        if valid is None:
            valid = torch.ones(fg_prob.shape[:2], dtype=torch.bool, device=fg_prob.device)  # (B, T)
        valid = valid.to(device=fg_prob.device, dtype=torch.bool)  # (B, T)
        # PAPER: the official code scores every frame of a val/test clip (all are real and labelled); we
        # score only frames marked valid, so unlabelled or padded frames never enter J or F.
        # Official: float32 sigmoid; low-precision (AMP) probabilities are raised to float32 first.
        prob = fg_prob[valid]  # (frames, H, W)
        prob = prob if prob.dtype == torch.float64 else prob.float()  # (frames, H, W)
        gt_fg = gt.to(fg_prob.device)[valid] != 0  # (frames, H, W) bool
        if prob.shape[0] == 0:
            return  # PAPER: a batch without any scored frame is not counted (the official code never has one)
        s = self._state

        # J: official mask_iou, then the batch mean.
        iou = binary_frame_iou(prob > self.threshold, gt_fg).cpu()  # (frames,)
        s["j_batch_sum"] += iou.mean()
        s["j_frame_sum"] += iou.sum()
        s["num_frames"] += iou.numel()
        s["num_batches"] += 1

        # F: official Eval_Fmeasure skips frames with an empty GT, averages F over the rest at each
        # threshold, and takes the best threshold of this batch. A batch with no non-empty frame scores 0
        # and still counts as a batch.
        nonempty = gt_fg.flatten(1).any(1)  # (frames,) bool
        if nonempty.any():
            f = binary_frame_fmeasure(prob[nonempty], gt_fg[nonempty],
                                      self.num_thresholds, self.beta2).cpu()  # (non-empty frames, thresholds)
            s["f_batch_sum"] += f.mean(0).max()
            # NOT IN PAPER (nor in the official code): the per-threshold sums over the whole set, so that one threshold
            # is chosen for all frames (f_whole_set) and the number does not depend on the batching.
            s["f_frame_sum"] += f.sum(0)  # (thresholds,)
            s["num_nonempty_frames"] += f.shape[0]

    def compute(self) -> dict:
        s = self._state
        nb, nf, nne = s["num_batches"].item(), s["num_frames"].item(), s["num_nonempty_frames"].item()
        j_off = s["j_batch_sum"].item() / nb if nb else 0.0
        f_off = s["f_batch_sum"].item() / nb if nb else 0.0
        j_frame = s["j_frame_sum"].item() / nf if nf else 0.0
        f_curve = s["f_frame_sum"] / max(nne, 1)  # (thresholds,) mean F over all non-empty frames per threshold
        best = int(f_curve.argmax())
        f_whole = f_curve[best].item() if nne else 0.0
        # J&F is the mean of J and F, as in the paper's Table 1 (e.g. 83.9 = (79.5 + 88.2) / 2).
        return {
            "j_official": j_off,
            "f_official": f_off,
            "jf_official": (j_off + f_off) / 2,
            "j_per_frame": j_frame,
            "f_whole_set": f_whole,
            "f_whole_set_threshold": official_thresholds(self.num_thresholds)[best].item(),
            "jf_whole_set": (j_frame + f_whole) / 2,
            "num_frames": int(nf),
            "num_batches": int(nb),
        }


# ----------------------------------------------------------------------------------------------------
# AVS-Semantic
# ----------------------------------------------------------------------------------------------------

def semantic_frame_stats(pred: torch.Tensor, gt: torch.Tensor, num_ids: int, beta2: float = BETA2) -> dict:
    """Per frame and class counts, IoU and F, as the official `_batch_miou_fscore` (one frame at a time there).

    Args:
        pred: (frames, H, W) int64 predicted class ids in 0..num_ids-1.
        gt:   (frames, H, W) int64 ground-truth class ids in 0..num_ids-1 (other values are ignored, as
              `torch.histc` drops values outside its range in the official code).
        num_ids: Kc + 1.
    Returns dict of (frames, Kc+1) float64:
        inter  I = #(pred = gt = c), union U = #(pred = c) + #(gt = c) - I,
        iou    I / (U + 2.22e-16)  (0 where U = 0),
        f      (1 + beta2) P R / (beta2 P + R), P = I / #(pred = c), R = I / #(gt = c), NaN -> 0,
        seen   1.0 where U > 0 (the class is in the GT or the prediction of that frame).
    """
    n = pred.shape[0]
    p = pred.reshape(n, -1)  # (frames, H*W)
    g = gt.reshape(n, -1)  # (frames, H*W)
    in_range_p = (p >= 0) & (p < num_ids)  # (frames, H*W) bool
    in_range_g = (g >= 0) & (g < num_ids)  # (frames, H*W) bool

    def count(ids, keep):  # per-frame histogram of class ids over the kept pixels -> (frames, Kc+1)
        out = torch.zeros(n, num_ids, dtype=torch.float64, device=ids.device)  # (frames, Kc+1)
        return out.scatter_add_(1, ids.clamp(0, num_ids - 1), keep.double())  # (frames, Kc+1)

    area_pred = count(p, in_range_p)  # (frames, Kc+1)
    area_gt = count(g, in_range_g)  # (frames, Kc+1)
    inter = count(p, in_range_p & (p == g))  # (frames, Kc+1)
    union = area_pred + area_gt - inter  # (frames, Kc+1)
    iou = inter / (union + IOU_EPS_SEMANTIC)  # (frames, Kc+1)
    prec = inter / area_pred  # (frames, Kc+1), NaN where the class is not predicted
    rec = inter / area_gt  # (frames, Kc+1), NaN where the class is not in the GT
    f = torch.nan_to_num((1 + beta2) * prec * rec / (beta2 * prec + rec), nan=0.0)  # (frames, Kc+1)
    return {"inter": inter, "union": union, "iou": iou, "f": f, "seen": (union > 0).double()}


class SemanticMetrics(_SumAccumulator):
    """AVSS accumulator: the official mIoU and F, in the official padded-frame protocol and on real frames.

    Both protocols: per frame f and class c, IoU_{f,c} and F_{f,c}; per class the sums S_c = sum_f IoU_{f,c},
    Fs_c = sum_f F_{f,c} and the count N_c = #frames where c is in the GT or the prediction; per class
    S_c / N_c (0 when N_c = 0); the reported value is the mean over all Kc + 1 classes, background included
    and never-seen classes counting 0. This is not sum(I) / sum(U); that one is reported separately as
    `miou_accumulated_real_frames`, for comparison only.

    * official protocol: every one of the T slots of a clip (AVSBench pads v1 clips to 10) is a frame; a padded
      slot (frame_valid False) counts as background predicted background (see `update`); a real frame
      without a label counts with an all-background GT, as in the official loader.
    * real-frames protocol: only frames with frame_valid and label_valid.

    Args (constructor, keyword-only):
        num_classes: Kc foreground classes (70 for AVSS; the histogram has Kc + 1 bins, id 0 = background).
        beta2: beta^2 of the F-measure (official 0.3).

    `update(pred, gt, frame_valid, label_valid)`:
        pred: (B, T, H, W) int64 predicted class ids 0..Kc.
        gt:   (B, T, H, W) int64 ground-truth class ids 0..Kc.
        frame_valid: (B, T) bool, real frame (not padding).
        label_valid: (B, T) bool, the frame carries ground truth.

    `compute() -> dict` of floats: miou_official, f_official, miou_real_frames, f_real_frames,
    miou_accumulated_real_frames, num_official_frames, num_real_frames (meanings in `METRIC_DEFINITIONS`).
    `per_class() -> dict` of lists (Kc+1 floats each): iou_official, f_official, iou_real_frames, f_real_frames.
    """

    definitions = METRIC_DEFINITIONS["SemanticMetrics"]

    def __init__(self, *, num_classes: int, beta2: float = BETA2):
        # Keyword-only on purpose: num_classes is Kc (foreground classes, as everywhere in this repository),
        # not Kc + 1. One class too many would silently add a never-seen class that counts 0 in the mean.
        self.num_classes = num_classes
        self.num_ids = num_classes + 1
        self.beta2 = beta2
        k1 = (self.num_ids,)
        self._init_state({
            "iou_sum_official": k1, "f_sum_official": k1, "count_official": k1,  # (Kc+1,) S_c, Fs_c, N_c
            "iou_sum_real": k1, "f_sum_real": k1, "count_real": k1,  # (Kc+1,) same on real labelled frames
            "inter_sum_real": k1, "union_sum_real": k1,  # (Kc+1,) for the accumulated (non-official) mIoU
            "num_official_frames": (), "num_real_frames": (),
        })

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, frame_valid: torch.Tensor,
               label_valid: torch.Tensor):
        device = pred.device
        frame_valid = frame_valid.to(device=device, dtype=torch.bool)  # (B, T)
        label_valid = label_valid.to(device=device, dtype=torch.bool)  # (B, T)
        gt = gt.to(device)  # (B, T, H, W)
        pad = ~frame_valid[:, :, None, None]  # (B, T, 1, 1) bool
        # PAPER: the paper does not say how padded slots are scored. Official AVSBench (and AVSegFormer)
        # multiply the logits of padded frames by the frame flag, so all logits are 0 and argmax picks id 0;
        # their labels are zero maps. We reproduce that whatever our model predicts there: each padded slot
        # is a background frame predicted background (IoU 1 for class 0, N_0 + 1).
        pred_off = pred.masked_fill(pad, 0)  # (B, T, H, W)
        # The official metric ignores the label flag: a real frame without a label file has a zero
        # (all-background) label map. This never happens on the official val/test splits.
        gt_off = gt.masked_fill(pad | ~label_valid[:, :, None, None], 0)  # (B, T, H, W)
        stats = semantic_frame_stats(pred_off.flatten(0, 1), gt_off.flatten(0, 1),
                                     self.num_ids, self.beta2)  # dict of (B*T, Kc+1)
        real = (frame_valid & label_valid).flatten().cpu()  # (B*T,) bool
        stats = {k: v.cpu() for k, v in stats.items()}  # (B*T, Kc+1) each
        s = self._state
        s["iou_sum_official"] += stats["iou"].sum(0)  # (Kc+1,)
        s["f_sum_official"] += stats["f"].sum(0)  # (Kc+1,)
        s["count_official"] += stats["seen"].sum(0)  # (Kc+1,)
        s["num_official_frames"] += real.numel()
        # Real frames only: the padded slots and unlabelled frames drop out (as COMBO-AVS evaluates).
        s["iou_sum_real"] += stats["iou"][real].sum(0)  # (Kc+1,)
        s["f_sum_real"] += stats["f"][real].sum(0)  # (Kc+1,)
        s["count_real"] += stats["seen"][real].sum(0)  # (Kc+1,)
        s["inter_sum_real"] += stats["inter"][real].sum(0)  # (Kc+1,)
        s["union_sum_real"] += stats["union"][real].sum(0)  # (Kc+1,)
        s["num_real_frames"] += real.sum()

    @staticmethod
    def _per_class(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """total / count per class with 0/0 -> 0 (the official `nan -> 0`). (Kc+1,) -> (Kc+1,)."""
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))  # (Kc+1,)

    def per_class(self) -> dict:
        s = self._state
        return {
            "iou_official": self._per_class(s["iou_sum_official"], s["count_official"]).tolist(),
            "f_official": self._per_class(s["f_sum_official"], s["count_official"]).tolist(),
            "iou_real_frames": self._per_class(s["iou_sum_real"], s["count_real"]).tolist(),
            "f_real_frames": self._per_class(s["f_sum_real"], s["count_real"]).tolist(),
        }

    def compute(self) -> dict:
        s = self._state
        pc = self.per_class()
        mean = lambda xs: sum(xs) / len(xs)  # mean over all Kc+1 classes, never-seen ones are 0
        # PAPER: the official log also prints "miou_noBg", which drops the LAST class (id 70, 'woman') rather
        # than background (compute_color_metrics.py); we do not report it.
        acc = self._per_class(s["inter_sum_real"], s["union_sum_real"])  # (Kc+1,)
        return {
            "miou_official": mean(pc["iou_official"]),
            "f_official": mean(pc["f_official"]),
            "miou_real_frames": mean(pc["iou_real_frames"]),
            "f_real_frames": mean(pc["f_real_frames"]),
            "miou_accumulated_real_frames": acc.mean().item(),
            "num_official_frames": int(s["num_official_frames"].item()),
            "num_real_frames": int(s["num_real_frames"].item()),
        }


def headline(results: dict) -> float:
    """The number of a split's metrics that picks train.py's best.pt: mIoU for semantic tasks
    (AVSS, synthetic), J&F for AVS-Object (S4, MS3)."""
    for key in ("miou_official", "jf_official"):
        if key in results:
            return float(results[key])
    raise KeyError(f"no headline metric in {sorted(results)}")


# The numbers printed at the end of a run (metrics.json holds every measure): the paper's Table 1
# columns for the dataset, per evaluated split; the synthetic benchmark fills all three of them.
HEADLINE = {
    "avss": [("mIoU", "miou_official"), ("F", "f_official")],
    "s4": [("J", "j_official"), ("F", "f_official"), ("J&F", "jf_official")],
    "ms3": [("J", "j_official"), ("F", "f_official"), ("J&F", "jf_official")],
    "synthetic": [("mIoU", "miou_official"), ("F", "f_official"),
                  ("single-source J&F", "single_jf_official"), ("multi-source J&F", "multi_jf_official")],
}


def summary(results: dict) -> str:
    """A small table of the headline numbers of every evaluated split (see HEADLINE), under a line
    that names the evaluated weights (results["model"], where a training run wrote it)."""
    cols = HEADLINE[results["dataset"]]
    splits = [k for k, v in results.items() if isinstance(v, dict)
              and k not in ("metric_definitions", "train", "codebook", "model")]
    width = max(len(s) for s in splits) if splits else 5
    lines = ["results (every measure: metrics.json):"]
    if "model" in results:
        m = results["model"]
        name = "J&F" if results["dataset"] in ("s4", "ms3") else "mIoU"  # headline()'s measure
        val = "no val score" if m["val"] is None else f"val {name} {m['val']:.3f}"
        last = ""  # a training run's: are these the last model's numbers?
        if "train" in results:
            last = ("; it is the last model" if m["step"] == results["train"]["steps"]
                    else "; the last model's numbers: --eval-only last.pt")
        lines.append(f"  model: {m['checkpoint']} (step {m['step']}, epoch {m['epoch']}, {val}){last}")
    lines.append("  " + "split".ljust(width) + "".join(f"  {name:>17}" for name, _ in cols))
    for split in splits:
        cells = []
        for _, key in cols:
            v = results[split].get(key)
            # a split without single- (or multi-) source frames has no such J&F
            present = v is not None and not (key.startswith(("single", "multi"))
                                             and not results[split].get(key.split("_")[0] + "_num_frames"))
            cells.append(f"  {v:>17.3f}" if present else f"  {'-':>17}")
        lines.append("  " + split.ljust(width) + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The codebook of a run (not AVSBench's): how many of the K words the tokens use
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def codebook_stats(indices: torch.Tensor, num_codes: int) -> dict:
    """How much of the codebook a batch uses.

    Args:
        indices:   (...) int64 chosen code indices (any shape).
        num_codes: K.
    Returns:
        dict with usage:      float, fraction of the K codes chosen at least once;
                  perplexity: float, exp(-sum_k p_k log p_k) of the code histogram p_k = count_k / V:
                              1 when one code takes everything, K under uniform use (1.0 if empty);
                  dead:       int, number of codes never chosen.
    """
    counts = torch.bincount(indices.reshape(-1).long(), minlength=num_codes).double()  # (K,)
    total = counts.sum().clamp(min=1.0)  # ()
    p = counts / total  # (K,) code histogram
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum()  # () 0 * log(0) counts as 0
    used = int((counts > 0).sum())
    return {
        "usage": used / num_codes,
        "perplexity": float(torch.exp(entropy)),
        "dead": num_codes - used,
    }


class CollapseWatch:
    """A guard against codebook collapse during training (NOT IN PAPER: a diagnostic).

    N tokens that use N words or fewer in every batch have collapsed: each token index keeps one
    codeword whatever the sound, and the quantized tokens carry no information about it. `update`
    is called on the quantized training steps that are logged (train.LOG_EVERY) with the words in
    use of a path ('global' or 'local'); when a path has used <= N words at every such step from
    `patience` steps ago (or more) up to now, it returns a warning naming the step, once per path.
    `state` is a dict that holds what the watch remembers (train.py keeps it in the run's state, so
    that a resumed run warns where the unbroken one does).
    """

    def __init__(self, num_tokens: int, patience: int = 100, state: dict | None = None):
        self.num_tokens, self.patience = num_tokens, patience
        state = {} if state is None else state
        self.since = state.setdefault("since", {})  # path -> the first step of its current run of steps with <= N words
        self.fired = state.setdefault("fired", [])  # paths already warned about

    def update(self, step: int, path: str, words: int) -> str | None:
        if words > self.num_tokens:
            self.since.pop(path, None)
            return None
        since = self.since.setdefault(path, step)
        if step - since + 1 >= self.patience and path not in self.fired:
            self.fired.append(path)
            return (f"codebook collapse at step {step}: the {path} tokens used <= {self.num_tokens} "
                    f"words (N = {self.num_tokens}) in every batch logged since step {since}")
        return None

    def observe(self, step: int, indices: dict, num_codes: int, quantized: bool) -> tuple[dict, list]:
        """A logged step's codeword indices ({'global': (B, N), 'local': (B, T, N)}) as the log's
        fields (codebook_usage, codebook_perplexity, codebook_dead; local_codebook_...), and the
        warnings of update on a quantized step (in the warm-up VQ(x) = x chooses no word)."""
        fields, messages = {}, []
        for path in ("global", "local"):
            if path in indices:
                st = codebook_stats(indices[path], num_codes)
                fields.update({("codebook_" if path == "global" else "local_codebook_") + k: float(v)
                               for k, v in st.items()})
                message = self.update(step, path, num_codes - st["dead"]) if quantized else None
                messages += [message] if message else []
        return fields, messages
