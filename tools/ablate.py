"""The paper's ablations (Tables 2-4, Fig. 7) on the synthetic benchmark, in one command.

What this file teaches
    How to check a paper's claims for yourself: every row of Tables 2-4 is one `train.py` run
    with a few switches (sqd.ModelConfig's named booleans), repeated over seeds and reported as
    mean +- std, next to a control that must fail (audio zeroed: vision alone cannot tell the
    sounding object from a silent one) and the Fig. 7 comparison (multi-source training clips
    only against the usual mix, with the same number of clips).

    Table 2  baseline -> +GSD -> +GSD+AVSR -> +GSD+AVSR+LSD -> +SC (the full SQD)
    Table 3  codebook size K = 1, 16, 32, 128, 256
    Table 4  token number N = 1, 3, 5
    control  audio zeroed
    Fig. 7   multi-source training only vs the mix

Usage
    python tools/ablate.py                      # every row, 2 seeds, on this machine (CPU: hours)
    python tools/ablate.py --quick              # Table 2 only
    python tools/ablate.py --parallel 12        # on a GPU machine: 12 runs share the GPU
    python tools/ablate.py --report             # the tables of results/ablations.json's runs again
    python tools/ablate.py --rows K1,K16        # adds these rows; the runs already in ablations.json stay
    python tools/ablate.py --fresh              # forget the runs already in ablations.json
    Anything after `--` goes to every train.py run (e.g. `-- --max-steps 200`).

    python tools/ablate.py --rows baseline,full --seeds 3
    python tools/ablate.py --report --group v2/pretrained-frozen   # one group's tables + the hypotheses

Every run belongs to a *group*, its synthetic benchmark and how the audio network started
("v2/pretrained-frozen", every new run: the pretrained stand-in, pretrained.uses_stand_ins; "scratch"
runs were made by earlier versions; runs stored before groups existed are "v1/scratch"). New runs are on v2, the one
synthetic benchmark synthetic.py makes; the stored v1 groups are read and reported as they are (their
runs are repeated by the code of git tag synthetic-v1).

Output: results/runs/<benchmark>-<regime>/<row>-s<seed>/ (train.py's run directories, each with
the diagnostics.json, tokens.png and tokens_local.png of tools/diagnostics.py, which this file
runs on the run's best.pt when the run has finished), results/ablations.json (every run's
metrics, codebook diagnostics, config and code version; `rows`: per group, the mean
+- std of every row; `hypotheses`: per group, the verdicts of HYPOTHESES) and the markdown tables
on stdout, ready for the README. ablations.json accumulates: a run of (group, row, seed) replaces
the earlier one of the same key, the others are kept, and `invocations` lists every command with
its machine and time, so the tables can be filled over several sittings.

Reading order: ROWS (which switches make which row), main(), then aggregate(), tables() and
HYPOTHESES with paired().
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/<name>.py` from anywhere
    sys.path.insert(0, ROOT)

import pretrain  # noqa: E402
import synthetic  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402
from tools import diagnostics  # noqa: E402

# name -> train.py flags. The full model appears once and fills a row of every table.
ROWS = {
    "baseline": ["--no-gsd", "--no-avsr", "--no-lsd"],
    "gsd": ["--no-avsr", "--no-lsd"],
    "gsd_avsr": ["--no-lsd"],
    "gsd_avsr_lsd": ["--no-shared-codebook"],
    "full": [],
    "K1": ["--codebook-size", "1"],
    "K16": ["--codebook-size", "16"],
    "K32": ["--codebook-size", "32"],
    "K256": ["--codebook-size", "256"],
    "N1": ["--num-tokens", "1"],
    "N3": ["--num-tokens", "3"],
    "zero_audio": ["--zero-audio"],
    "multi_only": ["--train-multi-ratio", "1.0"],
    "no_avsr": ["--no-avsr"],  # not a row of the paper: the full model without eq. (5)
    # the paper's own wording, read differently (results/README.md, if H2 fails)
    # The rows of the other readings of the paper's wording and of the silent-choice controls
    # used options that val rejected and that are gone; their stored runs are still reported
    # (aggregate), and `git checkout silent-choices` runs them again.
    # the AVSBench recipes' quantizer on the synthetic start (results/README.md, "The AVSBench
    # recipe's quantizer"): quantized from step 1. Its rows with the AVSBench lr and App. D's loss
    # weights set the weights by flags since removed (the recipe holds them now); their stored runs
    # are still reported, and `git checkout audio-regimes` runs them again.
    "warmup0": ["--quant-warmup-steps", "0"],
    # 3x the steps, lr x0.1 for the last third, the same for both
    "full_long": ["--epochs", "3", "--lr-drop-epoch", "3"],
    "baseline_long": ["--no-gsd", "--no-avsr", "--no-lsd", "--epochs", "3", "--lr-drop-epoch", "3"],
}
# table -> [(label, row name)]; the labels are the paper's
TABLES = {
    "Table 2 (components)": [("baseline", "baseline"), ("+GSD", "gsd"), ("+GSD+AVSR", "gsd_avsr"),
                             ("+GSD+AVSR+LSD", "gsd_avsr_lsd"), ("+SC (full SQD)", "full")],
    "Table 3 (codebook size K)": [("K = 1", "K1"), ("K = 16", "K16"), ("K = 32", "K32"),
                                  ("K = 128 (paper, CPU preset)", "full"), ("K = 256", "K256")],
    "Table 4 (token number N)": [("N = 1", "N1"), ("N = 3", "N3"), ("N = 5", "full")],
    "Control (vision alone)": [("full SQD", "full"), ("audio zeroed", "zero_audio")],
    "Fig. 7 (training clips)": [("single + multi (1:1)", "full"), ("multi-source only", "multi_only")],
    "Extra, not in the paper (AVSR)": [("full SQD", "full"), ("full SQD without AVSR", "no_avsr")],
    "Other readings of the paper's wording": [
        ("full SQD (two prototype sets, AVSR from e_i, eq. 9 as means)", "full"),
        ("one prototype set p_i for eq. 4 and 6", "shared_prototypes"),
        ("AVSR filters from g_i", "avsr_from_g"), ("eq. 9 as sums", "quant_sum")],
    "Not in the paper (eq. 6's memory)": [
        ("full SQD (eq. 6 reads f_{a,t} alone)", "full"),
        ("eq. 6 reads f_{a,t} and the clip's e_i", "local_memory_global")],
    "Silent choices (val; controls)": [
        ("Table 2 baseline", "baseline"), ("+GSD+AVSR (no LSD)", "gsd_avsr"),
        ("full SQD as before", "full"), ("slot positions in TrD_segm", "slot_positions"),
        ("codebook by EMA", "codebook_ema"), ("codebook lr x25", "codebook_lr25"),
        ("slot positions + EMA", "slot_codebook_ema"), ("slot positions + lr x25", "slot_codebook_lr25"),
        ("eq. 7 reads l_{i,t} unquantized (control)", "unquantized_local")],
    "Visual side pretrained as referring segmentation": [
        ("Table 2 baseline", "baseline"), ("full SQD", "full"),
        ("Table 2 baseline, visual pretrained", "baseline_visual"), ("full SQD, visual pretrained", "full_visual"),
        ("full SQD, slot positions, visual pretrained", "slot_visual")],
    "The AVSBench recipe's quantizer (val)": [
        ("full SQD (synthetic recipe: 300-step warm-up)", "full"), ("quantized from step 1", "warmup0"),
        ("AVSBench lr and loss weights, quantized from step 1", "avsbench_recipe"),
        ("AVSBench lr and loss weights, 300-step warm-up", "avsbench_recipe_warmup")],
    "Training length (3x the steps)": [
        ("Table 2 baseline", "baseline"), ("full SQD", "full"),
        ("Table 2 baseline, 3x", "baseline_long"), ("full SQD, 3x", "full_long")],
}
# the group name of the audio network's start in every new run (pretrained.uses_stand_ins)
REGIME = "pretrained-frozen"
QUICK = ["baseline", "gsd", "gsd_avsr", "gsd_avsr_lsd", "full"]
# Clips per evaluation split of every ablation run (the default train.py run evaluates 200, to
# stay within 10 CPU minutes): with 500, the split-to-split noise of one run's mIoU is well below
# the seed spread (results/README.md, "Results on the synthetic benchmark").
EVAL_CLIPS = 500
# column -> (split in metrics.json, key); "codebook": the summary numbers of the run's
# diagnostics.json (collect_run)
COLUMNS = {
    "test mIoU": ("test", "miou_official"),
    "test-unseen mIoU": ("test-unseen", "miou_official"),
    "multi-source J&F": ("test", "multi_jf_official"),
    "single-source J&F": ("test", "single_jf_official"),
    "test-seen-multi mIoU": ("test-seen-multi", "miou_official"),
    "val mIoU": ("val", "miou_official"),
    "val-unseen mIoU": ("val-unseen", "miou_official"),
    "decomp. recall (global)": ("codebook", "decomposition_recall"),
    "decomp. recall (local)": ("codebook", "local_decomposition_recall"),
    "signatures (global)": ("codebook", "distinct_signatures"),
    "signatures (local)": ("codebook", "local_distinct_signatures"),
    "held signatures (global)": ("codebook", "held_signatures"),
    "held signatures, shuffled p95": ("codebook", "held_signatures_null_p95"),
    "duplicate frames": ("codebook", "duplicate_frame_rate"),
    "equal-output pairs": ("codebook", "duplicate_pairs_equal_outputs"),
    "drift (mean)": ("codebook", "drift_mean"),
    "words (global)": ("codebook", "words_global"),
    "words (local)": ("codebook", "words_local"),
}
# Counts, printed without decimals when the seeds agree. (The recalls count only signatures a
# category owns, so a collapsed codebook gives no recall; runs stored before that rule show 1 or 0.)
COUNT_COLUMNS = ("signatures (global)", "signatures (local)", "held signatures (global)",
                 "held signatures, shuffled p95", "equal-output pairs", "words (global)", "words (local)")
# The columns of the markdown tables (ablations.json keeps them all); the val columns are for
# choosing settings, the others for reporting.
# The tables that choose settings show val and the diagnostics, never test.
VAL_COLUMNS = ("val mIoU", "val-unseen mIoU", "duplicate frames", "equal-output pairs", "drift (mean)",
               "words (global)", "words (local)", "held signatures (global)")
COLUMNS_OF = {"Silent choices (val; controls)": VAL_COLUMNS,
              "Training length (3x the steps)": ("val mIoU", "val-unseen mIoU"),
              "The AVSBench recipe's quantizer (val)": VAL_COLUMNS,
              "Visual side pretrained as referring segmentation": VAL_COLUMNS}
TABLE_COLUMNS = ("test mIoU", "test-seen-multi mIoU", "test-unseen mIoU", "multi-source J&F",
                 "single-source J&F", "decomp. recall (global)", "decomp. recall (local)",
                 "signatures (global)", "signatures (local)", "held signatures (global)",
                 "held signatures, shuffled p95")

# The pre-registered hypotheses (results/README.md), each a list of paired comparisons
# (row a, row b, column, "better" | "not worse"). "better": the mean of the per-seed differences
# a - b is more than twice their standard deviation (ddof 1); "not worse": b - a is not better
# than a by that measure. H2 is per run (held signatures, see held_signatures_hold).
HYPOTHESES = {
    "H1": [("full", "baseline", "test-unseen mIoU", "better"),
           ("full", "baseline", "test-seen-multi mIoU", "not worse")],
    "H3": [("gsd", "baseline", "test-unseen mIoU", "better"),
           ("gsd_avsr", "gsd", "test-unseen mIoU", "better"),
           ("gsd_avsr_lsd", "gsd_avsr", "test-unseen mIoU", "better"),
           ("full", "gsd_avsr_lsd", "test-unseen mIoU", "better")],
    "H4": [("full", "N1", "test-seen-multi mIoU", "better"),
           ("full", "N1", "test-unseen mIoU", "better")],
    "H5": [("full", "multi_only", "test-seen-multi mIoU", "better"),
           ("full", "multi_only", "test-unseen mIoU", "better")],
}


def group_of(run: dict) -> str:
    """'benchmark/audio regime[/series]' of a stored run; runs stored before groups existed:
    v1/scratch. A series keeps a new set of runs (a new default, another machine) apart from the
    earlier runs of the same rows, whose tables stay as they were."""
    group = f"{run.get('benchmark', 'v1')}/{run.get('audio_regime', 'scratch')}"
    return group + (f"/{run['series']}" if run.get("series") else "")


def run_one(name: str, seed: int, out_root: str, extra: list[str], log_dir: str,
            threads: int) -> subprocess.Popen:
    """Start `python train.py` for one (row, seed) with `threads` torch threads (OMP_NUM_THREADS);
    its output goes to log_dir/<row>-s<seed>.log."""
    out = os.path.join(out_root, f"{name}-s{seed}")
    cmd = [sys.executable, "train.py", "--out", os.path.abspath(out), "--seed", str(seed), *ROWS[name], *extra]
    log = open(os.path.join(log_dir, f"{name}-s{seed}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    proc.info = dict(name=name, seed=seed, out=out, cmd=cmd, start=time.time(), log=log)
    return proc


def collect_run(info: dict, series: str | None = None, device="cpu") -> dict:
    """One finished run: its metrics (the COLUMNS), codebook diagnostics, config and code version.

    The diagnostics (tools/diagnostics.py diagnose_run on the run's best.pt, on device) are
    written to the run's diagnostics.json; their summary numbers are the run's "codebook" (None
    for a model without global tokens), where the "codebook" columns read them."""
    with open(os.path.join(info["out"], "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(info["out"], "config.json")) as f:
        config = json.load(f)
    diag = diagnostics.diagnose_run(os.path.join(info["out"], "best.pt"), info["out"], device)
    # the summary numbers; the tables (category x codeword) stay in the run's diagnostics.json
    codebook = {k: v for k, v in diag.items() if not isinstance(v, list)} or None
    m["codebook"] = codebook or {}
    values = {col: m.get(split, {}).get(key) for col, (split, key) in COLUMNS.items()}
    return dict(benchmark=config["train"].get("benchmark") or "v1",
                audio_regime=REGIME,  # the only start this train.py makes
                **({"series": series} if series else {}),
                name=info["name"], seed=info["seed"], flags=ROWS[info["name"]],
                time_s=round(time.time() - info["start"], 1), metrics=values,
                codebook=codebook, config=config, code_version=config.get("code_version"))


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    """The earlier runs whose (group, row, seed) was not run again, then the new runs."""
    redone = {(group_of(r), r["name"], r["seed"]) for r in new}
    return [r for r in old if (group_of(r), r["name"], r["seed"]) not in redone] + new


def run_value(run: dict, col: str):
    """One run's value of a column; a codebook column missing from the run's stored metrics (a
    column added after the run) is read from its stored codebook diagnostics."""
    value = run["metrics"].get(col)
    split, key = COLUMNS[col]
    if value is None and split == "codebook":
        value = (run.get("codebook") or {}).get(key)
    return value


def aggregate(runs: list[dict]) -> dict:
    """row name -> column -> {mean, std, n} over seeds (std with ddof=1; 0 for one seed)."""
    rows = {}
    for name in list(ROWS) + sorted({r["name"] for r in runs} - set(ROWS)):
        mine = [r for r in runs if r["name"] == name]
        if not mine:
            continue
        rows[name] = {}
        for col in COLUMNS:
            vals = np.array([v for v in (run_value(r, col) for r in mine) if v is not None], float)
            vals = vals[~np.isnan(vals)]
            if len(vals):
                rows[name][col] = dict(mean=float(vals.mean()),
                                       std=float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                       n=int(len(vals)))
    return rows


def by_group(runs: list[dict]) -> dict:
    """group -> its runs, groups sorted."""
    return {g: [r for r in runs if group_of(r) == g] for g in sorted({group_of(r) for r in runs})}


def aggregate_groups(runs: list[dict]) -> dict:
    """group -> aggregate() of the group's runs."""
    return {g: aggregate(mine) for g, mine in by_group(runs).items()}


def tables(rows: dict) -> str:
    """Markdown tables of one group's rows, one per entry of TABLES, mean +- std over seeds; the
    TABLE_COLUMNS that some row of the table has."""
    lines = []
    for title, entries in TABLES.items():
        present = [(label, name) for label, name in entries if name in rows]
        if len(present) < 2:  # a table is a comparison: the full model alone says nothing new
            continue
        cols = [c for c in COLUMNS_OF.get(title, TABLE_COLUMNS) if any(c in rows[n] for _, n in present)]
        lines += [f"**{title}**", "", "| row | " + " | ".join(cols) + " |",
                  "| --- |" + " --- |" * len(cols)]
        for label, name in present:
            cells = []
            seeds = max(c["n"] for c in rows[name].values())
            for col in cols:
                c = rows[name].get(col)
                if c is None:
                    cells.append("-")
                    continue
                if col in COUNT_COLUMNS:
                    cell = f"{c['mean']:.0f}" if c["std"] == 0 else f"{c['mean']:.1f} ± {c['std']:.1f}"
                else:
                    cell = f"{c['mean']:.3f} ± {c['std']:.3f}"
                # fewer seeds than the row has: the others had no value (e.g. an undefined recall)
                cells.append(cell + (f" (n = {c['n']})" if c["n"] < seeds else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paired(runs: list[dict], a: str, b: str, col: str) -> dict | None:
    """The per-seed differences a - b of one group's runs in column col, over the seeds both rows
    have: {seeds, diffs, mean, std (ddof 1), better: mean > 2 std}; None below two seeds."""
    value = {(r["name"], r["seed"]): run_value(r, col) for r in runs}
    seeds = sorted(s for (n, s), v in value.items() if n == a and v is not None
                   and value.get((b, s)) is not None)
    if len(seeds) < 2:
        return None
    d = np.array([value[(a, s)] - value[(b, s)] for s in seeds])   # (seeds,)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    return dict(seeds=seeds, diffs=d.round(4).tolist(), mean=mean, std=std, better=mean > 2 * std)


def held_signatures_hold(run: dict) -> bool | None:
    """H2 for one run: its held global signatures are at least half the categories and above the
    95th percentile of the shuffled-label count; None without the measure."""
    cb = run.get("codebook") or {}
    if cb.get("held_signatures") is None:
        return None
    categories = run["config"]["model"]["num_classes"]
    return cb["held_signatures"] >= categories / 2 and cb["held_signatures"] > cb["held_signatures_null_p95"]


def hypotheses(runs: list[dict]) -> dict:
    """The verdict of every pre-registered hypothesis on one group's runs (where its rows ran):
    name -> {holds, tests: [paired() and its kind]}; H2 -> {holds, per_seed}."""
    out = {}
    for h, tests in HYPOTHESES.items():
        results = []
        for a, b, col, kind in tests:
            if kind == "better":
                p = paired(runs, a, b, col)
                ok = None if p is None else p["better"]
            else:  # not worse: b is not better than a
                p = paired(runs, b, a, col)
                ok = None if p is None else not p["better"]
            results.append(dict(a=a, b=b, column=col, kind=kind, holds=ok, paired=p))
        if all(r["holds"] is None for r in results):
            continue
        out[h] = dict(holds=all(r["holds"] for r in results)
                      if all(r["holds"] is not None for r in results) else None, tests=results)
    full = sorted((r for r in runs if r["name"] == "full"), key=lambda r: r["seed"])
    per_seed = {r["seed"]: held_signatures_hold(r) for r in full}
    if per_seed and all(v is not None for v in per_seed.values()):
        out["H2"] = dict(holds=all(per_seed.values()), per_seed=per_seed,
                         held=[r["codebook"]["held_signatures"] for r in full],
                         null_p95=[r["codebook"]["held_signatures_null_p95"] for r in full])
    return dict(sorted(out.items()))


def hypotheses_text(verdicts: dict) -> str:
    """The verdicts as markdown lines."""
    word = {True: "holds", False: "fails", None: "not run"}
    lines = []
    for h, v in verdicts.items():
        if h == "H2":
            lines.append(f"- **H2** {word[v['holds']]}: held global signatures {v['held']} against "
                         f"shuffled-label p95 {v['null_p95']} (seeds {list(v['per_seed'])})")
            continue
        parts = []
        for t in v["tests"]:
            p = t["paired"]
            diff = ("-" if p is None else f"{t['a'] if t['kind'] == 'better' else t['b']} - "
                    f"{t['b'] if t['kind'] == 'better' else t['a']} = {p['mean']:+.3f} ± {p['std']:.3f} "
                    f"(seeds {p['seeds']})")
            parts.append(f"{t['column']} {t['a']} {t['kind']} than {t['b']}: {diff}, {word[t['holds']]}")
        lines.append(f"- **{h}** {word[v['holds']]}: " + "; ".join(parts))
    return "\n".join(lines)


def report(runs: list[dict], group: str | None) -> str:
    """Tables (and hypotheses) of every group, or of one."""
    text = []
    for g, mine in by_group(runs).items():
        if group is not None and g != group:
            continue
        text += [f"### {g}", "", tables(aggregate(mine))]
        verdicts = hypotheses(mine)
        if verdicts:
            text += ["Pre-registered hypotheses (results/README.md):", "", hypotheses_text(verdicts), ""]
    return "\n".join(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Table 2 rows only")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all, see ROWS)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (FIRST_SEED, FIRST_SEED + 1, ...)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed of every row")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: CPU cores // parallel)")
    p.add_argument("--series", default=None,
                   help="a name that keeps these runs apart from earlier runs of the same rows "
                        "(their group becomes v2/REGIME/SERIES; runs/ and logs/ get a subfolder)")
    p.add_argument("--out", default="results", help="folder of runs/ and ablations.json")
    p.add_argument("--report", action="store_true", help="only print the tables of OUT/ablations.json")
    p.add_argument("--group", default=None, help="with --report: only this group's tables, e.g. "
                                                 "v2/pretrained-frozen or v1/scratch (default: every group)")
    p.add_argument("--fresh", action="store_true",
                   help="start OUT/ablations.json afresh instead of adding to the runs already in it")
    args = p.parse_args(argv)
    path = os.path.join(args.out, "ablations.json")
    if args.report:
        if not os.path.isfile(path):
            print(f"error: {path} does not exist; run python tools/ablate.py first", file=sys.stderr)
            return 2
        with open(path) as f:
            stored = json.load(f)["runs"]
        print(report(stored, args.group))
        return 0

    names = QUICK if args.quick else list(ROWS)
    if args.rows:
        names = args.rows.split(",")
        unknown = [n for n in names if n not in ROWS]
        if unknown:
            print(f"error: unknown rows {unknown}; expected some of {list(ROWS)}", file=sys.stderr)
            return 2
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    # the diagnostics of each finished run run here, with the threads and device of one run
    torch.set_num_threads(threads)
    diag_device = "cuda" if torch.cuda.is_available() else "cpu"
    benchmark = synthetic.SYNTHETIC_VERSION
    group_dir = f"{benchmark}-{REGIME}" + (f"-{args.series}" if args.series else "")
    common = ["--eval-clips", str(EVAL_CLIPS)] + extra
    # build each seed's pretrained stand-ins once, before the runs that share them start, so that
    # two runs of one seed do not both build them
    num_classes = synthetic.SyntheticAVS("val", num_clips=1).num_classes
    run_cfg, model_cfg = train.resolve(train.TrainConfig(), num_classes)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:  # as train.py builds them: both at once, in two processes
        pretrain.stand_in_files(pretrain.STAND_IN_DIR, model_cfg, seed, run_cfg.img_size, EVAL_CLIPS,
                                audio=True, visual=True)
    log_dir = os.path.join(args.out, "logs", group_dir)
    os.makedirs(log_dir, exist_ok=True)
    jobs = [(n, s) for s in seeds for n in names]  # every row's first seed first
    start, running, runs, failed, interrupted = time.time(), [], [], [], False
    # SIGTERM (e.g. from `timeout`) behaves like Ctrl-C: the finished runs are still written.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while jobs or running:
            while jobs and len(running) < args.parallel:
                name, seed = jobs.pop(0)
                running.append(run_one(name, seed, os.path.join(args.out, "runs", group_dir), common,
                                       log_dir, threads))
            time.sleep(2)
            for proc in [q for q in running if q.poll() is not None]:
                running.remove(proc)
                proc.info["log"].close()
                tag = f"{proc.info['name']}-s{proc.info['seed']}"
                if proc.returncode != 0:
                    failed.append(tag)
                    print(f"FAILED {tag} (exit {proc.returncode}); see {log_dir}/{tag}.log", flush=True)
                    continue
                try:
                    runs.append(collect_run(proc.info, args.series, diag_device))
                except Exception as e:  # its diagnostics failed: the run counts as failed, the rest go on
                    failed.append(tag)
                    print(f"FAILED {tag}: its diagnostics ({type(e).__name__}: {e})", flush=True)
                    continue
                r = runs[-1]
                print(f"done {tag} in {r['time_s']:.0f} s: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if v is not None),
                      flush=True)
    except KeyboardInterrupt:
        interrupted = True
        for proc in running:
            proc.terminate()
        print(f"interrupted: {len(running)} runs stopped, {len(jobs)} never started; writing the "
              f"{len(runs)} finished runs", file=sys.stderr, flush=True)
    total = time.time() - start
    earlier = dict(invocations=[], runs=[])
    if os.path.isfile(path) and not args.fresh:
        with open(path) as f:
            earlier = json.load(f)
    invocation = dict(command="python tools/ablate.py " + " ".join(sys.argv[1:]), train_flags=common,
                      machine=f"{platform.node()} {platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} CPU cores", device=diag_device, threads=threads,
                      parallel=args.parallel, total_time_s=round(total, 1), failed=failed,
                      interrupted=interrupted, runs=[f"{r['name']}-s{r['seed']}" for r in runs])
    all_runs = merge_runs(earlier.get("runs", []), runs)
    result = dict(invocations=earlier.get("invocations", []) + [invocation],
                  rows=aggregate_groups(all_runs),
                  hypotheses={g: hypotheses(mine) for g, mine in by_group(all_runs).items()},
                  runs=all_runs)
    checkpoint.write_json(path, result)  # atomic: a temporary file, then a rename
    print(f"\n{len(runs)} runs in {total / 60:.1f} min ({len(failed)} failed); wrote {path}\n")
    print(report(all_runs, f"{benchmark}/{REGIME}" + (f"/{args.series}" if args.series else "")))
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
