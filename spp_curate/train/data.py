"""Training data: pairs (or single images) as rows of a decoded picture cache, views made in batches on the device.

The pictures are decoded once per run (:mod:`.cache`); an epoch is a seeded
permutation of the pairs, cut into batches, and each batch becomes the views
its positive mode asks for, augmented on the training device (:mod:`.augment`):

* ``augment``:  aug(a), aug'(a)      - the matched baseline, same images, no semantics
* ``semantic``: aug(a), aug(b)       - the pair replaces the augmented positive (arXiv 2510.08722)
* ``both``:     aug(a), aug'(a), aug(b) - all positives of each other (SePP-ID, arXiv 2306.16122)

An epoch uses every anchor once (the last, shorter batch too, when it holds at
least two rows). A release with one pair per anchor is then every pair once; where
an anchor has several pairs (``--max-per-anchor``), each epoch draws one of them
(seeded), so over the epochs the anchor meets its different partners while the
matched ``augment`` still sees each anchor as often as ``both`` does. A pair whose
anchor or positive does not decode is left out of every epoch and counted.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .augment import DeviceAugment
from .cache import (CACHE_DIR, JpegPictures, PictureCache, ReleaseReader, SourceReader, StreamReader, decode_into,
                    release_cache, release_reader)
from .methods import Views

POSITIVE_MODES = ("augment", "semantic", "both")
#: The share of free GPU memory the picture cache may take to live on the GPU for the whole run.
GPU_CACHE_SHARE = 0.4


def image_id(key: str) -> int:
    """A stable non-negative int64 id for an image key (for masking partners out of negatives)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") & (2**62 - 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order and augmentations: a resumed run draws what an uninterrupted one drew."""
    return seed * 100_003 + epoch


