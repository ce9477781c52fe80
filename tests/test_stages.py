"""Stages run alone, skip what is complete, rerun what a changed option touches, and resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from spp_curate.layout import load_embeddings

from conftest import FMNIST, PAIR_LAYOUT, TEST_ENCODER, run_cli


def _mtimes(build, names):
    return {n: (build / n).stat().st_mtime_ns for n in names}


def _build(out, *extra):
    return run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--shard-size", "1MB", *PAIR_LAYOUT, *extra)


def test_rebuild_skips_complete_stages_and_reruns_what_an_option_touches(label_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    files = ["index.parquet", "embeddings/meta.json", "pairs.parquet", "report/metrics.json", "release/manifest.json"]
    before = _mtimes(out, files)
    assert _build(out, "--category", "label") == 0
    assert _mtimes(out, files) == before  # nothing ran again

    pairs_before = pq.read_table(out / "pairs.parquet")
    assert _build(out, "--category", "label", "--max-per-anchor", "1") == 0
    after = _mtimes(out, files)
    assert after["index.parquet"] == before["index.parquet"]
    assert after["embeddings/meta.json"] == before["embeddings/meta.json"]
    assert after["pairs.parquet"] != before["pairs.parquet"]
    assert after["release/manifest.json"] != before["release/manifest.json"]
    pairs_after = pq.read_table(out / "pairs.parquet").to_pandas()
    assert pairs_after.groupby("anchor_id").size().max() == 1
    assert len(pairs_after) < pairs_before.num_rows
    assert run_cli("verify", out / "release") == 0


def test_a_stage_runs_alone_on_a_build_directory(label_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    shutil.rmtree(out / "report")
    assert run_cli("report", out) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["precision"] == 1.0
    html = (out / "report" / "index.html").read_text()
    for figure in ("pairs-strongest.png", "pairs-threshold.png", "similarity.png"):
        assert figure in html and (out / "report" / figure).stat().st_size > 1000
    before = _mtimes(out, ["report/metrics.json"])
    assert run_cli("report", out) == 0  # complete: skipped
    assert _mtimes(out, ["report/metrics.json"]) == before
    assert run_cli("report", out, "--force") == 0
    assert _mtimes(out, ["report/metrics.json"]) != before


def test_stage_refuses_to_run_before_its_inputs(tmp_path):
    out = tmp_path / "b"
    assert _build(out, "--limit", "300", "--until", "index") == 0
    assert not (out / "embeddings").exists()
    assert run_cli("mine", out) == 2


def test_embed_killed_mid_run_resumes_to_the_same_result(label_build, tmp_path):
    embed_killed_and_resumed(tmp_path)


def embed_killed_and_resumed(tmp_path: Path) -> None:
    """An embed stage killed after three chunks, then resumed, ends with the chunks, pairs and release of an
    uninterrupted build (``tests/test_cuda.py`` runs it on the device)."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    opts = ("--limit", "2000", "--chunk-size", "200", "--batch-size", "50")
    assert _build(clean, *opts) == 0
    assert _build(killed, *opts, "--until", "index") == 0

    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "embed", str(killed), "--chunk-size", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "embeddings").glob("chunk-*.ids.npy"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted((killed / "embeddings").glob("chunk-*.ids.npy"))
    assert 3 <= len(done) < 10, "the kill should land mid-run"
    assert not (killed / "embeddings" / "meta.json").exists()
    first_chunk_mtime = done[0].stat().st_mtime_ns

    assert _build(killed, *opts) == 0
    assert done[0].stat().st_mtime_ns == first_chunk_mtime  # finished chunks are not recomputed
    v_clean, ids_clean = load_embeddings(clean)
    v_killed, ids_killed = load_embeddings(killed)
    assert np.array_equal(ids_clean, ids_killed)
    assert np.array_equal(v_clean, v_killed)
    assert pq.read_table(clean / "pairs.parquet").equals(pq.read_table(killed / "pairs.parquet"))
    clean_manifest = json.loads((clean / "release" / "manifest.json").read_text())
    killed_manifest = json.loads((killed / "release" / "manifest.json").read_text())
    shards = lambda m: {e["path"]: e["sha256"] for e in m["files"]}  # noqa: E731
    assert shards(clean_manifest) == shards(killed_manifest)


def test_mine_killed_while_comparing_pictures_resumes_to_the_same_pairs_and_copy_scores(tmp_path):
    """A mine stage killed with SIGKILL in its copy rule (the pairs being compared by picture, over two
    workers), then run again, writes the pairs, the copy-score store and the release of an uninterrupted
    build, byte for byte."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    opts = ("--limit", "3000", "--encoder", "pixels:16", "--category", "none", "--k", "8")
    common = ["build", "--source", "fashion-mnist", "--root", FMNIST, "--workers", "2", "--shard-size", "1MB",
              *opts]
    assert run_cli(*common, "--out", clean) == 0
    assert run_cli(*common, "--out", killed, "--until", "exclude") == 0
    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "mine", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "SPP_CURATE_PROGRESS": "plain"},
                            start_new_session=True)
    for line in proc.stderr:  # killed once it is comparing pictures
        if "compare pictures" in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "pairs.parquet").exists() and not (killed / "copy-scores.parquet").exists()
    assert run_cli(*common, "--out", killed) == 0
    for name in ("pairs.parquet", "copy-scores.parquet", "mine_stats.json"):
        a, b = (clean / name).read_bytes(), (killed / name).read_bytes()
        if name.endswith(".json"):  # the stage's CPU seconds differ from run to run
            a, b = (json.loads(x) for x in (a, b))
            for stats in (a, b):
                for key in ("compare_cpu_s", "pairs_per_cpu_s"):
                    stats["duplicates"].pop(key, None)
        assert a == b, name
    shards = lambda m: {e["path"]: e["sha256"] for e in m["files"]}  # noqa: E731
    assert shards(json.loads((clean / "release" / "manifest.json").read_text())) == \
        shards(json.loads((killed / "release" / "manifest.json").read_text()))


def test_retraining_an_ssl_encoder_in_place_reembeds(tmp_path):
    from spp_curate.config import resolve_recipe

    weights = tmp_path / "run" / "last.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"first")
    recipe = resolve_recipe("fashion-mnist", {"encoder": f"ssl:{weights}"})
    before = recipe.fingerprint("embed"), recipe.fingerprint("index")
    time.sleep(0.01)
    weights.write_bytes(b"second run")
    assert recipe.fingerprint("embed") != before[0]
    assert recipe.fingerprint("index") == before[1]


def test_progress_in_a_log_is_plain_lines_with_counts_rates_and_the_end(tmp_path):
    from conftest import run_cli_process

    proc = run_cli_process("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b",
                           "--limit", "300", *TEST_ENCODER, "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "…" not in proc.stderr and "━" not in proc.stderr  # no squeezed bar in a log
    for stage in ("index", "embed"):
        assert f"{stage}: start, 300 img" in lines, lines
        end = [line for line in lines if line.startswith(f"{stage}: 300/300 (100%)") and "done in" in line]
        assert end and "img/s" in end[0] and "quarantined" in end[0], lines
    # every later step of the build with work of its own says when it starts and when it is done, with its count
    for step in ("mine: fit the similarity scale", "mine: kNN", "report: figures", "export: "):
        started = [i for i, line in enumerate(lines) if line.startswith(step) and ": start" in line]
        done = [i for i, line in enumerate(lines) if line.startswith(step) and "done in" in line]
        assert started and done and started[0] < done[-1], (step, lines)
    # a stage with nothing to do says why, not an empty line
    assert "exclude: reference sets none given (--exclude-near), nothing excluded" in lines, lines
