"""Data: exact readers of AVSBench (S4, MS3, AVSS), and the one batch every dataset gives.

What this file teaches
----------------------
Audiovisual segmentation (paper §4, "Dataset") labels, in every frame, the pixels of the objects
that are *heard* in that second. This file makes the batches the model reads:

  frames      (B, T, 3, H, W) float32, ImageNet-normalised
  audio       (B, T, 1, 96, 64) float32, one 0.96 s VGGish log-mel example per frame
  labels      (B, T, H, W) int64, 0 = background, 1..Kc = sounding class
  label_valid (B, T) bool, the frame carries ground truth (S4 and AVSS-v1s train: frame 0 only)
  frame_valid (B, T) bool, a real frame, not padding (AVSS clips are padded to 10 frames)
  meta        list of B dicts (clip id, 'multi_source', and for synthetic clips the sounding table)

Two kinds of dataset give it:
  * the synthetic benchmark, the default `--dataset synthetic`: clips generated on the fly from
    (seed, split, index), no files (synthetic.py: SyntheticAVS; build_dataset makes it);
  * readers of the real releases exactly as they are laid out on disk:
    AVSObjectDataset (S4 "Single-source", MS3 "Multi-sources") and AVSSDataset (AVSBench-semantic).
    The dataset cannot ship with the code: it is handed out by its authors on request.
    The VGGish PCA post-processor is not needed: AVSBench feeds the raw log-mel to VGGish.
A clip of one's own (predict.py) gets its audio from the same functions as the readers
(clip_examples, seconds_needed, pad_examples).

Every bad input (missing root, missing or empty metadata, absent clip folder, missing frame,
truncated image, unreadable wav, label png of the wrong size) raises DataError with one message
naming the file and what was expected. Flaws the official code tolerates are read as it reads
them, with a warning naming the file: audio more than one 0.96 s example short of its clip's
frames (padded), label colours outside the palette or class ids above 70 (background).
check_dataset walks a whole layout before a run and lists every problem at once (train.py calls it
through require_dataset; tools/check_dataset.py is its command line).

Reading order
-------------
 1. DataError, constants (ImageNet statistics, the AVSS classes and VOC palette)
 2. file readers            read_image, decode_palette, read_wav, read_log_mel_pkl; a clip's
                            audio (clip_examples, seconds_needed, pad_examples), short audio
 3. spatial transform       multi-scale crop for training, square resize for evaluation
 4. AVSObjectDataset        S4 and MS3 (binary: class 1 = sounding object)
 5. AVSSDataset             AVSBench-semantic (70 classes, clips padded to 10 frames)
 6. build_dataset, collate  what train.py calls; ZeroAudio, the vision-alone control
 7. require_dataset, check_dataset   every missing or unreadable file of a layout, before a run

Shape alphabet
--------------
The repository's one shape alphabet: docs/shapes.md. Letters used here: B clips, T frames of a
clip (or of a training window), Tc frames stored on disk for a clip, H, W image size (img_size,
H = W), Hn, Wn an image's own size on disk, Kc foreground classes, Ns audio samples, E 0.96 s
log-mel examples, each 96 x 64 (time steps x mel bands). Other sizes are written as words or as
the names of the code (missing examples, length).
"""
import collections
import csv
import io
import json
import os
import pickle
import warnings

import numpy as np
import torch
from PIL import Image
from scipy.io import wavfile
from torch.utils.data import Dataset

import synthetic
from encoders import (IMAGENET_MEAN, IMAGENET_STD, VGGISH_EXAMPLE_FRAMES, VGGISH_NUM_MEL_BINS,
                      VGGISH_SAMPLE_RATE, vggish_log_mel)


class DataError(Exception):
    """A dataset file is missing, empty or unreadable. The message names the file and what was expected.

    train.py catches it and exits with code 2 without a traceback.
    """


# ----------------------------------------------------------------------------------------------
# 1. Constants
# ----------------------------------------------------------------------------------------------
# IMAGENET_MEAN, IMAGENET_STD (encoders.py): every frame is normalised with them, as the
# ImageNet-pretrained backbones expect.
AUDIO_RATE = VGGISH_SAMPLE_RATE  # Hz, 16000, the VGGish rate; one frame = one second of audio
LOG_MEL_SHAPE = (VGGISH_EXAMPLE_FRAMES, VGGISH_NUM_MEL_BINS)  # one VGGish example: 96 frames of 10 ms x 64 mel bands

# AVSBench-semantic: background + 70 sounding classes, in the key order of label2idx.json
# (values 1..71 there; the class id in tensors is value - 1, so background = 0).
AVSS_CLASS_NAMES = (
    "background accordion airplane axe baby bassoon bell bird boat boy bus car cat cello clarinet "
    "clipper clock dog donkey drum duck elephant emergency-car erhu flute frying-food girl goose "
    "guitar gun guzheng hair-dryer handpan harmonica harp helicopter hen horse keyboard leopard "
    "lion man marimba missile-rocket motorcycle mower parrot piano pig pipa saw saxophone sheep "
    "sitar sorna squirrel tabla tank tiger tractor train trombone truck trumpet tuba ukulele utv "
    "vacuum-cleaner violin wolf woman").split()
