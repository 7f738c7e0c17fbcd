"""Run a command of the repository (train.py, predict.py, a tool) the way a user does, but inside
the test process.

`run(main, *args)` calls the command's `main(argv)` with the repository root as the working
directory and one torch thread (as OMP_NUM_THREADS=1 gives a process), and returns what
`subprocess.run(..., capture_output=True, text=True)` would: a CompletedProcess with returncode
(main's return value, or the code of a SystemExit such as argparse's 2), stdout and stderr.
Warnings go to stderr as a fresh interpreter would print them (each shown once,
DeprecationWarnings hidden), so a test can read them there.

Why not a subprocess: a fresh interpreter imports torch and, on the optimizer's first use,
torch._dynamo again for every command, about 4 s on 2 cores; the suite runs some 40 commands.
An error the command does not handle propagates as an exception, which fails the test as the
traceback of a subprocess would. Tests that need a process of their own (Ctrl-C, torchrun) start one.

`stand_in_cache()` is the pretrain.STAND_IN_DIR of the test runs (tests/conftest.py sets it): the
pretrained stand-ins a synthetic run starts from, already there. A train.py process of its own
finds them when it runs in `stand_in_root()`, the folder that holds runs/audio-weights;
`train_script()` gives it a small train split.
"""
import atexit
import contextlib
import functools
import io
import os
import shutil
import subprocess
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(main, *args, check=True):
    """main(list(args)) in this process; a CompletedProcess as subprocess.run would give."""
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    cwd, threads = os.getcwd(), torch.get_num_threads()
    code = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")                    # once per place, as a fresh interpreter
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            os.chdir(ROOT)
            torch.set_num_threads(1)                        # as OMP_NUM_THREADS=1 would
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args) or 0
        except SystemExit as e:                             # argparse: bad flag, --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)                  # nor --threads outlive the command
    stderr = err.getvalue() + "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), stderr)
    if check and code != 0:
        raise AssertionError(f"{' '.join(args)} exited {code}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_script(folder, train_clips: int) -> str:
    """A script that runs train.py's main() with the synthetic train split cut to `train_clips`
    clips (as a test in this process sets synthetic.SYNTHETIC_SIZES), for a process of its own."""
    path = os.path.join(folder, "train_small.py")
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport synthetic\nimport train\n"
                f"synthetic.SYNTHETIC_SIZES['train'] = {int(train_clips)}\nsys.exit(train.main())\n")
    return path


@functools.lru_cache(maxsize=None)
def stand_in_root() -> str:
    """A working directory for train.py processes: its runs/audio-weights is stand_in_cache()."""
    folder = tempfile.mkdtemp(prefix="sqd-stand-ins-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.lru_cache(maxsize=None)
def stand_in_cache() -> str:
    """A folder for pretrain.STAND_IN_DIR that already holds the pretrained stand-ins of seeds
    0-2 (pretrained.uses_stand_ins), so that a synthetic test run of the CPU preset loads them instead
    of pretraining for minutes. Their weights are random, under the names and keys pretrain.py
    writes (the audio network's state_dict; the visual encoder, FPN and mask decoder of the
    24-category benchmark). Made once per test process; the real pretrainings are tested in
    tests/test_pretrain_audio.py and tests/test_pretrain_visual.py."""
    import pretrain
    from encoders import SmallVGG
    from sqd import preset
    folder = os.path.join(stand_in_root(), pretrain.STAND_IN_DIR)
    os.makedirs(folder)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model_cfg = preset("cpu", num_classes=24)
    visual = {k: v for k, v in pretrain.ReferringSegmenter(model_cfg).state_dict().items()
              if k.startswith(pretrain.KEPT)}
    audio = SmallVGG().state_dict()
    torch.random.set_rng_state(state)
    for seed in range(3):
        audio_path, visual_path = pretrain.stand_in_paths(folder, model_cfg, seed)  # where train.py looks
        torch.save(audio, audio_path)
        torch.save(visual, visual_path)
    return folder
