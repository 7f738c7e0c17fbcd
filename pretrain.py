"""Pretrain the CPU preset's two sides on the synthetic benchmark: our stand-ins for AudioSet VGGish
and for ReferFormer's pretrained model.

What this file teaches
----------------------
The paper trains neither side from nothing, and this file gives the CPU preset the same two starts.

The audio network. The paper does not train its audio network: it starts from VGGish, trained on
AudioSet to name the sounds of a clip, and AVSBench and AVSegFormer keep it frozen. The CPU
preset's small audio network (encoders.SmallVGG) has no such weights, and trained from scratch
inside SQD its global tokens never come to depend on the sound. pretrain_audio trains SmallVGG + a
linear head as a per-frame multi-label classifier (binary cross-entropy, one output per category)
on the train split of the synthetic benchmark, single- and multi-source frames alike (an AudioSet
clip carries every label that sounds in it), then keeps only the network. The network probe
(tools/probe_synthetic.py) trains with the same train_classifier, so its numbers describe these
weights. pretrain_audio reports the exact-set accuracy on val, by the number of sounding
categories, and on the val-unseen frames in which a held-out pair sounds.

The visual side. The authors' commands train SQD from `r50_pretrained.pth`, ReferFormer's whole
model pretrained for referring segmentation: a query that names an object (there, a sentence) is
decoded by TrD_segm into the filters of a dynamic convolution that draws that object's mask. So in
the paper the quantized tokens learn to *address* a visual encoder, FPN and mask decoder that
already segment what a query names. Trained from scratch, the mask decoder here learns to segment
while its queries are drawn from a codebook fixed by k-means at step 300. pretrain_visual trains on
the train split with no audio: every one of the Kc categories gets a learned query embedding E[c];
in every frame the Kc queries run through the visual encoder's features, the FPN and the mask
decoder of SQD, and query c (0-based) must segment every *visible* object of category c + 1
(class ids start at 1; sounding or silent; the synthetic generator's object map) and say "no
object" where none is visible. The assignment of queries to targets is fixed (query c to category
c + 1), so there is no Hungarian matching: this is
referring segmentation, not detection. The loss is eq. (8)'s L_segm with the synthetic recipe's
weights. Only the visual encoder, the FPN and the mask decoder are kept (the embedding is dropped).

    OMP_NUM_THREADS=1 python pretrain.py audio --seed 0 --out small_vgg_v2_s0.pt
    python train.py --audio-weights small_vgg_v2_s0.pt   # loaded and frozen
    OMP_NUM_THREADS=1 python pretrain.py visual --seed 0 --out visual_v2_s0.pt  # (*)
    python train.py                                       # both built on first use and cached

(*) train.py reads a visual file only from STAND_IN_DIR, under pretrain.visual_cache_name(...);
the command writes the same bytes elsewhere, for a look at them.

train.py's synthetic runs of the CPU preset start from these two (pretrained.uses_stand_ins) and
call stand_in_files (cached_audio_weights and cached_visual_weights, the two at once in a first
run): the files are built on first use under
STAND_IN_DIR (runs/audio-weights) and found by later runs. An audio file holds only SmallVGG's state_dict (what
`train.py --audio-weights` loads strictly); a visual file the visual encoder, FPN and mask decoder
(load_visual_into loads them into the full model and the baseline alike). Files are written
atomically (a temporary file, then a rename). The same arguments give bit-identical weights: the
training runs on the CPU with one thread, with its own random streams (the caller's RNG state is
left as it was).

Reading order: the audio network (exact_set_accuracy and frame_table, the data and its score;
train_classifier and predict_sets, the classifier; pretrain_audio, cached_audio_weights), then the
visual side (ReferringSegmenter, the model: SQD's parts + the category queries; referring_targets
and fixed_assignment, the targets; pretrain_visual, the loop; cached_visual_weights), then
stand_in_files (what train.py calls: both files, built on first use) and load_visual_into (what it
loads), then main.

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): B clips, T frames of a clip,
B*T the frames of B clips one after the other (frame_table), Kc foreground classes (the categories;
on the visual side also the queries), 96 x 64 one log-mel example (time steps x mel bands),
C model channels, H, W image size, h, w mask size, Cm mask channels, S visual tokens of one frame,
L decoder layers. Written as words: frames (any set of frames: a selection of a frame table, a test
set), batch (the frames of one training step).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import synthetic
from encoders import SmallVGG
from matcher import SetCriterion, track_batch
from checkpoint import atomic_save
from sqd import SQD, ModelConfig, _frame_tokens, preset

DEFAULT_AUDIO_STEPS = 1500  # the network probe's steps: its accuracy is reported in results/probes.md
DEFAULT_AUDIO_CLIPS = None  # train clips of the audio pretraining; None: the whole train split
DEFAULT_VAL_CLIPS = 500     # clips of val and val-unseen for the audio pretraining's report
DEFAULT_VISUAL_STEPS = 1000  # the same number of steps as the default SQD run
KEPT = ("visual_encoder.", "fpn.", "mask_decoder.")  # the modules a visual pretraining hands to SQD
# the synthetic recipe's loss weights (train.py RECIPES["synthetic"]), kept in step by a test
LOSS_WEIGHTS = dict(loss_class=2.0, loss_mask=1.0, loss_dice=0.5, loss_bbox=1.0, loss_giou=0.5)


@contextlib.contextmanager
def _one_thread():
    """torch on one CPU thread inside the block (bit-identical sums), the caller's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# The audio network: the frames and their score
