"""How fast the Dominoes grid runs: one process per cell (how the grid ran before the engine)
against the engine (analysis/engine.py, one process for many cells), over the same fixed slice
of the grid, one after the other in one run, each alone at one worker and one thread.

    python analysis/bench_grid.py                  # the slice below, at the README grid's flags
    python analysis/bench_grid.py --smoke          # seconds: checks that it runs (CI)

For each path it prints the wall time, the student steps of the slice's cells per second (a ce
cell counts its steps whether the engine trained its student or reused it), and where a cell's
time goes: the training loop (every student step), the teacher's targets on the training set
(the Jacobian rows that loss matches), and everything else (process start, data, loading the
teacher, its test-set logits, evaluation, writing). The slice's teachers are trained once before
either path is timed. Also (--batched) the time of one KL step per student for a stack of
students trained as one batched model (torch.func: the convolutions run as grouped ones) against
the same students stepped one after another.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import harness  # noqa: E402

# The README's reduced Dominoes grid (docs/dominoes.md), without --channels-last: each path adds
# its own layout flag below.
GRID_FLAGS = ["--dominoes", "--clutter", "0", "--n-train", "1000", "--n-test", "200",
              "--steps", "400", "--warmup", "40", "--lr", "0.01", "--eval-every", "400",
              "--teacher-steps", "1000", "--teacher-optimizer", "adam", "--teacher-lr", "5e-3",
              "--jacobian-estimator", "projection"]
PATHS = {  # name: (grid.py options, flags after --)
    "per-process": (["--per-process"], []),
    "per-process, channels-last": (["--per-process"], ["--channels-last"]),
    "engine, channels-last": ([], ["--channels-last"]),
}
DEFAULT_PATHS = ["per-process", "engine, channels-last"]

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("--teachers", nargs="+", default=["I", "IB"],
                    help="teacher configurations of the slice (default I IB)")
parser.add_argument("--students", nargs="+", default=["IB"],
                    help="student configurations of the slice (default IB)")
parser.add_argument("--losses", nargs="+", default=["ce", "kl", "jacobian", "contrastive"],
                    choices=list(common.LOSSES), help="losses of the slice (default all four)")
parser.add_argument("--paths", nargs="+", default=DEFAULT_PATHS, choices=list(PATHS),
                    help="which paths to time, the first is the baseline (default: "
                         "'per-process' 'engine, channels-last')")
parser.add_argument("--batched", type=int, default=7,
                    help="students stacked in the batched-model measurement (0: skip; default 7)")
parser.add_argument("--out", default="results/bench/grid.json",
                    help="JSON of the measurements (default results/bench/grid.json)")
parser.add_argument("--smoke", action="store_true",
                    help="tiny data and 20 steps, one teacher and one student: checks it runs")


def grid_command(script_flags: list[str], options: list[str], results: str,
                 cache: str, args) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "analysis", "grid.py"),
            os.path.join(ROOT, "exp_cifar_patch.py"), "--teachers", *args.teachers,
            "--students", *args.students, "--losses", *args.losses, "--seeds", "0",
            "--workers", "1", "--threads", "1", "--results", results, "--cache-dir", cache,
            *options, "--", *script_flags]


def run_grid(cmd: list[str]) -> float:
    """Wall seconds of one grid run; a UserError if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise common.UserError(f"the grid failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}; "
                               f"command: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def split_time(results: str) -> dict:
    """Seconds in the training loop and in the teacher's targets, summed over the cells that
    trained a student (a reused ce student spent neither), and the cells' student steps."""
    train = targets = steps = 0.0
    cells = sorted(glob.glob(os.path.join(results, "*.json")))
    for path in cells:
        with open(path) as f:
            result = json.load(f)
        timing = result["timing"]
        steps += result["settings"]["student"]["steps"]
        if not timing.get("student_reused"):
            train += timing["student_train_s"]
            targets += timing["student_prepare_s"]
    return {"cells": len(cells), "steps": int(steps), "train_s": train, "targets_s": targets}


def batched_step_ms(students: int, steps: int, image: tuple, batch: int = 64) -> dict:
    """Milliseconds of one KL step per student: one after another (default layout and channels
    last) and as one batched model (torch.func.stack_module_state + vmap)."""
    import torch
    from torch.func import functional_call, stack_module_state, vmap
    torch.manual_seed(0)
    x, target = torch.rand(batch, *image), torch.randn(batch, 10)

    def build():
        return [common.SmallCNN(3, 10, 8) for _ in range(students)]

    def sequential(channels_last: bool) -> float:
        models = [common.in_format(m, channels_last) for m in build()]
        opts = [torch.optim.Adam(m.parameters(), 1e-3) for m in models]
        for step in range(steps + 2):
            if step == 2:
                t0 = time.perf_counter()
            for m, opt in zip(models, opts):
                loss = common.kd_kl(m(x), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return (time.perf_counter() - t0) / steps / students * 1e3

    def stacked() -> float:
        models = build()
        params, buffers = stack_module_state(models)
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        base = copy.deepcopy(models[0]).to("meta")
        opt = torch.optim.Adam(params.values(), 1e-3)
        forward = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, None))
        for step in range(steps + 2):
            if step == 2:
                t0 = time.perf_counter()
            out = forward(params, buffers, x)
            loss = sum(common.kd_kl(out[i], target) for i in range(students))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / steps / students * 1e3

    return {"students": students, "batch": batch, "image": list(image),
            "sequential_ms": sequential(False), "sequential_channels_last_ms": sequential(True),
            "batched_ms": stacked()}


