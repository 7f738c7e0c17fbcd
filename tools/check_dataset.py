"""Check an AVSBench layout before a run: every missing, unreadable or truncated file, at once.

What this file teaches
    What a complete S4, MS3 or AVSS release looks like on disk, file by file, and which flaws the
    official AVSBench code reads anyway (audio slightly short of its clip, label colours outside
    the palette): those are listed as tolerated, with the file, and do not stop a run.
    train.py calls check_dataset() before it trains on a real dataset, so that a missing file is
    named at the start and not after an hour.

Usage
    python tools/check_dataset.py --dataset avss --data-root DIR [--deep]
    Exit code 2 when anything is wrong, 0 when only tolerated flaws are found.

Reading order: check_dataset(), then _check_clip() and _check_image().

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): Hn, Wn an image's own size
on disk, Tc frames stored on disk for a clip, Kc foreground classes (the palette has Kc+1 colours).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image
from scipy.io import wavfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/check_dataset.py` from anywhere
    sys.path.insert(0, ROOT)

from data import (AVSS_AUDIO_PADDING, EXAMPLE_SECONDS, V1_AUDIO_PADDING, DataError,  # noqa: E402
                  _avss_classes, _avss_clips, _v1_clips, examples_in, no_example_message,
                  palette_ids, read_log_mel_pkl, read_wav, seconds_for_examples, short_audio_note,
                  voc_palette)

def _check_image(path, expected, deep):
    """Problems of one image file: missing, unreadable header, truncated. Returns (problem or None, size)."""
    if not os.path.isfile(path):
        return f"{path}: missing; expected {expected}", None
    try:
        with Image.open(path) as image:  # reads the header only
            size = image.size
            if deep:
                image.load()
        with open(path, "rb") as f:  # a complete file ends with its end marker
            f.seek(max(0, os.path.getsize(path) - 16))
            tail = f.read()
    except (OSError, SyntaxError, ValueError) as error:
        return f"{path}: unreadable or truncated ({error}); expected {expected}", None
    if path.endswith(".jpg") and not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return f"{path}: truncated (no JPEG end marker); expected {expected}", None
    if path.endswith(".png") and b"IEND" not in tail:
        return f"{path}: truncated (no PNG IEND chunk); expected {expected}", None
    return None, size


def _avss_label_note(path, palette):
    """The line naming an AVSS label PNG with pixels the reader maps to background, else None.

    Those are colours outside the palette (labels_rgb) or class ids above 70 (labels_semantic),
    counted at native size; the reader warns in the same words, counting after its resize.
    """
    num_classes = len(palette) - 1
    with Image.open(path) as image:
        if os.path.basename(os.path.dirname(path)) == "labels_semantic":
            ids = np.asarray(image if image.mode in ("L", "P") else image.convert("L"))  # (Hn, Wn)
            bad, what = int((ids > num_classes).sum()), f"class ids above {num_classes}"
        else:
            _, known = palette_ids(np.asarray(image.convert("RGB")), palette)  # (Hn, Wn)
            bad, what = int((~known).sum()), f"colours outside the {len(palette)}-colour palette"
    return f"{path}: {bad} pixels have {what}; mapped to background (class 0)" if bad else None


def _audio_length(path, expected, deep):
    """(samples, rate) of a wav, from its header unless deep. Raises DataError, OSError, ValueError."""
    if not deep:
        try:
            rate, samples = wavfile.read(path, mmap=True)  # header and data size only (fails on a truncated file)
            return len(samples), int(rate)
        except ValueError as error:
            if "not compatible" not in str(error):
                raise
            # mmap cannot map 24-bit or byte-swapped data: read the samples
    waveform, rate = read_wav(path, expected)
    return len(waveform), rate


def _check_clip(clip, frame_what, label_what, audio_what, deep, padding, tolerated, label_note=None):
    """Problems of one clip (a list of lines); flaws the readers tolerate go to `tolerated`.

    padding: AVSS_AUDIO_PADDING or V1_AUDIO_PADDING, how the readers fill short audio.
    label_note: None, or path -> line or None, run on every readable label when deep.
    """
    problems = []
    if not os.path.isdir(clip["folder"]):
        return [f"{clip['folder']}: missing; expected the folder of clip {clip['id']} listed in the metadata"]
    sizes = []
    for i, path in enumerate(clip["frames"]):
        problem, size = _check_image(path, frame_what(i), deep)
        problems += [problem] if problem else []
        sizes.append(size)
    for i, candidates in clip["labels"].items():
        candidates = [candidates] if isinstance(candidates, str) else candidates
        path = next((p for p in candidates if os.path.isfile(p)), candidates[-1])
        problem, size = _check_image(path, label_what(i), deep)
        if problem and len(candidates) > 1 and not os.path.isfile(path):
            problem = f"{path} (or {candidates[0]}): missing; expected {label_what(i)}"
        elif size is not None and sizes[i] is not None and size != sizes[i]:
            problem = f"{path}: size {size}; expected {sizes[i]} (W, H), the size of its frame"
        elif problem is None and deep and label_note is not None:
            note = label_note(path)
            if note:
                tolerated.setdefault("label_pixels", []).append(note)
        problems += [problem] if problem else []
    audio = clip["audio"] if isinstance(clip["audio"], list) else [clip["audio"]]
    path = next((p for p in audio if os.path.isfile(p)), None)
    count = len(clip["frames"])  # Tc frames need Tc examples
    length = None  # (examples, seconds found, seconds needed) where they are known
    if path is None:
        problems.append(f"{audio[0]}: missing; expected {audio_what}")
    elif path.endswith(".wav"):
        try:
            samples, rate = _audio_length(path, audio_what, deep)
            length = examples_in(samples, rate), samples / rate, seconds_for_examples(count)
        except DataError as error:
            problems.append(str(error))
        except (OSError, ValueError, EOFError) as error:
            problems.append(f"{path}: unreadable wav ({error}); expected {audio_what}")
    elif deep:  # a .pkl: its example count is known only once unpickled
        try:
            examples = len(read_log_mel_pkl(path, audio_what))
            length = examples, examples * EXAMPLE_SECONDS, count * EXAMPLE_SECONDS
        except DataError as error:
            problems.append(str(error))
    elif os.path.getsize(path) == 0:
        problems.append(f"{path}: empty; expected {audio_what}")
    if length is not None:
        examples, found, needed = length
        if examples == 0 and padding == V1_AUDIO_PADDING:  # the S4/MS3 reader refuses it
            problems.append(no_example_message(path, found))
        else:
            note = short_audio_note(path, examples, count, found, needed, padding)
            if note:
                tolerated.setdefault("short_audio", []).append(note)
    return problems


# What the readers accept with a warning, as the official code accepts it (check_dataset's `tolerated`).
TOLERATED_KINDS = {
    "short_audio": "audio file(s) more than one 0.96 s example short of their clip's frames (padded)",
    "label_pixels": "label file(s) with pixels outside the palette or the class ids (read as background)",
}


def check_dataset(root, name, deep=False, tolerated=None):
    """Walk a dataset layout and list every missing or unreadable item.

    Args:
        root: the dataset folder; name: 's4' | 'ms3' | 'avss' ('synthetic' has no files: []).
        deep: bool, also decode every image and read every audio file (slow on the full release);
            without it, files are checked by existence, image header, end marker and wav header.
        tolerated: None, or a dict that receives the flaws the readers accept, as the official code
            does, with a warning: {kind: [line, ...]}, kinds of TOLERATED_KINDS, one line per file:
              'short_audio'   a wav (with deep also a .pkl) that gives two or more VGGish examples
                              fewer than its clip has frames; the line names the seconds found
                              and needed (one example short is the official padding, not listed);
              'label_pixels'  with deep: an AVSS label with colours outside the palette or class
                              ids above 70, and how many pixels.
            They are not problems: a run reads them.
    Returns:
        list of str, one per problem: "<path>: <what is wrong>; expected <what it should be>".
        Empty when the layout is complete.
    """
    tolerated = {} if tolerated is None else tolerated
    if name == "synthetic":
        return []
    if root is None:
        return [f"--data-root: not given; expected the folder of the {name} dataset"]
    try:
        if name in ("s4", "ms3"):
            clips = _v1_clips(root, name)
            mask_what = "mode-L PNG mask 0/255 of its frame's size"
            return [p for clip in clips for p in _check_clip(
                clip, lambda i, c=clip: f"frame {i + 1} of clip {c['id']} (RGB PNG)",
                lambda i, c=clip: f"mask {i + 1} of clip {c['id']} ({mask_what})",
                "a pickled torch log-mel [5, 1, 96, 64] (.pkl) or a 16 kHz wav", deep,
                V1_AUDIO_PADDING, tolerated)]
        if name == "avss":
            clips = _avss_clips(root)
            problems, palette = [], None
            try:
                palette = voc_palette(len(_avss_classes(root)))  # (Kc+1, 3) = (71, 3)
            except DataError as error:
                problems.append(str(error))
            for clip in clips:
                problems += _check_clip(
                    clip, lambda i, c=clip: f"frame {i} of clip {c['id']} (JPEG; {c['subset']} clips have "
                                            f"{len(c['frames'])} frames)",
                    lambda i, c=clip: f"label {i} of clip {c['id']} (labels_semantic class ids or labels_rgb "
                                      f"VOC palette, the size of its frame)",
                    "audio.wav (PCM, 16 or 48 kHz)", deep, AVSS_AUDIO_PADDING, tolerated,
                    None if palette is None else lambda path: _avss_label_note(path, palette))
            return problems
    except DataError as error:  # the root or the metadata: nothing further can be walked
        return [str(error)]
    raise ValueError(f"unknown dataset {name!r}; expected s4, ms3, avss or synthetic")


def main(argv=None):
    check = argparse.ArgumentParser(description="Check an AVSBench dataset layout: list every "
                                                "missing or unreadable file.")
    check.add_argument("--dataset", required=True, choices=["s4", "ms3", "avss", "synthetic"])
    check.add_argument("--data-root", default=None)
    check.add_argument("--deep", action="store_true", help="decode every image and audio file")
    args = check.parse_args(argv)
    tolerated = {}
    try:
        if args.dataset != "synthetic" and args.data_root is None:
            raise DataError(f"--data-root: not given; expected the folder of the {args.dataset} dataset")
        problems = check_dataset(args.data_root, args.dataset, deep=args.deep, tolerated=tolerated)
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 2
    for line in problems + [line for lines in tolerated.values() for line in lines]:
        print(line)
    if tolerated:
        counts = "; ".join(f"{len(lines)} {TOLERATED_KINDS[kind]}" for kind, lines in tolerated.items())
        print(f"read with a warning, as the official code reads them: {counts}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.data_root} ({args.dataset})", file=sys.stderr)
        return 2
    print(f"ok: {args.data_root} has the complete {args.dataset} layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
