"""Time one full distillation step (forward, loss, backward, optimizer) for every loss and every
Jacobian implementation, on the small CNN and on the ResNet-18, and print the ratio of each to
the plain KL step measured in the same process.

    python analysis/bench_losses.py                 # the table, and results/bench/<device>.json
    python analysis/bench_losses.py --smoke         # one step per method (CI)

Rows: `ce`, `kl`, `contrastive`; the exact Jacobian through our code path (teacher Jacobians
precomputed once, the student's rows by `explicit` (the small CNN's hand-written backward pass),
`loop` (one autograd backward per class), `batched` (autograd's is_grads_batched) or `vmap`
(torch.func)); `jacobian-naive`, the reference code's way (a Python loop over classes, the
teacher's Jacobian recomputed at every step); and the projection estimator with K = 1 and 4
(rows by the device's default method).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import harness  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
parser.add_argument("--steps", type=int, default=12, help="timed steps per method (default 12)")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
parser.add_argument("--cnn-batch", type=int, default=64,
                    help="batch of the small CNN (default 64; 256 on a GPU)")
parser.add_argument("--resnet-batch", type=int, default=None,
                    help="batch of the ResNet-18 (default 8 on CPU, 64 on GPU)")
parser.add_argument("--models", default="cnn,resnet18", help="comma-separated: cnn, resnet18")
parser.add_argument("--out", default=None,
                    help="JSON output (default results/bench/<device>.json)")
parser.add_argument("--smoke", action="store_true",
                    help="one step per method, tiny batches: checks it runs")

METHODS = ["ce", "kl", "contrastive", "jacobian-naive", "jacobian-explicit", "jacobian-loop",
           "jacobian-batched", "jacobian-vmap", "projection-1", "projection-4"]


def naive_reference_loss(student, teacher, x, t_logits, alpha, temperature):
    """The reference implementation's Jacobian step: loop over classes for both models, per step."""
    x = x.detach().requires_grad_(True)
    s_logits = student(x)
    t_out = teacher(x)
    s_rows, t_rows = [], []
    for c in range(s_logits.shape[1]):
        s_rows.append(torch.autograd.grad(s_logits[:, c].sum(), x, create_graph=True)[0])
        t_rows.append(torch.autograd.grad(t_out[:, c].sum(), x, retain_graph=True)[0])
    aux = common.jacobian_distance(torch.stack(s_rows, 1), torch.stack(t_rows, 1).detach())
    return (1 - alpha) * common.kd_kl(s_logits, t_logits, temperature) + alpha * aux


