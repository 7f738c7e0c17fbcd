"""Train and evaluate SQD: the paper's recipe (§4 Implementation Detail, App. D) end to end.

What this file teaches
    The training loop of a DETR-family set-prediction model on video clips: AdamW with a lower
    backbone learning rate, a step learning-rate drop, gradient clipping (ours, not the paper's),
    the eq. (8) loss from matcher.SetCriterion, evaluation with the official AVSBench metrics
    (metrics.py), and what a research run needs around them: a run directory, best.pt and last.pt
    (written and read by checkpoint.py, which makes --resume and Ctrl-C exact), a final evaluation
    of the checkpoint with the best val score, bf16 autocast, torch.compile and torchrun.

    python train.py                                  # synthetic benchmark, CPU preset
    python train.py --dataset avss --data-root DIR   # the paper's recipe on AVSBench-semantic
    python train.py --dataset s4 --data-root DIR     # AVS-Object single source (ms3: multi)
    torchrun --nproc_per_node 4 train.py --dataset avss --data-root DIR

Reading order
    TrainConfig (every setting, one comment each) and RECIPES (the paper's epochs per dataset),
    parse_args and resolve, main/run (set-up and the epoch loop; its helpers setup_distributed,
    saved_train_config, make_dataset, evaluation_splits are short), evaluate_checkpoint (the final
    evaluation), train_one_epoch with forward_loss and apply_gradients (one step), the step's log
    (finish_step), evaluate. What a resumed run relies on is checkpoint.py's.

Shape alphabet: B clips, T frames, N tokens, Kc classes, H, W image size, h, w mask size.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import metrics
from matcher import PAPER_LOSS_WEIGHTS, SetCriterion, track_batch
import pictures
from checkpoint import (CheckpointError, ResumableSampler, append_jsonl, code_version,
                        deferred_interrupt, load_checkpoint, save_checkpoint, set_rng_state, start_log,
                        write_json)
from pretrained import WeightsError, load_start_weights, uses_stand_ins
from sqd import BACKBONES, SQD, ModelConfig, foreground_probability, preset, segment
import synthetic


class UserError(Exception):
    """A mistake the user can fix (a flag, a path); reported in one line with exit code 2."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every setting of a run. None means "the default of the dataset's recipe or the preset"."""
    # data
    dataset: str = "synthetic"     # synthetic | s4 | ms3 | avss
    data_root: str | None = None   # AVSBench root (the folder that holds the release's files)
    img_size: int | None = None    # training/eval image size; None: preset (cpu 64, paper 224)
    workers: int = 0               # DataLoader worker processes (0: a resumed run draws the same crops)
    eval_clips: int | None = 200    # synthetic only: clips per evaluation split (tools/ablate.py: 500)
    train_multi_ratio: float | None = None  # synthetic only: share of multi-source train clips (None: 0.5; Fig. 7: 1.0)
    # model
    preset: str | None = None      # cpu | paper; None: cpu for synthetic, paper for AVSBench
    backbone: str | None = None    # resnet18 | resnet34 | resnet50 | swin-t | video-swin-t | small; None: preset's
    init_weights: str | None = None  # whole-model checkpoint of ReferFormer (r50_pretrained.pth): the tensors whose names map and shapes fit load, a table says which (docs/init-weights.md)
    backbone_weights: str | None = None  # torchvision state_dict (.pth) of the backbone: resnet50-*.pth, swin_t-704ceda3.pth, swin3d_t-7615ae03.pth
    audio_weights: str | None = None     # state_dict of the audio network: the released VGGish (vggish-10086976.pth), or the cpu preset's SmallVGG
    # ablations (Tables 2-4) and a control; defaults are the paper's full model
    no_gsd: bool = False           # drop global semantic decomposition
    no_avsr: bool = False          # drop audiovisual semantic recombination
    no_lsd: bool = False           # drop local semantic decomposition
    no_shared_codebook: bool = False  # local tokens get a codebook of their own
    codebook_size: int | None = None  # K; None: preset's (paper 128)
    num_tokens: int | None = None     # N; None: preset's (paper 5)
    zero_audio: bool = False       # control: audio replaced by zeros (vision alone)
    # NOT IN PAPER: the quantizer warm-up (RECIPES)
    quant_warmup_steps: int | None = None  # first steps with VQ(x) = x, then a k-means codebook (not in the paper); None: recipe (300; 0 quantizes from step 1, as the paper)
    # optimisation (paper §4)
    epochs: int | None = None      # epochs to train; None: recipe (s4/ms3 13, avss 16, synthetic see RECIPES)
    lr_drop_epoch: int | None = None  # epoch (1-based) from which lr is x0.1; None: recipe
    max_steps: int | None = None   # stop after this many optimizer steps (smoke tests, budgets)
    batch_size: int = 4            # clips per optimizer step and GPU (paper: 4)
    lr: float | None = None        # AdamW learning rate; None: recipe (paper 1e-4; synthetic 4e-4)
    # run
    out: str | None = None         # run directory; None: runs/{dataset}-{time}
    resume: str | None = None      # checkpoint (last.pt) to continue with its run's settings; flags: --out --data-root --epochs --max-steps --workers
    eval_only: str | None = None   # checkpoint (best.pt) to evaluate with its run's settings, then exit; flags: --out --data-root --workers, and --eval-clips --amp if not the default
    amp: bool = False              # bf16 autocast (GPU)
    compile: bool = False          # torch.compile the model (GPU)
    seed: int = 0                  # seed of model init, data order and augmentation


