"""Waterbirds: does the student learn the bird (I) from its teacher, or the background shortcut (A)?

Mechanism I is the bird type (landbird 0, waterbird 1), mechanism A the background (land 0,
water 1). Each image belongs to one of four groups, group = 2 * bird + background:
0 landbird/land, 1 landbird/water, 2 waterbird/land, 3 waterbird/water. By default the teacher
learns on group-balanced images (`I+rA`: the background says nothing about the bird) and the
student is distilled on images whose background matches the bird for 95 % of them (`IA`), as in
the real data set's training split. Counterfactual test sets, built from the same held-out birds
and backgrounds, then ask which mechanism the student uses:

  I         bird on a neutral background    (is the bird enough on its own?)
  A         background only, no bird        (label = background: does the model read it?)
  IA        bird on the matching background (the majority groups 0 and 3)
  I+rA      bird on a random background     (all four groups, balanced: the usual test set)
  minority  bird on the other background    (the minority groups 1 and 2 alone)

Per-group accuracy, the average accuracy weighted by the groups' shares of the student's
training set (as group_DRO, JTT and DFR report it), the unweighted mean over groups
(mean_group_acc) and worst-group accuracy are reported for the sets that have groups; a plain
model trained on the 95 % split is expected to show a worst group far below its average.

Every set is drawn from its own random stream (harness.stream). Validation scenes, drawn apart
from the training and test scenes (real data: the `val` split), decide the teacher's floor, the
student's fit and the choice of alpha; no test set uses them.

Generated data (the default, offline). Every image is drawn from random parameters with tensor
ops, at --image-size pixels (32):
- backgrounds: a pale sky above a horizon at a random height; below it, water (blues, darker
  with depth, with sine waves whose frequency grows towards the viewer) or land (greens and
  browns with a smooth random texture and, in 60 % of the scenes, a row of trees: dark round
  crowns on brown trunks);
- birds: a large silhouette (about 0.3 to 0.9 of the image wide, 0.35 to 0.7 high) built from
  ellipses and (tapered) capsules, with a darker wing, a random colour (uninformative), size,
  position, rotation (+-25 degrees) and facing. The classes differ in coarse shape: a landbird
  stands upright (tall oval body, big head on top, short beak, tail pointing down, legs), a
  waterbird is long and low (flat body, thick neck with a random lean, small head, long bill, no
  legs);
- the bird is alpha-composited (anti-aliased edge) on a background; the neutral background is
  the mean of the land and water backgrounds of the same split.
Classes are balanced. A background that carries the label matches the bird for exactly
round(f * N) training (and validation) images (--spurious-frac f); the test sets are
group-balanced and fixed for every seed.

Real data: `--data waterbirds --data-root DIR` reads the standard folder (metadata.csv with
img_filename, y, split, place and the images it names). Its training split keeps its own
spurious fraction (`IA`); `I+rA` resamples it to balanced groups. The folder holds no bird masks,
so only the group test sets (IA, I+rA = the whole test split, minority) can be built from it.
ImageNet backbones: `--arch resnet18|resnet50 [--pretrained]` (torchvision's models).

    python exp_waterbirds.py --loss jacobian
"""
import argparse
import csv
import math
import os
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness

EXPERIMENT = "waterbirds"
MECHANISMS = "IA"
TEST_CONFIGS = ("I", "A", "IA", "I+rA", "minority")
# bump when the generator changes (part of the teacher cache key and of every result)
DATA_VERSION = 3
MAX_IMAGE_SIZE = 512
REAL_CONFIGS = ("IA", "I+rA")  # what the real folder can give without bird masks
NUM_CLASSES = 2
GROUP_NAMES = ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")
METADATA_COLUMNS = ("img_filename", "y", "split", "place")

