"""The export stage: pairs + the source's images -> ``release/``.

Pairs are cut into ``S`` shards of about ``shard_size`` bytes, planned before
any is written so names carry ``-of-S``. Shard ``i`` holds the same pairs in
its Parquet file and its tar. A release is written into a staging folder beside
its final place (``.release.partial``), each shard under a temporary name
renamed when complete; a rerun after a kill skips the shards already in place.
When the card and ``manifest.json`` (always last) are written, the staging
folder is swapped in, so the previous release stays whole until the new one is.

With ``images="none"`` the release is ID-only: Parquet shards of keys,
digests, labels and similarities, no pixels, for sources whose images may not
be redistributed; ``spp-curate materialize`` turns it back into a full release
from the user's own copy of the source.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import layout
from ..config import Recipe, library_versions
from ..layout import read_class_names
from ..curate.sources import Source, open_source
from ..errors import UserError
from ..files import atomic_path, read_json, recover_swap, refuse_foreign, remove_owned, remove_stale_temps, \
    sha256_bytes, swap_in, write_json, write_table
from ..review.store import apply_reviews, read_reviews
from ..progress import shard_counter, stage_progress
from .card import may_redistribute, render_card
from .croissant import croissant
from .encoding import EXT_OF_FORMAT, encoded_image, release_format  # noqa: F401 - their home before
from .manifest import SCHEMA_VERSION, file_entry
from .versions import CHANGE_KINDS, index_digest, version_block, write_changelog
from .parquet import PairParquetWriter, id_features, pair_features
from .pictures import write_images_layout
from .samples import PairSample
from .webdataset import PairTarWriter, load_webdataset

# A pair in a tar costs three 512-byte headers, padding of the two images to
# 512 bytes (256 on average each) and a small JSON padded to 512: for small
# images (Fashion-MNIST's are ~300 bytes) this dominates the shard size.
TAR_BYTES_PER_PAIR = 3 * 512 + 2 * 256 + 512
ID_ONLY_BYTES_PER_PAIR = 256


@dataclass
class ReleaseInput:
    """Everything a release is written from, whether from a build directory or an ID-only release."""

    recipe: Recipe
    pairs: pd.DataFrame  # PAIR_COLUMNS
    images: pd.DataFrame  # indexed by key: format, nbytes
    class_names: list[str]
    counts: dict[str, int]  # images, quarantined
    metrics: dict[str, Any] | None = None
    figure: Path | None = None
    #: What the review page's decisions did to the pairs (``review.store.apply_reviews``), when there are any.
    review: dict[str, Any] | None = None
    #: The build's index (key, digest) and where the build keeps its snapshot at each export (versions.py).
    index_keys: pd.DataFrame | None = None
    snapshot: Path | None = None
    #: The precision of each similarity band of the released pairs (reviewed sample, else labels), which
    #: ``train --partner-trust similarity`` weights each pair by; None when neither knows it.
    pair_trust: dict[str, Any] | None = None


#: At most this many pairs in a shard, whatever their bytes: shards are written one process each, so a
#: release of small pictures (60,000 Fashion-MNIST pairs fit one 500 MB shard) still uses the cores.
MAX_PAIRS_PER_SHARD = 10_000


def plan_shards(pair_bytes: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """Split pair positions into contiguous shards of about ``shard_size`` bytes and at most
    ``MAX_PAIRS_PER_SHARD`` pairs each (a function of the pairs alone, never of the machine)."""
    n_shards = max(1, int(np.ceil(pair_bytes.sum() / shard_size)), -(-len(pair_bytes) // MAX_PAIRS_PER_SHARD))
    n_shards = min(n_shards, max(1, len(pair_bytes)))
    return np.array_split(np.arange(len(pair_bytes)), n_shards)


def write_shard(recipe: Recipe, source: Source | None, rows: pd.DataFrame, formats: pd.Series, target: str,
                ext: str, features, row_group_rows: int, pq_path: Path, tar_path: Path | None,
                on_pair=None) -> int:
    """Write one shard's Parquet file (and tar, unless ID-only) for ``rows``; each file renamed into place."""
    writers: list = [PairParquetWriter(pq_path, features, row_group_rows)]
    if tar_path is not None:
        writers.append(PairTarWriter(tar_path, ext))
    try:
        return _write_rows(recipe, source, rows, formats, target, writers, tar_path is not None, on_pair)
    except BaseException:
        for w in writers:
            w.abort()
        raise


