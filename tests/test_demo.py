"""``spp-curate demo`` (what ``make demo`` runs), end to end at a small size on the committed subset."""

from __future__ import annotations

import json

from conftest import FMNIST, run_cli, run_cli_process, said_lines


def test_the_demo_mines_with_raw_pixels_trains_both_runs_and_prints_them(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--root", FMNIST, "--limit", "300", "--epochs", "1", "--out", out) == 0
    captured = capsys.readouterr()
    printed = captured.out
    steps = [line.split("]")[0] + "]" for line in captured.err.splitlines() if line.startswith("[")
             and "/6]" in line]
    assert steps == [f"[{i}/6]" for i in range(1, 7)], steps  # one count over the whole demo
    assert "run 2 of 2, about" in captured.err and "min left" in captured.err
    build = out / "pairs-pixels"
    metrics = json.loads((build / "report" / "metrics.json").read_text())
    meta = json.loads((build / "embeddings" / "meta.json").read_text())
    assert meta["encoder"] == "pixels:32" and meta["dim"] == 3 * 32 * 32
    assert metrics["precision"] > 0.5, metrics["precision"]  # pixel neighbours on Fashion-MNIST; chance is 0.1
    for positives in ("augment", "both"):
        result = json.loads((out / f"simclr-{positives}-pixels" / "eval.json").read_text())
        assert 0.1 < result["knn_top1"] <= 1.0
        assert f"simclr/{positives}" in printed
    assert f"{metrics['precision']:.4f}" in printed and "raw pixels (ref.)" in printed
    assert f"release: {build / 'release'}" in printed.replace("\n", "")
    assert run_cli("verify", build / "release") == 0


def test_log_lines_are_never_wrapped(tmp_path, label_build):
    """Not a terminal (a log): every line the trainer prints stays one line, however long."""
    from conftest import run_cli_process

    proc = run_cli_process("train", "--out", tmp_path / "r", "--pairs", label_build / "release", "--epochs", "1",
                           "--limit", "64", "--batch-size", "32", env={"COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr
    positives = [line for line in proc.stderr.splitlines() if line.startswith("positives: ")]
    assert len(positives) == 1 and positives[0].endswith(")"), proc.stderr[:600]
    pairs = [line for line in proc.stderr.splitlines() if line.startswith("pairs: ")]
    assert pairs and len(pairs[0]) > 40  # longer than the width: kept whole


def test_a_long_step_without_items_says_it_is_at_work(capsys):
    """``progress.heartbeat`` (every ``phase`` and the commands' imports of torch): while a single call runs,
    a line with its time whenever no other line came for a while; none while a bar is on screen. The block
    waits for the line rather than for a time, so a loaded machine only makes it wait longer."""
    import time

    from spp_curate import progress

    capsys.readouterr()
    started = time.monotonic()
    with progress.heartbeat("test: one long call", every=0.1):
        while progress._last_line[0] < started:  # until the heartbeat's line
            assert time.monotonic() < started + 120, "no heartbeat in two minutes"
            time.sleep(0.05)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("test: one long call: 0:00:") and line.endswith(" so far")
                         for line in lines), lines
    progress._bars[0] += 1  # a bar on screen says enough
    try:
        with progress.heartbeat("test: under a bar", every=0.05):
            time.sleep(0.5)
        assert capsys.readouterr().err == ""
    finally:
        progress._bars[0] -= 1


def test_a_command_says_its_first_line_before_loading_torch(label_build):
    """The checks before any stage load no torch for an encoder that needs none (seconds on a small CPU,
    silent); verify loads webdataset (and torch under it) only for a release with tars, saying so first."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from spp_curate.cli import preflight\n"
            "from spp_curate.config import resolve_recipe\n"
            f"preflight(resolve_recipe('fashion-mnist', {{'root': {str(FMNIST)!r}, 'encoder': 'pixels:16'}}, None))\n"
            "print(*sorted(m for m in ('torch', 'webdataset', 'faiss', 'timm') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == [], (proc.stdout, proc.stderr[-2000:])
    verified = run_cli_process("verify", label_build / "release", "--workers", "0")
    assert verified.returncode == 0, verified.stderr
    lines = said_lines(verified.stderr)  # a loaded machine may add heartbeat lines while the library loads
    assert lines[0].startswith("verify: loading webdataset") and lines[1].startswith("verify: start"), lines


def test_the_leading_eigenpairs_are_the_same_numbers_in_the_child_process():
    """Above ``CHILD_EIGH_DIM`` the whitening's eigen-solver runs in a forked child (so the parent can still
    say it is at work); the numbers are those of the same solver in this process."""
    import numpy as np

    from spp_curate.pairing import whiten

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, whiten.CHILD_EIGH_DIM + 8))
    cov = x.T @ x / 299
    values, vectors = whiten.leading_eigenpairs(cov, 16)
    here_values, here_vectors = whiten._eigh(cov, 16)
    assert values.shape == (16,) and vectors.shape == (cov.shape[0], 16)
    assert np.array_equal(values, here_values) and np.array_equal(vectors, here_vectors)
    assert np.all(np.diff(values) >= 0) and np.allclose(cov @ vectors, vectors * values, atol=1e-8)
