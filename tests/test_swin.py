"""Tests for the Swin backbones of encoders.py (SwinTransformer, VideoSwinTransformer and their parts).

Each compares with something independent: a key table written out from torchvision's published
architecture, explicit loops (window cutting, relative position rows, window attention token by
token), hand-written region ids, a closed form (the summed patch kernel on a still clip).
torchvision itself is not needed; docs/backbones.md records the comparison with its outputs.
"""
import copy
import functools
import itertools
import math

import pytest
import torch

import sqd
from encoders import (PatchMerging, SwinTransformer, VideoSwinTransformer, WindowAttention,
                      relative_position_index, shifted_window_mask, shifted_window_regions,
                      window_partition, window_reverse)
from sqd import SQD, preset

TINY = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))  # every stage shifts once


def tiny_swin(**kw):
    return SwinTransformer(**TINY, window=3, **kw)


def tiny_video_swin(**kw):
    return VideoSwinTransformer(**TINY, **{"window": (2, 3, 3), **kw})


# ------------------------------------------------------------------------------------------------
# (a) torchvision's key tables, written out from its architecture (swin_t, swin3d_t)
# ------------------------------------------------------------------------------------------------
def _ln(prefix, c):
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))]


def _torchvision_swin_keys(video):
    """torchvision's swin_t (video=False) or swin3d_t (video=True) state_dict: names in order, shapes.
    Both: embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), MLP ratio 4; window 7 x 7 for
    images, 8 x 7 x 7 for clips (Kinetics patch 2 x 4 x 4, 400 classes; ImageNet 1000)."""
    C, depths, heads = 96, (2, 2, 6, 2), (3, 6, 12, 24)
    window = (8, 7, 7) if video else (7, 7)
    Mv, rows = math.prod(window), math.prod(2 * m - 1 for m in window)  # 392 / 49; 2535 / 169
    if video:
        keys = [("patch_embed.proj.weight", (C, 3, 2, 4, 4)), ("patch_embed.proj.bias", (C,))]
        keys += _ln("patch_embed.norm", C)
        first, index_shape, classes = 0, (Mv, Mv), 400  # stages at features.0/2/4/6
    else:
        keys = [("features.0.0.weight", (C, 3, 4, 4)), ("features.0.0.bias", (C,))] + _ln("features.0.2", C)
        first, index_shape, classes = 1, (Mv * Mv,), 1000  # features.0 embeds, stages at 1/3/5/7
    for s, (depth, h) in enumerate(zip(depths, heads)):
        dim, stage = C * 2 ** s, first + 2 * s
        for b in range(depth):
            p = f"features.{stage}.{b}"
            keys += _ln(f"{p}.norm1", dim)
            keys += [(f"{p}.attn.relative_position_bias_table", (rows, h)),
                     (f"{p}.attn.relative_position_index", index_shape),
                     (f"{p}.attn.qkv.weight", (3 * dim, dim)), (f"{p}.attn.qkv.bias", (3 * dim,)),
                     (f"{p}.attn.proj.weight", (dim, dim)), (f"{p}.attn.proj.bias", (dim,))]
            keys += _ln(f"{p}.norm2", dim)
            keys += [(f"{p}.mlp.0.weight", (4 * dim, dim)), (f"{p}.mlp.0.bias", (4 * dim,)),
                     (f"{p}.mlp.3.weight", (dim, 4 * dim)), (f"{p}.mlp.3.bias", (dim,))]
        if s < 3:  # patch merging after stages 1-3
            keys += [(f"features.{stage + 1}.reduction.weight", (2 * dim, 4 * dim))]
            keys += _ln(f"features.{stage + 1}.norm", 4 * dim)
    keys += _ln("norm", 8 * C) + [("head.weight", (classes, 8 * C)), ("head.bias", (classes,))]
    return keys


@pytest.mark.parametrize("video,num_params", [(False, 28_288_354), (True, 28_158_070)])
def test_swin_keys_and_shapes_are_torchvisions(video, num_params):
    """Names, order and shapes of torchvision's files; parameter counts as torchvision publishes
    them (Swin_T_Weights / Swin3D_T_Weights meta)."""
    expected = _torchvision_swin_keys(video)
    assert len(expected) == 185
    table_params = sum(math.prod(s) for k, s in expected if not k.endswith("relative_position_index"))
    assert table_params == num_params
    model = VideoSwinTransformer(patch=(2, 4, 4)) if video else SwinTransformer()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert model.channels == (96, 192, 384, 768)
    # the classifier is kept for strict loading only: frozen, everything else trains
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["head.weight", "head.bias"]
    if video:  # SQD's per-frame model: the same table except the patch kernel's time side
        got = [(k, tuple(v.shape)) for k, v in VideoSwinTransformer().state_dict().items()]
        assert got == [(k, (96, 3, 1, 4, 4) if k == "patch_embed.proj.weight" else s) for k, s in expected]


