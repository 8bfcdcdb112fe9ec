"""Print the numbers behind the figures as a Markdown, plain-text or CSV table.

    python analysis/table.py results/grid --metric acc  # every cell, one column per loss
    python analysis/table.py results/grid --metric acc --by category  # the paper's category summary
    python analysis/table.py results/grid --metric acc --by category8  # the reference's 8-way split
    python analysis/table.py results/dominoes --metric acc --by category \\
        --reference  # beside the reference's numbers
    python analysis/table.py results/dominoes --metric acc --by category --minus kl
        # each loss minus kl per category, paired by seed, with the smallest detectable difference

Per cell: mean ± std over seeds. Per category: the mean over the category's cells, ± the std over
seeds of each seed's mean over those cells (the cells every seed has: `cells lacking a seed`
counts, per method, those left out of the spread; --minus pairs over the cells where both
methods have every seed). The 95 % Student-t confidence interval is in brackets when
there are at least two seeds; n is the number of seeds, `cells` the number of cells (per method
in a category table: the cells with a run that is not excluded). Runs the
scripts excluded are left out, and a line under each table says how many.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import signal
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import UserError  # noqa: E402
from harness import run_cli  # noqa: E402
from analysis import results as R  # noqa: E402


def entry(row: dict, digits: int = 3, ci: bool = True) -> str:
    """'0.912 ± 0.013 [0.795, 1.029]' or '0.912 (n=1)' when the spread is unknown."""
    if math.isnan(row["std"]):
        return f"{row['mean']:.{digits}f} (n={row.get('n', 1)})"
    text = f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}"
    return text + (f" [{row['ci_lo']:.{digits}f}, {row['ci_hi']:.{digits}f}]" if ci else "")


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        return buf.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt_row = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths]),
                      *map(fmt_row, rows)]) + "\n"


def cell_table(rows: list[dict], methods: list[str], fmt: str, ci: bool) -> str:
    """One line per (teacher, student, test set), one column per method."""
    keys = list(dict.fromkeys((r["teacher"], r["student"], r["test_set"]) for r in rows))
    by = {(r["teacher"], r["student"], r["test_set"], r["method"]): r for r in rows}
    cat = {(r["teacher"], r["student"], r["test_set"]): r["category"] or "-" for r in rows}
    raw = fmt == "csv"
    header = ["teacher", "student", "test set", "category", *methods] + (["n"] if not raw else [])
    lines = []
    for k in keys:
        cells = [by.get((*k, m)) for m in methods]
        if raw:
            vals = [f"{c['mean']:.6g}" if c else "" for c in cells]
        else:
            vals = [entry(c, ci=ci) if c else "-" for c in cells]
            vals.append("/".join(sorted({str(c["n"]) for c in cells if c})))
        lines.append([*k, cat[k], *vals])
    return render(header, lines, fmt)


def category_table(rows: list[dict], methods: list[str], fmt: str, ci: bool, key: str = "category",
                   reference: Optional[dict] = None) -> str:
    """One line per category (`key`: the 5-way "category" or the 8-way "category8"), one column per
    method: the mean over the category's cells, ± std and 95 % CI over seeds; then a column per
    method of `reference` ({method: {category: value}}) when given, the number of cells and of
    those left out of the spread because some seed lacks them."""
    summary = R.category_summary([r for r in rows if r[key]], key)
    if not summary:
        raise UserError("no cell has a category: the test sets are not named as configurations "
                        "(e.g. I, IA, I+rA)")
    by = {(s["category"], s["method"]): s for s in summary}
    reference = reference or {}
    header = ["category", *methods, *[f"reference {m}" for m in reference], "cells",
              "cells lacking a seed"]
    lines = []
    for cat in (R.CATEGORIES8 if key == "category8" else R.CATEGORIES):
        cells = [by.get((cat, m)) for m in methods]
        if not any(cells):
            continue
        vals = [(f"{c['mean']:.6g}" if fmt == "csv" else entry(c, ci=ci)) if c else "-"
                for c in cells]
        refs = [f"{ref[cat]:.3f}" if cat in ref else "-" for ref in reference.values()]
        dropped = "/".join(str(c["cells_dropped"]) if c else "-" for c in cells)
        lines.append([cat if fmt == "csv" else R.category_name(cat), *vals, *refs,
                      "/".join(str(c["cells"]) if c else "-" for c in cells), dropped])
    return render(header, lines, fmt)


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("results", help="folder of result JSON files (searched recursively)")
parser.add_argument("--metric", default="acc",
                    help="acc, kl, agreement, worst_group_acc, teacher_acc, ... (default acc)")
parser.add_argument("--by", choices=("cell", "category", "category8"), default="cell",
                    help="rows per cell, per category (5-way) or per category of the reference "
                         "implementation's 8-way split (default cell)")
parser.add_argument("--reference", action="store_true",
                    help="with --metric acc --by category: add the reference implementation's own "
                         "numbers for the Dominoes exhaustive grid (random patch) beside ours")
parser.add_argument("--minus", default=None, metavar="METHOD",
                    help="with --by category or category8: each other method minus METHOD (e.g. "
                         "kl), paired by seed, with its 95 %% interval, the smallest difference "
                         "the seeds detect (80 %% power, 5 %% level) and the seeds --effect needs")
parser.add_argument("--effect", type=float, default=0.01,
                    help="with --minus: the difference to plan seeds for (default 0.01, one point "
                         "of accuracy: the reference's jacobian - kl on teacher cells)")
parser.add_argument("--format", choices=("md", "text", "csv"), default="md",
                    help="output format (default md)")
parser.add_argument("--no-ci", action="store_true", help="leave the confidence intervals out")
parser.add_argument("--experiment", default=None,
                    help="only this experiment (default: every one, one table each)")
parser.add_argument("--sets", nargs="+", default=None,
                    help="only these test sets, e.g. the seven configurations I A B IA IB AB IAB "
                         "of the Dominoes grid (default: all; a randomised set such as I+rA counts "
                         "in the categories as the mechanisms that carry its label)")
parser.add_argument("--keep-excluded", action="store_true",
                    help="count runs the scripts excluded (e.g. a student below --student-min-fit) "
                         "instead of leaving them out")


def difference_table(rows: list[dict], methods: list[str], minus: str, key: str, fmt: str,
                     effect: float) -> str:
    """One line per category, one column per method other than `minus`: the paired difference
    with its interval, the smallest difference the design detects, and the seeds `effect` needs."""
    others = [m for m in methods if m != minus]
    diffs = {(d["category"], d["a"]): d for m in others
             for d in R.category_difference(rows, m, minus, key)}
    header = ["category", *[f"{m} − {minus}" for m in others], "cells", "cells lacking a seed",
              "seeds"]
    lines = []
    for cat in (R.CATEGORIES8 if key == "category8" else R.CATEGORIES):
        cells = [diffs.get((cat, m)) for m in others]
        if not any(cells):
            continue
        vals = []
        for d in cells:
            if d is None:
                vals.append("-")
            elif fmt == "csv":
                vals.append(f"{d['mean']:.6g}")
            else:
                need = R.seeds_needed(d["std"], effect)
                plan = (f"; {effect:g} needs {need} seeds" if need else
                        f"; {effect:g} needs more than 1000 seeds" if d["n"] > 1 else "")
                vals.append(f"{d['mean']:+.3f} [{d['ci_lo']:+.3f}, {d['ci_hi']:+.3f}] "
                            f"(detects ≥ {d['detectable']:.3f}{plan})" if d["n"] > 1
                            else f"{d['mean']:+.3f} (n={d['n']})")
        lines.append([cat if fmt == "csv" else R.category_name(cat), *vals,
                      *("/".join(str(d[k]) if d else "-" for d in cells)
                        for k in ("cells", "cells_dropped", "n"))])
    return render(header, lines, fmt)


def main() -> None:
    args = parser.parse_args()
    if args.reference and (args.metric != "acc" or args.by != "category"):
        raise UserError("--reference compares the student's accuracy per 5-way category: use it "
                        "with --metric acc --by category")
    if args.minus is not None and args.by == "cell":
        raise UserError("--minus compares methods per category: add --by category or category8")
    if args.minus is not None and args.reference:
        raise UserError("--minus and --reference make two different tables; run them one at a "
                        "time")
    if not 0 < args.effect < 1:
        raise UserError(f"--effect must be between 0 and 1, got {args.effect}")
    runs, exps, excluded = R.load_for_cli(args.results, args.experiment,
                                          keep_excluded=args.keep_excluded)
    for exp in exps:
        exp_runs = R.only_sets(R.select(runs, experiment=exp), args.sets)
        if args.metric not in R.metrics(exp_runs):
            raise UserError(f"{exp} has no metric '{args.metric}'; it has "
                            f"{', '.join(R.metrics(exp_runs))}")
        rows = R.aggregate(exp_runs, args.metric)
        methods = R.methods(exp_runs)
        if args.format != "csv":
            what = (f"each method minus {args.minus}, mean over the category's cells paired "
                    f"by seed" if args.minus else "mean over cells, ± std over seeds"
                    if args.by != "cell" else "mean over seeds, ± std")
            print(f"{'### ' if args.format == 'md' else ''}{exp}: {args.metric} ({what}"
                  f"{'' if args.no_ci else ', [95% CI]'})\n")
        if args.minus is not None and args.minus not in methods:
            raise UserError(f"--minus {args.minus}: {exp} has no runs of it; it has "
                            f"{', '.join(methods)}")
        if args.by == "cell":
            text = cell_table(rows, methods, args.format, not args.no_ci)
        elif args.minus is not None:
            text = difference_table(rows, methods, args.minus, args.by, args.format, args.effect)
        else:
            text = category_table(rows, methods, args.format, not args.no_ci, args.by,
                                  R.REFERENCE_DOMINOES_ACC if args.reference else None)
        note = R.excluded_note(R.select(excluded, experiment=exp), kept=args.keep_excluded)
        if args.format == "csv":  # the CSV stays machine-readable
            print(text)
            print(f"{exp}: {note}", file=sys.stderr)
        else:
            print(f"{text}\n{note}\n")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `table.py ... | head` ends quietly
    run_cli(main)
