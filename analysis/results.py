"""Read a folder of result JSON files, group runs that differ only by seed, and summarise them.

Every figure and table of `analysis/` goes through this file, so that they all agree on what a
run is, which runs belong together, and how mean, spread and confidence intervals are computed.

A *cell* is (experiment, method, teacher configuration, student configuration); its runs differ
only by seed. A run counts as a whole or not at all: one whose metrics (teacher, student or curves)
hold a non-finite number or null, or whose `exclusions` list is non-empty (e.g. the student did not
fit its distillation data), is skipped with a warning, so that every mean is over complete, trusted
runs; every tool says how many runs that exclusion rule (`is_excluded`) left out. Runs of one
experiment from different data versions (provenance.data_version) are never pooled. The *method*
is the loss, plus the settings that tell two variants of the same loss apart when a folder holds
both (e.g. `kl [temperature=1.0]` and `kl [temperature=4.0]`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

import numpy as np
from scipy import stats as scipy_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import LOSSES, UserError, parse_config  # noqa: E402
from harness import bookkeeping_args, per_loss_args  # noqa: E402

CATEGORIES = ("similarity", "teacher", "student", "neither", "other")
# The reference implementation's 8-way split, in the order its rules are tested (see category8);
# the 5-way split folds student_tp, teacher_sp and overlap into `other`.
CATEGORIES8 = ("similarity", "student", "teacher", "student_tp", "teacher_sp", "overlap",
               "neither", "other")
FOLD8 = {"student_tp": "other", "teacher_sp": "other", "overlap": "other"}
# How tables and figures show a category: the reference's names (the keys have no spaces, so
# that they can be typed on a command line).
CATEGORY_NAMES = {"student_tp": "student TP", "teacher_sp": "teacher SP"}
# The reference implementation's own numbers for the Dominoes exhaustive grid (random-noise patch,
# ResNet-18 teacher and student, about 20,000 iterations, no seeds): the student's accuracy, mean
# over the cells of each category. It has no usable contrastive row (its contrastive numbers were
# snapshots at iteration 100).
REFERENCE_DOMINOES_ACC = {
    "kl": {"similarity": 0.911, "teacher": 0.163, "student": 0.314, "neither": 0.339,
           "other": 0.434},
    "jacobian": {"similarity": 0.896, "teacher": 0.173, "student": 0.293, "neither": 0.326,
                 "other": 0.392},
}
# Arguments that say where or how a run was executed, not what was trained: runs that differ only
# in these (and the seed) are repeats of the same cell.
BOOKKEEPING = bookkeeping_args()


# ----------------------------------------------------------------------------- loading

@dataclass
class Run:
    """One result JSON, flattened: metrics are {test set: {metric: value}}, nested keys joined by
    '.'."""
    path: str
    experiment: str
    teacher: str
    student: str
    loss: str
    seed: int
    settings: dict
    student_eval: dict
    teacher_eval: dict
    curves: list = field(default_factory=list)  # [(step, {test set: {metric: value}})]
    method: str = ""
    # metric keys whose value is null, NaN or infinite
    nonfinite: list = field(default_factory=list)
    exclusions: list = field(default_factory=list)  # the script's reasons to leave the run out
    # the student on validation data of its own configuration: acc, agreement
    fit: dict = field(default_factory=dict)
    # [(step, {loss term: norm of its weighted gradient})]
    grad_norms: list = field(default_factory=list)
    data_version: Optional[int] = None  # provenance.data_version: which version of the data


class BadResult(ValueError):
    """A JSON file that is not (or no longer) a complete result of this project."""


def _flatten(d: dict, prefix: str = "", bad: Optional[list] = None,
             where: str = "") -> dict[str, float]:
    """Numbers of a nested dict under dotted keys. Null and non-finite values (the scripts write
    non-finite numbers as null, older files as bare NaN) are left out and their keys, prefixed
    with `where`, go to `bad`: the caller decides what such a run is worth."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}.", bad, where))
        elif v is None or (isinstance(v, float) and not math.isfinite(v)):
            if bad is not None:
                bad.append(f"{where}{prefix}{k}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _eval_block(block, what: str, bad: list) -> dict[str, dict[str, float]]:
    if (not isinstance(block, dict) or not block
            or not all(isinstance(m, dict) for m in block.values())):
        raise BadResult(f"{what} is missing or not {{test set: metrics}}")
    return {name: _flatten(m, bad=bad, where=f"{what}.{name}.") for name, m in block.items()}


def parse_result(data, path: str = "") -> Run:
    """Check that `data` is a result of ours and flatten it; BadResult says what is wrong."""
    if not isinstance(data, dict):
        raise BadResult("not a JSON object")
    missing = [k for k in ("experiment", "args", "student", "teacher") if k not in data]
    if missing:
        older = " (written by an older version: rerun it)" if "config" in data else ""
        raise BadResult(f"no {', '.join(missing)} key"
                        f"{older or ' (not a result of an exp_*.py script)'}")
    config = data["args"]
    if not isinstance(config, dict) or not isinstance(data["experiment"], str):
        raise BadResult("'experiment' or 'args' has the wrong type")
    for key in ("teacher_config", "student_config", "loss", "seed"):
        if key not in config:
            raise BadResult(f"args has no '{key}'")
    if not isinstance(config["seed"], int):
        raise BadResult("args.seed is not an integer")
    student, teacher = data["student"], data["teacher"]
    if not isinstance(student, dict) or not isinstance(teacher, dict):
        raise BadResult("'student' or 'teacher' is not an object")
    exclusions = data.get("exclusions")
    if not isinstance(exclusions, list) or not all(isinstance(f, str) for f in exclusions):
        raise BadResult("'exclusions' is missing or not a list of strings")
    bad: list[str] = []
    s_eval = _eval_block(student.get("eval"), "student.eval", bad)
    t_eval = _eval_block(teacher.get("eval"), "teacher.eval", bad)
    if not any(s_eval.values()) and not bad:
        raise BadResult("student.eval holds no numbers")
    curves, grad_norms = [], []
    for point in student.get("curves") or []:
        if (isinstance(point, dict) and isinstance(point.get("step"), int)
                and isinstance(point.get("eval"), dict)):
            where = f"student.curves[step {point['step']}]."
            curves.append((point["step"],
                           {n: _flatten(m, bad=bad, where=f"{where}{n}.")
                            for n, m in point["eval"].items() if isinstance(m, dict)}))
            terms = point.get("terms") if isinstance(point.get("terms"), dict) else {}
            norms = {name: t["grad_norm"] for name, t in terms.items()
                     if isinstance(t, dict) and isinstance(t.get("grad_norm"), (int, float))}
            if norms:
                grad_norms.append((point["step"], norms))
    settings = {k: v for k, v in config.items() if k not in BOOKKEEPING}
    fit = _flatten(student["fit"]) if isinstance(student.get("fit"), dict) else {}
    provenance = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    version = provenance.get("data_version")
    return Run(path, data["experiment"], str(config["teacher_config"]),
               str(config["student_config"]), str(config["loss"]), config["seed"], settings,
               s_eval, t_eval, curves, nonfinite=bad, exclusions=exclusions, fit=fit,
               grad_norms=grad_norms,
               data_version=version if isinstance(version, int) else None)


def is_excluded(run: Run) -> bool:
    """The one exclusion rule of every tool: the script recorded a reason (its `exclusions` list,
    e.g. a student below --student-min-fit) to leave the run out. The scripts decide; analysis
    only reads the list."""
    return bool(run.exclusions)


def excluded_note(excluded: list[Run], kept: bool = False,
                  label: Callable[[Run], str] = lambda r: r.loss) -> str:
    """The line a tool prints about the runs the exclusion rule hit, counted per `label` (the loss
    by default): 'left out: 3 runs excluded by the fit rule (kl 2, ce 1)', or 'kept: ...' when
    the user asked to keep them."""
    counts: dict[str, int] = {}
    rank = {loss: i for i, loss in enumerate(LOSSES)}
    for r in sorted(excluded, key=lambda r: (rank.get(r.loss, len(rank)), label(r))):
        counts[label(r)] = counts.get(label(r), 0) + 1
    reasons = {e.split(":", 1)[0] for r in excluded for e in r.exclusions}
    rule = "the fit rule" if reasons <= {"student_fit"} else "the scripts"
    n = len(excluded)
    # 'kl 2', or 'jacobian alpha=0.9: 1' when the label has a space of its own
    shown = [f"{k}{': ' if ' ' in k else ' '}{v}" for k, v in counts.items()]
    detail = f" ({', '.join(shown)})" if shown else ""
    # a student that follows its teacher cannot fit data on which the teacher is below the floor
    follows = sum("its teacher's is" in e for r in excluded for e in r.exclusions)
    if follows:
        detail += (f"; in {follows} of them the teacher is below the floor on the student's "
                   f"data too")
    if kept:
        return (f"kept: {n} run{'s' if n != 1 else ''} excluded by {rule}{detail}, "
                "as --keep-excluded asks")
    return f"left out: {n} run{'s' if n != 1 else ''} excluded by {rule}{detail}"


def skip_reason(run: Run) -> str:
    """Why a run must not enter any mean ('' when it may): a null or non-finite metric (its other
    numbers come from a diverged or broken run too) or an exclusion the script recorded."""
    reasons = []
    if run.nonfinite:
        more = f" and {len(run.nonfinite) - 3} more" if len(run.nonfinite) > 3 else ""
        reasons.append(f"null or non-finite {', '.join(run.nonfinite[:3])}{more}")
    if run.exclusions:
        reasons.append(f"excluded: {'; '.join(run.exclusions)}")
    return "; ".join(reasons)


def _assign_methods(runs: list[Run]) -> None:
    """Method = loss, plus the settings that take several values within one (teacher, student,
    loss)."""
    by_cell: dict[tuple, list[Run]] = {}
    for r in runs:
        by_cell.setdefault((r.experiment, r.teacher, r.student, r.loss), []).append(r)
    varying = set()
    for cell_runs in by_cell.values():
        for key in set().union(*(r.settings for r in cell_runs)):
            if len({json.dumps(r.settings.get(key)) for r in cell_runs}) > 1:
                varying.add(key)
    for r in runs:
        extra = ", ".join(f"{k}={r.settings.get(k)}" for k in sorted(varying))
        r.method = f"{r.loss} [{extra}]" if extra else r.loss


def line_names(runs: list[Run], swept: str) -> dict[str, list[Run]]:
    """The runs of a sweep in `swept` grouped into lines: the loss plus the other settings that
    vary among that loss's runs (a setting an older file does not record is left out of the
    name)."""
    varying: dict[str, list[str]] = {}
    for loss in {r.loss for r in runs}:
        same = [r for r in runs if r.loss == loss]
        keys = sorted({k for r in same for k in r.settings if k != swept})
        varying[loss] = [k for k in keys if len({json.dumps(r.settings.get(k)) for r in same}) > 1]
    lines: dict[str, list[Run]] = {}
    for r in runs:
        extra = ", ".join(f"{k}={r.settings[k]}" for k in varying[r.loss]
                          if r.settings.get(k) is not None)
        lines.setdefault(f"{r.loss} [{extra}]" if extra else r.loss, []).append(r)
    return lines


def sweep_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a tool that reads a sweep (grid.py --sweep): the folder and the
    setting."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("results",
                        help="folder of result JSON files (searched recursively), "
                             "e.g. a grid --sweep's")
    parser.add_argument("--setting", required=True,
                        help="the swept setting, as the JSON's config spells it (e.g. alpha)")
    return parser


