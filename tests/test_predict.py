"""Tests of predict.py: a clip of one's own end to end, eq. (11) on a hand-built model output,
the audio built exactly as the readers build it, every bad input (exit code 2, nothing written);
no top-level file imports the lab tools, and none imports another in a circle.
(The synthetic clip's picture is pictures.py's: tests/test_diagnostics.py.)

The checkpoint is trained for 2 steps in the tests themselves (synthetic, CPU preset, 32 px).
"""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import wavfile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import commands  # noqa: E402
import data  # noqa: E402
import pictures  # noqa: E402
import predict  # noqa: E402
import synthetic  # noqa: E402
from fixtures import RunsCode, tone_wav, voc_colour, write_avss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAME_NAMES = [f"f{i}.png" for i in range(8, 15)]   # natural order f8..f14; as text f10 < f8
SIZE = (48, 36)                                     # (W, H): not square


@pytest.fixture()
def clip(tmp_path):
    """7 frames of 48 x 36 (PNG) and a 7.2 s 44.1 kHz stereo wav."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, name in enumerate(FRAME_NAMES):
        image = np.full((SIZE[1], SIZE[0], 3), 120, dtype=np.uint8)
        image[5 + t % 3:25, 8 + t:30 + t] = (200, 40, 40)
        Image.fromarray(image).save(folder / name)
    (folder / "notes.txt").write_text("not a frame")
    wav = tmp_path / "audio.wav"
    tone_wav(str(wav), 44100, 7.2, 2)
    return folder, wav


def predict_cli(*args):
    """`python predict.py ARGS`, run in this process (tests/commands.py)."""
    return commands.run(predict.main, *args, check=False)


# ----------------------------------------------------------------------------------------------
# A clip of one's own, end to end
# ----------------------------------------------------------------------------------------------
def test_own_clip_writes_palette_pngs_at_frame_size_and_json_of_their_classes(run_dir, clip, tmp_path):
    frames, wav = clip
    out = tmp_path / "out"
    # Thresholds 0: after 2 training steps no token passes App. D's thresholds, and a picture of
    # background alone would make the checks below trivially true.
    proc = predict_cli("--checkpoint", run_dir / "last.pt", "--frames", frames, "--audio", wav,
                       "--out", out, "--class-threshold", "0", "--mask-threshold", "0",
                       "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in one pass" in proc.stdout
    pred = json.loads((out / "predictions.json").read_text())
    assert [f["file"] for f in pred["frames"]] == FRAME_NAMES           # natural order
    palette = {voc_colour(j): j for j in range(256)}                    # written out independently
    any_class = False
    for name, record in zip(FRAME_NAMES, pred["frames"]):
        label = Image.open(out / "labels" / name)
        assert label.size == SIZE and label.mode == "P"
        ids = np.asarray(label)                                         # (H, W) pixel values
        rgb = np.asarray(label.convert("RGB")).reshape(-1, 3)           # (H*W, 3) what a viewer shows
        assert {tuple(c) for c in rgb} <= set(palette)                  # AVSS palette colours only
        assert all(palette[tuple(c)] == j for c, j in zip(rgb, ids.reshape(-1)))  # colour = class id
        listed = sorted(c["class_id"] for c in record["classes"])
        assert listed == sorted(int(c) for c in np.unique(ids) if c > 0), (name, listed)
        any_class |= bool(listed)
        assert Image.open(out / "overlays" / name).size[0] >= SIZE[0]
    assert any_class, "every frame is background: the checks above were vacuous"
    gif = Image.open(out / "overlays.gif")
    assert gif.n_frames == len(FRAME_NAMES)
    assert sorted(os.listdir(tmp_path)) == ["audio.wav", "frames", "out"]  # no staging folder left


def test_long_clip_runs_in_chunks_and_says_so(run_dir, clip, tmp_path):
    frames, wav = clip
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(run_dir / "last.pt"), "--frames", str(frames),
                         "--audio", str(wav), "--out", str(out), "--max-frames", "3",
                         "--threads", "1"]) == 0
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["chunks"] == [[0, 2], [2, 5], [5, 7]]
    assert [f["chunk"] for f in pred["frames"]] == [0, 0, 1, 1, 1, 2, 2]


# ----------------------------------------------------------------------------------------------
# Eq. (11) on a hand-built model output
# ----------------------------------------------------------------------------------------------
def test_hand_built_output_gives_the_hand_computed_png(tmp_path):
    # N = 3 tokens, Kc = 3, masks 2 x 3 upsampled to a 4 x 6 frame (bilinear, half-pixel centres:
    # output column j samples input x = (j + 0.5) / 2 - 0.5, clamped to [0, 2]).
    logits = torch.full((1, 3, 3), -5.0)                                # (T, N, Kc)
    logits[0, 0, 1] = 2.0      # token 0: class 2, P = sigmoid(2) = 0.8808
    logits[0, 1, 2] = 1.0      # token 1: class 3, P = sigmoid(1) = 0.7311
    #                            token 2: every P = sigmoid(-5) = 0.0067 < 0.1, dropped (App. D)
    masks = torch.empty(1, 3, 2, 3)                                     # (T, N, h, w)
    masks[0, 0] = torch.tensor([[10.0, 10.0, -10.0]] * 2)   # columns 0..5 -> 10, 10, 10, 5, -5, -10
    masks[0, 1] = torch.tensor([[-10.0] * 3, [10.0] * 3])   # rows 0..3 -> -10, -5, 5, 10
    masks[0, 2] = 10.0                                      # covers everything, but is dropped
    # token 0 covers columns 0-3, token 1 rows 2-3; where both do, 0.8808 * M0 > 0.7311 * M1
    # (M >= sigmoid(5) = 0.9933): class 2; the rest of rows 2-3 is class 3, the rest background.
    expected = np.array([[2, 2, 2, 2, 0, 0],
                         [2, 2, 2, 2, 0, 0],
                         [2, 2, 2, 2, 3, 3],
                         [2, 2, 2, 2, 3, 3]])
    image = Image.fromarray(np.full((4, 6, 3), 100, np.uint8))
    out = tmp_path / "out"
    os.makedirs(out)
    outputs = {"pred_logits": logits, "pred_masks": masks, "chunks": [(0, 1)]}
    predict.write_clip(str(out), ["frame.jpg"], [image], outputs, ["bg", "a", "b", "c"], {})
    png = Image.open(out / "labels" / "frame.png")
    assert np.array_equal(np.asarray(png), expected)
    assert tuple(np.asarray(png.convert("RGB"))[3, 5]) == voc_colour(3)
    record = json.loads((out / "predictions.json").read_text())["frames"][0]
    assert record["classes"] == [{"class_id": 2, "name": "b", "score": 0.8808, "area": 0.6667},
                                 {"class_id": 3, "name": "c", "score": 0.7311, "area": 0.1667}]

    # binary model (Kc = 1): foreground max_i P_i M_i > 0.5. Token 0 (P = sigmoid(3) = 0.9526)
    # covers columns 0-3 (0.9526 * sigmoid(5) = 0.946 there, 0.9526 * sigmoid(-5) = 0.006 in
    # column 4); token 1 (P = sigmoid(-3) = 0.047) covers everything but never reaches 0.5.
    binary = pictures.label_map(torch.tensor([[3.0], [-3.0]]),
                                torch.stack([masks[0, 0], torch.full((2, 3), 10.0)]), (4, 6))
    assert np.array_equal(binary, (expected.clip(0, 1) * (np.arange(6) < 4)).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# The clip as the checkpoint's reader would see it
# ----------------------------------------------------------------------------------------------
def test_frames_in_natural_order_and_resized_as_evaluation(tmp_path):
    for name in ("f10.png", "f9.jpg", "F1.PNG", "notes.txt"):
        Image.fromarray(np.full((10, 14, 3), 50, np.uint8)).save(tmp_path / name, format="PNG")
    paths = predict.list_frames(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["F1.PNG", "f9.jpg", "f10.png"]
    frames, images = predict.read_frames(paths, 32)
    assert frames.shape == (3, 3, 32, 32) and images[0].size == (14, 10)
    # independently: PIL bilinear resize to 32 x 32, then ImageNet normalisation
    array = np.asarray(images[1].resize((32, 32), Image.BILINEAR), np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert np.allclose(frames[1].numpy(), ((array - mean) / std).transpose(2, 0, 1), atol=1e-5)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "f9.png")
    with pytest.raises(data.DataError, match="two frames named f9"):
        predict.list_frames(str(tmp_path))


def test_audio_examples_are_those_of_the_synthetic_and_avss_readers(tmp_path):
    # synthetic: the reader's own log-mel of a clip, from its waveform written to a 16 kHz wav
    ds = synthetic.SyntheticAVS("test", img_size=32, num_clips=1)
    clip = ds.generate(0)
    wavfile.write(tmp_path / "s.wav", 16000, clip["waveform"])
    audio, _ = predict.read_audio(str(tmp_path / "s.wav"), 5, "synthetic")
    assert np.array_equal(audio[:, 0].numpy(), clip["log_mel"])
    # avss: a 10 s 48 kHz stereo clip of the fixture, as AVSSDataset reads it
    write_avss(str(tmp_path / "avss"))
    avss = data.build_dataset("avss", "test", str(tmp_path / "avss"), img_size=32, train=False)
    item = next(avss[i] for i in range(len(avss)) if avss[i]["meta"]["subset"] == "v2")
    wav = os.path.join(str(tmp_path / "avss"), "v2", item["meta"]["clip"], "audio.wav")
    audio, _ = predict.read_audio(wav, 10, "avss")
    assert torch.equal(audio, item["audio"])


# ----------------------------------------------------------------------------------------------
# Bad input: one clear message naming the file, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------
def test_every_bad_input_exits_2_and_writes_nothing(run_dir, clip, tmp_path, capsys):
    frames, wav = clip
    good = run_dir / "last.pt"
    bad = tmp_path / "bad"
    bad.mkdir()
    ckpt = torch.load(good, weights_only=True)
    # checkpoints: missing, unreadable, another model's, format 1, format 2 (numpy RNG state),
    # weights that do not fit their config
    (bad / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"conv.weight": torch.zeros(3)}, bad / "resnet.pt")
    torch.save({"model": ckpt["model"], "config": ckpt["config"], "state": ckpt["state"]}, bad / "v1.pt")
    torch.save({**ckpt, "format": 2, "rng": {"numpy": np.random.get_state()}}, bad / "v2.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], "dim": 32}}},
               bad / "other_dim.pt")
    # frames: an empty folder, a truncated PNG
    (bad / "empty").mkdir()
    broken = bad / "broken_frames"
    broken.mkdir()
    for name in FRAME_NAMES:
        (broken / name).write_bytes((frames / name).read_bytes())
    (broken / "f11.png").write_bytes((frames / "f11.png").read_bytes()[:60])
    # audio: garbage, silence, 3 s for 7 frames
    (bad / "garbage.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    wavfile.write(bad / "silent.wav", 44100, np.zeros((44100 * 8, 2), np.int16))
    tone_wav(str(bad / "short.wav"), 44100, 3.0, 2)
    cases = [  # (checkpoint, frames, audio, words the message must hold besides the file)
        (bad / "nowhere.pt", frames, wav, "does not exist"),
        (bad / "junk.pt", frames, wav, "not a readable checkpoint"),
        (bad / "resnet.pt", frames, wav, "not a train.py checkpoint"),
        (bad / "v1.pt", frames, wav, "format 1"),
        (bad / "v2.pt", frames, wav, "numpy"),
        (bad / "other_dim.pt", frames, wav, "do not fit"),
        (good, bad / "no_frames", wav, "missing"),
        (good, bad / "empty", wav, "no .png or .jpg"),
        (good, broken, wav, "unreadable or truncated"),
        (good, frames, bad / "none.wav", "missing"),
        (good, frames, bad / "garbage.wav", "unreadable wav"),
        (good, frames, bad / "silent.wav", "silent"),
        (good, frames, bad / "short.wav", "3.00 s of audio; the 7 frames need 7.00 s"),
    ]
    for checkpoint, folder, audio, words in cases:
        out = tmp_path / "out"
        rc = predict.main(["--checkpoint", str(checkpoint), "--frames", str(folder),
                           "--audio", str(audio), "--out", str(out), "--threads", "1"])
        err = capsys.readouterr().err
        named = {str(checkpoint), str(folder), str(audio)}
        assert rc == 2 and words in err and any(n in err for n in named), (checkpoint, folder, audio, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["audio.wav", "bad", "frames"]
        assert not (run_dir / "labels").exists()
    # a folder that already holds something is left alone
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert predict.main(["--checkpoint", str(good), "--frames", str(frames), "--audio", str(wav),
                         "--out", str(taken)]) == 2
    assert os.listdir(taken) == ["mine.txt"] and "taken" in capsys.readouterr().err
    # --pad-audio: the short wav is padded (with a warning) and the clip runs
    out = tmp_path / "padded"
    with pytest.warns(UserWarning, match="padded 4 example"):
        assert predict.main(["--checkpoint", str(good), "--frames", str(frames), "--audio",
                             str(bad / "short.wav"), "--out", str(out), "--pad-audio",
                             "--threads", "1"]) == 0
    assert len(json.loads((out / "predictions.json").read_text())["frames"]) == 7


def test_checkpoint_whose_unpickling_would_run_code_is_refused(run_dir, clip, tmp_path):
    frames, wav = clip
    marker = tmp_path / "code_ran"
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    torch.save({**ckpt, "extra": RunsCode(marker)}, tmp_path / "shared.pt")
    proc = predict_cli("--checkpoint", tmp_path / "shared.pt", "--frames", frames, "--audio", wav,
                       "--out", tmp_path / "out")
    assert proc.returncode == 2 and "refused" in proc.stderr and "shared.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_predict_does_not_load_the_lab_tools():
    proc = subprocess.run([sys.executable, "-c", "import sys, predict; print(sorted(m for m in "
                           "('diagnostics', 'ablate', 'bench') if m in sys.modules))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def top_level_imports(root=ROOT) -> dict:
    """Every top-level .py file -> the modules it imports anywhere in it (a lazy import inside a
    function too), read with ast."""
    found = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read(), name)
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module)
        found[name[:-3]] = modules
    return found


def test_no_top_level_file_imports_the_lab_tools():
    imports = top_level_imports()
    assert {"train", "predict", "pictures", "sqd"} <= set(imports)
    offenders = {name: sorted(m for m in mods if m == "tools" or m.startswith("tools."))
                 for name, mods in imports.items()}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_top_level_files_import_each_other_without_a_circle():
    imports = top_level_imports()
    graph = {name: {m.split(".")[0] for m in mods} & set(imports) - {name}
             for name, mods in imports.items()}
    assert "train" in graph["predict"] and "pictures" in graph["train"]

    def reachable(start):                                  # every file start imports, at any depth
        seen, todo = set(), [start]
        while todo:
            for m in graph[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        return seen
    circles = sorted(name for name in graph if name in reachable(name))
    assert not circles, circles
