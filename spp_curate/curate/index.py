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


#: What the index stage learns of each file it reads, as the columns a unit of work returns.
PROBED_SCHEMA = pa.schema([("width", pa.int32()), ("height", pa.int32()), ("nbytes", pa.int64()),
                           ("digest", pa.string()), ("format", pa.string()), ("error", pa.string())])


class ProbeWork:
    """The index stage's unit of work: probe a block of keys (an Arrow array) and return what it found as
    columns (:data:`PROBED_SCHEMA`), so no stage holds a Python object per image."""

    gpus = 0

    def __init__(self, recipe: Recipe, source: Source | None = None) -> None:
        self.recipe, self.source = recipe, source

    def __getstate__(self) -> dict:
        return {"recipe": self.recipe, "source": None}  # a remote worker opens the source itself

    def setup(self) -> None:
        if self.source is None:
            self.source = open_source(self.recipe)

    def __call__(self, keys: pa.Array) -> pa.RecordBatch:
        probes = [probe(self.source, key, -1) for key in keys.to_pylist()]
        return pa.RecordBatch.from_arrays(
            [pa.array([getattr(p, f.name) for p in probes], f.type) for f in PROBED_SCHEMA], schema=PROBED_SCHEMA)


PROBE_BATCH = 256


def _reusable(recipe: Recipe, out_dir: Path, old_index: pa.Table | None, listing) -> tuple:
    """Which listed images the last index holds with the file identity they have now: ``(mask, rows)``, the
    listing's rows that need no reading and their rows in ``old_index``. None unless the last index was made
    by the same recipe (source, root, split, limit, columns)."""
    import numpy as np
    import pyarrow.compute as pc

    stats_path = out_dir / layout.INDEX_STATS
    if old_index is None or not stats_path.is_file():
        return None
    stats = pq.read_table(stats_path)
    meta = stats.schema.metadata or {}
    if meta.get(b"spp_curate.recipe") != recipe.fingerprint("index", source_state=False).encode():
        return None
    at = pc.index_in(listing.keys, value_set=stats.column("key")).fill_null(-1).to_numpy(zero_copy_only=False)
    found = at >= 0
    at = np.where(found, at, 0)
    same = pc.equal(stats.column("stat").take(pa.array(at)), listing.stats).fill_null(False)
    same = same.to_numpy(zero_copy_only=False) & found
    rows = pc.index_in(stats.column("key").take(pa.array(at[same])), value_set=old_index.column("key"))
    rows = rows.fill_null(-1).to_numpy(zero_copy_only=False)
    mask = np.zeros(len(listing), bool)
    mask[np.flatnonzero(same)[rows >= 0]] = True
    return mask, rows[rows >= 0].astype(np.int64)


