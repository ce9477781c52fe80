"""How each ``--whiten`` setting changes neighbour quality and the similarity scale of a build's embeddings.

    python bench/whiten.py BUILD [BUILD ...]     # builds with embeddings (e.g. spp-curate build ... --until embed)

For every setting (none, center, pca:32, pca:64, pca:128, pca:256 where the embedding is wide enough), fitted
as the mine stage fits it: nearest-neighbour label agreement over all pictures, the precision of the 7,000
most similar nearest-neighbour pairs, and the 1st-99th percentile of nearest-neighbour similarities (the
span a threshold has to be chosen in). Exact search with faiss; one line per build and setting.

``--rerank`` adds k-reciprocal re-ranking (Zhong et al., CVPR 2017, "Re-ranking person re-identification with
k-reciprocal encoding") on top of ``center`` and of the default ``pca:128``: each picture's nearest neighbour
is taken again under ``(1 - lambda) * Jaccard + lambda * original`` distance (k1 = 20, k2 = 6, lambda = 0.3,
the paper's settings) among its 50 nearest; the top-7,000 precision ranks by that distance.

``--grow`` measures what ``--whiten keep`` changes when a source grows: the default ``pca:128`` fitted on the
build's first 90 %, 99 % of rows (the build before an update) and on all of them (the refit the default
does), both applied to all rows: how many pictures keep the same nearest neighbour, how far each nearest-
neighbour similarity moves, and the neighbour label agreement of each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from spp_curate.layout import load_embeddings
from spp_curate.pairing.whiten import fit_whitening

SETTINGS = ("none", "center", "pca:32", "pca:64", "pca:128", "pca:256")
TOP = 7000


def k_reciprocal_nearest(white: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3,
                         candidates: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest other row and its distance under k-reciprocal re-ranking, among its ``candidates``
    nearest by cosine (the usual restriction that keeps the Jaccard term sparse)."""
    from scipy import sparse

    n = len(white)
    index = faiss.IndexFlatIP(white.shape[1])
    index.add(white)
    sims, nb = index.search(white, max(candidates, k1) + 1)
    dist = np.maximum(2.0 - 2.0 * sims, 0.0)  # squared Euclidean of unit vectors
    lowest, _ = index.search(-white, 1)  # each row's farthest: the paper scales distances by it
    dist /= np.maximum(2.0 + 2.0 * lowest, 1e-12)
    top = [set(row[: k1 + 1].tolist()) for row in nb]
    half = [set(row[: k1 // 2 + 1].tolist()) for row in nb]

    def reciprocal(i: int, sets: list[set], k: int) -> set:
        return {j for j in nb[i, : k + 1].tolist() if i in sets[j]}

    rows, cols, vals = [], [], []
    for i in range(n):
        r = reciprocal(i, top, k1)
        expanded = set(r)
        for q in r:
            rq = reciprocal(q, half, k1 // 2)
            if len(rq & r) >= 2 / 3 * len(rq):
                expanded |= rq
        members = np.fromiter(expanded, dtype=np.int64)
        d = np.maximum(2.0 - 2.0 * white[members] @ white[i], 0.0)
        w = np.exp(-d)
        rows.extend([i] * len(members))
        cols.extend(members.tolist())
        vals.extend((w / w.sum()).tolist())
    v = sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))
    if k2 > 1:  # local query expansion: each row the mean of its k2 nearest rows' vectors
        expand = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2),
                                                               nb[:, :k2].reshape(-1))), shape=(n, n))
        v = expand @ v
    best, best_d = np.empty(n, np.int64), np.empty(n)
    cand, cand_d = nb[:, 1: candidates + 1], dist[:, 1: candidates + 1]
    for lo in range(0, n, 1000):
        q = np.repeat(np.arange(lo, min(lo + 1000, n)), candidates)
        g = cand[lo: lo + 1000].reshape(-1)
        diff = abs(v[q] - v[g]).sum(axis=1).A.ravel()
        sums = v[q].sum(axis=1).A.ravel() + v[g].sum(axis=1).A.ravel()
        jaccard = 1.0 - (sums - diff) / np.maximum(sums + diff, 1e-12)
        final = ((1 - lam) * jaccard + lam * cand_d[lo: lo + 1000].reshape(-1)).reshape(-1, candidates)
        pick = final.argmin(axis=1)
        best[lo: lo + 1000] = cand[lo: lo + 1000][np.arange(len(pick)), pick]
        best_d[lo: lo + 1000] = final[np.arange(len(pick)), pick]
    return best, best_d


def nearest(white: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest other row and its similarity (exact)."""
    index = faiss.IndexFlatIP(white.shape[1])
    index.add(white)
    sims, nb = index.search(white, 2)
    return sims[:, 1], nb[:, 1]


def grow(build: Path, vecs: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> None:
    sims_all, nb_all = nearest(fit_whitening(vecs, valid, "pca:128").apply(vecs))
    for share in (0.90, 0.99):
        before = valid.copy()
        before[int(share * len(vecs)):] = False  # the rows an earlier build had: new pictures come last
        sims, nb = nearest(fit_whitening(vecs, before, "pca:128").apply(vecs))
        moved = np.abs(sims - sims_all)
        print(f"{build.name:12s} pca:128 kept from {share:.0%} of the rows vs refit on all: same NN "
              f"{float((nb == nb_all).mean()):.4f}, |NN sim change| mean {moved.mean():.4f} p99 "
              f"{np.quantile(moved, 0.99):.4f} max {moved.max():.4f}; NN-agree kept "
              f"{float((labels[nb] == labels).mean()):.4f} refit {float((labels[nb_all] == labels).mean()):.4f}",
              flush=True)


def main(builds: list[str], rerank: bool = False, growing: bool = False) -> None:
    for build in map(Path, builds):
        vecs, _ = load_embeddings(build, dtype=np.float32)
        labels = pq.read_table(build / "index.parquet").column("label").to_numpy()
        valid = vecs.any(axis=1)
        if growing:
            grow(build, vecs, labels, valid)
            continue
        for spec in SETTINGS:
            if spec.startswith("pca:") and int(spec[4:]) > vecs.shape[1]:
                continue
            white = fit_whitening(vecs, valid, spec).apply(vecs)
            index = faiss.IndexFlatIP(white.shape[1])
            index.add(white)
            sims, nb = index.search(white, 2)
            sims, nb = sims[:, 1], nb[:, 1]
            agree = float((labels[nb] == labels).mean())
            order = np.argsort(-sims)[:TOP]
            top = float((labels[nb[order]] == labels[order]).mean())
            lo, hi = np.quantile(sims, [0.01, 0.99])
            print(f"{build.name:12s} {spec:7s} dim {white.shape[1]:4d} NN-agree {agree:.4f} top{TOP} {top:.4f} "
                  f"NN sim p1-p99 {lo:.3f}-{hi:.3f} span {hi - lo:.3f}", flush=True)
            if rerank and spec in ("center", "pca:128"):
                nb_r, d_r = k_reciprocal_nearest(white)
                agree_r = float((labels[nb_r] == labels).mean())
                order = np.argsort(d_r)[:TOP]
                top_r = float((labels[nb_r[order]] == labels[order]).mean())
                print(f"{build.name:12s} {spec:7s} + k-reciprocal re-ranking: NN-agree {agree_r:.4f} top{TOP} "
                      f"{top_r:.4f} (same NN as without: {float((nb_r == nb).mean()):.3f})", flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a not in ("--rerank", "--grow")], rerank="--rerank" in sys.argv[1:],
         growing="--grow" in sys.argv[1:])