# The paper's schedule per dataset (§4): epochs and the epoch from which lr is multiplied by 0.1.
# NOT IN PAPER: the synthetic recipe is ours, sized so that the default run fits in 10 CPU minutes.
# NOT IN PAPER: every recipe runs its first 300 steps with the quantizer in warm-up (VQ(x) = x,
# eq. 9 off), then sets the codebook to the k-means centres of the last warm-up tokens
# (SQD.end_quantizer_warmup); the paper quantizes from step 1. Why, measured:
# docs/paper-silent.md#the-recipes-quantizer-warm-up.
RECIPES = {
    "s4": dict(epochs=13, lr_drop_epoch=11, preset="paper", lr=1e-4, quant_warmup_steps=300),
    "ms3": dict(epochs=13, lr_drop_epoch=11, preset="paper", lr=1e-4, quant_warmup_steps=300),
    "avss": dict(epochs=16, lr_drop_epoch=14, preset="paper", lr=1e-4, quant_warmup_steps=300),
    # The synthetic recipe: 1 epoch = 4000 train clips / batch 4 = 1000 steps.
    # NOT IN PAPER: masks and boxes weigh less than in App. D (focal and L1 5x, dice and GIoU 4x;
    # class 2 kept), and lr 4e-4 instead of 1e-4: docs/paper-silent.md#the-synthetic-recipe.
    "synthetic": dict(epochs=1, lr_drop_epoch=2, preset="cpu", lr=4e-4, quant_warmup_steps=300,
                      loss_weights=dict(loss_class=2.0, loss_mask=1.0, loss_dice=0.5, loss_bbox=1.0,
                                        loss_giou=0.5)),
}
# The paper's optimizer (§4), the same in every recipe: AdamW with weight decay 5e-4, the
# backbone at half the learning rate.
BACKBONE_LR_MULT = 0.5
WEIGHT_DECAY = 5e-4
CLIP_GRAD = 0.1       # max gradient norm; NOT IN PAPER: the paper names no clipping, 0.1 is DETR's
EVAL_BATCH_SIZE = metrics.OFFICIAL_OBJECT_TEST_BATCH  # clips per evaluation batch (4, AVSBench's test batch)
LOG_EVERY = 10        # steps between log.jsonl lines
NUM_OVERLAYS = 4      # prediction pictures (AVSBench) or synthetic clips drawn into the run directory
PRESET_IMG_SIZE = {"cpu": 64, "paper": 224}