@dataclass
class TrainData:
    """Decoded pictures and the rows to train on: ``rows[i] = (anchor, positive)`` cache rows (-1: no positive)."""

    cache: PictureCache
    rows: np.ndarray  # (P, 2) int64
    skipped: int  # rows left out because a picture did not decode
    unit: str  # "pair" or "img"
    similarity: np.ndarray | None = None  # (P,) each pair's similarity in its release, when every one is known

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def per_epoch(self) -> int:
        """Rows trained on in one epoch: one per anchor (the rows do not change once made)."""
        return len(np.unique(self.rows[:, 0]))

    def replace_partners(self, share: float, seed: int) -> int:
        """Make a seeded ``share`` of the pairs self pairs (the anchor its own partner, so a second augmentation of
        it where the partner was): the self-pair rate of a study's ablation. Returns how many were replaced."""
        chosen = np.random.default_rng(seed).random(len(self.rows)) < share
        self.rows = self.rows.copy()
        self.rows[chosen, 1] = self.rows[chosen, 0]
        return int(chosen.sum())

    def batches(self, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
        """This epoch's batches of row numbers: a seeded permutation of one row per anchor (every row when
        each anchor has one; otherwise one of each anchor's rows, drawn with the same seed)."""
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        anchors = self.rows[:, 0]
        if self.per_epoch == len(anchors):
            order = torch.randperm(len(anchors), generator=generator)
        else:
            draw = torch.rand(len(anchors), generator=generator, dtype=torch.float64).numpy()
            by_anchor = np.lexsort((draw, anchors))  # each anchor's rows together, in a random order
            _, first = np.unique(anchors[by_anchor], return_index=True)
            chosen = torch.from_numpy(by_anchor[first])
            order = chosen[torch.randperm(len(chosen), generator=generator)]
        return [b for b in order.split(batch_size) if len(b) >= 2]


def _usable(cache: PictureCache, rows: np.ndarray, unit: str, similarity: np.ndarray | None = None) -> TrainData:
    good = cache.ok[rows[:, 0]] & np.where(rows[:, 1] >= 0, cache.ok[np.maximum(rows[:, 1], 0)], True)
    return TrainData(cache, rows[good], int((~good).sum()), unit,
                     similarity[good] if similarity is not None and len(similarity) == len(rows) else None)


def pair_data(release: str, side: int, workers: int | None, cache_mode: str = "auto", run_dir: Path | None = None,
              limit: int | None = None) -> TrainData:
    """A release's pairs (local, or ``hf://ORG/NAME[@REV]`` fetched and verified), pictures decoded once."""
    if release.startswith("hf://"):  # fetched at its revision into the Hub cache and verified there
        from ..export.hub import fetch_release

        release = str(fetch_release(release))
    reader: ReleaseReader | StreamReader = release_reader(release, limit)
    spill = run_dir / CACHE_DIR if run_dir else None
    if cache_mode != "memory":
        # kept beside the release and reused by later runs on it (same size and settings)
        cache = release_cache(reader, Path(release), side, workers, cache_mode, spill, label="decode pairs")
    else:
        cache = decode_into(reader, side, workers, cache_mode, spill, label="decode pairs")
    return _usable(cache, reader.pairs, "pair", reader.similarity)


def single_data(source, side: int, workers: int | None, cache_mode: str = "auto", run_dir: Path | None = None,
                limit: int | None = None) -> TrainData:
    """A source's images, each its own row with no positive, decoded once."""
    keys = [key for key, _ in itertools.islice(source.items(), limit)]
    cache = decode_into(SourceReader(source, keys), side, workers, cache_mode,
                        run_dir / CACHE_DIR if run_dir else None, label="decode images")
    rows = np.stack([np.arange(len(keys)), np.full(len(keys), -1)], axis=1).astype(np.int64)
    return _usable(cache, rows, "img")


class ViewMaker:
    """Batches of rows to :class:`Views` on ``device``: pictures gathered from the cache, augmented there.

    On a GPU the whole cache moves to it once when it takes at most :data:`GPU_CACHE_SHARE` of the free
    memory; otherwise each batch is gathered on the host and copied over.
    """

    def __init__(self, data: TrainData, positives: str, image_size: int, device: torch.device,
                 partner_weight: float = 1.0, pair_weights: np.ndarray | None = None) -> None:
        self.positives, self.device, self.partner_weight = positives, device, float(partner_weight)
        # each row's own weight (``--partner-trust similarity``), else one weight for every row
        self.pair_weights = None if pair_weights is None else torch.from_numpy(
            np.asarray(pair_weights, dtype=np.float32)).to(device)
        self.jpeg = data.cache.pixels if isinstance(data.cache.pixels, JpegPictures) else None
        if self.jpeg is None:
            pixels = torch.from_numpy(np.asarray(data.cache.pixels))
            if device.type == "cuda" and pixels.numel() <= GPU_CACHE_SHARE * torch.cuda.mem_get_info(device)[0]:
                pixels = pixels.to(device)
            self.pixels = pixels
        ids = np.asarray([image_id(k) for k in data.cache.keys], dtype=np.int64)
        self.ids = torch.from_numpy(np.append(ids, -1)).to(device)  # row -1: "no partner"
        self.rows = torch.from_numpy(data.rows)
        self.augment = DeviceAugment(image_size).to(device)

    def _pictures(self, rows: torch.Tensor, on_device: torch.Tensor) -> torch.Tensor:
        if self.jpeg is not None:  # decoded per batch, on the training device
            return self.jpeg.batch(rows.numpy(), self.device)
        if self.pixels.device == self.device:
            return self.pixels[on_device]
        return self.pixels[rows].to(self.device, non_blocking=True)

    def __call__(self, batch: torch.Tensor) -> Views:
        rows = self.rows[batch]
        a, b = rows[:, 0], rows[:, 1]
        a_dev, b_dev = a.to(self.device), b.to(self.device)
        ia, ib = self.ids[a_dev], self.ids[b_dev]
        xa = self._pictures(a, a_dev)
        if self.positives == "augment":
            return Views([self.augment(xa), self.augment(xa)], [ia, ia], [ib, ib])
        xb = self._pictures(b, b_dev)
        if self.pair_weights is not None:
            weights = self.pair_weights[batch.to(self.device)]
        else:
            weights = None if self.partner_weight == 1.0 else torch.full((len(batch),), self.partner_weight,
                                                                         device=self.device)
        if self.positives == "semantic":
            return Views([self.augment(xa), self.augment(xb)], [ia, ib], [ib, ia], weights)
        return Views([self.augment(xa), self.augment(xa), self.augment(xb)], [ia, ia, ib], [ib, ib, ia], weights)
