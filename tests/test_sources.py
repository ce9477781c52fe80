"""The imagenet, hf and wds sources, on real pictures written by the tests."""

from __future__ import annotations

import io
import json
import tarfile

import datasets
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from spp_curate.config import resolve_recipe
from spp_curate.curate.sources import open_source

from conftest import TEST_ENCODER, run_cli, run_cli_process
from images import fmnist_pictures, jpeg_bytes, png_bytes

WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def _imagenet_tree(root, val_sorted: bool):
    pictures = fmnist_pictures(12)
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {n}, other name\n" for w, n in zip(WNIDS, NAMES)))
    solution = ["ImageId,PredictionString"]
    for i, (label, img) in enumerate(pictures):
        wnid = WNIDS[label]
        if i % 4:  # three in four go to train
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            name = f"{wnid}_{i}.JPEG"
            data = png_bytes(img) if i == 1 else jpeg_bytes(img)  # one PNG under a .JPEG name, as in ImageNet
            (root / "train" / wnid / name).write_bytes(data)
        else:
            stem = f"ILSVRC2012_val_{i + 1:08d}"
            folder = root / "val" / wnid if val_sorted else root / "val"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{stem}.JPEG").write_bytes(jpeg_bytes(img))
            solution.append(f"{stem},{wnid} 1 2 30 40 {wnid} 5 6 70 80")
    if not val_sorted:
        (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    return pictures


@pytest.mark.parametrize("val_sorted", [False, True])
def test_imagenet_train_and_val_labels(tmp_path, val_sorted):
    pictures = _imagenet_tree(tmp_path, val_sorted)
    train = open_source(resolve_recipe("imagenet", {"root": str(tmp_path), "split": "train"}))
    assert train.class_names == NAMES
    items = list(train.items())
    assert len(items) == 27
    assert all(key.startswith(WNIDS[label]) for key, label in items)
    val = open_source(resolve_recipe("imagenet", {"root": str(tmp_path), "split": "val"}))
    val_items = list(val.items())
    assert len(val_items) == 9
    expected = [label for i, (label, _) in enumerate(pictures) if i % 4 == 0]
    assert [label for _, label in val_items] == expected


def test_imagenet_build_uses_png_under_jpeg_name(tmp_path):
    _imagenet_tree(tmp_path / "in", val_sorted=False)
    out = tmp_path / "b"
    assert run_cli("build", "--source", "imagenet", "--root", tmp_path / "in", "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--min-similarity", "0") == 0
    index = pq.read_table(out / "index.parquet").to_pandas().set_index("key")
    assert index.loc[f"{WNIDS[0]}/{WNIDS[0]}_1.JPEG", "format"] == "PNG"
    assert set(index.label_name) == set(NAMES)
    assert pq.read_metadata(out / "quarantine.parquet").num_rows == 0


def test_imagenet_flat_val_without_labels_is_a_clear_error(tmp_path):
    _imagenet_tree(tmp_path, val_sorted=False)
    (tmp_path / "LOC_val_solution.csv").unlink()
    proc = run_cli_process("build", "--source", "imagenet", "--root", tmp_path, "--split", "val",
                           "--out", tmp_path / "b", "--encoder", "pixels:8")  # the recipe's weights are offline here
    assert proc.returncode != 0 and "LOC_val_solution.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_hf_source_from_a_dataset_saved_to_disk(tmp_path):
    pictures = fmnist_pictures(10)
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=NAMES),
                                  "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": [p for _, p in pictures], "fine_label": [lab for lab, _ in pictures],
                                     "caption": ["x"] * len(pictures)}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "b"
    assert run_cli("build", "--source", f"hf:{tmp_path / 'saved'}", "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--min-similarity", "0") == 0
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert len(index) == len(pictures)
    assert index.label.tolist() == [lab for lab, _ in pictures]
    assert index.label_name.tolist() == [NAMES[lab] for lab, _ in pictures]
    release = datasets.load_dataset(str(out / "release"), split="train")
    assert release.features["label"].names == NAMES


def test_hf_source_names_a_missing_column(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    proc = run_cli_process("build", "--source", f"hf:{tmp_path / 'saved'}", "--out", tmp_path / "b")
    assert proc.returncode != 0 and "--image-column" in proc.stderr and "text" in proc.stderr


def test_wds_source_reads_cls_and_json_labels_and_refuses_unsafe_members(tmp_path):
    pictures = fmnist_pictures(8)
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:06d}.tar")) as sink:
            for i, (label, img) in enumerate(pictures[shard::2]):
                sample = {"__key__": f"s{shard}_{i:04d}", "jpg": jpeg_bytes(img)}
                if i % 2:
                    sample["cls"] = str(label).encode()
                else:
                    sample["json"] = json.dumps({"label": label, "label_name": NAMES[label]}).encode()
                sink.write(sample)
    with tarfile.open(tmp_path / "shard-000001.tar", "a") as tar:
        data = jpeg_bytes(pictures[0][1])
        info = tarfile.TarInfo("../escape.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "b"
    assert run_cli("build", "--source", f"wds:{tmp_path}/shard-{{000000..000001}}.tar", "--out", out,
                   *TEST_ENCODER, "--workers", "0", "--min-similarity", "0") == 0
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert len(index) == len(pictures)
    assert sorted(index.label.tolist()) == sorted(lab for lab, _ in pictures)
    assert set(index.label_name) == set(NAMES)
    quarantine = pq.read_table(out / "quarantine.parquet").to_pandas()
    assert len(quarantine) == 1 and "refused" in quarantine.error[0]


def test_wds_members_with_dots_are_quarantined_with_a_reason_and_the_counts_add_up(tmp_path):
    """A member named ``.hidden.png`` (no key before the first dot) or ``dot.in.name.png`` (webdataset's sample
    ``dot`` with extension ``in.name.png``) is neither a picture nor dropped in silence: quarantined, named."""
    pictures = fmnist_pictures(3)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        names = [f"s{i:04d}.png" for i in range(7)] + [".hidden.png", "dot.in.name.png"]
        for name, (_, img) in zip(names, pictures):
            data = png_bytes(img)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "b"
    assert run_cli("build", "--source", f"wds:{shard}", "--out", out, "--until", "index", "--workers", "0") == 0
    index = pq.read_table(out / "index.parquet").to_pandas()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pandas().set_index("key")
    assert len(index) == 7 and len(index) + len(quarantine) == 9
    assert "no sample key" in quarantine.error["shard-000000.tar/.hidden.png"]
    assert "dot in the sample key" in quarantine.error["shard-000000.tar/dot.in.name.png"]


def test_file_and_folder_names_that_are_not_utf8_are_quarantined_not_a_traceback(tmp_path, cli):
    import os

    root = tmp_path / "images"
    pictures = fmnist_pictures(2, classes=2, size=16)
    for n, (label, img) in enumerate(pictures):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"class{label}" / f"{n}.png")
    pictures[0][1].save(os.fsencode(root / "class0") + b"/bad\xff.png", format="PNG")
    os.mkdir(os.fsencode(root) + b"/\xfe")
    pictures[0][1].save(os.fsencode(root) + b"/\xfe/x.png", format="PNG")
    out = tmp_path / "b"
    proc = cli("build", "--source", "imagefolder", "--root", root, "--out", out, "--until", "index", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    index = pq.read_table(out / "index.parquet").to_pandas()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pandas().set_index("key")
    assert len(index) == len(pictures)
    assert "not UTF-8" in quarantine.error["class0/bad\\xff.png"] and "not UTF-8" in quarantine.error["\\xfe"]
