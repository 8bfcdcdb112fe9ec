"""Run an experiment's teacher x student x loss x seed grid: locally in parallel, or as a SLURM array.

Each cell is one call of the experiment script, writing
`<results>/<teacher>_<student>_<loss>_seed<seed>.json`. Cells whose JSON exists are skipped, so
after a crash or Ctrl-C the same command finishes only what is missing. Teachers are shared
through `--cache-dir`: the scripts lock each teacher while training it, so two workers never
train the same teacher; the runner also starts one cell per teacher first, so that the teachers
train side by side instead of waiting on each other's lock.

    python analysis/grid.py exp_colored_mnist.py --mechanisms IA --seeds 0 1 --results results/grid
    python analysis/grid.py exp_colored_mnist.py --mechanisms IA --slurm grid.sbatch   # cluster

Arguments after `--` go to every call of the script unchanged (e.g. `-- --steps 150`).
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import LOSSES, UserError, run_cli  # noqa: E402
from analysis.results import CONFIG_RE  # noqa: E402

COST_ORDER = ("jacobian", "contrastive", "kl", "ce")  # slowest first, so the pool ends on short cells


def default_workers(threads: int = 1) -> int:
    """One worker per `threads` usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(threads, 1))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("script", help="the experiment script, e.g. exp_colored_mnist.py")
parser.add_argument("--mechanisms", default=None,
                    help="letters of the experiment's mechanisms, e.g. IA: teachers and students default to every "
                         "configuration where a non-empty subset of them carries the label (I, A, IA)")
parser.add_argument("--teachers", nargs="+", default=None, help="teacher configurations, e.g. I A IA I+rA")
parser.add_argument("--students", nargs="+", default=None, help="student configurations")
parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES, help="losses (default: all four)")
parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default 0 1)")
parser.add_argument("--results", default=None, help="folder of the result JSON files (default results/<script name>)")
parser.add_argument("--cache-dir", default="cache/teachers", help="teacher cache shared by all cells (default cache/teachers)")
parser.add_argument("--workers", type=int, default=None,
                    help=f"parallel cells (default: usable cores / --threads, here {default_workers()})")
parser.add_argument("--threads", type=int, default=1, help="CPU threads per cell (default 1)")
parser.add_argument("--python", default=sys.executable, help="Python that runs the script (default: this one)")
parser.add_argument("--dry-run", action="store_true", help="print the cells' commands and exit")
g = parser.add_argument_group("SLURM (write an array job instead of running)")
g.add_argument("--slurm", metavar="PATH", default=None, help="write an sbatch script with one array task per missing cell")
g.add_argument("--slurm-time", default="02:00:00", help="time limit per task (default 02:00:00)")
g.add_argument("--slurm-mem", default="8G", help="memory per task (default 8G)")
g.add_argument("--slurm-partition", default=None, help="partition (default: the cluster's)")
g.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per task (default 0)")
g.add_argument("--slurm-max-parallel", type=int, default=None, help="run at most this many tasks at once (%%N)")
g.add_argument("--slurm-setup", default=None, help="shell line run before each task, e.g. 'source ~/venv/bin/activate'")


# ----------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    teacher: str
    student: str
    loss: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.teacher}_{self.student}_{self.loss}_seed{self.seed}"


def all_configs(mechanisms: str) -> list[str]:
    """Every configuration in which a non-empty subset of the mechanisms carries the label, the
    others absent: IA -> I, A, IA."""
    letters = list(dict.fromkeys(mechanisms))
    return ["".join(c) for k in range(1, len(letters) + 1) for c in itertools.combinations(letters, k)]


def make_cells(teachers: list[str], students: list[str], losses: list[str], seeds: list[int]) -> list[Cell]:
    """All cells, ordered so that the first cells need distinct teachers (they train in parallel
    and fill the cache), then the slowest losses first."""
    cells = [Cell(t, s, l, seed) for t in teachers for s in students for l in losses for seed in seeds]
    cost = {loss: i for i, loss in enumerate(COST_ORDER)}
    cells.sort(key=lambda c: (cost.get(c.loss, 0), c.student, c.teacher, c.seed))
    first, rest, seen = [], [], set()
    for c in cells:
        (rest if (c.teacher, c.seed) in seen else first).append(c)
        seen.add((c.teacher, c.seed))
    return first + rest


def is_done(path: str) -> bool:
    """A cell is done when its JSON exists and parses (the scripts write atomically; a broken file
    left by something else is run again)."""
    try:
        with open(path) as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def command(args, cell: Cell) -> list[str]:
    out = os.path.join(args.results, f"{cell.name}.json")
    return [args.python, args.script, "--teacher-config", cell.teacher, "--student-config", cell.student,
            "--loss", cell.loss, "--seed", str(cell.seed), "--out", out, "--cache-dir", args.cache_dir, *args.extra]


# ----------------------------------------------------------------------------- local pool

