"""What every source is, and the registry of source kinds.

A source lists its images in a stable order as ``(key, label)`` pairs and
returns the bytes of any image by key. Keys are source-relative strings that
stay the same across runs and machines (a path under the root, or
``split/number`` for array datasets), so a build directory can reopen its
source from the recipe alone.

A kind of source is one class decorated with :func:`register`, in a module of
this package (or anywhere that is imported before the build, such as a test);
``--source``, ``--exclude-near``, their help texts and the recipe's checks read
the registry, so nothing else names the kinds.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Iterator, TypeVar

from ...errors import KeyRefused, UserError

if TYPE_CHECKING:
    from ...config import Recipe

# torchvision's list, so that an ImageNet tree is read the way torchvision reads it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def state_hash(parts: Iterator[str] | list[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:16]


def row_of(key: str, split: str, digits: int, rows: int) -> int:
    """The row number in a ``split/NNNNN`` key of an array source; :class:`KeyRefused` for any other key."""
    match = re.fullmatch(rf"{re.escape(split)}/(\d{{{digits}}})", key) if isinstance(key, str) else None
    if not match or int(match.group(1)) >= rows:
        raise KeyRefused(f"refused key {key!r}: not a row of this source's {split} split")
    return int(match.group(1))


class Source(ABC):
    """A collection of labelled (or unlabelled) images, addressed by stable keys.

    Keys may come from outside (an ID-only release names them), so :meth:`read` accepts only keys
    of this source's own form and raises :class:`KeyRefused` for any other. Problems met while
    listing (a folder that cannot be read, a symlink not followed, a sample with two images) are
    collected in :attr:`listing_problems` as ``(key, reason)``; the index stage quarantines them.
    """

    #: The name ``--source`` and ``--exclude-near`` use.
    kind: ClassVar[str]
    #: How ``--source`` names it in help texts, and a reference set of this kind (``--exclude-near``).
    form: ClassVar[str]
    reference_example: ClassVar[str]
    #: Whether the kind takes its files after a colon (``hf:NAME``, ``wds:SHARDS``) rather than ``--root``.
    takes_argument: ClassVar[bool] = False
    #: Whether a reference set of this kind may name no files (Fashion-MNIST has a default place).
    root_optional: ClassVar[bool] = False
    #: The split a reference set of this kind is when it names none.
    reference_split: ClassVar[str] = "test"
    #: Labels run from 0 to MAX_LABEL - 1 (ImageNet-21k has 21,841 classes); -1 or none: unlabelled. A row
    #: whose label is outside that range is quarantined, so a tiny input cannot ask for 10^40 class names.
    MAX_LABEL: ClassVar[int] = 100_000
    #: Whether the source's pictures may be published. A kind whose pictures may not (ImageNet's terms of
    #: access) says False: its releases say so, and ``push`` refuses their pixels without --i-hold-the-rights.
    redistributable: ClassVar[bool] = True
    #: Class names, indexed by label; empty when the source has no labels.
    class_names: list[str]
    listing_problems: list[tuple[str, str]]

    @classmethod
    def open(cls, argument: str, root: str | None, split: str, image_column: str | None = None,
             label_column: str | None = None) -> "Source":
        """Open a source of this kind (``argument``: what followed ``KIND:`` in ``--source``; the columns: for
        kinds that have them)."""
        target = argument or root
        return cls((target or "") if cls.takes_argument else target, split)

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

    def listing(self, limit: int | None = None) -> "Listing":
        """The source's first ``limit`` images (all without it) in source order, each with its label and
        :meth:`stat` taken once, and what the listing could not use: the one walk a command makes. The
        state (:func:`listing_state`) and the index stage both read it, so no file is listed or stat'ed
        twice, and a ``limit`` stops the walk at its ``limit``-th image."""
        import itertools

        rows = ((key, label, self.stat(key)) for key, label in itertools.islice(self.items(), limit))
        listing = Listing.from_rows(rows)  # the walk runs here; its problems are known after it
        listing.problems = list(getattr(self, "listing_problems", []))
        listing.folders = list(getattr(self, "walked_folders", []))
        return listing


#: Rows turned into columns at a time while listing: the listing never holds a Python object per image.
LISTING_CHUNK = 8_192


class Listing:
    """A source's listing as columns: ``keys`` and ``stats`` (Arrow strings; a stat is null where the file
    could not be stat'ed) and ``labels`` (int32), row for row in source order; ``problems`` (``(key, reason)``)
    and ``folders`` (``(folder, identity)`` of every folder walked, taken before it was read: what
    ``build --trust-listing`` compares to know the listing still holds)."""

    def __init__(self, keys, labels, stats, problems: list[tuple[str, str]] | None = None,
                 folders: list[tuple[str, str]] | None = None) -> None:
        import numpy as np
        import pyarrow as pa

        self.keys = keys if isinstance(keys, pa.Array) else pa.array(keys, pa.string())
        self.labels = np.asarray(labels, np.int32)
        self.stats = stats if isinstance(stats, pa.Array) else pa.array(stats, pa.string())
        self.problems = list(problems or [])
        self.folders = list(folders or [])

    @classmethod
    def from_rows(cls, rows) -> "Listing":
        """A listing of ``(key, label, stat)`` rows, consumed :data:`LISTING_CHUNK` at a time."""
        import itertools

        import numpy as np
        import pyarrow as pa

        keys, labels, stats = [], [], []
        rows = iter(rows)
        while chunk := list(itertools.islice(rows, LISTING_CHUNK)):
            keys.append(pa.array([r[0] for r in chunk], pa.string()))
            labels.append(np.fromiter((r[1] for r in chunk), np.int32, len(chunk)))
            stats.append(pa.array([r[2] for r in chunk], pa.string()))
        if not keys:
            return cls(pa.array([], pa.string()), np.empty(0, np.int32), pa.array([], pa.string()))
        return cls(pa.concat_arrays(keys), np.concatenate(labels), pa.concat_arrays(stats))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def rows(self):
        """Every ``(key, label, stat)``, a chunk of Python objects at a time."""
        for lo in range(0, len(self), LISTING_CHUNK):
            hi = lo + LISTING_CHUNK
            yield from zip(self.keys[lo:hi].to_pylist(), self.labels[lo:hi].tolist(), self.stats[lo:hi].to_pylist())


def listing_state(listing: Listing) -> str:
    """The short hash of a listing: every key with its file identity and label."""
    return state_hash(f"{key}:{stat or 'unreadable'}:{label}" for key, label, stat in listing.rows)



#: Every kind of source, by name, in the order they were registered.
SOURCES: dict[str, type[Source]] = {}
S = TypeVar("S", bound=type[Source])


def register(cls: S) -> S:
    """Make ``cls`` a kind of source: ``--source KIND`` and ``--exclude-near KIND:...`` then open it."""
    for attr in ("kind", "form", "reference_example"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"{cls.__name__} needs a class attribute {attr!r}")
    SOURCES[cls.kind] = cls
    return cls


def source_kinds() -> tuple[str, ...]:
    return tuple(SOURCES)


def source_class(kind: str) -> type[Source]:
    return SOURCES[kind]


def open_source(recipe: Recipe) -> Source:
    """Open the source a recipe names. Raises :class:`UserError` on a bad root."""
    return open_named(recipe.source, recipe.root, recipe.split, recipe.image_column, recipe.label_column)


def open_named(source: str, root: str | None = None, split: str = "train", image_column: str | None = None,
               label_column: str | None = None) -> Source:
    """Open a source from its ``--source`` string alone (the trainer and ``eval`` need no build recipe)."""
    from ...config import parse_source

    spec = parse_source(source)
    if root is not None and not Path(root).exists():
        raise UserError(f"{root} does not exist", option="--root")
    return SOURCES[spec.kind].open(spec.argument, root, split, image_column, label_column)