def parse_args(argv=None) -> TrainConfig:
    """argparse over TrainConfig: one flag per field, its comment as help text."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = {}  # the comment after each TrainConfig field is its --help text
    for line in inspect.getsource(TrainConfig).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and not name.startswith(("#", '"')):
            comments[name] = rest.split("#", 1)[1].strip()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, "")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        choices = {"dataset": ["synthetic", "s4", "ms3", "avss"], "preset": ["cpu", "paper"],
                   "backbone": list(BACKBONES)}.get(f.name)
        p.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_text)
    args = p.parse_args(argv)
    return TrainConfig(**vars(args))


def loss_weights(cfg: TrainConfig) -> dict:
    """The lambdas of L_segm in eq. (8), which are also eq. (10)'s matching costs (App. D gives one
    set): the recipe's, or App. D's (matcher.PAPER_LOSS_WEIGHTS) where the recipe sets none."""
    return dict(RECIPES[cfg.dataset].get("loss_weights", PAPER_LOSS_WEIGHTS))


def resolve(cfg: TrainConfig, num_classes: int) -> tuple[TrainConfig, ModelConfig]:
    """Fill the None fields from the dataset's recipe and build the ModelConfig."""
    recipe = RECIPES[cfg.dataset]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in recipe.items()
                                      if k != "loss_weights" and getattr(cfg, k) is None})
    if cfg.img_size is None:
        cfg.img_size = PRESET_IMG_SIZE[cfg.preset]
    overrides = dict(num_classes=num_classes,
                     use_gsd=not cfg.no_gsd, use_avsr=not (cfg.no_avsr or cfg.no_gsd),
                     use_lsd=not cfg.no_lsd, shared_codebook=not cfg.no_shared_codebook)
    if cfg.no_gsd and not cfg.no_avsr:
        warnings.warn("--no-gsd also removes AVSR (eq. 5 is driven by the global tokens)")
    # PAPER: the paper does not say whether VGGish trains. AVSBench (FREEZE_AUDIO_EXTRACTOR) and
    # AVSegFormer (freeze_audio_extractor=True) keep the pretrained audio network frozen; so do we.
    # A network without pretrained weights trains.
    overrides["freeze_audio"] = bool(cfg.audio_weights) or uses_stand_ins(cfg)
    overrides.update({k: getattr(cfg, k) for k in ("backbone", "codebook_size", "num_tokens")
                      if getattr(cfg, k) is not None})
    try:
        model_cfg = preset(cfg.preset, **overrides)
        model_cfg.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.quant_warmup_steps < 0:
        raise UserError(f"--quant-warmup-steps must be >= 0, got {cfg.quant_warmup_steps}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be positive")
    if cfg.dataset != "synthetic" and cfg.train_multi_ratio is not None:
        raise UserError("--train-multi-ratio only applies to --dataset synthetic")
    if cfg.dataset != "synthetic" and not cfg.data_root:
        raise UserError(f"--dataset {cfg.dataset} needs --data-root DIR (the AVSBench folder)")
    return cfg, model_cfg


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
# ----------------------------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, torch.device]:
    """The process's rank, the number of processes and its device: a GPU if there is one (choose
    which with CUDA_VISIBLE_DEVICES; an empty value runs on the CPU), one GPU per torchrun process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        return run(cfg)
    except (UserError, data.DataError, CheckpointError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # run() saves last.pt before re-raising
        print("interrupted", file=sys.stderr)
        return 130


def run(cfg: TrainConfig) -> int:
    rank, world, device = setup_distributed()
    main_proc = rank == 0
    # A resumed or evaluated run takes its run's settings from the checkpoint; from the flags, where
    # the data and the run directory are, a resume's length, an evaluation's clips and bf16.
    ckpt = None
    if cfg.resume and cfg.eval_only:
        raise UserError("--resume continues a run, --eval-only evaluates a checkpoint: give one")
    if cfg.resume or cfg.eval_only:
        path = cfg.resume or cfg.eval_only
        ckpt = load_checkpoint(path)
        if cfg.resume and ckpt["config"]["train"].get("train_clips") is not None:  # an option since removed
            raise UserError(f"{path}: its run trained on a cut train split (--train-clips, removed)")
        keep = {k: getattr(cfg, k) for k in ("resume", "eval_only", "workers", "max_steps")}
        keep["out"] = cfg.out or (os.path.dirname(os.path.abspath(path)) if cfg.resume else None)
        keep.update({k: getattr(cfg, k) for k in ("epochs", "data_root") if getattr(cfg, k) is not None})
        if cfg.eval_only:  # given, these two change the run's evaluation; left at the default, not
            keep.update({k: getattr(cfg, k) for k in ("eval_clips", "amp") if getattr(cfg, k) != getattr(TrainConfig, k)})
        cfg = dataclasses.replace(TrainConfig(**saved_train_config(ckpt)), **keep)
    if cfg.dataset != "synthetic":
        data.require_dataset(cfg.data_root, cfg.dataset)  # every missing file, named now

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # data
    train_set = None if cfg.eval_only else make_dataset(cfg, "train", train=True)
    eval_sets = evaluation_splits(cfg)
    num_classes = (train_set or next(iter(eval_sets.values()))).num_classes
    cfg, model_cfg = resolve(cfg, num_classes)
    if ckpt is not None:  # a resumed or evaluated run goes on with the model it saved
        model_cfg = ModelConfig(**ckpt["config"]["model"])

    # model, weights, loss
    model = SQD(model_cfg).to(device)
    if ckpt is None:  # a resumed or evaluated run takes every weight from its checkpoint
        load_start_weights(model, cfg, main_proc)
    criterion = SetCriterion(model_cfg.num_classes, weights=loss_weights(cfg))  # eq. (8), eq. (10)
    cfg.out = out_dir = cfg.out or os.path.join("runs", f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
    if cfg.eval_only:
        results = evaluate_checkpoint(cfg, model, cfg.eval_only, eval_sets, device, rank, world)
        if main_proc:
            pictures.write_test_pictures(cfg.dataset, model, eval_sets, device, out_dir, NUM_OVERLAYS, cfg.amp)
            write_json(os.path.join(out_dir, "metrics.json"), results)
            print(metrics.summary(results))
        return 0

    opt = torch.optim.AdamW(model.parameter_groups(cfg.lr, BACKBONE_LR_MULT, WEIGHT_DECAY))
    sampler = ResumableSampler(len(train_set), shuffle=True, seed=cfg.seed, rank=rank, world=world)
    # The loader draws its workers' base seed from `generator` when an epoch starts; a generator of
    # its own keeps that draw out of the global RNG, whose state a resumed run restores exactly.
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=data.collate, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda",  # so that to_device's copies do not block
                        generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = len(sampler.indices()) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the train split has {len(train_set)} clips, fewer than one batch of "
                        f"{cfg.batch_size} per process")
    drop_step = (cfg.lr_drop_epoch - 1) * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 if s >= drop_step else 1.0)

    state = dict(epoch=0, step=0, step_in_epoch=0, best=None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state.update(ckpt["state"])
        set_rng_state(ckpt["rng"])
        if os.path.dirname(os.path.abspath(cfg.resume)) != os.path.abspath(out_dir):
            state["best"] = None  # its best.pt stays in the checkpoint's folder: this one picks anew
    # NOT IN PAPER: the quantizer's warm-up (VQ(x) = x) for the first quant_warmup_steps steps,
    # ended by end_quantizer_warmup in the step that reaches it (train_one_epoch)
    model.set_quantizer_warmup(state["step"] < cfg.quant_warmup_steps)

    train_model = model
    if cfg.compile:
        train_model = torch.compile(model)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False)

    benchmark = synthetic.SYNTHETIC_VERSION if cfg.dataset == "synthetic" else None  # a record, not a flag
    full_config = {"train": {**dataclasses.asdict(cfg), "benchmark": benchmark},
                   "model": dataclasses.asdict(model_cfg), "loss_weights": loss_weights(cfg),
                   "code_version": code_version(), "world_size": world,
                   "class_names": list(train_set.class_names),  # predict.py names its classes
                   "metric_definitions": metrics.METRIC_DEFINITIONS}
    if main_proc:
        write_json(os.path.join(out_dir, "config.json"), full_config)
        print(f"run directory: {out_dir}\nmodel: {sum(p.numel() for p in model.parameters()):,} "
              f"parameters ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
              f"trained), preset {cfg.preset}, {cfg.dataset} {len(train_set)} train clips, "
              f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {device} x {world}")
    ctx = dict(cfg=cfg, model=model, train_model=train_model, criterion=criterion, opt=opt,
               sched=sched, loader=loader, sampler=sampler, device=device, rank=rank,
               world=world, main_proc=main_proc, out_dir=out_dir, full_config=full_config,
               state=state, steps_per_epoch=steps_per_epoch,  # the watch's state is the run's: resumed
               collapse_watch=metrics.CollapseWatch(model_cfg.num_tokens, state=state.setdefault("collapse", {})))
    log_path = os.path.join(out_dir, "log.jsonl")
    if main_proc:
        start_log(log_path, None if ckpt is None else state["step"])
        if importlib.util.find_spec("matplotlib") is None:  # pictures.draw_curves draws nothing
            print("curves.png skipped: matplotlib is not installed (optional: pip install matplotlib)")
    try:
        while state["epoch"] < cfg.epochs:
            if not train_one_epoch(ctx, log_path):
                break  # --max-steps reached
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            if "val" in eval_sets:
                val = evaluate(cfg, model, eval_sets["val"], device, rank, world)
                # best.pt's state holds the val of its own weights (metrics.json's "val" entry)
                state["val"], state["val_step"] = val, state["step"]
                score = metrics.headline(val)
                if main_proc:
                    append_jsonl(log_path, {"eval": "val", "epoch": state["epoch"],
                                            "step": state["step"], **val})
                    if state["best"] is None or score > state["best"]:
                        state["best"] = score
                        save(ctx, "best.pt")
                    pictures.draw_curves(log_path, os.path.join(out_dir, "curves.png"), model_cfg.codebook_size)
            if main_proc:
                save(ctx, "last.pt")
    except KeyboardInterrupt:
        if main_proc:
            save(ctx, "last.pt")
            print(f"\ninterrupted at step {state['step']}; saved {out_dir}/last.pt "
                  f"(continue with --resume {out_dir}/last.pt)", file=sys.stderr)
        raise
    if main_proc:
        save(ctx, "last.pt")
        if state["best"] is None:  # no validation in this run chose a model: best.pt is the last one
            save(ctx, "best.pt")
    # Under torchrun rank 0 writes best.pt and every rank reads that file after this barrier (a run
    # directory every rank sees): all evaluate the weights that --eval-only and predict.py load.
    if world > 1:
        dist.barrier()
    # PAPER: the paper does not say which checkpoint its tables report; a run reports best.pt's
    # weights, the best val score (the usual model selection). The last model's: --eval-only last.pt
    results = evaluate_checkpoint(cfg, model, os.path.join(out_dir, "best.pt"), eval_sets, device, rank, world)
    if main_proc:
        results["train"] = {"steps": state["step"], "epochs": state["epoch"]}
        pictures.write_test_pictures(cfg.dataset, model, eval_sets, device, out_dir, NUM_OVERLAYS, cfg.amp)
        write_json(os.path.join(out_dir, "metrics.json"), results)
        append_jsonl(log_path, {"eval": "final", "step": state["step"],  # metrics.json's content
                                **{k: v for k, v in results.items() if k != "metric_definitions"}})
        pictures.draw_curves(log_path, os.path.join(out_dir, "curves.png"), model_cfg.codebook_size)
        print(metrics.summary(results))
        if cfg.dataset == "synthetic" and model_cfg.use_gsd:  # the diagnostics need global tokens
            # the codebook diagnostics are a lab tool (tools/diagnostics.py): the run names the command
            print(f"a look inside the codebook: python tools/diagnostics.py "
                  f"{os.path.join(out_dir, 'best.pt')} --out {out_dir}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def evaluate_checkpoint(cfg: TrainConfig, model: SQD, path: str, eval_sets: dict, device, rank: int,
                        world: int) -> dict:
    """The final evaluation of a run (best.pt) and --eval-only's: the checkpoint's weights on every
    split. Returns metrics.json's content: {split: metrics}, "val" (the val of these weights, saved
    with them: for best.pt the one that chose it) and "model", which weights those are. Leaves the
    checkpoint's weights in the model."""
    ckpt = load_checkpoint(path, mmap=True)  # mapped: the weights are read, the optimizer's state is not
    model.load_state_dict(ckpt["model"])
    state = ckpt["state"]
    # the quantizer in warm-up (VQ(x) = x) if the checkpoint was saved during it (cfg is its run's)
    model.set_quantizer_warmup(state["step"] < cfg.quant_warmup_steps)
    results = {"dataset": cfg.dataset, "metric_definitions": metrics.METRIC_DEFINITIONS}
    for name, ds in eval_sets.items():  # every split but val (val alone if it is the only one)
        if name != "val" or len(eval_sets) == 1:
            results[name] = evaluate(cfg, model, ds, device, rank, world)
    val = state.get("val") if state.get("val_step") == state["step"] else None  # these weights' val
    if val is not None:
        results["val"] = val
    results["model"] = {"checkpoint": os.path.basename(path), "step": state["step"], "epoch": state["epoch"],
                        "val": None if val is None else metrics.headline(val)}
    return results


