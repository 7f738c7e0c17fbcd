"""Tests of sqd.py: eq. (11) inference, the assembled model of Fig. 3, ablations, overfitting."""

import pytest
import torch

from matcher import SetCriterion, track_batch
from sqd import SQD, ModelConfig, foreground_probability, preset, segment


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


# ------------------------------------------------------------------------------ eq. (11)

def test_eq11_hand_built_two_token_example():
    """Two real tokens and one dropped token on a 2x2 frame; every pixel worked out by hand.

    token 0: P = (0.80, 0.10, 0.05)  M = [[0.9, 0.6], [0.2, 0.4]]
    token 1: P = (0.05, 0.10, 0.70)  M = [[0.7, 0.9], [0.3, 0.1]]
    token 2: P = (0.05, 0.05, 0.05)  M = 0.99 everywhere  -> best class prob < 0.1: dropped
    pixel (0,0): covered by 0 and 1; scores c1 .8*.9+.05*.7 = .755, c2 .16, c3 .535 -> class 1
    pixel (0,1): covered by 0 and 1; c1 .48+.045 = .525, c2 .15, c3 .03+.63 = .66   -> class 3
    pixel (1,0), (1,1): no kept token above 0.5 (token 2 is dropped)                  -> 0
    """
    P = [[0.80, 0.10, 0.05], [0.05, 0.10, 0.70], [0.05, 0.05, 0.05]]
    M = [[[0.9, 0.6], [0.2, 0.4]], [[0.7, 0.9], [0.3, 0.1]], [[0.99, 0.99], [0.99, 0.99]]]
    logits = logit(P)[None, None]                         # (1, 1, 3, 3)
    masks = logit(M)[None, None]                          # (1, 1, 3, 2, 2)
    out = segment(logits, masks, (2, 2))
    assert out.dtype == torch.int64
    assert out[0, 0].tolist() == [[1, 3], [0, 0]]


def test_eq11_no_object_never_wins_and_sum_is_over_tokens():
    """A covered pixel always gets a real class, even when every class probability is small;
    and two tokens of one class add up against one stronger token of another class."""
    # one token, class probs all low but above the 0.1 keep threshold: the pixel still gets class 2
    logits = logit([[0.11, 0.12, 0.0001]])[None, None]    # (1, 1, 1, 3)
    masks = logit([[[0.9]]])[None, None]                  # (1, 1, 1, 1, 1)
    assert segment(logits, masks, (1, 1)).item() == 2
    # tokens 0 and 1 vote class 1 with 0.5 * 0.8 each (sum .8); token 2 votes class 2 with .7 * .9
    logits = logit([[0.5, 0.01], [0.5, 0.01], [0.01, 0.7]])[None, None]  # (1, 1, 3, 2)
    masks = logit([[[0.8]], [[0.8]], [[0.9]]])[None, None]               # (1, 1, 3, 1, 1)
    # by hand: c1 = .5*.8 + .5*.8 + .01*.9 = .809 ; c2 = .01*.8*2 + .7*.9 = .646
    assert segment(logits, masks, (1, 1)).item() == 1


def test_eq11_binary_foreground_probability_is_max_over_tokens():
    P = [[0.9], [0.4]]
    M = [[[0.5, 0.1]], [[0.9, 0.9]]]
    logits = logit(P)[None, None]                         # (1, 1, 2, 1)
    masks = logit(M)[None, None]                          # (1, 1, 2, 1, 2)
    fg = foreground_probability(logits, masks, (1, 2))[0, 0]
    expected = torch.tensor([[max(0.9 * 0.5, 0.4 * 0.9), max(0.9 * 0.1, 0.4 * 0.9)]],
                            dtype=torch.float64)
    torch.testing.assert_close(fg, expected)


# ------------------------------------------------------------------------------ the model

def tiny_cfg(**kw) -> ModelConfig:
    base = dict(num_classes=3, dim=32, ffn_dim=64, codebook_size=8, num_tokens=3)
    base.update(kw)
    return preset("cpu", **base)


