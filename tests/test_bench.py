"""analysis/bench_losses.py runs every method once and writes its table (no timing assertions)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke_writes_every_method(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "bench_losses.py"), "--smoke",
                           "--models", "cnn", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["ce", "kl", "contrastive", "jacobian-naive", "jacobian-loop", "jacobian-batched",
                       "jacobian-vmap", "projection-1", "projection-4"]
    kl = next(row for row in result["rows"] if row["method"] == "kl")
    assert kl["x_kl"] == 1.0
    assert all(row["median_ms"] > 0 for row in result["rows"])
    assert result["device"] == "cpu"


def test_benchmark_rejects_unknown_model(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "bench_losses.py"), "--smoke",
                           "--models", "vgg", "--out", str(tmp_path / "b.json")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "vgg" in proc.stderr
    assert not (tmp_path / "b.json").exists()
