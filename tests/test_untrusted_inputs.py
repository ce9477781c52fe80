"""Sources, options and files from a careless or hostile user: no stale result, no lost image, no traceback.

Every bad input ends in one line naming the problem and the option, a non-zero
exit, and nothing half-written; a bad image or folder ends in the quarantine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from spp_curate.pipeline import STAGES

from conftest import FMNIST, TEST_ENCODER, run_cli, run_cli_process, said_lines
from images import fmnist_pictures, jpeg_bytes, png_bytes, write_imagefolder

COMMON = (*TEST_ENCODER, "--workers", "0")


def one_line_error(proc, *must_say: str) -> str:
    assert proc.returncode not in (0, None), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for word in must_say:
        assert word in lines[0], lines[0]
    assert "weights_only" not in proc.stderr
    return lines[0]


def folder_build(cli, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("build", "--source", "imagefolder", "--root", root, "--out", out, *COMMON,
                           "--min-similarity", "0", *extra)


def quarantine(out: Path) -> dict[str, str]:
    table = pq.read_table(out / "quarantine.parquet").to_pandas()
    return dict(zip(table.key, table.error))


# ---------------------------------------------------------------- 10: a changed source is noticed

def test_an_edited_added_or_removed_image_reruns_the_build_and_the_release_holds_the_new_bytes(cli, tmp_path):
    root, out = tmp_path / "images", tmp_path / "b"
    write_imagefolder(root, per_class=20, odd=False, broken=False)
    assert folder_build(cli, root, out).returncode == 0
    keys = sorted(pq.read_table(out / "index.parquet").column("key").to_pylist())
    edited, removed = keys[3], keys[30]
    extra = fmnist_pictures(25)[-1][1]
    (root / edited).write_bytes(jpeg_bytes(extra.rotate(90)))
    (root / removed).unlink()
    (root / "pullover" / "new.jpg").write_bytes(jpeg_bytes(extra))

    proc = folder_build(cli, root, out)
    assert proc.returncode == 0, proc.stderr
    assert "index: images" in proc.stderr  # the index ran again
    index = pq.read_table(out / "index.parquet").to_pandas().set_index("key")
    assert removed not in index.index and "pullover/new.jpg" in index.index
    for key in (edited, "pullover/new.jpg"):
        assert index.loc[key, "digest"] == hashlib.sha256((root / key).read_bytes()).hexdigest()
    for shard in sorted((out / "release" / "data").glob("images-*.parquet")):  # the pictures it ships
        for row in pq.read_table(shard).to_pandas().itertuples():
            assert row.digest == hashlib.sha256((root / row.key).read_bytes()).hexdigest()
            assert hashlib.sha256(row.image["bytes"]).hexdigest() == row.digest
    assert run_cli("verify", out / "release") == 0
    # nothing changed: nothing runs
    again = folder_build(cli, root, out)
    assert again.stderr.count("complete, skipped") == len(STAGES), again.stderr


# ---------------------------------------------------------------- 11-13: the listing loses nothing silently

def test_folder_symlinks_are_not_followed_and_file_links_out_of_the_root_are_refused(cli, tmp_path):
    root, out = tmp_path / "images", tmp_path / "b"
    write_imagefolder(root, per_class=20, odd=False, broken=False)
    real = len(list(root.rglob("*.jpg")))
    (root / "tshirt" / "loop").symlink_to(root)               # a loop back to the root
    (root / "mirror").symlink_to(root / "trouser")              # a class folder that is a link
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes(fmnist_pictures(1)[0][1]))
    (root / "trouser" / "link.jpg").symlink_to(outside)         # a file link out of the root
    (root / "trouser" / "inside.jpg").symlink_to(root / "trouser" / "0025.jpg")  # a file link inside: fine
    proc = folder_build(cli, root, out, "--until", "index")
    assert proc.returncode == 0, proc.stderr
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert len(index) == real + 1 and set(index.label_name) == {"tshirt", "trouser", "pullover"}
    bad = quarantine(out)
    assert "folder symlink" in bad["tshirt/loop"] and "folder symlink" in bad["mirror"]
    assert "refused" in bad["trouser/link.jpg"]


def test_an_unreadable_class_folder_is_quarantined_with_its_reason(tmp_path):
    root, out = tmp_path / "images", tmp_path / "b"
    write_imagefolder(root, per_class=20, odd=False, broken=False)
    locked = root / "pullover"
    locked.chmod(0)
    out.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "spp_curate.cli", "build", "--source", "imagefolder",
                               "--root", str(root), "--out", str(out), *COMMON, "--until", "index"],
                              capture_output=True, text=True, timeout=600)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert "unreadable folder" in quarantine(out)["pullover"]
    assert "Permission denied" in quarantine(out)["pullover"]


def _tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_wds_samples_with_two_images_or_a_bad_label_are_quarantined(cli, tmp_path):
    pics = fmnist_pictures(4)
    samples = [{"__key__": f"s{i:03d}", "jpg": jpeg_bytes(img), "cls": str(label).encode()}
               for i, (label, img) in enumerate(pics)]
    samples[0]["png"] = png_bytes(pics[1][1])          # dup.jpg and dup.png in one sample
    samples[1]["cls"] = b"seven"                         # a label that is not an integer
    _tar(tmp_path / "shard-000000.tar", samples)
    out = tmp_path / "b"
    proc = cli("build", "--source", f"wds:{tmp_path}/shard-000000.tar", "--out", out, *COMMON,
                           "--until", "index")
    assert proc.returncode == 0, proc.stderr
    bad = quarantine(out)
    assert "second image" in bad["shard-000000.tar/s000.png"]
    assert "not an integer" in bad["shard-000000.tar/s001"]
    assert len(pq.read_table(out / "index.parquet")) == len(pics) - 1  # s000 keeps its jpg


def test_wds_labels_past_the_bound_are_quarantined_not_turned_into_class_names(cli, tmp_path):
    pics = fmnist_pictures(4)
    samples = [{"__key__": f"s{i:03d}", "jpg": jpeg_bytes(img), "cls": str(label).encode()}
               for i, (label, img) in enumerate(pics)]
    samples[0]["cls"] = b"9" * 40                        # 40 bytes that once made 10**40 class names
    samples[1]["cls"] = b"100000"                        # one past the bound
    samples[2]["cls"] = b"-7"
    _tar(tmp_path / "shard-000000.tar", samples)
    out = tmp_path / "b"
    proc = cli("build", "--source", f"wds:{tmp_path}/shard-000000.tar", "--out", out, *COMMON, "--until", "index")
    assert proc.returncode == 0, proc.stderr
    bad = quarantine(out)
    assert {"shard-000000.tar/s000", "shard-000000.tar/s001", "shard-000000.tar/s002"} <= set(bad)
    assert "outside -1 to 99,999" in bad["shard-000000.tar/s001"]
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert index.key.tolist() == [f"shard-000000.tar/s{i:03d}" for i in range(3, len(pics))]
    assert index.label.tolist() == [label for label, _ in pics[3:]]


def test_wds_link_and_fifo_members_are_quarantined_with_their_reason(cli, tmp_path):
    import io
    import tarfile

    pics = fmnist_pictures(2)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (label, img) in enumerate(pics):
            for name, data in ((f"s{i:03d}.png", png_bytes(img)), (f"s{i:03d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, kind in (("lnk.png", tarfile.SYMTYPE), ("hard.png", tarfile.LNKTYPE), ("pipe.png", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "s000.png" if kind != tarfile.FIFOTYPE else ""
            tar.addfile(info)
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    out = tmp_path / "b"
    proc = cli("build", "--source", f"wds:{shard}", "--out", out, *COMMON, "--until", "index")
    assert proc.returncode == 0, proc.stderr
    bad = quarantine(out)
    assert bad["shard-000000.tar/lnk.png"] == "refused tar member: a link"
    assert bad["shard-000000.tar/hard.png"] == "refused tar member: a link"
    assert bad["shard-000000.tar/pipe.png"] == "refused tar member: a FIFO"
    assert len(pq.read_table(out / "index.parquet")) == len(pics)


def test_wds_shards_with_one_file_name_in_two_folders_keep_every_picture(cli, tmp_path):
    pics = fmnist_pictures(8)  # 24 pictures of 3 classes
    for folder, part in (("a", pics[:12]), ("b", pics[12:])):
        (tmp_path / folder).mkdir()
        _tar(tmp_path / folder / "shard.tar", [{"__key__": f"s{i:03d}", "png": png_bytes(img),
                                                "cls": str(label).encode()} for i, (label, img) in enumerate(part)])
    out = tmp_path / "b-build"
    proc = cli("build", "--source", f"wds:{tmp_path}/{{a,b}}/shard.tar", "--out", out, *COMMON,
               "--category", "label", "--min-similarity", "0")
    assert proc.returncode == 0, proc.stderr
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert len(index) == 24 and index.key.is_unique
    assert sorted({k.split("/")[0] for k in index.key}) == ["a", "b"]
    # each key reads its own picture: a's twelve are not replaced by b's
    digests = {k: d for k, d in zip(index.key, index.digest)}
    assert len(set(digests.values())) == 24
    assert (out / "release" / "manifest.json").is_file()


def test_an_unlabelled_source_mines_with_category_none_and_cluster(cli, tmp_path):
    samples = [{"__key__": f"s{i:03d}", "png": png_bytes(img)} for i, (_, img) in enumerate(fmnist_pictures(20))]
    _tar(tmp_path / "shard-000000.tar", samples)
    for category in ("none", "cluster"):
        proc = cli("build", "--source", f"wds:{tmp_path}/shard-000000.tar", "--out",
                               tmp_path / category, *COMMON, "--category", category, "--clusters", "3",
                               "--min-similarity", "0")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "precision n/a" in proc.stdout


# ---------------------------------------------------------------- 14: the lock against a real second build

def test_two_builds_into_one_folder_do_not_run_at_once(cli, tmp_path):
    out = tmp_path / "b"
    args = [sys.executable, "-m", "spp_curate.cli", "build", "--source", "fashion-mnist", "--root", str(FMNIST),
            "--out", str(out), *COMMON, "--limit", "300"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    finally:
        first.wait(timeout=600)
    assert first.returncode == 0
    if second.returncode == 0:  # the first finished before the second began: then the second skipped all
        assert second.stderr.count("complete, skipped") == len(STAGES)
    else:
        one_line_error(second, "--out", f"process {first.pid}")
    assert run_cli("verify", out / "release") == 0


# ---------------------------------------------------------------- one line, never a traceback

@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    pics = fmnist_pictures(1, classes=2)
    single = base / "single"
    for label, img in pics:
        (single / f"c{label}").mkdir(parents=True)
        (single / f"c{label}" / "only.jpg").write_bytes(jpeg_bytes(img))
    empty = base / "empty"
    (empty / "a").mkdir(parents=True)
    broken = base / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.jpg").write_bytes(b"")
    (broken / "a" / "y.jpg").write_bytes(b"not a picture" * 10)
    return {"single": single, "empty": empty, "broken": broken}


FM = ("--source", "fashion-mnist", "--root", str(FMNIST), "--limit", "300")


@pytest.mark.parametrize("args, must_say", [
    (("imagefolder", "single"), ["--source", "no candidate pairs"]),
    (("imagefolder", "empty"), ["--source", "no usable images"]),
    (("imagefolder", "broken"), ["--source", "no usable images", "2 quarantined"]),
    ((*FM, "--limit", "0"), ["--limit"]),
    ((*FM, "--min-similarity", "0.99999", "--dup-threshold", "1.0"), ["--min-similarity", "no pair survives"]),
    ((*FM, "--min-similarity", "0.6", "--dup-threshold", "0.4"), ["--dup-threshold", "must be above"]),
    # the embedding duplicate threshold is off by default: a minimum no pair reaches is what the line names
    ((*FM, "--min-similarity", "1.0"), ["--min-similarity", "no pair survives"]),
    ((*FM, "--memory", "1KB"), ["--memory"]),
    ((*FM, "--index", "ivf-pq"), ["--index", "ivf-pq"]),
    ((*FM, "--image-size", "16"), ["--image-size", "patch size"]),
    ((*FM, "--out", "/proc/no-such-place/b"), ["--out", "cannot write"]),
])
def test_bad_input_is_one_line_and_writes_nothing_half_done(cli, tiny_folders, tmp_path, args, must_say):
    if args[0] == "imagefolder":
        args = ("--source", "imagefolder", "--root", tiny_folders[args[1]])
    out = tmp_path / "b"
    proc = cli("build", "--out", out, *COMMON, *args)
    one_line_error(proc, *must_say)
    if out.exists():
        # no stage that failed is recorded complete, and no release appears
        done = {p.stem for p in (out / "stages").glob("*.json")} if (out / "stages").exists() else set()
        assert "export" not in done and not (out / "release").exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line_for_eval_and_the_encoder(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"\x80\x04not a pickle at all" * 50)
    one_line_error(cli("eval", run, "--source", "fashion-mnist", "--root", FMNIST, "--limit", "10"),
                   "RUN", "not a checkpoint")
    import torch

    torch.save({"some": torch.zeros(2)}, run / "other.pt")
    one_line_error(cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b",
                                   "--encoder", f"ssl:{run / 'other.pt'}", "--limit", "50"),
                   "--encoder", "not a checkpoint")


def test_training_on_a_release_with_a_broken_image_skips_and_counts_it(cli, label_build, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(label_build / "release", release, ignore=shutil.ignore_patterns("wds"))
    shard = sorted((release / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    anchors = table.column("anchor").to_pylist()
    anchors[0] = {"bytes": b"\xff\xd8 truncated jpeg", "path": None}
    anchors[1] = {"bytes": b"", "path": None}
    table = table.set_column(table.schema.get_field_index("anchor"), table.schema.field("anchor"),
                             pa.array(anchors, table.schema.field("anchor").type))
    pq.write_table(table, shard)
    # listed anew (size, digest), as a tool that wrote broken pictures would: the release is consistent,
    # its pictures are not (train checks sizes against the manifest, so an unlisted change is refused)
    manifest = json.loads((release / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == shard.relative_to(release).as_posix():
            entry.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (release / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    proc = cli("train", "--pairs", release, "--out", run, "--epochs", "1", "--batch-size", "32", "--limit", "400")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    # a picture is decoded once, so every pair that shows either broken picture is left out
    broken = set(table.column("anchor_key").to_pylist()[:2])
    pairs = [row for path in sorted((release / "data").glob("*.parquet"))  # the first 400, in shard order
             for row in pq.read_table(path, columns=["anchor_key", "positive_key"]).to_pylist()][:400]
    expected = sum(1 for p in pairs if p["anchor_key"] in broken or p["positive_key"] in broken)
    assert expected >= 2 and f"{expected} pair(s) left out: their images do not decode" in proc.stderr
    assert "not an image" in proc.stderr
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["skipped"] == expected


def test_push_without_network_and_a_bad_repo_id_are_one_line(cli, label_build):
    release = label_build / "release"
    offline = run_cli_process("push", release, "--repo-id", "someorg/x",
                              env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"})
    one_line_error(offline, "push", "cannot reach the Hub")
    one_line_error(cli("push", release, "--repo-id", "some org/x!", "--dry-run"), "--repo-id")


@pytest.mark.parametrize("manifest", [b"{ not json", b"[]", json.dumps({"schema_version": 1}).encode()])
def test_a_manifest_that_is_not_json_or_lacks_fields(cli, label_build, tmp_path, manifest):
    release = tmp_path / "release"
    shutil.copytree(label_build / "release", release)
    (release / "manifest.json").write_bytes(manifest)
    verify = cli("verify", release)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr and "manifest.json" in verify.stderr
    one_line_error(cli("push", release, "--repo-id", "someorg/x", "--dry-run"), "manifest")
    one_line_error(cli("materialize", release, "--source", "fashion-mnist", "--root", FMNIST,
                                   "--out", tmp_path / "m"), "manifest")
    one_line_error(cli("train", "--pairs", release, "--out", tmp_path / "run"), "--pairs", "manifest")


def test_an_unreadable_build_yaml_is_one_line(cli, label_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    (out / "build.yaml").write_text("recipe: [unclosed\n  - : :\n")
    one_line_error(cli("report", out), "build.yaml")


def test_every_stage_cleans_the_temporary_files_a_killed_run_left(cli, label_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    stale = [out / ".index.parquet.tmp-999999999", out / "report" / ".similarity.png.tmp-999999999"]
    for path in stale:
        path.write_bytes(b"half")
    mine = out / "report" / ".notes.tmp-draft"  # not a name the program makes: left alone
    mine.write_text("mine")
    assert run_cli("report", out, "--force") == 0
    assert not any(p.exists() for p in stale)
    assert mine.read_text() == "mine"


def test_a_full_disk_is_one_line_naming_the_stage_and_a_rerun_with_space_finishes(tmp_path):
    """A build directory on a device that fills up: one line naming the stage, the space free and what it
    needs, no traceback (nor an ignored one from a half-written tar); with space, the same command finishes."""
    import subprocess

    from conftest import run_cli_process

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        args = ["build", "--source", "fashion-mnist", "--root", FMNIST, "--out", disk / "b", "--limit", "300",
                "--encoder", "pixels:8", "--workers", "0"]
        proc = run_cli_process(*args)
        lines = said_lines(proc.stderr)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, lines
        assert lines[-1].startswith("error: export: no space left on the device") and "bytes free" in lines[-1]
        assert "the stage writes about" in lines[-1]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert run_cli_process(*args).returncode == 0
        assert run_cli_process("verify", disk / "b" / "release").returncode == 0
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
