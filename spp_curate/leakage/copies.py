"""Copy scores: how likely a picture is a near-copy of a reference picture (re-encoded, resized, slightly cropped).

A copy score is a normalised cross-correlation of small grayscale renderings,
not the build's embedding: measured on the committed Fashion-MNIST subset, a
random-init encoder puts ordinary nearest neighbours (max 0.9987) above
copies shrunk to 20 px (min 0.9913), so no threshold on it separates copies
from look-alikes, and an audit of a downloaded release would need the
build's weights. The score needs no model and is the same on every machine.

Two steps, both batched:

1. **Candidates.** Every picture is rendered as an 8x8 grayscale thumbnail
   (boxed down from its 24 px rendering, mean removed, L2-normalised). Each reference picture contributes its
   thumbnail and those of ten crops (94 % and 88 % of each side, centre and
   corners), so a cropped copy still finds its original among the nearest
   thumbnails. faiss returns the nearest references: exactly up to 800,000
   views (72,000 reference pictures) on a CPU, with the mining planner's IVF
   beyond, whose recall against exact search is then measured and recorded.
2. **Verification.** The picture at 24x24 is slid over each candidate
   reference rendered at 24..28 px in width and in height (crops down to
   86 % of either side, every one-pixel shift); the score is the best
   normalised cross-correlation, 1.0 for a pixel-identical copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

COARSE = 8
FINE = 24
#: The sizes (width, height) a reference is rendered at for verification: a copy cropped to FINE/w of the
#: width and FINE/h of the height (each down to 86 %, so crops that change the aspect ratio too) matches.
FINE_SIDES: tuple[int, ...] = tuple(range(FINE, round(FINE / 0.86) + 1))
FINE_SIZES: tuple[tuple[int, int], ...] = tuple((w, h) for w in FINE_SIDES for h in FINE_SIDES)
FINE_OFFSETS = np.cumsum([0] + [w * h for w, h in FINE_SIZES])
#: Crops of each reference added to the candidate search (share of each side kept).
CROP_SCALES = (0.94, 0.88)
VIEWS = 1 + 5 * len(CROP_SCALES)
#: References verified per picture, and how many of them (the best on same-aspect renderings) are
#: checked over every rendering.
CANDIDATES = 16
FULL_CHECK = 2
#: Decode JPEGs at a reduced scale down to this shorter side (the renderings are at most 28 px).
DRAFT = 64
VERSION = 3
VERIFY_BATCH = 2048


def _gray(image: Image.Image, size: int | tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """``image`` in grayscale resized to ``size``, as bytes (converted here only if it is not grayscale yet)."""
    size = (size, size) if isinstance(size, int) else size
    return np.frombuffer(_as_gray(image).resize(size, resample).tobytes(), dtype=np.uint8)


def _as_gray(image: Image.Image) -> Image.Image:
    """The picture in grayscale. Each picture is converted once and every crop and rendering is taken from
    that: the conversion is per pixel, so converting before cropping gives the same bytes as after."""
    return image if image.mode == "L" else image.convert("L")


def _crops(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    views = [image]
    for s in CROP_SCALES:
        cw, ch = max(1, round(w * s)), max(1, round(h * s))
        for x, y in (((w - cw) // 2, (h - ch) // 2), (0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)):
            views.append(image.crop((x, y, x + cw, y + ch)))
    return views


def _thumbnail(image: Image.Image) -> np.ndarray:
    """The 8x8 thumbnail, boxed down from the 24 px rendering: every picture passes through the same 24 px
    grid first, so a copy resized to any size (by any resampler) lands on its original's thumbnail; boxed
    straight from its own size, a resized copy ranked up to 60th among 10,000 look-alikes."""
    gray = _as_gray(image).resize((FINE, FINE), Image.Resampling.BILINEAR)
    return np.asarray(gray.resize((COARSE, COARSE), Image.Resampling.BOX), dtype=np.uint8).reshape(-1)


def picture_descriptor(image: Image.Image, coarse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A picture that may be a copy: its thumbnail (64 bytes; empty without ``coarse``) and its 24x24
    rendering (576 bytes)."""
    gray = _as_gray(image)
    return (_thumbnail(gray) if coarse else _NO_COARSE), _gray(gray, FINE, Image.Resampling.BILINEAR)