AVSS_FRAMES = 10  # every AVSS clip is padded to 10 frames (v2 clips are 10 s, v1 clips 5 s)


def voc_palette(num_colours):
    """The PASCAL-VOC colour map (bit interleaving), as the official AVSS loader builds it.

    Args:
        num_colours: int, e.g. 71.
    Returns:
        palette: np.ndarray (num_colours, 3) uint8; row j is the colour of class j (0 = black).
    """
    palette = np.zeros((num_colours, 3), dtype=np.uint8)  # (num_colours, 3)
    for j in range(num_colours):
        c, r, g, b = j, 0, 0, 0
        for k in range(8):  # bit 3k of j -> bit 7-k of R, 3k+1 -> G, 3k+2 -> B
            r |= ((c >> 0) & 1) << (7 - k)
            g |= ((c >> 1) & 1) << (7 - k)
            b |= ((c >> 2) & 1) << (7 - k)
            c >>= 3
        palette[j] = (r, g, b)
    return palette


# ----------------------------------------------------------------------------------------------
# 2. File readers: each raises DataError naming the file and what was expected
# ----------------------------------------------------------------------------------------------
def read_image(path, expected):
    """Open and decode an image. Returns a PIL image (decoded); `expected` describes the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; expected {expected}")
    try:
        image = Image.open(path)
        image.load()  # decodes everything: a truncated file fails here
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: unreadable or truncated ({error}); expected {expected}") from None
    return image


def palette_ids(rgb, palette):
    """Colour label map -> (class ids, known) by exact colour match; unknown colours -> 0.

    Args:
        rgb: np.ndarray (H, W, 3) uint8 (a label resized to img_size; tools/check_dataset.py passes
            one at its own size, (Hn, Wn, 3)).
        palette: np.ndarray (Kc+1, 3) uint8; row j is the colour of class j.
    Returns:
        ids: np.ndarray (H, W) int64; known: np.ndarray (H, W) bool, the colour is in the palette.
    """
    rgb, palette = rgb.astype(np.int64), palette.astype(np.int64)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W) one integer per colour
    palette_keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]  # (Kc+1,)
    order = np.argsort(palette_keys)
    sorted_keys = palette_keys[order]  # (Kc+1,)
    position = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)  # (H, W)
    known = sorted_keys[position] == keys  # (H, W)
    ids = np.where(known, order[position], 0)  # (H, W), unknown colour -> background as the official code
    return ids, known


def decode_palette(rgb, palette, path=""):
    """Colour label map -> class ids by exact colour match; unknown colours -> 0 with a counted warning.

    Args:
        rgb: np.ndarray (H, W, 3) uint8.
        palette: np.ndarray (Kc+1, 3) uint8; row j is the colour of class j.
    Returns:
        ids: np.ndarray (H, W) int64.
    """
    ids, known = palette_ids(rgb, palette)  # (H, W), (H, W)
    unknown = int((~known).sum())
    if unknown:
        warnings.warn(f"{path}: {unknown} pixels have colours outside the {len(palette)}-colour palette; "
                      f"mapped to background (class 0)", stacklevel=2)
    return ids


def read_wav(path, expected):
    """A wav file -> (mono float64 waveform (Ns,), sample rate). int16/int32/uint8/float PCM."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; expected {expected}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", wavfile.WavFileWarning)
            rate, data = wavfile.read(path)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: unreadable wav ({error}); expected {expected}") from None
    early_end = [str(w.message) for w in caught if "EOF" in str(w.message)]
    if early_end:  # scipy returns the samples it found and only warns; a truncated file is an error
        raise DataError(f"{path}: truncated wav ({early_end[0]}); expected {expected}")
    if data.dtype == np.uint8:
        data = (data.astype(np.float64) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))  # int16: / 32768
    data = data.astype(np.float64)
    if data.ndim == 2:
        data = data.mean(axis=1)  # (Ns,) stereo averaged to mono, as VGGish does
    if data.size == 0:
        raise DataError(f"{path}: no samples; expected {expected}")
    return data, int(rate)


def wav_log_mel(path, expected):
    """A wav -> (VGGish log-mel examples (E, 96, 64) float32, its duration in seconds).

    Resampled to 16 kHz inside encoders.vggish_log_mel; E = examples_in(Ns, rate).
    """
    waveform, rate = read_wav(path, expected)
    return vggish_log_mel(waveform, rate), len(waveform) / rate  # (E, 96, 64), seconds


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a plain-pickled torch tensor and nothing else.

    A pickle names the functions that rebuild its objects, and unpickling calls them: a crafted
    file can name os.system. This unpickler admits only the three globals `pickle.dump(tensor)`
    writes (_rebuild_tensor_v2, the storage loader and OrderedDict for the tensor's hooks); the
    storage bytes inside go through torch.load(weights_only=True). Anything else is refused.
    """

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a log-mel .pkl holds one "
                                     f"torch tensor, and unpickling anything else can run code")


def _storage_from_bytes(blob):
    """The storage of a pickled tensor: a torch.save blob, loaded with weights_only=True."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "TypedStorage is deprecated"
        return torch.load(io.BytesIO(blob), weights_only=True)


def read_log_mel_pkl(path, expected):
    """An AVSBench v1 `.pkl`: a plain-pickled torch tensor [5, 1, 96, 64], read as is (detached).

    Read with _TensorUnpickler: a file that holds anything but a tensor is refused (DataError), and
    no code in it runs.
    """
    try:
        with open(path, "rb") as f:
            tensor = _TensorUnpickler(f).load()
    except Exception as error:  # a bad pickle can raise almost anything
        raise DataError(f"{path}: unreadable pickle ({type(error).__name__}: {error}); expected {expected}") from None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape[-2:]) != LOG_MEL_SHAPE:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise DataError(f"{path}: holds {got}; expected {expected}")
    return tensor.detach().float().reshape(-1, 1, *LOG_MEL_SHAPE)  # (E, 1, 96, 64)


