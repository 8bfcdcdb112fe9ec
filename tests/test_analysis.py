"""analysis/: statistics, categories, loading bad folders, the grid runner (resume, locks, SLURM)
and figures."""
import fcntl
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from analysis import choose_default, figures, grid, sweep_table, table
from analysis import results as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def result(experiment="toy", teacher="IA", student="IA", loss="kl", seed=0, evals=None,
           groups=False, curves=True, **config):
    """A result JSON as the exp_*.py scripts write it, with chosen numbers."""
    evals = evals or {"I": 0.5, "A": 0.5}
    student_eval, teacher_eval = {}, {}
    for name, acc in evals.items():
        m = {"acc": acc, "kl": 1 - acc, "agreement": acc}
        if groups:
            m.update({"groups": {"0": acc, "1": acc / 2}, "avg_acc": 0.75 * acc,
                      "worst_group_acc": acc / 2, "group_agreement": {"0": 1.0, "1": 0.5}})
        student_eval[name] = m
        teacher_eval[name] = {"acc": 0.9}
    cfg = {"teacher_config": teacher, "student_config": student, "loss": loss, "seed": seed,
           "alpha": 0.5, "temperature": 4.0, "steps": 10, "out": f"/somewhere/{seed}.json",
           "cache_dir": "c", **config}
    pts = [{"step": s, "loss": 0.1,
            "eval": {n: {"acc": a * s / 10, "kl": 1.0, "agreement": a} for n, a in evals.items()}}
           for s in (5, 10)] if curves else []
    return {"experiment": experiment, "args": cfg, "env": {},
            "teacher": {"cached": True, "eval": teacher_eval},
            "student": {"eval": student_eval, "curves": pts}, "exclusions": [],
            "test_sizes": {n: 10 for n in evals}, "timing": {}}


def write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return path


def run_script(script, *args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "analysis", script), *map(str, args)],
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run figures.py, table.py, sweep_table.py or choose_default.py in this process (as run_cli
    would): (returncode, stdout, stderr)."""
    def run(script, *args):
        module = {"figures.py": figures, "table.py": table, "sweep_table.py": sweep_table,
                  "choose_default.py": choose_default}[script]
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        code = 0
        try:
            figures.run_cli(module.main)
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


# ----------------------------------------------------------------------------- statistics

def test_summarize_mean_std_ci_by_hand():
    st = R.summarize([1.0, 2.0, 3.0])
    assert st.n == 3 and st.mean == pytest.approx(2.0) and st.std == pytest.approx(1.0)  # ddof=1
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, df=2) from a t table
    assert (st.lo, st.hi) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    two = R.summarize([0.6, 0.8])
    assert (two.std == pytest.approx(math.sqrt(0.02))
            and two.half_width == pytest.approx(12.706204736 * 0.1))


def test_summarize_single_and_empty_give_no_spread():
    one = R.summarize([0.7])
    assert (one.n == 1 and one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.lo)
            and math.isnan(one.hi))
    none = R.summarize([])
    assert none.n == 0 and math.isnan(none.mean)


def test_aggregate_groups_seeds_and_separates_cells(tmp_path):
    for seed, acc in ((0, 0.6), (1, 0.8)):
        write(tmp_path, f"kl{seed}.json", result(seed=seed, evals={"I": acc, "A": 0.1}))
        write(tmp_path, f"jac{seed}.json",
              result(loss="jacobian", seed=seed, evals={"I": acc + 0.1, "A": 0.2}))
    write(tmp_path, "other.json", result(teacher="I", seed=0, evals={"I": 0.3, "A": 0.3}))
    runs = R.load_results(str(tmp_path))
    rows = {(r["method"], r["teacher"], r["test_set"]): r for r in R.aggregate(runs, "acc")}
    kl = rows[("kl", "IA", "I")]
    assert kl["n"] == 2 and kl["seeds"] == [0, 1]
    assert kl["mean"] == pytest.approx(0.7) and kl["std"] == pytest.approx(math.sqrt(0.02))
    assert rows[("jacobian", "IA", "I")]["mean"] == pytest.approx(0.8)
    assert rows[("kl", "I", "I")]["n"] == 1 and math.isnan(rows[("kl", "I", "I")]["std"])
    diff = R.paired_difference(R.select(runs, method="jacobian", teacher="IA"),
                               R.select(runs, method="kl", teacher="IA"), "A", "acc")
    assert (diff.mean == pytest.approx(0.1) and diff.std == pytest.approx(0.0, abs=1e-12)
            and diff.n == 2)


def test_variants_of_one_loss_become_separate_methods(tmp_path):
    write(tmp_path, "a.json", result(temperature=1.0))
    write(tmp_path, "b.json", result(temperature=4.0))
    # alone in its cell: no variant label
    write(tmp_path, "c.json", result(loss="jacobian", alpha=0.2))
    runs = R.load_results(str(tmp_path))
    assert R.methods(runs) == ["kl [temperature=1.0]", "kl [temperature=4.0]",
                               "jacobian [temperature=4.0]"]


def test_curve_stats_over_seeds(tmp_path):
    for seed, acc in ((0, 0.4), (1, 0.6)):
        write(tmp_path, f"{seed}.json", result(seed=seed, evals={"I": acc}))
    steps, st = R.curve_stats(R.load_results(str(tmp_path)), "I", "acc")
    assert steps == [5, 10]
    assert [s.mean for s in st] == [pytest.approx(0.25), pytest.approx(0.5)]


# ----------------------------------------------------------------------------- categories

@pytest.mark.parametrize("teacher, student, test, letters, expected", [
    ("IA", "IA", "I", "IA", "similarity"),      # I is in both S and T
    ("IA", "IA", "IA", "IA", "similarity"),
    ("IA", "I", "A", "IA", "teacher"),          # A only in T, S and T share I
    ("I", "IA", "A", "IA", "student"),          # A only in S, S and T share I
    ("I", "A", "I", "IA", "neither"),           # S and T share nothing
    ("A", "I", "IA", "IA", "neither"),
    ("IA", "I", "IA", "IA", "other"),           # K partly in both, partly only in T
    ("IA", "IA", "I+rA", "IA", "similarity"),   # randomised A carries no label: K = {I}
    ("IA", "I", "rI+A", "IA", "teacher"),       # K = {A}
    ("I+rA", "IA", "A", "IA", "student"),       # the teacher's random colour is not
                                                # a mechanism of T
    ("I+rA", "IA", "I", "IA", "similarity"),
    ("IA", "IB", "A", "IAB", "teacher"),
    ("IA", "IB", "B", "IAB", "student"),
    ("IA", "IB", "AB", "IAB", "other"),         # A only in T, B only in S
    ("IAB", "IA", "B", "IAB", "teacher"),
    ("IA", "IA", "minority", "IA", None),       # not a configuration: no category
])
def test_category_by_hand(teacher, student, test, letters, expected):
    assert R.category(teacher, student, test, letters) == expected


@pytest.mark.parametrize("teacher,student,test,expected", [
    ("IA", "IA", "A", "similarity"),         # A is in both S and T
    ("I", "IB", "B", "student"),             # B only in S, S and T share I
    ("IB", "I", "B", "teacher"),             # B only in T, S and T share I
    ("I", "IA", "IA", "student_tp"),         # S is K, T holds part of K
    ("IA", "I", "IA", "teacher_sp"),         # T is K, S holds part of K
    ("IA", "IB", "AB", "overlap"),           # S and T share I, which K lacks
    ("IA", "IA", "B", "overlap"),
    ("A", "I", "I", "neither"),              # S and T share nothing
    ("A", "I", "IA", "neither"),
    ("IA", "IB", "IAB", "other"),            # share I, but K holds it and more than S or T
    ("IA", "I", "IB", "other"),
    ("IA", "IA", "minority", None),
])
def test_the_8_way_split_by_hand_and_its_fold_into_the_5_way(teacher, student, test, expected):
    assert R.category8(teacher, student, test, "IAB") == expected
    assert R.category(teacher, student, test, "IAB") == (
        None if expected is None else R.FOLD8.get(expected, expected))


def test_category_counts_over_the_dominoes_grid_are_the_reference_implementations():
    """Every (teacher, student, test set) cell of the seven configurations, 7 x 7 x 7 = 343."""
    configs = ("I", "A", "B", "IA", "IB", "AB", "IAB")
    cells = [(t, s, k) for t in configs for s in configs for k in configs]
    fine = {c: 0 for c in R.CATEGORIES8}
    coarse = {c: 0 for c in R.CATEGORIES}
    for t, s, k in cells:
        fine[R.category8(t, s, k, "IAB")] += 1
        coarse[R.category(t, s, k, "IAB")] += 1
    assert fine == {"similarity": 61, "student": 24, "teacher": 24, "student_tp": 18,
                    "teacher_sp": 18, "overlap": 60, "neither": 84, "other": 54}
    assert coarse == {"similarity": 61, "teacher": 24, "student": 24, "neither": 84,
                      "other": 150}
    assert [R.category_name(c) for c in R.CATEGORIES8] == [
        "similarity", "student", "teacher", "student TP", "teacher SP", "overlap", "neither",
        "other"]
    assert all(" " not in c for c in R.CATEGORIES8)  # keys usable on a command line


def test_category_spread_is_over_seeds_not_cells(tmp_path):
    grid_results(tmp_path)
    rows = R.aggregate(R.load_results(str(tmp_path)), "acc")
    kl = {s["category"]: s for s in R.category_summary(rows) if s["method"] == "kl"}
    # teacher cells (T = IA, S = I, K = A): accuracy/2, 0.25 with seed 0 and 0.30 with seed 1,
    # in each cell
    half = 12.706204736 * math.sqrt(0.00125) / math.sqrt(2)
    assert kl["teacher"]["mean"] == pytest.approx(0.275) and kl["teacher"]["seeds"] == 2
    assert kl["teacher"]["ci_hi"] - kl["teacher"]["mean"] == pytest.approx(half, rel=1e-6)
    fine = {s["category"] for s in R.category_summary(rows, "category8")}
    assert fine <= set(R.CATEGORIES8) and "overlap" in fine
    assert all(s["cells_dropped"] == 0 for s in R.category_summary(rows))


def test_category_spread_uses_only_the_cells_every_seed_has():
    """Seed 2 lacks the third cell: each seed's mean is over the first two cells only, so the seeds
    are compared on the same cells; the category's mean still takes every cell."""
    def cell(name, per_seed):
        values = list(per_seed.values())
        return {"experiment": "toy", "method": "kl", "teacher": "IB", "student": "I",
                "test_set": name, "category": "teacher", "metric": "acc",
                "mean": sum(values) / len(values), "per_seed": per_seed}
    rows = [cell("B", {0: 0.2, 1: 0.4, 2: 0.6}), cell("B2", {0: 0.4, 1: 0.4, 2: 0.8}),
            cell("B3", {0: 0.9, 1: 0.1})]
    summary, = R.category_summary(rows)
    assert summary["cells_dropped"] == 1 and summary["cells"] == 3 and summary["seeds"] == 3
    paired = R.summarize([0.3, 0.4, 0.7])  # seed means over B and B2
    assert summary["std"] == pytest.approx(paired.std)
    assert summary["mean"] == pytest.approx((0.4 + 1.6 / 3 + 0.5) / 3)
    assert summary["ci_hi"] - summary["mean"] == pytest.approx(paired.half_width)