def reference_descriptor(image: Image.Image, coarse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A reference picture: the thumbnails of it and its crops (VIEWS x 64; empty without ``coarse``, which
    only the candidate search reads) and its renderings at FINE_SIZES (16,900 bytes; the first, 24x24, is the
    picture's own :func:`picture_descriptor` rendering)."""
    gray = _as_gray(image)
    thumbs = np.stack([_thumbnail(v) for v in _crops(gray)]) if coarse else _NO_COARSE
    fine = np.concatenate([_gray(gray, m, Image.Resampling.BILINEAR) for m in FINE_SIZES])
    return thumbs, fine


_NO_COARSE = np.zeros(0, np.uint8)


@dataclass
class Descriptors:
    """Descriptors of a list of pictures, row for row; ``ok`` is False where a picture did not decode."""

    coarse: np.ndarray  # (N, 64) or (N, VIEWS, 64) uint8
    fine: np.ndarray  # (N, 576) or (N, sum of m*m) uint8
    ok: np.ndarray  # (N,) bool

    @staticmethod
    def concat(parts: list["Descriptors"]) -> "Descriptors":
        return Descriptors(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("coarse", "fine", "ok")))

    def save(self, path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, coarse=self.coarse, fine=self.fine, ok=self.ok, version=np.array(VERSION))

    @staticmethod
    def load(path) -> "Descriptors":
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != VERSION:
                raise ValueError("descriptors of another version")
            return Descriptors(z["coarse"], z["fine"], z["ok"])


def describe(images: list[Image.Image | None], reference: bool, coarse: bool = True) -> Descriptors:
    """Descriptors of ``images`` as pictures or as references; without ``coarse`` the thumbnails (needed
    only to search for candidates) are left empty, for comparisons of given pairs."""
    fn = reference_descriptor if reference else picture_descriptor
    shape_c = ((VIEWS, COARSE * COARSE) if reference else (COARSE * COARSE,)) if coarse else (0,)
    width_f = int(FINE_OFFSETS[-1]) if reference else FINE * FINE
    coarse_rows = np.zeros((len(images), *shape_c), np.uint8)
    fine = np.zeros((len(images), width_f), np.uint8)
    ok = np.zeros(len(images), bool)
    for i, image in enumerate(images):
        if image is not None:
            coarse_rows[i], fine[i] = fn(image, coarse)
            ok[i] = True
    return Descriptors(coarse_rows, fine, ok)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    x -= x.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-6)


def first_distinct(ids: np.ndarray, count: int) -> np.ndarray:
    """Per row, the first ``count`` distinct non-negative values of ``ids`` in order (padded with the first)."""
    n, k = ids.shape
    dup = ids < 0
    for j in range(1, k):
        dup[:, j] |= (ids[:, :j] == ids[:, j: j + 1]).any(axis=1)
    order = np.argsort(dup, axis=1, kind="stable")[:, :count]
    picked = np.take_along_axis(ids, order, axis=1)
    valid = ~np.take_along_axis(dup, order, axis=1)
    return np.where(valid, picked, np.where(valid[:, :1], picked[:, :1], -1))


#: Thumbnail views searched exactly for candidates: 8 times the embeddings the miner searches exactly (a
#: thumbnail has 64 dims, an embedding 512), so Fashion-MNIST's and ImageNet's validation sets (110,000 and
#: 550,000 views) lose no candidate. Beyond it an IVF index is used and its recall measured and reported.
EXACT_VIEWS_PER_FLAT = 8
RECALL_SAMPLE = 500