def bench_model(arch: str, batch: int, image: tuple, args, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    widths = {"cnn": (32, 16), "resnet18": (64, 64)}[arch]  # torchvision's ResNet-18: standard
    teacher = common.freeze(common.build_model(arch, image[0], 10, widths[0]).to(device))
    n = batch * 4
    data = common.TensorSet(torch.rand(n, *image, device=device),
                            torch.randint(10, (n,), device=device))
    rows = []
    for method in METHODS:
        if method == "jacobian-vmap" and arch == "resnet18":
            print(f"  {arch:<9}{method:<18}  "
                  "skipped: torch.func cannot run BatchNorm in training mode", flush=True)
            continue
        if method == "jacobian-explicit" and arch == "resnet18":
            print(f"  {arch:<9}{method:<18}  "
                  "skipped: only the small CNN has a hand-written backward pass", flush=True)
            continue
        torch.manual_seed(1)
        student = common.build_model(arch, image[0], 10, widths[1]).to(device).train()
        loss, jac_method, estimator, k = method, "auto", "exact", 1
        if method.startswith("jacobian-"):
            loss, jac_method = "jacobian", method.split("-")[1]
        elif method.startswith("projection-"):
            loss, estimator, k = "jacobian", "projection", int(method.split("-")[1])
        settings = harness.DistillSettings(
            loss=loss, jacobian_method=jac_method if jac_method != "naive" else "auto",
            jacobian_estimator=estimator, projections=k)
        spec = common.LOSSES[loss]
        needs = ("logits",) if jac_method == "naive" else spec.needs
        # setup, not timed
        targets = common.teacher_targets(teacher, data.x, needs) if needs else {}
        aux = spec.aux(student, teacher, settings).to(device) if spec.aux else None
        params = list(student.parameters()) + (list(aux.parameters()) if aux else [])
        opt = torch.optim.Adam(params, lr=1e-4)
        if jac_method == "naive":
            objective = lambda x, y, idx: {"naive": (1.0, naive_reference_loss(  # noqa: E731
                student, teacher, x, targets["logits"][idx], 0.5, 4.0))}
        else:
            objective = common.distillation_objective(
                student, teacher, targets, settings, aux,
                generator=torch.Generator(device=device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for step in range(args.warmup + args.steps):
            idx = torch.arange((step % 4) * batch, (step % 4 + 1) * batch, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            total = common.total_loss(objective(data.x[idx], data.y[idx], idx))
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        row = {"model": arch, "batch": batch, "method": method,
               "median_ms": 1e3 * statistics.median(times),
               "iqr_ms": 1e3 * (statistics.quantiles(times, n=4)[2]
                                - statistics.quantiles(times, n=4)[0])
               if len(times) >= 2 else 0.0}
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            import resource
            # process-wide peak so far
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(row)
        print(f"  {arch:<9}{method:<18}{row['median_ms']:9.1f} ms", flush=True)
    kl = next(r["median_ms"] for r in rows if r["method"] == "kl")
    naive = next(r["median_ms"] for r in rows if r["method"] == "jacobian-naive")
    for r in rows:
        r["x_kl"] = r["median_ms"] / kl
        r["x_naive"] = r["median_ms"] / naive
    return rows


def main():
    args = parser.parse_args()
    device = harness.resolve_device(args.device)
    if args.smoke:
        args.steps, args.warmup, args.cnn_batch, args.resnet_batch = 1, 0, 4, 2
    resnet_batch = args.resnet_batch or (8 if device.type == "cpu" else 64)
    if min(args.steps, args.cnn_batch, resnet_batch) < 1 or args.warmup < 0:
        raise common.UserError("--steps, --cnn-batch and --resnet-batch must be at least 1, "
                               "--warmup at least 0")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join("results", "bench", name.replace(" ", "_") + ".json")
    harness.prepare_output(out)
    print(f"device: {name}, threads: {torch.get_num_threads()}, default exact method: "
          f"{common.default_jacobian_method(device, common.SmallCNN())} for the small CNN, "
          f"{common.default_jacobian_method(device, common.build_model('resnet18', 3, 10, 64))} "
          f"for the ResNet-18")
    rows = []
    for arch in args.models.split(","):
        if arch not in ("cnn", "resnet18"):
            raise common.UserError(f"unknown model '{arch}' in --models; use cnn and/or resnet18")
        batch, image = ((args.cnn_batch, (3, 28, 28)) if arch == "cnn"
                        else (resnet_batch, (3, 32, 32)))
        rows += bench_model(arch, batch, image, args, device)
    print(f"\n{'model':<10}{'batch':>6}  {'method':<18}{'median ms':>10}{'IQR ms':>8}{'x kl':>7}"
          f"{'x naive':>8}")
    for r in rows:
        print(f"{r['model']:<10}{r['batch']:>6}  {r['method']:<18}{r['median_ms']:>10.1f}"
              f"{r['iqr_ms']:>8.1f}{r['x_kl']:>7.2f}{r['x_naive']:>8.2f}")
    harness.write_result(out, {"device": name, "env": harness.environment(device),
                               "args": vars(args), "rows": rows})
    print(f"result: {out}")


if __name__ == "__main__":
    harness.run_cli(main)
