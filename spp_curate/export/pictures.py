"""The ``images`` layout of a release: each picture stored once, pairs as rows of keys.

```
release/
  data/pairs-00000-of-00001.parquet   pair_id, anchor_key, positive_key, anchor_digest, positive_digest, label,
                                      label_name, similarity            (no pixels; a few dozen bytes a pair)
  data/images-<16 hex>.parquet        key, image (Image), digest, label, label_name     (row groups of 100 rows)
  wds/images-<16 hex>.tar             with --webdataset: the same pictures, <id>.<ext> + <id>.json each
```

A picture appears in about three pair slots (1.5 pairs per image, two roles), so the ``pairs`` layout stores it
about six times over its two formats; here it is stored once per format, and the release is the size of its
pictures. Joining pairs to pictures is the readers' work: the trainer's, ``spp_curate.load_pairs`` for
``datasets`` users, and ``spp_curate.stream_pairs`` over the tars.

**Updates cost their change.** Image shards are *content-addressed*: a shard's name is a digest of the
``(key, digest)`` rows it holds and the settings its bytes depend on (container format, ``--max-side``). An
export keeps every shard of the release it replaces whose pictures are all still shipped, unchanged: it is
hard-linked into the new version (copied where the file system cannot link), and only the rest (new pictures,
and those of a shard that lost or changed one) are written, sorted by key, into new shards. The manifest lists
which shards a version reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import layout
from ..curate.sources import Source
from ..files import temp_path
from .encoding import encoded_image

#: Rows in an image shard's row group: what ``datasets`` writes for image data, so a reader holds about 100
#: pictures at a time (11 MB at ImageNet's mean JPEG size).
IMAGE_ROW_GROUP = 100
#: Pairs in one shard of the pair table (it holds no pixels: about 200 bytes a pair).
PAIRS_PER_SHARD = 2_000_000
#: At most this many pictures in an image shard, whatever their bytes (shards are written one process each).
MAX_PICTURES_PER_SHARD = 20_000
#: A picture in a tar: its member's header and padding (512 + 256 on average) and a JSON member (1,024).
TAR_BYTES_PER_PICTURE = 512 + 256 + 1024
#: A shard of the release replaced is kept whole while at least this share of its pictures is still in a pair
#: (a few pictures leave the pairs at every update: rewriting their shards would rewrite the release); the
#: others stay in it, unreferenced, and are counted (``counts.pictures_unpaired``).
KEEP_SHARE = 0.9
#: The version of how a shard's bytes are made from its rows; part of every shard name.
SHARD_FORMAT = "images-2"
#: Pictures are compressed already; keys, hex digests and the pair table's columns are not (zstd halves them,
#: which at Fashion-MNIST's 500-byte pictures is 10 % of a release). pyarrow, ``datasets`` and the Hub read it.
PARQUET_COMPRESSION = "zstd"


def image_features(class_names: list[str]) -> datasets.Features:
    """The schema of an image shard, declared as ``datasets`` reads it."""
    label = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int32")
    return datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                              "digest": datasets.Value("string"), "label": label,
                              "label_name": datasets.Value("string")})


def shard_settings(target: str, max_side: int | None) -> str:
    """What a shard's bytes depend on beside its rows: the container format and the largest side."""
    return f"{SHARD_FORMAT}|{target}|{max_side}"


