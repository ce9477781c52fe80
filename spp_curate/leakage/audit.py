"""``spp-curate audit``: count a release's near-copies of a reference set, per pair side.

The release is verified first (it may come from anywhere); its Parquet shards
are read a row group at a time, and each distinct image (by source key) is
described once from the bytes in the release. An ID-only release carries no
pixels: it is checked by digest (byte-identical copies) only, and says so.
The reference set is indexed and described in a temporary folder with the
exclude stage's own code, so an audit and a build agree on every score.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..config import Recipe, parse_reference, resolve_threshold
from ..export.manifest import Manifest, load_manifest, release_file, verified_files
from ..images import BadImage, image_from_bytes
from ..progress import stage_progress
from .copies import DRAFT, copy_scores, describe
from .exclude import prepare_reference

SIDES = ("anchor", "positive")
READ_BATCH = 256


@dataclass
class Leak:
    side: str
    key: str
    reference_key: str
    score: float
    same_digest: bool


@dataclass
class AuditResult:
    against: str
    threshold: float
    pixels: bool  # False: an ID-only release, checked by digest alone
    images: dict[str, int] = field(default_factory=dict)  # distinct images per side
    leaks: list[Leak] = field(default_factory=list)

    def leaked(self, side: str | None = None) -> int:
        return len({leak.key for leak in self.leaks if side in (None, leak.side)})

    def as_dict(self) -> dict[str, Any]:
        return {"against": self.against, "threshold": self.threshold, "pixels": self.pixels, "images": self.images,
                "leaked": {s: self.leaked(s) for s in SIDES} | {"total": self.leaked()},
                "leaks": [leak.__dict__ for leak in self.leaks]}


def _release_images(release: Path, manifest: Manifest, pixels: bool) -> dict[str, dict[str, tuple[str, Any]]]:
    """Per side, each distinct key's digest and (with pixels) its picture or None when it does not decode."""
    shards = [release_file(release, e) for e in manifest.entries("parquet")]
    columns = [f"{s}_{c}" for s in SIDES for c in ("key", "digest")] + (list(SIDES) if pixels else [])
    seen: dict[str, dict[str, tuple[str, Any]]] = {s: {} for s in SIDES}
    with stage_progress("audit: read release", int(manifest.counts.pairs)) as (bar, task):
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=READ_BATCH, columns=columns):
                rows = batch.to_pydict()
                for side in SIDES:
                    for i, key in enumerate(rows[f"{side}_key"]):
                        if key in seen[side]:
                            continue
                        picture = None
                        if pixels:
                            try:
                                picture = image_from_bytes((rows[side][i] or {}).get("bytes"), DRAFT)
                            except BadImage:
                                picture = None
                        seen[side][key] = (rows[f"{side}_digest"][i], picture)
                bar.update(task, advance=batch.num_rows)
    return seen


def audit_release(release: Path, against: str, threshold: str, engine, workers: int | None = None) -> AuditResult:
    """Near-copies of the reference set ``against`` among the release's images, per side."""
    ref = parse_reference(against, option="--against")
    verified_files(release)  # a release that does not verify is not read further
    manifest = load_manifest(release)
    pixels = manifest.images != "none"
    seen = _release_images(release, manifest, pixels)
    recipe = Recipe(name="audit", source=ref.source, workers=workers)
    with tempfile.TemporaryDirectory(prefix="spp-audit-") as tmp:
        ref_index, ref_desc, _ = prepare_reference(recipe, ref, Path(tmp), engine)
    ref_keys = np.asarray(ref_index.column("key").to_pylist(), dtype=object)
    ref_by_digest = dict(zip(ref_index.column("digest").to_pylist(), ref_keys))
    per_side = {}
    for side in SIDES:
        keys = list(seen[side])
        digests = [seen[side][k][0] for k in keys]
        if pixels:
            scores, rows = copy_scores(describe([seen[side][k][1] for k in keys], False), ref_desc, engine)
        else:
            scores, rows = np.full(len(keys), -1.0, np.float32), np.full(len(keys), -1, np.int64)
        per_side[side] = (keys, digests, scores, rows)
    all_scores = np.concatenate([v[2] for v in per_side.values()])
    cut = resolve_threshold(threshold, all_scores[all_scores > -1.0], "--threshold")
    result = AuditResult(against, cut, pixels, {s: len(v[0]) for s, v in per_side.items()})
    for side, (keys, digests, scores, rows) in per_side.items():
        for key, digest, score, row in zip(keys, digests, scores, rows):
            twin = ref_by_digest.get(digest)
            if twin is not None or (pixels and score >= cut):
                result.leaks.append(Leak(side, key, str(twin if twin is not None else ref_keys[row]),
                                         1.0 if twin is not None else round(float(score), 6), twin is not None))
    return result
