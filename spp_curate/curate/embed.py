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
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Recipe
from ..devices import auto_workers, autocast_for, default_device
from .. import layout
from ..layout import chunk_keys_path, chunk_paths
from ..files import atomic_path, read_json, remove_owned, remove_stale_temps, write_json, write_table
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


#: Batches smaller than this are padded (with copies of their first image): below it a CPU matrix product
#: may take another code path and give other last bits, and an image's embedding must not depend on
#: how many others were encoded with it (an incremental build embeds a few new images alone).
MIN_BATCH = 16


def encode_batch(encoder: Encoder, images: torch.Tensor, ok: torch.Tensor, device: torch.device) -> np.ndarray:
    """L2-normalised float16 features of a batch; rows that failed to decode stay zero."""
    n = len(images)
    if 0 < n < MIN_BATCH:
        images = torch.cat([images, images[:1].expand(MIN_BATCH - n, *images.shape[1:])])
    with torch.inference_mode(), autocast_for(device):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        feats = torch.nn.functional.normalize(encoder(images).float(), dim=-1)[:n]
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


CHUNK_KEYS_SCHEMA = pa.schema([("key", pa.string()), ("digest", pa.string())])


def _complete_chunks(emb_dir: Path) -> list[int]:
    """Chunk numbers whose three files are all there (the keys file is written last, removed first);
    the files of any other chunk, left by a killed run, are removed."""
    numbers = sorted({int(p.name[6:11]) for p in emb_dir.glob("chunk-?????.*") if p.name[6:11].isdigit()})
    complete = []
    for c in numbers:
        files = (*chunk_paths(emb_dir, c), chunk_keys_path(emb_dir, c))
        if all(f.is_file() for f in files):
            complete.append(c)
        else:
            for f in files:
                f.unlink(missing_ok=True)
    return complete


def _write_chunk(emb_dir: Path, c: int, vecs: np.ndarray, ids: np.ndarray, keys: list[str],
                 digests: list[str]) -> None:
    emb_path, ids_path = chunk_paths(emb_dir, c)
    _save_npy(emb_path, vecs)
    _save_npy(ids_path, ids.astype(np.int64))
    write_table(chunk_keys_path(emb_dir, c), pa.table({"key": keys, "digest": digests}, schema=CHUNK_KEYS_SCHEMA))


def _remove_chunk(emb_dir: Path, c: int) -> None:
    chunk_keys_path(emb_dir, c).unlink()  # first: the chunk stops counting as complete
    for f in chunk_paths(emb_dir, c):
        f.unlink()


