"""pretrained.py and train.py --init-weights: ReferFormer's whole-model checkpoints loaded into SQD.

No ReferFormer file can be downloaded here, so the tests write one: `referformer_names`,
`resnet_names` and `swin_names` spell out ReferFormer's state_dict names and shapes as its code
builds them (models/referformer.py with
--with_box_refine --binary and its defaults: hidden 256, 8 heads, 4 feature levels, 4 points,
4 encoder and 4 decoder layers, FFN 2048, mask_dim 256; models/backbone.py's torchvision ResNet
under backbone.0.body; models/swin_transformer.py and video_swin_transformer.py for Swin), written
here from that code and not from this repository's modules; `random_state` makes every tensor a
distinct random one. `expected_source` writes the map out again, apart from pretrained.py.
It is saved as ReferFormer's main.py saves a checkpoint: model, optimizer, lr_scheduler, epoch
and args (an argparse.Namespace).
"""
import argparse
import os
import re
import shlex

import pytest
import torch
import torch.nn as nn

import commands
import synthetic
from encoders import SmallBackbone, SwinTransformer, VideoSwinTransformer, VisualEncoder
from pretrained import WeightsError, format_table, load_init_weights
from sqd import SQD, preset



# ----------------------------------------------------------------------------------------------
# ReferFormer's names and shapes, written from its code
# ----------------------------------------------------------------------------------------------

def resnet_names(depths=(3, 4, 6, 3), prefix="backbone.0.body."):
    """torchvision's ResNet-50 (Bottleneck) without fc, batch norms frozen (DETR's
    FrozenBatchNorm2d: weight, bias, running_mean, running_var, no num_batches_tracked)."""
    out = {}

    def conv_bn(name, cout, cin, k):
        out[f"{prefix}{name[0]}.weight"] = (cout, cin, k, k)
        for b in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}{name[1]}.{b}"] = (cout,)

    conv_bn(("conv1", "bn1"), 64, 3, 7)
    cin = 64
    for s, (n, width) in enumerate(zip(depths, (64, 128, 256, 512))):
        for b in range(n):
            p = f"layer{s + 1}.{b}."
            conv_bn((p + "conv1", p + "bn1"), width, cin, 1)
            conv_bn((p + "conv2", p + "bn2"), width, width, 3)
            conv_bn((p + "conv3", p + "bn3"), 4 * width, width, 1)
            if b == 0:
                conv_bn((p + "downsample.0", p + "downsample.1"), 4 * width, cin, 1)
            cin = 4 * width
    return out


def swin_names(embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=(7, 7), video=False,
               prefix="backbone.0.body."):
    """Swin's own layout (Microsoft's code, which ReferFormer copies): patch_embed, layers.i.blocks.j,
    the patch merging in layers.i.downsample (image) or downsamples.i (ReferFormer's Video Swin
    wrapper), norm0..norm3 on the image model's outputs, no norm on the video model's."""
    out = {}
    patch = (embed, 3, 1, 4, 4) if video else (embed, 3, 4, 4)
    out[prefix + "patch_embed.proj.weight"], out[prefix + "patch_embed.proj.bias"] = patch, (embed,)
    out[prefix + "patch_embed.norm.weight"] = out[prefix + "patch_embed.norm.bias"] = (embed,)
    rows = 1
    for m in window:
        rows *= 2 * m - 1
    tokens = 1
    for m in window:
        tokens *= m
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim = embed * 2 ** i
        for j in range(depth):
            p = f"{prefix}layers.{i}.blocks.{j}."
            out[p + "norm1.weight"] = out[p + "norm1.bias"] = (dim,)
            out[p + "attn.relative_position_bias_table"] = (rows, h)
            out[p + "attn.relative_position_index"] = (tokens, tokens)
            out[p + "attn.qkv.weight"], out[p + "attn.qkv.bias"] = (3 * dim, dim), (3 * dim,)
            out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = (dim, dim), (dim,)
            out[p + "norm2.weight"] = out[p + "norm2.bias"] = (dim,)
            out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (4 * dim, dim), (4 * dim,)
            out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (dim, 4 * dim), (dim,)
        if i < len(depths) - 1:
            p = f"{prefix}downsamples.{i}." if video else f"{prefix}layers.{i}.downsample."
            out[p + "reduction.weight"] = (2 * dim, 4 * dim)
            out[p + "norm.weight"] = out[p + "norm.bias"] = (4 * dim,)
        if not video:
            out[f"{prefix}norm{i}.weight"] = out[f"{prefix}norm{i}.bias"] = (dim,)
    return out