def _write_rows(recipe: Recipe, source: Source | None, rows: pd.DataFrame, formats: pd.Series, target: str,
                writers: list, pictures: bool, on_pair=None) -> int:
    for row in rows.itertuples(index=False):
        anchor = positive = b""
        if pictures:
            anchor = encoded_image(source, row.anchor_key, row.anchor_digest, formats[row.anchor_key], target,
                                   recipe.max_side)
            positive = encoded_image(source, row.positive_key, row.positive_digest, formats[row.positive_key], target,
                                     recipe.max_side)
        sample = PairSample(
            pair_id=int(row.pair_id), anchor=anchor, positive=positive,
            anchor_key=row.anchor_key, positive_key=row.positive_key, anchor_digest=row.anchor_digest,
            positive_digest=row.positive_digest, label=int(row.label), label_name=str(row.label_name),
            similarity=float(row.similarity))
        for w in writers:
            w.write(sample)
        if on_pair:
            on_pair()
    return min(w.close() for w in writers)


class ShardWork:
    """The export stage's unit of work: write one shard (its Parquet file and tar) from a slice of pairs."""

    gpus = 0

    def __init__(self, recipe: Recipe, source: Source | None, formats: pd.Series, target: str, ext: str, features,
                 row_group_rows: int, on_pair=None) -> None:
        self.recipe, self.source, self.formats, self.target, self.ext = recipe, source, formats, target, ext
        self.features, self.row_group_rows, self.on_pair = features, row_group_rows, on_pair

    def __getstate__(self) -> dict:
        return {**self.__dict__, "source": None, "on_pair": None}  # a remote worker opens the source itself

    def setup(self) -> None:
        if self.source is None and self.recipe.images != "none":
            self.source = open_source(self.recipe)

    def __call__(self, shard: tuple[pd.DataFrame, Path, Path | None]) -> int:
        rows, pq_path, tar_path = shard
        written = write_shard(self.recipe, self.source, rows, self.formats, self.target, self.ext, self.features,
                              self.row_group_rows, pq_path, tar_path, on_pair=self.on_pair)
        if written != len(rows):
            raise RuntimeError(f"{pq_path.name}: wrote {written} rows of {len(rows)}")
        return written


#: The columns of the build's index and pairs tables that a release is made from.
INDEX_COLUMNS = ("id", "key", "digest", "format", "nbytes", "label", "label_name")
PAIR_COLUMNS = ("pair_id", "anchor_id", "positive_id", "label", "label_name", "similarity", "positive_label")


