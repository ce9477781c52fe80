"""A similarity scale that is the same for every encoder: centring or PCA-whitening fitted on the build.

A self-supervised backbone's features (pooled after a ReLU) all point into one orthant, so their cosine
similarities crowd near 1 (measured on the ``make demo`` sampler: 98 % of nearest-neighbour similarities
between 0.989 and 0.9998), and a random-init ViT's lie in a narrow band of its own. Removing the mean
(``center``) takes the common direction out; PCA-whitening (``pca[:DIM]``, Jégou and Chum, "Negative
evidences and co-occurrences in image retrieval", ECCV 2012) also rescales the leading directions, so no few
dimensions dominate the cosine and similarities spread over the range a threshold can be chosen in.

The transform is fitted on the build's own embeddings (the rows that encoded), applied before the kNN
search, and kept in the build (``whitening.npz``, with the identity of the embeddings it was fitted on);
the float16 chunks stay as the encoder wrote them. By default every run of the mine stage fits it anew, so
an updated build equals a fresh build of the changed source. ``--whiten keep`` applies the stored one
instead: the similarity scale, and a ``--min-similarity`` chosen on it, stay as they were while the source
grows. A stored transform of other embeddings (another encoder, size or model) is refused in one line,
never applied: it would be a scale of something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hashlib
import json
import zipfile

import numpy as np

from ..config import parse_whiten
from ..errors import UserError
from ..files import atomic_path

#: The dimension ``pca`` keeps when none is given (or the embedding's, when smaller).
DEFAULT_PCA_DIM = 128
#: Added to every variance before the square root: directions with almost no variance are not blown up.
SHRINK = 0.05
#: Rows used to fit (a uniform sample beyond this): the covariance of 200,000 rows is already stable.
FIT_ROWS = 200_000
#: Rows converted to float64 at a time while fitting.
FIT_BLOCK = 16_384


#: What a stored transform is read into memory up to: the largest projection ``pca`` makes is d x 4,096 floats.
MAX_STORED_BYTES = 512 * 2**20
KINDS = ("none", "center", "pca")


def embedding_identity(meta: dict) -> str:
    """The embeddings a transform belongs to: a digest of the encoder, its input size and model as
    ``embeddings/meta.json`` records them (not the rows: a grown build keeps its identity)."""
    fields = {k: meta.get(k) for k in ("encoder", "image_size", "model", "dim", "normalized")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Whitening:
    """``x -> normalise((x - mean) @ projection)``; ``projection`` None for centring alone."""

    kind: str
    mean: np.ndarray  # (d,) float32
    projection: np.ndarray | None  # (d, dim) float32
    #: :func:`embedding_identity` of the embeddings it was fitted on ("" when unknown).
    fitted_on: str = ""
    #: True when this run applied the build's stored transform (``--whiten keep``).
    kept: bool = False

    @property
    def dim(self) -> int | None:
        return None if self.projection is None else int(self.projection.shape[1])

    def apply(self, vecs: np.ndarray, batch: int = 65_536, dtype=np.float32) -> np.ndarray:
        """Transformed, L2-normalised rows of ``dtype``, a block at a time; all-zero rows (images that did not
        encode) stay zero."""
        if self.kind == "none":
            return np.asarray(vecs, dtype=dtype)
        width = vecs.shape[1] if self.projection is None else self.projection.shape[1]
        out = np.empty((len(vecs), width), dtype)
        for lo in range(0, len(vecs), batch):
            x = np.asarray(vecs[lo: lo + batch], dtype=np.float32)
            zero = ~x.any(axis=1)
            y = x - self.mean
            if self.projection is not None:
                y = y @ self.projection
            norm = np.linalg.norm(y, axis=1, keepdims=True)
            y = np.divide(y, norm, out=np.zeros_like(y), where=norm > 1e-12)
            y[zero] = 0.0
            out[lo: lo + len(x)] = y
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "shrink": SHRINK if self.projection is not None else None,
                "kept": self.kept}

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, kind=np.array(self.kind), mean=self.mean, fitted_on=np.array(self.fitted_on),
                         projection=self.projection if self.projection is not None else np.zeros((0, 0), np.float32))

    @staticmethod
    def load(path: Path) -> "Whitening":
        """A stored transform, checked: no pickle, at most :data:`MAX_STORED_BYTES`, a known kind, finite
        numbers of consistent shapes; a ``ValueError`` saying what is wrong otherwise."""
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        if path.stat().st_size > MAX_STORED_BYTES:
            raise ValueError(f"over {MAX_STORED_BYTES // 2**20} MiB")
        _check_headers(path)  # what each array expands to, from its header, before any is read
        try:
            with np.load(path, allow_pickle=False) as z:
                kind, mean, projection = str(z["kind"]), z["mean"], z["projection"]
                fitted_on = str(z["fitted_on"]) if "fitted_on" in z.files else ""
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not a transform this program wrote ({type(exc).__name__})") from None
        if kind not in KINDS or mean.ndim != 1 or projection.ndim != 2:
            raise ValueError("not a transform this program wrote")
        if projection.size and projection.shape[0] != mean.shape[0]:
            raise ValueError("its projection does not fit its mean")
        if mean.dtype.kind not in "fiu" or projection.dtype.kind not in "fiu":
            raise ValueError(f"its arrays hold {mean.dtype} and {projection.dtype}, not numbers")
        if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
            raise ValueError("it holds numbers that are not finite")
        return Whitening(kind, mean.astype(np.float32), projection.astype(np.float32) if projection.size else None,
                         fitted_on)


def _check_headers(path: Path) -> None:
    """Each array of a stored ``.npz``: numbers of a plain dtype (or the short strings ``kind`` and ``fitted_on``)
    whose shape, as its header states it, fits :data:`MAX_STORED_BYTES`; read from the headers alone, so a
    header claiming a (768, 2**24) array is refused before 48 GiB are asked for."""
    from numpy.lib import format as npformat

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as fh:
                    version = npformat.read_magic(fh)
                    shape, _, dtype = (npformat.read_array_header_1_0(fh) if version == (1, 0)
                                       else npformat.read_array_header_2_0(fh))
                if dtype.hasobject or dtype.kind not in "fiuU":
                    raise ValueError(f"{info.filename} holds {dtype}, not numbers")
                if int(np.prod(shape, dtype=object)) * max(dtype.itemsize, 1) > MAX_STORED_BYTES:
                    raise ValueError(f"{info.filename} claims shape {tuple(shape)}, over "
                                     f"{MAX_STORED_BYTES // 2**20} MiB")
    except (OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a transform this program wrote ({type(exc).__name__})") from None


#: A kept transform may shrink the embeddings' rank at most by this factor (a fitted ``pca`` keeps it), and may
#: move their mean by at most this many of their spreads: beyond either, cosines collapse (one direction left).
MIN_RANK_SHARE = 0.5
MAX_MEAN_OFFSET = 10.0
CHECK_ROWS = 4096


def check_fits(whitening: Whitening, vecs: np.ndarray, valid: np.ndarray) -> str | None:
    """Why ``whitening`` would collapse these embeddings' similarities, or None when it keeps them apart: on a
    sample of the valid rows, its output must be finite and non-zero, keep at least :data:`MIN_RANK_SHARE` of
    their rank (up to its own width), and its mean may not sit :data:`MAX_MEAN_OFFSET` spreads off theirs."""
    rows = np.flatnonzero(valid)
    if len(rows) < 3 or whitening.kind == "none":
        return None
    if len(rows) > CHECK_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(rows, CHECK_ROWS, replace=False))
    x = np.asarray(vecs[rows], dtype=np.float64)
    centre = x.mean(axis=0)
    spread = float(np.sqrt(np.mean(np.sum((x - centre) ** 2, axis=1))))
    offset = float(np.linalg.norm(centre - whitening.mean.astype(np.float64)))
    if offset > MAX_MEAN_OFFSET * max(spread, 1e-12):
        return (f"its mean lies {offset:.3g} from these embeddings' mean, {offset / max(spread, 1e-12):.3g} times "
                "their spread: every similarity would come out near one value")
    with np.errstate(all="ignore"):  # in float32, as apply() computes it
        y = x.astype(np.float32) - whitening.mean
        if whitening.projection is not None:
            y = y @ whitening.projection
        finite = bool(np.isfinite(y).all() and np.isfinite(np.linalg.norm(y, axis=1)).all())
        y = y.astype(np.float64)
    if not finite:
        return "it overflows on these embeddings (numbers too large)"
    norms = np.linalg.norm(y, axis=1)
    if not (norms > 1e-12 * max(1.0, float(norms.max(initial=0.0)))).mean() > 0.99 or not norms.max(initial=0) > 0:
        return "it maps these embeddings to zero"
    def rank(a: np.ndarray) -> int:
        s = np.linalg.svd(a - a.mean(axis=0), compute_uv=False)
        return int((s > s.max(initial=0.0) * 1e-6).sum()) if len(s) else 0
    have = rank(x)
    need = int(MIN_RANK_SHARE * min(have, y.shape[1]))
    got = rank(y)
    if got < max(1, need):
        return (f"it leaves rank {got} of these embeddings' {have} (at most {y.shape[1]} kept): their similarities "
                "would collapse")
    return None


def stored_whitening(path: Path, d: int, identity: str) -> Whitening | None:
    """``--whiten keep``: the build's stored transform when it is one of these embeddings, None when the build
    has none yet; a one-line error naming ``--whiten`` when it cannot be applied."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        stored = Whitening.load(path)
    except ValueError as why:
        raise UserError(f"keep: the build's {path.name} cannot be used ({why}); give pca to fit a new scale",
                        option="--whiten") from None
    if stored.mean.shape[0] != d or stored.fitted_on != identity:
        raise UserError(f"keep: the build's stored scale was fitted on other embeddings (another encoder, size "
                        f"or model{'' if stored.mean.shape[0] == d else f'; {stored.mean.shape[0]} dims, not {d}'}); "
                        "give pca to fit a new one", option="--whiten")
    stored.kept = True
    return stored


