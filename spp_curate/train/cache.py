"""Decode once per run: a run's pictures as one uint8 array ``(N, S, S, 3)``.

The trainer and ``eval`` decode every picture once, through the project's one
loader (:mod:`spp_curate.images`: EXIF rotation, alpha on white, the same draft
decoding the encoder used), resize its shorter side to ``S`` and take the centre
square, which is the geometry of the eval transform. Augmentations then run in
batches on the training device (:mod:`.augment`) over this array, so no epoch
decodes or augments a picture in a Python loop.

The array is shared with the decode processes: anonymous shared memory when it
fits in half the memory available, a memory-mapped file under the run
directory otherwise (``--cache``). Decoding is cut into units of at most
:data:`UNIT_IMAGES` pictures (row ranges of a release's Parquet files, or of a
source's keys), so every worker asked for has work, whatever the shard count.
A picture that does not decode leaves its row zero and ``ok`` False.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..devices import auto_workers
from ..engine.local import LocalEngine
from ..errors import UserError, brief
from ..images import BadImage, read_bytes, square_pixels
from ..progress import stage_progress

#: Pictures in one unit of decoding work.
UNIT_IMAGES = 512
CACHE_MODES = ("auto", "memory", "disk", "jpeg")
#: The JPEG quality of a compressed cache (pictures at the training size, re-encoded once).
JPEG_QUALITY = 95
#: The version of how a persistent cache is laid out and made; part of its key.
CACHE_VERSION = "1"
CACHE_DIR = "cache"


@dataclass
class PictureCache:
    """Decoded pictures, one row per key, and which of them decoded."""

    pixels: np.ndarray  # (N, S, S, 3) uint8
    ok: np.ndarray  # (N,) bool
    keys: list[str]
    first_failure: str | None = None


class JpegPictures:
    """Pictures kept compressed at the training size: one file of JPEG bytes, each row's start and length
    (length 0: the picture did not decode). A batch is decoded when it is asked for, as one call of the device
    decoder (nvJPEG on a GPU, after the stream barrier; libjpeg-turbo on the CPU): about a tenth of the raw
    cache's bytes at 128 px, for pictures that would not fit in memory as pixels."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, side: int) -> None:
        self.data, self.starts, self.lengths, self.side = data, starts, lengths, side

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.starts), self.side, self.side, 3)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.starts.nbytes + self.lengths.nbytes)

    def batch(self, rows: np.ndarray, device: Any) -> Any:
        """Rows ``rows`` as a ``(B, S, S, 3)`` uint8 tensor on ``device``."""
        import torch

        from ..images import decode_jpegs

        rows = np.asarray(rows, dtype=np.int64)
        out = torch.zeros((len(rows), self.side, self.side, 3), dtype=torch.uint8, device=device)
        have = np.flatnonzero(self.lengths[rows] > 0)
        blobs = [torch.from_numpy(np.array(self.data[self.starts[r]: self.starts[r] + self.lengths[r]]))
                 for r in rows[have]]
        for i, picture in zip(have, decode_jpegs(blobs, device)):
            if picture is not None:
                out[int(i)] = picture.permute(1, 2, 0)
        return out


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """A ``(S, S, 3)`` uint8 picture as JPEG bytes (4:4:4: no colour subsampling at small sizes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


class EncodeWork:
    """Decodes units of ``(cache rows, bytes source)`` to the training size and re-encodes each picture as JPEG;
    returns each unit's rows, ok mask, first failure and JPEG bytes."""

    gpus = 0

    def __init__(self, reader: Any, side: int) -> None:
        self.reader, self.side = reader, side

    def setup(self) -> None:
        pass

    def __call__(self, unit: Any) -> tuple[np.ndarray, np.ndarray, str | None, list[bytes]]:
        rows, blobs = self.reader.read_unit(unit)
        ok = np.zeros(len(rows), dtype=bool)
        out: list[bytes] = []
        first = None
        for j, data in enumerate(blobs):
            try:
                if isinstance(data, BadImage):
                    raise data
                out.append(encode_jpeg(square_pixels(data, self.side)))
                ok[j] = True
            except BadImage as exc:
                first = first or str(exc)
                out.append(b"")
        return np.asarray(rows), ok, first, out


