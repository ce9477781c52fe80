"""Reading a release as a user would: pair rows with both pictures, whatever the layout.

* :func:`load_pairs` gives a ``datasets.Dataset`` of pair rows with ``anchor`` and ``positive`` pictures, from a
  release folder or a Hub repo. In the ``images`` layout (each picture stored once) it loads the release's two
  configs with ``datasets`` and joins them *as rows are read* (``Dataset.with_transform``), so no picture is
  copied: a ``datasets`` config cannot join, and loading scripts are gone from ``datasets`` 4, hence a helper.
* :func:`stream_pairs` streams pairs from the release's WebDataset image tars (written with ``--webdataset``)
  through ``webdataset``, holding only the pictures whose pairs are still to come (the export writes pictures in
  key order, so partners that share a class folder arrive close together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator


def _is_images_layout(path: str, revision: str | None) -> bool:
    import datasets

    return "images" in datasets.get_dataset_config_names(path, **({"revision": revision} if revision else {}))


def load_pairs(path: str | Path, split: str = "train", revision: str | None = None):
    """Pair rows with both pictures (``anchor``, ``positive``: PIL images) from a release of either layout: a
    folder (``builds/x/release``) or a Hub dataset (``org/name``, pinned with ``revision``)."""
    import datasets

    path = str(path)
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if not _is_images_layout(path, revision):
        return datasets.load_dataset(path, split=split, **kwargs)
    pairs = datasets.load_dataset(path, "pairs", split=split, **kwargs)
    pictures = datasets.load_dataset(path, "images", split=split, **kwargs)
    row_of = {key: i for i, key in enumerate(pictures["key"])}
    image = datasets.Image()

    def join(batch: dict[str, list]) -> dict[str, list]:
        for side in ("anchor", "positive"):
            rows = [row_of[k] for k in batch[f"{side}_key"]]
            cells = pictures.select(rows).cast_column("image", datasets.Image(decode=False))["image"]
            batch[side] = [image.decode_example(cell) for cell in cells]
        return batch

    return pairs.with_transform(join)


def stream_pairs(release: str | Path, shardshuffle: bool = False) -> Iterator[dict[str, Any]]:
    """Pairs streamed from an ``images``-layout release's WebDataset tars: dicts with ``anchor`` and ``positive``
    (encoded bytes), the pair's row (keys, label, similarity) beside. Each pair comes once, when its second picture
    has arrived; a picture is dropped once its last pair has gone."""
    import pyarrow.parquet as pq
    import webdataset as wds

    from .export.manifest import load_manifest, release_file

    release = Path(release)
    manifest = load_manifest(release)
    tars = [str(release_file(release, e)) for e in manifest.entries("image-tars")]
    if not tars:
        raise ValueError(f"{release} has no WebDataset image tars (export it with --webdataset)")
    rows = [r for e in manifest.entries("pairs") for r in pq.read_table(release_file(release, e)).to_pylist()]
    pending: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        for side in ("anchor_key", "positive_key"):
            pending.setdefault(row[side], []).append(i)
    left = {k: len(v) for k, v in pending.items()}
    held: dict[str, bytes] = {}
    ext = manifest.image_ext
    for sample in wds.WebDataset(tars, shardshuffle=shardshuffle).decode():
        key = sample["json"]["key"]
        if key not in pending:
            continue
        held[key] = sample[ext]
        for i in pending[key]:
            row = rows[i]
            other = row["positive_key"] if row["anchor_key"] == key else row["anchor_key"]
            if other in held:
                yield {**row, "anchor": held[row["anchor_key"]], "positive": held[row["positive_key"]]}
                for k in (row["anchor_key"], row["positive_key"]):
                    left[k] -= 1
                    if left[k] == 0:
                        held.pop(k, None)
