"""exp_waterbirds.py: generated data, counterfactual sets, the real-format loader, bad input,
ImageNet weights offline, smoke runs per loss and determinism."""
import csv
import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import harness  # noqa: E402
import exp_waterbirds as wb  # noqa: E402

SCRIPT = os.path.join(ROOT, "exp_waterbirds.py")


def run(args, tmp_path, name="out.json"):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, SCRIPT, *args, "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc, out


# ----------------------------------------------------------------------------- generated data

@pytest.fixture(scope="module")
def scenes():
    return wb.Scenes(64, 32, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("frac", [0.95, 0.7, 0.0])
def test_training_split_has_the_requested_spurious_fraction(scenes, frac):
    data = wb.training_set(scenes, "IA", frac, torch.Generator().manual_seed(1))
    place = data.group % 2
    assert torch.equal(data.group // 2, data.y)
    assert (place == data.y).sum().item() == round(frac * len(data.y))
    assert data.x.shape == (64, 3, 32, 32) and 0 <= data.x.min() and data.x.max() <= 1


def test_teacher_split_and_test_sets_are_group_balanced(scenes):
    teacher = wb.training_set(scenes, "I+rA", 0.95, torch.Generator().manual_seed(1))
    assert (teacher.group % 2 == 1).sum().item() == 32  # background independent of the label
    sets = wb.generated_test_sets(scenes, torch.Generator().manual_seed(2))
    assert torch.bincount(sets["I+rA"].group, minlength=4).tolist() == [16, 16, 16, 16]
    assert sorted(torch.unique(sets["IA"].group).tolist()) == [0, 3]
    assert sorted(torch.unique(sets["minority"].group).tolist()) == [1, 2]
    assert sets["I"].group is None and sets["A"].group is None


def test_counterfactual_sets_change_only_what_their_names_say(scenes):
    sets = wb.generated_test_sets(scenes, torch.Generator().manual_seed(2))
    y = scenes.y
    for name in ("I", "A", "IA", "I+rA", "minority"):
        assert torch.equal(sets[name].y, y)
    bird = (scenes.alpha == 1).expand_as(sets["IA"].x)        # fully opaque bird pixels
    empty = (scenes.alpha == 0).expand_as(sets["IA"].x)       # pure background
    assert bird.flatten(1).any(1).all(), "every image has a bird"
    land, water = scenes.backgrounds
    matching = torch.where(y.view(-1, 1, 1, 1).bool(), water, land)
    other = torch.where(y.view(-1, 1, 1, 1).bool(), land, water)
    # the bird's own pixels do not depend on the background
    for name in ("I", "minority", "I+rA"):
        assert torch.equal(sets[name].x[bird], sets["IA"].x[bird])
    # A is the matching background without the bird; IA shows that background around the bird
    assert torch.equal(sets["A"].x, matching)
    assert torch.equal(sets["IA"].x[empty], matching[empty])
    assert torch.equal(sets["minority"].x[empty], other[empty])
    # I: one neutral background, the same behind every bird, neither a land nor a water scene
    both = empty[0] & empty[1]
    assert torch.equal(sets["I"].x[0][both], sets["I"].x[1][both])
    assert not torch.equal(sets["I"].x[0][both], matching[0][both])
    neutral = 0.5 * (land.mean(0) + water.mean(0))
    assert torch.allclose(sets["I"].x[0][empty[0]], neutral[empty[0]])
    # I+rA is IA where the background matches and the minority image where it does not
    majority = (sets["I+rA"].group % 2 == y)
    assert torch.equal(sets["I+rA"].x[majority], sets["IA"].x[majority])
    assert torch.equal(sets["I+rA"].x[~majority], sets["minority"].x[~majority])


def test_land_and_water_backgrounds_differ_in_colour():
    g = torch.Generator().manual_seed(0)
    land, water = wb.draw_backgrounds(0, 64, 32, g), wb.draw_backgrounds(1, 64, 32, g)
    lower = slice(24, 32)  # below any horizon
    assert water[:, 2, lower].mean() > water[:, 0, lower].mean() + 0.1   # blue over red
    assert land[:, 1, lower].mean() > land[:, 2, lower].mean() + 0.1     # green over blue


# ----------------------------------------------------------------------------- real-format loader

COLOURS = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200), 3: (220, 220, 40)}


