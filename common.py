"""Shared pieces of every experiment: models, losses, metrics, training loops, caching, output.

Each `exp_*.py` script builds its own spurious data set as tensors and calls into this file for
everything else. Read `README.md` for the vocabulary (mechanisms I/A/B, configurations such as
`I+rA`, counterfactual test sets).
"""
from __future__ import annotations

import argparse
import contextlib
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
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("ce", "kl", "jacobian", "contrastive")
JACOBIAN_METHODS = ("auto", "explicit", "loop", "batched", "vmap")
TEST_SEED = 12345  # the counterfactual test sets are drawn with this seed: the same sets for every --seed
MAX_SEED = 2 ** 31 - 2  # numpy takes seeds below 2**32; the student uses seed + 1


# ----------------------------------------------------------------------------- errors, devices, seeds

class UserError(Exception):
    """A problem the user can fix (bad flag, missing file): printed as one line, no traceback."""


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


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so one seed on one machine gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ----------------------------------------------------------------------------- configurations

class TensorSet(NamedTuple):
    """A data set held as tensors: images [N, C, H, W] in [0, 1], labels [N], optional groups [N]."""
    x: torch.Tensor
    y: torch.Tensor
    group: Optional[torch.Tensor] = None


def parse_config(spec: str, letters: str) -> dict[str, str]:
    """Parse a configuration such as `IA`, `I+rA` or `rI+A` into {letter: label|random|absent}.

    Upper-case letters carry the label; a part starting with `r` lists randomised mechanisms
    (present, drawn independently of the label); letters not named are absent.
    """
    roles = {letter: "absent" for letter in letters}
    for part in spec.split("+"):
        role, names = ("random", part[1:]) if part.startswith("r") else ("label", part)
        if not names:
            raise UserError(f"configuration '{spec}' has an empty part; write e.g. IA, I+rA or rI+A")
        for letter in names:
            if letter not in roles:
                raise UserError(f"configuration '{spec}' names mechanism '{letter}', but this data "
                                f"set has only {', '.join(letters)}")
            if roles[letter] != "absent":
                raise UserError(f"configuration '{spec}' names mechanism '{letter}' twice")
            roles[letter] = role
    if "label" not in roles.values():
        raise UserError(f"configuration '{spec}' has no mechanism that carries the label "
                        f"(write at least one upper-case letter without r)")
    return roles


def spurious_values(y: torch.Tensor, frac: float, num_values: int, generator: torch.Generator) -> torch.Tensor:
    """A cue that equals the label for exactly round(frac * N) samples (chosen at random) and takes
    one of the other values, uniformly, for the rest: P(cue == label) is exactly `frac`."""
    n = len(y)
    carries = torch.zeros(n, dtype=torch.bool)
    carries[torch.randperm(n, generator=generator)[:round(frac * n)]] = True
    other = (y + torch.randint(1, num_values, (n,), generator=generator)) % num_values
    return torch.where(carries, y, other)


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


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (a bare assert)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_fraction(value: float, flag: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{flag} must be in [0, 1], got {value}")
    return value


# ----------------------------------------------------------------------------- models

class SmallCNN(nn.Module):
    """Three conv blocks and global average pooling; `width` sets the size (teacher > student).

    No BatchNorm, so per-sample input Jacobians never mix samples.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 4 * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        he_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def input_vjp(self, x: torch.Tensor, selectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and the rows selectors[k, b] . d logits_b / d x_b, [K, B, *x.shape[1:]],
        by a hand-written backward pass made of ordinary differentiable ops (ReLU masks,
        max_unpool2d, convolutions), one pass per row after a single forward pass.

        The rows equal autograd's. What differs is their derivative, which Jacobian matching needs
        at every step: autograd differentiates its own convolution backward with a weight-gradient
        formula that is slow on CPU (a convolution whose kernel is a whole feature map), while
        here the transposed convolution is an ordinary one, whose weight gradient is fast.
        """
        tape = []
        h = x
        for layer in self.body:
            if isinstance(layer, nn.MaxPool2d):
                out, idx = F.max_pool2d(h, layer.kernel_size, layer.stride, return_indices=True)
                tape.append((layer, h.shape, idx))
            elif isinstance(layer, nn.Conv2d):  # 3x3, stride 1, padding 1: its transpose is the
                out = layer(h)                   # convolution with the flipped, in/out-swapped kernel
                tape.append((layer, h.shape, layer.weight.transpose(0, 1).flip(2, 3).contiguous()))
            else:
                out = layer(h)
                tape.append((layer, h.shape, (out > 0).to(out.dtype) if isinstance(layer, nn.ReLU) else None))
            h = out
        logits = self.classifier(h)
        rows = []
        for sel in selectors:  # per row, not all K rows in one batch: measured faster on CPU for K = 10
            g = sel @ self.classifier.weight
            for layer, in_shape, saved in reversed(tape):
                if isinstance(layer, nn.Flatten):
                    g = g.reshape(in_shape)
                elif isinstance(layer, nn.AdaptiveAvgPool2d):  # output size 1: the mean over the map
                    g = g.expand(in_shape) / (in_shape[2] * in_shape[3])
                elif isinstance(layer, nn.ReLU):
                    g = g * saved
                elif isinstance(layer, nn.MaxPool2d):
                    g = F.max_unpool2d(g, saved, layer.kernel_size, layer.stride, output_size=in_shape[2:])
                else:
                    g = F.conv2d(g, saved, padding=layer.padding)
            rows.append(g)
        return logits, torch.stack(rows)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max-pool), for GPU runs.

    It has BatchNorm: in training mode a sample's logits depend on the rest of the batch, so the
    Jacobian computed during distillation includes that (small, O(1/batch)) cross-sample term.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = cin
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(arch: str, in_channels: int, num_classes: int, width: int) -> nn.Module:
    """`cnn` (SmallCNN, width = channels of the first block) or `resnet18` (width = 64 is standard)."""
    if arch == "cnn":
        return SmallCNN(in_channels, num_classes, width)
    if arch == "resnet18":
        return ResNet18(in_channels, num_classes, width)
    raise UserError(f"unknown architecture '{arch}'; use cnn or resnet18")


