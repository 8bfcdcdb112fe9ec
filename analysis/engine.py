"""The grid engine: many cells of a grid in one process, each cell exactly as its own run.

`analysis/grid.py` starts one engine per worker and hands it cells one at a time. Each cell calls
the experiment script's `main(argv, memo)`, the function `python exp_*.py ARGS` runs, with the
same arguments, so a cell writes the numbers its command line would. What the cells of one
process share lives in `memo` and is computed once: the images and every data set drawn (each
from its own stream, so sharing changes nothing), each teacher (loaded or trained once, checked
once), its logits on the test sets, and a student whose loss never reads the teacher (ce), which
is trained once per training set and evaluated against each teacher.

    python analysis/engine.py exp_cifar_patch.py --threads 1   # reads cells from stdin

Protocol (for grid.py): one JSON object per line on stdin, {"argv": [...], "log": PATH}; the
cell's output goes to PATH (appended); one line back on stdout per cell, {"code": N} with the exit
code the script would have had (0 ok, 2 bad input or a guard, 1 an unexpected error).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import sys
import traceback
from types import ModuleType
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def supports_engine(script: str) -> bool:
    """Whether the script's `main` takes a `memo` (read without importing the script)."""
    try:
        with open(script) as f:
            tree = ast.parse(f.read())
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "main"
               and [a.arg for a in node.args.args][:2] == ["argv", "memo"] for node in tree.body)


def load_script(script: str) -> ModuleType:
    """The experiment script as a module (its folder first on sys.path, as when run directly)."""
    folder = os.path.dirname(os.path.abspath(script))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "engine_" + os.path.splitext(os.path.basename(script))[0]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cell(module: ModuleType, argv: list[str], log_path: str, memo: Optional[dict]) -> int:
    """One cell: module.main(argv, memo), its output appended to `log_path`; the exit code the
    script would have had. A failed cell leaves no result (the scripts write theirs last,
    atomically) and the memo as it was before the cell, apart from what completed."""
    from common import UserError
    with open(log_path, "a", buffering=1) as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            module.main(argv, memo)
            return 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except SystemExit as e:  # argparse: usage and error already printed
            return e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            return 1


def serve(script: str, threads: int) -> None:
    """The worker loop of grid.py: cells from stdin, exit codes to stdout, one memo throughout."""
    import torch
    torch.set_num_threads(threads)
    module, memo = load_script(script), {}
    reply = sys.stdout
    for line in sys.stdin:
        job = json.loads(line)
        code = run_cell(module, job["argv"], job["log"], memo)
        reply.write(json.dumps({"code": code}) + "\n")
        reply.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("script", help="the experiment script, e.g. exp_cifar_patch.py")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    if not supports_engine(args.script):
        print(f"error: {args.script} has no main(argv, memo) for the engine; run its cells with "
              f"analysis/grid.py --per-process", file=sys.stderr)
        sys.exit(2)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    serve(args.script, args.threads)
