"""Resized copies against a whole reference set: does each find its original, and does it score as a copy?

    python bench/resized_copies.py --quick   # 600 copies among the 10,000 Fashion-MNIST test pictures (Debian's)
    python bench/resized_copies.py --full    # 3,000 copies

Each copy is a test picture resized to 14-112 px (square) by one of Pillow's five common resamplers
(nearest, bilinear, bicubic, Lanczos, box), as a careless or hostile pipeline would make it. For each size
it prints the share whose original is among the exclude stage's candidates (the thumbnail search), the share
the copy score finds (the right reference at or above the threshold, 0.99 by default) and the median score.
The baseline, in the same run, is the earlier candidate thumbnail (8x8 boxed straight from the picture's own
size). Ends with one JSON line.
"""

from __future__ import annotations

import json
import time

import numpy as np
from PIL import Image

from spp_curate.curate.sources import FashionMNISTSource
from spp_curate.engine.local import LocalEngine
from spp_curate.leakage import copies

from _common import DEBIAN, SUBSET, mode_parser

SIDES = (14, 16, 18, 20, 22, 24, 26, 32, 36, 42, 48, 56, 64, 84, 112)
RESAMPLERS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
              Image.Resampling.LANCZOS, Image.Resampling.BOX)


def _in_candidates(pictures, references, truth) -> np.ndarray:
    cand = copies.candidates(pictures, references, LocalEngine(), 8 * 10**9)
    return np.array([t in row for t, row in zip(truth, cand)])


def main(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=0.99)
    args = parser.parse_args(argv)
    root = args.root or (DEBIAN if DEBIAN.is_dir() else SUBSET)
    refs = [Image.fromarray(a) for a in FashionMNISTSource(str(root), "test").images]
    rng = np.random.default_rng(1)
    truth = rng.choice(len(refs), 3000 if args.full else 600, replace=False)
    sides = rng.choice(SIDES, len(truth))
    pictures = [refs[i].resize((int(s), int(s)), RESAMPLERS[n % len(RESAMPLERS)])
                for n, (i, s) in enumerate(zip(truth, sides))]
    started = time.perf_counter()
    references, described = copies.describe(refs, True), copies.describe(pictures, False)
    found_now = _in_candidates(described, references, truth)
    scores, rows = copies.copy_scores(described, references, LocalEngine())
    seconds = time.perf_counter() - started
    # the baseline: thumbnails boxed straight down from each picture's own size
    thumbnail = copies._thumbnail
    copies._thumbnail = lambda image: copies._gray(image, copies.COARSE, Image.Resampling.BOX)
    try:
        found_before = _in_candidates(copies.describe(pictures, False), copies.describe(refs, True), truth)
    finally:
        copies._thumbnail = thumbnail
    caught = (scores >= args.threshold) & (rows == truth)
    print(f"{len(truth):,} resized copies among {len(refs):,} reference pictures ({root}), threshold "
          f"{args.threshold}; {seconds:.1f} s to describe and score")
    print("| side (px) | copies | original among candidates | (earlier thumbnail) | found as a copy | median score |")
    print("|---|---|---|---|---|---|")
    per_side = {}
    for side in SIDES:
        m = sides == side
        per_side[int(side)] = {"copies": int(m.sum()), "candidates": round(float(found_now[m].mean()), 3),
                               "candidates_before": round(float(found_before[m].mean()), 3),
                               "found": round(float(caught[m].mean()), 3),
                               "median_score": round(float(np.median(scores[m])), 4)}
        r = per_side[int(side)]
        print(f"| {side} | {r['copies']} | {r['candidates']:.3f} | {r['candidates_before']:.3f} | {r['found']:.3f} "
              f"| {r['median_score']:.4f} |")
    result = {"copies": int(len(truth)), "references": len(refs), "threshold": args.threshold,
              "candidates": round(float(found_now.mean()), 4), "candidates_before": round(float(found_before.mean()), 4),
              "found": round(float(caught.mean()), 4), "seconds": round(seconds, 1), "per_side": per_side}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
