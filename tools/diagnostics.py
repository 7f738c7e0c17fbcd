"""A look inside the shared codebook: which codewords the semantic tokens choose (Fig. 6, 7).

What this file teaches
    SQD claims that the N global tokens g_i of a clip, quantized with one shared codebook
    (eq. 1, 2), *decompose* a mixture: a clip where a dog and a car sound should choose the
    dog's codeword and the car's codeword. On the synthetic benchmark the ground truth says which
    categories sound, so the claim can be measured:

      1. usage and perplexity of the codebook over a split (metrics.codebook_stats);
      2. a category x codeword table: for single-source clips of each category, how often each
         codeword is among the clip's N global tokens;
      3. each category's *signature* codeword: the codeword most specific to it,
             sig(c) = argmax_k  P(k in clip | c) - mean_c' P(k in clip | c')
         (a codeword every clip chooses, e.g. one meaning "silence", is specific to nobody);
      4. decomposition recall on multi-source clips: the fraction of a clip's sounding categories
         whose signature codeword is among its N global tokens. An undecomposed model (N = 1,
         Table 4) can hold one signature per clip, so its recall is bounded by 1 / #sources;
         The same three numbers are also given for the local tokens l_{i,t} (all frames of a
         clip together), which are the mask decoder's queries. Counted per clip, an undecomposed
         local token can still reach every source of a clip, one per frame, because the sources
         switch on and off; so a recall is also given per *frame* (frame_recall), over the frames
         where two or more categories sound at once, with a signature per token index: there
         N = 1 is bounded by 1 / #sounding, and only a decomposition can exceed it;
      5. a 2-D picture of the global tokens of single-source clips, coloured by category (PCA),
         with the codewords as crosses, as in Fig. 6;
      6. the picture a student reads to see decomposition work or fail on one clip: per frame,
         the frame, the log-mel of its second, the ground truth, the prediction and the codeword
         each local token l_{i,t} chose, named by the category it is the signature of
         (pictures.synthetic_picture, which python train.py draws without the names).

    A collapsed codebook fools a recall: when many categories share one signature codeword, a
    clip that chooses it "recovers" all of them. So every recall counts only categories whose
    signature is their *own* (no other category has it, own_signatures); with a collapsed
    codebook nobody owns one and the recall is NaN (reported as null), never a high number.
    Whether the global tokens carry the sound at all is tested against chance: the number of
    category-specific signatures fixed on one split (val) that stay specific on another (test),
    against the same number with the category labels shuffled (signature_test).

Reading order: collect() (runs the model and gathers tokens, codes and categories), summarise()
(the numbers 1-4), scatter_png() (the picture 5), write_diagnostics() (all of them on a split,
tokens.png), diagnose_run() (a finished run's checkpoint on its own test and val splits, as the
command line and tools/ablate.py run it), then draw_clip() (the picture 6, drawn by
pictures.synthetic_picture with the signatures of read_signatures()). No top-level file imports
this one: python train.py prints the command below at the end of a synthetic run.

Usage on a finished run (the test and val splits of the checkpoint's own seed and --eval-clips;
the drift from the codebook the checkpoint kept of the first quantized step), then the picture 6 of any clip of the
run's benchmark, its tokens named with the signatures of the run's diagnostics.json:
    python tools/diagnostics.py runs/synthetic-DATE/best.pt --out runs/synthetic-DATE
    python tools/diagnostics.py runs/synthetic-DATE/best.pt --clip test-unseen:17

Shapes (the repository's one shape alphabet: docs/shapes.md): B clips (a batch, or every clip
collected from a split, as one batch), T frames, N semantic tokens, C model channels, K codewords,
Kc foreground classes, the categories (class ids 1..Kc), h, w the mask resolution. Subsets and
other counts are words (single-source clips, seen categories, points).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/<name>.py` from anywhere
    sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import data  # noqa: E402
import pictures  # noqa: E402  (the clip picture: synthetic_picture, write_synthetic_pictures)
import predict  # noqa: E402  (load_model: the checkpoint's model as predict.py loads it)
import train  # noqa: E402
from metrics import codebook_stats  # noqa: E402


@torch.no_grad()
def collect(model, dataset, device, batch_size: int = 8, max_clips: int | None = None) -> dict:
    """Run the model over a synthetic split and keep, per clip, its global tokens and codes.

    Returns dict of numpy arrays, B = every clip collected:
        tokens   (B, N, C) float32, g_i before quantization
        codes    (B, N) int64, the chosen codewords VQ(g_i)
        sounding (B, Kc) bool, the categories that sound somewhere in the clip (off-screen too)
        multi    (B,) bool, multi-source clip
        local_codes (B, T, N) int64 or absent, the codewords of the local tokens
        local_tokens (B, N, C) float32 or absent, the local tokens l_{i,t} averaged over frames
        local_norm (B,) float32 or absent, the mean norm ||l_{i,t}|| of each clip's local tokens
        logits (B, T, N, Kc) float32, masks (B, T, N, h, w) float32: the mask decoder's outputs
        sounding_frames (B, T, Kc) bool, the categories that sound in each frame
    Empty dict when the model has no global tokens (no GSD).
    """
    model.eval()
    n = len(dataset) if max_clips is None else min(max_clips, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                        collate_fn=data.collate)
    out = {"tokens": [], "codes": [], "multi": [], "local_codes": [], "local_tokens": [],
           "local_norm": [], "logits": [], "masks": [], "sounding_frames": []}
    for batch in loader:
        batch = train.to_device(batch, device)
        res = model(batch)
        if "global" not in res["indices"]:
            return {}
        codes = res["indices"]["global"]                      # (B, N)
        tokens = res["tokens"]["global"]                      # (B, N, C)
        out["tokens"].append(tokens.float().cpu().numpy())
        out["codes"].append(codes.cpu().numpy())
        if "local" in res["indices"]:
            out["local_codes"].append(res["indices"]["local"].cpu().numpy())  # (B, T, N)
            out["local_tokens"].append(res["tokens"]["local"].float().mean(1).cpu().numpy())  # (B, N, C)
            out["local_norm"].append(res["tokens"]["local"].float().norm(dim=-1).mean((1, 2)).cpu().numpy())  # (B,)
        out["logits"].append(res["pred_logits"].float().cpu().numpy())  # (B, T, N, Kc)
        out["masks"].append(res["pred_masks"].float().cpu().numpy())    # (B, T, N, h, w)
        for meta in batch["meta"]:
            out["sounding_frames"].append(np.asarray(meta["sounding"], dtype=bool))  # (T, Kc)
            out["multi"].append(bool(meta["multi_source"]))
    model.train()
    per_clip = ("multi", "sounding_frames")                  # stacked, not concatenated
    result = {k: np.concatenate(v) for k, v in out.items() if k not in per_clip and v}
    result["sounding_frames"] = np.stack(out["sounding_frames"])  # (B, T, Kc)
    result["sounding"] = result["sounding_frames"].any(1)   # (B, Kc) somewhere in the clip
    result["multi"] = np.array(out["multi"])                 # (B,)
    return result


def category_code_table(codes: np.ndarray, sounding: np.ndarray, multi: np.ndarray,
                        num_codes: int) -> np.ndarray:
    """(Kc, K) P(k in clip | c): over single-source clips of category c, the fraction whose N
    global tokens include codeword k (NaN row for a category with no single-source clip)."""
    Kc = sounding.shape[1]
    present = np.zeros((len(codes), num_codes), dtype=bool)  # (B, K)
    rows = np.repeat(np.arange(len(codes)), codes.shape[1])  # (B*N,)
    present[rows, codes.reshape(-1)] = True
    table = np.full((Kc, num_codes), np.nan)                 # (Kc, K)
    for c in range(Kc):
        sel = ~multi & sounding[:, c]                        # (B,) single-source clips of c
        if sel.any():
            table[c] = present[sel].mean(0)
    return table


def signatures(table: np.ndarray, specific_only: bool = False) -> np.ndarray:
    """(Kc,) sig(c) = argmax_k P(k|c) - mean_c' P(k|c'); -1 for a category never seen alone, and
    with specific_only also where that maximum is not above 0 (no codeword is specific to c)."""
    seen = ~np.isnan(table).any(1)                           # (Kc,)
    sig = np.full(table.shape[0], -1, dtype=np.int64)
    if seen.any():
        specific = table[seen] - table[seen].mean(0, keepdims=True)  # (seen categories, K)
        best = specific.argmax(1)                            # (seen categories,)
        if specific_only:
            best[specific[np.arange(len(best)), best] <= 0] = -1
        sig[seen] = best
    return sig


def own_signatures(sig: np.ndarray) -> np.ndarray:
    """(Kc,) sig with -1 where a category shares its signature codeword with another category:
    under collapse (one codeword for every category) no category owns one, and a recall over
    such shared signatures would count a single codeword as many recovered sources."""
    words, counts = np.unique(sig[sig >= 0], return_counts=True)
    own = sig.copy()
    own[np.isin(own, words[counts > 1])] = -1
    return own


def specific_signature_count(table: np.ndarray) -> int:
    """The number of distinct codewords among the category-specific signatures
    (signatures(table, specific_only=True)): 0 when the tokens ignore the sound."""
    sig = signatures(table, specific_only=True)              # (Kc,)
    return int(len(set(sig[sig >= 0].tolist())))


def held_signature_count(sig: np.ndarray, table: np.ndarray) -> int:
    """How many categories' signatures, fixed on one split (sig, -1: none), are their own and
    still specific to them on another split (table: that split's category x codeword table)."""
    own = own_signatures(sig)                                # (Kc,)
    seen = ~np.isnan(table).any(1)                           # (Kc,)
    mean = table[seen].mean(0)                               # (K,)
    c = np.nonzero((own >= 0) & seen)[0]                     # categories to check
    return int((table[c, own[c]] - mean[own[c]] > 0).sum())


def signature_test(fit: tuple, held: tuple, num_codes: int, shuffles: int = 200,
                   seed: int = 0) -> dict:
    """Do the tokens carry the sound? Signatures fixed on one split, counted on another, against
    chance.

    fit and held are (codes, sounding, multi) of two splits (val and test). Each category's
    specific signature is fixed on `fit`; the count is the number of categories whose signature
    is their own and is still specific to them on `held` (held_signature_count). Counted on the
    split that chose them, signatures are always specific: with about ten single-source clips a
    category, noise alone gives nearly every category one (the test shows it). The null: the
    category labels of fit's single-source clips permuted, which breaks any link between a
    clip's sound and its codewords while every category keeps its number of clips. Returns
    {count, fit_count, null_p95, null_mean, p_value, shuffles, categories}; fit_count is the
    count on `fit` alone; p_value = (1 + #null >= count) / (1 + shuffles)."""
    (codes, sounding, multi), (h_codes, h_sounding, h_multi) = fit, held
    table = category_code_table(codes, sounding, multi, num_codes)        # (Kc, K)
    held_table = category_code_table(h_codes, h_sounding, h_multi, num_codes)  # (Kc, K)
    count = held_signature_count(signatures(table, specific_only=True), held_table)
    rng = np.random.default_rng(seed)
    single = np.nonzero(~multi)[0]                           # (single-source clips,)
    null = np.empty(shuffles, dtype=np.int64)
    for j in range(shuffles):
        perm = sounding.copy()                               # (B, Kc)
        perm[single] = sounding[rng.permutation(single)]     # labels of single-source clips permuted
        perm_table = category_code_table(codes, perm, multi, num_codes)   # (Kc, K)
        null[j] = held_signature_count(signatures(perm_table, specific_only=True), held_table)
    return {"count": count, "fit_count": specific_signature_count(table),
            "null_p95": float(np.percentile(null, 95)), "null_mean": float(null.mean()),
            "p_value": float((1 + (null >= count).sum()) / (1 + shuffles)),
            "shuffles": shuffles, "categories": int(sounding.shape[1])}


def decomposition_recall(codes: np.ndarray, sounding: np.ndarray, multi: np.ndarray,
                         sig: np.ndarray) -> float:
    """Over multi-source clips: mean over (clip, sounding category with a signature) of
    [sig(c) is among the clip's N global tokens]. NaN when there is nothing to count. Pass
    own_signatures(sig): a signature shared by several categories would count one codeword as
    several recovered sources."""
    hits, total = 0, 0
    for m in np.nonzero(multi)[0]:
        chosen = set(codes[m].tolist())
        for c in np.nonzero(sounding[m])[0]:
            if sig[c] >= 0:
                hits += int(sig[c] in chosen)
                total += 1
    return hits / total if total else float("nan")


def frame_recall(local_codes: np.ndarray, frames: np.ndarray, sounding: np.ndarray,
                 multi: np.ndarray, num_codes: int) -> float:
    """Decomposition recall per frame, over the frames where two or more categories sound.

    The N token indices of the CPU preset occupy separate regions of the codebook, so a category
    has a signature per token index: sig_i(c) is the signature (see signatures()) computed from
    token index i's codes alone, kept only where it is specific to c (P(k|c) above its mean over
    categories; an index whose codeword ignores the sound has no signatures). A sounding category
    of a frame is recovered when some token index i of that frame chooses sig_i(c). With N = 1
    a frame holds one codeword, so the recall is at most 1 / #sounding (about 0.45 here); a
    decomposition into one token per source can reach 1.

    local_codes (B, T, N) int, frames (B, T, Kc) bool sounding per frame, sounding (B, Kc) and
    multi (B,) as in collect(). Returns a float, NaN when there is nothing to count.
    """
    sig = index_signatures(local_codes, sounding, multi, num_codes)  # (Kc, N)
    hits, total = 0, 0
    for m, t in zip(*np.nonzero(frames.sum(2) >= 2)):
        for c in np.nonzero(frames[m, t])[0]:
            valid = sig[c] >= 0                              # (N,)
            if valid.any():
                hits += int((local_codes[m, t][valid] == sig[c][valid]).any())
                total += 1
    return hits / total if total else float("nan")


def index_signatures(local_codes: np.ndarray, sounding: np.ndarray, multi: np.ndarray,
                     num_codes: int) -> np.ndarray:
    """(Kc, N) sig_i(c): the signature of category c among token index i's codes alone, -1 where
    no codeword is specific to c or where another category has the same one (own_signatures; see
    frame_recall). local_codes (B, T, N); sounding, multi as in collect()."""
    N = local_codes.shape[2]
    sig = np.empty((sounding.shape[1], N), dtype=np.int64)   # (Kc, N)
    for i in range(N):
        table = category_code_table(local_codes[:, :, i], sounding, multi, num_codes)  # (Kc, K)
        sig[:, i] = own_signatures(signatures(table, specific_only=True))  # (Kc,)
    return sig


def duplicate_stats(local_codes: np.ndarray, logits: np.ndarray, masks: np.ndarray,
                    class_threshold: float = 0.1, atol: float = 1e-5) -> dict:
    """How often two local tokens of one frame share a codeword, and what that does.

    Args:
        local_codes (B, T, N) int, the codewords of VQ(l_{i,t}); logits (B, T, N, Kc) and
        masks (B, T, N, h, w), the mask decoder's outputs for those tokens; class_threshold: a
        token is *kept* at inference when its best class probability reaches it (App. D, eq. 11).
    Returns dict:
        duplicate_frame_rate: share of frames where two of the N tokens share a codeword;
        kept_duplicate_frame_rate: share of frames where two *kept* tokens share a codeword;
        duplicate_pairs: pairs (i < j) of tokens of one frame on one codeword;
        duplicate_pairs_equal_outputs: how many of them have equal class logits and masks (to
        atol): a decoder whose only query input is the codeword cannot tell them apart, so the
        Hungarian loss asks one to be an object and the other "no object" in vain.
    Meaningless for N = 1 (no pairs): the rates are then NaN and the pair counts 0.
    """
    B, T, N = local_codes.shape
    if N < 2:
        return {"duplicate_frame_rate": float("nan"), "kept_duplicate_frame_rate": float("nan"),
                "duplicate_pairs": 0, "duplicate_pairs_equal_outputs": 0}
    i, j = np.triu_indices(N, k=1)                                     # (pairs,) each
    same = local_codes[..., i] == local_codes[..., j]                  # (B, T, pairs)
    kept = 1.0 / (1.0 + np.exp(-logits.max(-1))) >= class_threshold    # (B, T, N)
    both_kept = kept[..., i] & kept[..., j]                            # (B, T, pairs)
    d_logit = np.abs(logits[..., i, :] - logits[..., j, :]).max(-1)    # (B, T, pairs)
    d_mask = np.abs(masks[:, :, i] - masks[:, :, j]).reshape(B, T, len(i), -1).max(-1)  # (B, T, pairs)
    equal = (d_logit <= atol) & (d_mask <= atol)                       # (B, T, pairs)
    frames = max(B * T, 1)
    return {"duplicate_frame_rate": float(same.any(-1).sum() / frames),
            "kept_duplicate_frame_rate": float((same & both_kept).any(-1).sum() / frames),
            "duplicate_pairs": int(same.sum()),
            "duplicate_pairs_equal_outputs": int((same & equal).sum())}


def codebook_drift(start: np.ndarray, end: np.ndarray, token_norm: float,
                   global_codes: np.ndarray, local_codes: np.ndarray | None) -> dict:
    """How far the codebook moved while quantized, and who uses which word at the end.

    Args:
        start, end: (K, C) the codebook at the first quantized step and now; token_norm: the mean
        norm of the tokens it quantizes (the scale a move is measured against); global_codes (...)
        and local_codes (...) or None: the words the global and local tokens chose on a split.
    Returns dict:
        drift_mean, drift_median, drift_max: ||e_k(end) - e_k(start)|| / token_norm over the K words;
        words_global, words_local: how many distinct words each path uses; words_both: used by both;
        words_neither: used by none (K - the union).
    A drift near 0 says the local tokens commit to the codebook of the first quantized step (the
    k-means of the warm-up), whatever eq. (9)'s first term did.
    """
    moved = np.linalg.norm(end - start, axis=1) / max(token_norm, 1e-12)  # (K,)
    used_g = set(np.unique(global_codes).tolist())
    used_l = set() if local_codes is None else set(np.unique(local_codes).tolist())
    return {"drift_mean": float(moved.mean()), "drift_median": float(np.median(moved)),
            "drift_max": float(moved.max()), "words_global": len(used_g), "words_local": len(used_l),
            "words_both": len(used_g & used_l), "words_neither": len(start) - len(used_g | used_l)}


def summarise(collected: dict, num_codes: int) -> dict:
    """The numbers 1-4 of the file docstring as a JSON-ready dict."""
    codes, sounding, multi = collected["codes"], collected["sounding"], collected["multi"]
    table = category_code_table(codes, sounding, multi, num_codes)  # (Kc, K)
    sig = signatures(table)                                          # (Kc,)
    own = own_signatures(sig)                                        # (Kc,)
    res = {
        "global_codebook": codebook_stats(torch.from_numpy(codes), num_codes),
        "distinct_signatures": int(len(set(sig[sig >= 0].tolist()))),
        "own_signatures": int((own >= 0).sum()),
        "specific_signatures": specific_signature_count(table),
        "signature_codeword": sig.tolist(),
        "decomposition_recall": decomposition_recall(codes, sounding, multi, own),
        "category_codeword_table": np.nan_to_num(table, nan=-1.0).round(3).tolist(),
        "clips": {"single": int((~multi).sum()), "multi": int(multi.sum())},
    }
    if "local_codes" in collected:
        # the same measures for the local tokens l_{i,t} (the mask decoder's queries): a codeword
        # is "in the clip" when any token of any frame chooses it
        local = collected["local_codes"].reshape(len(multi), -1)     # (B, T*N)
        local_sig = signatures(category_code_table(local, sounding, multi, num_codes))  # (Kc,)
        res["local_codebook"] = codebook_stats(torch.from_numpy(local), num_codes)
        local_own = own_signatures(local_sig)                        # (Kc,)
        res["local_distinct_signatures"] = int(len(set(local_sig[local_sig >= 0].tolist())))
        res["local_own_signatures"] = int((local_own >= 0).sum())
        res["local_decomposition_recall"] = decomposition_recall(local, sounding, multi, local_own)
        # per token index i, the codeword sig_i(c) of each category (column c-1: class id c; -1:
        # none); synthetic_picture names a token's codeword with it
        res["local_signature_codeword_per_index"] = index_signatures(
            collected["local_codes"], sounding, multi, num_codes).T.tolist()  # N lists of Kc
        if "logits" in collected:  # the mask decoder's outputs (collect() keeps them)
            res.update(duplicate_stats(collected["local_codes"], collected["logits"], collected["masks"]))
        frames = collected.get("sounding_frames")                    # (B, T, Kc) or None
        if frames is not None and frames.shape[1] == collected["local_codes"].shape[1]:
            res["local_frame_recall"] = frame_recall(collected["local_codes"], frames, sounding,
                                                     multi, num_codes)
            res["frames_two_or_more_sounding"] = int((frames.sum(2) >= 2).sum())
    return res


def scatter_png(tokens: np.ndarray, labels: np.ndarray, codebook: np.ndarray, path: str,
                palette: np.ndarray, size: int = 512, names: list | None = None) -> None:
    """PCA of tokens (points, C) to 2-D, one dot per token coloured by labels (points,) class ids,
    codewords (K, C) as grey crosses in the same projection; written as an RGB PNG of size x size.
    With names (class id -> name), a legend of the categories' colours is added on the right."""
    mean = tokens.mean(0, keepdims=True)                     # (1, C)
    _, _, vt = np.linalg.svd(tokens - mean, full_matrices=False)  # vt (C, C)
    basis = vt[:2].T                                         # (C, 2) first two principal axes
    pts = (tokens - mean) @ basis                            # (points, 2)
    cb = (codebook - mean) @ basis                           # (K, 2)
    lo = np.percentile(pts, 1, axis=0) - 0.1 * np.ptp(pts, axis=0)  # (2,) ignore far outliers
    hi = np.percentile(pts, 99, axis=0) + 0.1 * np.ptp(pts, axis=0)  # (2,)
    scale = (size - 20) / np.maximum(hi - lo, 1e-9)          # (2,)

    def to_px(p):
        return 10 + (p - lo) * scale                         # (..., 2) pixel coordinates

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for x, y in to_px(cb):
        if 0 <= x < size and 0 <= y < size:
            draw.line([(x - 4, y - 4), (x + 4, y + 4)], fill=(150, 150, 150))
            draw.line([(x - 4, y + 4), (x + 4, y - 4)], fill=(150, 150, 150))
    for (x, y), c in zip(to_px(pts), labels):
        colour = tuple(int(v) for v in palette[int(c)])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    if names is not None:
        img = _with_legend(img, sorted(set(int(c) for c in labels)), names, palette)
    img.save(path)


def _with_legend(img, class_ids: list, names: list, palette: np.ndarray):
    """img with a white column on its right: a colour swatch and the name of each class id."""
    f = pictures.font(14)
    width = 40 + max(int(f.getlength(names[c])) for c in class_ids) if class_ids else 0
    out = Image.new("RGB", (img.width + width, max(img.height, 20 * len(class_ids) + 30)),
                    (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.text((img.width + 8, 4), "category", fill=(0, 0, 0), font=f)
    for row, c in enumerate(class_ids):
        y = 26 + 20 * row
        draw.rectangle([img.width + 8, y, img.width + 21, y + 13],
                       fill=tuple(int(v) for v in palette[c]))
        draw.text((img.width + 28, y - 1), names[c], fill=(0, 0, 0), font=f)
    return out


def write_diagnostics(model, dataset, device, out_dir: str | None, max_clips: int | None = None,
                      fit_dataset=None, codebook_start: np.ndarray | None = None) -> dict:
    """Collect on `dataset`, write out_dir/tokens.png (and tokens_local.png; out_dir None: no
    pictures) and return the summary dict for diagnostics.json (empty when the model has no
    global tokens). With
    fit_dataset (val), also signature_test: the global signatures fixed on fit_dataset and
    counted on `dataset` against shuffled labels (held_signatures, held_signatures_null_p95,
    held_signatures_p). With codebook_start (K, C), the shared codebook at the first quantized
    step, also codebook_drift."""
    collected = collect(model, dataset, device, max_clips=max_clips)
    if not collected:
        return {}
    codebook = model.vq.codebook.detach().float().cpu().numpy()   # (K, C)
    res = summarise(collected, codebook.shape[0])
    if codebook_start is not None:
        norms = [np.linalg.norm(collected["tokens"], axis=-1).mean()]       # global tokens
        if "local_norm" in collected:
            norms.append(collected["local_norm"].mean())                    # local tokens
        res.update(codebook_drift(codebook_start, codebook, float(np.mean(norms)), collected["codes"],
                                  collected.get("local_codes")))
    if fit_dataset is not None:
        fit = collect(model, fit_dataset, device, max_clips=max_clips)
        test = signature_test((fit["codes"], fit["sounding"], fit["multi"]),
                              (collected["codes"], collected["sounding"], collected["multi"]),
                              codebook.shape[0])
        res.update(held_signatures=test["count"], held_signatures_null_p95=test["null_p95"],
                   held_signatures_p=test["p_value"], held_signatures_fit_count=test["fit_count"])
    if out_dir is None:
        return res
    single = ~collected["multi"]                                        # (B,)
    tokens = collected["tokens"][single]                                # (single-source clips, N, C)
    cats = collected["sounding"][single].argmax(1) + 1                  # (single-source clips,) class ids
    if len(tokens):
        scatter_png(tokens.reshape(-1, tokens.shape[-1]), np.repeat(cats, tokens.shape[1]),
                    codebook, os.path.join(out_dir, "tokens.png"), data.voc_palette(256),
                    names=dataset.class_names)
    if "local_tokens" in collected and single.any():
        # the local tokens of single-source clips (frame mean), with each token index's mean
        # removed: the index separates the tokens far more than the sound does, and would
        # otherwise fill the two principal axes; no codewords (they sit near each index's mean)
        local = collected["local_tokens"][single]                       # (single-source clips, N, C)
        local = local - local.mean(0, keepdims=True)                    # (single-source clips, N, C)
        scatter_png(local.reshape(-1, local.shape[-1]), np.repeat(cats, local.shape[1]),
                    np.zeros((0, local.shape[-1])), os.path.join(out_dir, "tokens_local.png"),
                    data.voc_palette(256), names=dataset.class_names)
    return res


def diagnose_run(checkpoint_path: str, out_dir: str | None, device="cpu") -> dict:
    """The diagnostics of a finished synthetic run, from one of its checkpoints (best.pt).

    The model of the checkpoint (predict.load_model: its weights, the quantizer in warm-up if
    the checkpoint was saved during it) on the run's own test and val splits (train.make_dataset
    with the run's config: its seed and --eval-clips), with the codebook of the first quantized
    step that the checkpoint keeps (state "codebook_start", for the drift; none before the end
    of the warm-up, or for a model without a codebook). write_diagnostics on test,
    with the signatures' test against chance fitted on val. With out_dir, also writes
    tokens.png, tokens_local.png and diagnostics.json there (diagnostics.json: the whole dict;
    none when it is empty). Returns the dict, {} for a model without global tokens (the Table 2
    baseline). tools/ablate.py calls this on every finished run; the command line too.
    checkpoint.CheckpointError for an unreadable checkpoint, UserError for a run on another dataset.
    """
    device = torch.device(device)
    model, cfg, _ = predict.load_model(checkpoint_path, device)
    if cfg.dataset != "synthetic":
        raise train.UserError(f"{checkpoint_path} is a {cfg.dataset} run; the diagnostics need the "
                              f"synthetic benchmark's ground truth of which categories sound")
    test = train.make_dataset(cfg, "test", train=False)      # the run's own seed and clip count
    val = train.make_dataset(cfg, "val", train=False)
    codebooks = checkpoint.load_checkpoint(checkpoint_path, mmap=True)["state"].get("codebook_start", [])
    start = codebooks[0].float().numpy() if codebooks else None  # (K, C) the shared codebook then
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    diag = write_diagnostics(model, test, device, out_dir, fit_dataset=val, codebook_start=start)
    if diag and out_dir is not None:
        checkpoint.write_json(os.path.join(out_dir, "diagnostics.json"), diag)
    return diag


# ----------------------------------------------------------------------------------------------
# A clip drawn with its tokens named (6.): pictures.synthetic_picture with the run's signatures
# ----------------------------------------------------------------------------------------------
def read_signatures(path: str | None) -> tuple[list | None, str]:
    """Per token index signature codewords from a run's diagnostics.json, and a note saying where
    they came from (or why there are none)."""
    if path is None or not os.path.isfile(path):
        return None, (f"no {path or 'diagnostics.json'}: tokens are not named (python "
                      f"tools/diagnostics.py CKPT --out DIR writes one)")
    try:
        with open(path) as f:
            sig = json.load(f).get("local_signature_codeword_per_index")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{path}: unreadable ({e}); tokens are not named"
    if sig is None:
        return None, f"{path} has no per-token signatures (an older run); tokens are not named"
    return sig, f"signatures: {path}"


def main(argv=None) -> int:
    """The diagnostics of a synthetic checkpoint on its test split, printed (and written to --out)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("checkpoint", help="a train.py checkpoint (best.pt or last.pt) of a synthetic run")
    p.add_argument("--out", default=None, help="also write diagnostics.json and the PNGs here "
                                              "(with --clip: the folder of the picture)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--clip", metavar="SPLIT:INDEX", default=None,
                   help="instead: draw clip INDEX of a split of the checkpoint's benchmark, e.g. "
                        "test-unseen:17 (clip_SPLIT_INDEX.png and .gif, into --out or beside the checkpoint)")
    p.add_argument("--diagnostics", default=None,
                   help="with --clip: the run's diagnostics.json, whose signatures name the tokens "
                        "(default: beside the checkpoint)")
    args = p.parse_args(argv)
    try:
        if args.clip is not None:
            return draw_clip(args)
        res = diagnose_run(args.checkpoint, args.out, args.device)
    except (train.UserError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not res:
        print(f"{args.checkpoint}: the model has no global tokens (no GSD): nothing to diagnose")
        return 0
    if "drift_mean" not in res:
        print("the checkpoint keeps no starting codebook (a run keeps it from the end of the "
              "quantizer warm-up on): no codebook drift")
    # the summary numbers; the tables (category x codeword) are in diagnostics.json
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'diagnostics.json')}, tokens.png, tokens_local.png")
    return 0


def draw_clip(args) -> int:
    """--clip SPLIT:INDEX: one clip of the checkpoint's own benchmark, drawn by synthetic_picture
    (the pictures python train.py writes at the end of a run, for any clip, with the tokens named
    by the signatures of the run's diagnostics.json where there is one). UserError for a bad
    checkpoint, a run on another dataset, or a clip that is not there."""
    import dataclasses

    model, cfg, class_names = predict.load_model(args.checkpoint, torch.device(args.device))
    if cfg.dataset != "synthetic":
        raise train.UserError(f"{args.checkpoint} is a {cfg.dataset} run; --clip needs a checkpoint "
                              f"trained on the synthetic benchmark")
    split, _, index = args.clip.rpartition(":")
    if not split or not index.isdigit():
        raise train.UserError(f"--clip {args.clip!r}: expected SPLIT:INDEX, e.g. test-unseen:17")
    # every clip of the split (not only the run's --eval-clips), with the run's seed and size
    full = dataclasses.replace(cfg, eval_clips=None)
    try:
        dataset = train.make_dataset(full, split, train=split == "train")
    except ValueError as e:
        raise train.UserError(f"--clip {args.clip!r}: {e}") from None
    if int(index) >= len(dataset):
        raise train.UserError(f"--clip {args.clip!r}: the {split} split has clips 0..{len(dataset) - 1}")
    diag = args.diagnostics or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                            "diagnostics.json")
    signatures, note = read_signatures(diag)
    print(note)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    for path in pictures.write_synthetic_pictures(out, model, dataset, [int(index)], class_names,
                                                  signatures, torch.device(args.device)):
        print(f"wrote {path} and {os.path.splitext(path)[0]}.gif")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
