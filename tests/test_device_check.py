"""The one command for a GPU machine (``bench/device_check.py``), kept working where no GPU is."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_device_check_rehearsal_runs_every_step_and_writes_every_figure(tmp_path):
    """The smallest rehearsal (``--cpu --smoke``): every step runs on the CPU, the CUDA tests in their CPU form
    pass, and the JSON holds every figure the GPU run must report."""
    proc = subprocess.run([sys.executable, "bench/device_check.py", "--cpu", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "device-check.json").read_text())
    assert proc.returncode == 0, (report.get("failed_steps"), proc.stdout[-2000:])
    for figure in ("device", "versions", "cuda_tests", "embed_img_s", "model_only_img_s", "embed_over_model",
                   "knn_exact_s", "trainer_pairs_s", "eval_img_s", "feed_img_s_per_worker"):
        assert report.get(figure) not in (None, {}, ""), figure
    assert report["cuda_tests"]["passed"] >= 2 and report["cuda_tests"]["failed"] == 0
    assert "torch" in report["versions"] and report["failed_steps"] == []
    assert (tmp_path / "device-check.log").stat().st_size > 0


def test_a_gpu_run_without_a_gpu_fails_instead_of_passing_as_skipped(tmp_path):
    proc = subprocess.run([sys.executable, "bench/device_check.py", "--out", str(tmp_path), "--only", "cuda_tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    report = json.loads((tmp_path / "device-check.json").read_text())
    assert proc.returncode == 1 and "cuda_tests" in report["failed_steps"]
    assert report["cuda_tests"]["failed"] + report["cuda_tests"]["errors"] >= 1


def test_the_gpu_extra_resolves_on_the_package_index_beside_the_pinned_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_pin = next(r for r in project["dependencies"] if r.startswith("torch=="))
    gpu = project["optional-dependencies"]["gpu"]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                           torch_pin, *gpu], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
