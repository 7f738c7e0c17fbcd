"""Segment a clip of your own with a trained checkpoint, and see what the model did.

What this file teaches
    Inference from end to end, outside the benchmark loaders:
      1. a checkpoint loaded safely (train.load_checkpoint: weights_only, no code runs) with the
         model, the class names and the preprocessing its run used;
      2. the clip prepared exactly as the checkpoint's evaluation prepared its dataset: frames
         resized to the square img_size and ImageNet-normalised, one 0.96 s VGGish log-mel
         example per frame built, cut and padded the way that dataset's reader does it (data.py:
         frame_tensor, clip_examples, seconds_needed, pad_examples);
      3. one forward pass over the whole clip (sqd.SQD takes any number of frames);
      4. eq. (11) (sqd.segment) at each frame's own size: a class-id PNG in the AVSS palette, an
         overlay, a GIF and predictions.json (the sounding classes per frame, with scores);
      5. the picture a student reads to see decomposition work or fail, on a clip of the
         checkpoint's own synthetic benchmark: per frame, the frame, the log-mel of its second,
         the ground truth, the prediction and the codeword each local token l_{i,t} chose,
         named by the category it is the signature of (the run's diagnostics.json).

    python predict.py --checkpoint runs/RUN/best.pt --frames DIR --audio clip.wav --out DIR
    python predict.py --checkpoint runs/synthetic-DATE/last.pt --synthetic test-unseen:17

    Turn a video into what --frames and --audio expect (one frame a second, 16 kHz audio):
    ffmpeg -t 10 -i video.mp4 -vf fps=1 frames/%03d.png -vn -ac 1 -ar 16000 audio.wav

Reading order
    load_model, then the clip: list_frames, read_frames, read_audio; the model:
    run_model (one pass, or chunks for a long clip), label_map and frame_classes (eq. 11 and the
    scores), write_clip (the files); the pictures: panel helpers, overlay, synthetic_picture;
    main at the end.

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): T frames of the clip (T'
those of one chunk in run_model), N semantic tokens, Kc foreground classes, H, W the image size fed
to the model (img_size), Hn, Wn a frame's own size, h, w mask resolution (H/4, W/4), E 0.96 s
log-mel examples, each 96 x 64 (time steps x mel bands), Ns audio samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import train
from sqd import SQD, ModelConfig, foreground_probability, segment
from train import UserError

MAX_FRAMES = 60          # frames in one pass; a longer clip runs in chunks of at most this many
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SILENCE_PEAK = 1e-4      # a wav whose loudest sample is below this (-80 dBFS) is called silent
MIN_PANEL = 256          # pictures scale every panel up (nearest neighbour) to at least this size
PALETTE = data.voc_palette(256)  # (256, 3) the AVSS (PASCAL-VOC) colours; row j is class id j


# ----------------------------------------------------------------------------------------------
# 1. The checkpoint
# ----------------------------------------------------------------------------------------------

def load_model(path: str, device) -> tuple[SQD, train.TrainConfig, list]:
    """The model of a train.py checkpoint in eval mode, its run's TrainConfig and class names.

    UserError (exit code 2) for a missing or unreadable file, a file that is no train.py
    checkpoint, one of an older format, a run on the retired synthetic v1, or weights that do not
    fit the model its config describes.
    """
    ckpt = train.load_checkpoint(path, mmap=True)                      # weights only, no code runs
    try:
        known = {f.name for f in dataclasses.fields(train.TrainConfig)}
        saved = train.saved_train_config(ckpt, path)                   # refuses a synthetic v1 run
        cfg = train.TrainConfig(**{k: v for k, v in saved.items() if k in known})
        model = SQD(ModelConfig(**ckpt["config"]["model"]))
        model.load_state_dict(ckpt["model"])
        step = int(ckpt["state"]["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path}: its weights do not fit the model its config describes "
                        f"({type(e).__name__}: {first[:200]}); expected a checkpoint of this "
                        f"code's train.py") from None
    # as train.py's evaluation: the quantizer passes tokens through if the run stopped in warm-up
    model.set_quantizer_warmup(step < (cfg.quant_warmup_steps or 0))
    names = ckpt["config"].get("class_names") or (
        ["background"] + [f"class {c}" for c in range(1, model.cfg.num_classes + 1)])
    return model.to(device).eval(), cfg, list(names)


# ----------------------------------------------------------------------------------------------
# 2. The clip, prepared as the checkpoint's dataset reader prepares an evaluation clip
# ----------------------------------------------------------------------------------------------

def natural_key(name: str) -> list:
    """Sort key that orders frame_2.png before frame_10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frames(folder: str) -> list[str]:
    """The PNG/JPG files of a folder in natural order. DataError if there is none."""
    expected = "a folder of PNG or JPG frames, one per second of the clip"
    if not os.path.isdir(folder):
        raise data.DataError(f"{folder}: missing; expected {expected}")
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]
    if not names:
        raise data.DataError(f"{folder}: no .png or .jpg files; expected {expected}")
    stems = [os.path.splitext(n)[0] for n in names]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise data.DataError(f"{folder}: two frames named {twice[0]} (different extensions); "
                             f"expected one file per frame")
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def read_frames(paths: list[str], img_size: int) -> tuple[torch.Tensor, list]:
    """Frames as the model reads them, and the originals.

    Returns frames (T, 3, H, W) float32, each resized to img_size x img_size (bilinear) and
    ImageNet-normalised as data.py's evaluation does, and the list of T decoded RGB PIL images
    at their own size (Wn, Hn). DataError names a missing or unreadable image.
    """
    images, tensors = [], []
    for t, path in enumerate(paths):
        image = data.read_image(path, f"frame {t} of the clip (PNG or JPG)").convert("RGB")
        plan = data.spatial_plan(image.size, img_size, train=False)    # square resize
        tensors.append(data.frame_tensor(data.apply_spatial(image, plan, Image.BILINEAR)))  # (3, H, W)
        images.append(image)
    return torch.stack(tensors), images                                # (T, 3, H, W)


