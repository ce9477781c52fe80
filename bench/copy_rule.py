"""The copy rule on mined pairs (``pairing/duplicates.py``): pairs scored per CPU-second from the copy
descriptors the embed stage keeps, against the previous rule (decode both pictures of every pair again and
render them with Pillow), in the same run.

    python bench/copy_rule.py --quick   # the committed subset: 3,000 pictures, each with its 2 nearest
    python bench/copy_rule.py --full    # 20,000 Fashion-MNIST training pictures (Debian's), 2 neighbours each

Two sets of pairs: each picture's nearest neighbours by raw pixels (Fashion-MNIST's centred silhouettes are
the hard case: most score above 0.8 and are tried at every aspect) and random pairs (what natural pictures'
neighbours look like to the copy score: few come near a copy). The previous rule's time includes decoding
the pictures, as it did per pair batch; the rule's does not (the embed stage made the descriptors while
decoding for the encoder: their cost is measured apart, per picture). CPU seconds are user + sys of this
process, torch on one thread. Decisions at the default threshold (0.993) are compared pair by pair. Ends
with one JSON line.
"""

from __future__ import annotations

import itertools
import json
import resource

import faiss
import numpy as np
import torch

from spp_curate.curate.sources import FashionMNISTSource
from spp_curate.images import load_image
from spp_curate.leakage import copies
from spp_curate.pairing import duplicates

from _common import DEBIAN, SUBSET, mode_parser

THRESHOLD = 0.993


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def previous_rule(source, keys, a, b) -> np.ndarray:
    """The rule before descriptors: both pictures of every batch of pairs decoded again and rendered at
    every size with Pillow, then scored (``leakage/copies.py``'s correlation)."""
    every = list(range(len(copies.FINE_SIZES)))
    square = [j for j, (w, h) in enumerate(copies.FINE_SIZES) if w == h]
    scores = np.full(len(a), -1.0, np.float32)
    for lo in range(0, len(a), duplicates.PAIR_BATCH):
        rows = np.arange(lo, min(len(a), lo + duplicates.PAIR_BATCH))
        images, where = np.unique(np.concatenate([a[rows], b[rows]]), return_inverse=True)
        ia, ib = where[: len(rows)], where[len(rows):]
        refs = copies.describe([load_image(source, str(keys[i]), draft_size=copies.DRAFT) for i in images],
                               reference=True, coarse=False)
        own = int(copies.FINE_OFFSETS[1])
        pics = copies.Descriptors(refs.coarse, refs.fine[:, :own], refs.ok)
        best = np.full(len(rows), -1.0, np.float32)
        for x, y in ((ia, ib), (ib, ia)):
            probes = copies.Descriptors(pics.coarse[x], pics.fine[x], pics.ok[x])
            kernels = torch.from_numpy(copies._unit_rows(probes.fine))
            first = copies._scores(probes, refs, y, 0, kernels, square)
            near = np.flatnonzero(first >= duplicates.NEAR)
            if len(near):
                sub = copies.Descriptors(probes.coarse[near], probes.fine[near], probes.ok[near])
                first[near] = np.maximum(first[near], copies._scores(sub, refs, y[near], 0, kernels[near], every))
            best = np.maximum(best, first)
        scores[rows] = best
    return scores


def rule(descriptors, a, b) -> np.ndarray:
    out = np.full(len(a), -1.0, np.float32)
    order = np.argsort(a, kind="stable")
    for lo in range(0, len(a), duplicates.PAIR_BATCH):  # the units CopyWork is handed
        rows = order[lo: lo + duplicates.PAIR_BATCH]
        images, where = np.unique(np.concatenate([a[rows], b[rows]]), return_inverse=True)
        out[rows] = duplicates.score_pairs(descriptors[images], where[: len(rows)], where[len(rows):])
    return out


def main() -> None:
    parser = mode_parser(__doc__)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.root or (DEBIAN if args.full or not SUBSET.exists() else SUBSET)
    source = FashionMNISTSource(str(root), split="train")
    keys = np.array([k for k, _ in itertools.islice(source.items(), 20_000 if args.full else 3_000)])
    decoded = [load_image(source, k, draft_size=copies.DRAFT) for k in keys]
    t0 = cpu()
    descriptors = np.stack([duplicates.copy_descriptor(image) for image in decoded])
    describe_s = cpu() - t0
    pixels = np.stack([np.asarray(i.convert("L"), np.float32).reshape(-1) for i in decoded])
    faiss.normalize_L2(pixels)
    index = faiss.IndexFlatIP(pixels.shape[1])
    index.add(pixels)
    _, nb = index.search(pixels, 3)
    rng = np.random.default_rng(0)
    sets = {"neighbours": (np.repeat(np.arange(len(keys)), 2), nb[:, 1:].reshape(-1)),
            "random": (rng.integers(0, len(keys), 2 * len(keys)), rng.integers(0, len(keys), 2 * len(keys)))}
    rule(descriptors, sets["random"][0][:100], sets["random"][1][:100])  # first calls outside the timing
    out: dict = {"pictures": int(len(keys)), "describe_us_per_picture": round(1e6 * describe_s / len(keys), 1)}
    for name, (a, b) in sets.items():
        t0 = cpu()
        now = rule(descriptors, a, b)
        now_s = cpu() - t0
        t0 = cpu()
        before = previous_rule(source, keys, a, b)
        before_s = cpu() - t0
        same = float(np.mean((now >= THRESHOLD) == (before >= THRESHOLD)))
        print(f"{name}: {len(a):,} pairs ({np.mean(now >= duplicates.NEAR):.1%} above {duplicates.NEAR}): "
              f"{len(a) / now_s:,.0f} pairs/CPU-s; previous rule {len(a) / before_s:,.0f}; "
              f"{before_s / now_s:.1f}x; same decision at {THRESHOLD}: {same:.4f}; "
              f"median |difference| {np.median(np.abs(now - before)):.4f}")
        out[name] = {"pairs": int(len(a)), "pairs_per_cpu_s": round(len(a) / now_s, 1),
                     "previous_pairs_per_cpu_s": round(len(a) / before_s, 1), "speedup": round(before_s / now_s, 2),
                     "same_decision": round(same, 5), "above_near": round(float(np.mean(now >= duplicates.NEAR)), 3),
                     "copies_now": int((now >= THRESHOLD).sum()), "copies_before": int((before >= THRESHOLD).sum())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
