"""The synthetic audiovisual segmentation benchmark, generated on the fly (`--dataset synthetic`).

What this file teaches
----------------------
So that anyone can run SQD without AVSBench or a GPU, SyntheticAVS makes clips from (seed, split,
index), no files, under ~10 ms a clip at 64x64 on one core, and gives them as the same batch items
as the AVSBench readers of data.py (data.build_dataset('synthetic', ...) builds it). It asks what
the paper assumes an audiovisual segmentation benchmark asks (docs/data.md, "The synthetic
benchmark"):
  * categories have a look (shape x colour, so looks share single cues) and a sound; visible
    objects whose category is silent in a frame are background, so only the audio says which
    visible objects to label;
  * sounds are independent events in a combinatorial space: 24 categories made of partials from
    one shared pool, so a mixture hides other categories' partials; multi-source clips switch
    sources on and off;
  * a third of all category pairs never sound together in train: test-unseen (and val-unseen)
    has them, test-seen-multi is matched to test-unseen clip by clip, so that their gap measures
    "unseen" alone;
  * frame audio is less reliable than the clip's: low SNR, dropouts, off-screen sounds.
This is version 2 of the benchmark (SYNTHETIC_VERSION); version 1 is retired (git tag synthetic-v1).

Reading order
-------------
 1. constants and SYNTHETIC   the splits, looks, and every parameter of the sounds
 2. SyntheticAVS              __init__ (looks, sounds, held-out pairs), plan() (the recipe of a
                              clip: schedule, sources, scene), generate() (audio, then pixels and
                              labels), __getitem__ (the batch item)
 3. normalised_frames, per_second_log_mel, _gate, _shape_mask

Shape alphabet
--------------
The repository's one shape alphabet: docs/shapes.md. Letters used here: T frames of a clip, H, W
image size (img_size, H = W), Kc categories (foreground classes), Ns audio samples, E 0.96 s
log-mel examples, each 96 x 64 (time steps x mel bands). Other sizes are written as words or as the
names of the code (num_src sources, partials, pool_size, length, w_box x h_box).
"""
import math

import numpy as np
import torch
from torch.utils.data import Dataset

from encoders import (IMAGENET_MEAN, IMAGENET_STD, VGGISH_EXAMPLE_FRAMES, VGGISH_NUM_MEL_BINS,
                      VGGISH_SAMPLE_RATE, vggish_log_mel)

AUDIO_RATE = VGGISH_SAMPLE_RATE  # Hz, 16000; one frame = one second of audio
LOG_MEL_SHAPE = (VGGISH_EXAMPLE_FRAMES, VGGISH_NUM_MEL_BINS)  # one example: 96 frames of 10 ms x 64 mel bands


# ----------------------------------------------------------------------------------------------
# 1. The benchmark's constants and parameters
# ----------------------------------------------------------------------------------------------
# Its version: it names the benchmark's cached pretrained weights, its runs' config and their
# group in results/ablations.json. Version 1 is retired: git tag synthetic-v1 has its code.
SYNTHETIC_VERSION = "v2"
SYNTHETIC_SPLITS = {"train": 0, "val": 1, "test": 2, "test-unseen": 3,  # split -> rng stream
                    "test-seen-multi": 4, "val-unseen": 5}
SYNTHETIC_SIZES = {"train": 4000, "val": 500, "test": 1000, "test-unseen": 1000,
                   "test-seen-multi": 1000, "val-unseen": 500}
# The stream of a clip's *schedule* (how many sources, when each sounds, how reliable each
# frame's audio is). test-seen-multi reads test-unseen's, so clip i of the two splits has the same
# schedule and they differ only in which categories sound: their difference is "unseen" alone.
SCHEDULE_STREAM = {"train": 0, "val": 1, "test": 2, "test-unseen": 3, "test-seen-multi": 3,
                   "val-unseen": 5}
SHAPES = ("disc", "square", "triangle", "diamond", "ring", "cross")
COLOURS = {"red": (0.85, 0.20, 0.20), "green": (0.20, 0.75, 0.30), "blue": (0.25, 0.35, 0.90),
           "yellow": (0.90, 0.80, 0.20), "magenta": (0.80, 0.25, 0.80), "cyan": (0.20, 0.80, 0.85)}
