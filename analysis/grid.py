"""Run an experiment's teacher x student x loss x seed grid: locally in parallel, or as a SLURM
array.

Each cell is one call of the experiment script, writing
`<results>/<teacher>_<student>_<loss>_seed<seed>.json`. Cells whose JSON exists are skipped, so
after a crash or Ctrl-C the same command finishes only what is missing. Teachers are shared
through `--cache-dir`: the scripts lock each teacher while training it, so two workers never
train the same teacher; the runner also starts one cell per teacher first, so that the teachers
train side by side instead of waiting on each other's lock.

Resume rule: an existing JSON counts as done only if it was made with its cell's settings, i.e.
the arguments the script recorded (provenance.argv) are those the grid would pass now, --out and
--cache-dir aside, and from the script's current data (provenance.data_version equals the
script's DATA_VERSION). If any existing file differs (other settings, another data version, an
older file without provenance, an unreadable file) the grid refuses before running anything,
with --slurm and --dry-run too: use another --results folder or delete the file. A result the
script flagged as suspect still counts as done (a rerun would flag it again); figures and tables
leave it out.

    python analysis/grid.py exp_colored_mnist.py --mechanisms IA --seeds 0 1 --results results/grid
    python analysis/grid.py exp_colored_mnist.py --mechanisms IA --slurm grid.sbatch   # cluster

Sweeps: `--sweep FLAG=V1,V2,...` (repeatable) runs every cell once per value of any script flag,
e.g. `--sweep alpha=0.1,0.5,0.9 --sweep temperature=1,4`; each result is named with the values
(`..._seed0_alpha0.5_temperature4.json`) and records them in its arguments, so figures.py can
draw the dose-response of a metric against them (--dose).

    python analysis/grid.py exp_colored_mnist.py --teachers I+rA --students IA \\
        --losses kl jacobian --sweep alpha=0.1,0.5,0.9 --seeds 0 1 2 --results results/sweep_alpha

Arguments after `--` go to every call of the script unchanged (e.g. `-- --steps 150`), except the
flags the grid sets for each cell (--teacher-config, --student-config, --loss, --seed, --out,
--cache-dir, the swept flags), in full or abbreviated.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import LOSSES, UserError  # noqa: E402
from harness import run_cli  # noqa: E402
from analysis.results import is_config  # noqa: E402
from analysis.engine import supports_engine  # noqa: E402

ENGINE = os.path.join(ROOT, "analysis", "engine.py")

# slowest first, so the pool ends on short cells
COST_ORDER = ("jacobian", "contrastive", "kl", "ce")


def default_workers(threads: int = 1) -> int:
    """One worker per `threads` usable cores."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else (os.cpu_count() or 1))
    return max(1, cores // max(threads, 1))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1], allow_abbrev=False)
parser.add_argument("script", help="the experiment script, e.g. exp_colored_mnist.py")
parser.add_argument("--mechanisms", default=None,
                    help="letters of the experiment's mechanisms, e.g. IA: teachers and students "
                         "default to every configuration where a non-empty subset of them carries "
                         "the label (I, A, IA)")
parser.add_argument("--teachers", nargs="+", default=None,
                    help="teacher configurations, e.g. I A IA I+rA")
parser.add_argument("--students", nargs="+", default=None, help="student configurations")
parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES),
                    help="losses (default: all four)")
parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default 0 1)")
parser.add_argument("--sweep", action="append", default=[], metavar="FLAG=V1,V2,...",
                    help="also vary a script flag over these values, e.g. alpha=0.1,0.5,0.9 "
                         "(repeatable: every combination runs)")
parser.add_argument("--results", default=None,
                    help="folder of the result JSON files (default results/<script name>)")
parser.add_argument("--cache-dir", default="cache/teachers",
                    help="teacher cache shared by all cells (default cache/teachers)")
parser.add_argument("--workers", type=int, default=None,
                    help=f"parallel cells (default: usable cores / --threads, "
                         f"here {default_workers()})")
parser.add_argument("--threads", type=int, default=1, help="CPU threads per cell (default 1)")
parser.add_argument("--python", default=sys.executable,
                    help="Python that runs the script (default: this one)")