def load_sweep(folder: str, setting: str) -> tuple[list[Run], list[Run]]:
    """The runs of a sweep and, apart, the runs the exclusion rule left out (the tools count them
    per value: a weight that breaks the student's fit is part of the answer); a UserError when
    no run records `setting`."""
    excluded: list[Run] = []
    runs = load_results(folder, excluded=excluded)
    if not any(r.settings.get(setting) is not None for r in runs + excluded):
        raise UserError(f"no run in {folder} records a setting '{setting}'; name a flag as the "
                        "JSON's args spell it, e.g. alpha")
    return runs, excluded


def sweep_label(run: Run, setting: str) -> str:
    """A run's loss and its value of the swept setting, e.g. 'jacobian alpha=0.9': what the sweep
    tools count excluded runs by."""
    value = run.settings.get(setting)
    return run.loss if value is None else f"{run.loss} {setting}={value}"


def check_data_versions(runs: list[Run], folder: str) -> None:
    """A UserError when runs of one experiment come from different versions of its data
    (provenance.data_version): their numbers measure different data sets and must not be
    pooled."""
    for exp in experiments(runs):
        example: dict[Optional[int], str] = {}
        for r in select(runs, experiment=exp):
            example.setdefault(r.data_version, r.path)
        if len(example) > 1:
            order = sorted(example, key=lambda v: (v is None, v or 0))
            shown = ["none recorded" if v is None else str(v) for v in order]
            files = ", ".join(f"{name}: {os.path.relpath(example[v], folder)}"
                              for name, v in zip(shown, order))
            raise UserError(f"the {exp} runs in {folder} come from data versions "
                            f"{' and '.join(shown)} (e.g. {files}); their numbers are not "
                            "comparable: move the runs of the old version to another folder "
                            "(or rerun them) and analyse one version at a time")


