"""The machinery around a run, which the science in `common.py` does not need: the command line
and its checks, devices, provenance, the teacher cache, the guards that stop a meaningless run,
result files, and the offline digit data two experiments read.

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (ARCHS, JACOBIAN_METHODS, LOSSES, TEST_SEED, DistillConfig, TeacherConfig, TensorSet, UserError,
                    evaluate_student, freeze, predict, seed_everything, teacher_metrics, train_teacher)

MAX_SEED = 2 ** 31 - 2  # numpy takes seeds below 2**32; the student uses seed + 1


# ----------------------------------------------------------------------------- errors, devices, provenance

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
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UserError(f"unsupported --device '{name}'; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: record that rather than fail the run
        return None


def git_state() -> dict:
    """The commit of the code that ran and whether the work tree had uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = run("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = run("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):  # no git, or not a clone
        return {"commit": None, "dirty": None}


def environment(device: torch.device) -> dict:
    """What ran the experiment, stored in every result: code, library versions, hardware."""
    env = {**git_state(), "argv": sys.argv[1:], "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "scikit-learn": _version("sklearn"), "torchvision": _version("torchvision"),
           "device": str(device), "platform": platform.platform(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ----------------------------------------------------------------------------- digit data (colored MNIST, Dominoes)

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


def torchvision_digits(name: str, root: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's MNIST or FashionMNIST from `root` as [N, 28, 28] in [0, 1] with labels
    (train_x, train_y, test_x, test_y); anything unreadable or out of range is a UserError."""
    from torchvision import datasets
    expected = f"expected {os.path.join(root, name, 'raw')}/*-ubyte[.gz], or add --download"
    try:
        train = getattr(datasets, name)(root, train=True, download=download)
        test = getattr(datasets, name)(root, train=False, download=download)
    except Exception as e:  # RuntimeError for missing files; AssertionError, ValueError, ... for corrupt ones
        raise UserError(f"cannot read {name} from {root}: {first_line(e)} ({expected})")
    out = []
    for split in (train, test):
        x, y = split.data, split.targets
        if len(x) == 0 or len(x) != len(y) or x.dim() != 3 or y.min() < 0 or y.max() >= 10:
            raise UserError(f"{name} in {root} holds {len(x)} images with {len(y)} labels of shape {tuple(x.shape)} "
                            f"(labels must be 0..9); replace the files with the originals ({expected})")
        out += [x.float() / 255, y.long()]
    return tuple(out)


# ----------------------------------------------------------------------------- checks

def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (a bare assert)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_fraction(value: float, flag: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{flag} must be in [0, 1], got {value}")
    return value


def check_model_finite(model: nn.Module, name: str, outputs: torch.Tensor, fix: str) -> None:
    """Raise UserError when a trained model's parameters or its `outputs` (logits on held-out data)
    are not finite: a NaN made by the very last update is not caught by the loss check, which
    runs before it."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not bad and not torch.isfinite(outputs).all():
        bad = ["its outputs"]
    if bad:
        raise UserError(f"the {name} has non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                        f"no result was written. {fix}")


# ----------------------------------------------------------------------------- teacher cache

def cache_key(config: dict) -> str:
    """A short stable hash of everything that determines a teacher."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def prepare_cache(cache_dir: str) -> bool:
    """Check the teacher cache folder before any training; returns whether it can be written.
    A read-only cache is still usable for the teachers it already holds."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UserError(f"--cache-dir {cache_dir} is a file, not a folder; choose another --cache-dir")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --cache-dir {cache_dir} ({e.strerror}); choose another --cache-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-test-"):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: str, writable: bool):
    """An exclusive lock, so two processes never train or write the same teacher at once (none
    in a read-only cache, which nobody can write)."""
    if not writable:
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_train_teacher(config: dict, build: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module],
                          check: Callable[[nn.Module, bool], None], cache_dir: str, device: torch.device,
                          retrain: bool = False, log: Callable[[str], None] = print) -> tuple[nn.Module, bool]:
    """Return (frozen teacher, loaded_from_cache). `check(model, cached)` raises UserError for a
    teacher not worth distilling; a fresh teacher is cached only after it passes.

    The cache holds `<key>.pt`, written atomically with the weights and the config they were
    trained with together (so it is complete or absent, never half-written), and `<key>.json`, a
    copy of the config for people; `config` must hold everything that determines the teacher."""
    writable = prepare_cache(cache_dir)
    key = cache_key(config)
    weights, meta = os.path.join(cache_dir, f"{key}.pt"), os.path.join(cache_dir, f"{key}.json")
    config = json.loads(json.dumps(config))
    with _file_lock(os.path.join(cache_dir, f"{key}.lock"), writable):
        if os.path.exists(weights) and not retrain:
            fix = f"delete {weights} to retrain it, or pass --retrain-teacher"
            model = build()
            try:
                saved = torch.load(weights, map_location="cpu", weights_only=True)
                if not isinstance(saved, dict) or "config" not in saved:
                    raise ValueError("written by an older version")
                if saved["config"] == config:
                    model.load_state_dict(saved["state_dict"])
            except Exception as e:  # corrupt file, wrong shapes, an older format, ...
                raise UserError(f"teacher cache {weights} is corrupt or does not fit the model "
                                f"({type(e).__name__}: {first_line(e)}); {fix}")
            if saved["config"] != config:
                raise UserError(f"teacher cache {weights} was trained with another configuration; {fix}")
            log(f"teacher: loaded from cache {weights}")
            model = freeze(model.to(device))
            check(model, True)
            return model, True
        if not writable:
            raise UserError(f"--cache-dir {cache_dir} is read-only and does not hold this teacher ({key}.pt); "
                            f"choose a writable --cache-dir")
        log("teacher: training (cached afterwards)")
        model = train(build())
        check(model, False)
        try:
            _atomic_save(lambda f: torch.save({"config": config, "state_dict": model.state_dict()}, f), weights)
        except OSError as e:  # a full disk: the run goes on, the next one trains the teacher again
            log(f"warning: the teacher could not be cached in {cache_dir} ({e.strerror}); the run goes on")
            return model, False
        with contextlib.suppress(OSError):  # the copy for people; the .pt is complete without it
            _atomic_save(lambda f: f.write(json.dumps(config, indent=1, sort_keys=True).encode()), meta)
        return model, False


# ----------------------------------------------------------------------------- command line and results

def experiment_parser(doc: str, epilog: str, teacher_config: str, student_config: str):
    """An experiment's parser (its docstring's first paragraph as the description, the rest as
    help text, no abbreviated flags) and its "data" group, which already holds the two
    configurations; the script adds its own data flags to the group."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--teacher-config", default=teacher_config,
                      help=f"mechanisms of the teacher's training data (default {teacher_config})")
    data.add_argument("--student-config", default=student_config,
                      help=f"mechanisms of the distillation data (default {student_config})")
    return parser, data


def parse_common(parser: argparse.ArgumentParser, argv: Optional[list[str]],
                 alphas: dict[str, float]) -> argparse.Namespace:
    """Parse the flags and check the shared ones. Without --alpha a mixture loss takes its weight
    from `alphas` (the script's ALPHA; ce and kl have none). --smoke caps the training lengths (20
    student and 40 teacher steps, curves every 10); each script then shrinks its data."""
    args = parser.parse_args(argv)
    if args.alpha is None:
        args.alpha = alphas.get(args.loss)
    if args.smoke:
        args.steps, args.teacher_steps = min(args.steps, 20), min(args.teacher_steps, 40)
        args.eval_every = 10 if args.eval_every is None else args.eval_every
    check_common_args(args)
    return args


def prepare_run(args: argparse.Namespace, experiment: str) -> tuple[torch.device, str]:
    """Before any training is spent: the device, a writable result path and teacher cache; then
    seed everything with --seed. Returns (device, result path)."""
    device = resolve_device(args.device)
    out_path = prepare_output(args.out or default_out(experiment, args))
    prepare_cache(args.cache_dir)
    seed_everything(args.seed)
    return device, out_path


def add_common_args(parser: argparse.ArgumentParser, teacher: TeacherConfig, student: DistillConfig,
                    alphas: dict[str, float], archs: tuple[str, ...] = ARCHS,
                    arch_help: str = "cnn: small CNN with global pooling (CPU-friendly, default); lenet: "
                                     "LeNet-style, a fully connected head and no global pooling; resnet18 (GPU)") -> None:
    """The flags every experiment shares, with the defaults of the script's settings block
    (`alphas`: the default --alpha of each mixture loss): the distillation, training lengths,
    device, output. Each script adds its own data flags."""
    g = parser.add_argument_group("distillation")
    g.add_argument("--loss", choices=LOSSES, default=student.loss,
                   help="ce: labels only (no teacher); kl: KL to the teacher's softened outputs; "
                        "jacobian: (1-alpha) KL + alpha Jacobian matching; contrastive: (1-alpha) KL + alpha InfoNCE")
    g.add_argument("--alpha", type=float, default=None,
                   help="weight of the Jacobian or contrastive term (default: "
                        + ", ".join(f"{loss} {a:g}" for loss, a in alphas.items()) + ")")
    g.add_argument("--temperature", type=float, default=student.temperature,
                   help=f"KL distillation temperature T (default {student.temperature:g})")
    g.add_argument("--no-t2", action="store_true", help="plain KL without Hinton's factor T^2")
    g.add_argument("--mixture-t2", action="store_true",
                   help="multiply the KL term of a jacobian or contrastive mixture by T^2 too (off by default: it "
                        "would weigh KL T^2 times more than --alpha says)")
    g.add_argument("--jacobian-method", choices=JACOBIAN_METHODS, default=student.jacobian_method,
                   help="how exact Jacobians are computed; auto = the fastest measured for the device")
    g.add_argument("--jacobian-estimator", choices=("exact", "projection"), default=student.jacobian_estimator,
                   help="exact: all classes (or --top-k); projection: --projections random projections of the logits")
    g.add_argument("--projections", type=int, default=student.projections,
                   help=f"K for --jacobian-estimator projection (default {student.projections})")
    g.add_argument("--top-k", type=int, default=student.top_k, help="match only the teacher's top-k classes' Jacobian rows")
    g.add_argument("--contrastive-temperature", type=float, default=student.contrastive_temperature,
                   help=f"InfoNCE temperature (default {student.contrastive_temperature:g})")
    g.add_argument("--contrastive-negatives", choices=("batch", "same-class", "dataset"),
                   default=student.contrastive_negatives,
                   help="InfoNCE negatives: every other sample of the batch; only those of the same label; or the "
                        f"batch plus up to {student.contrastive_bank} other training samples (the teacher's features, "
                        f"precomputed) (default {student.contrastive_negatives})")
    g = parser.add_argument_group("training")
    g.add_argument("--arch", choices=archs, default=student.arch, help=arch_help)
    g.add_argument("--student-arch", choices=archs, default=None,
                   help="the student's architecture when it differs from the teacher's (default: --arch)")
    g.add_argument("--teacher-width", type=int, default=teacher.width, help=f"teacher width (default {teacher.width})")
    g.add_argument("--student-width", type=int, default=student.width, help=f"student width (default {student.width})")
    g.add_argument("--steps", type=int, default=student.steps, help=f"student training steps (default {student.steps})")
    g.add_argument("--teacher-steps", type=int, default=teacher.steps,
                   help=f"teacher training steps (default {teacher.steps})")
    g.add_argument("--batch-size", type=int, default=student.batch_size,
                   help=f"batch size of teacher and student (default {student.batch_size})")
    g.add_argument("--lr", type=float, default=student.lr,
                   help=f"student's peak learning rate, Adam with cosine decay (default {student.lr:g})")
    g.add_argument("--teacher-lr", type=float, default=teacher.lr, help=f"teacher's peak learning rate (default {teacher.lr:g})")
    g.add_argument("--teacher-optimizer", choices=("sgd", "adam"), default=teacher.optimizer,
                   help="teacher's optimizer with cosine decay: sgd (Nesterov momentum, the default) or adam, "
                        "which leaves the initial plateau sooner on short runs (try --teacher-lr 5e-3)")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps for the curves (default steps/10)")
    g.add_argument("--seed", type=int, default=0, help="seed of data rendering, teacher and student (default 0)")
    g.add_argument("--teacher-min-acc", type=float, default=None,
                   help="stop unless the teacher reaches this accuracy on held-out data of its own configuration "
                        "(default: halfway between chance and 1, e.g. 0.55 for 10 classes; 0 with --smoke)")
    g.add_argument("--student-min-fit", type=float, default=0.9,
                   help="flag the result when the student fits held-out data of its own distillation configuration "
                        "worse than this (accuracy, or agreement with the teacher, whichever is higher; default 0.9)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, help="result JSON path (default results/<experiment>/<teacher>_<student>_<loss>_seed<seed>.json)")
    g.add_argument("--cache-dir", default="cache/teachers", help="where trained teachers are kept (default cache/teachers)")
    g.add_argument("--retrain-teacher", action="store_true", help="ignore and overwrite the cached teacher")
    g.add_argument("--smoke", action="store_true", help="a tiny run in seconds, for CI and for checking the setup")


def check_common_args(args: argparse.Namespace) -> None:
    """Validate the shared flags; raise UserError with the fix. Changes nothing."""
    if args.alpha is not None:
        check_fraction(args.alpha, "--alpha")
    check_fraction(args.student_min_fit, "--student-min-fit")
    if args.teacher_min_acc is not None:
        check_fraction(args.teacher_min_acc, "--teacher-min-acc")
    for flag in ("steps", "teacher_steps", "batch_size", "projections", "teacher_width", "student_width"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("temperature", "contrastive_temperature", "lr", "teacher_lr"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive finite number, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    if args.eval_every is not None and args.eval_every < 1:
        raise UserError("--eval-every must be at least 1")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    for arch in {args.arch, args.student_arch or args.arch}:
        if args.jacobian_method == "explicit" and arch not in ("cnn", "lenet"):  # before the teacher trains
            raise UserError(f"--jacobian-method explicit needs --arch cnn or lenet, not {arch}; use loop or batched")


def settings_from_flags(args: argparse.Namespace, teacher: TeacherConfig,
                        student: DistillConfig) -> tuple[TeacherConfig, DistillConfig]:
    """The script's settings block with the flags applied: (teacher's, student's). The flags can
    change the fields they name; the rest (optimiser constants, ...) stay as the block says."""
    teacher = dataclasses.replace(teacher, arch=args.arch, width=args.teacher_width, steps=args.teacher_steps,
                                  batch_size=args.batch_size, lr=args.teacher_lr, optimizer=args.teacher_optimizer,
                                  seed=args.seed)
    student = dataclasses.replace(
        student, loss=args.loss, arch=args.student_arch or args.arch, width=args.student_width, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
        alpha=student.alpha if args.alpha is None else args.alpha,
        t2_scale=student.t2_scale and not args.no_t2, mixture_t2=student.mixture_t2 or args.mixture_t2,
        jacobian_method=args.jacobian_method,
        jacobian_estimator=args.jacobian_estimator, projections=args.projections, top_k=args.top_k,
        contrastive_temperature=args.contrastive_temperature, contrastive_negatives=args.contrastive_negatives,
        eval_every=args.eval_every or max(args.steps // 10, 1), seed=args.seed)
    return teacher, student


def print_settings(teacher: TeacherConfig, student: DistillConfig) -> None:
    """One line each: what the teacher and the student are trained with."""
    for name, cfg in (("teacher", teacher), ("student", student)):
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))


def teacher_floor(args, num_classes: int) -> float:
    """The accuracy a teacher must reach: --teacher-min-acc, or halfway between chance and 1."""
    chance = 1.0 / num_classes
    if args.teacher_min_acc is not None:
        return args.teacher_min_acc
    return 0.0 if args.smoke else chance + (1 - chance) / 2  # a smoke run checks the setup, not the teacher


TEACHER_ATTEMPTS = 3  # trainings of a teacher that stays below its floor, each from a new initialisation


def get_teacher(args: argparse.Namespace, cfg: TeacherConfig, device: torch.device, build: Callable[[], nn.Module],
                train: TensorSet, heldout: TensorSet, data_key: dict) -> tuple[nn.Module, dict]:
    """Load the cached teacher or train it on `train` as `cfg` says, then check it on `heldout`
    (held-out data of the teacher's own configuration): a teacher at chance or with non-finite
    weights stops the run before anything is distilled or cached. Returns (frozen teacher, record
    for the result). The cache key is `data_key` (everything about the data that determines the
    teacher), the whole of `cfg` and the device type."""
    key = {**data_key, **dataclasses.asdict(cfg), "device": device.type}
    record = {"cache_key": cache_key(key)}

    def check(model: nn.Module, cached: bool) -> None:
        fix = ("It came from the cache: pass --retrain-teacher." if cached else
               "Train it differently (--teacher-lr, --teacher-steps, --teacher-optimizer) and run again.")
        logits = predict(model, heldout.x).cpu()
        check_model_finite(model, "teacher", logits, fix)
        acc = (logits.argmax(1) == heldout.y.cpu()).float().mean().item()
        floor = teacher_floor(args, logits.shape[1])
        record.update(heldout_acc=acc, floor=floor)
        print(f"teacher: accuracy {acc:.3f} on held-out {args.teacher_config} (floor {floor:.3f})")
        if acc < floor:
            raise UserError(f"the teacher reaches only {acc:.3f} on held-out {args.teacher_config} data, below the "
                            f"floor {floor:.3f} (chance {1 / logits.shape[1]:.3f}); distilling it would mean nothing "
                            f"and nothing was cached or written. {fix} (--teacher-min-acc sets the floor)")
    def train_with_restarts(model: nn.Module) -> nn.Module:
        """This small CNN without normalisation sometimes never leaves chance with SGD at the default
        learning rate (seen at two threads on one machine, while one thread trained fine): a teacher
        that fails `check` is trained again from a new initialisation and batch order, up to
        TEACHER_ATTEMPTS times; the last failure is raised. The first attempt is the plain recipe,
        so a teacher that learns at once is the same as without restarts."""
        for attempt in range(TEACHER_ATTEMPTS):
            if attempt:
                print(f"teacher: below its floor after attempt {attempt}; training again from a new initialisation")
                torch.manual_seed(cfg.seed + 1000 * attempt)
                model = build()
            trained = train_teacher(model, train, dataclasses.replace(cfg, seed=cfg.seed + 1000 * attempt), device)
            record["attempts"] = attempt + 1
            try:
                check(trained, False)
                return trained
            except UserError:
                if attempt == TEACHER_ATTEMPTS - 1:
                    raise
    start = time.perf_counter()
    check_cached = lambda model, cached: check(model, cached) if cached else None  # noqa: E731 (fresh: checked above)
    teacher, cached = load_or_train_teacher(key, build, train_with_restarts, check_cached,
                                            args.cache_dir, device, retrain=args.retrain_teacher)
    record.update(cached=cached, train_s=0.0 if cached else time.perf_counter() - start)
    return teacher, record


def default_out(experiment: str, args) -> str:
    return os.path.join("results", experiment, f"{args.teacher_config}_{args.student_config}_{args.loss}_seed{args.seed}.json")


def student_fit(args, student_logits: torch.Tensor, teacher: nn.Module, heldout: TensorSet) -> dict:
    """How well the student fits held-out data of its own distillation configuration: its accuracy,
    or its agreement with the teacher, whichever is higher (a distilled student imitates the
    teacher, whose answers need not be the labels). Below --student-min-fit the run is flagged:
    a student that never fit its data says nothing about what it learned from the teacher."""
    s_pred = student_logits.argmax(1).cpu()
    acc = (s_pred == heldout.y.cpu()).float().mean().item()
    agreement = (s_pred == predict(teacher, heldout.x).argmax(1).cpu()).float().mean().item()
    fit = acc if args.loss == "ce" else max(acc, agreement)
    return {"config": args.student_config, "acc": acc, "agreement": agreement, "fit": fit,
            "floor": args.student_min_fit, "ok": fit >= args.student_min_fit}


def final_result(experiment: str, args: argparse.Namespace, device: torch.device,
                 settings: tuple[TeacherConfig, DistillConfig], teacher: nn.Module, student: nn.Module,
                 cf_sets: dict[str, TensorSet], student_heldout: TensorSet, run: dict, teacher_record: dict,
                 data_version: int) -> dict:
    """Check the student, evaluate teacher and student on every counterfactual set and assemble the
    result JSON: the flags as given (`config`), the settings they made (the teacher's and the
    student's dataclass as they are), provenance, metrics, curves and timing. The teacher's logits
    on the sets come from `run` (distill computed them)."""
    student_logits = predict(student, student_heldout.x)
    check_model_finite(student, "student", student_logits,
                       "Lower --lr (or --alpha) and run again; the teacher is fine and stays cached.")
    teacher_logits = run["teacher_logits"]
    teacher_eval = {name: teacher_metrics(teacher_logits[name], s.y.cpu(), None if s.group is None else s.group.cpu())
                    for name, s in cf_sets.items()}
    fit = student_fit(args, student_logits, teacher, student_heldout)
    flags = [] if fit["ok"] else [f"student_fit: the student fits held-out {fit['config']} only {fit['fit']:.3f} "
                                  f"(floor {fit['floor']:.2f})"]
    record = dict(teacher_record)
    train_s = record.pop("train_s")
    return {
        "experiment": experiment,
        "config": vars(args),
        "settings": {"teacher": dataclasses.asdict(settings[0]), "student": dataclasses.asdict(settings[1])},
        "flags": flags,
        "provenance": {**environment(device), "data_version": data_version, "test_seed": TEST_SEED,
                       "teacher_cache_key": record["cache_key"]},
        "teacher": {**record, "eval": teacher_eval},
        "student": {"fit": fit, "eval": evaluate_student(student, cf_sets, teacher_logits), "curves": run["curves"]},
        "test_sizes": {name: len(s.y) for name, s in cf_sets.items()},
        "timing": {"teacher_train_s": train_s, **{f"student_{k}": v for k, v in run["timing"].items()}},
    }


def save_result(path: str, result: dict, started: float) -> None:
    """Add the run's total time (from `started`), print its table and write it atomically."""
    result["timing"]["total_s"] = time.perf_counter() - started
    print_table(result)
    write_result(path, result)
    print(f"result: {path}")


# ----------------------------------------------------------------------------- output

def _atomic_save(write: Callable, path: str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
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
        raise UserError(f"--out {path} is a folder; name the result file, e.g. {os.path.join(path, 'result.json')}")
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
    average and worst-group accuracies and the student's accuracy per group; then the result's
    notes and flags."""
    teacher_eval, student_eval = result["teacher"]["eval"], result["student"]["eval"]
    log(f"{'test set':<12}{'teacher acc':>12}{'student acc':>12}{'KL(T||S)':>10}{'agreement':>11}")
    for name, m in student_eval.items():
        log(f"{name:<12}{teacher_eval[name]['acc']:>12.3f}{m['acc']:>12.3f}{m['kl']:>10.3f}{m['agreement']:>11.3f}")
    grouped = {name: m for name, m in student_eval.items() if "groups" in m}
    if grouped:
        group_names = result.get("groups", {})
        log(f"\n{'test set':<12}{'teacher avg':>12}{'worst':>7}{'student avg':>12}{'worst':>7}   student acc per group")
        for name, m in grouped.items():
            t = teacher_eval[name]
            groups = "  ".join(f"{group_names.get(k, k)} {a:.3f}" for k, a in m["groups"].items())
            log(f"{name:<12}{t['avg_acc']:>12.3f}{t['worst_group_acc']:>7.3f}{m['avg_acc']:>12.3f}"
                f"{m['worst_group_acc']:>7.3f}   {groups}")
    for note in result.get("notes", []):
        log(f"note: {note}")
    for flag in result["flags"]:
        log(f"FLAGGED: {flag}; read these numbers with care (analysis/ skips flagged runs)")
