"""tools/diagnostics.py: the category x codeword table, signatures and decomposition recall against
hand-computed values on a hand-built set of clips; the token picture; the clip picture
(pictures.synthetic_picture) against the labels data.py gives, as python train.py draws it and as
the command line draws it with the tokens named (on a checkpoint trained for 2 steps in the tests
themselves)."""
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

import commands  # noqa: E402
import predict  # noqa: E402
import synthetic  # noqa: E402
from fixtures import voc_colour  # noqa: E402
from pictures import synthetic_picture, token_names  # noqa: E402
from tools import diagnostics  # noqa: E402
from tools.diagnostics import (category_code_table, decomposition_recall, frame_recall,  # noqa: E402
                               own_signatures, read_signatures, scatter_png, signature_test,
                               signatures, summarise)


# 6 clips, N = 2 tokens, K = 6 codewords, Kc = 3 categories (column c-1 is class id c).
CODES = np.array([[3, 0], [3, 0],      # single-source, category 1
                  [5, 0], [5, 1],      # single-source, category 2
                  [3, 5], [3, 0]])     # multi-source, categories 1 and 2 sound
SOUNDING = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=bool)
MULTI = np.array([False, False, False, False, True, True])


def test_category_code_table_by_hand():
    table = category_code_table(CODES, SOUNDING, MULTI, num_codes=6)
    np.testing.assert_allclose(table[0], [1, 0, 0, 1, 0, 0])       # both clips hold 0 and 3
    np.testing.assert_allclose(table[1], [0.5, 0.5, 0, 0, 0, 1])   # 5 always, 0 and 1 once each
    assert np.isnan(table[2]).all()                                 # category 3 never alone


def test_signatures_and_recall_by_hand():
    table = category_code_table(CODES, SOUNDING, MULTI, num_codes=6)
    # mean over seen categories: k0 0.75, k1 0.25, k3 0.5, k5 0.5
    # category 1: k0 +0.25, k3 +0.5 -> 3;  category 2: k0 -0.25, k1 +0.25, k5 +0.5 -> 5
    assert signatures(table).tolist() == [3, 5, -1]
    # clip 4 holds 3 and 5 (2 of 2), clip 5 holds 3 and 0 (1 of 2): 3 / 4
    assert decomposition_recall(CODES, SOUNDING, MULTI, signatures(table)) == 0.75
    res = summarise({"codes": CODES, "sounding": SOUNDING, "multi": MULTI}, num_codes=6)
    assert res["distinct_signatures"] == 2 and res["decomposition_recall"] == 0.75
    assert res["global_codebook"]["dead"] == 6 - 4                   # codes 0, 1, 3, 5 used
    # local codes (M, T=2, N=1): a clip holds a codeword when any frame's token chose it, so
    # these local codes hold, per clip, the same set as CODES and give the same numbers
    res = summarise({"codes": CODES, "sounding": SOUNDING, "multi": MULTI,
                     "local_codes": CODES.reshape(6, 2, 1)}, num_codes=6)
    assert res["local_distinct_signatures"] == 2 and res["local_decomposition_recall"] == 0.75
    assert res["local_codebook"]["dead"] == 2


def test_frame_level_recall_by_hand():
    # the same local codes, now with the categories sounding per frame (M, T=2, Kc): single-source
    # clips sound in both frames; clip 4 has categories 1+2 in frame 0 and 2 in frame 1; clip 5 has
    # 1 in frame 0 and 1+2 in frame 1. Frames with >= 2 sounding: clip 4 frame 0 (code 3: category
    # 1's signature, not 2's) and clip 5 frame 1 (code 0: neither) -> 1 of 4
    frames = np.repeat(SOUNDING[:, None], 2, axis=1)                # (6, 2, 3)
    frames[4] = [[1, 1, 0], [0, 1, 0]]
    frames[5] = [[1, 0, 0], [1, 1, 0]]
    res = summarise({"codes": CODES, "sounding": SOUNDING, "multi": MULTI,
                     "local_codes": CODES.reshape(6, 2, 1), "sounding_frames": frames}, num_codes=6)
    assert res["local_frame_recall"] == 0.25 and res["frames_two_or_more_sounding"] == 2
    assert res["local_decomposition_recall"] == 0.75                # per clip: unchanged