parser.add_argument("--dry-run", action="store_true", help="print the cells' commands and exit")
parser.add_argument("--per-process", action="store_true",
                    help="run each cell as its own process (the default, for scripts whose main "
                         "takes a memo, is one engine process per worker: analysis/engine.py)")
g = parser.add_argument_group("SLURM (write an array job instead of running)")
g.add_argument("--slurm", metavar="PATH", default=None,
               help="write an sbatch script with one array task per missing cell")
g.add_argument("--slurm-time", default="02:00:00", help="time limit per task (default 02:00:00)")
g.add_argument("--slurm-mem", default="8G", help="memory per task (default 8G)")
g.add_argument("--slurm-partition", default=None, help="partition (default: the cluster's)")
g.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per task (default 0)")
g.add_argument("--slurm-max-parallel", type=int, default=None,
               help="run at most this many tasks at once (%%N)")
g.add_argument("--slurm-setup", default=None,
               help="shell line run before each task, e.g. 'source ~/venv/bin/activate'")


# ----------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    teacher: str
    student: str
    loss: str
    seed: int
    swept: tuple = ()  # ((flag, value), ...) of --sweep, flag without its dashes

    @property
    def name(self) -> str:
        tags = "".join(f"_{flag.replace('-', '_')}{re.sub(r'[^A-Za-z0-9.+-]', '-', value)}"
                       for flag, value in self.swept)
        return f"{self.teacher}_{self.student}_{self.loss}_seed{self.seed}{tags}"


def all_configs(mechanisms: str) -> list[str]:
    """Every configuration in which a non-empty subset of the mechanisms carries the label, the
    others absent: IA -> I, A, IA."""
    letters = list(dict.fromkeys(mechanisms))
    return ["".join(c) for k in range(1, len(letters) + 1)
            for c in itertools.combinations(letters, k)]


def parse_sweeps(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`--sweep` arguments as [(flag without dashes, [values])]; UserError for a malformed one."""
    sweeps = []
    for spec in specs:
        flag, eq, values = spec.partition("=")
        flag = flag.strip().lstrip("-")
        vals = [v.strip() for v in values.split(",")]
        if not eq or not re.fullmatch(r"[a-z][a-z0-9-]*", flag) or not all(vals):
            raise UserError(f"--sweep '{spec}' is not FLAG=V1,V2,...; "
                            "write e.g. --sweep alpha=0.1,0.5,0.9")
        if len(set(vals)) != len(vals):
            raise UserError(f"--sweep '{spec}' repeats a value")
        if flag in [f for f, _ in sweeps]:
            raise UserError(f"--sweep names {flag} twice; "
                            f"give all its values in one --sweep {flag}=...")
        if shadowed_flag(f"--{flag}"):
            raise UserError(f"--sweep {flag}: the grid sets --{flag} for each cell itself; "
                            "use its own options (--teachers, --students, --losses, --seeds, "
                            "--results, --cache-dir)")
        sweeps.append((flag, vals))
    return sweeps


def make_cells(teachers: list[str], students: list[str], losses: list[str], seeds: list[int],
               sweeps: Optional[list[tuple[str, list[str]]]] = None) -> list[Cell]:
    """All cells (every combination of the swept values too), ordered so that the first cells need
    distinct teachers (they train in parallel and fill the cache), then the slowest losses
    first."""
    flags = [flag for flag, _ in sweeps or []]
    combos = [tuple(zip(flags, values))
              for values in itertools.product(*[v for _, v in sweeps or []])]
    cells = [Cell(t, s, l, seed, swept) for t in teachers for s in students for l in losses
             for seed in seeds for swept in combos]
    cost = {loss: i for i, loss in enumerate(COST_ORDER)}
    cells.sort(key=lambda c: (cost.get(c.loss, 0), c.student, c.teacher, c.seed))
    first, rest, seen = [], [], set()
    for c in cells:
        (rest if (c.teacher, c.seed) in seen else first).append(c)
        seen.add((c.teacher, c.seed))
    return first + rest


def is_done(path: str) -> bool:
    """The JSON exists and parses: after a cell's process ends, or when another runner finished it
    meanwhile (the scripts write atomically). Whether it has the cell's settings is checked once,
    before anything runs, by `check_existing`."""
    try:
        with open(path) as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def cell_args(args, cell: Cell) -> list[str]:
    """The arguments of one call of the script (after its path), as the script sees them in
    sys.argv[1:]."""
    out = os.path.join(args.results, f"{cell.name}.json")
    swept = [a for flag, value in cell.swept for a in (f"--{flag}", value)]
    return ["--teacher-config", cell.teacher, "--student-config", cell.student, "--loss", cell.loss,
            "--seed", str(cell.seed), "--out", out, "--cache-dir", args.cache_dir, *swept,
            *args.extra]


def command(args, cell: Cell) -> list[str]:
    return [args.python, args.script, *cell_args(args, cell)]


# flags the grid sets for each cell: arguments after -- must not repeat or abbreviate them
RESERVED = tuple(a for a in cell_args(argparse.Namespace(results="", cache_dir="", extra=[]),
                                      Cell("I", "I", "kl", 0))
                 if a.startswith("--"))
# where the result and the teachers go: they do not change the numbers
WHERE_ONLY = ("--out", "--cache-dir")


def shadowed_flag(arg: str) -> Optional[str]:
    """The grid's flag that `arg` would set in the script (equal, `--flag=value`, or an
    abbreviation, which argparse accepts by default), or None."""
    if not arg.startswith("--") or arg == "--":
        return None
    name = arg.split("=", 1)[0]
    hits = [f for f in RESERVED if f.startswith(name)]
    return " or ".join(hits) if hits else None


def settings_of(argv: list[str]) -> list[str]:
    """`argv` without --out and --cache-dir and their values (`--out X` or `--out=X`)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in WHERE_ONLY:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in WHERE_ONLY)):
            kept.append(a)
    return kept