def referformer_names(backbone, channels, hidden=256, heads=8, levels=4, points=4, enc_layers=4,
                      dec_layers=4, ffn=2048, mask_dim=256, dyn=8, queries=5):
    """Every name -> shape of ReferFormer's model (models/referformer.py build) besides the
    backbone's; channels are the backbone's (c2, c3, c4, c5). The RoBERTa text encoder is
    represented by a few of its tensors (it maps to nothing)."""
    out = dict(backbone)
    lin = lambda p, o, i: out.update({p + ".weight": (o, i), p + ".bias": (o,)})  # noqa: E731
    norm = lambda p, c: out.update({p + ".weight": (c,), p + ".bias": (c,)})  # noqa: E731
    mha = lambda p, c: out.update({p + ".in_proj_weight": (3 * c, c), p + ".in_proj_bias": (3 * c,),  # noqa: E731
                                   p + ".out_proj.weight": (c, c), p + ".out_proj.bias": (c,)})
    for l, c in enumerate(channels[1:]):  # 1x1 conv + GroupNorm(32) of c3, c4, c5
        out[f"input_proj.{l}.0.weight"], out[f"input_proj.{l}.0.bias"] = (hidden, c, 1, 1), (hidden,)
        norm(f"input_proj.{l}.1", hidden)
    out["input_proj.3.0.weight"], out["input_proj.3.0.bias"] = (hidden, channels[-1], 3, 3), (hidden,)
    norm("input_proj.3.1", hidden)
    out["transformer.level_embed"] = (levels, hidden)
    for k in range(enc_layers):
        p = f"transformer.encoder.layers.{k}."
        lin(p + "self_attn.sampling_offsets", heads * levels * points * 2, hidden)
        lin(p + "self_attn.attention_weights", heads * levels * points, hidden)
        lin(p + "self_attn.value_proj", hidden, hidden)
        lin(p + "self_attn.output_proj", hidden, hidden)
        norm(p + "norm1", hidden)
        lin(p + "linear1", ffn, hidden)
        lin(p + "linear2", hidden, ffn)
        norm(p + "norm2", hidden)
    for k in range(dec_layers):
        p = f"transformer.decoder.layers.{k}."
        lin(p + "cross_attn.sampling_offsets", heads * levels * points * 2, hidden)
        lin(p + "cross_attn.attention_weights", heads * levels * points, hidden)
        lin(p + "cross_attn.value_proj", hidden, hidden)
        lin(p + "cross_attn.output_proj", hidden, hidden)
        norm(p + "norm1", hidden)
        mha(p + "self_attn", hidden)
        norm(p + "norm2", hidden)
        lin(p + "linear1", ffn, hidden)
        lin(p + "linear2", hidden, ffn)
        norm(p + "norm3", hidden)
    lin("transformer.reference_points", 2, hidden)
    for k in range(dec_layers):  # with_box_refine: a head per layer; bbox_embed also in the decoder
        lin(f"class_embed.{k}", 1, hidden)  # --binary: one class
        for where in ("", "transformer.decoder."):
            for i, (o, n) in enumerate(((hidden, hidden), (hidden, hidden), (4, hidden))):
                lin(f"{where}bbox_embed.{k}.layers.{i}", o, n)
    out["query_embed.weight"] = (queries, hidden)
    for name, shape in (("embeddings.word_embeddings.weight", (50265, 8)),  # RoBERTa, much shortened
                        ("encoder.layer.0.attention.self.query.weight", (768, 768))):
        out["text_encoder." + name] = shape
    lin("resizer.fc", hidden, 768)
    norm("resizer.layer_norm", hidden)
    mha("fusion_module.multihead_attn", hidden)
    for s, c in enumerate([channels[0]] + [hidden] * 3, start=1):  # CrossModalFPNDecoder, norm "GN"
        p = f"pixel_decoder.adapter_{s}"
        out[p + ".weight"] = (hidden, c, 1, 1)
        norm(p + ".norm", hidden)
        out[f"pixel_decoder.layer_{s}.weight"] = (hidden, hidden, 3, 3)
        norm(f"pixel_decoder.layer_{s}.norm", hidden)
        q = f"pixel_decoder.cross_attn_{s}"
        mha(q + ".self_attn", hidden)
        mha(q + ".multihead_attn", hidden)
        lin(q + ".linear1", ffn, hidden)
        lin(q + ".linear2", hidden, ffn)
        for n in (1, 2, 3):
            norm(f"{q}.norm{n}", hidden)
    out["pixel_decoder.mask_features.weight"] = (mask_dim, hidden, 3, 3)
    out["pixel_decoder.mask_features.bias"] = (mask_dim,)
    params = (mask_dim + 2) * dyn + dyn + dyn * dyn + dyn + dyn + 1  # 2153 for 256 channels
    for i, o in enumerate((hidden, hidden, params)):  # MLP(hidden, hidden, params, 3)
        lin(f"controller.layers.{i}", o, hidden)
    return out