def main():
    args = parser.parse_args()
    if args.batched < 0:
        raise common.UserError(f"--batched must be 0 or more, got {args.batched}")
    flags = list(GRID_FLAGS)
    if args.smoke:
        flags = ["--dominoes", "--smoke"]
        args.teachers, args.students, args.losses = args.teachers[:1], args.students[:1], \
            args.losses[:2]
        args.batched = min(args.batched, 2)
    harness.prepare_output(args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        # the slice's teachers, for both layouts, trained before anything is timed
        for layout in sorted({tuple(PATHS[p][1]) for p in args.paths}):
            run_grid(grid_command(flags + list(layout) + ["--steps", "1"], [],
                                  os.path.join(tmp, f"warm{len(layout)}"), cache, args))
        for name in args.paths:
            options, layout = PATHS[name]
            results = os.path.join(tmp, name.replace(" ", "").replace(",", "_"))
            print(f"{name}: running the slice ...", flush=True)
            wall = run_grid(grid_command(flags + layout, options, results, cache, args))
            split = split_time(results)
            other = wall - split["train_s"] - split["targets_s"]
            rows.append({"path": name, "wall_s": wall, **split, "other_s": other,
                         "steps_per_s": split["steps"] / wall})
    base = rows[0]["steps_per_s"] if rows else 1.0
    print(f"\nslice: teachers {' '.join(args.teachers)} x students {' '.join(args.students)} x "
          f"{' '.join(args.losses)}, seed 0; {shlex.join(flags)}; one worker, one thread")
    print(f"{'path':<28}{'cells':>6}{'wall s':>9}{'steps/s':>9}{'x first':>8}"
          f"{'train':>8}{'targets':>9}{'other':>8}")
    for r in rows:
        print(f"{r['path']:<28}{r['cells']:>6}{r['wall_s']:>9.1f}{r['steps_per_s']:>9.1f}"
              f"{r['steps_per_s'] / base:>8.2f}{r['train_s'] / r['wall_s']:>8.0%}"
              f"{r['targets_s'] / r['wall_s']:>9.0%}{r['other_s'] / r['wall_s']:>8.0%}")
    batched = None
    if args.batched:
        import torch
        torch.set_num_threads(1)
        batched = batched_step_ms(args.batched, 3 if args.smoke else 30, (3, 64, 32))
        print(f"\none KL step per student, {batched['students']} students of the grid's size, "
              f"batch {batched['batch']}, one thread: one after another "
              f"{batched['sequential_ms']:.1f} ms, channels last "
              f"{batched['sequential_channels_last_ms']:.1f} ms, as one batched model "
              f"{batched['batched_ms']:.1f} ms")
    harness.write_result(args.out, {"env": harness.environment(harness.resolve_device("cpu")),
                                    "args": vars(args), "grid_flags": flags, "paths": rows,
                                    "batched": batched})
    print(f"result: {args.out}")


if __name__ == "__main__":
    harness.run_cli(main)