def index_source(recipe: Recipe, out_dir: Path, engine, rehash: bool = False) -> dict[str, int]:
    """Write ``index.parquet`` and ``quarantine.parquet`` under ``out_dir``; return counts.

    An image whose file identity (size, modification time) is what the last index recorded is not
    read again: its row is taken over. Only new and changed files are read, hashed and decoded;
    with ``rehash``, every file (an in-place edit that kept both is then seen by its bytes). An index
    that comes out as it was is not rewritten, so the stages after it stay complete. Everything per image is
    held in Arrow and numpy columns: no Python object per image (a few hundred bytes an image at most).
    """
    import numpy as np

    source = open_source(recipe)
    # the listing the source's state was taken from (one walk and one stat a file per command), else one now
    listing = recipe.listing if recipe.listing is not None else source.listing(recipe.limit)
    n = len(listing)
    index_path = out_dir / layout.INDEX
    old_index = _read_or_none(index_path)
    reuse = None if rehash else _reusable(recipe, out_dir, old_index, listing)
    reused = reuse[0] if reuse is not None else np.zeros(n, bool)
    todo = np.flatnonzero(~reused)
    workers = auto_workers() if recipe.workers is None else recipe.workers
    batches = [listing.keys.take(pa.array(todo[lo: lo + PROBE_BATCH])) for lo in range(0, len(todo), PROBE_BATCH)]
    bad = 0
    with stage_progress("index", n, quarantine=True) as (bar, task):
        bar.update(task, advance=int(reused.sum()))

        def done(_: int, batch: pa.RecordBatch) -> None:
            nonlocal bad
            bad += batch.num_rows - batch.column("error").null_count
            bar.update(task, advance=batch.num_rows, quarantined=bad)

        results = engine.map(ProbeWork(recipe, source), batches, workers=workers if len(todo) > 256 else 0,
                             on_result=done)
    del batches
    probed = pa.Table.from_batches(results, schema=PROBED_SCHEMA)
    del results
    # every listed image's columns: the old index's rows where reused, what was read otherwise
    if reuse is not None and reused.any():
        kept = old_index.select(["width", "height", "nbytes", "digest", "format"]).take(pa.array(reuse[1]))
        kept = kept.append_column("error", pa.nulls(len(kept), pa.string())).cast(PROBED_SCHEMA)
        both = pa.concat_tables([kept, probed]).combine_chunks()
        where = np.empty(n, np.int64)
        where[np.flatnonzero(reused)] = np.arange(len(kept))
        where[todo] = len(kept) + np.arange(len(todo))
        columns = both.take(pa.array(where))
        del both, kept
    else:
        columns = probed
    del probed
    good = np.flatnonzero(columns.column("error").is_null().to_numpy(zero_copy_only=False))
    good_rows = pa.array(good)

    def pick(column):  # the good rows (all of them, most often: no copy then)
        return column if len(good) == len(column) else column.take(good_rows)

    names = source.class_names
    labels = listing.labels[good]
    name_of = pa.array(list(names) + [""], pa.string())
    table = pa.table({
        "id": pa.array(np.arange(len(good), dtype=np.int64)),
        "key": pick(listing.keys),
        "split": pa.repeat(pa.scalar(recipe.split, pa.string()), len(good)),
        "label": pa.array(labels, pa.int32()),
        "label_name": name_of.take(pa.array(np.where((labels >= 0) & (labels < len(names)), labels, len(names)))),
        "width": pick(columns.column("width")),
        "height": pick(columns.column("height")),
        "nbytes": pick(columns.column("nbytes")),
        "digest": pick(columns.column("digest")),
        "format": pick(columns.column("format")),
    }, schema=INDEX_SCHEMA)
    table = table.replace_schema_metadata({CLASS_NAMES_META: json.dumps(names).encode()})
    # What the listing itself could not use (unreadable folders, symlinks not followed, ...) is quarantined too.
    refused = np.flatnonzero(~columns.column("error").is_null().to_numpy(zero_copy_only=False))
    quarantine = pa.table({
        "key": pa.concat_arrays([listing.keys.take(pa.array(refused)),
                                 pa.array([k for k, _ in listing.problems], pa.string())]),
        "error": pa.concat_arrays([columns.column("error").take(pa.array(refused)).combine_chunks(),
                                   pa.array([r for _, r in listing.problems], pa.string())])},
        schema=QUARANTINE_SCHEMA)
    quarantined = len(quarantine)
    old_quarantine = _read_or_none(out_dir / layout.QUARANTINE)
    same_index = old_index is not None and _same(old_index, table)
    if same_index and old_quarantine is not None:
        # the embed stage will not run again: the rows it added (of indexed keys) stay
        import pyarrow.compute as pc

        embed_rows = old_quarantine.filter(pc.is_in(old_quarantine.column("key"), value_set=table.column("key")))
        quarantine = pa.concat_tables([quarantine, embed_rows.cast(quarantine.schema)])
    if old_quarantine is None or not _same(old_quarantine, quarantine):
        write_table(out_dir / layout.QUARANTINE, quarantine)
    if not len(good):
        if recipe.limit == 0:
            raise UserError("0 images asked for; give a positive number or leave it out", option="--limit")
        raise UserError(f"no usable images in {source.describe()}"
                        + (f" ({quarantined} quarantined; reasons in {out_dir / layout.QUARANTINE})" if quarantined
                           else ""), option="--source")
    changes = source_changes(old_index, table)
    stat_table = pa.table({"key": table.column("key"), "stat": pick(listing.stats)},
                          schema=pa.schema([("key", pa.string()), ("stat", pa.string())]))
    stat_table = stat_table.replace_schema_metadata(
        {b"spp_curate.recipe": recipe.fingerprint("index", source_state=False).encode()})
    (out_dir / layout.INDEX_STATS).unlink(missing_ok=True)  # never beside an index it does not describe
    if not same_index:
        write_table(index_path, table)
    write_table(out_dir / layout.INDEX_STATS, stat_table)
    if listing.folders:
        save_listing(out_dir, recipe, listing)
    return {"images": len(good), "quarantined": quarantined, "read": int(len(todo)), **changes}


