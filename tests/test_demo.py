"""``spp-curate demo`` (what ``make demo`` runs), end to end at a small size on the committed subset."""

from __future__ import annotations

import json

from conftest import FMNIST, run_cli


def test_the_demo_mines_with_raw_pixels_trains_both_runs_and_prints_them(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--root", FMNIST, "--limit", "300", "--epochs", "1", "--out", out) == 0
    printed = capsys.readouterr().out
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