def shard_name(keys: list[str], digests: list[str], settings: str) -> str:
    """The content address of an image shard: 16 hex digits of the sha256 of its settings and rows."""
    h = hashlib.sha256(settings.encode())
    for key, digest in zip(keys, digests):
        h.update(f"{key}\0{digest}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class ParentShard:
    """An image shard of the release an export replaces, reusable when all its pictures are still shipped."""

    name: str
    path: Path
    entry: dict[str, Any]
    tar: tuple[Path, dict[str, Any]] | None
    keys: list[str]
    digests: list[str]


def parent_shards(final: Path, settings: str) -> list[ParentShard]:
    """The image shards of the ``images``-layout release standing at ``final`` (our own earlier export), each
    checked cheaply before it may be reused: the file is the size its manifest says, its rows are what its name
    addresses under these settings. Anything else (another layout, other settings, a damaged shard): none."""
    from .manifest import load_manifest, release_file
    from ..errors import UserError

    try:
        manifest = load_manifest(final)
    except UserError:
        return []
    if getattr(manifest, "layout", "pairs") != "images" or (manifest.model_extra or {}).get(
            "shard_settings") != settings:
        return []
    tars = {Path(e.path).stem.removeprefix("images-"): e for e in manifest.entries("image-tars")}
    found = []
    for entry in manifest.entries("images"):
        try:
            path = release_file(final, entry)
            if path.stat().st_size != entry.bytes:
                continue
            table = pq.read_table(path, columns=["key", "digest"])
            keys, digests = table.column("key").to_pylist(), table.column("digest").to_pylist()
            name = Path(entry.path).stem.removeprefix("images-")
            if shard_name(keys, digests, settings) != name:
                continue
            tar = None
            if name in tars:
                tar_path = release_file(final, tars[name])
                if tar_path.stat().st_size == tars[name].bytes:
                    tar = (tar_path, tars[name].model_dump())
            found.append(ParentShard(name, path, entry.model_dump(), tar, keys, digests))
        except (OSError, ValueError, pa.ArrowException):
            continue
    return found


def plan_pictures(wanted: pd.DataFrame, parents: list[ParentShard], shard_size: int, with_tars: bool,
                  ) -> tuple[list[ParentShard], list[pd.DataFrame]]:
    """Which parent shards are kept whole, and the rest of ``wanted`` (columns key, digest, nbytes; one row
    per distinct picture) cut into new shards of about ``shard_size`` bytes, in key order."""
    want = dict(zip(wanted.key.tolist(), wanted.digest.tolist()))
    reused: list[ParentShard] = []
    taken: set[str] = set()
    for shard in parents:
        if with_tars and shard.tar is None or not shard.keys:
            continue
        # A picture whose key now names other bytes, or that another kept shard holds: never kept twice or stale.
        clash = any(k in want and want[k] != d or k in taken for k, d in zip(shard.keys, shard.digests))
        still = sum(k in want for k in shard.keys)
        if not clash and still >= KEEP_SHARE * len(shard.keys):
            reused.append(shard)
            taken.update(shard.keys)
    rest = wanted[~wanted.key.isin(taken)].sort_values("key", kind="stable").reset_index(drop=True)
    sizes = rest.nbytes.to_numpy(dtype=np.int64) + (TAR_BYTES_PER_PICTURE if with_tars else 0)
    chunks, lo, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > lo and (total + size > shard_size or i - lo >= MAX_PICTURES_PER_SHARD):
            chunks.append(rest.iloc[lo:i])
            lo, total = i, 0
        total += int(size)
    if lo < len(rest):
        chunks.append(rest.iloc[lo:])
    return reused, chunks


def link_or_copy(src: Path, dst: Path) -> bool:
    """Put ``src`` at ``dst`` by a hard link (no new bytes), or a copy where the file system cannot link;
    True when linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        tmp = temp_path(dst)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return False


def tar_member_key(key: str) -> str:
    """A WebDataset sample key for a picture key: no dots, no slashes (the source key is in its JSON)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class ImageShardWork:
    """The export stage's unit of work in the ``images`` layout: write one image shard (and its tar) from a slice
    of distinct pictures (columns key, digest, format, label, label_name)."""

    gpus = 0

    def __init__(self, recipe, source: Source | None, target: str, ext: str, features: datasets.Features,
                 with_tars: bool, on_picture=None) -> None:
        self.recipe, self.source, self.target, self.ext = recipe, source, target, ext
        self.features, self.with_tars, self.on_picture = features, with_tars, on_picture

    def __getstate__(self) -> dict:
        return {**self.__dict__, "source": None, "on_picture": None}

    def setup(self) -> None:
        if self.source is None:
            from ..curate.sources import open_source

            self.source = open_source(self.recipe)

    def __call__(self, unit: tuple[pd.DataFrame, Path, Path | None]) -> int:
        rows, pq_path, tar_path = unit
        return write_image_shard(self.recipe, self.source, rows, self.target, self.ext, self.features, pq_path,
                                 tar_path, self.on_picture)


def write_image_shard(recipe, source: Source, rows: pd.DataFrame, target: str, ext: str,
                      features: datasets.Features, pq_path: Path, tar_path: Path | None, on_picture=None) -> int:
    """One image shard (Parquet, row groups of :data:`IMAGE_ROW_GROUP`) and, with ``tar_path``, its tar; each
    written under a temporary name and renamed into place when whole."""
    import json

    from .webdataset import TarShardWriter

    schema = features.arrow_schema
    tmp = temp_path(pq_path)
    writer = pq.ParquetWriter(tmp, schema, compression=PARQUET_COMPRESSION)
    tar = TarShardWriter(tar_path) if tar_path is not None else None
    try:
        for lo in range(0, len(rows), IMAGE_ROW_GROUP):
            part = rows.iloc[lo: lo + IMAGE_ROW_GROUP]
            images = []
            for row in part.itertuples(index=False):
                data = encoded_image(source, row.key, row.digest, row.format, target, recipe.max_side)
                images.append({"bytes": data, "path": None})
                if tar is not None:
                    tar.write({"__key__": tar_member_key(row.key), ext: data,
                               "json": json.dumps({"key": row.key, "digest": row.digest, "label": int(row.label),
                                                   "label_name": str(row.label_name)}, sort_keys=True).encode()})
                if on_picture:
                    on_picture()
            writer.write_table(pa.table({"key": part.key.tolist(), "image": images, "digest": part.digest.tolist(),
                                         "label": part.label.astype(np.int64).tolist(),
                                         "label_name": part.label_name.astype(str).tolist()}, schema=schema))
        writer.close()
        if tar is not None:
            tar.close()  # renamed into place: the Parquet file follows, so a shard is whole only with both
    except BaseException:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - already failing; the temporary files go below
            pass
        tmp.unlink(missing_ok=True)
        if tar is not None:
            tar.abort()
        raise
    os.replace(tmp, pq_path)
    return len(rows)


def pair_table_features(class_names: list[str], digests: bool) -> datasets.Features:
    """The pair table's schema: keys, labels, similarity; the pictures' digests only where the release ships no
    pictures (an ID-only release), since each image shard row carries its picture's digest once."""
    from .parquet import id_features

    features = id_features(class_names)
    return features if digests else datasets.Features({k: v for k, v in features.items() if not k.endswith("_digest")})


#: Pair rows turned into Arrow and written at a time: the pair table is never held whole as strings.
PAIR_TABLE_SLICE = 100_000


def write_pair_table(pairs: pd.DataFrame, features: datasets.Features, release: Path) -> list[tuple[Path, int]]:
    """The pairs as rows of keys (no pixels) in ``data/pairs-*.parquet``; returns ``(path, rows)`` per shard.
    Written a row group (``PAIR_TABLE_SLICE`` rows) at a time, column by column in Arrow: no Python object per
    value, and no more than a slice of the keys as strings at once (a pair's key may be a position into the
    index's keys)."""
    n = max(1, -(-len(pairs) // PAIRS_PER_SHARD))
    schema = features.arrow_schema
    out = []
    for i in range(n):
        part = pairs.iloc[i * PAIRS_PER_SHARD: (i + 1) * PAIRS_PER_SHARD]
        path = release / layout.pair_table_shard(i, n)
        tmp = temp_path(path)
        with pq.ParquetWriter(tmp, schema, compression=PARQUET_COMPRESSION) as writer:
            for lo in range(0, max(len(part), 1), PAIR_TABLE_SLICE):
                rows = part.iloc[lo: lo + PAIR_TABLE_SLICE]
                writer.write_table(pa.Table.from_arrays([_arrow_column(rows[f.name], f.type) for f in schema],
                                                        schema=schema), row_group_size=PAIR_TABLE_SLICE)
        os.replace(tmp, path)
        out.append((path, len(part)))
        pa.default_memory_pool().release_unused()
    return out


def _arrow_column(values: pd.Series, kind: pa.DataType) -> pa.Array:
    column = pa.array(values, from_pandas=True)
    if column.type != kind:  # a dictionary column (positions into the index's keys) is decoded here
        column = column.cast(kind) if not pa.types.is_null(column.type) else pa.nulls(len(column), kind)
    return column


# ------------------------------------------------------------------ reading any layout

def pair_rows(release: Path, manifest, columns: list[str]) -> pd.DataFrame:
    """A release's pair rows (``columns`` of the pair schema), from its pair table (``images`` layout) or its
    pair shards (``pairs`` layout)."""
    from .manifest import release_file

    images = getattr(manifest, "layout", "pairs") == "images"
    kind = "pairs" if images else "parquet"
    joined = [c for c in columns if c.endswith("_digest")] if images and manifest.images == "embed" else []
    own = [c for c in columns if c not in joined]
    parts = [pq.read_table(release_file(release, e), columns=own).to_pandas() for e in manifest.entries(kind)]
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=own)
    if joined:  # each picture's digest is stored once, beside it in its image shard
        digest: dict[str, str] = {}
        for entry in manifest.entries("images"):
            table = pq.read_table(release_file(release, entry), columns=["key", "digest"])
            digest.update(zip(table.column("key").to_pylist(), table.column("digest").to_pylist()))
        for column in joined:
            rows[column] = rows[column.replace("_digest", "_key")].map(digest)
    return rows[columns]


def iter_pictures(release: Path, manifest, batch_size: int = IMAGE_ROW_GROUP
                  ) -> Iterator[tuple[list[str], list[str], list[bytes | None]]]:
    """The pictures of an ``images``-layout release, a batch at a time: keys, digest column, bytes."""
    from .manifest import release_file

    for entry in manifest.entries("images"):
        shard = pq.ParquetFile(release_file(release, entry))
        for batch in shard.iter_batches(batch_size=batch_size, columns=["key", "digest", "image"]):
            rows = batch.to_pydict()
            yield rows["key"], rows["digest"], [(cell or {}).get("bytes") for cell in rows["image"]]


# ------------------------------------------------------------------ writing a release's shards in this layout

def write_images_layout(inp, source: Source | None, final: Path, release: Path, engine, target: str, ext: str,
                        again: bool = False) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """The pair table and the picture shards of ``inp`` in the staging folder ``release``, the parent's
    unchanged shards linked in (``again``: none; every picture read from the source and checked against its
    digest again, as ``export --force`` asks); returns the manifest entries, the counts to add, and what was
    reused."""
    from ..progress import shard_counter, stage_progress
    from .manifest import file_entry
    recipe, pairs = inp.recipe, inp.pairs
    features = pair_table_features(inp.class_names, digests=recipe.images == "none")
    entries = [file_entry(release, path, "pairs", rows) for path, rows in write_pair_table(pairs, features, release)]
    if recipe.images == "none":
        return entries, {"pictures": 0, "shards": 0}, {"shards": [], "bytes": 0, "settings": None}
    used = pd.unique(np.concatenate([pairs.anchor_key.to_numpy(), pairs.positive_key.to_numpy()]))
    digest = dict(zip(pairs.anchor_key, pairs.anchor_digest)) | dict(zip(pairs.positive_key, pairs.positive_digest))
    facts = inp.images.loc[used]
    wanted = pd.DataFrame({"key": used, "digest": [digest[k] for k in used],
                           "nbytes": facts["nbytes"].to_numpy(dtype=np.int64), "format": facts["format"].to_numpy(),
                           "label": (facts["label"].to_numpy() if "label" in facts else np.full(len(used), -1)),
                           "label_name": (facts["label_name"].to_numpy() if "label_name" in facts
                                          else np.full(len(used), "", dtype=object))})
    settings = shard_settings(target, recipe.max_side)
    with_tars = bool(recipe.webdataset)
    reused, chunks = plan_pictures(wanted, [] if again else parent_shards(final, settings), recipe.shard_size,
                                   with_tars)
    (release / layout.PARQUET_FOLDER).mkdir(parents=True, exist_ok=True)
    if with_tars:
        (release / layout.TAR_FOLDER).mkdir(parents=True, exist_ok=True)
        from .webdataset import load_webdataset

        load_webdataset()
    reused_bytes = 0
    for shard in reused:  # the same bytes under the same name: linked, never written again
        link_or_copy(shard.path, release / layout.image_shard(shard.name))
        entries.append(shard.entry)
        reused_bytes += int(shard.entry["bytes"])
        if with_tars and shard.tar is not None:
            link_or_copy(shard.tar[0], release / layout.image_tar_shard(shard.name))
            entries.append(shard.tar[1])
            reused_bytes += int(shard.tar[1]["bytes"])
    new = []
    for rows in chunks:
        name = shard_name(rows.key.tolist(), rows.digest.tolist(), settings)
        new.append((rows, release / layout.image_shard(name),
                    release / layout.image_tar_shard(name) if with_tars else None))
    todo = [(rows, p, t) for rows, p, t in new if not (p.exists() and (t is None or t.exists()))]
    features = image_features(inp.class_names)
    total = sum(len(rows) for rows, _, _ in new)
    with stage_progress("export: pictures", total, unit="img") as (bar, task):
        bar.update(task, advance=total - sum(len(rows) for rows, _, _ in todo))
        on_picture, on_shard = shard_counter(bar, task)  # item by item in this process, else by shard

        workers = min(len(todo), (os.cpu_count() or 1) if recipe.workers is None else recipe.workers)
        workers = workers if workers > 1 else 0
        work = ImageShardWork(recipe, source, target, ext, features, with_tars, None if workers else on_picture)
        engine.map(work, todo, workers=workers, on_result=on_shard)
    for rows, p, t in new:
        entries.append(file_entry(release, p, "images", len(rows)))
        if t is not None:
            entries.append(file_entry(release, t, "image-tars", len(rows)))
    kept_keys = {k for shard in reused for k in shard.keys}
    unpaired = len(kept_keys - set(wanted.key.tolist()))
    counts = {"pictures": int(len(wanted)) + unpaired, "pictures_unpaired": unpaired,
              "shards": len(reused) + len(new), "picture_bytes": int(wanted.nbytes.sum())}
    return entries, counts, {"shards": sorted(layout.image_shard(s.name) for s in reused), "bytes": reused_bytes,
                             "settings": settings}
