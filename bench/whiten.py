"""How each ``--whiten`` setting changes neighbour quality and the similarity scale of a build's embeddings.

    python bench/whiten.py BUILD [BUILD ...]     # builds with embeddings (e.g. spp-curate build ... --until embed)

For every setting (none, center, pca:32, pca:64, pca:128, pca:256 where the embedding is wide enough), fitted
as the mine stage fits it: nearest-neighbour label agreement over all pictures, the precision of the 7,000
most similar nearest-neighbour pairs, and the 1st-99th percentile of nearest-neighbour similarities (the
span a threshold has to be chosen in). Exact search with faiss; one line per build and setting.
"""

import sys, numpy as np, pyarrow.parquet as pq, faiss
from spp_curate.layout import load_embeddings
from spp_curate.pairing.whiten import fit_whitening
for build in sys.argv[1:]:
    from pathlib import Path; v, ids = load_embeddings(Path(build), dtype=np.float32)
    labels = pq.read_table(f"{build}/index.parquet").column("label").to_numpy()
    valid = v.any(1)
    for spec in ["none", "center", "pca:32", "pca:64", "pca:128", "pca:256"]:
        if spec.startswith("pca:") and int(spec[4:]) > v.shape[1]: continue
        w = fit_whitening(v, valid, spec).apply(v)
        idx = faiss.IndexFlatIP(w.shape[1]); idx.add(w)
        s, nb = idx.search(w, 17)
        s, nb = s[:, 1:], nb[:, 1:]
        agree1 = (labels[nb[:, 0]] == labels).mean()
        # precision at fixed pair count: best rank-1 neighbour pairs ranked by similarity, top 10000
        order = np.argsort(-s[:, 0])
        p_top = (labels[nb[order[:7000], 0]] == labels[order[:7000]]).mean()
        q = np.quantile(s[:, 0], [0.01, 0.99])
        print(f"{build.split('/')[-1]:5s} {spec:7s} dim {w.shape[1]:4d} NN-agree {agree1:.4f} top7000 {p_top:.4f} NN sim p1-p99 {q[0]:.3f}-{q[1]:.3f} span {q[1]-q[0]:.3f}")
