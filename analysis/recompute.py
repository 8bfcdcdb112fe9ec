"""Recompute every metric of a result from the weights saved beside it.

    python analysis/recompute.py results/cifar_patch/I_IA_jacobian_seed0.json
    python analysis/recompute.py RESULT.json --out recomputed.json   # also write what it computed

A run writes its teacher's and student's weights beside its result (`<result>.teacher.pt`,
`<result>.student.pt`; `--no-save-weights` turns that off) and records each file's sha256 and
architecture in the result's `weights`. This tool rebuilds the script's validation and test sets
from the arguments the result recorded (`provenance.argv`: the same seeds, so the same sets),
checks each file's sha256 (and refuses a file that does not match), loads the models and
computes every metric the code has today, with the function the run used. It prints how many of
the result's numbers it reproduced, the largest difference, any number that differs by more than
--tolerance, and the metrics the result did not have (added to the code after it was made). Exit
status 0 when every number of the result was reproduced.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import common  # noqa: E402
import harness  # noqa: E402
from analysis.engine import load_script  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("result", help="a result JSON written with its weights")
parser.add_argument("--tolerance", type=float, default=1e-6,
                    help="largest difference that counts as the same number (default 1e-6)")
parser.add_argument("--out", default=None, help="also write the recomputed metrics as JSON here")


def flatten(value, prefix: str = "") -> dict[str, float]:
    """{'I+rA.acc': 0.53, 'I+rA.cue_share.A': 0.7, ...} of the numbers in nested dicts."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def rebuild_data(result: dict):
    """(the result's script as a module, its parsed arguments, its data), rebuilt from the
    arguments the result recorded: the same seeds, so the same validation and test sets."""
    script = os.path.join(ROOT, f"exp_{result['experiment']}.py")
    if not os.path.isfile(script):
        raise common.UserError(f"the result comes from experiment '{result['experiment']}', "
                               f"which has no script {script}")
    module = load_script(script)
    with contextlib.redirect_stdout(io.StringIO()):  # parse_args and make_data report as a run
        args = module.parse_args(result["provenance"]["argv"])
        data = module.make_data(args, log=lambda m: None)
    return module, args, data


def load_result(path: str) -> dict:
    """A result JSON that records saved weights, or one clear error."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise common.UserError(f"cannot read {path} as a result ({type(e).__name__})")
    if not isinstance(result, dict) or "weights" not in result:
        raise common.UserError(f"{path} records no saved weights (made before they were saved, "
                               f"or with --no-save-weights); run its command again")
    return result


def load_models(path: str, result: dict, args) -> tuple:
    """(teacher, student) from the weights saved beside the result at `path`, each file checked
    against its recorded sha256, in the memory layout the run used (`args`: its parsed flags)."""
    teacher, student = (harness.load_weights(path, role, result["weights"][role])
                        for role in ("teacher", "student"))
    for model in (teacher, student):
        common.in_format(model, bool(getattr(args, "channels_last", False)))
    return teacher, student


def recompute(path: str) -> tuple[dict, dict]:
    """(the result, the recomputed {"teacher": eval, "student": eval, "fit": ...})."""
    result = load_result(path)
    module, args, data = rebuild_data(result)
    teacher, student = load_models(path, result, args)
    teacher_logits = {name: common.predict(teacher, s.x).cpu()
                      for name, s in data.test_sets.items()}
    groups = data.student_train.group
    shares = result.get("group_shares", {}) if groups is not None else {}
    cues = module.cues(data) if hasattr(module, "cues") else None
    teacher_eval, student_eval = harness.evaluate(teacher, student, data.test_sets,
                                                  teacher_logits, shares, cues)
    validation = data.student_validation
    s_pred = common.predict(student, validation.x).argmax(1).cpu()
    t_pred = common.predict(teacher, validation.x).argmax(1).cpu()
    y = validation.y.cpu()
    fit = {"acc": (s_pred == y).float().mean().item(),
           "agreement": (s_pred == t_pred).float().mean().item(),
           "teacher_acc": (t_pred == y).float().mean().item()}
    return result, {"teacher": teacher_eval, "student": student_eval, "fit": fit}


def main() -> int:
    args = parser.parse_args()
    if not args.tolerance >= 0:
        raise common.UserError(f"--tolerance must be at least 0, got {args.tolerance}")
    result, again = recompute(args.result)
    stored = {**{f"teacher.{k}": v for k, v in flatten(result["teacher"]["eval"]).items()},
              **{f"student.{k}": v for k, v in flatten(result["student"]["eval"]).items()},
              **{f"fit.{k}": v for k, v in flatten(result["student"]["fit"]).items()
                 if k in again["fit"]}}
    fresh = {**{f"teacher.{k}": v for k, v in flatten(again["teacher"]).items()},
             **{f"student.{k}": v for k, v in flatten(again["student"]).items()},
             **{f"fit.{k}": v for k, v in flatten(again["fit"]).items()}}
    common_keys = [k for k in stored if k in fresh]
    diffs = {k: abs(stored[k] - fresh[k]) for k in common_keys
             if not (math.isnan(stored[k]) and math.isnan(fresh[k]))}
    bad = {k: d for k, d in diffs.items() if not d <= args.tolerance}
    missing = [k for k in stored if k not in fresh]
    new = sorted({k.split(".")[-1] if "cue_share" not in k else "cue_share"
                  for k in fresh if k not in stored})
    largest = max(diffs.values(), default=0.0)
    print(f"{args.result}: recomputed {len(common_keys)} of its {len(stored)} numbers from its "
          f"saved weights (sha256 checked); largest difference {largest:.2g}")
    for k, d in sorted(bad.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  differs: {k}: stored {stored[k]:.6g}, recomputed {fresh[k]:.6g}")
    for k in missing[:20]:
        print(f"  not recomputed: {k} (no longer computed by the code)")
    if new:
        print(f"  metrics the result lacks, computed now: {', '.join(new)}")
    if args.out:
        harness.prepare_output(args.out)
        harness.write_result(args.out, {"result": os.path.abspath(args.result), **again})
        print(f"recomputed metrics: {args.out}")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    harness.run_cli(lambda: sys.exit(main()))
