"""Tiny AVSBench datasets in the exact official layout, written into a folder by the tests.

The real AVSBench is handed out by its authors and cannot ship with the code, so the readers in
data.py are tested on these (the file names, folders and formats of the releases):

  write_s4(root, ...)    root/Single-source/{s4_meta_data.csv, s4_data/...}
  write_ms3(root, ...)   root/Multi-sources/{ms3_meta_data.csv, ms3_data/...}
  write_avss(root, ...)  root/{metadata.csv, label2idx.json, v1s/, v1m/, v2/}

Each returns a manifest {clip id: dict} with what a correct reader must return (class-id label
maps at native size, the pickled log-mel, ...). Objects are painted in a distinctive colour
(pure red on S4/MS3, the class's palette colour on AVSS) over a grey background, so a test can
check that frames and labels were transformed together.
"""
import json
import os
import pickle

import numpy as np
import torch
from PIL import Image
from scipy.io import wavfile

AVSS_NAMES = (
    "background accordion airplane axe baby bassoon bell bird boat boy bus car cat cello clarinet "
    "clipper clock dog donkey drum duck elephant emergency-car erhu flute frying-food girl goose "
    "guitar gun guzheng hair-dryer handpan harmonica harp helicopter hen horse keyboard leopard "
    "lion man marimba missile-rocket motorcycle mower parrot piano pig pipa saw saxophone sheep "
    "sitar sorna squirrel tabla tank tiger tractor train trombone truck trumpet tuba ukulele utv "
    "vacuum-cleaner violin wolf woman").split()


def voc_colour(j):
    """The PASCAL-VOC colour of class j, written out independently of data.voc_palette."""
    r = g = b = 0
    for k in range(8):
        r |= ((j >> (3 * k)) & 1) << (7 - k)
        g |= ((j >> (3 * k + 1)) & 1) << (7 - k)
        b |= ((j >> (3 * k + 2)) & 1) << (7 - k)
    return r, g, b


def box_mask(height, width, frame, slot, num_slots=2):
    """A rectangle that moves one pixel a frame; slot picks its column band. -> (H, W) bool."""
    mask = np.zeros((height, width), dtype=bool)
    band = width // num_slots
    x0 = slot * band + 1 + frame % 3
    y0 = height // 4 + frame % 2
    mask[y0:y0 + height // 2, x0:x0 + max(2, band // 2)] = True
    return mask


def tone_wav(path, rate, seconds, channels, seed=0):
    """Write an int16 wav of a few tones plus noise; returns the int16 array (n, channels) or (n,)."""
    t = np.arange(int(round(rate * seconds))) / rate
    rng = np.random.default_rng(seed)
    mono = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t) + 0.01 * rng.standard_normal(len(t))
    data = np.stack([mono] * channels, 1) if channels > 1 else mono
    data = np.round(data * 32767).astype(np.int16)
    wavfile.write(path, rate, data)
    return data


