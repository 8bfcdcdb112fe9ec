"""Draw the paper's figures from a folder of result JSON files (one folder, one command).

For each experiment found in the folder:
  <exp>_bars_<T>_<S>.png           per (teacher, student) pair: one panel per metric, test sets on
                                   the x axis, one bar per loss, error bars over seeds (plus a panel
                                   per test set of group accuracies for grouped data such as
                                   Waterbirds)
  <exp>_heatmap_<metric>_<loss>.png the exhaustive grid: rows student, columns teacher
                                   configuration, one panel per test set, cells annotated with mean
                                   and std
  <exp>_diff_<metric>_<loss>-minus-kl.png  the same for (loss - kl), paired by seed, diverging
                                   colours centred on 0, blue where the loss is better than kl
  <exp>_curves_<T>_<S>.png         metrics over training steps, mean and +-1 std band over seeds
  <exp>_categories_<metric>.png    every (teacher, student, test set) cell by category (similarity,
                                   teacher, student, neither, other), one point per cell and loss
  <exp>_categories8_<metric>.png   the same by the reference implementation's 8-way split, where
                                   some cells are `other`
  <exp>_dose_<setting>_<T>_<S>.png with --dose SETTING (a swept flag, e.g. alpha): the
                                   dose-response, one panel per (metric, test set), x = the
                                   setting's value, one line per loss with its 95 % CI band over
                                   seeds; plain KL (no weight) is a dashed reference line, a variant
                                   run at one value a point

Runs the scripts excluded are left out (--keep-excluded keeps them); a footnote under each figure
says how many.

    python analysis/figures.py results/grid --out figures
    python analysis/figures.py results/sweep_alpha --kinds dose --dose alpha --sets IA I+rA
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Optional

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import UserError  # noqa: E402
from harness import run_cli  # noqa: E402
from analysis import results as R  # noqa: E402

LABELS = {"acc": "student accuracy", "kl": "KL(teacher || student)",
          "agreement": "agreement with teacher", "avg_acc": "average group accuracy",
          "worst_group_acc": "worst-group accuracy", "teacher_acc": "teacher accuracy",
          "teacher_worst_group_acc": "teacher worst-group accuracy"}
LOWER_IS_BETTER = ("kl",)
KINDS = ("bars", "curves", "heatmap", "diff", "categories", "dose")
COLOURS = {"ce": "#8c8c8c", "kl": "#1f77b4", "jacobian": "#d62728", "contrastive": "#2ca02c"}
EXTRA_COLOURS = ["#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#bcbd22", "#7f7f7f"]


def label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


def is_fraction(metric: str) -> bool:
    base = metric.removeprefix("teacher_")
    return (base in ("acc", "agreement", "avg_acc", "worst_group_acc")
            or base.startswith(("groups.", "group_agreement.")))


def colour(method: str, methods: list[str]) -> str:
    loss = method.split(" ")[0]
    if method == loss and loss in COLOURS:
        return COLOURS[loss]
    return EXTRA_COLOURS[methods.index(method) % len(EXTRA_COLOURS)]


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9+=.,-]+", "_", name).strip("_")


def footnote(fig, note: str) -> None:
    """`note` (e.g. how many runs the exclusion rule left out) under the figure, when not empty."""
    if note:
        fig.text(0.5, -0.01, note, ha="center", va="top", fontsize=8, color="dimgrey")


def save(fig, path: str, written: list[str]) -> None:
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
    written.append(path)


def spread(st: R.Stat, error: str) -> float:
    """Half-length of an error bar: 95 % CI or one std; NaN (no bar drawn) for a single seed."""
    return st.half_width if error == "ci" else st.std


def seeds_note(runs: list[R.Run], error: str) -> str:
    counts = {n for n in (len(c) for c in R.group_cells(runs).values())}
    n = f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"
    if max(counts) < 2:
        return f"{n} seed per cell: no error bars"
    return f"mean ± {'95% CI' if error == 'ci' else '1 std'} over {n} seeds"


# ----------------------------------------------------------------------------- 1. bars

def _bar_panel(ax, cell_runs: dict[str, list[R.Run]], methods: list[str], xs: list[str], metric_of,
               error: str) -> None:
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        stats = [R.cell_stat(cell_runs.get(method, []), *metric_of(x)) for x in xs]
        pos = np.arange(len(xs)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(pos, [s.mean for s in stats], width, yerr=[spread(s, error) for s in stats],
               capsize=2, label=method, color=colour(method, methods), error_kw={"elinewidth": 1})
    ax.set_xticks(np.arange(len(xs)))
    ax.set_xticklabels(xs)
    ax.grid(axis="y", alpha=0.3)


def bars(runs: list[R.Run], exp: str, teacher: str, student: str, metrics: list[str], error: str,
         out: str, written: list[str], note: str = "") -> None:
    pair_runs = R.select(runs, teacher=teacher, student=student)
    methods = R.methods(pair_runs)
    cell_runs = {m: R.select(pair_runs, method=m) for m in methods}
    sets = R.test_sets(pair_runs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), dpi=100,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _bar_panel(ax, cell_runs, methods, sets, lambda s, m=metric: (s, m), error)
        if metric == "acc":  # the teacher's accuracy, for reference
            t_acc = [R.cell_stat(pair_runs, s, "teacher_acc").mean for s in sets]
            ax.hlines(t_acc, np.arange(len(sets)) - 0.45, np.arange(len(sets)) + 0.45,
                      colors="black", linestyles="dashed", lw=1.2, label="teacher accuracy")
        ax.set_title(label(metric))
        ax.set_xlabel("test set")
        ax.set_ylabel(label(metric))
        if is_fraction(metric):
            ax.set_ylim(0, 1.05)
    handles = {l: h for ax in axes[0] for h, l in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(handles.values(), handles.keys(), title="loss", fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{exp}: teacher {teacher}, student {student} ({seeds_note(pair_runs, error)})")
    fig.tight_layout()
    footnote(fig, note)
    save(fig, os.path.join(out, f"{exp}_bars_{safe(teacher)}_{safe(student)}.png"), written)

    groups = sorted({m.split(".", 1)[1] for s in sets for r in pair_runs
                     for m in r.student_eval.get(s, {}) if m.startswith("groups.")},
                    key=lambda g: (len(g), g))
    if groups:  # grouped data: accuracy per group, average and worst group, per test set
        xs = [f"group {g}" for g in groups] + ["avg", "worst"]
        key = {**{f"group {g}": f"groups.{g}" for g in groups}, "avg": "avg_acc",
               "worst": "worst_group_acc"}
        grouped_sets = [s for s in sets if any(f"groups.{g}" in r.student_eval.get(s, {})
                                               for r in pair_runs for g in groups)]
        cols = min(len(grouped_sets), 3)
        rows = math.ceil(len(grouped_sets) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), dpi=100, squeeze=False)
        for ax, s in zip(axes.flat, grouped_sets):
            present = [x for x in xs if any(key[x] in r.student_eval.get(s, {}) for r in pair_runs)]
            _bar_panel(ax, cell_runs, methods, present, lambda x, s=s: (s, key[x]), error)
            ax.set_xlabel("group (label x spurious value), average, worst group", fontsize=8)
            ax.set_title(f"test set {s}")
            ax.set_ylabel("student accuracy")
            ax.set_ylim(0, 1.05)
        for ax in list(axes.flat)[len(grouped_sets):]:
            ax.axis("off")
        axes.flat[0].legend(title="loss", fontsize=8)
        fig.suptitle(f"{exp}: group accuracies, teacher {teacher}, student {student} "
                     f"({seeds_note(pair_runs, error)})")
        fig.tight_layout()
        footnote(fig, note)
        save(fig, os.path.join(out, f"{exp}_groups_{safe(teacher)}_{safe(student)}.png"), written)


# ----------------------------------------------------------------------------- 2. heatmaps

def _grid_axes(runs: list[R.Run]) -> tuple[list[str], list[str], list[str], str]:
    letters = R.mechanism_letters(runs)
    return (R.config_order({r.student for r in runs}, letters),
            R.config_order({r.teacher for r in runs}, letters), R.test_sets(runs), letters)


def _heatmap_figure(panels: list[tuple[str, np.ndarray, np.ndarray]], students: list[str],
                    teachers: list[str], cmap: str, vmin: float, vmax: float, cbar_label: str,
                    title: str, fmt: str):
    cols = min(len(panels), 5)
    rows = math.ceil(len(panels) / cols)
    size = 0.62 * max(len(teachers), 2) + 0.9
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.2,
                                                  (0.55 * max(len(students), 2) + 1.1) * rows),
                             dpi=100, squeeze=False)
    image = None
    for ax, (name, mean, err) in zip(axes.flat, panels):
        image = ax.imshow(mean, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(teachers)))
        ax.set_xticklabels(teachers, fontsize=8)
        ax.set_yticks(range(len(students)))
        ax.set_yticklabels(students, fontsize=8)
        ax.set_title(f"test set {name}", fontsize=10)
        ax.set_xlabel("teacher", fontsize=8)
        ax.set_ylabel("student", fontsize=8)
        for i in range(len(students)):
            for j in range(len(teachers)):
                if np.isnan(mean[i, j]):
                    ax.text(j, i, "-", ha="center", va="center", fontsize=7, color="grey")
                    continue
                level = (mean[i, j] - vmin) / (vmax - vmin + 1e-12)
                dark = level < 0.35 if cmap == "viridis" else abs(level - 0.5) > 0.3
                text = format(mean[i, j], fmt) + ("" if np.isnan(err[i, j])
                                                  else f"\n±{err[i, j]:{fmt.lstrip('+')}}")
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(image, cax=cax).set_label(cbar_label, fontsize=8)
    return fig


def _grid_panels(runs: list[R.Run], stat_of) -> tuple[list[str], list[str], list]:
    """(students, teachers, panels): one (test set, mean, spread) matrix per test set, rows =
    student configuration, columns = teacher configuration; `stat_of(test set, teacher, student)`
    gives a cell's statistic (with .mean and .std) or None where the cell has no runs."""
    students, teachers, sets, _ = _grid_axes(runs)
    panels = []
    for s in sets:
        mean, err = (np.full((len(students), len(teachers)), np.nan),
                     np.full((len(students), len(teachers)), np.nan))
        for i, st_cfg in enumerate(students):
            for j, t_cfg in enumerate(teachers):
                stat = stat_of(s, t_cfg, st_cfg)
                if stat is not None:
                    mean[i, j], err[i, j] = stat.mean, stat.std
        panels.append((s, mean, err))
    return students, teachers, panels