def random_batch(B=2, T=5, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(B, T, H, H, dtype=torch.long)
    labels[0, :, 4:14, 4:14] = 1
    labels[-1, :, 16:28, 10:24] = 2
    labels[-1, 2:, 2:8, 2:10] = 3
    return dict(frames=torch.randn(B, T, 3, H, H, generator=g),
                audio=torch.randn(B, T, 1, 96, 64, generator=g),
                labels=labels, label_valid=torch.ones(B, T, dtype=torch.bool),
                frame_valid=torch.ones(B, T, dtype=torch.bool))


def loss_and_grads(model, batch):
    """Loss, outputs, and the parameters that got no (or an all-zero, or non-finite) gradient.

    One optimizer step is taken first: the deformable attention's offset and weight layers are
    zero-initialised (as in Deformable-DETR), so at step 0 the gradient to their inputs (the
    level embedding) is exactly zero by construction; from step 1 on it is not.
    """
    crit = SetCriterion(model.cfg.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = model(batch)
    tracks = track_batch(batch["labels"], batch["label_valid"], model.cfg.num_classes,
                         out["pred_masks"].shape[-2:])  # as train.forward_loss: at the mask resolution
    total, _ = crit(out, tracks)
    total.backward()
    opt.step()
    out = model(batch)
    total, parts = crit(out, tracks)
    model.zero_grad(set_to_none=True)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    return out, total, parts, missing


def test_cpu_preset_forward_backward_shapes_and_every_parameter_learns():
    torch.manual_seed(0)
    cfg = preset("cpu")
    model = SQD(cfg)
    B, T, H = 2, 5, 64
    batch = random_batch(B, T, H)
    out, total, parts, missing = loss_and_grads(model, batch)
    N, C, Kc, h = cfg.num_tokens, cfg.dim, cfg.num_classes, H // 4
    assert out["pred_logits"].shape == (B, T, N, Kc)          # a class score per token and frame
    assert out["pred_masks"].shape == (B, T, N, h, h)
    assert out["pred_boxes"].shape == (B, T, N, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert out["indices"]["global"].shape == (B, N)            # step 6
    assert out["indices"]["local"].shape == (B, T, N)          # step 8
    assert out["tokens"]["global"].shape == (B, N, C)
    assert out["tokens"]["local"].shape == (B, T, N, C)
    assert set(out["quant"]) == {"quant_codebook", "quant_commit_global", "quant_commit_local"}
    assert torch.isfinite(total)
    assert missing == [], f"parameters without a useful gradient: {missing}"


def test_local_path_never_updates_the_shared_codebook_in_the_model():
    """eq. (9): the local commitment term alone gives the codebook no gradient; the first term does."""
    torch.manual_seed(0)
    model = SQD(tiny_cfg())
    out = model(random_batch())
    out["quant"]["quant_commit_local"].backward(retain_graph=True)
    assert model.vq.codebook.grad is None or model.vq.codebook.grad.abs().sum() == 0
    out["quant"]["quant_codebook"].backward()
    assert model.vq.codebook.grad.abs().sum() > 0


def test_paper_preset_builds_with_resnet50_and_runs_one_forward_pass():
    torch.manual_seed(0)
    cfg = preset("paper")
    assert (cfg.dim, cfg.num_tokens, cfg.codebook_size, cfg.backbone) == (256, 5, 128, "resnet50")
    assert cfg.dec_layers == 3
    model = SQD(cfg).eval()
    assert len(model.visual_encoder.backbone.state_dict()) == 320
    B, T, H = 1, 5, 224
    batch = dict(frames=torch.randn(B, T, 3, H, H), audio=torch.randn(B, T, 1, 96, 64))
    with torch.no_grad():
        out = model(batch)
    assert out["pred_masks"].shape == (B, T, 5, 56, 56)
    assert out["pred_logits"].shape == (B, T, 5, 70)
    assert torch.isfinite(out["pred_masks"]).all()


@pytest.mark.parametrize("switches", [
    dict(use_gsd=False, use_avsr=False, use_lsd=False),        # Table 2 baseline
    dict(use_avsr=False, use_lsd=False),                       # +GSD
    dict(use_lsd=False),                                       # +GSD+AVSR
    dict(shared_codebook=False),                               # +GSD+AVSR+LSD (no SC)
    dict(codebook_size=1, num_tokens=1),                       # Tables 3 and 4 extremes
    dict(zero_audio=True),                                     # the control's batch (data.ZeroAudio)
])
def test_ablation_switches_build_train_and_every_parameter_learns(switches):
    torch.manual_seed(0)
    model = SQD(tiny_cfg(**{k: v for k, v in switches.items() if k != "zero_audio"}))
    batch = random_batch()
    if switches.get("zero_audio"):
        batch["audio"] = torch.zeros_like(batch["audio"])                # (B, T, 1, 96, 64)
    out, total, parts, missing = loss_and_grads(model, batch)
    assert torch.isfinite(total)
    if switches.get("zero_audio"):
        # with the audio zeroed, the audio encoder's input layer cannot learn; everything else must
        missing = [n for n in missing if not n.startswith("audio_encoder.")]
    assert missing == [], f"parameters without a useful gradient: {missing}"
    if switches.get("shared_codebook") is False:
        assert model.local_vq is not None
        assert {"quant_codebook_local", "quant_commit_local"} <= set(out["quant"])
        assert model.local_vq.codebook.grad.abs().sum() > 0
    if not switches.get("use_lsd", True):
        assert "local" not in out["indices"]


def test_baseline_queries_are_learnable_queries_plus_frame_audio():
    """Table 2 baseline: different frames' audio gives different queries (hence different masks)."""
    torch.manual_seed(0)
    model = SQD(tiny_cfg(use_gsd=False, use_avsr=False, use_lsd=False)).eval()
    batch = random_batch(B=1)
    batch["frames"][:] = batch["frames"][:, :1]          # every frame shows the same picture
    with torch.no_grad():
        out = model(batch)
    assert not torch.allclose(out["pred_logits"][0, 0], out["pred_logits"][0, 1])


def test_impossible_switch_combinations_raise_clear_errors():
    with pytest.raises(ValueError, match="use_avsr needs use_gsd"):
        SQD(tiny_cfg(use_gsd=False, use_avsr=True))
    with pytest.raises(ValueError, match="no-shared-codebook"):
        SQD(tiny_cfg(shared_codebook=False, use_lsd=False))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("laptop")


def test_whole_clip_of_any_length_in_one_pass():
    """App. A: a model built with the training length T = 5 segments clips of 3, 7 and 10 frames
    in one forward, with one set of global tokens per clip; the last frame's audio reaches the
    first frame's global tokens (there are no windows)."""
    torch.manual_seed(0)
    model = SQD(tiny_cfg()).eval()
    for T in (3, 7, 10):
        b = random_batch(B=1, T=T)
        with torch.no_grad():
            out = model(b)
        assert out["pred_masks"].shape[:3] == (1, T, 3)
        assert out["tokens"]["global"].shape == (1, 3, 32)       # (B, N, C): one set per clip
        assert out["indices"]["local"].shape == (1, T, 3)
    b = random_batch(B=1, T=10)
    changed = {k: v.clone() for k, v in b.items()}
    changed["audio"][:, 9] = torch.randn(1, 96, 64)
    with torch.no_grad():
        g_a, g_b = model(b)["tokens"]["global"], model(changed)["tokens"]["global"]
    assert (g_a - g_b).abs().max() > 1e-4


def _without_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def _real_frame_outputs(out, T):
    """Everything a real frame gets (frames [0, T)), and everything per clip, flattened to a dict."""
    got = {k: out[k][:, :T] for k in ("pred_logits", "pred_masks", "pred_boxes")}
    for i, aux in enumerate(out["aux_outputs"]):
        got.update({f"aux{i}_{k}": v[:, :T] for k, v in aux.items()})
    got["g"] = out["tokens"]["global"]
    got["l"] = out["tokens"]["local"][:, :T]
    got.update(out["quant"])
    return got


@pytest.mark.parametrize("preset_name", ["cpu", "paper"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_padding_frames_never_move_real_frames(preset_name, train_mode):
    """5 real frames padded to 7: the padding's content (zeros or loud noise) does not change any
    output of a real frame, nor the clip's global tokens and eq. (9) terms, and all of them equal
    those of the same 5 frames unpadded; in train mode also eq. (5)'s BatchNorm running statistics
    (paper preset). Padded frames must take no attention or softmax mass anywhere."""
    import copy
    torch.manual_seed(0)
    if preset_name == "cpu":
        model, H = SQD(tiny_cfg()), 32
        audio_shape = (1, 96, 64)                       # log-mel through SmallVGG
    else:  # BatchNorm in eq. (5), frozen-BN ResNet-18 (ResNet-50's layout at a third of the cost)
        model = SQD(preset("paper", num_classes=3, backbone="resnet18", dim=64, ffn_dim=64,
                           enc_layers=1, dec_layers=2, num_heads=4))
        H, audio_shape = 64, (1, 96, 64)                # log-mel through VGGish
    model.train(train_mode)
    B, T, Tp = 2, 5, 7
    g = torch.Generator().manual_seed(1)
    real = dict(frames=torch.randn(B, T, 3, H, H, generator=g),
                audio=torch.randn(B, T, *audio_shape, generator=g),
                frame_valid=torch.ones(B, T, dtype=torch.bool))

    def padded(fill):
        frames = torch.cat([real["frames"], fill * torch.randn(B, Tp - T, 3, H, H, generator=g)], 1)
        audio = torch.cat([real["audio"], fill * torch.randn(B, Tp - T, *audio_shape, generator=g)], 1)
        valid = torch.arange(Tp)[None].expand(B, Tp) < T                       # (B, Tp)
        return dict(frames=frames, audio=audio, frame_valid=valid)

    def run(m, batch):
        torch.manual_seed(123)                          # the same dropout draws for equal shapes
        with torch.set_grad_enabled(train_mode):
            return _real_frame_outputs(m(batch), T)

    zeros, noise = padded(0.0), padded(100.0)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    out_zeros, out_noise = run(a, zeros), run(b, noise)
    assert out_zeros.keys() == out_noise.keys()
    for k in out_zeros:
        torch.testing.assert_close(out_zeros[k], out_noise[k], rtol=1e-5, atol=1e-5, msg=k)

    # Unpadded against padded: dropout masks cannot match across shapes, so dropout is off here.
    a, b = copy.deepcopy(_without_dropout(model)), copy.deepcopy(_without_dropout(model))
    out_real, out_pad = run(a, real), run(b, noise)
    for k in out_real:
        torch.testing.assert_close(out_real[k], out_pad[k], rtol=1e-5, atol=1e-5, msg=k)
    if train_mode and preset_name == "paper":
        for bn_a, bn_b in zip(a.avsr, b.avsr):         # BN statistics from the real frames only
            torch.testing.assert_close(bn_a.norm.running_mean, bn_b.norm.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bn_a.norm.running_var, bn_b.norm.running_var, rtol=1e-5, atol=1e-6)


def test_overfitting_one_tiny_batch():
    """The total loss falls below a third of its start within a few hundred CPU steps."""
    torch.manual_seed(0)
    model = SQD(tiny_cfg())
    batch = random_batch()
    crit = SetCriterion(model.cfg.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        out = model(batch)
        tracks = track_batch(batch["labels"], batch["label_valid"], model.cfg.num_classes,
                             out["pred_masks"].shape[-2:])  # as train.forward_loss
        total, _ = crit(out, tracks)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(total.item())
        if losses[-1] < losses[0] / 3 and len(losses) > 20:
            break
    assert min(losses[-10:]) < losses[0] / 3, (losses[0], losses[-10:])
