"""Fixtures shared by several test files."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A synthetic run of 2 steps (last.pt, best.pt, one clip picture; no diagnostics.json, which
    tests/test_diagnostics.py writes with tools/diagnostics.py), trained once for the session:
    tests/test_predict.py and tests/test_diagnostics.py read it and write only new names into it."""
    run = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "train.py", "--max-steps", "2", "--out", str(run),
                           "--img-size", "32", "--train-clips", "8", "--eval-clips", "4",
                           "--threads", "1", "--num-overlays", "1", "--audio-regime", "scratch"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run