def random_state(names, seed=0):
    """A distinct random tensor per name, at scales a trained network could have (so that a
    forward pass stays finite): weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.01), variances and
    norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in names.items():
        t = torch.randn(shape, generator=g)
        if len(shape) > 1:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            t.mul_(fan_in ** -0.5)
        elif k.endswith("running_var") or (k.endswith(".weight") and len(shape) == 1):
            t = 1 + 0.1 * t.abs()
        else:
            t.mul_(0.1)
        out[k] = t
    return out


def save_checkpoint(state, path):
    """As ReferFormer's main.py: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}."""
    args = argparse.Namespace(backbone="resnet50", hidden_dim=256, num_feature_levels=4, lr_drop=[8, 10],
                              with_box_refine=True, binary=True, masks=True, resume="", pretrained_weights=None)
    param = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=1e-4)
    param.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [8, 10])
    torch.save({"model": state, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "epoch": 11, "args": args}, path)


# ----------------------------------------------------------------------------------------------
# The expected map, written independently of pretrained.py
# ----------------------------------------------------------------------------------------------

def expected_source(name, video=None):
    """ReferFormer's name for one of our tensors, or None for the ones with no counterpart."""
    b = "visual_encoder.backbone."
    if name.startswith(b):
        rest = name[len(b):]
        if video is None:  # ResNet: the same names
            return None if rest.startswith("fc.") or rest.endswith("num_batches_tracked") else "backbone.0.body." + rest
        if rest.startswith("head.") or rest.endswith("relative_position_index"):
            return None
        if rest.startswith("norm."):
            return None if video else "backbone.0.body.norm3." + rest[5:]
        if rest.startswith("patch_embed.") or (not video and rest.startswith(("features.0.0.", "features.0.2."))):
            rest = rest.replace("features.0.0.", "patch_embed.proj.").replace("features.0.2.", "patch_embed.norm.")
            return "backbone.0.body." + rest
        f, rest = rest.split(".", 2)[1:]
        f = int(f) - (0 if video else 1)  # video stages 0, 2, 4, 6; image stages 1, 3, 5, 7
        stage = f // 2
        if f % 2:  # a patch merging after stage `stage`
            where = f"downsamples.{stage}" if video else f"layers.{stage}.downsample"
            return f"backbone.0.body.{where}.{rest}"
        j, rest = rest.split(".", 1)
        rest = rest.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
        return f"backbone.0.body.layers.{stage}.blocks.{j}.{rest}"
    m = re.match(r"visual_encoder\.layers\.(\d+)\.(.*)", name)
    if m:
        return None if m.group(2).startswith("temporal") else f"transformer.encoder.layers.{m.group(1)}.{m.group(2)}"
    if name.startswith("visual_encoder.input_proj."):
        return name[len("visual_encoder."):]
    if name == "visual_encoder.level_embed":
        return "transformer.level_embed"
    fpn = {"fpn.lateral4.0.": "pixel_decoder.adapter_1.", "fpn.lateral4.1.": "pixel_decoder.adapter_1.norm.",
           "fpn.merge4.0.": "pixel_decoder.layer_1.", "fpn.merge4.1.": "pixel_decoder.layer_1.norm.",
           "fpn.merge8.0.": "pixel_decoder.layer_2.", "fpn.merge8.1.": "pixel_decoder.layer_2.norm.",
           "fpn.merge16.0.": "pixel_decoder.layer_3.", "fpn.merge16.1.": "pixel_decoder.layer_3.norm.",
           "fpn.mask_out.": "pixel_decoder.mask_features."}
    for ours, theirs in fpn.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return None


def first_three_levels(t, heads, levels, per_level):
    """Rows of head h, level l (l < 3), in order: an explicit loop over the (head, level) blocks."""
    keep = []
    for h in range(heads):
        for l in range(3):
            start = (h * levels + l) * per_level
            keep.extend(range(start, start + per_level))
    return t[keep]


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

