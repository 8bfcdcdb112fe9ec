"""The science every experiment shares: configurations, models, losses, metrics and the training
loops, which read the settings of teacher and student (declared with their flags in `harness.py`,
the machinery around a run: command line, cache, result files). Each `exp_*.py` script builds its
own data. `README.md` defines the vocabulary (mechanisms I/A/B, configurations such as `I+rA`)."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

JACOBIAN_METHODS = ("auto", "explicit", "loop", "batched", "vmap")

if TYPE_CHECKING:  # the settings are declared with their flags in harness.py
    from harness import DistillSettings, TeacherSettings


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file): printed as one line, no traceback."""


# ----------------------------------------------------------------------------- data, configurations

class TensorSet(NamedTuple):
    """A data set as tensors: images [N, C, H, W] in [0, 1], labels [N], optional groups [N] and
    optional cue pixels [N, H, W] in [0, 1] where a test set's cue lies in each image (Waterbirds'
    background; a cue at the same pixels in every image needs none)."""
    x: torch.Tensor
    y: torch.Tensor
    group: Optional[torch.Tensor] = None
    region: Optional[torch.Tensor] = None


def parse_config(spec: str, letters: Optional[str] = None) -> dict[str, str]:
    """A configuration such as `IA`, `I+rA` or `rI+A` as {letter: label|random|absent}: upper-case
    letters carry the label, a part starting with `r` lists randomised ones, the `letters` not
    named are absent (without `letters`, any upper-case letter named is a mechanism)."""
    roles = {letter: "absent" for letter in letters or ""}
    for part in spec.split("+"):
        role, names = ("random", part[1:]) if part.startswith("r") else ("label", part)
        if not names:
            raise UserError(f"configuration '{spec}' has an empty part; write e.g. IA or I+rA")
        for letter in names:
            if letters is None and letter.isupper():
                roles.setdefault(letter, "absent")
            if letter not in roles:
                known = ", ".join(letters) if letters else "upper-case letters"
                raise UserError(f"configuration '{spec}' names mechanism '{letter}', but this data "
                                f"set has only {known}")
            if roles[letter] != "absent":
                raise UserError(f"configuration '{spec}' names mechanism '{letter}' twice")
            roles[letter] = role
    if "label" not in roles.values():
        raise UserError(f"configuration '{spec}' has no mechanism that carries the label "
                        f"(write at least one upper-case letter without r)")
    return roles


def spurious_values(y: torch.Tensor, frac: float, num_values: int,
                    generator: torch.Generator) -> torch.Tensor:
    """A cue that equals the label for exactly round(frac * N) samples (chosen at random) and takes
    one of the other values, uniformly, for the rest: P(cue == label) is exactly `frac`."""
    n = len(y)
    carries = torch.zeros(n, dtype=torch.bool)
    carries[torch.randperm(n, generator=generator)[:round(frac * n)]] = True
    other = (y + torch.randint(1, num_values, (n,), generator=generator)) % num_values
    return torch.where(carries, y, other)


# ----------------------------------------------------------------------------- models

def _layout(weight: torch.Tensor) -> torch.memory_format:
    """The memory layout of a convolution weight: channels-last (--channels-last) or the default."""
    cl = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