def test_mechanism_letters_and_config_order(tmp_path):
    write(tmp_path, "a.json",
          result(teacher="I+rA", student="IA", evals={"I": 0.5, "rI+A": 0.5, "minority": 0.1}))
    runs = R.load_results(str(tmp_path))
    assert R.mechanism_letters(runs) == "IA"
    assert (R.config_order(["IA", "minority", "A", "I+rA", "I"], "IA")
            == ["I", "I+rA", "A", "IA", "minority"])


# ----------------------------------------------------------------------------- bad input

def test_missing_and_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(R.UserError, match="does not exist"):
        R.load_results(str(tmp_path / "nope"))
    with pytest.raises(R.UserError, match="no result JSON files"):
        R.load_results(str(tmp_path))


def test_foreign_and_truncated_files_are_skipped_and_counted(tmp_path):
    good = json.dumps(result())
    write(tmp_path, "good.json", good)
    write(tmp_path, "truncated.json", good[: len(good) // 2])
    write(tmp_path, "foreign.json", {"name": "package.json of something else"})
    write(tmp_path, "list.json", [1, 2])
    write(tmp_path, "noeval.json", {**result(), "student": {"eval": {}}})
    write(tmp_path / "copy", "good.json", good)  # the same run twice
    warnings = []
    runs = R.load_results(str(tmp_path), warn=warnings.append)
    assert len(runs) == 1
    assert len(warnings) == 1 and "skipped 5 of 6" in warnings[0]
    assert ("truncated.json: not valid JSON" in warnings[0]
            and "foreign.json: no experiment" in warnings[0])


def test_only_foreign_files_is_a_user_error(tmp_path):
    write(tmp_path, "x.json", {"hello": 1})
    with pytest.raises(R.UserError, match="none of the 1 JSON files"):
        R.load_results(str(tmp_path), warn=lambda m: None)


def spoil(data, where):
    """`data` with one number made null / NaN / infinite, or with a flag, as a diverged or suspect
    run writes it."""
    if where == "student null":
        data["student"]["eval"]["I"]["acc"] = None
    elif where == "student NaN (older file)":
        data["student"]["eval"]["I"]["acc"] = float("nan")  # json.dumps writes a bare NaN
    elif where == "teacher Infinity":
        data["teacher"]["eval"]["A"]["acc"] = float("inf")
    elif where == "curve null":
        data["student"]["curves"][0]["eval"]["I"]["kl"] = None
    elif where == "group null":
        data["student"]["eval"]["A"]["groups"]["1"] = None
    elif where == "excluded":
        data["exclusions"] = ["student did not fit its distillation data (train acc 0.41)"]
    return data


@pytest.mark.parametrize("where", ["student null", "student NaN (older file)", "teacher Infinity",
                                   "curve null", "group null", "excluded"])
def test_a_run_with_a_nonfinite_metric_or_an_exclusion_is_skipped_whole(tmp_path, where):
    write(tmp_path, "s0.json", result(seed=0, evals={"I": 0.6, "A": 0.2}, groups=True))
    write(tmp_path, "s1.json",
          spoil(result(seed=1, evals={"I": 0.8, "A": 0.4}, groups=True), where))
    write(tmp_path, "s2.json", result(seed=2, evals={"I": 0.7, "A": 0.3}, groups=True))
    warnings = []
    runs = R.load_results(str(tmp_path), warn=warnings.append)
    assert sorted(r.seed for r in runs) == [0, 2]
    # the spoiled run's other metrics are left out too: kl of A is (0.8 + 0.7) / 2, not also 0.6's
    rows = {(r["test_set"], r["metric"]): r for m in ("kl", "acc") for r in R.aggregate(runs, m)}
    assert rows[("A", "kl")]["n"] == 2 and rows[("A", "kl")]["mean"] == pytest.approx(0.75)
    assert rows[("I", "acc")]["seeds"] == [0, 2]
    assert R.curve_stats(runs, "I", "kl")[1][0].n == 2
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert warnings[0].startswith(f"warning: skipped run {tmp_path / 's1.json'}: ")
    reason = {"student null": "student.eval.I.acc",
              "student NaN (older file)": "student.eval.I.acc",
              "teacher Infinity": "teacher.eval.A.acc", "curve null": "student.curves[step 5].I.kl",
              "group null": "student.eval.A.groups.1",
              "excluded": "excluded: student did not fit"}[where]
    assert reason in warnings[0]
    assert warnings[1].startswith("warning: skipped 1 of 3 runs: ")


def test_cli_reports_skipped_runs_on_stderr_and_all_skipped_is_an_error(tmp_path, cli):
    write(tmp_path, "a.json", result(seed=0, evals={"I": 0.6}))
    write(tmp_path, "b.json", spoil(result(seed=1, evals={"I": 0.2}), "excluded"))
    write(tmp_path, "c.json", spoil(result(seed=2, evals={"I": 0.9}), "student null"))
    r = cli("table.py", tmp_path, "--metric", "kl", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split(",")[-1] == "0.4"  # run a alone: kl = 1 - 0.6
    lines = r.stderr.splitlines()
    assert (len(lines) == 4 and "b.json: excluded" in lines[0]
            and "c.json: null or non-finite" in lines[1])
    assert lines[2] == ("warning: skipped 2 of 3 runs: 1 with null or non-finite metrics, "
                        "1 excluded (each run is left out whole, so no mean mixes it in)")
    # the CSV stays clean: the table's note goes to stderr
    assert lines[3] == "toy: left out: 1 run excluded by the scripts (kl 1)"
    os.remove(tmp_path / "a.json")
    r = cli("figures.py", tmp_path, "--out", tmp_path / "f")
    assert r.returncode == 2 and "error: every run in" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["figures.py", "table.py"])
def test_cli_bad_folders_give_one_line_no_traceback(tmp_path, script, cli):
    empty = run_script(script, tmp_path,
                       *(["--out", tmp_path / "f"] if script == "figures.py" else []))
    assert empty.returncode == 2 and empty.stderr.startswith("error: no result JSON files")
    assert "Traceback" not in empty.stderr
    write(tmp_path, "x.json", "{broken")
    broken = cli(script, tmp_path)
    assert (broken.returncode == 2 and "skipped 1 of 1" in broken.stderr
            and "Traceback" not in broken.stderr)
    assert not (tmp_path / "f").exists() or not os.listdir(tmp_path / "f")  # no blank figures


def test_cli_unknown_metric_and_experiment(tmp_path, cli):
    write(tmp_path, "a.json", result())
    r = cli("table.py", tmp_path, "--metric", "bleu")
    assert r.returncode == 2 and "has no metric 'bleu'" in r.stderr and "acc" in r.stderr
    r = cli("figures.py", tmp_path, "--experiment", "nope", "--out", tmp_path / "f")
    assert r.returncode == 2 and "no results of experiment 'nope'" in r.stderr


# ----------------------------------------------------------------------------- figures and tables

def grid_results(folder, experiment="toy", groups=False, seeds=(0, 1)):
    for t in ("I", "A", "IA"):
        for s in ("I", "IA"):
            for loss in ("kl", "jacobian"):
                for seed in seeds:
                    acc = 0.5 + 0.1 * seed + (0.1 if loss == "jacobian" else 0)
                    write(folder, f"{experiment}_{t}_{s}_{loss}_{seed}.json",
                          result(experiment, t, s, loss, seed,
                                 {"I": acc, "A": acc / 2, "I+rA": acc / 3}, groups=groups))


def figure_args(folder, out, *extra):
    return figures.parser.parse_args([str(folder), "--out", str(out), *extra])


@pytest.mark.slow
def test_figures_of_a_grid_are_written_and_not_empty(tmp_path):
    grid_results(tmp_path / "r")
    os.makedirs(tmp_path / "f")
    written = []
    runs = R.load_results(str(tmp_path / "r"))
    figures.draw_experiment(runs, "toy",
                            figure_args(tmp_path / "r", tmp_path / "f", "--metrics", "acc", "kl"),
                            written)
    names = {os.path.basename(p) for p in written}
    assert "toy_bars_I_IA.png" in names and "toy_curves_IA_I.png" in names
    assert {f"toy_heatmap_{m}_{l}.png" for m in ("acc", "kl") for l in ("kl", "jacobian")} <= names
    assert {f"toy_diff_{m}_jacobian-minus-kl.png" for m in ("acc", "kl")} <= names
    assert {f"toy_categories_{m}.png" for m in ("acc", "kl")} <= names
    assert not any("agreement" in n for n in names)
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000


@pytest.mark.slow
def test_figures_cli_mixed_experiments_groups_and_single_seed(tmp_path, cli):
    grid_results(tmp_path / "r", "toy")
    grid_results(tmp_path / "r", "birds", groups=True, seeds=(0,))
    r = cli("figures.py", tmp_path / "r", "--out", tmp_path / "f", "--pair", "IA/IA",
            "--kinds", "bars", "heatmap", "--methods", "kl")
    assert r.returncode == 0, r.stderr
    assert "holds 2 experiments (birds, toy): drawing each separately" in r.stdout
    files = os.listdir(tmp_path / "f")
    assert "birds_groups_IA_IA.png" in files and "birds_heatmap_worst_group_acc_kl.png" in files
    assert "toy_bars_IA_IA.png" in files and "toy_bars_I_IA.png" not in files  # --pair chose one
    assert all(os.path.getsize(tmp_path / "f" / n) > 5000 for n in files)


def test_single_pair_has_bars_but_no_heatmaps(tmp_path, cli):
    write(tmp_path / "r", "a.json", result(evals={"I": 0.6, "IA": 0.9}))
    r = cli("figures.py", tmp_path / "r", "--out", tmp_path / "f")
    assert r.returncode == 0, r.stderr
    assert "one (teacher, student) pair only" in r.stdout
    assert sorted(os.listdir(tmp_path / "f")) == ["toy_bars_IA_IA.png", "toy_curves_IA_IA.png"]


def test_tables_markdown_by_cell_and_category(tmp_path, cli):
    grid_results(tmp_path)
    r = cli("table.py", tmp_path, "--metric", "acc")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("| IA | I | I |"))
    half = 12.706204736 * math.sqrt(0.005) / math.sqrt(2)  # std of (0.5, 0.6) is sqrt(0.005)
    assert f"0.550 ± 0.071 [{0.55 - half:.3f}, {0.55 + half:.3f}]" in line and "similarity" in line
    r = cli("table.py", tmp_path, "--metric", "acc", "--by", "category", "--format", "csv")
    rows = [x.split(",") for x in r.stdout.splitlines() if x]
    assert rows[0] == ["category", "kl", "jacobian", "cells", "cells lacking a seed"]
    cats = {row[0]: row for row in rows[1:]}
    # teacher category: T=IA, S=I, K=A -> every cell's mean over seeds is 0.55/2 for kl
    assert float(cats["teacher"][1]) == pytest.approx(0.275)
    assert {"similarity", "teacher", "student", "neither"} <= set(cats)
    r = cli("table.py", tmp_path, "--metric", "acc", "--by", "category", "--format", "csv",
            "--reference")
    rows = [x.split(",") for x in r.stdout.splitlines() if x]
    assert rows[0] == ["category", "kl", "jacobian", "reference kl", "reference jacobian", "cells",
                       "cells lacking a seed"]
    assert {row[0]: row[3:5] for row in rows[1:]}["teacher"] == ["0.163", "0.173"]
    r = cli("table.py", tmp_path, "--metric", "kl", "--reference")
    assert r.returncode == 2 and "--metric acc --by category" in r.stderr


def test_category_difference_is_paired_by_seed_with_its_detectable_size():
    from scipy import stats
    rows = []
    for method, cells in (("jacobian", ({0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.3, 1: 0.3, 2: 0.3})),
                          ("kl", ({0: 0.4, 1: 0.5, 2: 0.6}, {0: 0.3, 1: 0.1, 2: 0.2}))):
        for k, per_seed in zip(("B", "A"), cells):
            rows.append({"experiment": "toy", "method": method, "teacher": "IB",
                         "student": "I", "test_set": k, "category": "teacher",
                         "per_seed": per_seed})
    [d] = R.category_difference(rows, "jacobian", "kl")
    # per seed, the mean over the two cells: 0.05, 0.2, 0.05
    std = math.sqrt((0.05 ** 2 + 0.1 ** 2 + 0.05 ** 2) / 2)
    half = stats.t.ppf(0.975, 2) * std / math.sqrt(3)
    assert (d["mean"], d["std"], d["n"], d["cells"]) == (pytest.approx(0.1), pytest.approx(std),
                                                         3, 2)
    assert (d["ci_lo"], d["ci_hi"]) == (pytest.approx(0.1 - half), pytest.approx(0.1 + half))
    assert d["detectable"] == pytest.approx(
        (stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * std / math.sqrt(3))
    # a third cell that kl lacks for seed 2 is left out whole; the seeds stay paired on the rest
    rows += [{"experiment": "toy", "method": m, "teacher": "IB", "student": "I", "test_set": "IB",
              "category": "teacher", "per_seed": ps}
             for m, ps in (("jacobian", {0: 0.9, 1: 0.9, 2: 0.9}), ("kl", {0: 0.1, 1: 0.1}))]
    [d2] = R.category_difference(rows, "jacobian", "kl")
    assert (d2["mean"], d2["n"], d2["cells"], d2["cells_dropped"]) == (
        pytest.approx(0.1), 3, 2, 1)
    n = R.seeds_needed(std, 0.01)
    assert R.detectable_difference(std, n) <= 0.01 < R.detectable_difference(std, n - 1)
    assert R.seeds_needed(float("nan"), 0.01) is None


def test_table_minus_prints_each_loss_minus_kl_per_category(tmp_path, cli):
    grid_results(tmp_path)  # jacobian is kl + 0.1 on I, + 0.05 on A (the teacher cell)
    r = cli("table.py", tmp_path, "--metric", "acc", "--by", "category", "--minus", "kl")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("| teacher |"))
    assert "+0.050 [+0.050, +0.050] (detects ≥ 0.000; 0.01 needs 2 seeds)" in line
    assert "jacobian − kl" in r.stdout
    r = cli("table.py", tmp_path, "--minus", "contrastive", "--by", "category")
    assert r.returncode == 2 and "has no runs of it" in r.stderr
    r = cli("table.py", tmp_path, "--minus", "kl")
    assert r.returncode == 2 and "--by category" in r.stderr


def test_the_new_measures_are_metrics_of_tables_and_figures(tmp_path, cli):
    """Nested measures (cue_share.A, the teacher's teacher_cue_share.A) and CKA are metrics like
    accuracy: tables and figures read them with --metric / --metrics."""
    for teacher in ("IA", "I"):
        for seed, share in ((0, 0.2), (1, 0.4)):
            r = result(teacher=teacher, seed=seed, evals={"I": 0.5, "IA": 0.9})
            for name in ("I", "IA"):
                r["student"]["eval"][name].update({"cka": 0.8, "cue_share": {"A": share}})
                r["teacher"]["eval"][name]["cue_share"] = {"A": 0.9}
            write(tmp_path / "r", f"{teacher}_{seed}.json", r)
    for metric, want in (("cue_share.A", 0.3), ("teacher_cue_share.A", 0.9), ("cka", 0.8)):
        out = cli("table.py", tmp_path / "r", "--metric", metric, "--format", "csv")
        assert out.returncode == 0, out.stderr
        line = next(l for l in out.stdout.splitlines() if l.startswith("IA,IA,I,"))
        assert float(line.split(",")[4]) == pytest.approx(want)
    out = cli("figures.py", tmp_path / "r", "--out", tmp_path / "f", "--metrics", "cka",
              "cue_share.A")
    assert out.returncode == 0, out.stderr
    names = os.listdir(tmp_path / "f")
    assert any("heatmap_cue_share" in f for f in names) and any("heatmap_cka" in f for f in names)


def test_sets_limit_the_categories_to_the_named_test_sets(tmp_path, cli):
    # test sets I, A and I+rA; I+rA counts as I (its label-carrying mechanism)
    grid_results(tmp_path)
    r = cli("table.py", tmp_path, "--metric", "acc", "--by", "category", "--format", "csv",
            "--sets", "I", "A")
    assert r.returncode == 0, r.stderr
    sim = {row[0]: row for row in (l.split(",") for l in r.stdout.splitlines())}["similarity"]
    # kl's similarity cells: K = I in (I,I), (IA,I), (I,IA), (IA,IA) at 0.55;
    # K = A in (IA,IA), (A,IA) at 0.275
    assert float(sim[1]) == pytest.approx((4 * 0.55 + 2 * 0.275) / 6) and sim[-2:] == ["6/6", "0/0"]
    r = cli("table.py", tmp_path, "--metric", "acc", "--by", "category", "--format", "csv")
    sim_all = {row[0]: row for row in (l.split(",") for l in r.stdout.splitlines())}["similarity"]
    assert sim_all[-2] == "10/10"  # plus the four I+rA cells
    r = cli("table.py", tmp_path, "--sets", "I", "AB")
    assert r.returncode == 2 and "no test set AB" in r.stderr and "Traceback" not in r.stderr
    runs = R.only_sets(R.load_results(str(tmp_path)), ["A"])
    assert all(set(r.student_eval) == {"A"} and all(set(m) <= {"A"} for _, m in r.curves)
               for r in runs)


@pytest.mark.slow
def test_figures_sets_and_the_8_way_categories_figure(tmp_path, monkeypatch):
    grid_results(tmp_path / "r")
    panels = {}
    real_save = figures.save

    def keep(fig, path, written):
        panels[os.path.basename(path)] = [ax.get_title() for ax in fig.axes if ax.get_title()]
        real_save(fig, path, written)
    monkeypatch.setattr(figures, "save", keep)
    os.makedirs(tmp_path / "f")
    runs = R.load_results(str(tmp_path / "r"))
    figures.draw_experiment(runs, "toy",
                            figure_args(tmp_path / "r", tmp_path / "f", "--kinds", "heatmap",
                                        "categories", "--metrics", "acc", "--sets", "I", "A"),
                            [])
    assert panels["toy_heatmap_acc_kl.png"] == ["test set I", "test set A"]  # I+rA left out
    # (IA, I, IA) is `other`
    assert "toy_categories_acc.png" in panels and "toy_categories8_acc.png" in panels
    with pytest.raises(figures.UserError, match="no test set B"):
        figures.draw_experiment(runs, "toy",
                                figure_args(tmp_path / "r", tmp_path / "f", "--sets", "B"), [])


# ----------------------------------------------------------------------------- grid runner: cells

def test_all_configs_and_cell_order():
    assert grid.all_configs("IA") == ["I", "A", "IA"]
    assert grid.all_configs("IAB") == ["I", "A", "B", "IA", "IB", "AB", "IAB"]
    cells = grid.make_cells(["I", "A"], ["I", "A"], ["kl", "jacobian"], [0, 1])
    assert len(cells) == 16 and len(set(cells)) == 16
    # teachers first
    assert {(c.teacher, c.seed) for c in cells[:4]} == {("I", 0), ("I", 1), ("A", 0), ("A", 1)}
    assert [c.loss for c in cells[4:]] == sorted((c.loss for c in cells[4:]),
                                                 key=grid.COST_ORDER.index)


def test_array_spec():
    assert grid.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert grid.array_spec([3]) == "3"


FAKE = (r'''
import argparse, json, os, signal, sys, time
def on_sigterm(signum, frame):  # as common.run_cli does
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, on_sigterm)
def main(argv=None, memo=None):  # the signature the grid engine runs in-process
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser()
    for f in ("--teacher-config", "--student-config", "--loss", "--out", "--cache-dir"):
        p.add_argument(f)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, default=1)
    a = p.parse_args(argv)
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(os.path.basename(a.out) + "\n")
    if os.environ.get("FAKE_BAD_FLAGS"):
        print("error: --steps must be at least 1", file=sys.stderr); sys.exit(2)
    if a.teacher_config == os.environ.get("FAKE_BLOCK_TEACHER"):
        open(os.environ["FAKE_STARTED"], "a").close()
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted: no result was written", file=sys.stderr); sys.exit(130)
        sys.exit(1)
    if a.teacher_config == os.environ.get("FAKE_FAIL_TEACHER"):
        print("boom", file=sys.stderr); sys.exit(1)
    m = {"I": {"acc": 0.5, "kl": 0.1, "agreement": 0.5}}
    cfg = {"teacher_config": a.teacher_config, "student_config": a.student_config, '''
        r'''"loss": a.loss, "seed": a.seed,
           "steps": a.steps}
    with open(a.out, "w") as f:
        json.dump({"experiment": "fake", "args": cfg, "teacher": {"eval": {"I": {"acc": 0.9}}},
                   "student": {"eval": m, "curves": []}, "exclusions": [], '''
        r'''"provenance": {"argv": argv}}, f)
if __name__ == "__main__":
    main()
''')


@pytest.fixture(params=["engine", "per-process"])
def fake(tmp_path, request):
    """The grid over a fake script, run by engine processes or one process per cell."""
    script = tmp_path / "exp_fake.py"
    script.write_text(FAKE)
    env = dict(os.environ, FAKE_LOG=str(tmp_path / "calls.log"))
    how = ["--per-process"] if request.param == "per-process" else []

    def run_grid(*extra, env_extra=None, **kw):
        cmd = [sys.executable, os.path.join(ROOT, "analysis", "grid.py"), str(script),
               "--teachers", "I", "A", "--students", "IA", "--losses", "kl", "ce", "--seeds", "0",
               "--results", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"),
               "--workers", "2", *how, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**env, **(env_extra or {})}, **kw)

    def calls():
        path = tmp_path / "calls.log"
        return sorted(path.read_text().split()) if path.exists() else []

    return run_grid, calls, tmp_path, dict(env, GRID_HOW=" ".join(how))


