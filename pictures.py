"""Pictures: class colours, panels scaled up, title lines with colour swatches, GIFs, the model
on one clip with eq. (11) at a frame's own size, and the picture of a synthetic clip with its tokens.

What this file teaches
    How a segmentation is shown so that a student can read it: class id c is drawn in row c of the
    AVSS (PASCAL-VOC) palette, the colours the AVSBench label PNGs use; small frames are scaled up
    by whole factors (nearest neighbour, so every pixel of the prediction stays visible); a title
    line names each class next to a swatch of its colour. predict.py draws a clip's overlays with
    these functions, train.py its evaluation overlays and the curves of a run (curves.png).

    And how to look at what the model did with the sound of one synthetic clip: per frame, the
    frame, the log-mel of its second, the ground truth, the prediction (eq. 11) and the codeword
    each local token l_{i,t} chose, with the class the token predicts (synthetic_picture).
    train.py draws a few clips so at the end of a synthetic run (write_clip_pictures). The
    category a codeword is the *signature* of comes from the lab's codebook diagnostics;
    tools/diagnostics.py --clip SPLIT:INDEX draws any clip with its tokens so named.

    The drawing functions run no model and use no other file of the repository but data.py (the
    palette), metrics.py (the val score curves.png plots) and checkpoint.py (atomic_write). run_clip runs the model once on a
    clip and label_map applies eq. (11) (sqd.segment) at a frame's own size, for the clip picture
    and for predict.py. This file never imports predict.py or train.py, which import it.

Reading order
    PALETTE, colour_ids, frame_rgb, overlay (class colours on a frame); scale_up, titled, caption,
    stack (panels and title lines); save_gif; font; run_clip and label_map (the model on one clip,
    eq. 11 at a frame's size); then the synthetic clip: synthetic_picture (with
    spectrogram and token_names), write_synthetic_pictures (its PNG and GIF), write_clip_pictures
    (the clips a synthetic run draws); then a run's other pictures: write_overlays (frame | ground
    truth | prediction of AVSBench clips) and draw_curves (curves.png from log.jsonl).

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): H, W a panel's size, Hn, Wn
a frame's own size; in the clip picture T frames, N semantic tokens, Kc foreground classes (the
categories, class ids 1..Kc), h, w the mask size of the predictions (H/4, W/4); a log-mel example
is 96 x 64 (time steps x mel bands); side: a panel's side in the picture.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import metrics
from checkpoint import atomic_write
from sqd import SQD, foreground_probability, segment

MIN_PANEL = 256          # pictures scale every panel up (nearest neighbour) to at least this size
PALETTE = data.voc_palette(256)  # (256, 3) the AVSS (PASCAL-VOC) colours; row j is class id j


def colour_ids(ids: np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> their AVSS palette colours (H, W, 3) uint8."""
    return PALETTE[ids % 256]                                          # (H, W, 3)