# Short audio. A clip of Tc frames needs Tc VGGish examples, one per frame (0.96 s each). Where a
# file gives fewer, the official code pads: the AVSS loader with zero examples, AVSBench's S4/MS3
# preprocessing by repeating the last example. One example short is ordinary (a 5 s clip cut a
# few ms early gives 4 examples) and is padded without a word. More than one is padded the same
# way, because refusing a dataset for one clip helps nobody, but warned about, once per file (a
# dataset is read every epoch; each DataLoader worker process keeps its own record). S4/MS3 audio
# without one example has no last example to repeat: a DataError.
# NOT IN PAPER: the warning and check_dataset's count; the official code pads silently.
EXAMPLE_SECONDS = 0.96  # one VGGish example: 96 STFT hops of 10 ms
AVSS_AUDIO_PADDING = "filled with zeros, as the official AVSS loader pads"
V1_AUDIO_PADDING = "filled with copies of the last example, as AVSBench's preprocessing pads"
_warned_short_audio = set()  # audio files already warned about in this process


def examples_in(num_samples, rate):
    """VGGish examples in `num_samples` samples at `rate` Hz, as encoders.vggish_log_mel counts them.

    The waveform of Ns = num_samples samples is resampled to ceil(Ns * 16000 / rate) samples at
    16 kHz; STFT frames = 1 + (that - 400) // 160 (25 ms windows, 10 ms hop, no padding);
    E = STFT frames // 96.
    """
    n16 = -(-int(num_samples) * AUDIO_RATE // int(rate))  # ceil, resample_poly's output length
    frames = 1 + (n16 - 400) // 160 if n16 >= 400 else 0
    return frames // LOG_MEL_SHAPE[0]


def seconds_for_examples(num_examples):
    """The shortest 16 kHz audio that gives num_examples VGGish examples: 400 + 160 (96 E - 1) samples."""
    return (400 + 160 * (LOG_MEL_SHAPE[0] * num_examples - 1)) / AUDIO_RATE


def seconds_needed(num_frames, dataset):
    """The audio that num_frames frames need, cut as the reader of `dataset` cuts it: one whole
    second a frame (synthetic), or the shortest wav that gives num_frames 0.96 s examples (s4,
    ms3, avss: 0.96 T + 0.015 s, seconds_for_examples)."""
    return float(num_frames) if dataset == "synthetic" else seconds_for_examples(num_frames)


def clip_examples(waveform, rate, dataset, num_frames):
    """Up to num_frames VGGish log-mel examples of a waveform, built as the reader of `dataset` builds them.

    synthetic: each second on its own (synthetic.per_second_log_mel, as SyntheticAVS), so example
    t is exactly second t; s4, ms3, avss: the whole waveform at once (wav_log_mel), as AVSBench's
    preprocessing. Args: waveform (Ns,) at `rate` Hz. Returns (E, 96, 64) float32, E <= num_frames.
    """
    if dataset == "synthetic":
        return synthetic.per_second_log_mel(waveform, rate, num_frames)  # (E, 96, 64)
    return vggish_log_mel(waveform, rate)[:num_frames]  # (E, 96, 64)


def pad_examples(audio, num_frames, dataset):
    """A clip's examples cut or padded to num_frames, as the reader of `dataset` pads a short clip:
    copies of the last example for s4 and ms3 (AVSBench's preprocessing), zero examples for avss
    (the official AVSS loader) and synthetic.

    Args: audio (E, 1, 96, 64) float32 tensor, E >= 1 for s4 and ms3. Returns (num_frames, 1, 96, 64).
    """
    missing = num_frames - len(audio)
    if missing <= 0:
        return audio[:num_frames]  # (num_frames, 1, 96, 64)
    if dataset in ("s4", "ms3"):
        fill = audio[-1:].expand(missing, -1, -1, -1)  # (missing, 1, 96, 64)
    else:
        fill = audio.new_zeros(missing, *audio.shape[1:])  # (missing, 1, 96, 64)
    return torch.cat([audio, fill])  # (num_frames, 1, 96, 64)


def short_audio_note(path, num_examples, num_frames, found_seconds, needed_seconds, padding):
    """The line naming an audio file more than one example short of its clip's frames, else None.

    Args:
        path: the wav or .pkl; num_examples: E, the examples it gives; num_frames: Tc of the clip;
        found_seconds, needed_seconds: the audio it holds and the audio Tc examples need;
        padding: what fills the Tc - E missing examples (AVSS_AUDIO_PADDING or V1_AUDIO_PADDING).
    """
    missing = num_frames - num_examples
    if missing <= 1:  # the official padding, silently
        return None
    return (f"{path}: {round(found_seconds, 3):g} s of audio; expected {round(needed_seconds, 3):g} s, "
            f"one 0.96 s VGGish example for each of the {num_frames} frames of its clip; it gives "
            f"{num_examples} of {num_frames}, and the {missing} missing examples are {padding}")


def no_example_message(path, found):
    """The error for S4/MS3 audio without one complete example: there is no last one to repeat."""
    return (f"{path}: {round(found, 3):g} s of audio, not one 0.96 s VGGish example; "
            f"expected about 5 s, one example per frame")


def warn_short_audio(path, note):
    """warnings.warn(note) the first time `path` is read in this process; nothing when note is None."""
    if note is not None and path not in _warned_short_audio:
        _warned_short_audio.add(path)
        warnings.warn(note, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# 3. Spatial transform: the same resize (and crop) for every frame and label of a clip
# ----------------------------------------------------------------------------------------------
# PAPER: "multi-scale training" with no scales given. We resize the short side to img_size * s,
# s drawn from TRAIN_SCALES, and take a random img_size x img_size crop (the official AVSS loader
# is the case s = 1 with a centre crop).
# NOT IN PAPER: evaluation resizes to a square img_size x img_size, as the official AVSS test code
# does; the paper says "longest side 224", which keeps the aspect ratio (v1 frames are 224^2
# already, so S4 and MS3 see no difference).
TRAIN_SCALES = (1.0, 1.125, 1.25)


def spatial_plan(native_size, img_size, train):
    """Where a clip's images go. native_size (Wn, Hn) -> (resize_to (new_w, new_h), crop box or None)."""
    if not train:
        return (img_size, img_size), None
    width, height = native_size
    short = img_size * TRAIN_SCALES[int(torch.randint(len(TRAIN_SCALES), ()))]
    scale = short / min(width, height)
    new_w, new_h = max(img_size, round(width * scale)), max(img_size, round(height * scale))
    left = int(torch.randint(new_w - img_size + 1, ()))  # torch RNG: seeded per DataLoader worker
    top = int(torch.randint(new_h - img_size + 1, ()))
    return (new_w, new_h), (left, top, left + img_size, top + img_size)


def apply_spatial(image, plan, resample):
    """Resize (bilinear for frames, nearest for labels) then crop a PIL image."""
    size, box = plan
    image = image.resize(size, resample)
    return image.crop(box) if box is not None else image


def frame_tensor(image):
    """PIL RGB (H, W) -> ImageNet-normalised tensor (3, H, W) float32."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(((array - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())  # (3, H, W)


def choose_window(num_frames, labelled, T, train):
    """Frame indices of one item: every frame for evaluation; T consecutive ones for training.

    Training picks a random start among the windows that hold at least one labelled frame (S4 and
    AVSS-v1s train label only the first frame). Returns a list of length min(T, num_frames) (train)
    or num_frames (eval); the caller pads.
    """
    if not train or T >= num_frames:
        return list(range(num_frames))
    starts = [s for s in range(num_frames - T + 1) if any(s <= i < s + T for i in labelled)] or [0]
    start = starts[int(torch.randint(len(starts), ()))]
    return list(range(start, start + T))


def assemble(frames, audio, labels, labelled, length, img_size):
    """Pad a clip's per-frame tensors to `length` frames (zeros, as the official AVSS loader).

    Args:
        frames: list of (3, H, W); audio: (T, 1, 96, 64); labels: list of (H, W) int64;
        labelled: list of bool, one per frame; length: int >= T.
    Returns: dict frames (length,3,H,W), audio (length,1,96,64), labels (length,H,W),
        label_valid (length,), frame_valid (length,).
    """
    T = len(frames)
    out_frames = torch.zeros(length, 3, img_size, img_size)  # (length, 3, H, W)
    out_frames[:T] = torch.stack(frames)
    out_audio = torch.zeros(length, 1, *LOG_MEL_SHAPE)  # (length, 1, 96, 64)
    out_audio[:T] = audio
    out_labels = torch.zeros(length, img_size, img_size, dtype=torch.int64)  # (length, H, W)
    out_labels[:T] = torch.stack(labels)
    label_valid = torch.zeros(length, dtype=torch.bool)  # (length,)
    label_valid[:T] = torch.tensor(labelled, dtype=torch.bool)
    frame_valid = torch.zeros(length, dtype=torch.bool)  # (length,)
    frame_valid[:T] = True
    return {"frames": out_frames, "audio": out_audio, "labels": out_labels,
            "label_valid": label_valid, "frame_valid": frame_valid}


# ----------------------------------------------------------------------------------------------
# 4. AVS-Object: S4 (Single-source) and MS3 (Multi-sources)
# ----------------------------------------------------------------------------------------------
V1_FRAMES = 5  # v1 clips: 5 frames, one per second, 1-based file indices


def _v1_base(root, name):
    """The Single-source/ or Multi-sources/ folder (root may be avsbench_data/ or that folder)."""
    folder, csv_name = {"s4": ("Single-source", "s4_meta_data.csv"),
                        "ms3": ("Multi-sources", "ms3_meta_data.csv")}[name]
    if os.path.isfile(os.path.join(root, csv_name)):
        return root, os.path.join(root, csv_name)
    return os.path.join(root, folder), os.path.join(root, folder, csv_name)


def _read_csv(path, required, what):
    """A metadata csv -> (header, rows). Missing, empty, or lacking `required` columns -> DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; expected {what}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: unreadable ({error}); expected {what}") from None
    if len(table) < 2:
        raise DataError(f"{path}: empty (no clip rows); expected {what}")
    header = [h.strip() for h in table[0]]
    for column in required:
        if column not in header:
            raise DataError(f"{path}: no column {column!r} in header {header}; expected {what}")
    width = len(header)
    for number, row in enumerate(table[1:], start=2):
        if len(row) < width:
            raise DataError(f"{path}: line {number} has {len(row)} fields; expected {width} ({', '.join(header)})")
    return header, [[cell.strip() for cell in row] for row in table[1:]]


def _v1_clips(root, name):
    """Every clip of S4 or MS3 with its expected files. Raises DataError for a missing root or csv.

    Returns: list of dicts id, split, category, frames [5 paths], labels {frame index: path},
        audio [candidate paths, first existing wins], folder (the clip's frame folder).
    """
    if not os.path.isdir(root):
        raise DataError(f"{root}: missing; expected the AVSBench-object root (avsbench_data/ holding "
                        f"{'Single-source/' if name == 's4' else 'Multi-sources/'})")
    base, csv_path = _v1_base(root, name)
    if name == "s4":
        header, rows = _read_csv(csv_path, ["split"], "s4_meta_data.csv with columns name,<start>,category,split")
        category_col = header.index("category") if "category" in header else 2
    else:
        header, rows = _read_csv(csv_path, ["split"], "ms3_meta_data.csv with columns name,split")
    name_col = header.index("name") if "name" in header else 0  # positional, as the official loader
    split_col = header.index("split")
    clips = []
    for row in rows:
        clip, split = row[name_col], row[split_col]
        if name == "s4":
            category = row[category_col]
            data = os.path.join(base, "s4_data")
            folder = os.path.join(data, "visual_frames", split, category, clip)
            frames = [os.path.join(folder, f"{clip}_{i}.png") for i in range(1, V1_FRAMES + 1)]
            mask_dir = os.path.join(data, "gt_masks", split, category, clip)
            audio = [os.path.join(data, "audio_log_mel", split, category, f"{clip}.pkl"),
                     os.path.join(data, "audio_wav", split, category, f"{clip}.wav")]
            labelled = [0] if split == "train" else list(range(V1_FRAMES))  # S4 train: only frame 1
        else:
            category = None
            data = os.path.join(base, "ms3_data")
            folder = os.path.join(data, "visual_frames", clip)  # no split folder
            frames = [os.path.join(folder, f"{clip}.mp4_{i}.png") for i in range(1, V1_FRAMES + 1)]  # ".mp4_" quirk
            mask_dir = os.path.join(data, "gt_masks", split, clip)
            audio = [os.path.join(data, "audio_log_mel", split, f"{clip}.pkl"),
                     os.path.join(data, "audio_wav", split, f"{clip}.wav")]
            labelled = list(range(V1_FRAMES))  # MS3: 5 masks in every split
        labels = {i: os.path.join(mask_dir, f"{clip}_{i + 1}.png") for i in labelled}
        clips.append({"id": clip, "split": split, "category": category, "folder": folder,
                      "frames": frames, "labels": labels, "audio": audio})
    return clips


class AVSObjectDataset(Dataset):
    """AVSBench-object S4 ('s4') or MS3 ('ms3'): binary segmentation of the sounding object(s).

    Layout of the AVSBench-object release: Single-source/s4_meta_data.csv and
    s4_data/{visual_frames,gt_masks}/{split}/{category}/{name}/{name}_{1..5}.png,
    s4_data/audio_log_mel/{split}/{category}/{name}.pkl; Multi-sources/ms3_meta_data.csv and
    ms3_data/visual_frames/{name}/{name}.mp4_{1..5}.png (no split folder),
    ms3_data/gt_masks/{split}/{name}/{name}_{1..5}.png, ms3_data/audio_log_mel/{split}/{name}.pkl.
    Masks are mode-L PNGs 0/255 (>= 128 -> class 1). S4 train has only the first mask.
    Audio: the pickled torch log-mel [5, 1, 96, 64] read as is; if absent, audio_wav/...wav through
    the VGGish front end. Either is padded to 5 by repeating the last example (as AVSBench's
    preprocessing), with a warning once per file when more than one example is missing.

    Args:
        root: avsbench_data/ (or its Single-source/ / Multi-sources/ folder); name: 's4' | 'ms3';
        split: 'train' | 'val' | 'test'; img_size: H = W; frames: T of a training window;
        train: bool, multi-scale crop and a T-frame window, else square resize and all 5 frames.
    Item: the dict of the file docstring; meta: 'clip', 'split', 'category' (S4), 'multi_source'
        (False for S4, True for MS3), 'frame_index' (source frame of each output frame, -1 = pad).
    """

    def __init__(self, root, name, split, img_size=224, frames=5, train=False):
        self.name, self.split, self.img_size, self.frames, self.train = name, split, img_size, frames, train
        self.clips = [c for c in _v1_clips(root, name) if c["split"] == split]
        if not self.clips:
            raise DataError(f"{_v1_base(root, name)[1]}: no rows with split={split!r}; expected at least one")
        for clip in self.clips:
            if not os.path.isdir(clip["folder"]):
                raise DataError(f"{clip['folder']}: missing; expected the frame folder of clip {clip['id']} "
                                f"listed in the metadata")
        self.num_classes = 1
        self.class_names = ["background", "sounding object"]

    def __len__(self):
        return len(self.clips)

    def _audio(self, clip):
        pkl, wav = clip["audio"]
        if os.path.isfile(pkl):
            audio = read_log_mel_pkl(pkl, "a pickled torch tensor [5, 1, 96, 64]")  # (E, 1, 96, 64)
            path, found, needed = pkl, len(audio) * EXAMPLE_SECONDS, V1_FRAMES * EXAMPLE_SECONDS
        elif os.path.isfile(wav):
            examples, found = wav_log_mel(wav, "a 16 kHz wav of about 5 s")  # (E, 96, 64), seconds
            audio = torch.from_numpy(examples).unsqueeze(1)  # (E, 1, 96, 64)
            path, needed = wav, seconds_for_examples(V1_FRAMES)
        else:
            raise DataError(f"{pkl}: missing (and no {wav}); expected the clip's log-mel .pkl or its wav")
        if len(audio) == 0:  # nothing to repeat
            raise DataError(no_example_message(path, found))
        warn_short_audio(path, short_audio_note(path, len(audio), V1_FRAMES, found, needed, V1_AUDIO_PADDING))
        return pad_examples(audio, V1_FRAMES, self.name)  # (5, 1, 96, 64) the last example repeated

    def __getitem__(self, index):
        clip = self.clips[index]
        window = choose_window(V1_FRAMES, list(clip["labels"]), self.frames, self.train)
        audio = self._audio(clip)[window]  # (T, 1, 96, 64)
        images = [read_image(clip["frames"][i], f"frame {i + 1} of clip {clip['id']} (RGB PNG)") for i in window]
        plan = spatial_plan(images[0].size, self.img_size, self.train)
        frames, labels, labelled = [], [], []
        for i, image in zip(window, images):
            frames.append(frame_tensor(apply_spatial(image.convert("RGB"), plan, Image.BILINEAR)))  # (3, H, W)
            if i in clip["labels"]:
                path = clip["labels"][i]
                mask = read_image(path, f"mask {i + 1} of clip {clip['id']} (mode-L PNG, 0/255)")
                if mask.size != image.size:
                    raise DataError(f"{path}: size {mask.size}; expected {image.size} (W, H) like its frame")
                mask = apply_spatial(mask.convert("L"), plan, Image.NEAREST)
                labels.append(torch.from_numpy((np.asarray(mask) >= 128).astype(np.int64)))  # (H, W) 0/1
                labelled.append(True)
            else:
                labels.append(torch.zeros(self.img_size, self.img_size, dtype=torch.int64))  # (H, W)
                labelled.append(False)
        length = max(len(window), self.frames) if self.train else V1_FRAMES
        item = assemble(frames, audio, labels, labelled, length, self.img_size)
        item["meta"] = {"clip": clip["id"], "split": clip["split"], "category": clip["category"],
                        "multi_source": self.name == "ms3",
                        "frame_index": window + [-1] * (length - len(window))}
        return item


# ----------------------------------------------------------------------------------------------
# 5. AVSS (AVSBench-semantic)
# ----------------------------------------------------------------------------------------------
AVSS_COLUMNS = ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"]
AVSS_SUBSET_FRAMES = {"v1s": 5, "v1m": 5, "v2": 10}  # frames per clip (0-based .jpg names)


def _avss_classes(root):
    """Class names in label2idx.json order (value 1 = background -> class id 0)."""
    path = os.path.join(root, "label2idx.json")
    expected = f"label2idx.json mapping the {len(AVSS_CLASS_NAMES)} AVSS class names to 1..{len(AVSS_CLASS_NAMES)}"
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; expected {expected}")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({error}); expected {expected}") from None
    if not isinstance(table, dict) or len(table) != len(AVSS_CLASS_NAMES):
        raise DataError(f"{path}: {len(table)} entries; expected {expected}")
    return [name for name, _ in sorted(table.items(), key=lambda item: item[1])]


def _avss_clips(root):
    """Every AVSS clip with its expected files. Raises DataError for a missing root or metadata."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: missing; expected the AVSBench-semantic root holding metadata.csv, "
                        f"label2idx.json, v1s/, v1m/, v2/")
    header, rows = _read_csv(os.path.join(root, "metadata.csv"), AVSS_COLUMNS,
                             "metadata.csv with columns " + ",".join(AVSS_COLUMNS))
    col = {name: header.index(name) for name in AVSS_COLUMNS}
    clips = []
    for row in rows:
        uid, split, subset, a_obj = row[col["uid"]], row[col["split"]], row[col["label"]], row[col["a_obj"]]
        if subset not in AVSS_SUBSET_FRAMES:
            raise DataError(f"{os.path.join(root, 'metadata.csv')}: clip {uid} has label {subset!r}; "
                            f"expected one of v1s, v1m, v2")
        folder = os.path.join(root, subset, uid)
        num_frames = AVSS_SUBSET_FRAMES[subset]
        labelled = [0] if (subset == "v1s" and split == "train") else list(range(num_frames))  # v1s train: frame 0
        labels = {i: [os.path.join(folder, "labels_semantic", f"{i}.png"),  # class ids, used where present
                      os.path.join(folder, "labels_rgb", f"{i}.png")] for i in labelled}
        objects = [o for o in a_obj.split("_") if o]
        clips.append({"id": uid, "split": split, "subset": subset, "folder": folder, "objects": objects,
                      "frames": [os.path.join(folder, "frames", f"{i}.jpg") for i in range(num_frames)],
                      "labels": labels, "audio": os.path.join(folder, "audio.wav"),
                      "multi_source": subset == "v1m" or len(objects) > 1})
    return clips


class AVSSDataset(Dataset):
    """AVSBench-semantic: 70 sounding classes + background, 5 s and 10 s clips.

    Layout: metadata.csv (vid,uid,s_min,s_sec,a_obj,split,label), label2idx.json, and per clip
    {label}/{uid}/frames/{i}.jpg (0-based, native resolution), labels_semantic/{i}.png (class
    ids, used where present) or labels_rgb/{i}.png (VOC palette, decoded by exact colour; unknown
    colours -> background with a counted warning), audio.wav (16 or 48 kHz, mono or stereo).
    v1s train clips are labelled in frame 0 only. Evaluation returns every frame padded to 10
    (zeros, frame_valid/label_valid False); audio is zero-padded to 10 examples like the official
    code, with a warning once per file when the wav gives two or more examples fewer than the clip
    has frames. Training returns a T-frame window (padded to T if the clip is shorter).

    Args: root, split ('train' | 'val' | 'test'), img_size, frames (T), train (bool).
    Item meta: 'clip' (uid), 'split', 'subset' (v1s | v1m | v2), 'objects' (a_obj names),
        'multi_source' (v1m, or more than one audible object), 'frame_index' (-1 = padding).
    """

    def __init__(self, root, split, img_size=224, frames=5, train=False):
        self.split, self.img_size, self.frames, self.train = split, img_size, frames, train
        clips = _avss_clips(root)
        self.class_names = _avss_classes(root)
        self.num_classes = len(self.class_names) - 1  # 70
        self.palette = voc_palette(len(self.class_names))  # (71, 3)
        self.clips = [c for c in clips if c["split"] == split]
        if not self.clips:
            raise DataError(f"{os.path.join(root, 'metadata.csv')}: no rows with split={split!r}; "
                            f"expected at least one")
        for clip in self.clips:
            if not os.path.isdir(clip["folder"]):
                raise DataError(f"{clip['folder']}: missing; expected the folder of clip {clip['id']} "
                                f"listed in metadata.csv (frames/, labels_rgb/ or labels_semantic/, audio.wav)")

    def __len__(self):
        return len(self.clips)

    def _label(self, clip, i, frame_size, plan):
        semantic, rgb = clip["labels"][i]
        path = semantic if os.path.isfile(semantic) else rgb
        kind = "class-id" if path == semantic else "VOC-palette RGB"
        label = read_image(path, f"label {i} of clip {clip['id']} ({kind} PNG)")
        if label.size != frame_size:
            raise DataError(f"{path}: size {label.size}; expected {frame_size} (W, H), the size of frames/{i}.jpg")
        if path == semantic:
            label = label if label.mode in ("L", "P") else label.convert("L")  # ids, not colours
            ids = np.asarray(apply_spatial(label, plan, Image.NEAREST)).astype(np.int64)  # (H, W)
            bad = ids > self.num_classes
            if bad.any():
                warnings.warn(f"{path}: {int(bad.sum())} pixels have class ids above {self.num_classes}; "
                              f"mapped to background (class 0)", stacklevel=2)
                ids[bad] = 0
        else:
            # The nearest resize comes first, as in the official loader (colours survive nearest).
            ids = decode_palette(np.asarray(apply_spatial(label.convert("RGB"), plan, Image.NEAREST)),
                                 self.palette, path)  # (H, W)
        return torch.from_numpy(ids)  # (H, W) int64

    def __getitem__(self, index):
        clip = self.clips[index]
        window = choose_window(len(clip["frames"]), list(clip["labels"]), self.frames, self.train)
        examples, found = wav_log_mel(clip["audio"], "PCM audio of the clip (16 or 48 kHz, "
                                                     "mono or stereo)")  # (E, 96, 64), seconds
        count = len(clip["frames"])  # Tc frames need Tc examples
        warn_short_audio(clip["audio"], short_audio_note(clip["audio"], len(examples), count, found,
                                                         seconds_for_examples(count), AVSS_AUDIO_PADDING))
        # PAPER: a wav longer than 10.56 s (more than 10 examples) crashes the official code; we keep 10.
        audio = pad_examples(torch.from_numpy(examples).unsqueeze(1), AVSS_FRAMES, "avss")  # (10, 1, 96, 64) zero-padded
        images = [read_image(clip["frames"][i], f"frame {i} of clip {clip['id']} (JPEG; "
                             f"{clip['subset']} clips have {count} frames 0..{count - 1}.jpg)") for i in window]
        plan = spatial_plan(images[0].size, self.img_size, self.train)
        frames, labels, labelled = [], [], []
        for i, image in zip(window, images):
            frames.append(frame_tensor(apply_spatial(image.convert("RGB"), plan, Image.BILINEAR)))  # (3, H, W)
            if i in clip["labels"]:
                labels.append(self._label(clip, i, image.size, plan))  # (H, W)
                labelled.append(True)
            else:
                labels.append(torch.zeros(self.img_size, self.img_size, dtype=torch.int64))  # (H, W)
                labelled.append(False)
        length = max(len(window), self.frames) if self.train else AVSS_FRAMES
        item = assemble(frames, audio[window], labels, labelled, length, self.img_size)
        item["meta"] = {"clip": clip["id"], "split": clip["split"], "subset": clip["subset"],
                        "objects": clip["objects"], "multi_source": clip["multi_source"],
                        "frame_index": window + [-1] * (length - len(window))}
        return item


# ----------------------------------------------------------------------------------------------
# 6. What train.py calls
# ----------------------------------------------------------------------------------------------
def build_dataset(name, split, root=None, img_size=224, frames=5, train=None, seed=0, **synthetic_options):
    """Make a dataset.

    Args:
        name: 'synthetic' | 's4' | 'ms3' | 'avss'.
        split: 'train' | 'val' | 'test' (synthetic also 'test-unseen', 'test-seen-multi',
            'val-unseen').
        root: the dataset folder (ignored for synthetic).
        img_size: int, H = W of the returned frames and labels.
        frames: int, T frames of a training window (of a synthetic clip).
        train: bool, training transforms (multi-scale crop, T-frame window); None -> split == 'train'.
            No effect on synthetic clips, which are generated at img_size with T frames.
        seed: int, the synthetic benchmark's seed.
        synthetic_options: num_classes, num_clips, multi_source_ratio, offscreen_prob (see
            synthetic.SyntheticAVS).
    Returns:
        a torch Dataset with attributes num_classes (Kc) and class_names (Kc + 1, background first).
    """
    train = (split == "train") if train is None else train
    if name == "synthetic":
        return synthetic.SyntheticAVS(split, img_size=img_size, frames=frames, seed=seed, **synthetic_options)
    if synthetic_options:
        raise ValueError(f"options {sorted(synthetic_options)} only apply to the synthetic dataset")
    if root is None:
        raise DataError(f"--data-root: not given; expected the folder of the {name} dataset")
    if name in ("s4", "ms3"):
        return AVSObjectDataset(root, name, split, img_size=img_size, frames=frames, train=train)
    if name == "avss":
        return AVSSDataset(root, split, img_size=img_size, frames=frames, train=train)
    raise ValueError(f"unknown dataset {name!r}; expected synthetic, s4, ms3 or avss")


class ZeroAudio(Dataset):
    """A dataset's clips with their audio replaced by zeros: train.py --zero-audio, the control
    that shows what the visual side alone achieves (NOT IN PAPER). Every other key of an item, and
    the dataset's attributes (num_classes, class_names, split, ...), are the wrapped dataset's."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return {**item, "audio": torch.zeros_like(item["audio"])}  # (T, 1, 96, 64) zeros

    def __getattr__(self, name):  # called only for names the wrapper itself does not have
        if name == "dataset":     # (while a DataLoader worker unpickles it: not set yet)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate(items):
    """Stack a list of items into a batch: tensors gain a leading B axis, meta stays a list of dicts."""
    batch = {key: torch.stack([item[key] for item in items])  # (B, T, ...)
             for key in ("frames", "audio", "labels", "label_valid", "frame_valid")}
    batch["meta"] = [item["meta"] for item in items]
    return batch


# ----------------------------------------------------------------------------------------------
# 7. Checking a layout before a run
# ----------------------------------------------------------------------------------------------
# What a complete S4, MS3 or AVSS release looks like on disk, file by file, and which flaws the
# official AVSBench code reads anyway (audio slightly short of its clip, label colours outside the
# palette): those are listed as tolerated, with the file, and do not stop a run. train.py calls
# check_dataset() before it trains on a real dataset, so that a missing file is named at the start
# and not after an hour; tools/check_dataset.py is its command line. Read check_dataset(), then
# _check_clip() and _check_image().
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


def require_dataset(root, name):
    """check_dataset before a run: DataError naming the root, or the first 20 problems, if any."""
    if not root or not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} is not a directory; expected the AVSBench {name} "
                        f"release (see docs/data.md)")
    problems = check_dataset(root, name)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems[:20]) + more)


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