def write_folder(root, per_group=3, fmt="png"):
    """A tiny Waterbirds folder: per_group solid-colour images per group in train and test, and a
    val row; the colour of an image says its group."""
    from PIL import Image
    rows = []
    for split in (0, 1, 2):
        for group in range(4):
            for i in range(per_group if split != 1 else 1):
                name = (f"{group:03d}.{['Land', 'Water'][group % 2]}/img_{split}_{i}."
                        f"{fmt if i % 2 == 0 else 'jpg'}")
                os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
                Image.new("RGB", (40 + 10 * i, 30), COLOURS[group]).save(os.path.join(root, name))
                rows.append({"img_id": len(rows), "img_filename": name, "y": group // 2,
                             "split": split, "place": group % 2, "place_filename": "/x/y.jpg"})
    write_metadata(root, rows)
    return rows


def write_metadata(root, rows,
                   columns=("img_id", "img_filename", "y", "split", "place", "place_filename")):
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_real_loader_reads_groups_and_images(tmp_path):
    write_folder(tmp_path)
    rows = wb.read_metadata(str(tmp_path))
    assert len(rows) == 3 * 4 * 2 + 4
    test = wb.load_split(str(tmp_path), rows, 2, 0, 16, torch.Generator().manual_seed(0))
    assert test.x.shape == (12, 3, 16, 16)
    assert torch.equal(test.group, 2 * test.y + test.group % 2)
    for g, rgb in COLOURS.items():
        mean = test.x[test.group == g].mean((0, 2, 3))
        assert torch.allclose(mean, torch.tensor(rgb) / 255, atol=0.03)
    subset = wb.load_split(str(tmp_path), rows, 0, 5, 16, torch.Generator().manual_seed(0))
    assert len(subset.y) == 5


