"""Near-duplicates decided by picture content, not by an encoder's similarity.

A near-duplicate is the same picture twice: equal bytes, or a resized, re-encoded or slightly cropped copy.
"A cosine above 0.985" is not that rule: on a self-supervised sampler thousands of distinct pairs lie above
it, on a random-init ViT copies shrunk to 20 px lie below ordinary neighbours (``leakage/copies.py``). So
pairs are compared by their pictures, with the copy score the leakage check computes:
the best normalised cross-correlation of one picture's 24x24 grayscale rendering slid over the other's
renderings at 24..28 px (crops down to 86 % of a side), in both directions. A pair at or above
``--copy-threshold`` is one picture and is never mined. The pairs compared are those the other rules would
keep (``mine.mine_without_copies``), so the encoder plays no part in the decision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..images import BadImage, load_image
from ..leakage.copies import DRAFT, FINE_OFFSETS, FINE_SIZES, Descriptors, _scores, _unit_rows, describe

#: Pairs compared per batch (the pictures of a batch are decoded and rendered once).
PAIR_BATCH = 4096
#: The renderings that keep the aspect ratio, tried first, and the score from which a pair is also tried at
#: every other aspect (a crop of one side only); far below any copy threshold worth using.
SQUARE = [j for j, (w, h) in enumerate(FINE_SIZES) if w == h]
NEAR = 0.8


def _describe_keys(source: Any, keys: list[str]) -> tuple[Descriptors, Descriptors]:
    """Each picture as a possible copy (its 24x24 rendering) and as a possible original (its renderings).

    Given pairs need no candidate search, so no thumbnails; the 24x24 rendering is the first of the
    reference renderings, so each picture is rendered once."""
    pictures = []
    for key in keys:
        try:
            pictures.append(load_image(source, key, draft_size=DRAFT))
        except BadImage:  # the mine stage mines only images that encoded; a file changed since: no score
            pictures.append(None)
    refs = describe(pictures, reference=True, coarse=False)
    own = int(FINE_OFFSETS[1])  # FINE_SIZES[0] is (FINE, FINE)
    return Descriptors(refs.coarse, refs.fine[:, :own], refs.ok), refs


def pair_copy_scores(source: Any, keys: np.ndarray, a: np.ndarray, b: np.ndarray, on_batch=None) -> np.ndarray:
    """The copy score of each pair ``(a[i], b[i])`` of positions into ``keys``: the larger of a-in-b and
    b-in-a; -1 where a picture could not be read."""
    import torch

    everything = list(range(len(FINE_SIZES)))
    scores = np.full(len(a), -1.0, np.float32)
    order = np.argsort(a, kind="stable")  # neighbours of one anchor together: fewer pictures per batch
    for lo in range(0, len(order), PAIR_BATCH):
        rows = order[lo: lo + PAIR_BATCH]
        images, where = np.unique(np.concatenate([a[rows], b[rows]]), return_inverse=True)
        ia, ib = where[: len(rows)], where[len(rows):]
        pics, refs = _describe_keys(source, [str(keys[i]) for i in images])
        best = np.full(len(rows), -1.0, np.float32)
        for x, y in ((ia, ib), (ib, ia)):  # x's picture slid over y's renderings, then the other way round
            probes = Descriptors(pics.coarse[x], pics.fine[x], pics.ok[x])
            kernels = torch.from_numpy(_unit_rows(probes.fine))
            # Same-aspect renderings first; only pairs that come near a copy there are tried at every aspect.
            first = _scores(probes, refs, y, 0, kernels, SQUARE)
            near = np.flatnonzero(first >= NEAR)
            if len(near):
                sub = Descriptors(probes.coarse[near], probes.fine[near], probes.ok[near])
                first[near] = np.maximum(first[near], _scores(sub, refs, y[near], 0, kernels[near], everything))
            best = np.maximum(best, first)
        scores[rows] = best
        if on_batch:
            on_batch(len(rows))
    return scores


#: The version of the copy score's rendering and correlation: a store of another version is not reused.
COPY_SCORE_VERSION = "1"
#: A large odd multiplier: two 64-bit digest prefixes folded into one sort key (rows are matched on both).
_FOLD = np.uint64(0x9E3779B97F4A7C15)


def digest_prefixes(digests: np.ndarray) -> np.ndarray:
    """The first 64 bits of each picture's sha256 (hex), as uint64: with its partner's, a pair's identity."""
    return np.fromiter((int(str(d)[:16], 16) for d in digests), dtype=np.uint64, count=len(digests))


class CopyScoreStore:
    """Copy scores kept with the build, keyed by the pictures' contents (two digest prefixes, smaller first), so
    an update compares only pairs it has not seen: a picture that moved, or whose key changed, keeps its scores.

    Held as three columns (16 bytes a pair) sorted by a folded key; read and written as ``copy-scores.parquet``
    with the score's version in its metadata (another version is not reused)."""

    def __init__(self, a: np.ndarray | None = None, b: np.ndarray | None = None,
                 score: np.ndarray | None = None) -> None:
        a = np.empty(0, np.uint64) if a is None else np.asarray(a, np.uint64)
        b = np.empty(0, np.uint64) if b is None else np.asarray(b, np.uint64)
        score = np.empty(0, np.float32) if score is None else np.asarray(score, np.float32)
        order = np.argsort(self._fold(a, b), kind="stable")
        self.a, self.b, self.score = a[order], b[order], score[order]
        self.reused = self.added = 0

    @staticmethod
    def _fold(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return a * _FOLD + b

    @staticmethod
    def ordered(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(x, y), np.maximum(x, y)

    def lookup(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The stored score of each pair of digest prefixes, NaN where none is stored."""
        a, b = self.ordered(x, y)
        out = np.full(len(a), np.nan, np.float32)
        if not len(self.a) or not len(a):
            return out
        folded = self._fold(self.a, self.b)
        want = self._fold(a, b)
        lo = np.searchsorted(folded, want, side="left")
        hi = np.searchsorted(folded, want, side="right")
        for i in np.flatnonzero(hi > lo):  # a folded key shared by other pairs is told apart by both prefixes
            for j in range(lo[i], hi[i]):
                if self.a[j] == a[i] and self.b[j] == b[i]:
                    out[i] = self.score[j]
                    break
        return out

    def add(self, x: np.ndarray, y: np.ndarray, score: np.ndarray) -> None:
        a, b = self.ordered(x, y)
        merged = CopyScoreStore(np.concatenate([self.a, a]), np.concatenate([self.b, b]),
                                np.concatenate([self.score, np.asarray(score, np.float32)]))
        self.a, self.b, self.score = merged.a, merged.b, merged.score
        self.added += len(a)

    def save(self, path) -> None:
        import pyarrow as pa

        from ..files import write_table

        table = pa.table({"a": self.a, "b": self.b, "score": self.score})
        write_table(path, table.replace_schema_metadata({b"spp_curate.copy_score": COPY_SCORE_VERSION.encode()}))

    @classmethod
    def load(cls, path) -> "CopyScoreStore":
        """The build's store, or an empty one where there is none, it is of another version, or damaged."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if not path.is_file() or path.is_symlink():
                return cls()
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if meta.get(b"spp_curate.copy_score") != COPY_SCORE_VERSION.encode():
                return cls()
            return cls(table.column("a").to_numpy(), table.column("b").to_numpy(), table.column("score").to_numpy())
        except (OSError, KeyError, ValueError, pa.ArrowException):
            return cls()
