"""Pretrain the visual side as referring segmentation: our stand-in for ReferFormer's whole model.

What this file teaches
----------------------
The authors' commands train SQD from `r50_pretrained.pth`, ReferFormer's whole model pretrained
for referring segmentation: a query that names an object (there, a sentence) is decoded by
TrD_segm into the filters of a dynamic convolution that draws that object's mask. So in the paper
the quantized tokens learn to *address* a visual encoder, FPN and mask decoder that already
segment what a query names. Trained from scratch, the mask decoder here learns to segment while
its queries are drawn from a codebook fixed by k-means at step 300.

This script gives the CPU preset the same kind of start on the synthetic benchmark's train split,
with no audio: every one of the Kc categories gets a learned query embedding E[c]; in every frame
the Kc queries run through the visual encoder's features, the FPN and the mask decoder of SQD, and
query c must segment every *visible* object of category c (sounding or silent; the synthetic
generator's object map) and say "no object" where none is visible. The assignment of queries to
targets is fixed (query c to category c), so there is no Hungarian matching: this is referring
segmentation, not detection. The loss is eq. (8)'s L_segm with the synthetic recipe's weights.
Only the visual encoder, the FPN and the mask decoder are kept (the embedding is dropped), and
`train.py --visual-regime pretrained` loads them into the full model and the baseline alike.

    OMP_NUM_THREADS=1 python tools/pretrain_visual.py --seed 0 --out visual_v2_s0.pt
    python train.py --visual-regime pretrained        # built on first use and cached, as the audio

Reading order: ReferringSegmenter (the model: SQD's parts + the category queries),
referring_targets and fixed_assignment (the targets), pretrain (the loop), cached_weights
(what train.py calls), load_into (what it loads), main.

Shape alphabet (docs/shapes.md): B clips, T frames, Kc categories (= the queries here), C model
channels, H, W image size, h, w mask size, Cm mask channels, S visual tokens of one frame,
L decoder layers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data  # noqa: E402
import synthetic  # noqa: E402
from matcher import SetCriterion, track_batch  # noqa: E402
from sqd import SQD, ModelConfig, _frame_tokens  # noqa: E402
from tools.pretrain_audio import _one_thread, save_weights  # noqa: E402

DEFAULT_STEPS = 1000       # the same number of steps as the default SQD run
KEPT = ("visual_encoder.", "fpn.", "mask_decoder.")  # the modules a pretraining hands to SQD
# the synthetic recipe's loss weights (train.py RECIPES["synthetic"]), kept in step by a test
LOSS_WEIGHTS = dict(loss_class=2.0, loss_mask=1.0, loss_dice=0.5, loss_bbox=1.0, loss_giou=0.5)


class ReferringSegmenter(nn.Module):
    """SQD's visual encoder, FPN and mask decoder, queried by one learned embedding per category.

    forward(frames, frame_valid) -> the mask decoder's dict: pred_logits (B, T, Kc, Kc),
    pred_masks (B, T, Kc, h, w), pred_boxes (B, T, Kc, 4), aux_outputs; query c names category c+1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # the SQD parts, built by SQD itself so that their names and shapes are SQD's
        sqd = SQD(replace(cfg, use_gsd=False, use_avsr=False, use_lsd=False, slot_positions=False))
        self.visual_encoder, self.fpn, self.mask_decoder = sqd.visual_encoder, sqd.fpn, sqd.mask_decoder
        self.queries = nn.Embedding(cfg.num_classes, cfg.dim)  # (Kc, C) E[c], one per category

    def forward(self, frames, frame_valid=None):
        B, T = frames.shape[:2]                                          # (B, T, 3, H, W)
        vis = self.visual_encoder(frames, frame_valid)
        F_v, pos = vis["levels"], vis["pos"]                             # 3 x (B, T, C, H_l, W_l)
        f_out = self.fpn([F_l.flatten(0, 1) for F_l in F_v], vis["c2"].flatten(0, 1))  # (B*T, Cm, h, w)
        f_out = f_out.unflatten(0, (B, T))                               # (B, T, Cm, h, w)
        memory, memory_pos = _frame_tokens(F_v, pos)                     # (B, T, S, C) each
        q = self.queries.weight[None, None].expand(B, T, -1, -1)          # (B, T, Kc, C)
        return self.mask_decoder(q, memory, memory_pos, f_out)


def referring_targets(object_map: torch.Tensor, num_classes: int, size):
    """The target of query c: every visible object of category c (matcher.Tracks, Kc slots, slot
    c-1 = category c; `real` where the category is visible in some frame of the clip).
    object_map: (B, T, H, W) int64, the category of the visible object at each pixel (0: none)."""
    B, T = object_map.shape[:2]
    return track_batch(object_map, torch.ones(B, T, dtype=torch.bool), num_classes, size)


def fixed_assignment(real: torch.Tensor, layers: int) -> torch.Tensor:
    """Query c of every decoder layer is assigned to slot c when its category is visible, else to
    nothing ("no object"): real (B, Kc) bool -> (B, L*Kc) int64 as HungarianMatcher returns."""
    B, Kc = real.shape
    slots = torch.arange(Kc).expand(B, Kc)                               # (B, Kc)
    one = torch.where(real, slots, -1)                                   # (B, Kc)
    return one.repeat(1, layers)                                         # (B, L*Kc)