def _is_flag(arg: str) -> bool:
    if not arg.startswith("-") or arg == "-":
        return False
    try:
        float(arg)  # a negative number is a value
        return False
    except ValueError:
        return True


def _options(argv: list[str]) -> dict[str, list[tuple]]:
    """{flag: [values of each occurrence]}, `--flag=value` read as `--flag value`: argparse gives
    both lists the same settings when only the order of distinct flags differs."""
    opts: dict[str, list[tuple]] = {}
    flag, values = "", []
    for a in [*argv, "--"]:  # the sentinel closes the last flag
        if _is_flag(a):
            if flag or values:
                opts.setdefault(flag, []).append(tuple(values))
            name, eq, value = a.partition("=")
            flag, values = (name, [value]) if eq and name.startswith("--") else (a, [])
        else:
            values.append(a)
    return opts


def _show(flag: str, occurrences: list[tuple]) -> str:
    return " ".join(" ".join([flag, *values]).strip() for values in occurrences)


def argv_difference(stored: list[str], wanted: list[str]) -> str:
    """What differs between the settings of two argument lists (--out and --cache-dir aside);
    '' when nothing."""
    a, b = _options(settings_of(stored)), _options(settings_of(wanted))
    parts = []
    for flag in dict.fromkeys([*a, *b]):
        if flag not in b:
            parts.append(f"it has {_show(flag, a[flag])}, which the grid does not pass")
        elif flag not in a:
            parts.append(f"it lacks {_show(flag, b[flag])}")
        elif a[flag] != b[flag]:
            parts.append(f"it has {_show(flag, a[flag])}, the grid passes {_show(flag, b[flag])}")
    return "; ".join(parts)


def script_data_version(script: str) -> Optional[int]:
    """The script's DATA_VERSION (a module-level integer), read without importing the script: the
    version of its data that a result must come from to count as done. None when it has none."""
    try:
        with open(script) as f:
            tree = ast.parse(f.read())
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "DATA_VERSION" for t in node.targets)
                and isinstance(node.value, ast.Constant) and type(node.value.value) is int):
            return node.value.value
    return None