def test_frame_recall_uses_a_signature_per_token_index():
    # T = 1, N = 3. Single-source: category 1 -> codes (1, 7, 0), category 2 -> (2, 8, 0); token
    # index 2 always chooses 0, whatever sounds. Mixtures of 1+2: (1, 8, 0) and (3, 3, 0).
    codes = np.array([[1, 7, 0], [1, 7, 0], [2, 8, 0], [2, 8, 0], [1, 8, 0], [3, 3, 0]])[:, None]
    sounding = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, 1]], dtype=bool)
    multi = sounding.sum(1) == 2
    # per index: sig_0 = (1, 2), sig_1 = (7, 8), index 2 has none (0 is specific to nobody).
    # Frame 4: index 0 holds 1 (category 1), index 1 holds 8 (category 2): 2 of 2; frame 5: 0 of 2
    assert frame_recall(codes, sounding[:, None], sounding, multi, num_codes=9) == 0.5
    # one signature per category over all indices (the per-clip measure) finds only category 1
    # in frame 4: sig(1) = 1, sig(2) = 2 (the first of its equally specific codewords)
    flat_sig = signatures(category_code_table(codes[:, 0], sounding, multi, num_codes=9))
    assert flat_sig.tolist() == [1, 2]
    assert decomposition_recall(codes[:, 0], sounding, multi, flat_sig) == 0.25
    # diagnostics.json keeps the per-index signatures (token index i -> category c's codeword)
    res = summarise({"codes": codes[:, 0], "sounding": sounding, "multi": multi,
                     "local_codes": codes}, num_codes=9)
    assert res["local_signature_codeword_per_index"] == [[1, 2], [7, 8], [-1, -1]]


def test_a_shared_signature_is_nobodys_and_recovers_nobody():
    # K = 6, N = 2, Kc = 3. Alone, categories 1 and 3 both choose (4, 1) and category 2 (4, 2):
    # mean over categories k4 1, k1 2/3, k2 1/3, so sig = (1, 2, 1); codeword 1 is shared.
    codes = np.array([[4, 1], [4, 1], [4, 2], [4, 2], [4, 1], [4, 1],
                      [4, 1],              # multi-source, categories 1 and 2
                      [4, 1]])             # multi-source, categories 1 and 3
    sounding = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1],
                         [1, 1, 0], [1, 0, 1]], dtype=bool)
    multi = sounding.sum(1) == 2
    sig = signatures(category_code_table(codes, sounding, multi, num_codes=6))
    assert sig.tolist() == [1, 2, 1] and own_signatures(sig).tolist() == [-1, 2, -1]
    # with the shared signature the 1+3 clip "recovers" both sources with one codeword: 3 of 4
    assert decomposition_recall(codes, sounding, multi, sig) == 0.75
    # counting own signatures only: category 2 in the 1+2 clip, missed -> 0 of 1
    res = summarise({"codes": codes, "sounding": sounding, "multi": multi}, num_codes=6)
    assert res["decomposition_recall"] == 0.0 and res["own_signatures"] == 1
    assert res["distinct_signatures"] == 2 and res["specific_signatures"] == 2


def test_a_collapsed_codebook_has_no_recall():
    # every clip chooses codeword 0 whatever sounds: one signature for all, owned by nobody
    sounding = np.eye(3, dtype=bool)[[0, 1, 2, 0, 1]]
    sounding[3:, 2] = True                                            # two mixtures
    multi = sounding.sum(1) == 2
    codes = np.zeros((5, 2), dtype=np.int64)
    res = summarise({"codes": codes, "sounding": sounding, "multi": multi,
                     "local_codes": codes[:, None], "sounding_frames": sounding[:, None]}, num_codes=4)
    assert res["distinct_signatures"] == 1 and res["own_signatures"] == 0
    assert np.isnan(res["decomposition_recall"]) and np.isnan(res["local_decomposition_recall"])
    assert np.isnan(res["local_frame_recall"])                       # was 1.0 before own signatures
    assert res["specific_signatures"] == 0


