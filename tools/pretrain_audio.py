"""Pretrain the CPU preset's audio network as a sound classifier: our stand-in for AudioSet VGGish.

What this file teaches
----------------------
The paper does not train its audio network: it starts from VGGish, trained on AudioSet to name the
sounds of a clip, and AVSBench and AVSegFormer keep it frozen. The CPU preset's small audio network
(encoders.SmallVGG) has no such weights, and trained from scratch inside SQD its global tokens
never come to depend on the sound. This script gives it the same kind of start: it trains SmallVGG
+ a linear head as a per-frame multi-label classifier (binary cross-entropy, one output per
category) on the train split of the synthetic benchmark, single- and multi-source frames alike (an
AudioSet clip carries every label that sounds in it), then keeps only the network. The training is
the network probe's (tools/probe_synthetic.train_classifier), so the probe's numbers describe these
weights.

    OMP_NUM_THREADS=1 python tools/pretrain_audio.py --seed 0 --out small_vgg_v2_s0.pt
    python train.py --audio-weights small_vgg_v2_s0.pt   # loaded and frozen
    python train.py --audio-regime pretrained-frozen      # the same, built and cached

The file holds only SmallVGG's state_dict (what `train.py --audio-weights` loads strictly). It is
written atomically (a temporary file, then a rename). The same seed, steps and clips give
bit-identical weights: the training runs on the CPU with one thread, with its own random streams
(the caller's RNG state is left as it was). It prints the exact-set accuracy on val, by the number
of sounding categories, and on the val-unseen frames in which a held-out pair sounds.

Reading order: pretrain (the training and the val report), save_weights, cached_weights (what
train.py calls), main.

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): B clips, T frames of a clip,
B*T the frames of B clips one after the other (probe.frame_table), Kc foreground classes (the
categories), 96 x 64 one log-mel example (time steps x mel bands).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import synthetic  # noqa: E402
from tools import probe_synthetic as probe  # noqa: E402

DEFAULT_STEPS = 1500  # the network probe's steps: its accuracy is reported in results/probes.md
DEFAULT_VAL_CLIPS = 500


@contextlib.contextmanager
def _one_thread():
    """torch on one CPU thread inside the block (bit-identical sums), the caller's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(seed: int, steps: int = DEFAULT_STEPS, train_clips: int | None = None,
             val_clips: int | None = DEFAULT_VAL_CLIPS, batch: int = 32, log=print):
    """Train SmallVGG + a linear head on every frame of the train split; report val accuracy.

    Args:
        seed: the synthetic benchmark's seed (also the training's seed).
        steps: Adam steps of `batch` frames; train_clips: None for the whole train split.
        val_clips: clips of val and val-unseen for the report; None: the whole splits.
        log: a function of one string (progress lines), or None.
    Returns:
        (state, report): SmallVGG's state_dict (the head is dropped) and a dict with the exact-set
        accuracy on val (probe.exact_set_accuracy: '1', '>=2', ...), on 'val-unseen' (the frames
        in which a held-out pair sounds), the number of train frames and the seconds taken.
    """
    log = log or (lambda _: None)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]), _one_thread():
        train = synthetic.SyntheticAVS("train", seed=seed, num_clips=train_clips)
        log(f"audio pretraining ({synthetic.SYNTHETIC_VERSION}, seed {seed}, {steps} steps): the log-mel of "
            f"{len(train)} train clips ...")
        tr = probe.frame_table(train, range(len(train)))  # log_mel (B*T, 96, 64), sounding (B*T, Kc)
        net, head = probe.train_classifier(tr["log_mel"], tr["sounding"], steps=steps, batch=batch,
                                           seed=seed, log=log)
        report = {"benchmark": synthetic.SYNTHETIC_VERSION, "seed": seed, "steps": steps, "batch": batch,
                  "train_frames": len(tr["sounding"])}
        del tr
        for name in ("val", "val-unseen"):
            split = synthetic.SyntheticAVS(name, seed=seed, num_clips=val_clips)
            table = probe.frame_table(split, range(len(split)))
            pred, = probe.predict_sets(net, head, [table["log_mel"]])  # (B*T, Kc) bool
            keep = table["held_out"] if name == "val-unseen" else slice(None)  # frames with a held-out pair
            report[name] = probe.exact_set_accuracy(pred[keep], table["sounding"][keep])
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    report["seconds"] = round(time.time() - t0, 1)
    log(report_line(report))
    return state, report


def report_line(report: dict) -> str:
    """'val exact-set accuracy: single 0.990 (1234 frames), >=2 0.950 (...); val-unseen ...'."""
    def cell(d, key, name):
        return f"{name} {d[key]['accuracy']:.3f} ({d[key]['frames']} frames)" if key in d else f"{name} -"
    parts = [f"val exact-set accuracy: {cell(report['val'], '1', 'single')}, {cell(report['val'], '>=2', '>=2')}"]
    if "val-unseen" in report:
        parts.append(f"val-unseen (held-out pair frames): {cell(report['val-unseen'], '>=2', '>=2')}")
    return "; ".join(parts) + (f" ({report['seconds']:.0f} s)" if "seconds" in report else "")


def save_weights(state: dict, path: str) -> None:
    """torch.save(state, path) atomically: a temporary file in the same folder, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cache_name(seed: int, steps: int, train_clips: int | None = None) -> str:
    """The cached file of one pretraining: 'v2-s{seed}-{steps}.pt' (+ '-c{clips}' when the train
    split is cut to `train_clips` clips); v2 is the benchmark's version, synthetic.SYNTHETIC_VERSION."""
    return f"{synthetic.SYNTHETIC_VERSION}-s{seed}-{steps}" + (f"-c{train_clips}" if train_clips is not None else "") + ".pt"


def cached_weights(folder: str, seed: int, steps: int = DEFAULT_STEPS,
                   train_clips: int | None = None, val_clips: int | None = DEFAULT_VAL_CLIPS,
                   log=print) -> str:
    """The path of the pretrained weights in `folder`, built by pretrain() on first use.

    A file already there is returned as it is (no training): delete the folder after changing
    synthetic.py or encoders.SmallVGG.
    """
    path = os.path.join(folder, cache_name(seed, steps, train_clips))
    if os.path.isfile(path):
        if log:
            log(f"audio network: pretrained weights {path} (cached)")
        return path
    state, _ = pretrain(seed, steps, train_clips, val_clips, log=log)
    save_weights(state, path)
    if log:
        log(f"audio network: wrote {path}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the synthetic benchmark's seed (and the training's)")
    p.add_argument("--out", required=True, help="the file to write (SmallVGG's state_dict)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Adam steps of --batch frames")
    p.add_argument("--batch", type=int, default=32, help="frames per step")
    p.add_argument("--train-clips", type=int, default=None, help="train clips (default: the whole split)")
    p.add_argument("--val-clips", type=int, default=DEFAULT_VAL_CLIPS, help="clips of val (and val-unseen) "
                                                                           "for the accuracy report")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "train_clips", "val_clips"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if os.path.isdir(args.out):
        print(f"error: --out {args.out!r} is a folder; expected the path of the file to write", file=sys.stderr)
        return 2
    state, _ = pretrain(args.seed, args.steps, args.train_clips, args.val_clips, args.batch)
    save_weights(state, args.out)
    print(f"wrote {args.out} (encoders.SmallVGG state_dict; python train.py --seed {args.seed} "
          f"--audio-weights {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
