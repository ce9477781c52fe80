"""A Hugging Face dataset's columns are checked before anything is read: each odd column is a one-line error
naming the option, and each odd row (an empty image cell, a label out of range) a quarantine row.

Every case is a real dataset written with ``save_to_disk`` and read through ``build --until index``.
"""

from __future__ import annotations

import json

import datasets
import pyarrow.parquet as pq
import pytest

from images import fmnist_pictures, png_bytes

NAMES = ["top", "trouser", "pullover"]


def _saved(path, labels, label_feature, images=None):
    pictures = fmnist_pictures(3, size=28)[: len(labels)]
    cells = images if images is not None else [{"bytes": png_bytes(p), "path": None} for _, p in pictures]
    ds = datasets.Dataset.from_dict({"image": cells, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(), "label": label_feature}))
    ds.save_to_disk(str(path))
    return path


def _index(cli, tmp_path, source, *extra):
    out = tmp_path / "b"
    proc = cli("build", "--source", f"hf:{source}", "--out", out, "--until", "index", "--workers", "0", *extra)
    assert proc.returncode == 0, proc.stderr
    index = pq.read_table(out / "index.parquet").to_pydict()
    quarantine = dict(zip(*pq.read_table(out / "quarantine.parquet").to_pydict().values()))
    return index, quarantine


def test_an_empty_image_cell_is_quarantined_and_the_rest_indexed(cli, tmp_path):
    cells = [{"bytes": png_bytes(p), "path": None} for _, p in fmnist_pictures(2, size=28)]
    cells[3] = None
    source = _saved(tmp_path / "ds", [0, 1, 2, 0, 1, 2], datasets.ClassLabel(names=NAMES), images=cells)
    index, quarantine = _index(cli, tmp_path, source)
    assert len(index["key"]) == 5 and "train/00000003" not in index["key"]
    assert "image cell is empty" in quarantine["train/00000003"]


def test_string_labels_become_classes_in_sorted_order(cli, tmp_path):
    source = _saved(tmp_path / "ds", ["shirt", "bag", "shirt", None, "bag", "coat"], datasets.Value("string"))
    index, quarantine = _index(cli, tmp_path, source, "--label-column", "label")
    assert not quarantine
    assert index["label"] == [2, 0, 2, -1, 0, 1]
    assert index["label_name"] == ["shirt", "bag", "shirt", "", "bag", "coat"]


def test_labels_out_of_range_are_quarantined_with_the_reason(cli, tmp_path):
    source = _saved(tmp_path / "ds", [0, -3, 2**40, 1, -1, 2], datasets.Value("int64"))
    index, quarantine = _index(cli, tmp_path, source, "--label-column", "label")
    assert index["label"] == [0, 1, -1, 2]
    assert "label -3 is outside -1 to 99,999" in quarantine["train/00000001"]
    assert "label 1099511627776 is outside" in quarantine["train/00000002"]


def test_classlabel_values_past_the_names_are_quarantined(cli, tmp_path):
    source = _saved(tmp_path / "ds", [0, 1, 5, 2, 7, 1], datasets.Value("int64"))
    info = json.loads((source / "dataset_info.json").read_text())
    info["features"]["label"] = {"names": NAMES[:2], "_type": "ClassLabel"}  # as a hand-edited dataset says
    (source / "dataset_info.json").write_text(json.dumps(info))
    index, quarantine = _index(cli, tmp_path, source)
    assert index["label"] == [0, 1, 1] and index["label_name"] == ["top", "trouser", "trouser"]
    assert {k: v.split(": ", 1)[1] for k, v in quarantine.items()} == {
        "train/00000002": "label 5 is past the 2 class names", "train/00000003": "label 2 is past the 2 class names",
        "train/00000004": "label 7 is past the 2 class names"}


@pytest.mark.parametrize("feature, values, option, says", [
    (datasets.Value("float32"), [0.0, float("nan"), 1.0, 1.5, 0.0, 1.0], "--label-column label", "float32 values"),
    (datasets.ClassLabel(names=NAMES), [0, 1, 2, 0, 1, 2], "--image-column label", "ClassLabel values, not images"),
    (datasets.ClassLabel(names=NAMES), [0, 1, 2, 0, 1, 2], "--label-column image", "Image values"),
])
def test_a_column_of_the_wrong_kind_is_one_line_naming_the_option(cli, tmp_path, feature, values, option, says):
    source = _saved(tmp_path / "ds", values, feature)
    name, column = option.split()
    proc = cli("build", "--source", f"hf:{source}", "--out", tmp_path / "b", "--until", "index", name, column)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}:") and says in lines[0], proc.stderr
    assert not (tmp_path / "b" / "index.parquet").exists()


def test_a_dataset_of_zero_rows_is_one_line(cli, tmp_path):
    source = _saved(tmp_path / "ds", [], datasets.ClassLabel(names=NAMES), images=[])
    proc = cli("build", "--source", f"hf:{source}", "--out", tmp_path / "b", "--until", "index")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --source: {source} holds no rows"
