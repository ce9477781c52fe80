"""The Ray engine: the same stages, the same files, spread over a Ray cluster.

* index: a Ray Data pipeline of keys, ``map_batches`` probing (read + decode) on CPU workers;
* embed: per chunk, a Ray Data pipeline of keys, ``map_batches`` on encoder actors (one GPU each
  where there are GPUs); the driver writes each chunk atomically, so resume is per chunk;
* mine: the faiss index is built once, shipped to the object store, and query batches are
  searched by tasks, then merged in order;
* export: one task per shard; the driver writes the card and the manifest once.

Every result carries its position, and the driver puts results back in order and checks that
each position arrives exactly once, so a retried task or restarted actor can neither lose nor
duplicate work. Connects to ``RAY_ADDRESS`` when set, else starts a local cluster.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import ray.data

from ..config import Recipe

RETRIES = {"max_restarts": -1, "max_task_retries": -1}


def ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True


def _in_order(positions: np.ndarray, n: int, what: str) -> np.ndarray:
    """The permutation that puts results back in order; fails loudly on a lost or duplicated item."""
    order = np.argsort(positions, kind="stable")
    if len(positions) != n or not np.array_equal(positions[order], np.arange(n)):
        raise RuntimeError(f"ray engine: {what} returned {len(positions)} results for {n} items "
                           f"({len(np.unique(positions))} distinct)")
    return order


# ---------------------------------------------------------------- index

class _Prober:
    def __init__(self, recipe: dict) -> None:
        from ..curate.sources import open_source

        self.source = open_source(Recipe(**recipe))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..curate.index import probe

        probes = [probe(self.source, str(k), int(lab)) for k, lab in zip(batch["key"], batch["label"])]
        return {"pos": batch["pos"], "width": np.array([p.width for p in probes]),
                "height": np.array([p.height for p in probes]), "nbytes": np.array([p.nbytes for p in probes]),
                "digest": np.array([p.digest for p in probes], dtype=object),
                "format": np.array([p.format for p in probes], dtype=object),
                "error": np.array([p.error or "" for p in probes], dtype=object)}


def ray_probe(recipe: Recipe, items: list[tuple[str, int]]) -> list:
    """Read and decode every item on the cluster; returns the index stage's probes, in order."""
    from ..curate.index import Probe

    ensure_ray()
    rows = [{"key": k, "label": lab, "pos": i} for i, (k, lab) in enumerate(items)]
    ds = ray.data.from_items(rows).map_batches(
        _Prober, fn_constructor_kwargs={"recipe": recipe.model_dump()}, batch_size=256,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))),
        batch_format="numpy", **RETRIES)
    cols: dict[str, list] = {k: [] for k in ("pos", "width", "height", "nbytes", "digest", "format", "error")}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k in cols:
            cols[k].extend(batch[k].tolist())
    order = _in_order(np.asarray(cols["pos"]), len(items), "index")
    out = []
    for j in order:
        key, label = items[j]
        err = cols["error"][j]
        out.append(Probe(key, label, int(cols["width"][j]), int(cols["height"][j]), int(cols["nbytes"][j]),
                         cols["digest"][j], cols["format"][j], err or None))
    return out


# ---------------------------------------------------------------- embed

class _EmbedActor:
    def __init__(self, recipe: dict, draft: bool) -> None:
        from ..curate.embed import prepare_encoder
        from ..devices import default_device
        from ..curate.sources import open_source

        recipe_obj = Recipe(**recipe)
        self.device = default_device()
        self.encoder = prepare_encoder(recipe_obj, self.device)
        self.source = open_source(recipe_obj)
        self.draft = self.encoder.image_size if draft else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ..curate.embed import encode_batch, load_pixels

        loaded = [load_pixels(self.source, str(k), self.encoder.preprocess, self.encoder.image_size, self.draft)
                  for k in batch["key"]]
        images = torch.stack([x for x, _ in loaded])
        ok = torch.tensor([good for _, good in loaded])
        return {"pos": batch["pos"], "emb": encode_batch(self.encoder, images, ok, self.device)}