def embed_index(recipe: Recipe, build_dir: Path, engine, device: str | None = None,
                draft: bool = True) -> dict[str, int]:
    """Embed ``build_dir/index.parquet`` into ``build_dir/embeddings/``, reusing every row already there.

    A row is reused when its image (key and sha256 digest) is still in the index; rows of removed or
    changed images are dropped by rewriting their chunk from the rows that stay (nothing is encoded
    again); images not yet embedded are encoded into new chunks of ``chunk_size`` rows, in index order.
    A fresh build is the case with nothing to reuse: chunk ``c`` covers index rows
    ``[c * chunk_size, (c + 1) * chunk_size)``. A killed run resumes from the chunks it completed.
    Each chunk's ``.ids.npy`` is rewritten to the index's current ids.
    """
    emb_dir = build_dir / layout.EMBEDDINGS
    chunk_size = recipe.chunk_size
    run_file = emb_dir / "run.json"
    encoder_file = emb_dir / "encoder.json"
    run = {"fingerprint": recipe.fingerprint("embed", source_state=False), "chunk_size": chunk_size, "rows": "keyed"}
    if emb_dir.exists() and (not run_file.exists() or read_json(run_file) != run):
        # Made by another encoder or chunking: nothing to reuse (and nothing of the user's removed).
        remove_owned(emb_dir, layout.EMBEDDING_FILES, "--out")
    emb_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(emb_dir)
    write_json(run_file, run)

    index = pq.read_table(build_dir / layout.INDEX, columns=["id", "key", "digest"])
    ids = index.column("id").to_numpy()
    keys = index.column("key").to_pylist()
    digests = index.column("digest").to_pylist()
    wanted = {(k, d): int(i) for i, k, d in zip(ids, keys, digests)}

    chunks = _complete_chunks(emb_dir)
    stored: set[tuple[str, str]] = set()
    rows_of: dict[int, list[tuple[str, str]]] = {}  # every chunk kept or written: its rows' (key, digest)
    dirty: list[tuple[int, np.ndarray, list[tuple[str, str]]]] = []
    for c in chunks:
        table = pq.read_table(chunk_keys_path(emb_dir, c))
        rows = list(zip(table.column("key").to_pylist(), table.column("digest").to_pylist()))
        live = np.array([r in wanted and r not in stored for r in rows], dtype=bool)
        stored.update(r for r, ok in zip(rows, live) if ok)
        if live.all():
            rows_of[c] = rows
        else:
            dirty.append((c, live, rows))
    next_chunk = max(chunks, default=-1) + 1
    dropped = 0
    for c, live, rows in dirty:  # drop removed and changed images' rows; the others are kept as they are
        if live.any():
            sub = [r for r, ok in zip(rows, live) if ok]
            _write_chunk(emb_dir, next_chunk, np.load(chunk_paths(emb_dir, c)[0])[live],
                         np.array([wanted[r] for r in sub]), [k for k, _ in sub], [d for _, d in sub])
            rows_of[next_chunk] = sub
            next_chunk += 1
        _remove_chunk(emb_dir, c)
        dropped += int((~live).sum())

    needed = np.array([i for i, r in enumerate(zip(keys, digests)) if r not in stored], dtype=np.int64)
    spans = [needed[lo: lo + chunk_size] for lo in range(0, len(needed), chunk_size)]
    todo = list(range(next_chunk, next_chunk + len(spans)))
    if not spans and not encoder_file.exists() and len(ids):
        raise RuntimeError("embeddings without encoder.json; remove DIR/embeddings and run embed again")

    with stage_progress("embed", len(ids), quarantine=True) as (bar, task):
        bar.update(task, completed=len(ids) - len(needed))
        bad = shown = 0  # shown: images counted by on_batch since the last saved chunk

        def on_batch(n: int, failed: int) -> None:  # called only where the work runs in this process
            nonlocal bad, shown
            bad, shown = bad + failed, shown + n
            bar.update(task, advance=n, quarantined=bad)

        def save(position: int, result: tuple[np.ndarray, dict[str, Any]]) -> None:
            nonlocal shown
            feats, description = result
            rows = spans[position]
            if not encoder_file.exists():
                write_json(encoder_file, description)
            _write_chunk(emb_dir, todo[position], feats, ids[rows], [keys[i] for i in rows],
                         [digests[i] for i in rows])
            rows_of[todo[position]] = [(keys[i], digests[i]) for i in rows]
            bar.update(task, advance=len(rows) - shown)
            shown = 0

        engine.map(EmbedWork(recipe, draft, device, on_batch), [[keys[i] for i in rows] for rows in spans],
                   on_result=save)
    chunk_files = sorted(rows_of)
    for c in chunk_files:  # ids follow the index (a changed source renumbers its rows)
        current = np.array([wanted[r] for r in rows_of[c]], dtype=np.int64)
        ids_path = chunk_paths(emb_dir, c)[1]
        if not np.array_equal(np.load(ids_path), current):
            _save_npy(ids_path, current)
    # Rows left zero are images that no longer decode; counted from the chunks so a resumed run sees them too.
    failed = sorted(int(i) for c in chunk_files for i in _zero_rows(emb_dir, c))
    described = read_json(encoder_file)
    meta = {**described, "dtype": "float16", "normalized": "l2", "count": int(len(ids)),
            "chunks": len(chunk_files), "chunk_files": chunk_files, "chunk_size": chunk_size, "failed_ids": failed}
    write_json(emb_dir / "meta.json", meta)
    return {"embedded": int(len(needed)), "reused": int(len(ids) - len(needed)), "dropped": dropped,
            "failed": len(failed)}


def _zero_rows(emb_dir: Path, chunk: int) -> np.ndarray:
    emb_path, ids_path = chunk_paths(emb_dir, chunk)
    vecs = np.load(emb_path, mmap_mode="r")
    return np.load(ids_path)[~np.asarray(vecs).any(axis=1)]
