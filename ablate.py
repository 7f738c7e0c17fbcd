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
    python ablate.py                      # every row, 2 seeds, on this machine (CPU: hours)
    python ablate.py --quick              # Table 2 only
    python ablate.py --parallel 12 --device cuda   # on one GPU, 12 runs at a time
    python ablate.py --report             # the tables of results/ablations.json's runs again
    python ablate.py --rows K1,K16        # adds these rows; the runs already in ablations.json stay
    python ablate.py --fresh              # forget the runs already in ablations.json
    Anything after `--` goes to every train.py run (e.g. `-- --max-steps 200`).

Output: results/runs/<row>-s<seed>/ (train.py's run directories), results/ablations.json (every
run's metrics, config and code version, and the mean +- std of every row) and the markdown
tables on stdout, ready for the README. ablations.json accumulates: a run of (row, seed) replaces
the earlier one of the same (row, seed), the others are kept, and `invocations` lists every
command with its machine and time, so the tables can be filled over several sittings.

Reading order: ROWS (which switches make which row), main(), then aggregate() and tables().
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

import train

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
}
QUICK = ["baseline", "gsd", "gsd_avsr", "gsd_avsr_lsd", "full"]
# column -> (split in metrics.json, key)
COLUMNS = {
    "test mIoU": ("test", "miou_official"),
    "test-unseen mIoU": ("test-unseen", "miou_official"),
    "multi-source J&F": ("test", "multi_jf_official"),
    "single-source J&F": ("test", "single_jf_official"),
    "decomp. recall (global)": ("codebook", "decomposition_recall"),
    "decomp. recall (local)": ("codebook", "local_decomposition_recall"),
    "signatures (global)": ("codebook", "distinct_signatures"),
    "signatures (local)": ("codebook", "local_distinct_signatures"),
}
# Counts, printed without decimals when the seeds agree. The recall only means something when the
# categories' signature codewords are distinct: with one signature for all 12 (K = 1, or tokens that
# ignore the sound) it is trivially 1 or 0.
COUNT_COLUMNS = ("signatures (global)", "signatures (local)")


def run_one(name: str, seed: int, out_root: str, extra: list[str], log_dir: str) -> subprocess.Popen:
    """Start `python train.py` for one (row, seed); its output goes to log_dir/<row>-s<seed>.log."""
    out = os.path.join(out_root, f"{name}-s{seed}")
    cmd = [sys.executable, "train.py", "--out", out, "--seed", str(seed), *ROWS[name], *extra]
    log = open(os.path.join(log_dir, f"{name}-s{seed}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    proc.info = dict(name=name, seed=seed, out=out, cmd=cmd, start=time.time(), log=log)
    return proc


def collect_run(info: dict) -> dict:
    """One finished run: its metrics (the COLUMNS), config and code version."""
    with open(os.path.join(info["out"], "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(info["out"], "config.json")) as f:
        config = json.load(f)
    values = {col: m.get(split, {}).get(key) for col, (split, key) in COLUMNS.items()}
    return dict(name=info["name"], seed=info["seed"], flags=ROWS[info["name"]],
                time_s=round(time.time() - info["start"], 1), metrics=values,
                codebook=m.get("codebook"), config=config, code_version=config.get("code_version"))


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    """The earlier runs whose (row, seed) was not run again, then the new runs."""
    redone = {(r["name"], r["seed"]) for r in new}
    return [r for r in old if (r["name"], r["seed"]) not in redone] + new


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
    for name in ROWS:
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


def tables(rows: dict) -> str:
    """Markdown tables, one per entry of TABLES, mean +- std over seeds."""
    lines = []
    for title, entries in TABLES.items():
        present = [(label, name) for label, name in entries if name in rows]
        if not present:
            continue
        lines += [f"**{title}**", "", "| row | " + " | ".join(COLUMNS) + " |",
                  "| --- |" + " --- |" * len(COLUMNS)]
        for label, name in present:
            cells = []
            for col in COLUMNS:
                c = rows[name].get(col)
                if c is None:
                    cells.append("-")
                elif col in COUNT_COLUMNS:
                    cells.append(f"{c['mean']:.0f}" if c["std"] == 0 else f"{c['mean']:.1f} ± {c['std']:.1f}")
                else:
                    cells.append(f"{c['mean']:.3f} ± {c['std']:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Table 2 rows only")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all, see ROWS)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (0, 1, ...)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--device", default=None, help="passed to train.py (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: CPU cores // parallel)")
    p.add_argument("--out", default="results", help="folder of runs/ and ablations.json")
    p.add_argument("--report", action="store_true", help="only print the tables of OUT/ablations.json")
    p.add_argument("--fresh", action="store_true",
                   help="start OUT/ablations.json afresh instead of adding to the runs already in it")
    args = p.parse_args(argv)
    path = os.path.join(args.out, "ablations.json")
    if args.report:
        if not os.path.isfile(path):
            print(f"error: {path} does not exist; run python ablate.py first", file=sys.stderr)
            return 2
        with open(path) as f:
            print(tables(aggregate(json.load(f)["runs"])))
        return 0

    names = QUICK if args.quick else list(ROWS)
    if args.rows:
        names = args.rows.split(",")
        unknown = [n for n in names if n not in ROWS]
        if unknown:
            print(f"error: unknown rows {unknown}; expected some of {list(ROWS)}", file=sys.stderr)
            return 2
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    common = ["--threads", str(threads)] + (["--device", args.device] if args.device else []) + extra
    log_dir = os.path.join(args.out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    jobs = [(n, s) for s in range(args.seeds) for n in names]  # every row's seed 0 first
    start, running, runs, failed, interrupted = time.time(), [], [], [], False
    # SIGTERM (e.g. from `timeout`) behaves like Ctrl-C: the finished runs are still written.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while jobs or running:
            while jobs and len(running) < args.parallel:
                name, seed = jobs.pop(0)
                running.append(run_one(name, seed, os.path.join(args.out, "runs"), common, log_dir))
            time.sleep(2)
            for proc in [q for q in running if q.poll() is not None]:
                running.remove(proc)
                proc.info["log"].close()
                tag = f"{proc.info['name']}-s{proc.info['seed']}"
                if proc.returncode != 0:
                    failed.append(tag)
                    print(f"FAILED {tag} (exit {proc.returncode}); see {log_dir}/{tag}.log", flush=True)
                    continue
                runs.append(collect_run(proc.info))
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
    invocation = dict(command="python ablate.py " + " ".join(sys.argv[1:]), train_flags=common,
                      machine=f"{platform.node()} {platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} CPU cores", device=args.device or "default",
                      parallel=args.parallel, total_time_s=round(total, 1), failed=failed,
                      interrupted=interrupted, runs=[f"{r['name']}-s{r['seed']}" for r in runs])
    all_runs = merge_runs(earlier.get("runs", []), runs)
    result = dict(invocations=earlier.get("invocations", []) + [invocation],
                  rows=aggregate(all_runs), runs=all_runs)
    train.write_json(path, result)  # atomic: a temporary file, then a rename
    print(f"\n{len(runs)} runs in {total / 60:.1f} min ({len(failed)} failed); wrote {path}\n")
    print(tables(result["rows"]))
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