class SequentialNet(nn.Module):
    """A `body` (nn.Sequential) of convolutions, ReLUs, max-pools, pooling, flattening and linear
    layers, then a linear `classifier`: no BatchNorm, so input Jacobians never mix samples.
    He-normal weights and zero biases in the body (each of its layers is followed by a ReLU)."""

    def __init__(self, body: nn.Sequential, feature_dim: int, num_classes: int):
        super().__init__()
        self.body, self.feature_dim = body, feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)
        for m in body:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def input_vjp(self, x: torch.Tensor,
                  selectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and the rows selectors[k, b] . d logits_b / d x_b, [K, B, *x.shape[1:]],
        by a hand-written backward pass of ordinary ops, one per row after one forward pass. The
        rows equal autograd's; their derivative is faster on CPU: autograd differentiates its
        convolution backward with a slow weight-gradient formula, here it is a plain convolution."""
        tape = []
        h = x
        for layer in self.body:
            if isinstance(layer, nn.MaxPool2d):
                out, idx = F.max_pool2d(h, layer.kernel_size, layer.stride, return_indices=True)
                tape.append((layer, h.shape, idx))
            elif isinstance(layer, nn.Conv2d):  # stride 1, 'same' padding: its transpose is the
                out = layer(h)  # convolution with the flipped, in/out-swapped kernel
                tape.append((layer, h.shape, layer.weight.transpose(0, 1).flip(2, 3).contiguous(
                    memory_format=_layout(layer.weight))))
            else:
                out = layer(h)
                mask = (out > 0).to(out.dtype) if isinstance(layer, nn.ReLU) else None
                tape.append((layer, h.shape, mask))
            h = out
        logits = self.classifier(h)
        rows = []
        for sel in selectors:  # per row, not all K rows in one batch: faster on CPU for K = 10
            g = sel @ self.classifier.weight
            for layer, in_shape, saved in reversed(tape):
                if isinstance(layer, nn.Flatten):
                    g = g.reshape(in_shape)
                elif isinstance(layer, nn.AdaptiveAvgPool2d):  # output size 1: the map's mean
                    g = g.expand(in_shape) / (in_shape[2] * in_shape[3])
                elif isinstance(layer, nn.ReLU):
                    g = g * saved
                elif isinstance(layer, nn.MaxPool2d):
                    g = F.max_unpool2d(g, saved, layer.kernel_size, layer.stride,
                                       output_size=in_shape[2:])
                elif isinstance(layer, nn.Linear):
                    g = g @ layer.weight
                else:
                    g = F.conv2d(g, saved, padding=layer.padding)
            rows.append(g)
        return logits, torch.stack(rows)


class SmallCNN(SequentialNet):
    """Three conv blocks and global average pooling; `width` sets the size. He-normal init: with
    torch's default the pooled features barely vary between images (about 1e-3), and a local
    shape cue is not learned at all while a global one (a colour) is."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        w = width
        super().__init__(nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4 * w, num_classes)


class LeNet(SequentialNet):
    """LeNet-style: two 5x5 conv + max-pool blocks, then a fully connected layer on the flattened
    map. No global pooling: its head sees where things are in the image, a different inductive
    bias from SmallCNN's. `input_size` (H, W) sets the flattened size."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 input_size: tuple[int, int] = (28, 28)):
        w, (h, v) = width, input_size
        super().__init__(nn.Sequential(
            nn.Conv2d(in_channels, w, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * (h // 4) * (v // 4), 8 * w), nn.ReLU()), 8 * w, num_classes)


class TorchvisionNet(nn.Module):
    """torchvision's standard ResNet (resnet18, resnet50: ImageNet stem, widths and Kaiming fan-out
    init) with a linear `classifier` on its pooled features. It has BatchNorm: in training mode a
    sample's logits depend on its batch, so a student's Jacobian includes that (O(1/batch)) term.
    `pretrained`: ImageNet weights, with ImageNet's input normalisation inside the model, so that
    Jacobians are still taken on the [0, 1] image."""

    def __init__(self, arch: str, in_channels: int, num_classes: int, pretrained: bool = False):
        super().__init__()
        import torchvision
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1 if pretrained else None
        try:
            body = torchvision.models.get_model(arch, weights=weights)
        except Exception as e:  # offline (URLError), corrupt download, ...
            file = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
            raise UserError(f"cannot fetch torchvision's ImageNet weights for {arch} "
                            f"({type(e).__name__}); they are downloaded once to {file}: run once "
                            f"with internet access or copy the file there (TORCH_HOME moves the "
                            f"folder), or drop --pretrained")
        if in_channels != 3:
            body.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.arch, self.feature_dim, body.fc, self.body = (arch, body.fc.in_features,
                                                          nn.Identity(), body)
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if pretrained else (0.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHS = ("cnn", "lenet", "resnet18", "resnet50")


def build_model(arch: str, in_channels: int, num_classes: int, width: int,
                input_size: tuple[int, int] = (32, 32), pretrained: bool = False) -> nn.Module:
    """`cnn` (SmallCNN; width = channels of the first block), `lenet` (LeNet, the same, for images
    of `input_size`) or torchvision's `resnet18` / `resnet50` (standard widths, `width` unused)."""
    if arch == "cnn":
        return SmallCNN(in_channels, num_classes, width)
    if arch == "lenet":
        return LeNet(in_channels, num_classes, width, tuple(input_size))
    if arch in ARCHS:
        return TorchvisionNet(arch, in_channels, num_classes, pretrained)
    raise UserError(f"unknown architecture '{arch}'; use {', '.join(ARCHS)}")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher never changes during distillation."""
    return model.eval().requires_grad_(False)


class ContrastiveHeads(nn.Module):
    """Linear projections of student and teacher features to one space, trained with the student."""

    def __init__(self, student_dim: int, teacher_dim: int, dim: int = 128):
        super().__init__()
        self.student, self.teacher = nn.Linear(student_dim, dim), nn.Linear(teacher_dim, dim)


# ----------------------------------------------------------------------------- loss terms

def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
          t2: bool = True) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch mean, times T^2 when `t2` (Hinton's convention)."""
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature ** 2 if t2 else kl