def frame_rgb(frame: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised frame (3, H, W), as data.py gives it, back to (H, W, 3) uint8 RGB."""
    mean = torch.tensor(data.IMAGENET_MEAN, device=frame.device)[:, None, None]  # (3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD, device=frame.device)[:, None, None]    # (3, 1, 1)
    rgb = (frame.float() * std + mean).clamp(0, 1).permute(1, 2, 0)             # (H, W, 3)
    return (rgb.cpu().numpy() * 255).round().astype(np.uint8)                   # (H, W, 3)


def overlay(rgb: np.ndarray, ids: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The frame (Hn, Wn, 3) uint8 with each labelled pixel mixed with its class colour."""
    mixed = (1 - alpha) * rgb + alpha * colour_ids(ids).astype(np.float64)  # (Hn, Wn, 3)
    return np.where(ids[..., None] > 0, mixed, rgb).round().astype(np.uint8)  # (Hn, Wn, 3)


def scale_up(array: np.ndarray, min_side: int = MIN_PANEL) -> np.ndarray:
    """(H, W, 3) uint8 repeated (nearest neighbour) by the smallest integer factor that makes
    its shorter side at least min_side."""
    factor = max(1, math.ceil(min_side / min(array.shape[:2])))
    return array.repeat(factor, axis=0).repeat(factor, axis=1)         # (H*factor, W*factor, 3)


def titled(array: np.ndarray, lines: list, min_side: int = MIN_PANEL) -> Image.Image:
    """A picture (scaled up to min_side) under title lines. Each line is a list of (text,
    colour or None) pieces; a colour draws a swatch of that class colour before the text."""
    body = Image.fromarray(scale_up(array, min_side))
    return stack([caption(body.width, lines), body])


def caption(width: int, lines: list, size: int = 14) -> Image.Image:
    """White strip of `width` px with the lines of titled() drawn on it, a line wrapped where a
    piece would run past the right edge."""
    f = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, row = [], 0                                # (x, row, text, colour) of every piece
    for pieces in lines:
        x = 6
        for text, colour in pieces:
            length = int(measure.textlength(text, font=f)) + (size + 2 if colour is not None else 0)
            if x > 6 and x + length > width - 6:       # wrap before this piece
                x, row = 6 + size, row + 1
            placed.append((x, row, text, colour))
            x += length
        row += 1
    step = size + 6
    strip = Image.new("RGB", (width, step * row + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, r, text, colour in placed:
        y = 4 + step * r
        if colour is not None:
            draw.rectangle([x, y + 1, x + size - 2, y + size - 1],
                           fill=tuple(int(v) for v in colour), outline=(0, 0, 0))
            x += size + 2
        draw.text((x, y), text, fill=(0, 0, 0), font=f)
    return strip


def stack(images: list, horizontal: bool = False, gap: int = 0) -> Image.Image:
    """Images one under the other (or side by side), on white, `gap` px apart."""
    if horizontal:
        size = (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images))
    else:
        size = (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1))
    out = Image.new("RGB", size, (255, 255, 255))
    offset = 0
    for image in images:
        out.paste(image, (offset, 0) if horizontal else (0, offset))
        offset += (image.width if horizontal else image.height) + gap
    return out


def save_gif(pictures: list, path, ms_per_frame: int = 1000) -> None:
    """An animated GIF (Pillow) at path (or into a binary file), one picture a second, looping;
    pictures are padded to one size."""
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    frames = []
    for picture in pictures:
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(picture, (0, 0))
        frames.append(canvas)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)