def read_audio(path: str, T: int, dataset: str, pad: bool = False) -> tuple[torch.Tensor, list]:
    """The audio of T frames: (T, 1, 96, 64) float32 log-mel, and notes to print.

    DataError for a missing, unreadable or silent wav, and for one too short for T frames
    (unless pad: then the missing examples are padded as the dataset's reader pads a short clip,
    zeros for avss and synthetic, the last example repeated for s4 and ms3, with a warning).
    """
    expected = "a PCM wav (any sample rate, mono or stereo) as long as the frames (1 s each)"
    try:
        waveform, rate = data.read_wav(path, expected)                 # (Ns,) mono, Hz
    except struct.error as e:  # a malformed header: scipy raises struct.error, not ValueError
        raise data.DataError(f"{path}: unreadable wav ({e}); expected {expected}") from None
    peak = float(np.abs(waveform).max())
    if peak < SILENCE_PEAK:
        raise data.DataError(f"{path}: silent (loudest sample {peak:.1e}); expected {expected}")
    examples = data.clip_examples(waveform, rate, dataset, T)          # (E, 96, 64), E <= T
    found, need = len(waveform) / rate, data.seconds_needed(T, dataset)
    notes = [f"audio: {path}, {found:.2f} s at {rate} Hz"]
    if len(examples) < T:
        if not pad or (len(examples) == 0 and dataset in ("s4", "ms3")):
            raise data.DataError(
                f"{path}: {found:.2f} s of audio; the {T} frames need {need:.2f} s (one 0.96 s "
                f"log-mel example per frame, built as the {dataset} reader builds them); pass "
                f"--pad-audio to pad the missing {T - len(examples)} example(s)")
        warnings.warn(f"{path}: {found:.2f} s of audio, {need:.2f} s needed; padded "
                      f"{T - len(examples)} example(s) as the {dataset} reader pads a short clip")
    elif found > need + 1.0:
        notes.append(f"audio: only the first {need:.2f} s are used ({T} frames)")
    audio = torch.from_numpy(examples).unsqueeze(1)                    # (E, 1, 96, 64)
    return data.pad_examples(audio, T, dataset), notes                 # (T, 1, 96, 64)