#: The version of ``listing.parquet``'s layout; a listing of another version is walked again.
LISTING_VERSION = 1


def save_listing(out_dir: Path, recipe: Recipe, listing) -> None:
    """Keep the listing the index read, with every folder's identity, for ``build --trust-listing``."""
    table = pa.table({
        "key": pa.concat_arrays([listing.keys, pa.array([k for k, _ in listing.problems], pa.string())]),
        "label": pa.concat_arrays([pa.array(listing.labels, pa.int32()),
                                   pa.array([-1] * len(listing.problems), pa.int32())]),
        "stat": pa.concat_arrays([listing.stats, pa.nulls(len(listing.problems), pa.string())]),
        "problem": pa.concat_arrays([pa.nulls(len(listing), pa.string()),
                                     pa.array([r for _, r in listing.problems], pa.string())]),
    })
    meta = {"version": LISTING_VERSION, "source": list(recipe.listing_identity()), "folders": listing.folders}
    write_table(out_dir / layout.LISTING, table.replace_schema_metadata({b"spp_curate.listing": json.dumps(meta)}))


def trusted_listing(out_dir: Path, recipe: Recipe, source: Source):
    """The last index's listing when no folder it walked changed since (each folder's identity, taken before
    it was read, is the same now): ``(listing, None)``, else ``(None, why)``. What changes no folder (a file
    edited in place) is not seen: that is the trust. Nothing is stat'ed per file."""
    import pyarrow.compute as pc

    from .sources.base import Listing

    path = out_dir / layout.LISTING
    if not path.is_file() or path.is_symlink():
        return None, "no listing kept by an earlier build"
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"spp_curate.listing", b"{}"))
    except (OSError, ValueError, pa.ArrowException):
        return None, "the kept listing is damaged"
    if meta.get("version") != LISTING_VERSION or meta.get("source") != list(recipe.listing_identity()):
        return None, "the kept listing is of another source, split or --limit"
    base = getattr(source, "listing_base", None)
    folders = meta.get("folders") or []
    if base is None or not folders:
        return None, "this source keeps no listing"
    from ..files import UnsafePath, check_relative
    from .sources.folder import identity_of

    try:
        for rel, identity in folders:
            if identity_of(base if rel == "." else base / check_relative(rel)) != identity:
                return None, f"{rel} changed since the last listing"
        problem = table.column("problem")
        rows = table.filter(problem.is_null())
        odd = table.filter(pc.invert(problem.is_null()))
        return Listing(rows.column("key").combine_chunks(), rows.column("label").to_numpy(),
                       rows.column("stat").combine_chunks(),
                       list(zip(odd.column("key").to_pylist(), odd.column("problem").to_pylist())),
                       [tuple(f) for f in folders]), None
    except UnsafePath:
        return None, "the kept listing names a folder outside the source"
    except (TypeError, ValueError, KeyError, pa.ArrowException):
        return None, "the kept listing is damaged"


def _read_or_none(path: Path) -> pa.Table | None:
    try:
        return pq.read_table(path) if path.is_file() else None
    except (OSError, pa.ArrowException):
        return None  # damaged: written anew


def _same(old: pa.Table, new: pa.Table) -> bool:
    return old.schema.equals(new.schema, check_metadata=True) and old.equals(new)


def source_changes(old: pa.Table | None, table: pa.Table) -> dict[str, int]:
    """How many images were added, removed, or kept their key with other bytes, since the last index."""
    import pyarrow.compute as pc

    if old is None or not len(old):
        return {}
    at = pc.index_in(table.column("key"), value_set=old.column("key"))
    kept = pc.invert(at.is_null())
    added = len(table) - pc.sum(kept).as_py() if len(table) else 0
    matched = table.filter(kept)
    old_digest = old.column("digest").take(pc.drop_null(at))
    changed = pc.sum(pc.not_equal(matched.column("digest"), old_digest)).as_py() or 0
    return {"added": int(added), "removed": int(len(old) - len(matched)), "changed": int(changed)}


def key_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """Keys added, removed, and kept with another digest, from one ``key -> digest`` map to another (sorted)."""
    return {"added": sorted(after.keys() - before.keys()), "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(k for k in before.keys() & after.keys() if before[k] != after[k])}
