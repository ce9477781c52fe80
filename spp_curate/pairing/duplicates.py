"""Near-duplicates decided by picture content, not by an encoder's similarity.

A near-duplicate is the same picture twice: equal bytes, or a resized, re-encoded or slightly cropped copy.
"A cosine above 0.985" is not that rule: on a self-supervised sampler thousands of distinct pairs lie above
it, on a random-init ViT copies shrunk to 20 px lie below ordinary neighbours (``leakage/copies.py``). So
pairs are compared by their pictures: the copy score is the best normalised cross-correlation of one
picture's 24x24 grayscale rendering slid over the other's renderings at 24..28 px in width and height
(crops down to 86 % of a side), in both directions. A pair at or above ``--copy-threshold`` is one picture
and is never mined. The pairs compared are those the other rules would keep (``mine.mine_without_copies``),
so the encoder plays no part in the decision.

**Made once, in the pass that decodes.** The embed stage, which decodes every picture anyway, keeps each
one's *copy descriptor*: its grayscale rendering at ``SIDE`` x ``SIDE`` (1,024 bytes, ``embeddings/
chunk-NNNNN.copy.npy``). Every rendering the score needs is resampled from it, so the copy rule never reads
or decodes a picture again; pairs are scored from descriptor arrays in units of work (:class:`CopyWork`)
that the engine spreads like any other stage's.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..leakage.copies import FINE, FINE_SIZES

#: The side of a picture's copy descriptor (grayscale, resized with Pillow's bilinear filter): above the
#: largest rendering (28 px), so each rendering is a downsampling of it.
SIDE = 32
#: Which descriptors a build's embeddings hold; chunks of another version are embedded again.
DESCRIPTOR_VERSION = "gray32-bilinear-1"
#: Pairs scored per unit of work.
PAIR_BATCH = 4096
#: The renderings that keep the aspect ratio, tried first, and the score from which a pair is also tried at
#: every other aspect (a crop of one side only); far below any copy threshold worth using.
SQUARE = [j for j, (w, h) in enumerate(FINE_SIZES) if w == h]
OTHER = [j for j, (w, h) in enumerate(FINE_SIZES) if w != h]
NEAR = 0.8


def copy_descriptor(image) -> np.ndarray:
    """A decoded picture's copy descriptor: grayscale, ``SIDE`` x ``SIDE``, uint8, flattened."""
    from PIL import Image

    gray = image if image.mode == "L" else image.convert("L")
    return np.frombuffer(gray.resize((SIDE, SIDE), Image.Resampling.BILINEAR).tobytes(), np.uint8).copy()


