"""The generated glyph set of the learning study (bench/glyphs.py): labelled, reproducible, readable as a source."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import glyphs  # noqa: E402

FACES = glyphs.usable_faces()
needs_faces = pytest.mark.skipif(
    len(FACES) < glyphs.MIN_FACES and os.environ.get("SPP_CURATE_FONT_TESTS") != "required",
    reason=f"{len(FACES)} usable font faces here (apt-get install fonts-urw-base35 fonts-freefont-ttf)")


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


@needs_faces
def test_the_glyph_set_is_labelled_reproducible_and_an_imagefolder(tmp_path):
    from spp_curate.config import resolve_recipe
    from spp_curate.curate.sources import open_source

    info = glyphs.generate(tmp_path / "a", per_class=3, test_per_class=1, seed=5)
    glyphs.generate(tmp_path / "b", per_class=3, test_per_class=1, seed=5)
    assert len(info["faces"]) >= glyphs.MIN_FACES and info["classes"][0] == "A"
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b and len(a) == 26 * 4  # the same fonts and seed give the same pictures
    assert len(set(a.values())) == len(a)  # and no two are the same
    other = glyphs.generate(tmp_path / "c", per_class=3, test_per_class=1, seed=6)
    assert other["seed"] == 6 and _digests(tmp_path / "c") != a
    source = open_source(resolve_recipe("imagefolder", {"root": str(tmp_path / "a" / "train")}))
    items = list(source.items())
    assert len(items) == 78 and source.class_names == info["classes"]
    assert [label for _, label in items] == [c for c in range(26) for _ in range(3)]
