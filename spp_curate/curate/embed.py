"""The embed stage: encode every indexed image into float16, L2-normalised chunks.

``DIR/embeddings/`` holds ``chunk-00000.npy`` (float16, rows L2-normalised),
``chunk-00000.ids.npy`` (the index ids of those rows), ``chunk-00000.copy.npy``
(each picture's copy descriptor, made from the pixels decoded for the encoder:
``pairing/duplicates.py``) and, once every chunk is written, ``meta.json``. Chunk ``c`` always covers index rows
``[c * chunk_size, (c + 1) * chunk_size)``, and each is written atomically,
so a killed run resumes at the first missing chunk and produces the same
files as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Recipe
from ..devices import auto_workers, autocast_for, default_device
from .. import layout
from ..layout import chunk_copy_path, chunk_keys_path, chunk_paths
from ..leakage.copies import DRAFT
from ..pairing.duplicates import DESCRIPTOR_VERSION, SIDE, copy_descriptor, tensor_descriptor
from ..files import atomic_path, read_json, remove_owned, remove_stale_temps, write_json, write_table
from ..progress import stage_progress
from .encoders import Encoder, TensorPreprocess, load_encoder, tensor_preprocess
from ..images import BadImage, decode_jpegs, device_jpeg, image_from_bytes, read_bytes
from .sources import Source, open_source


#: A picture's copy descriptor where it did not decode (its row is never mined).
NO_DESCRIPTOR = np.zeros(SIDE * SIDE, np.uint8)


class _IndexedImages(Dataset):
    """Rows of the index, read and decoded for the encoder: each item is ``(tensor, reason, jpeg, descriptor)``.

    Pillow path: the tensor is the preprocessed picture (zeros, with the reason, when it does not decode) and
    the descriptor is made from the same decoded picture.
    Device path (``device_decode``): a JPEG the device decoder takes (:func:`images.device_jpeg`) is left
    encoded, its bytes as a uint8 tensor (``jpeg`` True), and its descriptor made on the device after
    decoding; every other file takes the Pillow path here.
    """

    def __init__(self, source: Source, keys: list[str], preprocess, image_size: int, draft: bool = True,
                 device_decode: bool = False) -> None:
        self.source, self.keys, self.preprocess, self.image_size = source, keys, preprocess, image_size
        # Reduced-size JPEG decoding for pictures at least twice the encoder's input (see bench/embed.py),
        # and never below what the copy descriptor is rendered from.
        self.draft_size = max(image_size, DRAFT) if draft else None
        self.device_decode = device_decode

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, bool, np.ndarray]:
        try:
            data = read_bytes(self.source, self.keys[i])
        except BadImage as exc:
            return torch.zeros(3, self.image_size, self.image_size), str(exc), False, NO_DESCRIPTOR
        if self.device_decode and device_jpeg(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), "", True, NO_DESCRIPTOR
        return pillow_pixels(data, self.preprocess, self.image_size, self.draft_size)


def pillow_pixels(data: bytes, preprocess, image_size: int,
                  draft_size: int | None) -> tuple[torch.Tensor, str, bool, np.ndarray]:
    """Encoded bytes decoded by the one loader, preprocessed, and described for the copy rule; zeros and the
    reason if they do not decode (the file changed since it was indexed, or its pixel data is broken behind
    a sound header)."""
    try:
        image = image_from_bytes(data, draft_size)
        return preprocess(image), "", False, copy_descriptor(image)
    except BadImage as exc:
        return torch.zeros(3, image_size, image_size), str(exc), False, NO_DESCRIPTOR


def _collate_mixed(items: list[tuple[torch.Tensor, str, bool, np.ndarray]]) -> tuple:
    """A device-path batch in few tensors: the JPEGs' bytes end to end with their lengths, the pictures the
    Pillow path decoded, which item is which, the reasons, and the descriptors made so far."""
    jpeg = [bool(j) for _, _, j, _ in items]
    encoded = [t for t, _, j, _ in items if j]
    blob = torch.cat(encoded) if encoded else torch.empty(0, dtype=torch.uint8)
    lengths = torch.tensor([len(t) for t in encoded], dtype=torch.int64)
    pixels = [t for t, _, j, _ in items if not j]
    pixels = torch.stack(pixels) if pixels else torch.empty(0)
    descriptors = np.stack([d for _, _, _, d in items]) if items else np.empty((0, SIDE * SIDE), np.uint8)
    return blob, lengths, pixels, torch.tensor(jpeg, dtype=torch.bool), [r for _, r, _, _ in items], descriptors


def device_batch(batch: tuple, tensor: TensorPreprocess, preprocess, image_size: int, draft_size: int | None,
                 device: torch.device) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """A :func:`_collate_mixed` batch as preprocessed pictures on ``device``: its JPEGs decoded there in one
    call, described for the copy rule and resized/cropped/normalised as tensors; a JPEG the decoder refuses
    goes to the Pillow path."""
    blob, lengths, pixels, jpeg, reasons, descriptors = batch
    descriptors = np.array(descriptors, copy=True)
    images = torch.empty(len(jpeg), 3, image_size, image_size, device=device)
    if len(pixels):
        images[~jpeg.to(device)] = pixels.to(device, non_blocking=True)
    if len(lengths):
        encoded = list(torch.split(blob, lengths.tolist()))
        decoded = decode_jpegs(encoded, device)
        positions = torch.nonzero(jpeg).flatten().tolist()
        good = [i for i, pic in enumerate(decoded) if pic is not None]
        if good:
            images[torch.tensor([positions[i] for i in good], device=device)] = tensor([decoded[i] for i in good])
        for i in good:
            descriptors[positions[i]] = tensor_descriptor(decoded[i])
        for i, pic in enumerate(decoded):
            if pic is None:
                picture, reasons[positions[i]], _, descriptors[positions[i]] = pillow_pixels(
                    encoded[i].numpy().tobytes(), preprocess, image_size, draft_size)
                images[positions[i]] = picture.to(device)
    return images, reasons, descriptors


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
    encoder = load_encoder(recipe.encoder, recipe.image_size, recipe.encoder_prefix)
    encoder.module.to(device)
    if device.type == "cuda":
        encoder.module.to(memory_format=torch.channels_last)
    return encoder


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def decode_path(requested: str, device: torch.device) -> str:
    """Where the embed stage decodes JPEGs: ``device`` (batched on the encoder's device: nvJPEG on a GPU) or
    ``pillow`` (the CPU loader in the decode processes). ``auto`` is the device on CUDA, Pillow elsewhere."""
    if requested == "auto":
        return "device" if device.type == "cuda" else "pillow"
    return requested


class EmbedWork:
    """The embed stage's unit of work: encode one chunk of keys into float16, L2-normalised rows.

    ``setup()`` builds the encoder on the worker's device and opens the source; a chunk is read by a
    DataLoader with the recipe's decode workers and encoded in batches. On the device path the workers
    read bytes and the JPEGs are decoded and preprocessed on the device, batch by batch; everything else
    is decoded by the workers with Pillow. The result carries each row's failure reason (None when it
    encoded) and the encoder's description (spec, dim, input size, decode path, model facts) for
    ``meta.json``, so the driver never builds the model itself.
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
        device_path = decode_path(self.recipe.decode, self.device) == "device"
        self.tensor = tensor_preprocess(self.encoder.preprocess) if device_path else None

    def describe(self) -> dict[str, Any]:
        enc = self.encoder
        decode = (f"torchvision.io.decode_jpeg on {self.device.type}, tensor preprocessing; Pillow for the rest"
                  if self.tensor else "Pillow")
        return {"encoder": enc.spec, "dim": enc.dim, "image_size": enc.image_size, "decode": decode,
                "model": enc.meta}

    def __call__(self, keys: list[str]) -> tuple[np.ndarray, list[str | None], dict[str, Any], np.ndarray]:
        enc = self.encoder
        dataset = _IndexedImages(self.source, keys, enc.preprocess, enc.image_size, self.draft,
                                 device_decode=self.tensor is not None)
        loader = DataLoader(dataset, batch_size=self.recipe.batch_size, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            collate_fn=_collate_mixed if self.tensor else None)
        outs, errors, described = [], [], []
        for batch in loader:
            if self.tensor:
                images, reasons, descriptors = device_batch(batch, self.tensor, enc.preprocess, enc.image_size,
                                                            dataset.draft_size, self.device)
            else:
                images, reasons, _, descriptors = batch
            described.append(np.asarray(descriptors, np.uint8))
            ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
            outs.append(encode_batch(enc, images, ok, self.device))
            errors += [r or None for r in reasons]
            if self.on_batch:
                self.on_batch(len(ok), int((~ok).sum()))
        return np.concatenate(outs), errors, self.describe(), np.concatenate(described)


