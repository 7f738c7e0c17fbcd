"""Speed and memory of one SQD training step, with FLOPs and MFU.

What this file measures
    One optimizer step of train.py, timed on its own: build the ground-truth tracks, the forward
    pass (Fig. 3), the eq. (8) loss with the Hungarian matcher (eq. 10), the backward pass,
    gradient clipping and the AdamW update. Model, loss, optimizer and batch are built exactly as
    train.py builds them (train.make_dataset, train.resolve, sqd.SQD, matcher.SetCriterion with the
    recipe's loss weights, model.parameter_groups); the batch is one real batch of the
    synthetic benchmark (64 x 64 for the CPU preset, 224 x 224 for the paper preset), generated
    once and kept on the device, so data loading is NOT part of the step. Weights are random:
    speed, memory and FLOPs do not depend on them.

    The Hungarian matcher runs scipy's linear_sum_assignment on the CPU: every step copies the
    cost matrices of all clips and decoder layers to the host and waits for them. That is part of
    the step, as it is in training, and its share is reported separately ("matcher"). To measure
    it, the step syncs the device once when the matcher is entered (the matcher's copy to the
    host would wait there anyway).

    It reports
      step time      mean and median over --steps steps after --warmup untimed ones (the first
                     step, with torch.compile's compilation and cuDNN's algorithm search, is
                     shown apart); the device is synchronized around every step
      CPU time       the process's CPU seconds per timed step (time.process_time, all threads):
                     on a CPU shared with other jobs, the step's work without the waits for a core
      clips/s        batch size / mean step time
      peak memory    GPU: torch.cuda.max_memory_allocated over warm-up and timed steps;
                     CPU: the peak resident set size of the whole process (resource.getrusage),
                     which also counts Python, the libraries and the batch generation
      FLOPs          of one step, forward (with the loss and matcher) plus backward, counted
                     once with torch.utils.flop_counter.FlopCounterMode on the uncompiled model,
                     outside the timed loop. FlopCounterMode counts matrix multiplications,
                     convolutions and attention kernels only: the deformable attention's
                     bilinear sampling (grid_sample), normalisations, activations, the loss's
                     elementwise work and the AdamW update are not in the count, as usual for MFU
      TFLOP/s, MFU   counted FLOPs / mean step time, and that over the accelerator's peak for the
                     step's dtype mode (a small table of dense peaks, PEAK_TFLOPS, or
                     --peak-tflops); n/a on a CPU unless --peak-tflops is given

Reading order
    parse_args (the flags), run (set-up, as train.py does it), training_step (the step of
    train.train_one_epoch), count_step_flops and count_flops (FLOPs), time_steps (the timed
    loop), peak_memory, peak_tflops (MFU's denominator), then report.

How to run
    python tools/bench.py                                   # CPU preset, on cuda when there is one
    python tools/bench.py --device cpu --threads 2          # the CPU preset on the CPU
    python tools/bench.py --preset paper --amp              # the paper's model at 224, bf16 autocast
    python tools/bench.py --preset paper --backbone swin-t  # another visual backbone (sqd.BACKBONES)
    python tools/bench.py --preset paper --amp --compile --json bench.json
    python tools/bench.py --preset paper --amp --channels-last --eval-steps 10 --profile 3

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): B clips, T frames, H, W
image size fed to the model (H = W).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import resource
import shlex
import statistics
import sys
import time

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/<name>.py` from anywhere
    sys.path.insert(0, ROOT)

import data  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402
from matcher import SetCriterion  # noqa: E402
from sqd import BACKBONES, SQD  # noqa: E402

# Dense (no structured sparsity) peak tensor throughput in TFLOP/s, from NVIDIA's H100 and H200
# datasheets (SXM form factor). H200 is the H100 chip with more and faster memory: same peaks.
# Keyed by the dtype mode of the step: bf16 (--amp), tf32 (fp32 tensors, TF32 matmuls), fp32.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},
}


class UserError(Exception):
    """A mistake the user can fix (a flag); reported in one line with exit code 2."""


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu",
                   help="model preset (sqd.PRESETS): cpu (C = 64, small CNNs) or paper "
                        "(C = 256, ResNet-50, VGGish)")
    p.add_argument("--backbone", choices=list(BACKBONES), default=None,
                   help="visual backbone (sqd.BACKBONES); None: the preset's (cpu small, paper resnet50)")
    p.add_argument("--batch-size", type=int, default=4, help="B, clips per step (paper: 4)")
    p.add_argument("--frames", type=int, default=5, help="T, frames per clip (paper: 5)")
    p.add_argument("--img-size", type=int, default=None,
                   help="H = W of the frames; None: the preset's (cpu 64, paper 224)")
    p.add_argument("--device", default=None,
                   help="cpu | cuda | cuda:N; None: cuda if available, else cpu")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast around the forward pass, as train.py --amp")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as train.py")
    p.add_argument("--compile-mode", default=None,
                   help="with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; None: torch's default")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the step's dtype, for MFU; None: "
                        "from the table of known GPUs (H100 SXM, H200)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the batch")
    p.add_argument("--freeze-audio", action="store_true",
                   help="the audio network frozen, as train.py runs it with pretrained weights "
                        "(--audio-weights); weights stay random, speed does not depend on them")
    p.add_argument("--channels-last", action="store_true",
                   help="the visual backbone's weights (and so its convolutions) in channels_last layout")
    p.add_argument("--eval-steps", type=int, default=0,
                   help="also time this many evaluation batches (no_grad forward + segment, as "
                        "train.evaluate; B = --batch-size clips), after 2 untimed ones")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also run this many training steps under torch.profiler and report the "
                        "10 operators with the most self time (device time on a GPU)")
    return p.parse_args(argv)


def pick_device(name: str | None) -> torch.device:
    """The device to run on; a device that is not there is a UserError, not a traceback."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: bench.py runs on cpu or cuda only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (f"built with CUDA {torch.version.cuda}" if torch.version.cuda
                     else "a CPU-only build")
            raise UserError(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                            f"{build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA "
                            f"device(s), numbered from 0")
    return device


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return run(args, argv)
    except (UserError, train.UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; try a smaller --batch-size, --img-size or --frames, "
              "or --amp", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv=None) -> int:
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.frames < 1:
        raise UserError("--steps, --batch-size and --frames must be positive, --warmup >= 0")
    if args.eval_steps < 0 or args.profile < 0:
        raise UserError("--eval-steps and --profile must be >= 0")
    if args.compile_mode and not args.compile:
        raise UserError("--compile-mode needs --compile")
    if args.img_size is not None and args.img_size < 32:
        raise UserError(f"--img-size {args.img_size}: the visual encoder needs at least 32 "
                        f"(its deepest level has stride 32)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError("--peak-tflops must be positive")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be positive")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserError(f"--json {args.json}: its folder does not exist")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # The model, loss, optimizer and one batch, as train.run builds them.
    cfg = train.TrainConfig(dataset="synthetic", preset=args.preset, img_size=args.img_size,
                            backbone=args.backbone, batch_size=args.batch_size, amp=args.amp,
                            compile=args.compile, seed=args.seed)
    img = args.img_size or train.PRESET_IMG_SIZE[args.preset or "cpu"]
    dataset = data.build_dataset("synthetic", "train", img_size=img, frames=args.frames, train=True,
                                 seed=args.seed)                  # clips of T = --frames frames
    cfg, model_cfg = train.resolve(cfg, dataset.num_classes)
    if args.freeze_audio:
        model_cfg = dataclasses.replace(model_cfg, freeze_audio=True)
    batch = data.collate([dataset[i] for i in range(cfg.batch_size)])
    batch = train.to_device(batch, device)        # frames (B, T, 3, H, W), audio (B, T, 1, 96, 64)
    model = SQD(model_cfg).to(device)
    if args.channels_last:
        model.visual_encoder.backbone.to(memory_format=torch.channels_last)
    criterion = SetCriterion(model_cfg.num_classes,
                             weights=train.loss_weights(cfg))
    opt = torch.optim.AdamW(model.parameter_groups(cfg.lr, train.BACKBONE_LR_MULT, train.WEIGHT_DECAY))
    model.train()

    # FLOPs: once, uncompiled, outside the timed loop; then forget its gradients.
    flops = count_step_flops(model, criterion, batch, cfg.amp)
    opt.zero_grad(set_to_none=True)

    train_model = torch.compile(model, mode=args.compile_mode) if cfg.compile else model
    step = functools.partial(training_step, model, train_model, criterion, opt, batch, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_steps(step, criterion.matcher, device, args.warmup, args.steps)
    memory = peak_memory(device)
    profile = profile_steps(step, device, args.profile) if args.profile else None
    evaluation = time_eval(model, train_model, batch, cfg.amp, device, args.eval_steps) if args.eval_steps else None

    mean = statistics.fmean(timing["step_s"])
    mode, peak_key = dtype_mode(device, cfg.amp)
    peak, peak_source = peak_tflops(device, peak_key, args.peak_tflops)
    achieved = flops["total"] / mean / 1e12
    results = {
        "command": command_line(argv),
        "torch": torch.__version__,
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "mode": mode,
        "compile": cfg.compile, "compile_mode": args.compile_mode,
        "preset": cfg.preset, "backbone": model_cfg.backbone,
        "batch_size": cfg.batch_size, "frames": int(batch["frames"].shape[1]), "img_size": cfg.img_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "warmup": args.warmup, "steps": args.steps,
        "first_step_s": timing["first_step_s"],
        "step_s_mean": mean,
        "step_s_median": statistics.median(timing["step_s"]),
        "step_s_min": min(timing["step_s"]),
        "step_s": timing["step_s"],
        # CPU seconds of the process (all its threads): on a CPU shared with other jobs, the work
        # of a step, which wall time mixes with the waits for a core
        "step_cpu_s_mean": statistics.fmean(timing["cpu_s"]),
        "step_cpu_s_median": statistics.median(timing["cpu_s"]),
        "step_cpu_s": timing["cpu_s"],
        "matcher_s_mean": statistics.fmean(timing["matcher_s"]),
        "clips_per_s": cfg.batch_size / mean,
        "loss_first": timing["loss"][0], "loss_last": timing["loss"][-1],
        **memory,
        "flops_forward": flops["forward"], "flops_backward": flops["backward"],
        "flops_total": flops["total"], "flops_by_op": flops["by_op"],
        "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_tflops_source": peak_source,
        "mfu": None if peak is None else achieved / peak,
        "channels_last": args.channels_last,
        "freeze_audio": model_cfg.freeze_audio,
        "eval": evaluation,
        "profile_top10": profile,
    }
    print(report(results))
    if args.json:
        checkpoint.write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

def training_step(model, train_model, criterion, opt, batch: dict, cfg) -> torch.Tensor:
    """One step of train.train_one_epoch (without its logging and the lr scheduler's counter).
    Returns the step's loss tensor (read once all steps are done)."""
    total, _, _ = train.forward_loss(model, train_model, criterion, batch, cfg.amp)  # eq. (8)
    train.apply_gradients(model, opt, total, train.CLIP_GRAD)
    return total.detach()


def _conv_backward_flop(*args, out_val=None, **kwargs) -> int:
    """torch's convolution_backward formula with the weight gradient of a grouped convolution
    divided by the number of groups.

    torch (up to at least 2.13) counts the weight gradient of a convolution with G groups as if
    every output channel saw every input channel: G times too many FLOPs. Eq. (7)'s dynamic
    convolution runs all tokens of the batch as one grouped convolution (G = B*T*N*...), so
    without this the backward pass is counted several times over. The fix upstream is
    pytorch/pytorch#183405.
    """
    # aten.convolution_backward(grad_out, input, weight, bias_sizes, stride, padding, dilation,
    #                           transposed, output_padding, groups, output_mask)
    groups, mask = args[9], args[10]
    whole = flop_counter.conv_backward_flop(*args, out_val=out_val, **kwargs)
    if groups == 1 or not mask[1]:
        return whole
    weight_grad = flop_counter.conv_backward_flop(*args[:10], [False, True, False],
                                                  out_val=out_val, **kwargs)
    return whole - weight_grad + weight_grad // groups


_conv_backward_flop._get_raw = True   # FlopCounterMode: pass tensors, as for its own formulas


def count_flops(fn):
    """Run fn() under FlopCounterMode: (fn's result, total FLOPs, {op name: FLOPs})."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: _conv_backward_flop})
    with counter:
        out = fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return out, int(counter.get_total_flops()), by_op


def count_step_flops(model, criterion, batch: dict, amp: bool) -> dict:
    """FLOPs of the forward pass with the loss (matcher included) and of the backward pass."""
    def forward():
        return train.forward_loss(model, model, criterion, batch, amp)[0]

    total, fwd, fwd_ops = count_flops(forward)
    _, bwd, bwd_ops = count_flops(total.backward)
    by_op = {op: fwd_ops.get(op, 0) + bwd_ops.get(op, 0) for op in sorted({*fwd_ops, *bwd_ops})}
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "by_op": by_op}


def time_steps(step, matcher, device: torch.device, warmup: int, steps: int) -> dict:
    """Run warmup + steps steps; wall time of each timed step and of matcher.forward inside it,
    and the process's CPU time of each timed step. The losses are read once all steps are done."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    matcher_time = [0.0]
    original = matcher.forward

    def timed_matcher(*a, **k):  # the step's outputs are ready when the matcher starts
        sync()
        t = time.perf_counter()
        out = original(*a, **k)
        matcher_time[0] += time.perf_counter() - t
        return out

    matcher.forward = timed_matcher                  # nn.Module.__call__ finds it first
    step_s, cpu_s, matcher_s, losses, first = [], [], [], [], None
    try:
        for i in range(warmup + steps):
            sync()
            matcher_time[0] = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i == 0:
                first = dt
            if i >= warmup:
                step_s.append(dt)
                cpu_s.append(dc)
                matcher_s.append(matcher_time[0])
                losses.append(loss)
    finally:
        del matcher.forward                          # back to the class's method
    return {"step_s": step_s, "cpu_s": cpu_s, "matcher_s": matcher_s, "loss": [float(x) for x in losses],
            "first_step_s": first}


def time_eval(model, train_model, batch: dict, amp: bool, device: torch.device, steps: int) -> dict:
    """Evaluation throughput: `steps` timed batches of train.evaluate's work on the device (the
    no_grad forward pass and segment(), the per-pixel class map of eq. 11; not the metrics),
    after 2 untimed ones."""
    from sqd import segment
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(2 + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = train_model(batch)
            segment(out["pred_logits"].float(), out["pred_masks"].float(),
                    tuple(batch["labels"].shape[-2:]))                    # (B, T, H, W) eq. (11)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    model.train()
    mean = statistics.fmean(times)
    return {"steps": steps, "batch_s_mean": mean, "clips_per_s": batch["frames"].shape[0] / mean}


def profile_steps(step, device: torch.device, steps: int) -> str:
    """The 10 operators with the most self time over `steps` training steps (torch.profiler):
    device time on a GPU, CPU time otherwise."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=10)


# ----------------------------------------------------------------------------------------------
# Memory, device, peak throughput
# ----------------------------------------------------------------------------------------------

def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "torch.cuda.max_memory_allocated (warm-up and timed steps)",
                "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_bytes": int(rss * scale),
            "peak_memory_kind": "peak RSS of the whole process (resource.getrusage)"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name}"


def dtype_mode(device: torch.device, amp: bool) -> tuple[str, str]:
    """(description, key of PEAK_TFLOPS) of the arithmetic the step's matmuls run in."""
    if amp:
        return "bf16 autocast (forward; loss in fp32)", "bf16"
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "fp32 tensors, TF32 matmuls", "tf32"
    conv = ""
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        conv = " (cuDNN may run convolutions in TF32)"
    return "fp32" + conv, "fp32"


def peak_tflops(device: torch.device, key: str, override: float | None):
    """MFU's denominator: (TFLOP/s or None, where it came from)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for CPUs (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return PEAK_TFLOPS["H200"][key], f"table: H200 {key} dense"
    # H100 SXM reports itself as "NVIDIA H100 80GB HBM3"; PCIe and NVL have other peaks.
    if "H100" in name and "PCIe" not in name and "NVL" not in name:
        return PEAK_TFLOPS["H100 SXM"][key], f"table: H100 SXM {key} dense"
    return None, f"{name!r} not in the table (pass --peak-tflops)"


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def command_line(argv=None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return "python tools/bench.py" + ("" if not args else " " + shlex.join(args))


def report(r: dict) -> str:
    gb = r["peak_memory_bytes"] / 1e9
    mem = f"{gb:.3f} GB  ({r['peak_memory_kind']})"
    if "peak_memory_reserved_bytes" in r:
        mem += f"; reserved {r['peak_memory_reserved_bytes'] / 1e9:.3f} GB"
    mfu = ("n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f} %")
    peak = ("" if r["peak_tflops"] is None else f"{r['peak_tflops']:g} TFLOP/s, ")
    first = (f"{r['first_step_s']:.3f} s" + (" (not timed)" if r["warmup"] else " (timed)"))
    rows = [
        ("command", r["command"]),
        ("device", r["device"] + (f", torch threads {r['threads']}" if r["device_type"] == "cpu"
                                  else "")),
        ("torch", r["torch"]),
        ("mode", f"{r['mode']}; torch.compile "
                 + (("on" + (f", mode {r['compile_mode']}" if r.get("compile_mode") else ""))
                    if r["compile"] else "off")),
        ("model", f"preset {r['preset']}, backbone {r['backbone']}, {r['parameters']:,} parameters "
                  f"({r['trainable_parameters']:,} trainable)"),
        ("batch", f"B = {r['batch_size']} clips x T = {r['frames']} frames x "
                  f"{r['img_size']} x {r['img_size']}"),
        ("step time", f"mean {r['step_s_mean']:.4f} s, median {r['step_s_median']:.4f} s, "
                      f"min {r['step_s_min']:.4f} s  ({r['steps']} steps after {r['warmup']} "
                      f"warm-up)"),
        ("CPU time", f"mean {r['step_cpu_s_mean']:.4f} s, median {r['step_cpu_s_median']:.4f} s per "
                     f"step (the process's CPU seconds, all threads)"),
        ("first step", first),
        ("matcher", f"{1000 * r['matcher_s_mean']:.1f} ms/step "
                    f"({100 * r['matcher_s_mean'] / r['step_s_mean']:.1f} % of the step; "
                    f"cost matrices + scipy on CPU)"),
        ("clips/s", f"{r['clips_per_s']:.2f}"),
        ("peak memory", mem),
        ("FLOPs/step", f"{r['flops_total'] / 1e9:.2f} GFLOP (forward + loss "
                       f"{r['flops_forward'] / 1e9:.2f}, backward {r['flops_backward'] / 1e9:.2f}; "
                       f"matmul/conv/attention only)"),
        ("achieved", f"{r['achieved_tflops']:.4f} TFLOP/s"),
        ("MFU", f"{mfu}  ({peak}{r['peak_tflops_source']})"),
        ("loss", f"{r['loss_first']:.4f} (first timed step) -> {r['loss_last']:.4f} (last)"),
    ]
    if r.get("channels_last"):
        rows.insert(4, ("layout", "visual backbone in channels_last"))
    if r.get("freeze_audio"):
        rows.insert(4, ("audio", "audio network frozen (as with pretrained weights)"))
    if r.get("eval"):
        e = r["eval"]
        rows.append(("evaluation", f"{e['clips_per_s']:.2f} clips/s ({1000 * e['batch_s_mean']:.1f} ms "
                                   f"per batch of {r['batch_size']}, no_grad forward + segment, "
                                   f"{e['steps']} batches)"))
    width = max(len(k) for k, _ in rows)
    lines = ["SQD training step: build tracks + forward + loss (Hungarian) + backward + clip + AdamW"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if r.get("profile_top10"):
        lines += ["", "top 10 operators by self time (torch.profiler):", r["profile_top10"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