def load_results(folder: str, warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 keep_excluded: bool = False,
                 excluded: Optional[list[Run]] = None) -> list[Run]:
    """All result JSON files under `folder` (recursively). Files that are not results of ours, or
    are truncated, are skipped with one warning that counts them. Runs with a null or non-finite
    metric, or that `is_excluded`, are skipped whole, one warning line each plus a line that counts
    them (`keep_excluded` keeps the excluded ones); the runs the exclusion rule hit (kept or not)
    are appended to `excluded` when given, for the tool's own note. Runs of one experiment from
    different data versions, or no usable run, are a UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"results folder {folder} does not exist; "
                        "pass the folder the experiments wrote to")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.endswith(".json") and not f.startswith("."))
    if not paths:
        raise UserError(f"no result JSON files in {folder}; run an exp_*.py script with "
                        f"--out {folder}/NAME.json or analysis/grid.py --results {folder} first")
    runs, skipped, suspect, seen, parsed = [], [], [], {}, []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            run = parse_result(data, path)
        except (OSError, UnicodeDecodeError) as e:
            skipped.append((path, f"unreadable ({e.__class__.__name__})"))
            continue
        except ValueError as e:  # json.JSONDecodeError and BadResult
            reason = str(e) if isinstance(e, BadResult) else "not valid JSON (truncated?)"
            skipped.append((path, reason))
            continue
        parsed.append(run)
        if is_excluded(run) and not run.nonfinite and excluded is not None:
            excluded.append(run)
        if run.nonfinite or (is_excluded(run) and not keep_excluded):
            suspect.append(run)
            continue
        runs.append(run)
    check_data_versions(parsed, folder)
    _assign_methods(runs)
    unique = []
    for r in runs:
        key = (r.experiment, r.method, r.teacher, r.student, r.seed)
        if key in seen:
            skipped.append((r.path, f"repeats {seen[key]} (same experiment, settings and seed)"))
            continue
        seen[key] = r.path
        unique.append(r)
    if skipped:
        lines = [f"warning: skipped {len(skipped)} of {len(paths)} JSON files in {folder}:"]
        lines += [f"  {os.path.relpath(p, folder)}: {why}" for p, why in skipped[:10]]
        if len(skipped) > 10:
            lines.append(f"  ... and {len(skipped) - 10} more")
        warn("\n".join(lines))
    if suspect:
        for r in suspect:
            # one line each
            warn(f"warning: skipped run {r.path}: {' '.join(skip_reason(r).split())}")
        nonfinite = sum(bool(r.nonfinite) for r in suspect)
        warn(f"warning: skipped {len(suspect)} of {len(runs) + len(suspect)} runs: "
             f"{nonfinite} with null or non-finite metrics, {len(suspect) - nonfinite} excluded "
             "(each run is left out whole, so no mean mixes it in)")
    if not unique:
        if suspect:
            raise UserError(f"every run in {folder} was skipped (see the warnings above); "
                            "nothing to summarise")
        raise UserError(f"none of the {len(paths)} JSON files in {folder} is a result of this "
                        "project (see the warning above)")
    return unique


LOSS_SPECIFIC = per_loss_args()


def confounders(runs: Iterable[Run]) -> dict[str, list]:
    """Settings (other than loss-specific ones) that differ between the runs of one experiment:
    the figures would then compare more than teacher, student and loss (e.g. a script's default
    learning rate that changed halfway through a grid)."""
    values: dict[str, set] = {}
    for r in runs:
        for k, v in r.settings.items():
            if k not in LOSS_SPECIFIC:
                values.setdefault(k, set()).add(json.dumps(v))
    return {k: sorted(json.loads(x) for x in v) for k, v in values.items() if len(v) > 1}


def warn_confounders(runs: list[Run],
                     warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
    """One warning per experiment whose runs differ in a setting that is not the loss's own."""
    for exp in experiments(runs):
        exp_runs = select(runs, experiment=exp)
        parts = []
        for key, vals in confounders(exp_runs).items():
            who = [f"{v} ({', '.join(methods([r for r in exp_runs if r.settings.get(key) == v]))})"
                   for v in vals]
            parts.append(f"{key} = {' vs '.join(who)}")
        if parts:
            warn(f"warning: the {exp} runs differ in more than teacher, student, loss and seed: "
                 f"{'; '.join(parts)}. Figures that compare them mix these settings; "
                 "delete the odd JSON files and rerun the grid")