# ----------------------------------------------------------------------------------------------
# 3. The model's output, eq. (11), and the files of a clip
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def run_model(model: SQD, frames: torch.Tensor, audio: torch.Tensor, device, amp: bool = False,
              max_frames: int = MAX_FRAMES) -> dict:
    """The whole clip in one pass, or in chunks of at most max_frames frames.

    frames (T, 3, H, W), audio (T, 1, 96, 64). Returns pred_logits (T, N, Kc), pred_masks
    (T, N, h, w) float32 on the CPU, codes (T, N) int64 (the local tokens' codewords; the
    global tokens' for a model without LSD; None without tokens) and chunks [(start, end)].
    """
    T = frames.shape[0]
    count = math.ceil(T / max_frames)
    edges = [round(T * k / count) for k in range(count + 1)]           # nearly equal chunks
    chunks = list(zip(edges[:-1], edges[1:]))
    logits, masks, codes = [], [], []
    for start, end in chunks:
        batch = {"frames": frames[None, start:end].to(device),         # (1, T', 3, H, W)
                 "audio": audio[None, start:end].to(device),           # (1, T', 1, 96, 64)
                 "frame_valid": torch.ones(1, end - start, dtype=torch.bool, device=device)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(batch)
        logits.append(out["pred_logits"][0].float().cpu())             # (T', N, Kc)
        masks.append(out["pred_masks"][0].float().cpu())               # (T', N, h, w)
        if "local" in out["indices"]:
            codes.append(out["indices"]["local"][0].cpu())             # (T', N)
        elif "global" in out["indices"]:                               # one set for the chunk
            codes.append(out["indices"]["global"][0].cpu().expand(end - start, -1))  # (T', N)
    return {"pred_logits": torch.cat(logits), "pred_masks": torch.cat(masks),   # (T, N, Kc), (T, N, h, w)
            "codes": torch.cat(codes) if codes else None, "chunks": chunks}


def label_map(logits: torch.Tensor, masks: torch.Tensor, size: tuple[int, int],
              class_threshold: float = 0.1, mask_threshold: float = 0.5) -> np.ndarray:
    """One frame's class ids at `size` (Hn, Wn): eq. (11) (sqd.segment) for semantic models; for
    a binary one (Kc = 1, S4/MS3) foreground probability > 0.5, as the metrics threshold it.

    logits (N, Kc), masks (N, h, w) mask logits. Returns (Hn, Wn) int64, 0 = background.
    """
    if logits.shape[-1] == 1:
        fg = foreground_probability(logits[None, None], masks[None, None], size)  # (1, 1, Hn, Wn)
        return (fg[0, 0] > 0.5).long().numpy()                                    # (Hn, Wn)
    ids = segment(logits[None, None], masks[None, None], size, class_threshold,
                  mask_threshold)                                                 # (1, 1, Hn, Wn) eq. (11)
    return ids[0, 0].numpy()                                                      # (Hn, Wn)


def frame_classes(logits: torch.Tensor, ids: np.ndarray, class_names: list) -> list[dict]:
    """The classes of one frame's label map, each with its score and area.

    score of class c: max_i P_{i,t}[c], the probability the most confident token gives c;
    area: the fraction of the frame's pixels labelled c. logits (N, Kc), ids (Hn, Wn).
    """
    prob = logits.sigmoid()                                            # (N, Kc) P_{i,t}
    out = []
    for c in np.unique(ids):
        if c == 0:
            continue
        out.append({"class_id": int(c), "name": class_names[c],
                    "score": round(float(prob[:, c - 1].max()), 4),
                    "area": round(float((ids == c).mean()), 4)})
    return out


def write_clip(out_dir: str, frame_paths: list[str], images: list, outputs: dict,
               class_names: list, info: dict, class_threshold: float = 0.1,
               mask_threshold: float = 0.5) -> list[list[dict]]:
    """Write a clip's results into out_dir (which must exist):

        labels/NAME.png    class ids in the AVSS palette (mode P: pixel value = class id), at the
                           frame's own size
        overlays/NAME.png  the frame with its classes in their colours and a title line
        overlays.gif       the overlays, one a second
        predictions.json   per frame: file, size, chunk, and its classes with score and area

    outputs: run_model's dict (pred_logits (T, N, Kc), pred_masks (T, N, h, w), chunks);
    images: the T original PIL frames. Returns the classes of every frame.
    """
    os.makedirs(os.path.join(out_dir, "labels"))
    os.makedirs(os.path.join(out_dir, "overlays"))
    chunk_of = [k for k, (s, e) in enumerate(outputs["chunks"]) for _ in range(s, e)]
    records, overlays, classes = [], [], []
    for t, (path, image) in enumerate(zip(frame_paths, images)):
        size = (image.height, image.width)                             # (Hn, Wn)
        ids = label_map(outputs["pred_logits"][t], outputs["pred_masks"][t], size,
                        class_threshold, mask_threshold)               # (Hn, Wn)
        found = frame_classes(outputs["pred_logits"][t], ids, class_names)
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        label_png = Image.fromarray(ids.astype(np.uint8), mode="P")
        label_png.putpalette(PALETTE.reshape(-1).tolist())
        label_png.save(os.path.join(out_dir, "labels", name))
        said = ", ".join(f"{c['name']} {c['score']:.2f}" for c in found) or "nothing sounding"
        picture = titled(overlay(np.asarray(image), ids),
                         [[(f"frame {t} ({os.path.basename(path)}): ", None)]
                          + [(f"{c['name']} {c['score']:.2f}  ", PALETTE[c["class_id"]])
                             for c in found] + ([] if found else [(said, None)])])
        picture.save(os.path.join(out_dir, "overlays", name))
        overlays.append(picture)
        classes.append(found)
        records.append({"index": t, "file": os.path.basename(path), "size": [image.width, image.height],
                        "chunk": chunk_of[t], "label_png": f"labels/{name}",
                        "overlay_png": f"overlays/{name}", "classes": found})
    save_gif(overlays, os.path.join(out_dir, "overlays.gif"))
    head = {**info, "class_threshold": class_threshold, "mask_threshold": mask_threshold,
            "chunks": [list(c) for c in outputs["chunks"]]}
    with open(os.path.join(out_dir, "predictions.json"), "w") as f:  # one line per frame
        f.write(json.dumps(head, indent=1)[:-2] + ',\n "frames": [\n  '
                + ",\n  ".join(json.dumps(r) for r in records) + "\n ]\n}\n")
    return classes


# ----------------------------------------------------------------------------------------------
# 4. Pictures: panels scaled up, a title line, colour swatches that name the classes
# ----------------------------------------------------------------------------------------------

def font(size: int = 14):
    """Pillow's own font (no file, no new dependency); scalable from Pillow 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def scale_up(array: np.ndarray, min_side: int = MIN_PANEL) -> np.ndarray:
    """(H, W, 3) uint8 repeated (nearest neighbour) by the smallest integer factor that makes
    its shorter side at least min_side."""
    factor = max(1, math.ceil(min_side / min(array.shape[:2])))
    return array.repeat(factor, axis=0).repeat(factor, axis=1)         # (H*factor, W*factor, 3)


def colour_ids(ids: np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> their AVSS palette colours (H, W, 3) uint8."""
    return PALETTE[ids % 256]                                          # (H, W, 3)


def overlay(rgb: np.ndarray, ids: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The frame (Hn, Wn, 3) uint8 with each labelled pixel mixed with its class colour."""
    mixed = (1 - alpha) * rgb + alpha * colour_ids(ids).astype(np.float64)  # (Hn, Wn, 3)
    return np.where(ids[..., None] > 0, mixed, rgb).round().astype(np.uint8)  # (Hn, Wn, 3)


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


def save_gif(pictures: list, path: str, ms_per_frame: int = 1000) -> None:
    """An animated GIF (Pillow), one picture a second, looping; pictures are padded to one size."""
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    frames = []
    for picture in pictures:
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(picture, (0, 0))
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)


def spectrogram(log_mel: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One log-mel example (96 frames, 64 bands) -> (64, 96, 3) uint8: time left to right, low
    bands at the bottom, values from lo (dark blue) over red to hi (yellow)."""
    v = np.clip((log_mel.T[::-1] - lo) / max(hi - lo, 1e-6), 0, 1)    # (64, 96) in [0, 1]
    anchors = np.array([[10, 10, 60], [150, 30, 90], [230, 90, 40], [250, 230, 100]], np.float64)  # (4, 3)
    x = v * (len(anchors) - 1)                                         # (64, 96)
    k = np.minimum(x.astype(int), len(anchors) - 2)                    # (64, 96) segment index
    frac = (x - k)[..., None]                                          # (64, 96, 1)
    return ((1 - frac) * anchors[k] + frac * anchors[k + 1]).round().astype(np.uint8)  # (64, 96, 3)


def token_names(codes: list, signatures: list | None, class_names: list) -> list[str]:
    """The category each token's codeword is the signature of, per token index i.

    codes: N codeword ids of one frame; signatures: N lists of Kc codewords (diagnostics.json
    'local_signature_codeword_per_index', -1: none) or None. A codeword that is the signature of
    exactly one category names it; one shared by several, or nobody's, is "none"; "?" without
    signatures.
    """
    if signatures is None:
        return ["?"] * len(codes)
    names = []
    for i, k in enumerate(codes):
        owners = [c + 1 for c, sig in enumerate(signatures[i]) if sig == k]
        names.append(class_names[owners[0]] if len(owners) == 1 else "none")
    return names


def synthetic_picture(model: SQD, dataset, index: int, class_names: list, signatures: list | None,
                      device, amp: bool = False) -> tuple[Image.Image, list, dict]:
    """Clip `index` of a synthetic split, run through the model and drawn.

    One row per frame: the frame | the log-mel of its second | the ground truth | the prediction
    (eq. 11) | the N local tokens' codewords l_{i,t} -> VQ, each with the category it is the
    signature of (signatures: see token_names) and the class the token predicts.
    Returns (the picture, one picture per frame for a GIF, layout): layout maps each panel name
    to its T boxes (x0, y0, x1, y1) in the picture, for tests.
    """
    item = dataset[index]                                              # the clip as data.py gives it
    T = item["frames"].shape[0]
    out = run_model(model, item["frames"], item["audio"], device, amp)
    size = tuple(item["labels"].shape[-2:])                            # (H, W)
    pred = [label_map(out["pred_logits"][t], out["pred_masks"][t], size) for t in range(T)]  # T x (H, W)
    mean = torch.tensor(data.IMAGENET_MEAN)[:, None, None]             # (3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]               # (3, 1, 1)
    log_mel = item["audio"][:, 0].numpy()                              # (T, 96, 64)
    lo, hi = np.percentile(log_mel, 1), np.percentile(log_mel, 99.5)
    sounding = np.asarray(item["meta"]["sounding"], dtype=bool)        # (T, Kc)
    side = item["frames"].shape[-1] * max(1, math.ceil(MIN_PANEL / item["frames"].shape[-1]))
    panel_names = ["frame", "log-mel of its second", "ground truth", "prediction", "tokens"]
    f = font(13)
    rows, layout = [], {name: [] for name in panel_names}
    for t in range(T):
        frame = ((item["frames"][t] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
                 * 255).round().astype(np.uint8)                       # (H, W, 3)
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
                draw.rectangle([8, y + 2, 20, y + 14], fill=tuple(int(v) for v in colour),
                               outline=(0, 0, 0))
                draw.text((26, y), f"token {i}: codeword {k} = {owner}", fill=(0, 0, 0), font=f)
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
    clip_title = caption(rows[0].width, [
        [(f"{item['meta']['clip']}, the benchmark of seed {dataset.seed}", None)],
        [("panels: " + " | ".join(panel_names[:4]) + " | the local tokens' codewords, named by the "
          "category each is the signature of (none: shared or nobody's)", None)]])
    picture = stack([clip_title] + rows, gap=4)
    y = clip_title.height + 4
    for row in rows:
        x, top = 0, y + row.height - side
        for name, width in zip(panel_names, [side] * 4 + [text_panel.width]):
            layout[name].append((x, top, x + width, top + side))
            x += width + 6
        y += row.height + 4
    return picture, [stack([clip_title, row]) for row in rows], layout


def write_synthetic_pictures(out_dir: str, model: SQD, dataset, indices: list, class_names: list,
                             signatures: list | None, device, amp: bool = False) -> list[str]:
    """clip_{split}_{index}.png and .gif for each index, drawn first, then each file written
    atomically (temporary name, then rename); returns the PNG paths."""
    drawn = [(index, *synthetic_picture(model, dataset, index, class_names, signatures, device,
                                        amp)[:2]) for index in indices]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for index, picture, frames in drawn:
        base = os.path.join(out_dir, f"clip_{dataset.split}_{index}")
        for suffix, save in ((".png", lambda p: picture.save(p, format="PNG")),
                             (".gif", lambda p: save_gif(frames, p))):
            tmp = f"{base}.tmp{os.getpid()}{suffix}"
            save(tmp)
            os.replace(tmp, base + suffix)
        written.append(base + ".png")
    return written


def read_signatures(path: str | None) -> tuple[list | None, str]:
    """Per token index signature codewords from a run's diagnostics.json, and a note saying where
    they came from (or why there are none)."""
    if path is None or not os.path.isfile(path):
        return None, (f"no {path or 'diagnostics.json'}: tokens are not named (python "
                      f"tools/diagnostics.py CKPT --out DIR writes one)")
    try:
        with open(path) as f:
            sig = json.load(f).get("local_signature_codeword_per_index")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{path}: unreadable ({e}); tokens are not named"
    if sig is None:
        return None, f"{path} has no per-token signatures (an older run); tokens are not named"
    return sig, f"signatures: {path}"


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (best.pt, last.pt)")
    p.add_argument("--frames", help="folder of the clip's frames (PNG/JPG, one a second, natural order)")
    p.add_argument("--audio", help="the clip's wav (any sample rate, mono or stereo)")
    p.add_argument("--out", help="folder for the results (must not exist or be empty); with "
                                 "--synthetic, default: the checkpoint's folder")
    p.add_argument("--synthetic", metavar="SPLIT:INDEX",
                   help="draw clip INDEX of a split of the checkpoint's synthetic benchmark, e.g. test-unseen:17")
    p.add_argument("--diagnostics", help="the run's diagnostics.json (token signatures); default: "
                                         "beside the checkpoint")
    p.add_argument("--pad-audio", action="store_true",
                   help="pad audio shorter than the frames (as the checkpoint's reader pads) instead of stopping")
    p.add_argument("--max-frames", type=int, default=MAX_FRAMES,
                   help="frames in one pass; a longer clip runs in chunks of at most this many")
    p.add_argument("--class-threshold", type=float, default=0.1,
                   help="eq. (11): tokens whose best class probability is below this are dropped (App. D)")
    p.add_argument("--mask-threshold", type=float, default=0.5,
                   help="eq. (11): a kept token covers pixels whose mask probability exceeds this (App. D)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ...; None: cuda if available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; None: torch's default")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.synthetic is None and not (args.frames and args.audio and args.out):
            raise UserError("give --frames DIR --audio WAV --out DIR (your clip), or --synthetic SPLIT:INDEX")
        if args.max_frames < 1:
            raise UserError(f"--max-frames must be >= 1, got {args.max_frames}")
        if args.out and os.path.exists(args.out) and (not os.path.isdir(args.out) or (
                args.synthetic is None and os.listdir(args.out))):
            raise UserError(f"--out {args.out}: exists and is not an empty folder; expected a new "
                            f"folder for the results")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, cfg, class_names = load_model(args.checkpoint, device)
        if args.synthetic is not None:
            return predict_synthetic(args, model, cfg, class_names, device)
        return predict_clip(args, model, cfg, class_names, device)
    except (UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def predict_clip(args, model: SQD, cfg, class_names: list, device) -> int:
    """Own clip: read and check everything, run, then write into a staging folder beside --out
    and rename it to --out, so that --out is complete or absent."""
    paths = list_frames(args.frames)
    frames, images = read_frames(paths, cfg.img_size)                  # (T, 3, H, W)
    T = len(paths)
    audio, notes = read_audio(args.audio, T, cfg.dataset, args.pad_audio)  # (T, 1, 96, 64)
    print(f"frames: {T} from {args.frames} (first {images[0].width} x {images[0].height})")
    for note in notes:
        print(note)
    start = time.time()
    outputs = run_model(model, frames, audio, device, args.amp, args.max_frames)
    chunks = outputs["chunks"]
    how = ("in one pass" if len(chunks) == 1 else
           f"in {len(chunks)} chunks of at most {args.max_frames} frames (the global tokens are "
           f"per chunk)")
    print(f"model: {T} frames {how} on {device} in {time.time() - start:.1f} s")
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
    info = {"checkpoint": os.path.abspath(args.checkpoint), "dataset": cfg.dataset,
            "img_size": cfg.img_size, "frames_folder": os.path.abspath(args.frames),
            "audio": os.path.abspath(args.audio)}
    try:
        classes = write_clip(staged, paths, images, outputs, class_names, info,
                             args.class_threshold, args.mask_threshold)
        if os.path.isdir(out):
            os.rmdir(out)                                              # empty (checked first)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    for t, (path, found) in enumerate(zip(paths, classes)):
        said = ", ".join(f"{c['name']} {c['score']:.2f}" for c in found) or "-"
        print(f"  frame {t} {os.path.basename(path)}: {said}")
    print(f"wrote {args.out}: labels/ and overlays/ ({T} PNG each), overlays.gif, predictions.json")
    return 0


def predict_synthetic(args, model: SQD, cfg, class_names: list, device) -> int:
    """--synthetic SPLIT:INDEX: one clip of the checkpoint's own benchmark, drawn."""
    if cfg.dataset != "synthetic":
        raise UserError(f"{args.checkpoint} is a {cfg.dataset} run; --synthetic needs a checkpoint "
                        f"trained on the synthetic benchmark")
    split, _, index = args.synthetic.rpartition(":")
    if not split or not index.isdigit():
        raise UserError(f"--synthetic {args.synthetic!r}: expected SPLIT:INDEX, e.g. test-unseen:17")
    # every clip of the split (not only the run's --eval-clips), with the run's seed and size
    full = dataclasses.replace(cfg, train_clips=None, eval_clips=None)
    try:
        dataset = train.make_dataset(full, split, train=split == "train")
    except ValueError as e:
        raise UserError(f"--synthetic {args.synthetic!r}: {e}") from None
    if int(index) >= len(dataset):
        raise UserError(f"--synthetic {args.synthetic!r}: the {split} split has clips 0..{len(dataset) - 1}")
    diag = args.diagnostics or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                            "diagnostics.json")
    signatures, note = read_signatures(diag)
    print(note)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    for path in write_synthetic_pictures(out, model, dataset, [int(index)], class_names,
                                         signatures, device, args.amp):
        print(f"wrote {path} and {os.path.splitext(path)[0]}.gif")
    return 0


if __name__ == "__main__":
    sys.exit(main())