def _batch(dataset, indices):
    """Frames (B, T, 3, H, W) and object maps (B, T, H, W) of some clips of a synthetic split."""
    frames, maps = [], []
    for i in indices:
        clip = dataset.generate_pixels(int(i))
        x = (clip["frames"] - data.IMAGENET_MEAN) / data.IMAGENET_STD    # (T, H, W, 3)
        frames.append(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))  # (T, 3, H, W)
        maps.append(torch.from_numpy(clip["object_map"]))                 # (T, H, W)
    return torch.stack(frames).float(), torch.stack(maps)                # (B, T, 3, H, W), (B, T, H, W)


def pretrain(cfg: ModelConfig, seed: int, steps: int = DEFAULT_STEPS, batch: int = 4,
             lr: float = 4e-4, img_size: int = 64, train_clips: int | None = None, log=print):
    """Train ReferringSegmenter on the train split; return the state of the KEPT modules and a report.

    The same arguments give bit-identical weights: one thread, its own random streams (the caller's
    RNG state is left as it was). AdamW with the backbone at half the lr, gradient clipping 0.1 and
    the synthetic recipe's loss weights, as train.py trains SQD.
    """
    log = log or (lambda _: None)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        train = synthetic.SyntheticAVS("train", seed=seed, num_clips=train_clips, img_size=img_size)
        model = ReferringSegmenter(cfg).train()
        backbone = [p for n, p in model.named_parameters() if n.startswith("visual_encoder.backbone.")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("visual_encoder.backbone.")]
        opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": backbone, "lr": lr * 0.5}],
                                weight_decay=5e-4)
        criterion = SetCriterion(cfg.num_classes, weights=LOSS_WEIGHTS)
        order = np.random.default_rng(seed).permutation(len(train))
        log(f"visual pretraining ({synthetic.SYNTHETIC_VERSION}, seed {seed}, {steps} steps): referring segmentation "
            f"of {cfg.num_classes} categories on {len(train)} train clips ...")
        running = None
        for step in range(steps):
            at = (step * batch) % len(order)
            frames, object_map = _batch(train, order[at:at + batch])     # (B, T, 3, H, W), (B, T, H, W)
            out = model(frames)
            targets = referring_targets(object_map, cfg.num_classes, out["pred_masks"].shape[-2:])
            assignment = fixed_assignment(targets.real, 1 + len(out["aux_outputs"]))  # (B, L*Kc)
            total, _ = criterion.losses(out, targets, assignment)         # eq. (8)'s L_segm
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            loss = float(total.detach())
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if (step + 1) % 250 == 0:
                log(f"  referring step {step + 1}/{steps}: loss {running:.3f}")
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(KEPT)}
    report = {"benchmark": synthetic.SYNTHETIC_VERSION, "seed": seed, "steps": steps, "final_loss": running,
              "seconds": round(time.time() - t0, 1)}
    log(f"visual pretraining done: loss {running:.3f} ({report['seconds']:.0f} s)")
    return state, report


def cache_name(cfg: ModelConfig, seed: int, steps: int) -> str:
    """'visual-v2-s{seed}-{steps}-c{C}-k{Kc}.pt': one file per seed and size (v2: the benchmark's
    version, synthetic.SYNTHETIC_VERSION)."""
    return f"visual-{synthetic.SYNTHETIC_VERSION}-s{seed}-{steps}-c{cfg.dim}-k{cfg.num_classes}.pt"


def cached_weights(folder: str, cfg: ModelConfig, seed: int, steps: int = DEFAULT_STEPS,
                   img_size: int = 64, log=print) -> str:
    """The path of the pretrained visual weights in `folder`, built by pretrain() on first use
    (written atomically). A file already there is returned as it is."""
    path = os.path.join(folder, cache_name(cfg, seed, steps))
    if os.path.isfile(path):
        if log:
            log(f"visual side: pretrained weights {path} (cached)")
        return path
    state, _ = pretrain(cfg, seed, steps, img_size=img_size, log=log)
    save_weights(state, path)
    if log:
        log(f"visual side: wrote {path}")
    return path


def load_into(model: SQD, path: str) -> int:
    """Load a pretraining's visual encoder, FPN and mask decoder into an SQD (full model or any
    Table 2 row). Every tensor of the file must exist in the model with the same shape; the model's
    other parameters (audio path, ASDs, codebook, AVSR, the mask decoder's slot positions) stay as
    they are. Returns the number of tensors loaded. ValueError names what does not fit."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad or not state:
        raise ValueError(f"{path}: {len(bad)} tensors do not fit this model (e.g. {bad[:3]}); "
                         f"expected a tools/pretrain_visual.py file of the same preset and classes")
    model.load_state_dict(state, strict=False)
    return len(state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the synthetic benchmark's seed (and the training's)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = p.parse_args(argv)
    from sqd import preset
    num_classes = synthetic.SyntheticAVS("val", seed=args.seed, num_clips=1).num_classes
    state, _ = pretrain(preset("cpu", num_classes=num_classes), args.seed, args.steps)
    save_weights(state, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