class Pool:
    """Runs cells as subprocesses, at most `workers` at once, each logging to <results>/logs/<cell>.log.

    Each running cell holds an exclusive lock on logs/<cell>.lock (handed to the child process, so
    it lasts as long as the child), so two runners on the same folder never run the same cell.
    """

    def __init__(self, args):
        self.args = args
        self.logs = os.path.join(args.results, "logs")
        self.procs: dict[Cell, subprocess.Popen] = {}
        self.guard = threading.Lock()
        self.stopping = threading.Event()
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    def run(self, cell: Cell) -> tuple[str, float]:
        """('ok' | 'failed:<code>' | 'busy' | 'stopped', seconds)."""
        if self.stopping.is_set():
            return "stopped", 0.0
        lock = open(os.path.join(self.logs, f"{cell.name}.lock"), "w")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "busy", 0.0
            out = os.path.join(self.args.results, f"{cell.name}.json")
            if is_done(out):  # finished by another runner meanwhile
                return "ok", 0.0
            t0 = time.perf_counter()
            with open(os.path.join(self.logs, f"{cell.name}.log"), "w") as log:
                log.write("$ " + shlex.join(command(self.args, cell)) + "\n")
                log.flush()
                with self.guard:
                    if self.stopping.is_set():
                        return "stopped", 0.0
                    proc = subprocess.Popen(command(self.args, cell), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True, pass_fds=(lock.fileno(),))
                    self.procs[cell] = proc
                code = proc.wait()
            with self.guard:
                self.procs.pop(cell, None)
            seconds = time.perf_counter() - t0
            if self.stopping.is_set() and code != 0:
                return "stopped", seconds
            if code == 0 and not is_done(out):
                return "failed:no result", seconds
            return ("ok" if code == 0 else f"failed:{code}"), seconds
        finally:
            lock.close()

    def stop(self) -> None:
        """Ctrl-C: stop starting cells, interrupt the running ones (they write no partial result).
        SIGTERM rather than SIGINT: a runner started in the background passes an ignored SIGINT on."""
        self.stopping.set()
        with self.guard:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()


