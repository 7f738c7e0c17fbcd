"""Tests of sqd.py: eq. (11) inference, the assembled model of Fig. 3, ablations, overfitting."""
import math

import pytest
import torch

from matcher import SetCriterion, build_tracks
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
    tracks = build_tracks(batch["labels"], batch["label_valid"], model.cfg.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    total, _ = crit(model(batch), tracks)
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
    assert out["pred_logits"].shape == (B, T, N, Kc)          # DESIGN §2 step 9
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
    assert model.codebook.codebook.grad is None or model.codebook.codebook.grad.abs().sum() == 0
    out["quant"]["quant_codebook"].backward()
    assert model.codebook.codebook.grad.abs().sum() > 0


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
    dict(avsr_from_quantized=False, shared_prototypes=True),
    dict(codebook_size=1, num_tokens=1),                       # Tables 3 and 4 extremes
    dict(zero_audio=True),
])
def test_ablation_switches_build_train_and_every_parameter_learns(switches):
    torch.manual_seed(0)
    model = SQD(tiny_cfg(**switches))
    out, total, parts, missing = loss_and_grads(model, random_batch())
    assert torch.isfinite(total)
    if switches.get("zero_audio"):
        # with the audio zeroed, the audio encoder's input layer cannot learn; everything else must
        missing = [n for n in missing if not n.startswith("audio_encoder.")]
    assert missing == [], f"parameters without a useful gradient: {missing}"
    if switches.get("shared_codebook") is False:
        assert model.local_codebook is not None
        assert {"quant_codebook_local", "quant_commit_local"} <= set(out["quant"])
        assert model.local_codebook.codebook.grad.abs().sum() > 0
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


def test_long_clip_runs_in_windows_equal_to_separate_windows():
    """A 10-frame clip (AVSS evaluation) equals its two 5-frame halves run one by one."""
    torch.manual_seed(0)
    model = SQD(tiny_cfg()).eval()
    b = random_batch(B=1, T=10)
    with torch.no_grad():
        whole = model({"frames": b["frames"], "audio": b["audio"]})
        halves = [model({"frames": b["frames"][:, s:s + 5], "audio": b["audio"][:, s:s + 5]})
                  for s in (0, 5)]
    for key in ("pred_logits", "pred_masks", "pred_boxes"):
        torch.testing.assert_close(whole[key], torch.cat([h[key] for h in halves], 1))
    # 7 frames: padded to 10 by repeating the last frame, then cut back to 7
    with torch.no_grad():
        seven = model({"frames": b["frames"][:, :7], "audio": b["audio"][:, :7]})
    assert seven["pred_masks"].shape[1] == 7
    torch.testing.assert_close(seven["pred_masks"][:, :5], halves[0]["pred_masks"])


def test_overfitting_one_tiny_batch():
    """The total loss falls below a third of its start within a few hundred CPU steps."""
    torch.manual_seed(0)
    model = SQD(tiny_cfg())
    batch = random_batch()
    crit = SetCriterion(model.cfg.num_classes)
    tracks = build_tracks(batch["labels"], batch["label_valid"], model.cfg.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        total, _ = crit(model(batch), tracks)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(total.item())
        if losses[-1] < losses[0] / 3 and len(losses) > 20:
            break
    assert min(losses[-10:]) < losses[0] / 3, (losses[0], losses[-10:])
