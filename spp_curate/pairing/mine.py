"""The mine stage: kNN over the embeddings, the pair rules, and ``pairs.parquet``.

With ``category=label`` the search runs within each label (every anchor gets
``k`` same-label neighbours, and the work is N^2/C instead of N^2); with
``category=none`` it runs over everything, the SePP-ID semantic sampler alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Recipe
from ..curate.embed import load_embeddings
from ..files import write_json, write_table
from ..progress import stage_progress
from . import filters as F
from .knn import faiss_gpus, knn_search

PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.int64()), ("anchor_id", pa.int64()), ("positive_id", pa.int64()),
    ("similarity", pa.float32()), ("rank", pa.int32()), ("mutual", pa.bool_()),
    ("label", pa.int32()), ("label_name", pa.string()), ("positive_label", pa.int32()),
    ("category_source", pa.string()),
])


def _search_groups(recipe: Recipe, labels: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    if recipe.category == "label":
        usable = valid & (labels >= 0)
        return [np.flatnonzero(usable & (labels == lab)) for lab in np.unique(labels[usable])]
    return [np.flatnonzero(valid)]


def raw_candidates(vecs: np.ndarray, groups: list[np.ndarray], k: int) -> F.Candidates:
    """Each position's ``k`` nearest others within its group, self excluded, with 1-based ranks."""
    parts = []
    with stage_progress("mine: kNN", int(sum(len(g) for g in groups)), unit="query") as (bar, task):
        for g in groups:
            if len(g) < 2:
                bar.update(task, advance=len(g))
                continue
            sims, nb = knn_search(vecs[g], k + 1, on_batch=lambda n: bar.update(task, advance=n))
            anchor = np.repeat(g[:, None], nb.shape[1], axis=1)
            positive = g[nb]
            is_self = positive == anchor
            rank = np.arange(1, nb.shape[1] + 1)[None, :] - np.cumsum(is_self, axis=1)
            keep = ~is_self & (rank <= k)
            parts.append(F.Candidates(anchor[keep], positive[keep], sims[keep], rank[keep].astype(np.int32)))
    if not parts:
        empty = np.empty(0, np.int64)
        return F.Candidates(empty, empty, np.empty(0, np.float32), np.empty(0, np.int32))
    return F.Candidates(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("anchor", "positive", "similarity", "rank")))


def mine_pairs(recipe: Recipe, build_dir: Path) -> dict[str, int]:
    """Write ``pairs.parquet`` and ``mine_stats.json``; return counts."""
    index = pq.read_table(build_dir / "index.parquet", columns=["id", "label", "label_name", "digest"])
    vecs, ids = load_embeddings(build_dir)
    if not np.array_equal(ids, index.column("id").to_numpy()):
        raise RuntimeError("embeddings do not cover the index row for row; rerun the embed stage")
    labels = index.column("label").to_numpy().astype(np.int64)
    names = np.asarray(index.column("label_name").to_pylist(), dtype=object)
    digests = np.asarray(index.column("digest").to_pylist(), dtype=object)
    valid = vecs.any(axis=1)
    n = len(vecs)

    cand = raw_candidates(vecs, _search_groups(recipe, labels, valid), recipe.k)
    neighbour_codes = np.sort(F.pair_codes(cand.anchor, cand.positive, n))
    funnel = F.Funnel(cand)
    funnel.apply("below_min_similarity", F.at_least(funnel.candidates, recipe.min_similarity))
    funnel.apply("near_duplicate", F.not_near_duplicate(funnel.candidates, recipe.dup_threshold, digests))
    if recipe.category == "label":
        # Searched within labels: this removes nothing, and says so in the funnel.
        funnel.apply("different_label", F.same_label(funnel.candidates, labels))
    if recipe.mutual:
        funnel.apply("not_mutual", F.is_mutual(funnel.candidates, neighbour_codes, n))
    funnel.apply("anchor_cap", F.top_per_anchor(funnel.candidates, recipe.max_per_anchor))
    funnel.apply("unordered_duplicate", F.first_of_unordered(funnel.candidates))

    kept = funnel.candidates
    order = np.lexsort((kept.rank, kept.anchor))
    kept = kept.select(order)
    mutual = F.is_mutual(kept, neighbour_codes, n)
    table = pa.table({
        "pair_id": pa.array(np.arange(len(kept)), pa.int64()),
        "anchor_id": pa.array(ids[kept.anchor], pa.int64()),
        "positive_id": pa.array(ids[kept.positive], pa.int64()),
        "similarity": pa.array(kept.similarity, pa.float32()),
        "rank": pa.array(kept.rank, pa.int32()),
        "mutual": pa.array(mutual, pa.bool_()),
        "label": pa.array(labels[kept.anchor], pa.int32()),
        "label_name": pa.array(names[kept.anchor].tolist(), pa.string()),
        "positive_label": pa.array(labels[kept.positive], pa.int32()),
        "category_source": pa.array([recipe.category] * len(kept), pa.string()),
    }, schema=PAIRS_SCHEMA)
    stats = {
        "images": int(n), "searchable": int(valid.sum()), "pairs": len(kept),
        "search": {"method": "exact", "index": "IndexFlatIP", "gpus": faiss_gpus(),
                   "scope": "within label" if recipe.category == "label" else "all images", "k": recipe.k},
        "funnel": funnel.steps,
        "hist_bins": F.HIST_BINS.tolist(),
        "kept_hist": np.histogram(kept.similarity, F.HIST_BINS)[0].tolist(),
        "removed_hist": funnel.removed_hist,
    }
    write_json(build_dir / "mine_stats.json", stats)
    write_table(build_dir / "pairs.parquet", table)
    return {"pairs": len(kept)}
