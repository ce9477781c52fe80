"""``spp-curate demo`` (what ``make demo`` runs), end to end at a small size on the committed subset."""

from __future__ import annotations

import json

from conftest import FMNIST, run_cli


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
