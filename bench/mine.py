"""Benchmark pair mining: faiss kNN + the pair rules against scikit-learn's brute-force cosine kNN.

    python bench/mine.py --quick          # 200,000 x 512 synthetic clustered vectors, CPU
    python bench/mine.py --full           # 1,281,167 x 512, exact top-32 (a GPU: faiss-gpu, else torch)

Prints a table of IVF recall against time, the filters' overhead over raw
faiss search, and a final JSON line:
{"figure": <vectors/s>, "unit": "vectors/s", "baseline": "sklearn-brute-cosine", "ratio": <x>}.
The baseline runs in the same process on the same vectors, on a sample of
queries (all of them would take many minutes); both figures are queries
answered per second.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from spp_curate.config import Recipe
from spp_curate.engine.local import LocalEngine
from spp_curate.pairing.knn import (SearchPlan, build_faiss_index, faiss_gpus, ivf_recall, plan_search, search,
                                    torch_knn)
from spp_curate.pairing.mine import apply_rules


LOCAL = LocalEngine()


def clustered_vectors(n: int, d: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``clusters`` random centres, so that neighbours are meaningful."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    vecs = centres[labels] + rng.standard_normal((n, d), dtype=np.float32) * 1.2
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs.astype(np.float32), labels


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mine(vecs: np.ndarray, k: int, plan: SearchPlan, recipe: Recipe):
    """kNN + rules exactly as the mine stage does them; returns (pairs, seconds search, seconds total)."""
    from spp_curate.pairing import filters as F

    t0 = time.perf_counter()
    if plan.backend == "torch":  # a GPU machine whose faiss has none: exact search through torch, as mine does
        sims, nb = torch_knn(vecs, k + 1, plan.device)
    else:
        index = build_faiss_index(vecs, plan)
        sims, nb = search(index, vecs, k + 1, LOCAL)
    t_search = time.perf_counter() - t0
    n = len(vecs)
    anchor = np.repeat(np.arange(n)[:, None], nb.shape[1], axis=1)
    found = nb >= 0
    is_self = nb == anchor
    rank = np.arange(1, nb.shape[1] + 1)[None, :] - np.cumsum(is_self, axis=1)
    keep = found & ~is_self & (rank <= k)
    cand = F.Candidates(anchor[keep], nb[keep], sims[keep], rank[keep].astype(np.int32))
    kept = apply_rules(recipe, cand, n, np.arange(n), np.zeros(n, np.int64)).kept
    return kept, nb, t_search, time.perf_counter() - t0


def sklearn_baseline(vecs: np.ndarray, k: int, queries: int) -> float:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute", n_jobs=-1).fit(vecs)
    _, seconds = timed(lambda: nn.kneighbors(vecs[:queries]))
    return queries / seconds


def recall_table(vecs: np.ndarray, k: int, base: SearchPlan, sample: int) -> list[dict]:
    rows = []
    exact = build_faiss_index(vecs, SearchPlan("flat", device=base.device))
    (_, _), t = timed(lambda: search(exact, vecs[:sample], k + 1, LOCAL))
    rows.append({"index": "flat (exact)", "nprobe": "-", "queries_per_s": round(sample / t), "recall_at_k": 1.0})
    index = build_faiss_index(vecs, base)
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        if nprobe > base.nlist:
            break
        index.nprobe = nprobe
        (_, nb), t = timed(lambda: search(index, vecs[:sample], k + 1, LOCAL))
        rec = ivf_recall(vecs, nb[:500], rows=np.arange(500))
        rows.append({"index": base.kind, "nprobe": nprobe, "queries_per_s": round(sample / t),
                     "recall_at_k": round(rec, 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="200,000 x 512 on the CPU (default)")
    mode.add_argument("--full", action="store_true", help="1,281,167 x 512, exact top-32")
    ap.add_argument("--n", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--baseline-queries", type=int, default=10_000)
    ap.add_argument("--exact", action="store_true", help="exact search whatever the size (as --full does)")
    args = ap.parse_args()
    n = args.n or (1_281_167 if args.full else 200_000)
    k = args.k or (32 if args.full else 16)
    d = 512
    vecs, labels = clustered_vectors(n, d, clusters=1000)
    recipe = Recipe(name="bench", source="fashion-mnist", category="none", k=k, min_similarity=0.0,
                    dup_threshold=0.999, max_per_anchor=2)
    # exact: faiss on its GPU, torch on CUDA where faiss has no GPU (faiss-cpu), faiss on the CPU otherwise
    plan = plan_search(n, d, 64 * 10**9, kind="flat" if args.full or args.exact else "auto")
    print(f"{n:,} x {d} vectors, k={k}, faiss GPUs: {faiss_gpus()}, plan: {plan.describe()}")

    kept, nb, t_search, t_total = mine(vecs, k, plan, recipe)
    roofline = None
    if plan.backend == "torch":  # the same blocked products alone, in the same run: the search's roofline
        _, t_matmul = timed(lambda: torch_knn(vecs, k + 1, plan.device, matmul_only=True))
        flops = 2.0 * n * n * d
        roofline = {"matmul_s": round(t_matmul, 3), "search_over_matmul": round(t_search / t_matmul, 2),
                    "matmul_tflops": round(flops / t_matmul / 1e12, 1)}
        print(f"roofline: the blocked products alone take {t_matmul:.2f} s ({roofline['matmul_tflops']} TFLOP/s); "
              f"the search {t_search:.2f} s is {roofline['search_over_matmul']}x that")
    recall = ivf_recall(vecs, nb[:, :k + 1], 1000) if plan.kind != "flat" else 1.0
    precision = float((labels[kept.anchor] == labels[kept.positive]).mean())
    ours = n / t_total
    print(f"ours: {len(kept):,} pairs in {t_total:.2f} s ({ours:,.0f} vectors/s); raw faiss search {t_search:.2f} s, "
          f"filters add {100 * (t_total - t_search) / t_search:.1f} %; recall@{k + 1} {recall:.4f}; "
          f"pair precision {precision:.4f}")

    if plan.kind != "flat":
        print("\n| index | nprobe | queries/s | recall@k |\n|---|---|---|---|")
        for row in recall_table(vecs, k, plan, sample=20_000):
            print(f"| {row['index']} | {row['nprobe']} | {row['queries_per_s']:,} | {row['recall_at_k']} |")

    base = sklearn_baseline(vecs, k, min(args.baseline_queries, n))
    print(f"\nbaseline: scikit-learn NearestNeighbors(brute, cosine) {base:,.0f} vectors/s "
          f"on {min(args.baseline_queries, n):,} queries")
    print(json.dumps({"figure": round(ours, 1), "unit": "vectors/s", "baseline": "sklearn-brute-cosine",
                      "ratio": round(ours / base, 2), "filter_overhead": round((t_total - t_search) / t_search, 4),
                      "recall": round(recall, 4), "n": n, "k": k, "index": plan.kind,
                      "backend": f"{plan.backend} on {plan.device}", "search_s": round(t_search, 3),
                      "mine_s": round(t_total, 3), **({"roofline": roofline} if roofline else {})}))


if __name__ == "__main__":
    main()
