"""How each ``--whiten`` setting changes neighbour quality and the similarity scale of a build's embeddings.

    python bench/whiten.py BUILD [BUILD ...]     # builds with embeddings (e.g. spp-curate build ... --until embed)

For every setting (none, center, pca:32, pca:64, pca:128, pca:256 where the embedding is wide enough), fitted
as the mine stage fits it: nearest-neighbour label agreement over all pictures, the precision of the 7,000
most similar nearest-neighbour pairs, and the 1st-99th percentile of nearest-neighbour similarities (the
span a threshold has to be chosen in). Exact search with faiss; one line per build and setting.
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


def main(builds: list[str]) -> None:
    for build in map(Path, builds):
        vecs, _ = load_embeddings(build, dtype=np.float32)
        labels = pq.read_table(build / "index.parquet").column("label").to_numpy()
        valid = vecs.any(axis=1)
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
                  f"NN sim p1-p99 {lo:.3f}-{hi:.3f} span {hi - lo:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
