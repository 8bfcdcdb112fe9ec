"""The machinery around a run, which the science in `common.py` does not need: the command line
(derived from the settings dataclasses) and its checks, devices, provenance, the teacher cache,
the guards that stop a meaningless run, result files, and the offline digit data two experiments
read.

It is a separate file so that `common.py` reads as the method alone. What is here makes a run
safe to interrupt, to repeat and to trust: Ctrl-C and SIGTERM end it with one line, a teacher is
cached only whole and only once it passed its check, results are written atomically as strict
JSON with the settings and the code version that made them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (ARCHS, JACOBIAN_METHODS, LOSSES, TensorSet, UserError, evaluate_student,
                    features_of, freeze, in_format, predict, teacher_metrics, train_teacher,
                    with_alpha)

TEST_SEED = 12345  # test and validation sets are drawn with this seed: the same for every --seed
MAX_SEED = 2 ** 31 - 2  # numpy takes seeds below 2**32; the student uses seed + 1
TEACHER_ATTEMPTS = 3  # trainings of a teacher that stays below its floor, each from a new start


# ----------------------------------------------------------------------------- settings
# Each setting is declared once, as a field of TeacherSettings or DistillSettings: its default,
# its help text, its check and, where it is not --NAME (student) or --teacher-NAME (teacher), its
# flag. The command line is derived from these fields (add_settings_flags); the result JSON stores
# them; common.py's training loops read them; each script's settings block sets its own values.

def setting(default, help: str, *, check: Optional[str] = None, choices: tuple = (),
            flag: Optional[str] = None, per_loss: bool = False, bookkeeping: bool = False):
    """A settings field. `check`: a key of CHECKS (None passes). `flag`: '' for none. `per_loss`:
    only some losses read it. `bookkeeping`: it changes how a run computes, not what it trains."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices,
                                            "flag": flag, "per_loss": per_loss,
                                            "bookkeeping": bookkeeping})


CHECKS = {"positive": (lambda v: math.isfinite(v) and v > 0, "a positive finite number"),
          "count": (lambda v: v >= 1, "at least 1"),
          "nonnegative": (lambda v: v >= 0, "at least 0"),
          "fraction": (lambda v: 0 <= v <= 1, "in [0, 1]")}


@dataclass(frozen=True)
class TeacherSettings:
    """How a teacher is trained: cross-entropy, SGD with Nesterov momentum or Adam (no momentum or
    weight decay), cosine decay from `lr` to `lr * min_lr_frac`; all of it keys the cache."""
    arch: str = setting("cnn", "architecture of the teacher, and of the student unless "
                        "--student-arch", choices=ARCHS, flag="--arch")
    width: int = setting(32, "channels of the teacher's first block", check="count")
    steps: int = setting(1500, "teacher training steps", check="count")
    batch_size: int = setting(64, "teacher batch size", check="count")
    lr: float = setting(0.05, "teacher's peak learning rate", check="positive")
    optimizer: str = setting("sgd", "sgd (Nesterov momentum) or adam", choices=("sgd", "adam"))
    momentum: float = setting(0.9, "SGD momentum", check="fraction")
    weight_decay: float = setting(5e-4, "SGD weight decay", check="fraction")
    min_lr_frac: float = setting(0.01, "final / peak learning rate", check="fraction")
    shift: int = setting(0, "shift each training image by up to this many pixels, a fresh random "
                         "shift each step (zeros fill in)", check="nonnegative")
    seed: int = setting(0, "initialisation and batch order (set by --seed)", flag="")


def loss_setting(default, help: str, **kw):
    """A setting only some losses read (runs of different losses may differ in it)."""
    return setting(default, help, per_loss=True, **kw)


@dataclass(frozen=True)
class DistillSettings:
    """How a student is distilled with one of LOSSES. Adam (no weight decay) with cosine decay from
    `lr` to `lr * min_lr_frac`: the losses differ in scale by orders of magnitude, Adam's step size
    does not. The student is built from `arch`, `width` and `seed + 1`; its batches and random
    projections come from `seed`."""
    loss: str = setting("kl", "ce: labels only (no teacher); kl: KL to the teacher's softened "
                        "outputs; jacobian: (1-alpha) KL + alpha Jacobian matching; contrastive: "
                        "(1-alpha) KL + alpha InfoNCE", choices=tuple(LOSSES))
    arch: Optional[str] = setting(None, "the student's architecture, if not the teacher's",
                                  choices=ARCHS, flag="--student-arch")
    width: int = setting(16, "channels of the student's first block", check="count",
                         flag="--student-width")
    steps: int = setting(600, "student training steps", check="count")
    batch_size: int = setting(64, "student batch size", check="count")
    lr: float = setting(1e-3, "student's peak learning rate (Adam)", check="positive")
    min_lr_frac: float = setting(0.01, "final / peak learning rate", check="fraction",
                                 flag="--min-lr-frac")
    warmup: int = setting(0, "steps of linear learning-rate warm-up before the cosine decay "
                          "(a small student at a high lr can die in its first steps without)",
                          check="nonnegative")
    alpha: Optional[float] = loss_setting(None, "weight of the Jacobian or contrastive term",
                                          check="fraction")
    temperature: float = loss_setting(4.0, "KL distillation temperature T", check="positive")
    t2: bool = loss_setting(True, "plain KL times Hinton's factor T^2")
    mixture_t2: bool = loss_setting(False, "a mixture's KL term times T^2 too (off: it would "
                                    "weigh KL T^2 times more than alpha says)")
    jacobian_method: str = setting("auto", "how exact Jacobians are computed (auto: the fastest "
                                   "measured)", choices=JACOBIAN_METHODS, bookkeeping=True)
    jacobian_estimator: str = loss_setting("exact", "exact: all classes (or --top-k); "
                                           "projection: --projections random projections of "
                                           "the logits", choices=("exact", "projection"))
    projections: int = loss_setting(1, "K for --jacobian-estimator projection", check="count")
    top_k: Optional[int] = loss_setting(None, "match only the teacher's top-k classes' rows",
                                        check="count")
    contrastive_temperature: float = loss_setting(0.1, "InfoNCE temperature", check="positive")
    contrastive_dim: int = loss_setting(128, "dimension of the contrastive heads", check="count")
    contrastive_negatives: str = loss_setting(
        "batch", "InfoNCE negatives: the batch's other samples; only those of the same label; or "
        "the batch and up to --contrastive-bank other training samples (teacher features)",
        choices=("batch", "same-class", "dataset"))
    contrastive_bank: int = loss_setting(4096, "extra negatives of --contrastive-negatives "
                                         "dataset", check="count")
    eval_every: Optional[int] = setting(None, "steps between two points of the curves "
                                        "(default steps/10)", check="count", bookkeeping=True)
    seed: int = setting(0, "batch order and projections (set by --seed)", flag="")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so one seed on one machine gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- errors, devices