def cell_argv(tmp_path, name, *extra, out=None, cache_dir=None):
    """The arguments the fake grid passes to the script for cell `name` (e.g. I_IA_kl_seed0)."""
    teacher, student, loss, seed = name.split("_")
    return ["--teacher-config", teacher, "--student-config", student, "--loss", loss,
            "--seed", seed.removeprefix("seed"),
            "--out", out or str(tmp_path / "res" / f"{name}.json"),
            "--cache-dir", cache_dir or str(tmp_path / "cache"), *extra]


def done_cell(tmp_path, name, *extra, **kw):
    """A result of cell `name` made with the grid's arguments (plus `extra` after --)."""
    return write(tmp_path / "res", f"{name}.json",
                 {**result(), "provenance": {"argv": cell_argv(tmp_path, name, *extra)}, **kw})


@pytest.mark.slow
def test_grid_runs_missing_cells_only(fake):
    run_grid, calls, tmp_path, _ = fake
    done_cell(tmp_path, "I_IA_kl_seed0", "--steps", "3")
    r = run_grid("--", "--steps", "3")
    assert r.returncode == 0, r.stderr
    assert "4 cells, 1 done already, running 3" in r.stdout
    assert calls() == ["A_IA_ce_seed0.json", "A_IA_kl_seed0.json", "I_IA_ce_seed0.json"]
    with open(tmp_path / "res" / "A_IA_kl_seed0.json") as f:
        assert json.load(f)["args"]["steps"] == 3  # arguments after -- reach the script
    again = run_grid("--", "--steps", "3")
    assert again.returncode == 0 and "nothing to run" in again.stdout and len(calls()) == 3


