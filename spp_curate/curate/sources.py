"""Source adapters: one class per kind of image collection.

A source lists its images in a stable order as ``(key, label)`` pairs and
returns the bytes of any image by key. Keys are source-relative strings that
stay the same across runs and machines (a path under the root, or
``split/number`` for array datasets), so a build directory can reopen its
source from the recipe alone. Adding a kind of source means adding one class
here and naming it in :data:`SOURCE_KINDS`.
"""

from __future__ import annotations

import gzip
import io
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
from PIL import Image

from ..config import Recipe
from ..errors import UserError

# torchvision's list, so that an ImageNet tree is read the way torchvision reads it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class Source(ABC):
    """A collection of labelled (or unlabelled) images, addressed by stable keys."""

    kind: ClassVar[str]
    #: Class names, indexed by label; empty when the source has no labels.
    class_names: list[str]

    @abstractmethod
    def items(self) -> Iterator[tuple[str, int]]:
        """Yield ``(key, label)`` in source order; label is -1 when unknown."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """Return the encoded bytes of the image stored under ``key``."""

    def describe(self) -> str:
        return self.kind


class FashionMNISTSource(Source):
    """Fashion-MNIST from its four IDX files, or the Hub copy when they are absent.

    The files are those of the Debian package ``dataset-fashion-mnist`` (or the
    original distribution): ``train-images-idx3-ubyte.gz`` and friends, gzipped
    or not. Images are 28x28 grayscale arrays; ``read`` returns them as PNG.
    """

    kind = "fashion-mnist"
    DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
    HUB_ID = "zalando-datasets/fashion_mnist"
    CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    _PREFIX = {"train": "train", "test": "t10k"}

    def __init__(self, root: str | None, split: str = "train") -> None:
        if split not in self._PREFIX:
            raise UserError(f"Fashion-MNIST has no split {split!r}; accepted: train, test", option="--split")
        self.root = Path(root or self.DEFAULT_ROOT)
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

    def _find(self, stem: str) -> Path | None:
        for name in (stem + ".gz", stem):
            if (self.root / name).is_file():
                return self.root / name
        return None

    def _from_hub(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            import datasets

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
        index = int(key.rsplit("/", 1)[1])
        buf = io.BytesIO()
        Image.fromarray(self.images[index], "L").save(buf, format="PNG")
        return buf.getvalue()

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


class ImageFolderSource(Source):
    """A folder with one sub-folder per class (torchvision's ImageFolder layout).

    Labels are the sorted class-folder names' positions, as torchvision assigns
    them, so an ImageNet ``train/`` tree gets the usual class indices. Files
    whose extension is not an image extension are skipped; files that have one
    but do not decode are quarantined by the index stage.
    """

    kind = "imagefolder"

    def __init__(self, root: str | None, split: str = "train") -> None:
        if not root:
            raise UserError("imagefolder needs --root DIR with one folder per class", option="--root")
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{root} is not a directory", option="--root")
        self.split = split
        self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise UserError(f"{root} holds no class folders (expected ROOT/<class>/<image>)", option="--root")

    def items(self) -> Iterator[tuple[str, int]]:
        for label, name in enumerate(self.class_names):
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames.sort()
                for fname in sorted(filenames):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        yield Path(dirpath, fname).relative_to(self.root).as_posix(), label

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def describe(self) -> str:
        return f"imagefolder {self.root} ({len(self.class_names)} classes)"


def auto_workers() -> int:
    """Decode processes to use when the recipe does not say: one per spare core, at most 16."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


SOURCE_KINDS: dict[str, type[Source]] = {
    FashionMNISTSource.kind: FashionMNISTSource,
    ImageFolderSource.kind: ImageFolderSource,
}


def open_source(recipe: Recipe) -> Source:
    """Open the source a recipe names. Raises :class:`UserError` on a bad name or root."""
    kind = recipe.source.split(":", 1)[0]
    try:
        cls = SOURCE_KINDS[kind]
    except KeyError:
        raise UserError(f"unknown source {recipe.source!r}; accepted: {', '.join(sorted(SOURCE_KINDS))}",
                        option="--source") from None
    if recipe.root is not None and not Path(recipe.root).exists():
        raise UserError(f"{recipe.root} does not exist", option="--root")
    return cls(recipe.root, recipe.split)