# ----------------------------------------------------------------------- structure of a set of runs

def experiments(runs: Iterable[Run]) -> list[str]:
    return sorted({r.experiment for r in runs})


def load_for_cli(folder: str, experiment: Optional[str],
                 keep_excluded: bool = False) -> tuple[list[Run], list[str], list[Run]]:
    """What the command-line tools start from: the runs of a folder (with warnings about
    confounded settings), the experiments to draw, limited to `experiment` when given, and the
    runs the exclusion rule hit (left out, or kept with `keep_excluded`), for the tool's note."""
    excluded: list[Run] = []
    runs = load_results(folder, keep_excluded=keep_excluded, excluded=excluded)
    warn_confounders(runs)
    exps = experiments(runs)
    if experiment:
        if experiment not in exps:
            raise UserError(f"no results of experiment '{experiment}' in {folder}; "
                            f"it has {', '.join(exps)}")
        exps = [experiment]
    return runs, exps, excluded


def only_sets(runs: list[Run], sets: Optional[list[str]]) -> list[Run]:
    """The runs with their metrics and curves limited to the test sets `sets` (all when None), e.g.
    the seven plain configurations of the Dominoes grid without its randomised sets (I+rA, ...),
    which would otherwise count in the categories as their label-carrying mechanisms."""
    if not sets:
        return runs
    present = test_sets(runs)
    unknown = [s for s in sets if s not in present]
    if unknown:
        raise UserError(f"no test set {', '.join(unknown)} in these results; "
                        f"they have {', '.join(present)}")
    def keep(per_set: dict) -> dict:
        return {k: v for k, v in per_set.items() if k in sets}
    return [replace(r, student_eval=keep(r.student_eval), teacher_eval=keep(r.teacher_eval),
                    curves=[(step, keep(m)) for step, m in r.curves]) for r in runs]


