"""torch.compile: the compiled training step equals the eager one, and the model is one graph.

The GPU speed-up of `--compile` is measured with tools/bench.py on a device; here, on the CPU, the
`aot_eager` backend (dynamo's graph capture and AOTAutograd's forward/backward split, run with
eager kernels) checks what compilation must not change: the eq. (8) loss and every gradient
equal eager mode's (rel 1e-5 in fp32), and the forward pass is captured as a single graph with no
graph break (a break, e.g. a .item() or a host copy inside forward, splits the model into pieces
that cannot be fused or captured as one CUDA graph).
"""
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import train  # noqa: E402
from matcher import SetCriterion  # noqa: E402
from sqd import SQD, preset  # noqa: E402


def test_compiled_step_equals_eager_and_forward_is_one_graph():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = SQD(preset("cpu", num_classes=12)).train()
    ds = data.build_dataset("synthetic", "train", None, img_size=32, train=True, seed=0,
                            num_classes=12, num_clips=2)
    batch = data.collate([ds[0], ds[1]])
    criterion = SetCriterion(12)

    def step(run_model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)                                  # the same dropout masks
        total, parts, _ = train.forward_loss(model, run_model, criterion, batch, amp=False)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return total.detach(), parts, grads

    eager_total, eager_parts, eager_grads = step(model)
    compiled_total, compiled_parts, compiled_grads = step(torch.compile(model, backend="aot_eager"))
    assert torch.allclose(compiled_total, eager_total, rtol=1e-5, atol=0)
    for name in eager_parts:
        a, b = float(compiled_parts[name].detach()), float(eager_parts[name].detach())
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-7, name
    assert compiled_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        assert torch.allclose(compiled_grads[name], g, rtol=1e-5, atol=1e-7), name
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