#: A chunk's rows: the image's key and digest, and why it did not encode (null when it did).
CHUNK_KEYS_SCHEMA = pa.schema([("key", pa.string()), ("digest", pa.string()), ("error", pa.string())])


def _complete_chunks(emb_dir: Path) -> list[int]:
    """Chunk numbers whose four files are all there (the keys file is written last, removed first);
    the files of any other chunk, left by a killed run, are removed."""
    numbers = sorted({int(p.name[6:11]) for p in emb_dir.glob("chunk-?????.*") if p.name[6:11].isdigit()})
    complete = []
    for c in numbers:
        files = (*chunk_paths(emb_dir, c), chunk_copy_path(emb_dir, c), chunk_keys_path(emb_dir, c))
        if all(f.is_file() for f in files):
            complete.append(c)
        else:
            for f in files:
                f.unlink(missing_ok=True)
    return complete


class Row(NamedTuple):
    """One row of a chunk: the image (key and digest) and why it did not encode (None when it did)."""

    key: str
    digest: str
    error: str | None = None

    @property
    def image(self) -> tuple[str, str]:
        return self.key, self.digest


def _write_chunk(emb_dir: Path, c: int, vecs: np.ndarray, ids: np.ndarray, rows: list[Row],
                 descriptors: np.ndarray) -> None:
    emb_path, ids_path = chunk_paths(emb_dir, c)
    _save_npy(emb_path, vecs)
    _save_npy(ids_path, ids.astype(np.int64))
    _save_npy(chunk_copy_path(emb_dir, c), np.ascontiguousarray(descriptors, np.uint8))
    columns = list(zip(*rows)) if rows else [[], [], []]
    write_table(chunk_keys_path(emb_dir, c), pa.table(dict(zip(CHUNK_KEYS_SCHEMA.names, map(list, columns))),
                                                      schema=CHUNK_KEYS_SCHEMA))