# ----------------------------------------------------------------------------------------------
def exact_set_accuracy(pred, true):
    """Exact-set accuracy by the number of sounding categories.

    Args:
        pred: (frames, Kc) bool, the predicted set of each frame.
        true: (frames, Kc) bool, the true set.
    Returns:
        dict: str(n) -> {"accuracy": fraction of the frames with n true categories whose predicted
        set equals the true set, "frames": their number}, for every n present, and ">=2" over the
        frames with at least two.
    """
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)  # (frames, Kc)
    exact = (pred == true).all(1)  # (frames,)
    count = true.sum(1)  # (frames,)
    out = {}
    for n in sorted(set(count.tolist())):
        sel = count == n
        out[str(n)] = {"accuracy": float(exact[sel].mean()), "frames": int(sel.sum())}
    sel = count >= 2
    if sel.any():
        out[">=2"] = {"accuracy": float(exact[sel].mean()), "frames": int(sel.sum())}
    return out


def frame_table(ds, indices):
    """Log-mel, sounding set and held-out flag of every frame of clips `indices` of a split.

    B = len(indices) clips of T = ds.frames frames, the frames of a clip one after the other.
    Returns dict: log_mel (B*T, 96, 64) float32, sounding (B*T, Kc) bool, held_out (B*T,) bool (a
    held-out pair sounds together in the frame), multi (B*T,) bool (the frame's clip is
    multi-source), snr_db (B*T,) float, dropout (B*T,) bool (the frame has a dropout).
    """
    mels, sounding, multi, snr, dropout = [], [], [], [], []
    for i in indices:
        clip = ds.generate_audio(i)
        plan = clip["plan"]
        mels.append(clip["log_mel"])  # (T, 96, 64)
        sounding.append(plan["sounding"])  # (T, Kc)
        multi += [plan["multi_source"]] * ds.frames
        snr.append(plan["snr_db"])  # (T,)
        dropped = np.zeros(ds.frames, dtype=bool)  # (T,)
        dropped[[t for t, _, _ in plan["dropouts"]]] = True
        dropout.append(dropped)
    sounding = np.concatenate(sounding)  # (B*T, Kc)
    held_out = np.zeros(len(sounding), dtype=bool)  # (B*T,)
    for a, b in ds.held_out_pairs:
        held_out |= sounding[:, a - 1] & sounding[:, b - 1]
    return {"log_mel": np.concatenate(mels), "sounding": sounding, "held_out": held_out,
            "multi": np.array(multi), "snr_db": np.concatenate(snr), "dropout": np.concatenate(dropout)}


