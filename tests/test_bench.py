"""Tests of tools/bench.py: the FLOP counter against hand-counted FLOPs, and the command line on CPU.

The counter is checked on layers whose FLOPs are written out by hand (a Linear layer, a grouped
convolution); the command-line run is checked against numbers computed here independently (the
parameter count of the CPU preset, the memory AdamW needs at least, the bounds that backward
FLOPs of matrix products obey).
"""
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import commands  # noqa: E402
from tools import bench  # noqa: E402
from sqd import SQD, preset  # noqa: E402


def test_flop_counter_matches_hand_counts_for_linear_and_grouped_conv():
    # Linear: y = x W^T + b is B*out dot products of length in: 2*B*in*out FLOPs (bias not counted).
    B, n_in, n_out = 3, 7, 5
    layer = nn.Linear(n_in, n_out)
    x = torch.randn(B, n_in)
    y, fwd, by_op = bench.count_flops(lambda: layer(x))
    assert fwd == 2 * B * n_in * n_out == 210
    assert set(by_op) == {"aten.addmm"}
    # backward with x not requiring grad: only dL/dW = g^T x, again 2*B*in*out
    _, bwd, _ = bench.count_flops(y.sum().backward)
    assert bwd == 2 * B * n_in * n_out
    # with x requiring grad: dL/dx = g W as well, 4*B*in*out
    x.requires_grad_(True)
    y, _, _ = bench.count_flops(lambda: layer(x))
    _, bwd, _ = bench.count_flops(y.sum().backward)
    assert bwd == 4 * B * n_in * n_out

    # Grouped 3x3 convolution, stride 2 (eq. 7's dynamic convolution is a grouped convolution):
    # every output value is a dot product over (C_in / G) * 3 * 3 inputs.
    N, G, c_in, c_out, k, H = 2, 10, 40, 20, 3, 16
    x = torch.randn(N, c_in, H, H, requires_grad=True)
    w = torch.randn(c_out, c_in // G, k, k, requires_grad=True)
    y, fwd, _ = bench.count_flops(lambda: F.conv2d(x, w, stride=2, padding=1, groups=G))
    Ho = (H + 2 - k) // 2 + 1                                          # 8
    assert fwd == 2 * N * c_out * (c_in // G) * k * k * Ho * Ho
    # backward: the input gradient and the weight gradient cost one forward each (torch's own
    # formula counts the weight gradient G times; tools/bench.py corrects it)
    _, bwd, _ = bench.count_flops(y.sum().backward)
    assert bwd == 2 * fwd


def test_cli_cpu_run_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = commands.run(bench.main, "--steps", "2", "--warmup", "0", "--threads", "1",
                        "--batch-size", "2", "--device", "cpu", "--json", out)
    r = json.loads(out.read_text())
    assert "python tools/bench.py --steps 2 --warmup 0" in proc.stdout and "n/a" in proc.stdout

    # the model is the CPU preset on the default synthetic benchmark (v2, 24 classes), T = 5
    params = sum(p.numel() for p in SQD(preset("cpu", num_classes=24)).parameters())
    assert r["parameters"] == params
    assert (r["batch_size"], r["frames"], r["img_size"], r["preset"]) == (2, 5, 64, "cpu")

    # two timed steps; throughput numbers follow from them
    assert len(r["step_s"]) == 2 and r["step_s_mean"] == sum(r["step_s"]) / 2 > 0
    # one thread: a step's CPU time is its work, never more than its wall time (small slack for
    # the clocks' resolution)
    assert len(r["step_cpu_s"]) == 2 and r["step_cpu_s_mean"] == sum(r["step_cpu_s"]) / 2 > 0
    assert all(c <= w + 0.05 for c, w in zip(r["step_cpu_s"], r["step_s"]))
    assert abs(r["clips_per_s"] * r["step_s_mean"] - 2) < 1e-9
    assert 0 <= r["matcher_s_mean"] < r["step_s_mean"]
    assert abs(r["achieved_tflops"] - r["flops_total"] / r["step_s_mean"] / 1e12) < 1e-12
    assert r["mfu"] is None and r["device_type"] == "cpu"

    # FLOPs: every matrix product's backward costs one (input gradient) or two (input and weight
    # gradients) forwards, and almost every layer trains: forward < backward <= 2 x forward
    assert r["flops_total"] == r["flops_forward"] + r["flops_backward"]
    assert 0 < r["flops_forward"] < r["flops_backward"] <= 2 * r["flops_forward"]
    assert sum(r["flops_by_op"].values()) == r["flops_total"]

    # AdamW in fp32 holds weights, gradients and two moments: at least 16 bytes per parameter
    assert r["peak_memory_bytes"] >= 16 * params

    # the update changed the loss
    assert r["loss_first"] != r["loss_last"]

    # asking for CUDA where there is none: one line, exit code 2, no traceback
    if not torch.cuda.is_available():
        proc = commands.run(bench.main, "--device", "cuda", check=False)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: --device cuda: CUDA is not available")
        assert "Traceback" not in proc.stderr


def test_cli_eval_throughput_profile_and_channels_last(tmp_path):
    out = tmp_path / "bench.json"
    proc = commands.run(bench.main, "--steps", "1", "--warmup", "0", "--threads", "1",
                        "--batch-size", "2", "--device", "cpu", "--eval-steps", "2", "--profile", "1",
                        "--channels-last", "--freeze-audio", "--json", out)
    r = json.loads(out.read_text())
    assert r["channels_last"] and "channels_last" in proc.stdout
    # frozen audio network: its parameters are not trained (the CPU preset's SmallVGG)
    audio = sum(p.numel() for p in SQD(preset("cpu", num_classes=24)).audio_encoder.net.parameters())
    assert r["freeze_audio"] and r["trainable_parameters"] == r["parameters"] - audio
    e = r["eval"]
    assert e["steps"] == 2 and abs(e["clips_per_s"] - 2 / e["batch_s_mean"]) < 1e-9
    assert f"{e['clips_per_s']:.2f} clips/s" in proc.stdout
    # the profiler's table: 10 operator rows between its rules, sorted by self CPU time
    table = r["profile_top10"]
    assert "Self CPU" in table and "top 10 operators" in proc.stdout
    rows = [line for line in table.splitlines()[3:] if line.strip() and not line.startswith("-")
            and "time total" not in line]
    assert len(rows) == 10, table
    res = commands.run(bench.main, "--eval-steps", "-1", "--device", "cpu", check=False)
    assert res.returncode == 2 and "--eval-steps" in res.stderr and "Traceback" not in res.stderr


def test_backbone_flag_reaches_the_model(tmp_path):
    out = tmp_path / "bench.json"
    proc = commands.run(bench.main, "--backbone", "resnet18", "--img-size", "32", "--steps", "1",
                        "--warmup", "0", "--threads", "1", "--batch-size", "1", "--frames", "2",
                        "--device", "cpu", "--json", out)
    r = json.loads(out.read_text())
    # the CPU preset with a ResNet-18 in place of its small CNN, counted here independently
    params = sum(p.numel() for p in SQD(preset("cpu", num_classes=24, backbone="resnet18")).parameters())
    assert r["backbone"] == "resnet18" and r["parameters"] == params
    assert (r["frames"], r["img_size"]) == (2, 32)  # the timed batch's clips: T = --frames
    assert params != sum(p.numel() for p in SQD(preset("cpu", num_classes=24)).parameters())
    assert "backbone resnet18" in proc.stdout