def info_nce(student_features: torch.Tensor, teacher_features: torch.Tensor,
             heads: ContrastiveHeads, temperature: float = 0.1,
             labels: Optional[torch.Tensor] = None,
             bank_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-batch InfoNCE (CRD without the memory bank), symmetric: the positive of student sample i
    is teacher sample i, the batch's other samples are negatives. `bank_features`: the teacher's
    (precomputed, never stale) features of other training samples, extra negatives of the
    student-to-teacher direction. `labels`: only same-label negatives, which a cue that
    identifies the class cannot tell apart (a sample alone in its class adds log 1 = 0)."""
    zs = F.normalize(heads.student(student_features), dim=1)
    zt = F.normalize(heads.teacher(teacher_features), dim=1)
    logits = zs @ zt.t() / temperature
    if labels is not None:
        logits = logits.masked_fill(labels[:, None] != labels[None, :], float("-inf"))
    target = torch.arange(len(zs), device=zs.device)
    student_to_teacher = logits
    if bank_features is not None:
        zb = F.normalize(heads.teacher(bank_features), dim=1)
        student_to_teacher = torch.cat([logits, zs @ zb.t() / temperature], 1)
    return 0.5 * (F.cross_entropy(student_to_teacher, target)
                  + F.cross_entropy(logits.t(), target))


def class_selectors(num_classes: int, batch: int, device: torch.device,
                    classes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of the Jacobian to compute, as vectors over classes: [K, B, C]. All classes (K = C)
    by default, or per-sample classes `classes` [B, K] (the teacher's top-k)."""
    if classes is None:
        eye = torch.eye(num_classes, device=device)
        return eye[:, None, :].expand(num_classes, batch, num_classes)
    return F.one_hot(classes.t(), num_classes).float()


def projection_selectors(num_projections: int, batch: int, num_classes: int, device: torch.device,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random Gaussian directions over the classes, fresh per sample: [K, B, C], scaled by
    1/sqrt(K) so that E||V J||^2 = ||J||^2."""
    v = torch.randn(num_projections, batch, num_classes, device=device, generator=generator)
    return v / math.sqrt(num_projections)


def input_jacobian(model: nn.Module, x: torch.Tensor, selectors: torch.Tensor, create_graph: bool,
                   method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and rows of d logits / d input, ([B, C], [B, K, D]): row k of sample b is
    selectors[k, b] . d logits_b / d x_b, by one backward pass per row (`loop`), autograd's
    is_grads_batched (`batched`), torch.func (`vmap`), the model's `input_vjp` (`explicit`) or the
    fastest measured (`auto`); with `create_graph` they stay differentiable in the parameters."""
    if method == "auto":
        method = default_jacobian_method(x.device, model)
    x = x.detach().requires_grad_(method != "explicit")  # explicit never differentiates in x
    if method == "vmap":
        if any(isinstance(m, nn.BatchNorm2d) and m.training for m in model.modules()):
            raise UserError("--jacobian-method vmap cannot differentiate BatchNorm in training "
                            "mode; use loop or batched")
        logits, vjp_fn = torch.func.vjp(model, x)
        (rows,) = torch.func.vmap(vjp_fn)(selectors)
    elif method == "explicit":
        if not hasattr(model, "input_vjp"):
            raise UserError(f"--jacobian-method explicit needs the small CNN or LeNet (--arch cnn "
                            f"or lenet), not {type(model).__name__}; use loop or batched")
        with torch.set_grad_enabled(create_graph):
            logits, rows = model.input_vjp(x, selectors)
    else:
        with torch.enable_grad():
            logits = model(x)
            if method == "batched":
                (rows,) = torch.autograd.grad(logits, x, selectors, is_grads_batched=True,
                                              create_graph=create_graph, retain_graph=create_graph)
            else:  # loop
                rows = torch.stack([torch.autograd.grad(logits, x, sel, create_graph=create_graph,
                                                        retain_graph=True)[0]
                                    for sel in selectors])
    if not create_graph:
        rows, logits = rows.detach(), logits.detach()
    return logits, rows.flatten(2).transpose(0, 1)


def jacobian_distance(student_jac: torch.Tensor, teacher_jac: torch.Tensor,
                      eps: float = 1e-8) -> torch.Tensor:
    """Batch mean of || Jt/|Jt| - Js/|Js| ||_2, each sample's Jacobian flattened, L2-normalised."""
    js, jt = student_jac.flatten(1), teacher_jac.flatten(1)
    js = js / (js.norm(dim=1, keepdim=True) + eps)
    jt = jt / (jt.norm(dim=1, keepdim=True) + eps)
    return torch.linalg.vector_norm(jt - js, dim=1).mean()


def default_jacobian_method(device: torch.device, model: Optional[nn.Module] = None) -> str:
    """The fastest exact method measured (analysis/bench_losses.py): `batched` on CUDA; on a CPU
    the model's hand-written backward pass, else one backward pass per class."""
    if device.type != "cpu":
        return "batched"
    return "explicit" if hasattr(model, "input_vjp") else "loop"


def top_classes(teacher_logits: torch.Tensor, top_k: Optional[int]) -> Optional[torch.Tensor]:
    """The teacher's top-k classes per sample, [B, k], whose Jacobian rows are matched; None when
    `top_k` is unset or covers every class (then all rows are)."""
    if top_k is None or top_k >= teacher_logits.shape[1]:
        return None
    return teacher_logits.topk(top_k, 1).indices


# ----------------------------------------------------------------------------- losses

class Batch(NamedTuple):
    """What a loss sees at one step: the teacher's precomputed `targets` on the training set, the
    batch (`idx`: its rows there), the loss's trained auxiliary module, the run's generator."""
    student: nn.Module
    teacher: nn.Module
    targets: dict
    settings: DistillSettings
    aux: Optional[nn.Module]
    generator: Optional[torch.Generator]
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor


def mixture_kl(b: Batch, student_logits: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The KL term of (1 - alpha) KL + alpha term: no T^2 unless `mixture_t2`."""
    s = b.settings
    return 1 - s.alpha, kd_kl(student_logits, b.targets["logits"][b.idx], s.temperature,
                              s.mixture_t2)


def ce_terms(b: Batch) -> dict:
    return {"ce": (1.0, F.cross_entropy(b.student(b.x), b.y))}


def kl_terms(b: Batch) -> dict:
    s = b.settings
    return {"kl": (1.0, kd_kl(b.student(b.x), b.targets["logits"][b.idx], s.temperature, s.t2))}


def jacobian_terms(b: Batch) -> dict:
    """Where the teacher's Jacobians did not fit in memory they are computed per batch."""
    s, num_classes = b.settings, b.targets["logits"].shape[1]
    if s.jacobian_estimator == "projection":
        sel = projection_selectors(s.projections, len(b.x), num_classes, b.x.device, b.generator)
    else:
        top = top_classes(b.targets["logits"][b.idx], s.top_k)
        sel = class_selectors(num_classes, len(b.x), b.x.device, top)
    s_logits, s_jac = input_jacobian(b.student, b.x, sel, True, s.jacobian_method)
    if "jacobian" not in b.targets:  # too large to precompute: run the teacher on this batch
        t_jac = input_jacobian(b.teacher, b.x, sel, False, s.jacobian_method)[1]
    elif s.jacobian_estimator == "projection":  # project the precomputed full Jacobian
        t_jac = torch.einsum("kbc,bcd->bkd", sel, b.targets["jacobian"][b.idx])
    else:
        t_jac = b.targets["jacobian"][b.idx]
    return {"kl": mixture_kl(b, s_logits), "jacobian": (s.alpha, jacobian_distance(s_jac, t_jac))}


def contrastive_terms(b: Batch) -> dict:
    s, features = b.settings, b.targets["features"]
    student_features = b.student.features(b.x)
    bank = None
    if s.contrastive_negatives == "dataset":  # other training samples than the batch's
        others = torch.ones(len(features), dtype=torch.bool, device=b.idx.device)
        others[b.idx] = False
        pool = others.nonzero().squeeze(1)
        pick = torch.randperm(len(pool), generator=b.generator, device=pool.device)
        bank = features[pool[pick[:s.contrastive_bank]]]
    labels = b.y if s.contrastive_negatives == "same-class" else None
    aux = info_nce(student_features, features[b.idx], b.aux, s.contrastive_temperature, labels,
                   bank)
    return {"kl": mixture_kl(b, b.student.classifier(student_features)), "infonce": (s.alpha, aux)}


class Loss(NamedTuple):
    """A loss in one place: its terms for one batch ({name: (weight, value)}), what it reads of
    the teacher's targets, the default `alpha` of its own term in (1 - alpha) KL + alpha term
    (None: plain; a script's ALPHA overrides it) and the trained module it builds, if any."""
    terms: Callable[[Batch], dict]
    needs: tuple = ()  # of "logits", "features", "jacobian"
    alpha: Optional[float] = None
    aux: Optional[Callable[[nn.Module, nn.Module, DistillSettings], nn.Module]] = None


LOSSES = {
    "ce": Loss(ce_terms),
    "kl": Loss(kl_terms, ("logits",)),
    "jacobian": Loss(jacobian_terms, ("logits", "jacobian"), alpha=0.5),
    "contrastive": Loss(contrastive_terms, ("logits", "features"), alpha=0.5,
                        aux=lambda s, t, cfg: ContrastiveHeads(s.feature_dim, t.feature_dim,
                                                               cfg.contrastive_dim)),
}


def with_alpha(settings: DistillSettings, alphas: Optional[dict] = None) -> DistillSettings:
    """The settings with the weight their loss uses: none for ce and kl; for a mixture the given
    alpha, else `alphas[loss]` (a script's ALPHA), else the loss's own default."""
    default = LOSSES[settings.loss].alpha
    if default is None:
        return replace(settings, alpha=None)
    if settings.alpha is None:
        return replace(settings, alpha=(alphas or {}).get(settings.loss, default))
    return settings


def total_loss(terms: dict) -> torch.Tensor:
    """weight_1 x value_1 + weight_2 x value_2 + ..., in the terms' order."""
    weighted = [weight * value for weight, value in terms.values()]
    return weighted[0] if len(weighted) == 1 else sum(weighted[1:], weighted[0])


def term_grad_norms(terms: dict, params: list) -> dict[str, float]:
    """The L2 norm of each weighted term's gradient with respect to `params` (the student's), which
    says which term drives training; the graph is kept for the update that follows."""
    norms = {}
    for name, (weight, value) in terms.items():
        grads = torch.autograd.grad(weight * value, params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    return norms


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


@torch.no_grad()
def features_of(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate features (`model.features`) in eval mode, in large batches without autograd,
    on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model.features(x[i:i + batch_size].to(device)).flatten(1)
                     for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def representation_metrics(student_features: dict[str, torch.Tensor],
                           teacher_features: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per test set, how alike student's and teacher's penultimate features (`features_of` on the
    set) are: linear CKA and orthogonal Procrustes distance over the set's samples."""
    return {name: {"cka": linear_cka(fs, teacher_features[name]),
                   "procrustes": procrustes_distance(fs, teacher_features[name])}
            for name, fs in student_features.items()}


def class_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 256) -> torch.Tensor:
    """Where a model looks: the input gradient of each sample's label logit, [N, C, H, W], in
    eval mode (plain gradient saliency, the quantity Jacobian matching aligns)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).requires_grad_(True)
        with torch.enable_grad():
            score = model(xb).gather(1, y[i:i + batch_size].to(device)[:, None]).sum()
            (grad,) = torch.autograd.grad(score, xb)
        out.append(grad.cpu())
    model.train(was_training)
    return torch.cat(out)


def region_share(grad: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of the saliency's squared norm on the pixels of `region` ([H, W], or
    [N, H, W] per sample; bool or weights in [0, 1]): 1 for a model that reads only those pixels,
    their share of the image for one that looks everywhere alike."""
    mass = grad.pow(2).sum(1)
    return (mass * region).flatten(1).sum(1) / mass.flatten(1).sum(1).clamp_min(1e-30)


def chroma_share(grad: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of the saliency's squared norm in colour: the part of each pixel's
    gradient orthogonal to grey (equal change of all channels), which changes hue, not
    brightness. 1 for a model that reads only colour, 0 for one that reads only brightness."""
    chroma = grad - grad.mean(1, keepdim=True)
    return chroma.pow(2).flatten(1).sum(1) / grad.pow(2).flatten(1).sum(1).clamp_min(1e-30)


def on_pixels(region: torch.Tensor) -> Callable[[torch.Tensor, TensorSet], torch.Tensor]:
    """A cue at the same pixels of every image ([H, W]): its share of a saliency batch."""
    return lambda grad, test_set: region_share(grad, region)


def on_own_pixels(grad: torch.Tensor, test_set: TensorSet) -> torch.Tensor:
    """A cue at pixels each test image names (its set's `region`)."""
    return region_share(grad, test_set.region)


def on_colour(grad: torch.Tensor, test_set: TensorSet) -> torch.Tensor:
    """The colour of the image (chroma_share)."""
    return chroma_share(grad)


def look_of(model: nn.Module, test_sets: dict[str, TensorSet],
            cues: dict[str, Callable[[torch.Tensor, TensorSet], torch.Tensor]]) -> dict[str, dict]:
    """Per test set, where one model looks: its saliency map (each pixel's norm of the label
    logit's input gradient, [N, H * W]) and each cue's mean share of the saliency (`cues`: name
    -> per-sample share of the set's gradients: on_pixels, on_own_pixels, on_colour). A teacher's
    is the same for all its students, so a grid engine computes it once per teacher."""
    out = {}
    for name, s in test_sets.items():
        grad = class_saliency(model, s.x, s.y)
        out[name] = {"map": grad.pow(2).sum(1).sqrt().flatten(1),
                     "cue_share": {c: float(share(grad, s).mean()) for c, share in cues.items()}}
    return out


def saliency_metrics(student_look: dict[str, dict], teacher_look: dict[str, dict]
                     ) -> dict[str, dict]:
    """Per test set, where student and teacher look (`look_of` each): each one's cue shares and
    the mean cosine of their saliency maps."""
    return {name: {"student": s["cue_share"], "teacher": teacher_look[name]["cue_share"],
                   "cosine": float(F.cosine_similarity(s["map"], teacher_look[name]["map"],
                                                       dim=1).mean())}
            for name, s in student_look.items()}


def group_accuracy(pred: torch.Tensor, y: torch.Tensor, group: torch.Tensor) -> dict[str, float]:
    """Accuracy per group present, their unweighted mean and the worst group."""
    per_group = {int(g): (pred[group == g] == y[group == g]).float().mean().item()
                 for g in torch.unique(group)}
    return {"groups": {str(g): a for g, a in sorted(per_group.items())},
            "mean_group_acc": float(np.mean(list(per_group.values()))),
            "worst_group_acc": min(per_group.values())}


def cohen_kappa(pred_a: torch.Tensor, pred_b: torch.Tensor, num_classes: int) -> float:
    """Agreement of two models' predictions beyond what their class frequencies give by chance
    (Cohen, 1960): (p_o - p_e) / (1 - p_e), p_e = sum_k P(a = k) P(b = k). 1: the same answers;
    0: no more agreement than chance (also when both always answer one class, p_e = 1)."""
    p_o = (pred_a == pred_b).double().mean()
    freq = [torch.bincount(p, minlength=num_classes).double() / len(p) for p in (pred_a, pred_b)]
    p_e = (freq[0] * freq[1]).sum()
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 - 1e-12 else 0.0


def error_consistency(correct_a: torch.Tensor, correct_b: torch.Tensor) -> float:
    """Whether two models err on the same samples beyond what their accuracies give by chance
    (Geirhos et al., 2020): kappa of the right/wrong patterns, (c_obs - c_exp) / (1 - c_exp) with
    c_exp = p_a p_b + (1 - p_a)(1 - p_b). 0 when c_exp = 1 (one model always right or wrong)."""
    p_a, p_b = correct_a.double().mean(), correct_b.double().mean()
    c_obs = (correct_a == correct_b).double().mean()
    c_exp = p_a * p_b + (1 - p_a) * (1 - p_b)
    return float((c_obs - c_exp) / (1 - c_exp)) if c_exp < 1 - 1e-12 else 0.0


def _centered(features: torch.Tensor) -> torch.Tensor:
    f = features.double().flatten(1)
    return f - f.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two models' features on the same n samples ([n, d1], [n, d2]): the biased
    HSIC estimator of Kornblith et al. (2019) on all n samples at once, on centred features,
    ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F). 1 for features equal up to rotation and scale; 0 when
    either is constant."""
    x, y = _centered(x), _centered(y)
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / denom) if denom > 0 else 0.0


def procrustes_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Orthogonal Procrustes distance of two models' features on the same samples (Ding et al.,
    2021): both centred and scaled to unit Frobenius norm, the distance left after the best
    rotation of one onto the other, sqrt(2 - 2 ||X'Y||_*) (nuclear norm); 0 for features equal
    up to rotation and scale, at most sqrt(2). Unlike CKA it weighs every direction of the
    features by its size, so it sees a difference in a small direction that CKA misses."""
    x, y = _centered(x), _centered(y)
    nx, ny = torch.linalg.matrix_norm(x), torch.linalg.matrix_norm(y)
    if nx == 0 or ny == 0:
        return math.sqrt(2)
    nuclear = torch.linalg.matrix_norm((x / nx).T @ (y / ny), ord="nuc")
    return math.sqrt(max(0.0, 2 - 2 * float(nuclear)))


def pair_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                 group: Optional[torch.Tensor] = None) -> dict:
    """Student accuracy, KL(teacher || student) at T = 1 (mean over samples), top-1 agreement,
    and agreement corrected for chance: Cohen's kappa of the predictions, error consistency."""
    s_pred, t_pred = student_logits.argmax(1), teacher_logits.argmax(1)
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                  log_target=True, reduction="batchmean")
    out = {"acc": (s_pred == y).float().mean().item(), "kl": kl.item(),
           "agreement": (s_pred == t_pred).float().mean().item(),
           "kappa": cohen_kappa(s_pred, t_pred, student_logits.shape[1]),
           "error_consistency": error_consistency(s_pred == y, t_pred == y)}
    if group is not None:
        out.update(group_accuracy(s_pred, y, group))
        out["group_agreement"] = {str(int(g)): (s_pred[group == g] == t_pred[group == g])
                                  .float().mean().item() for g in torch.unique(group)}
    return out


def teacher_metrics(teacher_logits: torch.Tensor, y: torch.Tensor,
                    group: Optional[torch.Tensor] = None) -> dict:
    pred = teacher_logits.argmax(1)
    return {"acc": (pred == y).float().mean().item(),
            **(group_accuracy(pred, y, group) if group is not None else {})}


def evaluate_logits(student_logits: dict[str, torch.Tensor], test_sets: dict[str, TensorSet],
                    teacher_logits: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Student metrics on every named test set from its logits, against the teacher's."""
    return {name: pair_metrics(student_logits[name], teacher_logits[name], s.y.cpu(),
                               None if s.group is None else s.group.cpu())
            for name, s in test_sets.items()}


def evaluate_student(student: nn.Module, test_sets: dict[str, TensorSet],
                     teacher_logits: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Student metrics on every named test set, against the teacher's (precomputed) logits."""
    return evaluate_logits({name: predict(student, s.x).cpu() for name, s in test_sets.items()},
                           test_sets, teacher_logits)


def curves_against(curves: list[dict], curve_logits: list[dict], test_sets: dict[str, TensorSet],
                   teacher_logits: dict[str, torch.Tensor]) -> list[dict]:
    """`curves` of a student that never read its teacher (ce), evaluated against another teacher
    from the student's logits at each point (`distill(..., keep_logits=True)`)."""
    return [{**point, "eval": evaluate_logits(logits, test_sets, teacher_logits)}
            for point, logits in zip(curves, curve_logits)]


# ----------------------------------------------------------------------------- training

def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """(step, indices) of `steps` mini-batches, reshuffled every epoch, the last partial batch
    dropped."""
    batch_size = min(batch_size, n)
    step = 0
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(n // batch_size):
            if step == steps:
                return
            step += 1
            yield step, perm[i * batch_size:(i + 1) * batch_size]


def _optimizer(params, settings, kind: str):
    """SGD with Nesterov momentum or Adam, with cosine decay from lr to lr * min_lr_frac, after a
    linear warm-up over the first `settings.warmup` steps where the settings have one."""
    if kind == "adam":
        opt = torch.optim.Adam(params, lr=settings.lr)
    else:
        opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, nesterov=True,
                              weight_decay=settings.weight_decay)
    steps, floor, warmup = max(settings.steps, 1), settings.min_lr_frac, getattr(
        settings, "warmup", 0)
    if not warmup:
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps,
                                                               eta_min=settings.lr * floor)

    def factor(step: int) -> float:  # of lr at `step` (0 before the first update)
        cosine = floor + (1 - floor) * (1 + math.cos(math.pi * min(step, steps) / steps)) / 2
        return min(1.0, (step + 1) / (warmup + 1)) * cosine
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _update(loss: torch.Tensor, opt, sched, step: int, what: str) -> None:
    """One optimiser step on `loss`, unless it is not finite: then stop the run with the fix."""
    if not torch.isfinite(loss):
        raise UserError(f"the {what} loss became {loss.item()} at step {step}; no result was "
                        f"written. Lower --lr or --alpha and run again")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def shifted(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of [B, C, H, W] moved by its own random offset of at most `shift` pixels per
    axis, zeros filling in: a teacher that sees its few training digits at other positions
    generalises to new ones better."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    dy, dx = (torch.randint(2 * shift + 1, (2, b), generator=generator).to(x.device))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    padded = F.pad(x, (shift, shift, shift, shift))
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]


def in_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model with its convolution weights in channels-last memory layout when asked (small-CNN
    KL steps 1.4-2 times faster on a CPU, float-level different numbers), else unchanged."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_teacher(model: nn.Module, train: TensorSet, settings: TeacherSettings,
                  device: torch.device, channels_last: bool = False) -> nn.Module:
    """Cross-entropy training as `settings` say; returns the model frozen in eval mode."""
    in_format(model.to(device), channels_last).train()
    train = TensorSet(*(None if t is None else t.to(device) for t in train))  # batches: indexing
    opt, sched = _optimizer(model.parameters(), settings, settings.optimizer)
    gen = torch.Generator().manual_seed(settings.seed)
    with tqdm(total=settings.steps, desc="teacher", disable=None, leave=False) as bar:
        for step, idx in _batches(len(train.y), settings.batch_size, settings.steps, gen):
            idx = idx.to(device)
            loss = F.cross_entropy(model(shifted(train.x[idx], settings.shift, gen)), train.y[idx])
            _update(loss, opt, sched, step, "teacher")
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    return freeze(model)


def teacher_targets(teacher: nn.Module, x: torch.Tensor, needs: tuple = ("logits", "features"),
                    top_k: Optional[int] = None, method: str = "auto", batch_size: int = 256,
                    max_bytes: float = 2e9) -> dict:
    """The teacher's outputs a loss `needs` on the fixed training set, computed once: logits
    (always), features, input Jacobians (when they fit in `max_bytes`)."""
    device = next(teacher.parameters()).device
    out = {"logits": predict(teacher, x, batch_size)}
    if "features" in needs:
        out["features"] = features_of(teacher, x)
    num_classes = out["logits"].shape[1]
    rows = num_classes if top_k is None else min(top_k, num_classes)
    if "jacobian" in needs and len(x) * rows * x[0].numel() * 4 <= max_bytes:
        jacs = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            top = top_classes(out["logits"][i:i + batch_size], top_k)
            sel = class_selectors(num_classes, len(xb), device, top)
            jacs.append(input_jacobian(teacher, xb, sel, create_graph=False, method=method)[1])
        out["jacobian"] = torch.cat(jacs)
    return out


def distillation_objective(student: nn.Module, teacher: nn.Module, targets: dict,
                           settings: DistillSettings, aux: Optional[nn.Module] = None,
                           generator: Optional[torch.Generator] = None) -> Callable[..., dict]:
    """The loss of one batch as named terms: objective(x, y, idx) -> {name: (weight, value)},
    e.g. {"kl": (1 - alpha, KL), "jacobian": (alpha, distance)}; `total_loss` sums them."""
    terms, settings = LOSSES[settings.loss].terms, with_alpha(settings)

    def objective(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict:
        return terms(Batch(student, teacher, targets, settings, aux, generator, x, y, idx))
    return objective


def distill(student: nn.Module, teacher: nn.Module, train: TensorSet, settings: DistillSettings,
            device: torch.device, test_sets: Optional[dict[str, TensorSet]] = None,
            log: Callable[[str], None] = print, teacher_logits: Optional[dict] = None,
            keep_logits: bool = False, channels_last: bool = False) -> dict:
    """Train `student` against a frozen `teacher` on `train`; returns the curves (metrics on
    `test_sets` every eval_every steps), the loss's trained module, the teacher's logits on
    `test_sets` (computed here unless given) and timing. The teacher's outputs on `train` are
    computed once, before step 1. `keep_logits`: the student's test-set logits of each curve point
    too (`curve_logits`), to evaluate the same student against other teachers."""
    loss, settings = LOSSES[settings.loss], with_alpha(settings)
    freeze(in_format(teacher.to(device), channels_last))
    in_format(student.to(device), channels_last).train()
    t_start = time.perf_counter()
    train = TensorSet(*(None if t is None else t.to(device) for t in train))
    top_k = None if settings.jacobian_estimator == "projection" else settings.top_k
    targets = teacher_targets(teacher, train.x, loss.needs, top_k, settings.jacobian_method) \
        if loss.needs else {}
    aux = loss.aux(student, teacher, settings).to(device) if loss.aux else None
    params = list(student.parameters()) + (list(aux.parameters()) if aux else [])  # aux: trained
    opt, sched = _optimizer(params, settings, "adam")
    objective = distillation_objective(student, teacher, targets, settings, aux,
                                       torch.Generator(device=device).manual_seed(settings.seed))
    if teacher_logits is None:
        teacher_logits = {name: predict(teacher, s.x).cpu()
                          for name, s in (test_sets or {}).items()}
    batch_gen = torch.Generator().manual_seed(settings.seed)
    curves, curve_logits, every = [], [], settings.eval_every or 0
    t_train = time.perf_counter()
    with tqdm(total=settings.steps, desc=f"student ({settings.loss})", disable=None,
              leave=False) as bar:  # a bar on a terminal, silent in logs
        for step, idx in _batches(len(train.y), settings.batch_size, settings.steps, batch_gen):
            idx = idx.to(device)
            terms = objective(train.x[idx], train.y[idx], idx)
            total = total_loss(terms)
            evaluate = every and test_sets and (step % every == 0 or step == settings.steps)
            if evaluate:  # each term's pull on the student, measured before this step's update
                grad_norms = term_grad_norms(terms, list(student.parameters()))
            _update(total, opt, sched, step, "distillation")
            bar.update(1)
            if evaluate:
                student_logits = {name: predict(student, s.x).cpu()
                                  for name, s in test_sets.items()}
                metrics = evaluate_logits(student_logits, test_sets, teacher_logits)
                if keep_logits:
                    curve_logits.append(student_logits)
                curves.append({"step": step, "loss": total.item(), "eval": metrics,
                               "terms": {n: {"weight": w, "value": v.item(),
                                             "grad_norm": grad_norms[n]}
                                         for n, (w, v) in terms.items()}})
                pulls = "  ".join(f"{n} {v.item():.4f} (x{w:g}, |grad| {grad_norms[n]:.2e})"
                                  for n, (w, v) in terms.items())
                summary = "  ".join(f"{n} acc {m['acc']:.3f} agr {m['agreement']:.3f}"
                                    for n, m in metrics.items())
                log(f"  step {step:5d}  loss {total.item():.4f}  {pulls}\n             {summary}")
                student.train()
    train_s = time.perf_counter() - t_train
    return {"curves": curves, "aux": aux, "teacher_logits": teacher_logits,
            **({"curve_logits": curve_logits} if keep_logits else {}),
            "timing": {"prepare_s": t_train - t_start, "train_s": train_s,
                       "steps_per_s": settings.steps / max(train_s, 1e-9)}}