# ----------------------------------------------------------------------------------------------
# The audio network: the classifier
# ----------------------------------------------------------------------------------------------
def train_classifier(train_mel, train_y, steps=1500, batch=32, lr=1e-3, seed=0, log=None):
    """encoders.SmallVGG + a linear head trained alone as a per-frame multi-label classifier.

    The network reads the raw log-mel, as in the CPU preset's model. Adam, binary cross-entropy,
    frames drawn at random (with replacement) from the train frames. pretrain_audio (the pretrained
    audio network a synthetic `train.py` run starts from) and the network probe of
    tools/probe_synthetic.py both train with this function.

    Args:
        train_mel: (frames, 96, 64) float32, train_y: (frames, Kc) bool.
        log: None or a function of one string, called every 250 steps with the loss.
    Returns:
        (net, head): the trained SmallVGG (in eval mode) and nn.Linear(128, Kc).
    """
    torch.manual_seed(seed)
    net = SmallVGG()
    head = nn.Linear(net.embedding_dim, train_y.shape[1])
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    mel = torch.from_numpy(train_mel)  # (frames, 96, 64)
    y = torch.from_numpy(train_y.astype(np.float32))  # (frames, Kc)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        pick = torch.randint(len(mel), (batch,), generator=gen)  # (batch,)
        emb, _ = net(mel[pick].unsqueeze(1))  # (batch, 128)
        loss = nn.functional.binary_cross_entropy_with_logits(head(emb), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % 250 == 0:
            log(f"  network step {step + 1}/{steps}: loss {loss.item():.4f}")
    net.eval()
    return net, head


@torch.no_grad()
def predict_sets(net, head, test_mels):
    """The predicted set of every frame: probability > 0.5, in batches of 256 frames.

    Args:
        test_mels: list of (frames, 96, 64) float32, each set with its own number of frames.
    Returns:
        list of (frames, Kc) bool, one per set.
    """
    preds = []
    for test in test_mels:
        out = [head(net(torch.from_numpy(test[i:i + 256]).unsqueeze(1))[0]) > 0  # (256, Kc), fewer in the last chunk
               for i in range(0, len(test), 256)]
        preds.append(torch.cat(out).numpy())  # (frames, Kc)
    return preds


# ----------------------------------------------------------------------------------------------
# The audio network: the pretraining and its cache
# ----------------------------------------------------------------------------------------------
def pretrain_audio(seed: int, steps: int = DEFAULT_AUDIO_STEPS, train_clips: int | None = None,
                   val_clips: int | None = DEFAULT_VAL_CLIPS, batch: int = 32, log=print):
    """Train SmallVGG + a linear head on every frame of the train split; report val accuracy.

    Args:
        seed: the synthetic benchmark's seed (also the training's seed).
        steps: Adam steps of `batch` frames; train_clips: None for the whole train split.
        val_clips: clips of val and val-unseen for the report; None: the whole splits.
        log: a function of one string (progress lines), or None.
    Returns:
        (state, report): SmallVGG's state_dict (the head is dropped) and a dict with the exact-set
        accuracy on val (exact_set_accuracy: '1', '>=2', ...), on 'val-unseen' (the frames in
        which a held-out pair sounds), the number of train frames and the seconds taken.
    """
    log = log or (lambda _: None)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]), _one_thread():
        train = synthetic.SyntheticAVS("train", seed=seed, num_clips=train_clips)
        log(f"audio pretraining ({synthetic.SYNTHETIC_VERSION}, seed {seed}, {steps} steps): the log-mel of "
            f"{len(train)} train clips ...")
        tr = frame_table(train, range(len(train)))  # log_mel (B*T, 96, 64), sounding (B*T, Kc)
        net, head = train_classifier(tr["log_mel"], tr["sounding"], steps=steps, batch=batch,
                                     seed=seed, log=log)
        report = {"benchmark": synthetic.SYNTHETIC_VERSION, "seed": seed, "steps": steps, "batch": batch,
                  "train_frames": len(tr["sounding"])}
        del tr
        for name in ("val", "val-unseen"):
            split = synthetic.SyntheticAVS(name, seed=seed, num_clips=val_clips)
            table = frame_table(split, range(len(split)))
            pred, = predict_sets(net, head, [table["log_mel"]])  # (B*T, Kc) bool
            keep = table["held_out"] if name == "val-unseen" else slice(None)  # frames with a held-out pair
            report[name] = exact_set_accuracy(pred[keep], table["sounding"][keep])
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    report["seconds"] = round(time.time() - t0, 1)
    log(audio_report_line(report))
    return state, report


def audio_report_line(report: dict) -> str:
    """'val exact-set accuracy: single 0.990 (1234 frames), >=2 0.950 (...); val-unseen ...'."""
    def cell(d, key, name):
        return f"{name} {d[key]['accuracy']:.3f} ({d[key]['frames']} frames)" if key in d else f"{name} -"
    parts = [f"val exact-set accuracy: {cell(report['val'], '1', 'single')}, {cell(report['val'], '>=2', '>=2')}"]
    if "val-unseen" in report:
        parts.append(f"val-unseen (held-out pair frames): {cell(report['val-unseen'], '>=2', '>=2')}")
    return "; ".join(parts) + (f" ({report['seconds']:.0f} s)" if "seconds" in report else "")


