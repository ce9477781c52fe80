"""Similarity thresholds a person can choose: quantiles resolved on the build's candidates, and the curve
of pairs, precision and coverage against the minimum similarity.

On a random-init or self-trained encoder the similarities crowd into a narrow
band, so an absolute ``--min-similarity`` means little; ``q0.2`` (drop the
weakest fifth of the candidates) means the same thing on any encoder. The curve
says what each choice would give, so the threshold is read off a plot rather
than guessed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import Recipe, check_threshold_order, option_name, resolve_threshold
from . import filters as F

CURVE_POINTS = 101


def resolve_thresholds(recipe: Recipe, similarities: np.ndarray) -> dict[str, dict[str, Any]]:
    """``min_similarity`` and ``dup_threshold`` as given and as values (quantiles of ``similarities``)."""
    resolved = {field: {"given": str(getattr(recipe, field)),
                        "value": None if getattr(recipe, field) is None else
                        resolve_threshold(getattr(recipe, field), similarities, option_name(field))}
                for field in ("min_similarity", "dup_threshold")}
    check_threshold_order(resolved["min_similarity"]["value"], resolved["dup_threshold"]["value"])
    return resolved


def eligible_pairs(c: F.Candidates, cap: int, within: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unordered pairs the rules would keep at *some* minimum similarity, each with the similarity at
    which it enters: ``(a, b, similarity)``.

    ``c`` holds the candidates that passed every rule but the minimum similarity and the caps (or those of
    them ``within`` marks). Within an
    anchor, similarity falls as rank grows, so the candidates at or above a threshold are a prefix of the
    anchor's list and the anchor cap keeps its first ``cap``: a candidate past position ``cap`` never
    survives, whatever the threshold. An unordered pair enters with the larger similarity of its two rows.
    """
    chosen = np.flatnonzero(F.top_per_anchor(c, cap, within=within))
    lo = np.minimum(c.anchor[chosen], c.positive[chosen])
    hi = np.maximum(c.anchor[chosen], c.positive[chosen])
    sims = c.similarity[chosen].astype(np.float64)
    by = np.lexsort((-sims, hi, lo))
    lo, hi, sims = lo[by], hi[by], sims[by]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if len(lo) else np.empty(0, bool)
    return lo[first], hi[first], sims[first]


def threshold_curve(c: F.Candidates, cap: int, labels: np.ndarray, n_images: int, current: float,
                    points: int = CURVE_POINTS, within: np.ndarray | None = None) -> dict[str, Any]:
    """Pairs, precision (labels agree, where both are known) and coverage against the minimum similarity.

    Thresholds are quantiles of the eligible pairs' similarities (the band they crowd into gets the
    points) and the current threshold; each point is exactly what the rules would keep there, before any
    per-class cap.
    """
    a, b, sims = eligible_pairs(c, cap, within)
    order = np.argsort(-sims, kind="stable")
    a, b, sims = a[order], b[order], sims[order]
    grid = np.unique(np.r_[np.quantile(sims, np.linspace(0, 1, points)) if len(sims) else [], current])
    taken = np.searchsorted(-sims, -grid, side="right")  # pairs with similarity >= each threshold
    known = (labels[a] >= 0) & (labels[b] >= 0)
    agree = np.cumsum(known & (labels[a] == labels[b]))
    labelled = np.cumsum(known)
    # An image is covered from the first (largest) threshold at which one of its pairs enters.
    entry = np.full(n_images, -np.inf)
    np.maximum.at(entry, a, sims)
    np.maximum.at(entry, b, sims)
    entries = np.sort(entry[np.isfinite(entry)])[::-1]
    covered = np.searchsorted(-entries, -grid, side="right")
    has_labels = bool(known.any())
    precision = [None if not has_labels or t == 0 or labelled[t - 1] == 0 else float(agree[t - 1] / labelled[t - 1])
                 for t in taken]
    return {"threshold": grid.tolist(), "pairs": taken.tolist(), "precision": precision if has_labels else None,
            "coverage": (covered / max(n_images, 1)).tolist(), "current": float(current),
            "note": "each point is what the rules keep at that minimum similarity, before any per-class cap"}
