"""A release loads through the real clients a user would use, and they agree with pairs.parquet."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from conftest import run_cli_process


def _index(build):
    return pq.read_table(build / "index.parquet").to_pandas().set_index("key")


def test_load_dataset_reads_every_pair_with_decoded_images(label_build):
    pairs = pq.read_table(label_build / "pairs.parquet").to_pandas()
    ds = datasets.load_dataset(str(label_build / "release"), split="train")
    assert len(ds) == len(pairs) > 1000
    assert isinstance(ds.features["anchor"], datasets.Image)
    assert ds.features["label"].names[0] == "T-shirt/top"
    index = _index(label_build)
    for row in ds.select(range(0, len(ds), max(1, len(ds) // 50))):
        assert isinstance(row["anchor"], Image.Image) and row["anchor"].size == (28, 28)
        assert isinstance(row["positive"], Image.Image)
        assert row["anchor_key"] != row["positive_key"]
        assert index.loc[row["anchor_key"], "label"] == index.loc[row["positive_key"], "label"] == row["label"]
        # the release carries the source's pixels unchanged
        src = np.asarray(Image.open(io.BytesIO(
            _source_png(label_build, row["anchor_key"]))))
        assert np.array_equal(np.asarray(row["anchor"]), src)
    assert sorted(ds["pair_id"]) == sorted(pairs.pair_id.tolist())


def _source_png(build, key):
    from spp_curate.curate.sources import open_source
    from spp_curate.config import load_recipe

    return open_source(load_recipe(build)).read(key)


def test_webdataset_builder_and_reader_see_the_same_pairs(label_build):
    release = label_build / "release"
    parquet = datasets.load_dataset(str(release), split="train")
    expected = {(r["anchor_key"], r["positive_key"]) for r in parquet.remove_columns(["anchor", "positive"])}
    tars = sorted(str(p) for p in (release / "wds").glob("*.tar"))
    assert len(tars) > 1  # --shard-size 1MB in the fixture makes several shards

    streamed = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", streaming=True)
    seen = set()
    for row in streamed:
        meta = row["json"]
        assert isinstance(row["anchor.png"], Image.Image)
        seen.add((meta["anchor_key"], meta["positive_key"]))
    assert seen == expected

    reader = wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("anchor.png", "positive.png", "json")
    seen_wds = set()
    for anchor, positive, meta in reader:
        assert anchor.size == positive.size == (28, 28)
        seen_wds.add((meta["anchor_key"], meta["positive_key"]))
    assert seen_wds == expected


def test_tar_members_are_adjacent_and_keys_have_no_dots(label_build):
    tar = sorted((label_build / "release" / "wds").glob("*.tar"))[0]
    names = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) % 3 == 0
    for i in range(0, len(names), 3):
        stems = {n.split(".", 1)[0] for n in names[i:i + 3]}
        assert len(stems) == 1 and stems.pop().isdigit()
        assert sorted(n.split(".", 1)[1] for n in names[i:i + 3]) == ["anchor.png", "json", "positive.png"]


def test_manifest_lists_every_shard_with_hash_and_rows(label_build):
    release = label_build / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    shards = {e["path"]: e for e in manifest["files"] if e["kind"] in ("parquet", "webdataset")}
    on_disk = {p.relative_to(release).as_posix() for p in [*release.glob("data/*"), *release.glob("wds/*")]}
    assert set(shards) == on_disk
    assert sum(e["rows"] for e in shards.values() if e["kind"] == "parquet") == manifest["counts"]["pairs"]
    assert manifest["recipe"]["encoder"] == "openclip:ViT-S-32"
    assert "torch" in manifest["versions"] and "faiss-cpu" in manifest["versions"]


def test_card_header_is_what_the_hub_reads(label_build):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(label_build / "release" / "README.md")
    assert card.data.license == "mit"
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert "2306.16122" in card.text and "2510.08722" in card.text


def test_verify_passes_then_names_the_shard_with_one_flipped_byte(label_build, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(label_build / "release", release)
    ok = run_cli_process("verify", release)
    assert ok.returncode == 0, ok.stderr
    for victim in (sorted(release.glob("wds/*.tar"))[1], sorted(release.glob("data/*.parquet"))[-1]):
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        bad = run_cli_process("verify", release)
        assert bad.returncode != 0
        assert victim.relative_to(release).as_posix() in bad.stderr
        assert "Traceback" not in bad.stderr
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    assert run_cli_process("verify", release).returncode == 0


def test_verify_fails_when_counts_disagree(label_build, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(label_build / "release", release)
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["counts"]["pairs"] += 1
    (release / "manifest.json").write_text(json.dumps(manifest))
    bad = run_cli_process("verify", release)
    assert bad.returncode != 0 and "pairs" in bad.stderr
    extra = release / "wds" / "pairs-999999.tar"
    shutil.copy(sorted(release.glob("wds/*.tar"))[0], extra)
    manifest["counts"]["pairs"] -= 1
    (release / "manifest.json").write_text(json.dumps(manifest))
    bad = run_cli_process("verify", release)
    assert bad.returncode != 0 and "pairs-999999.tar" in bad.stderr


@pytest.mark.parametrize("column", ["anchor", "positive"])
def test_parquet_shards_read_with_plain_pyarrow(label_build, column):
    shard = sorted((label_build / "release" / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    first = table.column(column)[0].as_py()
    assert Image.open(io.BytesIO(first["bytes"])).format == "PNG"