# ----------------------------------------------------------------------------- settings
# How teacher and student are trained: the values that differ from harness.TeacherSettings' and
# harness.DistillSettings' defaults. Every field is a flag (--teacher-steps, --lr, ...); the run
# prints both settings and the result JSON stores them as the run used them.
TEACHER = harness.TeacherSettings(lr=0.02)  # 1,500 steps: at 1,000 seed 3 missed its bar
DISTILL = harness.DistillSettings(width=8, steps=400, lr=0.003)
# The weight of the Jacobian or contrastive term in (1 - alpha) KL + alpha term, per loss: the
# largest that keeps the student's validation fit within one point of plain KL's (docs/transfer.md).
ALPHA = {"jacobian": 0.9, "contrastive": 0.5}

# ----------------------------------------------------------------------------- flags

parser, g = harness.experiment_parser(
    __doc__, teacher_config="I+rA", student_config="IA",
    epilog="Configurations: IA (background matches the bird for --spurious-frac of the images), "
           "I+rA (random background), I (neutral background), A (no bird). --arch resnet18 and "
           "resnet50 are torchvision's ImageNet ResNets (--teacher-width and --student-width do "
           "not apply).")
g.add_argument("--spurious-frac", type=float, default=None,
               help="fraction of training images whose background matches the bird, where A "
                    "carries the label (generated data only; default 0.95)")
g.add_argument("--data", choices=("generated", "waterbirds"), default="generated",
               help="generated: drawn by this script, offline (default); waterbirds: the real "
                    "folder at --data-root")
g.add_argument("--data-root", default=None,
               help="the Waterbirds folder holding metadata.csv (with --data waterbirds)")
g.add_argument("--n-train", type=int, default=None,
               help="training images (generated: how many to draw, default 4000; "
                    "waterbirds: a random subset, default all)")
g.add_argument("--n-test", type=int, default=None,
               help="test images per set (generated: default 800; waterbirds: a random subset, "
                    "default all)")
g.add_argument("--image-size", type=int, default=32,
               help="images are SIZE x SIZE pixels (default 32)")
g.add_argument("--pretrained", action="store_true",
               help="start teacher and student from torchvision's ImageNet weights (with --arch "
                    "resnet18 or resnet50)")
harness.add_settings_flags(parser, TEACHER, DISTILL, ALPHA)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags, with --smoke's sizes and the generated data's --spurious-frac default (0.95)
    applied; every value checked (UserError names the fix)."""
    args = harness.parse_common(parser, argv, ALPHA)
    if args.smoke:
        args.n_train, args.n_test = args.n_train or 256, args.n_test or 64
    if not 16 <= args.image_size <= MAX_IMAGE_SIZE or min(args.n_train or 0, args.n_test or 0) < 0:
        raise common.UserError(f"--image-size must be between 16 and {MAX_IMAGE_SIZE}; --n-train "
                               f"and --n-test at least 0")
    if args.pretrained and {args.arch, args.student_arch or args.arch} & {"cnn", "lenet"}:
        raise common.UserError("--pretrained needs an ImageNet architecture: add --arch resnet18 "
                               "or --arch resnet50")
    for config in (args.teacher_config, args.student_config):
        common.parse_config(config, MECHANISMS)
    if args.data == "waterbirds":
        if not args.data_root:
            raise common.UserError("--data waterbirds needs --data-root DIR, the folder that holds "
                                   "metadata.csv")
        if args.spurious_frac is not None:
            raise common.UserError("--spurious-frac applies to the generated data only; the real "
                                   "training split keeps its own")
        for config in (args.teacher_config, args.student_config):
            if config not in REAL_CONFIGS:
                raise common.UserError(f"configuration '{config}' cannot be built from the real "
                                       f"folder (no bird masks); use IA (the training split) or "
                                       f"I+rA (resampled to balanced groups)")
        return args
    if args.data_root:
        raise common.UserError("--data-root is read only with --data waterbirds")
    args.spurious_frac = harness.check_value(
        0.95 if args.spurious_frac is None else args.spurious_frac, "fraction", "--spurious-frac")
    if ((args.n_train is not None and args.n_train < 8)
            or (args.n_test is not None and args.n_test < 8)):
        raise common.UserError("--n-train and --n-test must be at least 8 for the generated data")
    # a scene holds about 16 float channels (bird, mask, two backgrounds, composed images)
    needed = ((args.n_train or 4000) + (args.n_test or 800)) * 16 * args.image_size ** 2 * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory / 2:
        raise common.UserError(f"--image-size {args.image_size} with {args.n_train or 4000} "
                               f"training and {args.n_test or 800} test images needs about "
                               f"{needed / 2 ** 30:.0f} GiB of memory, more than half of this "
                               f"machine's {memory / 2 ** 30:.0f} GiB; lower --image-size or "
                               f"--n-train")
    return args


# ----------------------------------------------------------------------------- generated data

def _grid(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in [-1, 1], y pointing up, broadcastable to [n, 1, size, size]."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return (c.view(1, 1, 1, size).expand(n, 1, size, size),
            (-c).view(1, 1, size, 1).expand(n, 1, size, size))


def _u(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """Uniform per-sample values shaped [n, 1, 1, 1]."""
    return (lo + (hi - lo) * torch.rand(n, generator=gen)).view(n, 1, 1, 1)


def _hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] to RGB, element-wise; inputs [n, 1, 1, 1], output [n, 3, 1, 1]."""
    k = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (k + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _ellipse(x, y, cx, cy, a, b):
    """Approximate signed distance to an ellipse (negative inside), in shape units."""
    radius = torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return (torch.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) - 1) * radius


