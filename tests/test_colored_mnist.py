"""exp_colored_mnist.py: its data, its end-to-end runs, its handling of bad input."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import exp_colored_mnist as cm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "exp_colored_mnist.py")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    x = torch.rand(200, 28, 28) * (torch.rand(200, 28, 28) > 0.6)  # strokes with varied intensity
    y = torch.arange(200) % 10
    return x, y, x.mean(0)


def colour_index(images):
    """Recover the palette index of each rendered image from its brightest pixel's colour."""
    flat = images.flatten(2)                                  # [N, 3, P]
    brightest = flat.sum(1).argmax(1)                         # a stroke pixel
    rgb = flat[torch.arange(len(images)), :, brightest]
    rgb = rgb / rgb.max(1, keepdim=True).values
    # element-wise differences, not torch.cdist: its matrix-product shortcut rounds differently
    # per thread count
    dist = (rgb[:, None, :] - cm.palette()[None]).norm(dim=2)
    return dist.argmin(1), dist.min(1).values


@pytest.mark.parametrize("frac", [1.0, 0.7, 0.0])
def test_colour_tied_to_label_for_exactly_the_fraction(digits, frac):
    x, y, mean = digits
    data = cm.render(x, y, "IA", frac, 2, mean, torch.Generator().manual_seed(0))
    idx, dist = colour_index(data.x)
    assert dist.max() < 1e-5  # every image is painted in a palette colour
    assert (idx == data.y).sum().item() == round(frac * len(data.y))
    assert torch.equal(data.y, y.repeat(2))  # the digit carries the label


def test_counterfactual_sets_change_only_what_they_name(digits):
    x, y, mean = digits
    gen = lambda: torch.Generator().manual_seed(3)
    ia = cm.render(x, y, "IA", 1.0, 1, mean, gen())
    i_ra = cm.render(x, y, "I+rA", 1.0, 1, mean, gen())
    grey = cm.render(x, y, "I", 1.0, 1, mean, gen())
    ri_a = cm.render(x, y, "rI+A", 1.0, 1, mean, gen())
    only_a = cm.render(x, y, "A", 1.0, 1, mean, gen())
    shape = lambda d: d.x.max(1).values / d.x.max(1).values.flatten(1).max(1).values[:, None, None]
    # I+rA: same digits and labels as IA, colours independent of the label
    assert torch.equal(i_ra.y, ia.y)
    assert torch.allclose(shape(i_ra), shape(ia), atol=1e-6)
    colours = colour_index(i_ra.x)[0]
    assert 0.0 < (colours == i_ra.y).float().mean() < 0.3
    # I: same digits, grey (all channels equal)
    assert torch.allclose(grey.x[:, 0], grey.x[:, 1]) and torch.allclose(grey.x[:, 1], grey.x[:, 2])
    assert torch.allclose(shape(grey), shape(ia), atol=1e-6)
    # rI+A: the label's colour, on a digit drawn independently of the label
    assert torch.equal(colour_index(ri_a.x)[0], ri_a.y)
    shown_digit = torch.tensor([int(torch.nonzero((shape(ri_a)[i] - shape(ia)).flatten(1)
                                                  .abs().max(1).values < 1e-6)[0])
                                for i in range(len(ri_a.y))])
    assert 0.0 < (y[shown_digit] == ri_a.y).float().mean() < 0.3
    # A: the mean digit, in the label's colour
    assert torch.equal(colour_index(only_a.x)[0], only_a.y)
    assert torch.allclose(shape(only_a), (mean / mean.max()).expand(len(y), -1, -1), atol=1e-6)