def _read_rows(emb_dir: Path, c: int) -> list[Row]:
    table = pq.read_table(chunk_keys_path(emb_dir, c))
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * table.num_rows
    return [Row(*r) for r in zip(table.column("key").to_pylist(), table.column("digest").to_pylist(), errors)]


def _remove_chunk(emb_dir: Path, c: int) -> None:
    chunk_keys_path(emb_dir, c).unlink()  # first: the chunk stops counting as complete
    for f in (*chunk_paths(emb_dir, c), chunk_copy_path(emb_dir, c)):
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
    run_file = build_dir / layout.EMBEDDINGS_RUN
    encoder_file = build_dir / layout.EMBEDDINGS_ENCODER
    decode = decode_path(recipe.decode, torch.device(device) if device else default_device())
    run = {"fingerprint": recipe.fingerprint("embed", source_state=False), "chunk_size": chunk_size, "rows": "keyed",
           "decode": decode, "copy_descriptor": DESCRIPTOR_VERSION}
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
    rows_of: dict[int, list[Row]] = {}  # every chunk kept or written: its rows
    dirty: list[tuple[int, np.ndarray, list[Row]]] = []
    for c in chunks:
        rows = _read_rows(emb_dir, c)
        live = np.array([r.image in wanted and r.image not in stored for r in rows], dtype=bool)
        stored.update(r.image for r, ok in zip(rows, live) if ok)
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
                         np.array([wanted[r.image] for r in sub]), sub, np.load(chunk_copy_path(emb_dir, c))[live])
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

        def save(position: int, result: tuple[np.ndarray, list[str | None], dict[str, Any], np.ndarray]) -> None:
            nonlocal shown
            feats, errors, description, descriptors = result
            rows = spans[position]
            if not encoder_file.exists():
                write_json(encoder_file, description)
            chunk_rows = [Row(keys[i], digests[i], error) for i, error in zip(rows, errors)]
            _write_chunk(emb_dir, todo[position], feats, ids[rows], chunk_rows, descriptors)
            rows_of[todo[position]] = chunk_rows
            bar.update(task, advance=len(rows) - shown)
            shown = 0

        engine.map(EmbedWork(recipe, draft, device, on_batch), [[keys[i] for i in rows] for rows in spans],
                   on_result=save)
    chunk_files = sorted(rows_of)
    for c in chunk_files:  # ids follow the index (a changed source renumbers its rows)
        current = np.array([wanted[r.image] for r in rows_of[c]], dtype=np.int64)
        ids_path = chunk_paths(emb_dir, c)[1]
        if not np.array_equal(np.load(ids_path), current):
            _save_npy(ids_path, current)
    # Rows left zero are images that no longer decode; counted from the chunks so a resumed run sees them too.
    failed = sorted(int(i) for c in chunk_files for i in _zero_rows(emb_dir, c))
    zero = set(failed)
    quarantine_failures(build_dir, set(keys), [(r.key, r.error or "did not decode when embedded")
                                               for c in chunk_files for r in rows_of[c]
                                               if r.error or wanted[r.image] in zero])
    described = read_json(encoder_file)
    meta = {**described, "dtype": "float16", "normalized": "l2", "count": int(len(ids)),
            "chunks": len(chunk_files), "chunk_files": chunk_files, "chunk_size": chunk_size, "failed_ids": failed,
            "copy_descriptor": {"version": DESCRIPTOR_VERSION, "side": SIDE, "dtype": "uint8"}}
    write_json(build_dir / layout.EMBEDDINGS_META, meta)
    return {"embedded": int(len(needed)), "reused": int(len(ids) - len(needed)), "dropped": dropped,
            "failed": len(failed)}


def quarantine_failures(build_dir: Path, indexed: set[str], failures: list[tuple[str, str]]) -> None:
    """``quarantine.parquet`` with the images the embed stage could not decode (its rows stay zero, and no
    pair is mined from them): the index's own rows (keys not in the index) and then these, each once."""
    path = build_dir / layout.QUARANTINE
    table = pq.read_table(path)
    keep = [k not in indexed for k in table.column("key").to_pylist()]
    ours = pa.table({"key": [k for k, _ in failures], "error": [e for _, e in failures]}, schema=table.schema)
    updated = pa.concat_tables([table.filter(pa.array(keep, pa.bool_())), ours])
    if not updated.equals(table):
        write_table(path, updated)


def _zero_rows(emb_dir: Path, chunk: int) -> np.ndarray:
    emb_path, ids_path = chunk_paths(emb_dir, chunk)
    vecs = np.load(emb_path, mmap_mode="r")
    return np.load(ids_path)[~np.asarray(vecs).any(axis=1)]