def arrow_strings(kind: pa.DataType):
    """pandas columns of strings kept in Arrow (``to_pandas(types_mapper=...)``), not a Python object a value;
    dictionary columns too (a pair's key is a position into the index's keys)."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind):
        return pd.ArrowDtype(kind)
    return None


def from_build(recipe: Recipe, build_dir: Path) -> ReleaseInput:
    """Gather a build directory's pairs, image facts, metrics and figure.

    Columnar: only the columns a release states are read, and each pair's keys and digests are positions into
    the index's own key and digest columns (Arrow dictionary columns: 4 bytes a value, no string copied per
    pair, no Python string per row)."""
    # one chunk a column: the pairs' dictionaries below and the index frame share these buffers, no copy
    index_t = pq.read_table(build_dir / layout.INDEX, columns=list(INDEX_COLUMNS)).combine_chunks()
    pa.default_memory_pool().release_unused()
    # a class name a pair is a position into the names too (a few dozen names, millions of pairs)
    pairs_t = pq.read_table(build_dir / layout.PAIRS, columns=list(PAIR_COLUMNS), read_dictionary=["label_name"])
    ids = index_t.column("id").to_numpy()
    order = np.argsort(ids, kind="stable")

    def positions(column: pa.ChunkedArray) -> pa.Array:
        wanted = column.to_numpy()
        at = order[np.clip(np.searchsorted(ids, wanted, sorter=order), 0, max(len(ids) - 1, 0))]
        if len(wanted) and not (ids[at] == wanted).all():
            raise UserError(f"{build_dir / layout.PAIRS} names images the index does not hold; build again with "
                            "--force", option="--out")
        return pa.array(at.astype(np.int32))

    a, p = positions(pairs_t.column("anchor_id")), positions(pairs_t.column("positive_id"))
    keys, digests = (c.chunk(0) if c.num_chunks == 1 else c.combine_chunks()
                     for c in (index_t.column("key"), index_t.column("digest")))

    def by_position(at: pa.Array, values: pa.Array) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(at, values)

    table = pa.table({
        "pair_id": pairs_t.column("pair_id"), "anchor_key": by_position(a, keys),
        "positive_key": by_position(p, keys), "anchor_digest": by_position(a, digests),
        "positive_digest": by_position(p, digests), "label": pairs_t.column("label"),
        "label_name": pairs_t.column("label_name"), "similarity": pairs_t.column("similarity")}).to_pandas(
        types_mapper=arrow_strings)
    pairs = pairs_t.select(["pair_id", "label", "positive_label"]).to_pandas()
    index = index_t.to_pandas(types_mapper=arrow_strings)
    del index_t, pairs_t
    pa.default_memory_pool().release_unused()  # what reading and decoding the tables left behind
    table, review, expected = reviewed_pairs(recipe, build_dir, table, pairs)
    metrics_path = build_dir / layout.METRICS
    grid = build_dir / layout.REPORT / layout.STRONGEST_GRID
    return ReleaseInput(
        recipe=recipe, pairs=table, images=index.set_index("key")[["format", "nbytes", "label", "label_name"]],
        class_names=read_class_names(build_dir / layout.INDEX),
        counts={"images": len(index), "quarantined": pq.read_metadata(build_dir / layout.QUARANTINE).num_rows},
        metrics=read_json(metrics_path) if metrics_path.exists() else None,
        figure=grid if grid.exists() else None, review=review,
        index_keys=index[["key", "digest"]].reset_index(drop=True), snapshot=build_dir / layout.RELEASED_INDEX,
        pair_trust=band_trust(table, pairs, expected))


def band_trust(table: pd.DataFrame, pairs: pd.DataFrame, expected: np.ndarray | None) -> dict[str, Any] | None:
    """The released pairs' precision by similarity band (bands cut on the released pairs' similarities): from
    the reviews when they give one (``expected``: each released pair's chance of being right), else from the
    labels of the pairs ``table`` holds (both labels known)."""
    from ..review.estimate import bands_from_expected, bands_from_labels

    if expected is not None:
        return bands_from_expected(table.similarity.to_numpy(dtype=np.float64), expected)
    same = len(table) == len(pairs) and np.array_equal(table.pair_id.to_numpy(), pairs.pair_id.to_numpy())
    rows = pairs if same else pairs.set_index("pair_id").loc[table.pair_id]  # every pair kept: no lookup
    labelled = ((rows.label >= 0) & (rows.positive_label >= 0)).to_numpy()
    return bands_from_labels(table.similarity.to_numpy(dtype=np.float64),
                             (rows.label == rows.positive_label).to_numpy(), labelled)


def reviewed_pairs(recipe: Recipe, build_dir: Path, table: pd.DataFrame, pairs: pd.DataFrame
                   ) -> tuple[pd.DataFrame, dict[str, Any] | None, np.ndarray | None]:
    """The pairs ``recipe.reviewed`` keeps, the review's summary (None when nobody reviewed and all are kept),
    and each kept pair's chance of being right as the reviews tell it (None where they tell nothing).

    The random sample's estimate describes the *mined* pairs; a release of the accepted pairs alone (or of all
    but the rejected) ships another set, so its precision is recomputed for the pairs it ships: a pair a
    reviewer accepted counts 1, one rejected 0, and an unjudged one its similarity band's estimate from the
    sample (``review.precision_shipped``, which the trainer reads first)."""
    from ..review.estimate import expected_correct
    from ..review.store import pair_key

    reviews = read_reviews(build_dir)
    if recipe.reviewed == "all" and not len(reviews):
        return table, None, None
    chosen, review = apply_reviews(table, reviews, recipe.reviewed)
    mined = pd.DataFrame({"key": pair_key(table.anchor_key, table.positive_key),
                          "similarity": table.similarity.to_numpy(dtype=np.float64)})
    if "sample" in reviews and reviews["sample"].fillna(False).astype(bool).any():
        from ..review.estimate import estimate_precision

        est = estimate_precision(mined, reviews).as_dict()
        sample = reviews[reviews["sample"].fillna(False).astype(bool)]
        est["date"] = str(pd.Timestamp(sample.time.max()).date())
        review["precision_estimate"] = est
    kept = table.index.get_indexer(chosen.index)
    expected = expected_correct(mined, reviews, review.get("precision_estimate"))
    expected = None if expected is None else expected[kept]
    if expected is not None and np.isnan(expected).any():
        expected = None  # unjudged pairs and no sample to estimate them by: the reviews do not tell
    if expected is not None:
        review["precision_shipped"] = {
            "value": float(expected.mean()) if len(expected) else None, "pairs": int(len(expected)),
            "judged": int(np.isin(expected, (0.0, 1.0)).sum()),
            "method": "each shipped pair a reviewer accepted counts 1, one rejected 0, an unjudged one the "
                      "reviewed sample's estimate for its similarity band"}
    if not len(chosen):
        raise UserError(f"no pair is {recipe.reviewed} by the reviews ({review['pairs_reviewed']:,} reviewed, "
                        f"{review['accepted']:,} accepted, {review['rejected']:,} rejected); review with "
                        "`spp-curate review DIR`, or choose another", option="--reviewed")
    rows = pairs.set_index("pair_id").loc[chosen.pair_id]
    labelled = (rows.label >= 0) & (rows.positive_label >= 0)
    review["pairs_released"] = len(chosen)
    review["precision_released"] = (float((rows.label == rows.positive_label)[labelled].mean())
                                    if labelled.any() else None)
    return chosen.reset_index(drop=True), review, expected


def _already_released(final: Path, plan: dict[str, Any], index_keys: pd.DataFrame | None,
                      option: str) -> dict[str, int] | None:
    """The counts of the release at ``final`` when it is already this export, whole: a kill after the swap
    and before the build noted it (the snapshot, the stage record). A rerun then finishes those steps rather
    than publishing the same pairs again as a new version, which would bury the real update's changelog."""
    from .manifest import verify_release

    recover_swap(final, layout.RELEASE_FILES, option)
    try:
        if not (final / layout.EXPORT_PLAN).is_file() or read_json(final / layout.EXPORT_PLAN) != plan:
            return None
        manifest = read_json(final / layout.MANIFEST)
    except (OSError, ValueError):
        return None
    wanted = index_digest(index_keys) if index_keys is not None else None
    if not isinstance(manifest, dict) or manifest.get("index_sha256") != wanted or verify_release(final):
        return None
    return manifest.get("counts")