RENAMED = "transformer.encoder.layers.2.self_attn.value_proj.weight"  # saved under another name
MISSHAPED = "input_proj.1.0.weight"                                    # saved with a wrong shape
# a layer loads whole or not at all: the bias of each of these two stays fresh with its weight
NOT_LOADED = {RENAMED.rsplit(".", 1)[0], MISSHAPED.rsplit(".", 1)[0]}


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """A ReferFormer-R50 checkpoint (one key renamed, one mis-shaped) loaded into a paper-preset SQD
    whose FFN is ReferFormer's 2048 wide, so that every mapped tensor can load."""
    torch.manual_seed(0)
    names = referformer_names(resnet_names(), (256, 512, 1024, 2048))
    state = random_state(names)
    state["renamed.value_proj.weight"] = state.pop(RENAMED)
    state[MISSHAPED] = torch.randn(256, 511, 1, 1)
    path = tmp_path_factory.mktemp("r50") / "r50_pretrained.pth"
    save_checkpoint(state, path)
    model = SQD(preset("paper", audio_encoder="small", ffn_dim=2048))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = load_init_weights(model, str(path))
    return dict(state=state, path=path, model=model, before=before, rows=rows,
                after=model.state_dict())


def rows_of(rows, module):
    return [r for r in rows if r.module == module]


# ----------------------------------------------------------------------------------------------
# (a)-(d): what loads, what stays, and what the table says
# ----------------------------------------------------------------------------------------------

def test_every_mapped_tensor_equals_its_source_in_the_file(r50):
    state, after = r50["state"], r50["after"]
    checked = 0
    for name, value in after.items():
        source = expected_source(name)
        if source is None or source.rsplit(".", 1)[0] in NOT_LOADED:
            continue
        t = state[source]
        if name == "visual_encoder.level_embed":
            t = t[:3]
        elif "sampling_offsets" in name:
            t = first_three_levels(t, 8, 4, 4 * 2)
        elif "attention_weights" in name:
            t = first_three_levels(t, 8, 4, 4)
        if name.startswith("fpn.mask_out"):
            assert t.shape != value.shape  # 256 mask channels there, Cm = 8 here: not loaded
            continue
        assert torch.equal(value, t), name
        checked += 1
    # ResNet-50's 265 tensors (no fc, no counters), input_proj 12 less the mis-shaped conv's 2,
    # level_embed, 4 encoder layers x 16 (spatial 10, FFN 6) less the renamed Linear's 2, FPN 12
    # (its lateral and three merges; mask_out's shape disagrees)
    assert checked == 265 + 10 + 1 + 62 + 12
    loaded = sum(r.tensors for r in r50["rows"] if r.status == "loaded")
    assert loaded == checked
    assert rows_of(r50["rows"], "visual_encoder.backbone")[0] == ("visual_encoder.backbone", "loaded", 265, "")


def test_modules_without_counterpart_keep_their_init_values(r50):
    before, after = r50["before"], r50["after"]
    fresh = [k for k in after if expected_source(k) is None]
    assert any(k.startswith("mask_decoder.controller") for k in fresh)
    for name in fresh:
        assert torch.equal(after[name], before[name]), name
    for prefix in ("audio_encoder", "fusion", "global_asd", "local_asd", "vq", "avsr",
                   "mask_decoder.decoder", "mask_decoder.controller", "mask_decoder.class_head",
                   "mask_decoder.box_head", "visual_encoder.layers.0.temporal"):
        row, = [r for r in r50["rows"] if r.module == prefix]
        assert row.status == "fresh" and row.detail.startswith("no counterpart in ReferFormer: "), row
    # what the file holds and nothing here reads is summed up in the last row
    last = r50["rows"][-1]
    assert last.status == "unused" and "text_encoder 2" in last.detail and "input_proj 4" in last.detail


def test_a_renamed_key_is_reported_missing_and_left_fresh(r50):
    for ours in ("visual_encoder.layers.2.self_attn.value_proj.weight",
                 "visual_encoder.layers.2.self_attn.value_proj.bias"):  # the bias is in the file
        assert torch.equal(r50["after"][ours], r50["before"][ours])
    row, = [r for r in r50["rows"] if r.module == "visual_encoder.layers.2.spatial" and r.status == "fresh"]
    assert row.tensors == 2 and row.detail == f"missing in the file: {RENAMED}"