def test_sklearn_digits_split_is_fixed_and_disjoint():
    a = cm.load_digits("digits", None, False)
    b = cm.load_digits("digits", None, False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    train_x, train_y, test_x, test_y = a
    assert train_x.shape[1:] == (28, 28) and 0 <= train_x.min() and train_x.max() <= 1
    assert len(train_y) + len(test_y) == 1797
    train_rows = {tuple(r.flatten().tolist()[::7]) for r in train_x}
    assert sum(tuple(r.flatten().tolist()[::7]) in train_rows
               for r in test_x) < 5  # (a few real duplicates)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """One smoke run per loss, sharing a teacher cache."""
    folder = tmp_path_factory.mktemp("smoke")
    outputs = {}
    for loss in common.LOSSES:
        out = folder / f"{loss}.json"
        proc = run("--smoke", "--loss", loss, "--out", str(out),
                   "--cache-dir", str(folder / "cache"))
        assert proc.returncode == 0, proc.stderr
        outputs[loss] = (proc, json.loads(out.read_text()))
    return folder, outputs


@pytest.mark.slow
def test_smoke_run_per_loss_writes_the_documented_json(smoke_runs):
    _, outputs = smoke_runs
    for loss, (proc, result) in outputs.items():
        assert result["experiment"] == "colored_mnist" and result["args"]["loss"] == loss
        assert {"python", "torch", "numpy", "scikit-learn", "device", "commit", "dirty", "argv",
                "data_version", "test_seed", "teacher_cache_key"} <= set(result["provenance"])
        assert result["provenance"]["teacher_cache_key"] == result["teacher"]["cache_key"]
        assert set(result["teacher"]["eval"]) == set(cm.TEST_CONFIGS)
        for name in cm.TEST_CONFIGS:
            metrics = result["student"]["eval"][name]
            assert {"acc", "kl", "agreement", "kappa", "error_consistency", "cka", "procrustes",
                    "saliency_cosine"} <= set(metrics)
            assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["agreement"] <= 1 and \
                metrics["kl"] >= 0 and -1 <= metrics["kappa"] <= 1
            assert set(metrics["cue_share"]) == {"A"} and 0 <= metrics["cue_share"]["A"] <= 1
            assert 0 <= result["teacher"]["eval"][name]["cue_share"]["A"] <= 1
        curves = result["student"]["curves"]
        assert [c["step"] for c in curves] == [10, 20]
        assert set(curves[-1]["eval"]) == set(cm.TEST_CONFIGS)
        for name, point in curves[-1]["eval"].items():  # the last point is the final model
            assert point == {k: result["student"]["eval"][name][k] for k in point}
        assert {"teacher_train_s", "student_train_s",
                "student_steps_per_s"} <= set(result["timing"])
        assert "agreement" in proc.stdout and "result:" in proc.stdout


@pytest.mark.slow
def test_second_run_reuses_the_cached_teacher(smoke_runs):
    _, outputs = smoke_runs
    assert outputs["ce"][1]["teacher"]["cached"] is False
    for loss in ("kl", "jacobian", "contrastive"):
        assert outputs[loss][1]["teacher"]["cached"] is True
        assert "loaded from cache" in outputs[loss][0].stdout
        assert outputs[loss][1]["teacher"]["eval"] == outputs["ce"][1]["teacher"]["eval"]


@pytest.mark.slow
def test_same_seed_same_numbers_and_other_seed_other_numbers(smoke_runs, tmp_path):
    folder, outputs = smoke_runs
    again = tmp_path / "again.json"
    assert run("--smoke", "--loss", "jacobian", "--out", str(again),
               "--cache-dir", str(tmp_path / "c")).returncode == 0
    repeat = json.loads(again.read_text())
    first = outputs["jacobian"][1]
    assert repeat["teacher"]["cached"] is False  # a fresh teacher, trained again from the seed
    assert repeat["teacher"]["eval"] == first["teacher"]["eval"]
    assert repeat["student"]["eval"] == first["student"]["eval"]
    assert repeat["student"]["curves"] == first["student"]["curves"]
    other = tmp_path / "other.json"
    assert run("--smoke", "--loss", "jacobian", "--seed", "1", "--out", str(other),
               "--cache-dir", str(tmp_path / "c")).returncode == 0
    assert json.loads(other.read_text())["student"]["eval"] != first["student"]["eval"]


def write_idx(path, array):
    """The idx format of MNIST: two zero bytes, type 0x08 (unsigned byte), the number of
    dimensions, each dimension as a big-endian uint32, then the bytes."""
    with gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root, name: str = "MNIST", sizes: tuple[int, int] = (120, 40), images=None):
    """Tiny torchvision-format idx files under root/<name>/raw, the same bytes every time: random
    images (or the first rows of `images` for both splits) with labels 0, 1, ..., 9, 0, ..."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in zip(("train", "t10k"), sizes):
        write_idx(str(raw / f"{prefix}-images-idx3-ubyte"),
                  rng.integers(0, 256, (n, 28, 28)) if images is None else images[:n])
        write_idx(str(raw / f"{prefix}-labels-idx1-ubyte"), np.arange(n) % 10)
    return raw


@pytest.mark.slow
def test_real_mnist_files_are_read(tmp_path):
    """torchvision's MNIST reader on tiny files in the real idx format."""
    write_mnist(tmp_path)
    train_x, train_y, test_x, test_y = cm.load_digits("mnist", str(tmp_path), False)
    assert train_x.shape == (120, 28, 28) and test_x.shape == (40, 28, 28)
    assert torch.equal(train_y, torch.arange(120) % 10)
    out = tmp_path / "r.json"
    proc = run("--smoke", "--data", "mnist", "--data-root", str(tmp_path), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["args"]["data"] == "mnist"


# ----------------------------------------------------------------------------- bad input

def assert_clean_failure(proc, out, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith(("error:", "exp_colored_mnist.py: error:")), proc.stderr
    for word in words:
        assert word in proc.stderr
    assert not os.path.exists(out)


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--loss", "mse"], ["--loss", "mse"]),
    (["--student-config", "IB"], ["'B'"]),
    (["--teacher-config", "rA"], ["carries the label"]),
    (["--spurious-frac", "1.5"], ["--spurious-frac", "[0, 1]"]),
    (["--data", "mnist"], ["--data-root"]),
    (["--data", "mnist", "--data-root", "/nonexistent/mnist"],
     ["/nonexistent/mnist", "--download"]),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"],
     ["--device"]),
])
def test_bad_flags_fail_cleanly(tmp_path, args, words):
    out = tmp_path / "r.json"
    assert_clean_failure(run("--smoke", *args, "--out", str(out),
                             "--cache-dir", str(tmp_path / "c")), out, *words)


