"""Profile one experiment run with cProfile and say where the student's training time went.

    python analysis/profile_run.py exp_colored_mnist.py -- --loss jacobian
    python analysis/profile_run.py exp_waterbirds.py --top 30 -- --loss kl --smoke

The script runs in this process, unchanged, with the arguments after `--`. The report splits the
time of `common.distill` (less its setup: the teacher's targets, computed once) into the student's
forward pass and loss (`objective`), the backward pass, the optimizer and scheduler, evaluation on
the counterfactual sets, and the rest (batching, progress bar, Python glue), then prints the
profile's top lines by cumulative and by own time. cProfile adds a little overhead to every Python
call, so the run is somewhat slower than without it; the shares are what matter.
"""
import argparse
import cProfile
import os
import pstats
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import harness  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Arguments after -- go to the experiment script.")
parser.add_argument("script", help="the experiment script, e.g. exp_colored_mnist.py")
parser.add_argument("--top", type=int, default=20,
                    help="profile lines to print per ordering (default 20)")
parser.add_argument("--out", default=None,
                    help="also save the raw profile here (for snakeviz or pstats)")


def _called_from(stats: pstats.Stats, caller: str) -> list[tuple[str, str, float]]:
    """(file, function, seconds) of every function called directly by common.py's `caller`, with
    the time of those calls only (a function that is also called elsewhere counts once per
    caller)."""
    out = []
    for (file, _, func), (_, _, _, _, callers) in stats.stats.items():
        for (caller_file, _, caller_func), timing in callers.items():
            if caller_func == caller and caller_file.endswith("common.py"):
                out.append((file, func, timing[3]))
    return out


def breakdown(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of the student's training loop by part, from a profile of one experiment run."""
    distill = sum(v[3] for (file, _, func), v in stats.stats.items()
                  if func == "distill" and file.endswith("common.py"))
    parts = dict.fromkeys(["forward + loss (objective)", "backward", "optimizer + scheduler",
                           "evaluation"], 0.0)
    setup = 0.0
    for file, func, seconds in _called_from(stats, "distill"):
        if func == "objective":
            parts["forward + loss (objective)"] += seconds
        elif func == "backward" and file.endswith("_tensor.py"):
            parts["backward"] += seconds
        elif "optim" in file and func in ("wrapper", "step"):
            # Adam.step (through its hook wrapper), the scheduler
            parts["optimizer + scheduler"] += seconds
        elif func == "evaluate_student":
            parts["evaluation"] += seconds
        elif func in ("teacher_targets", "predict", "to_device"):  # before the first step
            setup += seconds
    loop = distill - setup
    parts["rest (batching, progress, glue)"] = max(loop - sum(parts.values()), 0.0)
    return {"student training loop": loop, **parts}


def main():
    argv = sys.argv[1:]
    script_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not os.path.isfile(args.script):
        raise common.UserError(f"no script {args.script}; give the path of an exp_*.py file")
    if args.top < 0:
        raise common.UserError("--top must be at least 0")
    profiler = cProfile.Profile()
    sys.argv = [args.script] + script_args
    code = 0
    profiler.enable()
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as e:  # the scripts exit through harness.run_cli
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        profiler.disable()
    if code:
        raise common.UserError(f"{args.script} exited with status {code}; nothing to report")
    stats = pstats.Stats(profiler)
    if args.out:
        stats.dump_stats(args.out)
    parts = breakdown(stats)
    loop = parts.pop("student training loop")
    if loop <= 0:
        raise common.UserError("the profile has no student training (was common.distill called?)")
    total = sum(v[2] for v in stats.stats.values())
    print(f"\nprofile of {' '.join(sys.argv)}: {total:.1f} s profiled, "
          f"student training loop {loop:.1f} s")
    for name, seconds in parts.items():
        print(f"  {name:<34}{seconds:8.1f} s  {100 * seconds / loop:5.1f} %")
    model_share = parts["forward + loss (objective)"] + parts["backward"]
    print(f"  {'forward, loss and backward':<34}{model_share:8.1f} s  "
          f"{100 * model_share / loop:5.1f} %")
    for order in ("cumulative", "tottime"):
        print(f"\ntop {args.top} by {order}:")
        stats.sort_stats(order).print_stats(args.top)


if __name__ == "__main__":
    harness.run_cli(main)