def _capsule(x, y, px, py, qx, qy, r0, r1):
    """Approximate signed distance to a segment P-Q whose radius tapers from r0 to r1."""
    dx, dy = qx - px, qy - py
    h = torch.clamp(((x - px) * dx + (y - py) * dy) / (dx * dx + dy * dy), 0, 1)
    return torch.sqrt((x - px - h * dx) ** 2 + (y - py - h * dy) ** 2) - (r0 + (r1 - r0) * h)


BIRD_BOX = 2.8    # the shape frame spans [-BIRD_BOX, BIRD_BOX]^2 shape units
PATCH = 48        # shape-frame raster: at least one texel per pixel for the largest bird
                  # on 32 pixels
BIRD_SCALE = (0.3, 0.45)   # half-image units per shape unit: big birds, so the small CNN learns
                           # their shape


def _bird_shapes(water: bool, n: int, gen: torch.Generator, patch: int) -> tuple[torch.Tensor, ...]:
    """Signed distances (shape units, negative inside), wing masks and outline masks of n birds of
    one class, drawn facing right in their own frame: [n, 1, patch, patch] each."""
    c = (torch.arange(patch, dtype=torch.float32) + 0.5) / patch * 2 * BIRD_BOX - BIRD_BOX
    x, y = c.view(1, 1, 1, patch), (-c).view(1, 1, patch, 1)
    j = lambda lo, hi: _u(n, lo, hi, gen)  # noqa: E731  per-sample jitter
    if not water:  # landbird: upright, tall round body, big head, short beak, tail down, two legs
        head = j(0.42, 0.5)
        d = torch.minimum(_ellipse(x, y, 0.0, 0.0, j(0.55, 0.65), j(0.9, 1.05)),
                          _ellipse(x, y, 0.15, 1.0, head, head))
        d = torch.minimum(d, _capsule(x, y, 0.15 + 0.8 * head, 1.0, 0.5 + head, 0.9, 0.14, 0.03))
        d = torch.minimum(d, _capsule(x, y, -0.3, -0.6, j(-0.9, -0.6), -1.4, 0.22, 0.08))
        for side in (-0.15, 0.2):
            d = torch.minimum(d, _capsule(x, y, side, -0.8, side + 0.05, -1.5, 0.08, 0.07))
        wing = _ellipse(x, y, -0.1, -0.05, 0.4, 0.75) < 0
    else:  # waterbird: long flat body, thick leaning neck, small head, long bill, no legs
        hx, hy = j(0.9, 1.4), j(1.1, 1.5)
        d = torch.minimum(_ellipse(x, y, 0.0, 0.0, j(1.2, 1.4), j(0.4, 0.5)),
                          _capsule(x, y, 0.85, 0.15, hx, hy, 0.28, 0.18))
        d = torch.minimum(d, _ellipse(x, y, hx, hy, 0.34, 0.28))
        d = torch.minimum(d, _capsule(x, y, hx + 0.2, hy, hx + j(0.8, 1.1), hy + j(-0.4, 0.1),
                                      0.1, 0.03))
        d = torch.minimum(d, _capsule(x, y, -1.1, 0.05, -1.6, 0.3, 0.2, 0.06))
        wing = _ellipse(x, y, -0.25, 0.05, 0.8, 0.28) < 0
    return d, wing, d > -0.12