def audio_cache_name(seed: int, steps: int, train_clips: int | None = None) -> str:
    """The cached file of one audio pretraining: 'v2-s{seed}-{steps}.pt' (+ '-c{clips}' when the
    train split is cut to `train_clips` clips); v2 is the benchmark's version, synthetic.SYNTHETIC_VERSION."""
    return f"{synthetic.SYNTHETIC_VERSION}-s{seed}-{steps}" + (f"-c{train_clips}" if train_clips is not None else "") + ".pt"


def cached_audio_weights(folder: str, seed: int, steps: int = DEFAULT_AUDIO_STEPS,
                         train_clips: int | None = None, val_clips: int | None = DEFAULT_VAL_CLIPS,
                         log=print) -> str:
    """The path of the pretrained audio weights in `folder`, built by pretrain_audio() on first use.

    A file already there is returned as it is (no training): delete the folder after changing
    synthetic.py or encoders.SmallVGG.
    """
    path = os.path.join(folder, audio_cache_name(seed, steps, train_clips))
    if os.path.isfile(path):
        if log:
            log(f"audio network: pretrained weights {path} (cached)")
        return path
    state, _ = pretrain_audio(seed, steps, train_clips, val_clips, log=log)
    atomic_save(state, path)
    if log:
        log(f"audio network: wrote {path}")
    return path


# ----------------------------------------------------------------------------------------------
# The visual side: the model and its targets
# ----------------------------------------------------------------------------------------------
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
        frames.append(synthetic.normalised_frames(clip["frames"]))       # (T, 3, H, W)
        maps.append(torch.from_numpy(clip["object_map"]))                 # (T, H, W)
    return torch.stack(frames).float(), torch.stack(maps)                # (B, T, 3, H, W), (B, T, H, W)


