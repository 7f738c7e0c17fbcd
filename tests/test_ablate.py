"""ablate.py: rows aggregate to mean +- std over seeds (hand values); the tables; merging sittings;
a missing report."""
import subprocess
import sys

import ablate


def fake_run(name, seed, miou):
    metrics = {col: None for col in ablate.COLUMNS}
    metrics["test mIoU"] = miou
    return dict(name=name, seed=seed, metrics=metrics)


def test_aggregate_mean_and_sample_std_by_hand():
    rows = ablate.aggregate([fake_run("full", 0, 0.30), fake_run("full", 1, 0.40),
                             fake_run("baseline", 0, 0.20)])
    full = rows["full"]["test mIoU"]
    assert abs(full["mean"] - 0.35) < 1e-12 and full["n"] == 2
    assert abs(full["std"] - 0.0707106781) < 1e-9           # sqrt(((0.05)^2 * 2) / 1)
    assert rows["baseline"]["test mIoU"]["std"] == 0.0      # one seed
    assert "test-unseen mIoU" not in rows["full"]           # no value, no cell
    text = ablate.tables(rows)
    assert "| +SC (full SQD) | 0.350 ± 0.071 |" in text and "| baseline | 0.200 ± 0.000 |" in text


def test_codebook_column_falls_back_to_the_runs_stored_diagnostics():
    old = fake_run("K1", 0, 0.1)
    del old["metrics"]["signatures (local)"]               # a run stored before the column existed
    old["codebook"] = {"local_distinct_signatures": 1}
    new = fake_run("K1", 1, 0.1)
    new["metrics"]["signatures (local)"] = 3
    rows = ablate.aggregate([old, new])
    assert rows["K1"]["signatures (local)"]["mean"] == 2.0
    assert "| K = 1 | 0.100 ± 0.000 |" in ablate.tables(rows) and "| 2.0 ± 1.4 |" in ablate.tables(rows)


def test_merge_keeps_earlier_runs_and_replaces_a_redone_row_seed():
    old = [fake_run("baseline", 0, 0.20), fake_run("full", 0, 0.30), fake_run("full", 1, 0.40)]
    new = [fake_run("full", 1, 0.50), fake_run("K1", 0, 0.10)]
    merged = ablate.merge_runs(old, new)
    got = sorted((r["name"], r["seed"], r["metrics"]["test mIoU"]) for r in merged)
    assert got == [("K1", 0, 0.10), ("baseline", 0, 0.20), ("full", 0, 0.30), ("full", 1, 0.50)]


def test_report_without_results_is_one_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "ablate.py", "--report", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "ablations.json does not exist" in res.stderr
    assert "Traceback" not in res.stderr
