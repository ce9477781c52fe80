"""Source adapters: one class per kind of image collection.

A source lists its images in a stable order as ``(key, label)`` pairs and
returns the bytes of any image by key. Keys are source-relative strings that
stay the same across runs and machines (a path under the root, or
``split/number`` for array datasets), so a build directory can reopen its
source from the recipe alone. Adding a kind of source means adding one class
here, naming it in :data:`SOURCE_CLASSES` and ``config.SOURCE_KINDS``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
from PIL import Image

from ..config import SOURCE_KINDS, Recipe
from ..errors import KeyRefused, UserError
from ..files import UnsafePath, safe_join

# torchvision's list, so that an ImageNet tree is read the way torchvision reads it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _feature_kind(feature) -> str:
    """A Hugging Face feature in words, for an error line: ``int64 values``, ``Image values``."""
    name = type(feature).__name__
    return f"{feature.dtype if name == 'Value' else name} values"


def _state_hash(parts: Iterator[str] | list[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:16]


class Source(ABC):
    """A collection of labelled (or unlabelled) images, addressed by stable keys.

    Keys may come from outside (an ID-only release names them), so :meth:`read` accepts only keys
    of this source's own form and raises :class:`KeyRefused` for any other. Problems met while
    listing (a folder that cannot be read, a symlink not followed, a sample with two images) are
    collected in :attr:`listing_problems` as ``(key, reason)``; the index stage quarantines them.
    """

    kind: ClassVar[str]
    #: Labels run from 0 to MAX_LABEL - 1 (ImageNet-21k has 21,841 classes); -1 or none: unlabelled. A row
    #: whose label is outside that range is quarantined, so a tiny input cannot ask for 10^40 class names.
    MAX_LABEL: ClassVar[int] = 100_000
    #: Class names, indexed by label; empty when the source has no labels.
    class_names: list[str]
    listing_problems: list[tuple[str, str]]

    @abstractmethod
    def items(self) -> Iterator[tuple[str, int]]:
        """Yield ``(key, label)`` in source order; label is -1 when unknown."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """Return the encoded bytes of the image stored under ``key``."""

    @abstractmethod
    def state(self) -> str:
        """A short hash of what the source holds now (its listing with sizes and modification times, or
        its files' identities), so a build notices added, removed and edited images."""

    def describe(self) -> str:
        return self.kind

    def stat(self, key: str) -> str | None:
        """A cheap identity of one image's file (size and modification time), where each image is a file:
        an image whose identity is unchanged since the last index is not read again. None elsewhere."""
        return None


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
        self.files = [p for p in (images, labels) if p]
        self.listing_problems = []

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
        index = _row_of(key, self.split, 5, len(self.images))
        buf = io.BytesIO()
        Image.fromarray(self.images[index], "L").save(buf, format="PNG")
        return buf.getvalue()

    def state(self) -> str:
        if not self.files:
            return _state_hash([self.HUB_ID, self.split, str(len(self.labels))])
        return _state_hash(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.files)

    def describe(self) -> str:
        return f"fashion-mnist ({self.split}, {len(self.labels)} images)"


def _row_of(key: str, split: str, digits: int, rows: int) -> int:
    """The row number in a ``split/NNNNN`` key of an array source; :class:`KeyRefused` for any other key."""
    match = re.fullmatch(rf"{re.escape(split)}/(\d{{{digits}}})", key) if isinstance(key, str) else None
    if not match or int(match.group(1)) >= rows:
        raise KeyRefused(f"refused key {key!r}: not a row of this source's {split} split")
    return int(match.group(1))


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
    """Sub-folders of ``root``, sorted; symlinked folders are not classes (never followed)."""
    return sorted(e.name for e in os.scandir(root)
                  if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))


def linked_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_symlink() and e.is_dir())


