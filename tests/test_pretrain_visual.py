"""pretrain.py's visual side (pretrain_visual): the referring-segmentation pretraining of the
visual side, and how train.py loads it as the visual stand-in of a synthetic run."""
import os
import sys

import pytest
import torch

from sqd import SQD, preset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain  # noqa: E402


def test_fixed_assignment_sends_query_c_to_category_c_in_every_layer():
    real = torch.tensor([[True, False, True], [False, False, False]])     # (B=2, Kc=3)
    got = pretrain.fixed_assignment(real, layers=2)
    assert got.tolist() == [[0, -1, 2, 0, -1, 2], [-1, -1, -1, -1, -1, -1]]


def test_referring_targets_are_every_visible_object_of_the_category():
    object_map = torch.zeros(1, 2, 8, 8, dtype=torch.long)                 # (B, T, H, W)
    object_map[0, 0, :4, :4] = 2                                            # category 2, frame 0 only
    object_map[0, :, 4:, 4:] = 3                                            # category 3, both frames
    t = pretrain.referring_targets(object_map, num_classes=3, size=(8, 8))
    assert t.real.tolist() == [[False, True, True]]
    for c in (1, 2, 3):                                                     # slot c-1 is object_map == c
        assert torch.equal(t.masks[0, c - 1], (object_map[0] == c).float())
    assert t.sounding[0, 1].tolist() == [True, False]                       # "visible in that frame"


def test_referring_segmenter_queries_are_the_category_embeddings():
    torch.manual_seed(0)
    cfg = preset("cpu", num_classes=3, dim=32, ffn_dim=64, codebook_size=8, num_tokens=2)
    model = pretrain.ReferringSegmenter(cfg).eval()
    seen = []
    model.mask_decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = model(torch.randn(2, 3, 3, 32, 32))
    assert out["pred_logits"].shape == (2, 3, 3, 3)                         # (B, T, Kc queries, Kc)
    assert torch.equal(seen[0][1, 2], model.queries.weight)                 # clip 1, frame 2: E[c]


def _tiny_state(cfg, seed=1):
    torch.manual_seed(seed)
    model = pretrain.ReferringSegmenter(cfg)
    return {k: v for k, v in model.state_dict().items() if k.startswith(pretrain.KEPT)}


def test_load_into_sets_the_kept_modules_and_nothing_else(tmp_path):
    cfg = preset("cpu", num_classes=3, dim=32, ffn_dim=64, codebook_size=8, num_tokens=2)
    state = _tiny_state(cfg)
    path = str(tmp_path / "v.pt")
    torch.save(state, path)
    for row in (dict(), dict(use_gsd=False, use_avsr=False, use_lsd=False), dict(slot_positions=True)):
        torch.manual_seed(0)
        model = SQD(preset("cpu", num_classes=3, dim=32, ffn_dim=64, codebook_size=8, num_tokens=2, **row))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert pretrain.load_visual_into(model, path) == len(state)
        after = model.state_dict()
        for k, v in after.items():
            assert torch.equal(v, state[k] if k in state else before[k]), k
    wrong = preset("cpu", num_classes=5, dim=32, ffn_dim=64, codebook_size=8, num_tokens=2)  # another Kc
    with pytest.raises(ValueError, match="do not fit"):
        pretrain.load_visual_into(SQD(wrong), path)


def test_the_visual_stand_in_is_loaded_from_the_cache_unless_a_file_starts_the_visual_side(tmp_path, monkeypatch):
    """pretrained.load_start_weights on the synthetic CPU preset loads the cached visual file (placed there
    by hand with the audio one, so nothing trains here); with another backbone it loads nothing."""
    from pretrained import load_start_weights
    from train import TrainConfig, resolve
    monkeypatch.setattr(pretrain, "STAND_IN_DIR", str(tmp_path))
    cfg, model_cfg = resolve(TrainConfig(), 3)
    state = _tiny_state(model_cfg)
    audio_path, visual_path = pretrain.stand_in_paths(str(tmp_path), model_cfg, 0)  # where train.py looks
    torch.save(state, visual_path)
    from encoders import SmallVGG
    torch.save(SmallVGG().state_dict(), audio_path)
    fpn = [k for k in state if k.startswith("fpn.")]
    torch.manual_seed(0)
    model = SQD(model_cfg)
    load_start_weights(model, cfg, main_proc=False)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in fpn)
    # another backbone than the preset's small CNN: the file was not made for it, nothing loads
    cfg, model_cfg = resolve(TrainConfig(backbone="resnet18"), 3)
    model = SQD(model_cfg)
    built = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(pretrain.KEPT)}
    load_start_weights(model, cfg, main_proc=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in built.items())


def test_loss_weights_are_the_synthetic_recipes():
    from train import RECIPES
    assert pretrain.LOSS_WEIGHTS == RECIPES["synthetic"]["loss_weights"]


def test_a_first_run_builds_both_pretrainings_at_once_and_gets_the_sequential_files(tmp_path, monkeypatch, capsys):
    """With neither cached file there, pretrained.load_start_weights builds the visual side in a spawned
    process while it builds the audio network: each file is bit-identical to the one its pretraining
    makes alone here (one thread, own random streams), and both are loaded into the model."""
    from pretrained import load_start_weights
    from train import TrainConfig, resolve
    monkeypatch.setattr(pretrain, "DEFAULT_VISUAL_STEPS", 2)  # passed to the child as an argument
    monkeypatch.setattr(pretrain, "DEFAULT_AUDIO_STEPS", 3)
    monkeypatch.setattr(pretrain, "DEFAULT_AUDIO_CLIPS", 4)
    monkeypatch.setattr(pretrain, "STAND_IN_DIR", str(tmp_path))
    cfg, model_cfg = resolve(TrainConfig(eval_clips=4), 24)
    model = SQD(model_cfg)
    load_start_weights(model, cfg, main_proc=True)
    assert "visual pretraining: in process" in capsys.readouterr().out  # the two ran at once
    visual = torch.load(tmp_path / pretrain.visual_cache_name(model_cfg, 0, 2), weights_only=True)
    audio = torch.load(tmp_path / pretrain.audio_cache_name(0, 3, 4), weights_only=True)
    alone_visual, _ = pretrain.pretrain_visual(model_cfg, 0, 2, img_size=cfg.img_size, log=None)
    alone_audio, _ = pretrain.pretrain_audio(0, 3, 4, 4, log=None)
    for built, alone in ((visual, alone_visual), (audio, alone_audio)):
        assert built.keys() == alone.keys() and all(torch.equal(built[k], alone[k]) for k in built)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in visual.items())
    assert all(torch.equal(own["audio_encoder.net." + k], v) for k, v in audio.items())