@pytest.mark.slow
def test_grid_failed_cells_are_reported_and_rerun(fake):
    run_grid, calls, tmp_path, _ = fake
    r = run_grid(env_extra={"FAKE_FAIL_TEACHER": "A"})
    assert r.returncode == 1
    assert "FAILED A_IA_kl_seed0" in r.stdout and "boom" in r.stdout
    assert sorted(os.listdir(tmp_path / "res")) == ["I_IA_ce_seed0.json", "I_IA_kl_seed0.json",
                                                    "logs"]
    r = run_grid()
    assert r.returncode == 0 and "2 done already, running 2" in r.stdout
    assert calls().count("A_IA_kl_seed0.json") == 2 and calls().count("I_IA_kl_seed0.json") == 1


@pytest.mark.slow
def test_grid_stops_when_the_script_rejects_its_flags(fake):
    run_grid, calls, _, _ = fake
    r = run_grid(env_extra={"FAKE_BAD_FLAGS": "1"})
    assert r.returncode == 1 and "rejected its arguments" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-in-background"])
def test_grid_interrupt_then_resume(fake, how):
    run_grid, calls, tmp_path, env = fake
    started = tmp_path / "started"
    cmd = [sys.executable, os.path.join(ROOT, "analysis", "grid.py"), str(tmp_path / "exp_fake.py"),
           "--teachers", "I", "A", "--students", "IA", "--losses", "kl", "ce", "--seeds", "0",
           "--results", str(tmp_path / "res"), "--workers", "1", *env["GRID_HOW"].split()]
    # a runner started in the background by a shell script ignores SIGINT, and so do its cells; an
    # interactive one gets the default (set explicitly: pytest itself may run in the background,
    # with SIGINT ignored)
    sigint = signal.SIG_DFL if how == "ctrl-c" else signal.SIG_IGN
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
                            env={**env, "FAKE_BLOCK_TEACHER": "A", "FAKE_STARTED": str(started)})
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert started.exists()
    # while a cell of teacher A runs
    proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command" in err and "Traceback" not in err
    logs = [open(tmp_path / "res" / "logs" / n).read()
            for n in os.listdir(tmp_path / "res" / "logs") if n.startswith("A_")]
    # the cell was stopped, not killed
    assert any("interrupted: no result was written" in log for log in logs)
    done = {n for n in os.listdir(tmp_path / "res") if n.endswith(".json")}
    # the interrupted cell wrote nothing
    assert all(n.startswith("I_") for n in done) and len(done) <= 2
    before = len(calls())
    r = run_grid()
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(done)} done already, running {4 - len(done)}" in r.stdout
    assert len(calls()) - before == 4 - len(done)
    assert len([n for n in os.listdir(tmp_path / "res") if n.endswith(".json")]) == 4