def available_memory() -> int:
    """Bytes of memory available now (Linux), or the physical memory where that is not known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pixel_store(n: int, side: int, mode: str, spill_dir: Path | None) -> np.ndarray:
    """A zeroed ``(n, side, side, 3)`` uint8 array that forked decode processes write into.

    ``memory``: anonymous shared memory; ``disk``: a memory-mapped file ``spill_dir/pixels-S.u8``;
    ``auto``: memory when the array takes at most half the memory available, else disk.
    """
    nbytes = n * side * side * 3
    if mode == "auto":
        mode = "memory" if nbytes <= available_memory() // 2 or spill_dir is None else "disk"
    if mode == "memory":
        buf = mmap.mmap(-1, max(nbytes, 1))
        return np.frombuffer(buf, dtype=np.uint8, count=nbytes).reshape(n, side, side, 3)
    if spill_dir is None:
        raise UserError("a disk cache needs a run directory", option="--cache")
    spill_dir.mkdir(parents=True, exist_ok=True)
    return np.memmap(spill_dir / f"pixels-{side}.u8", dtype=np.uint8, mode="w+", shape=(max(n, 1), side, side, 3))[:n]


class DecodeWork:
    """Decodes units of ``(cache rows, bytes source)`` into the shared pixel array; returns each unit's ok mask
    and its first failure reason."""

    gpus = 0

    def __init__(self, reader: Any, pixels: np.ndarray) -> None:
        self.reader, self.pixels = reader, pixels

    def setup(self) -> None:
        pass

    def __call__(self, unit: Any) -> tuple[np.ndarray, np.ndarray, str | None]:
        rows, blobs = self.reader.read_unit(unit)
        ok = np.zeros(len(rows), dtype=bool)
        first = None
        side = self.pixels.shape[1]
        for j, (row, data) in enumerate(zip(rows, blobs)):
            try:
                if isinstance(data, BadImage):
                    raise data
                self.pixels[row] = square_pixels(data, side)  # empty bytes or None: BadImage("empty file")
                ok[j] = True
            except BadImage as exc:
                first = first or str(exc)
        return np.asarray(rows), ok, first


def decode_into(reader: Any, side: int, workers: int | None, mode: str = "auto", spill_dir: Path | None = None,
                label: str = "decode") -> PictureCache:
    """Every picture ``reader`` lists, decoded once into a :class:`PictureCache` by ``workers`` processes
    (None: one per spare core)."""
    if mode not in CACHE_MODES:
        raise UserError(f"got {mode!r}; accepted: {', '.join(CACHE_MODES)}", option="--cache")
    if mode == "jpeg":
        if spill_dir is None:
            raise UserError("a JPEG cache needs a run directory", option="--cache")
        folder = spill_dir / f"jpeg-{side}px-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        return _encode_into(reader, side, workers, folder, label)
    return _decode(reader, pixel_store(len(reader.keys), side, mode, spill_dir), workers, label)


def _decode(reader: Any, pixels: np.ndarray, workers: int | None, label: str) -> PictureCache:
    """Every picture of ``reader`` decoded into ``pixels`` (shared with the decode processes)."""
    ok, first_failure = _gather(reader, DecodeWork(reader, pixels), workers, label)
    return PictureCache(pixels, ok, reader.keys, first_failure)


def _gather(reader: Any, work: Any, workers: int | None, label: str, keep=None) -> tuple[np.ndarray, str | None]:
    """Run ``work`` over ``reader``'s units with progress; each unit's ok mask gathered (and ``keep(rows,
    *rest)`` handed what else it returns); returns the ok mask and the first failure's reason."""
    ok = np.zeros(len(reader.keys), dtype=bool)
    first_failure: str | None = None
    with stage_progress(label, len(reader.keys), quarantine=True) as (bar, task):
        bad = 0

        def on_result(_: int, result: tuple) -> None:
            nonlocal bad, first_failure
            rows, good, first = result[:3]
            if keep is not None:
                keep(rows, *result[3:])
            ok[rows] = good
            bad += int((~good).sum())
            first_failure = first_failure or first
            bar.update(task, advance=len(rows), quarantined=bad)

        LocalEngine().map(work, reader.units(), workers=auto_workers() if workers is None else workers,
                          on_result=on_result)
    return ok, first_failure