def _save_log_mel(path, seed, examples=5):
    """A pickled torch float32 tensor [examples, 1, 96, 64] with requires_grad, as AVSBench writes it.

    AVSBench's own files always hold 5 examples (its preprocessing pads); fewer model a file made
    by other tools.
    """
    tensor = torch.randn(examples, 1, 96, 64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(tensor, f)
    return tensor.detach().clone()


def _write_v1(root, name, clips, size, wav, pkl, audio_seconds, log_mel_examples):
    folder = "Single-source" if name == "s4" else "Multi-sources"
    base = os.path.join(root, folder)
    data = os.path.join(base, f"{name}_data")
    os.makedirs(base, exist_ok=True)
    width, height = size
    manifest = {}
    with open(os.path.join(base, f"{name}_meta_data.csv"), "w") as f:
        f.write("name,start,category,split\n" if name == "s4" else "name,split\n")
        for clip in clips:
            f.write(f"{clip[0]},0,{clip[1]},{clip[2]}\n" if name == "s4" else f"{clip[0]},{clip[1]}\n")
    for number, clip in enumerate(clips):
        clip_id, split = clip[0], clip[-1]
        sub = os.path.join(split, clip[1], clip_id) if name == "s4" else clip_id
        frame_dir = os.path.join(data, "visual_frames", sub if name == "s4" else clip_id)
        mask_dir = os.path.join(data, "gt_masks", sub if name == "s4" else os.path.join(split, clip_id))
        audio_sub = os.path.join(split, clip[1]) if name == "s4" else split
        os.makedirs(frame_dir, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        num_masks = 1 if (name == "s4" and split == "train") else 5
        masks = []
        for i in range(1, 6):
            mask = box_mask(height, width, i - 1, number % 2)  # (H, W)
            image = np.full((height, width, 3), 110, dtype=np.uint8)
            image[mask] = (255, 0, 0)
            frame_name = f"{clip_id}_{i}.png" if name == "s4" else f"{clip_id}.mp4_{i}.png"
            Image.fromarray(image).save(os.path.join(frame_dir, frame_name))
            if i <= num_masks:
                Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(mask_dir, f"{clip_id}_{i}.png"))
                masks.append(mask.astype(np.int64))
        entry = {"split": split, "masks": np.stack(masks), "num_masks": num_masks,
                 "frame_dir": frame_dir, "mask_dir": mask_dir}
        if pkl:
            entry["pkl"] = os.path.join(data, "audio_log_mel", audio_sub, f"{clip_id}.pkl")
            entry["log_mel"] = _save_log_mel(entry["pkl"], number, (log_mel_examples or {}).get(clip_id, 5))
        if wav:
            path = os.path.join(data, "audio_wav", audio_sub, f"{clip_id}.wav")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            seconds = (audio_seconds or {}).get(clip_id, 5.02)  # 5.02 s: 80,320 samples
            entry["wav"] = tone_wav(path, 16000, seconds, 2, seed=number)  # 16 kHz stereo int16
            entry["wav_path"] = path
        if name == "s4":
            entry["category"] = clip[1]
        manifest[clip_id] = entry
    return manifest


def write_s4(root, clips=None, size=(32, 32), wav=False, pkl=True, audio_seconds=None,
             log_mel_examples=None):
    """AVSBench S4 in root/Single-source/: csv name,start,category,split; PNG frames and masks.

    Args:
        clips: list of (name, category, split); default one clip per split.
        size: (W, H) of frames and masks (the release has 224 x 224).
        wav: also write audio_wav/{split}/{category}/{name}.wav (16 kHz stereo int16, 5.02 s).
        pkl: write audio_log_mel/{split}/{category}/{name}.pkl (pickled torch [5, 1, 96, 64]).
        audio_seconds: {name: seconds} of the wavs that are not 5.02 s long.
        log_mel_examples: {name: E} of the .pkl files that hold E examples, not 5.
    Returns: manifest {name: dict(split, masks (num_masks, H, W) int64 0/1, num_masks,
        log_mel (E, 1, 96, 64) tensor, pkl (its path), wav int16 array, wav_path, frame_dir,
        mask_dir, category)}.
    """
    clips = clips or [("s4TrainClip", "dog_barking", "train"), ("s4ValClip01", "playing_piano", "val"),
                      ("s4TestClip1", "helicopter", "test")]
    return _write_v1(root, "s4", clips, size, wav, pkl, audio_seconds, log_mel_examples)


def write_ms3(root, clips=None, size=(32, 32), wav=False, pkl=True, audio_seconds=None,
              log_mel_examples=None):
    """AVSBench MS3 in root/Multi-sources/: csv name,split; frames visual_frames/{name}/{name}.mp4_{i}.png.

    Args and returns as write_s4, with clips a list of (name, split); 5 masks in every split.
    """
    clips = clips or [("ms3trainAAA_1", "train"), ("ms3valBBBBB_2", "val"), ("ms3testCCCC_3", "test")]
    return _write_v1(root, "ms3", clips, size, wav, pkl, audio_seconds, log_mel_examples)


AVSS_DEFAULT_CLIPS = [
    # (uid, subset, split, a_obj)
    ("v1sTrainAbc_0_5000", "v1s", "train", "dog"),
    ("v1mTrainXyz_1", "v1m", "train", "man_guitar"),
    ("v2TrainClip_1000_11000", "v2", "train", "clarinet_emergency-car"),
    ("v1sValAbcde_0_5000", "v1s", "val", "cat"),
    ("v1mValXyzab_2", "v1m", "val", "woman_piano"),
    ("v2ValClip01_0_10000", "v2", "val", "clarinet_dog"),
    ("v1sTestAbcd_0_5000", "v1s", "test", "helicopter"),
    ("v1mTestXyza_3", "v1m", "test", "boy_violin"),
    ("v2TestClip1_2000_12000", "v2", "test", "trumpet_girl"),
]
AVSS_SIZES = {"v1s": (48, 36), "v1m": (64, 36), "v2": (64, 36)}  # (W, H), native and not square


def write_avss(root, clips=None, sizes=None, labels="both", audio=True, unknown_colour_pixels=0,
               audio_seconds=None, audio_rate=None):
    """AVSBench-semantic in root/: metadata.csv, label2idx.json, {v1s,v1m,v2}/{uid}/...

    Args:
        clips: list of (uid, subset, split, a_obj); default AVSS_DEFAULT_CLIPS (one per subset and split).
        sizes: {subset: (W, H)} native frame sizes; default AVSS_SIZES.
        labels: 'both' | 'rgb' | 'semantic', which label folders to write.
        audio: write audio.wav (v1: 16 kHz stereo int16, 5.02 s; v2: 48 kHz stereo int16, 10 s).
        audio_seconds: {uid: seconds} of the audio.wav files that are not that long.
        audio_rate: None, or the rate (Hz) of every audio.wav instead of 16 / 48 kHz.
        unknown_colour_pixels: paint this many pixels of labels_rgb/0.png of every clip in the
            colour (1, 2, 3), which is not in the palette (the class-id map keeps them background).
    Returns: manifest {uid: dict(split, subset, labels (n_labels, H, W) int64 class ids at native
        size, label_frames [i], num_frames, size (W, H), folder, and with audio: wav int16 array
        (n, 2), wav_rate)}.
    """
    clips = clips or AVSS_DEFAULT_CLIPS
    sizes = dict(AVSS_SIZES, **(sizes or {}))
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "label2idx.json"), "w") as f:
        json.dump({name: i + 1 for i, name in enumerate(AVSS_NAMES)}, f)
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write("vid,uid,s_min,s_sec,a_obj,split,label\n")
        for uid, subset, split, a_obj in clips:
            f.write(f"{uid[:11]},{uid},0,0,{a_obj},{split},{subset}\n")
    manifest = {}
    for number, (uid, subset, split, a_obj) in enumerate(clips):
        folder = os.path.join(root, subset, uid)
        width, height = sizes[subset]
        num_frames = 10 if subset == "v2" else 5
        label_frames = [0] if (subset == "v1s" and split == "train") else list(range(num_frames))
        ids = [AVSS_NAMES.index(name) for name in a_obj.split("_")]
        for sub in ["frames"] + (["labels_rgb"] if labels in ("both", "rgb") else []) + \
                (["labels_semantic"] if labels in ("both", "semantic") else []):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        label_maps = []
        for i in range(num_frames):
            label = np.zeros((height, width), dtype=np.int64)  # (H, W) class ids
            for slot, class_id in enumerate(ids):
                if slot == 1 and i % 3 == 2:
                    continue  # the second source is silent in some frames
                label[box_mask(height, width, i, slot, num_slots=max(2, len(ids)))] = class_id
            colours = np.array([voc_colour(j) for j in range(len(AVSS_NAMES))], dtype=np.uint8)
            image = np.full((height, width, 3), 120, dtype=np.uint8)
            image[label > 0] = colours[label[label > 0]]
            Image.fromarray(image).save(os.path.join(folder, "frames", f"{i}.jpg"), quality=95)
            if i in label_frames:
                rgb = colours[label]  # (H, W, 3)
                if unknown_colour_pixels and i == 0:
                    rgb.reshape(-1, 3)[:unknown_colour_pixels] = (1, 2, 3)
                if labels in ("both", "rgb"):
                    Image.fromarray(rgb).save(os.path.join(folder, "labels_rgb", f"{i}.png"))
                if labels in ("both", "semantic"):
                    Image.fromarray(label.astype(np.uint8)).save(
                        os.path.join(folder, "labels_semantic", f"{i}.png"))
                label_maps.append(label)
        manifest[uid] = {"split": split, "subset": subset, "labels": np.stack(label_maps),
                         "label_frames": label_frames, "num_frames": num_frames,
                         "size": (width, height), "folder": folder}
        if audio:
            rate = audio_rate or (48000 if subset == "v2" else 16000)
            seconds = (audio_seconds or {}).get(uid, 10.0 if subset == "v2" else 5.02)
            manifest[uid]["wav"] = tone_wav(os.path.join(folder, "audio.wav"), rate, seconds, 2, seed=number)
            manifest[uid]["wav_rate"] = rate
    return manifest


class RunsCode:
    """An object whose unpickling calls open(marker, "w"): the file `marker` appears if a loader
    runs code from a pickle. Tests put it in a .pkl or a checkpoint and check that it never does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")
