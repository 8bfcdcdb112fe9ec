"""Tests of exp_cifar_patch.py: cue fractions and positions, independence of randomised cues,
counterfactual sets, the real-format loaders (tiny files), bad input and an end-to-end smoke run."""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import harness  # noqa: E402
import exp_cifar_patch as exp  # noqa: E402
from test_colored_mnist import write_mnist  # noqa: E402

SIDE = 8  # patch side for 32x32 images


def coded_pool(n: int, seed: int = 0):
    """Images whose every pixel is (class + 1) / 20, so a pixel tells which class's image it is."""
    y = torch.randint(10, (n,), generator=torch.Generator().manual_seed(seed))
    x = ((y.float() + 1) / 20)[:, None, None, None].expand(n, 3, 32, 32).clone()
    return x, y


def coded_items():
    """Top-half items whose pixels are (class + 1) / 10, three items per class."""
    y = torch.arange(30) % 10
    return ((y.float() + 1) / 10)[:, None, None].expand(30, 32, 32).clone(), y


def patch_class(x: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """For images that equal `background` except in one patch cell: that cell's class (-1 for
    none)."""
    out = torch.full((len(x),), -1)
    for k, (r, c) in enumerate(exp.patch_cells(32)):
        differs = (x[:, :, r:r + SIDE, c:c + SIDE]
                   != background[:, :, r:r + SIDE, c:c + SIDE]).flatten(1).any(1)
        assert not (differs & (out >= 0)).any(), "two patches on one image"
        out[differs] = k
    return out


def outside_patches(x: torch.Tensor) -> torch.Tensor:
    """The pixels of the image that no patch cell covers, flattened per sample."""
    keep = torch.ones(32, 32, dtype=torch.bool)
    for r, c in exp.patch_cells(32):
        keep[r:r + SIDE, c:c + SIDE] = False
    return x[:, :, keep].flatten(1)


BLANK = torch.full((3, 32, 32), 0.5)


# ----------------------------------------------------------------------------- cues

def test_patch_cells_are_distinct_quarter_width_squares():
    cells = exp.patch_cells(32)
    assert len(set(cells)) == 10  # every class, class 9 included, has its own position
    masks = torch.zeros(10, 32, 32)
    for k, (r, c) in enumerate(cells):
        masks[k, r:r + SIDE, c:c + SIDE] = 1
        assert 0 <= r <= 32 - SIDE and 0 <= c <= 32 - SIDE
    assert masks.sum(0).max() == 1  # no two patches overlap


@pytest.mark.parametrize("frac", [1.0, 0.7, 0.0])
def test_patch_carries_label_at_exact_fraction_and_position(frac):
    x, y = torch.zeros(1000, 3, 32, 32), torch.arange(1000) % 10
    s = exp.render(x, y, "IA", frac, 1.0, None, BLANK, None, torch.Generator().manual_seed(1))
    cls = patch_class(s.x, x)
    assert (cls >= 0).all()  # every image has exactly one patch
    assert (cls == s.y).sum().item() == round(frac * 1000)
    assert torch.equal(s.y, y)


def test_mandelbrot_patch_is_the_class_pattern():
    patterns = exp.mandelbrot_patterns(SIDE)
    assert patterns.shape == (10, 3, SIDE, SIDE)
    flat = patterns.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(10) * 1e3).min() > 0.5  # ten distinct patterns
    x, y = torch.zeros(200, 3, 32, 32), torch.arange(200) % 10
    s = exp.render(x, y, "IA", 1.0, 1.0, patterns, BLANK, None, torch.Generator().manual_seed(2))
    for i in range(200):
        r, c = exp.patch_cells(32)[int(y[i])]
        assert torch.equal(s.x[i, :, r:r + SIDE, c:c + SIDE], patterns[y[i]])


