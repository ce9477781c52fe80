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
    # The caps are the GPU machine's; a loaded 2-core machine rehearsing gets four times as long (what this
    # test checks is that every step runs and reports, not how fast).
    proc = subprocess.run([sys.executable, "bench/device_check.py", "--cpu", "--smoke", "--cap-scale", "4",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=2400)
    report = json.loads((tmp_path / "device-check.json").read_text())
    assert proc.returncode == 0, (report.get("failed_steps"), proc.stdout[-2000:])
    for figure in ("device", "versions", "cuda_tests", "embed_img_s", "model_only_img_s", "embed_over_model",
                   "knn_exact_s", "trainer_pairs_s", "eval_img_s", "feed_img_s_per_worker"):
        assert report.get(figure) not in (None, {}, ""), figure
    assert report["cuda_tests"]["passed"] >= 2 and report["cuda_tests"]["failed"] == 0
    assert "torch" in report["versions"] and report["failed_steps"] == []
    assert (tmp_path / "device-check.log").stat().st_size > 0


def test_a_step_that_prints_no_newline_is_stopped_at_its_cap(tmp_path):
    """pytest's progress dots end no line: a reader waiting for one would let the step run to its end (here
    a minute of dots, then exit 0) and report it passed; the step must be killed at its cap instead."""
    sys.path.insert(0, str(REPO / "bench"))
    from device_check import Log, run_step

    marker = tmp_path / "finished"
    dots = ("import sys, time\n"
            "for _ in range(600):\n"
            "    sys.stdout.write('.'); sys.stdout.flush(); time.sleep(0.1)\n"
            f"open({str(marker)!r}, 'w').close()\n")
    result = run_step("dots", [sys.executable, "-c", dots], 1.0, dict(__import__("os").environ),
                      Log(tmp_path / "log"))
    assert result["error"] == "timed out after 1 s", result
    assert not marker.exists()  # killed, not waited for
    assert "dots| ." in (tmp_path / "log").read_text()  # what it printed before the cap is kept


def test_a_step_s_last_json_line_is_its_result_even_without_a_final_newline(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from device_check import Log, run_step

    result = run_step("json", [sys.executable, "-c", "print('x'); import sys; sys.stdout.write('{\"a\": 1}')"],
                      30.0, dict(__import__("os").environ), Log(tmp_path / "log"))
    assert result.get("result") == {"a": 1} and "error" not in result, result


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