# ------------------------------------------------------------------------------------------------
# (b) windows, (c) the shifted-window mask, (d) relative position rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,window", [((6, 4), (3, 2)), ((4, 6, 3), (2, 3, 3))])
def test_window_partition_and_reverse_against_loops(size, window):
    B, C = 2, 3
    x = torch.randn(B, *size, C)
    win = window_partition(x, window)
    grid = [s // m for s, m in zip(size, window)]
    assert win.shape == (B * math.prod(grid), math.prod(window), C)
    for b in range(B):
        for w, cell in enumerate(itertools.product(*[range(g) for g in grid])):  # row-major windows
            for t, inside in enumerate(itertools.product(*[range(m) for m in window])):  # row-major tokens
                pos = tuple(c * m + i for c, m, i in zip(cell, window, inside))
                assert torch.equal(win[b * math.prod(grid) + w, t], x[(b, *pos)])
    assert torch.equal(window_reverse(win, window, size), x)


def test_shifted_window_regions_and_mask_hand_built_4x4():
    """A 4 x 4 map, windows of 2, shift 1. Along each axis the rolled map has the bands [0, 2),
    [2, 3) and [3, 4) (row 3 / column 3 wrapped around from the start); region = 3 * row band +
    column band. Written out by hand:"""
    regions = torch.tensor([[0, 0, 1, 2],
                            [0, 0, 1, 2],
                            [3, 3, 4, 5],
                            [6, 6, 7, 8]], dtype=torch.float)
    assert torch.equal(shifted_window_regions((4, 4), (2, 2), (1, 1)), regions)
    # the four windows' tokens (row-major) read these regions; a query sees keys of its own region
    ids = [[0, 0, 0, 0], [1, 2, 1, 2], [3, 3, 6, 6], [4, 5, 7, 8]]
    mask = shifted_window_mask((4, 4), (2, 2), (1, 1))
    assert mask.shape == (4, 4, 4)
    for w in range(4):
        for i in range(4):
            for j in range(4):
                assert mask[w, i, j] == (0.0 if ids[w][i] == ids[w][j] else -100.0)
    # no shift along rows: one band there, the columns still split
    assert torch.equal(shifted_window_regions((4, 4), (2, 2), (0, 1))[1], torch.tensor([0., 0., 1., 2.]))


def test_shifted_window_mask_3d_is_the_wrap_rule():
    """In 3-D against the rule the mask stands for: after rolling by -shift, two tokens of a window
    may attend to each other only if, on every axis, both or neither wrapped around the map's end
    (original position < shift)."""
    size, window, shift = (4, 6, 6), (2, 3, 3), (1, 1, 1)
    mask = shifted_window_mask(size, window, shift)
    grid = [s // m for s, m in zip(size, window)]
    for w, cell in enumerate(itertools.product(*[range(g) for g in grid])):
        tokens = [tuple(c * m + i for c, m, i in zip(cell, window, inside))
                  for inside in itertools.product(*[range(m) for m in window])]  # rolled positions
        wrapped = [tuple((r + s) % n < s for r, s, n in zip(tok, shift, size)) for tok in tokens]
        for i, j in itertools.product(range(len(tokens)), repeat=2):
            assert mask[w, i, j] == (0.0 if wrapped[i] == wrapped[j] else -100.0)
    assert (mask == -100).any() and (mask == 0).any()


@pytest.mark.parametrize("window,table", [((7, 7), (7, 7)), ((8, 7, 7), (8, 7, 7)), ((3, 2, 4), (8, 7, 7))])
def test_relative_position_index_against_a_loop(window, table):
    """Row = the offset (query minus key) per axis, shifted by M - 1, as mixed-radix digits with bases
    2M - 1 of the table's window, first axis most significant. Also for a window shrunk inside
    the (8, 7, 7) table."""
    index = relative_position_index(window, table)
    tokens = list(itertools.product(*[range(m) for m in window]))
    assert index.shape == (len(tokens), len(tokens))
    for i, qi in enumerate(tokens):
        for j, kj in enumerate(tokens):
            row = 0
            for q, k, m in zip(qi, kj, table):
                row = row * (2 * m - 1) + (q - k + m - 1)
            assert index[i, j] == row
    if window == table:  # the buffer torchvision's files hold: flat for images, square for clips
        attn = WindowAttention(6, 2, window, [0] * len(window))
        stored = attn.relative_position_index
        assert torch.equal(stored, index.flatten() if len(window) == 2 else index)


# ------------------------------------------------------------------------------------------------
# Window attention token by token: padding, cyclic shift, mask, bias, crop; patch merging
# ------------------------------------------------------------------------------------------------
def _window_attention_by_hand(attn, x):
    """attn's output written out for every query token of x (B', *size, Cs): its keys are the tokens
    of its (shifted) window in the zero-padded map, each logit gets the bias of their offset in the
    window and -100 if one wrapped around the map and the other did not. No roll, no partition."""
    B, *size, C = x.shape
    window, shift = list(attn.window), list(attn.shift)
    for k, s in enumerate(size):
        if s <= window[k]:
            shift[k] = 0
            window[k] = s if attn.clip_window else window[k]
    padded = [math.ceil(s / m) * m for s, m in zip(size, window)]
    xp = x.new_zeros(B, *padded, C)
    xp[(slice(None), *[slice(0, s) for s in size])] = x
    q, k, v = attn.qkv(xp).chunk(3, dim=-1)  # (B', *padded, Cs) each
    heads, Dh = attn.num_heads, C // attn.num_heads
    table = attn.relative_position_bias_table
    rolled = {o: tuple((o_k - s_k) % P for o_k, s_k, P in zip(o, shift, padded))
              for o in itertools.product(*[range(P) for P in padded])}  # position after the roll
    out = torch.zeros(B, *size, C, dtype=x.dtype)
    for b in range(B):
        for o in itertools.product(*[range(s) for s in size]):
            r = rolled[o]
            keys = [o2 for o2, r2 in rolled.items()
                    if all(a // m == c // m for a, c, m in zip(r, r2, window))]  # the same window
            for h in range(heads):
                hs = slice(h * Dh, (h + 1) * Dh)
                logits = []
                for o2 in keys:
                    row = 0
                    for a, c, m, full in zip(r, rolled[o2], window, attn.window):
                        row = row * (2 * full - 1) + (a % m - c % m + full - 1)
                    wrap = any((p < s) != (p2 < s) for p, p2, s in zip(o, o2, shift))
                    logits.append(q[(b, *o)][hs] @ k[(b, *o2)][hs] * Dh ** -0.5 + table[row, h]
                                  - (100.0 if wrap else 0.0))
                weights = torch.stack(logits).softmax(0)
                out[(b, *o)][hs] = sum(wt * v[(b, *o2)][hs] for wt, o2 in zip(weights, keys))
    return attn.proj(out)


@pytest.mark.parametrize("size,window,shift,clip", [
    ((5, 6), (3, 3), (1, 1), False),             # image: padded to 6 x 6, shifted
    ((2, 5), (3, 3), (1, 1), False),             # image: rows fit one window -> padded, no row shift
    ((3, 5, 4), (2, 3, 3), (1, 1, 1), True),     # clip: every axis padded and shifted
    ((2, 5, 3), (4, 3, 3), (2, 1, 1), True),     # clip: time and width shrink the window, rows shift
    ((2, 2, 5), (4, 3, 3), (2, 1, 1), True),     # clip: time and rows shrink it (other bias rows)
])
def test_window_attention_against_token_loop(size, window, shift, clip):
    torch.manual_seed(0)
    attn = WindowAttention(6, 2, window, shift, clip_window=clip).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()  # a bias large enough to matter
        x = torch.randn(2, *size, 6, dtype=torch.float64)
        torch.testing.assert_close(attn(x), _window_attention_by_hand(attn, x), rtol=1e-10, atol=1e-10)


def test_patch_merging_order_and_odd_sides():
    """2 x 2 neighbourhoods concatenated as (even row, even col), (odd, even), (even, odd), (odd, odd);
    an odd side gets a zero row/column. LayerNorm and the linear replaced by identities to see it."""
    merge = PatchMerging(1)
    merge.norm, merge.reduction = torch.nn.Identity(), torch.nn.Identity()
    x = torch.arange(1.0, 16.0).view(1, 3, 5, 1)  # (B', H', W', Cs) = rows 1..5, 6..10, 11..15
    out = merge(x)
    assert out.shape == (1, 2, 3, 4)
    assert out[0, 0, 0].tolist() == [1, 6, 2, 7]
    assert out[0, 1, 2].tolist() == [15, 0, 0, 0]  # bottom-right corner: zero padding around it
    assert out[0, 1, 1].tolist() == [13, 0, 14, 0]


# ------------------------------------------------------------------------------------------------
# (f) Video Swin: padding frames never move the real frames
# ------------------------------------------------------------------------------------------------
def test_video_swin_padding_frames_never_move_real_frames():
    """Three clips of 5 slots: all real, a real prefix of 3, real frames {0, 2, 3}. The real frames'
    maps are the same whether the padding slots hold zeros or loud noise, equal those of the clip of
    its real frames alone, padding slots are zero; and the windows do mix real frames."""
    torch.manual_seed(0)
    model = tiny_video_swin().eval()
    B, T, H, W = 3, 5, 40, 52
    frames = torch.randn(B, T, 3, H, W)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    noisy = frames.clone()
    noisy[~valid] = 100.0 * torch.randn(int((~valid).sum()), 3, H, W)
    zeros = frames.clone()
    zeros[~valid] = 0.0
    with torch.no_grad():
        out_zeros, out_noise = model(zeros, valid), model(noisy, valid)
        for b in range(B):
            ids = valid[b].nonzero()[:, 0]
            alone = model(frames[b:b + 1, ids], None)  # 4 x (n, Cs, H', W')
            for c_zeros, c_noise, c_alone in zip(out_zeros, out_noise, alone):
                got_z = c_zeros.view(B, T, *c_zeros.shape[1:])[b]
                got_n = c_noise.view(B, T, *c_noise.shape[1:])[b]
                torch.testing.assert_close(got_z[ids], got_n[ids], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_n[ids], c_alone, rtol=1e-5, atol=1e-5)
                assert torch.count_nonzero(got_n[~valid[b]]) == 0
        # not vacuous: changing real frame 1 of clip 0 (in frame 0's first window) moves frame 0's c2
        other = frames.clone()
        other[0, 1] = torch.randn(3, H, W)
        moved = model(other, valid)[0][0] - model(frames, valid)[0][0]
        assert moved.abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# (g) weight files: a round trip, and the deflated patch kernel
# ------------------------------------------------------------------------------------------------
def test_swin_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    src = tiny_swin().eval()
    path = tmp_path / "swin.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = tiny_swin().eval()
    x = torch.randn(2, 3, 40, 52)
    with torch.no_grad():
        assert (dst(x)[3] - src(x)[3]).abs().max() > 1e-3  # different before loading
        dst.load_torchvision_weights(path)
        for a, b in zip(src(x), dst(x)):
            assert torch.equal(a, b)
    torch.save({k: v for k, v in src.state_dict().items() if k != "norm.weight"}, path)
    with pytest.raises(RuntimeError, match="norm.weight"):  # strict: a missing key is an error
        dst.load_torchvision_weights(path)


def test_video_swin_loads_a_kinetics_layout_file_with_the_kernel_summed_over_time(tmp_path):
    """A file laid out as torchvision's swin3d_t (patch kernel (Cs, 3, 2, 4, 4)) loads strictly into the
    per-frame model; its kernel is the file's summed over time, so a still clip (frame repeated)
    gets the same patch embedding from both. A file with the per-frame kernel loads as it is."""
    torch.manual_seed(0)
    kinetics = tiny_video_swin(patch=(2, 4, 4)).eval()
    assert kinetics.patch_embed.proj.weight.shape == (8, 3, 2, 4, 4)
    path = tmp_path / "swin3d.pth"
    torch.save(kinetics.state_dict(), path)
    torch.manual_seed(1)
    model = tiny_video_swin().load_torchvision_weights(path).eval()
    file_kernel = kinetics.patch_embed.proj.weight
    torch.testing.assert_close(model.patch_embed.proj.weight, file_kernel.sum(2, keepdim=True), rtol=0, atol=0)
    kinetics_state = kinetics.state_dict()
    for k, v in model.state_dict().items():
        if k != "patch_embed.proj.weight":
            assert torch.equal(v, kinetics_state[k]), k
    frame = torch.randn(1, 1, 3, 16, 20)  # (B, T, 3, H, W) one frame
    with torch.no_grad():
        still = kinetics.patch_embed(frame.repeat(1, 2, 1, 1, 1).transpose(1, 2))  # (1, 1, 4, 5, 8)
        ours = model.patch_embed(frame.transpose(1, 2))  # (1, 1, 4, 5, 8)
    torch.testing.assert_close(ours, still, rtol=1e-5, atol=1e-5)
    torch.save(model.state_dict(), path)
    again = tiny_video_swin().load_torchvision_weights(path)
    assert torch.equal(again.patch_embed.proj.weight, model.patch_embed.proj.weight)


# ------------------------------------------------------------------------------------------------
# (e) the whole SQD model: any clip length, a size that is no multiple of 32 or of the window
# ------------------------------------------------------------------------------------------------
def _tiny_sqd(monkeypatch, backbone):
    """The CPU preset with `backbone`, its Swin built with tiny widths (sqd.visual_backbone reads the
    classes from the sqd module)."""
    monkeypatch.setattr(sqd, "SwinTransformer", functools.partial(SwinTransformer, **TINY, window=3))
    monkeypatch.setattr(sqd, "VideoSwinTransformer", functools.partial(VideoSwinTransformer, **TINY,
                                                                       window=(2, 3, 3)))
    cfg = preset("cpu", num_classes=3, dim=32, ffn_dim=64, codebook_size=8, num_tokens=3, backbone=backbone)
    return SQD(cfg).eval()


@pytest.mark.parametrize("backbone", ["swin-t", "video-swin-t"])
def test_sqd_with_swin_any_clip_length_and_size(monkeypatch, backbone):
    """72 x 100 frames (72/4 = 18, 100/4 = 25: every stage pads for its windows and merges an odd
    side): masks at stride 4 and one prediction per frame for T = 1, 3, 5, 7. The Swin-T backbone
    sees every frame alone, the Video Swin-T one the clip (frame 0's masks move with frame 1)."""
    torch.manual_seed(0)
    model = _tiny_sqd(monkeypatch, backbone)
    backbone_class = SwinTransformer if backbone == "swin-t" else VideoSwinTransformer
    assert isinstance(model.visual_encoder.backbone, backbone_class)
    assert model.visual_encoder.backbone.channels == (8, 16, 32, 64)
    g = torch.Generator().manual_seed(0)
    for T in (1, 3, 5, 7):
        batch = dict(frames=torch.randn(1, T, 3, 72, 100, generator=g),
                     audio=torch.randn(1, T, 1, 96, 64, generator=g))
        with torch.no_grad():
            out = model(batch)
            feats = model.visual_encoder(batch["frames"])
        assert out["pred_masks"].shape == (1, T, 3, 18, 25)
        assert out["pred_logits"].shape == (1, T, 3, 3)
        assert [tuple(x.shape[-2:]) for x in feats["levels"]] == [(9, 13), (5, 7), (3, 4)]
        assert torch.isfinite(out["pred_masks"]).all()
        if T == 3:  # per frame or per clip: change frame 1, look at frame 0's backbone map
            other = batch["frames"].clone()
            other[:, 1] = torch.randn(3, 72, 100, generator=g)
            with torch.no_grad():
                moved = (model.visual_encoder(other)["c2"][:, 0] - feats["c2"][:, 0]).abs().max()
            assert (moved > 1e-4) == (backbone == "video-swin-t")


def test_sqd_with_video_swin_padding_frames_never_move_real_frames(monkeypatch):
    """The whole model with the clip backbone: 5 real frames padded to 7 (zeros or loud noise) give
    the real frames' outputs of the 5 frames alone."""
    torch.manual_seed(0)
    model = _tiny_sqd(monkeypatch, "video-swin-t")
    g = torch.Generator().manual_seed(1)
    B, T, Tp, H = 2, 5, 7, 40
    frames, audio = torch.randn(B, T, 3, H, H, generator=g), torch.randn(B, T, 1, 96, 64, generator=g)

    def run(fill):
        if fill is None:
            batch = dict(frames=frames, audio=audio, frame_valid=torch.ones(B, T, dtype=torch.bool))
        else:
            pad = fill * torch.randn(B, Tp - T, 3, H, H, generator=g)
            batch = dict(frames=torch.cat([frames, pad], 1),
                         audio=torch.cat([audio, fill * torch.randn(B, Tp - T, 1, 96, 64, generator=g)], 1),
                         frame_valid=torch.arange(Tp)[None].expand(B, Tp) < T)
        with torch.no_grad():
            out = copy.deepcopy(model)(batch)
        return {"masks": out["pred_masks"][:, :T], "logits": out["pred_logits"][:, :T],
                "g": out["tokens"]["global"]}

    alone, zeros, noise = run(None), run(0.0), run(100.0)
    for k in alone:
        torch.testing.assert_close(zeros[k], noise[k], rtol=1e-5, atol=1e-5, msg=k)
        torch.testing.assert_close(alone[k], noise[k], rtol=1e-5, atol=1e-5, msg=k)