def test_domino_item_carries_label_at_exact_fraction():
    x, y = torch.zeros(1000, 3, 32, 32), torch.arange(1000) % 10
    s = exp.render(x, y, "IAB", 1.0, 0.6, None, BLANK, coded_items(),
                   torch.Generator().manual_seed(3))
    assert s.x.shape == (1000, 3, 64, 32)
    top_cls = (s.x[:, 0, 0, 0] * 10 - 1).round().long()
    assert (s.x[:, :, :32] == s.x[:, :1, :1, :1]).all()  # one whole item, grey, fills the top half
    assert (top_cls == s.y).sum().item() == 600
    assert (patch_class(s.x[:, :, 32:], x) == s.y).all()  # frac_a = 1: the patch always carries it


@pytest.mark.parametrize("config,which",
                         [("I+rA", "A"), ("I+rB", "B"), ("rI+A", "I"), ("IA+rB", "B")])
def test_randomised_cues_are_independent_of_label(config, which):
    n = 20000
    x, y = coded_pool(n, seed=4)
    s = exp.render(x, y, config, 1.0, 1.0, None, BLANK, coded_items(),
                   torch.Generator().manual_seed(5))
    bottom = s.x[:, :, 32:]
    if which == "A":
        cue = patch_class(bottom, x)
    elif which == "B":
        cue = (s.x[:, 0, 0, 0] * 10 - 1).round().long()
    else:
        # the class of the random image
        cue = (outside_patches(bottom)[:, 0] * 20 - 1).round().long()
    assert (cue >= 0).all()
    table = np.zeros((10, 10))
    np.add.at(table, (s.y.numpy(), cue.numpy()), 1)
    assert table.min() > 0
    assert chi2_contingency(table)[1] > 1e-3  # independent: a cue equal to the label gives p ~ 0


def test_counterfactual_sets_change_only_what_their_names_say():
    x, y = coded_pool(500, seed=6)
    gen = torch.Generator().manual_seed(7)
    sets = {name: exp.render(x, y, name, 1.0, 1.0, None, BLANK, coded_items(), gen)
            for name in exp.TEST_CONFIGS + exp.DOMINO_TEST_CONFIGS}
    zeros_top = torch.zeros(500, 3, 32, 32)
    for name, s in sets.items():
        top, bottom = s.x[:, :, :32], s.x[:, :, 32:]
        roles = common.parse_config(name, "IAB")
        if roles["I"] == "label":  # the held-out image and its label, untouched outside the patch
            assert torch.equal(s.y, y) and torch.equal(outside_patches(bottom), outside_patches(x))
        elif roles["I"] == "random":
            assert torch.equal(outside_patches(bottom), outside_patches(x))
            assert (s.y != y).float().mean() > 0.8  # the label is no longer the image's class
        else:
            assert torch.equal(outside_patches(bottom),
                               outside_patches(BLANK.expand(500, -1, -1, -1)))
        patch = patch_class(bottom, x if roles["I"] != "absent" else BLANK.expand(500, -1, -1, -1))
        if roles["A"] == "absent":
            assert (patch == -1).all(), name
        elif roles["A"] == "label":
            assert torch.equal(patch, s.y), name
        else:
            assert (patch >= 0).all() and (patch != s.y).float().mean() > 0.8, name
        top_cls = (top[:, 0, 0, 0] * 10 - 1).round().long()
        if roles["B"] == "absent":
            assert torch.equal(top, zeros_top), name
        elif roles["B"] == "label":
            assert torch.equal(top_cls, s.y), name
        else:
            assert (top_cls != s.y).float().mean() > 0.8, name


def test_shapes_generator_is_fixed_balanced_and_varied():
    x1, y1 = exp.make_shapes(200, seed=3)
    x2, y2 = exp.make_shapes(200, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (200, 3, 32, 32) and 0 <= x1.min() and x1.max() <= 1
    assert torch.bincount(y1, minlength=10).tolist() == [20] * 10
    assert not torch.equal(exp.make_shapes(200, seed=4)[0], x1)
    # class means differ less than the images within a class: the colour does not give the class
    # away
    means = torch.stack([x1[y1 == k].mean((0, 2, 3)) for k in range(10)])
    assert means.std(0).max() < 0.1


# ----------------------------------------------------------------------------- real formats

def write_cifar(root: str, per_batch: int = 4) -> tuple[np.ndarray, list]:
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in labels]}, f)
        all_data.append(data)
        all_labels += labels
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"],
                     "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return np.concatenate(all_data), all_labels