def test_a_misshaped_key_is_a_shape_mismatch_with_both_shapes_and_not_loaded(r50):
    for ours in ("visual_encoder.input_proj.1.0.weight", "visual_encoder.input_proj.1.0.bias"):
        assert torch.equal(r50["after"][ours], r50["before"][ours])
    row, = [r for r in r50["rows"] if r.module == "visual_encoder.input_proj" and r.status == "fresh"]
    assert row.tensors == 2 and row.detail == "shape mismatch: 1.0.weight (256, 511, 1, 1) in the file, (256, 1024, 1, 1) here"
    row, = [r for r in r50["rows"] if r.module == "fpn.mask_out"]
    assert row.status == "fresh" and "(256, 256, 3, 3) in the file, (8, 256, 3, 3) here" in row.detail
    table = format_table(r50["rows"], str(r50["path"]))
    assert table.splitlines()[0] == (f"--init-weights {r50['path']}: 350 of the model's "
                                     f"{len(r50['after'])} tensors loaded from ReferFormer's names")


def test_the_paper_presets_ffn_1024_is_a_mismatch_with_referformers_2048(tmp_path):
    names = {k: v for k, v in referformer_names({}, (256, 512, 1024, 2048)).items()
             if k.startswith("transformer.encoder.layers.0.")}
    path = tmp_path / "enc.pth"
    torch.save(random_state(names), path)  # a bare state_dict
    model = nn.Module()  # what load_init_weights reads: a visual encoder (here on a tiny Swin)
    model.visual_encoder = VisualEncoder(SwinTransformer(8, (1, 1, 1, 1), (1, 1, 1, 1), 3), 256, 1, 8, 4, 1024)
    rows = load_init_weights(model, str(path))
    row, = [r for r in rows if r.module == "visual_encoder.layers.0.ffn" and r.status == "fresh"]
    assert row.tensors == 4 and row.detail.startswith(
        "shape mismatch: linear1.weight (2048, 256) in the file, (1024, 256) here; linear1.bias (2048,)")


@pytest.mark.parametrize("video", [False, True])
def test_swin_backbones_map_from_swins_own_layout(tmp_path, video):
    """A tiny Swin / Video Swin in ReferFormer's layout: every tensor but the classifier, the fixed
    indices and (Video Swin) the output norm equals its source."""
    heads, depths = (1, 1, 2, 2), (2, 2, 2, 2)
    backbone = (VideoSwinTransformer(8, depths, heads, (2, 3, 3)) if video
                else SwinTransformer(8, depths, heads, 3))
    model = nn.Module()
    model.visual_encoder = VisualEncoder(backbone, 32, 1, 4, 2, 64)
    names = swin_names(8, depths, heads, (2, 3, 3) if video else (3, 3), video)
    state = random_state(names, seed=1)
    path = tmp_path / "swin.pth"
    torch.save(state, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = load_init_weights(model, str(path))
    after = model.state_dict()
    loaded = 0
    for name, value in after.items():
        if not name.startswith("visual_encoder.backbone."):
            continue
        source = expected_source(name, video=video)
        if source is None:
            assert torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, state[source]), name
            loaded += 1
    backbone_tensors = sum(1 for k in after if k.startswith("visual_encoder.backbone."))
    fixed = sum(1 for k in after if k.endswith("relative_position_index"))
    assert loaded == backbone_tensors - fixed - 2 - (2 if video else 0)  # head, (video) norm
    row, = [r for r in rows if r.module == "visual_encoder.backbone" and r.status == "loaded"]
    assert row.tensors == loaded
    unused = rows[-1]  # Swin's own fixed indices are never read; the image model's norm0-2 neither
    assert unused.tensors == fixed + (0 if video else 6)
    assert video or "backbone.0.body.norm0 2, backbone.0.body.norm1 2, backbone.0.body.norm2 2" in unused.detail


# ----------------------------------------------------------------------------------------------
# (e), (f): files that must be refused
# ----------------------------------------------------------------------------------------------

def test_a_file_with_unrelated_keys_is_refused_naming_it(tmp_path):
    model = nn.Module()
    model.visual_encoder = VisualEncoder(SwinTransformer(8, (1, 1, 1, 1), (1, 1, 1, 1), 3), 32, 1, 4, 2, 64)
    path = tmp_path / "resnet50-19c8e357.pth"  # a torchvision classifier file
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, path)
    with pytest.raises(WeightsError, match=r"resnet50-19c8e357\.pth: none of its tensors has a "
                                               r"ReferFormer name .* --backbone-weights.*expected a ReferFormer"):
        load_init_weights(model, str(path))
    path = tmp_path / "random.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match=r"random\.pth: none of its tensors .* \(it holds encoder, \.\.\.\);"):
        load_init_weights(model, str(path))
    path = tmp_path / "notes.pth"
    torch.save({"epoch": 3, "args": ["a"]}, path)
    with pytest.raises(WeightsError, match=r"notes\.pth: no state_dict in it"):
        load_init_weights(model, str(path))