def font(size: int = 14):
    """Pillow's own font (no file, no new dependency); scalable from Pillow 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


# ----------------------------------------------------------------------------------------------
# The model on one clip, and eq. (11) at a frame's own size (the clip picture's and predict.py's)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def run_clip(model: SQD, frames: torch.Tensor, audio: torch.Tensor, device, amp: bool = False) -> dict:
    """The model on one clip in one pass: a batch of one clip, every frame valid.

    frames (T, 3, H, W), audio (T, 1, 96, 64), on any device; amp: bf16 autocast. Returns
    pred_logits (T, N, Kc), pred_masks (T, N, h, w) float32 on the CPU and codes (T, N) int64
    on the CPU: the local tokens' codewords, the global tokens' (one set for the clip) for a
    model without LSD, None for a model without tokens. predict.run_model calls it per chunk
    of a long clip; synthetic_picture on a whole synthetic clip.
    """
    T = frames.shape[0]
    batch = {"frames": frames[None].to(device),                        # (1, T, 3, H, W)
             "audio": audio[None].to(device),                          # (1, T, 1, 96, 64)
             "frame_valid": torch.ones(1, T, dtype=torch.bool, device=device)}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        out = model(batch)
    codes = None
    if "local" in out["indices"]:
        codes = out["indices"]["local"][0].cpu()                       # (T, N)
    elif "global" in out["indices"]:                                   # one set for the clip
        codes = out["indices"]["global"][0].cpu().expand(T, -1)        # (T, N)
    return {"pred_logits": out["pred_logits"][0].float().cpu(),        # (T, N, Kc)
            "pred_masks": out["pred_masks"][0].float().cpu(),          # (T, N, h, w)
            "codes": codes}


def label_map(logits: torch.Tensor, masks: torch.Tensor, size: tuple[int, int],
              class_threshold: float = 0.1, mask_threshold: float = 0.5) -> np.ndarray:
    """One frame's class ids at `size` (Hn, Wn): eq. (11) (segment) for semantic models; for
    a binary one (Kc = 1, S4/MS3) foreground probability > 0.5, as the metrics threshold it.

    logits (N, Kc), masks (N, h, w) mask logits. Returns (Hn, Wn) int64, 0 = background.
    """
    if logits.shape[-1] == 1:
        fg = foreground_probability(logits[None, None], masks[None, None], size)  # (1, 1, Hn, Wn)
        return (fg[0, 0] > 0.5).long().numpy()                                    # (Hn, Wn)
    ids = segment(logits[None, None], masks[None, None], size, class_threshold,
                  mask_threshold)                                                 # (1, 1, Hn, Wn) eq. (11)
    return ids[0, 0].numpy()                                                      # (Hn, Wn)


# ----------------------------------------------------------------------------------------------
# A synthetic clip drawn with its tokens: what a student looks at to see decomposition work or fail
# ----------------------------------------------------------------------------------------------
def synthetic_picture(model, dataset, index: int, class_names: list, signatures: list | None,
                      device, amp: bool = False) -> tuple[Image.Image, list, dict]:
    """Clip `index` of a synthetic split, run through the model and drawn.

    One row per frame: the frame | the log-mel of its second | the ground truth | the prediction
    (eq. 11) | the N local tokens' codewords l_{i,t} -> VQ, each with the class the token
    predicts and, given signatures (see token_names), the category its codeword is the signature
    of. The clip runs through the model in one pass (run_clip: a synthetic clip is short).
    Returns (the picture, one picture per frame for a GIF, layout): layout maps each panel name
    to its T boxes (x0, y0, x1, y1) in the picture, for tests.
    """
    item = dataset[index]                                              # the clip as data.py gives it
    T = item["frames"].shape[0]
    out = run_clip(model, item["frames"], item["audio"], device, amp)
    size = tuple(item["labels"].shape[-2:])                            # (H, W)
    pred = [label_map(out["pred_logits"][t], out["pred_masks"][t], size) for t in range(T)]  # T x (H, W)
    log_mel = item["audio"][:, 0].numpy()                              # (T, 96, 64)
    lo, hi = np.percentile(log_mel, 1), np.percentile(log_mel, 99.5)
    sounding = np.asarray(item["meta"]["sounding"], dtype=bool)        # (T, Kc)
    side = item["frames"].shape[-1] * max(1, math.ceil(MIN_PANEL / item["frames"].shape[-1]))
    panel_names = ["frame", "log-mel of its second", "ground truth", "prediction", "tokens"]
    f = font(13)
    rows, layout = [], {name: [] for name in panel_names}
    for t in range(T):
        frame = frame_rgb(item["frames"][t])                           # (H, W, 3)
        spec = np.asarray(Image.fromarray(spectrogram(log_mel[t], lo, hi)).resize(
            (side, side), Image.NEAREST))                              # (side, side, 3)
        panels = [scale_up(frame, side), spec, scale_up(colour_ids(item["labels"][t].numpy()), side),
                  scale_up(colour_ids(pred[t]), side)]
        # the tokens panel: codeword, the category it is the signature of, what the token predicts
        text_panel = Image.new("RGB", (int(side * 1.4), side), (255, 255, 255))
        draw = ImageDraw.Draw(text_panel)
        if out["codes"] is None:
            draw.text((8, 8), "no semantic tokens (no GSD, no LSD)", fill=(0, 0, 0), font=f)
        else:
            codes = out["codes"][t].tolist()
            owners = token_names(codes, signatures, class_names)
            prob = out["pred_logits"][t].sigmoid()                     # (N, Kc)
            line = max(15, min(34, (side - 8) // (2 * len(codes))))
            for i, (k, owner) in enumerate(zip(codes, owners)):
                y = 6 + 2 * line * i
                colour = (PALETTE[class_names.index(owner)] if owner in class_names[1:]
                          else np.array([255, 255, 255]))
                if owner is not None:                                  # a swatch of the category named
                    draw.rectangle([8, y + 2, 20, y + 14], fill=tuple(int(v) for v in colour),
                                   outline=(0, 0, 0))
                named = "" if owner is None else f" = {owner}"
                draw.text((26, y), f"token {i}: codeword {k}{named}", fill=(0, 0, 0), font=f)
                p, c = prob[i].max(0)
                says = (f"predicts {class_names[int(c) + 1]} {float(p):.2f}" if p >= 0.1
                        else f"predicts nothing (best {float(p):.2f})")
                draw.text((26, y + line - 2), says, fill=(90, 90, 90), font=f)
        images = [Image.fromarray(p) for p in panels] + [text_panel]
        heard = [c + 1 for c in np.nonzero(sounding[t])[0]]
        seen = [int(c) for c in np.unique(pred[t]) if c > 0]
        title = caption(side * 4 + text_panel.width + 4 * 6, [
            [(f"frame {t}   sounding: ", None)] + [(class_names[c] + "  ", PALETTE[c]) for c in heard]
            + ([("nothing  ", None)] if not heard else []) + [("   predicted: ", None)]
            + [(class_names[c] + "  ", PALETTE[c]) for c in seen] + ([("nothing", None)] if not seen else [])])
        rows.append(stack([title, stack(images, horizontal=True, gap=6)]))
    tokens = ("the local tokens' codewords, named by the category each is the signature of (none: "
              "shared or nobody's)" if signatures is not None else
              "the local tokens' codewords and the class each predicts")
    clip_title = caption(rows[0].width, [
        [(f"{item['meta']['clip']}, the benchmark of seed {dataset.seed}", None)],
        [("panels: " + " | ".join(panel_names[:4]) + " | " + tokens, None)]])
    picture = stack([clip_title] + rows, gap=4)
    y = clip_title.height + 4
    for row in rows:
        x, top = 0, y + row.height - side
        for name, width in zip(panel_names, [side] * 4 + [text_panel.width]):
            layout[name].append((x, top, x + width, top + side))
            x += width + 6
        y += row.height + 4
    return picture, [stack([clip_title, row]) for row in rows], layout


def spectrogram(log_mel: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One log-mel example (96 frames, 64 bands) -> (64, 96, 3) uint8: time left to right, low
    bands at the bottom, values from lo (dark blue) over red to hi (yellow)."""
    v = np.clip((log_mel.T[::-1] - lo) / max(hi - lo, 1e-6), 0, 1)    # (64, 96) in [0, 1]
    anchors = np.array([[10, 10, 60], [150, 30, 90], [230, 90, 40], [250, 230, 100]], np.float64)  # (4, 3)
    x = v * (len(anchors) - 1)                                         # (64, 96)
    k = np.minimum(x.astype(int), len(anchors) - 2)                    # (64, 96) segment index
    frac = (x - k)[..., None]                                          # (64, 96, 1)
    return ((1 - frac) * anchors[k] + frac * anchors[k + 1]).round().astype(np.uint8)  # (64, 96, 3)