@pytest.mark.slow
def test_cifar_reader_matches_torchvision(tmp_path, monkeypatch):
    data, labels = write_cifar(str(tmp_path))
    folder = os.path.join(tmp_path, "cifar-10-batches-py")
    x, y = exp.read_cifar_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    assert x.shape == (20, 3, 32, 32) and y.tolist() == labels[:20]
    assert torch.equal((x * 255).round().byte(), torch.from_numpy(data[:20].reshape(20, 3, 32, 32)))
    # torchvision's own loader, with its MD5 check (which tiny files cannot pass) switched off
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.exists(path))
    tv = tv_cifar.CIFAR10(str(tmp_path), train=False)
    xt, yt = exp.read_cifar_batches(folder, ["test_batch"])
    assert torch.equal((xt * 255).round().byte(), torch.from_numpy(tv.data).permute(0, 3, 1, 2))
    assert yt.tolist() == tv.targets


@pytest.mark.parametrize("name,flag", [("FashionMNIST", "fashionmnist"), ("MNIST", "mnist")])
def test_domino_items_through_torchvision(tmp_path, name, flag):
    labels = np.arange(20) % 10
    write_mnist(tmp_path, name, (20, 10),
                images=np.repeat(labels * 20 + 10, 28 * 28).reshape(20, 28, 28))
    tr_x, tr_y, val_x, val_y, te_x, te_y = exp.load_domino_items(flag, str(tmp_path), False)
    # a sixth of the training split is held out for validation
    assert tr_x.shape == (17, 32, 32) and val_x.shape == (3, 32, 32) and te_x.shape == (10, 32, 32)
    assert tr_y.tolist() + val_y.tolist() == labels.tolist()
    assert torch.allclose(torch.cat([tr_x, val_x])[:, 5, 5],
                          torch.from_numpy(labels * 20 + 10).float() / 255)


def run_main(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["exp_cifar_patch.py"] + argv)
    with pytest.raises(SystemExit) as exc:
        harness.run_cli(exp.main)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr()


def test_cifar10_end_to_end_on_tiny_files(tmp_path, monkeypatch, capsys):
    write_cifar(str(tmp_path), per_batch=40)
    out = tmp_path / "r.json"
    code, cap = run_main(monkeypatch, capsys, ["--data", "cifar10", "--data-root", str(tmp_path),
                                               "--smoke", "--steps", "3", "--teacher-steps", "3",
                                               "--out", str(out),
                                               "--cache-dir", str(tmp_path / "c")])
    assert code == 0, cap.err
    result = json.loads(out.read_text())
    assert result["test_sizes"]["I"] == 40 and result["args"]["data"] == "cifar10"


