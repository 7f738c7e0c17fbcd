"""Tests for encoders.py: each compares with an independent computation (hand loops, a hand-written
key table, numpy re-derivations of the VGGish recipe, torch reference ops)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.signal import resample_poly

from encoders import (FPN, AudioEncoder, FrozenBatchNorm2d, MSDeformAttn, ResNet, SmallBackbone, SmallVGG,
                      TemporalAttention, VGGish, VisualEncoder, ms_deform_attn_core, sine_embedding_1d,
                      sine_position_embedding, vggish_log_mel)


# ------------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# ------------------------------------------------------------------------------------------------
def _bilinear_by_hand(img, x, y):
    """img (D, H, W); (x, y) normalised in [0,1] with pixel i's centre at (i+0.5)/W; zeros outside."""
    D, H, W = img.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(D, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out += wy * wx * img[:, yy, xx]
    return out


def test_ms_deform_attn_core_matches_hand_loop():
    torch.manual_seed(0)
    N, M, D, P, Lq = 2, 2, 3, 3, 4
    shapes = [(5, 4), (3, 3), (2, 1)]
    L, S = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, L, P, 2, dtype=torch.float64) * 1.4 - 0.2  # some samples fall outside
    loc[0, 0, 0, 0, 0] = torch.tensor([2.5 / 4, 1.5 / 5], dtype=torch.float64)  # exactly on pixel (y=1, x=2)
    attn = torch.rand(N, Lq, M, L, P, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    out = ms_deform_attn_core(value, shapes, loc, attn)
    assert out.shape == (N, Lq, M * D)

    expected = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    for n in range(N):
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            level = value[n, start:start + h * w]  # (h*w, M, D) row-major
            start += h * w
            for m in range(M):
                img = level[:, m].t().reshape(D, h, w)
                for q in range(Lq):
                    for p in range(P):
                        x, y = loc[n, q, m, lvl, p].tolist()
                        expected[n, q, m] += attn[n, q, m, lvl, p] * _bilinear_by_hand(img, x, y)
    torch.testing.assert_close(out, expected.view(N, Lq, M * D), rtol=1e-10, atol=1e-10)

    # A sample on a pixel centre reads that pixel exactly (align_corners=False convention).
    one = torch.zeros_like(attn)
    one[0, 0, 0, 0, 0] = 1.0
    got = ms_deform_attn_core(value, shapes, loc, one)[0, 0, :D]
    torch.testing.assert_close(got, value[0, 1 * 4 + 2, 0])


def test_ms_deform_attn_initial_offsets_are_the_square_ring():
    attn = MSDeformAttn(dim=16, num_levels=2, num_heads=8, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    ring = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]  # by hand
    for m, (dx, dy) in enumerate(ring):
        for lvl in range(2):
            for p in range(3):
                torch.testing.assert_close(bias[m, lvl, p], torch.tensor([dx, dy], dtype=torch.float32) * (p + 1),
                                           atol=1e-5, rtol=0)
    # Zero-init attention logits -> uniform weights over levels and points.
    q = torch.randn(1, 5, 16)
    assert torch.count_nonzero(attn.attention_weights(q)) == 0


# ------------------------------------------------------------------------------------------------
# ResNet: torchvision's key format, written out independently from the architecture
# ------------------------------------------------------------------------------------------------
def _bn(prefix, c):
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def _torchvision_resnet_keys(depth):
    bottleneck = depth == 50
    counts = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
    keys = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64)
    in_ch = 64
    for stage, (planes, count) in enumerate(zip([64, 128, 256, 512], counts), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            if bottleneck:
                out = planes * 4
                keys += [(f"{p}.conv1.weight", (planes, in_ch, 1, 1))] + _bn(f"{p}.bn1", planes)
                keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
                keys += [(f"{p}.conv3.weight", (out, planes, 1, 1))] + _bn(f"{p}.bn3", out)
                has_down = i == 0  # every stage's first block, layer1 included (64 -> 256)
            else:
                out = planes
                keys += [(f"{p}.conv1.weight", (planes, in_ch, 3, 3))] + _bn(f"{p}.bn1", planes)
                keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
                has_down = i == 0 and stage > 1
            if has_down:
                keys += [(f"{p}.downsample.0.weight", (out, in_ch, 1, 1))] + _bn(f"{p}.downsample.1", out)
            in_ch = out
    keys += [("fc.weight", (1000, in_ch)), ("fc.bias", (1000,))]
    return keys


@pytest.mark.parametrize("depth,count", [(50, 320), (18, 122)])
def test_resnet_keys_and_shapes_are_torchvisions(depth, count):
    expected = _torchvision_resnet_keys(depth)
    assert len(expected) == count
    for frozen in (False, True):
        model = ResNet(depth, frozen_bn=frozen)
        got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert got == expected  # same names, order and shapes
        if not frozen:
            num_params = sum(p.numel() for p in model.parameters())
    if depth == 50:
        assert sum(1 for k, _ in expected if k.endswith("num_batches_tracked")) == 53
        table_params = sum(math.prod(s) for k, s in expected if k.endswith(("weight", "bias")))
        assert table_params == num_params == 25_557_032


def test_resnet_state_dict_round_trip_and_frozen_bn(tmp_path):
    torch.manual_seed(0)
    src = ResNet(50)
    with torch.no_grad():  # non-trivial BN statistics so the comparison means something
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(7)
    path = tmp_path / "resnet50.pth"
    torch.save(src.state_dict(), path)
    dst = ResNet(50).load_torchvision_weights(path)
    frozen = ResNet(50, frozen_bn=True).load_torchvision_weights(path)
    dst_state, frozen_state = dst.state_dict(), frozen.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(dst_state[k], v)
        assert torch.equal(frozen_state[k], v)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    src.double().eval()
    frozen.double()
    with torch.no_grad():
        ref = src(x)
        got = frozen(x)
    assert [tuple(c.shape) for c in ref] == [(1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 2, 2), (1, 2048, 1, 1)]
    assert src.channels == (256, 512, 1024, 2048)
    for a, b in zip(ref, got):  # frozen BN == BatchNorm2d in eval mode
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    # Old weight files without num_batches_tracked load strictly into the frozen-BN model too.
    old = {k: v for k, v in src.float().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, path)
    frozen.float().load_torchvision_weights(path)
    assert int(frozen.bn1.num_batches_tracked) == 0


def test_frozen_batchnorm_equals_batchnorm_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    fbn = FrozenBatchNorm2d(6)
    fbn.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(2, 6, 3, 5)
    torch.testing.assert_close(fbn(x), bn(x))


def test_small_backbone_strides():
    out = SmallBackbone()(torch.randn(2, 3, 64, 64))
    assert [tuple(c.shape[-2:]) for c in out] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [c.shape[1] for c in out] == list(SmallBackbone().channels)


# ------------------------------------------------------------------------------------------------
# Positional embedding, visual encoder, FPN
# ------------------------------------------------------------------------------------------------
def test_sine_position_embedding_hand_values():
    h, w, dim = 3, 5, 8
    pos = sine_position_embedding(h, w, dim)
    assert pos.shape == (dim, h, w)
    half = dim // 2
    for i in range(h):
        for j in range(w):
            yv = (i + 0.5) / h * 2 * math.pi
            xv = (j + 0.5) / w * 2 * math.pi
            for k in range(half):
                f = 10000 ** (2 * (k // 2) / half)
                trig = math.sin if k % 2 == 0 else math.cos
                assert abs(pos[k, i, j].item() - trig(yv / f)) < 1e-5
                assert abs(pos[half + k, i, j].item() - trig(xv / f)) < 1e-5


def _tiny_visual_encoder():
    return VisualEncoder(SmallBackbone(), dim=32, enc_layers=2, num_heads=4, num_points=2,
                         ffn_dim=64, dropout=0.0)


def test_visual_encoder_shapes_and_fpn():
    torch.manual_seed(0)
    enc = _tiny_visual_encoder().eval()
    frames = torch.randn(2, 2, 3, 64, 64)
    out = enc(frames)
    assert [tuple(x.shape) for x in out["levels"]] == [(2, 2, 32, 8, 8), (2, 2, 32, 4, 4), (2, 2, 32, 2, 2)]
    assert [tuple(x.shape) for x in out["pos"]] == [(2, 2, 32, 8, 8), (2, 2, 32, 4, 4), (2, 2, 32, 2, 2)]
    assert tuple(out["c2"].shape) == (2, 2, 16, 16, 16)
    torch.testing.assert_close(out["pos"][1][1, 0], sine_position_embedding(4, 4, 32))
    fpn = FPN(32, enc.c2_channels, mask_dim=8)
    f_out = fpn([x.flatten(0, 1) for x in out["levels"]], out["c2"].flatten(0, 1))
    assert tuple(f_out.shape) == (4, 8, 16, 16)
    # nothing is sized by T: the same encoder takes 1, 3 and 10 frames
    for T in (1, 3, 10):
        assert tuple(enc(torch.randn(1, T, 3, 64, 64))["levels"][2].shape) == (1, T, 32, 2, 2)


def test_visual_encoder_aggregates_over_frames():
    """Temporal aggregation: changing frame 1 changes frame 0's encoded levels (time attention)
    but not frame 0's backbone features; masking frame 1 as padding makes frame 0's output
    independent of it."""
    torch.manual_seed(0)
    enc = _tiny_visual_encoder().eval()
    a = torch.randn(1, 2, 3, 64, 64)
    b = a.clone()
    b[:, 1] = torch.randn(3, 64, 64)
    with torch.no_grad():
        oa, ob = enc(a), enc(b)
        assert torch.equal(oa["c2"][:, 0], ob["c2"][:, 0])
        assert (oa["levels"][0][:, 0] - ob["levels"][0][:, 0]).abs().max() > 1e-4
        valid = torch.tensor([[True, False]])
        ma, mb = enc(a, frame_valid=valid), enc(b, frame_valid=valid)
        torch.testing.assert_close(ma["levels"][0][:, 0], mb["levels"][0][:, 0])


# ------------------------------------------------------------------------------------------------
# VGGish front end against a fresh numpy computation of the documented recipe
# ------------------------------------------------------------------------------------------------
def _reference_log_mel(x16):
    """Independent numpy VGGish recipe on a 16 kHz mono float signal: loops where natural."""
    sr, win, hop, nfft = 16000, 400, 160, 512
    n_frames = 1 + (len(x16) - win) // hop
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * k / win) for k in range(win)])  # periodic
    k = np.arange(nfft // 2 + 1)[:, None]
    n = np.arange(win)[None, :]
    dft = np.exp(-2j * np.pi * k * n / nfft)  # (257, 400): the 512-point DFT of a zero-padded window
    spec = np.zeros((n_frames, nfft // 2 + 1))
    for f in range(n_frames):
        spec[f] = np.abs(dft @ (x16[f * hop:f * hop + win] * hann))

    def mel(hz):
        return 1127.0 * math.log(1.0 + hz / 700.0)

    edges = [mel(125.0) + i * (mel(7500.0) - mel(125.0)) / 65 for i in range(66)]
    fb = np.zeros((nfft // 2 + 1, 64))
    for b in range(1, nfft // 2 + 1):  # the DC bin (b = 0) stays zero
        m = mel(b * (sr / 2) / (nfft // 2))
        for j in range(64):
            lo, c, hi = edges[j], edges[j + 1], edges[j + 2]
            if lo < m <= c:
                fb[b, j] = (m - lo) / (c - lo)
            elif c < m < hi:
                fb[b, j] = (hi - m) / (hi - c)
    log_mel = np.log(spec @ fb + 0.01)
    n_ex = n_frames // 96
    return np.stack([log_mel[e * 96:(e + 1) * 96] for e in range(n_ex)]) if n_ex else np.zeros((0, 96, 64))


def test_vggish_log_mel_matches_numpy_recipe_16k_sine():
    t = np.arange(16000) / 16000.0
    x = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.1 * np.sin(2 * np.pi * 3000.0 * t)
    got = vggish_log_mel(x, 16000)
    assert got.shape == (1, 96, 64) and got.dtype == np.float32  # 1 s -> 98 frames -> 1 example
    np.testing.assert_allclose(got, _reference_log_mel(x), rtol=1e-5, atol=1e-4)
    # 2.5 s -> 248 frames -> 2 examples (tail dropped); shorter than one example -> none.
    x25 = np.sin(2 * np.pi * 440.0 * np.arange(40000) / 16000.0)
    np.testing.assert_allclose(vggish_log_mel(x25, 16000), _reference_log_mel(x25), rtol=1e-5, atol=1e-4)
    assert vggish_log_mel(x[:8000], 16000).shape == (0, 96, 64)
    # int16 PCM is scaled by 1/32768 as the VGGish wav reader does.
    pcm = np.round(x * 32767).astype(np.int16)
    np.testing.assert_allclose(vggish_log_mel(pcm, 16000), _reference_log_mel(pcm / 32768.0), rtol=1e-5, atol=1e-4)


def test_vggish_log_mel_48k_stereo():
    sr = 48000
    t48 = np.arange(sr) / sr
    left, right = np.sin(2 * np.pi * 440.0 * t48), 0.5 * np.sin(2 * np.pi * 1000.0 * t48)
    got = vggish_log_mel(np.stack([left, right], axis=1), sr)
    # Independent path: average channels, polyphase resample 48k -> 16k (1/3), the numpy recipe.
    ref = _reference_log_mel(resample_poly((left + right) / 2, 1, 3))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    # The same sound generated directly at 16 kHz mono gives (almost) the same log-mel.
    t16 = np.arange(16000) / 16000.0
    mono16 = (np.sin(2 * np.pi * 440.0 * t16) + 0.5 * np.sin(2 * np.pi * 1000.0 * t16)) / 2
    direct = vggish_log_mel(mono16, 16000)
    assert got.shape == direct.shape == (1, 96, 64)
    assert np.abs(got - direct).max() < 0.05


# ------------------------------------------------------------------------------------------------
# VGGish network, small VGG, audio encoder
# ------------------------------------------------------------------------------------------------
RELEASED_VGGISH = {  # implementation-notes §6.3, the released vggish-10086976.pth
    "features.0": ((64, 1, 3, 3), 64), "features.3": ((128, 64, 3, 3), 128),
    "features.6": ((256, 128, 3, 3), 256), "features.8": ((256, 256, 3, 3), 256),
    "features.11": ((512, 256, 3, 3), 512), "features.13": ((512, 512, 3, 3), 512),
    "embeddings.0": ((4096, 12288), 4096), "embeddings.2": ((4096, 4096), 4096),
    "embeddings.4": ((128, 4096), 128),
}


@pytest.fixture(scope="module")
def vggish():
    torch.manual_seed(0)
    return VGGish().eval()


def test_vggish_keys_shapes_count_and_tf_flatten(vggish, tmp_path):
    expected = {}
    for name, (w, b) in RELEASED_VGGISH.items():
        expected[f"{name}.weight"] = w
        expected[f"{name}.bias"] = (b,)
    got = {k: tuple(v.shape) for k, v in vggish.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in vggish.parameters()) == 72_141_184
    # Strict load of a file with exactly the released keys.
    path = tmp_path / "vggish.pth"
    torch.save(vggish.state_dict(), path)
    AudioEncoder("vggish", dim=64).load_net_weights(path)

    x = torch.randn(1, 1, 96, 64)
    with torch.no_grad():
        emb, conv = vggish(x)
        assert tuple(emb.shape) == (1, 128) and tuple(conv.shape) == (1, 512, 6, 4)
        # TF NHWC flatten by hand: index (h*4 + w)*512 + c holds conv[c, h, w].
        flat = torch.empty(12288)
        c_map = conv[0]
        for hh in range(6):
            for ww in range(4):
                flat[(hh * 4 + ww) * 512:(hh * 4 + ww + 1) * 512] = c_map[:, hh, ww]
        e = vggish.embeddings
        ref = torch.relu(e[4](torch.relu(e[2](torch.relu(e[0](flat))))))
        torch.testing.assert_close(emb[0], ref, rtol=1e-4, atol=1e-5)


def test_audio_encoder_shapes(vggish):
    torch.manual_seed(0)
    small = AudioEncoder("small", dim=32)
    emb = small(torch.randn(2, 3, 1, 96, 64))
    assert tuple(emb.shape) == (2, 3, 32)
    # the output leaves a LayerNorm (initial affine 1, 0): zero mean, unit variance per frame
    torch.testing.assert_close(emb.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.var(-1, unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)
    # the frame vector is LayerNorm(Linear(embedding)) of the wrapped network's 128-d embedding
    x = torch.randn(2, 3, 1, 96, 64)
    with torch.no_grad():
        ref = F.layer_norm(small.emb_proj(small.net(x.flatten(0, 1))[0]), (32,)).view(2, 3, 32)
        torch.testing.assert_close(small(x), ref)
    e, c = SmallVGG()(torch.randn(2, 1, 96, 64))
    assert tuple(e.shape) == (2, 128) and tuple(c.shape) == (2, SmallVGG().channels, 6, 4)

    big = AudioEncoder.__new__(AudioEncoder)  # reuse the module-scoped VGGish instead of building another
    nn.Module.__init__(big)
    big.kind, big.net = "vggish", vggish
    big.emb_proj, big.emb_norm = nn.Linear(128, 16), nn.LayerNorm(16)
    with torch.no_grad():
        emb = big(torch.randn(1, 2, 1, 96, 64))
    assert tuple(emb.shape) == (1, 2, 16)


def test_temporal_attention_equals_explicit_loop():
    """TemporalAttention against a hand loop: for each token position and head, softmax over the
    real frames of q.k / sqrt(D) with the time embedding on queries and keys, then residual + LN."""
    torch.manual_seed(0)
    B, T, S, C, M = 2, 4, 3, 8, 2
    D = C // M
    layer = TemporalAttention(C, M, dropout=0.0).eval()
    x = torch.randn(B, T, S, C)
    time_pos = sine_embedding_1d(T, C)
    valid = torch.tensor([[True, True, True, True], [True, False, True, False]])
    with torch.no_grad():
        got = layer(x, time_pos, valid)
        Wq, Wk, Wv = layer.attn.in_proj_weight.split(C)
        bq, bk, bv = layer.attn.in_proj_bias.split(C)
        ref = torch.empty_like(x)
        for b in range(B):
            for s in range(S):
                for t in range(T):
                    q = (x[b, t, s] + time_pos[t]) @ Wq.t() + bq  # (C,)
                    heads = []
                    for m in range(M):
                        sl = slice(m * D, (m + 1) * D)
                        scores = [float((q[sl] * ((x[b, u, s] + time_pos[u]) @ Wk.t() + bk)[sl]).sum()) / math.sqrt(D)
                                  for u in range(T) if valid[b, u]]
                        w = torch.tensor(scores).softmax(0)
                        vals = torch.stack([(x[b, u, s] @ Wv.t() + bv)[sl] for u in range(T) if valid[b, u]])
                        heads.append((w[:, None] * vals).sum(0))
                    out = layer.attn.out_proj(torch.cat(heads))
                    ref[b, t, s] = layer.norm(x[b, t, s] + out)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sine_embedding_1d_hand_values():
    emb = sine_embedding_1d(3, 6)
    for t in range(3):
        for i in range(3):
            angle = t / 10000 ** (2 * i / 6)
            assert abs(emb[t, 2 * i].item() - math.sin(angle)) < 1e-6
            assert abs(emb[t, 2 * i + 1].item() - math.cos(angle)) < 1e-6


def test_small_audio_net_weights_round_trip_through_a_file(tmp_path):
    """A SmallVGG state_dict written with torch.save loads strictly into another encoder's net:
    the same tensors, hence the same embeddings and the same F_a."""
    torch.manual_seed(0)
    source = SmallVGG()
    path = tmp_path / "small_vgg.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    enc = AudioEncoder("small", dim=32)
    x = torch.randn(2, 3, 1, 96, 64)
    with torch.no_grad():
        want = source(x.flatten(0, 1))[0]  # (6, 128)
        assert not torch.equal(enc.net(x.flatten(0, 1))[0], want)  # another initialisation
        enc.load_net_weights(path)
        got = enc.net.state_dict()
        assert got.keys() == source.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())
        assert torch.equal(enc.net(x.flatten(0, 1))[0], want)
        ref = F.layer_norm(enc.emb_proj(want), (32,)).view(2, 3, 32)  # LayerNorm(Linear(embedding))
        torch.testing.assert_close(enc(x), ref)


def test_bad_audio_weight_files_name_the_file_and_leave_the_net_untouched(tmp_path):
    torch.manual_seed(0)
    enc = AudioEncoder("small", dim=32)
    before = {k: v.clone() for k, v in enc.net.state_dict().items()}
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    pickled = tmp_path / "pickled_module.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a pickled object: weights_only=True refuses it
    truncated = tmp_path / "truncated.pt"
    torch.save(SmallVGG().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    a_list = tmp_path / "a_list.pt"
    torch.save([torch.zeros(1)], a_list)
    prefixed = tmp_path / "whole_encoder.pt"  # the AudioEncoder's state_dict, not its net's
    torch.save(AudioEncoder("small", dim=32).state_dict(), prefixed)
    narrow = tmp_path / "narrow.pt"           # the right keys, other widths
    torch.save(SmallVGG(widths=(8, 16, 32, 32)).state_dict(), narrow)
    cases = {tmp_path / "missing.pt": "cannot be read (FileNotFoundError",
             garbage: "cannot be read", truncated: "cannot be read (RuntimeError",
             pickled: "cannot be read (not a weights-only", a_list: "not a dict of tensors",
             prefixed: "unexpected keys ['net.features.0.weight'",
             narrow: "wrong shapes ['features.0.weight (8, 1, 3, 3) instead of (16, 1, 3, 3)'"}
    for path, reason in cases.items():
        with pytest.raises(ValueError) as err:
            enc.load_net_weights(path)
        msg = str(err.value)
        assert str(path) in msg and reason in msg, msg
        assert "expected a state_dict of the 'small' audio network (SmallVGG" in msg, msg
    with pytest.raises(ValueError, match=r"missing keys \['features.0.weight'"):
        enc.load_net_weights(prefixed)
    # a load that fails leaves nothing half-loaded (torch's strict load copies the tensors that fit)
    assert all(torch.equal(enc.net.state_dict()[k], v) for k, v in before.items())


def test_frozen_audio_net_has_no_gradient_and_stays_in_eval_mode():
    """freeze_net: no net parameter trains; model.train() leaves the net in eval mode, so a
    BatchNorm keeps its stored statistics and a dropout is off (eval-mode outputs, bit for bit);
    emb_proj and emb_norm, after the net, still train."""
    torch.manual_seed(0)
    enc = AudioEncoder("small", dim=32)
    enc.net.features[1] = nn.BatchNorm2d(16)  # a net with BatchNorm and dropout (SmallVGG has neither)
    enc.net.embeddings[1] = nn.Sequential(nn.ReLU(), nn.Dropout(0.5))
    with torch.no_grad():
        enc.net.features[1].running_mean.normal_()
        enc.net.features[1].running_var.uniform_(0.5, 2.0)
    stats = [enc.net.features[1].running_mean.clone(), enc.net.features[1].running_var.clone()]
    x = torch.randn(2, 3, 1, 96, 64)
    enc.eval()
    with torch.no_grad():
        want = enc(x)  # (2, 3, 32) eval mode throughout
    enc.freeze_net()
    model = nn.ModuleDict({"audio_encoder": enc}).train()  # train() reaches enc from a parent
    assert enc.training and enc.emb_proj.training and enc.emb_norm.training
    assert not any(m.training for m in enc.net.modules())
    assert not any(p.requires_grad for p in enc.net.parameters())
    assert all(p.requires_grad for p in [*enc.emb_proj.parameters(), *enc.emb_norm.parameters()])
    got = enc(x)
    assert torch.equal(got, want) and torch.equal(enc(x), want)
    assert torch.equal(enc.net.features[1].running_mean, stats[0])
    assert torch.equal(enc.net.features[1].running_var, stats[1])
    got.square().sum().backward()
    assert all(p.grad is None for p in enc.net.parameters())
    assert enc.emb_proj.weight.grad is not None and enc.emb_proj.weight.grad.abs().sum() > 0
    model.eval()
    assert not enc.training and not enc.emb_proj.training