def token_names(codes: list, signatures: list | None, class_names: list) -> list[str | None]:
    """The category each token's codeword is the signature of, per token index i.

    codes: N codeword ids of one frame; signatures: N lists of Kc codewords (the diagnostics.json
    'local_signature_codeword_per_index' of tools/diagnostics.py, -1: none) or None. A codeword
    that is the signature of exactly one category names it; one shared by several, or nobody's,
    is "none"; without signatures every token is None (not named).
    """
    if signatures is None:
        return [None] * len(codes)
    names = []
    for i, k in enumerate(codes):
        owners = [c + 1 for c, sig in enumerate(signatures[i]) if sig == k]
        names.append(class_names[owners[0]] if len(owners) == 1 else "none")
    return names


def write_synthetic_pictures(out_dir: str, model, dataset, indices: list, class_names: list,
                             signatures: list | None, device, amp: bool = False) -> list[str]:
    """clip_{split}_{index}.png and .gif for each index, drawn first, then each file written
    atomically (temporary name, then rename); returns the PNG paths."""
    drawn = [(index, *synthetic_picture(model, dataset, index, class_names, signatures, device,
                                        amp)[:2]) for index in indices]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for index, picture, frames in drawn:
        base = os.path.join(out_dir, f"clip_{dataset.split}_{index}")
        atomic_write(base + ".png", lambda f: picture.save(f, format="PNG"))
        atomic_write(base + ".gif", lambda f: save_gif(frames, f))
        written.append(base + ".png")
    return written


def write_clip_pictures(model, eval_sets: dict, device, out_dir: str, limit: int,
                        amp: bool = False) -> None:
    """A synthetic run's clip pictures (synthetic_picture), up to `limit` (train.NUM_OVERLAYS):
    a single- and a multi-source clip of test, then test-unseen clips. train.py calls this at the
    end of a synthetic run; its tokens are named by codeword and prediction, not by category (the
    signatures need the lab's diagnostics: tools/diagnostics.py --clip draws them named)."""
    test = eval_sets["test"]
    multi = [bool(test[i]["meta"]["multi_source"]) for i in range(min(8, len(test)))]
    picks = [("test", multi.index(m)) for m in (False, True) if m in multi]
    picks += [("test-unseen", i) for i in range(2) if "test-unseen" in eval_sets]
    model.eval()
    for split, index in picks[:limit]:
        write_synthetic_pictures(out_dir, model, eval_sets[split], [index], test.class_names,
                                 None, device, amp)
    model.train()


# ----------------------------------------------------------------------------------------------
# A run's pictures: the test overlays of AVSBench runs and curves.png
# ----------------------------------------------------------------------------------------------

def write_test_pictures(dataset: str, model, eval_sets: dict, device, out_dir: str, limit: int,
                        amp: bool = False) -> None:
    """The pictures of the first `limit` test clips that train.py draws at the end of a run (and of
    --eval-only): a synthetic run's clip pictures (write_clip_pictures: clip_*.png, .gif), an
    AVSBench run's frame | ground truth | prediction (write_overlays: overlay_test_*.png)."""
    if "test" in eval_sets and dataset == "synthetic":
        write_clip_pictures(model, eval_sets, device, out_dir, limit, amp)
    elif "test" in eval_sets:
        write_overlays(model, eval_sets["test"], device, out_dir, limit, amp)


