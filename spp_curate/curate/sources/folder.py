"""Folders of image files: torchvision's ImageFolder layout, and ImageNet-1k as distributed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ...errors import KeyRefused, UserError
from ...files import UnsafePath, file_identity, safe_join
from .base import IMAGE_EXTENSIONS, Source, listing_state, register


def not_utf8(name: str) -> str | None:
    """A file name the system gave with bytes that are not UTF-8 (Python holds them as surrogates, which no
    table can store), written with those bytes escaped (``bad\\xff.png``) to name it; None for a UTF-8 name."""
    try:
        name.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def identity_of(path: Path) -> str | None:
    """A folder's or file's identity (size and modification time, not following a link); None if it is gone.
    A folder's changes when an entry is added, removed or renamed in it."""
    try:
        return file_identity(os.lstat(path))
    except OSError:
        return None


def class_folders(root: Path) -> list[str]:
    """Sub-folders of ``root``, sorted; symlinked folders are not classes (never followed), nor are folders
    whose names are not UTF-8 (the source reports them)."""
    return sorted(e.name for e in os.scandir(root)
                  if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and not_utf8(e.name) is None)


def linked_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_symlink() and e.is_dir())


@register
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
    form = "imagefolder"
    reference_example = "imagefolder:/data/eval"

    def __init__(self, root: str | None, split: str = "train") -> None:
        if not root:
            raise UserError("imagefolder needs --root DIR with one folder per class", option="--root")
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{root} is not a directory", option="--root")
        self.split = split
        self.listing_base = self.root
        self.fixed_folders = [(".", identity_of(self.root))]  # taken before the class folders are read
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

        self.walked_folders.append((top.relative_to(self.listing_base).as_posix(), identity_of(top)))
        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
            for d in sorted(dirnames):
                if Path(dirpath, d).is_symlink():
                    rel = Path(dirpath, d).relative_to(self.root).as_posix()
                    self.listing_problems.append((rel, "folder symlink, not followed"))
            for d in sorted(dirnames):
                if (shown := not_utf8(str(Path(dirpath, d).relative_to(self.root)))) is not None:
                    self.listing_problems.append((shown, "a folder name that is not UTF-8; not read"))
            dirnames[:] = sorted(d for d in dirnames if not Path(dirpath, d).is_symlink() and not_utf8(d) is None)
            # each folder's identity before os.walk reads it: an entry added after this is seen next time
            self.walked_folders += [(Path(dirpath, d).relative_to(self.listing_base).as_posix(),
                                     identity_of(Path(dirpath, d))) for d in dirnames]
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    key = Path(dirpath, fname).relative_to(self.root).as_posix()
                    if (shown := not_utf8(key)) is not None:
                        self.listing_problems.append((shown, "a file name that is not UTF-8 (rename it to index it)"))
                        continue
                    yield key

    def _odd_class_folders(self) -> list[tuple[str, str]]:
        return [(shown, "a class folder whose name is not UTF-8; not read") for e in os.scandir(self.root)
                if e.is_dir(follow_symlinks=False) and (shown := not_utf8(e.name)) is not None]

    def items(self) -> Iterator[tuple[str, int]]:
        self.walked_folders = list(self.fixed_folders)
        self.listing_problems = [(name, "folder symlink, not followed") for name in linked_folders(self.root)]
        self.listing_problems += self._odd_class_folders()
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
        return file_identity(st)

    def state(self) -> str:
        return listing_state(self.listing())

    def describe(self) -> str:
        return f"imagefolder {self.root} ({len(self.class_names)} classes)"


@register
class ImageNetSource(ImageFolderSource):
    """ImageNet-1k as distributed: ``train/<wnid>/*.JPEG`` and ``val/``.

    ImageNet's terms of access allow research use, not redistribution (``redistributable`` False).

    Class indices are the sorted wnids of ``train/`` (torchvision's order);
    names come from ``LOC_synset_mapping.txt`` when present (its first name
    per synset). ``val/`` may be sorted into ``<wnid>/`` folders already, or
    flat, labelled by ``LOC_val_solution.csv`` or by the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` with ``meta.mat``.
    """

    kind = "imagenet"
    form = "imagenet"
    redistributable = False
    reference_example = "imagenet:/data/imagenet:val"
    reference_split = "val"

    def __init__(self, root: str | None, split: str = "train") -> None:
        if not root:
            raise UserError("imagenet needs --root DIR holding train/ and val/", option="--root")
        if split not in ("train", "val"):
            raise UserError(f"ImageNet has no split {split!r}; accepted: train, val", option="--split")
        self.base = Path(root)
        train = self.base / "train"
        if not train.is_dir():
            raise UserError(f"{root} has no train/ folder (expected ROOT/train/<wnid>/*.JPEG)", option="--root")
        # what the labels and the listing depend on, taken before they are read (build --trust-listing)
        self.listing_base = self.base
        self.fixed_folders = [(name, identity_of(self.base / name)) for name in
                              dict.fromkeys(["train", split, "LOC_synset_mapping.txt", "LOC_val_solution.csv"])]
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
        self.walked_folders = list(self.fixed_folders)
        for key in self._walk(self.root):
            yield key, self._flat_labels.get(Path(key).stem, -1)

    def describe(self) -> str:
        return f"imagenet {self.base} ({self.split}, {len(self.wnids)} classes)"
