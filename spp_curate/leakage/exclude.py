"""The exclude stage: find build images that are near-copies of reference (evaluation) sets.

Each ``--exclude-near SPEC`` names a reference set the way ``--source`` and
``--root`` do. Its images are indexed (``references/<set>/index.parquet``, the
index stage's own code) and described (``references/<set>/descriptors.npz``,
see :mod:`.copies`); the build's images are described once
(``references/build.npz``). Every build image gets its best copy score over
every set; an image at or above the threshold, or byte-identical to a
reference image, is excluded: the mine stage never makes it an anchor or a
positive.

``exclusion.parquet`` has one row per build image (id, key, reference,
reference_key, similarity, same_digest, excluded) and ``exclusion.json`` the
resolved threshold and what each set is (name, split, count, digest of its
key list) with its counts; the report, the card and the manifest read them.
Each set's folder is reused while its source is unchanged, so a killed run
resumes at the set it was working on and ends with the same files.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import layout
from ..config import Recipe, ReferenceSpec, resolve_threshold
from ..devices import auto_workers
from ..errors import UserError
from ..files import atomic_path, read_json, remove_owned, short_hash, write_json, write_table
from ..images import load_images
from ..progress import stage_progress
from .copies import DRAFT, VERSION, Descriptors, copy_scores, describe

EXCLUSION_SCHEMA = pa.schema([
    ("id", pa.int64()), ("key", pa.string()), ("reference", pa.string()), ("reference_key", pa.string()),
    ("similarity", pa.float32()), ("same_digest", pa.bool_()), ("excluded", pa.bool_()),
])
HIST_BINS = np.linspace(-1.0, 1.0, 401)
DESCRIBE_BATCH = 256
OPTION = "--exclude-near"


class DescribeWork:
    """The exclude stage's unit of work: decode a batch of keys and describe them for copy search."""

    gpus = 0

    def __init__(self, recipe: Recipe, reference: bool, source: Any = None) -> None:
        self.recipe, self.reference, self.source = recipe, reference, source

    def __getstate__(self) -> dict:
        return {"recipe": self.recipe, "reference": self.reference, "source": None}

    def setup(self) -> None:
        if self.source is None:
            from ..curate.sources import open_source

            self.source = open_source(self.recipe)

    def __call__(self, keys: list[str]) -> Descriptors:
        images, _ = load_images(self.source, keys, DRAFT)
        return describe(images, self.reference)


def describe_keys(recipe: Recipe, source: Any, keys: list[str], reference: bool, engine, label: str) -> Descriptors:
    batches = [keys[lo: lo + DESCRIBE_BATCH] for lo in range(0, len(keys), DESCRIBE_BATCH)]
    workers = auto_workers() if recipe.workers is None else recipe.workers
    with stage_progress(label, len(keys)) as (bar, task):
        parts = engine.map(DescribeWork(recipe, reference, source), batches,
                           workers=workers if len(keys) > 4 * DESCRIBE_BATCH else 0,
                           on_result=lambda _, d: bar.update(task, advance=len(d.ok)))
    return Descriptors.concat(parts) if parts else describe([], reference)


def reference_recipe(recipe: Recipe, ref: ReferenceSpec) -> Recipe:
    """The recipe that reads a reference set with the build's own reader settings."""
    return recipe.model_copy(update=dict(source=ref.source, root=ref.root_option, split=ref.split, limit=None,
                                         image_column=None, label_column=None, exclude_near=[]))


def reference_folder(ref: ReferenceSpec) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ref.spec).strip("-")[:40] or "set"
    return f"{slug}-{hashlib.sha256(ref.spec.encode()).hexdigest()[:8]}"


def _unreadable(ref: ReferenceSpec, exc: Exception) -> UserError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"reference set {ref.spec!r} cannot be read: {reason}", option=OPTION)


def _described(record_path: Path, path: Path, record: dict[str, Any], make) -> Descriptors:
    """The descriptors at ``path`` if the record beside them says they were made from the same files;
    else ``make()``'s, saved, and the record written last (a killed run leaves no record, so it redoes them)."""
    try:
        if read_json(record_path) == record:
            return Descriptors.load(path)
    except (OSError, ValueError, KeyError):
        pass
    descriptors = make()
    with atomic_path(path) as tmp:
        descriptors.save(tmp)
    write_json(record_path, record)
    return descriptors


def _open_reference(recipe: Recipe, ref: ReferenceSpec) -> tuple[Recipe, Any, str]:
    """A reference set's recipe, open source and state; a one-line error when it cannot be read."""
    from ..curate.sources import open_source

    ref_recipe = reference_recipe(recipe, ref)
    try:
        source = open_source(ref_recipe)
        return ref_recipe, source, source.state()
    except (UserError, OSError, ValueError) as exc:
        raise _unreadable(ref, exc) from None


def reference_state(recipe: Recipe) -> str | None:
    """A hash of what every reference set holds now (None without any), for the stage fingerprints."""
    if not recipe.references:
        return None
    states = [f"{ref.spec}={_open_reference(recipe, ref)[2]}" for ref in recipe.references]
    return short_hash("\n".join(states))