class RunsSystem:
    """Unpickling it calls os.system, which writes `marker`: the file appears if code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_a_pickle_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"input_proj.0.0.weight": torch.zeros(1)}, "args": argparse.Namespace(a=1),
                "payload": RunsSystem(marker)}, path)
    model = nn.Module()
    model.visual_encoder = VisualEncoder(SwinTransformer(8, (1, 1, 1, 1), (1, 1, 1, 1), 3), 32, 1, 4, 2, 64)
    with pytest.raises(WeightsError, match=r"evil\.pth: refused; loading it would call (posix|os)\.system"):
        load_init_weights(model, str(path))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# (g): train.py --init-weights end to end
# ----------------------------------------------------------------------------------------------

def train(*args):
    """`python train.py ARGS`, run in this process (tests/commands.py)."""
    import train as train_py
    return commands.run(train_py.main, *args, check=False)


def test_train_py_init_weights_prints_the_table_and_a_bad_file_is_one_line(tmp_path, capsys, monkeypatch):
    """The command line, on the CPU preset (the paper preset's run costs 26 s of CPU) with a file
    of ReferFormer's names at the CPU preset's widths: exit 0 and the table. A bad file: main()
    returns exit code 2 with one line (run in this process: the same main() as the command's)."""
    cpu = preset("cpu")
    names = referformer_names({}, SmallBackbone().channels, hidden=cpu.dim, heads=cpu.num_heads,
                              points=cpu.num_points, enc_layers=cpu.enc_layers, ffn=cpu.ffn_dim)
    path = tmp_path / "referformer_cpu.pth"
    save_checkpoint(random_state(names), path)
    monkeypatch.setitem(synthetic.SYNTHETIC_SIZES, "train", 4)
    flags = ["--preset", "cpu", "--img-size", "64", "--max-steps", "1", "--eval-clips", "2"]
    proc = train(*flags, "--out", str(tmp_path / "run"), "--init-weights", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert f"--init-weights {path}: 41 of the model's 246 tensors loaded from ReferFormer's names" in lines
    row = next(line.split() for line in lines if line.strip().startswith("visual_encoder.layers.0.ffn"))
    assert row[:3] == ["visual_encoder.layers.0.ffn", "loaded", "6"]  # the CPU preset's widths agree
    assert any("SmallBackbone (the CPU preset's small CNN)" in line for line in lines)

    import train as train_py
    bad = tmp_path / "bad.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, bad)
    code = train_py.main([*flags, "--out", str(tmp_path / "run2"), "--init-weights", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --init-weights: {bad}: none of its tensors has a ReferFormer name that this model maps "
        f"(it holds encoder, ...); expected a ReferFormer checkpoint (backbone.0.body.*, input_proj.*, "
        f"transformer.encoder.*, pixel_decoder.*)"]


def test_load_start_weights_prints_the_table_and_counts_the_backbone_as_given(r50, capsys, tmp_path):
    """pretrained.load_start_weights on the paper preset: the table on stdout, and the warning about missing
    pretrained weights names VGGish only, since the ResNet-50 came from the file. A missing or
    unsafe file is a WeightsError (one line, exit code 2 in main())."""
    from pretrained import load_start_weights
    from train import TrainConfig
    cfg = TrainConfig(preset="paper", init_weights=str(r50["path"]))
    load_start_weights(r50["model"], cfg, main_proc=True)
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith(f"--init-weights {r50['path']}: 350 of")
    assert "WITHOUT pretrained weights (--audio-weights not given)" in err
    load_start_weights(r50["model"], cfg, main_proc=False)
    assert capsys.readouterr().out == ""  # other processes of a torchrun print nothing
    absent = str(tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match=f"^--init-weights {absent!r} does not exist$"):
        load_start_weights(r50["model"], TrainConfig(init_weights=absent), main_proc=True)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": RunsSystem(tmp_path / "code_ran")}, evil)
    with pytest.raises(WeightsError, match=f"^--init-weights: {evil}: refused; loading it would call"):
        load_start_weights(r50["model"], TrainConfig(init_weights=str(evil)), main_proc=True)
    assert not (tmp_path / "code_ran").exists()
