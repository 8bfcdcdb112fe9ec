"""Guards that stop a meaningless run (a teacher at chance, a non-finite model), the flag on a
student that never fit its data, strict JSON, provenance, the teacher cache's safety and the bad
inputs found by probing. Each failure must be one `error:` line, exit 2, no result and nothing
cached."""
import argparse
import dataclasses
import errno
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import common  # noqa: E402
import harness  # noqa: E402
import exp_cifar_patch  # noqa: E402
import exp_colored_mnist  # noqa: E402
import exp_waterbirds  # noqa: E402
from test_cifar_patch import write_cifar  # noqa: E402
from test_colored_mnist import write_idx, write_mnist  # noqa: E402
from test_waterbirds import write_folder  # noqa: E402

SCRIPTS = {"colored_mnist": exp_colored_mnist, "waterbirds": exp_waterbirds,
           "cifar_patch": exp_cifar_patch}


def run_main(module, argv, monkeypatch, capsys):
    """The command-line path (harness.run_cli around main) in-process: (exit code, stdout,
    stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py"] + [str(a) for a in argv])
    with pytest.raises(SystemExit) as info:
        harness.run_cli(module.main)
        raise SystemExit(0)
    cap = capsys.readouterr()
    return info.value.code, cap.out, cap.err


def assert_one_error(code, err, *words):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def cached_teachers(cache):
    return sorted(f for f in os.listdir(cache) if f.endswith(".pt")) if os.path.isdir(cache) else []


# ----------------------------------------------------------------------------- the teacher

def test_a_teacher_at_chance_stops_before_distilling(tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    code, stdout, err = run_main(exp_colored_mnist,
                                 ["--teacher-steps", "1", "--steps", "1", "--n-train", "300",
                                  "--out", out, "--cache-dir", cache], monkeypatch, capsys)
    assert_one_error(code, err, "teacher reaches only", "floor 0.550", "--teacher-min-acc")
    assert "student (" not in stdout and not out.exists() and cached_teachers(cache) == []


def test_the_floor_is_a_flag(tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    code, _, err = run_main(exp_colored_mnist,
                            ["--teacher-steps", "1", "--steps", "1", "--n-train", "300",
                             "--teacher-min-acc", "0", "--out", out, "--cache-dir", cache],
                            monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["teacher"]["floor"] == 0 and 0 <= result["teacher"]["validation_acc"] <= 1


def spoil(model):
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    return model


def test_a_teacher_that_turns_nan_on_its_last_step_is_neither_cached_nor_used(tmp_path, monkeypatch,
                                                                               capsys):
    train = common.train_teacher
    monkeypatch.setattr(harness, "train_teacher", lambda *a, **k: spoil(train(*a, **k)))
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    code, _, err = run_main(exp_colored_mnist, ["--smoke", "--out", out, "--cache-dir", cache],
                            monkeypatch, capsys)
    assert_one_error(code, err, "teacher has non-finite values", "--teacher-lr")
    assert not out.exists() and cached_teachers(cache) == []


def test_a_teacher_that_fails_once_is_trained_again_from_a_new_start(tmp_path, monkeypatch, capsys):
    """A teacher that never leaves chance (or turns non-finite) on its first training gets a new
    initialisation and batch order; the run goes on and the result says how many attempts it
    took."""
    train, seeds = common.train_teacher, []

    def first_fails(model, data, cfg, device, channels_last=False):
        seeds.append(cfg.seed)
        trained = train(model, data, cfg, device, channels_last)
        return spoil(trained) if len(seeds) == 1 else trained
    monkeypatch.setattr(harness, "train_teacher", first_fails)
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    code, stdout, err = run_main(exp_colored_mnist, ["--smoke", "--out", out, "--cache-dir", cache],
                                 monkeypatch, capsys)
    assert code == 0, err
    assert seeds == [0, 1000] and "training again from a new initialisation" in stdout
    assert json.loads(out.read_text())["teacher"]["attempts"] == 2 and \
        len(cached_teachers(cache)) == 1


@pytest.mark.slow
def test_a_broken_cached_teacher_points_to_retrain(tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    argv = ["--smoke", "--loss", "kl", "--out", out, "--cache-dir", cache]
    assert run_main(exp_colored_mnist, argv, monkeypatch, capsys)[0] == 0
    [name] = cached_teachers(cache)
    saved = torch.load(cache / name, weights_only=True)
    next(iter(saved["state_dict"].values())).fill_(float("nan"))
    torch.save(saved, cache / name)
    out.unlink()
    code, _, err = run_main(exp_colored_mnist, argv, monkeypatch, capsys)
    assert_one_error(code, err, "teacher has non-finite values", "--retrain-teacher")
    assert not out.exists()
    assert run_main(exp_colored_mnist, argv + ["--retrain-teacher"], monkeypatch, capsys)[0] == 0


def test_a_student_that_turns_nan_on_its_last_step_writes_nothing(tmp_path, monkeypatch, capsys):
    distill = common.distill

    def nan_on_last_step(student, *a, **k):
        run = distill(student, *a, **k)
        spoil(student)
        return run
    monkeypatch.setattr(common, "distill", nan_on_last_step)
    out = tmp_path / "r.json"
    code, _, err = run_main(exp_cifar_patch,
                            ["--smoke", "--out", out, "--cache-dir", tmp_path / "c"],
                            monkeypatch, capsys)
    assert_one_error(code, err, "student has non-finite values", "--lr")
    assert not out.exists()


# -----------------------------------------------------------------------------
# the student's fit, strict JSON, provenance

@pytest.mark.parametrize("loss", ["ce", "kl", "jacobian", "contrastive"])
def test_one_fit_rule_for_every_loss(loss):
    torch.manual_seed(0)
    teacher = common.freeze(common.SmallCNN(3, 4, 4))
    x = torch.rand(64, 3, 8, 8)
    y = common.predict(teacher, x).argmax(1)
    run = lambda min_fit, smoke=False: type("Run", (), {"args": type(  # noqa: E731
        "Args", (), {"loss": loss, "student_config": "IA", "student_min_fit": min_fit,
                     "smoke": smoke})})
    # a perfect imitator of a teacher whose answers are never the labels: excluded, whatever loss
    wrong = common.TensorSet(x, (y + 1) % 4)
    fit = harness.student_fit(run(None), common.predict(teacher, x), teacher, wrong)
    assert fit["acc"] == 0 and fit["agreement"] == 1 and not fit["ok"]
    assert fit["floor"] == pytest.approx(0.25 + 0.75 / 2)  # halfway between chance and 1
    # accuracy on the labels decides, against the default floor or the flag's
    right = common.TensorSet(x, y)
    assert harness.student_fit(run(None), common.predict(teacher, x), teacher, right)["ok"]
    assert not harness.student_fit(run(0.2), common.predict(teacher, x), teacher, wrong)["ok"]
    assert harness.student_fit(run(None, smoke=True), common.predict(teacher, x), teacher,
                               wrong)["ok"]  # --smoke checks the setup only


@pytest.mark.slow
def test_a_student_that_did_not_fit_is_flagged_in_json_and_table(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run_main(exp_waterbirds,
                                 ["--smoke", "--steps", "1", "--student-min-fit", "0.9",
                                  "--out", out, "--cache-dir", tmp_path / "c"],
                                 monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert not result["student"]["fit"]["ok"] and result["student"]["fit"]["acc"] < 0.9
    assert len(result["exclusions"]) == 1 and result["exclusions"][0].startswith("student_fit")
    assert "EXCLUDED: student_fit" in stdout


def test_result_json_is_strict(tmp_path):
    path = tmp_path / "r.json"
    harness.write_result(str(path), {"a": float("nan"), "b": [1.0, float("inf")],
                                     "c": {"d": -float("inf"), "e": 2}})

    def refuse(name):
        raise ValueError(f"bare {name}")
    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}


@pytest.mark.slow
def test_provenance_and_a_cache_key_that_follows_the_data(tmp_path, monkeypatch, capsys):
    keys, loaded = [], []
    write_mnist(tmp_path / "one")
    write_mnist(tmp_path / "two")  # the same files in another folder: the same teacher
    write_mnist(tmp_path / "other", images=np.full((120, 28, 28), 200))  # other images: another one
    for copy in ("one", "two", "other"):
        out = tmp_path / f"{copy}.json"
        code, stdout, err = run_main(exp_colored_mnist,
                                     ["--smoke", "--data", "mnist", "--data-root", tmp_path / copy,
                                      "--out", out, "--cache-dir", tmp_path / "cache"],
                                     monkeypatch, capsys)
        assert code == 0, err
        loaded.append("loaded from cache" in stdout)
        result = json.loads(out.read_text())
        prov = result["provenance"]
        keys.append(prov["teacher_cache_key"])
        assert prov["test_seed"] == harness.TEST_SEED and \
            prov["data_version"] == exp_colored_mnist.DATA_VERSION
        assert prov["torch"] == torch.__version__ and prov["numpy"] == np.__version__ and \
            prov["scikit-learn"]
        assert prov["commit"] is None or len(prov["commit"]) == 40
        assert "--data-root" in prov["argv"]
    assert keys[0] == keys[1] != keys[2] and loaded == [False, True, False]
    assert len(cached_teachers(tmp_path / "cache")) == 2


# -----------------------------------------------------------------------------
# bad input, before any training

@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("argv, words", [
    (["--lr", "nan"], ["--lr", "positive finite"]),
    (["--teacher-lr", "inf"], ["--teacher-lr"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", "18446744073709551616"], ["--seed"]),
    (["--device", "mps"], ["--device 'mps'"]),
    (["--out", "OUTDIR"], ["is a folder"]),
    (["--out", "OUTDIR/"], ["is a folder"]),
    (["--cache-dir", "AFILE"], ["--cache-dir", "is a file"]),
    (["--cache-dir", "AFILE/below"], ["cannot create --cache-dir"]),
    (["--eval-every", "0"], ["--eval-every"]),
])
def test_bad_input_is_one_line_before_training(script, argv, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("")
    argv = [a.replace("OUTDIR", str(tmp_path / "outdir")).replace("AFILE", str(tmp_path / "afile"))
            for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "r.json")]
    if "--cache-dir" not in argv:
        argv += ["--cache-dir", str(tmp_path / "cache")]
    monkeypatch.setattr(harness, "train_teacher",
                        lambda *a, **k: pytest.fail("trained before the check"))
    code, _, err = run_main(SCRIPTS[script], ["--smoke"] + argv, monkeypatch, capsys)
    assert_one_error(code, err, *words)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "outdir" / "r.json").exists()


def test_an_image_size_too_large_is_refused(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(exp_waterbirds,
                            ["--image-size", "100000000", "--out", tmp_path / "r.json"],
                            monkeypatch, capsys)
    assert_one_error(code, err, "--image-size")
    code, _, err = run_main(exp_waterbirds,
                            ["--image-size", "512", "--n-train", "100000000",
                             "--out", tmp_path / "r.json"],
                            monkeypatch, capsys)
    assert_one_error(code, err, "GiB of memory")


def test_a_real_waterbirds_test_split_without_every_group_is_refused(tmp_path, monkeypatch, capsys):
    write_folder(tmp_path / "wb")
    cache = tmp_path / "cache"
    code, _, err = run_main(exp_waterbirds,
                            ["--data", "waterbirds", "--data-root", tmp_path / "wb",
                             "--n-test", "1", "--smoke", "--out", tmp_path / "r.json",
                             "--cache-dir", cache],
                            monkeypatch, capsys)
    assert_one_error(code, err, "lacks group", "--n-test")
    assert cached_teachers(cache) == []


def test_garbage_mnist_files_are_one_error_line(tmp_path, monkeypatch, capsys):
    raw = write_mnist(tmp_path, sizes=(60, 20))
    # torchvision's reader fails on these with an AssertionError without a message
    for name in os.listdir(raw):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    code, _, err = run_main(exp_colored_mnist,
                            ["--smoke", "--data", "mnist", "--data-root", tmp_path,
                             "--out", tmp_path / "r.json", "--cache-dir", tmp_path / "c"],
                            monkeypatch, capsys)
    assert_one_error(code, err, "cannot read MNIST")
    code, _, err = run_main(exp_cifar_patch,
                            ["--smoke", "--dominoes", "--teacher-config", "IB",
                             "--domino-data", "mnist", "--data-root", tmp_path,
                             "--out", tmp_path / "r.json", "--cache-dir", tmp_path / "c"],
                            monkeypatch, capsys)
    assert_one_error(code, err, "cannot read MNIST")


def test_mnist_labels_out_of_range_are_refused(tmp_path, monkeypatch, capsys):
    raw = write_mnist(tmp_path, sizes=(60, 20))
    write_idx(str(raw / "train-labels-idx1-ubyte"), np.arange(60) % 12)
    code, _, err = run_main(exp_colored_mnist,
                            ["--smoke", "--data", "mnist", "--data-root", tmp_path,
                             "--out", tmp_path / "r.json", "--cache-dir", tmp_path / "c"],
                            monkeypatch, capsys)
    assert_one_error(code, err, "labels must be 0..9")


def test_cifar_batches_without_images_are_refused(tmp_path, monkeypatch, capsys):
    write_cifar(str(tmp_path), per_batch=0)
    code, _, err = run_main(exp_cifar_patch,
                            ["--smoke", "--data", "cifar10", "--data-root", tmp_path,
                             "--out", tmp_path / "r.json", "--cache-dir", tmp_path / "c"],
                            monkeypatch, capsys)
    assert_one_error(code, err, "0 images")


# ----------------------------------------------------------------------------- the teacher cache

def tiny_run(tmp_path, **args):
    """A run of a tiny teacher (2 classes, 8x8 images), its build and its data."""
    values = {"cache_dir": str(tmp_path / "cache"), "retrain_teacher": False,
              "teacher_min_acc": 0.0, "smoke": False, "teacher_config": "I",
              "channels_last": False, "teacher_checkpoint": None, **args}
    settings = harness.TeacherSettings(steps=2, batch_size=16, lr=0.01)
    run = harness.Run("tiny", 1, argparse.Namespace(**values), settings, harness.DistillSettings(),
                      torch.device("cpu"), str(tmp_path / "r.json"), 0.0)
    data = common.TensorSet(torch.rand(32, 3, 8, 8), torch.arange(32) % 2)
    return run, (lambda: common.SmallCNN(3, 2, 4)), data


def test_a_read_only_cache_serves_the_teachers_it_holds(tmp_path, monkeypatch):
    run, build, data = tiny_run(tmp_path)
    teacher = harness.get_teacher(run, build, data, data, log=lambda m: None)
    assert not teacher.record["cached"] and teacher.record["attempts"] == 1
    before = sorted(os.listdir(run.args.cache_dir))
    # what a read-only folder answers
    monkeypatch.setattr(harness, "prepare_cache", lambda folder: False)
    again = harness.get_teacher(run, build, data, data, log=lambda m: None)
    assert again.record["cached"] and again.record["attempts"] == 0
    assert all(torch.equal(a, b) for a, b in zip(teacher.model.state_dict().values(),
                                                 again.model.state_dict().values()))
    assert sorted(os.listdir(run.args.cache_dir)) == before  # not even a lock file was made
    other = common.TensorSet(data.x.flip(0), data.y)  # other training data: another teacher
    with pytest.raises(common.UserError, match="read-only"):
        harness.get_teacher(run, build, other, data, log=lambda m: None)


def test_a_full_disk_leaves_no_half_written_teacher(tmp_path, monkeypatch):
    run, build, data = tiny_run(tmp_path)
    save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    logged = []
    teacher = harness.get_teacher(run, build, data, data, log=logged.append)
    assert not teacher.record["cached"] and any("could not be cached" in line for line in logged)
    cache = run.args.cache_dir
    # no .pt, .json or temporary file
    assert [f for f in os.listdir(cache) if not f.endswith(".lock")] == []
    monkeypatch.setattr(torch, "save", save)
    again = harness.get_teacher(run, build, data, data, log=lambda m: None)
    assert not again.record["cached"] and len(cached_teachers(cache)) == 1  # the next run caches it


def test_a_teacher_below_its_floor_is_retrained_then_refused_and_never_cached(tmp_path):
    run, build, data = tiny_run(tmp_path, teacher_min_acc=1.01)  # a floor no teacher reaches
    logged = []
    with pytest.raises(common.UserError, match="below the floor 1.010"):
        harness.get_teacher(run, build, data, data, log=logged.append)
    assert sum("training again from a new initialisation" in line for line in logged) == \
        harness.TEACHER_ATTEMPTS - 1
    assert cached_teachers(run.args.cache_dir) == []


def test_the_cache_key_follows_the_training_data_and_the_settings(tmp_path):
    run, build, data = tiny_run(tmp_path)
    key = harness.get_teacher(run, build, data, data, log=lambda m: None).record["cache_key"]
    same = harness.get_teacher(run, build, common.TensorSet(data.x.clone(), data.y.clone()), data,
                               log=lambda m: None)
    # the same bytes: the same teacher
    assert same.record["cached"] and same.record["cache_key"] == key
    moved = common.TensorSet(data.x + 1e-3, data.y)
    assert harness.get_teacher(run, build, moved, data,
                               log=lambda m: None).record["cache_key"] != key
    longer = run._replace(teacher=dataclasses.replace(run.teacher, steps=3))
    assert harness.get_teacher(longer, build, data, data,
                               log=lambda m: None).record["cache_key"] != key


# ----------------------------------------------------------------------------- saved weights

@pytest.mark.slow
def test_saved_weights_recompute_the_result_and_a_teacher_checkpoint_round_trips(
        tmp_path, monkeypatch, capsys):
    from analysis import recompute
    argv = ["--smoke", "--dominoes", "--teacher-config", "IB", "--student-config", "IAB",
            "--loss", "jacobian", "--cache-dir", tmp_path / "c"]
    out = tmp_path / "r.json"
    code, _, err = run_main(exp_cifar_patch, argv + ["--out", out], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    for name, m in result["student"]["eval"].items():  # where they look, per cue and test set
        assert set(m["cue_share"]) == {"A", "B"} and -1 <= m["saliency_cosine"] <= 1
        assert set(result["teacher"]["eval"][name]["cue_share"]) == {"A", "B"}
        assert 0 <= m["cka"] <= 1 + 1e-9 and 0 <= m["procrustes"] <= math.sqrt(2) + 1e-9
    weights = result["weights"]
    assert (tmp_path / weights["student"]["file"]).exists()

    def run_recompute(*args):
        monkeypatch.setattr(sys, "argv", ["recompute.py", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            harness.run_cli(lambda: sys.exit(recompute.main()))
        cap = capsys.readouterr()
        return info.value.code, cap.out, cap.err
    code, stdout, err = run_recompute(out)
    assert code == 0 and "largest difference 0" in stdout, stdout + err
    # a teacher from a file: the saved one gives the same teacher numbers
    out2 = tmp_path / "r2.json"
    code, stdout, err = run_main(exp_cifar_patch, argv + [
        "--out", out2, "--teacher-checkpoint", tmp_path / weights["teacher"]["file"]],
        monkeypatch, capsys)
    assert code == 0, err
    again = json.loads(out2.read_text())
    assert again["teacher"]["eval"] == result["teacher"]["eval"]
    assert again["teacher"]["checkpoint_sha256"] == weights["teacher"]["sha256"]
    assert "teacher: loaded from --teacher-checkpoint" in stdout
    # the saliency figure of these results
    from analysis import saliency
    monkeypatch.setattr(sys, "argv", ["saliency.py", str(tmp_path), "--set", "IAB", "--images",
                                      "2", "--out", str(tmp_path / "s.png")])
    with pytest.raises(SystemExit) as info:
        harness.run_cli(lambda: sys.exit(saliency.main()))
    assert info.value.code in (0, None), capsys.readouterr().err
    assert (tmp_path / "s.png").stat().st_size > 10000
    assert "2 images of IAB, teacher and 1 students (jacobian)" in capsys.readouterr().out
    # what each measure costs, on these models and test sets (no timing asserted)
    from analysis import bench_measures
    monkeypatch.setattr(sys, "argv", ["bench_measures.py", str(out), "--repeats", "1"])
    harness.run_cli(bench_measures.main)
    lines = capsys.readouterr().out.splitlines()
    assert "12 test sets" in lines[0] and len(lines) == 5
    assert [line.split(" s  ")[1].split(" (")[0].strip() for line in lines[1:]] == [
        "logits and agreement", "features, CKA and Procrustes distance",
        "where they look", "saving both models' weights"]
    # a file that is not the one the result recorded is refused
    with open(tmp_path / weights["student"]["file"], "ab") as f:
        f.write(b"x")
    code, stdout, err = run_recompute(out)
    assert_one_error(code, err, "sha256", "nothing was recomputed")


def write_checkpoint(path, kind):
    if kind == "corrupt":
        path.write_bytes(b"not a torch file")
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "classes":
        torch.save(common.SmallCNN(3, 2, 16).state_dict(), path)
    elif kind == "width":
        torch.save(common.SmallCNN(3, 10, 8).state_dict(), path)
    elif kind == "lenet":
        torch.save(common.LeNet(3, 10, 16, (28, 28)).state_dict(), path)


@pytest.mark.parametrize("kind, words", [
    ("missing", ["does not exist"]),
    ("corrupt", ["cannot be read as a state dict"]),
    ("list", ["holds a list, not a state dict"]),
    ("classes", ["has 2 classes; this experiment has 10"]),
    ("width", ["body.0.weight has shape (8, 3, 3, 3), the teacher's has (16, 3, 3, 3)"]),
    ("lenet", ["does not fit the teacher (SmallCNN)"]),
])
def test_a_bad_teacher_checkpoint_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                                 kind, words):
    path, out = tmp_path / "teacher.pt", tmp_path / "r.json"
    write_checkpoint(path, kind)
    monkeypatch.setattr(harness, "train_teacher",
                        lambda *a, **k: pytest.fail("trained a teacher"))
    code, stdout, err = run_main(exp_colored_mnist, [
        "--smoke", "--teacher-checkpoint", path, "--out", out, "--cache-dir", tmp_path / "c"],
        monkeypatch, capsys)
    assert_one_error(code, err, "--teacher-checkpoint", *words)
    assert not out.exists() and "student (" not in stdout