def prepare_reference(recipe: Recipe, ref: ReferenceSpec, build_dir: Path, engine
                      ) -> tuple[pa.Table, Descriptors, dict[str, Any]]:
    """Index and describe one reference set (or reuse the folder a run before made for the same files)."""
    from ..curate.index import index_source

    folder = build_dir / layout.REFERENCES / reference_folder(ref)
    ref_recipe, source, state = _open_reference(recipe, ref)

    def make() -> Descriptors:
        if folder.exists():
            remove_owned(folder, layout.REFERENCE_FILES, OPTION)
        folder.mkdir(parents=True)
        try:
            index_source(ref_recipe, folder, engine)
        except UserError as exc:
            raise _unreadable(ref, exc) from None
        keys = pq.read_table(folder / layout.INDEX, columns=["key"]).column("key").to_pylist()
        return describe_keys(ref_recipe, source, keys, True, engine, f"exclude: describe {ref.spec}")

    record = {"spec": ref.spec, "state": state, "version": VERSION}
    descriptors = _described(folder / "record.json", folder / "descriptors.npz", record, make)
    index = pq.read_table(folder / layout.INDEX, columns=["key", "digest"])
    keys = index.column("key").to_pylist()
    info = {"name": ref.spec, "source": ref.source, "split": ref.split, "count": len(keys),
            "quarantined": pq.read_metadata(folder / layout.QUARANTINE).num_rows,
            "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(), "folder": folder.name}
    return index, descriptors, info


def build_descriptors(recipe: Recipe, build_dir: Path, keys: list[str], engine) -> Descriptors:
    from ..curate.sources import open_source

    folder = build_dir / layout.REFERENCES
    folder.mkdir(parents=True, exist_ok=True)
    record = {"fingerprint": recipe.fingerprint("index"), "version": VERSION}
    return _described(folder / "build.json", folder / "build.npz", record,
                      lambda: describe_keys(recipe, open_source(recipe), keys, False, engine, "exclude: describe build"))


def exclude_near(recipe: Recipe, build_dir: Path, engine) -> dict[str, int]:
    """Write ``exclusion.parquet`` and ``exclusion.json``; return how many images are excluded."""
    index = pq.read_table(build_dir / layout.INDEX, columns=["id", "key", "digest"])
    ids = index.column("id").to_numpy()
    n = len(ids)
    refs = recipe.references
    best = np.full(n, -1.0, np.float32)
    best_set = np.full(n, -1, np.int64)
    best_key = np.full(n if refs else 0, None, dtype=object)
    same_digest = np.zeros(n, bool)
    per_set: list[tuple[np.ndarray, np.ndarray]] = []
    infos: list[dict[str, Any]] = []
    if refs:
        keys = index.column("key").to_pylist()
        pictures = build_descriptors(recipe, build_dir, keys, engine)
        digests = np.asarray(index.column("digest").to_pylist(), dtype=object)
        for s, ref in enumerate(refs):
            ref_index, ref_desc, info = prepare_reference(recipe, ref, build_dir, engine)
            ref_keys = np.asarray(ref_index.column("key").to_pylist(), dtype=object)
            searched: dict[str, Any] = {}
            scores, rows = copy_scores(pictures, ref_desc, engine, recipe.memory, info=searched)
            info["candidate_search"] = searched
            ref_digests = set(ref_index.column("digest").to_pylist())
            digest_hit = np.fromiter((d in ref_digests for d in digests), bool, n)
            scores = np.where(digest_hit, np.float32(1.0), scores)
            better = scores > best
            best = np.where(better, scores, best)
            best_set = np.where(better, s, best_set)
            best_key = np.where(better, np.where(rows >= 0, ref_keys[np.clip(rows, 0, None)], None), best_key)
            same_digest |= digest_hit
            per_set.append((scores, digest_hit))
            infos.append(info)
    threshold = (resolve_threshold(recipe.exclude_threshold, best[best > -1.0], "--exclude-threshold")
                 if refs else None)
    excluded = (best >= threshold) | same_digest if refs else np.zeros(n, bool)
    for info, (scores, digest_hit) in zip(infos, per_set):
        info["excluded"] = int(((scores >= threshold) | digest_hit).sum())
        info["same_digest"] = int(digest_hit.sum())
    # with no reference set, no Python object per picture: the keys stay the index's column, the rest nulls
    names = np.asarray([r.spec for r in refs] + [None], dtype=object)[best_set] if refs else None
    table = pa.table({
        "id": pa.array(ids, pa.int64()), "key": index.column("key"),
        "reference": pa.array(names.tolist(), pa.string()) if refs else pa.nulls(n, pa.string()),
        "reference_key": pa.array(best_key.tolist(), pa.string()) if refs else pa.nulls(n, pa.string()),
        "similarity": pa.array(best, pa.float32()), "same_digest": pa.array(same_digest, pa.bool_()),
        "excluded": pa.array(excluded, pa.bool_()),
    }, schema=EXCLUSION_SCHEMA)
    scored = best[best > -1.0]
    stats = {
        "method": "copy score (normalised cross-correlation of 24 px grayscale renderings, crops to 86 %)",
        "descriptor_version": VERSION,
        "threshold": threshold, "threshold_given": recipe.exclude_threshold,
        "references": infos, "images": n, "excluded": int(excluded.sum()),
        "hist_bins": HIST_BINS.tolist(), "hist": np.histogram(scored, HIST_BINS)[0].tolist(),
    }
    write_table(build_dir / layout.EXCLUSION, table)
    write_json(build_dir / layout.EXCLUSION_STATS, stats)
    if not refs:
        return {"reference sets": "none given (--exclude-near), nothing excluded"}
    return {"excluded": int(excluded.sum())}


def excluded_ids(build_dir: Path) -> np.ndarray:
    """Ids of the images the exclude stage took out of mining."""
    table = pq.read_table(build_dir / layout.EXCLUSION, columns=["id", "excluded"])
    return table.column("id").to_numpy()[table.column("excluded").to_numpy(zero_copy_only=False)]