def select(runs: Iterable[Run], **where) -> list[Run]:
    """Runs whose attributes equal the given values, e.g. select(runs, experiment='x',
    method='kl')."""
    return [r for r in runs if all(getattr(r, k) == v for k, v in where.items())]


def methods(runs: Iterable[Run]) -> list[str]:
    """Methods in the conventional order ce, kl, jacobian, contrastive (variants after their
    loss)."""
    found = {(r.loss, r.method) for r in runs}
    rank = {loss: i for i, loss in enumerate(LOSSES)}
    return [m for _, m in sorted(found, key=lambda lm: (rank.get(lm[0], len(rank)), lm[1]))]


def test_sets(runs: Iterable[Run]) -> list[str]:
    """Test sets in the order the scripts wrote them."""
    names: list[str] = []
    for r in runs:
        names += [n for n in r.student_eval if n not in names]
    return names


def metrics(runs: Iterable[Run]) -> list[str]:
    """Student metrics present in the runs, plus teacher metrics as `teacher_<name>`."""
    found: list[str] = []
    for r in runs:
        for per_set in r.student_eval.values():
            found += [m for m in per_set if m not in found]
        for per_set in r.teacher_eval.values():
            found += [f"teacher_{m}" for m in per_set if f"teacher_{m}" not in found]
    return found