def statement_digest(inp: ReleaseInput) -> str:
    """A digest of what a release says beside its shards: review, trust, metrics, counts, classes, figure."""
    figure = sha256_bytes(inp.figure.read_bytes()) if inp.figure is not None and inp.figure.is_file() else None
    said = {"review": inp.review, "pair_trust": inp.pair_trust, "metrics": inp.metrics, "counts": inp.counts,
            "class_names": inp.class_names, "figure": figure}
    return sha256_bytes(json.dumps(said, sort_keys=True, default=str).encode())


def _shard_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """The part of a plan the shards depend on (a new statement alone keeps the shards a killed export wrote)."""
    return {k: v for k, v in plan.items() if k != "statement_sha256"} if isinstance(plan, dict) else plan


def _staging(release: Path, plan: dict[str, Any], option: str) -> Path:
    """The folder the new release is written in: resumed when it holds this plan's shards, else begun anew.

    Neither it nor ``release`` may hold a file the program did not write (nothing of the user's is removed).
    """
    recover_swap(release, layout.RELEASE_FILES, option)
    refuse_foreign(release, layout.RELEASE_FILES, option)
    staging = release.with_name(f".{release.name}.partial")
    plan_file = staging / layout.EXPORT_PLAN
    if staging.exists():
        try:
            same = plan_file.is_file() and _shard_plan(read_json(plan_file)) == _shard_plan(plan)
        except ValueError:
            same = False
        if not same:
            remove_owned(staging, layout.RELEASE_FILES, option)  # another recipe or plan: nothing to reuse
    (staging / layout.PARQUET_FOLDER).mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan)
    remove_stale_temps(staging)
    return staging


