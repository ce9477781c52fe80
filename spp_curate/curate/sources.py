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


def class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


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
        self.folders = class_folders(self.root)
        self.class_names = list(self.folders)
        if not self.folders:
            raise UserError(f"{root} holds no class folders (expected ROOT/<class>/<image>)", option="--root")

    def label_of_folder(self, folder: str) -> int:
        return self.folders.index(folder)

    def items(self) -> Iterator[tuple[str, int]]:
        for name in self.folders:
            label = self.label_of_folder(name)
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames.sort()
                for fname in sorted(filenames):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        yield Path(dirpath, fname).relative_to(self.root).as_posix(), label

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def describe(self) -> str:
        return f"imagefolder {self.root} ({len(self.class_names)} classes)"


class ImageNetSource(ImageFolderSource):
    """ImageNet-1k as distributed: ``train/<wnid>/*.JPEG`` and ``val/``.

    Class indices are the sorted wnids of ``train/`` (torchvision's order);
    names come from ``LOC_synset_mapping.txt`` when present (its first name
    per synset). ``val/`` may be sorted into ``<wnid>/`` folders already, or
    flat, labelled by ``LOC_val_solution.csv`` or by the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` with ``meta.mat``.
    """

    kind = "imagenet"

    def __init__(self, root: str | None, split: str = "train") -> None:
        if not root:
            raise UserError("imagenet needs --root DIR holding train/ and val/", option="--root")
        if split not in ("train", "val"):
            raise UserError(f"ImageNet has no split {split!r}; accepted: train, val", option="--split")
        self.base = Path(root)
        train = self.base / "train"
        if not train.is_dir():
            raise UserError(f"{root} has no train/ folder (expected ROOT/train/<wnid>/*.JPEG)", option="--root")
        self.wnids = class_folders(train)
        self.label_of = {w: i for i, w in enumerate(self.wnids)}
        self.class_names = self._names()
        self.root = self.base / split
        self.split = split
        if not self.root.is_dir():
            raise UserError(f"{root} has no {split}/ folder", option="--root")
        self.folders = class_folders(self.root)
        self._flat_labels: dict[str, int] | None = None
        if split == "val" and not self.folders:
            self._flat_labels = self._val_labels()

    def _names(self) -> list[str]:
        mapping = self.base / "LOC_synset_mapping.txt"
        if not mapping.is_file():
            return list(self.wnids)
        names = {}
        for line in mapping.read_text().splitlines():
            wnid, _, words = line.strip().partition(" ")
            names[wnid] = words.split(",")[0].strip() or wnid
        return [names.get(w, w) for w in self.wnids]

    def _val_labels(self) -> dict[str, int]:
        """Labels of a flat val/ folder: file stem -> class index."""
        solution = self.base / "LOC_val_solution.csv"
        if solution.is_file():
            import csv

            with open(solution, newline="") as fh:
                rows = csv.DictReader(fh)
                return {r["ImageId"]: self.label_of[r["PredictionString"].split()[0]] for r in rows}
        devkit = next(iter(sorted(self.base.glob("*devkit*/data"))), None)
        if devkit and (devkit / "ILSVRC2012_validation_ground_truth.txt").is_file():
            from scipy.io import loadmat  # the devkit's meta.mat is a MATLAB file

            synsets = loadmat(devkit / "meta.mat", squeeze_me=True)["synsets"]
            wnid_of_id = {int(s[0]): str(s[1]) for s in synsets}
            ids = (devkit / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
            return {f"ILSVRC2012_val_{i + 1:08d}": self.label_of[wnid_of_id[int(x)]] for i, x in enumerate(ids)}
        raise UserError(f"{self.root} is flat but neither LOC_val_solution.csv nor the devkit's ground truth "
                        "is under --root to label it", option="--root")

    def label_of_folder(self, folder: str) -> int:
        return self.label_of.get(folder, -1)

    def items(self) -> Iterator[tuple[str, int]]:
        if self._flat_labels is None:
            yield from super().items()
            return
        for fname in sorted(os.listdir(self.root)):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                yield fname, self._flat_labels.get(Path(fname).stem, -1)

    def describe(self) -> str:
        return f"imagenet {self.base} ({self.split}, {len(self.wnids)} classes)"


class HFSource(Source):
    """Any Hugging Face image-classification dataset: ``hf:<hub-id>`` or ``hf:<local dir>``.

    A directory written by ``Dataset.save_to_disk`` is opened with
    ``load_from_disk``; anything else goes through ``load_dataset``. Both are
    Arrow files memory-mapped from disk, so a dataset larger than RAM is read
    without being loaded. The image column is the first ``Image`` feature and
    the label column the first ``ClassLabel`` (or ``--image-column`` /
    ``--label-column``); ClassLabel names become class names. Keys are
    ``<split>/<row>``.
    """

    kind = "hf"

    def __init__(self, name: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None) -> None:
        import datasets

        self.name, self.split = name, split
        try:
            if Path(name).is_dir() and not (Path(name) / "README.md").exists() and \
                    any((Path(name) / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(name)
            else:
                ds = datasets.load_dataset(name)
        except Exception as exc:  # noqa: BLE001 - missing, offline, or not a dataset
            raise UserError(f"cannot open Hugging Face dataset {name!r}: {str(exc).splitlines()[0][:200]}",
                            option="--source") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{name} has no split {split!r}; accepted: {', '.join(ds)}", option="--split")
            ds = ds[split]
        feats = ds.features
        self.image_column = image_column or next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
        if self.image_column not in feats:
            raise UserError(f"{name} has no image column{f' {image_column!r}' if image_column else ''}; "
                            f"columns: {', '.join(feats)}", option="--image-column")
        self.label_column = label_column or next(
            (c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        if label_column and label_column not in feats:
            raise UserError(f"{name} has no column {label_column!r}; columns: {', '.join(feats)}",
                            option="--label-column")
        label_feature = feats.get(self.label_column) if self.label_column else None
        self.class_names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else []
        self.ds = ds.cast_column(self.image_column, datasets.Image(decode=False))

    def items(self) -> Iterator[tuple[str, int]]:
        labels = self.ds[self.label_column] if self.label_column else None
        for i in range(len(self.ds)):
            yield f"{self.split}/{i:08d}", int(labels[i]) if labels is not None and labels[i] is not None else -1

    def read(self, key: str) -> bytes:
        cell = self.ds[int(key.rsplit("/", 1)[1])][self.image_column]
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()
        raise OSError("row holds neither image bytes nor a path")

    def describe(self) -> str:
        return f"hf {self.name} ({self.split}, {len(self.ds)} rows)"


class UnsafeMember(OSError):
    """A tar member whose name is absolute or climbs out with '..': never read."""


class WebDatasetSource(Source):
    """WebDataset tars of single images: ``wds:/data/shards-{000000..000099}.tar``.

    Each sample's first image member (jpg, png, ...) is the picture; the
    label comes from its ``cls`` member or from ``label`` in its ``json``
    member (with ``label_name`` as the class name where given). Keys are
    ``<shard name>/<sample key>``; members are read in place by offset. Members
    with absolute paths or ``..`` are refused and end up in the quarantine.
    """

    kind = "wds"

    def __init__(self, pattern: str, split: str = "train") -> None:
        import glob
        import json
        import tarfile

        from braceexpand import braceexpand

        self.pattern, self.split = pattern, split
        paths = sorted({p for part in braceexpand(pattern) for p in (glob.glob(part) or [part])})
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise UserError(f"no tar shards at {missing[0] if missing else pattern}", option="--source")
        self.members: dict[str, tuple[str, int, int, str]] = {}
        self.samples: list[tuple[str, int]] = []
        names: dict[int, str] = {}
        for path in paths:
            shard = Path(path).name
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    stem, _, ext = Path(m.name).name.partition(".")
                    prefix = str(Path(m.name).parent)
                    key = f"{shard}/{prefix + '/' if prefix != '.' else ''}{stem}"
                    samples.setdefault(key, {})[ext.lower()] = m
                meta_of = {}
                for key, parts in samples.items():
                    label = -1
                    if "cls" in parts:
                        label = int(tar.extractfile(parts["cls"]).read().strip() or -1)
                    elif "json" in parts:
                        meta = json.loads(tar.extractfile(parts["json"]).read() or b"{}")
                        label = int(meta.get("label", -1)) if isinstance(meta, dict) else -1
                        if isinstance(meta, dict) and "label_name" in meta and label >= 0:
                            names[label] = str(meta["label_name"])
                    meta_of[key] = label
            for key, parts in samples.items():
                image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
                              if e in parts), None)
                if image is None:
                    continue
                self.members[key] = (path, image.offset_data, image.size, image.name)
                self.samples.append((key, meta_of[key]))
        top = max((lab for _, lab in self.samples), default=-1)
        self.class_names = [names.get(i, str(i)) for i in range(top + 1)] if top >= 0 else []

    def items(self) -> Iterator[tuple[str, int]]:
        yield from self.samples

    def read(self, key: str) -> bytes:
        path, offset, size, name = self.members[key]
        if name.startswith("/") or ".." in Path(name).parts:
            raise UnsafeMember(f"refused tar member {name!r}: absolute or '..' path")
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def describe(self) -> str:
        return f"wds {self.pattern} ({len(self.samples)} images)"


SOURCE_KINDS: dict[str, type[Source]] = {
    FashionMNISTSource.kind: FashionMNISTSource,
    ImageFolderSource.kind: ImageFolderSource,
    ImageNetSource.kind: ImageNetSource,
    HFSource.kind: HFSource,
    WebDatasetSource.kind: WebDatasetSource,
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
    argument = recipe.source.split(":", 1)[1] if ":" in recipe.source else ""
    if cls is HFSource:
        return HFSource(argument or recipe.root or "", recipe.split, recipe.image_column, recipe.label_column)
    if cls is WebDatasetSource:
        return WebDatasetSource(argument or recipe.root or "", recipe.split)
    return cls(recipe.root, recipe.split)