def _encode_into(reader: Any, side: int, workers: int | None, folder: Path, label: str) -> PictureCache:
    """Every picture ``reader`` lists, decoded once and kept as JPEG at ``side`` px in ``folder``."""
    n = len(reader.keys)
    starts, lengths = np.zeros(n, np.int64), np.zeros(n, np.int64)
    written = 0
    with open(folder / "pictures.jpg.bin", "wb") as fh:

        def keep(rows: np.ndarray, blobs: list[bytes]) -> None:  # appended as units arrive, in any order
            nonlocal written
            for row, blob in zip(rows, blobs):
                starts[row], lengths[row] = written, len(blob)
                fh.write(blob)
                written += len(blob)

        ok, first_failure = _gather(reader, EncodeWork(reader, side), workers, f"{label} (jpeg cache)", keep)
    np.save(folder / "starts.npy", starts)
    np.save(folder / "lengths.npy", lengths)
    return PictureCache(_open_jpeg(folder, side), ok, reader.keys, first_failure)


def _open_jpeg(folder: Path, side: int) -> JpegPictures:
    path = folder / "pictures.jpg.bin"
    data = (np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8))
    return JpegPictures(data, np.load(folder / "starts.npy"), np.load(folder / "lengths.npy"), side)


def cache_kind(mode: str, n: int, side: int) -> str:
    """``raw`` or ``jpeg``: what a persistent cache keeps (``auto``: raw pixels where they take at most half the
    memory available, else JPEG)."""
    if mode == "jpeg":
        return "jpeg"
    if mode == "disk":
        return "raw"
    return "raw" if n * side * side * 3 <= available_memory() // 2 else "jpeg"


def release_cache(reader: Any, release: Path, side: int, workers: int | None, mode: str, fallback: Path | None,
                  label: str = "decode") -> PictureCache:
    """The decoded pictures of a local release, kept beside it (``.NAME.cache/``) and reused by every later run
    on the same release, size and decode settings: the key is the manifest's sha256 (which pins every shard's),
    the side, the kind (raw pixels or JPEG), the pictures' keys and the cache's version. Built in a temporary
    folder and renamed when whole (two runs building at once: the first rename wins, the other's is dropped);
    where the release's folder cannot be written, the run's own folder holds it for this run."""
    import hashlib
    import json
    import shutil

    from ..files import sha256_file

    kind = cache_kind(mode, len(reader.keys), side)
    keys_sha = hashlib.sha256("\0".join(reader.keys).encode()).hexdigest()
    ident = hashlib.sha256(json.dumps([sha256_file(release / "manifest.json"), side, kind, keys_sha, CACHE_VERSION,
                                       JPEG_QUALITY if kind == "jpeg" else None]).encode()).hexdigest()[:16]
    home = release.parent / f".{release.name}.cache"
    final = home / f"{kind}-{side}px-{ident}"
    if (final / "done.json").is_file():
        try:
            done = json.loads((final / "done.json").read_text())
            if done.get("keys_sha256") == keys_sha:
                return _open_cache(final, kind, side, reader.keys, done)
        except (OSError, ValueError):
            pass
    try:
        home.mkdir(exist_ok=True)
        building = home / f"{final.name}.tmp-{os.getpid()}"
        building.mkdir()
    except OSError:
        return decode_into(reader, side, workers, "disk" if kind == "raw" else "memory", fallback, label)
    try:
        if kind == "jpeg":
            cache = _encode_into(reader, side, workers, building, label)
        else:
            pixels = np.memmap(building / "pixels.u8", dtype=np.uint8, mode="w+",
                               shape=(max(len(reader.keys), 1), side, side, 3))[:len(reader.keys)]
            cache = _decode(reader, pixels, workers, label)
            pixels.flush()
        np.save(building / "ok.npy", cache.ok)
        done = {"keys_sha256": keys_sha, "kind": kind, "side": side, "count": len(reader.keys),
                "first_failure": cache.first_failure}
        (building / "done.json").write_text(json.dumps(done))
        del cache
        try:
            os.rename(building, final)
        except OSError:  # another run finished the same cache first: use theirs
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return _open_cache(final, kind, side, reader.keys, json.loads((final / "done.json").read_text()))


