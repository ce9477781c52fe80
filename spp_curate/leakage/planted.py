"""The edits a near-copy check is measured against: how a copy of an evaluation picture may look in a
collection. ``bench/leakage.py`` plants such copies to measure recall, and the tests plant them too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: Kinds of copy, mildest first: ``exact`` (the same pixels saved as PNG), ``jpeg`` (re-encoded, quality
#: 75-94), ``resized`` (to 36-63 px), ``cropped`` (0-2 px off each side of a 28 px picture, i.e. up to a
#: seventh of a side, half of them scaled back), ``cropped-10`` (up to 10 % off each side, the same way).
KINDS = ("exact", "jpeg", "resized", "cropped", "cropped-10")


def near_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """Encoded bytes of a ``kind`` copy of ``image``, and the file extension they need."""
    buf = io.BytesIO()
    w, h = image.size
    if kind == "exact":
        image.save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind == "jpeg":
        image.save(buf, "JPEG", quality=int(rng.integers(75, 95)))  # L and RGB pictures both
        return buf.getvalue(), "jpg"
    if kind == "resized":
        side = int(rng.integers(36, 64))
        image.resize((side, round(side * h / w)), Image.Resampling.BICUBIC).save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind not in ("cropped", "cropped-10"):
        raise ValueError(f"unknown kind of copy {kind!r}; accepted: {', '.join(KINDS)}")
    share = 2 / 28 if kind == "cropped" else 0.10
    left, right = (int(v) for v in rng.integers(0, round(w * share) + 1, size=2))
    top, bottom = (int(v) for v in rng.integers(0, round(h * share) + 1, size=2))
    crop = image.crop((left, top, w - right, h - bottom))
    if rng.random() < 0.5:
        crop = crop.resize((w, h), Image.Resampling.BILINEAR)
    crop.save(buf, "PNG")
    return buf.getvalue(), "png"


def plant_folder(root: Path, fmnist_root: Path, train_images: int, per_kind: int, kinds: tuple[str, ...] = KINDS,
                 seed: int = 0) -> dict[str, str]:
    """An image folder (``class<label>/``) of the first Fashion-MNIST training pictures plus ``per_kind`` copies
    of test pictures of each kind; returns ``{key: kind}`` of the planted copies."""
    from ..curate.sources import FashionMNISTSource

    train = FashionMNISTSource(str(fmnist_root), "train")
    test = FashionMNISTSource(str(fmnist_root), "test")
    for i in range(min(train_images, len(train.images))):
        folder = root / f"class{int(train.labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(train.images[i]).save(folder / f"train-{i:05d}.png")
    rng = np.random.default_rng(seed)
    planted = {}
    for j, t in enumerate(rng.choice(len(test.images), per_kind * len(kinds), replace=False)):
        kind = kinds[j % len(kinds)]
        data, ext = near_copy(Image.fromarray(test.images[t]), kind, rng)
        key = f"class{int(test.labels[t])}/planted-{kind}-{t:05d}.{ext}"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
        planted[key] = kind
    return planted