def forward_loss(model: SQD, train_model, criterion: SetCriterion, batch: dict, amp: bool):
    """The forward half of a training step (train_one_epoch and tools/bench.py): the model under
    optional bf16 autocast, the ground-truth tracks of the batch (matcher.track_batch), the
    Hungarian matching of every decoder layer and the eq. (8) loss.
    Returns (total loss tensor, dict of unweighted parts, outputs). ValueError: non-finite cost."""
    with torch.autocast(batch["frames"].device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = train_model(batch)
    outputs = to_float(outputs)
    targets = track_batch(batch["labels"], batch["label_valid"], model.cfg.num_classes,
                          outputs["pred_masks"].shape[-2:])
    total, parts = criterion(outputs, targets)  # eq. (10) matching, eq. (8) loss
    return total, parts, outputs


def apply_gradients(model: SQD, opt, total: torch.Tensor, clip_grad: float):
    """The backward half: gradients of `total`, clipped to norm clip_grad, one AdamW step.
    Returns (the gradient norm before clipping, the part of it that reaches the global decoder
    TrD_global of eq. 4, or None without GSD): how much the loss still shapes the g_i."""
    opt.zero_grad(set_to_none=True)
    total.backward()
    grad_global = None
    if model.global_asd is not None:
        grads = [p.grad for p in model.global_asd.parameters() if p.grad is not None]
        grad_global = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                       if grads else total.new_zeros(()))  # () before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    opt.step()
    return grad_norm, grad_global


