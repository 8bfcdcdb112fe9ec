"""Colored MNIST: does the student learn the digit (I) from its teacher, or the colour shortcut (A)?

Mechanism I is the digit's shape, mechanism A its colour: one hue per class, painted on the
strokes. By default the teacher learns on digits with random colours (`I+rA`), so it ignores
colour; the student is distilled on digits coloured by their label (`IA`), where colour alone
would do. Counterfactual test sets built from the test digits then ask which mechanism the
student uses:

  I      grey digits                 (is the digit enough on its own?)
  A      the average digit, coloured (is the colour enough on its own?)
  IA     digit and its class colour  (the distillation distribution)
  I+rA   digit, random colour        (the key OOD set: a student that shares the teacher's
                                      mechanism keeps agreeing with it here)
  rI+A   random digit, class colour  (high accuracy = the student reads the colour)

Absent mechanisms take a neutral value: grey (the palette's mean colour) for A, the mean
training digit for I. A cue that carries the label for a fraction f equals the label's value on
exactly round(f * N) samples and one of the other nine values on the rest.

Every set is drawn from its own random stream (harness.stream). A sixth of the training digits
(at most 5,000) is held out as validation digits, which no run trains on and no test set uses:
the teacher's floor, the student's fit and the choice of alpha read only their renders.

Digits: the 1,797 handwritten digits that ship with scikit-learn (8x8, resized to 28x28) by
default, so it runs offline; real MNIST with `--data mnist --data-root DIR [--download]`.

    python exp_colored_mnist.py --loss jacobian
"""
import argparse
import colorsys
import os
from typing import Callable, Optional

import torch

import common
import harness

EXPERIMENT = "colored_mnist"
DATA_VERSION = 2  # bump when the rendering changes (part of the teacher cache key and every result)
MECHANISMS = "IA"
TEST_CONFIGS = ("I", "A", "IA", "I+rA", "rI+A")
NUM_CLASSES = 10

# ----------------------------------------------------------------------------- settings
# How teacher and student are trained: the values that differ from harness.TeacherSettings' and
# harness.DistillSettings' defaults. Every field is a flag (--teacher-steps, --lr, ...); the run
# prints both settings and the result JSON stores them as the run used them. The teacher: Adam,
# which leaves the first plateau within 100 steps where SGD at lr 0.05 sometimes never does; the
# student's width; each digit shifted by up to 2 pixels, which with about 1,000 training digits
# generalises better than width 32 without shifts and takes a third of the time
# (docs/experiments.md). 400 student steps keep the quick start within 3 minutes on 2 cores.
TEACHER = harness.TeacherSettings(width=16, shift=2, optimizer="adam", lr=2e-3)
DISTILL = harness.DistillSettings(steps=400)
# The weight of the Jacobian or contrastive term in (1 - alpha) KL + alpha term, per loss: the
# largest that keeps the student's validation fit within one point of plain KL's (docs/transfer.md).
ALPHA = {"jacobian": 0.7, "contrastive": 0.3}

# ----------------------------------------------------------------------------- flags

parser, g = harness.experiment_parser(
    __doc__, teacher_config="I+rA", student_config="IA",
    epilog="Configurations: upper-case letters carry the label, r marks randomised mechanisms, "
           "e.g. IA, I+rA, rI+A, A.")
g.add_argument("--spurious-frac", type=float, default=1.0,
               help="fraction of training samples whose colour equals the label's colour, where "
                    "A carries the label (default 1.0)")
g.add_argument("--data", choices=("digits", "mnist"), default="digits",
               help="digits: scikit-learn's digits, offline (default); mnist: torchvision MNIST "
                    "from --data-root")
g.add_argument("--data-root", default=None, help="folder holding torchvision's MNIST/ "
                                                 "(with --data mnist)")
g.add_argument("--download", action="store_true",
               help="download MNIST into --data-root if it is missing")
g.add_argument("--n-train", type=int, default=0,
               help="use at most this many training digits (0 = all)")
g.add_argument("--train-renders", type=int, default=2,
               help="coloured copies of each training digit (default 2)")
g.add_argument("--test-renders", type=int, default=3,
               help="coloured copies of each test digit (default 3)")
harness.add_settings_flags(parser, TEACHER, DISTILL, ALPHA)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags, with --smoke's sizes applied; every value checked (UserError names the fix)."""
    args = harness.parse_common(parser, argv, ALPHA)
    if args.smoke:
        args.n_train, args.train_renders, args.test_renders = args.n_train or 300, 1, 1
    harness.check_value(args.spurious_frac, "fraction", "--spurious-frac")
    for config in (args.teacher_config, args.student_config):
        common.parse_config(config, MECHANISMS)
    if min(args.train_renders, args.test_renders) < 1 or args.n_train < 0:
        raise common.UserError("--train-renders and --test-renders must be at least 1, "
                               "--n-train at least 0")
    if args.data == "mnist" and not args.data_root:
        raise common.UserError("--data mnist needs --data-root DIR (the folder that holds "
                               "MNIST/, or where to --download it)")
    if args.data == "mnist" and not os.path.isdir(args.data_root) and not args.download:
        raise common.UserError(f"--data-root {args.data_root} does not exist; point it at a "
                               f"copy of MNIST or add --download")
    return args


