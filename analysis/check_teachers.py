"""Train each experiment's default teacher for several seeds and thread counts, and print its
accuracy.

A distilled student means something only if its teacher learned: this trains the default teacher
of each script (a fresh one, in a temporary cache) with one student step, and prints its accuracy
on validation data (what its floor reads), how many attempts it needed (a teacher below its floor
is trained again from a new start: the goal is that this never fires), the test metric that says
whether it learned its mechanism, and the wall time of the whole call. Runs one call at a time,
so the times are not disturbed by each other. A teacher that needed a restart or stayed below
the bar counts as a failure.

    python analysis/check_teachers.py --seeds 0 1 2 3 4 --threads 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import UserError  # noqa: E402
from harness import run_cli  # noqa: E402

# script -> (test set, metric of the teacher's eval block, the bar the default teacher must reach)
CHECKS = {
    "exp_colored_mnist.py": ("I+rA", "acc", 0.95),
    "exp_waterbirds.py": ("I+rA", "worst_group_acc", 0.90),
    "exp_cifar_patch.py": ("I", "acc", 0.85),
}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
parser.add_argument("--scripts", nargs="+", default=list(CHECKS), choices=list(CHECKS),
                    help="scripts (default: all)")
parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                    help="OMP_NUM_THREADS values (default 1 2)")
parser.add_argument("--cache-dir", default=None,
                    help="keep the teachers in DIR/threads<T> (default: a temporary folder); "
                         "they are always retrained")
parser.add_argument("--smoke", action="store_true",
                    help="pass --smoke to the scripts (a seconds-long check of this tool)")


def main() -> None:
    args = parser.parse_args()
    if min(args.threads) < 1 or min(args.seeds) < 0:
        raise UserError("--threads must be at least 1 and --seeds at least 0")
    print(f"{'script':<22}{'seed':>5}{'threads':>8}{'val acc':>8}{'attempts':>9}  "
          f"{'test metric':<22}{'value':>7}{'bar':>6}  {'teacher s':>9}{'wall s':>8}")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for script in args.scripts:
            test_set, metric, bar = CHECKS[script]
            for threads in args.threads:
                for seed in args.seeds:
                    out = os.path.join(tmp, f"{script}_{seed}_{threads}.json")
                    cache = os.path.join(args.cache_dir or tmp, f"threads{threads}")
                    cmd = [sys.executable, os.path.join(ROOT, script), "--seed", str(seed),
                           "--steps", "1", "--eval-every", "1", "--retrain-teacher",
                           "--cache-dir", cache, "--out", out]
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                               MKL_NUM_THREADS=str(threads))
                    start = time.perf_counter()
                    proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), env=env,
                                          capture_output=True, text=True)
                    wall = time.perf_counter() - start
                    if proc.returncode != 0:
                        failures += 1
                        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                        print(f"{script:<22}{seed:>5}{threads:>8}  FAILED: {reason}")
                        continue
                    with open(out) as f:
                        result = json.load(f)
                    teacher = result["teacher"]
                    value = teacher["eval"][test_set][metric]
                    failed = value < bar or teacher["attempts"] > 1
                    failures += failed
                    print(f"{script:<22}{seed:>5}{threads:>8}{teacher['validation_acc']:>8.3f}"
                          f"{teacher['attempts']:>9}  {test_set + ' ' + metric:<22}{value:>7.3f}"
                          f"{bar:>6.2f}  {result['timing']['teacher_train_s']:>9.1f}{wall:>8.1f}"
                          f"{'  FAILED' if failed else ''}", flush=True)
    if failures:
        raise UserError(f"{failures} teacher(s) failed, needed a restart or stayed below the bar")


if __name__ == "__main__":
    run_cli(main)
