"""Batched exact inner-product kNN with faiss, on the GPU when faiss sees one.

Vectors are L2-normalised, so inner product is cosine similarity. Queries go
in batches so the distance block in memory is ``batch x N``, never ``N x N``.
"""

from __future__ import annotations

import faiss
import numpy as np

DEFAULT_QUERY_BATCH = 16_384


def faiss_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def flat_index(vectors: np.ndarray) -> faiss.Index:
    """An exact inner-product index over ``vectors`` (float32, C-contiguous), on GPU if possible."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    if faiss_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def knn_search(vectors: np.ndarray, k: int, batch: int = DEFAULT_QUERY_BATCH,
               on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of every row among all rows (the row itself included).

    Returns ``(similarities, positions)``, each ``(N, min(k, N))``; positions
    index into ``vectors``. ``on_batch(n)`` is called after each query batch.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    k = min(k, n)
    sims = np.empty((n, k), dtype=np.float32)
    pos = np.empty((n, k), dtype=np.int64)
    if n == 0:
        return sims, pos
    index = flat_index(vectors)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        sims[lo:hi], pos[lo:hi] = index.search(vectors[lo:hi], k)
        if on_batch:
            on_batch(hi - lo)
    return sims, pos
