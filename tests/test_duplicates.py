"""Near-duplicates are decided by picture content, on every encoder; similarities are on one readable scale.

A folder of real Fashion-MNIST pictures with planted near-copies of some of them (the same pixels, JPEG
re-encoded, resized, cropped: ``leakage/planted.py``) is built twice with each encoder kind, with the copy
rule off and on. The rule must remove nearly every copy pair and almost no distinct pair, whatever the
encoder's similarity scale; and the default PCA-whitening must spread the mined pairs' similarities.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spp_curate.curate.sources import FashionMNISTSource
from spp_curate.leakage.planted import near_copy

from conftest import FMNIST, run_cli

KINDS = ("exact", "jpeg", "resized", "cropped")
ORIGINALS, COPIED = 600, 120


def planted_folder(root: Path) -> dict[str, str]:
    """``ORIGINALS`` training pictures and one planted copy of each of the first ``COPIED``: {copy key: original}."""
    src = FashionMNISTSource(str(FMNIST), "train")
    rng = np.random.default_rng(0)
    copies = {}
    for i in range(ORIGINALS):
        folder = root / f"class{int(src.labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        original = f"{folder.name}/o{i:04d}.png"
        Image.fromarray(src.images[i]).save(root / original)
        if i < COPIED:
            kind = KINDS[i % len(KINDS)]
            data, ext = near_copy(Image.fromarray(src.images[i]), kind, rng)
            key = f"{folder.name}/o{i:04d}-{kind}.{ext}"
            (root / key).write_bytes(data)
            copies[key] = original
    return copies


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted") / "images"
    copies = planted_folder(root)
    run = tmp_path_factory.mktemp("sampler") / "run"
    assert run_cli("train", "--out", run, "--source", "fashion-mnist", "--root", FMNIST, "--limit", "1000",
                   "--method", "simclr", "--epochs", "1", "--batch-size", "128", "--image-size", "32") == 0
    return root, copies, run / "last.pt"


def pair_sets(build: Path) -> tuple[set[frozenset], dict]:
    pairs = pq.read_table(build / "pairs.parquet").to_pandas()
    keys = pq.read_table(build / "index.parquet").column("key").to_pylist()
    found = {frozenset((keys[a], keys[b])) for a, b in zip(pairs.anchor_id, pairs.positive_id)}
    return found, json.loads((build / "mine_stats.json").read_text())


@pytest.mark.parametrize("encoder", ["openclip", "ssl"])
def test_the_copy_rule_removes_copies_and_keeps_distinct_pairs_on_every_encoder(planted, tmp_path, encoder):
    root, copies, sampler = planted
    spec = ["--encoder", "openclip:ViT-S-32", "--image-size", "32"] if encoder == "openclip" else \
        ["--encoder", f"ssl:{sampler}"]
    common = ["build", "--source", "imagefolder", "--root", root, *spec, "--workers", "0", "--category", "label",
              "--k", "8", "--max-per-anchor", "8", "--min-similarity", "q0"]
    assert run_cli(*common, "--out", tmp_path / "off", "--copy-threshold", "none") == 0
    assert run_cli(*common, "--out", tmp_path / "on") == 0
    off, _ = pair_sets(tmp_path / "off")
    on, stats = pair_sets(tmp_path / "on")
    copy_pairs = {frozenset(p) for p in copies.items()}
    mined_copies = copy_pairs & off  # the copy pairs the neighbours found
    assert len(mined_copies) >= 0.6 * len(copy_pairs), (encoder, len(mined_copies))
    removed_copies = len(mined_copies - on) / len(mined_copies)
    distinct = off - copy_pairs
    # a distinct pair may also leave because a copy took its place under the anchor cap: count only those gone
    removed_distinct = len(distinct - on) / len(distinct)
    print(f"{encoder}: copies removed {removed_copies:.3f} of {len(mined_copies)}, distinct removed "
          f"{removed_distinct:.4f} of {len(distinct)}")
    assert removed_copies >= 0.95, (encoder, removed_copies)
    assert removed_distinct <= 0.01, (encoder, removed_distinct)
    assert stats["duplicates"]["removed"]["same_picture"] >= len(mined_copies - on)
    assert stats["thresholds"]["dup_threshold"]["value"] is None  # the embedding rule is off by default
    # the default PCA-whitening spreads the mined pairs' similarities over a readable range
    lo, hi = stats["similarity_range"]["pairs_p01_p99"]
    assert stats["whitening"]["kind"] == "pca" and hi - lo >= 0.3, (lo, hi)


def test_whitening_is_fitted_on_the_build_and_kept_in_it(label_build):
    from spp_curate.layout import WHITENING, load_embeddings
    from spp_curate.pairing.whiten import Whitening

    whitening = Whitening.load(label_build / WHITENING)
    vecs, _ = load_embeddings(label_build, dtype=np.float32)
    white = whitening.apply(vecs)
    pairs = pq.read_table(label_build / "pairs.parquet").to_pandas()
    recomputed = np.sum(white[pairs.anchor_id] * white[pairs.positive_id], axis=1)
    assert np.allclose(recomputed, pairs.similarity, atol=2e-3)  # the similarities mined are whitened ones
    assert whitening.kind == "pca" and whitening.dim == min(128, vecs.shape[1])


@pytest.mark.parametrize("value", ["pca:0", "zca", "center:4", "pca:x"])
def test_a_wrong_whiten_value_is_one_line(cli, tmp_path, value):
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b", "--whiten", value)
    assert proc.returncode == 2 and "--whiten" in proc.stderr and "pca:DIM" in proc.stderr


def test_whiten_keep_applies_the_stored_scale_as_the_source_grows_and_refuses_another(tmp_path, cli):
    """By default an update fits the scale anew (it equals a fresh build); ``--whiten keep`` applies the one the
    build stored, so a threshold chosen on it keeps its meaning; a stored scale of other embeddings, or a damaged
    one, is a one-line error that leaves the file as it was."""
    from images import fmnist_pictures
    from spp_curate.layout import WHITENING, load_embeddings
    from spp_curate.pairing.whiten import Whitening

    root, out, fresh = tmp_path / "images", tmp_path / "b", tmp_path / "fresh"
    pictures = fmnist_pictures(60, classes=4, size=28)
    for n, (label, img) in enumerate(pictures):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        if n % 60 < 45:
            img.save(root / f"class{label}" / f"{n:03d}.png")
    options = ["--source", "imagefolder", "--root", root, "--encoder", "pixels:16", "--workers", "0",
               "--category", "none", "--min-similarity", "q0"]
    assert cli("build", "--out", out, *options, "--whiten", "keep").returncode == 0  # nothing stored: fits pca
    stats = json.loads((out / "mine_stats.json").read_text())["whitening"]
    assert (stats["kind"], stats["kept"]) == ("pca", False)
    first = (out / WHITENING).read_bytes()

    for n, (label, img) in enumerate(pictures):  # the source grows by a third
        if n % 60 >= 45:
            img.save(root / f"class{label}" / f"{n:03d}.png")
    assert cli("build", "--out", out, *options, "--whiten", "keep").returncode == 0
    assert (out / WHITENING).read_bytes() == first
    assert json.loads((out / "mine_stats.json").read_text())["whitening"]["kept"] is True
    stored = Whitening.load(out / WHITENING)
    vecs, _ = load_embeddings(out, dtype=np.float32)
    assert len(vecs) == 240
    white = stored.apply(vecs)
    pairs = pq.read_table(out / "pairs.parquet").to_pandas()
    assert np.allclose(np.sum(white[pairs.anchor_id] * white[pairs.positive_id], axis=1), pairs.similarity,
                       atol=2e-3)
    # the default fits the grown source anew: another scale than the stored one
    assert cli("build", "--out", fresh, *options).returncode == 0
    assert not np.allclose(Whitening.load(fresh / WHITENING).mean, stored.mean)

    # another encoder's embeddings: the stored scale is not theirs
    proc = cli("build", "--out", out, *[o if o != "pixels:16" else "pixels:8" for o in options], "--whiten", "keep")
    assert proc.returncode == 2 and "--whiten" in proc.stderr and "other embeddings" in proc.stderr
    said = [line for line in proc.stderr.splitlines() if "--whiten" in line]  # after the embed stage's progress
    assert len(said) == 1 and said[0] == proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert (out / WHITENING).read_bytes() == first

    # a damaged stored scale is named, not applied, and not deleted
    (fresh / WHITENING).write_bytes(b"PK\x03\x04 not a transform")
    proc = cli("build", "--out", fresh, *options, "--whiten", "keep")
    assert proc.returncode == 2 and "cannot be used" in proc.stderr and "--whiten" in proc.stderr
    assert (fresh / WHITENING).read_bytes() == b"PK\x03\x04 not a transform"


def test_a_stored_scale_that_would_run_code_or_holds_odd_numbers_is_refused(tmp_path):
    from spp_curate.pairing.whiten import Whitening

    def stored(name, **arrays):
        path = tmp_path / f"{name}.npz"
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    good = {"kind": np.array("pca"), "mean": np.zeros(4, np.float32), "projection": np.eye(4, 2, dtype=np.float32),
            "fitted_on": np.array("x")}
    assert Whitening.load(stored("good", **good)).dim == 2
    odd = {"pickle": {**good, "mean": np.array([object()], dtype=object)},
           "nan": {**good, "mean": np.full(4, np.nan, np.float32)},
           "kind": {**good, "kind": np.array("zca")},
           "shape": {**good, "projection": np.eye(3, 2, dtype=np.float32)},
           "missing": {k: v for k, v in good.items() if k != "mean"}}
    for name, arrays in odd.items():
        with pytest.raises(ValueError):
            Whitening.load(stored(name, **arrays))
    link = tmp_path / "link.npz"
    link.symlink_to(stored("target", **good))
    with pytest.raises(ValueError, match="regular file"):
        Whitening.load(link)
