"""Fashion-MNIST from its IDX files (the Debian package ``dataset-fashion-mnist``), or the Hub copy."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ...errors import UserError
from ...files import file_identity
from .base import Source, register, row_of, state_hash


@register
class FashionMNISTSource(Source):
    """Fashion-MNIST from its four IDX files, or the Hub copy when they are absent.

    The files are those of the Debian package ``dataset-fashion-mnist`` (or the
    original distribution): ``train-images-idx3-ubyte.gz`` and friends, gzipped
    or not. Images are 28x28 grayscale arrays; ``read`` returns them as PNG.
    """

    kind = "fashion-mnist"
    form = "fashion-mnist"
    reference_example = "fashion-mnist:test"
    root_optional = True
    DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
    HUB_ID = "zalando-datasets/fashion_mnist"
    CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    _PREFIX = {"train": "train", "test": "t10k"}

    def __init__(self, root: str | None, split: str = "train") -> None:
        if split not in self._PREFIX:
            raise UserError(f"Fashion-MNIST has no split {split!r}; accepted: train, test", option="--split")
        # without --root: SPP_CURATE_FASHION_MNIST, else the Debian package's folder, else the Hub copy
        self.root = Path(root or os.environ.get("SPP_CURATE_FASHION_MNIST") or self.DEFAULT_ROOT)
        self.split = split
        self.class_names = list(self.CLASS_NAMES)
        images = self._find(f"{self._PREFIX[split]}-images-idx3-ubyte")
        labels = self._find(f"{self._PREFIX[split]}-labels-idx1-ubyte")
        if images and labels:
            self.images, self.labels = read_idx(images), read_idx(labels)
        else:
            self.images, self.labels = self._from_hub()
        if len(self.images) != len(self.labels):
            raise UserError(f"{self.root}: {len(self.images)} images but {len(self.labels)} labels", option="--root")
        self.files = [p for p in (images, labels) if p]
        self.listing_problems = []

    def _find(self, stem: str) -> Path | None:
        for name in (stem + ".gz", stem):
            if (self.root / name).is_file():
                return self.root / name
        return None

    def _from_hub(self) -> tuple[np.ndarray, np.ndarray]:
        from ...progress import quiet_log

        try:
            import datasets

            with quiet_log("huggingface_hub"):  # each failed retry would print a line before the one error below
                ds = datasets.load_dataset(self.HUB_ID, split=self.split)
            images = np.stack([np.asarray(img, dtype=np.uint8) for img in ds["image"]])
            return images, np.asarray(ds["label"], dtype=np.int64)
        except Exception:  # noqa: BLE001 - any failure here means "not reachable"
            raise UserError(
                f"no Fashion-MNIST IDX files under {self.root} and the Hub copy {self.HUB_ID} is unreachable: "
                "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
                "pass --root DIR holding the IDX files, or go online",
                option="--root",
            ) from None

    def items(self) -> Iterator[tuple[str, int]]:
        for i, label in enumerate(self.labels):
            yield f"{self.split}/{i:05d}", int(label)

    def read(self, key: str) -> bytes:
        index = row_of(key, self.split, 5, len(self.images))
        buf = io.BytesIO()
        Image.fromarray(self.images[index], "L").save(buf, format="PNG")
        return buf.getvalue()

    def state(self) -> str:
        if not self.files:
            return state_hash([self.HUB_ID, self.split, str(len(self.labels))])
        return state_hash(f"{p.name}:{file_identity(p.stat())}" for p in self.files)

    def describe(self) -> str:
        return f"fashion-mnist ({self.split}, {len(self.labels)} images)"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes", option="--root")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
