"""How a run stops and continues exactly: checkpoints, RNG states, clip order and the log.

What this file teaches
    What a research run must keep so that `--resume` continues as if no interruption had happened:
    every weight, the optimizer's and scheduler's state, the step counters, every random number
    generator, and the position in the epoch's clip order. And how to keep it safely:
      * every checkpoint is written atomically (a temporary file, fsync, rename), so a run killed
        while saving leaves the last good checkpoint, never half of one;
      * a checkpoint holds tensors and plain values only, so torch.load(weights_only=True) reads
        it without rebuilding any Python object: a shared checkpoint cannot run code;
      * Ctrl-C waits until an optimizer step and its step count have both happened;
      * the clip order of an epoch is a function of (seed, epoch), so a resumed run skips exactly
        the batches already seen.
    None of this is in the paper; it is what any run of train.py relies on.

Reading order
    atomic_write and atomic_save, save_checkpoint, load_checkpoint (load_error; the refusal of older formats), the RNG
    states, deferred_interrupt, ResumableSampler, then the run directory's text files (write_json,
    start_log, append_jsonl) and code_version, the commit a run records.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading

import numpy as np
import torch
from torch.utils.data import Sampler


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message names the file and what is wrong."""


# The layout of a checkpoint. It goes up by one when a model's keys change or a config's field
# changes meaning (a removed field needs none: train.saved_train_config leaves it out, and train.py
# refuses to resume a run whose removed --train-clips cut its data);
# OLD_FORMATS is the message that refuses each older one (what it lacks, and the git tag whose code
# reads it). What each format changed: docs/extending.md, "Checkpoint formats".
CHECKPOINT_FORMAT = 6
OLD_FORMATS = {1: "the visual encoder then encoded windows of T frames; retrain with this version",
               2: "its RNG states need a full unpickle, which can run code; retrain with this version",
               3: "its modules had other names; retrain with this version",
               4: "its model had no slot positions and held options since removed; retrain with this "
                  "version, or read it with `git checkout silent-choices`",
               5: "its run chose how each side started (--audio-regime, --visual-regime), options "
                  "since removed; retrain with this version, or read it with `git checkout audio-regimes`"}


def atomic_write(path: str, write) -> None:
    """Make `path` atomically: write(f) fills a temporary binary file in the same folder (made if
    missing), which is flushed, fsynced and renamed over `path`. An interrupted or failed write
    removes the temporary file and leaves `path` as it was. Every file a run writes goes this way
    (checkpoints, the stand-ins, the JSON files, the pictures)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """torch.save, atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_error(e: Exception) -> tuple[str | None, str]:
    """What torch.load(weights_only=True) refused, in one line: (the Python object the file would
    have rebuilt, or None when it is not that kind of refusal; the reason, at most 200 characters)."""
    text = str(e).replace("\n", " ")
    unsafe = re.search(r"[Uu]nsupported (?:global: )?(?:GLOBAL |class )([\w.]+)", text)
    reason = re.search(r"WeightsUnpickler error: *(.+)", text)
    reason = reason.group(1).split(" Check the documentation")[0].strip() if reason else text
    return (unsafe.group(1) if unsafe else None), reason[:200]


def save_checkpoint(path: str, model, opt, sched, state: dict, config: dict) -> None:
    """Everything a resumed run needs (model, optimizer, scheduler, counters, RNG, config), atomically."""
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "state": dict(state), "rng": get_rng_state(),
                 "config": config}, path)


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """A checkpoint written by save_checkpoint, or CheckpointError naming the file and what is wrong.

    torch.load(weights_only=True) rebuilds only tensors and plain values (dict, list, str, number),
    so a shared checkpoint cannot run code: one that names any other Python object is refused.
    mmap: map the tensors from the file instead of reading them all (predict.py needs only the
    model's weights, not the optimizer's state).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated, foreign or unsafe file: one line, not a traceback
        unsafe, reason = load_error(e)
        if unsafe:
            raise CheckpointError(f"{path}: refused; loading it would call {unsafe}, and a "
                                  f"checkpoint that needs a Python object rebuilt can run code. "
                                  f"Checkpoints of this code (format {CHECKPOINT_FORMAT}) hold only "
                                  f"tensors and plain values; format 2 and older ones must be retrained") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "state"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a train.py checkpoint (expected the keys model, config, state)")
    found = ckpt.get("format", 1)
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {found}, this code reads format "
                              f"{CHECKPOINT_FORMAT} ({OLD_FORMATS.get(found, 'unknown format')})")
    return ckpt


def get_rng_state() -> dict:
    """Every RNG state as tensors and plain values (a checkpoint must load with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()         # keys (624,) uint32
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,)
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """The inverse of get_rng_state."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class deferred_interrupt:
    """Hold back Ctrl-C (SIGINT) inside the block and raise KeyboardInterrupt when it ends.

    The optimizer step, the scheduler step and the step counter change together: an interrupt
    between them would save updated weights under the old step number, and a resumed run would
    repeat that step. Outside the main thread (where no handler can be set) it does nothing.
    """

    def __enter__(self):
        self.caught, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.caught = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.caught and exc[0] is None:
            raise KeyboardInterrupt
        return False


class ResumableSampler(Sampler):
    """Clip order for one epoch: a permutation seeded by (seed, epoch), split across ranks.

    Starting at `start` skips the batches already seen in this epoch, so a run resumed
    mid-epoch sees exactly the clips the unbroken run would have seen.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.shuffle and self.world > 1:  # equal length per rank so DDP steps stay in lockstep
            order = order[: self.n - self.n % self.world]
        return order[self.rank :: self.world]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


# ----------------------------------------------------------------------------------------------
# The run directory's text files: config.json, metrics.json, log.jsonl
# ----------------------------------------------------------------------------------------------

def write_json(path: str, obj) -> None:
    """json.dump, atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def start_log(path: str, resumed_step: int | None) -> None:
    """A new run starts its own log.jsonl (an earlier run's, in a reused --out, goes); a resumed
    one keeps the lines up to its checkpoint's step and drops those after it, which it trains again."""
    if resumed_step is None or not os.path.exists(path):
        open(path, "w").close()
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut off when the run was stopped
                continue
            if rec.get("step", 0) <= resumed_step and rec.get("eval") != "final":
                kept.append(line)
    with open(path, "w") as f:
        f.writelines(kept)


def append_jsonl(path: str, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=float) + "\n")


def code_version() -> str:
    """git commit of the code (with '-dirty' when the tree has changes), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
