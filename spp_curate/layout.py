"""Where everything lives: the files of a build directory and of a release, by name and by pattern.

The patterns say which files the program writes in each folder. They decide
what ``verify`` accepts as a release path (a manifest naming anything else is
refused), what ``push`` may upload, and what a rerun may delete: a folder
holding a file outside its patterns is never removed (see ``files.refuse_foreign``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- a build directory (DIR)
BUILD_RECIPE = "build.yaml"
LOCK = ".lock"
INDEX = "index.parquet"
#: Each indexed image's file identity (size, modification time), so the next index reads only what changed.
INDEX_STATS = "index-stats.parquet"
#: The source's listing the last index read (keys, labels, file identities, the folders' identities), which
#: ``build --trust-listing`` takes instead of walking the source when no folder changed since.
LISTING = "listing.parquet"
QUARANTINE = "quarantine.parquet"
EMBEDDINGS = "embeddings"
EMBEDDINGS_META = "embeddings/meta.json"
EMBEDDINGS_RUN = "embeddings/run.json"
#: What encoded the embeddings (the encoder's description), written with the first chunk.
EMBEDDINGS_ENCODER = "embeddings/encoder.json"
PAIRS = "pairs.parquet"
MINE_STATS = "mine_stats.json"
#: Copy scores of the pairs the mine stage compared by picture, keyed by their digests (``pairing/duplicates.py``):
#: an update compares only pairs of pictures it has not seen.
COPY_SCORES = "copy-scores.parquet"
#: The similarity scale the mine stage fitted (``pairing/whiten.py``): mean and projection.
WHITENING = "whitening.npz"
REPORT = "report"
METRICS = "report/metrics.json"
REPORT_HTML = "report/index.html"
#: The report's figures (in REPORT): the grid of strongest pairs (the release card shows it too), the pairs
#: nearest the threshold, the wrong ones, the threshold curve, the similarity histogram, pairs per class.
STRONGEST_GRID = "pairs-strongest.png"
THRESHOLD_GRID = "pairs-threshold.png"
WRONG_GRID = "pairs-wrong.png"
THRESHOLD_CURVE = "threshold-curve.png"
SIMILARITY_HISTOGRAM = "similarity.png"
PAIRS_PER_CLASS = "pairs-per-class.png"
RELEASE = "release"
STAGE_RECORDS = "stages"
#: Near-copies of reference (evaluation) sets: every image's best copy score, and the summary.
EXCLUSION = "exclusion.parquet"
EXCLUSION_STATS = "exclusion.json"
#: The index (key, digest) as it was at the last export: what the next release's changelog compares with.
RELEASED_INDEX = "released-index.parquet"
#: Decisions of the review page (one row per decision), and the lock its writers take turns on.
REVIEWS = "reviews.parquet"
REVIEWS_LOCK = ".reviews.lock"
#: Reference sets indexed and described for the exclusion (one folder each), and the build's own descriptors.
REFERENCES = "references"

#: Parquet schema metadata of ``index.parquet`` holding the class names (JSON list, by label).
CLASS_NAMES_META = b"spp_curate.class_names"


def read_class_names(index_path: Path) -> list[str]:
    """The class names the index stage stored with ``index.parquet``."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(index_path).metadata or {}
    return json.loads(meta.get(CLASS_NAMES_META, b"[]"))


def chunk_paths(emb_dir: Path, chunk: int) -> tuple[Path, Path]:
    """An embedding chunk's vectors (float16, L2-normalised) and its index ids."""
    return emb_dir / f"chunk-{chunk:05d}.npy", emb_dir / f"chunk-{chunk:05d}.ids.npy"


def chunk_copy_path(emb_dir: Path, chunk: int) -> Path:
    """A chunk's copy descriptors (``pairing/duplicates.py``): each picture's small grayscale rendering, made
    when the embed stage decoded it, so the copy rule never decodes it again."""
    return emb_dir / f"chunk-{chunk:05d}.copy.npy"


def read_embeddings_meta(build_dir: Path) -> dict:
    return json.loads((build_dir / EMBEDDINGS_META).read_text())


def chunk_keys_path(emb_dir: Path, chunk: int) -> Path:
    """The key and digest of each row of a chunk: what lets a changed source reuse the rows of unchanged images."""
    return emb_dir / f"chunk-{chunk:05d}.keys.parquet"