def tensor_descriptor(picture) -> np.ndarray:
    """The copy descriptor of a decoded uint8 ``C x H x W`` tensor (the device decoder's), on the tensor's
    device: the luma weights Pillow converts with, then an antialiased bilinear resize."""
    import torch
    import torch.nn.functional as F

    x = picture.float()
    if x.shape[0] >= 3:
        x = (x[0] * 299 + x[1] * 587 + x[2] * 114) / 1000
    else:
        x = x[0]
    small = F.interpolate(x[None, None], size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    return small.round().clamp(0, 255).to(torch.uint8).flatten().cpu().numpy()


@lru_cache(maxsize=None)
def _resampler(n: int):
    """The ``n x SIDE`` matrix of an antialiased bilinear resize of ``SIDE`` samples to ``n`` (separable, so a
    rendering is two matrix products)."""
    import torch
    import torch.nn.functional as F

    eye = torch.eye(SIDE).view(SIDE, 1, 1, SIDE)
    return F.interpolate(eye, size=(1, n), mode="bilinear", antialias=True, align_corners=False)[:, 0, 0].T.contiguous()


def _separable(x, left, right):
    """``left @ x[i] @ right.T`` for every ``x[i]`` of ``x`` (U, a, b): one large matrix product, then ``left``
    broadcast over the pictures (a batched product, with no transposed copy between: 2-2.5x faster)."""
    import torch

    return torch.matmul(left, x @ right.T)  # (U, a, w), then (U, h, w)


def _renderings(desc, size: tuple[int, int]):
    """The descriptors ``(U, SIDE, SIDE)`` (float) as renderings ``(U, h, w)`` of ``size`` (w, h)."""
    w, h = size
    return _separable(desc, _resampler(h), _resampler(w)).contiguous()


@lru_cache(maxsize=None)
def _box(n: int):
    """The ``(n - FINE + 1) x n`` matrix that sums every run of FINE samples."""
    import torch

    i = torch.arange(n - FINE + 1)[:, None]
    j = torch.arange(n)[None, :]
    return ((j >= i) & (j < i + FINE)).float()


def _window_norms(r):
    """The norm, mean removed, of every FINE x FINE window of each rendering ``(U, h, w)``: window sums as
    two matrix products (renderings are centred on 128 first, so float32 holds the sums of squares)."""
    _, h, w = r.shape
    sums, squares = _separable(r, _box(h), _box(w)), _separable(r * r, _box(h), _box(w))
    return (squares - sums * sums / (FINE * FINE)).clamp_min(1e-6).sqrt()


def score_pairs(desc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The copy score of each pair ``(a[i], b[i])`` of rows of ``desc`` (copy descriptors): the larger of
    a-in-b and b-in-a over the same-aspect renderings, and, in each direction that comes near a copy there
    (``NEAR``), over every other aspect too. The kernel is zero-mean and unit-norm, so its dot product with a
    window over the window's norm (mean removed) is their normalised cross-correlation. Each rendering and
    its window norms are made once per picture and size, the dot products in one grouped convolution per
    size and direction."""
    import torch
    import torch.nn.functional as F

    if not len(a):
        return np.empty(0, np.float32)
    with torch.inference_mode():
        d = torch.from_numpy(np.ascontiguousarray(desc)).float().view(-1, SIDE, SIDE) - 128.0
        own = _renderings(d, (FINE, FINE)).flatten(1)
        own = own - own.mean(dim=1, keepdim=True)
        kernels = (own / own.norm(dim=1, keepdim=True).clamp_min(1e-6)).view(-1, 1, FINE, FINE)
        ia, ib = torch.from_numpy(np.asarray(a, np.int64)), torch.from_numpy(np.asarray(b, np.int64))
        # (probe, reference, which pairs): a's picture slid over b's renderings, then the other way round
        directions = [(ia, ib, torch.arange(len(ia))), (ib, ia, torch.arange(len(ia)))]
        best = [torch.full((len(ia),), -1.0), torch.full((len(ia),), -1.0)]

        def over(sizes: list[int]) -> None:
            # only the pictures some direction still slides over are rendered
            pictures, where = torch.unique(torch.cat([ref[rows] for _, ref, rows in directions]),
                                           return_inverse=True)
            if not len(pictures):
                return
            refs = torch.split(where, [len(rows) for _, _, rows in directions])
            for j in sizes:
                w, h = FINE_SIZES[j]
                r = _renderings(d[pictures], (w, h))
                norms = _window_norms(r)
                for n, ((probe, _, rows), y) in enumerate(zip(directions, refs)):
                    if not len(rows):
                        continue
                    dots = F.conv2d(r[y].reshape(1, len(rows), h, w), kernels[probe[rows]], groups=len(rows))[0]
                    best[n][rows] = torch.maximum(best[n][rows], (dots / norms[y]).flatten(1).amax(1))

        over(SQUARE)
        directions = [(probe, ref, torch.nonzero(best[n] >= NEAR).flatten())
                      for n, (probe, ref, _) in enumerate(directions)]
        over(OTHER)
        return torch.maximum(best[0], best[1]).numpy().astype(np.float32)


class CopyWork:
    """The copy rule's unit of work: the copy scores of one block of pairs (two columns of index positions).
    Each worker reads the descriptors of its block's pictures from the build's chunk files (as the embed
    stage's workers read the source: the build directory is where every worker can see it)."""

    gpus = 0

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = Path(build_dir)
        self.reader = None

    def __getstate__(self) -> dict:
        return {"build_dir": self.build_dir, "reader": None}

    def setup(self) -> None:
        from ..layout import ChunkedEmbeddings

        self.reader = ChunkedEmbeddings(self.build_dir, np.uint8, part="copy")

    def __call__(self, unit: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        import torch

        a, b = unit
        images, where = np.unique(np.concatenate([a, b]), return_inverse=True)
        assert self.reader is not None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one unit a core: the engine's workers are the parallelism
        try:
            return score_pairs(self.reader[images], where[: len(a)], where[len(a):])
        finally:
            torch.set_num_threads(threads)


def pair_copy_scores(build_dir: Path, a: np.ndarray, b: np.ndarray, engine, workers: int = 0,
                     on_batch=None) -> np.ndarray:
    """The copy score of each pair ``(a[i], b[i])`` of index positions, in units of ``PAIR_BATCH`` pairs
    (sorted by the first picture, so a unit holds few pictures) mapped by ``engine`` over ``workers``."""
    scores = np.full(len(a), -1.0, np.float32)
    if not len(a):
        return scores
    order = np.argsort(a, kind="stable")
    units = [(a[order[lo: lo + PAIR_BATCH]], b[order[lo: lo + PAIR_BATCH]])
             for lo in range(0, len(order), PAIR_BATCH)]
    results = engine.map(CopyWork(build_dir), units, workers=workers if len(units) > 1 else 0,
                         on_result=(lambda _, r: on_batch(len(r))) if on_batch else None)
    scores[order] = np.concatenate(results)
    return scores


#: The version of the copy score's rendering and correlation: a store of another version is not reused.
COPY_SCORE_VERSION = "2"
#: A large odd multiplier: two 64-bit digest prefixes folded into one sort key (rows are matched on both).
_FOLD = np.uint64(0x9E3779B97F4A7C15)


class CopyScoreStore:
    """Copy scores kept with the build, keyed by the pictures' contents (two digest prefixes, smaller first), so
    an update compares only pairs it has not seen: a picture that moved, or whose key changed, keeps its scores.

    Held as three columns (16 bytes a pair) sorted by a folded key; read and written as ``copy-scores.parquet``
    with the score's version in its metadata (another version is not reused)."""

    def __init__(self, a: np.ndarray | None = None, b: np.ndarray | None = None,
                 score: np.ndarray | None = None) -> None:
        a = np.empty(0, np.uint64) if a is None else np.asarray(a, np.uint64)
        b = np.empty(0, np.uint64) if b is None else np.asarray(b, np.uint64)
        score = np.empty(0, np.float32) if score is None else np.asarray(score, np.float32)
        order = np.argsort(self._fold(a, b), kind="stable")
        self.a, self.b, self.score = a[order], b[order], score[order]
        self.reused = self.added = 0

    @staticmethod
    def _fold(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return a * _FOLD + b

    @staticmethod
    def ordered(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(x, y), np.maximum(x, y)

    def lookup(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The stored score of each pair of digest prefixes, NaN where none is stored."""
        a, b = self.ordered(x, y)
        out = np.full(len(a), np.nan, np.float32)
        if not len(self.a) or not len(a):
            return out
        folded = self._fold(self.a, self.b)
        want = self._fold(a, b)
        lo = np.searchsorted(folded, want, side="left")
        hi = np.searchsorted(folded, want, side="right")
        for i in np.flatnonzero(hi > lo):  # a folded key shared by other pairs is told apart by both prefixes
            for j in range(lo[i], hi[i]):
                if self.a[j] == a[i] and self.b[j] == b[i]:
                    out[i] = self.score[j]
                    break
        return out

    def add(self, x: np.ndarray, y: np.ndarray, score: np.ndarray) -> None:
        a, b = self.ordered(x, y)
        merged = CopyScoreStore(np.concatenate([self.a, a]), np.concatenate([self.b, b]),
                                np.concatenate([self.score, np.asarray(score, np.float32)]))
        self.a, self.b, self.score = merged.a, merged.b, merged.score
        self.added += len(a)

    def save(self, path) -> None:
        import pyarrow as pa

        from ..files import write_table

        table = pa.table({"a": self.a, "b": self.b, "score": self.score})
        write_table(path, table.replace_schema_metadata({b"spp_curate.copy_score": COPY_SCORE_VERSION.encode()}))

    @classmethod
    def load(cls, path) -> "CopyScoreStore":
        """The build's store, or an empty one where there is none, it is of another version, or damaged."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if not path.is_file() or path.is_symlink():
                return cls()
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if meta.get(b"spp_curate.copy_score") != COPY_SCORE_VERSION.encode():
                return cls()
            return cls(table.column("a").to_numpy(), table.column("b").to_numpy(), table.column("score").to_numpy())
        except (OSError, KeyError, ValueError, pa.ArrowException):
            return cls()