def last_line(path: str) -> str:
    try:
        with open(path) as f:
            lines = [l.strip() for l in f if l.strip()]
        return lines[-1] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def run_local(args, todo: list[Cell], total: int) -> int:
    os.makedirs(os.path.join(args.results, "logs"), exist_ok=True)
    pool = Pool(args)
    workers = min(args.workers, len(todo))
    print(f"grid: {total} cells, {total - len(todo)} done already, running {len(todo)} with {workers} workers "
          f"x {args.threads} thread(s); logs in {pool.logs}", flush=True)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="cell", disable=None, dynamic_ncols=True)
        say = bar.write
    except ImportError:
        bar, say = None, print
    t0, done, failed, busy = time.perf_counter(), 0, [], []

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    executor = ThreadPoolExecutor(max_workers=workers)
    futures = {executor.submit(pool.run, c): c for c in todo}
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                cell = futures[fut]
                status, seconds = fut.result()
                count = done + len(failed) + len(busy) + 1
                if status == "ok":
                    done += 1
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / count * (len(todo) - count)
                    say(f"[{count}/{len(todo)}] done   {cell.name}  ({seconds:.0f} s; {elapsed / 60:.1f} min elapsed, "
                        f"about {eta / 60:.0f} min left)")
                elif status == "busy":
                    busy.append(cell)
                    say(f"[{count}/{len(todo)}] busy   {cell.name}  (another runner is running it)")
                elif status.startswith("failed"):
                    log = os.path.join(pool.logs, f"{cell.name}.log")
                    failed.append((cell, status.split(":", 1)[1], log))
                    say(f"[{count}/{len(todo)}] FAILED {cell.name}  (exit {status.split(':', 1)[1]}): {last_line(log)}")
                    if status == "failed:2" and done == 0 and len(failed) == 1:
                        # exit 2 is the scripts' "error: ..." for bad input; every cell shares the flags
                        say("stopping: the script rejected its arguments; fix them and rerun the same command")
                        pool.stop()
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        say("interrupted: stopping the running cells (no partial results are written) ...")
        pool.stop()
        for fut in futures:
            fut.cancel()
        executor.shutdown(wait=True)
        if bar is not None:
            bar.close()
        left = sum(not is_done(os.path.join(args.results, f"{c.name}.json")) for c in todo)
        print(f"interrupted after {time.perf_counter() - t0:.0f} s: {left} of {total} cells left; "
              f"rerun the same command to finish them", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    executor.shutdown(wait=True)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    print(f"grid: {done} cells run in {elapsed / 60:.1f} min, {len(failed)} failed, {len(busy)} busy elsewhere; "
          f"results in {args.results}")
    for cell, code, log in failed:
        print(f"  failed {cell.name} (exit {code}): see {log}", file=sys.stderr)
    return 1 if failed or pool.stopping.is_set() else 0


# ----------------------------------------------------------------------------- SLURM

def array_spec(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else str(x))
            start = None
    return ",".join(parts)


def slurm_script(args, cells: list[Cell], todo: list[Cell]) -> str:
    """An sbatch script: array task i runs cell i (numbering over all cells, stable across rewrites);
    only the cells without a result are in --array. A task whose result exists exits at once."""
    index = {c: i for i, c in enumerate(cells)}
    spec = array_spec(sorted(index[c] for c in todo))
    if args.slurm_max_parallel:
        spec += f"%{args.slurm_max_parallel}"
    name = os.path.splitext(os.path.basename(args.script))[0].removeprefix("exp_")
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=kd-{name}",
             f"#SBATCH --array={spec}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={args.threads}",
             f"#SBATCH --mem={args.slurm_mem}",
             f"#SBATCH --time={args.slurm_time}",
             f"#SBATCH --output={os.path.join(args.results, 'logs', 'slurm-%A_%a.log')}"]
    if args.slurm_partition:
        lines.append(f"#SBATCH --partition={args.slurm_partition}")
    if args.slurm_gpus:
        lines.append(f"#SBATCH --gres=gpu:{args.slurm_gpus}")
    lines += ["# Written by analysis/grid.py: one array task per (teacher, student, loss, seed) cell.",
              f"# Submit with: sbatch {args.slurm}",
              "set -euo pipefail",
              f"cd {shlex.quote(os.getcwd())}",
              f"export OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads}"]
    if args.slurm_setup:
        lines.append(args.slurm_setup)
    lines += [f"mkdir -p {shlex.quote(os.path.join(args.results, 'logs'))}",
              'case "${SLURM_ARRAY_TASK_ID:?run this script with sbatch}" in']
    for c in cells:
        out = os.path.join(args.results, f"{c.name}.json")
        lines.append(f"  {index[c]}) out={shlex.quote(out)}; cmd=({shlex.join(command(args, c))}) ;;")
    lines += ['  *) echo "no cell number $SLURM_ARRAY_TASK_ID in this grid" >&2; exit 2 ;;',
              "esac",
              'if [ -s "$out" ]; then echo "$out exists: cell done already"; exit 0; fi',
              'echo "+ ${cmd[*]}"',
              '"${cmd[@]}"',
              ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    args.extra = extra
    if not os.path.isfile(args.script):
        raise UserError(f"experiment script {args.script} not found; pass e.g. exp_colored_mnist.py")
    args.script = os.path.abspath(args.script)
    for flag in ("--teacher-config", "--student-config", "--loss", "--seed", "--out", "--cache-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise UserError(f"{flag} is set by the grid for each cell; remove it from the arguments after --")
    if args.mechanisms is None and (args.teachers is None or args.students is None):
        raise UserError("say which configurations to run: --mechanisms IA, or --teachers ... and --students ...")
    if args.mechanisms is not None and not args.mechanisms.isalpha():
        raise UserError(f"--mechanisms takes letters such as IA or IAB, got '{args.mechanisms}'")
    teachers = args.teachers or all_configs(args.mechanisms.upper())
    students = args.students or all_configs(args.mechanisms.upper())
    for config in teachers + students:
        if not CONFIG_RE.match(config):
            raise UserError(f"'{config}' is not a configuration; write e.g. I, IA, I+rA or rI+A")
    if args.workers is None:
        args.workers = default_workers(args.threads)
    if args.workers < 1 or args.threads < 1:
        raise UserError("--workers and --threads must be at least 1")
    name = os.path.splitext(os.path.basename(args.script))[0]
    args.results = os.path.abspath(args.results or os.path.join(ROOT, "results", name.removeprefix("exp_")))
    args.cache_dir = os.path.abspath(args.cache_dir)
    cells = make_cells(list(dict.fromkeys(teachers)), list(dict.fromkeys(students)), args.losses,
                       list(dict.fromkeys(args.seeds)))
    todo = [c for c in cells if not is_done(os.path.join(args.results, f"{c.name}.json"))]
    if args.dry_run:
        for c in cells:
            print(("todo  " if c in todo else "done  ") + shlex.join(command(args, c)))
        return 0
    if args.slurm:
        if not todo:
            print(f"all {len(cells)} cells have results in {args.results}; no script written")
            return 0
        text = slurm_script(args, cells, todo)
        try:
            os.makedirs(os.path.join(args.results, "logs"), exist_ok=True)  # sbatch does not create --output's folder
            with open(args.slurm, "w") as f:
                f.write(text)
        except OSError as e:
            raise UserError(f"cannot write {args.slurm} ({e.strerror}); choose another --slurm path")
        print(f"wrote {args.slurm}: {len(todo)} array tasks ({len(cells) - len(todo)} cells done already); "
              f"submit with: sbatch {args.slurm}")
        return 0
    if not todo:
        print(f"grid: all {len(cells)} cells have results in {args.results}; nothing to run")
        return 0
    return run_local(args, todo, len(cells))


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
