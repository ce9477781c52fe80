"""The default release layout: each picture stored once, pairs as rows of keys; read by the real ``datasets``,
``webdataset`` and pyarrow, by the trainer and by ``materialize``; an update keeps its unchanged shards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from spp_curate.files import sha256_file

from conftest import TEST_ENCODER, run_cli
from images import fmnist_pictures, write_imagefolder


def _manifest(release):
    return json.loads((release / "manifest.json").read_text())


def _pairs(release):
    return pq.read_table(sorted((release / "data").glob("pairs-*.parquet"))[0]).to_pandas()


def _pictures(release):
    return {row["key"]: row for path in sorted((release / "data").glob("images-*.parquet"))
            for row in pq.read_table(path).to_pylist()}


def test_each_picture_is_stored_once_in_row_groups_of_100_and_the_release_verifies(images_build):
    release = images_build / "release"
    manifest = _manifest(release)
    assert manifest["layout"] == "images" and run_cli("verify", release) == 0
    pairs, pictures = _pairs(release), _pictures(release)
    paired = set(pairs.anchor_key) | set(pairs.positive_key)
    assert set(pictures) == paired and manifest["counts"]["pictures"] == len(pictures)  # once each
    for key, row in pictures.items():
        assert hashlib.sha256(row["image"]["bytes"]).hexdigest() == row["digest"]
    for path in (release / "data").glob("images-*.parquet"):
        meta = pq.read_metadata(path)
        assert all(meta.row_group(g).num_rows <= 100 for g in range(meta.num_row_groups))
    # the pictures' bytes are the release's bytes: the pair table and the card are small beside them
    picture_bytes = sum(len(r["image"]["bytes"]) for r in pictures.values())
    parquet = sum(e["bytes"] for e in manifest["files"] if e["kind"] in ("images", "pairs"))
    assert parquet < 1.6 * picture_bytes  # Fashion-MNIST's 300-byte PNGs: Parquet's own overhead shows


def test_datasets_loads_both_configs_and_load_pairs_joins_them_without_copies(images_build):
    import spp_curate

    release = images_build / "release"
    header = (release / "README.md").read_text().split("---")[1]
    assert '"pairs"' in header or "config_name: pairs" in header
    keys = datasets.load_dataset(str(release), "pairs", split="train")
    pictures = datasets.load_dataset(str(release), "images", split="train")
    assert len(keys) == _manifest(release)["counts"]["pairs"] and len(pictures) == len(_pictures(release))
    assert isinstance(pictures.features["image"], datasets.Image)
    joined = spp_curate.load_pairs(release)
    assert len(joined) == len(keys)
    stored = _pictures(release)
    for i in (0, len(joined) // 2, len(joined) - 1):
        row = joined[i]
        for side in ("anchor", "positive"):
            want = datasets.Image().decode_example(stored[row[f"{side}_key"]]["image"])
            assert np.array_equal(np.asarray(row[side]), np.asarray(want))


def test_webdataset_streams_the_pictures_and_stream_pairs_gives_every_pair_once(images_build):
    import spp_curate

    release = images_build / "release"
    tars = sorted(str(p) for p in (release / "wds").glob("images-*.tar"))
    assert tars
    seen = {s["json"]["key"]: s for s in wds.WebDataset(tars, shardshuffle=False).decode()}
    stored = _pictures(release)
    assert set(seen) == set(stored)
    pairs = _pairs(release)
    streamed = list(spp_curate.stream_pairs(release))
    assert sorted(p["pair_id"] for p in streamed) == sorted(pairs.pair_id)
    for p in streamed[:20]:
        assert p["anchor"] == stored[p["anchor_key"]]["image"]["bytes"]
        assert p["positive"] == stored[p["positive_key"]]["image"]["bytes"]


def test_the_trainer_reads_the_layout_and_matches_the_pair_layout(images_build, label_build, tmp_path):
    from spp_curate.train.cache import release_reader

    images = release_reader(str(images_build / "release"))
    pairs = release_reader(str(label_build / "release"))
    assert sorted(images.keys) == sorted(pairs.keys)
    got = {}
    for unit in images.units():
        rows, blobs = images.read_unit(unit)
        got.update({images.keys[r]: b for r, b in zip(rows, blobs)})
    stored = _pictures(images_build / "release")
    assert got == {k: stored[k]["image"]["bytes"] for k in got} and len(got) == len(images.keys)
    assert run_cli("train", "--pairs", images_build / "release", "--out", tmp_path / "run", "--epochs", "1",
                   "--limit", "64", "--batch-size", "16", "--workers", "0") == 0


def test_verify_finds_a_pair_whose_picture_is_not_shipped(images_build, tmp_path):
    """A pair table rewritten (and its manifest entry with it) to name a picture the release does not ship."""
    release = tmp_path / "release"
    shutil.copytree(images_build / "release", release)
    path = sorted((release / "data").glob("pairs-*.parquet"))[0]
    table = pq.read_table(path)
    keys = table.column("positive_key").to_pylist()
    keys[0] = "train/not-shipped"
    table = table.set_column(table.schema.get_field_index("positive_key"), table.schema.field("positive_key"),
                             pa.array(keys, pa.string()))
    pq.write_table(table, path)
    manifest = _manifest(release)
    for entry in manifest["files"]:
        if entry["path"] == f"data/{path.name}":
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (release / "manifest.json").write_text(json.dumps(manifest))
    from spp_curate.export.manifest import verify_release

    problems = verify_release(release)
    assert any("train/not-shipped" in p and "no picture" in p for p in problems), problems


def test_an_id_only_release_materialises_into_the_same_layout(tmp_path):
    root = tmp_path / "images"
    write_imagefolder(root, per_class=20, odd=False, broken=False)
    out = tmp_path / "b"
    assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", out, *TEST_ENCODER, "--workers",
                   "0", "--min-similarity", "0", "--images", "none") == 0
    manifest = _manifest(out / "release")
    assert manifest["layout"] == "images" and not list((out / "release" / "data").glob("images-*"))
    full = tmp_path / "full"
    assert run_cli("materialize", out / "release", "--source", "imagefolder", "--root", root, "--out", full) == 0
    assert _manifest(full)["layout"] == "images" and run_cli("verify", full) == 0
    stored = _pictures(full)
    for key, row in stored.items():
        assert (root / key).read_bytes() == row["image"]["bytes"]


def _grow_folder(root, pictures, keep):
    for n, (label, img) in enumerate(pictures):
        path = root / f"class{label}" / f"{n:04d}.png"
        if keep(n) and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)


def test_an_update_keeps_unchanged_shards_by_reference_reuses_copy_scores_and_equals_a_fresh_build(tmp_path):
    pictures = fmnist_pictures(60, classes=4, size=28)
    root, out, fresh = tmp_path / "images", tmp_path / "b", tmp_path / "fresh"
    options = ["--source", "imagefolder", "--root", root, "--encoder", "pixels:16", "--workers", "0",
               "--category", "label", "--shard-size", "20KB"]
    _grow_folder(root, pictures, lambda n: n % 60 < 57)
    assert run_cli("build", "--out", out, *options) == 0
    first = _manifest(out / "release")
    inodes = {(p.stat().st_dev, p.stat().st_ino): p.name for p in (out / "release" / "data").glob("images-*")}
    assert len(inodes) >= 4
    _grow_folder(root, pictures, lambda n: True)  # 5 % more pictures, in every class
    assert run_cli("build", "--out", out, *options) == 0
    second = _manifest(out / "release")
    assert second["version"] == 2 and second["reused"]["shards"]
    kept = [p for p in (out / "release" / "data").glob("images-*")
            if (p.stat().st_dev, p.stat().st_ino) in inodes]  # the very files: linked, not written again
    assert {f"data/{p.name}" for p in kept} == set(second["reused"]["shards"])
    total = sum(e["bytes"] for e in second["files"])
    assert second["reused"]["bytes"] >= 0.5 * total, (second["reused"]["bytes"], total)
    stats = json.loads((out / "mine_stats.json").read_text())["duplicates"]
    assert stats["scores_reused"] > 0.8 * stats["pairs_compared"]
    assert run_cli("verify", out / "release") == 0
    # the same pairs and paired pictures as a fresh build of the grown folder
    assert run_cli("build", "--out", fresh, *options) == 0
    a, b = _pairs(out / "release"), _pairs(fresh / "release")
    cols = ["anchor_key", "positive_key"]
    assert a[cols].sort_values(cols).reset_index(drop=True).equals(b[cols].sort_values(cols).reset_index(drop=True))
    mine, theirs = _pictures(out / "release"), _pictures(fresh / "release")
    assert all(mine[k]["digest"] == theirs[k]["digest"] for k in theirs)
    assert json.loads((out / "mine_stats.json").read_text())["pairs"] == \
        json.loads((fresh / "mine_stats.json").read_text())["pairs"]
    assert first["counts"]["pictures"] < second["counts"]["pictures"]
    assert os.path.exists(out / "copy-scores.parquet")


def test_push_refuses_the_pixels_of_a_source_that_may_not_be_redistributed(tmp_path, cli):
    root = tmp_path / "images"
    write_imagefolder(root, per_class=10, odd=False, broken=False)
    out = tmp_path / "b"
    assert cli("build", "--source", "imagefolder", "--root", root, "--out", out, *TEST_ENCODER, "--workers", "0",
               "--min-similarity", "0", "--no-redistribute").returncode == 0
    proc = cli("push", out / "release", "--repo-id", "someorg/pairs", "--dry-run")
    assert proc.returncode == 2 and "--i-hold-the-rights" in proc.stderr and "redistribut" in proc.stderr
    proc = cli("push", out / "release", "--repo-id", "someorg/pairs", "--dry-run", "--i-hold-the-rights")
    assert proc.returncode == 0 and "dry run" in proc.stdout
    assert "may not be redistributed" in (out / "release" / "README.md").read_text()


def test_the_imagenet_recipe_is_id_only_by_default():
    from spp_curate.config import resolve_recipe

    recipe = resolve_recipe("imagenet", {"root": "/nonexistent"})
    assert recipe.images == "none" and recipe.redistribute is False and recipe.layout == "images"


@pytest.mark.parametrize("layout", ["images", "pairs"])
def test_diff_and_audit_read_both_layouts(tmp_path, cli, layout):
    root = tmp_path / "images"
    write_imagefolder(root, per_class=12, odd=False, broken=False)
    out = tmp_path / "b"
    assert cli("build", "--source", "imagefolder", "--root", root, "--out", out, *TEST_ENCODER, "--workers", "0",
               "--min-similarity", "0", "--layout", layout).returncode == 0
    proc = cli("diff", out / "release", out / "release")
    assert proc.returncode == 0 and "pairs: +0 -0" in proc.stdout
    proc = cli("audit", out / "release", "--against", f"imagefolder:{root}", "--workers", "0", "--max-leaks",
               "100000")
    assert proc.returncode == 0
    leaked = [line for line in proc.stdout.splitlines() if line.startswith("anchor:")][0]
    assert "0 near-copies" not in leaked  # every picture is its own reference: all are found


def test_the_trainer_cache_is_kept_beside_the_release_and_reused_raw_or_jpeg(images_build, tmp_path, cli):
    """The first run decodes and keeps its cache beside the release; a second run on the same release and size
    decodes nothing (it finds the cache); ``--cache jpeg`` keeps JPEG at the training size and trains from it."""
    release = tmp_path / "release"
    shutil.copytree(images_build / "release", release)
    common = ["--pairs", release, "--epochs", "1", "--limit", "48", "--batch-size", "16", "--workers", "0",
              "--image-size", "24"]
    for kind in ("disk", "jpeg"):
        first = cli("train", *common, "--out", tmp_path / f"{kind}1", "--cache", kind)
        assert first.returncode == 0 and "decode pairs" in first.stderr
        caches = sorted((tmp_path / ".release.cache").glob(f"{'raw' if kind == 'disk' else 'jpeg'}-24px-*"))
        assert len(caches) == 1 and (caches[0] / "done.json").is_file()
        stamp = (caches[0] / "done.json").stat().st_mtime_ns
        again = cli("train", *common, "--out", tmp_path / f"{kind}2", "--cache", kind)
        assert again.returncode == 0 and "decode pairs" not in again.stderr
        assert (caches[0] / "done.json").stat().st_mtime_ns == stamp
        losses = [(tmp_path / f"{kind}{i}" / "metrics.jsonl").read_text().splitlines()[-1] for i in (1, 2)]
        losses = [json.loads(line)["loss"] for line in losses]
        assert losses[0] == losses[1]  # the same pictures, the same run
    from spp_curate.train.cache import JpegPictures, release_reader, release_cache

    reader = release_reader(str(release), 48)
    cache = release_cache(reader, release, 24, 0, "jpeg", None)
    assert isinstance(cache.pixels, JpegPictures)
    raw = release_cache(reader, release, 24, 0, "disk", None)
    decoded = cache.pixels.batch(np.arange(len(reader.keys)), "cpu").numpy().astype(np.int16)
    assert np.abs(decoded - np.asarray(raw.pixels).astype(np.int16)).mean() < 4  # JPEG q95 of the same pictures
    assert cache.pixels.nbytes < np.asarray(raw.pixels).nbytes  # at 24 px JPEG headers weigh; 128 px: bench


def test_an_imagenet_release_with_pixels_says_it_may_not_be_redistributed_whatever_the_recipe(tmp_path, cli):
    """The source kind decides too: a recipe that asks for pixels and ``--redistribute`` still gets a release
    whose manifest and card say the pictures may not be redistributed, and push refuses it without the flag."""
    from test_sources import _imagenet_tree

    _imagenet_tree(tmp_path / "in", val_sorted=True)
    out = tmp_path / "b"
    assert cli("build", "--source", "imagenet", "--root", tmp_path / "in", "--out", out, "--encoder", "pixels:8",
               "--workers", "0", "--images", "embed", "--redistribute", "--min-similarity", "0").returncode == 0
    assert _manifest(out / "release")["redistribute"] is False
    proc = cli("push", out / "release", "--repo-id", "someorg/in1k-pairs", "--dry-run")
    assert proc.returncode == 2 and "--i-hold-the-rights" in proc.stderr


def test_train_on_pairs_uses_the_partners_by_default_and_says_which_positives(images_build, tmp_path, cli):
    common = ["--pairs", images_build / "release", "--epochs", "1", "--limit", "32", "--batch-size", "16",
              "--workers", "0", "--image-size", "16", "--cache", "memory"]
    proc = cli("train", *common, "--out", tmp_path / "default")
    assert proc.returncode == 0 and "positives: both (" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "default" / "metrics.jsonl").read_text().splitlines()[-1])
    proc = cli("train", *common, "--out", tmp_path / "baseline", "--positives", "augment")
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "positives: augment (" in said and "partners are not used" in said


def _hub_cache(cache, repo_id: str, release, commit: str = "1" * 40):
    """``release`` in a Hugging Face cache as huggingface_hub lays out a dataset repo: blobs, and a snapshot of
    symlinks to them under the commit, with ``refs/main`` naming it."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    for path in sorted(p for p in release.rglob("*") if p.is_file()):
        rel = path.relative_to(release)
        if rel.parts[0].startswith("."):
            continue
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_train_from_the_hub_pins_a_revision_and_reads_its_manifest_as_on_disk(images_build, tmp_path, cli,
                                                                               monkeypatch):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    repo = _hub_cache(cache, "someorg/pairs", images_build / "release")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPP_CURATE_CACHE", str(tmp_path / "ours"))
    common = ["--epochs", "1", "--limit", "32", "--batch-size", "16", "--workers", "0", "--image-size", "16",
              "--cache", "memory"]
    said = {}
    for name, pairs in (("disk", images_build / "release"), ("hub", f"hf://someorg/pairs@{'1' * 40}"),
                        ("head", "hf://someorg/pairs")):
        proc = cli("train", "--pairs", pairs, "--out", tmp_path / name, *common)
        assert proc.returncode == 0, proc.stderr
        said[name] = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("pairs: ")]
    assert said["disk"] and said["disk"] == said["hub"] == said["head"]  # the same trust and partner weight
    fetched = tmp_path / "ours" / "releases" / f"someorg--pairs@{'1' * 40}"
    assert not any(p.is_symlink() for p in fetched.rglob("*"))
    # a blob altered in the cache: the fetched release does not verify, and nothing trains
    shutil.rmtree(tmp_path / "ours")
    shard = next((repo / "snapshots" / ("1" * 40) / "data").glob("images-*.parquet")).resolve()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = cli("train", "--pairs", "hf://someorg/pairs", "--out", tmp_path / "tampered", *common)
    assert proc.returncode == 2 and "does not verify" in proc.stderr and "sha256" in proc.stderr
    proc = cli("train", "--pairs", "hf://someorg/pairs@nope", "--out", tmp_path / "norev", *common)
    assert proc.returncode == 2 and "--pairs" in proc.stderr and "Traceback" not in proc.stderr
