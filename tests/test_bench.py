"""analysis/bench_losses.py and analysis/profile_run.py run and report (no timing
assertions)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test starts a script in a new process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke_writes_every_method(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "bench_losses.py"),
                           "--smoke", "--models", "cnn", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["ce", "kl", "contrastive", "jacobian-naive", "jacobian-explicit",
                       "jacobian-loop", "jacobian-batched", "jacobian-vmap", "projection-1",
                       "projection-4"]
    kl = next(row for row in result["rows"] if row["method"] == "kl")
    assert kl["x_kl"] == 1.0
    assert all(row["median_ms"] > 0 for row in result["rows"])
    assert result["device"] == "cpu"


def test_benchmark_rejects_unknown_model(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "bench_losses.py"),
                           "--smoke", "--models", "vgg", "--out", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "vgg" in proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_profile_run_splits_the_training_loop(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "profile_run.py"),
                           os.path.join(ROOT, "exp_colored_mnist.py"), "--top", "5", "--",
                           "--loss", "jacobian", "--smoke", "--device", "cpu", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()  # the experiment itself ran to the end
    lines = {line.split("  ")[1].strip(): line for line in proc.stdout.splitlines()
             if line.startswith("  ") and "%" in line}
    shares = {name: float(line.split()[-2]) for name, line in lines.items()}
    assert set(shares) >= {"forward + loss (objective)", "backward", "evaluation",
                           "forward, loss and backward"}
    assert 0 < shares["forward, loss and backward"] <= 100
    assert "by cumulative" in proc.stdout and "by tottime" in proc.stdout


def test_profile_run_reports_a_failing_script(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "profile_run.py"),
                           os.path.join(ROOT, "exp_colored_mnist.py"), "--", "--loss", "nope"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_check_teachers_reports_each_teacher_and_fails_below_the_bar(tmp_path):
    """--smoke teachers train for seconds and stay far below the bars: every row says
    FAILED, exit 2."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "check_teachers.py"),
                           "--smoke", "--scripts", "exp_cifar_patch.py", "--seeds", "0", "1",
                           "--threads", "1", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith("exp_cifar_patch.py")]
    assert [line.split()[1] for line in rows] == ["0", "1"] and \
        all(line.endswith("FAILED") for line in rows)
    assert proc.returncode == 2 and \
        proc.stderr.strip() == ("error: 2 teacher(s) failed, needed a restart or stayed "
                                 "below the bar")
    assert len([f for f in os.listdir(tmp_path / "threads1") if f.endswith(".pt")]) == 2


def test_grid_benchmark_smoke_times_both_paths(tmp_path):
    out = tmp_path / "grid.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "bench_grid.py"),
                           "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [p["path"] for p in result["paths"]] == ["per-process", "engine, channels-last"]
    for p in result["paths"]:  # one teacher, one student, ce and kl: 2 cells of 20 steps
        assert p["cells"] == 2 and p["steps"] == 40 and p["steps_per_s"] > 0
        assert 0 < p["train_s"] < p["wall_s"] and p["other_s"] > 0
    assert result["batched"]["students"] == 2 and result["batched"]["batched_ms"] > 0
    assert "x first" in proc.stdout and "as one batched model" in proc.stdout
