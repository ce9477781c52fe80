"""The export stage: ``pairs.parquet`` + the source's images -> ``release/``.

Pairs are cut into ``S`` shards of about ``shard_size`` bytes, planned before
any is written so names carry ``-of-S``. Shard ``i`` holds the same pairs in
its Parquet file and its tar. Each shard is written to a temporary name and
renamed when complete; a rerun after a kill skips the shards already in place
and writes the card and ``manifest.json`` (always last) anew.
"""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..config import Recipe
from ..curate.images import decode_image
from ..curate.index import read_class_names
from ..curate.sources import Source, open_source
from ..files import atomic_path, read_json, write_json
from ..progress import stage_progress
from .card import render_card
from .manifest import SCHEMA_VERSION, file_entry, library_versions
from .parquet import PairParquetWriter, pair_features
from .samples import PairSample
from .webdataset import PairTarWriter

EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png"}
# A pair in a tar costs three 512-byte headers, padding of the two images to
# 512 bytes (256 on average each) and a small JSON padded to 512: for small
# images (Fashion-MNIST's are ~300 bytes) this dominates the shard size.
TAR_BYTES_PER_PAIR = 3 * 512 + 2 * 256 + 512


def release_format(formats: list[str]) -> str:
    """The one container format a release stores: JPEG when most images are JPEG, else PNG."""
    common = Counter(formats).most_common(1)
    return "JPEG" if common and common[0][0] == "JPEG" else "PNG"


def encoded_image(source: Source, key: str, fmt: str, target: str) -> bytes:
    """The image's original bytes, or a re-encode when its container differs from the release's."""
    data = source.read(key)
    if fmt == target:
        return data
    buf = io.BytesIO()
    decode_image(data).save(buf, format=target, **({"quality": 95} if target == "JPEG" else {}))
    return buf.getvalue()


def plan_shards(pair_bytes: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """Split pair positions into contiguous shards of about ``shard_size`` bytes each."""
    n_shards = max(1, int(np.ceil(pair_bytes.sum() / shard_size)))
    n_shards = min(n_shards, max(1, len(pair_bytes)))
    return np.array_split(np.arange(len(pair_bytes)), n_shards)


def export_release(recipe: Recipe, build_dir: Path) -> dict[str, int]:
    """Write ``build_dir/release/``; return counts."""
    release = build_dir / "release"
    index = pq.read_table(build_dir / "index.parquet").to_pandas().set_index("id")
    pairs = pq.read_table(build_dir / "pairs.parquet").to_pandas()
    class_names = read_class_names(build_dir / "index.parquet")
    used = np.union1d(pairs.anchor_id, pairs.positive_id)
    target = release_format(index.loc[used, "format"].tolist()) if len(used) else "PNG"
    ext = EXT_OF_FORMAT[target]
    nbytes = index["nbytes"]
    pair_bytes = (nbytes.loc[pairs.anchor_id].to_numpy() + nbytes.loc[pairs.positive_id].to_numpy()
                  + TAR_BYTES_PER_PAIR)
    shards = plan_shards(pair_bytes, recipe.shard_size)
    n = len(shards)

    plan = {"fingerprint": recipe.fingerprint("export"), "shards": n, "image_ext": ext}
    plan_file = release / ".export.json"
    if release.exists() and (not plan_file.exists() or read_json(plan_file) != plan):
        shutil.rmtree(release)  # another recipe or plan: nothing to reuse
    (release / "data").mkdir(parents=True, exist_ok=True)
    (release / "wds").mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan)

    features = pair_features(class_names)
    avg_pair = float(pair_bytes.mean()) if len(pair_bytes) else 1.0
    row_group_rows = int(np.clip(64e6 / max(avg_pair, 1.0), 16, 10_000))
    source = open_source(recipe)
    keys, digests, formats = index["key"], index["digest"], index["format"]
    paths = [(release / "data" / f"train-{i:05d}-of-{n:05d}.parquet", release / "wds" / f"pairs-{i:06d}.tar")
             for i in range(n)]
    with stage_progress("export", len(pairs), unit="pair") as (bar, task):
        for (pq_path, tar_path), rows in zip(paths, shards):
            if pq_path.exists() and tar_path.exists():
                bar.update(task, advance=len(rows))
                continue
            writers = [PairParquetWriter(pq_path, features, row_group_rows), PairTarWriter(tar_path, ext)]
            for row in pairs.iloc[rows].itertuples(index=False):
                a, p = int(row.anchor_id), int(row.positive_id)
                sample = PairSample(
                    pair_id=int(row.pair_id),
                    anchor=encoded_image(source, keys[a], formats[a], target),
                    positive=encoded_image(source, keys[p], formats[p], target),
                    anchor_key=keys[a], positive_key=keys[p], anchor_digest=digests[a], positive_digest=digests[p],
                    label=int(row.label), label_name=str(row.label_name), similarity=float(row.similarity))
                for w in writers:
                    w.write(sample)
                bar.update(task, advance=1)
            for w in writers:
                w.close()

    counts = {"images": len(index), "pairs": len(pairs), "shards": n,
              "quarantined": pq.read_metadata(build_dir / "quarantine.parquet").num_rows,
              "images_reencoded": int(sum(formats.loc[used] != target))}
    metrics_path = build_dir / "report" / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.exists() else None
    figure = None
    grid = build_dir / "report" / "pairs-strongest.png"
    if grid.exists():
        (release / "assets").mkdir(exist_ok=True)
        with atomic_path(release / "assets" / grid.name) as tmp:
            shutil.copyfile(grid, tmp)
        figure = f"assets/{grid.name}"

    entries = [file_entry(release, p, "parquet", len(rows)) for (p, _), rows in zip(paths, shards)]
    entries += [file_entry(release, t, "webdataset", len(rows)) for (_, t), rows in zip(paths, shards)]
    parquet_bytes = sum(e["bytes"] for e in entries if e["kind"] == "parquet")
    with atomic_path(release / "README.md") as tmp:
        tmp.write_text(render_card(recipe, features, counts, parquet_bytes, metrics, figure, ext))
    entries.append(file_entry(release, release / "README.md", "card", None))
    if figure:
        entries.append(file_entry(release, release / figure, "asset", None))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": recipe.name,
        "recipe": recipe.model_dump(),
        "versions": library_versions(),
        "counts": counts,
        "image_ext": ext,
        "metrics": {k: metrics[k] for k in ("precision", "coverage", "filter_removed")} if metrics else None,
        "files": entries,
    }
    write_json(release / "manifest.json", manifest)
    return counts
