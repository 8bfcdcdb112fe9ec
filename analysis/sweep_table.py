"""Print a sweep (analysis/grid.py --sweep) as one Markdown table: a row per loss and value.

    python analysis/sweep_table.py results/sweep_cm --setting alpha \\
        --columns agreement:I+rA kl:I+rA agreement:IA
    python analysis/sweep_table.py results/sweep_wb --setting alpha \\
        --columns worst_group_acc:I+rA agreement:minority

Each row is one line of the dose-response figure at one value of the setting (plain KL, which has
no weight, is the reference row): the mean ± 95 % CI half-width over seeds (Student-t) of each
`metric:test set` column; the student's validation fit on its own configuration (accuracy) and how
many of its runs the scripts excluded; and which loss term drives training: the norm of the
weighted KL term's gradient on the student's parameters divided by the other term's, at the first
evaluation point (mean over seeds) and the median over every evaluation point and seed. As in every
tool, excluded runs are left out of the numbers (n counts the others); each row and a line under
each table say how many: a weight that breaks the student's fit is part of the answer.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import UserError  # noqa: E402
from harness import run_cli  # noqa: E402
from analysis import results as R  # noqa: E402

parser = R.sweep_parser(__doc__)
parser.add_argument("--columns", nargs="+", required=True, metavar="METRIC:SET",
                    help="metric and test set of each column, e.g. agreement:I+rA kl:I+rA "
                         "worst_group_acc:I+rA")


def gradient_ratios(run: R.Run) -> list[float]:
    """KL's weighted-gradient norm over the other term's, at each evaluation point of `run`."""
    out = []
    for _, norms in run.grad_norms:
        other = [v for k, v in norms.items() if k != "kl"]
        if "kl" in norms and other and other[0] > 0:
            out.append(norms["kl"] / other[0])
    return out


def fmt(stat: R.Stat) -> str:
    digits = 1 if abs(stat.mean) >= 10 else 3
    if math.isnan(stat.mean):
        return ""
    return f"{stat.mean:.{digits}f}" + ("" if math.isnan(stat.half_width)
                                        else f" ± {stat.half_width:.{digits}f}")


def row(line: str, value, runs: list[R.Run], columns: list[tuple[str, str]]) -> list[str]:
    """One line of the table; the runs that R.is_excluded are counted, not used."""
    excluded = sum(R.is_excluded(r) for r in runs)
    runs = [r for r in runs if not R.is_excluded(r)]
    ratios = [gradient_ratios(r) for r in runs]
    first = [r[0] for r in ratios if r]
    every = [x for r in ratios for x in r]
    fit = R.summarize(r.fit.get("acc") for r in runs)
    cells = [fmt(R.cell_stat(runs, test_set, metric)) for metric, test_set in columns]
    return [line, "" if value is None else f"{value:g}" if isinstance(value, (int, float))
                  else str(value),
            str(len(runs)), *cells,
            (("" if math.isnan(fit.mean) else f"{fit.mean:.3f}")
             + (f" ({excluded} excluded, left out)" if excluded else "")).strip(),
            f"{statistics.mean(first):.3g}" if first else "",
            f"{statistics.median(every):.3g}" if every else ""]


def tables(runs: list[R.Run], setting: str,
           columns: list[tuple[str, str]]) -> dict[tuple, list[list[str]]]:
    """{(experiment, teacher, student): rows}: first the runs without a value of `setting` (plain
    KL, ce), then each line of the sweep value by value. `runs` may hold excluded runs: each row
    counts its own and leaves them out of its numbers."""
    out = {}
    for key in sorted({(r.experiment, r.teacher, r.student) for r in runs}):
        group = [r for r in runs if (r.experiment, r.teacher, r.student) == key]
        swept = [r for r in group if r.settings.get(setting) is not None]
        reference = [r for r in group if r.settings.get(setting) is None]
        rows = [row(name, None, line_runs, columns)
                for name, line_runs in R.line_names(reference, setting).items()]
        for name, line_runs in sorted(R.line_names(swept, setting).items()):
            by_value: dict[str, list[R.Run]] = {}
            for r in line_runs:
                by_value.setdefault(json.dumps(r.settings[setting]), []).append(r)
            rows += [row(name, json.loads(v), by_value[v], columns)
                     for v in sorted(by_value, key=json.loads)]
        out[key] = rows
    return out


def main() -> None:
    args = parser.parse_args()
    columns = []
    for spec in args.columns:
        metric, sep, test_set = spec.partition(":")
        if not sep or not metric or not test_set:
            raise UserError(f"--columns '{spec}' is not METRIC:SET; write e.g. agreement:I+rA")
        columns.append((metric, test_set))
    runs, excluded = R.load_sweep(args.results, args.setting)
    for metric, test_set in columns:
        if all(R.value(r, test_set, metric) is None for r in runs):
            raise UserError(f"no run in {args.results} has {metric} on {test_set}; "
                            f"test sets: {', '.join(R.test_sets(runs))}; "
                            f"metrics: {', '.join(R.metrics(runs))}")
    header = ["loss", args.setting, "n", *[f"{m} `{s}`" for m, s in columns], "validation fit",
              "KL/other grad, first eval", "median"]
    for key, rows in tables(runs + excluded, args.setting, columns).items():
        experiment, teacher, student = key
        print(f"\n{experiment}: teacher {teacher}, student {student}\n")
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
        left_out = [r for r in excluded if (r.experiment, r.teacher, r.student) == key]
        print("\n" + R.excluded_note(left_out, label=lambda r: R.sweep_label(r, args.setting)))


if __name__ == "__main__":
    run_cli(main)
