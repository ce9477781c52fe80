"""The index stage: list the source, read and check every file once, write the index and the quarantine.

The pixels are decoded once per build, by the embed stage. Here a whole JPEG is checked from its header
(size, EXIF orientation, end-of-image marker); every other file is decoded to be checked
(:func:`images.check_image`), so a refused file gets the loader's reason. A JPEG broken behind a sound
header is found and quarantined by the embed stage.

``index.parquet`` has one row per usable image (DESIGN.md: id, key, split,
label, label_name, width, height, nbytes, digest, plus the container format);
``quarantine.parquet`` has one row per image that could not be read or
decoded, with the reason. A bad image never stops the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import layout
from ..layout import CLASS_NAMES_META
from ..config import Recipe
from ..devices import auto_workers
from ..errors import UserError
from ..files import sha256_bytes, write_table
from ..progress import stage_progress
from ..images import BadImage, check_image, read_bytes
from .sources import Source, open_source

INDEX_SCHEMA = pa.schema([
    ("id", pa.int64()), ("key", pa.string()), ("split", pa.string()), ("label", pa.int32()),
    ("label_name", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("nbytes", pa.int64()), ("digest", pa.string()), ("format", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string())])


@dataclass
class Probe:
    key: str
    label: int
    width: int = 0
    height: int = 0
    nbytes: int = 0
    digest: str = ""
    format: str = ""
    error: str | None = None


def probe(source: Source, key: str, label: int) -> Probe:
    """Read and check one image; failures become a reason, never an exception."""
    try:
        data = read_bytes(source, key)
        facts = check_image(data)
    except BadImage as exc:
        return Probe(key, label, error=str(exc))
    return Probe(key, label, facts.width, facts.height, len(data), sha256_bytes(data), facts.format)


class ProbeWork:
    """The index stage's unit of work: probe a batch of ``(key, label)`` items."""

    gpus = 0

    def __init__(self, recipe: Recipe, source: Source | None = None) -> None:
        self.recipe, self.source = recipe, source

    def __getstate__(self) -> dict:
        return {"recipe": self.recipe, "source": None}  # a remote worker opens the source itself

    def setup(self) -> None:
        if self.source is None:
            self.source = open_source(self.recipe)

    def __call__(self, batch: list[tuple[str, int]]) -> list[Probe]:
        return [probe(self.source, key, label) for key, label in batch]


PROBE_BATCH = 64


def known_probes(recipe: Recipe, out_dir: Path, previous: list[dict]) -> dict[str, tuple[str, Probe]]:
    """The last index's images by key, with their file identity: ``key -> (stat, probe)``.

    Empty unless the last index (``previous``, its rows) was made by the same recipe (source, root, split,
    limit, columns).
    """
    stats_path = out_dir / layout.INDEX_STATS
    if not (previous and stats_path.is_file()):
        return {}
    stats = pq.read_table(stats_path)
    meta = stats.schema.metadata or {}
    if meta.get(b"spp_curate.recipe") != recipe.fingerprint("index", source_state=False).encode():
        return {}
    stat_of = dict(zip(stats.column("key").to_pylist(), stats.column("stat").to_pylist()))
    return {row["key"]: (stat_of[row["key"]], Probe(row["key"], row["label"], row["width"], row["height"],
                                                     row["nbytes"], row["digest"], row["format"]))
            for row in previous if stat_of.get(row["key"])}