def test_signature_test_against_chance():
    rng = np.random.default_rng(0)

    def split(n, codes_of):
        cats = rng.integers(0, 6, n)                                   # n single-source clips
        return codes_of(cats), np.eye(6, dtype=bool)[cats], np.zeros(n, dtype=bool)

    # tokens that name the category (codeword c, plus one of 6..9): all 6 signatures hold on the
    # other split, against a few with shuffled labels
    tracking = lambda cats: np.stack([cats, rng.integers(6, 10, len(cats))], 1)  # (n, 2)
    res = signature_test(split(120, tracking), split(120, tracking), num_codes=10, shuffles=50)
    assert res["count"] == 6 and res["null_p95"] <= 4 and res["p_value"] == 1 / 51
    # tokens that ignore the sound: on the split that chose them noise gives most categories a
    # "specific" signature (why the count is taken on another split); there, chance level
    noise = lambda cats: rng.integers(0, 10, (len(cats), 2))
    res = signature_test(split(60, noise), split(60, noise), num_codes=10, shuffles=50)
    assert res["fit_count"] >= 4 and res["count"] <= res["null_p95"] + 1 and res["p_value"] > 0.05
    constant = lambda cats: np.zeros((len(cats), 2), dtype=np.int64)
    res = signature_test(split(60, constant), split(60, constant), num_codes=10, shuffles=50)
    assert res["count"] == 0 and res["null_p95"] == 0 and res["p_value"] == 1.0


def test_held_signature_count_by_hand():
    from tools.diagnostics import held_signature_count
    # signatures fixed elsewhere: categories 1, 2, 3 -> codewords 0, 1, 1 (1 shared), 4: none
    sig = np.array([0, 1, 1, -1])
    # held-out table (Kc = 4, K = 2): codeword 0 is specific to category 1 (0.9 > mean 0.5)
    table = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]])
    assert held_signature_count(sig, table) == 1                     # 2 and 3 share theirs
    assert held_signature_count(np.array([1, 0, -1, -1]), table) == 0  # both below the mean