def named_images(images: pd.DataFrame, pairs: pd.DataFrame) -> np.ndarray:
    """Which rows of ``images`` (indexed by key) a pair names: from the pairs' positions into the index where
    their keys are those (:func:`from_build`), else by a hash lookup in Arrow; no Python string per pair."""
    named = [pa.array(pairs[c], from_pandas=True) for c in ("anchor_key", "positive_key")]
    if all(pa.types.is_dictionary(c.type) and len(c.dictionary) == len(images) for c in named):
        mask = np.zeros(len(images), bool)
        for c in named:
            mask[c.indices.to_numpy(zero_copy_only=False)] = True
        return mask
    named = [c.cast(pa.large_string()) for c in named]
    keys = pa.array(images.index, from_pandas=True).cast(pa.large_string())
    return pc.is_in(keys, value_set=pc.unique(pa.concat_arrays(named))).to_numpy(zero_copy_only=False)


def write_release(inp: ReleaseInput, source: Source | None, final: Path, engine,
                  option: str = "--out", again: bool = False) -> dict[str, int]:
    """Write the shards, card and manifest of ``inp``, then put them in place as ``final``; return counts.

    Where ``final`` already holds this very export, whole (a kill came after the swap), only the build's own
    notes are finished, unless ``again``."""
    recipe, pairs = inp.recipe, inp.pairs
    id_only = recipe.images == "none"
    formats = inp.images["format"]
    used_formats = formats[named_images(inp.images, pairs)]
    target = release_format(used_formats)
    ext = EXT_OF_FORMAT[target]
    nbytes = inp.images["nbytes"]
    if recipe.layout == "images":
        pair_bytes = np.zeros(0)
    elif id_only:
        pair_bytes = np.full(len(pairs), ID_ONLY_BYTES_PER_PAIR)
    else:
        pair_bytes = (nbytes.loc[pairs.anchor_key].to_numpy() + nbytes.loc[pairs.positive_key].to_numpy()
                      + TAR_BYTES_PER_PAIR)
    shards = plan_shards(pair_bytes, recipe.shard_size) if recipe.layout == "pairs" else []
    n = len(shards)

    plan = {"fingerprint": recipe.fingerprint("export"), "layout": recipe.layout, "shards": n, "image_ext": ext,
            "pairs": len(pairs),
            "pair_ids_sha256": sha256_bytes(pairs.pair_id.to_numpy(dtype=np.int64).tobytes()),
            # everything else the card and the manifest state: a new review decision is a new release
            "statement_sha256": statement_digest(inp)}
    done = None if again else _already_released(final, plan, inp.index_keys, option)
    if done is not None:
        if inp.snapshot is not None and inp.index_keys is not None:
            write_table(inp.snapshot, pa.Table.from_pandas(inp.index_keys, preserve_index=False))
        return done
    release = _staging(final, plan, option)
    if recipe.layout == "images":
        entries, extra, reused = write_images_layout(inp, source, final, release, engine, target, ext, again)
        features = id_features(inp.class_names)
        counts = {**inp.counts, "pairs": len(pairs), **extra,
                  "images_reencoded": 0 if id_only else int((used_formats != target).sum())}
        return _finish(inp, final, release, entries, counts, features, ext, option, reused)
    if not id_only:
        (release / layout.TAR_FOLDER).mkdir(parents=True, exist_ok=True)
        load_webdataset()

    features = id_features(inp.class_names) if id_only else pair_features(inp.class_names)
    row_group_rows = int(np.clip(64e6 / max(float(pair_bytes.mean()) if len(pairs) else 1.0, 1.0), 16, 10_000))
    paths = [(release / layout.parquet_shard(i, n), None if id_only else release / layout.tar_shard(i))
             for i in range(n)]
    todo = [(i, pq_path, tar_path) for i, (pq_path, tar_path) in enumerate(paths)
            if not (pq_path.exists() and (tar_path is None or tar_path.exists()))]
    with stage_progress("export", len(pairs), unit="pair") as (bar, task):
        bar.update(task, advance=len(pairs) - sum(len(shards[i]) for i, _, _ in todo))
        on_pair, on_shard = shard_counter(bar, task)  # item by item in this process, else by shard

        # One process per shard, up to the cores (or --workers): shards are independent files.
        workers = min(len(todo), (os.cpu_count() or 1) if recipe.workers is None else recipe.workers)
        workers = workers if workers > 1 else 0
        work = ShardWork(recipe, source, formats, target, ext, features, row_group_rows,
                         None if workers else on_pair)
        engine.map(work, [(pairs.iloc[shards[i]], pq_path, tar_path) for i, pq_path, tar_path in todo],
                   workers=workers, on_result=on_shard)

    counts = {**inp.counts, "pairs": len(pairs), "shards": n,
              "images_reencoded": 0 if id_only else int((used_formats != target).sum())}
    entries = [file_entry(release, p, "parquet", len(rows)) for (p, _), rows in zip(paths, shards)]
    if not id_only:
        entries += [file_entry(release, t, "webdataset", len(rows)) for (_, t), rows in zip(paths, shards)]
    return _finish(inp, final, release, entries, counts, features, ext, option, None)


