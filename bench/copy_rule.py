"""The copy rule on mined pairs (``pairing/duplicates.py``): pairs compared per second, against the previous
way of describing the pictures, in the same run.

    python bench/copy_rule.py --quick   # the committed subset: 3,000 pictures, each with its 2 nearest
    python bench/copy_rule.py --full    # 20,000 Fashion-MNIST training pictures (Debian's), 2 neighbours each

The pairs are each picture's nearest neighbours by raw pixels (the copy rule compares whatever pairs the
other rules keep; neighbours are the hard case, most of them scoring above 0.8 and so tried at every aspect).
The baseline renders each picture as the rule did before: thumbnails of it and its ten crops (which only the
leakage check's candidate search reads), its 24x24 rendering apart from its reference renderings, and a
grayscale conversion per rendering. Both paths score with the same code, and the scores must be equal
bit for bit. Ends with one JSON line.
"""

from __future__ import annotations

import itertools
import json
import time

import faiss
import numpy as np
from PIL import Image

from spp_curate.curate.sources import FashionMNISTSource
from spp_curate.images import load_image
from spp_curate.leakage import copies
from spp_curate.pairing import duplicates

from _common import DEBIAN, SUBSET, mode_parser


def previous_describe(source, keys):
    """The rule's earlier descriptors: picture and reference described apart, thumbnails included, every
    rendering converted to grayscale on its own."""
    def gray(image, size):
        size = (size, size) if isinstance(size, int) else size
        return np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.uint8).reshape(-1)

    def thumb(image):
        g = image.convert("L").resize((copies.FINE, copies.FINE), Image.Resampling.BILINEAR)
        return np.asarray(g.resize((copies.COARSE, copies.COARSE), Image.Resampling.BOX), dtype=np.uint8).reshape(-1)

    images = [load_image(source, key, draft_size=copies.DRAFT) for key in keys]
    pics = copies.Descriptors(np.stack([thumb(i) for i in images]), np.stack([gray(i, copies.FINE) for i in images]),
                              np.ones(len(images), bool))
    refs = copies.Descriptors(np.stack([np.stack([thumb(v) for v in copies._crops(i)]) for i in images]),
                              np.stack([np.concatenate([gray(i, m) for m in copies.FINE_SIZES]) for i in images]),
                              np.ones(len(images), bool))
    return pics, refs


def main() -> None:
    parser = mode_parser(__doc__)
    args = parser.parse_args()
    full = args.full
    root = args.root or (DEBIAN if full or not SUBSET.exists() else SUBSET)
    source = FashionMNISTSource(str(root), split="train")
    keys = np.array([k for k, _ in itertools.islice(source.items(), 20_000 if full else None)])
    pixels = np.stack([np.asarray(load_image(source, k).convert("L"), np.float32).reshape(-1) for k in keys])
    faiss.normalize_L2(pixels)
    index = faiss.IndexFlatIP(pixels.shape[1])
    index.add(pixels)
    _, nb = index.search(pixels, 3)
    a = np.repeat(np.arange(len(keys)), 2)
    b = nb[:, 1:].reshape(-1)

    def timed(describe) -> tuple[float, np.ndarray]:
        original = duplicates._describe_keys
        duplicates._describe_keys = describe  # the baseline: the same scoring on other descriptors
        try:
            t0 = time.perf_counter()
            got = duplicates.pair_copy_scores(source, keys, a, b)
            return time.perf_counter() - t0, got
        finally:
            duplicates._describe_keys = original

    duplicates.pair_copy_scores(source, keys, a[:200], b[:200])  # imports and first calls, outside the timing
    runs, got = {"now": [], "before": []}, {}
    for _ in range(2):  # alternated, the best of two each: machines here are noisy
        for name, describe in (("now", duplicates._describe_keys), ("before", previous_describe)):
            seconds, got[name] = timed(describe)
            runs[name].append(seconds)
    scores, before = got["now"], got["before"]
    now_s, before_s = min(runs["now"]), min(runs["before"])
    same = bool(np.array_equal(scores, before))
    print(f"{len(a):,} pairs of {len(keys):,} pictures: {len(a) / now_s:,.0f} pairs/s; previous descriptors "
          f"{len(a) / before_s:,.0f} pairs/s; {before_s / now_s:.2f}x; scores equal: {same}")
    print(json.dumps({"pairs": int(len(a)), "pairs_s": round(len(a) / now_s, 1),
                      "previous_pairs_s": round(len(a) / before_s, 1), "speedup": round(before_s / now_s, 3),
                      "scores_equal": same, "above_near": round(float((scores >= duplicates.NEAR).mean()), 3)}))
    if not same:
        raise SystemExit("the scores differ from the previous descriptors'")


if __name__ == "__main__":
    main()
