"""Does torch.compile change the training step? The eq. (8) loss of one step, eager against compiled.

What this file checks
    tools/bench.py measures how much faster `--compile` makes a step; this script checks that it is
    the same step. One batch of the synthetic benchmark, the model in train mode with the same
    dropout seed, the loss of train.forward_loss computed eagerly and through
    torch.compile(model), in fp32 (TF32 off, so that both use the same matmul precision) and
    under bf16 autocast. The compiled loss must equal the eager one to rel 1e-5 in fp32 and
    rel 1e-2 in bf16. It also reports the compilation time (the first compiled call) and the
    number of graphs and graph breaks dynamo made.

    On the CPU the test suite runs the same comparison with the aot_eager backend
    (tests/test_compile.py); this script is for a GPU and the default (inductor) backend:

    python tools/compile_check.py --preset paper --device cuda --json check.json
    python tools/compile_check.py --preset cpu --device cpu --backend aot_eager   # a quick run here

Exit code 0 when every mode is within its tolerance, 1 otherwise, 2 for a bad flag.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402
from matcher import SetCriterion  # noqa: E402
from sqd import SQD  # noqa: E402

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}   # relative, on the total eq. (8) loss


def loss_of(model, run_model, criterion, batch, amp: bool, seed: int) -> float:
    torch.manual_seed(seed)                                   # the same dropout masks
    with torch.no_grad():
        total, _, _ = train.forward_loss(model, run_model, criterion, batch, amp)
    return float(total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["cpu", "paper"], default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead: CUDA graphs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = train.TrainConfig(dataset="synthetic", preset=args.preset, batch_size=args.batch_size)
    dataset = train.make_dataset(cfg, "train", train=True)
    cfg, model_cfg = train.resolve(cfg, dataset.num_classes)
    batch = train.to_device(data.collate([dataset[i] for i in range(cfg.batch_size)]), device)
    model = SQD(model_cfg).to(device).train()
    criterion = SetCriterion(model_cfg.num_classes,
                             weights=train.loss_weights(cfg))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=args.backend, mode=args.mode)
    results, ok = {"preset": args.preset, "device": str(device), "backend": args.backend,
                   "mode": args.mode, "torch": torch.__version__}, True
    for name, amp in (("fp32", False), ("bf16", True)):
        eager = loss_of(model, model, criterion, batch, amp, seed=1)
        t0 = time.perf_counter()
        first = loss_of(model, compiled, criterion, batch, amp, seed=1)   # compiles
        compile_s = time.perf_counter() - t0
        again = loss_of(model, compiled, criterion, batch, amp, seed=1)
        rel = abs(first - eager) / abs(eager)
        within = rel <= TOLERANCE[name] and again == first
        ok &= within
        results[name] = {"eager": eager, "compiled": first, "compiled_again": again, "rel_diff": rel,
                         "tolerance": TOLERANCE[name], "within": within,
                         "first_call_s": compile_s}
        print(f"{name}: eager {eager:.6f}, compiled {first:.6f} (rel {rel:.2e}, tolerance "
              f"{TOLERANCE[name]:g}: {'ok' if within else 'FAILED'}); first compiled call "
              f"{compile_s:.1f} s")
    results["graphs"] = int(counters["stats"].get("unique_graphs", 0))
    results["graph_breaks"] = {k: int(v) for k, v in counters["graph_break"].items()}
    print(f"dynamo: {results['graphs']} graph(s), graph breaks: {results['graph_breaks'] or 'none'}")
    if args.json:
        checkpoint.write_json(args.json, results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