def _open_cache(folder: Path, kind: str, side: int, keys: list[str], done: dict) -> PictureCache:
    ok = np.load(folder / "ok.npy")
    if kind == "jpeg":
        pixels: Any = _open_jpeg(folder, side)
    else:  # copy-on-write: training never writes to it, and a writable array needs no copy to be a tensor
        pixels = np.memmap(folder / "pixels.u8", dtype=np.uint8, mode="c",
                           shape=(max(len(keys), 1), side, side, 3))[:len(keys)]
    return PictureCache(pixels, ok, keys, done.get("first_failure"))


def _units(n: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + UNIT_IMAGES, n)) for lo in range(0, n, UNIT_IMAGES)]


class SourceReader:
    """A source's images (``keys``) for :func:`decode_into`; units are ranges of keys."""

    def __init__(self, source: Any, keys: list[str]) -> None:
        self.source, self.keys = source, keys

    def units(self) -> list[tuple[int, int]]:
        return _units(len(self.keys))

    def read_unit(self, unit: tuple[int, int]) -> tuple[range, list]:
        lo, hi = unit
        return range(lo, hi), [_read_or_reason(self.source, k) for k in self.keys[lo:hi]]


def _read_or_reason(source: Any, key: str) -> bytes | BadImage:
    try:
        return read_bytes(source, key)
    except BadImage as exc:
        return exc


@dataclass
class PairTable:
    """A release's pairs as rows of the picture cache: ``pairs[i] = (anchor row, positive row)``."""

    keys: list[str]  # one per cache row, in order of first appearance
    pairs: np.ndarray  # (P, 2) int64


def pair_table(anchors: Iterable[str], positives: Iterable[str]) -> PairTable:
    """Pairs of keys to pairs of cache rows; each key gets one row, in order of first appearance."""
    anchors, positives = list(anchors), list(positives)
    interleaved = np.empty(2 * len(anchors), dtype=object)
    interleaved[0::2], interleaved[1::2] = anchors, positives
    codes, uniques = pd.factorize(interleaved)
    return PairTable(list(uniques), codes.reshape(-1, 2).astype(np.int64))


def checked_shard(release: Path, entry: Any, wrong_schema) -> pq.ParquetFile:
    """A listed Parquet shard of a release, opened after the checks a reader makes before any row is read: inside
    the release through no symlink, the size its manifest says, a schema ``wrong_schema`` finds nothing wrong
    with, the rows listed, no row group over ``MAX_ROW_GROUP_BYTES``; a one-line error naming ``--pairs``."""
    from ..export.manifest import MAX_ROW_GROUP_BYTES, release_file
    from ..files import UnsafePath

    try:
        path = release_file(release, entry)
        if path.stat().st_size != entry.bytes:
            raise ValueError(f"it is {path.stat().st_size:,} bytes, its manifest says {entry.bytes:,}; "
                             "`spp-curate verify` checks the whole release")
        parquet = pq.ParquetFile(path)
        wrong = wrong_schema(parquet.schema_arrow)
        if wrong:
            raise ValueError(wrong)
        if entry.rows is not None and parquet.metadata.num_rows != entry.rows:
            raise ValueError(f"it holds {parquet.metadata.num_rows:,} rows, its manifest says {entry.rows:,}")
        for g in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(g).total_byte_size
            if size > MAX_ROW_GROUP_BYTES:
                raise ValueError(f"row group {g} is {size:,} bytes, over the limit of {MAX_ROW_GROUP_BYTES:,}")
        return parquet
    except (UnsafePath, OSError, ValueError, KeyError) as exc:
        raise UserError(f"{release}: {entry.path} cannot be read as pairs ({exc})", option="--pairs") from None


def _pair_columns(parquet: pq.ParquetFile):
    return parquet.read(columns=["anchor_key", "positive_key"]
                        + (["similarity"] if "similarity" in parquet.schema_arrow.names else []))


def keyed_pairs(release: Path, tables: list, limit: int | None) -> PairTable:
    """The first ``limit`` pairs of a release's pair tables as cache rows; a null or empty key is one line."""
    columns = {c: [v for t in tables for v in t.column(c).to_pylist()][:limit] for c in ("anchor_key", "positive_key")}
    for name, keys in columns.items():
        if any(k is None or k == "" for k in keys):
            raise UserError(f"{release}: a pair has no {name} (an empty or null key)", option="--pairs")
    return pair_table(columns["anchor_key"], columns["positive_key"])