def train_one_epoch(ctx: dict, log_path: str) -> bool:
    """One epoch (or its remainder after a resume). Returns False when --max-steps stopped it."""
    cfg, state = ctx["cfg"], ctx["state"]
    model, train_model, criterion = ctx["model"], ctx["train_model"], ctx["criterion"]
    opt, sched, device = ctx["opt"], ctx["sched"], ctx["device"]
    ctx["sampler"].set_epoch(state["epoch"], state["step_in_epoch"] * cfg.batch_size)
    model.train()
    bar = tqdm(ctx["loader"], disable=not ctx["main_proc"], leave=False,
               desc=f"epoch {state['epoch'] + 1}/{cfg.epochs}",
               initial=state["step_in_epoch"], total=ctx["steps_per_epoch"])
    t0, clips = time.time(), 0
    if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
        return False
    done = None  # the last finished step of this epoch
    for batch in bar:
        batch = to_device(batch, device)
        warmup = state["step"] < cfg.quant_warmup_steps  # the quantizer's pass-through, VQ(x) = x
        if state["step"] == cfg.quant_warmup_steps and model.quantizers():
            # the codebook(s) the quantized steps start from (k-means after a warm-up, else the
            # init), in every later checkpoint: tools/diagnostics.py measures how far words move
            state["codebook_start"] = [vq.codebook.detach().cpu().clone() for vq in model.quantizers()]
        try:
            total, parts, outputs = forward_loss(model, train_model, criterion, batch, cfg.amp)
        except ValueError as e:  # the matcher refuses a non-finite cost and names the term
            raise UserError(f"non-finite loss at step {state['step'] + 1}: {e}\n"
                            f"last good checkpoint: {_last_checkpoint(ctx)}") from None
        lr = opt.param_groups[0]["lr"]  # this step's (sched.step() sets the next one's)
        with deferred_interrupt():  # Ctrl-C never splits an update from its step count
            grad_norm, grad_global = apply_gradients(model, opt, total, CLIP_GRAD)
            sched.step()
            state["step"] += 1
            state["step_in_epoch"] += 1
            if state["step"] == cfg.quant_warmup_steps:
                # the warm-up ends with this step: the codebook becomes the k-means centres of its
                # tokens inside this block, so that every later checkpoint and evaluation holds them
                model.end_quantizer_warmup()
        clips += cfg.batch_size * ctx["world"]
        done = {"step": state["step"], "epoch": state["epoch"], "warmup": warmup,
                "lr": lr, "rate": clips / max(time.time() - t0, 1e-9),
                "loss": total.detach(), "parts": {k: v.detach() for k, v in parts.items()},
                "grad_norm": grad_norm, "grad_norm_global": grad_global,
                "indices": outputs["indices"]}  # {'global': (B, N), 'local': (B, T, N)} codewords
        finish_step(ctx, done, log_path, bar)
        # checked after the step, before the next batch is drawn, so that a run stopped here
        # and resumed draws exactly the batches (and random numbers) the unbroken run draws
        if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
            break
    if done is not None:
        # a loss is read only every LOG_EVERY steps; a non-finite one leaves non-finite weights
        # behind, whose predictions the next step's matcher refuses (forward_loss). The last
        # step has no next one: it is checked here, before anything is saved or evaluated.
        check_loss(ctx, done)
    return cfg.max_steps is None or state["step"] < cfg.max_steps


