"""ID-only releases and materialize, push --dry-run, and an export that survives a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pyarrow.parquet as pq
from PIL import Image

from conftest import TEST_ENCODER, run_cli, run_cli_process
from images import jpeg_bytes, write_imagefolder


def _folder_build(tmp_path, *extra):
    root = tmp_path / "images"
    write_imagefolder(root, per_class=30, odd=False, broken=False)
    out = tmp_path / "b"
    layout = [] if "--layout" in extra else ["--layout", "pairs"]  # the pair-row layout, unless told
    assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--min-similarity", "0", *layout, *extra) == 0
    return root, out


def _dir_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_id_only_release_is_small_and_materialises_into_a_release_that_verifies(tmp_path):
    root, out = _folder_build(tmp_path, "--images", "none")
    release = out / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["images"] == "none"
    assert not (release / "wds").exists()
    table = pq.read_table(sorted((release / "data").glob("*.parquet"))[0])
    assert "anchor" not in table.column_names and "anchor_digest" in table.column_names
    assert run_cli("verify", release) == 0
    # no pixels: far smaller than the images it names
    assert _dir_bytes(release / "data") < _dir_bytes(root) / 3

    full = tmp_path / "materialized"
    assert run_cli("materialize", release, "--source", "imagefolder", "--root", root, "--out", full) == 0
    assert run_cli("verify", full) == 0
    ds = datasets.load_dataset(str(full), split="train")
    assert len(ds) == manifest["counts"]["pairs"]
    row = ds[0]
    assert isinstance(row["anchor"], Image.Image)
    assert ds.features["anchor_digest"].dtype == "string"
    assert (root / row["anchor_key"]).exists()

    # the same recipe built with images gives the same pair shards' content
    _, with_images = _folder_build(tmp_path / "again")
    direct = pq.read_table(sorted((with_images / "release" / "data").glob("*.parquet"))[0]).to_pandas()
    rebuilt = pq.read_table(sorted((full / "data").glob("*.parquet"))[0]).to_pandas()
    assert direct.anchor_key.tolist() == rebuilt.anchor_key.tolist()
    assert [a["bytes"] for a in direct.anchor] == [a["bytes"] for a in rebuilt.anchor]


def test_materialize_names_every_missing_or_changed_image(tmp_path):
    root, out = _folder_build(tmp_path, "--images", "none")
    pairs = pq.read_table(sorted((out / "release" / "data").glob("*.parquet"))[0]).to_pandas()
    changed, missing = pairs.anchor_key[0], pairs.positive_key[len(pairs) // 2]
    img = Image.open(root / changed).convert("RGB")
    img.putpixel((0, 0), (255, 0, 0))
    (root / changed).write_bytes(jpeg_bytes(img))
    (root / missing).unlink()
    proc = run_cli_process("materialize", out / "release", "--source", "imagefolder", "--root", root,
                           "--out", tmp_path / "m")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{changed}: changed" in proc.stderr
    assert f"{missing}: missing" in proc.stderr
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_push_dry_run_lists_files_and_never_prints_the_token(label_build):
    token = "hf_" + "x7" * 17
    proc = run_cli_process("push", label_build / "release", "--repo-id", "someorg/fmnist-pairs", "--dry-run",
                           env={"HF_TOKEN": token, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert token not in proc.stdout + proc.stderr
    manifest = json.loads((label_build / "release" / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert entry["path"] in proc.stdout
    assert "manifest.json" in proc.stdout and "dry run" in proc.stdout


def test_push_refuses_a_release_that_does_not_verify(label_build, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(label_build / "release", release)
    victim = sorted(release.glob("data/*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    proc = run_cli_process("push", release, "--repo-id", "someorg/x", "--dry-run")
    assert proc.returncode != 0 and victim.name in proc.stderr and "Traceback" not in proc.stderr


def test_export_killed_mid_run_finishes_on_rerun_and_never_leaves_partial_shards(label_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    shutil.rmtree(out / "release")
    (out / "stages" / "export.json").unlink()
    recipe = out / "build.yaml"
    recipe.write_text(recipe.read_text().replace("shard_size: 1000000", "shard_size: 150000"))
    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "export", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staging = out / ".release.partial"  # a release is written beside its place and swapped in when complete
    while time.time() < deadline and len(list((staging / "wds").glob("pairs-*.tar"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "release").exists() and not (staging / "manifest.json").exists(), \
        "the kill should land mid-run"
    for shard in (staging / "data").glob("*.parquet"):
        pq.read_metadata(shard)  # every file under a final name is complete
    assert run_cli("export", out) == 0
    assert run_cli("verify", out / "release") == 0
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["counts"]["shards"] > 3
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not staging.exists()


def test_max_side_shrinks_release_images_and_jpeg_otherwise_passes_through(tmp_path):
    root, out = _folder_build(tmp_path, "--max-side", "40")
    ds = datasets.load_dataset(str(out / "release"), split="train")
    row = ds[0]
    assert max(row["anchor"].size) == 40 and row["anchor"].format == "JPEG"
    assert run_cli("verify", out / "release") == 0