def finite_similarities(values: list[Any]) -> np.ndarray | None:
    """The pairs' similarities as float64, or None unless every one is a finite number (a release is input from
    others: the trainer then weighs its pairs without them)."""
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None
    out = np.asarray(values, dtype=np.float64)
    return out if np.isfinite(out).all() else None


def pair_similarities(tables: list, limit: int | None) -> np.ndarray | None:
    """The ``similarity`` column of a release's shards, row for row with its pairs (None where a shard lacks it)."""
    import pyarrow as pa

    if not tables or any("similarity" not in t.column_names or not pa.types.is_floating(t.schema.field(
            "similarity").type) for t in tables):
        return None
    values = np.concatenate([t.column("similarity").to_numpy(zero_copy_only=False).astype(np.float64)
                             for t in tables])[:limit]  # a null is NaN here, and refused below
    return values if len(values) and np.isfinite(values).all() else None


class ReleaseReader:
    """A local release's pictures, read from its Parquet shards by row ranges (not by shard).

    Files are the ones its manifest lists, reached through no symlink; a row group over
    ``manifest.MAX_ROW_GROUP_BYTES`` is refused before it is read. Each picture is read where
    its key first appears; a unit is a range of those within one row group.
    """

    def __init__(self, release: Path, limit: int | None = None) -> None:
        from ..export.manifest import load_manifest, pair_schema_problem, release_file

        manifest = load_manifest(release, option="--pairs")
        if manifest.images == "none":
            raise UserError(f"{release} is ID-only; run `spp-curate materialize` first", option="--pairs")
        self.count = manifest.counts.pairs
        self.files: list[Path] = []
        tables, groups = [], []  # groups: (file, group, first global row)
        start = 0
        for entry in manifest.entries("parquet"):
            parquet = checked_shard(release, entry, pair_schema_problem)
            for g in range(parquet.metadata.num_row_groups):
                groups.append((len(self.files), g, start))
                start += parquet.metadata.row_group(g).num_rows
            tables.append(_pair_columns(parquet))
            self.files.append(release_file(release, entry))
        table = keyed_pairs(release, tables, limit)
        self.keys, self.pairs = table.keys, table.pairs
        self.similarity = pair_similarities(tables, limit)
        # Where each cache row's picture is read: the first (row, column) its key appears at.
        _, first = np.unique(table.pairs.reshape(-1), return_index=True)
        starts = np.asarray([s for _, _, s in groups] + [start])
        group_of = np.searchsorted(starts, first // 2, side="right") - 1
        self._units: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []
        for gi in np.unique(group_of):
            where = np.flatnonzero(group_of == gi)
            f, g, s = groups[gi]
            for lo in range(0, len(where), UNIT_IMAGES):
                rows = where[lo: lo + UNIT_IMAGES]  # cache rows, as np.unique sorted codes = cache rows
                self._units.append((f, g, first[rows] // 2 - s, first[rows] % 2, rows))

    def units(self) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        return self._units

    def read_unit(self, unit: tuple[int, int, np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, list]:
        f, g, in_group, column, rows = unit
        group = pq.ParquetFile(self.files[f]).read_row_group(g, columns=["anchor", "positive"])
        cells = [group.column(name).combine_chunks().field("bytes") for name in ("anchor", "positive")]
        return rows, [cells[c][r].as_py() for r, c in zip(in_group, column)]


class PictureReleaseReader:
    """A local release of the ``images`` layout: its pair table's keys, each picture read from its image shard
    (row groups of 100 pictures). Files are the ones its manifest lists, reached through no symlink, each the size
    the manifest says, of the schema the readers expect; a row group over ``MAX_ROW_GROUP_BYTES`` is refused
    before it is read."""

    def __init__(self, release: Path, manifest, limit: int | None = None) -> None:
        from ..export.manifest import image_schema_problem, pair_schema_problem, release_file

        self.count = manifest.counts.pairs
        tables = [_pair_columns(checked_shard(release, entry, lambda schema: pair_schema_problem(
            schema, images=False, digests=False))) for entry in manifest.entries("pairs")]
        table = keyed_pairs(release, tables, limit)
        self.keys, self.pairs = table.keys, table.pairs
        self.similarity = pair_similarities(tables, limit)
        row_of = {k: i for i, k in enumerate(self.keys)}
        self.files: list[Path] = []
        found: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (file, group) -> [(row in group, cache row)]
        for entry in manifest.entries("images"):
            parquet = checked_shard(release, entry, image_schema_problem)
            keys = parquet.read(columns=["key"]).column("key").to_pylist()
            start = 0
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                for j, key in enumerate(keys[start: start + n]):
                    row = row_of.pop(key, None)
                    if row is not None:
                        found.setdefault((len(self.files), g), []).append((j, row))
                start += n
            self.files.append(release_file(release, entry))
        if row_of:
            missing = next(iter(row_of))
            raise UserError(f"{release}: {len(row_of):,} picture(s) named by its pairs are not in its image shards "
                            f"(first: {missing!r}); `spp-curate verify` checks the whole release", option="--pairs")
        self._units = [(f, g, np.asarray([j for j, _ in rows]), np.asarray([r for _, r in rows]))
                       for (f, g), rows in sorted(found.items())]

    def units(self) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        return self._units

    def read_unit(self, unit: tuple[int, int, np.ndarray, np.ndarray]) -> tuple[np.ndarray, list]:
        f, g, in_group, rows = unit
        cells = pq.ParquetFile(self.files[f]).read_row_group(g, columns=["image"]).column("image")
        data = cells.combine_chunks().field("bytes")
        return rows, [data[int(j)].as_py() for j in in_group]


class StreamReader:
    """A streamed release (``hf://org/name``): the pairs are read once, in order, and the pictures kept as
    bytes in units of :data:`UNIT_IMAGES` until decoded (for releases that fit in memory as encoded bytes)."""

    def __init__(self, rows: Iterable[dict[str, Any]]) -> None:
        anchors, positives, blobs, similarity = [], [], {}, []
        for row in rows:
            for name in ("anchor", "positive"):
                key = row[f"{name}_key"]
                if key not in blobs:
                    blobs[key] = (row[name] or {}).get("bytes")
            anchors.append(row["anchor_key"])
            positives.append(row["positive_key"])
            similarity.append(row.get("similarity"))
        table = pair_table(anchors, positives)
        self.keys, self.pairs = table.keys, table.pairs
        self.similarity = finite_similarities(similarity)
        self._blobs = [blobs[k] for k in self.keys]

    def units(self) -> list[tuple[int, int]]:
        return _units(len(self.keys))

    def read_unit(self, unit: tuple[int, int]) -> tuple[range, list]:
        lo, hi = unit
        return range(lo, hi), self._blobs[lo:hi]


def stream_rows(name: str) -> Iterator[dict[str, Any]]:
    """A release's rows through ``datasets`` streaming, images left encoded (the project decodes them)."""
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
        for column in ("anchor", "positive"):
            rows = rows.cast_column(column, datasets.Image(decode=False))
        yield from rows
    except Exception as exc:  # noqa: BLE001 - unreachable hub, missing files
        raise UserError(f"cannot read pairs from {name}: {brief(exc, 200)}",
                        option="--pairs") from None


def release_reader(release: str, limit: int | None = None) -> ReleaseReader | StreamReader:
    """The reader for ``--pairs`` (its first ``limit`` pairs): row ranges of a local release, or one stream
    of ``hf://org/name``."""
    if release.startswith("hf://"):  # fetched at its revision and verified, then read as a local release
        from ..export.hub import fetch_release

        release = str(fetch_release(release))
    path = Path(release)
    if not (path / "manifest.json").is_file():
        raise UserError(f"{release} is not a release (no manifest.json); pass a release directory or "
                        "hf://org/name", option="--pairs")
    from ..export.manifest import load_manifest

    manifest = load_manifest(path, option="--pairs")
    if manifest.layout == "images":
        if manifest.images == "none":
            raise UserError(f"{release} is ID-only; run `spp-curate materialize` first", option="--pairs")
        return PictureReleaseReader(path, manifest, limit)
    return ReleaseReader(path, limit)
