"""Training data: pair shards streamed through ``datasets`` (the reader a user would use), or single images.

A release is read as a stream (``load_dataset(..., streaming=True)``) with a
shuffle buffer, so a local release and ``hf://org/name`` go through the same
code. Each sample becomes the views its positive mode asks for:

* ``augment``:  aug(a), aug'(a)      - the matched baseline, same images, no semantics
* ``semantic``: aug(a), aug(b)       - the pair replaces the augmented positive (arXiv 2510.08722)
* ``both``:     aug(a), aug'(a), aug(b) - all positives of each other (SePP-ID, arXiv 2306.16122)
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms import v2 as T

from ..checkpoint import MEAN, STD
from ..images import BadImage, image_from_bytes, load_image
from ..errors import UserError

POSITIVE_MODES = ("augment", "semantic", "both")


def image_id(key: str) -> int:
    """A stable non-negative int64 id for an image key (for masking partners out of negatives)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") & (2**62 - 1)


def ssl_augment(size: int) -> T.Compose:
    """SimCLR-style augmentations (torchvision), scaled for small images."""
    return T.Compose([
        T.RGB(),
        T.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD),
    ])


def release_rows(release: str) -> tuple[object, int | None]:
    """The release's pairs as a streaming ``datasets`` split, and the pair count when the manifest says it."""
    import datasets

    if release.startswith("hf://"):
        name, count = release[len("hf://"):], None
    else:
        path = Path(release)
        if not (path / "manifest.json").is_file():
            raise UserError(f"{release} is not a release (no manifest.json); pass a release directory or "
                            "hf://org/name", option="--pairs")
        from ..export.manifest import load_manifest

        manifest = load_manifest(path, option="--pairs")
        if manifest.images == "none":
            raise UserError(f"{release} is ID-only; run `spp-curate materialize` first", option="--pairs")
        name, count = str(path), manifest.counts.pairs
    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - unreachable hub, missing files
        raise UserError(f"cannot read pairs from {release}: {str(exc).splitlines()[0][:200]}",
                        option="--pairs") from None
    if count is None:
        # A pushed release's card declares its row count (dataset_info.splits).
        splits = rows.info.splits or {}
        count = splits["train"].num_examples if "train" in splits else None
    # Images are decoded by the project's one loader (EXIF rotation, alpha on white, bad bytes counted),
    # the way the encoder saw them, not by the reader's own decoder.
    for column in ("anchor", "positive"):
        rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows, count


class PairViews(IterableDataset):
    """Streams a release's pairs as views, shuffled with a buffer, reshuffled each epoch."""

    def __init__(self, release: str, positives: str, image_size: int, seed: int, buffer: int = 4096,
                 limit: int | None = None) -> None:
        self.rows, self.count = release_rows(release)
        self.positives, self.seed, self.buffer, self.limit = positives, seed, buffer, limit
        self.augment = ssl_augment(image_size)
        self.epoch = 0

    def __len__(self) -> int:
        n = self.count if self.count is not None else 0
        return min(n, self.limit) if self.limit else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple | None]:
        rows = self.rows.shuffle(seed=self.seed + self.epoch, buffer_size=self.buffer)
        for row in itertools.islice(rows, self.limit):
            try:
                a, b = image_from_bytes(row["anchor"]["bytes"]), image_from_bytes(row["positive"]["bytes"])
            except BadImage:
                yield None  # counted and left out by collate_views
                continue
            ia, ib = image_id(row["anchor_key"]), image_id(row["positive_key"])
            if self.positives == "augment":
                yield (self.augment(a), self.augment(a)), (ia, ia), (ib, ib)
            elif self.positives == "semantic":
                yield (self.augment(a), self.augment(b)), (ia, ib), (ib, ia)
            else:
                yield (self.augment(a), self.augment(a), self.augment(b)), (ia, ia, ib), (ib, ib, ia)


class SingleImageViews(Dataset):
    """A source's images, two augmentations each: the augmentation-only baseline and the SePP-ID sampler."""

    def __init__(self, source, image_size: int, limit: int | None = None) -> None:
        self.source = source
        self.items = list(itertools.islice(source.items(), limit))
        self.augment = ssl_augment(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple | None:
        key, _ = self.items[i]
        try:
            img = load_image(self.source, key)
        except BadImage:
            return None  # counted and left out by collate_views
        ia = image_id(key)
        return (self.augment(img), self.augment(img)), (ia, ia), (-1, -1)


def collate_views(batch: list[tuple | None]):
    """Stack per-view tensors and ids: ``(list of (B,C,H,W), list of (B,), list of (B,), skipped)``.

    Samples whose images did not decode arrive as None; they are left out and counted in ``skipped``.
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return [], [], [], skipped
    tensors, images, partners = zip(*good)
    n_views = len(tensors[0])
    return ([torch.stack([t[v] for t in tensors]) for v in range(n_views)],
            [torch.tensor([i[v] for i in images], dtype=torch.long) for v in range(n_views)],
            [torch.tensor([p[v] for p in partners], dtype=torch.long) for v in range(n_views)], skipped)

