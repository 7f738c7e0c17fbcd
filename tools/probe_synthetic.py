"""Probes of the synthetic benchmark: how much room does it leave for decomposition?

What this file teaches
----------------------
A benchmark for semantic decomposition must not be solvable without it. Two probes, trained on
the frames of the train split, name the set of categories that sound in each frame of a seen-pair
split and of the unseen-pair split; we report the *exact-set accuracy* (the predicted set equals
the true set) by the number of sounding categories in the frame:

  * linear probe: the time average and standard deviation of the frame's log-mel (64 + 64 = 128
    numbers), a linear multi-label classifier (logistic regression, one output per category),
    threshold 0.5. If it names unseen pairs, the mixture is a sum of separable parts and there is
    nothing to decompose.
  * audio network: the CPU preset's audio network (encoders.SmallVGG) + a linear head, trained
    alone as a per-frame multi-label classifier. Its drop from seen pairs to unseen pairs is the
    compositional gap that decomposition claims to close.

The seen-pair split is test-seen-multi (matched to test-unseen clip by clip: same source counts
and schedules). Unseen frames are the test-unseen frames in which a held-out pair sounds together.

It also gives two references of the vision side: the all-background mIoU (predict 0 everywhere;
the vision-alone control must stay near it) and how far apart the looks are at the CPU preset's
64 px (colour distance, shape overlap).

    OMP_NUM_THREADS=1 python tools/probe_synthetic.py --seed 0
    python tools/probe_synthetic.py --table       # rewrite the markdown table from the json

Results go to results/probes.json (one entry per benchmark and seed, replaced when rerun) and
results/probes.md (the table). The stored v1 entries stay in both (git tag synthetic-v1 reruns them).

Reading order: pretrain.exact_set_accuracy and pretrain.frame_table (the data), linear_probe,
pretrain.train_classifier and pretrain.predict_sets (the audio network, shared with the audio
pretraining), network_probe, all_background_miou, look_separation, probe (all of it), write_table,
main.

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): B clips, T frames of a clip,
B*T the frames of B clips one after the other (frame_table), Kc foreground classes (the
categories), H, W image size, 96 x 64 one log-mel example (time steps x mel bands). Written as
words: frames (any set of frames: a selection of a frame table, a test set), batch (the frames of
one training step), features (the columns of the linear probe's input).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import metrics  # noqa: E402
import synthetic  # noqa: E402
# the frames, their score and the audio network's classifier, shared with the audio pretraining
from pretrain import exact_set_accuracy, frame_table, predict_sets, train_classifier  # noqa: E402,F401

RESULTS_JSON = os.path.join(ROOT, "results", "probes.json")
RESULTS_MD = os.path.join(ROOT, "results", "probes.md")


# ----------------------------------------------------------------------------------------------
# The frames (frame_table and exact_set_accuracy are pretrain.py's)
# ----------------------------------------------------------------------------------------------
SNR_BINS = ((-100.0, 4.0), (4.0, 12.0), (12.0, 100.0))  # dB


def reliability(pred, table):
    """Exact-set accuracy of single-source and of >= 2-source frames by the frame's SNR and dropout:
    does a frame's audio get less reliable where the benchmark says it is?

    Returns dict: 'snr lo..hi' or 'dropout' / 'no dropout' -> {'1': ..., '>=2': ...}, each
    {'accuracy', 'frames'}."""
    out = {}
    count = table["sounding"].sum(1)  # (B*T,)
    exact = (np.asarray(pred) == table["sounding"]).all(1)  # (B*T,)
    groups = {f"snr {lo:g}..{hi:g} dB": (table["snr_db"] >= lo) & (table["snr_db"] < hi) for lo, hi in SNR_BINS}
    groups.update({"dropout": table["dropout"], "no dropout": ~table["dropout"]})
    for name, sel in groups.items():
        out[name] = {}
        for n, by_count in (("1", count == 1), (">=2", count >= 2)):
            both = sel & by_count
            if both.any():
                out[name][n] = {"accuracy": float(exact[both].mean()), "frames": int(both.sum())}
    return out


def mean_std_features(log_mel):
    """(frames, 96, 64) -> (frames, 128): the mean and the standard deviation over time of each mel band."""
    return np.concatenate([log_mel.mean(1), log_mel.std(1)], axis=1)  # (frames, 128)


# ----------------------------------------------------------------------------------------------
# The two probes
# ----------------------------------------------------------------------------------------------
def linear_probe(train_x, train_y, test_xs, weight_decay=1e-4, iterations=300):
    """Logistic regression, one output per category, full-batch L-BFGS on the standardised features.

    Args:
        train_x: (frames, features) float, train_y: (frames, Kc) bool; test_xs: list of
            (frames, features) float, each set with its own number of frames.
    Returns:
        list of (frames, Kc) bool predictions (probability > 0.5), one per test set.
    """
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6  # (features,)
    x = torch.tensor((train_x - mu) / sd, dtype=torch.float64)  # (frames, features)
    y = torch.tensor(train_y, dtype=torch.float64)  # (frames, Kc)
    head = nn.Linear(x.shape[1], y.shape[1]).double()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(head(x), y)
        loss = loss + weight_decay * (head.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [(head(torch.tensor((t - mu) / sd, dtype=torch.float64)) > 0).numpy() for t in test_xs]


def network_probe(train_mel, train_y, test_mels, steps=1500, batch=32, lr=1e-3, seed=0, log=None):
    """The audio network probe: train_classifier on the train frames, predict_sets on each test set.

    Args:
        train_mel: (frames, 96, 64) float32, train_y: (frames, Kc) bool; test_mels: list of
            (frames, 96, 64), each set with its own number of frames.
    Returns:
        list of (frames, Kc) bool predictions (probability > 0.5), one per test set.
    """
    net, head = train_classifier(train_mel, train_y, steps=steps, batch=batch, lr=lr, seed=seed, log=log)
    return predict_sets(net, head, test_mels)


# ----------------------------------------------------------------------------------------------
# Vision-side references
# ----------------------------------------------------------------------------------------------
def all_background_miou(ds, num_clips):
    """The official mIoU (metrics.SemanticMetrics) of predicting background everywhere on the
    first num_clips clips of a split: the floor that the vision-alone control is compared with."""
    acc = metrics.SemanticMetrics(num_classes=ds.num_classes)
    for i in range(num_clips):
        gt = torch.from_numpy(ds.generate(i)["labels"])[None]  # (1, T, H, W)
        valid = torch.ones(gt.shape[:2], dtype=torch.bool)  # (1, T)
        acc.update(torch.zeros_like(gt), gt, valid, valid)
    return acc.compute()["miou_official"]


def look_separation(ds):
    """How far apart the categories' looks are at ds.img_size, for the smallest object.

    Returns dict: min_colour_distance (RGB, between the colours in use; the instance jitter is
    +-0.05 a channel and the sensor noise 0.03), max_shape_iou (the largest IoU of two shapes' masks
    drawn at the same centre and the smallest radius, 0.12 * img_size) and the pair that gives it.
    """
    colours = sorted(set(ds.colour_name_of))
    rgb = np.array([synthetic.COLOURS[c] for c in colours])  # (n_colours, 3)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=2)  # (n_colours, n_colours)
    radius = 0.12 * ds.img_size
    grid = (np.arange(-math.ceil(radius) - 1, math.ceil(radius) + 2) + 0.5) / radius  # pixel centres
    shapes = sorted(set(ds.shape_of))
    masks = {s: synthetic._shape_mask(s, grid[None, :], grid[:, None]) for s in shapes}
    worst, worst_pair = 0.0, None
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            if iou > worst:
                worst, worst_pair = float(iou), [a, b]
    return {"min_colour_distance": float(dist[~np.eye(len(colours), dtype=bool)].min()),
            "max_shape_iou": worst, "max_shape_iou_pair": worst_pair,
            "smallest_radius_px": radius, "shapes": len(shapes), "colours": len(colours)}


# ----------------------------------------------------------------------------------------------
# Everything for one seed
# ----------------------------------------------------------------------------------------------
def probe(seed, train_clips=4000, eval_clips=500, steps=1500, batch=32, background_clips=500,
          log=print):
    """Both probes on (seen-pair split, test-unseen), the all-background mIoU and the looks.
    steps = 0 skips the network probe and the vision references (a quick parameter search)."""
    t0 = time.time()
    make = lambda split, n: synthetic.SyntheticAVS(split, seed=seed, num_clips=n)  # noqa: E731
    train = make("train", train_clips)
    seen_name, seen_ds = "test-seen-multi", make("test-seen-multi", eval_clips)
    seen_idx = list(range(eval_clips))
    unseen_ds = make("test-unseen", eval_clips)
    log(f"{synthetic.SYNTHETIC_VERSION} seed {seed}: generating {train_clips} train clips ...")
    tr = frame_table(train, range(train_clips))
    seen = frame_table(seen_ds, seen_idx)
    unseen = frame_table(unseen_ds, range(eval_clips))
    log(f"  frames: train {len(tr['sounding'])}, seen {len(seen['sounding'])}, unseen "
        f"{len(unseen['sounding'])} ({time.time() - t0:.0f} s)")
    held_train = int(tr["held_out"].sum())
    assert held_train == 0, "a held-out pair sounds together in train"

    def score(pred_seen, pred_unseen):
        out = {"seen": exact_set_accuracy(pred_seen, seen["sounding"]),
               "unseen_all_frames": exact_set_accuracy(pred_unseen, unseen["sounding"]),
               "unseen": exact_set_accuracy(pred_unseen[unseen["held_out"]],
                                            unseen["sounding"][unseen["held_out"]]),
               "seen_reliability": reliability(pred_seen, seen)}
        return out

    res = {"benchmark": synthetic.SYNTHETIC_VERSION, "seed": seed, "seen_split": seen_name, "unseen_split": "test-unseen",
           "clips": {"train": train_clips, "seen": len(seen_idx), "unseen": eval_clips},
           "num_classes": train.num_classes, "held_out_pairs": len(train.held_out_pairs),
           "pairs": train.num_classes * (train.num_classes - 1) // 2,
           "v2_parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in synthetic.SYNTHETIC.items()}}
    feats = [mean_std_features(x["log_mel"]) for x in (tr, seen, unseen)]
    p_seen, p_unseen = linear_probe(feats[0], tr["sounding"], feats[1:])
    res["linear"] = score(p_seen, p_unseen)
    log(f"  linear probe done ({time.time() - t0:.0f} s)")
    if steps == 0:
        return res
    t1 = time.time()
    p_seen, p_unseen = network_probe(tr["log_mel"], tr["sounding"], [seen["log_mel"], unseen["log_mel"]],
                                     steps=steps, batch=batch, seed=seed, log=log)
    res["network"] = score(p_seen, p_unseen)
    res["network"]["steps"], res["network"]["batch"] = steps, batch
    res["network"]["train_seconds"] = round(time.time() - t1, 1)
    log(f"  network probe done ({time.time() - t0:.0f} s)")
    res["all_background_miou"] = {}
    for split in ("test", "test-unseen", "test-seen-multi", "val-unseen"):
        res["all_background_miou"][split] = all_background_miou(make(split, background_clips), background_clips)
    res["all_background_miou"]["clips"] = background_clips
    res["looks"] = look_separation(train)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def acceptance(res):
    """The three numbers the benchmark must meet (the third needs the vision-alone run)."""
    net, lin = res["network"], res["linear"]
    gap = net["seen"][">=2"]["accuracy"] - net["unseen"][">=2"]["accuracy"]
    return {"network_gap_>=2": gap, "network_gap_ok": gap >= 0.2,
            "linear_unseen_>=2": lin["unseen"][">=2"]["accuracy"],
            "linear_unseen_ok": lin["unseen"][">=2"]["accuracy"] <= 0.6}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def label(r):
    """'v2, 0' or 'v2, 0, TAG' for an iteration of the parameter search."""
    return f"{r['benchmark']}, {r['seed']}" + (f", {r['tag']}" if r.get("tag") else "")


def write_table(results, path):
    """results/probes.md: exact-set accuracy by number of sounding categories, every stored entry."""
    lines = ["# Probes of the synthetic benchmark", "",
             "Written by `python tools/probe_synthetic.py` (numbers in results/probes.json). Exact-set accuracy:",
             "the fraction of frames whose predicted set of sounding categories is exactly the true set,",
             "by the number of categories sounding in the frame. *seen*: v2 test-seen-multi, v1 the",
             "multi-source clips of test; *unseen*: the test-unseen frames in which a held-out pair sounds",
             "together. Linear: logistic regression on the mean and std over time of the frame's log-mel",
             "(128 numbers). Network: encoders.SmallVGG + a linear head trained alone on the train frames.",
             "",
             "| benchmark, seed | probe | seen 2 | seen 3 | seen >=2 | unseen 2 | unseen 3 | unseen >=2 | gap (>=2) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cell = lambda d, k: f"{d[k]['accuracy']:.3f}" if k in d else "-"  # noqa: E731
    for key in sorted(results):
        r = results[key]
        for name in ("linear", "network"):
            s, u = r[name]["seen"], r[name]["unseen"]
            gap = s[">=2"]["accuracy"] - u[">=2"]["accuracy"]
            lines.append(f"| {label(r)} | {name} | {cell(s, '2')} | {cell(s, '3')} | "
                         f"{cell(s, '>=2')} | {cell(u, '2')} | {cell(u, '3')} | {cell(u, '>=2')} | {gap:+.3f} |")
    lines += ["", "| benchmark, seed | categories | held-out pairs | all-background mIoU (test, test-unseen"
              " [, test-seen-multi, val-unseen]) | looks: min colour distance, max shape IoU |",
              "| --- | --- | --- | --- | --- |"]
    for key in sorted(results):
        r = results[key]
        bg = ", ".join(f"{v:.4f}" for k, v in r["all_background_miou"].items() if k != "clips")
        looks = r["looks"]
        lines.append(f"| {label(r)} | {r['num_classes']} | {r['held_out_pairs']} of {r['pairs']} "
                     f"| {bg} | {looks['min_colour_distance']:.2f}, {looks['max_shape_iou']:.2f} "
                     f"({' / '.join(looks['max_shape_iou_pair'])}) |")
    reliable = [k for k in sorted(results) if "seen_reliability" in results[k]["network"]]
    if reliable:
        groups = [f"snr {lo:g}..{hi:g} dB" for lo, hi in SNR_BINS] + ["dropout", "no dropout"]
        heads = [f"SNR < {SNR_BINS[0][1]:g} dB"] + [f"SNR {lo:g}..{hi:g} dB" for lo, hi in SNR_BINS[1:-1]] + [
            f"SNR >= {SNR_BINS[-1][0]:g} dB", "dropout", "no dropout"]
        lines += ["", "Seen frames by how reliable their audio is (v2): exact-set accuracy of single-source / "
                  ">=2-source frames.", "",
                  "| benchmark, seed | probe | " + " | ".join(heads) + " |", "| --- | --- |" + " --- |" * len(groups)]
        for key in reliable:
            for name in ("linear", "network"):
                rel = results[key][name]["seen_reliability"]
                lines.append(f"| {label(results[key])} | {name} | " + " | ".join(
                    " / ".join(cell(rel[g], n) for n in ("1", ">=2")) for g in groups) + " |")
    lines += ["", "Acceptance (v2): network gap (>=2) >= 0.2; linear unseen (>=2) <= 0.6; vision alone within"
              " 0.03 mIoU of all-background on every evaluated split.", "",
              "| benchmark, seed | network gap (>=2) | linear unseen (>=2) | vision alone - all-background (max) |",
              "| --- | --- | --- | --- |"]
    for key in sorted(results):
        a = results[key].get("acceptance", {})
        if a:
            vision = a.get("vision_alone_max_difference")
            lines.append(f"| {label(results[key])} | {a['network_gap_>=2']:.3f} | {a['linear_unseen_>=2']:.3f} | "
                         + (f"{vision:.4f} |" if vision is not None else "not run |"))
    vision = [r for r in results.values() if "vision_alone" in r]
    if vision:
        lines += ["", "| benchmark, seed | split | vision alone mIoU | all-background mIoU | difference |",
                  "| --- | --- | --- | --- | --- |"]
        for r in vision:
            for split, v in r["vision_alone"]["miou"].items():
                bg = r["all_background_miou"][split]
                lines.append(f"| {label(r)} | {split} | {v:.4f} | {bg:.4f} | {v - bg:+.4f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def summary_lines(res):
    """A few lines for the terminal: accuracy by number of sources, the acceptance numbers."""
    lines = []
    for name in ("linear", "network"):
        for part in ("seen", "unseen_all_frames", "unseen"):
            d = res[name][part]
            lines.append(f"{name:8s} {part:18s} " + "  ".join(f"{k}: {v['accuracy']:.3f} ({v['frames']})"
                                                              for k, v in d.items()))
        if "seen_reliability" in res[name]:
            lines.append(f"{name:8s} seen by frame: " + "; ".join(
                f"{g} " + " ".join(f"{n}: {v['accuracy']:.3f} ({v['frames']})" for n, v in d.items())
                for g, d in res[name]["seen_reliability"].items()))
    lines.append(f"acceptance: {json.dumps(res['acceptance'])}")
    lines.append(f"all-background mIoU: {json.dumps(res['all_background_miou'])}")
    return "\n".join(lines)


def load_results(path=RESULTS_JSON):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save_results(results, path=RESULTS_JSON):
    checkpoint.atomic_write(path, lambda f: f.write(json.dumps(results, indent=1, sort_keys=True).encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-clips", type=int, default=4000)
    p.add_argument("--eval-clips", type=int, default=500, help="clips of the seen and unseen splits")
    p.add_argument("--steps", type=int, default=1500,
                   help="training steps of the network probe (0: the linear probe only, not saved)")
    p.add_argument("--batch", type=int, default=32, help="frames per step of the network probe")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--tag", default="", help="store under v2-seedS-TAG (the parameter search's "
                                              "iterations; the table lists them all)")
    p.add_argument("--table", action="store_true", help="only rewrite results/probes.md from the json")
    p.add_argument("--vision-alone", metavar="METRICS_JSON",
                   help="store the mIoU of a `train.py --zero-audio` run (its metrics.json) next to the "
                        "all-background mIoU of the same seed, then rewrite the table")
    args = p.parse_args(argv)
    for name in ("train_clips", "eval_clips", "steps", "batch"):
        lowest = 0 if name == "steps" else 1
        if getattr(args, name) < lowest:
            print(f"error: --{name.replace('_', '-')} must be >= {lowest}", file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    results = load_results()
    key = f"{synthetic.SYNTHETIC_VERSION}-seed{args.seed}" + (f"-{args.tag}" if args.tag else "")
    if args.vision_alone:
        if key not in results or not os.path.isfile(args.vision_alone):
            print(f"error: need a stored probe entry {key} and the metrics.json {args.vision_alone!r}",
                  file=sys.stderr)
            return 2
        with open(args.vision_alone) as f:
            m = json.load(f)
        miou = {s: m[s]["miou_official"] for s in results[key]["all_background_miou"]
                if isinstance(m.get(s), dict)}
        if not miou:
            print(f"error: {args.vision_alone} has no miou_official of the splits "
                  f"{[s for s in results[key]['all_background_miou'] if s != 'clips']}", file=sys.stderr)
            return 2
        worst = max(abs(v - results[key]["all_background_miou"][s]) for s, v in miou.items())
        results[key]["vision_alone"] = {"metrics": os.path.relpath(os.path.abspath(args.vision_alone), ROOT),
                                        "miou": miou, "max_difference": worst}
        results[key]["acceptance"]["vision_alone_max_difference"] = worst
        results[key]["acceptance"]["vision_alone_ok"] = worst <= 0.03
        save_results(results)
        write_table(results, RESULTS_MD)
        print(json.dumps(results[key]["vision_alone"], indent=1))
        return 0
    if not args.table:
        res = probe(args.seed, args.train_clips, args.eval_clips, args.steps, args.batch)
        if args.steps == 0:
            for part in ("seen", "unseen_all_frames", "unseen", "seen_reliability"):
                if part in res["linear"]:
                    print(f"linear   {part:18s} {json.dumps(res['linear'][part])}")
            return 0
        res["acceptance"] = acceptance(res)
        print(summary_lines(res))
        if args.no_save:
            return 0
        res["tag"] = args.tag
        results = load_results()  # again: another probe may have finished meanwhile
        results[key] = res
        save_results(results)
    write_table(results, RESULTS_MD)
    print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
