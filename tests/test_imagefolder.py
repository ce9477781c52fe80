"""An image-folder build on real pictures with odd and broken files: quarantine, never a crash."""

from __future__ import annotations

import hashlib
import io
import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spp_curate.images import BadImage, decode_image

from conftest import TEST_ENCODER, run_cli
from images import broken_files, exif_rotated_jpeg, fmnist_pictures, odd_files, write_imagefolder


@pytest.fixture(scope="module")
def folder_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    expected = write_imagefolder(root)
    out = tmp_path_factory.mktemp("build") / "b"
    assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--min-similarity", "0", "--license", "cc-by-4.0") == 0
    return root, out, expected


def test_broken_files_are_quarantined_with_their_reason(folder_build):
    root, out, expected = folder_build
    quarantine = pq.read_table(out / "quarantine.parquet").to_pandas().set_index("key")
    assert set(quarantine.index) == set(expected)
    for key, reason in expected.items():
        assert reason in quarantine.loc[key, "error"], (key, quarantine.loc[key, "error"])
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["quarantined"] == len(expected)


def test_index_rows_are_stable_dense_and_hashed(folder_build):
    root, out, _ = folder_build
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert index.id.tolist() == list(range(len(index)))
    assert index.key.tolist() == sorted(index.key.tolist())  # class folders sorted, then files
    assert "tshirt/notes.txt" not in set(index.key)
    assert set(index.label_name) == {"tshirt", "trouser", "pullover"}
    assert (index.label == index.label_name.map({"pullover": 0, "trouser": 1, "tshirt": 2})).all()
    row = index.iloc[5]
    assert row.digest == hashlib.sha256((root / row.key).read_bytes()).hexdigest()
    assert row["nbytes"] == (root / row.key).stat().st_size
    assert index.set_index("key").loc["tshirt/odd_png_named_jpeg.JPEG", "format"] == "PNG"


def test_release_passes_jpeg_bytes_through_and_reencodes_the_rest(folder_build):
    root, out, _ = folder_build
    ds = datasets.load_dataset(str(out / "release"), split="train")
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["image_ext"] == "jpg"
    for shard in sorted((out / "release" / "data").glob("images-*.parquet")):  # each picture once
        for _, row in pq.read_table(shard).to_pandas().iterrows():
            original = (root / row.key).read_bytes()
            if row.key.endswith(".jpg") and "odd_" not in row.key:
                assert row.image["bytes"] == original
            assert Image.open(io.BytesIO(row.image["bytes"])).format == "JPEG"
    assert len(ds) == pq.read_metadata(out / "pairs.parquet").num_rows  # the default config: pair rows
    assert run_cli("verify", out / "release") == 0


def test_odd_but_valid_files_decode_upright_rgb():
    picture = fmnist_pictures(1)[0][1]
    for name, data in odd_files(picture).items():
        img = decode_image(data)
        assert img.mode == "RGB", name
    rotated = decode_image(exif_rotated_jpeg(picture.crop((0, 0, 64, 32)), orientation=6))
    assert rotated.size == (32, 64)  # orientation 6 = rotate 90 degrees: width and height swap


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert np.asarray(decode_image(buf.getvalue())).min() == 255


def test_sixteen_bit_png_keeps_its_range():
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = np.asarray(decode_image(buf.getvalue()))[..., 0]
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("name", ["empty.jpg", "truncated.jpg", "not_an_image.jpg", "bomb.png"])
def test_broken_bytes_raise_bad_image(name):
    data, reason = broken_files(fmnist_pictures(1)[0][1])[name]
    with pytest.raises(BadImage, match=reason):
        decode_image(data)