def heatmap(runs: list[R.Run], exp: str, method: str, metric: str, error: str, out: str,
            written: list[str], note: str = "") -> None:
    cells = R.group_cells(R.select(runs, method=method))

    def stat_of(s, t_cfg, st_cfg):
        cell = cells.get((exp, method, t_cfg, st_cfg))
        return R.cell_stat(cell, s, metric) if cell else None
    students, teachers, panels = _grid_panels(runs, stat_of)
    values = [v for _, mean, _ in panels for v in mean.flat if not np.isnan(v)]
    if not values:
        return
    vmin, vmax = (0.0, 1.0) if is_fraction(metric) else (0.0, max(values))
    fig = _heatmap_figure(panels, students, teachers, "viridis", vmin, vmax, label(metric),
                          f"{exp}: {label(metric)}, loss {method} (mean ± std over seeds)", ".2f")
    footnote(fig, note)
    save(fig, os.path.join(out, f"{exp}_heatmap_{safe(metric)}_{safe(method)}.png"), written)


def diff_heatmap(runs: list[R.Run], exp: str, method: str, base: str, metric: str, out: str,
                 written: list[str], note: str = "") -> None:
    cells_a = R.group_cells(R.select(runs, method=method))
    cells_b = R.group_cells(R.select(runs, method=base))

    def stat_of(s, t_cfg, st_cfg):
        a, b = cells_a.get((exp, method, t_cfg, st_cfg)), cells_b.get((exp, base, t_cfg, st_cfg))
        return R.paired_difference(a, b, s, metric) if a and b else None
    students, teachers, panels = _grid_panels(runs, stat_of)
    values = [abs(v) for _, mean, _ in panels for v in mean.flat if not np.isnan(v)]
    if not values:
        return
    lim = max(max(values), 1e-6)
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    fig = _heatmap_figure(panels, students, teachers,
                          "RdBu_r" if metric in LOWER_IS_BETTER else "RdBu", -lim, lim,
                          f"{method} − {base}", f"{exp}: {label(metric)}, {method} minus {base} "
                          f"(paired by seed, ± std; blue = {method} {better})", "+.2f")
    footnote(fig, note)
    save(fig, os.path.join(out, f"{exp}_diff_{safe(metric)}_{safe(method)}-minus-{safe(base)}.png"),
         written)