def draw_birds(y: torch.Tensor, size: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bird silhouettes for labels y (0 landbird, 1 waterbird): (alpha [n,1,S,S], rgb [n,3,S,S]).

    Each bird is drawn in its own frame on a small raster (alpha from the signed distance, a darker
    wing and outline, a random colour), then rotated, scaled, mirrored and moved into the image
    by one bilinear resampling, which also anti-aliases its edge."""
    n = len(y)
    patch = max(PATCH, size * 5 // 8)
    layers = torch.zeros(n, 4, patch, patch)
    for cls in (0, 1):
        idx = (y == cls).nonzero().flatten()
        if len(idx):
            d, wing, outline = _bird_shapes(bool(cls), len(idx), gen, patch)
            shade = torch.where(wing, 0.6, 1.0) * torch.where(outline, 0.7, 1.0)
            colour = _hsv(_u(len(idx), 0, 1, gen), _u(len(idx), 0.15, 0.9, gen),
                          _u(len(idx), 0.35, 1.0, gen))
            alpha = torch.clamp(0.5 - d * patch / (2 * BIRD_BOX), 0, 1)   # one texel of soft edge
            layers[idx] = torch.cat([alpha, (colour * shade).clamp(0, 1)], 1)
    # image -> shape frame: output pixel p samples the patch at R(-angle) (p - centre) / scale
    scale = _u(n, *BIRD_SCALE, gen).flatten() * BIRD_BOX       # half-image units per half-patch
    angle = _u(n, -0.45, 0.45, gen).flatten()                # about +-25 degrees
    facing = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    centre = torch.stack([_u(n, -0.35, 0.35, gen).flatten(),
                          _u(n, -0.3, 0.4, gen).flatten()], 1)  # x right, y down
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rot = torch.stack([torch.stack([cos * facing, -sin * facing], 1),
                       torch.stack([sin, cos], 1)], 1)  # [n, 2, 2]
    theta = torch.cat([rot, -(rot @ centre[:, :, None])], 2)
    grid = F.affine_grid(theta, [n, 4, size, size], align_corners=False)
    out = F.grid_sample(layers, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = out[:, :1]
    # un-premultiply the edge
    rgb = torch.where(alpha > 1e-3, out[:, 1:] / alpha.clamp(min=1e-3), 0.0).clamp(0, 1)
    return alpha, rgb


def _sky(n: int, X: torch.Tensor, Y: torch.Tensor, horizon: torch.Tensor,
         gen: torch.Generator) -> torch.Tensor:
    sky = _hsv(_u(n, 0.52, 0.62, gen), _u(n, 0.05, 0.35, gen), _u(n, 0.8, 1.0, gen))
    return sky * (1 - 0.15 * (Y - horizon).clamp(min=0))    # deeper towards the top


def draw_backgrounds(place: int, n: int, size: int, gen: torch.Generator,
                     trees: int = 5) -> torch.Tensor:
    """n scenes of one kind (0 land, 1 water): [n, 3, S, S] in [0, 1]."""
    X, Y = _grid(n, size)
    horizon = _u(n, -0.1, 0.6, gen)
    sky = _sky(n, X, Y, horizon, gen)
    below = (horizon - Y).clamp(min=0)                      # depth below the horizon
    if place == 1:  # water: blues, darker with depth, waves denser towards the viewer
        blue = _hsv(_u(n, 0.52, 0.64, gen), _u(n, 0.45, 0.9, gen), _u(n, 0.4, 0.85, gen))
        phase = _u(n, 0, 2 * math.pi, gen)
        waves = torch.sin(_u(n, 6, 12, gen) * below * (1 + below) + 0.6 * torch.sin(5 * X + phase)
                          + phase)
        return torch.where(Y > horizon, sky, blue * (1 - 0.3 * below)
                           * (1 + _u(n, 0.08, 0.2, gen) * waves)).clamp(0, 1)
    # land: greens to browns with a smooth texture, and a row of trees in most scenes
    ground = _hsv(_u(n, 0.06, 0.33, gen), _u(n, 0.35, 0.8, gen), _u(n, 0.3, 0.7, gen))
    texture = F.interpolate(torch.rand(n, 1, 8, 8, generator=gen), size=(size, size),
                            mode="bilinear", align_corners=False)
    scene = torch.where(Y > horizon, sky, ground * (0.7 + 0.6 * texture) * (1 - 0.2 * below))
    has_trees = torch.rand(n, generator=gen) < 0.6
    leaf = _hsv(_u(n, 0.22, 0.36, gen), _u(n, 0.5, 0.9, gen), _u(n, 0.2, 0.45, gen))
    shift = _u(n, -0.3, 0.3, gen)
    for k in range(trees):
        tx = shift + (2 * k - trees + 1) / trees * 1.2
        tr = _u(n, 0.12, 0.3, gen)
        th = horizon + tr * _u(n, 1.0, 2.0, gen)
        trunk = (((X - tx).abs() < 0.25 * tr) & (Y < th) & (Y > horizon - 0.05)
                 & has_trees.view(n, 1, 1, 1))
        crown = ((X - tx) ** 2 + (Y - th) ** 2 < tr ** 2) & has_trees.view(n, 1, 1, 1)
        scene = torch.where(trunk, torch.tensor([0.35, 0.23, 0.12]).view(1, 3, 1, 1), scene)
        scene = torch.where(crown, leaf, scene)
    return scene.clamp(0, 1)


def _chunked(fn, n: int, chunk: int = 512):
    """Call fn(start, stop) on chunks of [0, n) and concatenate the (tuples of) tensors it
    returns."""
    parts = [fn(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


class Scenes:
    """n birds, each with one land and one water background, from which any configuration is
    composed."""

    def __init__(self, n: int, size: int, gen: torch.Generator):
        self.y = torch.randperm(n, generator=gen) % 2                     # balanced classes
        self.alpha, self.rgb = _chunked(lambda a, b: draw_birds(self.y[a:b], size, gen), n)
        self.backgrounds = [_chunked(lambda a, b: draw_backgrounds(p, b - a, size, gen), n)
                            for p in (0, 1)]

    def compose(self, place: torch.Tensor, bird: bool = True,
                neutral: torch.Tensor = None) -> torch.Tensor:
        bg = neutral.expand_as(self.rgb) if neutral is not None else \
            torch.where(place.view(-1, 1, 1, 1).bool(), self.backgrounds[1], self.backgrounds[0])
        return self.alpha * self.rgb + (1 - self.alpha) * bg if bird else bg.clone()


def training_set(scenes: Scenes, config: str, frac: float,
                 gen: torch.Generator) -> common.TensorSet:
    """The training images of a configuration: IA (background = bird for a fraction `frac`), I+rA,
    I, A, rI+A, ..."""
    roles = common.parse_config(config, MECHANISMS)
    n = len(scenes.y)
    if roles["I"] == "label":
        y = scenes.y
    else:  # the label comes from the background; a random bird (or none) is drawn on it
        y = torch.randperm(n, generator=gen) % 2
    if roles["A"] == "label":
        place = common.spurious_values(y, frac, 2, gen)
    else:
        place = torch.randperm(n, generator=gen) % 2
    neutral = None
    if roles["A"] == "absent":
        neutral = 0.5 * (scenes.backgrounds[0].mean(0) + scenes.backgrounds[1].mean(0))
    x = scenes.compose(place, bird=roles["I"] != "absent", neutral=neutral)
    both = roles["I"] != "absent" and roles["A"] != "absent"  # groups need a bird and a background
    return common.TensorSet(x, y, 2 * scenes.y + place if both else None)


def generated_test_sets(scenes: Scenes, gen: torch.Generator) -> dict[str, common.TensorSet]:
    """The five counterfactual sets from the same held-out birds and backgrounds."""
    y = scenes.y
    neutral = 0.5 * (scenes.backgrounds[0].mean(0) + scenes.backgrounds[1].mean(0))
    background = 1 - scenes.alpha[:, 0]  # where the background shows: the cue's pixels
    rand_place = torch.empty_like(y)
    for c in (0, 1):  # half of each class on each background: four balanced groups
        idx = (y == c).nonzero().flatten()
        rand_place[idx[torch.randperm(len(idx), generator=gen)]] = torch.arange(len(idx)) % 2
    return {
        "I": common.TensorSet(scenes.compose(y, neutral=neutral), y, region=background),
        "A": common.TensorSet(scenes.compose(y, bird=False), y,
                              region=torch.ones_like(background)),
        "IA": common.TensorSet(scenes.compose(y), y, 3 * y, background),
        "I+rA": common.TensorSet(scenes.compose(rand_place), y, 2 * y + rand_place, background),
        "minority": common.TensorSet(scenes.compose(1 - y), y, 2 * y + 1 - y, background),
    }


# ----------------------------------------------------------------------------- real data

def read_metadata(root: str) -> list[dict]:
    """The rows of DIR/metadata.csv as dicts with int y, split, place; UserError on anything
    else."""
    if not os.path.isdir(root):
        raise common.UserError(f"--data-root {root} is not a folder; point it at the Waterbirds "
                               f"folder that holds metadata.csv")
    path = os.path.join(root, "metadata.csv")
    if not os.path.isfile(path):
        raise common.UserError(f"{path} not found; --data-root must be the Waterbirds folder with "
                               f"metadata.csv (columns {', '.join(METADATA_COLUMNS)}) and the "
                               f"images it names")
    codes = {"y": ("0", "1"), "split": ("0", "1", "2"), "place": ("0", "1")}
    meaning = {"y": "0 (landbird) or 1 (waterbird)", "split": "0 (train), 1 (val) or 2 (test)",
               "place": "0 (land) or 1 (water)"}
    rows = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise common.UserError(f"{path} lacks column(s) {', '.join(missing)}; expected a "
                                       f"header with {', '.join(METADATA_COLUMNS)}")
            for row in reader:
                for col, ok in codes.items():
                    value = (row[col] or "").strip()
                    if value not in ok:
                        raise common.UserError(f"{path} line {reader.line_num}: {col} = '{value}', "
                                               f"expected {meaning[col]}")
                rows.append({"img_filename": row["img_filename"],
                             **{c: int(row[c]) for c in codes}})
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise common.UserError(f"cannot read {path} ({type(e).__name__}: {e}); expected a CSV "
                               f"file with a header {', '.join(METADATA_COLUMNS)}")
    for split, name in ((0, "train"), (2, "test")):
        if not any(r["split"] == split for r in rows):
            raise common.UserError(f"{path} has no {name} rows (split = {split}); a Waterbirds "
                                   f"metadata.csv has all three splits")
    return rows


def load_image(path: str, size: int) -> torch.Tensor:
    """An image as [3, size, size] in [0, 1]: resized to size * 8/7 square, then centre-cropped
    (the usual Waterbirds transform, 256 then 224 for size 224)."""
    from PIL import Image
    if not os.path.isfile(path):
        raise common.UserError(f"image {path} named in metadata.csv is missing; expected the "
                               f"Waterbirds images under --data-root as img_filename says")
    try:
        with Image.open(path) as img:
            big = round(size * 8 / 7)
            off = (big - size) // 2
            img = img.convert("RGB").resize((big, big), Image.BILINEAR).crop(
                (off, off, off + size, off + size))
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        # PIL raises these for truncated or foreign files
        raise common.UserError(f"image {path} cannot be read ({type(e).__name__}); expected a "
                               f"JPEG or PNG file")
    return data.view(size, size, 3).permute(2, 0, 1).float() / 255


def load_split(root: str, rows: list[dict], split: int, limit: int, size: int,
               gen: torch.Generator) -> common.TensorSet:
    """The images of one split (a random subset of at most `limit`, 0 = all), with groups."""
    rows = [r for r in rows if r["split"] == split]
    if limit and limit < len(rows):
        rows = [rows[i] for i in sorted(torch.randperm(len(rows), generator=gen)[:limit].tolist())]
    x = torch.stack([load_image(os.path.join(root, r["img_filename"]), size) for r in rows])
    y = torch.tensor([r["y"] for r in rows])
    place = torch.tensor([r["place"] for r in rows])
    return common.TensorSet(x, y, 2 * y + place)


def balanced_resample(data: common.TensorSet, gen: torch.Generator) -> common.TensorSet:
    """The same number of images drawn with replacement so that the four groups are equally
    frequent."""
    present = [g for g in range(4) if (data.group == g).any()]
    if len(present) < 4:
        lacking = ", ".join(GROUP_NAMES[g] for g in range(4) if g not in present)
        raise common.UserError(f"the training split lacks group(s) {lacking}; I+rA cannot be "
                               f"balanced (use a larger --n-train or the full folder)")
    per = len(data.y) // 4
    members = [(data.group == g).nonzero().flatten() for g in range(4)]
    idx = torch.cat([m[torch.randint(len(m), (per,), generator=gen)] for m in members])
    return common.TensorSet(data.x[idx], data.y[idx], data.group[idx])


def real_data(root: str, n_train: Optional[int], n_test: Optional[int], size: int,
              configs: tuple[str, ...], seed: int) -> tuple[dict, dict, dict]:
    """(training sets of the `configs`, their validation sets from the `val` split, test sets)
    from the real folder; subsets and resamples each from its own random stream."""
    rows = read_metadata(root)
    train = load_split(root, rows, 0, n_train or 0, size, harness.stream(seed, "train-subset"))
    val = load_split(root, rows, 1, n_test or 0, size,
                     harness.stream(harness.TEST_SEED, "validation-subset"))
    test = load_split(root, rows, 2, n_test or 0, size,
                      harness.stream(harness.TEST_SEED, "test-subset"))
    lacking = [GROUP_NAMES[g] for g in range(4) if not (test.group == g).any()]
    if lacking:
        raise common.UserError(f"the test split ({len(test.y)} images) lacks group(s) "
                               f"{', '.join(lacking)}, so group accuracies cannot be measured; use "
                               f"a larger --n-test or the full folder")
    y, place = test.y, test.group % 2
    majority, minority = place == y, place != y
    tests = {"IA": common.TensorSet(test.x[majority], y[majority], test.group[majority]),
             "I+rA": test,
             "minority": common.TensorSet(test.x[minority], y[minority], test.group[minority])}
    trains = {"IA": train, "I+rA": balanced_resample(train, harness.stream(seed, "train/I+rA"))}
    vals = {"IA": val, "I+rA": balanced_resample(val, harness.stream(harness.TEST_SEED,
                                                                     "validation/I+rA"))}
    return {c: trains[c] for c in configs}, {c: vals[c] for c in configs}, tests


# ----------------------------------------------------------------------------- models

def build_model(arch: str, width: int, pretrained: bool, size: int) -> nn.Module:
    """common's small CNN or LeNet for size x size images, or a torchvision ImageNet ResNet."""
    return common.build_model(arch, 3, NUM_CLASSES, width, (size, size), pretrained)


# ----------------------------------------------------------------------------- all sets

def make_data(args: argparse.Namespace, log: Callable[[str], None] = print) -> harness.Data:
    """Training, validation and test sets, each from its own random stream: training sets from
    the run's seed, validation and test sets from harness.TEST_SEED (the same for every seed)."""
    configs = (args.teacher_config, args.student_config)
    if args.data == "generated":
        def draw(kind, seed, n):  # scenes of their own, then each configuration's images
            scenes = Scenes(n, args.image_size, harness.stream(seed, f"{kind}-scenes"))
            return {c: training_set(scenes, c, args.spurious_frac,
                                    harness.stream(seed, f"{kind}/{c}")) for c in configs}
        trains = draw("train", args.seed, args.n_train or 4000)
        vals = draw("validation", harness.TEST_SEED, args.n_test or 800)
        test_scenes = Scenes(args.n_test or 800, args.image_size,
                             harness.stream(harness.TEST_SEED, "test-scenes"))
        tests = generated_test_sets(test_scenes, harness.stream(harness.TEST_SEED, "test/I+rA"))
    else:  # the real test split has only the sets the real training configurations can have
        trains, vals, tests = real_data(args.data_root, args.n_train, args.n_test,
                                        args.image_size, configs, args.seed)
    student_train = trains[args.student_config]
    frac = float("nan") if student_train.group is None else \
        (student_train.group % 2 == student_train.y).float().mean().item()
    log(f"data: {args.data}, {len(student_train.y)} training images of {args.image_size}x"
        f"{args.image_size}, background = bird in {frac:.3f} of the student's; validation sets "
        f"of {len(vals[args.student_config].y)}; test sets of "
        f"{', '.join(str(len(s.y)) for s in tests.values())}; teacher on {args.teacher_config}, "
        f"student on {args.student_config}")
    return harness.Data(trains[configs[0]], student_train, vals[configs[0]], vals[configs[1]],
                        tests)


# ----------------------------------------------------------------------------- main

def cues(data: harness.Data) -> dict:
    """Where the models look (harness.finish): the background's share of the saliency, on the
    pixels outside each test image's bird (the whole image in `A`, which has none), weighted by
    the bird's anti-aliased mask. The real data set has no bird masks: no cue there."""
    if all(s.region is not None for s in data.test_sets.values()):
        return {"A": common.on_own_pixels}
    return {}


def main(argv: Optional[list[str]] = None, memo: Optional[dict] = None) -> dict:
    """One run. `memo`: what a grid engine keeps between the runs of one process (data, teachers,
    their test-set logits, students no teacher changes); None for a single run."""
    args = parse_args(argv)
    run = harness.start(EXPERIMENT, DATA_VERSION, args, TEACHER, DISTILL, argv)
    data = make_data(args)

    # ------------------------------------------------------------------------- teacher
    teacher = harness.get_teacher(run, lambda: build_model(
        run.teacher.arch, run.teacher.width, args.pretrained, args.image_size),
        data.teacher_train, data.teacher_validation, memo=memo)

    # ------------------------------------------------------------------------- student
    harness.seed_everything(run.student.seed + 1)
    student = build_model(run.student.arch, run.student.width, args.pretrained, args.image_size)
    distilled = harness.distill(run, teacher, student, data, memo)

    # ------------------------------------------------------------------------- evaluate and save
    return harness.finish(run, teacher, student, distilled, data, cues=cues(data), memo=memo,
                          groups={str(g): name for g, name in enumerate(GROUP_NAMES)})


if __name__ == "__main__":
    harness.run_cli(main)