@pytest.mark.slow
def test_empty_mnist_folder_fails_cleanly(tmp_path):
    out = tmp_path / "r.json"
    proc = run("--smoke", "--data", "mnist", "--data-root", str(tmp_path), "--out", str(out))
    assert_clean_failure(proc, out, "MNIST")


@pytest.mark.slow
def test_unwritable_out_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "sub" / "r.json"  # a folder below a file can never be made, even by root
    proc = run("--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "c"))
    assert_clean_failure(proc, out, "--out")
    assert not (tmp_path / "c").exists()  # failed before any teacher was trained


@pytest.mark.slow
def test_corrupt_or_mismatched_teacher_cache_fails_cleanly(smoke_runs, tmp_path):
    folder, _ = smoke_runs
    cache = tmp_path / "cache"
    cache.mkdir()
    weights = [f for f in os.listdir(folder / "cache") if f.endswith(".pt")]
    assert len(weights) == 1
    key = weights[0][:-3]
    (cache / f"{key}.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "r.json"
    assert_clean_failure(run("--smoke", "--out", str(out), "--cache-dir", str(cache)), out,
                         "corrupt", "--retrain-teacher")
    # weights saved with a key that is not the file's
    saved = torch.load(folder / "cache" / f"{key}.pt", weights_only=True)
    saved["key"]["settings"]["seed"] = 99
    torch.save(saved, cache / f"{key}.pt")
    assert_clean_failure(run("--smoke", "--out", str(out), "--cache-dir", str(cache)), out,
                         "another configuration")
    # --retrain-teacher repairs it
    proc = run("--smoke", "--retrain-teacher", "--out", str(out), "--cache-dir", str(cache))
    assert proc.returncode == 0 and json.loads(out.read_text())["teacher"]["cached"] is False


@pytest.mark.slow
def test_sigterm_is_an_interrupt_not_a_traceback(tmp_path):
    """A grid runner or a cluster stops a run with SIGTERM: one line, exit 130, like Ctrl-C."""
    code = ("import os, signal, harness\n"
            "def main():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    open('written', 'w').close()\n"
            "harness.run_cli(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 130
    assert proc.stderr.strip() == "interrupted: no result was written"
    assert not (tmp_path / "written").exists()


@pytest.mark.slow
def test_explicit_jacobian_method_with_a_resnet_fails_before_training(tmp_path):
    r = run("--smoke", "--loss", "jacobian", "--arch", "resnet18", "--jacobian-method", "explicit",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "explicit needs --arch cnn or lenet" in r.stderr and \
        "Traceback" not in r.stderr
    # no teacher was trained
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r.json").exists()


def test_the_student_architecture_can_differ_from_the_teachers():
    args = cm.parse_args(["--arch", "cnn", "--student-arch", "lenet"])
    teacher_cfg, distill_cfg = cm.harness.settings_from_flags(args, cm.TEACHER, cm.DISTILL)
    assert (teacher_cfg.arch, distill_cfg.arch) == ("cnn", "lenet")
    args = cm.parse_args([])
    assert cm.harness.settings_from_flags(args, cm.TEACHER, cm.DISTILL)[1].arch == "cnn"
    with pytest.raises(common.UserError, match="explicit needs --arch cnn or lenet, not resnet18"):
        cm.parse_args(["--student-arch", "resnet18", "--jacobian-method", "explicit"])


def test_each_mixture_loss_takes_its_own_default_weight_and_t2_stays_with_plain_kl():
    for loss in ("jacobian", "contrastive"):
        args = cm.parse_args(["--loss", loss])
        distill_cfg = cm.harness.settings_from_flags(args, cm.TEACHER, cm.DISTILL)[1]
        # the JSON's config records the weight used
        assert args.alpha == distill_cfg.alpha == cm.ALPHA[loss]
        assert distill_cfg.t2 and not distill_cfg.mixture_t2
    assert cm.parse_args(["--loss", "kl"]).alpha is None  # plain KL has no second term
    args = cm.parse_args(["--loss", "contrastive", "--alpha", "0.2", "--mixture-t2", "--no-t2"])
    distill_cfg = cm.harness.settings_from_flags(args, cm.TEACHER, cm.DISTILL)[1]
    assert (distill_cfg.alpha, distill_cfg.mixture_t2, distill_cfg.t2) == (0.2, True, False)
    with pytest.raises(common.UserError, match="--alpha"):
        cm.parse_args(["--loss", "jacobian", "--alpha", "1.5"])