# The benchmark's parameters. NOT IN PAPER (synthetic data): the paper assumes independent sound
# events in a combinatorial space (§3.1) and frame audio that is less reliable than the clip's
# (§3.4); every number here is ours, chosen with tools/probe_synthetic.py (results/probes.md).
SYNTHETIC = dict(
    num_classes=24,               # default Kc
    held_out_fraction=1 / 3,      # share of the Kc (Kc - 1) / 2 category pairs that never sound together in train
    pool_hz=(250.0, 3000.0),      # the shared partials, log-spaced in this range
    pool_size=10,                 # P partials in the pool
    partials=3,                   # partials per category, drawn from the pool
    envelopes=("tremolo", "pulse"),             # a category's modulation shape ...
    rates=(2.0, 3.0, 4.5, 6.5, 9.5, 13.0),      # ... and rate (Hz)
    design_seed=2,                # the category sounds are fixed; only the held-out pairs follow the seed
    on_prob=0.65,                 # a multi-source clip's source sounds in a frame with this probability
    offscreen_prob=0.6,           # probability that the third source of a 3-source clip is off-screen
    snr_db=(-2.0, 24.0),          # per-frame signal-to-noise ratio, uniform in dB
    noise_band_hz=(150.0, 5000.0),  # the noise is pink inside this band, so it covers the partials
    dropout_prob=0.3,             # probability that a frame has a dropout (all sources muted) ...
    dropout_ms=(60, 250),         # ... of this length
    distractor_prob=0.5,          # probability that a clip has off-screen non-category sounds (1-3 events)
)