def check_loss(ctx: dict, done: dict) -> float:
    """A finished step's loss read on the host (.item()); UserError naming its non-finite terms."""
    loss = done["loss"].item()
    if not math.isfinite(loss):
        bad = [k for k, v in done["parts"].items() if not math.isfinite(v.item())]
        raise UserError(f"non-finite loss at step {done['step']} (terms: {bad}); "
                        f"last good checkpoint: {_last_checkpoint(ctx)}")
    return loss


def finish_step(ctx: dict, done: dict, log_path: str, bar) -> None:
    """On the first step and every LOG_EVERY steps: the loss checked (check_loss), the codebook
    collapse watch and the log line. `done` holds the step's tensors on the device (loss, parts,
    gradient norms, codeword indices): as in nanoGPT, they are read (.item()) only on these steps."""
    step = done["step"]
    if not (step % LOG_EVERY == 0 or step == 1):
        return
    loss = check_loss(ctx, done)
    bar.set_postfix(loss=f"{loss:.3f}", clips_s=f"{done['rate']:.1f}")
    if not ctx["main_proc"]:
        return
    line = {"step": step, "epoch": done["epoch"], "loss": loss,
            **{k: v.item() for k, v in done["parts"].items()},
            "lr": done["lr"], "grad_norm": done["grad_norm"].item(),
            "clips_per_s": done["rate"], "quant_warmup": done["warmup"]}
    if done["grad_norm_global"] is not None:
        line["grad_norm_global"] = done["grad_norm_global"].item()
    stats, messages = ctx["collapse_watch"].observe(step, done["indices"], ctx["model"].cfg.codebook_size,
                                                    quantized=not done["warmup"])
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)
        append_jsonl(log_path, {"step": step, "warning": message})
    append_jsonl(log_path, {**line, **stats})


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def make_dataset(cfg: TrainConfig, split: str, train: bool):
    img = cfg.img_size or PRESET_IMG_SIZE[cfg.preset or RECIPES[cfg.dataset]["preset"]]
    extra = {}
    if cfg.dataset == "synthetic":
        if not train and cfg.eval_clips is not None:
            extra["num_clips"] = cfg.eval_clips
        if train and cfg.train_multi_ratio is not None:
            if not 0.0 <= cfg.train_multi_ratio <= 1.0:
                raise UserError(f"--train-multi-ratio must be in [0, 1], got {cfg.train_multi_ratio}")
            extra["multi_source_ratio"] = cfg.train_multi_ratio
    dataset = data.build_dataset(cfg.dataset, split, cfg.data_root, img_size=img,
                                 train=train, seed=cfg.seed, **extra)
    return data.ZeroAudio(dataset) if cfg.zero_audio else dataset  # control: vision alone


