"""How much to trust a release's pairs: the weight of the partner positives in training.

A semantic positive helps when the partner truly shows the anchor's category
and hurts when it does not (arXiv 2306.16122 stresses accurate pairs). The
trainer reads the release's pair precision, from the reviews of the pairs it
ships (``review.precision_shipped``: accepted pairs count 1, the others their
band's estimate) or the reviewed random sample's estimate
(``review.precision_estimate``) when there is one, else from the
labels (``metrics.precision``), and weights every partner term by the
precision *above chance*:

    w = clip((p - c) / (1 - c), 0, 1),    c = 1 / (number of classes), 0 when unknown

so that pairs no better than random pairs of the same classes add nothing
(``both`` then trains as ``augment`` does, with the partners as extra
negatives), and perfect pairs count fully. ``--partner-weight X`` sets ``w``.

With ``--partner-trust similarity`` each pair is weighted by the precision of
its *similarity band* instead (the release's ``pair_trust`` block: the bands
the reviewed sample is drawn from, their precision from that sample, else
from the labels), so that the least similar pairs, where the sampler's
mistakes gather, count less than its most similar ones. A release without the
block, or whose pairs carry no similarity, falls back to the one weight.

The manifest is input from others: a value that is not a number in [0, 1] is
ignored, as if absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: ``--partner-trust``: one weight for every pair of the release, or each pair by its similarity band.
TRUST_MODES = ("release", "similarity")
#: Below this weight the pairs are as good as random ones: semantic positives would add nothing or hurt
#: (sampler pairs of precision 0.063 among a few dozen classes, at full weight, lowered kNN by 2 points).
NEAR_RANDOM = 0.1
#: Below this weight many pairs are wrong: measured over 3 seeds (BENCHMARKS.md), such pairs still gained,
#: by about half what accurate pairs gain on Fashion-MNIST, so the run is told, not stopped.
LOW_TRUST = 0.5


@dataclass(frozen=True)
class Trust:
    precision: float | None  # the release's pair precision, None when unknown
    source: str  # where it comes from: "reviewed sample", "labels", "given", "unknown"
    chance: float  # the precision of random pairs of the same classes
    weight: float  # the partner terms' weight, in [0, 1]
    #: With ``--partner-trust similarity``: the release's checked ``pair_trust`` block, else None.
    bands: dict[str, Any] | None = None

    def band_weights(self) -> list[float] | None:
        """The weight of each similarity band: its precision above chance (a band of unknown precision: the
        release's weight)."""
        if self.bands is None:
            return None
        return [self.weight if b["precision"] is None else weight_for(b["precision"], self.chance)
                for b in self.bands["bands"]]

    def pair_weights(self, similarity: np.ndarray | None) -> np.ndarray | None:
        """Each pair's weight from its similarity band, or None (one weight for all: ``self.weight``)."""
        weights = self.band_weights()
        if weights is None or similarity is None:
            return None
        band = np.searchsorted(np.asarray(self.bands["cuts"]), np.asarray(similarity), side="right")
        return np.asarray(weights, dtype=np.float64)[band]

    def describe(self) -> str:
        if self.source == "given":
            return f"partner weight {self.weight:.3g} (--partner-weight)"
        if self.precision is None:
            return "pair precision unknown (no labels, no reviewed sample): partner weight 1"
        text = (f"pair precision {self.precision:.3f} ({self.source}; random pairs of these classes: "
                f"{self.chance:.3f}): partner weight {self.weight:.3f}")
        if self.bands is not None:
            text += (f"; by similarity band ({self.bands['source']}), lowest to highest: "
                     + " ".join(f"{w:.2f}" for w in self.band_weights()))
        return text

    def warning(self) -> str | None:
        """What the user should hear before training, or None."""
        if self.source == "given":
            return None
        if self.precision is None:
            return ("semantic positives lower accuracy when pairs are inaccurate, and this release's precision "
                    "is unknown: estimate it on a reviewed sample (`spp-curate review BUILD --estimate 300`) "
                    "and export again, or set --partner-weight")
        times = f"{self.precision / self.chance:,.1f} times" if self.chance > 0 else "above"
        if self.weight < NEAR_RANDOM:
            return (f"most of these pairs are of two classes: precision {self.precision:.3f}, {times} the "
                    f"{self.chance:.3f} of random pairs, so semantic positives count {self.weight:.2f} of an "
                    "augmented positive and `both` trains about as `augment` does")
        if self.weight < LOW_TRUST:
            return (f"many of these pairs are of two classes: precision {self.precision:.3f}, {times} the "
                    f"{self.chance:.3f} of random pairs; semantic positives gain less on them than on accurate "
                    f"pairs, so they count {self.weight:.2f} of an augmented positive (a better sampler's pairs "
                    "would count more)")
        return None


def _fraction(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def check_partner_weight(value: Any, shown: str | None = None) -> float | None:
    """``value`` when it is None (auto) or a number from 0 to 1; a one-line error naming ``--partner-weight``."""
    from ..errors import UserError

    if value is None:
        return None
    weight = _fraction(value)
    if weight is None:
        raise UserError(f"got {(shown if shown is not None else str(value))[:40]!r}; accepted: auto, or a number "
                        "from 0 to 1", option="--partner-weight")
    return weight


def parse_partner_weight(value: str) -> float | None:
    """``auto`` (None) or a number from 0 to 1, from the command line (see :func:`check_partner_weight`)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        weight = float(text)
    except ValueError:
        weight = float("nan")  # refused below, naming what was given
    return check_partner_weight(weight, shown=str(value))


def weight_for(precision: float, chance: float) -> float:
    if chance >= 1.0:
        return 1.0 if precision >= 1.0 else 0.0
    return min(1.0, max(0.0, (precision - chance) / (1.0 - chance)))


def check_partner_trust(value: Any) -> str:
    """``value`` when it is one of :data:`TRUST_MODES`; a one-line error naming ``--partner-trust``."""
    from ..errors import UserError

    if value not in TRUST_MODES:
        raise UserError(f"got {str(value)[:40]!r}; accepted: {', '.join(TRUST_MODES)}", option="--partner-trust")
    return value


def release_trust(release: str, given: float | None, mode: str = "release") -> Trust:
    """The trust in ``release``'s pairs (its manifest, local or at the ``hf://`` revision); with ``mode``
    ``similarity`` also its precision by similarity band, where the manifest has it."""
    if given is not None:
        return Trust(None, "given", 0.0, float(given))
    precision, source, chance, bands = None, "unknown", 0.0, None
    if release.startswith("hf://"):  # the manifest at the revision the run trains on: the same trust as on disk
        from ..export.hub import fetch_release

        release = str(fetch_release(release))
    from ..export.manifest import load_manifest

    manifest = load_manifest(Path(release), option="--pairs")
    extra = manifest.model_extra or {}
    review = extra.get("review") if isinstance(extra.get("review"), dict) else {}
    metrics = extra.get("metrics") if isinstance(extra.get("metrics"), dict) else {}
    estimate = review.get("precision_estimate") if isinstance(review.get("precision_estimate"), dict) else {}
    shipped = review.get("precision_shipped") if isinstance(review.get("precision_shipped"), dict) else {}
    # the shipped pairs' precision first (a release of the accepted pairs is not the mined pairs' sample)
    for value, name in ((shipped.get("value"), "reviews of the shipped pairs"),
                        (estimate.get("value"), "reviewed sample"), (review.get("precision_released"), "labels"),
                        (metrics.get("precision"), "labels")):
        if _fraction(value) is not None:
            precision, source = _fraction(value), name
            break
    classes = len(manifest.class_names)
    chance = 1.0 / classes if classes > 1 else 0.0
    if mode == "similarity":
        from ..review.estimate import checked_band_trust

        bands = checked_band_trust(extra.get("pair_trust"))
    if precision is None:
        return Trust(None, "unknown", chance, 1.0)
    return Trust(precision, source, chance, weight_for(precision, chance), bands)