def he_init(model: nn.Module) -> nn.Module:
    """He-normal conv weights and zero biases, in place. With torch's default init the SmallCNN's
    pooled features barely vary between natural-looking images (about 1e-3), so a local shape cue is
    not learned at all while a global one (a colour) is; the image scripts use this for their CNNs."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher never changes during distillation."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ContrastiveHeads(nn.Module):
    """Linear projections of student and teacher features to a shared space (trained with the student)."""

    def __init__(self, student_dim: int, teacher_dim: int, dim: int = 128):
        super().__init__()
        self.student = nn.Linear(student_dim, dim)
        self.teacher = nn.Linear(teacher_dim, dim)


# ----------------------------------------------------------------------------- losses

def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
          t2_scale: bool = True) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch mean, times T^2 when `t2_scale` (Hinton's convention)."""
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature ** 2 if t2_scale else kl


def info_nce(student_features: torch.Tensor, teacher_features: torch.Tensor, heads: ContrastiveHeads,
             temperature: float = 0.1) -> torch.Tensor:
    """In-batch InfoNCE (CRD without the memory bank): the positive of student sample i is teacher
    sample i, every other sample of the batch is a negative; symmetric in the two directions."""
    zs = F.normalize(heads.student(student_features), dim=1)
    zt = F.normalize(heads.teacher(teacher_features), dim=1)
    logits = zs @ zt.t() / temperature
    target = torch.arange(len(zs), device=zs.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def class_selectors(num_classes: int, batch: int, device: torch.device,
                    top_classes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of the Jacobian to compute, as vectors over classes: [K, B, C].

    All classes (K = C) by default, or per-sample classes `top_classes` [B, K] (the teacher's top-k).
    """
    if top_classes is None:
        eye = torch.eye(num_classes, device=device)
        return eye[:, None, :].expand(num_classes, batch, num_classes)
    return F.one_hot(top_classes.t(), num_classes).float()


def projection_selectors(num_projections: int, batch: int, num_classes: int, device: torch.device,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random Gaussian directions over the classes, fresh per sample: [K, B, C], scaled by 1/sqrt(K)
    so that E||V J||^2 = ||J||^2."""
    v = torch.randn(num_projections, batch, num_classes, device=device, generator=generator)
    return v / math.sqrt(num_projections)


def input_jacobian(model: nn.Module, x: torch.Tensor, selectors: torch.Tensor, create_graph: bool,
                   method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the selected rows of d logits / d input: ([B, C], [B, K, D]).

    Row k of sample b is selectors[k, b] . d logits_b / d x_b. `loop` runs one backward pass per
    row; `batched` uses autograd's is_grads_batched; `vmap` uses torch.func; `explicit` the
    model's own hand-written backward pass (SmallCNN.input_vjp); `auto` the fastest measured for
    the model and device. With `create_graph` the rows stay differentiable with respect to the
    model's parameters.
    """
    if method == "auto":
        method = default_jacobian_method(x.device, model)
    x = x.detach().requires_grad_(method != "explicit")  # explicit never differentiates with respect to x
    if method == "vmap":
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
            raise UserError("--jacobian-method vmap cannot differentiate a model with BatchNorm in training "
                            "mode (torch.func forbids the running-statistics update); use loop or batched")
        logits, vjp_fn = torch.func.vjp(model, x)
        (rows,) = torch.func.vmap(vjp_fn)(selectors)
    elif method == "explicit":
        if not hasattr(model, "input_vjp"):
            raise UserError(f"--jacobian-method explicit needs the small CNN (--arch cnn), not "
                            f"{type(model).__name__}; use loop or batched")
        with torch.set_grad_enabled(create_graph):
            logits, rows = model.input_vjp(x, selectors)
    else:
        with torch.enable_grad():
            logits = model(x)
            if method == "batched":
                (rows,) = torch.autograd.grad(logits, x, selectors, is_grads_batched=True,
                                              create_graph=create_graph, retain_graph=create_graph)
            elif method == "loop":
                rows = torch.stack([torch.autograd.grad(logits, x, sel, create_graph=create_graph,
                                                        retain_graph=True)[0] for sel in selectors])
            else:
                raise UserError(f"unknown Jacobian method '{method}'; use {', '.join(JACOBIAN_METHODS)}")
    if not create_graph:
        rows, logits = rows.detach(), logits.detach()
    return logits, rows.flatten(2).transpose(0, 1)


def jacobian_distance(student_jac: torch.Tensor, teacher_jac: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Batch mean of || Jt/|Jt| - Js/|Js| ||_2, each sample's Jacobian flattened and L2-normalised."""
    js = student_jac.flatten(1)
    jt = teacher_jac.flatten(1)
    js = js / (js.norm(dim=1, keepdim=True) + eps)
    jt = jt / (jt.norm(dim=1, keepdim=True) + eps)
    return torch.linalg.vector_norm(jt - js, dim=1).mean()


def default_jacobian_method(device: torch.device, model: Optional[nn.Module] = None) -> str:
    """The fastest exact method measured for the device (analysis/bench_losses.py): on a CPU the
    small CNN's explicit backward pass, else one backward pass per class. CUDA: `batched`."""
    if device.type != "cpu":
        return "batched"
    return "explicit" if hasattr(model, "input_vjp") else "loop"


def jacobian_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, method: str = "auto",
                  top_k: Optional[int] = None) -> torch.Tensor:
    """Jacobian matching (Srinivas and Fleuret, 2018): batch mean of ||Jt - Js||_2 where J is the
    per-sample Jacobian of the logits with respect to the input, all classes (or the teacher's
    top-k), flattened and L2-normalised. The teacher side is computed without a graph."""
    with torch.no_grad():
        teacher_logits = teacher(x)
    num_classes = teacher_logits.shape[1]
    top = teacher_logits.topk(top_k, dim=1).indices if top_k is not None and top_k < num_classes else None
    selectors = class_selectors(num_classes, len(x), x.device, top)
    _, teacher_jac = input_jacobian(teacher, x, selectors, create_graph=False, method=method)
    _, student_jac = input_jacobian(student, x, selectors, create_graph=True, method=method)
    return jacobian_distance(student_jac, teacher_jac)


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of a model in eval mode, in large batches without autograd."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def group_accuracy(pred: torch.Tensor, y: torch.Tensor, group: torch.Tensor) -> dict[str, float]:
    """Accuracy per group present, their average and the worst group."""
    per_group = {int(g): (pred[group == g] == y[group == g]).float().mean().item()
                 for g in torch.unique(group)}
    return {"groups": {str(g): a for g, a in sorted(per_group.items())},
            "avg_acc": float(np.mean(list(per_group.values()))),
            "worst_group_acc": min(per_group.values())}


def pair_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                 group: Optional[torch.Tensor] = None) -> dict:
    """Student accuracy, KL(teacher || student) at T = 1 (mean over samples) and top-1 agreement."""
    s_pred, t_pred = student_logits.argmax(1), teacher_logits.argmax(1)
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                  log_target=True, reduction="batchmean")
    out = {"acc": (s_pred == y).float().mean().item(), "kl": kl.item(),
           "agreement": (s_pred == t_pred).float().mean().item()}
    if group is not None:
        out.update(group_accuracy(s_pred, y, group))
        out["group_agreement"] = {str(int(g)): (s_pred[group == g] == t_pred[group == g]).float().mean().item()
                                  for g in torch.unique(group)}
    return out


def teacher_metrics(teacher_logits: torch.Tensor, y: torch.Tensor, group: Optional[torch.Tensor] = None) -> dict:
    pred = teacher_logits.argmax(1)
    out = {"acc": (pred == y).float().mean().item()}
    if group is not None:
        out.update(group_accuracy(pred, y, group))
    return out


def evaluate_student(student: nn.Module, cf_sets: dict[str, TensorSet],
                     teacher_logits: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Student metrics on every named test set, against the teacher's (precomputed) logits."""
    return {name: pair_metrics(predict(student, s.x).cpu(), teacher_logits[name], s.y.cpu(),
                               None if s.group is None else s.group.cpu())
            for name, s in cf_sets.items()}


# ----------------------------------------------------------------------------- training

def to_device(data: TensorSet, device: torch.device) -> TensorSet:
    """The whole data set on the device, once: batches are then index operations there."""
    return TensorSet(*(None if t is None else t.to(device) for t in data))


def _progress(total: int, desc: str):
    """A progress bar on a terminal; silent in logs (evaluation lines are printed instead)."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=None, leave=False, dynamic_ncols=True)
    except ImportError:  # tqdm is optional
        return contextlib.nullcontext(type("NoBar", (), {"update": lambda *a: None,
                                                         "set_postfix_str": lambda *a: None})())


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of `steps` mini-batches, reshuffled every epoch, last partial batch dropped."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    step = 0
    while step < steps:
        perm = torch.randperm(n, generator=generator)
        for i in range(per_epoch):
            if step == steps:
                return
            yield perm[i * batch_size:(i + 1) * batch_size]
            step += 1


def _optimizer(params, lr: float, steps: int, kind: str = "sgd"):
    """SGD with Nesterov momentum (teachers) or Adam (students: the distillation losses differ in
    scale by orders of magnitude, and Adam's step size does not), both with cosine decay."""
    if kind == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.01)
    return opt, sched


def _check_finite(loss: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise UserError(f"the {what} loss became {loss.item()} at step {step}; no result was written. "
                        f"Lower --lr or --alpha and run again")


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


def train_teacher(model: nn.Module, train: TensorSet, *, steps: int, batch_size: int, lr: float,
                  device: torch.device, seed: int, optimizer: str = "sgd") -> nn.Module:
    """Cross-entropy training with a cosine schedule; returns the model frozen in eval mode."""
    model.to(device).train()
    train = to_device(train, device)
    opt, sched = _optimizer(model.parameters(), lr, steps, optimizer)
    gen = torch.Generator().manual_seed(seed)
    with _progress(steps, "teacher") as bar:
        for step, idx in enumerate(_batches(len(train.y), batch_size, steps, gen), 1):
            idx = idx.to(device)
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            _check_finite(loss, step, "teacher")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    return freeze(model)


def teacher_targets(teacher: nn.Module, x: torch.Tensor, *, need_jacobian: bool, top_k: Optional[int],
                    method: str, batch_size: int = 256, max_bytes: float = 2e9) -> dict:
    """Teacher logits, features and (when they fit in `max_bytes`) input Jacobians for a fixed
    training set, computed once so that distillation never runs the teacher per step."""
    device = next(teacher.parameters()).device
    out = {"logits": predict(teacher, x, batch_size)}
    with torch.no_grad():
        out["features"] = torch.cat([teacher.features(x[i:i + 1024].to(device)) for i in range(0, len(x), 1024)])
    if need_jacobian:
        num_classes = out["logits"].shape[1]
        rows = top_k if top_k is not None and top_k < num_classes else num_classes
        size = len(x) * rows * x[0].numel() * 4
        if size <= max_bytes:
            jacs = []
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size].to(device)
                top = out["logits"][i:i + batch_size].topk(rows, 1).indices if rows < num_classes else None
                sel = class_selectors(num_classes, len(xb), device, top)
                jacs.append(input_jacobian(teacher, xb, sel, create_graph=False, method=method)[1])
            out["jacobian"] = torch.cat(jacs)
    return out


def distillation_objective(student: nn.Module, teacher: nn.Module, targets: dict, *, loss: str,
                           alpha: float = 0.5, temperature: float = 4.0, t2_scale: bool = True,
                           jacobian_method: str = "auto", top_k: Optional[int] = None, estimator: str = "exact",
                           projections: int = 1, contrastive_temperature: float = 0.1,
                           heads: Optional[ContrastiveHeads] = None,
                           generator: Optional[torch.Generator] = None) -> Callable[..., torch.Tensor]:
    """The training loss of one batch, as a function objective(x, y, idx) -> scalar.

    `targets` holds the teacher's precomputed outputs on the training set (teacher_targets);
    `idx` are the batch's rows in it. Where the teacher's Jacobians did not fit in memory they
    are computed per batch, without a graph.
    """
    def kl_plus(s_logits, idx, aux):
        return (1 - alpha) * kd_kl(s_logits, targets["logits"][idx], temperature, t2_scale) + alpha * aux

    def objective(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if loss == "ce":
            return F.cross_entropy(student(x), y)
        if loss == "kl":
            return kd_kl(student(x), targets["logits"][idx], temperature, t2_scale)
        if loss == "contrastive":
            feats = student.features(x)
            aux = info_nce(feats, targets["features"][idx], heads, contrastive_temperature)
            return kl_plus(student.classifier(feats), idx, aux)
        num_classes = targets["logits"].shape[1]
        if estimator == "projection":
            sel = projection_selectors(projections, len(x), num_classes, x.device, generator)
        else:
            top = targets["logits"][idx].topk(top_k, 1).indices if top_k and top_k < num_classes else None
            sel = class_selectors(num_classes, len(x), x.device, top)
        s_logits, s_jac = input_jacobian(student, x, sel, create_graph=True, method=jacobian_method)
        if "jacobian" not in targets:  # too large to precompute: run the teacher on this batch
            t_jac = input_jacobian(teacher, x, sel, create_graph=False, method=jacobian_method)[1]
        elif estimator == "projection":  # project the precomputed full Jacobian
            t_jac = torch.einsum("kbc,bcd->bkd", sel, targets["jacobian"][idx])
        else:
            t_jac = targets["jacobian"][idx]
        return kl_plus(s_logits, idx, jacobian_distance(s_jac, t_jac))

    return objective


def distill(student: nn.Module, teacher: nn.Module, train: TensorSet, *, loss: str, steps: int,
            batch_size: int, lr: float, device: torch.device, seed: int, alpha: float = 0.5,
            temperature: float = 4.0, t2_scale: bool = True, jacobian_method: str = "auto",
            top_k: Optional[int] = None, estimator: str = "exact", projections: int = 1,
            contrastive_temperature: float = 0.1, cf_sets: Optional[dict[str, TensorSet]] = None,
            eval_every: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train `student` against a frozen `teacher` on `train`; returns curves, heads, the teacher's
    logits on `cf_sets` and timing.

    loss: `ce` (labels only, no teacher), `kl`, `jacobian` ((1 - alpha) KL + alpha Jacobian
    distance) or `contrastive` ((1 - alpha) KL + alpha InfoNCE through trained projection heads).
    The teacher's outputs on the fixed training set are computed once, before the first step.
    """
    if loss not in LOSSES:
        raise UserError(f"unknown loss '{loss}'; use one of {', '.join(LOSSES)}")
    if estimator not in ("exact", "projection"):
        raise UserError(f"unknown Jacobian estimator '{estimator}'; use exact or projection")
    freeze(teacher.to(device))
    student.to(device).train()
    t_start = time.perf_counter()
    train = to_device(train, device)
    targets = {}
    if loss != "ce":
        targets = teacher_targets(teacher, train.x, need_jacobian=(loss == "jacobian"), method=jacobian_method,
                                  top_k=None if estimator == "projection" else top_k)
    params = list(student.parameters())
    heads = None
    if loss == "contrastive":
        heads = ContrastiveHeads(student.feature_dim, teacher.feature_dim).to(device)
        params += list(heads.parameters())  # the heads are trained with the student
    opt, sched = _optimizer(params, lr, steps, "adam")
    objective = distillation_objective(
        student, teacher, targets, loss=loss, alpha=alpha, temperature=temperature, t2_scale=t2_scale,
        jacobian_method=jacobian_method, top_k=top_k, estimator=estimator, projections=projections,
        contrastive_temperature=contrastive_temperature, heads=heads,
        generator=torch.Generator(device=device).manual_seed(seed))
    teacher_logits = {name: predict(teacher, s.x).cpu() for name, s in (cf_sets or {}).items()}
    batch_gen = torch.Generator().manual_seed(seed)
    curves: list[dict] = []
    t_prep = time.perf_counter() - t_start
    t_train = time.perf_counter()
    with _progress(steps, f"student ({loss})") as bar:
        for step, idx in enumerate(_batches(len(train.y), batch_size, steps, batch_gen), 1):
            idx = idx.to(device)
            total = objective(train.x[idx], train.y[idx], idx)
            _check_finite(total, step, "distillation")
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if eval_every and cf_sets and (step % eval_every == 0 or step == steps):
                metrics = evaluate_student(student, cf_sets, teacher_logits)
                curves.append({"step": step, "loss": total.item(), "eval": metrics})
                summary = "  ".join(f"{n} acc {m['acc']:.3f} agr {m['agreement']:.3f}" for n, m in metrics.items())
                log(f"  step {step:5d}  loss {total.item():.4f}  {summary}")
                student.train()
    train_s = time.perf_counter() - t_train
    return {"curves": curves, "heads": heads, "teacher_logits": teacher_logits,
            "timing": {"prepare_s": t_prep, "train_s": train_s, "steps_per_s": steps / max(train_s, 1e-9)}}


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

def add_common_args(parser: argparse.ArgumentParser, *, steps: int, teacher_steps: int, lr: float, teacher_lr: float,
                    teacher_width: int, student_width: int) -> None:
    """The flags every experiment shares: loss, training lengths, device, output. Each script adds
    its own data flags and passes defaults that run well on a laptop CPU."""
    g = parser.add_argument_group("distillation")
    g.add_argument("--loss", choices=LOSSES, default="kl",
                   help="ce: labels only (no teacher); kl: KL to the teacher's softened outputs; "
                        "jacobian: (1-alpha) KL + alpha Jacobian matching; contrastive: (1-alpha) KL + alpha InfoNCE")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the Jacobian or contrastive term (default 0.5)")
    g.add_argument("--temperature", type=float, default=4.0, help="KL distillation temperature T (default 4)")
    g.add_argument("--no-t2", action="store_true", help="do not multiply the KL term by T^2")
    g.add_argument("--jacobian-method", choices=JACOBIAN_METHODS, default="auto",
                   help="how exact Jacobians are computed; auto = the fastest measured for the device")
    g.add_argument("--jacobian-estimator", choices=("exact", "projection"), default="exact",
                   help="exact: all classes (or --top-k); projection: --projections random projections of the logits")
    g.add_argument("--projections", type=int, default=1, help="K for --jacobian-estimator projection (default 1)")
    g.add_argument("--top-k", type=int, default=None, help="match only the teacher's top-k classes' Jacobian rows")
    g.add_argument("--contrastive-temperature", type=float, default=0.1, help="InfoNCE temperature (default 0.1)")
    g = parser.add_argument_group("training")
    g.add_argument("--arch", choices=("cnn", "resnet18"), default="cnn", help="cnn (CPU-friendly) or resnet18 (GPU)")
    g.add_argument("--teacher-width", type=int, default=teacher_width, help=f"teacher width (default {teacher_width})")
    g.add_argument("--student-width", type=int, default=student_width, help=f"student width (default {student_width})")
    g.add_argument("--steps", type=int, default=steps, help=f"student training steps (default {steps})")
    g.add_argument("--teacher-steps", type=int, default=teacher_steps, help=f"teacher training steps (default {teacher_steps})")
    g.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    g.add_argument("--lr", type=float, default=lr, help=f"student's peak learning rate, Adam with cosine decay (default {lr})")
    g.add_argument("--teacher-lr", type=float, default=teacher_lr, help=f"teacher's peak learning rate (default {teacher_lr})")
    g.add_argument("--teacher-optimizer", choices=("sgd", "adam"), default="sgd",
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


def check_common_args(args) -> None:
    """Validate the shared flags; raise UserError with the fix."""
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
    if args.jacobian_method == "explicit" and args.arch != "cnn":  # before the teacher trains, not after
        raise UserError(f"--jacobian-method explicit needs the small CNN (--arch cnn), not {args.arch}; "
                        f"use loop or batched")


def distill_options(args) -> dict:
    """The keyword arguments of distill() that come straight from the shared flags."""
    return dict(loss=args.loss, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                alpha=args.alpha, temperature=args.temperature, t2_scale=not args.no_t2,
                jacobian_method=args.jacobian_method, top_k=args.top_k, estimator=args.jacobian_estimator,
                projections=args.projections, contrastive_temperature=args.contrastive_temperature,
                eval_every=args.eval_every or max(args.steps // 10, 1))


def teacher_floor(args, num_classes: int) -> float:
    """The accuracy a teacher must reach: --teacher-min-acc, or halfway between chance and 1."""
    chance = 1.0 / num_classes
    if args.teacher_min_acc is not None:
        return args.teacher_min_acc
    return 0.0 if args.smoke else chance + (1 - chance) / 2  # a smoke run checks the setup, not the teacher


def get_teacher(args, device: torch.device, build: Callable[[], nn.Module], train: TensorSet, heldout: TensorSet,
                data_key: dict) -> tuple[nn.Module, dict]:
    """Load the cached teacher or train it on `train`, then check it on `heldout` (held-out data
    of the teacher's own configuration): a teacher at chance or with non-finite weights stops the
    run before anything is distilled or cached. Returns (frozen teacher, record for the result).
    `data_key` names everything about the data that determines the teacher; the shared flags
    (architecture, init, width, steps, batch, lr, optimizer, seed, device type) are added."""
    key = {**data_key, "arch": args.arch, "init": "he", "width": args.teacher_width, "steps": args.teacher_steps,
           "batch_size": args.batch_size, "lr": args.teacher_lr, "optimizer": args.teacher_optimizer,
           "seed": args.seed, "device": device.type}
    record = {"cache_key": cache_key(key)}

    def train_it(model: nn.Module) -> nn.Module:
        return train_teacher(model, train, steps=args.teacher_steps, batch_size=args.batch_size, lr=args.teacher_lr,
                             device=device, seed=args.seed, optimizer=args.teacher_optimizer)

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
    start = time.perf_counter()
    teacher, cached = load_or_train_teacher(key, build, train_it, check, args.cache_dir, device,
                                            retrain=args.retrain_teacher)
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


def final_result(experiment: str, args, device: torch.device, teacher: nn.Module, student: nn.Module,
                 cf_sets: dict[str, TensorSet], student_heldout: TensorSet, run: dict, teacher_record: dict,
                 data_version: int) -> dict:
    """Check the student, evaluate teacher and student on every counterfactual set and assemble the
    result JSON. The teacher's logits on the sets come from `run` (distill computed them)."""
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
        "flags": flags,
        "provenance": {**environment(device), "data_version": data_version, "test_seed": TEST_SEED,
                       "teacher_cache_key": record["cache_key"]},
        "teacher": {**record, "eval": teacher_eval},
        "student": {"fit": fit, "eval": evaluate_student(student, cf_sets, teacher_logits), "curves": run["curves"]},
        "test_sizes": {name: len(s.y) for name, s in cf_sets.items()},
        "timing": {"teacher_train_s": train_s, **{f"student_{k}": v for k, v in run["timing"].items()}},
    }


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
    """Test set x (teacher acc, student acc, KL(T||S), agreement), then the result's flags."""
    teacher_eval, student_eval = result["teacher"]["eval"], result["student"]["eval"]
    log(f"{'test set':<12}{'teacher acc':>12}{'student acc':>12}{'KL(T||S)':>10}{'agreement':>11}")
    for name, m in student_eval.items():
        log(f"{name:<12}{teacher_eval[name]['acc']:>12.3f}{m['acc']:>12.3f}{m['kl']:>10.3f}{m['agreement']:>11.3f}")
    for flag in result["flags"]:
        log(f"FLAGGED: {flag}; read these numbers with care (analysis/ skips flagged runs)")
