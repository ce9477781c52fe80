"""Release versions: each export names its parent release and says what changed since it.

A release written where another stands becomes its next version: the manifest
carries ``version``, the parent's version and the sha256 of the parent's
``manifest.json``, and a changelog: pairs added and removed (a pair is its two
images, each by key and digest, in either order), and the source images
added, removed and changed (key kept, bytes changed) since the parent. The
image part compares the build's index with the snapshot the build kept at its
last export (``DIR/released-index.parquet``); it is only given when that
snapshot is the parent's (its digest is in the parent's manifest). The image
keys are written to the release's ``changelog.parquet`` (listed in the
manifest with its sha256); the manifest holds their counts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import layout
from ..curate.index import key_changes
from ..errors import UserError
from ..files import sha256_bytes, sha256_file
from ..review.store import pair_key
from .manifest import Manifest, load_manifest, release_file

PAIR_KEY_COLUMNS = ["anchor_key", "positive_key", "anchor_digest", "positive_digest"]


def pair_identity(pairs: pd.DataFrame) -> np.ndarray:
    """One string per pair: its two images (key and digest), in either order."""
    return pair_key(pairs.anchor_key.astype(str) + "@" + pairs.anchor_digest.astype(str),
                    pairs.positive_key.astype(str) + "@" + pairs.positive_digest.astype(str))


def index_digest(images: pd.DataFrame) -> str:
    """sha256 of an index's sorted ``key digest`` lines: what the source held when the release was made.

    In Arrow: the rows are sorted as their lines would sort as UTF-8 bytes (the order of their code points, as
    Python sorts them), then joined and hashed a slice at a time, so neither a Python string per image nor the
    whole column of lines is held. Sorting by ``(key, digest)`` is that order unless a key holds a character
    at or below the tab that joins them; such an index is sorted by its joined lines instead."""
    import pyarrow.compute as pc

    def column(name: str, kind: pa.DataType | None = None) -> pa.ChunkedArray:
        values = pa.array(images[name], from_pandas=True)  # no copy of an Arrow-backed column
        kind = kind or (values.type if pa.types.is_large_string(values.type) else pa.string())
        return pa.chunked_array([values if values.type == kind else values.cast(kind)])

    key = column("key")
    digest, tab = column("digest", key.type), pa.scalar("\t", key.type)
    if len(key) and pc.any(pc.match_substring_regex(key, "[\\x00-\\x09]")).as_py():
        order = pc.sort_indices(pc.binary_join_element_wise(key.cast(pa.large_string()),
                                                            digest.cast(pa.large_string()), tab.cast(pa.large_string())))
    else:
        order = pc.sort_indices(pa.table({"key": key, "digest": digest}),
                                sort_keys=[("key", "ascending"), ("digest", "ascending")])
    hashed = hashlib.sha256()
    for lo in range(0, len(key), 65_536):
        at = order[lo: lo + 65_536]
        part = pc.binary_join_element_wise(key.take(at), digest.take(at), tab).to_pylist()
        hashed.update((("\n" if lo else "") + "\n".join(part)).encode())
    del order
    pa.default_memory_pool().release_unused()
    return hashed.hexdigest()


def image_changes(old: pd.DataFrame, new: pd.DataFrame) -> dict[str, list[str]]:
    """Keys added, removed, and kept with other bytes, between two ``key, digest`` tables (sorted lists)."""
    return key_changes(dict(zip(old.key, old.digest)), dict(zip(new.key, new.digest)))


def pair_changes(old: pd.DataFrame, new: pd.DataFrame) -> dict[str, int]:
    before, after = set(pair_identity(old)), set(pair_identity(new))
    return {"added": len(after - before), "removed": len(before - after), "kept": len(after & before)}


def release_pairs(release: Path, manifest: Manifest) -> pd.DataFrame:
    """The pairs of a (verified) release: keys and digests of both images, from its Parquet shards."""
    from .pictures import pair_rows

    return pair_rows(release, manifest, PAIR_KEY_COLUMNS)


def shipped_pairs(release: Path, manifest: Manifest, batch_size: int = 256) -> pd.DataFrame:
    """Like :func:`release_pairs`, but each digest is the sha256 of the picture the release ships (read a row
    group at a time), not the digest column, which is only what the release claims. An ID-only release ships
    no pictures: its digest column is all there is."""
    if manifest.images == "none":
        return release_pairs(release, manifest)
    if manifest.layout == "images":
        from .pictures import iter_pictures

        shipped: dict[str, str] = {}
        for keys, _, blobs in iter_pictures(release, manifest, batch_size):
            shipped.update(zip(keys, (sha256_bytes(b or b"") for b in blobs)))
        pairs = release_pairs(release, manifest)
        for side in ("anchor", "positive"):  # a key the release does not ship: the digest of no bytes
            pairs[f"{side}_digest"] = [shipped.get(k, sha256_bytes(b"")) for k in pairs[f"{side}_key"]]
        return pairs
    parts = []
    for entry in manifest.entries("parquet"):
        shard = pq.ParquetFile(release_file(release, entry))
        for batch in shard.iter_batches(batch_size=batch_size, columns=["anchor_key", "positive_key", "anchor",
                                                                        "positive"]):
            rows = batch.to_pydict()
            parts.append(pd.DataFrame({
                "anchor_key": rows["anchor_key"], "positive_key": rows["positive_key"],
                **{f"{side}_digest": [sha256_bytes((cell or {}).get("bytes") or b"") for cell in rows[side]]
                   for side in ("anchor", "positive")}}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PAIR_KEY_COLUMNS)


def parent_of(final: Path) -> tuple[Manifest, str] | None:
    """The release standing at ``final`` and its manifest's sha256, if there is a usable one."""
    try:
        manifest = load_manifest(final)
    except UserError:
        return None
    return manifest, sha256_file(final / layout.MANIFEST)