def load_embeddings(build_dir: Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """All embeddings as ``(N, d)`` rows of ``dtype`` with their ids, in index (id) order (no torch needed):
    one array, filled chunk by chunk from the memory-mapped files (:class:`ChunkedEmbeddings`)."""
    emb = ChunkedEmbeddings(build_dir, dtype)
    return np.asarray(emb), emb.ids


class ChunkedEmbeddings:
    """A build's per-picture chunk rows in index (id) order, the embeddings (``part="vectors"``) or the copy
    descriptors (``part="copy"``), read from the memory-mapped chunk files only where asked: ``emb[lo:hi]``
    and ``emb[positions]`` gather those rows (each chunk's map dropped after the read), so a stage that
    streams over them never holds them all; ``np.asarray(emb)`` loads them whole."""

    def __init__(self, build_dir: Path, dtype=np.float16, part: str = "vectors") -> None:
        if part not in ("vectors", "copy"):
            raise ValueError(f"no chunk part {part!r}; accepted: vectors, copy")
        self.emb_dir, self.dtype, self.part = build_dir / EMBEDDINGS, dtype, part
        meta = read_embeddings_meta(build_dir)
        self.chunks = list(meta.get("chunk_files", range(meta["chunks"])))
        ids = [np.load(chunk_paths(self.emb_dir, c)[1]) for c in self.chunks]
        all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        order = np.argsort(all_ids, kind="stable")  # appended chunks of an updated build: back to index order
        self.ids = all_ids[order]
        chunk_of = np.concatenate([np.full(len(i), n, np.int32) for n, i in enumerate(ids)]) if ids else \
            np.empty(0, np.int32)
        row_of = np.concatenate([np.arange(len(i), dtype=np.int64) for i in ids]) if ids else np.empty(0, np.int64)
        self.chunk_of, self.row_of = chunk_of[order], row_of[order]
        dim = int(np.load(self._file(self.chunks[0]), mmap_mode="r").shape[1]) if ids else int(meta.get("dim", 0))
        self.shape = (len(self.ids), dim)

    def _file(self, chunk: int) -> Path:
        return chunk_paths(self.emb_dir, chunk)[0] if self.part == "vectors" else chunk_copy_path(self.emb_dir, chunk)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        positions = np.arange(self.shape[0])[index] if isinstance(index, slice) else np.asarray(index)
        out = np.empty((len(positions), self.shape[1]), self.dtype)
        chunk = self.chunk_of[positions]
        for n in np.unique(chunk):
            where = np.flatnonzero(chunk == n)
            stored = np.load(self._file(self.chunks[n]), mmap_mode="r")
            out[where] = stored[self.row_of[positions[where]]]
            del stored
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)


EMBEDDING_FILES = [re.compile(p) for p in (r"chunk-\d{5}\.npy", r"chunk-\d{5}\.ids\.npy", r"chunk-\d{5}\.copy\.npy",
                                           r"chunk-\d{5}\.keys\.parquet", r"meta\.json", r"run\.json",
                                           r"encoder\.json")]
#: Files of one reference set's folder under ``references/``.
REFERENCE_FILES = [re.compile(p) for p in (re.escape(INDEX), re.escape(QUARANTINE), re.escape(INDEX_STATS),
                                           re.escape(LISTING), r"descriptors\.npz", r"record\.json")]

# ---------------------------------------------------------------- a release
MANIFEST = "manifest.json"
#: The source images added, removed and changed since the parent release (``export/versions.py``): one row
#: a key, so a large update never makes the manifest outgrow its reader.
CHANGELOG = "changelog.parquet"
CARD = "README.md"
#: The release in MLCommons Croissant 1.0 (``export/croissant.py``).
CROISSANT = "croissant.json"
#: The export's plan: which recipe and shard count the folder's shards belong to. Never uploaded.
EXPORT_PLAN = ".export.json"


def parquet_shard(i: int, n: int) -> str:
    return f"data/train-{i:05d}-of-{n:05d}.parquet"


def tar_shard(i: int) -> str:
    return f"wds/pairs-{i:06d}.tar"


def pair_table_shard(i: int, n: int) -> str:
    """A shard of the ``images`` layout's pair table (rows of keys, no pixels)."""
    return f"data/pairs-{i:05d}-of-{n:05d}.parquet"


def image_shard(name: str) -> str:
    """An ``images``-layout picture shard, named by its content (``export/pictures.py``)."""
    return f"data/images-{name}.parquet"


def image_tar_shard(name: str) -> str:
    return f"wds/images-{name}.tar"


#: What a manifest may list, by kind: nothing else is ever read, hashed or uploaded. ``parquet`` and
#: ``webdataset`` are the ``pairs`` layout's pair shards; ``pairs``, ``images`` and ``image-tars`` the ``images``
#: layout's pair table and picture shards.
RELEASE_ENTRY_PATTERNS: dict[str, re.Pattern[str]] = {
    "parquet": re.compile(r"data/train-\d{5}-of-\d{5}\.parquet"),
    "webdataset": re.compile(r"wds/pairs-\d{6}\.tar"),
    "pairs": re.compile(r"data/pairs-\d{5}-of-\d{5}\.parquet"),
    "images": re.compile(r"data/images-[0-9a-f]{16}\.parquet"),
    "image-tars": re.compile(r"wds/images-[0-9a-f]{16}\.tar"),
    "croissant": re.compile(r"croissant\.json"),
    "changelog": re.compile(r"changelog\.parquet"),
    "card": re.compile(re.escape(CARD)),
    "asset": re.compile(r"assets/[A-Za-z0-9_-]+\.png"),
}
#: Every file the program writes in a release folder.
RELEASE_FILES = [*RELEASE_ENTRY_PATTERNS.values(), re.compile(re.escape(MANIFEST)), re.compile(re.escape(EXPORT_PLAN))]
#: Where shards live: a file there that the manifest does not list is a problem for ``verify``.
PARQUET_FOLDER, TAR_FOLDER, ASSET_FOLDER = "data", "wds", "assets"
SHARD_FOLDERS = (PARQUET_FOLDER, TAR_FOLDER, ASSET_FOLDER)