@pytest.mark.parametrize("argv,message", [
    (["--teacher-config", "IB"], "--dominoes"),
    (["--student-config", "IAC"], "mechanism 'C'"),
    (["--spurious-frac", "1.5"], "--spurious-frac must be in [0, 1]"),
    (["--spurious-frac-b", "-0.1"], "--spurious-frac-b must be in [0, 1]"),
    (["--clutter", "-1"], "--clutter must be at least 0"),
    (["--clutter", "0", "--data", "cifar10", "--data-root", "EMPTY"], "--clutter changes"),
    (["--warmup", "-5"], "--warmup must be at least 0"),
    (["--data", "cifar10"], "--data-root"),
    (["--data", "cifar10", "--data-root", "/nonexistent/cifar"], "does not exist"),
    (["--dominoes", "--domino-data", "fashionmnist", "--data-root", "EMPTY"], "FashionMNIST"),
    (["--data", "cifar10", "--data-root", "EMPTY"], "cifar-10-batches-py"),
])
def test_bad_input_is_one_line_and_no_json(tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    out = tmp_path / "r.json"
    code, cap = run_main(monkeypatch, capsys,
                         argv + ["--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], cap.err
    assert not out.exists()


def test_corrupt_cifar_batch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    write_cifar(str(tmp_path))
    with open(os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    code, cap = run_main(monkeypatch, capsys, ["--data", "cifar10", "--data-root", str(tmp_path),
                                               "--smoke", "--out", str(tmp_path / "r.json"),
                                               "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "data_batch_3" in cap.err and "not a CIFAR-10 python batch" in cap.err
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_dominoes_smoke_run_is_deterministic_and_complete(tmp_path, monkeypatch, capsys):
    argv = ["--dominoes", "--teacher-config", "IB", "--student-config", "IAB",
            "--patch-pattern", "mandelbrot", "--smoke", "--steps", "4", "--teacher-steps", "4",
            "--cache-dir", str(tmp_path / "c")]
    results = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        code, cap = run_main(monkeypatch, capsys, argv + ["--out", str(out)])
        assert code == 0, cap.err
        assert "pattern predictive" in cap.out
        results.append(json.loads(out.read_text()))
    a, b = results
    assert set(a["student"]["eval"]) == set(exp.TEST_CONFIGS + exp.DOMINO_TEST_CONFIGS)
    # every cell of the exhaustive grid
    assert {"I", "A", "B", "IA", "IB", "AB", "IAB"} <= set(a["student"]["eval"])
    assert any("pattern predictive" in note for note in a["notes"])
    assert (a["student"]["eval"] == b["student"]["eval"]
            and a["teacher"]["eval"] == b["teacher"]["eval"])
    assert b["teacher"]["cached"] and not a["teacher"]["cached"]


@pytest.mark.slow
def test_engine_cells_write_the_numbers_of_their_command_lines(tmp_path):
    """Cells run by the grid engine (one process, data, teachers and the ce student shared) write
    the numbers of the same cells run as `python exp_cifar_patch.py ...`: teacher and student
    evaluations, the fit and the curves. The ce student of the second teacher is the first one's,
    evaluated against the second teacher."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    flags = ["--dominoes", "--smoke", "--steps", "6", "--eval-every", "3", "--channels-last",
             "--cache-dir", str(tmp_path / "cache")]
    cells = [(t, s, loss) for t in ("IB", "I") for s, loss in
             (("IAB", "ce"), ("IAB", "kl"), ("I", "jacobian"), ("IAB", "contrastive"))]

    def argv(cell, folder):
        t, s, loss = cell
        return ["--teacher-config", t, "--student-config", s, "--loss", loss, "--seed", "1",
                "--out", str(tmp_path / folder / f"{t}_{s}_{loss}.json"), *flags]
    jobs = "".join(json.dumps({"argv": argv(c, "engine"), "log": str(tmp_path / "engine.log")})
                   + "\n" for c in cells)
    engine = subprocess.run([sys.executable, os.path.join(root, "analysis", "engine.py"),
                             os.path.join(root, "exp_cifar_patch.py")], input=jobs, text=True,
                            capture_output=True, timeout=600, env=env)
    assert engine.returncode == 0, engine.stderr
    assert [json.loads(line)["code"] for line in engine.stdout.splitlines()] == [0] * len(cells)
    log = (tmp_path / "engine.log").read_text()
    assert log.count("the same student was trained for an earlier cell") == 1
    for cell in cells:  # the teachers are cached by now: these runs load them
        single = subprocess.run([sys.executable, os.path.join(root, "exp_cifar_patch.py"),
                                 *argv(cell, "single")], capture_output=True, text=True,
                                timeout=600, env=env)
        assert single.returncode == 0, single.stderr
        name = "_".join(cell) + ".json"
        a = json.loads((tmp_path / "engine" / name).read_text())
        b = json.loads((tmp_path / "single" / name).read_text())
        assert a["teacher"]["eval"] == b["teacher"]["eval"], name
        assert a["student"] == b["student"], name
        assert a["provenance"]["argv"][:8] == b["provenance"]["argv"][:8]
        assert len(a["student"]["curves"]) == 2
