"""A kind of source added from outside the project: one class, registered, and the whole pipeline takes it.

The class lives in this test module; no project file names it. It draws its pictures (filled circles,
squares and triangles of random size, place and colour) with Pillow and hands them out as PNG bytes.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from spp_curate.curate.sources import SOURCES, Source, register, row_of, state_hash

from conftest import TEST_ENCODER

SHAPES = ["circle", "square", "triangle"]
PER_CLASS = 16


class ShapesSource(Source):
    kind = "shapes"
    form = "shapes"
    reference_example = "shapes:test"
    root_optional = True

    def __init__(self, root: str | None, split: str = "train") -> None:
        self.split, self.class_names, self.listing_problems = split, list(SHAPES), []
        self.seed = {"train": 0, "test": 1}[split]

    def items(self) -> Iterator[tuple[str, int]]:
        for i in range(PER_CLASS * len(SHAPES)):
            yield f"{self.split}/{i:05d}", i % len(SHAPES)

    def read(self, key: str) -> bytes:
        i = row_of(key, self.split, 5, PER_CLASS * len(SHAPES))
        rng = np.random.default_rng([self.seed, i])
        img = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 80, 3)))
        r, (x, y) = int(rng.integers(8, 16)), (int(v) for v in rng.integers(16, 32, 2))
        fill = tuple(int(v) for v in rng.integers(150, 256, 3))
        draw = ImageDraw.Draw(img)
        shape = SHAPES[i % len(SHAPES)]
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    def state(self) -> str:
        return state_hash(["shapes", self.split, str(PER_CLASS)])


@pytest.fixture
def shapes():
    register(ShapesSource)
    yield ShapesSource
    SOURCES.pop(ShapesSource.kind)


def test_a_source_registered_from_outside_builds_verifies_and_serves_as_a_reference_set(shapes, cli, tmp_path):
    out = tmp_path / "b"
    proc = cli("build", "--source", "shapes", "--out", out, *TEST_ENCODER, "--workers", "0",
               "--min-similarity", "0", "--exclude-near", "shapes:test")
    assert proc.returncode == 0, proc.stderr
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert len(index) == PER_CLASS * len(SHAPES) and set(index.label_name) == set(SHAPES)
    assert (index.label == index.key.map(lambda k: int(k[-5:]) % 3)).all()
    exclusion = json.loads((out / "exclusion.json").read_text())
    assert {k: exclusion["references"][0][k] for k in ("name", "split", "count")} == {
        "name": "shapes:test", "split": "test", "count": PER_CLASS * len(SHAPES)}
    assert cli("verify", out / "release").returncode == 0
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["recipe"]["source"] == "shapes" and manifest["class_names"] == SHAPES


def test_an_unregistered_kind_is_one_line_naming_the_registered_ones(cli, tmp_path):
    proc = cli("build", "--source", "shapes", "--out", tmp_path / "b")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --source: unknown source 'shapes'; accepted: "
                                   + ", ".join(sorted(SOURCES)))


def test_a_source_class_without_its_names_is_refused_at_registration():
    class Nameless(Source):
        kind = "nameless"

    with pytest.raises(TypeError, match="form"):
        register(Nameless)
    assert "nameless" not in SOURCES