class RayChunkEncoder:
    """Embeds one chunk of keys at a time on encoder actors; the caller writes each chunk."""

    def __init__(self, recipe: Recipe, draft: bool = True) -> None:
        from ..curate.encoders import load_encoder

        ensure_ray()
        self.recipe, self.draft = recipe, draft
        self.encoder = load_encoder(recipe.encoder, recipe.image_size)  # for meta.json: spec, dim, size
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.actors = gpus or max(1, min(recipe.workers or cpus, cpus))
        self.gpus_each = 1 if gpus else 0

    def encode(self, keys: list[str]) -> np.ndarray:
        rows = [{"key": k, "pos": i} for i, k in enumerate(keys)]
        ds = ray.data.from_items(rows).map_batches(
            _EmbedActor, fn_constructor_kwargs={"recipe": self.recipe.model_dump(), "draft": self.draft},
            batch_size=self.recipe.batch_size, compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_gpus=self.gpus_each,
            batch_format="numpy", **RETRIES)
        positions, feats = [], []
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            positions.append(batch["pos"])
            feats.append(np.asarray(batch["emb"], dtype=np.float16))
        order = _in_order(np.concatenate(positions), len(keys), "embed")
        return np.concatenate(feats)[order]


# ---------------------------------------------------------------- mine

_INDEX_CACHE: dict[str, Any] = {}


@ray.remote(max_retries=-1)
def _search_part(index_bytes_ref, cache_key: str, queries: np.ndarray, k: int, lo: int):
    import faiss

    index = _INDEX_CACHE.get(cache_key)
    if index is None:
        _INDEX_CACHE.clear()
        index = faiss.deserialize_index(index_bytes_ref)
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            index = faiss.index_cpu_to_all_gpus(index)  # a GPU worker searches on its GPUs
        _INDEX_CACHE[cache_key] = index
    sims, pos = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return lo, sims, pos


def ray_search(index, queries: np.ndarray, k: int, batch: int, on_batch: Callable[[int], None] | None = None):
    """Search ``queries`` against ``index`` in batches spread over the cluster; merged in query order."""
    import uuid

    import faiss

    ensure_ray()
    cpu_index = faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and \
        "Gpu" in type(index).__name__ else index
    index_ref = ray.put(faiss.serialize_index(cpu_index))
    cache_key = uuid.uuid4().hex
    starts = list(range(0, len(queries), batch))
    futures = [_search_part.remote(index_ref, cache_key, queries[lo: lo + batch], k, lo) for lo in starts]
    sims = np.empty((len(queries), k), np.float32)
    pos = np.empty((len(queries), k), np.int64)
    seen = []
    pending = futures
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        lo, s, p = ray.get(done[0])
        sims[lo: lo + len(s)], pos[lo: lo + len(s)] = s, p
        seen.append(lo)
        if on_batch:
            on_batch(len(s))
    _in_order(np.sort(np.asarray(seen)) // batch, len(starts), "mine")
    return sims, pos


# ---------------------------------------------------------------- export

@ray.remote(max_retries=-1)
def _write_shard_task(recipe: dict, rows, formats, target: str, ext: str, class_names: list[str],
                      row_group_rows: int, pq_path: str, tar_path: str | None) -> int:
    from ..curate.sources import open_source
    from ..export.parquet import id_features, pair_features
    from ..export.release import write_shard

    recipe_obj = Recipe(**recipe)
    source = None if tar_path is None else open_source(recipe_obj)
    features = id_features(class_names) if tar_path is None else pair_features(class_names)
    return write_shard(recipe_obj, source, rows, formats, target, ext, features, row_group_rows, Path(pq_path),
                       Path(tar_path) if tar_path else None)


def ray_write_shards(recipe: Recipe, shards: list, formats, target: str, ext: str, class_names: list[str],
                     row_group_rows: int, on_shard: Callable[[int], None] | None = None) -> None:
    """Write shards in parallel, one task each; the caller writes the card and manifest once."""
    ensure_ray()
    formats_ref = ray.put(formats)
    futures = {_write_shard_task.remote(recipe.model_dump(), rows, formats_ref, target, ext, class_names,
                                        row_group_rows, str(pq_path), str(tar_path) if tar_path else None): len(rows)
               for rows, pq_path, tar_path in shards}
    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        written = ray.get(done[0])
        if written != futures[done[0]]:
            raise RuntimeError(f"ray engine: a shard wrote {written} rows, expected {futures[done[0]]}")
        if on_shard:
            on_shard(written)