def existing_mismatch(path: str, wanted: list[str], data_version: Optional[int] = None) -> str:
    """Why the existing result at `path` does not count as done for a cell whose script arguments
    are `wanted` and whose script is at `data_version` (None: not checked); '' when it does."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot be read ({e.__class__.__name__})"
    except ValueError:
        return "is not valid JSON"
    provenance = data.get("provenance") if isinstance(data, dict) else None
    argv = provenance.get("argv") if isinstance(provenance, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        return ("records no provenance.argv (an older file, or not a result), "
                "so its settings are unknown")
    found = provenance.get("data_version")
    if data_version is not None and found != data_version:
        made = (f"was made with data version {found}" if isinstance(found, int)
                else "records no provenance.data_version")
        return f"{made}, and the script's data is now at version {data_version}"
    diff = argv_difference(argv, wanted)
    return f"was made with other settings ({diff})" if diff else ""


def check_existing(args, cells: list[Cell]) -> list[Cell]:
    """The cells still to run. A cell whose JSON exists is done only if it was made with the cell's
    settings and the script's data version (flagged results too: a rerun would flag them again);
    any other existing file is a UserError before anything runs, since skipping it would mix
    settings or data in one folder."""
    todo, bad = [], []
    version = script_data_version(args.script)
    for c in cells:
        path = os.path.join(args.results, f"{c.name}.json")
        if not os.path.lexists(path):
            todo.append(c)
            continue
        why = existing_mismatch(path, cell_args(args, c), version)
        if why:
            bad.append((path, why))
    if bad:
        path, why = bad[0]
        more = (f" ({len(bad) - 1} more of this grid's files do not match either)"
                if len(bad) > 1 else "")
        raise UserError(f"{path} exists but {why}{more}; it would count as done: "
                        f"use another --results folder or delete the file{'s' if more else ''}")
    return todo


# ----------------------------------------------------------------------------- local pool

class Pool:
    """Runs cells, at most `workers` at once, each logging to <results>/logs/<cell>.log: in one
    engine process per worker (analysis/engine.py: data, teachers and ce students shared between
    the cells it runs) or, with --per-process, each cell as its own subprocess.

    Each running cell holds an exclusive lock on logs/<cell>.lock (per process: handed to the
    child, so it lasts as long as the child), so two runners on the same folder never run the
    same cell.
    """

    def __init__(self, args):
        self.args = args
        self.logs = os.path.join(args.results, "logs")
        self.procs: dict = {}  # the running subprocesses: a cell's, or a worker thread's engine
        self.engines = threading.local()
        self.guard = threading.Lock()
        self.stopping = threading.Event()
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                        MKL_NUM_THREADS=str(args.threads))

    def _in_engine(self, cell: Cell, log_path: str) -> int:
        """Run the cell in this worker thread's engine process (started on first use, and again
        after one died); its exit code, or a negative signal number when the engine died."""
        proc = getattr(self.engines, "proc", None)
        with self.guard:
            if self.stopping.is_set():
                return -signal.SIGTERM
            if proc is None or proc.poll() is not None:
                with open(os.path.join(self.logs, "engine.log"), "a") as err:
                    proc = subprocess.Popen(
                        [self.args.python, ENGINE, self.args.script, "--threads",
                         str(self.args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=err, env=self.env, text=True, start_new_session=True)
                self.engines.proc = proc
            self.procs[threading.get_ident()] = proc
        try:
            proc.stdin.write(json.dumps({"argv": cell_args(self.args, cell), "log": log_path})
                             + "\n")
            proc.stdin.flush()
            reply = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            reply = ""
        if reply:
            return json.loads(reply)["code"]
        code = proc.wait()
        self.engines.proc = None
        return code if code else 1

    def close(self) -> None:
        """End the engine processes (they exit when their input closes)."""
        with self.guard:
            procs = list(self.procs.values())
        for p in procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)

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
            log_path = os.path.join(self.logs, f"{cell.name}.log")
            with open(log_path, "w") as log:
                log.write(("$ " if self.args.per_process else "$ (in an engine process) ")
                          + shlex.join(command(self.args, cell)) + "\n")
                log.flush()
                if not self.args.per_process:
                    log.close()
                    code = self._in_engine(cell, log_path)
                else:
                    with self.guard:
                        if self.stopping.is_set():
                            return "stopped", 0.0
                        proc = subprocess.Popen(command(self.args, cell), stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True, pass_fds=(lock.fileno(),))
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
        SIGTERM rather than SIGINT: a runner started in the background passes an ignored SIGINT
        on."""
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
    how = "processes, one per cell" if args.per_process else "engine processes"
    print(f"grid: {total} cells, {total - len(todo)} done already, running {len(todo)} with "
          f"{workers} workers x {args.threads} thread(s) ({how}); logs in {pool.logs}",
          flush=True)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="cell", disable=None, dynamic_ncols=True)
        say = bar.write
    except ImportError:
        bar, say = None, print
    t0, done, failed, busy = time.perf_counter(), 0, [], []

    # Ctrl-C and SIGTERM only set a flag that the loop checks: an exception raised at an arbitrary
    # point could leave a lock of concurrent.futures held, and the pool would then never shut down.
    stop_requested = threading.Event()
    handled = [signal.SIGTERM] + (
        [signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_requested.set())
                for sig in handled}
    executor = ThreadPoolExecutor(max_workers=workers)
    futures = {executor.submit(pool.run, c): c for c in todo}
    try:
        pending = set(futures)
        while pending:
            if stop_requested.is_set():
                raise KeyboardInterrupt
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                cell = futures[fut]
                status, seconds = fut.result()
                count = done + len(failed) + len(busy) + 1
                if status == "ok":
                    done += 1
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / count * (len(todo) - count)
                    say(f"[{count}/{len(todo)}] done   {cell.name}  ({seconds:.0f} s; "
                        f"{elapsed / 60:.1f} min elapsed, about {eta / 60:.0f} min left)")
                elif status == "busy":
                    busy.append(cell)
                    say(f"[{count}/{len(todo)}] busy   {cell.name}  (another runner is running it)")
                elif status.startswith("failed"):
                    log = os.path.join(pool.logs, f"{cell.name}.log")
                    failed.append((cell, status.split(":", 1)[1], log))
                    say(f"[{count}/{len(todo)}] FAILED {cell.name}  "
                        f"(exit {status.split(':', 1)[1]}): {last_line(log)}")
                    if status == "failed:2" and done == 0 and len(failed) == 1:
                        # exit 2 is the scripts' "error: ..." for bad input; every cell shares the
                        # flags
                        say("stopping: the script rejected its arguments; "
                            "fix them and rerun the same command")
                        pool.stop()
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        say("interrupted: stopping the running cells (no partial results are written) ...")
        pool.stop()
        for fut in futures:
            fut.cancel()
        executor.shutdown(wait=True)
        pool.close()
        if bar is not None:
            bar.close()
        left = sum(not is_done(os.path.join(args.results, f"{c.name}.json")) for c in todo)
        print(f"interrupted after {time.perf_counter() - t0:.0f} s: {left} of {total} cells left; "
              f"rerun the same command to finish them", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    executor.shutdown(wait=True)
    pool.close()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    print(f"grid: {done} cells run in {elapsed / 60:.1f} min, {len(failed)} failed, "
          f"{len(busy)} busy elsewhere; results in {args.results}")
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
    """An sbatch script: array task i runs cell i (numbering over all cells, stable across
    rewrites); only the cells without a result are in --array. A task whose result exists exits at
    once."""
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
    lines += [("# Written by analysis/grid.py: "
               "one array task per (teacher, student, loss, seed) cell."),
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
        lines.append(f"  {index[c]}) out={shlex.quote(out)}; "
                     f"cmd=({shlex.join(command(args, c))}) ;;")
    lines += ['  *) echo "no cell number $SLURM_ARRAY_TASK_ID in this grid" >&2; exit 2 ;;',
              "esac",
              'if [ -s "$out" ]; then echo "$out exists: cell done already"; exit 0; fi',
              'echo "+ ${cmd[*]}"',
              '"${cmd[@]}"',
              ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

TIME_RE = re.compile(r"^(?:(\d+)-(\d{1,2})(?::(\d{1,2})(?::(\d{1,2}))?)?"   # D-HH[:MM[:SS]]
                     r"|(\d+)(?::(\d{1,2})(?::(\d{1,2}))?)?)$")                # MM, MM:SS, HH:MM:SS
MEM_RE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)


def slurm_minutes(text: str) -> Optional[float]:
    """Minutes of a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), None if
    malformed."""
    m = TIME_RE.match(text)
    if not m:
        return None
    d, dh, dm, ds, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if d is not None:
        if dh > 23 or (dm or 0) > 59 or (ds or 0) > 59:
            return None
        return d * 1440 + dh * 60 + (dm or 0) + (ds or 0) / 60
    if c is not None:  # HH:MM:SS
        return None if b > 59 or c > 59 else a * 60 + b + c / 60
    if b is not None:  # MM:SS
        return None if b > 59 else a + b / 60
    return float(a)


def check_options(args) -> None:
    """Reject bad values of the grid's own flags before anything runs or is written."""
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if os.sep in args.python or (os.altsep and os.altsep in args.python):
        if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
            raise UserError(f"--python {args.python} is not an executable file; "
                            f"pass e.g. --python {sys.executable}")
    elif shutil.which(args.python) is None:
        raise UserError(f"--python {args.python} is not found on PATH; "
                        f"pass its full path, e.g. {sys.executable}")
    minutes = slurm_minutes(args.slurm_time)
    if minutes is None:
        raise UserError(f"--slurm-time '{args.slurm_time}' is not a SLURM time; "
                        "write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 02:00:00")
    if minutes <= 0:
        raise UserError(f"--slurm-time must be positive, got '{args.slurm_time}'")
    mem = MEM_RE.match(args.slurm_mem)
    if not mem or int(mem.group(1)) <= 0:
        raise UserError(f"--slurm-mem '{args.slurm_mem}' is not a positive amount; "
                        "write e.g. 8G, 500M or 8000")
    args.slurm_mem = args.slurm_mem.upper()
    if args.slurm_gpus < 0:
        raise UserError(f"--slurm-gpus must be 0 or more, got {args.slurm_gpus}")
    if args.slurm_max_parallel is not None and args.slurm_max_parallel < 1:
        raise UserError(f"--slurm-max-parallel must be at least 1, got {args.slurm_max_parallel}")
    for a in args.extra:
        flag = shadowed_flag(a)
        if flag:
            raise UserError(f"'{a}' after -- would set the script's {flag}, which the grid sets "
                            "for each cell; remove it (use the grid's own options, e.g. --seeds, "
                            "--results, --cache-dir)")
    args.sweeps = parse_sweeps(args.sweep)
    for flag, _ in args.sweeps:
        clash = [a for a in args.extra if a == f"--{flag}" or a.startswith(f"--{flag}=")]
        if clash:
            raise UserError(f"'{clash[0]}' after -- sets a flag that --sweep {flag} varies; "
                            "remove one of them")


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    args.extra = extra
    if not os.path.isfile(args.script):
        raise UserError(f"experiment script {args.script} not found; "
                        "pass e.g. exp_colored_mnist.py")
    args.script = os.path.abspath(args.script)
    args.per_process = args.per_process or not supports_engine(args.script)
    check_options(args)
    if args.mechanisms is None and (args.teachers is None or args.students is None):
        raise UserError("say which configurations to run: --mechanisms IA, "
                        "or --teachers ... and --students ...")
    if args.mechanisms is not None and not args.mechanisms.isalpha():
        raise UserError(f"--mechanisms takes letters such as IA or IAB, got '{args.mechanisms}'")
    teachers = args.teachers or all_configs(args.mechanisms.upper())
    students = args.students or all_configs(args.mechanisms.upper())
    for config in teachers + students:
        if not is_config(config):
            raise UserError(f"'{config}' is not a configuration; write e.g. I, IA, I+rA or rI+A")
    if args.workers is None:
        args.workers = default_workers(args.threads)
    name = os.path.splitext(os.path.basename(args.script))[0]
    args.results = os.path.abspath(args.results
                                   or os.path.join(ROOT, "results", name.removeprefix("exp_")))
    args.cache_dir = os.path.abspath(args.cache_dir)
    cells = make_cells(list(dict.fromkeys(teachers)), list(dict.fromkeys(students)), args.losses,
                       list(dict.fromkeys(args.seeds)), args.sweeps)
    todo = check_existing(args, cells)
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
            # sbatch does not create --output's folder
            os.makedirs(os.path.join(args.results, "logs"), exist_ok=True)
            with open(args.slurm, "w") as f:
                f.write(text)
        except OSError as e:
            raise UserError(f"cannot write {args.slurm} ({e.strerror}); "
                            "choose another --slurm path")
        print(f"wrote {args.slurm}: {len(todo)} array tasks "
              f"({len(cells) - len(todo)} cells done already); submit with: sbatch {args.slurm}")
        return 0
    if not todo:
        print(f"grid: all {len(cells)} cells have results in {args.results}; nothing to run")
        return 0
    return run_local(args, todo, len(cells))


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