@pytest.mark.slow
def test_grid_skips_a_cell_another_runner_holds(fake):
    run_grid, calls, tmp_path, _ = fake
    os.makedirs(tmp_path / "res" / "logs")
    with open(tmp_path / "res" / "logs" / "A_IA_kl_seed0.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = run_grid()
    assert "busy   A_IA_kl_seed0" in r.stdout and "A_IA_kl_seed0.json" not in calls()
    assert len(calls()) == 3


@pytest.mark.slow
def test_grid_bad_arguments(fake):
    run_grid, _, tmp_path, _ = fake
    r = run_grid("--", "--seed", "3")
    assert (r.returncode == 2
            and r.stderr.startswith("error: '--seed' after -- would set the script's --seed"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "grid.py"), "nope.py",
                        "--mechanisms", "IA"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.py not found" in r.stderr
    r = run_grid("--teachers", "I", "x y")
    assert r.returncode == 2 and "'x y' is not a configuration" in r.stderr


@pytest.fixture
def grid_cli(tmp_path, capsys, monkeypatch):
    """Run grid.py in this process, as run_cli would (bad input is rejected before any cell starts):
    (returncode, stdout, stderr)."""
    script = tmp_path / "exp_fake.py"
    script.write_text(FAKE)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["grid.py", str(script), "--teachers", "I",
                                          "--students", "IA", "--losses", "kl", "--seeds", "0",
                                          "--results", str(tmp_path / "res"), *map(str, args)])
        code = 0
        try:
            grid.run_cli(lambda: sys.exit(grid.main()))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


def not_executable(tmp_path):
    path = tmp_path / "python-text"
    path.write_text("not a program")
    return path


@pytest.mark.parametrize("bad, message", [
    (["--python", "/nonexistent/python3"],
     "--python /nonexistent/python3 is not an executable file"),
    (["--python", not_executable], "is not an executable file"),
    (["--python", "no-such-python-9z"], "--python no-such-python-9z is not found on PATH"),
    (["--slurm-time", "-1"], "--slurm-time '-1' is not a SLURM time"),
    (["--slurm-time", "0"], "--slurm-time must be positive"),
    (["--slurm-time", "0-00:00"], "--slurm-time must be positive"),
    (["--slurm-time", "2h"], "is not a SLURM time"),
    (["--slurm-time", "02:75:00"], "is not a SLURM time"),
    (["--slurm-time", "1:02:03:04"], "is not a SLURM time"),
    # argparse takes '-8G' alone for a flag
    (["--slurm-mem=-8G"], "--slurm-mem '-8G' is not a positive amount"),
    (["--slurm-mem", "0"], "is not a positive amount"),
    (["--slurm-mem", "8GB"], "is not a positive amount"),
    (["--slurm-gpus", "-1"], "--slurm-gpus must be 0 or more, got -1"),
    (["--slurm-max-parallel", "0"], "--slurm-max-parallel must be at least 1, got 0"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--threads", "-2"], "--threads must be at least 1, got -2"),
    (["--", "--see", "5"], "'--see' after -- would set the script's --seed, which the grid sets"),
    (["--", "--seed=5"], "'--seed=5' after -- would set the script's --seed"),
    (["--", "--steps", "2", "--lo=ce"], "'--lo=ce' after -- would set the script's --loss"),
    (["--", "--cache", "x"], "would set the script's --cache-dir"),
    (["--", "--s", "1"], "would set the script's --student-config or --seed"),
])
def test_grid_rejects_bad_options_before_anything_runs(grid_cli, tmp_path, bad, message):
    bad = [b(tmp_path) if callable(b) else b for b in bad]
    at = bad.index("--") if "--" in bad else len(bad)
    for extra in ([], ["--slurm", tmp_path / "g.sbatch"]):
        r = grid_cli(*bad[:at], *extra, *bad[at:])
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stdout == ""
    assert not (tmp_path / "res").exists() and not (tmp_path / "g.sbatch").exists()


def test_grid_accepts_every_slurm_time_format_and_no_abbreviations(grid_cli, tmp_path):
    for time_limit in ("90", "30:00", "02:00:00", "1-12", "1-12:30", "1-12:30:15"):
        r = grid_cli("--slurm", tmp_path / "g.sbatch", "--slurm-time", time_limit,
                     "--slurm-mem", "500m", "--slurm-gpus", "0",
                     "--python", "sh", "--", "--steps", "2")  # a name found on PATH
        assert r.returncode == 0, r.stderr
        text = (tmp_path / "g.sbatch").read_text()
        assert f"#SBATCH --time={time_limit}\n" in text and "#SBATCH --mem=500M\n" in text
    with pytest.raises(SystemExit):  # the grid's own flags are not abbreviated either
        grid.parser.parse_args(["exp_fake.py", "--mech", "IA"])


@pytest.mark.slow
def test_grid_resumes_only_results_made_with_the_cells_settings(fake):
    run_grid, calls, tmp_path, _ = fake
    # --out and --cache-dir do not change the numbers; a excluded result is done too
    write(tmp_path / "res", "I_IA_kl_seed0.json",
          {**result(), "provenance": {"argv": cell_argv(tmp_path, "I_IA_kl_seed0", "--steps", "5",
                                                        out="/elsewhere/x.json",
                                                        cache_dir="/other/cache")}})
    done_cell(tmp_path, "A_IA_kl_seed0", "--steps=5",
              flags=["student did not fit its distillation data"])
    r = run_grid("--dry-run", "--", "--steps", "5")
    assert r.returncode == 0, r.stderr
    assert sum(l.startswith("done  ") for l in r.stdout.splitlines()) == 2
    mismatched = done_cell(tmp_path, "I_IA_ce_seed0", "--steps", "3")
    for extra in (["--dry-run"], ["--slurm", str(tmp_path / "g.sbatch")], []):
        r = run_grid(*extra, "--", "--steps", "5")
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stdout == ""
        assert r.stderr.startswith(f"error: {mismatched} exists but was made with other settings")
        assert "it has --steps 3, the grid passes --steps 5" in r.stderr
        assert "use another --results folder or delete the file" in r.stderr
    assert (not calls() and not (tmp_path / "g.sbatch").exists()
            and not (tmp_path / "res" / "logs").exists())


@pytest.mark.slow
@pytest.mark.parametrize("content, why", [
    (result(), "records no provenance.argv (an older file"),
    ('{"experiment": "fake", "provenance": ', "is not valid JSON"),
])
def test_grid_refuses_results_of_unknown_settings(fake, content, why):
    run_grid, calls, tmp_path, _ = fake
    done_cell(tmp_path, "I_IA_kl_seed0")
    old = write(tmp_path / "res", "A_IA_ce_seed0.json", content)
    write(tmp_path / "res", "I_IA_ce_seed0.json", content)
    r = run_grid()
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and not calls()
    assert r.stderr.startswith(f"error: {old} exists but {why}")
    assert ("(1 more of this grid's files do not match either)" in r.stderr
            and "delete the files" in r.stderr)


# ----------------------------------------------------------------------------- grid runner: SLURM

SBATCH_OPTIONS = {"job-name", "array", "ntasks", "cpus-per-task", "mem", "time", "output",
                  "partition", "gres"}


@pytest.mark.slow
def test_slurm_script_is_valid_sbatch_input(fake):
    run_grid, calls, tmp_path, env = fake
    done_cell(tmp_path, "I_IA_kl_seed0", "--steps", "2")
    r = run_grid("--slurm", str(tmp_path / "grid.sbatch"), "--slurm-partition", "gpu",
                 "--slurm-gpus", "1", "--slurm-max-parallel", "2", "--", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "3 array tasks" in r.stdout and not calls()  # writing the script runs nothing
    text = (tmp_path / "grid.sbatch").read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    directives = [l for l in lines if l.startswith("#SBATCH")]
    # sbatch stops reading at the first command
    assert all(lines.index(d) < first_command for d in directives)
    opts = {}
    for d in directives:
        m = re.fullmatch(r"#SBATCH --([a-z-]+)=(\S+)", d)
        assert m, d
        opts[m.group(1)] = m.group(2)
    assert set(opts) <= SBATCH_OPTIONS and opts["partition"] == "gpu" and opts["gres"] == "gpu:1"
    assert re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*(%\d+)?", opts["array"])
    assert (re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", opts["time"])
            and re.fullmatch(r"\d+[KMGT]?", opts["mem"]))
    assert os.path.isdir(os.path.dirname(opts["output"]))  # sbatch does not create it
    cells = grid.make_cells(["I", "A"], ["IA"], ["kl", "ce"], [0])
    done_index = [c.name for c in cells].index("I_IA_kl_seed0")
    todo = sorted(set(range(4)) - {done_index})
    assert opts["array"] == grid.array_spec(todo) + "%2"
    assert subprocess.run(["bash", "-n", str(tmp_path / "grid.sbatch")]).returncode == 0
    # run one array task the way SLURM would: it must run exactly its cell
    task = todo[0]
    r = subprocess.run(["bash", str(tmp_path / "grid.sbatch")], capture_output=True, text=True,
                       timeout=60, env={**env, "SLURM_ARRAY_TASK_ID": str(task)})
    assert r.returncode == 0, r.stderr
    assert calls() == [f"{cells[task].name}.json"]
    with open(tmp_path / "res" / f"{cells[task].name}.json") as f:
        assert json.load(f)["args"]["steps"] == 2
    r = subprocess.run(["bash", str(tmp_path / "grid.sbatch")], capture_output=True, text=True,
                       timeout=60, env={**env, "SLURM_ARRAY_TASK_ID": str(done_index)})
    assert r.returncode == 0 and "done already" in r.stdout and len(calls()) == 1


# ----------------------------------------------------------------------------- with the real script

@pytest.mark.slow
def test_grid_with_the_real_script_trains_each_teacher_once(tmp_path):
    """Two workers, two cells that need the same teacher: the cache lock makes one train it and
    the other load it."""
    cmd = [sys.executable, os.path.join(ROOT, "analysis", "grid.py"),
           os.path.join(ROOT, "exp_colored_mnist.py"),
           "--teachers", "IA", "--students", "IA", "--losses", "kl", "ce", "--seeds", "0",
           "--workers", "2", "--results", str(tmp_path / "res"),
           "--cache-dir", str(tmp_path / "cache"),
           "--", "--smoke", "--n-train", "100", "--steps", "5", "--teacher-steps", "10"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = [(tmp_path / "res" / "logs" / f"IA_IA_{l}_seed0.log").read_text() for l in ("kl", "ce")]
    assert sum("teacher: training" in log for log in logs) == 1
    assert sum("teacher: loaded from cache" in log for log in logs) == 1
    # results of ours (5 steps may leave them excluded as unfit: the analysis skips those)
    for loss in ("kl", "ce"):
        with open(tmp_path / "res" / f"IA_IA_{loss}_seed0.json") as f:
            R.parse_result(json.load(f))
    # the script records the arguments the grid passed: the same command counts both cells done
    at = cmd.index("--")
    r = subprocess.run([*cmd[:at], "--dry-run", *cmd[at:]], capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode == 0
            and [l[:6] for l in r.stdout.splitlines()] == ["done  ", "done  "]), r.stdout + r.stderr


def test_runs_that_differ_in_a_shared_setting_are_warned_about(tmp_path):
    write(tmp_path, "a.json", result(loss="kl", lr=0.001))
    # alpha is the loss's own: fine
    write(tmp_path, "b.json", result(loss="jacobian", lr=0.02, alpha=0.2))
    runs = R.load_results(str(tmp_path))
    assert R.confounders(runs) == {"lr": [0.001, 0.02]}
    warnings = []
    R.warn_confounders(runs, warnings.append)
    assert len(warnings) == 1 and "lr = 0.001 (kl) vs 0.02 (jacobian)" in warnings[0]
    write(tmp_path, "b.json", result(loss="jacobian", lr=0.001, alpha=0.2))
    assert R.confounders(R.load_results(str(tmp_path))) == {}


# ------------------------------------------------------------------------- sweeps and dose-response

def test_grid_sweep_runs_every_combination_with_its_values_in_the_name(grid_cli, tmp_path):
    r = grid_cli("--dry-run", "--sweep", "alpha=0.1,0.9", "--sweep=--arch=cnn,lenet", "--",
                 "--steps", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("todo  ") for line in lines)
    for alpha in ("0.1", "0.9"):
        for arch in ("cnn", "lenet"):
            line = next(x for x in lines if f"I_IA_kl_seed0_alpha{alpha}_arch{arch}.json" in x)
            assert f"--alpha {alpha} --arch {arch} --steps 2" in line


@pytest.mark.parametrize("bad, message", [
    (["--sweep", "alpha"], "is not FLAG=V1,V2"),
    (["--sweep", "alpha=0.1,,0.5"], "is not FLAG=V1,V2"),
    (["--sweep", "alpha=0.1,0.1"], "repeats a value"),
    (["--sweep", "alpha=0.1", "--sweep", "alpha=0.5"], "names alpha twice"),
    (["--sweep", "seed=1,2"], "the grid sets --seed for each cell itself"),
    (["--sweep", "alpha=0.1,0.5", "--", "--alpha", "0.3"],
     "'--alpha' after -- sets a flag that --sweep alpha varies"),
])
def test_grid_rejects_bad_sweeps(grid_cli, tmp_path, bad, message):
    r = grid_cli(*bad)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "res").exists()


def sweep_results(folder, seeds=(0, 1, 2)):
    """kl without an alpha (it has none to sweep) and jacobian at three, agreement rising with
    alpha."""
    for seed in seeds:
        write(folder, f"kl_{seed}.json",
              result("toy", "I+rA", "IA", "kl", seed, {"IA": 0.9, "I+rA": 0.1 + 0.01 * seed},
                     alpha=None))
        for alpha in (0.1, 0.5, 0.9):
            write(folder, f"jac_{alpha}_{seed}.json",
                  result("toy", "I+rA", "IA", "jacobian", seed,
                         {"IA": 0.9, "I+rA": alpha + 0.01 * seed}, alpha=alpha))


def test_dose_response_figure_has_a_line_per_loss_and_a_band(tmp_path, monkeypatch):
    sweep_results(tmp_path / "r")
    runs = R.load_results(str(tmp_path / "r"))
    drawn = {}
    real_save = figures.save

    def keep(fig, path, written):
        drawn[os.path.basename(path)] = [ax for ax in fig.axes]
        lines = {l.get_label(): l for ax in fig.axes[:1] for l in ax.get_lines()}
        drawn["lines"] = {k: (list(v.get_xdata()), list(v.get_ydata())) for k, v in lines.items()}
        drawn["bands"] = len(fig.axes[0].collections)
        drawn["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        real_save(fig, path, written)
    monkeypatch.setattr(figures, "save", keep)
    written = []
    os.makedirs(tmp_path / "f")
    figures.draw_experiment(runs, "toy",
                            figure_args(tmp_path / "r", tmp_path / "f", "--kinds", "dose",
                                        "--dose", "alpha", "--metrics", "agreement",
                                        "--sets", "I+rA"),
                            written)
    assert [os.path.basename(p) for p in written] == ["toy_dose_alpha_I+rA_IA.png"]
    xs, ys = drawn["lines"]["jacobian"]
    # means over the three seeds
    assert xs == [0.1, 0.5, 0.9] and ys == pytest.approx([0.11, 0.51, 0.91])
    # a horizontal reference
    assert drawn["lines"]["kl (reference)"][1] == pytest.approx([0.11, 0.11])
    assert drawn["bands"] == 1  # the jacobian line's 95 % CI band
    # plain KL's missing alpha is not a point on the axis
    assert drawn["ticks"] == ["0.1", "0.5", "0.9"]


def test_dose_response_needs_a_swept_setting(tmp_path):
    grid_results(tmp_path / "r")
    runs = R.load_results(str(tmp_path / "r"))
    with pytest.raises(figures.UserError, match="takes one value only"):
        figures.draw_experiment(runs, "toy",
                                figure_args(tmp_path / "r", tmp_path / "f", "--kinds", "dose",
                                            "--dose", "alpha"), [])
    with pytest.raises(figures.UserError, match="no setting 'lr'"):
        figures.draw_experiment(runs, "toy",
                                figure_args(tmp_path / "r", tmp_path / "f", "--kinds", "dose",
                                            "--dose", "lr"), [])


def test_choose_default_takes_the_largest_weight_that_keeps_the_in_distribution_fit(tmp_path):
    """The rule reads only the fit on held-out data of the student's configuration, never a
    counterfactual set: here the counterfactual numbers favour alpha 0.9, the fit rules it out."""
    from analysis import choose_default
    folder = tmp_path / "r"
    for seed in (0, 1):
        kl = result("toy", "I+rA", "IA", "kl", seed, {"IA": 0.9, "I+rA": 0.1})
        kl["student"]["fit"] = {"config": "IA", "acc": 0.95, "agreement": 0.95, "fit": 0.95,
                                "ok": True}
        write(folder, f"kl_{seed}.json", kl)
        # no weight: not a line
        ce = result("toy", "I+rA", "IA", "ce", seed, {"IA": 0.9, "I+rA": 0.1}, alpha=None)
        ce["student"]["fit"] = {"config": "IA", "acc": 0.99, "agreement": 0.9, "fit": 0.99,
                                "ok": True}
        write(folder, f"ce_{seed}.json", ce)
        for alpha, acc in ((0.1, 0.96), (0.5, 0.945), (0.9, 0.90)):
            r = result("toy", "I+rA", "IA", "jacobian", seed, {"IA": 0.9, "I+rA": alpha},
                       alpha=alpha)
            r["student"]["fit"] = {"config": "IA", "acc": acc, "agreement": acc, "fit": acc,
                                   "ok": True}
            write(folder, f"jac_{alpha}_{seed}.json", r)
    rows = choose_default.choose(R.load_results(str(folder)), "alpha", "kl", 0.01, "acc")
    assert len(rows) == 1 and rows[0]["line"] == "jacobian" and rows[0]["chosen"] == 0.5
    assert (rows[0]["reference"] == pytest.approx(0.95)
            and rows[0]["means"][0.9] == pytest.approx(0.90))
    assert choose_default.choose(R.load_results(str(folder)), "alpha", "kl", 0.0,
                                 "acc")[0]["chosen"] == 0.1


@pytest.mark.slow
def test_choose_default_command_line(tmp_path):
    test_choose_default_takes_the_largest_weight_that_keeps_the_in_distribution_fit(tmp_path)
    folder = tmp_path / "r"
    r = run_script("choose_default.py", folder, "--setting", "alpha")
    assert r.returncode == 0 and "=> alpha = 0.5" in r.stdout, r.stderr
    r = run_script("choose_default.py", folder, "--setting", "lr")
    assert r.returncode == 2 and "no run" in r.stderr and "Traceback" not in r.stderr


def test_sweep_table_rows_count_excluded_runs_and_give_the_gradient_ratio(tmp_path):
    """One row per (line, value) plus the plain-KL reference; excluded runs are counted and left
    out of the numbers; the ratio is KL's weighted-gradient norm over the other term's."""
    from analysis import sweep_table
    folder = tmp_path / "r"
    for seed in (0, 1, 2):
        kl = result("toy", "I+rA", "IA", "kl", seed, {"IA": 0.9, "I+rA": 0.1}, alpha=None)
        kl["student"]["fit"] = {"acc": 0.95}
        write(folder, f"kl_{seed}.json", kl)
        for alpha in (0.1, 0.9):
            r = result("toy", "I+rA", "IA", "jacobian", seed,
                       {"IA": 0.9, "I+rA": alpha + 0.1 * seed}, alpha=alpha)
            r["student"]["fit"] = {"acc": 0.8 if (alpha, seed) == (0.9, 2) else 0.95}
            r["exclusions"] = (["student_fit: the student fits held-out IA only 0.8 (floor 0.90)"]
                               if (alpha, seed) == (0.9, 2) else [])
            for i, point in enumerate(r["student"]["curves"]):
                point["terms"] = {"kl": {"weight": 1 - alpha, "value": 1.0,
                                         "grad_norm": 8.0 / (i + 1)},
                                  "jacobian": {"weight": alpha, "value": 1.0, "grad_norm": 2.0}}
            write(folder, f"jac_{alpha}_{seed}.json", r)
    rows = sweep_table.tables(R.load_results(str(folder), keep_excluded=True), "alpha",
                              [("agreement", "I+rA")])
    rows = rows[("toy", "I+rA", "IA")]
    assert [r[:3] for r in rows] == [["kl", "", "3"], ["jacobian", "0.1", "3"],
                                     ["jacobian", "0.9", "2"]]
    assert rows[0][3] == "0.100 ± 0.000" and rows[0][5:] == ["", ""]
    # 0.9 and 1.0 (the excluded seed's 1.1 left out): half-width t(0.975, 1) * 0.0707 / sqrt(2)
    assert rows[2][3] == "0.950 ± 0.635"
    assert rows[2][4] == "0.950 (1 excluded, left out)"
    assert rows[1][5:] == ["4", "3"]  # first evaluation point 8/2; median of 4 and 2 over the seeds


@pytest.mark.slow
def test_sweep_table_command_line(tmp_path):
    test_sweep_table_rows_count_excluded_runs_and_give_the_gradient_ratio(tmp_path)
    r = run_script("sweep_table.py", tmp_path / "r", "--setting", "alpha", "--columns",
                   "agreement:I+rA", "kl:IA")
    assert (r.returncode == 0
            and "| jacobian | 0.9 | 2 | 0.950 ± 0.635 | 0.100 ± 0.000 | "
                "0.950 (1 excluded, left out) |" in r.stdout)
    assert "left out: 1 run excluded by the fit rule (jacobian alpha=0.9: 1)" in r.stdout
    for bad, why in ((["--columns", "agreement"], "is not METRIC:SET"),
                     (["--columns", "agreement:B"], "no run"),
                     (["--setting", "lr", "--columns", "agreement:IA"], "no run")):
        r = run_script("sweep_table.py", tmp_path / "r",
                       *(["--setting", "alpha"] if "--setting" not in bad else []), *bad)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_figures_keep_excluded_runs_only_when_asked(tmp_path):
    sweep_results(tmp_path / "r")
    excluded = result("toy", "I+rA", "IA", "jacobian", 5, {"IA": 0.5, "I+rA": 0.9}, alpha=0.9)
    excluded["exclusions"] = ["student_fit: the student fits held-out IA only 0.5 (floor 0.90)"]
    write(tmp_path / "r", "excluded.json", excluded)
    assert 5 not in {r.seed for r in R.load_for_cli(str(tmp_path / "r"), None)[0]}
    assert 5 in {r.seed for r in R.load_for_cli(str(tmp_path / "r"), None, keep_excluded=True)[0]}
    assert figures.parser.parse_args([str(tmp_path / "r"), "--keep-excluded"]).keep_excluded
    assert R.load_for_cli(str(tmp_path / "r"), None)[2][0].seed == 5  # for the tools' notes


# ------------------------------------------------------------- one exclusion rule, every tool

FIT_RULE = ["student_fit: the student fits held-out IA only 0.5 (floor 0.90)"]


def test_table_leaves_excluded_runs_out_and_says_how_many(tmp_path, cli):
    grid_results(tmp_path)
    bad = result("toy", "IA", "I", "kl", 2, {"I": 0.0, "A": 0.0, "I+rA": 0.0})
    write(tmp_path, "excluded.json", {**bad, "exclusions": FIT_RULE})
    for by in ("cell", "category", "category8"):
        r = cli("table.py", tmp_path, "--metric", "acc", "--by", by)
        assert r.returncode == 0, r.stderr
        assert "\nleft out: 1 run excluded by the fit rule (kl 1)\n" in r.stdout
    r = cli("table.py", tmp_path, "--metric", "acc")
    line = next(x for x in r.stdout.splitlines() if x.startswith("| IA | I | I |"))
    assert "| 0.550 ± 0.071" in line and line.endswith("| 2 |")  # seeds 0 and 1 only
    r = cli("table.py", tmp_path, "--metric", "acc", "--keep-excluded")
    line = next(x for x in r.stdout.splitlines() if x.startswith("| IA | I | I |"))
    assert "| 0.367 ± " in line and line.endswith("| 2/3 |")
    assert "kept: 1 run excluded by the fit rule (kl 1), as --keep-excluded asks" in r.stdout


def test_figures_leave_excluded_runs_out_and_footnote_them(tmp_path, cli, monkeypatch):
    sweep_results(tmp_path / "r")
    bad = result("toy", "I+rA", "IA", "jacobian", 5, {"IA": 0.5, "I+rA": 0.0}, alpha=0.9)
    write(tmp_path / "r", "excluded.json", {**bad, "exclusions": FIT_RULE})
    drawn = {}

    def keep(fig, path, written):
        ax = fig.axes[0]
        drawn["jacobian"] = next(list(x.get_ydata()) for x in ax.get_lines()
                                 if x.get_label() == "jacobian")
        drawn["texts"] = [t.get_text() for t in fig.texts] + [fig.get_suptitle()]
        written.append(path)
    monkeypatch.setattr(figures, "save", keep)
    r = cli("figures.py", tmp_path / "r", "--out", tmp_path / "f", "--kinds", "dose", "--dose",
            "alpha", "--metrics", "agreement", "--sets", "I+rA")
    assert r.returncode == 0, r.stderr
    assert "toy: 12 runs" in r.stdout and "left out: 1 run excluded by the fit rule" in r.stdout
    assert drawn["jacobian"] == pytest.approx([0.11, 0.51, 0.91])  # not pulled down by seed 5
    assert drawn["texts"][-1].endswith(
        "\nleft out: 1 run excluded by the fit rule (jacobian alpha=0.9: 1)")
    r = cli("figures.py", tmp_path / "r", "--out", tmp_path / "f", "--kinds", "dose", "--dose",
            "alpha", "--metrics", "agreement", "--sets", "I+rA", "--keep-excluded")
    assert drawn["jacobian"][-1] == pytest.approx((0.91 * 3 + 0.0) / 4)
    assert "\nkept: 1 run excluded by the fit rule (jacobian alpha=0.9: 1)" in drawn["texts"][-1]


def test_sweep_tools_leave_excluded_runs_out_and_count_them(tmp_path, cli):
    """sweep_table.py and choose_default.py load through the same rule: an excluded run at alpha
    0.5, whose numbers would change both outputs, is counted and never averaged in."""
    test_choose_default_takes_the_largest_weight_that_keeps_the_in_distribution_fit(tmp_path)
    folder = tmp_path / "r"
    bad = result("toy", "I+rA", "IA", "jacobian", 2, {"IA": 0.9, "I+rA": 0.0}, alpha=0.5)
    bad["student"]["fit"] = {"config": "IA", "acc": 0.5, "agreement": 0.5, "fit": 0.5,
                             "ok": False}
    write(folder, "excluded.json", {**bad, "exclusions": FIT_RULE})
    runs, excluded = R.load_sweep(str(folder), "alpha")
    assert [r.seed for r in excluded] == [2] and 2 not in {r.seed for r in runs}
    r = cli("choose_default.py", folder, "--setting", "alpha")
    assert r.returncode == 0, r.stderr
    assert "0.5: 0.945 (1 left out)" in r.stdout and "0.9: 0.900" in r.stdout
    assert "=> alpha = 0.1" in r.stdout  # a value with an excluded student is not chosen
    assert ("left out: 1 run excluded by the fit rule (jacobian alpha=0.5: 1) "
            "(a value with one is not chosen)") in r.stdout
    r = cli("sweep_table.py", folder, "--setting", "alpha", "--columns", "agreement:I+rA")
    assert r.returncode == 0, r.stderr
    row = next(x for x in r.stdout.splitlines() if x.startswith("| jacobian | 0.5 |"))
    assert row.startswith("| jacobian | 0.5 | 2 | 0.500 ± 0.000 | 0.945 (1 excluded, left out) |")
    assert "left out: 1 run excluded by the fit rule (jacobian alpha=0.5: 1)" in r.stdout


# ----------------------------------------------------------------------------- data versions

def test_runs_of_one_experiment_from_two_data_versions_are_refused(tmp_path):
    write(tmp_path / "old", "a.json", {**result(seed=0), "provenance": {"data_version": 1}})
    write(tmp_path / "new", "b.json", {**result(seed=1), "provenance": {"data_version": 2}})
    write(tmp_path / "new", "c.json",
          {**result("other", seed=0), "provenance": {"data_version": 7}})
    with pytest.raises(R.UserError) as e:
        R.load_results(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "the toy runs in" in message
    assert "data versions 1 and 2 (e.g. 1: old/a.json, 2: new/b.json)" in message
    with pytest.raises(R.UserError, match="data versions 1 and 2"):
        R.load_sweep(str(tmp_path), "alpha")
    os.remove(tmp_path / "old" / "a.json")
    assert {r.data_version for r in R.load_results(str(tmp_path))} == {2, 7}
    write(tmp_path / "old", "a.json", result(seed=0))  # an older file without a version
    with pytest.raises(R.UserError, match="data versions 2 and none recorded"):
        R.load_results(str(tmp_path))


def test_cli_refuses_two_data_versions_in_one_line(tmp_path, cli):
    write(tmp_path, "a.json", {**result(seed=0), "provenance": {"data_version": 1}})
    write(tmp_path, "b.json", {**result(seed=1), "provenance": {"data_version": 2}})
    r = cli("table.py", tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: the toy runs in") and "Traceback" not in r.stderr


def test_grid_does_not_count_a_result_of_another_data_version_as_done(grid_cli, tmp_path):
    (tmp_path / "exp_fake.py").write_text("DATA_VERSION = 2\n" + FAKE)
    assert grid.script_data_version(str(tmp_path / "exp_fake.py")) == 2
    cache = ["--cache-dir", tmp_path / "cache"]
    path = write(tmp_path / "res", "I_IA_kl_seed0.json",
                 {**result(), "provenance": {"argv": cell_argv(tmp_path, "I_IA_kl_seed0"),
                                             "data_version": 1}})
    r = grid_cli("--dry-run", *cache)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stdout == ""
    assert r.stderr.startswith(f"error: {path} exists but was made with data version 1, and the "
                               "script's data is now at version 2")
    assert "use another --results folder or delete the file" in r.stderr
    write(tmp_path / "res", "I_IA_kl_seed0.json",
          {**result(), "provenance": {"argv": cell_argv(tmp_path, "I_IA_kl_seed0"),
                                      "data_version": 2}})
    r = grid_cli("--dry-run", *cache)
    assert r.returncode == 0 and r.stdout.startswith("done  "), r.stderr