def evaluation_splits(cfg: TrainConfig) -> dict:
    """The splits evaluated at the end of a run (and 'val' during it)."""
    names = ["val", "test"]
    if cfg.dataset == "synthetic":  # test-seen-multi: test-unseen's matched twin
        names += ["test-seen-multi", "test-unseen", "val-unseen"]
    return {name: make_dataset(cfg, name, train=False) for name in names}


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: SQD, dataset, device, rank: int, world: int) -> dict:
    """Run the model on every clip of a split and return the metrics (reduced over ranks).

    Semantic tasks (avss, synthetic): eq. (11) label maps -> SemanticMetrics. Binary tasks
    (s4, ms3), and the synthetic single/multi-source columns: foreground probability ->
    ObjectMetrics. One evaluation batch is one official test batch (4 clips).
    """
    model.eval()
    sampler = ResumableSampler(len(dataset), shuffle=False, seed=0, rank=rank, world=world)
    loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, sampler=sampler,
                        collate_fn=data.collate, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda")
    sem = None if dataset.num_classes == 1 else metrics.SemanticMetrics(num_classes=dataset.num_classes)
    obj = ({"single": metrics.ObjectMetrics(), "multi": metrics.ObjectMetrics()}
           if cfg.dataset == "synthetic" else {"all": metrics.ObjectMetrics()})
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            out = model(batch)
        logits, masks = out["pred_logits"].float(), out["pred_masks"].float()
        size = tuple(batch["labels"].shape[-2:])
        gt = batch["labels"]                                           # (B, T, H, W)
        valid = batch["label_valid"] & batch["frame_valid"]            # (B, T)
        if sem is not None:
            pred = segment(logits, masks, size)                        # (B, T, H, W) eq. (11)
            sem.update(pred, gt, batch["frame_valid"], batch["label_valid"])
        fg = foreground_probability(logits, masks, size)               # (B, T, H, W)
        if "all" in obj:
            obj["all"].update(fg, (gt > 0).long(), valid)
        else:
            multi = torch.tensor([bool(m.get("multi_source")) for m in batch["meta"]],
                                 device=gt.device)                     # (B,)
            for name, sel in (("single", ~multi), ("multi", multi)):
                if sel.any():
                    obj[name].update(fg[sel], (gt[sel] > 0).long(), valid[sel])
    results = {}
    if sem is not None:
        sem.all_reduce()
        results.update(sem.compute())
    for name, m in obj.items():  # the synthetic columns as single_* and multi_*
        m.all_reduce()
        results.update({("" if name == "all" else f"{name}_") + k: v for k, v in m.compute().items()})
    model.train()
    return results


