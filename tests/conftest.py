"""Fixtures shared by several test files."""
import pytest

import commands
import pretrain
import synthetic
import train


@pytest.fixture(scope="session", autouse=True)
def stand_ins():
    """Every synthetic run of the tests, run_dir's too (an autouse fixture comes first in its scope),
    starts from the stand-ins of commands.stand_in_cache() (random weights, made in a moment)
    instead of building the real ones into the repository's runs/ (minutes)."""
    default, pretrain.STAND_IN_DIR = pretrain.STAND_IN_DIR, commands.stand_in_cache()
    yield
    pretrain.STAND_IN_DIR = default


@pytest.fixture(autouse=True)
def no_test_pictures(monkeypatch):
    """The train.py runs of the tests draw no test pictures (NUM_OVERLAYS 0) unless a test sets
    its own number: the pictures are a large part of a small run's time."""
    monkeypatch.setattr(train, "NUM_OVERLAYS", 0)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A synthetic run of 2 steps (last.pt, best.pt, one clip picture; no diagnostics.json, which
    tests/test_diagnostics.py writes with tools/diagnostics.py), trained once for the session:
    tests/test_predict.py and tests/test_diagnostics.py read it and write only new names into it."""
    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "NUM_OVERLAYS", 1)
        mp.setitem(synthetic.SYNTHETIC_SIZES, "train", 8)
        commands.run(train.main, "--max-steps", "2", "--out", run, "--img-size", "32", "--eval-clips", "4")
    return run
