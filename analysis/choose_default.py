"""Choose a loss weight (or any swept setting) by a rule that never looks at the counterfactual
sets.

The rule: for each loss, the largest value of the swept setting whose student still fits held-out
data of its own distillation configuration (the `fit` block of each result: accuracy on held-out
samples of the student's configuration, e.g. `IA`) within `--tolerance` of plain KL's (mean over
seeds). A larger weight on a Jacobian or contrastive term can only be bought while the student
keeps doing its job in distribution; what that weight does off distribution is then measured, not
chosen for.

    python analysis/choose_default.py results/sweep_alpha_cm --setting alpha
    python analysis/choose_default.py results/sweep_alpha_cm --setting alpha --tolerance 0.02 \\
        --measure agreement

Runs are grouped by experiment, teacher and student configuration, and by loss plus any other
setting that varies (e.g. mixture_t2); plain KL runs (at any value) are the reference. Runs excluded
for a poor fit count here (they are the ones the rule must see); runs with non-finite numbers do
not.
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
parser.add_argument("--measure", choices=("acc", "agreement", "fit"), default="acc",
                    help="acc: accuracy on the held-out distillation data (default); agreement: "
                         "with the teacher there; fit: the higher of the two")


def choose(runs: list[R.Run], setting: str, baseline: str, tolerance: float,
           measure: str) -> list[dict]:
    """One row per (experiment, teacher, student, line): the reference's mean fit, each value's
    mean fit over seeds, and the chosen value (None when even the smallest falls short)."""
    rows = []
    for key in sorted({(r.experiment, r.teacher, r.student) for r in runs}):
        group = [r for r in runs if (r.experiment, r.teacher, r.student) == key]
        reference = [r.fit[measure] for r in group if r.loss == baseline and measure in r.fit]
        if not reference:
            raise UserError(f"{'/'.join(key)}: no {baseline} run with a fit block to compare with; "
                            f"run the {baseline} student on the same pair "
                            f"(the grid with --losses {baseline})")
        ref = sum(reference) / len(reference)
        candidates = [r for r in group if r.loss != baseline and r.settings.get(setting) is not None
                      and measure in r.fit]
        lines: dict[str, dict] = {}
        for name, line_runs in R.line_names(candidates, setting).items():
            for r in line_runs:
                lines.setdefault(name, {}).setdefault(json.dumps(r.settings[setting]), []).append(
                    r.fit[measure])
        for name, by_value in sorted(lines.items()):
            means = {json.loads(v): sum(f) / len(f) for v, f in by_value.items()}
            ok = [v for v, m in means.items() if m >= ref - tolerance]
            rows.append({"experiment": key[0], "teacher": key[1], "student": key[2], "line": name,
                         "reference": ref, "n_reference": len(reference),
                         "means": dict(sorted(means.items())), "chosen": max(ok) if ok else None})
    return rows


def main() -> None:
    args = parser.parse_args()
    if not 0 <= args.tolerance <= 1:
        raise UserError(f"--tolerance must be in [0, 1], got {args.tolerance}")
    runs = R.load_sweep(args.results, args.setting)
    rows = choose(runs, args.setting, args.baseline, args.tolerance, args.measure)
    if not rows:
        raise UserError(f"no run other than {args.baseline} in {args.results} has a fit block and "
                        f"'{args.setting}'")
    print(f"rule: the largest {args.setting} whose held-out {args.measure} on the student's own "
          f"configuration is within {args.tolerance:g} of {args.baseline}'s (means over seeds; "
          "counterfactual sets not read)")
    for row in rows:
        values = "  ".join(f"{v:g}: {m:.3f}" if isinstance(v, (int, float)) else f"{v}: {m:.3f}"
                           for v, m in row["means"].items())
        print(f"{row['experiment']} {row['teacher']} -> {row['student']}  {row['line']:<28} "
              f"{args.baseline} {row['reference']:.3f} (n={row['n_reference']})  {values}  "
              f"=> {args.setting} = "
              f"{row['chosen'] if row['chosen'] is not None else 'none within the tolerance'}")


if __name__ == "__main__":
    run_cli(main)
