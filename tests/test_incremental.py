"""Builds that grow: a changed source is read, embedded and released incrementally, and equals a fresh build.

A folder of real Fashion-MNIST pictures is built, then changed as collections change (5 % new pictures,
2 % deleted, 1 % replaced by other pictures under the same name) and built again in place.
"""

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
import pandas as pd
import pyarrow.parquet as pq
import pytest

from spp_curate.export.versions import read_changelog

from conftest import run_cli_process
from images import fmnist_pictures
from spp_curate.files import sha256_file
from spp_curate.layout import load_embeddings
from spp_curate.pipeline import STAGES

PER_CLASS, CLASSES, EXTRA = 100, 4, 5  # 400 pictures; 20 more kept aside as the new ones
OPTIONS = ["--encoder", "openclip:ViT-S-32", "--image-size", "32", "--workers", "0", "--shard-size", "1MB",
           "--chunk-size", "8", "--layout", "pairs"]


def write_folder(root: Path) -> list[tuple[int, object]]:
    """The first PER_CLASS pictures of each class as PNG files; returns every picture, the spare ones too."""
    pictures = fmnist_pictures(PER_CLASS + EXTRA, classes=CLASSES, size=32)
    for n, (label, img) in enumerate(pictures):
        if n % (PER_CLASS + EXTRA) < PER_CLASS:
            (root / f"class{label}").mkdir(parents=True, exist_ok=True)
            img.save(root / f"class{label}" / f"{n:04d}.png")
    return pictures


def change(root: Path, pictures) -> dict[str, list[str]]:
    """Add 5 %, delete 2 %, replace 1 % (another picture under the same name); return the keys of each."""
    added, removed, changed = [], [], []
    for n, (label, img) in enumerate(pictures):
        if n % (PER_CLASS + EXTRA) >= PER_CLASS:
            key = f"class{label}/new-{n:04d}.png"
            img.save(root / key)
            added.append(key)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png") if "new-" not in p.name)
    for key in files[3::50]:  # 8 of 400
        (root / key).unlink()
        removed.append(key)
    for key in files[10::100]:  # 4 of 400: a picture of another class under the old name
        label = int(key[5])
        other = pictures[((label + 1) % CLASSES) * (PER_CLASS + EXTRA) + 7][1]
        other.save(root / key)
        changed.append(key)
    return {"added": sorted(added), "removed": sorted(removed), "changed": sorted(changed)}


def build(root: Path, out: Path) -> subprocess.CompletedProcess:
    proc = run_cli_process("build", "--source", "imagefolder", "--root", root, "--out", out, *OPTIONS)
    assert proc.returncode == 0, proc.stderr
    return proc


def _holds_new(keys_file: Path) -> bool:
    try:
        return any("new-" in k for k in pq.read_table(keys_file).column("key").to_pylist())
    except OSError:
        return False  # removed by the run meanwhile


