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


def test_trust_listing_takes_the_kept_listing_until_a_folder_changes(tmp_path, monkeypatch, cli):
    """``build --trust-listing`` stats no file of an unchanged tree and runs nothing again; a picture added
    to a folder (which changes the folder) is listed and indexed; a file edited in place changes no folder
    and is not seen under the trust, and is without it."""
    root = tmp_path / "images"
    keys = picture_folder(root)
    build = ("build", "--source", "imagefolder", "--root", root, "--out", tmp_path / "b", "--until", "index",
             "--workers", "0")
    assert run_cli(*build) == 0
    assert (tmp_path / "b" / "listing.parquet").is_file()
    index = tmp_path / "b" / "index.parquet"
    before = index.stat().st_mtime_ns
    counts = counted_stats(monkeypatch, root)
    done = cli(*build, "--trust-listing")
    assert done.returncode == 0
    assert not counts, counts.most_common(3)  # no picture listed, stat'ed or read
    assert f"listing: the last build's ({len(keys)} images, 4 folders unchanged" in done.stderr, done.stderr
    assert index.stat().st_mtime_ns == before  # the same state: the index stage is complete
    # a new picture changes its folder: walked again, and indexed
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(root / "c1" / "new.png")
    done = cli(*build, "--trust-listing")
    assert done.returncode == 0
    assert "listing: walking the source (c1 changed since the last listing)" in done.stderr, done.stderr
    assert "c1/new.png" in pq.read_table(index).column("key").to_pylist()
    # an edit in place changes no folder: trusted, it is not seen; without the trust it is
    digest = dict(zip(*pq.read_table(index, columns=["key", "digest"]).to_pydict().values()))
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(root / keys[0])
    assert run_cli(*build, "--trust-listing") == 0
    assert dict(zip(*pq.read_table(index, columns=["key", "digest"]).to_pydict().values())) == digest
    assert run_cli(*build) == 0
    assert dict(zip(*pq.read_table(index, columns=["key", "digest"]).to_pydict().values()))[keys[0]] != digest[keys[0]]


def test_a_kept_listing_that_names_folders_outside_the_source_is_not_trusted(tmp_path):
    """``listing.parquet`` is the build's own file, but read as untrusted: a folder named outside the source
    (or a damaged file) makes the build walk the source instead."""
    import json

    root = tmp_path / "images"
    picture_folder(root)
    build = ("build", "--source", "imagefolder", "--root", root, "--out", tmp_path / "b", "--until", "index",
             "--workers", "0", "--trust-listing")
    assert run_cli(*build) == 0
    path = tmp_path / "b" / "listing.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"spp_curate.listing"])
    meta["folders"].append(["../../etc", "0:0"])
    pq.write_table(table.replace_schema_metadata({b"spp_curate.listing": json.dumps(meta)}), path)
    from spp_curate.config import load_recipe
    from spp_curate.curate.index import trusted_listing
    from spp_curate.curate.sources import open_source

    recipe = load_recipe(tmp_path / "b")
    listing, why = trusted_listing(tmp_path / "b", recipe, open_source(recipe))
    assert listing is None and "outside" in why
    meta["folders"][-1] = ["c0"]  # not a (folder, identity) pair
    pq.write_table(table.replace_schema_metadata({b"spp_curate.listing": json.dumps(meta)}), path)
    assert trusted_listing(tmp_path / "b", recipe, open_source(recipe)) == (None, "the kept listing is damaged")
    path.write_bytes(b"not parquet")
    assert trusted_listing(tmp_path / "b", recipe, open_source(recipe)) == (None, "the kept listing is damaged")