# ----------------------------------------------------------------------------------------------
# The run's checkpoints (checkpoint.py writes and reads them), small helpers
# ----------------------------------------------------------------------------------------------

def saved_train_config(ckpt: dict) -> dict:
    """The TrainConfig fields of a checkpoint's run; left out: the synthetic benchmark's version
    ('benchmark', a record) and settings since removed (the recipe's constants now). A resumed or
    evaluated run takes its model config from the checkpoint, so these change nothing of its model."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in ckpt["config"]["train"].items() if k in known}


def save(ctx: dict, name: str) -> None:
    """best.pt or last.pt in the run directory: checkpoint.save_checkpoint of the run's state."""
    save_checkpoint(os.path.join(ctx["out_dir"], name), ctx["model"], ctx["opt"], ctx["sched"],
                    ctx["state"], ctx["full_config"])


def _last_checkpoint(ctx: dict) -> str:
    path = os.path.join(ctx["out_dir"], "last.pt")
    return path if os.path.exists(path) else "none written yet"


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def to_float(x):
    """bf16 autocast outputs (dicts and lists of tensors) back to float32 before the loss."""
    if isinstance(x, dict):
        return {k: to_float(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_float(v) for v in x]
    return x.float() if torch.is_tensor(x) and x.is_floating_point() else x


if __name__ == "__main__":
    sys.exit(main())
