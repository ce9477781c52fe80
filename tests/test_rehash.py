"""A content check: an in-place edit that keeps a file's size and modification time is seen by ``--rehash``,
and ``--force`` reads every file again.

The pictures are PPM files (their size is fixed by their width and height), and two of different classes swap
names with their modification times put back: a build that trusts file identities sees nothing.
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.parquet as pq

from spp_curate.export.versions import read_changelog

from conftest import TEST_ENCODER
from images import broken_behind_header, fmnist_pictures, jpeg_bytes

OPTIONS = [*TEST_ENCODER, "--workers", "0", "--min-similarity", "0"]


def _stage_lines(proc) -> dict[str, str]:
    return {line.split(":")[0]: line for line in proc.stderr.splitlines() if ":" in line}


def test_rehash_sees_a_swap_that_kept_sizes_and_times_and_force_reads_every_file(cli, tmp_path):
    root, out = tmp_path / "images", tmp_path / "build"
    for n, (label, img) in enumerate(fmnist_pictures(10, classes=3, size=32)):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"class{label}" / f"{n:04d}.ppm")
    # indexed (its header is sound), then quarantined by the embed stage, which alone decodes it
    (root / "class2" / "broken.jpg").write_bytes(broken_behind_header(fmnist_pictures(1, size=32)[0][1]))
    truncated = jpeg_bytes(fmnist_pictures(1, size=32)[0][1])[:300]  # quarantined by the index stage
    (root / "class1" / "bad.jpg").write_bytes(truncated)
    build = ["build", "--source", "imagefolder", "--root", root, "--out", out, *OPTIONS]
    assert cli(*build).returncode == 0
    index = pq.read_table(out / "index.parquet").to_pandas().set_index("id")
    pairs = pq.read_table(out / "pairs.parquet").to_pandas()
    in_pairs = sorted(set(index.key[pairs.anchor_id]) | set(index.key[pairs.positive_id]))
    a = root / next(k for k in in_pairs if k.startswith("class0/"))  # two pictures of the release
    b = root / next(k for k in in_pairs if k.startswith("class1/"))
    times = {p: os.stat(p) for p in (a, b)}
    data = {a: b.read_bytes(), b: a.read_bytes()}
    assert len(data[a]) == len(data[b]) and data[a] != data[b]
    for p in (a, b):
        p.write_bytes(data[p])
        os.utime(p, ns=(times[p].st_atime_ns, times[p].st_mtime_ns))

    unseen = cli(*build)
    assert unseen.returncode == 0 and all(line.endswith("complete, skipped") for line in unseen.stderr.splitlines()
                                          if line.split(":")[0] in ("index", "embed", "mine", "export"))
    stale = cli("export", out, "--force")  # the source's bytes are not what the index holds
    assert stale.returncode == 2 and "--rehash" in stale.stderr and "Traceback" not in stale.stderr

    rehashed = _stage_lines(cli(*build, "--rehash"))
    assert "read 32" in rehashed["index"] and "changed 2" in rehashed["index"], rehashed["index"]
    assert "embedded 2" in rehashed["embed"], rehashed["embed"]
    index = pq.read_table(out / "index.parquet").to_pandas().set_index("key")
    for p in (a, b):
        assert index.digest[p.relative_to(root).as_posix()] == hashlib.sha256(data[p]).hexdigest()
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert read_changelog(out / "release")["changed"] == sorted(p.relative_to(root).as_posix() for p in (a, b))

    # a rehash that finds nothing new reads every file and runs nothing after the index
    quarantine = dict(zip(*pq.read_table(out / "quarantine.parquet").to_pydict().values()))
    assert sorted(quarantine) == ["class1/bad.jpg", "class2/broken.jpg"] and "truncated" in quarantine["class1/bad.jpg"]
    # the index's own quarantined file changes its bytes (not its size or time): the index comes out the same
    bad, kept = root / "class1" / "bad.jpg", os.stat(root / "class1" / "bad.jpg")
    bad.write_bytes(b"x" * len(truncated))
    os.utime(bad, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    again = _stage_lines(cli(*build, "--rehash"))
    assert "read 32" in again["index"]
    after = dict(zip(*pq.read_table(out / "quarantine.parquet").to_pydict().values()))
    assert sorted(after) == sorted(quarantine) and "not an image" in after["class1/bad.jpg"]  # the embed row stays
    # what reads only the index runs nothing; the report reads the quarantine, which now says another reason
    assert all(again[s].endswith("complete, skipped") for s in ("embed", "exclude", "mine")), again
    assert json.loads((out / "release" / "manifest.json").read_text())["version"] == 2

    forced = _stage_lines(cli(*build, "--force"))
    assert "read 32" in forced["index"], forced["index"]