def value(run: Run, test_set: str, metric: str) -> Optional[float]:
    """One number of one run, None where the run lacks it."""
    if metric.startswith("teacher_"):
        return run.teacher_eval.get(test_set, {}).get(metric[len("teacher_"):])
    return run.student_eval.get(test_set, {}).get(metric)


def mechanism_letters(runs: Iterable[Run]) -> str:
    """The mechanisms of an experiment, read from the configuration names its runs use."""
    names = set()
    for r in runs:
        names |= {r.teacher, r.student, *r.student_eval}
    letters = {c for n in names if is_config(n) for c in n if c.isupper()}
    return "".join(sorted(letters, key=lambda c: ("IABCDEFGH".find(c) % 100, c)))


def is_config(name: str) -> bool:
    """Whether a name is a configuration (`I+rA`) rather than another test set (`minority`)."""
    try:
        parse_config(name)
        return True
    except UserError:
        return False


def label_mechanisms(config: str, letters: str) -> Optional[frozenset]:
    """The mechanisms that carry the label in a configuration (`I+rA` -> {I}); None when the name is
    not a configuration (e.g. a test set called `minority`)."""
    try:
        roles = parse_config(config, letters)
    except UserError:
        return None
    return frozenset(m for m, role in roles.items() if role == "label")


def config_order(names: Iterable[str], letters: str) -> list[str]:
    """Configurations ordered as the paper's heatmaps: single mechanisms, then pairs, ...; names
    that are not configurations go last."""
    def key(name):
        label = label_mechanisms(name, letters)
        if label is None:
            return (99, [], len(name), name)
        return (len(label), sorted(letters.index(c) for c in label), len(name), name)
    return sorted(set(names), key=key)


# ----------------------------------------------------------------------------- categories

def category8(teacher: str, student: str, test_set: str, letters: str) -> Optional[str]:
    """The reference implementation's 8-way category of a (teacher, student, test set) cell, from
    the label-carrying mechanisms T, S, K of the three configurations (randomised mechanisms do not
    count). Its rules are tested in this order, the first that holds wins:

      similarity  every mechanism of K is in S and in T
      student     K is inside S, shares nothing with T, and S and T share another mechanism
      teacher     K is inside T, shares nothing with S, and S and T share another mechanism
      student_tp  S equals K and T holds part of K
      teacher_sp  T equals K and S holds part of K
      overlap     S and T share a mechanism that is not in K
      neither     S and T share no mechanism (whatever K is)
      other       everything else

    None when one of the three names is not a configuration.
    """
    t, s, k = (label_mechanisms(n, letters) for n in (teacher, student, test_set))
    if t is None or s is None or k is None:
        return None
    shared = s & t
    if k <= s and k <= t:
        return "similarity"
    if k <= s and not k & t and shared - k:
        return "student"
    if k <= t and not k & s and shared - k:
        return "teacher"
    if s == k and t & k:
        return "student_tp"
    if t == k and s & k:
        return "teacher_sp"
    if shared - k:
        return "overlap"
    if not shared:
        return "neither"
    return "other"


def category(teacher: str, student: str, test_set: str, letters: str) -> Optional[str]:
    """The 5-way category of a cell (similarity, teacher, student, neither, other): `category8`
    with student_tp, teacher_sp and overlap folded into `other`, so that the two splits always
    agree. None when one of the three names is not a configuration."""
    fine = category8(teacher, student, test_set, letters)
    return None if fine is None else FOLD8.get(fine, fine)


def category_name(key: str) -> str:
    """How tables and figures show a category (`student_tp` -> `student TP`)."""
    return CATEGORY_NAMES.get(key, key)


# ----------------------------------------------------------------------------- statistics

