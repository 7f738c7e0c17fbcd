"""Run a command of the repository (train.py, predict.py, a tool) the way a user does, but inside
the test process.

`run(main, *args)` calls the command's `main(argv)` with the repository root as the working
directory and returns what `subprocess.run(..., capture_output=True, text=True)` would: a
CompletedProcess with returncode (main's return value, or the code of a SystemExit such as
argparse's 2), stdout and stderr. Warnings go to stderr as a fresh interpreter would print them
(each shown once, DeprecationWarnings hidden), so a test can read them there.

Why not a subprocess: a fresh interpreter imports torch and, on the optimizer's first use,
torch._dynamo again for every command, about 4 s on 2 cores; the suite runs some 40 commands.
An error the command does not handle propagates as an exception, which fails the test as the
traceback of a subprocess would. Tests that need a process of their own (Ctrl-C, torchrun) start one.
"""
import contextlib
import io
import os
import subprocess
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
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args) or 0
        except SystemExit as e:                             # argparse: bad flag, --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)                  # --threads must not outlive the command
    stderr = err.getvalue() + "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), stderr)
    if check and code != 0:
        raise AssertionError(f"{' '.join(args)} exited {code}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
