"""The weights a run starts from: ReferFormer's whole model (--init-weights), then every other file.

What this file teaches
    How to start a network from another paper's trained model when the two are only partly the
    same: an explicit map from their state_dict names to ours, a shape check on every tensor, and
    one table that says, module by module, what was loaded and what was left fresh, and why.

    SQD's authors train AVSS from ReferFormer's whole model pretrained for referring segmentation
    on RefCOCO/+/g (r50_pretrained.pth; ReferFormer, Wu et al., CVPR 2022, built on
    Deformable-DETR). What the two networks share:
      * the visual backbone (ResNet, Swin-T, Video Swin-T)         loaded
      * the 1x1 input projections of c3, c4, c5 and the level embedding   loaded (3 of ReferFormer's 4 levels)
      * the deformable encoder's attention within a frame, its norms and FFN   loaded where the widths agree
      * the FPN's stride-4 lateral and its three 3x3 merges        loaded (see REFERFORMER_MAP)
    and what they do not: audio (ReferFormer reads text), SQD's fusion, decoders, codebook and
    recombination, the encoder's attention over time, the DETR-style mask decoder (ReferFormer's
    is deformable) and the heads, whose layer counts differ (FRESH says why, module by module).

    The file is read with torch.load(weights_only=True), which rebuilds tensors and plain values
    only; ReferFormer's checkpoints also hold its argparse.Namespace, the one class admitted.
    A file that needs any other Python object to be rebuilt is refused before anything runs.

    Then the order in which a new train.py run fills the model (load_start_weights): the whole-model
    file, a torchvision backbone (--backbone-weights), the audio network (--audio-weights: VGGish,
    or the CPU preset's SmallVGG), and on the synthetic benchmark the pretrained stand-ins of
    pretrain.py where no file fills their place. A resumed or evaluated run loads none of them: its
    checkpoint holds every weight.

Reading order
    1. REFERFORMER_MAP, backbone_map   their names -> ours, one line per kind of tensor
    2. FRESH                           our modules with no counterpart, and why
    3. read_state_dict                 the file, read without running code
    4. load_init_weights               copy what maps and fits; one row per module and outcome
    5. format_table                    the table train.py prints
    6. uses_stand_ins, load_start_weights   every file a train.py run starts from, in order

Shape alphabet (the repository's one alphabet: docs/shapes.md)
    C model channels, Hd heads, Pt sampling points per head and level, Lf levels of the file's
    deformable attention (ReferFormer: 4, strides 8 to 64; ours: 3, strides 8 to 32).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import namedtuple

import torch
import torch.nn as nn

import pretrain
from checkpoint import load_error
from encoders import ResNet, SwinTransformer, VideoSwinTransformer


class WeightsError(ValueError):
    """A file that cannot start the model: missing, unreadable, unsafe, or of another kind."""


# ----------------------------------------------------------------------------------------------
# 1. The map: (our name, ReferFormer's name, conversion, note)
# ----------------------------------------------------------------------------------------------
# A name may hold {k} or {l} (a number, the same on both sides) and ends in * when the rest of the
# name (weight, bias, ...) is the same on both sides. ReferFormer's names are those of its
# models/referformer.py (ReferFormer, DeformableTransformer, CrossModalFPNDecoder) as its
# main.py and main_pretrain.py save them: checkpoint['model'] = model_without_ddp.state_dict().
# PAPER: how the ReferFormer weights that the authors start from meet SQD's modules is not given;
# this map (the encoder cut to 3 of ReferFormer's 4 levels, the FPN's stages matched by stride)
# is our reading of the two codes, and every module it leaves fresh is in FRESH with the reason.
LEVELS_NOTE = "levels 0-2 of the file's {levels} (its stride-64 level dropped)"
GN_NOTE = "GroupNorm with 8 groups in ReferFormer, gcd(32, C) here"

REFERFORMER_MAP = [
    # the 1x1 conv + GroupNorm(32) that bring c3, c4, c5 to C; ReferFormer's input_proj.3 (a 3x3
    # stride-2 conv to a fourth, stride-64 level) has no counterpart
    ("visual_encoder.input_proj.{l}.*", "input_proj.{l}.*", None, ""),
    ("visual_encoder.level_embed", "transformer.level_embed", "levels", LEVELS_NOTE),
    # the deformable encoder, post-norm as Deformable-DETR on both sides; {k} = 0 .. enc_layers-1
    ("visual_encoder.layers.{k}.self_attn.sampling_offsets.*",
     "transformer.encoder.layers.{k}.self_attn.sampling_offsets.*", "head_levels", LEVELS_NOTE),
    ("visual_encoder.layers.{k}.self_attn.attention_weights.*",
     "transformer.encoder.layers.{k}.self_attn.attention_weights.*", "head_levels", LEVELS_NOTE),
    ("visual_encoder.layers.{k}.self_attn.value_proj.*",
     "transformer.encoder.layers.{k}.self_attn.value_proj.*", None, ""),
    ("visual_encoder.layers.{k}.self_attn.output_proj.*",
     "transformer.encoder.layers.{k}.self_attn.output_proj.*", None, ""),
    ("visual_encoder.layers.{k}.norm1.*", "transformer.encoder.layers.{k}.norm1.*", None, ""),
    ("visual_encoder.layers.{k}.linear1.*", "transformer.encoder.layers.{k}.linear1.*", None, ""),
    ("visual_encoder.layers.{k}.linear2.*", "transformer.encoder.layers.{k}.linear2.*", None, ""),
    ("visual_encoder.layers.{k}.norm2.*", "transformer.encoder.layers.{k}.norm2.*", None, ""),
    # the FPN. ReferFormer's pixel_decoder (stages 1..4 = strides 4..32) runs, from stride 32 down:
    # y = layer_s(cross_attn_s(adapter_s(x_s)) + up(y)), then mask_features(y). Ours has no adapter
    # or text cross-attention on the encoded levels and no 3x3 at stride 32, so its stride-4
    # lateral and its three merges take the weights of the stages at the same stride.
    ("fpn.lateral4.0.*", "pixel_decoder.adapter_1.*", None, ""),        # 1x1 conv on c2, no bias
    ("fpn.lateral4.1.*", "pixel_decoder.adapter_1.norm.*", None, GN_NOTE),
    ("fpn.merge4.0.*", "pixel_decoder.layer_1.*", None, ""),            # 3x3 conv, no bias
    ("fpn.merge4.1.*", "pixel_decoder.layer_1.norm.*", None, GN_NOTE),
    ("fpn.merge8.0.*", "pixel_decoder.layer_2.*", None, ""),
    ("fpn.merge8.1.*", "pixel_decoder.layer_2.norm.*", None, GN_NOTE),
    ("fpn.merge16.0.*", "pixel_decoder.layer_3.*", None, ""),
    ("fpn.merge16.1.*", "pixel_decoder.layer_3.norm.*", None, GN_NOTE),
    # ReferFormer's mask features have 256 channels (its --mask_dim), ours Cm = 8: the shapes
    # disagree and the table says so
    ("fpn.mask_out.*", "pixel_decoder.mask_features.*", None, ""),
]


def backbone_map(backbone: nn.Module) -> tuple[list, dict]:
    """(rules, fresh) for the model's backbone: REFERFORMER_MAP-style rules and our backbone's
    modules that have no counterpart. ReferFormer keeps its backbone at backbone.0.body."""
    ours, body = "visual_encoder.backbone.", "backbone.0.body."
    if isinstance(backbone, ResNet):
        # torchvision's ResNet inside IntermediateLayerGetter: the same names, fc dropped
        return ([(ours + "*", body + "*", None, "")],
                {ours + "fc": "the ImageNet classifier, unused (ReferFormer's backbone drops it)"})
    if isinstance(backbone, (SwinTransformer, VideoSwinTransformer)):
        video = isinstance(backbone, VideoSwinTransformer)
        block = [("norm1.*", "norm1.*"), ("attn.qkv.*", "attn.qkv.*"), ("attn.proj.*", "attn.proj.*"),
                 ("attn.relative_position_bias_table", "attn.relative_position_bias_table"),
                 ("norm2.*", "norm2.*"), ("mlp.0.*", "mlp.fc1.*"), ("mlp.3.*", "mlp.fc2.*")]
        # ours: torchvision's layout; ReferFormer's: Swin's own (layers.i.blocks.j). In
        # torchvision's `features` the image model's stages sit at 1, 3, 5, 7 after the patch
        # embedding at 0, the video model's at 0, 2, 4, 6; a patch merging follows each stage.
        if video:
            rules = [(ours + "patch_embed.proj.*", body + "patch_embed.proj.*", None, ""),
                     (ours + "patch_embed.norm.*", body + "patch_embed.norm.*", None, "")]
        else:
            rules = [(ours + "features.0.0.*", body + "patch_embed.proj.*", None, ""),
                     (ours + "features.0.2.*", body + "patch_embed.norm.*", None, ""),
                     (ours + "norm.*", body + "norm3.*", None,
                      "ReferFormer's norm3 of stage 4; its norm0-2 of stages 1-3 have no counterpart")]
        first = 0 if video else 1
        for i in range(len(backbone.channels)):
            stage = first + 2 * i
            rules += [(f"{ours}features.{stage}.{{j}}.{a}", f"{body}layers.{i}.blocks.{{j}}.{b}", None, "")
                      for a, b in block]
            if i < len(backbone.channels) - 1:  # ReferFormer's Video Swin moved its mergings to downsamples
                merge = f"downsamples.{i}" if video else f"layers.{i}.downsample"
                rules += [(f"{ours}features.{stage + 1}.{a}", f"{body}{merge}.{a}", None, "")
                          for a in ("reduction.*", "norm.*")]
        fresh = {ours + "head": "the classifier of torchvision's file, unused"}
        if video:
            fresh[ours + "norm"] = "ReferFormer's Video Swin has no norm on its outputs"
        return rules, fresh
    return [], {ours.rstrip("."): f"{type(backbone).__name__} (the CPU preset's small CNN): ReferFormer's "
                                  "backbones are ResNet-50/101, Swin and Video Swin"}


# ----------------------------------------------------------------------------------------------
# 2. Our modules with no counterpart in ReferFormer, and why
# ----------------------------------------------------------------------------------------------
FRESH = {
    "audio_encoder": "ReferFormer reads text (RoBERTa), not sound",
    "fusion": "eq. (3) fuses audio and video; ReferFormer's fusion_module attends from vision to text",
    "global_asd": "eq. (4), SQD's own",
    "local_asd": "eq. (6), SQD's own",
    "vq": "the shared codebook (eq. 1, 2, 9), SQD's own",
    "local_vq": "a codebook of the local tokens (Table 2), SQD's own",
    "avsr": "eq. (5), SQD's own",
    "baseline_queries": "the Table 2 baseline's queries, SQD's own",
    "visual_encoder.layers.{k}.temporal": "ReferFormer's encoder attends within each frame only; "
                                          "the attention over time is this code's reading of App. D.1",
    "mask_decoder.decoder": "TrD_segm is DETR-style (dense cross-attention on the frame's tokens); "
                            "ReferFormer's decoder is deformable (4 levels, box refinement)",
    "mask_decoder.slot_pos": "ReferFormer's query_embed has this role, in the deformable decoder that "
                             "does not load",
    "mask_decoder.controller": "phi_segm is the paper's two-layer MLP writing Pd = 169 (Cm = 8); "
                               "ReferFormer's controller has three layers and writes 2153 (256 mask channels)",
    "mask_decoder.class_head": "a two-layer MLP to Kc classes; ReferFormer's class_embed is one Linear "
                               "per decoder layer to 1 class (referred or not)",
    "mask_decoder.box_head": "the paper's two-layer MLP; ReferFormer's bbox_embed has three layers "
                             "per decoder layer",
}
NOT_WEIGHTS = ("num_batches_tracked", "relative_position_index")  # a counter, an index fixed by the window


def _regex(pattern: str, prefix: bool = False) -> re.Pattern:
    """A REFERFORMER_MAP name as a regex: {name} -> a number, * -> the rest of the name.
    prefix=True also matches any name below it (a module's tensors)."""
    parts = []
    for part in re.split(r"(\{\w+\}|\*)", pattern):
        if part == "*":
            parts.append(r"(?P<rest>.+)")
        elif part.startswith("{"):
            parts.append(rf"(?P<{part[1:-1]}>\d+)")
        else:
            parts.append(re.escape(part))
    return re.compile("".join(parts) + (r"(\..+)?$" if prefix else "$"))


def _their_name(rules: list, name: str):
    """The first rule that maps our `name`: (ReferFormer's name, conversion, note), or None."""
    for ours, theirs, convert, note in rules:
        m = _regex(ours).match(name)
        if m:
            return theirs.replace("*", "{rest}").format(**m.groupdict()), convert, note
    return None


def _fresh_reason(fresh: dict, name: str) -> str:
    """Why our tensor `name` has no counterpart (FRESH), or "" if FRESH does not list it."""
    for pattern, reason in fresh.items():
        if _regex(pattern, prefix=True).match(name):
            return reason
    return ""


def _first_levels(t: torch.Tensor, target: torch.Size, convert: str, model: nn.Module,
                  file_levels: int | None):
    """A ReferFormer tensor laid out per level, cut to our 3 levels, and the file's level count Lf;
    (None, None) if it cannot be cut.

    convert "levels": rows are levels, level_embed (Lf, C) -> (3, C).
    convert "head_levels": sampling_offsets (Hd*Lf*Pt*2, C) and attention_weights (Hd*Lf*Pt, C),
    and their biases, are laid out (head, level, point[, xy]) on both sides (MSDeformAttn.forward's
    view), so levels 0-2 of every head are kept. The softmax over a head's levels and points then
    runs over 3*Pt logits instead of Lf*Pt: the weights that remain keep their ratios. Lf is
    read off the tensor and must agree with the file's level_embed.
    """
    ours = model.visual_encoder.num_scales
    if t.shape[1:] != target[1:]:
        return None, None
    if convert == "levels":
        if file_levels is None or t.shape[0] != file_levels or file_levels < ours:
            return None, None
        return t[:ours], file_levels                                      # (3, C)
    heads = model.visual_encoder.layers[0].self_attn.num_heads
    per_level = target[0] // (heads * ours)                               # Pt*2 or Pt
    levels = t.shape[0] // (heads * per_level)                            # Lf, read off the tensor
    if (t.shape[0] != heads * levels * per_level or levels < ours
            or (file_levels is not None and levels != file_levels)):
        return None, None
    t = t.reshape(heads, levels, per_level, *t.shape[1:])                 # (Hd, Lf, Pt*2 or Pt[, C])
    return t[:, :ours].reshape(target), levels                            # (Hd*3*Pt*2 or Hd*3*Pt[, C])


# ----------------------------------------------------------------------------------------------
# 3. Reading the file without running code
# ----------------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict:
    """The state_dict of a ReferFormer checkpoint (its 'model') or of a bare state_dict file.

    torch.load(weights_only=True) rebuilds tensors and plain values only; ReferFormer's
    checkpoints also pickle their argparse.Namespace under 'args', which is admitted (a plain
    record of attributes, it runs nothing). Anything else a file names is refused.
    The tensors are mapped from the file, not read, so the optimizer's state costs no memory.
    """
    if not os.path.isfile(path):
        raise WeightsError(f"{path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # a file in the pre-1.6 format cannot be mapped: read it
                if "_use_new_zipfile_serialization" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or unsafe file: one line, not a traceback
        unsafe, reason = load_error(e)
        if unsafe:
            raise WeightsError(f"{path}: refused; loading it would call {unsafe}, and a "
                               f"file that needs a Python object rebuilt can run code. A ReferFormer "
                               f"checkpoint holds tensors, plain values and an argparse.Namespace") from None
        raise WeightsError(f"{path}: not a readable weights file ({type(e).__name__}: {reason})") from None
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: no state_dict in it; expected a ReferFormer checkpoint (a dict "
                               f"with 'model', 'optimizer', 'lr_scheduler', 'epoch', 'args') or a bare state_dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------
# 4. Loading
# ----------------------------------------------------------------------------------------------
Row = namedtuple("Row", "module status tensors detail")  # status: loaded | fresh | unused (file side)


def module_group(name: str) -> str:
    """The table's row for one of our tensors: a module, split where the map treats parts apart."""
    m = re.match(r"(visual_encoder\.layers\.\d+)\.(\w+)", name)
    if m:  # one encoder layer: attention within the frame, attention over time, FFN
        part = {"self_attn": "spatial", "norm1": "spatial", "temporal": "temporal"}.get(m.group(2), "ffn")
        return f"{m.group(1)}.{part}"
    m = re.match(r"visual_encoder\.backbone\.(fc|head)\.", name)
    if m:
        return f"visual_encoder.backbone.{m.group(1)}"
    depth = 2 if name.startswith(("visual_encoder.", "fpn.", "mask_decoder.")) else 1
    return ".".join(name.split(".")[:depth])


def _file_group(name: str) -> str:
    """A summary name for a ReferFormer tensor no rule took (text_encoder, transformer.decoder, ...)."""
    parts = name.split(".")
    depth = {"transformer": 2, "pixel_decoder": 2, "backbone": 4}.get(parts[0], 1)
    return ".".join(parts[:depth])


def _short(name: str, group: str) -> str:
    """`name` without what its table row already says (the row's module, or its parent)."""
    for prefix in (group, group.rsplit(".", 1)[0]):
        if name.startswith(prefix + "."):
            return name[len(prefix) + 1:]
    return name


def load_init_weights(model: nn.Module, path: str) -> list:
    """Copy into `model` (an sqd.SQD) every tensor of a ReferFormer checkpoint that maps and whose
    shape agrees; leave the rest as initialised. A layer (a Linear, a norm, ...) loads whole or
    not at all: where one of its tensors is missing from the file or of another shape, its other
    tensors stay fresh too (a bias without its weight would start nothing useful).

    Returns the table's rows (Row): one per module and outcome, modules in the order of the
    model's state_dict, then one row of the file's tensors that nothing here reads.
    Raises WeightsError when the file is unreadable or unsafe, or when nothing in it loads.
    """
    state = read_state_dict(path)
    outcomes, loadable, used = _plan(model, state)
    if not loadable:
        if not used:
            keys = sorted({_file_group(k) for k in state})[:6]
            hint = (" (a backbone's own file? those go to --backbone-weights)"
                    if {"conv1.weight", "features.0.0.weight", "patch_embed.proj.weight"} & set(state) else "")
            raise WeightsError(f"{path}: none of its tensors has a ReferFormer name that this model "
                                   f"maps (it holds {', '.join(keys)}, ...){hint}; expected a ReferFormer "
                                   f"checkpoint (backbone.0.body.*, input_proj.*, transformer.encoder.*, "
                                   f"pixel_decoder.*)")
        first = next(o[3] for o in outcomes if o[2] == "shape mismatch")
        raise WeightsError(f"{path}: ReferFormer's names, but no tensor's shape fits this model "
                               f"(e.g. {first}); ReferFormer's models have C = 256 as --preset paper")
    _, unexpected = model.load_state_dict(loadable, strict=False)
    assert not unexpected, unexpected  # every key of `loadable` is one of the model's

    merged, order = {}, {}
    for group, status, kind, detail in outcomes:  # one row per module and outcome
        order.setdefault(group, len(order))
        row = merged.setdefault((group, status, kind), [0, []])
        row[0] += 1
        if detail and detail not in row[1]:
            row[1].append(detail)
    keys = sorted(merged, key=lambda k: (order[k[0]], k[1] != "loaded"))  # a module's loaded row first
    table = [Row(g, s, merged[g, s, k][0], _detail(k, merged[g, s, k][1])) for g, s, k in keys]
    unused = [k for k in state if k not in used]
    if unused:
        counts = {}
        for k in unused:
            counts[_file_group(k)] = counts.get(_file_group(k), 0) + 1
        table.append(Row("(ReferFormer, not used)", "unused", len(unused),
                         ", ".join(f"{g} {n}" for g, n in counts.items())))
    return table


def _plan(model: nn.Module, state: dict):
    """What becomes of each of the model's tensors: (outcomes, loadable, used).

    outcomes: (row, status, kind, detail) per tensor of model.state_dict(), in its order;
    loadable: our name -> the file's tensor (converted) for load_state_dict;
    used: the file's names that a rule took (loaded or not).
    """
    rules, fresh = backbone_map(model.visual_encoder.backbone)
    rules, fresh = rules + REFERFORMER_MAP, {**fresh, **FRESH}
    level_embed = state.get("transformer.level_embed")
    file_levels = level_embed.shape[0] if level_embed is not None and level_embed.dim() == 2 else None

    plan, used = {}, set()  # our name -> [row, status, kind, detail, tensor]
    for name, target in model.state_dict().items():
        group = module_group(name)
        reason = _fresh_reason(fresh, name)
        found = None if reason else _their_name(rules, name)
        if reason or (found is None and not name.endswith(NOT_WEIGHTS)):
            reason = reason or "nothing in ReferFormer corresponds"
            plan[name] = [group, "fresh", "no counterpart in ReferFormer: " + reason, "", None]
        elif name.endswith(NOT_WEIGHTS):
            plan[name] = [group, "fresh", "not a weight: a counter, or an index fixed by the window", "", None]
        elif found[0] not in state:
            plan[name] = [group, "fresh", "missing in the file", found[0], None]
        else:
            theirs, convert, note = found
            used.add(theirs)
            t, levels = state[theirs], None
            if convert is not None:
                t, levels = _first_levels(t, target.shape, convert, model, file_levels)
            if t is None or t.shape != target.shape:
                plan[name] = [group, "fresh", "shape mismatch",
                              f"{_short(name, group)} {tuple(state[theirs].shape)} in the file, "
                              f"{tuple(target.shape)} here", None]
            else:
                plan[name] = [group, "loaded", "", note.format(levels=levels), t]
    # a layer loads whole or not at all: a failure of one tensor keeps its siblings fresh
    failed = {}
    for name, (_, status, kind, detail, _t) in plan.items():
        if kind in ("missing in the file", "shape mismatch"):
            failed.setdefault(name.rsplit(".", 1)[0], (kind, detail))
    for name, entry in plan.items():
        layer = name.rsplit(".", 1)[0]
        if entry[1] == "loaded" and layer in failed:
            entry[1:5] = ["fresh", failed[layer][0], failed[layer][1], None]
    outcomes = [tuple(entry[:4]) for entry in plan.values()]
    loadable = {name: entry[4] for name, entry in plan.items() if entry[4] is not None}
    return outcomes, loadable, used


def _detail(kind: str, details: list) -> str:
    """The table's last column: the kind of outcome, then up to three of its cases."""
    if not details:
        return kind
    if not kind:  # loaded: the notes of its rules
        return "; ".join(details)
    shown = "; ".join(details[:3]) + (f"; and {len(details) - 3} more" if len(details) > 3 else "")
    return f"{kind}: {shown}"


# ----------------------------------------------------------------------------------------------
# 5. The table
# ----------------------------------------------------------------------------------------------

def format_table(rows: list, path: str = "") -> str:
    """The rows of load_init_weights as a text table, with a first line that counts them."""
    loaded = sum(r.tensors for r in rows if r.status == "loaded")
    ours = sum(r.tensors for r in rows if r.status != "unused")
    width = max(len(r.module) for r in rows)
    lines = [f"--init-weights {path}: {loaded} of the model's {ours} tensors loaded from ReferFormer's names",
             f"  {'module'.ljust(width)}  {'status':<7} {'tensors':>7}  detail"]
    lines += [f"  {r.module.ljust(width)}  {r.status:<7} {r.tensors:>7}  {r.detail}" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 6. Where a train.py run starts from
# ----------------------------------------------------------------------------------------------

def uses_stand_ins(cfg) -> bool:
    """Whether a run (train.TrainConfig) is one that starts from the pretrained stand-ins of
    pretrain.py: a synthetic run of the CPU preset. Which of the two it loads is load_start_weights'
    choice: the audio network pretrained as a sound classifier unless --audio-weights names a file,
    the visual side pretrained as referring segmentation unless --init-weights or --backbone-weights
    starts it (or the backbone is not the preset's). Both are built on first use and cached in
    pretrain.STAND_IN_DIR. For AVSBench the same places are filled by --audio-weights (VGGish) and
    --init-weights."""
    # PAPER: the paper names no starting point; its code starts from VGGish trained on AudioSet,
    # frozen (AVSBench, AVSegFormer), and from ReferFormer's whole model pretrained for referring
    # segmentation (the authors' commands). pretrain.py makes both for the synthetic benchmark;
    # the visual one was chosen on val (results/README.md, "Why full SQD loses": +0.046 val mIoU).
    return cfg.dataset == "synthetic" and cfg.preset == "cpu"


def load_start_weights(model: nn.Module, cfg, main_proc: bool = True) -> None:
    """Load every file a new run (train.TrainConfig cfg) starts from into the SQD model, in order:
    --init-weights (the whole-model map above, its table printed), --backbone-weights (torchvision),
    --audio-weights, and the synthetic stand-ins where no file fills their place. WeightsError
    names the flag and the file that does not fit. The audio network's freezing is the model
    config's (train.resolve); a resumed or evaluated run takes every weight from its checkpoint."""
    for path, name in ((cfg.init_weights, "--init-weights"), (cfg.backbone_weights, "--backbone-weights"),
                       (cfg.audio_weights, "--audio-weights")):
        if path is not None and not os.path.isfile(path):
            raise WeightsError(f"{name} {path!r} does not exist")
    # The whole-model file first: the backbone and audio files given explicitly come after it and
    # override what it set (FRESH: which modules it leaves fresh, and why).
    backbone_loaded = bool(cfg.backbone_weights)
    if cfg.init_weights:
        try:
            rows = load_init_weights(model, cfg.init_weights)
        except WeightsError as e:
            raise WeightsError(f"--init-weights: {e}") from None
        backbone_loaded |= any(r.module == "visual_encoder.backbone" and r.status == "loaded" for r in rows)
        if main_proc:
            print(format_table(rows, cfg.init_weights))
    if cfg.backbone_weights:
        if model.cfg.backbone == "small":
            raise WeightsError("--backbone-weights needs a pretrained backbone (--backbone resnet50, "
                               "swin-t or video-swin-t)")
        try:
            model.visual_encoder.backbone.load_torchvision_weights(cfg.backbone_weights)
        except Exception as e:  # unreadable, unsafe, or another network's keys and shapes
            _, reason = load_error(e)
            raise WeightsError(f"--backbone-weights {cfg.backbone_weights}: not a torchvision state_dict "
                               f"of --backbone {model.cfg.backbone} ({type(e).__name__}: {reason})") from None
    audio_flag, audio_path = "--audio-weights", cfg.audio_weights
    audio_stand_in = uses_stand_ins(cfg) and not audio_path
    visual_stand_in = (uses_stand_ins(cfg) and model.cfg.backbone == "small"
                       and not (cfg.init_weights or cfg.backbone_weights))
    try:
        stand_in_audio, visual_path = pretrain.stand_in_files(
            pretrain.STAND_IN_DIR, model.cfg, cfg.seed, cfg.img_size, cfg.eval_clips, audio_stand_in,
            visual_stand_in, main_proc)
    except pretrain.PretrainError as e:
        raise WeightsError(str(e)) from None
    if stand_in_audio:
        audio_flag, audio_path = "the audio stand-in", stand_in_audio
    if audio_path:
        try:
            model.audio_encoder.load_net_weights(audio_path)
        except ValueError as e:
            raise WeightsError(f"{audio_flag}: {e}") from None
    if visual_path:
        try:
            loaded = pretrain.load_visual_into(model, visual_path)
        except ValueError as e:
            raise WeightsError(f"the visual stand-in: {e}") from None
        if main_proc:
            print(f"visual side: {loaded} tensors of the visual encoder, FPN and mask decoder from {visual_path}")
    if main_proc and cfg.preset == "paper" and not (backbone_loaded and audio_path):
        missing = [n for n, v in (("--backbone-weights", backbone_loaded),
                                  ("--audio-weights", audio_path)) if not v]
        print("\n" + "!" * 78 + f"\n!! WARNING: the paper preset is training WITHOUT pretrained "
              f"weights ({', '.join(missing)} not given).\n!! The paper names no starting point; the "
              f"code it builds on (AVSBench, ReferFormer) starts from pretrained backbones\n!! "
              f"(or --init-weights) and AudioSet VGGish; expect far lower numbers.\n" + "!" * 78 + "\n",
              file=sys.stderr)
