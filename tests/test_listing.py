"""One listing per command: the source's state and the index stage share one walk with one stat a file,
and ``--limit`` stops the walk at its limit (``Source.listing``, ``stages.bind_source_state``)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from conftest import run_cli


def picture_folder(root: Path, classes: int = 3, per_class: int = 12) -> list[str]:
    rng = np.random.default_rng(0)
    keys = []
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            key = f"c{c}/{i:03d}.png"
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / key)
            keys.append(key)
    return keys


def counted_stats(monkeypatch, root: Path) -> collections.Counter:
    """Every ``os.stat`` of a file under ``root`` (pathlib's ``stat``, ``exists`` and ``is_file`` go through it)."""
    counts: collections.Counter = collections.Counter()
    real = os.stat
    top = str(root.resolve())

    def stat(path, *args, **kwargs):
        name = os.fspath(path) if not isinstance(path, int) else ""
        if isinstance(name, str) and name.startswith(top) and name.lower().endswith(".png"):
            counts[name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    return counts


def test_a_build_of_an_unchanged_tree_stats_each_file_once(tmp_path, monkeypatch):
    """The state and the index stage share one listing: a first build stats each file once for both (and
    reads it, checking it is no symlink out), a rebuild of the unchanged tree stats each file once and reads
    none."""
    root = tmp_path / "images"
    keys = picture_folder(root)
    counts = counted_stats(monkeypatch, root)
    build = ("build", "--source", "imagefolder", "--root", root, "--out", tmp_path / "b", "--until", "index",
             "--workers", "0")
    assert run_cli(*build) == 0
    assert len(counts) == len(keys) and max(counts.values()) == 2, counts.most_common(3)  # listed, then read
    counts.clear()
    assert run_cli(*build) == 0
    assert len(counts) == len(keys), sorted(counts)[:3]  # every file was looked at ...
    assert max(counts.values()) == 1, counts.most_common(3)  # ... once, for the state and the index together
    assert pq.read_table(tmp_path / "b" / "index.parquet").num_rows == len(keys)


def test_limit_stops_the_walk_at_its_limit_and_the_state_covers_what_is_read(tmp_path, monkeypatch):
    root = tmp_path / "images"
    keys = picture_folder(root)
    counts = counted_stats(monkeypatch, root)
    assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", tmp_path / "b", "--until", "index",
                   "--workers", "0", "--limit", "5") == 0
    assert len(counts) == 5 and max(counts.values()) == 2, counts  # listed and read: the first 5 only
    assert pq.read_table(tmp_path / "b" / "index.parquet").column("key").to_pylist() == sorted(keys)[:5]
    # a picture past the limit changes nothing the build reads: the index stage is complete
    Image.new("RGB", (20, 20)).save(root / "c2" / "999.png")
    before = (tmp_path / "b" / "index.parquet").stat().st_mtime_ns
    assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", tmp_path / "b", "--until", "index",
                   "--workers", "0", "--limit", "5") == 0
    assert (tmp_path / "b" / "index.parquet").stat().st_mtime_ns == before
    # one within it does
    Image.new("RGB", (20, 20)).save(root / "c0" / "000.png")
    assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", tmp_path / "b", "--until", "index",
                   "--workers", "0", "--limit", "5") == 0
    assert pq.read_table(tmp_path / "b" / "index.parquet").num_rows == 5
