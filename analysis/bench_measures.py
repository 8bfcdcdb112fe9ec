"""What each comparison of teacher and student costs, timed on a result's own models and test sets.

    python analysis/bench_measures.py results/colored_mnist/I+rA_IA_jacobian_seed0.json
    python analysis/bench_measures.py RESULT.json --repeats 5 --threads 1

Loads the teacher and student saved beside a result (checked against their sha256 like
analysis/recompute.py), rebuilds the script's test sets from the result's arguments and times,
over all test sets, each part of a run's final evaluation: the logits and the agreement measures
(accuracy, KL, agreement, Cohen's kappa, error consistency), the penultimate features of both
models with CKA and Procrustes distance, where both models look (the input gradient of the
label's logit, cue shares and saliency cosine), and saving both models' weights. It prints the
median of --repeats timings per part, next to the whole run's time from the result, so the
share each measure adds to a run can be read off. Time it alone: other processes on the CPU
change the numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import torch  # noqa: E402

import common  # noqa: E402
import harness  # noqa: E402
from analysis.recompute import load_models, load_result, rebuild_data  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("result", help="a result JSON written with its weights")
parser.add_argument("--repeats", type=int, default=3, help="timings per part (default 3)")
parser.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, as a run uses)")


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parser.parse_args()
    harness.check_value(args.repeats, "count", "--repeats")
    if args.threads is not None:
        harness.check_value(args.threads, "count", "--threads")
        torch.set_num_threads(args.threads)
    result = load_result(args.result)
    module, run_args, data = rebuild_data(result)
    teacher, student = load_models(args.result, result, run_args)
    tests = data.test_sets
    cues = module.cues(data) if hasattr(module, "cues") else None

    def agreement():
        logits = {n: common.predict(teacher, s.x).cpu() for n, s in tests.items()}
        common.evaluate_student(student, tests, logits)

    def representation():
        common.representation_metrics(
            {n: common.features_of(student, s.x) for n, s in tests.items()},
            {n: common.features_of(teacher, s.x) for n, s in tests.items()})

    def saliency():
        common.saliency_metrics(common.look_of(student, tests, cues),
                                common.look_of(teacher, tests, cues))

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "r.json")
        parts = [("logits and agreement (acc, KL, agreement, kappa, error consistency)",
                  agreement),
                 ("features, CKA and Procrustes distance", representation),
                 *([("where they look (saliency of both, cue shares, cosine)", saliency)]
                   if cues else []),
                 ("saving both models' weights",
                  lambda: harness.save_weights(out, teacher, student, data))]
        timings = [(name, timed(fn, args.repeats)) for name, fn in parts]
    timing = result.get("timing", {})
    run_s = timing.get("total_s")
    images = sum(len(s.y) for s in tests.values())
    print(f"{args.result}: {len(tests)} test sets, {images} images, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    for name, seconds in timings:
        share = f"  ({100 * seconds / run_s:.1f} % of the run's {run_s:.0f} s)" if run_s else ""
        print(f"  {seconds:8.3f} s  {name}{share}")


if __name__ == "__main__":
    harness.run_cli(main)