@dataclass
class Stat:
    """Mean, sample standard deviation (ddof=1) and 95 % Student-t confidence interval over n
    values. With n = 1 the spread is unknown: std, lo and hi are NaN."""
    mean: float
    std: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def summarize(values: Iterable[float], confidence: float = 0.95) -> Stat:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    n = len(v)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if n == 1:
        return Stat(mean, math.nan, math.nan, math.nan, 1)
    std = float(v.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Stat(mean, std, mean - half, mean + half, n)


def cell_stat(runs: list[Run], test_set: str, metric: str) -> Stat:
    """Summary over the seeds of runs that form one cell."""
    return summarize(value(r, test_set, metric) for r in runs)


def paired_difference(runs_a: list[Run], runs_b: list[Run], test_set: str, metric: str) -> Stat:
    """a - b over the seeds both have (a seed shares its data and teacher across losses, so the
    difference is paired); without common seeds, the difference of the means with unknown spread."""
    a = {r.seed: value(r, test_set, metric) for r in runs_a}
    b = {r.seed: value(r, test_set, metric) for r in runs_b}
    common = sorted(s for s in a.keys() & b.keys() if a[s] is not None and b[s] is not None)
    if common:
        return summarize(a[s] - b[s] for s in common)
    ma, mb = cell_stat(runs_a, test_set, metric).mean, cell_stat(runs_b, test_set, metric).mean
    return Stat(ma - mb, math.nan, math.nan, math.nan, 0 if math.isnan(ma - mb) else 1)


def curve_stats(runs: list[Run], test_set: str, metric: str) -> tuple[list[int], list[Stat]]:
    """Steps that every run evaluated, and the summary over seeds at each of them."""
    per_run = [{step: m.get(test_set, {}).get(metric) for step, m in r.curves} for r in runs]
    per_run = [{s: v for s, v in c.items() if v is not None} for c in per_run if c]
    if not per_run:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in per_run)))
    return steps, [summarize(c[s] for c in per_run) for s in steps]


def group_cells(runs: Iterable[Run]) -> dict[tuple, list[Run]]:
    """{(experiment, method, teacher, student): runs over seeds}."""
    cells: dict[tuple, list[Run]] = {}
    for r in runs:
        cells.setdefault((r.experiment, r.method, r.teacher, r.student), []).append(r)
    return cells


def aggregate(runs: list[Run], metric: str) -> list[dict]:
    """One row per (experiment, method, teacher, student, test set) with the statistics of `metric`
    over seeds and the cell's category."""
    rows = []
    for exp in experiments(runs):
        exp_runs = select(runs, experiment=exp)
        letters = mechanism_letters(exp_runs)
        sets = test_sets(exp_runs)
        cells = group_cells(exp_runs)
        for method in methods(exp_runs):
            for teacher in config_order({r.teacher for r in exp_runs}, letters):
                for student in config_order({r.student for r in exp_runs}, letters):
                    cell = cells.get((exp, method, teacher, student))
                    if not cell:
                        continue
                    for test in sets:
                        st = cell_stat(cell, test, metric)
                        if st.n == 0:
                            continue
                        per_seed = {r.seed: value(r, test, metric) for r in cell}
                        rows.append({
                            "experiment": exp, "method": method, "teacher": teacher,
                            "student": student, "test_set": test,
                            "category": category(teacher, student, test, letters),
                            "category8": category8(teacher, student, test, letters),
                            "metric": metric, "mean": st.mean, "std": st.std, "ci_lo": st.lo,
                            "ci_hi": st.hi, "n": st.n, "seeds": sorted(r.seed for r in cell),
                            "per_seed": {k: v for k, v in per_seed.items() if v is not None}})
    return rows