def test_scatter_png_draws_each_category_colour(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.concatenate([rng.normal(0, 0.1, (20, 8)) + 3, rng.normal(0, 0.1, (20, 8)) - 3])
    labels = np.array([1] * 20 + [2] * 20)
    palette = np.array([[0, 0, 0], [200, 0, 0], [0, 0, 200]])
    path = tmp_path / "t.png"
    scatter_png(tokens, labels, rng.normal(size=(4, 8)), str(path), palette, size=128)
    img = np.asarray(Image.open(path))
    assert img.shape == (128, 128, 3)
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert (200, 0, 0) in colours and (0, 0, 200) in colours


def test_scatter_png_legend_has_a_swatch_and_a_name_per_category(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(30, 8))
    labels = np.array([1] * 10 + [2] * 20)
    palette = np.array([[0, 0, 0], [200, 0, 0], [0, 0, 200], [0, 200, 0]])
    path = tmp_path / "t.png"
    scatter_png(tokens, labels, np.zeros((0, 8)), str(path), palette, size=128,
                names=["background", "red disc", "blue square", "green ring"])
    img = np.asarray(Image.open(path))
    assert img.shape[0] == 128 and img.shape[1] > 128 + 60      # a column on the right
    legend = img[:, 128:].reshape(-1, 3)
    count = {c: int((legend == c).all(1).sum()) for c in [(200, 0, 0), (0, 0, 200), (0, 200, 0)]}
    assert count[(200, 0, 0)] >= 100 and count[(0, 0, 200)] >= 100   # a 14 x 14 swatch each
    assert count[(0, 200, 0)] == 0                                   # no token of class 3
    assert (legend.max(1) < 100).sum() > 50                          # dark text: the names


def test_command_line_on_a_missing_checkpoint_is_one_clear_error(tmp_path):
    res = diagnostics_cli(tmp_path / "nope.pt")
    assert res.returncode == 2 and "nope.pt" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr


# ----------------------------------------------------------------------------------------------
# The clip picture (6.): python train.py draws it at the end of a synthetic run (codewords not
# named by category), the command line draws any clip with the run's signatures
# ----------------------------------------------------------------------------------------------
def diagnostics_cli(*args):
    """`OMP_NUM_THREADS=1 python tools/diagnostics.py ARGS`, run in this process (tests/commands.py)
    on one thread, as the pictures it is compared with were drawn."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return commands.run(diagnostics.main, *args, check=False)
    finally:
        torch.set_num_threads(threads)


def test_token_names_by_hand():
    # N = 2 token indices, Kc = 3: index 0's signatures are codewords 3, 5, 3 (3 is shared by
    # categories 1 and 3), index 1's are 7, 8, 9
    sig = [[3, 5, 3], [7, 8, 9]]
    names = ["background", "dog", "car", "bell"]
    assert token_names([3, 9], sig, names) == ["none", "bell"]
    assert token_names([5, 1], sig, names) == ["car", "none"]
    assert token_names([5, 1], None, names) == [None, None]          # not named: no "= ?"


def test_synthetic_picture_ground_truth_panel_equals_the_labels_of_data_py(run_dir, tmp_path):
    model, cfg, names = predict.load_model(str(run_dir / "last.pt"), torch.device("cpu"))
    dataset = synthetic.SyntheticAVS("test-unseen", img_size=32, seed=0)   # the run's benchmark
    # python train.py writes no diagnostics.json; the command line does, beside the checkpoint
    assert not (run_dir / "diagnostics.json").exists()
    proc = diagnostics_cli(run_dir / "last.pt", "--out", run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sig, _ = read_signatures(str(run_dir / "diagnostics.json"))
    assert sig is not None and len(sig) == model.cfg.num_tokens
    picture, gif_frames, layout = synthetic_picture(model, dataset, 17, names, sig, torch.device("cpu"))
    labels = dataset[17]["labels"].numpy()                              # (T, 32, 32)
    array = np.asarray(picture)
    palette = np.array([voc_colour(j) for j in range(256)], np.uint8)   # (256, 3)
    assert len(layout["ground truth"]) == len(gif_frames) == labels.shape[0]
    for t, (x0, y0, x1, y1) in enumerate(layout["ground truth"]):
        step = (x1 - x0) // 32                                          # nearest-neighbour scale
        assert step * 32 >= 256 and (x1 - x0, y1 - y0) == (32 * step, 32 * step)
        panel = array[y0:y1:step, x0:x1:step]                           # (32, 32, 3)
        assert np.array_equal(panel, palette[labels[t]]), t
    # without signatures (python train.py's pictures) only the tokens panel and the clip's title
    # line differ: the same frames, log-mel, ground truth and prediction
    plain, _, plain_layout = synthetic_picture(model, dataset, 17, names, None, torch.device("cpu"))
    plain = np.asarray(plain)
    for name in ("frame", "log-mel of its second", "ground truth", "prediction", "tokens"):
        for (x0, y0, x1, y1), (u0, v0, u1, v1) in zip(layout[name], plain_layout[name]):
            same = np.array_equal(array[y0:y1, x0:x1], plain[v0:v1, u0:u1])
            assert same == (name != "tokens"), name
    # the command line writes this picture (and its GIF) beside the checkpoint by default
    proc = diagnostics_cli(run_dir / "last.pt", "--clip", "test-unseen:17")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(run_dir / "clip_test-unseen_17.png")), array)
    assert Image.open(run_dir / "clip_test-unseen_17.gif").n_frames == labels.shape[0]
    proc = diagnostics_cli(run_dir / "last.pt", "--clip", "test-unseen:99999")
    assert proc.returncode == 2 and "has clips 0.." in proc.stderr and "Traceback" not in proc.stderr


def test_the_clip_picture_of_python_train_py_is_synthetic_picture_without_signatures(run_dir):
    # train.py with NUM_OVERLAYS 1 (tests/conftest.py): the first single-source clip of its test split (4 clips), drawn
    # with best.pt's model and no signatures
    pictures = sorted(run_dir.glob("clip_test_*.png"))
    assert len(pictures) == 1, pictures
    index = int(pictures[0].stem.rpartition("_")[2])
    dataset = synthetic.SyntheticAVS("test", img_size=32, seed=0, num_clips=4)
    assert not dataset[index]["meta"]["multi_source"]
    assert all(dataset[i]["meta"]["multi_source"] for i in range(index))
    model, cfg, names = predict.load_model(str(run_dir / "best.pt"), torch.device("cpu"))
    picture, _, _ = synthetic_picture(model, dataset, index, names, None, torch.device("cpu"))
    assert np.array_equal(np.asarray(Image.open(pictures[0]).convert("RGB")), np.asarray(picture))
