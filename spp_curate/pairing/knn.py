"""Batched inner-product kNN with faiss: exact (Flat) when it fits, IVF beyond, on GPU when faiss sees one.
``ivf-flat``'s inverted lists hold each vector in float16, the precision the embeddings are stored in.

Vectors are L2-normalised, so inner product is cosine similarity. Queries go
in batches, so the distance block in memory is ``batch x N``, never ``N x N``.
:func:`plan_search` picks the index from the collection size and a memory
budget; :func:`ivf_recall` measures what an approximate index loses against
exact search on a sample of queries, for the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import faiss
import numpy as np

from ..errors import UserError

DEFAULT_QUERY_BATCH = 16_384
# Exact all-pairs search costs N^2 d: beyond these sizes an IVF index is used
# even when the vectors fit in memory (a CPU does ~1e11 flop/s, a GPU ~1e14).
FLAT_MAX_N = {"cpu": 100_000, "gpu": 4_000_000}


def faiss_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


@dataclass(frozen=True)
class SearchPlan:
    """Which faiss index to build, and why."""

    kind: str  # flat | ivf-flat | ivf-pq
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    device: str = "cpu"
    reason: str = ""
    #: ``faiss``, or ``torch`` for exact search on a CUDA device that faiss does not see (faiss-cpu installed)
    backend: str = "faiss"
    #: For IVF without a given ``--nprobe``: the recall@k against exact search that the search tunes
    #: ``nprobe`` to reach on a sample of queries (:func:`tune_nprobe`); 0: ``nprobe`` as given.
    recall_target: float = 0.0

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (0, "")}


def _pq_m(d: int, n: int, memory: int) -> int:
    """Largest PQ code size (bytes per vector) dividing ``d`` that fits the budget."""
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if d % m == 0 and n * (m + 8) <= memory * 0.8:
            return m
    return 4 if d % 4 == 0 else 1


#: The recall@k an IVF search is tuned to, the ``nprobe`` tuning starts from, and the queries it measures on.
RECALL_TARGET = 0.95
START_NPROBE = 8
TUNE_SAMPLE = 1000

# faiss trains an IVF quantizer on at least one point per list, and a product quantizer of 8-bit
# codes on at least 256 points; below these an approximate index cannot be built at all.
MIN_TRAIN = {"ivf-flat": 39, "ivf-pq": 256}


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def plan_search(n: int, d: int, memory: int, kind: str = "auto", nprobe: int | None = None,
                cuda: bool | None = None, flat_max_n: int | None = None) -> SearchPlan:
    """Pick exact or IVF search for ``n`` vectors of dimension ``d`` within ``memory`` bytes.

    ``auto`` searches a group too small to train an approximate index exactly (its vectors are
    few). A forced ``ivf-flat`` or ``ivf-pq`` on such a group is a :class:`UserError`. Exact search
    runs on the GPU through faiss when faiss sees one, else through torch when torch sees CUDA
    (``cuda``: whether it does; found out when None), so a GPU machine with faiss-cpu searches
    millions of vectors exactly. ``flat_max_n``: the most vectors searched exactly, where the caller's
    vectors are cheaper than embeddings (64-dim thumbnails).
    """
    on_torch = faiss_gpus() == 0 and (torch_cuda() if cuda is None else cuda)
    device = "gpu" if faiss_gpus() > 0 or on_torch else "cpu"
    flat_bytes = n * d * 4
    if kind == "auto":
        if flat_bytes <= memory and n <= (flat_max_n or FLAT_MAX_N[device]):
            kind, reason = "flat", f"{n:,} vectors fit ({flat_bytes / 1e9:.2f} GB) and exact search is affordable"
        elif flat_bytes <= memory:
            kind, reason = "ivf-flat", f"{n:,} vectors is beyond exact all-pairs search on {device}"
        else:
            kind, reason = "ivf-pq", f"{flat_bytes / 1e9:.1f} GB of vectors exceeds the {memory / 1e9:.1f} GB budget"
        if kind == "ivf-pq" and n < MIN_TRAIN[kind]:
            raise UserError(f"{n:,} vectors of {d} dims need {flat_bytes:,} bytes for exact search and are too few "
                            f"to train a compressed (IVF-PQ) index; give a budget of at least {flat_bytes:,} bytes",
                            option="--memory")
        if kind != "flat" and n < MIN_TRAIN[kind]:
            kind, reason = "flat", f"{n:,} vectors are too few to train {kind}; searched exactly"
    else:
        reason = "asked for"
        if kind != "flat" and n < MIN_TRAIN[kind]:
            raise UserError(f"{kind} needs at least {MIN_TRAIN[kind]} vectors to train, and a category here has "
                            f"{n}; use --index auto or flat", option="--index")
    if kind == "flat":
        if on_torch:
            return SearchPlan("flat", device="cuda", reason=reason + "; torch on the GPU", backend="torch")
        return SearchPlan("flat", device=device, reason=reason)
    if on_torch:
        device = "cpu"  # an approximate index needs faiss, and this faiss has no GPU
    nlist = int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39))  # faiss wants >= 39 training points per list
    # Without a given --nprobe, the fewest lists (from START_NPROBE, doubling) whose recall@k against exact
    # search reaches RECALL_TARGET on a sample of queries: a fixed share of the lists would make every query
    # scan a fixed share of the base, and the search grow as N^2. The report measures the recall again.
    probe = nprobe or min(nlist, START_NPROBE)
    target = 0.0 if nprobe else RECALL_TARGET
    if kind == "ivf-flat":
        return SearchPlan("ivf-flat", nlist=nlist, nprobe=probe, device=device, reason=reason, recall_target=target)
    return SearchPlan("ivf-pq", nlist=nlist, nprobe=probe, pq_m=_pq_m(d, n, memory), device=device, reason=reason,
                      recall_target=target)


def build_faiss_index(vectors: np.ndarray, plan: SearchPlan, seed: int = 0) -> faiss.Index:
    """Build and fill the index ``plan`` names over ``vectors`` (float16 or float32 rows)."""
    d = vectors.shape[1]
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        if plan.kind == "ivf-flat":
            # uncompressed lists at the embeddings' own precision: float16 (half a float32 copy: 328 MB, not
            # 655, for 1.28M x 128); faiss scans them a little faster too
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, plan.nlist, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(len(vectors), max(plan.nlist * 64, 65_536))
        train = vectors[np.sort(rng.choice(len(vectors), n_train, replace=False))]
        index.cp.seed = seed
        if plan.kind == "ivf-pq":
            index.pq.cp.seed = seed
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        index.nprobe = plan.nprobe
    if plan.device == "gpu":
        index = faiss.index_cpu_to_all_gpus(index)
    for lo in range(0, len(vectors), DEFAULT_QUERY_BATCH * 4):
        index.add(np.ascontiguousarray(vectors[lo: lo + DEFAULT_QUERY_BATCH * 4], dtype=np.float32))
    if plan.kind != "flat" and plan.device == "gpu":
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", plan.nprobe)
    return index


class SearchWork:
    """The mine stage's unit of work: the top-``k`` neighbours of a block of query rows in one index.

    In this process the live index is searched; a remote worker gets it serialised, once, and
    moves it to its GPUs when faiss has them.
    """

    gpus = 1

    def __init__(self, index: faiss.Index, k: int) -> None:
        self.index, self.k = index, k

    def __getstate__(self) -> dict:
        cpu = faiss.index_gpu_to_cpu(self.index) if "Gpu" in type(self.index).__name__ else self.index
        return {"blob": faiss.serialize_index(cpu), "k": self.k}

    def __setstate__(self, state: dict) -> None:
        self.blob, self.k, self.index = state["blob"], state["k"], None

    def setup(self) -> None:
        if self.index is None:
            self.index = faiss.deserialize_index(self.blob)
            if faiss_gpus() > 0:
                self.index = faiss.index_cpu_to_all_gpus(self.index)

    def __call__(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), self.k)


def search(index: faiss.Index, queries: np.ndarray, k: int, engine, batch: int = DEFAULT_QUERY_BATCH,
           on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of every query row, in blocks of ``batch`` mapped by ``engine``. Missing neighbours (IVF)
    come back as position -1."""
    blocks = [queries[lo: lo + batch] for lo in range(0, len(queries), batch)]
    results = engine.map(SearchWork(index, k), blocks,
                         on_result=(lambda _, r: on_batch(len(r[0]))) if on_batch else None)
    if not results:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def knn_search(vectors: np.ndarray, k: int, engine, plan: SearchPlan | None = None, seed: int = 0,
               on_batch: Callable[[int], None] | None = None,
               tuning: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of every row among all rows (the row itself included).

    Returns ``(similarities, positions)``, each ``(N, min(k, N))``; query blocks are mapped by ``engine``.
    An IVF plan with a recall target has its ``nprobe`` tuned first (:func:`tune_nprobe`; what was tried is
    appended to ``tuning``).
    """
    k = min(k, len(vectors))
    if len(vectors) == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    plan = plan or SearchPlan("flat", device="gpu" if faiss_gpus() else "cpu")
    if plan.backend == "torch":
        return torch_knn(vectors, k, plan.device, on_batch=on_batch)
    index = build_faiss_index(vectors, plan, seed)
    if plan.kind != "flat" and plan.recall_target > 0:
        tuned = tune_nprobe(index, vectors, k, plan, seed)
        if tuned:
            tuned.update(tuned_nprobe=index.nprobe if hasattr(index, "nprobe") else plan.nprobe)
            if tuning is not None:
                tuning.append(tuned)
    return search(index, vectors, k, engine, on_batch=on_batch)


def tune_nprobe(index, vectors: np.ndarray, k: int, plan: SearchPlan, seed: int = 0) -> dict:
    """Raise the index's ``nprobe`` from the plan's, doubling, until recall@k against exact search on a sample
    of queries reaches ``plan.recall_target`` (or every list is probed); returns what was tried."""
    if plan.device == "gpu" or not hasattr(index, "nprobe"):
        return {}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), min(TUNE_SAMPLE, len(vectors)), replace=False))
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    truth = exact_neighbours(vectors, queries, k)
    tried = []
    nprobe = max(1, plan.nprobe)
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = float(sum(len(np.intersect1d(t, f[f >= 0])) for t, f in zip(truth, found)) / truth.size)
        tried.append((nprobe, round(recall, 4)))
        if recall >= plan.recall_target or nprobe >= plan.nlist:
            break
        nprobe = min(plan.nlist, nprobe * 2)
    return {"recall_target": plan.recall_target, "tried": tried, "sample": int(len(rows))}


def knn_blocks(n: int, device: str, dtype_bytes: int = 2) -> tuple[int, int]:
    """The query batch and column block of :func:`torch_knn` on ``device``: on CUDA, the largest whose score
    block (queries x columns, ``dtype_bytes`` each, and as much again for top-k's work) fits in a quarter of
    the memory free now; 2,048 x 65,536 on a CPU."""
    import torch

    if not device.startswith("cuda"):
        return 2048, 65_536
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    query_batch = 8192
    column_block = int(free // 4 // (2 * dtype_bytes * query_batch))
    column_block = max(4096, min(1 << 20, column_block - column_block % 4096, -(-n // 4096) * 4096))
    return query_batch, column_block


def torch_knn(vectors: np.ndarray, k: int, device: str = "cuda", query_batch: int | None = None,
              column_block: int | None = None, on_batch: Callable[[int], None] | None = None,
              dtype: str = "float16", matmul_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of every row among all rows, with torch on ``device``.

    The base sits on the device once (``dtype``, float16 or bfloat16, on CUDA; float32 on a CPU); each block
    of queries is multiplied with a block of columns at a time (blocks sized to the device's free memory,
    :func:`knn_blocks`), ``torch.topk`` selects each block's best ``k`` (a partial selection, not a sort of
    every column), and blocks are merged. The ``k`` found are scored again in float32 and ordered by that
    score, so similarities match a float32 search of the same vectors. float16 keeps 11 bits of each unit
    vector's coordinates against bfloat16's 8, at the same tensor-core rate: the default.

    ``matmul_only`` runs the same blocked products and nothing else (no top-k, no merge, no copy back): the
    roofline the search is timed against in the same run (``bench/mine.py``); it returns empty arrays.
    """
    import torch

    dev = torch.device(device)
    low = dev.type == "cuda"
    base32 = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(dev)
    base = base32.to(getattr(torch, dtype)) if low else base32
    n = len(base)
    k = min(k, n)
    auto_q, auto_c = knn_blocks(n, device, base.element_size())
    query_batch, column_block = query_batch or auto_q, column_block or auto_c
    sims = np.empty((0 if matmul_only else n, k), np.float32)
    positions = np.empty((0 if matmul_only else n, k), np.int64)
    with torch.inference_mode():
        for q0 in range(0, n, query_batch):
            q = base[q0: q0 + query_batch]
            best_s = best_i = None
            for c0 in range(0, n, column_block):
                block = q @ base[c0: c0 + column_block].T
                if matmul_only:
                    continue
                s, i = torch.topk(block, min(k, block.shape[1]), dim=1)
                i = i + c0
                if best_s is None:
                    best_s, best_i = s, i
                else:
                    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                    best_s, pick = torch.topk(s, k, dim=1)
                    best_i = torch.gather(i, 1, pick)
            if matmul_only:
                continue
            exact = (base32[q0: q0 + query_batch, None, :] * base32[best_i]).sum(-1)
            exact, order = torch.sort(exact, dim=1, descending=True, stable=True)
            sims[q0: q0 + len(q)] = exact.cpu().numpy()
            positions[q0: q0 + len(q)] = torch.gather(best_i, 1, order).cpu().numpy()
            if on_batch:
                on_batch(len(q))
        if low:
            torch.cuda.synchronize(dev)
    return sims, positions


def ivf_recall(vectors: np.ndarray, approx_positions: np.ndarray, sample: int = 1000, seed: int = 0,
               rows: np.ndarray | None = None) -> float:
    """Mean recall@k of the approximate neighbour lists against exact search, on a sample of query rows."""
    k = approx_positions.shape[1]
    n = len(vectors)
    if rows is None:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, min(sample, n), replace=False))
    truth = exact_neighbours(vectors, np.ascontiguousarray(vectors[rows], dtype=np.float32), k)
    hits = [len(np.intersect1d(truth[i], approx_positions[r][approx_positions[r] >= 0])) for i, r in enumerate(rows)]
    return float(np.sum(hits) / truth.size)


#: Base rows scored at a time by :func:`exact_neighbours` (a sample of 1,000 queries: 64 MB of scores).
EXACT_BLOCK = 16_384


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = EXACT_BLOCK) -> np.ndarray:
    """The positions of each query's ``k`` largest inner products among ``vectors`` (float16 or float32 rows),
    by exact search a block of rows at a time: what a recall is measured against, without a float32 copy of
    every vector (an exact index of 1.28M x 128 would be 655 MB beside the approximate one)."""
    n = len(vectors)
    k = min(k, n)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for lo in range(0, n, block):
        scores = queries @ np.asarray(vectors[lo: lo + block], dtype=np.float32).T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        all_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        all_i = np.concatenate([best_i, part + lo], axis=1)
        top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, axis=1), np.take_along_axis(all_i, top, axis=1)
    return best_i