def category_summary(rows: list[dict], key: str = "category") -> list[dict]:
    """Per experiment, method and category (`key`: "category" for the 5-way split, "category8" for
    the 8-way one): the mean over the category's (teacher, student, test set) cells of each cell's
    mean over seeds, and its spread over seeds: each seed's mean over the cells, then the sample
    std and 95 % Student-t interval of those (the cells of one seed share its teachers and data,
    so they are not independent samples; the seeds are). The seed means are paired: they are taken
    over the cells that every seed has, so that a seed missing a cell does not shift its mean by
    a different cell set; `cells_dropped` counts the cells left out of the spread for that."""
    out = []
    for exp in sorted({r["experiment"] for r in rows}):
        exp_rows = [r for r in rows if r["experiment"] == exp]
        for method in dict.fromkeys(r["method"] for r in exp_rows):
            for cat in (CATEGORIES8 if key == "category8" else CATEGORIES):
                cells = [r for r in exp_rows if r["method"] == method and r[key] == cat]
                if not cells:
                    continue
                seeds = sorted({s for r in cells for s in r.get("per_seed", {})})
                common = [r for r in cells if all(s in r.get("per_seed", {}) for s in seeds)]
                by_seed = summarize(float(np.mean([r["per_seed"][s] for r in common]))
                                    for s in (seeds if common else []))
                st = summarize(r["mean"] for r in cells)
                out.append({"experiment": exp, "method": method, "category": cat,
                            "metric": exp_rows[0]["metric"], "mean": st.mean, "std": by_seed.std,
                            "ci_lo": st.mean - by_seed.half_width,
                            "ci_hi": st.mean + by_seed.half_width, "cells": st.n,
                            "cells_dropped": len(cells) - len(common), "seeds": len(seeds),
                            "n": by_seed.n})
    return out


def detectable_difference(std: float, n: int, power: float = 0.8, level: float = 0.05) -> float:
    """The smallest true mean difference a paired two-sided t-test over n seeds detects with
    `power` at `level`, for a spread `std` of the per-seed differences: (t_{1-level/2} + t_power)
    x std / sqrt(n), with n - 1 degrees of freedom (the usual approximation; NaN for n < 2)."""
    if n < 2 or math.isnan(std):
        return math.nan
    t = scipy_stats.t.ppf(1 - level / 2, n - 1) + scipy_stats.t.ppf(power, n - 1)
    return float(t * std / math.sqrt(n))


def seeds_needed(std: float, effect: float, power: float = 0.8, level: float = 0.05,
                 most: int = 1000) -> Optional[int]:
    """The fewest seeds whose detectable difference (above) is at most `effect`, for a spread
    `std` of the per-seed differences; None when the spread is unknown or more than `most`."""
    if math.isnan(std) or effect <= 0:
        return None
    for n in range(2, most + 1):
        if detectable_difference(std, n, power, level) <= effect:
            return n
    return None


def category_difference(rows: list[dict], a: str, b: str, key: str = "category") -> list[dict]:
    """Per experiment and category: method a minus method b, paired by seed. The cells used are
    those of the category where both methods have every seed that either has in it (as in
    `category_summary`, so that each seed's mean is over the same cells); for each seed, the mean
    over those cells of a - b; then the mean, sample std and 95 % Student-t interval over seeds,
    the smallest difference the design detects (80 % power, 5 % level), the cells used and the
    cells left out for lacking a seed."""
    out = []
    for exp in sorted({r["experiment"] for r in rows}):
        by = {(r["method"], r["teacher"], r["student"], r["test_set"]): r
              for r in rows if r["experiment"] == exp and r.get(key)}
        cats = {k[1:]: r[key] for k, r in by.items()}
        for cat in (CATEGORIES8 if key == "category8" else CATEGORIES):
            both = [c for c, v in cats.items() if v == cat and (a, *c) in by and (b, *c) in by]
            if not both:
                continue
            seeds = sorted({s for c in both for m in (a, b) for s in by[(m, *c)]["per_seed"]})
            cells = [c for c in both
                     if all(s in by[(m, *c)]["per_seed"] for m in (a, b) for s in seeds)]
            diffs = summarize(float(np.mean([by[(a, *c)]["per_seed"][s]
                                             - by[(b, *c)]["per_seed"][s] for c in cells]))
                              for s in (seeds if cells else []))
            out.append({"experiment": exp, "category": cat, "a": a, "b": b, "mean": diffs.mean,
                        "std": diffs.std, "ci_lo": diffs.lo, "ci_hi": diffs.hi, "n": diffs.n,
                        "cells": len(cells), "cells_dropped": len(both) - len(cells),
                        "detectable": detectable_difference(diffs.std, diffs.n)})
    return out
