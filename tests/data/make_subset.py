"""Regenerate tests/data/fashion-mnist: a class-stratified subset of Fashion-MNIST in IDX format.

    python tests/data/make_subset.py /usr/share/datasets/fashion-mnist

Takes the first 300 training and 100 test images of each class, in source
order, and writes them as gzipped IDX files with the original names, so the
fashion-mnist source reads them exactly like the full dataset.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

from spp_curate.curate.sources import read_idx

PER_CLASS = {"train": 300, "t10k": 100}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main(src: str) -> None:
    out = Path(__file__).parent / "fashion-mnist"
    out.mkdir(exist_ok=True)
    for prefix, per_class in PER_CLASS.items():
        images = read_idx(Path(src) / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(Path(src) / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
        print(prefix, len(keep))


if __name__ == "__main__":
    main(sys.argv[1])