def version_block(final: Path, pairs: pd.DataFrame, images: pd.DataFrame | None,
                  snapshot: Callable[[], pd.DataFrame | None]) -> dict[str, Any]:
    """The manifest's ``version``, ``parent`` and ``changelog`` for a release about to replace ``final``.

    ``images`` is the build's index (key, digest) now; ``snapshot`` reads the one kept at the last export (or
    None), called only when there is a parent to compare with.
    """
    block: dict[str, Any] = {"version": 1, "parent": None, "changelog": None,
                             "index_sha256": index_digest(images) if images is not None else None}
    parent = parent_of(final)
    if parent is None:
        return block
    manifest, digest = parent
    extra = manifest.model_extra or {}
    given = extra.get("version")
    version = given if isinstance(given, int) and not isinstance(given, bool) and given >= 1 else 1
    block["version"] = version + 1
    block["parent"] = {"version": version, "manifest_sha256": digest}
    try:
        old_pairs = release_pairs(final, manifest)
    except (OSError, ValueError, pa.ArrowException):
        old_pairs = None  # a damaged parent: its pairs cannot be compared
    changelog: dict[str, Any] = {"pairs": None if old_pairs is None else pair_changes(old_pairs, pairs),
                                 "images": None}
    kept = snapshot() if images is not None and isinstance(extra.get("index_sha256"), str) else None
    if kept is not None and index_digest(kept) == extra["index_sha256"]:
        changelog["images"] = image_changes(kept, images)
    block["changelog"] = changelog
    return block


CHANGE_KINDS = ("added", "removed", "changed")


def write_changelog(release: Path, changes: dict[str, list[str]]) -> dict[str, Any]:
    """``changelog.parquet`` (``key``, ``change``) of the staged release; returns the manifest's entry for it
    and the counts the manifest keeps in its place."""
    from ..files import write_table
    from .manifest import file_entry

    keys = [k for kind in CHANGE_KINDS for k in changes[kind]]
    kinds = [kind for kind in CHANGE_KINDS for _ in changes[kind]]
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "change": pa.array(kinds, pa.dictionary(pa.int8(), pa.string()))})
    write_table(release / layout.CHANGELOG, table)
    return file_entry(release, release / layout.CHANGELOG, "changelog", len(keys))


def read_changelog(release: Path, manifest: Manifest | None = None) -> dict[str, list[str]] | None:
    """The source images added, removed and changed that a release's changelog lists (None without one)."""
    manifest = manifest or load_manifest(release)
    entries = manifest.entries("changelog")
    if not entries:
        images = ((manifest.model_extra or {}).get("changelog") or {}).get("images")
        return images if isinstance(images, dict) and isinstance(images.get("added"), list) else None
    table = pq.read_table(release_file(release, entries[0]), columns=["key", "change"])
    keys, kinds = table.column("key").to_pylist(), table.column("change").cast(pa.string()).to_pylist()
    out: dict[str, list[str]] = {kind: [] for kind in CHANGE_KINDS}
    for key, kind in zip(keys, kinds):
        if kind in out:
            out[kind].append(key)
    return out


def diff_releases(old: Path, new: Path) -> dict[str, Any]:
    """What changed from release ``old`` to release ``new`` (both verified first): versions, whether ``new``
    descends from ``old``, pairs added/removed/kept, and the images of the pairs added, removed, changed.

    Pictures are compared by the sha256 of the bytes each release ships (``by``: ``"bytes"``), so a picture
    swapped under a kept key and digest column shows as changed; ID-only releases by their digest column. A
    key that ships two different pictures in one release is listed under ``"conflicting"``."""
    from .manifest import verified_files

    manifests = []
    for release in (old, new):
        verified_files(release)  # every file checked against its manifest, or a one-line error
        manifests.append(load_manifest(release))
    old_pairs, new_pairs = shipped_pairs(old, manifests[0]), shipped_pairs(new, manifests[1])

    def both_sides(pairs: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([pairs[["anchor_key", "anchor_digest"]].set_axis(["key", "digest"], axis=1),
                          pairs[["positive_key", "positive_digest"]].set_axis(["key", "digest"], axis=1)])

    def images(pairs: pd.DataFrame) -> pd.DataFrame:
        return both_sides(pairs).drop_duplicates("key")

    def conflicting(pairs: pd.DataFrame) -> list[str]:
        counts = both_sides(pairs).drop_duplicates().key.value_counts()
        return sorted(counts.index[counts > 1].astype(str))

    parent = (manifests[1].model_extra or {}).get("parent") or {}
    return {
        "versions": [(m.model_extra or {}).get("version") for m in manifests],
        "descends": parent.get("manifest_sha256") == sha256_file(old / "manifest.json"),
        "pairs": pair_changes(old_pairs, new_pairs),
        "images_in_pairs": image_changes(images(old_pairs), images(new_pairs)),
        "changelog": {**((manifests[1].model_extra or {}).get("changelog") or {}),
                      "images": read_changelog(new, manifests[1])},
        "by": "bytes" if all(m.images != "none" for m in manifests) else "digest column",
        "conflicting": [conflicting(old_pairs), conflicting(new_pairs)],
    }