def stage_line(proc: subprocess.CompletedProcess, stage: str) -> str:
    """The stage's summary: its last line (its progress lines, in a log, come before it)."""
    return [line for line in proc.stderr.splitlines() if line.startswith(f"{stage}:")][-1]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A build, the same folder changed and built again in place, and a fresh build of the changed folder."""
    base = tmp_path_factory.mktemp("grow")
    root, out = base / "images", base / "build"
    pictures = write_folder(root)
    build(root, out)
    first = base / "release-v1"
    shutil.copytree(out / "release", first)
    shutil.copyfile(out / "released-index.parquet", base / "released-index-v1.parquet")
    changes = change(root, pictures)
    update = build(root, out)
    fresh_root, fresh = base / "fresh-images", base / "fresh"
    shutil.copytree(root, fresh_root)
    build(fresh_root, fresh)
    return {"root": root, "out": out, "first": first, "changes": changes, "update": update, "fresh": fresh,
            "pictures": pictures, "snapshot_v1": base / "released-index-v1.parquet"}


def test_an_update_reads_and_embeds_only_what_changed(grown):
    c = grown["changes"]
    assert (len(c["added"]), len(c["removed"]), len(c["changed"])) == (20, 8, 4)
    index_line = stage_line(grown["update"], "index")
    assert "read 24" in index_line and "added 20" in index_line and "removed 8" in index_line \
        and "changed 4" in index_line, index_line
    embed_line = stage_line(grown["update"], "embed")
    assert "embedded 24" in embed_line and "reused 388" in embed_line and "dropped 12" in embed_line, embed_line


def test_an_update_equals_a_fresh_build_of_the_new_source(grown):
    out, fresh = grown["out"], grown["fresh"]
    for name in ("index.parquet", "pairs.parquet"):
        pd.testing.assert_frame_equal(pq.read_table(out / name).to_pandas(), pq.read_table(fresh / name).to_pandas())
    v_up, ids_up = load_embeddings(out, np.float16)
    v_fresh, ids_fresh = load_embeddings(fresh, np.float16)
    assert np.array_equal(ids_up, ids_fresh) and np.array_equal(v_up, v_fresh)
    # the updated build kept its earlier chunks and appended new ones; the fresh one is chunked in order
    meta = json.loads((out / "embeddings" / "meta.json").read_text())
    assert max(meta["chunk_files"]) >= 400 // 8 and meta["count"] == 412


def test_the_new_release_is_a_version_with_a_changelog(grown, cli):
    out, first = grown["out"], grown["first"]
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["parent"] == {"version": 1, "manifest_sha256": sha256_file(first / "manifest.json")}
    assert read_changelog(out / "release") == grown["changes"]
    # the keys are in changelog.parquet (listed with its sha256), their counts in the manifest
    assert manifest["changelog"]["images"] == {k: len(v) for k, v in grown["changes"].items()}
    assert [f["path"] for f in manifest["files"] if f["kind"] == "changelog"] == ["changelog.parquet"]

    def pairs(release: Path) -> set:
        m = json.loads((release / "manifest.json").read_text())
        frame = pd.concat([pq.read_table(release / f["path"]).to_pandas() for f in m["files"]
                           if f["kind"] == "parquet"])
        return {frozenset([(a, ad), (p, pd_)]) for a, ad, p, pd_ in
                zip(frame.anchor_key, frame.anchor_digest, frame.positive_key, frame.positive_digest)}

    old, new = pairs(first), pairs(out / "release")
    assert manifest["changelog"]["pairs"] == {"added": len(new - old), "removed": len(old - new),
                                              "kept": len(new & old)}
    assert len(new - old) > 0 and len(old - new) > 0
    assert "## Changes" in (out / "release" / "README.md").read_text()

    result = cli("diff", first, out / "release", "--show", "100")
    assert result.returncode == 0, result.stderr
    assert "NEW's parent is OLD" in result.stdout
    assert f"pairs: +{len(new - old)} -{len(old - new)}" in result.stdout
    for key in grown["changes"]["added"]:
        assert f"  + {key}" in result.stdout
    for key in grown["changes"]["removed"] + grown["changes"]["changed"]:
        assert key in result.stdout
    assert cli("verify", out / "release").returncode == 0


def test_a_source_with_nothing_changed_rebuilds_nothing(grown):
    proc = build(grown["root"], grown["out"])
    skipped = [line for line in proc.stderr.splitlines() if line.endswith("complete, skipped")]
    assert len(skipped) == len(STAGES), proc.stderr


def test_a_kill_after_the_release_swap_publishes_no_extra_version(grown, tmp_path, cli):
    # What a SIGKILL between the swap and the build's own notes leaves: the new release in place (version 2, with
    # its changelog), the snapshot of version 1 and no record of the export stage.
    out = tmp_path / "build"
    shutil.copytree(grown["out"], out)
    shutil.copyfile(grown["snapshot_v1"], out / "released-index.parquet")
    (out / "stages" / "export.json").unlink()
    release = {p.relative_to(out / "release"): sha256_file(p) for p in (out / "release").rglob("*") if p.is_file()}
    proc = cli("export", out)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["version"] == 2 and read_changelog(out / "release") == grown["changes"]
    assert {p.relative_to(out / "release"): sha256_file(p) for p in (out / "release").rglob("*") if p.is_file()} \
        == release
    assert pq.read_table(out / "released-index.parquet").equals(pq.read_table(grown["out"] / "released-index.parquet"))
    # and the next export of the same build is skipped as complete
    assert cli("export", out).returncode == 0 and json.loads((out / "release" / "manifest.json").read_text()) \
        == manifest


def test_sigkill_during_an_update_keeps_the_release_and_a_rerun_finishes(grown, tmp_path):
    root, out = tmp_path / "images", tmp_path / "build"
    write_folder(root)
    build(root, out)
    before = {p.relative_to(out / "release"): sha256_file(p) for p in (out / "release").rglob("*") if p.is_file()}
    chunks_before = len(list((out / "embeddings").glob("chunk-*.keys.parquet")))
    change(root, grown["pictures"])

    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "build", "--source", "imagefolder", "--root",
                             str(root), "--out", str(out), *OPTIONS, "--batch-size", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once the update has embedded a first chunk of new pictures
        new_chunks = [p for p in (out / "embeddings").glob("chunk-*.keys.parquet")
                      if int(p.name[6:11]) >= chunks_before and _holds_new(p)]
        if new_chunks or proc.poll() is not None:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert new_chunks, "the kill should land during the embed stage"
    after = {p.relative_to(out / "release"): sha256_file(p) for p in (out / "release").rglob("*") if p.is_file()}
    assert after == before  # the previous release is whole
    assert run_cli_process("verify", out / "release").returncode == 0

    rerun = build(root, out)
    assert "embedded 24" not in stage_line(rerun, "embed")  # what the killed run embedded is kept
    pd.testing.assert_frame_equal(pq.read_table(out / "pairs.parquet").to_pandas(),
                                  pq.read_table(grown["fresh"] / "pairs.parquet").to_pandas())
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["version"] == 2 and read_changelog(out / "release") == grown["changes"]


def test_the_index_digest_is_the_sha256_of_the_sorted_key_digest_lines():
    """``versions.index_digest`` (Arrow: sorted as UTF-8 bytes, joined and hashed a slice at a time) states the
    same digest as its definition in Python, whatever the keys hold (prefixes, tabs, control and non-ASCII
    characters) and on both sides of a slice boundary; parents written before keep their ``index_sha256``."""
    import hashlib
    import random

    import pandas as pd
    import pyarrow as pa

    from spp_curate.export.versions import index_digest

    def definition(images) -> str:
        lines = sorted(f"{k}\t{d}" for k, d in zip(images.key, images.digest))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    rng = random.Random(0)
    for n in (0, 1, 7, 65_537):
        keys = ["".join(rng.choice("ab\x01\t é漢/") for _ in range(rng.randint(0, 6))) for _ in range(n)]
        images = pd.DataFrame({"key": keys, "digest": [rng.choice(["x", "y", ""]) for _ in range(n)]})
        assert index_digest(images) == definition(images)
        assert index_digest(images.astype(pd.ArrowDtype(pa.string()))) == definition(images)
        # unique keys with nothing at or below the tab (an index's): sorted by key alone, prefixes included
        unique = sorted({"".join(rng.choice("ab é漢/.") for _ in range(rng.randint(1, 6))) for _ in range(n)})
        rng.shuffle(unique)
        images = pd.DataFrame({"key": unique, "digest": [rng.choice(["x", "y", "0"]) for _ in unique]})
        assert index_digest(images) == definition(images)
        # repeated keys with nothing at or below the tab: sorted by key, then digest
        keys = ["".join(rng.choice("ab é") for _ in range(rng.randint(0, 3))) for _ in range(n)]
        images = pd.DataFrame({"key": keys, "digest": [rng.choice(["x", "y", "0", ""]) for _ in keys]})
        assert index_digest(images) == definition(images)