# ----------------------------------------------------------------------------------------------
# 2. SyntheticAVS
# ----------------------------------------------------------------------------------------------
class SyntheticAVS(Dataset):
    """The synthetic audiovisual segmentation benchmark, generated on the fly (docs/data.md,
    "The synthetic benchmark").

    Looks: category k (class id k + 1) looks like SHAPES[k % 6] in colour k // 6 (for Kc = 24,
    6 shapes x 4 colours), so each shape and each colour is shared by several categories.
    Instances jitter in position, size and colour. A clip: 1 to 4 visible objects of distinct
    categories, drifting a little between frames; the visible objects that are not sources are
    silent distractors, half of them sharing the shape or the colour of a source. A visible object
    is labelled in a frame only if its category sounds in that frame, so vision alone cannot tell
    which object to segment.

    Sounds (what the paper assumes: independent sound events in a combinatorial space, frame
    audio less reliable than the clip's): each category is SYNTHETIC['partials'] partials from one
    shared pool (so a mixture is not a union of disjoint frequency bands; other categories'
    partials hide in it), with its own amplitude envelope (tremolo or pulses at its own rate), the
    same for all its partials. Per frame: pink noise at an SNR drawn from SYNTHETIC['snr_db'] (some
    frames near 0 dB), short dropouts that mute every source, and in half the clips off-screen
    sounds of no category (chirps, noise bursts). Audio: 1 s of 16 kHz per frame through the
    VGGish front end (encoders.vggish_log_mel), one example per second.

    Clips: single-source (about half): one category sounds in every frame; multi-source: 2 or 3
    categories, each switching on and off between frames, at least two at once in some frame; a
    3-source clip's third source is often off-screen (heard, never seen, never labelled).
    Held out: SYNTHETIC['held_out_fraction'] of all category pairs, at random but touching every
    category, cut in two disjoint halves: test-unseen's and val-unseen's. No held-out pair ever
    co-occurs as sources in train, val, test or test-seen-multi.
    Splits: train, val, test (single and multi-source, seen pairs only); test-seen-multi
    (multi-source, seen pairs only, with test-unseen's schedules, see SCHEDULE_STREAM);
    test-unseen (multi-source: a held-out pair of the test half that sounds together in some frame,
    plus sometimes a third category seen with both); val-unseen (the same with the val half).

    Args:
        split: one of SYNTHETIC_SPLITS.
        img_size: int, H = W of the generated frames (64 for the CPU preset, 224 for the paper's).
        frames: int, T frames per clip.
        seed: int; clip `index` of `split` depends only on (seed, split, index).
        num_classes: int, Kc (12..36, default 24).
        num_clips: int or None (SYNTHETIC_SIZES[split]).
        multi_source_ratio: float, fraction of multi-source clips in train/val/test.
        offscreen_prob: float, probability that a 3-source clip's third source is off-screen
            (default SYNTHETIC['offscreen_prob']).
    Item: the dict of the file docstring with meta keys 'clip', 'split', 'index',
        'multi_source', 'sources', 'offscreen', 'distractors', 'visible' (class ids),
        'sounding' (T, Kc) nested bool lists (column c-1 is class id c; off-screen sources count),
        'unseen_pair' ([a, b] class ids in test-unseen and val-unseen, else None), 'benchmark'
        (SYNTHETIC_VERSION), 'partials_hz' (per source), 'snr_db' (per frame), 'dropout' (per
        frame, bool), 'distractor_sounds' (number of events).
    """

    def __init__(self, split="train", img_size=64, frames=5, seed=0, num_classes=None, num_clips=None,
                 multi_source_ratio=0.5, offscreen_prob=None):
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"synthetic split must be one of {list(SYNTHETIC_SPLITS)}, got {split!r}")
        num_classes = SYNTHETIC["num_classes"] if num_classes is None else num_classes
        if not 12 <= num_classes <= len(SHAPES) * len(COLOURS):
            raise ValueError(f"synthetic num_classes must be in 12..{len(SHAPES) * len(COLOURS)}")
        self.split, self.img_size, self.frames, self.seed = split, int(img_size), int(frames), int(seed)
        self.num_classes = Kc = int(num_classes)
        self.num_clips = SYNTHETIC_SIZES[split] if num_clips is None else int(num_clips)
        self.multi_source_ratio = multi_source_ratio
        self.offscreen_prob = SYNTHETIC["offscreen_prob"] if offscreen_prob is None else offscreen_prob

        # Looks: a shape x colour grid.
        colour_names = list(COLOURS)
        self.shape_of = [SHAPES[k % len(SHAPES)] for k in range(Kc)]
        self.colour_name_of = [colour_names[k // len(SHAPES)] for k in range(Kc)]
        self.colour_of = np.array([COLOURS[c] for c in self.colour_name_of], dtype=np.float32)  # (Kc, 3)
        self.class_names = ["background"] + [f"{c} {s}" for c, s in zip(self.colour_name_of, self.shape_of)]

        self._sounds()
        self._pairs()
        # NOT IN PAPER (synthetic data, for speed): Gaussian noise is cut at a random
        # offset from one fixed bank; drawing fresh normals would take most of the ~10 ms budget
        # of a clip.
        need = max(self.frames * AUDIO_RATE, self.frames * self.img_size ** 2 * 3)  # samples per clip, audio or pixels
        bank = np.random.default_rng([self.seed, 104729])
        self._noise = bank.standard_normal(2 * need, dtype=np.float32)  # (2*need,)
        n = 2 * self.frames * AUDIO_RATE  # a second bank of band-limited pink noise for the audio
        white = np.random.default_rng([self.seed, 104729, 2]).standard_normal(n)  # (Ns,)
        spectrum = np.fft.rfft(white)  # (Ns//2+1,)
        hz = np.fft.rfftfreq(n, 1.0 / AUDIO_RATE)  # (Ns//2+1,)
        lo, hi = SYNTHETIC["noise_band_hz"]
        spectrum *= np.where((hz >= lo) & (hz <= hi), 1.0 / np.sqrt(np.maximum(hz, 1.0)), 0.0)  # 1/f power
        pink = np.fft.irfft(spectrum, n)  # (Ns,)
        self._pink = (pink / pink.std()).astype(np.float32)  # (Ns,) unit variance

    def _sounds(self):
        """Each category is SYNTHETIC['partials'] partials of a shared pool with its own envelope.

        Sets partials_hz (Kc, partials), partial_amps (Kc, partials), envelope_of [str],
        rate_of (Kc,) Hz. Two categories with the same envelope and rate share at most one partial,
        so every category differs from every other in its partials or in its envelope."""
        Kc, P, m = self.num_classes, SYNTHETIC["pool_size"], SYNTHETIC["partials"]
        lo, hi = SYNTHETIC["pool_hz"]
        self.pool_hz = lo * (hi / lo) ** (np.arange(P) / (P - 1))  # (pool_size,) Hz
        design = np.random.default_rng([SYNTHETIC["design_seed"], 1009])
        patterns = [(e, r) for e in SYNTHETIC["envelopes"] for r in SYNTHETIC["rates"]]
        subsets, pattern_of = [], []
        for k in range(Kc):
            pattern = k % len(patterns)
            while True:
                subset = tuple(sorted(int(i) for i in design.choice(P, size=m, replace=False)))
                same = [subsets[j] for j in range(k) if pattern_of[j] == pattern]
                if subset not in subsets and all(len(set(subset) & set(o)) <= 1 for o in same):
                    break
            subsets.append(subset)
            pattern_of.append(pattern)
        self.partial_index = np.array(subsets)  # (Kc, partials) indices into the pool
        self.partials_hz = self.pool_hz[self.partial_index]  # (Kc, partials)
        self.partial_amps = design.uniform(0.5, 1.0, (Kc, m))  # (Kc, partials)
        self.envelope_of = [patterns[p][0] for p in pattern_of]
        self.rate_of = np.array([patterns[p][1] for p in pattern_of])  # (Kc,) Hz

    def _pairs(self):
        """The held-out pairs: a random SYNTHETIC['held_out_fraction'] of all pairs, fixed by the seed.

        Redrawn until every category is in some held-out pair and every held-out pair (a, b) has a
        third category seen with both (test-unseen's 3-source clips need one). The first half of the
        draw is test-unseen's (held_out_test_pairs), the second val-unseen's (held_out_val_pairs)."""
        Kc = self.num_classes
        pairs = [(a, b) for a in range(1, Kc + 1) for b in range(a + 1, Kc + 1)]
        n_held = 2 * math.ceil(SYNTHETIC["held_out_fraction"] * len(pairs) / 2)  # even: two halves
        rng = np.random.default_rng([self.seed, 7919, 2])
        for _ in range(1000):
            pick = rng.permutation(len(pairs))[:n_held]  # (n_held,)
            self._held_out = {pairs[i] for i in pick}
            touched = {c for pair in self._held_out for c in pair}
            if len(touched) == Kc and all(self._thirds(pair) for pair in self._held_out):
                break
        else:  # not reached for Kc >= 12 and fractions up to 1/2
            raise ValueError(f"no held-out set of {n_held} pairs touches all {Kc} categories")
        self.held_out_test_pairs = sorted(pairs[i] for i in pick[: n_held // 2])
        self.held_out_val_pairs = sorted(pairs[i] for i in pick[n_held // 2:])
        self.held_out_pairs = sorted(self._held_out)

    def _thirds(self, pair):
        """Categories (class ids) that may join a held-out pair: seen with both of its members."""
        a, b = pair
        return [c for c in range(1, self.num_classes + 1)
                if c not in pair and self.seen(a, c) and self.seen(b, c)]

    def __len__(self):
        return self.num_clips

    def _noisy(self, rng, n):
        """n standard normal samples (float32) from the bank at a random offset."""
        start = int(rng.integers(0, len(self._noise) - n + 1))
        return self._noise[start:start + n]  # n values, a view; callers multiply (a new array)

    def _rng(self, index):
        return np.random.default_rng([self.seed, SYNTHETIC_SPLITS[self.split], int(index), 2])

    def seen(self, a, b):
        """True when categories a and b (class ids) may sound together in train."""
        return tuple(sorted((a, b))) not in self._held_out

    def plan(self, index, rng=None):
        """The recipe of clip `index`: which categories sound when, which are seen, where they are.

        The schedule comes from the split's schedule stream (SCHEDULE_STREAM), the categories from
        `rng`. Returns: dict with 'multi_source' bool, 'sources' [class ids], 'on' (T, num_src)
            bool, 'offscreen' [class ids], 'distractors' [class ids], 'visible' [class ids]
            (drawing order, back to front), 'sounding' (T, Kc) bool, 'unseen_pair' [a, b] or None,
            'snr_db' (T,), 'dropouts' [(t, start, length) in 10 ms steps] and
            'distractor_sounds' [dict of one event].
        """
        rng = self._rng(index) if rng is None else rng
        T = self.frames
        sched = np.random.default_rng([self.seed, SCHEDULE_STREAM[self.split], int(index), 2, 1])
        matched = self.split in ("test-unseen", "test-seen-multi", "val-unseen")
        multi = matched or sched.random() < self.multi_source_ratio
        if multi:
            num_src = int(sched.integers(2, 4))
            on = self._switching(sched, T, num_src, SYNTHETIC["on_prob"])  # (T, num_src)
            third_offscreen = num_src == 3 and sched.random() < self.offscreen_prob
        else:
            num_src, third_offscreen = 1, False
            on = np.ones((T, 1), dtype=bool)  # (T, 1) one source throughout
        reliability = self._reliability(sched)

        pair = None
        if not multi:
            sources = [int(rng.integers(1, self.num_classes + 1))]
        elif self.split in ("test-unseen", "val-unseen"):
            pool = self.held_out_test_pairs if self.split == "test-unseen" else self.held_out_val_pairs
            pair = list(pool[rng.integers(len(pool))])
            sources = pair[::-1] if rng.random() < 0.5 else list(pair)
            if num_src == 3:  # a third source seen with both: the clip holds exactly one held-out pair
                sources.append(int(rng.choice(self._thirds(tuple(pair)))))
        else:
            sources = self._seen_sources(rng, num_src)
        offscreen = [sources[2]] if third_offscreen else []  # the held-out pair stays visible
        return {"multi_source": bool(multi), "sources": sources, "on": on, "offscreen": offscreen,
                **self._scene(rng, sources, offscreen, on), "unseen_pair": sorted(pair) if pair else None,
                **reliability}

    def _reliability(self, sched):
        """How reliable each frame's audio is: per-frame SNR, dropouts, non-category sounds.

        Returns dict 'snr_db' (T,) float, 'dropouts' [(t, start, length)] in 10 ms steps within
        frame t, 'distractor_sounds' [dict kind, start (s), duration (s), f0, f1 (Hz), amp]."""
        T = self.frames
        snr_db = sched.uniform(*SYNTHETIC["snr_db"], T)  # (T,)
        dropouts = []
        for t in range(T):
            if sched.random() < SYNTHETIC["dropout_prob"]:
                length = int(sched.integers(SYNTHETIC["dropout_ms"][0] // 10, SYNTHETIC["dropout_ms"][1] // 10 + 1))
                dropouts.append((t, int(sched.integers(0, 100 - length + 1)), length))
        events = []
        if sched.random() < SYNTHETIC["distractor_prob"]:
            for _ in range(int(sched.integers(1, 4))):
                duration = float(sched.uniform(0.1, 0.4))
                events.append({"kind": "chirp" if sched.random() < 0.5 else "burst",
                               "start": float(sched.uniform(0, T - duration)), "duration": duration,
                               "f0": float(sched.uniform(300, 4000)), "f1": float(sched.uniform(300, 4000)),
                               "amp": float(sched.uniform(0.05, 0.2))})
        return {"snr_db": snr_db, "dropouts": dropouts, "distractor_sounds": events}

    def _seen_sources(self, rng, num_src):
        """num_src distinct categories, no held-out pair among them (rejection sampling)."""
        Kc = self.num_classes
        while True:
            sources = [int(c) for c in rng.choice(Kc, size=num_src, replace=False) + 1]
            if all(self.seen(a, b) for a in sources for b in sources if a < b):
                return sources

    @staticmethod
    def _switching(rng, T, num_src, on_prob):
        """The on/off table (T, num_src) bool of a multi-source clip: each source sounds in a frame
        with probability on_prob and in at least one frame, sources 0 and 1 sound together in at
        least one frame, and (T > 1) some source switches."""
        on = rng.random((T, num_src)) < on_prob  # (T, num_src) sources switch on and off
        for s in range(num_src):  # every source sounds in some frame
            if not on[:, s].any():
                on[rng.integers(T), s] = True
        if not (on[:, 0] & on[:, 1]).any():  # sources 0 and 1 (the held-out pair in test-unseen) sound together once
            on[rng.integers(T), [0, 1]] = True
        if T > 1 and on.all():  # at least one switch; the other frames keep the co-occurrence
            on[rng.integers(T), rng.integers(num_src)] = False
        return on

    def _scene(self, rng, sources, offscreen, on):
        """The visible objects (sources not off-screen + silent distractors) and the sounding table.

        Returns dict 'distractors', 'visible' (drawing order) [class ids], 'sounding' (T, Kc) bool.
        """
        Kc = self.num_classes
        seen_sources = [c for c in sources if c not in offscreen]
        num_distractors = int(rng.integers(0, 4 - len(seen_sources) + 1))  # 1..4 visible objects
        distractors = []
        for _ in range(num_distractors):
            free = [c for c in range(1, Kc + 1) if c not in sources and c not in distractors]
            source = seen_sources[rng.integers(len(seen_sources))] - 1
            hard = [c for c in free if self.shape_of[c - 1] == self.shape_of[source]
                    or self.colour_name_of[c - 1] == self.colour_name_of[source]]
            pool = hard if hard and rng.random() < 0.5 else free  # half share a cue with a source
            distractors.append(int(rng.choice(pool)))
        visible = [int(c) for c in rng.permutation(seen_sources + distractors)]  # drawing order
        sounding = np.zeros((self.frames, Kc), dtype=bool)  # (T, Kc)
        for s, c in enumerate(sources):
            sounding[:, c - 1] = on[:, s]
        return {"distractors": distractors, "visible": visible, "sounding": sounding}

    def generate(self, index):
        """Render clip `index`.

        Returns: dict with 'frames' (T, H, W, 3) float32 in [0, 1], 'waveform' (T*16000,) float32,
            'log_mel' (T, 96, 64) float32, 'labels' (T, H, W) int64, 'object_map' (T, H, W) int64
            (class id of the top visible object at each pixel, sounding or not, 0 where none),
            'meta' dict (see the class docstring).
        """
        rng = self._rng(index)
        p = self.plan(index, rng)
        waveform, extra = self._audio(p, rng)
        log_mel = self.log_mel(waveform)  # (T, 96, 64)
        frames, object_map, labels = self._pixels(p, rng)
        meta = {"clip": f"synthetic/{self.split}/{index}", "split": self.split, "index": int(index),
                "multi_source": p["multi_source"], "sources": p["sources"], "offscreen": p["offscreen"],
                "distractors": p["distractors"], "visible": sorted(p["visible"]),
                "sounding": p["sounding"].tolist(), "unseen_pair": p["unseen_pair"], **extra}
        return {"frames": frames, "waveform": waveform, "log_mel": log_mel, "labels": labels,
                "object_map": object_map, "meta": meta}

    def generate_audio(self, index):
        """The audio of clip `index` without its pixels (the probes of tools/ read only the sound).

        Returns: dict 'waveform' (T*16000,), 'log_mel' (T, 96, 64), 'plan' (see `plan`); the same
            numbers as `generate` (the pixels are drawn after the audio).
        """
        rng = self._rng(index)
        p = self.plan(index, rng)
        waveform, _ = self._audio(p, rng)
        return {"waveform": waveform, "log_mel": self.log_mel(waveform), "plan": p}

    def generate_pixels(self, index):
        """The pixels of clip `index` without its log-mel (pretrain.pretrain_visual sees no sound).

        Returns: dict 'frames' (T, H, W, 3), 'object_map' (T, H, W), 'labels' (T, H, W); the same
            numbers as `generate` (the waveform is still drawn, since the pixels are drawn after it).
        """
        rng = self._rng(index)
        p = self.plan(index, rng)
        self._audio(p, rng)
        frames, object_map, labels = self._pixels(p, rng)
        return {"frames": frames, "object_map": object_map, "labels": labels}

    def log_mel(self, waveform):
        """(T*16000,) -> (T, 96, 64): one VGGish example per frame, each second on its own
        (per_second_log_mel, which data.clip_examples gives predict.py for a synthetic checkpoint)."""
        return per_second_log_mel(waveform, AUDIO_RATE, self.frames)  # (T, 96, 64)

    def _audio(self, p, rng):
        """The audio: each source's partials under its envelope, gated, muted in dropouts; pink noise
        at the frame's SNR; the non-category sounds on top.

        Returns (waveform (T*16000,) float32, meta entries)."""
        T = self.frames
        steps = T * 100  # the envelopes live on a 10 ms grid
        t10 = np.arange(steps) / 100.0  # (T*100,) seconds
        keep = np.ones(steps, dtype=np.float32)  # (T*100,) 0 inside a dropout
        for t, start, length in p["dropouts"]:
            keep[t * 100 + start:t * 100 + start + length] = 0.0
        one_second = np.arange(AUDIO_RATE)  # (16000,)
        signal = np.zeros(T * AUDIO_RATE, dtype=np.float32)  # (Ns,)
        partials_hz = []
        for s, c in enumerate(p["sources"]):
            scale = rng.uniform(0.98, 1.02)  # instance jitter of all partials together
            freqs = [int(round(f * scale)) for f in self.partials_hz[c - 1]]  # whole hertz: 1 s repeats
            partials_hz.append([float(f) for f in freqs])
            tone = np.zeros(AUDIO_RATE, dtype=np.float32)  # (16000,)
            for f, amp in zip(freqs, self.partial_amps[c - 1]):
                phase = ((f * one_second + int(rng.integers(AUDIO_RATE))) % AUDIO_RATE)  # (16000,)
                tone += np.float32(amp) * _SINE[phase]
            rate = self.rate_of[c - 1] * rng.uniform(0.95, 1.05)  # Hz
            cycle = (rate * t10 + rng.uniform()) % 1.0  # (T*100,) position in the modulation cycle
            if self.envelope_of[c - 1] == "tremolo":
                shape = 1.0 - 0.8 * 0.5 * (1.0 + np.cos(2 * np.pi * cycle))  # (T*100,) 0.2..1
            else:  # pulses: an onset each cycle, then an exponential decay
                shape = np.exp(-4.0 * cycle)  # (T*100,)
            envelope = _gate(p["on"][:, s]) * keep * shape * rng.uniform(0.05, 0.2)  # (T*100,)
            signal += np.tile(tone, T) * np.repeat(envelope.astype(np.float32), 160)
        # Noise at each frame's SNR, relative to the power of the frame's sources (of the clip's
        # sounding frames on average where no source sounds).
        power = (signal.reshape(T, AUDIO_RATE) ** 2).mean(1)  # (T,)
        active = p["on"].any(1)  # (T,)
        level = np.where(active, power, power[active].mean())  # (T,)
        noise_std = np.sqrt(level / 10.0 ** (p["snr_db"] / 10.0)).astype(np.float32)  # (T,)
        start = int(rng.integers(0, len(self._pink) - T * AUDIO_RATE + 1))
        waveform = signal + self._pink[start:start + T * AUDIO_RATE] * np.repeat(noise_std, AUDIO_RATE)  # (Ns,)
        for ev in p["distractor_sounds"]:  # off-screen sounds of no category
            i0, length = int(ev["start"] * AUDIO_RATE), int(ev["duration"] * AUDIO_RATE)
            tt = np.arange(length) / AUDIO_RATE  # (length,) seconds, the event's samples
            ramp = np.minimum(1.0, np.minimum(tt, ev["duration"] - tt) / 0.01)  # (length,) 10 ms fades
            if ev["kind"] == "chirp":  # exponential sweep f0 -> f1
                k = math.log(ev["f1"] / ev["f0"]) / ev["duration"]
                x = np.sin(2 * np.pi * ev["f0"] * (np.expm1(k * tt) / k if abs(k) > 1e-9 else tt))  # (length,)
            else:
                x = self._noisy(rng, length)  # (length,) white
            waveform[i0:i0 + length] += (ev["amp"] * ramp * x).astype(np.float32)
        dropped = np.zeros(T, dtype=bool)  # (T,)
        for t, _, _ in p["dropouts"]:
            dropped[t] = True
        return waveform, {"benchmark": SYNTHETIC_VERSION, "partials_hz": partials_hz,
                          "snr_db": [round(float(x), 2) for x in p["snr_db"]], "dropout": dropped.tolist(),
                          "distractor_sounds": len(p["distractor_sounds"])}

    def _pixels(self, p, rng):
        """Frames, object map and labels of a plan.

        Returns: frames (T, H, W, 3) float32 in [0, 1], object_map (T, H, W) int64, labels (T, H, W) int64
        (H = W = img_size)."""
        T, side = self.frames, self.img_size
        # Pixels: a noisy background with a gentle gradient, then the objects back to front.
        grid = (np.arange(side, dtype=np.float32) + 0.5) / side  # (W,) pixel centres (H = W) in [0, 1]
        base = rng.uniform(0.3, 0.6, 3).astype(np.float32)  # (3,) grey-ish, away from the palette
        tilt = rng.uniform(-0.15, 0.15, 2).astype(np.float32)
        background = base + (tilt[0] * grid[None, :, None] + tilt[1] * grid[:, None, None])  # (H, W, 3)
        frames = np.repeat(background[None], T, axis=0)  # (T, H, W, 3)
        object_map = np.zeros((T, side, side), dtype=np.int64)  # (T, H, W) class id of the top object
        for c in p["visible"]:
            radius = side * rng.uniform(0.12, 0.18)  # pixels
            centre = rng.uniform(radius, side - radius, 2)  # (2,) x, y
            velocity = rng.uniform(-0.025, 0.025, 2) * side  # pixels a frame
            colour = self.colour_of[c - 1] + rng.uniform(-0.05, 0.05, 3).astype(np.float32)  # (3,)
            for t in range(T):
                cx, cy = np.clip(centre + velocity * t, radius, side - radius)
                x0, x1 = int(cx - radius), min(side, int(math.ceil(cx + radius)) + 1)
                y0, y1 = int(cy - radius), min(side, int(math.ceil(cy + radius)) + 1)
                dx = (np.arange(x0, x1) + 0.5 - cx)[None, :] / radius  # (1, w_box)
                dy = (np.arange(y0, y1) + 0.5 - cy)[:, None] / radius  # (h_box, 1)
                inside = _shape_mask(self.shape_of[c - 1], dx, dy)  # (h_box, w_box) bool
                frames[t, y0:y1, x0:x1][inside] = colour
                object_map[t, y0:y1, x0:x1][inside] = c
        frames += self._noisy(rng, frames.size).reshape(frames.shape) * np.float32(0.03)  # sensor noise
        np.clip(frames, 0.0, 1.0, out=frames)
        sounding_map = np.concatenate([np.zeros((T, 1), bool), p["sounding"]], axis=1)  # (T, Kc+1)
        labels = np.where(np.take_along_axis(sounding_map, object_map.reshape(T, -1), 1).reshape(T, side, side),
                          object_map, 0)  # (T, H, W) the class of visible *sounding* objects only
        return frames, object_map, labels

    def __getitem__(self, index):
        if not 0 <= index < self.num_clips:
            raise IndexError(index)
        clip = self.generate(index)
        T = self.frames
        return {"frames": normalised_frames(clip["frames"]),  # (T, 3, H, W)
                "audio": torch.from_numpy(clip["log_mel"]).unsqueeze(1),  # (T, 1, 96, 64)
                "labels": torch.from_numpy(clip["labels"]),  # (T, H, W) int64
                "label_valid": torch.ones(T, dtype=torch.bool),  # (T,)
                "frame_valid": torch.ones(T, dtype=torch.bool),  # (T,)
                "meta": clip["meta"]}


# ----------------------------------------------------------------------------------------------
# 3. Frames as data.py gives them, the front end a second at a time, the on/off gate, the shapes
# ----------------------------------------------------------------------------------------------
def normalised_frames(frames: np.ndarray) -> torch.Tensor:
    """Generated frames (T, H, W, 3) float32 in [0, 1] -> ImageNet-normalised (T, 3, H, W), as
    data.py's readers give real frames."""
    x = (frames - IMAGENET_MEAN) / IMAGENET_STD                          # (T, H, W, 3)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())              # (T, 3, H, W)


def per_second_log_mel(waveform, rate, num_frames):
    """One VGGish log-mel example per whole second of a waveform, up to num_frames of them.

    Args: waveform (Ns,) at `rate` Hz. Returns (E, 96, 64) float32, E = min(num_frames, whole seconds).
    """
    # NOT IN PAPER: each second goes through the front end on its own, so example t is exactly the
    # audio of frame t (on a whole clip the 0.96 s examples drift 0.04 s a second).
    seconds = min(num_frames, len(waveform) // rate)
    examples = [vggish_log_mel(waveform[t * rate:(t + 1) * rate], rate) for t in range(seconds)]  # each (1, 96, 64)
    return np.concatenate(examples) if examples else np.zeros((0, *LOG_MEL_SHAPE), np.float32)  # (E, 96, 64)


_SINE = np.sin(2 * np.pi * np.arange(AUDIO_RATE) / AUDIO_RATE).astype(np.float32)  # (16000,) one cycle


def _gate(on):
    """On/off per frame (T,) bool -> (T*100,) float32 on a 10 ms grid with 30 ms ramps."""
    gate = np.repeat(on.astype(np.float32), 100)  # (T*100,) one value per 10 ms
    return np.convolve(gate, np.ones(3, dtype=np.float32) / 3, mode="same")  # 30 ms ramps


def _shape_mask(shape, dx, dy):
    """Inside test of one shape in coordinates scaled by the radius: dx (1, w_box), dy (h_box, 1) ->
    (h_box, w_box) bool."""
    if shape == "disc":
        return dx ** 2 + dy ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85
    if shape == "triangle":  # apex up, base at dy = 0.8
        return (dy <= 0.8) & (np.abs(dx) <= (dy + 0.95) / 1.75)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if shape == "ring":
        r2 = dx ** 2 + dy ** 2
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0))
    raise ValueError(shape)
