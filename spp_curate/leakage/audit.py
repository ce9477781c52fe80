"""``spp-curate audit``: count a release's near-copies of a reference set, per pair side.

The release is verified first (it may come from anywhere); its Parquet shards
are read a row group at a time and its WebDataset tars member by member, and
every distinct picture a user could train on (by its bytes, not by its key or
the digest column, which the release itself claims) is described once. A key
that comes with two different pictures (in two rows, or in the Parquet and
the tar) is audited for both. An ID-only release carries no pixels: it is
checked by digest (byte-identical copies) only, and says so.
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
from ..files import sha256_bytes
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
    checked: int = 0  # distinct keys over both sides
    leaks: list[Leak] = field(default_factory=list)
    #: The reference set's own look-alike rate at the threshold: the share of (a sample of) its pictures whose
    #: best copy score against *another* of its pictures reaches it. A clean release drawn from the same
    #: distribution has about this share of its pictures above the threshold by chance.
    lookalike_rate: float | None = None
    lookalike_sample: int = 0

    def expected_by_chance(self) -> tuple[float, int]:
        """Images expected above the threshold by look-alikes alone, and the 95 % upper bound of that count
        (Poisson), over the distinct images checked."""
        if not self.lookalike_rate:
            return 0.0, 0
        mean = self.lookalike_rate * self.checked
        return mean, poisson_upper(mean)

    def same_bytes(self) -> int:
        return len({leak.key for leak in self.leaks if leak.same_digest})

    def leaked(self, side: str | None = None) -> int:
        return len({leak.key for leak in self.leaks if side in (None, leak.side)})

    def as_dict(self) -> dict[str, Any]:
        expected, bound = self.expected_by_chance()
        return {"against": self.against, "threshold": self.threshold, "pixels": self.pixels, "images": self.images,
                "leaked": {s: self.leaked(s) for s in SIDES} | {"total": self.leaked()},
                "lookalike_rate": self.lookalike_rate, "lookalike_sample": self.lookalike_sample,
                "expected_by_chance": expected, "expected_upper_95": bound,
                "leaks": [leak.__dict__ for leak in self.leaks]}


def _release_images(release: Path, manifest: Manifest, pixels: bool) -> dict[str, dict[tuple[str, str], tuple[str, Any]]]:
    """Per side, each distinct ``(key, picture)``: its digest column and (with pixels) its picture, None when it
    does not decode. Pictures are told apart by the sha256 of their bytes, in every format the release ships."""
    seen: dict[str, dict[tuple[str, str], tuple[str, Any]]] = {s: {} for s in SIDES}

    def add(side: str, key: str, digest: str, data: bytes | None) -> None:
        ident = sha256_bytes(data or b"") if pixels else str(digest)
        if (key, ident) in seen[side]:
            return
        picture = None
        if pixels:
            try:
                picture = image_from_bytes(data, DRAFT)
            except BadImage:
                picture = None
        seen[side][(key, ident)] = (digest, picture)

    if manifest.layout == "images":
        _images_layout(release, manifest, pixels, add)
        return seen
    shards = [release_file(release, e) for e in manifest.entries("parquet")]
    columns = [f"{s}_{c}" for s in SIDES for c in ("key", "digest")] + (list(SIDES) if pixels else [])
    with stage_progress("audit: read release", int(manifest.counts.pairs)) as (bar, task):
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=READ_BATCH, columns=columns):
                rows = batch.to_pydict()
                for side in SIDES:
                    for i, key in enumerate(rows[f"{side}_key"]):
                        add(side, key, rows[f"{side}_digest"][i], (rows[side][i] or {}).get("bytes") if pixels else None)
                bar.update(task, advance=batch.num_rows)
    if pixels:
        tars = [release_file(release, e) for e in manifest.entries("webdataset")]
        with stage_progress("audit: read WebDataset", int(manifest.counts.pairs) if tars else 0) as (bar, task):
            for tar_path in tars:
                for sample in _tar_samples(tar_path):
                    meta = sample.get("json") or {}
                    for side in SIDES:
                        if side in sample:
                            key = meta.get(f"{side}_key") if isinstance(meta.get(f"{side}_key"), str) else None
                            add(side, key or f"{tar_path.name}/{sample['__key__']}.{side}",
                                str(meta.get(f"{side}_digest", "")), sample[side])
                    bar.update(task, advance=1)
    return seen


def _images_layout(release: Path, manifest: Manifest, pixels: bool, add) -> None:
    """Each picture of an ``images``-layout release, once per side it plays in a pair, from every format it
    ships (the Parquet image shards and, where written, the image tars)."""
    from ..export.pictures import iter_pictures, pair_rows

    pairs = pair_rows(release, manifest, [f"{s}_{c}" for s in SIDES for c in ("key", "digest")])
    roles = {side: dict(zip(pairs[f"{side}_key"], pairs[f"{side}_digest"])) for side in SIDES}
    if not pixels:
        for side in SIDES:
            for key, digest in roles[side].items():
                add(side, key, digest, None)
        return
    with stage_progress("audit: read release", int(getattr(manifest.counts, "pictures", 0) or 0)) as (bar, task):
        for keys, digests, blobs in iter_pictures(release, manifest, READ_BATCH):
            for key, digest, data in zip(keys, digests, blobs):
                for side in SIDES:
                    if key in roles[side]:
                        add(side, key, digest, data)
            bar.update(task, advance=len(keys))
        for entry in manifest.entries("image-tars"):
            for sample in _tar_samples(release_file(release, entry)):
                meta = sample.get("json") or {}
                key = meta.get("key") if isinstance(meta.get("key"), str) else f"{entry.path}/{sample['__key__']}"
                data = next((v for k, v in sample.items() if k not in ("__key__", "__url__", "json")
                             and isinstance(v, bytes)), None)
                for side in SIDES:
                    if key in roles[side] or key not in roles["anchor"] and key not in roles["positive"]:
                        add(side, key, str(meta.get("digest", "")), data)


def _tar_samples(path: Path):
    """A verified tar's samples as webdataset groups them: ``{"__key__", "anchor.EXT", "positive.EXT": bytes,
    "json": dict}`` (``verify`` has checked every member's type, name and size before this reads them)."""
    import json

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as stream:
        files = ({**f, "__url__": str(path)} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            try:
                meta = json.loads(sample.get("json") or b"{}")
            except ValueError:
                meta = {}
            sample["json"] = meta if isinstance(meta, dict) else {}
            for name in list(sample):
                side = name.split(".")[0]
                if side in SIDES and name != side:
                    sample[side] = sample.pop(name)
            yield sample


def poisson_upper(mean: float, q: float = 0.95) -> int:
    """The smallest count whose Poisson(``mean``) cumulative probability reaches ``q`` (a normal approximation
    above a mean of 50)."""
    import math

    if mean > 50:
        return math.ceil(mean + 1.645 * math.sqrt(mean))
    k, p = 0, math.exp(-mean)
    total = p
    while total < q:
        k += 1
        p *= mean / k
        total += p
    return k


#: Reference pictures scored against the rest of their set to measure its look-alike rate.
LOOKALIKE_SAMPLE = 2000


def lookalike_rate(references, threshold: float, engine, seed: int = 0) -> tuple[float, int]:
    """The share of a sample of the reference pictures whose best copy score against another reference picture
    (itself left out) reaches ``threshold``, and the sample's size."""
    from .copies import COARSE, FINE, Descriptors, candidates, verify

    n = len(references.ok)
    if n < 2:
        return 0.0, 0
    rows = np.sort(np.random.default_rng(seed).choice(n, min(LOOKALIKE_SAMPLE, n), replace=False))
    pictures = Descriptors(references.coarse[rows, 0].reshape(len(rows), COARSE * COARSE),
                           references.fine[rows, : FINE * FINE], references.ok[rows])
    cand = candidates(pictures, references, engine, 8 * 10**9)
    cand[cand == rows[:, None]] = -1  # not itself
    best, _ = verify(pictures, references, cand)
    return float(np.mean(best[pictures.ok] >= threshold)) if pictures.ok.any() else 0.0, int(len(rows))


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
    from ..progress import phase

    per_side = {}
    for side in SIDES:
        entries = list(seen[side])
        keys = [key for key, _ in entries]
        digests = [seen[side][e][0] for e in entries]
        if pixels:
            with phase(f"audit: the {side} pictures' copy scores against {against} ({len(entries):,})"):
                scores, rows = copy_scores(describe([seen[side][e][1] for e in entries], False), ref_desc, engine)
        else:
            scores, rows = np.full(len(keys), -1.0, np.float32), np.full(len(keys), -1, np.int64)
        per_side[side] = (keys, digests, scores, rows)
    all_scores = np.concatenate([v[2] for v in per_side.values()])
    cut = resolve_threshold(threshold, all_scores[all_scores > -1.0], "--threshold")
    result = AuditResult(against, cut, pixels, {s: len(set(v[0])) for s, v in per_side.items()},
                         len({k for v in per_side.values() for k in v[0]}))
    if pixels:
        with phase(f"audit: {against}'s own look-alikes (up to {LOOKALIKE_SAMPLE:,} of its pictures)"):
            result.lookalike_rate, result.lookalike_sample = lookalike_rate(ref_desc, cut, engine)
    for side, (keys, digests, scores, rows) in per_side.items():
        for key, digest, score, row in zip(keys, digests, scores, rows):
            twin = ref_by_digest.get(digest)
            if twin is not None or (pixels and score >= cut):
                result.leaks.append(Leak(side, key, str(twin if twin is not None else ref_keys[row]),
                                         1.0 if twin is not None else round(float(score), 6), twin is not None))
    return result