@pytest.mark.slow
def test_real_folder_runs_end_to_end(tmp_path):
    write_folder(tmp_path / "wb")
    proc, out = run(["--data", "waterbirds", "--data-root", str(tmp_path / "wb"), "--smoke",
                     "--loss", "kl", "--image-size", "32"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["test_sizes"] == {"IA": 6, "I+rA": 12, "minority": 6}
    student = result["student"]["eval"]
    assert set(student["I+rA"]["groups"]) == {"0", "1", "2", "3"}
    assert set(student["minority"]["group_agreement"]) == {"1", "2"}
    assert "student avg" in proc.stdout and "minority" in proc.stdout


def _bad_missing_metadata(root):
    os.remove(os.path.join(root, "metadata.csv"))
    return "metadata.csv"


def _bad_missing_column(root):
    write_metadata(root, wb.read_metadata(root), columns=("img_filename", "y", "split"))
    return "place"


def _bad_split_code(root):
    rows = wb.read_metadata(root)
    rows[5]["split"] = 3
    write_metadata(root, rows)
    return "split = '3'"


def _bad_missing_image(root):
    rows = wb.read_metadata(root)
    os.remove(os.path.join(root, rows[0]["img_filename"]))
    return rows[0]["img_filename"]


def _bad_unreadable_image(root):
    rows = wb.read_metadata(root)
    name = [r for r in rows if r["split"] == 2][0]["img_filename"]
    with open(os.path.join(root, name), "wb") as f:
        f.write(b"not an image at all")
    return name


@pytest.mark.slow
def test_bad_real_folder_from_the_command_line(tmp_path):
    """The process itself: non-zero exit, one `error:` line, no traceback, no JSON."""
    root = tmp_path / "wb"
    write_folder(root)
    expected = _bad_missing_metadata(str(root))
    proc, out = run(["--data", "waterbirds", "--data-root", str(root), "--smoke", "--loss", "kl"],
                    tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("spoil", [_bad_missing_column, _bad_split_code, _bad_missing_image,
                                   _bad_unreadable_image])
def test_bad_real_folder_gives_one_error_line(tmp_path, spoil, monkeypatch, capsys):
    """The same path as the command line (harness.run_cli around main), in-process to save start-up
    time."""
    root = tmp_path / "wb"
    write_folder(root)
    expected = spoil(str(root))
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["exp_waterbirds.py", "--data", "waterbirds",
                                      "--data-root", str(root), "--smoke", "--loss", "kl",
                                      "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(SystemExit) as info:
        harness.run_cli(wb.main)
    assert info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--pretrained"], "--arch resnet18"),
    (["--data", "waterbirds"], "--data-root"),
    (["--data", "waterbirds", "--data-root", "x", "--spurious-frac", "0.9"], "generated data only"),
    (["--data", "waterbirds", "--data-root", "x", "--teacher-config", "I"], "no bird masks"),
    (["--spurious-frac", "1.5"], "--spurious-frac"),
])
def test_bad_flags_are_user_errors(args, message):
    with pytest.raises(common.UserError, match=message):
        wb.parse_args(args)


# ----------------------------------------------------------------------------- ImageNet backbones

def test_torchvision_backbone_has_common_interface():
    model = wb.build_model("resnet18", 8, pretrained=False, size=32)
    x = torch.rand(2, 3, 32, 32)
    assert model.features(x).shape == (2, model.feature_dim)
    assert model(x).shape == (2, 2) and model.classifier.out_features == 2


def test_pretrained_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(common.UserError, match="ImageNet weights for resnet18") as info:
        wb.build_model("resnet18", 8, pretrained=True, size=32)
    assert str(tmp_path) in str(info.value) and "--pretrained" in str(info.value)


# ----------------------------------------------------------------------------- smoke runs

@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """One smoke run per loss, sharing a teacher cache (the first run trains it)."""
    tmp = tmp_path_factory.mktemp("smoke")
    results = {}
    for loss in common.LOSSES:
        proc, out = run(["--smoke", "--loss", loss], tmp, f"{loss}.json")
        assert proc.returncode == 0, proc.stderr
        results[loss] = (proc.stdout, json.loads(out.read_text()))
    return tmp, results


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(common.LOSSES))
def test_smoke_run_writes_group_metrics(smoke_runs, loss):
    _, results = smoke_runs
    stdout, result = results[loss]
    assert result["args"]["loss"] == loss and set(result["student"]["eval"]) == set(wb.TEST_CONFIGS)
    for name in ("IA", "I+rA", "minority"):
        for who in ("teacher", "student"):
            m = result[who]["eval"][name]
            assert m["worst_group_acc"] == min(m["groups"].values())
            assert m["mean_group_acc"] == pytest.approx(sum(m["groups"].values())
                                                        / len(m["groups"]))
            shares = {g: result["group_shares"].get(g, 0.0) for g in m["groups"]}
            assert m["avg_acc"] == pytest.approx(  # weighted by the training set's group shares
                sum(w * m["groups"][g] for g, w in shares.items()) / sum(shares.values()))
        assert (set(result["student"]["eval"][name]["group_agreement"])
                == set(result["student"]["eval"][name]["groups"]))
    assert "worst" in stdout and "minority" in stdout
    shares = result["group_shares"]  # the student's IA: background = bird for 95 % of images
    assert shares["1"] + shares["2"] == pytest.approx(0.05, abs=0.01)


@pytest.mark.slow
def test_same_seed_same_numbers(smoke_runs):
    tmp, results = smoke_runs
    # fresh cache: the teacher is retrained
    proc, out = run(["--smoke", "--loss", "kl"], tmp / "again", "kl.json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out.read_text())
    first = results["kl"][1]
    assert not again["teacher"]["cached"]
    assert again["student"]["eval"] == first["student"]["eval"]
    assert again["teacher"]["eval"] == first["teacher"]["eval"]