def index_source(recipe: Recipe, out_dir: Path, engine, rehash: bool = False) -> dict[str, int]:
    """Write ``index.parquet`` and ``quarantine.parquet`` under ``out_dir``; return counts.

    An image whose file identity (size, modification time) is what the last index recorded is not
    read again: its row is taken over. Only new and changed files are read, hashed and decoded;
    with ``rehash``, every file (an in-place edit that kept both is then seen by its bytes). An index
    that comes out as it was is not rewritten, so the stages after it stay complete.
    """
    source = open_source(recipe)
    # the listing the source's state was taken from (one walk and one stat a file per command), else one now
    listing = recipe.listing if recipe.listing is not None else source.listing(recipe.limit)
    items = [(key, label) for key, label, _ in listing.rows]
    index_path = out_dir / layout.INDEX
    old_index = pq.read_table(index_path) if index_path.is_file() else None
    previous = old_index.to_pylist() if old_index is not None else []
    known = {} if rehash else known_probes(recipe, out_dir, previous)
    stats = {key: stat for key, _, stat in listing.rows}  # taken before reading: a later edit reads again
    reused: dict[str, Probe] = {}
    for key, label in items:
        seen = known.get(key)
        if seen is not None and stats.get(key) == seen[0]:
            reused[key] = dataclasses.replace(seen[1], label=label)
    todo = [(key, label) for key, label in items if key not in reused]
    workers = auto_workers() if recipe.workers is None else recipe.workers
    batches = [todo[lo: lo + PROBE_BATCH] for lo in range(0, len(todo), PROBE_BATCH)]
    bad = 0
    with stage_progress("index", len(items), quarantine=True) as (bar, task):
        bar.update(task, advance=len(reused))
        def done(_: int, batch: list[Probe]) -> None:
            nonlocal bad
            bad += sum(p.error is not None for p in batch)
            bar.update(task, advance=len(batch), quarantined=bad)

        results = engine.map(ProbeWork(recipe, source), batches, workers=workers if len(todo) > 256 else 0,
                             on_result=done)
    probed = {p.key: p for batch in results for p in batch}
    probes: list[Probe] = [reused.get(key) or probed[key] for key, _ in items]

    # What the listing itself could not use (unreadable folders, symlinks not followed, ...) is quarantined too.
    probes += [Probe(key, -1, error=reason) for key, reason in listing.problems]
    good = [p for p in probes if p.error is None]
    names = source.class_names

    def name_of(label: int) -> str:
        return names[label] if 0 <= label < len(names) else ""

    table = pa.table({
        "id": pa.array(range(len(good)), pa.int64()),
        "key": [p.key for p in good],
        "split": [recipe.split] * len(good),
        "label": pa.array([p.label for p in good], pa.int32()),
        "label_name": [name_of(p.label) for p in good],
        "width": pa.array([p.width for p in good], pa.int32()),
        "height": pa.array([p.height for p in good], pa.int32()),
        "nbytes": pa.array([p.nbytes for p in good], pa.int64()),
        "digest": [p.digest for p in good],
        "format": [p.format for p in good],
    }, schema=INDEX_SCHEMA)
    table = table.replace_schema_metadata({CLASS_NAMES_META: json.dumps(names).encode()})
    quarantine = pa.table({"key": [p.key for p in probes if p.error],
                           "error": [p.error for p in probes if p.error]}, schema=QUARANTINE_SCHEMA)
    old_quarantine = _read_or_none(out_dir / layout.QUARANTINE)
    same_index = old_index is not None and _same(old_index, table)
    if same_index and old_quarantine is not None:
        # the embed stage will not run again: the rows it added (of indexed keys) stay
        indexed = set(table.column("key").to_pylist())
        embed_rows = old_quarantine.filter(
            pa.array([k in indexed for k in old_quarantine.column("key").to_pylist()], pa.bool_()))
        quarantine = pa.concat_tables([quarantine, embed_rows.cast(quarantine.schema)])
    if old_quarantine is None or not _same(old_quarantine, quarantine):
        write_table(out_dir / layout.QUARANTINE, quarantine)
    if not good:
        if recipe.limit == 0:
            raise UserError("0 images asked for; give a positive number or leave it out", option="--limit")
        raise UserError(f"no usable images in {source.describe()}"
                        + (f" ({len(probes)} quarantined; reasons in {out_dir / layout.QUARANTINE})" if probes
                           else ""), option="--source")
    changes = source_changes(previous, table)
    stat_table = pa.table({"key": [p.key for p in good], "stat": [stats.get(p.key) for p in good]},
                          schema=pa.schema([("key", pa.string()), ("stat", pa.string())]))
    stat_table = stat_table.replace_schema_metadata(
        {b"spp_curate.recipe": recipe.fingerprint("index", source_state=False).encode()})
    (out_dir / layout.INDEX_STATS).unlink(missing_ok=True)  # never beside an index it does not describe
    if not same_index:
        write_table(index_path, table)
    write_table(out_dir / layout.INDEX_STATS, stat_table)
    return {"images": len(good), "quarantined": len(probes) - len(good), "read": len(todo), **changes}


def _read_or_none(path: Path) -> pa.Table | None:
    try:
        return pq.read_table(path) if path.is_file() else None
    except (OSError, pa.ArrowException):
        return None  # damaged: written anew


def _same(old: pa.Table, new: pa.Table) -> bool:
    return old.schema.equals(new.schema, check_metadata=True) and old.equals(new)


def source_changes(previous: list[dict], table: pa.Table) -> dict[str, int]:
    """How many images were added, removed, or kept their key with other bytes, since the last index."""
    if not previous:
        return {}
    changes = key_changes({row["key"]: row["digest"] for row in previous},
                          dict(zip(table.column("key").to_pylist(), table.column("digest").to_pylist())))
    return {kind: len(keys) for kind, keys in changes.items()}


def key_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """Keys added, removed, and kept with another digest, from one ``key -> digest`` map to another (sorted)."""
    return {"added": sorted(after.keys() - before.keys()), "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(k for k in before.keys() & after.keys() if before[k] != after[k])}
