"""A release's pair precision without labels: a stratified random sample judged by people, and its interval.

**The sample.** The build's pairs are cut into similarity bands at quantiles of their similarities
(``BAND_EDGES``: narrower bands at the bottom, where mistakes live), and each band's pairs are put in a
seeded random order. The review page in estimate mode (``spp-curate review DIR --estimate``) shows them
round-robin over the bands, lowest band first: equal allocation, so each low band is sampled far beyond its
share. The reviewer never chooses which pair comes next. Each decision is stored in ``reviews.parquet`` with
``sample`` set and its ``band`` and ``draw`` (position in the plan), so an estimate can be recomputed and
audited from the file alone.

**The estimator** (stratified sampling, Cochran, *Sampling Techniques*, ch. 5): with ``W_h`` the share of the
release's pairs in band ``h``, ``n_h`` the band's sample pairs judged (a ``skip`` is not a judgement) and
``a_h`` those accepted, the precision is ``p = sum_h W_h a_h / n_h``. Its interval is the Korn-Graubard
interval (Korn and Graubard 1998, "Confidence intervals for proportions with small expected number of
positive counts estimated from survey data"): a Clopper-Pearson (exact binomial) interval on the effective
sample size ``n_eff = p (1 - p) / v``, where ``v = sum_h W_h^2 q_h (1 - q_h) / n_h`` is the stratified
variance with each band's proportion taken as ``q_h = (a_h + 1/2) / (n_h + 1)``, so that a band judged all
good or all bad still counts as uncertain. This stays honest for small samples and for precisions near 1,
where the normal interval is too narrow. No estimate is given before every band has a judged pair.

**Several reviewers** combine as ``store.consensus`` combines them (a pair is bad if any reviewer rejected it);
their agreement is Cohen's kappa on the sample pairs two of them judged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

#: Band edges as quantiles of the pairs' similarities: 10 %, 15 %, 25 %, 25 %, 25 % of the release.
BAND_EDGES = (0.0, 0.10, 0.25, 0.50, 0.75, 1.0)
METHOD = ("stratified by similarity band (equal allocation, seeded order), Korn-Graubard interval "
          "(Clopper-Pearson on the effective sample size)")
#: Where the page stops asking when no other width is given: an interval this narrow on either side.
DEFAULT_HALF_WIDTH = 0.03


def bands_of(similarity: np.ndarray, edges: tuple[float, ...] = BAND_EDGES) -> np.ndarray:
    """The band of each pair (0 = lowest similarities), cut at quantiles of these similarities."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if not len(similarity):
        return np.empty(0, np.int32)
    cuts = np.quantile(similarity, edges[1:-1])
    return np.searchsorted(cuts, similarity, side="right").astype(np.int32)


