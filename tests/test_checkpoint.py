"""checkpoint.py: what a resumed run relies on (RNG states, Ctrl-C held inside an update, atomic writes)."""
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
from checkpoint import deferred_interrupt, get_rng_state, set_rng_state  # noqa: E402


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    """get_rng_state -> torch.save -> torch.load(weights_only=True) -> set_rng_state gives back the
    same torch, numpy and Python random streams (numpy's with a cached Gaussian pending)."""
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()                      # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)                               # and in Python's

    def draw():
        return (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 1 << 30, 3).tolist(), random.random(), random.gauss(0, 1))

    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = draw()
    draw()                                           # move every stream on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


def test_ctrl_c_inside_an_update_is_held_until_the_step_is_counted():
    """deferred_interrupt: a SIGINT that arrives inside the block does not interrupt it; the block
    runs to its end, then KeyboardInterrupt is raised and the previous handler is back."""
    import signal as sig

    before = sig.getsignal(sig.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), sig.SIGINT)
            for _ in range(1000):  # give the handler every chance to run inside the block
                time.sleep(0)
            done.append("update and step count")
    assert done == ["update and step count"]
    assert sig.getsignal(sig.SIGINT) is before
    with deferred_interrupt():  # no signal: nothing raised
        pass


def test_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A checkpoint write stopped halfway removes its temporary file and leaves the old one."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous checkpoint")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)

    def interrupted(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(path), torch.nn.Linear(1, 1), opt, sched, {"step": 1}, {})
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