def run_cli(main: Callable[[], object]) -> None:
    """Run `main`, turning UserError, Ctrl-C and SIGTERM (a grid runner stopping its cells, a
    cluster's time limit) into one clear line and a non-zero exit."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no result was written", file=sys.stderr)
        sys.exit(130)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present, else CPU. Only CPU and CUDA are supported (the Jacobian
    methods and timings were checked on those)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu"
                                                                 and device.index):
        raise UserError(f"unsupported --device '{name}'; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA but no GPU is visible; "
                            f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are "
                            f"visible")
    return device


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (a bare assert)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- provenance

def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: record that rather than fail the run
        return None


def git_state() -> dict:
    """The commit of the code that ran and whether the work tree had uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*a):
        return subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)
    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):  # no git, or not a clone
        return {"commit": None, "dirty": None}


def environment(device: torch.device, argv: Optional[list[str]] = None) -> dict:
    """What ran the experiment, stored in every result: code, arguments (default: this process's),
    library versions, hardware."""
    env = {**git_state(), "argv": sys.argv[1:] if argv is None else list(argv),
           "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__,
           "scikit-learn": _version("sklearn"), "torchvision": _version("torchvision"),
           "device": str(device), "platform": platform.platform(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def digest(*tensors: Optional[torch.Tensor]) -> str:
    """sha256 of the tensors' shapes, types and bytes: what identifies a data set or weights."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)} {t.dtype};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def remember(memo: Optional[dict], key: tuple, compute: Callable[[], object]):
    """compute(), or its value stored in `memo` under `key` (a grid engine keeps one memo for all
    the cells it runs in one process; a single run passes None and computes)."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def digest_of(memo: Optional[dict], *tensors: Optional[torch.Tensor]) -> str:
    """digest(*tensors), computed once per tensor object in a memo (which keeps the tensors alive,
    so that their ids are not reused)."""
    if memo is None:
        return digest(*tensors)
    key = ("digest",) + tuple(id(t) for t in tensors)
    if key not in memo or any(a is not b for a, b in zip(memo[key][0], tensors)):
        memo[key] = (tensors, digest(*tensors))
    return memo[key][1]


# ----------------------------------------------------------------------------- data

def stream(seed: int, name: str) -> torch.Generator:
    """The random stream of one data set, from a seed and the set's name ("train/IA",
    "test/I+rA", "validation/IA", ...): changing one set, or the list of sets, leaves every other
    set bit-identical."""
    key = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


class Data(NamedTuple):
    """What a run reads: the teacher's and the student's training sets; validation sets of their
    configurations, drawn from images no training or test set uses (the teacher's floor, the
    student's fit and the choice of alpha read only these); the counterfactual test sets."""
    teacher_train: TensorSet
    student_train: TensorSet
    teacher_validation: TensorSet
    student_validation: TensorSet
    test_sets: dict[str, TensorSet]


def hold_out(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Split the last `n` images off a training split as validation images, which no run trains
    on: (train_x, train_y, validation_x, validation_y)."""
    if not 0 < n < len(y):
        raise UserError(f"cannot hold out {n} of {len(y)} training images for validation")
    return x[:-n], y[:-n], x[-n:], y[-n:]


# ----------------------------------------------------------------------------- digit data

def sklearn_digits(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1,797 handwritten digits that ship with scikit-learn (offline), resized to size x size
    in [0, 1], split 70/30 the same way for every seed: (train_x, train_y, test_x, test_y)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:len(y) * 3 // 10], perm[len(y) * 3 // 10:]
    return x[train], y[train], x[test], y[test]


def torchvision_digits(name: str, root: str, download: bool) -> tuple[torch.Tensor, ...]:
    """torchvision's MNIST or FashionMNIST from `root` as [N, 28, 28] in [0, 1] with labels
    (train_x, train_y, test_x, test_y); anything unreadable or out of range is a UserError."""
    from torchvision import datasets
    expected = f"expected {os.path.join(root, name, 'raw')}/*-ubyte[.gz], or add --download"
    try:
        train = getattr(datasets, name)(root, train=True, download=download)
        test = getattr(datasets, name)(root, train=False, download=download)
    except Exception as e:  # RuntimeError for missing files; AssertionError, ... for corrupt ones
        raise UserError(f"cannot read {name} from {root}: {first_line(e)} ({expected})")
    out = []
    for split in (train, test):
        x, y = split.data, split.targets
        if len(x) == 0 or len(x) != len(y) or x.dim() != 3 or y.min() < 0 or y.max() >= 10:
            raise UserError(f"{name} in {root} holds {len(x)} images with {len(y)} labels of "
                            f"shape {tuple(x.shape)} (labels must be 0..9); replace the files "
                            f"with the originals ({expected})")
        out += [x.float() / 255, y.long()]
    return tuple(out)


# ----------------------------------------------------------------------------- command line

class Flag(NamedTuple):
    """A settings field as a command-line flag."""
    field: dataclasses.Field
    flag: str   # e.g. --teacher-lr
    dest: str   # its name in the parsed arguments and the JSON's args, e.g. teacher_lr


def settings_flags(cls: type) -> list[Flag]:
    """The flags of a settings dataclass: each field's declared flag, else --NAME for the
    student's and --teacher-NAME for the teacher's; fields declared without a flag are left out."""
    prefix = "--teacher-" if cls is TeacherSettings else "--"
    out = []
    for f in dataclasses.fields(cls):
        flag = f.metadata["flag"]
        if flag != "":
            flag = flag or prefix + f.name.replace("_", "-")
            out.append(Flag(f, flag, flag[2:].replace("-", "_")))
    return out


def _flag_type(cls: type, name: str) -> type:
    """int, float, str or bool from the field's annotation (Optional[X] -> X)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def bookkeeping_args() -> set[str]:
    """The arguments that say where or how a run was executed, not what was trained: runs that
    differ only in these (and the seed) are repeats of the same cell."""
    run = {"seed", "out", "cache_dir", "retrain_teacher", "device", "smoke", "download",
           "data_root", "teacher_config", "student_config", "loss", "channels_last",
           "save_weights"}
    return run | {f.dest for cls in (TeacherSettings, DistillSettings)
                  for f in settings_flags(cls) if f.field.metadata["bookkeeping"]}


def per_loss_args() -> set[str]:
    """The arguments only some losses read (alpha, temperature, ...)."""
    return {f.dest for f in settings_flags(DistillSettings) if f.field.metadata["per_loss"]}


def experiment_parser(doc: str, epilog: str, teacher_config: str, student_config: str):
    """An experiment's parser (its docstring's first paragraph as the description, no abbreviated
    flags) and its "data" group, which already holds the two configurations; the script adds its
    own data flags to the group."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=epilog,
                                     allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--teacher-config", default=teacher_config,
                      help=f"mechanisms of the teacher's training data (default {teacher_config})")
    data.add_argument("--student-config", default=student_config,
                      help=f"mechanisms of the distillation data (default {student_config})")
    return parser, data


def add_settings_flags(parser: argparse.ArgumentParser, teacher: TeacherSettings,
                       student: DistillSettings, alphas: dict[str, float]) -> None:
    """One flag per settings field, with the script's settings block as defaults (`alphas`: the
    script's ALPHA, the default --alpha of each mixture loss), then the flags of the run itself."""
    for title, block in (("distillation (the student)", student), ("teacher", teacher)):
        group = parser.add_argument_group(title)
        for f, flag, dest in settings_flags(type(block)):
            default, kind = getattr(block, f.name), _flag_type(type(block), f.name)
            shown = ", ".join(f"{k} {a:g}" for k, a in alphas.items()) if f.name == "alpha" \
                else default
            options = {"default": default, "dest": dest, "help": f.metadata["help"]
                       + ("" if shown is None else f" (default {shown})")}
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction
            else:
                options["type"] = kind
                if f.metadata["choices"]:
                    options["choices"] = f.metadata["choices"]
            group.add_argument(flag, **options)
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of data rendering, teacher and student (default 0)")
    g.add_argument("--teacher-min-acc", type=float, default=None,
                   help="stop unless the teacher reaches this accuracy on validation data of its "
                        "own configuration (default: halfway between chance and 1; 0 with "
                        "--smoke)")
    g.add_argument("--student-min-fit", type=float, default=None,
                   help="exclude the result from analysis when the student's accuracy on "
                        "validation data of its own configuration is below this, whatever its "
                        "loss (default: halfway between chance and 1; 0 with --smoke)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--channels-last", action="store_true",
                   help="convolutions in channels-last memory layout: small-CNN KL steps 1.4-2 "
                        "times faster on a CPU, numbers that differ from the default layout's in "
                        "the last bits (teachers are cached per layout)")
    g.add_argument("--out", default=None, help="result JSON path (default "
                   "results/<experiment>/<teacher>_<student>_<loss>_seed<seed>.json)")
    g.add_argument("--cache-dir", default="cache/teachers",
                   help="where trained teachers are kept (default cache/teachers)")
    g.add_argument("--retrain-teacher", action="store_true",
                   help="ignore and overwrite the cached teacher")
    g.add_argument("--teacher-checkpoint", default=None, metavar="PATH",
                   help="use this teacher instead of training one: a state dict of the teacher's "
                        "architecture (--arch, --teacher-width), as torch.save(model.state_dict(), "
                        "PATH) writes it or a result's .teacher.pt; checked on validation data "
                        "like a trained teacher")
    g.add_argument("--save-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="save teacher's and student's weights beside the result, their sha256 in "
                        "it (default; --no-save-weights for large grids of large models)")
    g.add_argument("--smoke", action="store_true",
                   help="a tiny run in seconds, for CI and for checking the setup")


def check_value(value, check: str, flag: str):
    """`value` when it passes common.CHECKS[check] (or is None); else a UserError naming `flag`."""
    ok, expected = CHECKS[check]
    if value is not None and not ok(value):
        raise UserError(f"{flag} must be {expected}, got {value}")
    return value


def parse_common(parser: argparse.ArgumentParser, argv: Optional[list[str]],
                 alphas: dict[str, float]) -> argparse.Namespace:
    """Parse the flags and check the shared ones. A mixture loss without --alpha takes its weight
    from `alphas` (the script's ALPHA); ce and kl have none. --smoke caps the training lengths
    (20 student and 40 teacher steps, curves every 10); each script then shrinks its data."""
    args = parser.parse_args(argv)
    for cls in (TeacherSettings, DistillSettings):
        for f, flag, dest in settings_flags(cls):
            if f.metadata["check"]:
                check_value(getattr(args, dest), f.metadata["check"], flag)
    if args.alpha is not None and LOSSES[args.loss].alpha is None:
        raise UserError(f"--alpha weighs the term a jacobian or contrastive loss adds to KL; "
                        f"--loss {args.loss} has none")
    args.alpha = with_alpha(DistillSettings(loss=args.loss, alpha=args.alpha), alphas).alpha
    if args.smoke:
        args.steps, args.teacher_steps = min(args.steps, 20), min(args.teacher_steps, 40)
        args.eval_every = args.eval_every or 10
    args.eval_every = args.eval_every or max(args.steps // 10, 1)
    check_value(args.student_min_fit, "fraction", "--student-min-fit")
    check_value(args.teacher_min_acc, "fraction", "--teacher-min-acc")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    for arch in {args.arch, args.student_arch or args.arch}:
        if args.jacobian_method == "explicit" and arch not in ("cnn", "lenet"):
            raise UserError(f"--jacobian-method explicit needs --arch cnn or lenet, not {arch}; "
                            f"use loop or batched")
    return args


def settings_from_flags(args: argparse.Namespace, teacher: TeacherSettings,
                        student: DistillSettings) -> tuple[TeacherSettings, DistillSettings]:
    """The script's settings blocks with the flags applied, the seed set, and the student's
    architecture the teacher's unless it has its own: (teacher's, student's)."""
    def apply(block):
        values = {f.name: getattr(args, dest) for f, _, dest in settings_flags(type(block))}
        return dataclasses.replace(block, **values, seed=args.seed)
    teacher, student = apply(teacher), apply(student)
    return teacher, dataclasses.replace(student, arch=student.arch or teacher.arch)


class Run(NamedTuple):
    """What a run was started with: everything the teacher, the student and the result need."""
    experiment: str
    data_version: int
    args: argparse.Namespace
    teacher: TeacherSettings
    student: DistillSettings
    device: torch.device
    out: str
    started: float
    argv: Optional[list[str]] = None  # the run's arguments, when not this process's


def start(experiment: str, data_version: int, args: argparse.Namespace,
          teacher: TeacherSettings, student: DistillSettings,
          argv: Optional[list[str]] = None) -> Run:
    """Before any training is spent: the settings (the script's blocks with the flags applied,
    printed), the device, a writable result path and teacher cache."""
    teacher, student = settings_from_flags(args, teacher, student)
    device = resolve_device(args.device)
    out = prepare_output(args.out or os.path.join(
        "results", experiment,
        f"{args.teacher_config}_{args.student_config}_{args.loss}_seed{args.seed}.json"))
    prepare_cache(args.cache_dir)
    seed_everything(args.seed)
    for name, block in (("teacher", teacher), ("student", student)):
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(block).items()))
    return Run(experiment, data_version, args, teacher, student, device, out, time.perf_counter(),
               argv)


# ----------------------------------------------------------------------------- the teacher

def prepare_cache(cache_dir: str) -> bool:
    """Check the teacher cache folder before any training; returns whether it can be written.
    A read-only cache is still usable for the teachers it already holds."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UserError(f"--cache-dir {cache_dir} is a file, not a folder; choose another "
                        f"--cache-dir")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --cache-dir {cache_dir} ({e.strerror}); choose another "
                        f"--cache-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-test-"):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def cache_lock(cache_dir: str, name: str):
    """An exclusive lock on one teacher of the cache, so two processes never train or write it at
    once; yields whether the cache can be written (a read-only cache takes no lock)."""
    writable = prepare_cache(cache_dir)
    if not writable:
        yield False
        return
    with open(os.path.join(cache_dir, f"{name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_cached(path: str, key: dict, model: nn.Module, fix: str) -> Optional[nn.Module]:
    """`model` with the weights cached at `path`, None when there are none; a file that is
    corrupt, of another format or of another key is a UserError with the `fix`."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or "key" not in saved:
            raise ValueError("written by an older version")
        if saved["key"] == key:
            model.load_state_dict(saved["state_dict"])
    except Exception as e:  # corrupt file, wrong shapes, an older format, ...
        raise UserError(f"teacher cache {path} is corrupt or does not fit the model "
                        f"({type(e).__name__}: {first_line(e)}); {fix}")
    if saved["key"] != key:
        raise UserError(f"teacher cache {path} was trained with another configuration; {fix}")
    return model


def save_cached(path: str, key: dict, model: nn.Module, log: Callable[[str], None]) -> bool:
    """Cache a teacher atomically (complete or absent, never half-written) with its key, and a
    copy of the key for people; a full disk costs only the cache (the run goes on)."""
    try:
        _atomic_save(lambda f: torch.save({"key": key, "state_dict": model.state_dict()}, f), path)
    except OSError as e:
        log(f"warning: the teacher could not be cached in {os.path.dirname(path)} ({e.strerror}); "
            f"the run goes on")
        return False
    with contextlib.suppress(OSError):  # the .pt is complete without it
        _atomic_save(lambda f: f.write(json.dumps(key, indent=1, sort_keys=True).encode()),
                     path[:-3] + ".json")
    return True


def floor_of(value: Optional[float], smoke: bool, num_classes: int) -> float:
    """The accuracy a teacher (--teacher-min-acc) or a student (--student-min-fit) must reach on
    validation data of its own configuration: the flag's value, or halfway between chance and 1
    (0 with --smoke, which checks the setup only)."""
    if value is not None:
        return value
    chance = 1.0 / num_classes
    return 0.0 if smoke else chance + (1 - chance) / 2


def teacher_check(model: nn.Module, validation: TensorSet, floor: float, config: str,
                  log: Callable[[str], None]) -> dict:
    """The teacher's accuracy on validation data of its own configuration against the floor, and
    whether its weights and outputs are finite (a NaN made by the very last update is not caught
    by the loss check, which runs before it)."""
    logits = predict(model, validation.x).cpu()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not bad and not torch.isfinite(logits).all():
        bad = ["its outputs"]
    acc = (logits.argmax(1) == validation.y.cpu()).float().mean().item()
    log(f"teacher: accuracy {acc:.3f} on validation {config} (floor {floor:.3f})")
    return {"acc": acc, "floor": floor, "chance": 1 / logits.shape[1], "non_finite": bad,
            "ok": not bad and acc >= floor}


class Teacher(NamedTuple):
    model: nn.Module
    record: dict  # for the result: cache key, whether it was cached, its check, attempts, time


def train_until_it_learns(run: Run, build: Callable[[], nn.Module], model: nn.Module,
                          train: TensorSet, validation: TensorSet, floor: float,
                          log: Callable[[str], None]) -> tuple[nn.Module, dict, int]:
    """Train the teacher; one that fails its check is trained again from a new initialisation and
    batch order, up to TEACHER_ATTEMPTS times. The first attempt is the plain recipe, so a
    teacher that learns at once is the same as without restarts. Returns (teacher, the last
    attempt's check, attempts)."""
    settings = run.teacher
    for attempt in range(TEACHER_ATTEMPTS):
        if attempt:
            log(f"teacher: below its floor after attempt {attempt}; training again from a new "
                f"initialisation")
            torch.manual_seed(settings.seed + 1000 * attempt)
            model = build()
        teacher = train_teacher(model, train, dataclasses.replace(
            settings, seed=settings.seed + 1000 * attempt), run.device, run.args.channels_last)
        check = teacher_check(teacher, validation, floor, run.args.teacher_config, log)
        if check["ok"]:
            break
    return teacher, check, attempt + 1


def get_teacher(run: Run, build: Callable[[], nn.Module], train: TensorSet,
                validation: TensorSet, log: Callable[[str], None] = print,
                memo: Optional[dict] = None) -> Teacher:
    """Load the cached teacher or train it on `train`, then one check on `validation` (validation
    data of its own configuration): a teacher below its floor or with non-finite weights stops
    the run before anything is distilled or cached.

    The cache key is built from what determines the teacher: the digest of its training data and
    of its initial weights (which the architecture and the build decide), its settings, the
    experiment, the data version, the device type and the memory layout. In a grid engine
    (`memo`) a teacher loaded or trained once stays in memory with its check for later cells."""
    args = run.args
    torch.manual_seed(run.teacher.seed)
    model = build()
    if args.teacher_checkpoint:
        return checkpoint_teacher(run, model, validation, log, memo)
    key = {"experiment": run.experiment, "data_version": run.data_version,
           "settings": dataclasses.asdict(run.teacher), "device": run.device.type,
           "data": digest_of(memo, *train), "init": digest(*model.state_dict().values()),
           **({"channels_last": True} if args.channels_last else {})}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"{name}.pt")
    floor = floor_of(args.teacher_min_acc, args.smoke, model.classifier.out_features)
    kept = None if memo is None or args.retrain_teacher else memo.get(("teacher", name, floor))
    if kept is not None:
        log(f"teacher: loaded from cache {path} (kept in memory since an earlier cell)")
        teacher, check = kept
        return Teacher(teacher, {"cache_key": name, "cached": True, "validation_acc": check["acc"],
                                 "floor": floor, "attempts": 0, "train_s": 0.0})
    started = time.perf_counter()
    with cache_lock(args.cache_dir, name) as writable:
        if args.retrain_teacher:
            teacher = None
        else:
            teacher = load_cached(path, key, model, f"delete {path} to retrain it, or pass "
                                                    f"--retrain-teacher")
        if teacher is not None:
            log(f"teacher: loaded from cache {path}")
            teacher, attempts = freeze(in_format(teacher.to(run.device), args.channels_last)), 0
            check = teacher_check(teacher, validation, floor, args.teacher_config, log)
        elif not writable:
            raise UserError(f"--cache-dir {args.cache_dir} is read-only and does not hold this "
                            f"teacher ({name}.pt); choose a writable --cache-dir")
        else:
            log("teacher: training (cached afterwards)")
            teacher, check, attempts = train_until_it_learns(run, build, model, train, validation,
                                                             floor, log)
        fix = ("It came from the cache: pass --retrain-teacher." if not attempts else
               "Train it differently (--teacher-lr, --teacher-steps, --teacher-optimizer) and run "
               "again.")
        if check["non_finite"]:
            raise UserError(f"the teacher has non-finite values in "
                            f"{', '.join(check['non_finite'][:3])}; no result was written. {fix}")
        if not check["ok"]:
            raise UserError(f"the teacher reaches only {check['acc']:.3f} on validation "
                            f"{args.teacher_config} data, below the floor {floor:.3f} (chance "
                            f"{check['chance']:.3f}); distilling it would mean nothing and "
                            f"nothing was cached or written. {fix} (--teacher-min-acc sets the "
                            f"floor)")
        if attempts:
            save_cached(path, key, teacher, log)
    if memo is not None:
        memo[("teacher", name, floor)] = (teacher, check)
    return Teacher(teacher, {"cache_key": name, "cached": not attempts,
                             "validation_acc": check["acc"], "floor": floor, "attempts": attempts,
                             "train_s": time.perf_counter() - started if attempts else 0.0})


def load_checkpoint(path: str, model: nn.Module) -> nn.Module:
    """`model` with the state dict saved at `path`; a UserError naming the first problem (no such
    file, not a state dict, other layers or shapes, another number of classes)."""
    fix = ("save the teacher with torch.save(model.state_dict(), PATH) from a model built as "
           "this experiment builds it (--arch, --teacher-width)")
    if not os.path.isfile(path):
        raise UserError(f"--teacher-checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled objects
        raise UserError(f"--teacher-checkpoint {path} cannot be read as a state dict "
                        f"({type(e).__name__}); {fix}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"--teacher-checkpoint {path} holds a {type(state).__name__}, not a state "
                        f"dict of tensors; {fix}")
    expected = model.state_dict()
    out_features = model.classifier.out_features
    got = state.get("classifier.weight")
    if got is not None and got.ndim == 2 and got.shape[0] != out_features:
        raise UserError(f"--teacher-checkpoint {path} has {got.shape[0]} classes; this "
                        f"experiment has {out_features}")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = (f"lacks {', '.join(missing[:3])}" if missing
                else f"has layers the teacher lacks ({', '.join(extra[:3])})")
        raise UserError(f"--teacher-checkpoint {path} does not fit the teacher "
                        f"({type(model).__name__}): it {what}; {fix}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise UserError(f"--teacher-checkpoint {path}: {k} has shape "
                            f"{tuple(state[k].shape)}, the teacher's has {tuple(v.shape)}; {fix}")
    model.load_state_dict(state)
    return model


def checkpoint_teacher(run: Run, model: nn.Module, validation: TensorSet,
                       log: Callable[[str], None], memo: Optional[dict] = None) -> Teacher:
    """The teacher of --teacher-checkpoint, checked on validation data like a trained one (its
    floor applies); its record names the file and its sha256. It is not cached."""
    args = run.args
    path = os.path.abspath(args.teacher_checkpoint)
    sha = file_sha256(path) if os.path.isfile(path) else ""
    floor = floor_of(args.teacher_min_acc, args.smoke, model.classifier.out_features)
    kept = None if memo is None else memo.get(("checkpoint", sha, floor))
    if kept is None:
        teacher = freeze(in_format(load_checkpoint(path, model).to(run.device),
                                   args.channels_last))
        log(f"teacher: loaded from --teacher-checkpoint {path}")
        check = teacher_check(teacher, validation, floor, args.teacher_config, log)
        if check["non_finite"] or not check["ok"]:
            problem = (f"non-finite values in {', '.join(check['non_finite'][:3])}"
                       if check["non_finite"] else
                       f"accuracy {check['acc']:.3f} on validation {args.teacher_config} data, "
                       f"below the floor {floor:.3f} (chance {check['chance']:.3f})")
            raise UserError(f"the teacher of --teacher-checkpoint {path} has {problem}; "
                            f"distilling it would mean nothing and nothing was written "
                            f"(--teacher-min-acc sets the floor)")
        if memo is not None:
            memo[("checkpoint", sha, floor)] = (teacher, check)
    else:
        teacher, check = kept
    return Teacher(teacher, {"cache_key": f"checkpoint-{sha[:16]}", "cached": False,
                             "checkpoint": path, "checkpoint_sha256": sha,
                             "validation_acc": check["acc"], "floor": floor, "attempts": 0,
                             "train_s": 0.0})


# ----------------------------------------------------------------------------- the student

def distill(run: Run, teacher: Teacher, student: nn.Module, data: Data,
            memo: Optional[dict] = None) -> dict:
    """common.distill of `student` from `teacher` on the student's training set. In a grid engine
    (`memo`) the teacher's logits on the test sets are computed once per teacher, and a student
    whose loss never reads the teacher (ce) is trained once per training set, settings and
    initialisation, then evaluated against each teacher: the same numbers as a run of its own."""
    channels_last = run.args.channels_last
    if memo is None:
        return common.distill(student, teacher.model, data.student_train, run.student, run.device,
                              data.test_sets, channels_last=channels_last)
    tests = sorted(data.test_sets.items())
    tests_key = digest_of(memo, *[t for _, s in tests for t in s])
    model = in_format(teacher.model.to(run.device), channels_last)
    teacher_logits = remember(memo, ("test logits", teacher.record["cache_key"], tests_key),
                              lambda: {name: predict(model, s.x).cpu() for name, s in tests})
    if LOSSES[run.student.loss].needs:
        return common.distill(student, teacher.model, data.student_train, run.student, run.device,
                              data.test_sets, teacher_logits=teacher_logits,
                              channels_last=channels_last)
    key = ("student", digest_of(memo, *data.student_train), tests_key, channels_last,
           json.dumps(dataclasses.asdict(run.student), sort_keys=True),
           digest(*student.state_dict().values()))
    if key not in memo:
        distilled = common.distill(student, teacher.model, data.student_train, run.student,
                                   run.device, data.test_sets, teacher_logits=teacher_logits,
                                   keep_logits=True, channels_last=channels_last)
        memo[key] = ({k: v.detach().clone() for k, v in student.state_dict().items()}, distilled)
        return distilled
    print("student: its loss never reads the teacher; the same student was trained for an "
          "earlier cell and is evaluated against this teacher")
    weights, distilled = memo[key]
    student.load_state_dict(weights)
    in_format(student.to(run.device), channels_last)
    return {**distilled, "teacher_logits": teacher_logits,
            "curves": common.curves_against(distilled["curves"], distilled["curve_logits"],
                                            data.test_sets, teacher_logits),
            "timing": {**distilled["timing"], "reused": True}}


# ----------------------------------------------------------------------------- the result

def student_fit(run: Run, student_logits: torch.Tensor, teacher: nn.Module,
                validation: TensorSet) -> dict:
    """The one fit rule, the same for every loss: the student's accuracy on validation data of its
    own configuration against a floor between chance and 1. Below it the run is excluded from
    analysis: a student that never fit its data says nothing about what it learned from the
    teacher. Agreement with the teacher, and the teacher's own accuracy on these data (a student
    that follows a teacher below the floor there cannot fit), are recorded beside it, not used."""
    s_pred, t_pred = student_logits.argmax(1).cpu(), predict(teacher, validation.x).argmax(1).cpu()
    y = validation.y.cpu()
    acc = (s_pred == y).float().mean().item()
    floor = floor_of(run.args.student_min_fit, run.args.smoke, student_logits.shape[1])
    return {"config": run.args.student_config, "acc": acc,
            "agreement": (s_pred == t_pred).float().mean().item(),
            "teacher_acc": (t_pred == y).float().mean().item(), "floor": floor, "ok": acc >= floor}


def weigh_groups(metrics: dict, shares: dict[str, float]) -> dict:
    """`metrics` with avg_acc: the accuracy per group weighted by the groups' shares of the
    student's training set (the average group_DRO, JTT and DFR report), over the groups the set
    has; mean_group_acc stays the unweighted mean."""
    if "groups" in metrics:
        weights = {g: shares.get(g, 0.0) for g in metrics["groups"]}
        total = sum(weights.values())
        metrics["avg_acc"] = (sum(w * metrics["groups"][g] for g, w in weights.items()) / total
                              if total else float("nan"))
    return metrics


def evaluate(teacher: nn.Module, student: nn.Module, test_sets: dict[str, TensorSet],
             teacher_logits: dict[str, torch.Tensor], shares: dict[str, float],
             cues: Optional[dict] = None, memo: Optional[dict] = None,
             teacher_key: str = "") -> tuple[dict, dict]:
    """Every metric of teacher and student on every test set: (teacher's, student's). What a
    result's `eval` holds; analysis/recompute.py recomputes it from saved weights. In a grid
    engine (`memo`) the teacher's side of the comparisons (its features and where it looks) is
    computed once per teacher (`teacher_key`, its cache key) and test sets."""
    teacher_eval = {name: weigh_groups(teacher_metrics(teacher_logits[name], s.y.cpu(),
                                                       None if s.group is None else s.group.cpu()),
                                       shares)
                    for name, s in test_sets.items()}

    def view(model: nn.Module) -> tuple[dict, Optional[dict]]:
        return ({name: features_of(model, s.x) for name, s in test_sets.items()},
                common.look_of(model, test_sets, cues) if cues else None)

    if memo is None:
        teacher_features, teacher_look = view(teacher)
    else:
        tests_key = digest_of(memo, *[t for _, s in sorted(test_sets.items()) for t in s])
        teacher_features, teacher_look = remember(
            memo, ("teacher view", teacher_key, tests_key, tuple(sorted(cues or ()))),
            lambda: view(teacher))
    student_features, student_look = view(student)
    representation = common.representation_metrics(student_features, teacher_features)
    student_eval = {name: {**weigh_groups(m, shares), **representation[name]} for name, m in
                    evaluate_student(student, test_sets, teacher_logits).items()}
    if cues:
        for name, look in common.saliency_metrics(student_look, teacher_look).items():
            student_eval[name].update(cue_share=look["student"], saliency_cosine=look["cosine"])
            teacher_eval[name]["cue_share"] = look["teacher"]
    return teacher_eval, student_eval


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(out: str, teacher: nn.Module, student: nn.Module, data: Data) -> dict:
    """Teacher's and student's state dicts beside the result (<result>.teacher.pt and
    <result>.student.pt, written atomically before the result), and what rebuilds each model:
    architecture, width, input and class count, the file (relative to the result) and its
    sha256, which analysis/recompute.py checks before it loads the file."""
    stem = out[:-5] if out.endswith(".json") else out
    shape = tuple(data.student_train.x.shape[1:])
    record = {}
    for role, model in (("teacher", teacher), ("student", student)):
        path = f"{stem}.{role}.pt"
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        _atomic_save(lambda f: torch.save(state, f), path)
        record[role] = {"file": os.path.basename(path), "sha256": file_sha256(path),
                        "arch": _arch_of(model), "width": _width_of(model),
                        "in_channels": shape[0], "input_size": list(shape[1:]),
                        "num_classes": model.classifier.out_features}
    return record


def _arch_of(model: nn.Module) -> str:
    if isinstance(model, common.TorchvisionNet):
        return model.arch
    return {common.SmallCNN: "cnn", common.LeNet: "lenet"}[type(model)]


def _width_of(model: nn.Module) -> int:
    """The `width` that build_model gives this model: its first convolution's channels."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.out_channels


def load_weights(result_path: str, role: str, record: dict) -> nn.Module:
    """The teacher or student saved beside a result, rebuilt and loaded, in eval mode; a
    UserError when its file is missing or its sha256 is not the one the result recorded."""
    path = os.path.join(os.path.dirname(os.path.abspath(result_path)), record["file"])
    if not os.path.exists(path):
        raise UserError(f"the {role}'s weights {path} are missing; run the result's command again "
                        f"(the result was written with --save-weights)")
    found = file_sha256(path)
    if found != record["sha256"]:
        raise UserError(f"{path} has sha256 {found[:12]}..., the result recorded "
                        f"{record['sha256'][:12]}...; it is not the file this result was made "
                        f"with, so nothing was recomputed")
    model = common.build_model(record["arch"], record["in_channels"], record["num_classes"],
                               record["width"], tuple(record["input_size"]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return freeze(model)


def finish(run: Run, teacher: Teacher, student: nn.Module, distilled: dict, data: Data,
           cues: Optional[dict] = None, memo: Optional[dict] = None, **extra) -> dict:
    """Check the student, evaluate teacher and student on every test set, then print and write the
    result JSON: the flags as parsed (`args`), the settings they made (the teacher's and the
    student's dataclass), provenance, metrics, curves, timing and the script's `extra` entries
    (e.g. notes). The teacher's logits on the sets come from `distilled` (common.distill).
    `cues` (name -> per-sample share of a saliency batch, common.region_share or chroma_share):
    where teacher and student look on every test set. `memo`: a grid engine's (see `evaluate`)."""
    test_sets = data.test_sets
    student_logits = predict(student, data.student_validation.x)
    bad = [n for n, p in student.named_parameters() if not torch.isfinite(p).all()]
    if not bad and not torch.isfinite(student_logits).all():
        bad = ["its outputs"]
    if bad:
        raise UserError(f"the student has non-finite values in {', '.join(bad[:3])}; no result "
                        f"was written. Lower --lr (or --alpha) and run again; the teacher is "
                        f"fine and stays cached.")
    teacher_logits = distilled["teacher_logits"]
    fit = student_fit(run, student_logits, teacher.model, data.student_validation)
    exclusions = [] if fit["ok"] else [
        f"student_fit: the student's accuracy on validation {fit['config']} is only "
        f"{fit['acc']:.3f} (floor {fit['floor']:.3f})"
        + (f"; its teacher's is {fit['teacher_acc']:.3f} there" if fit["teacher_acc"] < fit["floor"]
           else "")]
    groups = data.student_train.group
    shares = {} if groups is None else {
        str(g): (groups == g).float().mean().item() for g in torch.unique(groups).tolist()}
    record = dict(teacher.record)
    train_s = record.pop("train_s")
    teacher_eval, student_eval = evaluate(teacher.model, student, test_sets, teacher_logits,
                                          shares, cues, memo, record["cache_key"])
    weights = save_weights(run.out, teacher.model, student, data) if run.args.save_weights \
        else None
    result = {
        "experiment": run.experiment,
        "args": vars(run.args),
        "settings": {"teacher": dataclasses.asdict(run.teacher),
                     "student": dataclasses.asdict(run.student)},
        "exclusions": exclusions,
        "provenance": {**environment(run.device, run.argv), "data_version": run.data_version,
                       "test_seed": TEST_SEED, "teacher_cache_key": record["cache_key"]},
        "teacher": {**record, "eval": teacher_eval},
        "student": {"fit": fit, "eval": student_eval,
                    "curves": distilled["curves"]},
        "test_sizes": {name: len(s.y) for name, s in test_sets.items()},
        "validation_sizes": {"teacher": len(data.teacher_validation.y),
                             "student": len(data.student_validation.y)},
        **({"group_shares": shares} if shares else {}),
        **({"weights": weights} if weights else {}),
        "timing": {"teacher_train_s": train_s,
                   **{f"student_{k}": v for k, v in distilled["timing"].items()},
                   "total_s": time.perf_counter() - run.started},
        **extra,
    }
    print_table(result)
    write_result(run.out, result)
    print(f"result: {run.out}")
    return result


# ----------------------------------------------------------------------------- output

def _atomic_save(write: Callable, path: str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written
    file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def prepare_output(path: str) -> str:
    """Create the result's folder and check it can be written, before any training is spent."""
    if path.endswith(os.sep) or os.path.isdir(path):
        raise UserError(f"--out {path} is a folder; name the result file, e.g. "
                        f"{os.path.join(path, 'result.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write results to {folder} ({e.strerror}); choose another --out")
    return path


def strict_json(value):
    """`value` with every non-finite float replaced by None, so the JSON is strict (no bare NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_result(path: str, result: dict) -> None:
    """Write one run's result as strict JSON, atomically."""
    text = json.dumps(strict_json(result), indent=1, allow_nan=False)
    try:
        _atomic_save(lambda f: f.write(text.encode()), path)
    except OSError as e:
        raise UserError(f"cannot write the result to {path} ({e.strerror}); nothing was written")


def print_table(result: dict, log: Callable[[str], None] = print) -> None:
    """Test set x (teacher acc, student acc, KL(T||S), agreement); for the sets with groups, the
    weighted average and worst-group accuracies and the student's accuracy per group; then the
    result's notes and exclusions."""
    teacher_eval, student_eval = result["teacher"]["eval"], result["student"]["eval"]
    log(f"{'test set':<12}{'teacher acc':>12}{'student acc':>12}{'KL(T||S)':>10}{'agreement':>11}"
        f"{'kappa':>7}{'CKA':>7}")
    for name, m in student_eval.items():
        log(f"{name:<12}{teacher_eval[name]['acc']:>12.3f}{m['acc']:>12.3f}{m['kl']:>10.3f}"
            f"{m['agreement']:>11.3f}{m['kappa']:>7.3f}{m['cka']:>7.3f}")
    cues = list(next(iter(student_eval.values())).get("cue_share", {}))
    if cues:  # where they look: each cue's share of the saliency, teacher / student
        log(f"\n{'test set':<12}" + "".join(f"{'cue ' + c + ' T / S':>16}" for c in cues)
            + f"{'saliency cosine':>17}")
        for name, m in student_eval.items():
            log(f"{name:<12}" + "".join(
                f"{teacher_eval[name]['cue_share'][c]:>9.3f} / {m['cue_share'][c]:.3f}"
                for c in cues) + f"{m['saliency_cosine']:>17.3f}")
    grouped = {name: m for name, m in student_eval.items() if "groups" in m}
    if grouped:  # avg: weighted by the student's training set's group shares
        group_names, nan = result.get("groups", {}), float("nan")
        log(f"\n{'test set':<12}{'teacher avg':>12}{'worst':>7}{'student avg':>12}{'worst':>7}"
            f"   student acc per group")
        for name, m in grouped.items():
            t = teacher_eval[name]
            groups = "  ".join(f"{group_names.get(k, k)} {a:.3f}" for k, a in m["groups"].items())
            log(f"{name:<12}{t.get('avg_acc', nan):>12.3f}{t['worst_group_acc']:>7.3f}"
                f"{m.get('avg_acc', nan):>12.3f}{m['worst_group_acc']:>7.3f}   {groups}")
    for note in result.get("notes", []):
        log(f"note: {note}")
    for reason in result["exclusions"]:
        log(f"EXCLUDED: {reason}; analysis/ leaves this run out")
