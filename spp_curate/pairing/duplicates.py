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
