"""The pair rules (DESIGN.md "Semantic pairs: what counts"), as vectorised filters.

Candidates are parallel arrays: ``anchor`` and ``positive`` (positions into
the embedding matrix), ``similarity`` and ``rank`` (1 = the anchor's nearest
other image). Each filter returns a keep-mask; :class:`Funnel` applies them in
order and records how many candidates each one removed, and the similarity
histogram of what it removed, for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HIST_BINS = np.linspace(-1.0, 1.0, 201)
#: Candidates a filter gathers at a time.
BLOCK = 1 << 22


@dataclass
class Candidates:
    anchor: np.ndarray
    positive: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray

    def __len__(self) -> int:
        return len(self.anchor)

    def select(self, mask: np.ndarray) -> "Candidates":
        return Candidates(self.anchor[mask], self.positive[mask], self.similarity[mask], self.rank[mask])


@dataclass
class Funnel:
    """Applies filters in order; remembers what each removed."""

    candidates: Candidates
    steps: list[dict] = field(default_factory=list)
    removed_hist: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.steps.append({"step": "candidates", "removed": 0, "remaining": len(self.candidates)})

    def apply(self, name: str, keep: np.ndarray) -> None:
        removed = self.candidates.similarity[~keep]
        self.removed_hist[name] = np.histogram(removed, HIST_BINS)[0].tolist()
        if not keep.all():  # a rule that removes nothing copies nothing
            self.candidates = self.candidates.select(keep)
        self.steps.append({"step": name, "removed": int((~keep).sum()), "remaining": len(self.candidates)})

    def removed(self) -> dict[str, int]:
        return {s["step"]: s["removed"] for s in self.steps[1:]}


def pair_codes(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """One int64 per ordered pair (a, b) of positions below ``n`` (one array allocated)."""
    codes = a.astype(np.int64)
    codes *= np.int64(n)
    codes += b
    return codes


def at_least(c: Candidates, min_similarity: float) -> np.ndarray:
    return c.similarity >= min_similarity


def not_near_duplicate(c: Candidates, dup_threshold: float | None, digests: np.ndarray) -> np.ndarray:
    """Drop pairs whose files are byte-identical (``digests``: each image's sha256, or its first 64 bits as
    uint64), and those at or above the embedding duplicate threshold when one is set."""
    keep = np.empty(len(c.anchor), bool)
    for lo in range(0, len(keep), BLOCK):  # a block at a time: no two N x k gathers at once
        hi = lo + BLOCK
        keep[lo:hi] = digests[c.anchor[lo:hi]] != digests[c.positive[lo:hi]]
    return keep if dup_threshold is None else keep & (c.similarity < dup_threshold)


def unordered_codes(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """One int64 per unordered pair {a, b}."""
    return pair_codes(np.minimum(a, b), np.maximum(a, b), n)


def in_sorted(codes: np.ndarray, sorted_codes: np.ndarray) -> np.ndarray:
    """Membership of each of ``codes`` in the already sorted ``sorted_codes``, by binary search (``np.isin``
    would sort them again on every call)."""
    if not len(sorted_codes):
        return np.zeros(len(codes), bool)
    at = np.searchsorted(sorted_codes, codes)
    return sorted_codes[np.minimum(at, len(sorted_codes) - 1)] == codes


def not_copy(c: Candidates, copy_codes: np.ndarray | None, n: int) -> np.ndarray:
    """Drop pairs whose pictures were found to be copies of each other (``copy_codes``: sorted unordered codes)."""
    if copy_codes is None or not len(copy_codes):
        return np.ones(len(c.anchor), bool)
    return ~in_sorted(unordered_codes(c.anchor, c.positive, n), copy_codes)


def is_mutual(c: Candidates, neighbour_codes: np.ndarray, n: int) -> np.ndarray:
    """True where the anchor is also among the positive's neighbours.

    ``neighbour_codes`` holds :func:`pair_codes` of every (query, neighbour) in
    the raw kNN lists, sorted.
    """
    return in_sorted(pair_codes(c.positive, c.anchor, n), neighbour_codes)


def top_per_anchor(c: Candidates, cap: int, partner: str = "nearest", seed: int = 0,
                   within: np.ndarray | None = None) -> np.ndarray:
    """Keep ``cap`` candidates of each anchor: its best-ranked (``nearest``), a seeded random draw (``random``)
    or its worst-ranked (``farthest``); with ``within`` (a mask), only among those candidates (the others are
    never kept), without copying the candidates out."""
    if partner != "random" and cap < 256 and len(c):
        kept = _top_by_rank(c, cap, partner == "farthest", within)
        if kept is not None:
            return kept
    if within is not None:
        keep = np.zeros(len(c), dtype=bool)
        keep[np.flatnonzero(within)[top_per_anchor(c.select(within), cap, partner, seed)]] = True
        return keep
    if partner == "random":
        key = np.random.default_rng(seed).random(len(c))
    elif partner == "farthest":
        key = -c.rank.astype(np.int64)
    else:
        key = c.rank
    order = np.lexsort((key, c.anchor))
    anchors = c.anchor[order]
    starts = np.r_[0, np.flatnonzero(anchors[1:] != anchors[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(anchors)]))
    keep = np.zeros(len(c), dtype=bool)
    keep[order[(np.arange(len(anchors)) - run_start) < cap]] = True
    return keep


def _top_by_rank(c: Candidates, cap: int, farthest: bool, within: np.ndarray | None) -> np.ndarray | None:
    """:func:`top_per_anchor` by ranks, one rank at a time with a count per anchor: a few bytes a picture and
    a mask, where sorting all N x k candidates takes several times their size. None where an anchor holds one
    rank twice (the sort then decides between them)."""
    lo, hi = int(c.rank.min()), int(c.rank.max())
    if hi - lo > 4096:
        return None
    levels = np.arange(lo, hi + 1)  # a rank no candidate holds keeps nothing
    count = np.zeros(int(c.anchor.max()) + 1 if len(c) else 0, np.uint8)
    keep = np.zeros(len(c), dtype=bool)
    for r in (levels[::-1] if farthest else levels):
        at = np.flatnonzero((c.rank == r) if within is None else (c.rank == r) & within)
        anchors = c.anchor[at]
        if len(np.unique(anchors)) != len(anchors):
            return None
        ok = count[anchors] < cap
        keep[at[ok]] = True
        count[anchors[ok]] += 1
    return keep


def balance_per_category(c: Candidates, categories: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Keep at most ``cap`` pairs per anchor category, a seeded uniform sample where there are more.

    With every category holding at least ``cap`` pairs this gives the matched
    pair counts of arXiv 2510.08722's semantic-pair vs augmented-pair study.
    """
    rng = np.random.default_rng(seed)
    cats = categories[c.anchor]
    order = np.lexsort((rng.random(len(c)), cats))
    sorted_cats = cats[order]
    starts = np.r_[0, np.flatnonzero(sorted_cats[1:] != sorted_cats[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(sorted_cats)]))
    keep = np.zeros(len(c), dtype=bool)
    keep[order[(np.arange(len(order)) - run_start) < cap]] = True
    return keep


def first_of_unordered(c: Candidates) -> np.ndarray:
    """Keep one row per unordered pair {a, b}: the best-ranked, then the lower anchor."""
    lo = np.minimum(c.anchor, c.positive)
    hi = np.maximum(c.anchor, c.positive)
    order = np.lexsort((c.anchor, c.rank, hi, lo))
    lo_s, hi_s = lo[order], hi[order]
    first = np.r_[True, (lo_s[1:] != lo_s[:-1]) | (hi_s[1:] != hi_s[:-1])][: len(c)]
    keep = np.zeros(len(c), dtype=bool)
    keep[order[first]] = True
    return keep