class ImageFolderSource(Source):
    """A folder with one sub-folder per class (torchvision's ImageFolder layout).

    Labels are the sorted class-folder names' positions, as torchvision assigns
    them, so an ImageNet ``train/`` tree gets the usual class indices. Files
    whose extension is not an image extension are skipped; files that have one
    but do not decode are quarantined by the index stage.

    Nothing outside the root is read: folder symlinks are never followed (a loop
    cannot multiply the images) and are reported, and a file symlink is read only
    when it resolves inside the root. A folder that cannot be read is reported.
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
        self.listing_problems = []
        if not self.folders:
            raise UserError(f"{root} holds no class folders (expected ROOT/<class>/<image>)", option="--root")

    def label_of_folder(self, folder: str) -> int:
        return self.folders.index(folder)

    def _walk(self, top: Path) -> Iterator[str]:
        """Image files under ``top`` as keys, in sorted order, following no folder symlink."""
        def unreadable(exc: OSError) -> None:
            where = Path(exc.filename).relative_to(self.root).as_posix() if exc.filename else str(top)
            self.listing_problems.append((where, f"unreadable folder: {exc.strerror or exc}"))

        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
            for d in sorted(dirnames):
                if Path(dirpath, d).is_symlink():
                    rel = Path(dirpath, d).relative_to(self.root).as_posix()
                    self.listing_problems.append((rel, "folder symlink, not followed"))
            dirnames[:] = sorted(d for d in dirnames if not Path(dirpath, d).is_symlink())
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    yield Path(dirpath, fname).relative_to(self.root).as_posix()

    def items(self) -> Iterator[tuple[str, int]]:
        self.listing_problems = [(name, "folder symlink, not followed") for name in linked_folders(self.root)]
        for name in self.folders:
            label = self.label_of_folder(name)
            for key in self._walk(self.root / name):
                yield key, label

    def path_of(self, key: str) -> Path:
        """The file a key names, inside the root; :class:`KeyRefused` for a key that would leave it."""
        try:
            return safe_join(self.root, key, follow_inside=True)
        except UnsafePath as exc:
            raise KeyRefused(f"refused key: {exc}") from None

    def read(self, key: str) -> bytes:
        return self.path_of(key).read_bytes()

    def stat(self, key: str) -> str | None:
        try:
            st = (self.root / key).stat()
        except OSError:
            return None
        return f"{st.st_size}:{st.st_mtime_ns}"

    def state(self) -> str:
        return _state_hash(f"{key}:{self.stat(key) or 'unreadable'}:{label}" for key, label in self.items())

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
        self.listing_problems = []
        for key in self._walk(self.root):
            yield key, self._flat_labels.get(Path(key).stem, -1)

    def describe(self) -> str:
        return f"imagenet {self.base} ({self.split}, {len(self.wnids)} classes)"


def _saved_without_rows(name: str) -> bool:
    """Whether ``name`` is a ``save_to_disk`` folder of zero rows (which ``load_from_disk`` cannot open)."""
    import json

    state = Path(name) / "state.json"
    try:
        return state.is_file() and state.stat().st_size < 1 << 20 and json.loads(state.read_text())["_data_files"] == []
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
            if _saved_without_rows(name):
                raise UserError(f"{name} holds no rows", option="--source") from None
            raise UserError(f"cannot open Hugging Face dataset {name!r}: {str(exc).splitlines()[0][:200]}",
                            option="--source") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{name} has no split {split!r}; accepted: {', '.join(ds)}", option="--split")
            ds = ds[split]
        if len(ds) == 0:
            raise UserError(f"{name} ({split}) holds no rows", option="--source")
        feats = ds.features
        images = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
        self.image_column = image_column or (images[0] if images else None)
        if self.image_column not in feats:
            raise UserError(f"{name} has no image column{f' {image_column!r}' if image_column else ''}; "
                            f"columns: {', '.join(feats)}", option="--image-column")
        if not isinstance(feats[self.image_column], datasets.Image):
            raise UserError(f"column {self.image_column!r} of {name} holds {_feature_kind(feats[self.image_column])}, "
                            f"not images; image columns: {', '.join(images) or 'none'}", option="--image-column")
        self.label_column = label_column or next(
            (c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        if label_column and label_column not in feats:
            raise UserError(f"{name} has no column {label_column!r}; columns: {', '.join(feats)}",
                            option="--label-column")
        self.class_names, self._labels = [], None
        if self.label_column:
            self._read_labels(ds, feats[self.label_column])
        self.ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.listing_problems = []

    def _read_labels(self, ds, feature) -> None:
        """Take the label column: a ClassLabel (its names become class names), integers, or strings (each
        distinct string a class, numbered in sorted order as ImageFolder numbers folders). Anything else is
        refused here; a row whose label is out of range is quarantined when listed."""
        import datasets
        import pyarrow.types as pat

        column = ds.select_columns([self.label_column]).with_format("arrow")[:].column(0)
        kind = _feature_kind(feature)
        if self.label_column == self.image_column or not isinstance(feature, (datasets.ClassLabel, datasets.Value)):
            raise UserError(f"column {self.label_column!r} holds {kind}; accepted: a ClassLabel, integer or "
                            "string column", option="--label-column")
        dtype = column.type
        if isinstance(feature, datasets.ClassLabel):
            self.class_names = [str(n) for n in feature.names]
        if pat.is_integer(dtype):
            self._labels = column.to_pylist()
        elif pat.is_string(dtype) or pat.is_large_string(dtype):
            values = [None if v is None else str(v) for v in column.to_pylist()]
            if not any(values):
                raise UserError(f"column {self.label_column!r} holds no labels", option="--label-column")
            distinct = sorted({v for v in values if v})
            if len(distinct) > self.MAX_LABEL:
                raise UserError(f"column {self.label_column!r} holds {len(distinct):,} distinct labels, over "
                                f"{self.MAX_LABEL:,}", option="--label-column")
            number = {v: i for i, v in enumerate(distinct)}
            self.class_names = distinct
            self._labels = [number[v] if v else -1 for v in values]
        else:
            raise UserError(f"column {self.label_column!r} holds {kind}; accepted: a ClassLabel, integer or "
                            "string column", option="--label-column")
    def items(self) -> Iterator[tuple[str, int]]:
        names = len(self.class_names) if isinstance(self._labels, list) and self.class_names else None
        for i in range(len(self.ds)):
            key = f"{self.split}/{i:08d}"
            label = -1 if self._labels is None or self._labels[i] is None else self._labels[i]
            if not -1 <= label < self.MAX_LABEL:
                self.listing_problems.append((key, f"bad label: label {str(label)[:40]} is outside -1 to "
                                                   f"{self.MAX_LABEL - 1:,}"))
                continue
            if names is not None and label >= names:
                self.listing_problems.append((key, f"bad label: label {label} is past the {names} class names"))
                continue
            yield key, label

    def read(self, key: str) -> bytes:
        cell = self.ds[_row_of(key, self.split, 8, len(self.ds))][self.image_column]
        if not cell:
            raise OSError("the row's image cell is empty")
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            # A row naming a file (datasets loaded from image files): read only inside the dataset's own
            # folder or the Hugging Face caches, never a path the data chose elsewhere.
            path = Path(cell["path"]).resolve()
            if any(path.is_relative_to(root) for root in self._file_roots()):
                return path.read_bytes()
            raise KeyRefused(f"refused: row {key} names a file outside the dataset and the Hugging Face cache")
        raise OSError("row holds neither image bytes nor a path")

    def _file_roots(self) -> list[Path]:
        import datasets
        from huggingface_hub import constants

        roots = [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
        if Path(self.name).is_dir():
            roots.append(Path(self.name))
        return [r.resolve() for r in roots]

    def state(self) -> str:
        return _state_hash([self.name, self.split, str(len(self.ds)), str(getattr(self.ds, "_fingerprint", ""))])

    def describe(self) -> str:
        return f"hf {self.name} ({self.split}, {len(self.ds)} rows)"


class WebDatasetSource(Source):
    """WebDataset tars of single images: ``wds:/data/shards-{000000..000099}.tar``.

    Samples are grouped the way webdataset groups them (``base_plus_ext``): each
    sample's image member (jpg, png, ...) is the picture; the label comes from
    its ``cls`` member or from ``label`` in its ``json`` member (with
    ``label_name`` as the class name where given). Keys are ``<shard name>/<sample
    key>``; members are read in place by offset. A member with an absolute or
    ``..`` path, a sample with a second image, or a label that is not an integer
    is reported (and quarantined by the index stage), never read or guessed at.
    """

    kind = "wds"
    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
    MAX_META_BYTES = 1 << 20

    def __init__(self, pattern: str, split: str = "train") -> None:
        import glob

        from braceexpand import braceexpand

        self.pattern, self.split = pattern, split
        paths = sorted({p for part in braceexpand(pattern) for p in (glob.glob(part) or [part])})
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise UserError(f"no tar shards at {missing[0] if missing else pattern}", option="--source")
        self.paths = paths
        # A shard is named by its path below the folder all shards share, so that two shards with one file
        # name in different folders (``{a,b}/shard.tar``) give different keys; shards of one folder: the name.
        parents = [str(Path(p).resolve().parent) for p in paths]
        common = Path(os.path.commonpath(parents)) if parents else Path()
        self._shard_name = {p: Path(p).resolve().relative_to(common).as_posix() for p in paths}
        self.members: dict[str, tuple[str, int, int]] = {}
        self.samples: list[tuple[str, int]] = []
        self.listing_problems = []
        names: dict[int, str] = {}
        for path in paths:
            self._list_shard(path, names)
        top = max((lab for _, lab in self.samples), default=-1)
        self.class_names = [names.get(i, str(i)) for i in range(top + 1)] if top >= 0 else []

    def _list_shard(self, path: str, names: dict[int, str]) -> None:
        import tarfile

        from webdataset.tariterators import base_plus_ext

        shard = self._shard_name[path]
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isdir():
                    continue  # a folder entry holds no picture
                if not m.isfile():
                    kind = ("a link" if m.issym() or m.islnk() else "a FIFO" if m.isfifo()
                            else "a device" if m.isdev() else "not a plain file")
                    self.listing_problems.append((f"{shard}/{m.name}", f"refused tar member: {kind}"))
                    continue
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    self.listing_problems.append((f"{shard}/{m.name}", "refused tar member: absolute or '..' path"))
                    continue
                prefix, ext = base_plus_ext(m.name)
                if prefix is None:
                    continue
                samples.setdefault(f"{shard}/{prefix}", {})[ext.lower()] = m

            def small(member: tarfile.TarInfo) -> bytes:
                if member.size > self.MAX_META_BYTES:
                    raise ValueError(f"{member.name} is {member.size:,} bytes, over {self.MAX_META_BYTES:,}")
                return tar.extractfile(member).read()

            for key, parts in samples.items():
                images = [e for e in self.IMAGE_EXTS if e in parts]
                if not images:
                    continue
                for extra in images[1:]:
                    self.listing_problems.append(
                        (f"{key}.{extra}", f"a second image in sample {key} (its .{images[0]} is used)"))
                try:
                    label = self._label(parts, small, names)
                    if not -1 <= label < self.MAX_LABEL:
                        raise ValueError(f"label {str(label)[:40]} is outside -1 to {self.MAX_LABEL - 1:,}")
                except (ValueError, TypeError, UnicodeDecodeError) as exc:
                    self.listing_problems.append((key, f"bad label: {exc}"))
                    continue
                image = parts[images[0]]
                self.members[key] = (path, image.offset_data, image.size)
                self.samples.append((key, label))

    @staticmethod
    def _label(parts: dict, read_small, names: dict[int, str]) -> int:
        import json

        if "cls" in parts:
            text = read_small(parts["cls"]).decode().strip()
            if not re.fullmatch(r"-?\d{1,12}", text or "-1"):
                raise ValueError(f"its .cls member holds {text[:40]!r}, not an integer")
            return int(text or -1)
        if "json" in parts:
            meta = json.loads(read_small(parts["json"]) or b"{}")
            if not isinstance(meta, dict) or "label" not in meta:
                return -1
            if not isinstance(meta["label"], int) or isinstance(meta["label"], bool):
                raise ValueError(f"its json label is {meta['label']!r}, not an integer")
            if "label_name" in meta and meta["label"] >= 0:
                names[meta["label"]] = str(meta["label_name"])
            return meta["label"]
        return -1

    def items(self) -> Iterator[tuple[str, int]]:
        yield from self.samples

    def read(self, key: str) -> bytes:
        try:
            path, offset, size = self.members[key]
        except (KeyError, TypeError):
            raise KeyRefused(f"refused key {key!r}: no such sample in these shards") from None
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def state(self) -> str:
        return _state_hash(f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in self.paths)

    def describe(self) -> str:
        return f"wds {self.pattern} ({len(self.samples)} images)"


SOURCE_CLASSES: dict[str, type[Source]] = {
    FashionMNISTSource.kind: FashionMNISTSource,
    ImageFolderSource.kind: ImageFolderSource,
    ImageNetSource.kind: ImageNetSource,
    HFSource.kind: HFSource,
    WebDatasetSource.kind: WebDatasetSource,
}


assert tuple(SOURCE_CLASSES) == SOURCE_KINDS, "config.SOURCE_KINDS names one class here per kind"


def open_source(recipe: Recipe) -> Source:
    """Open the source a recipe names. Raises :class:`UserError` on a bad root."""
    spec = recipe.source_spec
    cls, argument = SOURCE_CLASSES[spec.kind], spec.argument
    if recipe.root is not None and not Path(recipe.root).exists():
        raise UserError(f"{recipe.root} does not exist", option="--root")
    if cls is HFSource:
        return HFSource(argument or recipe.root or "", recipe.split, recipe.image_column, recipe.label_column)
    if cls is WebDatasetSource:
        return WebDatasetSource(argument or recipe.root or "", recipe.split)
    return cls(recipe.root, recipe.split)