def _finish(inp: ReleaseInput, final: Path, release: Path, entries: list[dict[str, Any]], counts: dict[str, int],
            features, ext: str, option: str, reused: dict[str, Any] | None) -> dict[str, int]:
    """The card, the figure and the manifest (always last) of the staged release; then swapped in as ``final``."""
    recipe, pairs = inp.recipe, inp.pairs
    figure = None
    if inp.figure is not None:
        (release / layout.ASSET_FOLDER).mkdir(exist_ok=True)
        with atomic_path(release / layout.ASSET_FOLDER / inp.figure.name) as tmp:
            shutil.copyfile(inp.figure, tmp)
        figure = f"assets/{inp.figure.name}"

    def snapshot() -> pd.DataFrame | None:  # read only when a parent's changes are written
        return (pq.read_table(inp.snapshot, columns=["key", "digest"]).to_pandas(types_mapper=arrow_strings)
                if inp.snapshot is not None and inp.snapshot.is_file() else None)

    versions = version_block(final, pairs, inp.index_keys, snapshot)
    changed = (versions.get("changelog") or {}).get("images")
    if changed is not None:  # the keys go to changelog.parquet, their counts stay in the manifest
        entries.append(write_changelog(release, changed))
        versions["changelog"]["images"] = {kind: len(changed[kind]) for kind in CHANGE_KINDS}
    parquet_bytes = sum(e["bytes"] for e in entries if e["kind"] in ("parquet", "pairs", "images"))
    with atomic_path(release / layout.CARD) as tmp:
        tmp.write_text(render_card(recipe, features, counts, parquet_bytes, inp.metrics, figure, ext, inp.review,
                                   versions, inp.pair_trust))
    entries.append(file_entry(release, release / layout.CARD, "card", None))
    with atomic_path(release / layout.CROISSANT) as tmp:
        tmp.write_text(json.dumps(croissant(recipe, entries, recipe.layout, recipe.images, versions["version"],
                                            str(pd.Timestamp.now(tz="UTC").date())), indent=1))
    entries.append(file_entry(release, release / layout.CROISSANT, "croissant", None))
    if figure:
        entries.append(file_entry(release, release / figure, "asset", None))
    metrics = inp.metrics
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": recipe.name,
        "images": recipe.images,
        "recipe": recipe.model_dump(),
        "versions": library_versions(),
        "counts": counts,
        "image_ext": ext,
        "layout": recipe.layout,
        "redistribute": may_redistribute(recipe),
        "class_names": inp.class_names,
        "metrics": ({k: metrics.get(k) for k in ("precision", "coverage", "filter_removed", "thresholds")}
                    if metrics else None),
        # What the pairs are clean against: reference sets, their key-list digests, threshold, counts.
        "leakage": metrics.get("leakage") if metrics else None,
        # Decisions made on the review page: which pairs were kept, counts, reviewers, their agreement.
        "review": inp.review,
        # The pairs' precision by similarity band, which the trainer can weight each pair by (train/trust.py).
        "pair_trust": inp.pair_trust,
        # This release's version, its parent's manifest digest, and what changed since (versions.py).
        **versions,
        # images layout: the settings its picture shards' names depend on, and the shards kept from the parent
        **({"shard_settings": reused.pop("settings"), "reused": reused} if reused is not None else {}),
        "files": entries,
    }
    write_json(release / layout.MANIFEST, manifest)
    swap_in(release, final, layout.RELEASE_FILES, option)
    if inp.snapshot is not None and inp.index_keys is not None:
        write_table(inp.snapshot, pa.Table.from_pandas(inp.index_keys, preserve_index=False))
    return counts


def export_release(recipe: Recipe, build_dir: Path, engine, again: bool = False) -> dict[str, int]:
    """Write ``build_dir/release/`` from a build directory; return counts (``again``: see write_release)."""
    source = None if recipe.images == "none" else open_source(recipe)
    return write_release(from_build(recipe, build_dir), source, build_dir / layout.RELEASE, engine, again=again)