def sample_plan(pair_keys: np.ndarray, similarity: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """The order in which estimate mode shows pairs: columns ``key``, ``band``, ``draw`` (0, 1, ...).

    Depends on the pairs (their keys and similarities) and the seed alone, never on who reviews or when."""
    keys = np.asarray(pair_keys, dtype=object)
    band = bands_of(similarity)
    order = np.argsort(keys, kind="stable")  # the same pairs in any row order give the same plan
    keys, band = keys[order], band[order]
    rng = np.random.default_rng([seed, 2306])
    queues = [rng.permutation(np.flatnonzero(band == h)) for h in range(len(BAND_EDGES) - 1)]
    drawn: list[int] = []
    depth = max((len(q) for q in queues), default=0)
    for r in range(depth):  # round-robin over the bands, lowest first
        drawn.extend(int(q[r]) for q in queues if r < len(q))
    drawn_arr = np.asarray(drawn, dtype=np.int64)
    return pd.DataFrame({"key": keys[drawn_arr], "band": band[drawn_arr],
                         "draw": np.arange(len(drawn_arr), dtype=np.int64)})


@dataclass
class Estimate:
    """What the release and the page say of the estimate."""

    value: float | None
    low: float | None
    high: float | None
    confidence: float
    pairs_reviewed: int
    bands: list[dict[str, Any]]
    method: str = METHOD
    reviewers: list[str] = field(default_factory=list)
    kappa: float | None = None
    pairs_judged_by_two: int = 0

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stratified_interval(shares: np.ndarray, accepted: np.ndarray, judged: np.ndarray,
                        confidence: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """``(p, low, high)``: the stratified precision and its Korn-Graubard interval (None until every band with
    pairs has a judgement)."""
    from scipy.stats import beta

    shares, accepted, judged = (np.asarray(x, dtype=np.float64) for x in (shares, accepted, judged))
    live = shares > 0
    if not live.any() or (judged[live] == 0).any():
        return None, None, None
    shares, accepted, judged = shares[live] / shares[live].sum(), accepted[live], judged[live]
    p = float(np.sum(shares * accepted / judged))
    q = (accepted + 0.5) / (judged + 1.0)
    variance = float(np.sum(shares ** 2 * q * (1 - q) / judged))
    n_eff = min(float(judged.sum()), p * (1 - p) / variance) if variance > 0 else float(judged.sum())
    # p in {0, 1} exactly: take the effective size from the shrunk proportions instead
    if p in (0.0, 1.0):
        pq = float(np.sum(shares * q))
        n_eff = min(float(judged.sum()), pq * (1 - pq) / variance)
    x = p * n_eff
    alpha = 1 - confidence
    low = 0.0 if x <= 0 else float(beta.ppf(alpha / 2, x, n_eff - x + 1))
    high = 1.0 if x >= n_eff else float(beta.ppf(1 - alpha / 2, x + 1, n_eff - x))
    return p, low, high


def cohen_kappa(first: np.ndarray, second: np.ndarray) -> float | None:
    """Cohen's kappa of two raters' accept/reject judgements on the same pairs."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if not len(first):
        return None
    observed = float(np.mean(first == second))
    p1, p2 = first.mean(), second.mean()
    expected = float(p1 * p2 + (1 - p1) * (1 - p2))
    return 1.0 if expected == 1.0 else (observed - expected) / (1 - expected)


def _judged(reviews: pd.DataFrame, keys: dict | set) -> pd.DataFrame:
    """Each reviewer's last sample decision on the pairs in ``keys``, skips left out."""
    from . import store

    if "sample" not in reviews or not len(reviews):
        return store.last_decisions(reviews.iloc[:0])
    last = store.last_decisions(reviews[reviews["sample"].fillna(False).astype(bool)])
    keep = np.asarray([k in keys for k in last.pair.tolist()], dtype=bool) & (last.decision != "skip").to_numpy()
    return last[keep]


N_BANDS = len(BAND_EDGES) - 1


@dataclass
class Judgements:
    """The pairs' bands and similarities, and the sample's verdict on the judged ones, row for row."""

    band: np.ndarray  # per pair
    similarity: np.ndarray  # per pair
    last: pd.DataFrame  # each reviewer's last sample decision on these pairs, skips left out
    row_band: np.ndarray  # per judged pair
    row_similarity: np.ndarray  # per judged pair
    good: np.ndarray  # per judged pair: accepted by the consensus
    #: per judged pair: the inverse of its chance of being drawn, from the band it was drawn in (equal within a
    #: band while the pairs are those the sample was drawn from; unequal once they were mined again)
    row_weight: np.ndarray | None = None

    @property
    def shares(self) -> np.ndarray:
        return np.bincount(self.band, minlength=N_BANDS) / max(len(self.band), 1)

    def counts(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(accepted, judged)`` per band, over the judged pairs ``rows`` selects (all by default); accepted is
        the judged count times the band's share accepted, each judgement weighted by :attr:`row_weight` (a
        whole number when the weights are equal)."""
        rows = np.ones(len(self.good), bool) if rows is None else rows
        judged = np.bincount(self.row_band[rows], minlength=N_BANDS)
        w = np.ones(len(self.good)) if self.row_weight is None else self.row_weight
        total = np.bincount(self.row_band[rows], weights=w[rows], minlength=N_BANDS)
        good = np.bincount(self.row_band[rows & self.good], weights=w[rows & self.good], minlength=N_BANDS)
        share = np.divide(good, total, out=np.zeros(N_BANDS), where=total > 0)
        accepted = share * judged
        rounded = np.round(accepted)
        return (rounded.astype(np.int64) if np.allclose(accepted, rounded, atol=1e-9) else accepted), judged

    def band_weights(self) -> np.ndarray:
        """Each judged pair's weight within its (current) band, the band's weights summing to its share."""
        w = np.ones(len(self.good)) if self.row_weight is None else self.row_weight
        total = np.bincount(self.row_band, weights=w, minlength=N_BANDS)
        return self.shares[self.row_band] * w / total[self.row_band]


def judgements(pairs: pd.DataFrame, reviews: pd.DataFrame) -> Judgements:
    """The sample decisions of ``reviews`` on ``pairs`` (columns ``key``, ``similarity``), combined by
    ``store.consensus``."""
    from . import store

    band = bands_of(pairs.similarity.to_numpy())
    sims = pairs.similarity.to_numpy(dtype=np.float64)
    facts = dict(zip(pairs.key.tolist(), zip(band.tolist(), sims.tolist())))
    last = _judged(reviews, facts)
    verdict = store.consensus(last)
    rows = [facts[k] for k in verdict.index]
    row_band = np.asarray([b for b, _ in rows], dtype=np.int64)
    return Judgements(band, sims, last, row_band, np.asarray([x for _, x in rows], dtype=np.float64),
                      (verdict == "accepted").to_numpy(bool), draw_weights(reviews, verdict.index))


def draw_weights(reviews: pd.DataFrame, judged: pd.Index) -> np.ndarray | None:
    """The inverse chance of each judged pair (``judged``: unordered keys) of having been drawn: the sample
    allocates equally over the bands *of the pairs it was drawn from* (each decision stores that band), so a
    pair drawn in band ``b`` stood for ``share_b / n_b`` of those pairs, ``n_b`` the sample pairs drawn in ``b``.
    Once the pairs are mined again their bands move, and a new band's judged pairs come from old bands with
    unequal odds: weighting each by its draw keeps the estimate unbiased (Horvitz-Thompson within each new
    band). None when decisions carry no band (every judgement then counts alike)."""
    from . import store

    if "band" not in reviews or not len(judged):
        return None
    sample = reviews[reviews["sample"].fillna(False).astype(bool) & (reviews.decision != "skip")]
    keys = store.pair_key(sample.anchor_key, sample.positive_key)
    drawn = pd.Series(pd.to_numeric(sample.band, errors="coerce").to_numpy(), index=keys)
    drawn = drawn[~drawn.index.duplicated(keep="first")].dropna()
    drawn = drawn[(drawn >= 0) & (drawn < N_BANDS)].astype(np.int64)
    share = np.diff(np.asarray(BAND_EDGES))
    per_band = np.bincount(drawn.to_numpy(), minlength=N_BANDS)
    bands = drawn.reindex(judged).to_numpy()
    if np.isnan(bands.astype(np.float64)).any():
        return None
    bands = bands.astype(np.int64)
    return share[bands] / per_band[bands]


def estimate_precision(pairs: pd.DataFrame, reviews: pd.DataFrame, confidence: float = 0.95) -> Estimate:
    """The precision of ``pairs`` (columns ``key``, the unordered image-key pair, and ``similarity``) from the
    sample decisions in ``reviews`` (``store.read_reviews``): each reviewer's last sample decision counts,
    reviewers combine by ``store.consensus``, a ``skip`` is no judgement."""
    j = judgements(pairs, reviews)
    shares = j.shares
    accepted, judged = j.counts()
    p, low, high = stratified_interval(shares, accepted, judged, confidence)
    last = j.last
    reviewers = sorted(last.reviewer.unique().tolist())
    kappa, both = None, 0
    if len(reviewers) >= 2:
        wide = last.pivot_table(index="pair", columns="reviewer", values="decision", aggfunc="last")
        best = None
        for i, r1 in enumerate(reviewers):
            for r2 in reviewers[i + 1:]:
                shared = wide[[r1, r2]].dropna()
                if best is None or len(shared) > len(best[2]):
                    best = (r1, r2, shared)
        if best is not None and len(best[2]):
            both = len(best[2])
            kappa = cohen_kappa(best[2][best[0]] == "accept", best[2][best[1]] == "accept")
    per_band = [{"band": h, "share": float(shares[h]), "judged": int(judged[h]),
                 "accepted": int(accepted[h]) if float(accepted[h]).is_integer() else round(float(accepted[h]), 4)}
                for h in range(N_BANDS)]
    return Estimate(p, low, high, confidence, int(judged.sum()), per_band, reviewers=reviewers, kappa=kappa,
                    pairs_judged_by_two=both)


def estimate_curve(pairs: pd.DataFrame, reviews: pd.DataFrame, thresholds: list[float],
                   confidence: float = 0.95) -> dict[str, list[float | None]]:
    """The reviewed sample's estimate of the precision of the pairs at or above each threshold, with its
    interval: the bands stay those of all the pairs, their shares and judged counts are those above."""
    j = judgements(pairs, reviews)
    out: dict[str, list[float | None]] = {"value": [], "low": [], "high": []}
    for t in thresholds:
        shares = np.bincount(j.band[j.similarity >= t], minlength=N_BANDS).astype(np.float64)
        p, low, high = (None, None, None) if not shares.sum() else stratified_interval(
            shares, *j.counts(j.row_similarity >= t), confidence)
        for name, v in (("value", p), ("low", low), ("high", high)):
            out[name].append(v)
    return out


def precision_threshold(pairs: pd.DataFrame, reviews: pd.DataFrame, target: float) -> dict[str, Any]:
    """The lowest similarity at which the reviewed sample says the pairs at or above it have precision >=
    ``target``: each sample judgement weighted by its band's share over its band's judged count (the inverse
    of its chance of being drawn). The same reviews give the same threshold."""
    j = judgements(pairs, reviews)
    shares = j.shares
    accepted, judged = j.counts()
    if not len(j.good) or stratified_interval(shares, accepted, judged)[0] is None:
        return {"value": None, "reviewed": int(len(j.good)), "target": target}
    weight = j.band_weights()  # shares[band] / judged[band] while the pairs are those the sample was drawn from
    order = np.argsort(-j.row_similarity, kind="stable")
    sims = j.row_similarity[order]
    good = j.good[order]
    w = weight[order]
    precision = np.cumsum(w * good) / np.cumsum(w)
    ok = np.flatnonzero(precision >= target)
    # the lowest threshold whose pairs above keep the target: the last position where it still holds
    value = float(sims[ok[-1]]) if len(ok) else None
    return {"value": value, "reviewed": int(len(j.good)), "target": target,
            "precision_at_value": float(precision[ok[-1]]) if len(ok) else None}


def _cuts(similarity: np.ndarray) -> list[float]:
    """The similarities where :func:`bands_of` cuts these pairs into bands (the inner edges)."""
    return [float(c) for c in np.quantile(np.asarray(similarity, dtype=np.float64), BAND_EDGES[1:-1])]


def bands_from_labels(similarity: np.ndarray, agree: np.ndarray, labelled: np.ndarray) -> dict[str, Any] | None:
    """The precision of each similarity band of these pairs, from their labels (``agree`` where both of a pair's
    labels are known, ``labelled``): what ``train --partner-trust similarity`` weights each pair by.

    ``{"source": "labels", "cuts": [...], "bands": [{"pairs", "judged", "precision"}]}``; a band with no
    labelled pair has precision None. None when no pair is labelled."""
    similarity = np.asarray(similarity, dtype=np.float64)
    labelled = np.asarray(labelled, dtype=bool)
    if not len(similarity) or not labelled.any() or not np.isfinite(similarity).all():
        return None
    band = bands_of(similarity)
    good = np.asarray(agree, dtype=bool) & labelled
    pairs = np.bincount(band, minlength=N_BANDS)
    judged = np.bincount(band[labelled], minlength=N_BANDS)
    accepted = np.bincount(band[good], minlength=N_BANDS)
    return {"source": "labels", "cuts": _cuts(similarity),
            "bands": [{"pairs": int(pairs[h]), "judged": int(judged[h]),
                       "precision": float(accepted[h] / judged[h]) if judged[h] else None} for h in range(N_BANDS)]}


def expected_correct(pairs: pd.DataFrame, reviews: pd.DataFrame, estimate: dict[str, Any] | None) -> np.ndarray | None:
    """Each of ``pairs``' (columns ``key``, ``similarity``) chance of being right as the reviews tell it: 1 where
    the reviewers' consensus accepted it, 0 where it rejected it, else its similarity band's share accepted in
    the reviewed sample (``estimate``: :func:`estimate_precision` of these pairs, as a dict), taken as
    ``(a + 1/2) / (n + 1)`` as the interval takes it; NaN where neither tells. None without any review."""
    from . import store

    if not len(reviews):
        return None
    verdict = store.consensus(store.last_decisions(reviews))
    state = pd.Series(pairs.key.to_numpy()).map(verdict).fillna("unreviewed").to_numpy()
    out = np.full(len(pairs), np.nan)
    if estimate and estimate.get("value") is not None and len(estimate.get("bands") or []) == N_BANDS:
        band = bands_of(pairs.similarity.to_numpy())
        share = np.asarray([(float(b["accepted"]) + 0.5) / (float(b["judged"]) + 1.0) if b["judged"] else np.nan
                            for b in estimate["bands"]])
        out = share[band]
    out[state == "accepted"] = 1.0
    out[state == "rejected"] = 0.0
    return out


def bands_from_expected(similarity: np.ndarray, expected: np.ndarray) -> dict[str, Any] | None:
    """The precision of each similarity band of these pairs from each pair's chance of being right
    (:func:`expected_correct`), bands cut on these pairs' similarities: what ``train --partner-trust
    similarity`` weights each shipped pair by."""
    similarity, expected = np.asarray(similarity, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if not len(similarity) or not np.isfinite(similarity).all() or not np.isfinite(expected).all():
        return None
    band = bands_of(similarity)
    pairs = np.bincount(band, minlength=N_BANDS)
    judged = np.bincount(band[np.isin(expected, (0.0, 1.0))], minlength=N_BANDS)  # band estimates lie inside
    total = np.bincount(band, weights=expected, minlength=N_BANDS)
    return {"source": "reviewed sample", "cuts": _cuts(similarity),
            "bands": [{"pairs": int(pairs[h]), "judged": int(judged[h]),
                       "precision": float(total[h] / pairs[h]) if pairs[h] else None} for h in range(N_BANDS)]}


def checked_band_trust(value: Any) -> dict[str, Any] | None:
    """A manifest's ``pair_trust`` block as :func:`bands_from_labels` writes it, or None where it is anything else
    (a release is input from others: a wrong count, a precision outside [0, 1], cuts that do not rise)."""
    if not isinstance(value, dict) or value.get("source") not in ("labels", "reviewed sample"):
        return None
    cuts, bands = value.get("cuts"), value.get("bands")
    if not isinstance(cuts, list) or not isinstance(bands, list) or len(cuts) != N_BANDS - 1 \
            or len(bands) != N_BANDS:
        return None

    def number(x: Any) -> float | None:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not np.isfinite(x):
            return None
        return float(x)

    checked_cuts = [number(c) for c in cuts]
    if any(c is None for c in checked_cuts) or any(b < a for a, b in zip(checked_cuts, checked_cuts[1:])):
        return None
    rows = []
    for band in bands:
        if not isinstance(band, dict):
            return None
        counts = [band.get("pairs"), band.get("judged")]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            return None
        precision = band.get("precision")
        if precision is not None and (number(precision) is None or not 0.0 <= precision <= 1.0):
            return None
        rows.append({"pairs": counts[0], "judged": counts[1],
                     "precision": None if precision is None else float(precision)})
    return {"source": value["source"], "cuts": checked_cuts, "bands": rows}
