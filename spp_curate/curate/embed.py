"""The embed stage: encode every indexed image into float16, L2-normalised chunks.

``DIR/embeddings/`` holds ``chunk-00000.npy`` (float16, rows L2-normalised),
``chunk-00000.ids.npy`` (the index ids of those rows) and, once every chunk
is written, ``meta.json``. Chunk ``c`` always covers index rows
``[c * chunk_size, (c + 1) * chunk_size)``, and each is written atomically,
so a killed run resumes at the first missing chunk and produces the same
files as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Recipe
from ..devices import auto_workers, autocast_for, default_device
from .. import layout
from ..layout import chunk_paths
from ..files import atomic_path, read_json, remove_owned, remove_stale_temps, write_json
from ..progress import stage_progress
from .encoders import Encoder, load_encoder
from ..images import BadImage, load_image
from .sources import Source, open_source


class _IndexedImages(Dataset):
    """Rows of the index, decoded and preprocessed for the encoder."""

    def __init__(self, source: Source, keys: list[str], preprocess, image_size: int, draft: bool = True) -> None:
        self.source, self.keys, self.preprocess, self.image_size = source, keys, preprocess, image_size
        # Reduced-size JPEG decoding for pictures at least twice the encoder's input (see bench/embed.py).
        self.draft_size = image_size if draft else None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        return load_pixels(self.source, self.keys[i], self.preprocess, self.image_size, self.draft_size)


def load_pixels(source: Source, key: str, preprocess, image_size: int,
                draft_size: int | None) -> tuple[torch.Tensor, bool]:
    """One image, decoded and preprocessed; ``(zeros, False)`` if it no longer decodes."""
    try:
        return preprocess(load_image(source, key, draft_size)), True
    except BadImage:
        # The file changed since it was indexed; its row stays zero and is reported.
        return torch.zeros(3, image_size, image_size), False


def encode_batch(encoder: Encoder, images: torch.Tensor, ok: torch.Tensor, device: torch.device) -> np.ndarray:
    """L2-normalised float16 features of a batch; rows that failed to decode stay zero."""
    with torch.inference_mode(), autocast_for(device):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        feats = torch.nn.functional.normalize(encoder(images).float(), dim=-1)
        feats[~ok.to(device)] = 0.0
        return feats.cpu().numpy().astype(np.float16)


def prepare_encoder(recipe: Recipe, device: torch.device) -> Encoder:
    encoder = load_encoder(recipe.encoder, recipe.image_size)
    encoder.module.to(device)
    if device.type == "cuda":
        encoder.module.to(memory_format=torch.channels_last)
    return encoder


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


class EmbedWork:
    """The embed stage's unit of work: encode one chunk of keys into float16, L2-normalised rows.

    ``setup()`` builds the encoder on the worker's device and opens the source; a chunk is decoded
    by a DataLoader with the recipe's decode workers and encoded in batches. The result carries the
    encoder's description (spec, dim, input size, model facts) for ``meta.json``, so the driver never
    builds the model itself.
    """

    gpus = 1

    def __init__(self, recipe: Recipe, draft: bool = True, device: str | None = None, on_batch=None) -> None:
        self.recipe, self.draft, self.device_name, self.on_batch = recipe, draft, device, on_batch
        self.encoder: Encoder | None = None

    def __getstate__(self) -> dict:
        return {"recipe": self.recipe, "draft": self.draft, "device_name": self.device_name, "on_batch": None,
                "encoder": None}

    def setup(self) -> None:
        self.device = torch.device(self.device_name) if self.device_name else default_device()
        self.encoder = prepare_encoder(self.recipe, self.device)
        self.source = open_source(self.recipe)
        self.workers = auto_workers() if self.recipe.workers is None else self.recipe.workers

    def describe(self) -> dict[str, Any]:
        enc = self.encoder
        return {"encoder": enc.spec, "dim": enc.dim, "image_size": enc.image_size, "model": enc.meta}

    def __call__(self, keys: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
        enc = self.encoder
        dataset = _IndexedImages(self.source, keys, enc.preprocess, enc.image_size, self.draft)
        loader = DataLoader(dataset, batch_size=self.recipe.batch_size, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        outs = []
        for images, ok in loader:
            outs.append(encode_batch(enc, images, ok, self.device))
            if self.on_batch:
                self.on_batch(len(ok), int((~ok).sum()))
        return np.concatenate(outs), self.describe()


def embed_index(recipe: Recipe, build_dir: Path, engine, device: str | None = None,
                draft: bool = True) -> dict[str, int]:
    """Embed ``build_dir/index.parquet`` into ``build_dir/embeddings/``; resumes finished chunks."""
    emb_dir = build_dir / layout.EMBEDDINGS
    chunk_size = recipe.chunk_size
    run_file = emb_dir / "run.json"
    encoder_file = emb_dir / "encoder.json"
    run = {"fingerprint": recipe.fingerprint("embed"), "chunk_size": chunk_size}
    if emb_dir.exists() and (not run_file.exists() or read_json(run_file) != run):
        # Made by another encoder, chunking or source state: nothing to reuse (and nothing of the user's removed).
        remove_owned(emb_dir, layout.EMBEDDING_FILES, "--out")
    emb_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(emb_dir)
    write_json(run_file, run)

    index = pq.read_table(build_dir / layout.INDEX, columns=["id", "key"])
    ids = index.column("id").to_numpy()
    keys = index.column("key").to_pylist()
    n_chunks = max(1, -(-len(ids) // chunk_size))
    todo = [c for c in range(n_chunks) if not all(p.exists() for p in chunk_paths(emb_dir, c))]
    if not todo and not encoder_file.exists():
        todo = [0]  # an older build directory: embed one chunk again to learn the encoder's description
    spans = [(c * chunk_size, min(len(ids), (c + 1) * chunk_size)) for c in todo]

    with stage_progress("embed", len(ids), quarantine=True) as (bar, task):
        bar.update(task, completed=len(ids) - sum(hi - lo for lo, hi in spans))
        bad = shown = 0  # shown: images counted by on_batch since the last saved chunk

        def on_batch(n: int, failed: int) -> None:  # called only where the work runs in this process
            nonlocal bad, shown
            bad, shown = bad + failed, shown + n
            bar.update(task, advance=n, quarantined=bad)

        def save(position: int, result: tuple[np.ndarray, dict[str, Any]]) -> None:
            nonlocal shown
            feats, description = result
            (lo, hi), c = spans[position], todo[position]
            if not encoder_file.exists():
                write_json(encoder_file, description)
            emb_path, ids_path = chunk_paths(emb_dir, c)
            _save_npy(ids_path, ids[lo:hi].astype(np.int64))
            _save_npy(emb_path, feats)
            bar.update(task, advance=(hi - lo) - shown)
            shown = 0

        engine.map(EmbedWork(recipe, draft, device, on_batch), [keys[lo:hi] for lo, hi in spans], on_result=save)
    # Rows left zero are images that no longer decode; counted from the chunks so a resumed run sees them too.
    failed = [int(i) for c in range(n_chunks) for i in _zero_rows(emb_dir, c)]
    described = read_json(encoder_file)
    meta = {**described, "dtype": "float16", "normalized": "l2", "count": int(len(ids)), "chunks": n_chunks,
            "chunk_size": chunk_size, "failed_ids": failed}
    write_json(emb_dir / "meta.json", meta)
    return {"embedded": int(len(ids)) - len(failed), "failed": len(failed)}


def _zero_rows(emb_dir: Path, chunk: int) -> np.ndarray:
    emb_path, ids_path = chunk_paths(emb_dir, chunk)
    vecs = np.load(emb_path, mmap_mode="r")
    return np.load(ids_path)[~np.asarray(vecs).any(axis=1)]
