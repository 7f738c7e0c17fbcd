"""Segment a clip of your own with a trained checkpoint.

What this file teaches
    Inference from end to end, outside the benchmark loaders:
      1. a checkpoint loaded safely (checkpoint.load_checkpoint: weights_only, no code runs) with the
         model, the class names and the preprocessing its run used;
      2. the clip prepared exactly as the checkpoint's evaluation prepared its dataset: frames
         resized to the square img_size and ImageNet-normalised, one 0.96 s VGGish log-mel
         example per frame built, cut and padded the way that dataset's reader does it (data.py:
         frame_tensor, clip_examples, seconds_needed, pad_examples);
      3. one forward pass over the whole clip (pictures.run_clip; sqd.SQD takes any number of frames);
      4. eq. (11) (pictures.label_map, sqd.segment) at each frame's own size: a class-id PNG in the
         AVSS palette, an overlay, a GIF and predictions.json (the sounding classes per frame, with
         scores).

    python predict.py --checkpoint runs/RUN/best.pt --frames DIR --audio clip.wav --out DIR

    Turn a video into what --frames and --audio expect (one frame a second, 16 kHz audio):
    ffmpeg -t 10 -i video.mp4 -vf fps=1 frames/%03d.png -vn -ac 1 -ar 16000 audio.wav

    A clip of the synthetic benchmark, drawn with the codeword each local token chose, is a
    diagnosis of the codebook: python tools/diagnostics.py CKPT --clip test-unseen:17.

Reading order
    load_model, then the clip: list_frames, read_frames, read_audio; the model: run_model (one
    pass, or chunks for a long clip), pictures.label_map and frame_classes (eq. 11 and the scores),
    write_clip (the files, drawn with pictures.py); main at the end.

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): T frames of the clip (T'
those of one chunk in run_model), N semantic tokens, Kc foreground classes, H, W the image size fed
to the model (img_size), Hn, Wn a frame's own size, h, w mask resolution (H/4, W/4), E 0.96 s
log-mel examples, each 96 x 64 (time steps x mel bands), Ns audio samples.
"""
from __future__ import annotations

import argparse
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
from PIL import Image

import data
import train
from checkpoint import CheckpointError, load_checkpoint
from pictures import PALETTE, label_map, overlay, run_clip, save_gif, titled
from sqd import SQD, ModelConfig
from train import UserError

MAX_FRAMES = 60          # frames in one pass; a longer clip runs in chunks of at most this many
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SILENCE_PEAK = 1e-4      # a wav whose loudest sample is below this (-80 dBFS) is called silent


# ----------------------------------------------------------------------------------------------
# 1. The checkpoint
# ----------------------------------------------------------------------------------------------

def load_model(path: str, device) -> tuple[SQD, train.TrainConfig, list]:
    """The model of a train.py checkpoint in eval mode, its run's TrainConfig and class names.

    Exit code 2 with one line for a missing or unreadable file, a file that is no train.py
    checkpoint, one of an older format (checkpoint.CheckpointError), or weights that do not fit the
    model its config describes (UserError).
    """
    ckpt = load_checkpoint(path, mmap=True)                            # weights only, no code runs
    try:
        cfg = train.TrainConfig(**train.saved_train_config(ckpt))
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
    """The whole clip in one pass, or in chunks of at most max_frames frames (pictures.run_clip each).

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
        out = run_clip(model, frames[start:end], audio[start:end], device, amp)  # T' frames
        logits.append(out["pred_logits"])                              # (T', N, Kc)
        masks.append(out["pred_masks"])                                # (T', N, h, w)
        if out["codes"] is not None:                                   # one set a chunk without LSD
            codes.append(out["codes"])                                 # (T', N)
    return {"pred_logits": torch.cat(logits), "pred_masks": torch.cat(masks),   # (T, N, Kc), (T, N, h, w)
            "codes": torch.cat(codes) if codes else None, "chunks": chunks}


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
# 4. Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (best.pt, last.pt)")
    p.add_argument("--frames", help="folder of the clip's frames (PNG/JPG, one a second, natural order)")
    p.add_argument("--audio", help="the clip's wav (any sample rate, mono or stereo)")
    p.add_argument("--out", help="folder for the results (must not exist or be empty)")
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
        if not (args.frames and args.audio and args.out):
            raise UserError("give --frames DIR --audio WAV --out DIR (a clip of the synthetic benchmark "
                            "is drawn by python tools/diagnostics.py CKPT --clip SPLIT:INDEX)")
        if args.max_frames < 1:
            raise UserError(f"--max-frames must be >= 1, got {args.max_frames}")
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise UserError(f"--out {args.out}: exists and is not an empty folder; expected a new "
                            f"folder for the results")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, cfg, class_names = load_model(args.checkpoint, device)
        return predict_clip(args, model, cfg, class_names, device)
    except (UserError, data.DataError, CheckpointError) as e:
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


if __name__ == "__main__":
    sys.exit(main())