# ----------------------------------------------------------------------------------------------
# The visual side: the pretraining, its cache and its loading
# ----------------------------------------------------------------------------------------------
def pretrain_visual(cfg: ModelConfig, seed: int, steps: int = DEFAULT_VISUAL_STEPS, batch: int = 4,
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


def visual_cache_name(cfg: ModelConfig, seed: int, steps: int) -> str:
    """'visual-v2-s{seed}-{steps}-c{C}-k{Kc}.pt': one file per seed and size (v2: the benchmark's
    version, synthetic.SYNTHETIC_VERSION)."""
    return f"visual-{synthetic.SYNTHETIC_VERSION}-s{seed}-{steps}-c{cfg.dim}-k{cfg.num_classes}.pt"


def cached_visual_weights(folder: str, cfg: ModelConfig, seed: int, steps: int = DEFAULT_VISUAL_STEPS,
                          img_size: int = 64, log=print) -> str:
    """The path of the pretrained visual weights in `folder`, built by pretrain_visual() on first
    use (written atomically). A file already there is returned as it is."""
    path = os.path.join(folder, visual_cache_name(cfg, seed, steps))
    if os.path.isfile(path):
        if log:
            log(f"visual side: pretrained weights {path} (cached)")
        return path
    state, _ = pretrain_visual(cfg, seed, steps, img_size=img_size, log=log)
    atomic_save(state, path)
    if log:
        log(f"visual side: wrote {path}")
    return path


def load_visual_into(model: SQD, path: str) -> int:
    """Load a visual pretraining's visual encoder, FPN and mask decoder into an SQD (full model or
    any Table 2 row). Every tensor of the file must exist in the model with the same shape; the
    model's other parameters (audio path, ASDs, codebook, AVSR, the mask decoder's slot positions)
    stay as they are. Returns the number of tensors loaded. ValueError names what does not fit."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad or not state:
        raise ValueError(f"{path}: {len(bad)} tensors do not fit this model (e.g. {bad[:3]}); "
                         f"expected a `python pretrain.py visual` file of the same preset and classes")
    model.load_state_dict(state, strict=False)
    return len(state)


class PretrainError(RuntimeError):
    """The visual pretraining's process stopped before writing its file (its error is printed above)."""


STAND_IN_DIR = os.path.join("runs", "audio-weights")  # where train.py caches the stand-ins


def stand_in_paths(folder: str, cfg: ModelConfig, seed: int) -> tuple[str, str]:
    """Where the stand-ins of a seed are cached in `folder`: (audio file, visual file)."""
    return (os.path.join(folder, audio_cache_name(seed, DEFAULT_AUDIO_STEPS, DEFAULT_AUDIO_CLIPS)),
            os.path.join(folder, visual_cache_name(cfg, seed, DEFAULT_VISUAL_STEPS)))


def stand_in_files(folder: str, cfg: ModelConfig, seed: int, img_size: int, val_clips: int | None,
                   audio: bool, visual: bool, main_proc: bool = True) -> tuple:
    """The cached files of the stand-ins a synthetic train.py run starts from (pretrained.uses_stand_ins):
    (audio path or None, visual path or None), for the ones asked for, built on first use.

    A first run builds both: they are independent and each trains on one thread with its own
    random streams, so the visual one runs in a spawned process of its own while this one builds
    the audio network; the files are those each pretraining writes alone, bit for bit, and the
    caller's randomness is the same whether they were built now or found. Under torchrun rank 0
    builds while the others wait at a barrier. PretrainError if the visual process fails.
    """
    audio_path, visual_path = stand_in_paths(folder, cfg, seed)
    audio_path, visual_path = (audio_path if audio else None), (visual_path if visual else None)
    if main_proc:
        child = None  # a process of its own only when both are to be built
        if audio and visual and not os.path.isfile(visual_path) and not os.path.isfile(audio_path):
            child = multiprocessing.get_context("spawn").Process(
                target=cached_visual_weights, args=(folder, cfg, seed, DEFAULT_VISUAL_STEPS),
                kwargs=dict(img_size=img_size))
            child.start()
            print(f"visual pretraining: in process {child.pid}, while this one pretrains the audio network")
        try:
            if audio:
                cached_audio_weights(folder, seed, DEFAULT_AUDIO_STEPS, DEFAULT_AUDIO_CLIPS, val_clips=val_clips)
        except BaseException:
            if child is not None:
                child.terminate()
            raise
        if child is not None:
            child.join()
            if child.exitcode != 0 or not os.path.isfile(visual_path):
                raise PretrainError(f"the visual pretraining stopped (exit code {child.exitcode}) "
                                   f"before writing {visual_path}; its error is printed above")
        elif visual:
            cached_visual_weights(folder, cfg, seed, DEFAULT_VISUAL_STEPS, img_size=img_size)
    if (audio or visual) and dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank loads the files rank 0 found or built
    return audio_path, visual_path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " " + __doc__.split("\n")[1])
    sides = p.add_subparsers(dest="side", required=True, metavar="{audio,visual}")
    audio = sides.add_parser("audio", help="the audio network (SmallVGG) as a sound classifier",
                             description="Pretrain the CPU preset's audio network as a sound classifier: "
                                         "our stand-in for AudioSet VGGish.")
    audio.add_argument("--seed", type=int, default=0, help="the synthetic benchmark's seed (and the training's)")
    audio.add_argument("--out", required=True, help="the file to write (SmallVGG's state_dict)")
    audio.add_argument("--steps", type=int, default=DEFAULT_AUDIO_STEPS, help="Adam steps of --batch frames")
    audio.add_argument("--batch", type=int, default=32, help="frames per step")
    audio.add_argument("--train-clips", type=int, default=None, help="train clips (default: the whole split)")
    audio.add_argument("--val-clips", type=int, default=DEFAULT_VAL_CLIPS, help="clips of val (and val-unseen) "
                                                                                "for the accuracy report")
    visual = sides.add_parser("visual", help="the visual encoder, FPN and mask decoder as referring segmentation",
                              description="Pretrain the visual side as referring segmentation: our stand-in "
                                          "for ReferFormer's whole model.")
    visual.add_argument("--seed", type=int, default=0, help="the synthetic benchmark's seed (and the training's)")
    visual.add_argument("--out", required=True, help="the file to write")
    visual.add_argument("--steps", type=int, default=DEFAULT_VISUAL_STEPS)
    args = p.parse_args(argv)
    if args.side == "visual":
        num_classes = synthetic.SyntheticAVS("val", seed=args.seed, num_clips=1).num_classes
        state, _ = pretrain_visual(preset("cpu", num_classes=num_classes), args.seed, args.steps)
        atomic_save(state, args.out)
        return 0
    for name in ("steps", "batch", "train_clips", "val_clips"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if os.path.isdir(args.out):
        print(f"error: --out {args.out!r} is a folder; expected the path of the file to write", file=sys.stderr)
        return 2
    state, _ = pretrain_audio(args.seed, args.steps, args.train_clips, args.val_clips, args.batch)
    atomic_save(state, args.out)
    print(f"wrote {args.out} (encoders.SmallVGG state_dict; python train.py --seed {args.seed} "
          f"--audio-weights {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
