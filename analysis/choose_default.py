"""Choose a loss weight (or any swept setting) by a rule that never looks at the counterfactual
sets.

The rule: for each loss, the largest value of the swept setting whose student still fits validation
data of its own distillation configuration (the `fit` block of each result: accuracy on validation
images, which no run trains on and no test set uses, rendered in the student's configuration,
e.g. `IA`) within `--tolerance` of plain KL's (mean over
seeds). A larger weight on a Jacobian or contrastive term can only be bought while the student
keeps doing its job in distribution; what that weight does off distribution is then measured, not
chosen for.

    python analysis/choose_default.py results/sweep_alpha_cm --setting alpha
    python analysis/choose_default.py results/sweep_alpha_cm --setting alpha --tolerance 0.02 \\
        --measure agreement

Runs are grouped by experiment, teacher and student configuration, and by loss plus any other
setting that varies (e.g. mixture_t2); plain KL runs (at any value) are the reference. As in every
tool, runs the scripts excluded (a student below --student-min-fit) are left out of the means and
counted in the output; a value with such a run is never chosen, since one of its students did not
fit its own data. Runs with non-finite numbers are left out too.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import UserError  # noqa: E402
from harness import run_cli  # noqa: E402
from analysis import results as R  # noqa: E402

parser = R.sweep_parser(__doc__)
parser.add_argument("--baseline", default="kl",
                    help="the loss whose fit is the reference (default kl)")
parser.add_argument("--tolerance", type=float, default=0.01,
                    help="how far below the reference the fit may fall "
                         "(default 0.01, one point)")
parser.add_argument("--measure", choices=("acc", "agreement"), default="acc",
                    help="acc: accuracy on the student's validation data (default); agreement: "
                         "with the teacher there")


def choose(runs: list[R.Run], setting: str, baseline: str, tolerance: float,
           measure: str) -> list[dict]:
    """One row per (experiment, teacher, student, line): the reference's mean fit, each value's
    mean fit over seeds, how many of each value's runs R.is_excluded left out, and the chosen value
    (None when even the smallest falls short). `runs` may hold excluded runs: they are counted,
    never averaged, and a value with one is not chosen."""
    rows = []
    for key in sorted({(r.experiment, r.teacher, r.student) for r in runs}):
        group = [r for r in runs if (r.experiment, r.teacher, r.student) == key]
        reference = [r.fit[measure] for r in group if r.loss == baseline and measure in r.fit
                     and not R.is_excluded(r)]
        if not reference:
            raise UserError(f"{'/'.join(key)}: no {baseline} run with a fit block to compare with; "
                            f"run the {baseline} student on the same pair "
                            f"(the grid with --losses {baseline})")
        ref = sum(reference) / len(reference)
        candidates = [r for r in group if r.loss != baseline and r.settings.get(setting) is not None
                      and measure in r.fit]
        for name, line_runs in sorted(R.line_names(candidates, setting).items()):
            by_value: dict[str, list[float]] = {}
            left_out: dict[str, int] = {}
            for r in line_runs:
                v = json.dumps(r.settings[setting])
                by_value.setdefault(v, [])
                if R.is_excluded(r):
                    left_out[v] = left_out.get(v, 0) + 1
                else:
                    by_value[v].append(r.fit[measure])
            means = {json.loads(v): sum(f) / len(f) for v, f in by_value.items() if f}
            ok = [json.loads(v) for v, f in by_value.items()
                  if f and v not in left_out and sum(f) / len(f) >= ref - tolerance]
            rows.append({"experiment": key[0], "teacher": key[1], "student": key[2], "line": name,
                         "reference": ref, "n_reference": len(reference),
                         "means": dict(sorted(means.items())),
                         "left_out": {json.loads(v): n for v, n in sorted(left_out.items())},
                         "chosen": max(ok) if ok else None})
    return rows


def value_order(v) -> tuple:
    """Numbers in numeric order, then anything else by its JSON text."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    return (not number, v if number else 0, json.dumps(v))


def value_text(v, row: dict) -> str:
    """'0.5: 0.945', with '(1 left out)' when the exclusion rule left some of its runs out."""
    name = f"{v:g}" if isinstance(v, (int, float)) else str(v)
    mean = f" {row['means'][v]:.3f}" if v in row["means"] else " -"
    n = row["left_out"].get(v)
    return f"{name}:{mean}" + (f" ({n} left out)" if n else "")


def main() -> None:
    args = parser.parse_args()
    if not 0 <= args.tolerance <= 1:
        raise UserError(f"--tolerance must be in [0, 1], got {args.tolerance}")
    runs, excluded = R.load_sweep(args.results, args.setting)
    rows = choose(runs + excluded, args.setting, args.baseline, args.tolerance, args.measure)
    if not rows:
        raise UserError(f"no run other than {args.baseline} in {args.results} has a fit block and "
                        f"'{args.setting}'")
    print(f"rule: the largest {args.setting} whose validation {args.measure} on the student's own "
          f"configuration is within {args.tolerance:g} of {args.baseline}'s (means over seeds; "
          "counterfactual sets not read)")
    for row in rows:
        values = "  ".join(value_text(v, row) for v in sorted({*row["means"], *row["left_out"]},
                                                               key=value_order))
        print(f"{row['experiment']} {row['teacher']} -> {row['student']}  {row['line']:<28} "
              f"{args.baseline} {row['reference']:.3f} (n={row['n_reference']})  {values}  "
              f"=> {args.setting} = "
              f"{row['chosen'] if row['chosen'] is not None else 'none within the tolerance'}")
    print(R.excluded_note(excluded, label=lambda r: R.sweep_label(r, args.setting))
          + (" (a value with one is not chosen)" if excluded else ""))


if __name__ == "__main__":
    run_cli(main)