# ----------------------------------------------------------------------------- data

def load_digits(data: str, root: Optional[str], download: bool) -> tuple[torch.Tensor, ...]:
    """Grey digits in [0, 1] as [N, 28, 28] with labels: (train_x, train_y, test_x, test_y)."""
    if data == "digits":
        return harness.sklearn_digits(28)
    return harness.torchvision_digits("MNIST", root, download)


def palette() -> torch.Tensor:
    """One saturated hue per class, [10, 3]."""
    return torch.tensor([colorsys.hsv_to_rgb(k / NUM_CLASSES, 1.0, 1.0)
                         for k in range(NUM_CLASSES)])


def render(digits: torch.Tensor, labels: torch.Tensor, config: str, frac: float, renders: int,
           mean_digit: torch.Tensor, generator: torch.Generator) -> common.TensorSet:
    """Colour `renders` copies of each digit as the configuration says; returns [N, 3, 28, 28]."""
    roles = common.parse_config(config, MECHANISMS)
    idx = torch.arange(len(digits)).repeat(renders)
    n = len(idx)
    y = labels[idx] if roles["I"] == "label" else torch.randint(NUM_CLASSES, (n,),
                                                                generator=generator)
    shape = digits[idx] if roles["I"] != "absent" else mean_digit.expand(n, -1, -1)
    colours = palette()
    if roles["A"] == "label":
        colour = colours[common.spurious_values(y, frac, NUM_CLASSES, generator)]
    elif roles["A"] == "random":
        colour = colours[torch.randint(NUM_CLASSES, (n,), generator=generator)]
    else:
        colour = colours.mean(0).expand(n, 3)  # grey
    return common.TensorSet(shape[:, None] * colour[:, :, None, None], y)


def make_data(args: argparse.Namespace, test_configs: tuple[str, ...] = TEST_CONFIGS,
              log: Callable[[str], None] = print) -> harness.Data:
    """Training, validation and test sets, each from its own random stream: training sets from
    the run's seed, validation and test sets from harness.TEST_SEED (the same for every seed)."""
    train_x, train_y, test_x, test_y = load_digits(args.data, args.data_root, args.download)
    train_x, train_y, val_x, val_y = harness.hold_out(train_x, train_y, min(len(train_y) // 6,
                                                                            5000))
    if args.n_train:
        train_x, train_y = train_x[:args.n_train], train_y[:args.n_train]
        n_test = max(args.n_train // 3, 100)
        test_x, test_y = test_x[:n_test], test_y[:n_test]
    mean_digit = train_x.mean(0)
    frac = args.spurious_frac

    def draw(x, y, config, f, renders, seed, kind):
        return render(x, y, config, f, renders, mean_digit,
                      harness.stream(seed, f"{kind}/{config}"))
    train = {c: draw(train_x, train_y, c, frac, args.train_renders, args.seed, "train")
             for c in (args.teacher_config, args.student_config)}
    validation = {c: draw(val_x, val_y, c, frac, args.test_renders, harness.TEST_SEED,
                          "validation") for c in (args.teacher_config, args.student_config)}
    tests = {c: draw(test_x, test_y, c, 1.0, args.test_renders, harness.TEST_SEED, "test")
             for c in test_configs}
    log(f"data: {args.data}, {len(train_y)} training digits x {args.train_renders}, validation "
        f"sets of {len(validation[args.student_config].y)}, test sets of "
        f"{len(tests[test_configs[0]].y)}; teacher on {args.teacher_config}, student on "
        f"{args.student_config}")
    return harness.Data(train[args.teacher_config], train[args.student_config],
                        validation[args.teacher_config], validation[args.student_config], tests)


# ----------------------------------------------------------------------------- main

def cues(data: harness.Data) -> dict:
    """Where the models look (harness.finish): the colour cue's share of the saliency, the part of
    each pixel's gradient that changes hue rather than brightness."""
    return {"A": common.on_colour}


def main(argv: Optional[list[str]] = None, memo: Optional[dict] = None) -> dict:
    """One run. `memo`: what a grid engine keeps between the runs of one process (data, teachers,
    their test-set logits, students no teacher changes); None for a single run."""
    args = parse_args(argv)
    run = harness.start(EXPERIMENT, DATA_VERSION, args, TEACHER, DISTILL, argv)
    data = make_data(args)
    image_size = tuple(data.student_train.x.shape[2:])  # (H, W): LeNet's classifier needs it

    def build(settings):  # the teacher's or the student's network, from its settings
        return common.build_model(settings.arch, 3, NUM_CLASSES, settings.width, image_size)

    # ------------------------------------------------------------------------- teacher
    teacher = harness.get_teacher(run, lambda: build(run.teacher), data.teacher_train,
                                  data.teacher_validation, memo=memo)

    # ------------------------------------------------------------------------- student
    harness.seed_everything(run.student.seed + 1)
    student = build(run.student)
    distilled = harness.distill(run, teacher, student, data, memo)

    # ------------------------------------------------------------------------- evaluate and save
    return harness.finish(run, teacher, student, distilled, data, cues=cues(data), memo=memo)


if __name__ == "__main__":
    harness.run_cli(main)
