"""Leakage: near-copies of evaluation images are excluded from builds and found in releases.

An image folder of Fashion-MNIST training pictures gets test pictures planted
into it: pixel-identical PNG copies, JPEG re-encodes, resized copies and
slightly cropped ones. The reference set is the committed test split itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spp_curate.curate.sources import FashionMNISTSource
from spp_curate.leakage.planted import plant_folder

from conftest import FMNIST, TEST_ENCODER, run_cli

TRAIN_IMAGES = 400
PLANTED_PER_KIND = 6
KINDS = ("exact", "jpeg", "resized", "cropped")  # the kinds whose recall must be 1.0 at the default threshold


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory, fmnist_root) -> tuple[Path, dict[str, str]]:
    """Training pictures in class folders plus planted copies of test pictures; ``{key: kind}`` of the planted."""
    root = tmp_path_factory.mktemp("planted") / "images"
    planted = plant_folder(root, fmnist_root, TRAIN_IMAGES, PLANTED_PER_KIND, KINDS, seed=7)
    return root, planted


def _build(root: Path, out: Path, *extra: str) -> int:
    # the pair-row layout: the audit and diff tests plant pictures in its pair rows and tars
    return run_cli("build", "--source", "imagefolder", "--root", root, "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--min-similarity", "0", "--dup-threshold", "0.99999", "--shard-size", "1MB",
                   "--layout", "pairs", *extra)


@pytest.fixture(scope="module")
def builds(planted_folder, fmnist_root, tmp_path_factory) -> dict[str, Path]:
    root, _ = planted_folder
    base = tmp_path_factory.mktemp("leak-builds")
    spec = f"fashion-mnist:{fmnist_root}:test"
    assert _build(root, base / "clean", "--exclude-near", spec) == 0
    assert _build(root, base / "plain") == 0
    return {"clean": base / "clean", "plain": base / "plain", "spec": spec}


def _pair_keys(build_dir: Path) -> set[str]:
    index = pq.read_table(build_dir / "index.parquet", columns=["id", "key"]).to_pandas().set_index("id").key
    pairs = pq.read_table(build_dir / "pairs.parquet", columns=["anchor_id", "positive_id"]).to_pandas()
    return set(index[pairs.anchor_id]) | set(index[pairs.positive_id])


def test_exclusion_removes_every_planted_copy_and_leaves_the_rest(builds, planted_folder):
    _, planted = planted_folder
    stats = json.loads((builds["clean"] / "exclusion.json").read_text())
    assert stats["references"][0]["candidate_search"] == {"kind": "flat", "views": 11_000, "recall": 1.0}
    table = pq.read_table(builds["clean"] / "exclusion.parquet").to_pandas().set_index("key")
    missed = {k: (planted[k], float(table.similarity[k])) for k in planted if not table.excluded[k]}
    assert not missed, f"planted copies not excluded: {missed}"
    assert not set(planted) & _pair_keys(builds["clean"])
    natural = table.drop(index=list(planted))
    assert natural.excluded.sum() <= 0.01 * len(natural)  # look-alikes are not copies
    # The planted copies are in pairs when nothing is excluded: the exclusion is what took them out.
    assert set(planted) & _pair_keys(builds["plain"])
    for key in planted:
        assert table.reference_key[key].startswith("test/")


def test_the_release_records_what_it_is_clean_against(builds, fmnist_root):
    manifest = json.loads((builds["clean"] / "release" / "manifest.json").read_text())
    leakage = manifest["leakage"]
    (ref,) = leakage["references"]
    assert ref["name"] == builds["spec"] and ref["split"] == "test" and ref["count"] == 1000
    test_keys = [key for key, _ in FashionMNISTSource(str(fmnist_root), "test").items()]
    assert ref["keys_sha256"] == hashlib.sha256("\n".join(test_keys).encode()).hexdigest()
    excluded = pq.read_table(builds["clean"] / "exclusion.parquet").column("excluded").to_numpy()
    assert leakage["excluded"] == ref["excluded"] == int(excluded.sum()) > 0
    assert leakage["threshold"] == 0.99
    card = (builds["clean"] / "release" / "README.md").read_text()
    assert "## Leakage" in card and builds["spec"] in card and ref["keys_sha256"][:16] in card
    report = builds["clean"] / "report"
    html = (report / "index.html").read_text()
    assert "<h2>Leakage</h2>" in html
    for figure in ("leak-scores.png", "leak-excluded.png"):
        assert figure in html and Image.open(report / figure).size[0] > 100
    plain = json.loads((builds["plain"] / "release" / "manifest.json").read_text())
    assert plain["leakage"] is None and "not checked against any evaluation set" in \
        (builds["plain"] / "release" / "README.md").read_text()


def test_audit_names_each_planted_image_and_gates(builds, planted_folder, cli):
    _, planted = planted_folder
    proc = cli("audit", builds["plain"] / "release", "--against", builds["spec"], "--max-leaks", "0",
               "--show", "100000")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    named = {line.split()[2] for line in proc.stdout.splitlines() if line.startswith("leak: ")}
    in_release = set(planted) & _pair_keys(builds["plain"])
    assert in_release and in_release <= named
    # Whatever else the audit names, the build's own exclusion also took out: one score, two tools.
    excluded = pq.read_table(builds["clean"] / "exclusion.parquet").to_pandas()
    assert named - set(planted) <= set(excluded.key[excluded.excluded])
    assert f"{len(named):,} distinct image(s) leak" in proc.stdout
    allowed = cli("audit", builds["plain"] / "release", "--against", builds["spec"], "--max-leaks", len(named))
    assert allowed.returncode == 0
    clean = cli("audit", builds["clean"] / "release", "--against", builds["spec"])
    assert clean.returncode == 0, clean.stdout
    assert "0 distinct image(s) leak" in clean.stdout


def test_a_quantile_threshold_gives_what_its_value_gives(builds, planted_folder, tmp_path):
    root, _ = planted_folder
    work = tmp_path / "b"
    shutil.copytree(builds["clean"], work)
    assert _build(root, work, "--exclude-near", builds["spec"], "--exclude-threshold", "q0.97") == 0
    stats = json.loads((work / "exclusion.json").read_text())
    scores = pq.read_table(work / "exclusion.parquet").column("similarity").to_numpy()
    assert stats["threshold_given"] == "q0.97"
    assert stats["threshold"] == pytest.approx(float(np.quantile(scores, 0.97)), abs=1e-6)
    by_quantile = pq.read_table(work / "pairs.parquet")
    value = repr(stats["threshold"])
    assert _build(root, work, "--exclude-near", builds["spec"], "--exclude-threshold", value) == 0
    assert pq.read_table(work / "pairs.parquet").equals(by_quantile)


def test_exclusion_resumes_after_sigkill_to_the_same_files(builds, planted_folder, tmp_path):
    root, _ = planted_folder
    killed = tmp_path / "killed"
    shutil.copytree(builds["plain"], killed)  # index and embed done; the exclude stage runs next
    args = ["build", "--source", "imagefolder", "--root", str(root), "--out", str(killed), *TEST_ENCODER,
            "--workers", "0", "--min-similarity", "0", "--dup-threshold", "0.99999", "--shard-size", "1MB",
            "--exclude-near", builds["spec"]]
    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "references" / "build.json").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "references" / "build.json").exists()
    stats = killed / "exclusion.json"  # the plain build's (no reference set) until the stage completes
    assert not stats.exists() or not json.loads(stats.read_text())["references"], \
        "the kill should land inside the exclude stage"
    assert run_cli(*args) == 0
    for name in ("exclusion.parquet", "pairs.parquet"):
        assert pq.read_table(killed / name).equals(pq.read_table(builds["clean"] / name)), name


def test_copy_scores_are_one_for_a_copy_and_deterministic(fmnist_root):
    from spp_curate.engine.local import LocalEngine
    from spp_curate.leakage.copies import copy_scores, describe

    test = FashionMNISTSource(str(fmnist_root), "test")
    refs = [Image.fromarray(a).convert("RGB") for a in test.images[:200]]
    pictures = [refs[5], refs[17].transpose(Image.Transpose.FLIP_LEFT_RIGHT), None]
    ref_desc = describe(refs, True)
    scores, rows = copy_scores(describe(pictures, False), ref_desc, LocalEngine())
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and rows[0] == 5
    assert scores[1] < 0.99  # a mirrored picture is a different picture
    assert scores[2] == -1.0 and rows[2] == -1  # one that did not decode matches nothing
    again, _ = copy_scores(describe(pictures, False), ref_desc, LocalEngine())
    assert np.array_equal(scores, again)


def test_a_resized_copy_finds_its_original_among_thousands_of_look_alikes(fmnist_root):
    """Copies of 300 pictures, resized to 20-112 px by five resamplers, among all 4,000 pictures of the subset:
    each finds its own original among its candidates and scores as a copy against it."""
    from spp_curate.engine.local import LocalEngine
    from spp_curate.leakage.copies import candidates, copy_scores, describe

    refs = [Image.fromarray(a) for split in ("train", "test")
            for a in FashionMNISTSource(str(fmnist_root), split).images]
    rng = np.random.default_rng(3)
    originals = rng.choice(len(refs), 300, replace=False)
    methods = list(Image.Resampling)
    sides = rng.choice([20, 22, 26, 32, 36, 42, 48, 56, 64, 84, 112], len(originals))
    copies = [refs[i].resize((int(side), int(side)), methods[n % len(methods)])
              for n, (i, side) in enumerate(zip(originals, sides))]
    ref_desc, pic_desc = describe(refs, True), describe(copies, False)
    searched: dict = {}
    cand = candidates(pic_desc, ref_desc, LocalEngine(), 8 * 10**9, info=searched)
    assert searched == {"kind": "flat", "views": 44_000, "recall": 1.0}
    lost = [(int(side), methods[n % len(methods)].name) for n, (i, side) in enumerate(zip(originals, sides))
            if i not in cand[n]]
    assert not lost, f"copies whose original is not among their candidates: {lost}"
    scores, rows = copy_scores(pic_desc, ref_desc, LocalEngine())
    assert np.array_equal(rows, originals)
    assert np.mean(scores[sides >= 36] >= 0.99) >= 0.9, np.sort(scores[sides >= 36])[:10]


def test_an_approximate_candidate_search_measures_and_reports_its_recall(fmnist_root, monkeypatch):
    import spp_curate.leakage.copies as copies
    from spp_curate.engine.local import LocalEngine

    refs = [Image.fromarray(a) for split in ("train", "test")
            for a in FashionMNISTSource(str(fmnist_root), split).images]
    pictures = copies.describe([r.resize((40, 40)) for r in refs[::10]], False)
    references = copies.describe(refs, True)
    monkeypatch.setattr(copies, "EXACT_VIEWS_PER_FLAT", 0.1)  # as if the 44,000 views were beyond exact search
    searched: dict = {}
    cand = copies.candidates(pictures, references, LocalEngine(), 8 * 10**9, info=searched)
    assert searched["kind"] == "ivf-flat" and searched["views"] == 44_000
    found = np.mean([i * 10 in row for i, row in enumerate(cand)])
    assert 0.0 < searched["recall"] <= 1.0 and found >= 0.8, (searched, found)


@pytest.mark.parametrize("spec, words", [
    ("nosuch:x", "unknown reference set"),
    ("imagefolder:{missing}", "does not exist"),
    ("imagefolder:{empty}", "cannot be read"),
])
def test_a_reference_set_that_cannot_be_read_is_one_line(cli, label_build, tmp_path, spec, words):
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = spec.format(missing=tmp_path / "missing", empty=empty)
    work = tmp_path / "b"
    shutil.copytree(label_build, work)  # index and embed are done: the error comes from the exclude stage
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", work, *TEST_ENCODER,
               "--workers", "0", "--shard-size", "1MB", "--category", "label", "--exclude-near", spec)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --exclude-near:") and words in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_exclude_threshold_is_one_line(cli, tmp_path):
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "o",
               "--exclude-near", "fashion-mnist:test", "--exclude-threshold", "q1.5")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --exclude-threshold:"), proc.stderr


def test_an_edited_reference_set_runs_the_exclude_stage_again(cli, label_build, tmp_path):
    """A reference folder holding exact copies of five build pictures; two copies are then deleted. The next
    plain build reruns the exclude stage (and not index or embed), indexes the folder anew, and lets the two
    pictures back in."""
    train = FashionMNISTSource(str(FMNIST), "train")
    ref = tmp_path / "ref"
    (ref / "copies").mkdir(parents=True)
    copied = [3, 50, 120, 777, 1500]
    for i in copied:
        Image.fromarray(train.images[i], "L").save(ref / "copies" / f"{i:05d}.png")
    work = tmp_path / "b"
    shutil.copytree(label_build, work)
    args = ["build", "--source", "fashion-mnist", "--root", FMNIST, "--out", work, *TEST_ENCODER, "--workers", "0",
            "--shard-size", "1MB", "--category", "label", "--exclude-near", f"imagefolder:{ref}", "--until", "exclude"]

    def excluded() -> set[str]:
        table = pq.read_table(work / "exclusion.parquet").to_pandas()
        return set(table.key[table.excluded])

    assert cli(*args).returncode == 0
    assert {f"train/{i:05d}" for i in copied} <= excluded()
    for i in copied[:2]:
        (ref / "copies" / f"{i:05d}.png").unlink()
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    skipped = [line.split(":")[0] for line in proc.stderr.splitlines() if line.endswith("complete, skipped")]
    assert skipped == ["index", "embed"], proc.stderr
    now = excluded()
    assert {f"train/{i:05d}" for i in copied[2:]} <= now
    assert not {f"train/{i:05d}" for i in copied[:2]} & now


def _relist(release: Path, path: Path) -> None:
    """Record a changed shard's size and digest in the manifest, so the release still verifies."""
    manifest = json.loads((release / "manifest.json").read_text())
    rel = path.relative_to(release).as_posix()
    for entry in manifest["files"]:
        if entry["path"] == rel:
            entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (release / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("where", ["a reused key in the parquet", "the webdataset tar only"])
def test_audit_reads_every_picture_a_user_would_train_on(builds, fmnist_root, tmp_path, cli, where):
    import io
    import tarfile

    import pyarrow as pa

    release = tmp_path / "release"
    shutil.copytree(builds["clean"] / "release", release)
    test_key = "test/00003"
    picture = FashionMNISTSource(str(fmnist_root), "test").read(test_key)  # a reference picture, byte for byte
    manifest = json.loads((release / "manifest.json").read_text())
    if where == "a reused key in the parquet":
        shard = release / next(e["path"] for e in manifest["files"] if e["kind"] == "parquet")
        rows = pq.read_table(shard).to_pylist()
        # row 1 claims row 0's anchor key and digest, with other bytes: a reader that trusts keys sees row 0 only
        rows[1]["anchor_key"], rows[1]["anchor_digest"] = rows[0]["anchor_key"], rows[0]["anchor_digest"]
        rows[1]["anchor"] = {"bytes": picture, "path": rows[1]["anchor"]["path"]}
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
        changed = shard
    else:
        changed = release / next(e["path"] for e in manifest["files"] if e["kind"] == "webdataset")
        with tarfile.open(changed) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        # a picture past the first pair (the one verify decodes), in the tar alone
        target = next(i for i, (m, _) in enumerate(members) if i > 3 and m.name.endswith(".anchor.png"))
        with tarfile.open(changed, "w") as tar:
            for i, (member, data) in enumerate(members):
                data = picture if i == target else data
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    _relist(release, changed)
    assert cli("verify", release).returncode == 0
    proc = cli("audit", release, "--against", builds["spec"], "--max-leaks", "0", "--show", "100000")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    leaks = [line for line in proc.stdout.splitlines() if line.startswith("leak: ")]
    assert any(test_key in line for line in leaks), proc.stdout


@pytest.mark.parametrize("rows_changed", ["every row of the key", "one row of the key"])
def test_diff_sees_a_picture_swapped_under_its_key_and_digest(builds, fmnist_root, tmp_path, cli, rows_changed):
    import pyarrow as pa

    old, new = builds["clean"] / "release", tmp_path / "release"
    shutil.copytree(old, new)
    manifest = json.loads((new / "manifest.json").read_text())
    shards = [new / e["path"] for e in manifest["files"] if e["kind"] == "parquet"]
    tables = {shard: pq.read_table(shard).to_pylist() for shard in shards}
    key = tables[shards[0]][0]["anchor_key"]
    other = FashionMNISTSource(str(fmnist_root), "test").read("test/00003")
    hits = [(shard, i, side) for shard, rows in tables.items() for i, row in enumerate(rows)
            for side in ("anchor", "positive") if row[f"{side}_key"] == key]
    for shard, i, side in hits if rows_changed == "every row of the key" else hits[-1:]:
        cell = tables[shard][i][side]
        tables[shard][i][side] = {"bytes": other, "path": cell["path"]}  # key and digest column kept
    for shard in {shard for shard, _, _ in hits}:
        pq.write_table(pa.Table.from_pylist(tables[shard], schema=pq.read_schema(shard)), shard)
        _relist(new, shard)
    rows = manifest["counts"]["pairs"]
    assert cli("verify", new).returncode == 0
    proc = cli("diff", old, new, "--show", "1000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "pictures compared by the sha256 of the bytes each release ships" in lines
    changed = len({(shard, i) for shard, i, _ in hits}) if rows_changed == "every row of the key" else 1
    assert f"pairs: +{changed} -{changed} ({rows - changed} in both)" in lines, proc.stdout
    if rows_changed == "every row of the key":
        assert f"  ~ {key}" in lines and not any(line.startswith("warning:") for line in lines)
    else:
        assert any(line.startswith(f"warning: {new} ships 1 keys with two different pictures: {key}")
                   for line in lines), proc.stdout


def test_a_clean_release_passes_the_default_audit_against_fashion_mnist_test(label_build, cli):
    """Fashion-MNIST's training and test pictures hold many look-alikes (trousers above 0.99): by default the
    audit passes a clean release when what it finds is what the test set's own look-alike rate explains, says
    so first, and lists only the strongest few; ``--max-leaks 0`` is the strict gate."""
    against = f"fashion-mnist:{FMNIST}:test"
    proc = cli("audit", label_build / "release", "--against", against, "--workers", "0")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout
    assert "distinct image(s) leak" in lines[0] and "allowed: auto" in lines[0]
    look = next(line for line in lines if line.startswith("look-alikes: "))
    assert "would by chance" in look
    assert sum(line.startswith("leak: ") for line in lines) <= 10
    found = int(lines[0].split()[0].replace(",", ""))
    strict = cli("audit", label_build / "release", "--against", against, "--workers", "0", "--max-leaks", "0")
    assert strict.returncode == (1 if found else 0)
    assert cli("audit", label_build / "release", "--against", against, "--max-leaks", "some").returncode == 2
