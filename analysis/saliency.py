"""Where teacher and students look: a few test images beside the teacher's and each loss's
student's saliency, from the weights saved beside the results.

    python analysis/saliency.py results/sweep_cm --set I+rA --out figures/colored_mnist_saliency.png
    python analysis/saliency.py results/dominoes --set IAB --teacher IB --student IAB --seed 1

The folder holds results of one experiment and one (teacher, student) pair (or name them with
--teacher and --student), one per loss for the seed shown. The maps are each pixel's norm of the
input gradient of the label's logit (`common.class_saliency`, the quantity behind the results'
`cue_share` and `saliency_cosine`), each map scaled to its own maximum; a column's title gives
the model's mean share of the saliency on each cue over the whole test set, as its result
records it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import common  # noqa: E402
import harness  # noqa: E402
from analysis.recompute import rebuild_data  # noqa: E402

LOSS_ORDER = ("ce", "kl", "jacobian", "contrastive")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("results", help="folder of result JSON files with saved weights")
parser.add_argument("--set", required=True, help="the test set to show, e.g. I+rA")
parser.add_argument("--teacher", default=None, help="teacher configuration (if several)")
parser.add_argument("--student", default=None, help="student configuration (if several)")
parser.add_argument("--seed", type=int, default=None, help="seed (default: the smallest)")
parser.add_argument("--images", type=int, default=4, help="test images shown (default 4)")
parser.add_argument("--out", default=None,
                    help="PNG (default figures/<experiment>_saliency_<set>.png)")


def pick_results(args) -> list[tuple[str, dict]]:
    """(path, result) of each loss for the chosen pair and seed, in LOSS_ORDER."""
    found = []
    for path in sorted(glob.glob(os.path.join(args.results, "**", "*.json"), recursive=True)):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and "weights" in r and isinstance(r.get("args"), dict):
            found.append((path, r))
    if not found:
        raise common.UserError(f"{args.results} holds no result with saved weights")
    a = lambda r, k: r["args"].get(k)  # noqa: E731
    for flag, key in (("teacher", "teacher_config"), ("student", "student_config")):
        wanted = getattr(args, flag)
        names = sorted({a(r, key) for _, r in found})
        if wanted is None and len(names) > 1:
            raise common.UserError(f"the results have several {flag} configurations "
                                   f"({', '.join(names)}); choose one with --{flag}")
        found = [(p, r) for p, r in found if wanted is None or a(r, key) == wanted]
    experiments = sorted({r["experiment"] for _, r in found})
    if len(experiments) != 1:
        raise common.UserError(f"the results come from {len(experiments)} experiments "
                               f"({', '.join(experiments)}); point at one experiment's folder")
    seed = args.seed if args.seed is not None else min(a(r, "seed") for _, r in found)
    by_loss = {}
    for p, r in found:
        if a(r, "seed") == seed and not r.get("exclusions"):
            by_loss.setdefault(a(r, "loss"), (p, r))
    if not by_loss:
        raise common.UserError(f"no result of seed {seed} that the fit rule kept")
    return [by_loss[loss] for loss in sorted(by_loss, key=lambda l: (
        LOSS_ORDER.index(l) if l in LOSS_ORDER else len(LOSS_ORDER), l))]


def main() -> None:
    args = parser.parse_args()
    if args.images < 1:
        raise common.UserError(f"--images must be at least 1, got {args.images}")
    chosen = pick_results(args)
    first_path, first = chosen[0]
    _, _, data = rebuild_data(first)
    if args.set not in data.test_sets:
        raise common.UserError(f"no test set '{args.set}'; the script has "
                               f"{', '.join(data.test_sets)}")
    test = data.test_sets[args.set]
    x, y = test.x[:args.images], test.y[:args.images]
    teacher = harness.load_weights(first_path, "teacher", first["weights"]["teacher"])
    columns = [("teacher", teacher, first["teacher"]["eval"][args.set])]
    for path, r in chosen:
        columns.append((r["args"]["loss"], harness.load_weights(path, "student",
                                                                r["weights"]["student"]),
                        r["student"]["eval"][args.set]))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, h, w = len(x), x.shape[2], x.shape[3]
    fig, axes = plt.subplots(n, len(columns) + 1, squeeze=False,
                             figsize=(1.6 * (len(columns) + 1), 1.6 * n * h / w + 0.6))
    for i in range(n):
        axes[i][0].imshow(x[i].permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0][0].set_title(f"{args.set}, label", fontsize=8)
    for j, (name, model, metrics) in enumerate(columns, start=1):
        grad = common.class_saliency(model, x, y)
        maps = grad.pow(2).sum(1).sqrt()
        shares = metrics.get("cue_share", {})
        title = name + "".join(f"\n{c}: {v:.2f}" for c, v in shares.items())
        axes[0][j].set_title(title, fontsize=8)
        for i in range(n):
            axes[i][j].imshow((maps[i] / maps[i].max().clamp_min(1e-12)).numpy(), cmap="magma",
                              vmin=0, vmax=1)
    for i in range(n):
        axes[i][0].set_ylabel(str(int(y[i])), fontsize=8, rotation=0, labelpad=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    seed = first["args"]["seed"]
    fig.suptitle(f"{first['experiment']}: teacher {first['args']['teacher_config']}, student "
                 f"{first['args']['student_config']}, seed {seed}; saliency of the label's logit "
                 f"(titles: mean cue share on {args.set})", fontsize=8)
    fig.tight_layout()
    out = args.out or os.path.join("figures", f"{first['experiment']}_saliency_{args.set}.png")
    harness.prepare_output(out)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    print(f"wrote {out}: {n} images of {args.set}, teacher and {len(columns) - 1} students "
          f"({', '.join(c[0] for c in columns[1:])}), seed {seed}")


if __name__ == "__main__":
    harness.run_cli(main)