# ----------------------------------------------------------------------------- 3. curves

def curves(runs: list[R.Run], exp: str, teacher: str, student: str, metrics: list[str], out: str,
           written: list[str], note: str = "") -> None:
    pair_runs = R.select(runs, teacher=teacher, student=student)
    # the curves hold the cheap metrics only (accuracy, KL, agreement): draw those asked for
    metrics = [m for m in metrics if any(m in e for r in pair_runs for _, ev in r.curves
                                         for e in ev.values())]
    if not metrics:
        return
    methods, sets = R.methods(pair_runs), R.test_sets(pair_runs)
    fig, axes = plt.subplots(len(metrics), len(sets),
                             figsize=(2.6 * len(sets) + 1.5, 2.3 * len(metrics) + 0.6),
                             dpi=100, squeeze=False, sharex=True)
    for row, metric in enumerate(metrics):
        for col, s in enumerate(sets):
            ax = axes[row][col]
            for method in methods:
                steps, st = R.curve_stats(R.select(pair_runs, method=method), s, metric)
                if not steps:
                    continue
                mean = np.array([x.mean for x in st])
                sd = np.array([0.0 if math.isnan(x.std) else x.std for x in st])
                c = colour(method, methods)
                ax.plot(steps, mean, color=c, label=method, lw=1.5)
                ax.fill_between(steps, mean - sd, mean + sd, color=c, alpha=0.2, lw=0)
            if row == 0:
                ax.set_title(f"test set {s}", fontsize=10)
            if col == 0:
                ax.set_ylabel(label(metric), fontsize=9)
            if row == len(metrics) - 1:
                ax.set_xlabel("training step", fontsize=9)
            if is_fraction(metric):
                ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    axes[0][-1].legend(title="loss", fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    n = max(len(c) for c in R.group_cells(pair_runs).values())
    fig.suptitle(f"{exp}: student metrics over training, teacher {teacher}, student {student} "
                 f"(mean ± 1 std over {n} seed{'s' if n > 1 else ''})")
    fig.tight_layout()
    footnote(fig, note)
    save(fig, os.path.join(out, f"{exp}_curves_{safe(teacher)}_{safe(student)}.png"), written)


# ----------------------------------------------------------------------------- 4. categories

def categories(cell_rows: list[dict], exp: str, metric: str, out: str, written: list[str],
               reference: Optional[dict] = None, key: str = "category", note: str = "") -> bool:
    """Every cell of `cell_rows` (R.aggregate's rows) placed by its category (`key`: the 5-way
    "category" or the 8-way "category8"), one point per cell and loss; `reference` ({loss:
    {category: value}}) adds another implementation's category means as black markers beside the
    loss's own."""
    rows = [r for r in cell_rows if r[key] is not None]
    if not rows:
        return False
    # aggregate's order: ce, kl, jacobian, contrastive
    methods = list(dict.fromkeys(r["method"] for r in rows))
    present = [c for c in (R.CATEGORIES8 if key == "category8" else R.CATEGORIES)
               if any(r[key] == c for r in rows)]
    fig, ax = plt.subplots(figsize=((1.9 if key == "category" else 1.5) * len(present) + 2.5, 4.0),
                           dpi=100)
    width = 0.8 / len(methods)
    rng = np.random.default_rng(0)  # jitter only
    for i, method in enumerate(methods):
        c = colour(method, methods)
        for k, cat in enumerate(present):
            vals = [r["mean"] for r in rows if r["method"] == method and r[key] == cat]
            x = k + (i - (len(methods) - 1) / 2) * width
            ax.scatter(x + rng.uniform(-width / 4, width / 4, len(vals)), vals, s=14, color=c,
                       alpha=0.55, label=method if k == 0 else None, edgecolors="none")
            if vals:
                ax.hlines(np.mean(vals), x - width / 2.2, x + width / 2.2, color=c, lw=2.5)
            if reference and cat in reference.get(method, {}):
                ax.scatter([x + width / 3], [reference[method][cat]], marker="x", s=40,
                           color="black", zorder=5,
                           label="reference implementation (mean)" if k == 0 and i == 0 else None)
    counts = {cat: len({(r["teacher"], r["student"], r["test_set"]) for r in rows if r[key] == cat})
              for cat in present}
    ax.set_xticks(range(len(present)))
    ax.set_xticklabels([f"{R.category_name(cat)}\n({counts[cat]} cells)" for cat in present],
                       fontsize=9 if key == "category" else 8)
    ax.set_xlabel("category of the (teacher, student, test set) cell")
    ax.set_ylabel(label(metric))
    if is_fraction(metric):
        ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="loss (bar = mean)", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    split = "category" if key == "category" else "category of the reference's 8-way split"
    ax.set_title(f"{exp}: {label(metric)} by {split}\n(one point per cell and loss, mean over "
                 f"seeds; 'teacher' = mechanism only the teacher saw)", fontsize=10)
    fig.tight_layout()
    footnote(fig, note)
    name = "categories" if key == "category" else "categories8"
    save(fig, os.path.join(out, f"{exp}_{name}_{safe(metric)}.png"), written)
    return True


# ----------------------------------------------------------------------------- main

# ----------------------------------------------------------------------------- 6. dose-response

def _dose_x(values: list) -> tuple[list, list[float], list[str], bool]:
    """A setting's values in order with their positions and tick labels: the numbers themselves
    when all are numbers (on a log axis when they span over a decade), else evenly spaced."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        order = sorted(values)
        return (order, [float(v) for v in order], [f"{v:g}" for v in order],
                min(order) > 0 and max(order) / min(order) > 10)
    order = sorted(values, key=json.dumps)
    return order, list(range(len(order))), [str(v) for v in order], False


def swept_values(runs: list[R.Run], key: str) -> list:
    """The values setting `key` takes in `runs`; runs without it (plain KL has no weight) are
    references, not a point on the x axis."""
    return [json.loads(v) for v in sorted({json.dumps(r.settings.get(key)) for r in runs})
            if v != "null"]


def dose(runs: list[R.Run], exp: str, teacher: str, student: str, key: str, metrics: list[str],
         sets: list[str], out: str, written: list[str], note: str = "") -> None:
    """One panel per (metric, test set): x = the value of setting `key`, one line per loss (and
    per other varying setting) with the 95 % Student-t band over seeds."""
    pair_runs = R.select(runs, teacher=teacher, student=student)
    values = swept_values(pair_runs, key)
    if len(values) < 2:
        raise UserError(f"{exp}, teacher {teacher}, student {student}: setting '{key}' takes one "
                        f"value only ({values[0]}); sweep it with analysis/grid.py --sweep "
                        f"{key.replace('_', '-')}=V1,V2,...")
    order, xs, ticks, log = _dose_x(values)
    position = {json.dumps(v): x for v, x in zip(order, xs)}
    by_line = R.line_names(pair_runs, key)
    losses = list(R.LOSSES)
    lines = sorted(by_line, key=lambda m: (losses.index(m.split(" ")[0])
                                           if m.split(" ")[0] in losses else 99, m))
    fig, axes = plt.subplots(len(metrics), len(sets),
                             figsize=(max(4.2 * len(sets), 8), 3.2 * len(metrics) + 1.2),
                             dpi=100, squeeze=False)
    for row, metric in enumerate(metrics):
        for col, test_set in enumerate(sets):
            ax = axes[row][col]
            for line in lines:
                by_value: dict[str, list[R.Run]] = {}
                for r in by_line[line]:
                    by_value.setdefault(json.dumps(r.settings.get(key)), []).append(r)
                stats = {v: R.summarize(R.value(r, test_set, metric) for r in rs)
                         for v, rs in by_value.items()}
                c = colour(line, lines)
                if set(stats) == {"null"} or (len(stats) == 1
                                              and line.split(" ")[0] in ("ce", "kl")):
                    # no such setting (plain KL's weight): a reference
                    st = next(iter(stats.values()))
                    ax.axhline(st.mean, color=c, ls="--", lw=1.2, label=f"{line} (reference)")
                    continue
                pts = sorted((position[v], st) for v, st in stats.items() if v in position)
                if len(pts) == 1:  # a variant run at one value: a point with its interval
                    (x, st), = pts
                    ax.errorbar([x], [st.mean],
                                yerr=[[st.mean - st.lo], [st.hi - st.mean]] if st.n > 1 else None,
                                fmt="s", color=c, ms=4, capsize=3, label=line)
                    continue
                x = [p for p, _ in pts]
                ax.plot(x, [st.mean for _, st in pts], "o-", color=c, lw=1.5, ms=3, label=line)
                ax.fill_between(x, [st.lo for _, st in pts], [st.hi for _, st in pts], color=c,
                                alpha=0.15, lw=0)
            if log:
                ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels(ticks, fontsize=7)
            ax.set_title(f"{label(metric)}\non {test_set}", fontsize=9)
            if row == len(metrics) - 1:
                ax.set_xlabel(key)
            if is_fraction(metric):
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    handles = {l: h for ax in axes.flat for h, l in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=2,
               frameon=False)
    n = sorted({len(rs) for rs in R.group_cells(pair_runs).values()})
    fig.suptitle(f"{exp}: teacher {teacher}, student {student}; dose-response in {key}\n"
                 f"(mean and 95% CI over {n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}'} seeds)"
                 # in the title: a footnote would collide with the legend at the bottom
                 + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * math.ceil(len(handles) / 2), 1, 1))
    save(fig, os.path.join(out, f"{exp}_dose_{safe(key)}_{safe(teacher)}_{safe(student)}.png"),
         written)


def parse_pair(text: str) -> tuple[str, str]:
    if text.count("/") != 1:
        raise UserError(f"--pair takes TEACHER/STUDENT, e.g. I/IA, got '{text}'")
    t, s = text.split("/")
    return t, s


def draw_experiment(runs: list[R.Run], exp: str, args, written: list[str],
                    excluded: Optional[list[R.Run]] = None) -> None:
    """Every figure of one experiment; `excluded` (the runs the exclusion rule hit) gives each
    figure its footnote: how many of its runs were left out (or kept, with --keep-excluded)."""
    def note(label=lambda r: r.loss, **where) -> str:
        hit = R.select(excluded or [], experiment=exp, **where)
        return R.excluded_note(hit, args.keep_excluded, label) if hit else ""
    runs = R.only_sets(runs, args.sets)
    available = R.metrics(runs)
    metrics = args.metrics or [m for m in ("acc", "kl", "agreement", "worst_group_acc")
                               if m in available]
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise UserError(f"{exp} has no metric {', '.join(unknown)}; it has {', '.join(available)}")
    all_pairs = sorted({(r.teacher, r.student) for r in runs})
    pairs = [parse_pair(p) for p in args.pair] if args.pair else all_pairs
    missing = [f"{t}/{s}" for t, s in pairs if (t, s) not in all_pairs]
    if missing:
        raise UserError(f"{exp} has no runs for --pair {', '.join(missing)}; it has "
                        f"{', '.join(f'{t}/{s}' for t, s in all_pairs)}")
    kinds = set(args.kinds)
    sets = R.test_sets(runs)
    if args.dose and args.dose not in {k for r in runs for k in r.settings}:
        raise UserError(f"{exp}: no setting '{args.dose}' in the runs' flags; name a flag as the "
                        f"JSON's config spells it, e.g. alpha, temperature, student_width")
    for t, s in pairs:
        pair_note = note(teacher=t, student=s)
        if "bars" in kinds:
            bars(runs, exp, t, s, metrics, args.error, args.out, written, pair_note)
        if "curves" in kinds:
            curves(runs, exp, t, s, metrics, args.out, written, pair_note)
        if "dose" in kinds and args.dose:
            dose(runs, exp, t, s, args.dose, metrics, sets, args.out, written,
                 note(lambda r: R.sweep_label(r, args.dose), teacher=t, student=s))
    if not kinds & {"heatmap", "diff", "categories"}:
        return
    students, teachers, _, _ = _grid_axes(runs)
    if len(students) * len(teachers) < 2:
        print(f"{exp}: one (teacher, student) pair only: no heatmaps or categories "
              "(run a grid for those)")
        return
    methods = R.methods(runs)
    chosen = args.methods or methods
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise UserError(f"{exp} has no method {', '.join(unknown)}; it has {', '.join(methods)}")
    for metric in metrics:
        if "heatmap" in kinds:
            for method in chosen:
                heatmap(runs, exp, method, metric, args.error, args.out, written, note())
        if "diff" in kinds and args.baseline in methods:
            for method in chosen:
                if method not in (args.baseline, "ce"):
                    diff_heatmap(runs, exp, method, args.baseline, metric, args.out, written,
                                 note())
        reference = R.REFERENCE_DOMINOES_ACC if args.reference and metric == "acc" else None
        if "categories" in kinds:
            rows = R.aggregate(runs, metric)
            if not categories(rows, exp, metric, args.out, written, reference, note=note()):
                print(f"{exp}: its test sets are not named as configurations, "
                      "so cells have no category")
                kinds.discard("categories")
            elif any(r["category"] == "other" for r in rows):  # the 8-way split refines `other`
                categories(rows, exp, metric, args.out, written, key="category8", note=note())


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
parser.add_argument("results", help="folder of result JSON files (searched recursively)")
parser.add_argument("--out", default="figures", help="folder for the PNG files (default figures)")
parser.add_argument("--experiment", default=None,
                    help="only this experiment (default: every one in the folder)")
parser.add_argument("--pair", action="append", default=None, metavar="TEACHER/STUDENT",
                    help="bar and curve figures for this pair only (repeatable; default: "
                         "every pair)")
parser.add_argument("--metrics", nargs="+", default=None,
                    help="metrics to draw (default: acc kl agreement, and worst_group_acc "
                         "where present)")
parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                    help="figures to draw (default: all)")
parser.add_argument("--methods", nargs="+", default=None,
                    help="methods (losses) that get heatmaps and difference heatmaps "
                         "(default: all)")
parser.add_argument("--baseline", default="kl",
                    help="method subtracted in the difference heatmaps (default kl)")
parser.add_argument("--dose", default=None, metavar="SETTING",
                    help="draw the dose-response in this swept setting "
                         "(e.g. alpha; see analysis/grid.py --sweep)")
parser.add_argument("--sets", nargs="+", default=None,
                    help="only these test sets, in every figure (default: all), e.g. "
                         "I A B IA IB AB IAB for the seven configurations of the Dominoes grid, or "
                         "IA I+rA for the dose-response panels")
parser.add_argument("--keep-excluded", action="store_true",
                    help="draw runs the scripts excluded (e.g. a student below --student-min-fit) "
                         "instead of leaving them out: in a dose-response, a weight that breaks "
                         "the fit is part of the answer")
parser.add_argument("--reference", action="store_true",
                    help="mark the reference implementation's category means for the Dominoes grid "
                         "(random patch) on the categories figure of accuracy")
parser.add_argument("--error", choices=("std", "ci"), default="std",
                    help="error bars of the bar charts: 1 std (default; readable with 2-3 seeds) "
                         "or the 95%% Student-t CI (with 2 seeds it is 9 std wide); "
                         "the tables give both")


def main() -> None:
    args = parser.parse_args()
    runs, exps, excluded = R.load_for_cli(args.results, args.experiment,
                                          keep_excluded=args.keep_excluded)
    if len(exps) > 1:
        print(f"{args.results} holds {len(exps)} experiments ({', '.join(exps)}): "
              "drawing each separately")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {args.out} ({e.strerror})")
    written: list[str] = []
    for exp in exps:
        exp_runs = R.select(runs, experiment=exp)
        print(f"{exp}: {len(exp_runs)} runs, {len(R.group_cells(exp_runs))} cells, "
              f"methods {', '.join(R.methods(exp_runs))}; "
              f"{R.excluded_note(R.select(excluded, experiment=exp), args.keep_excluded)}")
        draw_experiment(exp_runs, exp, args, written, excluded)
    print(f"wrote {len(written)} figures to {args.out}")
    for path in written:
        print(f"  {path}")


if __name__ == "__main__":
    run_cli(main)