def candidates(pictures: Descriptors, references: Descriptors, engine, memory: int, seed: int = 0,
               info: dict | None = None) -> np.ndarray:
    """The ``CANDIDATES`` references nearest each picture by thumbnail (crops included); -1 where none.

    ``info`` (if given) gets how they were searched: ``kind``, ``views`` and ``recall`` (1.0 when exact; for
    an IVF index, the share of exact search's candidates it found, measured on a sample of pictures)."""
    from ..pairing.knn import FLAT_MAX_N, build_faiss_index, faiss_gpus, plan_search, search

    n_ref = len(references.ok)
    per = references.coarse.shape[1]
    flat = _unit_rows(references.coarse.reshape(n_ref * per, -1))
    flat[np.repeat(~references.ok, per)] = 0.0
    limit = int(EXACT_VIEWS_PER_FLAT * FLAT_MAX_N["gpu" if faiss_gpus() > 0 else "cpu"])
    # searched by faiss (on its GPUs where it has them), never through torch: cuda=False
    plan = plan_search(len(flat), flat.shape[1], memory, cuda=False, flat_max_n=limit)
    index = build_faiss_index(flat, plan, seed)
    k = min(len(flat), CANDIDATES * per)
    queries = _unit_rows(pictures.coarse)
    _, pos = search(index, queries, k, engine)
    ids = np.where(pos >= 0, pos // per, -1)
    cand = first_distinct(ids, min(CANDIDATES, n_ref))
    if info is not None:
        info.update(kind=plan.kind, views=int(len(flat)), recall=1.0)
        if plan.kind != "flat" and len(queries):
            info["recall"] = _candidate_recall(flat, per, queries, cand, k, seed)
    return cand


def _candidate_recall(flat: np.ndarray, per: int, queries: np.ndarray, cand: np.ndarray, k: int, seed: int) -> float:
    """Share of exact search's candidates that the approximate ones hold, over a sample of pictures."""
    import faiss

    rows = np.sort(np.random.default_rng(seed).choice(len(queries), min(RECALL_SAMPLE, len(queries)), replace=False))
    exact = faiss.IndexFlatIP(flat.shape[1])
    exact.add(np.ascontiguousarray(flat, dtype=np.float32))
    _, pos = exact.search(np.ascontiguousarray(queries[rows]), k)
    truth = first_distinct(np.where(pos >= 0, pos // per, -1), cand.shape[1])
    found = [len(np.intersect1d(t[t >= 0], c[c >= 0])) / max(1, len(np.unique(t[t >= 0])))
             for t, c in zip(truth, cand[rows])]
    return round(float(np.mean(found)), 4)


def _ncc(refs: "torch.Tensor", kernels: "torch.Tensor") -> "torch.Tensor":
    """Best normalised cross-correlation of each zero-mean, unit-norm ``kernels[i]`` (FINE x FINE) over
    every window of ``refs[i]`` (B x h x w): a grouped convolution over local window statistics."""
    import torch.nn.functional as F

    b, h, w = refs.shape
    n = FINE * FINE
    dots = F.conv2d(refs.view(1, b, h, w), kernels.view(b, 1, FINE, FINE), groups=b)[0]  # sum(window * kernel)
    sums = F.avg_pool2d(refs.view(b, 1, h, w), FINE, stride=1)[:, 0] * n
    squares = F.avg_pool2d((refs * refs).view(b, 1, h, w), FINE, stride=1)[:, 0] * n
    norms = (squares - sums * sums / n).clamp_min(1e-6).sqrt()  # of each window with its mean removed
    return (dots / norms).flatten(1).amax(1)


def _scores(pictures: Descriptors, references: Descriptors, ref_rows: np.ndarray, lo: int, kernels,
            sizes: list[int]) -> np.ndarray:
    """Copy scores of pictures ``lo..`` against references ``ref_rows`` over the renderings ``sizes``."""
    import torch

    rows = np.clip(ref_rows, 0, None)
    score = torch.full((len(rows),), -1.0)
    for j in sizes:
        (w, h), a, b = FINE_SIZES[j], FINE_OFFSETS[j], FINE_OFFSETS[j + 1]
        refs = torch.from_numpy(references.fine[rows, a:b].astype(np.float32)).reshape(-1, h, w)
        score = torch.maximum(score, _ncc(refs, kernels))
    s = score.numpy()
    s[(ref_rows < 0) | ~references.ok[rows] | ~pictures.ok[lo: lo + len(rows)]] = -1.0
    return s


def verify(pictures: Descriptors, references: Descriptors, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best copy score of each picture over its candidate references, and which reference gave it.

    Every candidate is scored over the same-aspect renderings first; the best ``FULL_CHECK`` of them
    over every rendering (aspect changes too). The kernel is zero-mean, so its dot product with a
    window equals that with the window's mean removed.
    """
    import torch

    square = [j for j, (w, h) in enumerate(FINE_SIZES) if w == h]
    n = len(pictures.ok)
    best = np.full(n, -1.0, np.float32)
    which = np.full(n, -1, np.int64)
    for lo in range(0, n, VERIFY_BATCH):
        hi = min(n, lo + VERIFY_BATCH)
        kernels = torch.from_numpy(_unit_rows(pictures.fine[lo:hi]))
        first = np.stack([_scores(pictures, references, cand[lo:hi, c], lo, kernels, square)
                          for c in range(cand.shape[1])], axis=1)
        order = np.argsort(-first, axis=1, kind="stable")[:, :FULL_CHECK]
        for c in range(order.shape[1]):
            ref_rows = np.take_along_axis(cand[lo:hi], order[:, c: c + 1], axis=1)[:, 0]
            s = _scores(pictures, references, ref_rows, lo, kernels, list(range(len(FINE_SIZES))))
            better = s > best[lo:hi]
            best[lo:hi] = np.where(better, s, best[lo:hi])
            which[lo:hi] = np.where(better, ref_rows, which[lo:hi])
    return best, which


def copy_scores(pictures: Descriptors, references: Descriptors, engine, memory: int = 8 * 10**9,
                info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every picture: the best copy score against the references, and the reference row (-1 if none);
    ``info`` gets how the candidates were searched (see :func:`candidates`)."""
    if len(pictures.ok) == 0 or len(references.ok) == 0:
        return np.full(len(pictures.ok), -1.0, np.float32), np.full(len(pictures.ok), -1, np.int64)
    return verify(pictures, references, candidates(pictures, references, engine, memory, info=info))