#: From this dimension on, the eigen-solver runs in a forked child: scipy's LAPACK call holds the interpreter
#: lock for its whole run (about 1.5 s at 3,072 dimensions, a ``pixels:32`` space), so in this process no
#: progress line could be written meanwhile; the parent waits with the lock free.
CHILD_EIGH_DIM = 1024


def _eigh(cov: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh

    d = cov.shape[0]
    return eigh(cov, subset_by_index=[d - keep, d - 1])  # ascending


def leading_eigenpairs(cov: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` largest eigenpairs of the symmetric ``cov`` (values ascending), only those computed (a
    3,072-dim pixel space: 0.5 s, not 4 s for all of them); the same numbers whichever process computes them."""
    if cov.shape[0] < CHILD_EIGH_DIM:
        return _eigh(cov, keep)
    import concurrent.futures
    import multiprocessing as mp

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        return pool.submit(_eigh, cov, keep).result()


def fit_whitening(vecs: np.ndarray, valid: np.ndarray, spec: str, seed: int = 0) -> Whitening:
    """Fit ``spec`` (``--whiten``; ``keep`` fits ``pca``, for a build with no stored transform) on the valid
    rows of ``vecs``."""
    kind, dim = parse_whiten(spec)
    d = vecs.shape[1]
    if kind == "none":
        return Whitening("none", np.zeros(d, np.float32), None)
    rows = np.flatnonzero(valid)
    if len(rows) > FIT_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, FIT_ROWS, replace=False))
    # mean and covariance in float64, from blocks of rows (never the sample whole in float64)
    total, outer = np.zeros(d), np.zeros((d, d))
    for lo in range(0, len(rows), FIT_BLOCK):
        x = np.asarray(vecs[rows[lo: lo + FIT_BLOCK]], dtype=np.float64)
        total += x.sum(axis=0)
        outer += x.T @ x
    count = len(rows)
    mean = total / count if count else np.zeros(d)
    if kind == "center" or count < 3:
        return Whitening("center", mean.astype(np.float32), None)
    cov = (outer - count * np.outer(mean, mean)) / max(1, count - 1)
    keep = min(dim or DEFAULT_PCA_DIM, d, count - 1)
    values, vectors = leading_eigenpairs(cov, keep)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    # Shrinkage relative to the mean variance: whitened, but the last, noisy directions are not made equal.
    scale = 1.0 / np.sqrt(values + SHRINK * values.mean() + 1e-12)
    projection = (vectors * scale[None, :]).astype(np.float32)
    return Whitening("pca", mean.astype(np.float32), projection)