@torch.no_grad()
def write_overlays(model: SQD, test, device, out_dir: str, limit: int, amp: bool = False) -> None:
    """An AVSBench run's pictures (a synthetic run's are write_clip_pictures'): frame | ground
    truth | prediction (label_map) of the first frame of the first `limit` test clips, labels in
    the AVSS (VOC) palette, panels scaled up to at least 256 px under title lines that name the
    panels and the classes (overlay_test_CLIP.png)."""
    model.eval()
    for i in range(min(limit, len(test))):
        item = test[i]
        real = int(item["frame_valid"].sum())  # the real frames come first (AVSS pads to 10)
        out = run_clip(model, item["frames"][:real], item["audio"][:real], device, amp)
        gt = item["labels"][0].numpy()                                              # (H, W)
        pr = label_map(out["pred_logits"][0], out["pred_masks"][0], gt.shape)       # (H, W)
        panels = np.concatenate([frame_rgb(item["frames"][0]), colour_ids(gt), colour_ids(pr)],
                                axis=1)                                             # (H, 3W, 3)
        clip_id = str(item["meta"].get("clip", i))

        def named(ids):
            return ([(f"{test.class_names[c]}  ", PALETTE[c]) for c in np.unique(ids) if c > 0]
                    or [("nothing", None)])
        picture = titled(panels, [
            [(f"test clip {clip_id}, frame 0:   frame | ground truth | prediction", None)],
            [("ground truth: ", None)] + named(gt), [("prediction: ", None)] + named(pr)])
        atomic_write(os.path.join(out_dir, f"overlay_test_{clip_id.replace('/', '_')}.png"),
                     lambda f: picture.save(f, format="PNG"))
    model.train()


def draw_curves(log_path: str, png_path: str, codebook_size: int) -> dict | None:
    """curves.png from log.jsonl, against the training step: the eq. (8) loss terms (the last
    decoder layer's; the auxiliary layers' _0, _1 ... left out), the eq. (9) terms, the val score
    that picks best.pt (mIoU, or J&F on S4/MS3) and the codebook's words in use (usage x K) of the
    global and the local tokens. Returns what the figure holds, {panel title: {line label: (steps,
    values)}}, read back from its lines; None where matplotlib (optional) is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend: files only
        from matplotlib.figure import Figure
    except ImportError:
        return None
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if "loss" in r and "eval" not in r]   # the training lines
    vals = [r for r in rows if r.get("eval") == "val"]

    def series(lines, key, scale=1.0):
        points = [(r["step"], r[key] * scale) for r in lines if key in r]
        return [x for x, _ in points], [y for _, y in points]

    keys = sorted({k for r in steps for k, v in r.items() if not isinstance(v, bool)})
    # the val score that picks best.pt (metrics.headline): mIoU, or J&F on S4/MS3; none logged yet: "score"
    measure = next((name for key, name in (("miou_official", "mIoU"), ("jf_official", "J&F"))
                    if any(key in r for r in vals)), "score")
    panels = {
        "eq. (8): segmentation loss terms": [(k, series(steps, k)) for k in keys
                                             if k.startswith("loss_") and not re.search(r"_\d+$", k)],
        "eq. (9): quantization terms": [(k, series(steps, k)) for k in keys if k.startswith("quant_")],
        f"val {measure} (picks best.pt)": [(f"val {measure}", ([r["step"] for r in vals],
                                                               [metrics.headline(r) for r in vals]))],
        f"codebook words in use (of K = {codebook_size})": [
            (name, series(steps, key, codebook_size))
            for name, key in (("global", "codebook_usage"), ("local", "local_codebook_usage"))],
    }
    fig = Figure(figsize=(11, 7))
    FigureCanvasAgg(fig)
    # fixed margins: matplotlib's constrained layout took half of a test run's time, redrawn at
    # every validation
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.95, wspace=0.18, hspace=0.32)
    plotted = {}
    for ax, (title, lines) in zip(fig.subplots(2, 2).flat, panels.items()):
        for label, (x, y) in lines:
            ax.plot(x, y, label=label, marker="." if len(x) < 30 else None)
        ax.set(title=title, xlabel="step")
        if any(x for _, (x, _) in lines):
            ax.legend(fontsize=7)
        plotted[title] = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    return plotted

