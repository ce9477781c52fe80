"""A release from a stranger is hostile input: verify, materialize and push never reach outside it or --root.

Each hostile release is built on the fly from a real one. A sentinel file
outside the release and the root stands for the user's secrets: its access
time is set before its modification time, so any read of it (relatime mounts
update the access time then) shows; tests also check that nothing of the
sentinel's ends up in an output.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spp_curate.files import sha256_file

from conftest import FMNIST, TEST_ENCODER, run_cli
from images import write_imagefolder

SECRET = b"\x89PNG secret of the user running the tool\n"


class Sentinel:
    """A file outside every folder a command is given; shows whether anything read it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(SECRET)
        self.reset()

    def reset(self) -> None:
        st = self.path.stat()
        os.utime(self.path, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))

    def was_read(self) -> bool:
        st = self.path.stat()
        return st.st_atime_ns >= st.st_mtime_ns


@pytest.fixture
def sentinel(tmp_path) -> Sentinel:
    s = Sentinel(tmp_path / "outside" / "secret.png")
    probe = Sentinel(tmp_path / "outside" / "probe.png")
    probe.path.read_bytes()
    if not probe.was_read():
        pytest.skip("this file system does not record reads (noatime)")
    return s


@pytest.fixture(scope="module")
def id_only(tmp_path_factory):
    """An ID-only release of a small image folder, and the folder."""
    base = tmp_path_factory.mktemp("idonly")
    root = base / "images"
    write_imagefolder(root, per_class=20, odd=False, broken=False)
    out = base / "b"
    assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--min-similarity", "0", "--images", "none", "--layout", "pairs") == 0
    return out / "release", root


def _copy(release: Path, dest: Path) -> Path:
    shutil.copytree(release, dest, symlinks=True)
    return dest


def _rewrite_manifest(release: Path, change) -> None:
    path = release / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _refresh_entry(release: Path, rel: str) -> None:
    """Make the manifest agree with a file the attacker rewrote (its bytes and sha256)."""
    def change(m):
        for e in m["files"]:
            if e["path"] == rel:
                e["bytes"] = (release / rel).stat().st_size
                e["sha256"] = sha256_file(release / rel)
    _rewrite_manifest(release, change)


def _rewrite_keys(release: Path, key: str) -> str:
    """Point the first pair's anchor at ``key`` in the ID-only Parquet, with the manifest updated to match."""
    shard = sorted((release / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    keys = table.column("anchor_key").to_pylist()
    keys[0] = key
    table = table.set_column(table.schema.get_field_index("anchor_key"), table.schema.field("anchor_key"),
                             pa.array(keys, pa.string()))
    pq.write_table(table, shard)
    _refresh_entry(release, shard.relative_to(release).as_posix())
    return shard.name


def _no_traceback(proc):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def _materialize(cli, release, root, out, source="imagefolder"):
    return _no_traceback(cli("materialize", release, "--source", source, "--root", root, "--out", out))


# ---------------------------------------------------------------- 1-3: materialize stays inside

def test_materialize_refuses_a_symlinked_asset_and_leaks_nothing(cli, id_only, tmp_path, sentinel):
    release, root = id_only
    bad = _copy(release, tmp_path / "rel")
    asset = next((bad / "assets").glob("*.png"))
    asset.unlink()
    asset.symlink_to(sentinel.path)
    proc = _materialize(cli, bad, root, tmp_path / "full")
    assert proc.returncode != 0 and "symlink" in proc.stderr
    assert not (tmp_path / "full").exists()
    assert not sentinel.was_read()
    verify = _no_traceback(cli("verify", bad))
    assert verify.returncode == 1 and "symlink" in verify.stderr
    assert not sentinel.was_read()


@pytest.mark.parametrize("how", ["climbs", "absolute"])
def test_materialize_refuses_keys_outside_root_without_telling_if_they_exist(cli, id_only, tmp_path, sentinel, how):
    release, root = id_only
    bad = _copy(release, tmp_path / "rel")
    key = os.path.relpath(sentinel.path, root) if how == "climbs" else str(sentinel.path)
    _rewrite_keys(bad, key)
    assert run_cli("verify", bad) == 0  # a consistent release: only the key is hostile
    proc = _materialize(cli, bad, root, tmp_path / "full")
    assert proc.returncode != 0
    assert "refused" in proc.stderr and "changed" not in proc.stderr and "missing" not in proc.stderr
    assert not sentinel.was_read()
    assert not (tmp_path / "full").exists()
    # a key to a file that does not exist gets the same answer: existence is not revealed
    _rewrite_keys(bad, key.replace("secret", "nothing-here"))
    other = _materialize(cli, bad, root, tmp_path / "full")
    def problems(text):
        return [line for line in text.splitlines() if line.startswith("materialize:") and "img/s" not in line]
    assert problems(other.stderr.replace("nothing-here", "secret")) == problems(proc.stderr)


def test_materialize_takes_the_source_from_the_command_line_not_the_manifest(cli, id_only, tmp_path, sentinel):
    release, root = id_only
    bad = _copy(release, tmp_path / "rel")
    tars = tmp_path / "outside" / "attacker-*.tar"
    _rewrite_manifest(bad, lambda m: m["recipe"].update(source=f"wds:{tars}", root=str(sentinel.path.parent)))
    full = tmp_path / "full"
    proc = _materialize(cli, bad, root, full)
    assert proc.returncode == 0, proc.stderr
    assert run_cli("verify", full) == 0
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["recipe"]["source"] == "imagefolder" and manifest["recipe"]["root"] == str(root)
    assert not sentinel.was_read()


def test_manifest_paths_outside_the_release_are_refused_by_verify_materialize_and_push(cli, id_only, tmp_path,
                                                                                        sentinel):
    release, root = id_only
    bad = _copy(release, tmp_path / "rel")
    outside_shard = tmp_path / "outside" / "shard.parquet"
    shutil.copyfile(next((bad / "data").glob("*.parquet")), outside_shard)
    sentinel_entry = {"path": os.path.relpath(sentinel.path, bad), "kind": "asset", "rows": None,
                      "bytes": len(SECRET), "sha256": sha256_file(sentinel.path)}
    absolute_entry = {**sentinel_entry, "path": str(sentinel.path)}
    shard_entry = {"path": os.path.relpath(outside_shard, bad), "kind": "parquet", "rows": 1,
                   "bytes": outside_shard.stat().st_size, "sha256": sha256_file(outside_shard)}
    sentinel.reset()
    _rewrite_manifest(bad, lambda m: m["files"].extend([sentinel_entry, absolute_entry, shard_entry]))
    outside_atime = outside_shard.stat().st_atime_ns
    verify = _no_traceback(cli("verify", bad))
    assert verify.returncode != 0 and "secret.png" in verify.stderr
    push = _no_traceback(cli("push", bad, "--repo-id", "someorg/x", "--dry-run"))
    assert push.returncode != 0 and "secret" not in push.stdout
    proc = _materialize(cli, bad, root, tmp_path / "full")
    assert proc.returncode != 0
    assert not sentinel.was_read()
    assert outside_shard.stat().st_atime_ns == outside_atime
    assert str(len(SECRET)) not in verify.stderr  # no size of an outside file is printed


# ---------------------------------------------------------------- 4-6: verify reads only what it may

@pytest.mark.parametrize("where", ["absolute", "climbs", "dotted"])
def test_verify_refuses_manifest_entries_that_are_not_release_files(cli, label_build, tmp_path, where, sentinel):
    bad = _copy(label_build / "release", tmp_path / "rel")
    path = {"absolute": str(sentinel.path), "climbs": os.path.relpath(sentinel.path, bad),
            "dotted": "data/../" + os.path.relpath(sentinel.path, bad)}[where]
    target = sentinel.path
    # the entry describes the file truly (size and digest), so only its place is wrong
    entry = {"path": path, "kind": "card", "rows": None, "bytes": target.stat().st_size,
             "sha256": sha256_file(target)}
    sentinel.reset()
    _rewrite_manifest(bad, lambda m: m["files"].append(entry))
    proc = _no_traceback(cli("verify", bad))
    assert proc.returncode != 0 and path in proc.stderr
    push = _no_traceback(cli("push", bad, "--repo-id", "someorg/x", "--dry-run"))
    assert push.returncode != 0 and path not in push.stdout
    assert not sentinel.was_read()


def _tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]], path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))


def _swap_shard(release: Path, build_tar) -> str:
    shard = sorted((release / "wds").glob("*.tar"))[0]
    build_tar(shard)
    _refresh_entry(release, shard.relative_to(release).as_posix())
    return shard.name


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


@pytest.mark.parametrize("member", ["absolute", "climbing", "symlink", "hardlink", "directory"])
def test_verify_names_the_shard_of_a_link_directory_or_absolute_member(cli, label_build, tmp_path, member, sentinel):
    bad = _copy(label_build / "release", tmp_path / "rel")
    png = b"\x89PNG\r\n\x1a\n"
    if member in ("absolute", "climbing"):  # a whole pair of such names, so only their paths are wrong
        prefix = "/tmp/" if member == "absolute" else "../"
        pair = [(_info(f"{prefix}000000000.{ext}", len(data)), data)
                for ext, data in (("anchor.png", png), ("json", b"{}"), ("positive.png", png))]
        name = _swap_shard(bad, lambda shard: _tar_with(pair, shard))
        proc = _no_traceback(cli("verify", bad))
        assert proc.returncode == 1
        assert any(name in line and "has a path" in line for line in proc.stderr.splitlines()), proc.stderr
        return
    infos = {
        "symlink": [(_info("000000000.anchor.png", kind=tarfile.SYMTYPE, link=str(sentinel.path)), None)],
        "hardlink": [(_info("000000000.anchor.png", kind=tarfile.LNKTYPE, link=str(sentinel.path)), None)],
        "directory": [(_info("000000000.anchor.png", kind=tarfile.DIRTYPE), None)],
    }[member]
    rest = [(_info("000000000.json", 2), b"{}"), (_info("000000000.positive.png", len(png)), png)]
    name = _swap_shard(bad, lambda shard: _tar_with(infos + rest, shard))
    proc = _no_traceback(cli("verify", bad))
    assert proc.returncode == 1
    assert any(name in line and "member" in line for line in proc.stderr.splitlines()), proc.stderr
    assert not sentinel.was_read()


def test_verify_streams_a_huge_tar_member_without_reading_it_into_memory(label_build, tmp_path):
    bad = _copy(label_build / "release", tmp_path / "rel")
    huge = 600 * 2**20  # over the stated member limit; sparse on disk

    def build(shard: Path) -> None:
        with open(shard, "wb") as fh:
            fh.write(_info("000000000.anchor.png", huge).tobuf(format=tarfile.GNU_FORMAT))
            fh.seek(huge, os.SEEK_CUR)
            for name, data in (("000000000.json", b"{}"), ("000000000.positive.png", b"x")):
                fh.write(_info(name, len(data)).tobuf(format=tarfile.GNU_FORMAT))
                fh.write(data + b"\0" * (512 - len(data)))
            fh.write(b"\0" * 1024)

    name = _swap_shard(bad, build)
    # verify in its own interpreter, which reports its own peak memory (VmHWM starts anew at exec)
    code = ("import re, sys; from spp_curate.cli import main; rc = main(sys.argv[1:]); "
            "print('peak-kib', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "sys.exit(rc)")

    def verify(release):
        proc = _no_traceback(subprocess.run([sys.executable, "-c", code, "verify", str(release)],
                                            capture_output=True, text=True, timeout=600))
        return proc, int(proc.stdout.split("peak-kib")[1].split()[0]) * 1024

    proc, peak = verify(bad)
    assert proc.returncode == 1 and name in proc.stderr and "limit" in proc.stderr
    good, baseline = verify(label_build / "release")  # the same command on the intact release
    assert good.returncode == 0
    assert peak < baseline + huge / 4, f"verify peaked at {peak / 2**20:.0f} MiB vs {baseline / 2**20:.0f} MiB"


# ---------------------------------------------------------------- 7-9: nothing of the user's is deleted

def test_materialize_never_replaces_a_folder_it_did_not_write(cli, id_only, tmp_path):
    release, root = id_only
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for out in (mine, root, release):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        proc = _materialize(cli, release, root, out)
        assert proc.returncode != 0 and "--out" in proc.stderr
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (mine / "thesis.tex").read_text() == "years of work"
    # an earlier output of materialize itself is replaced, and only when the new one is complete
    full = tmp_path / "full"
    assert _materialize(cli, release, root, full).returncode == 0
    assert _materialize(cli, release, root, full).returncode == 0
    assert run_cli("verify", full) == 0


def test_build_refuses_to_delete_files_it_did_not_write(cli, label_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    (out / "release" / "notes.txt").write_text("mine")
    (out / "embeddings" / "my-vectors.npy").write_bytes(b"mine")
    common = ("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--workers", "0",
              "--shard-size", "1MB", "--category", "label")
    # a new --k reruns export, which would replace release/
    proc = _no_traceback(cli(*common, *TEST_ENCODER, "--k", "5"))
    assert proc.returncode != 0 and "notes.txt" in proc.stderr
    # a new input size reruns embed, which would replace embeddings/
    proc = _no_traceback(cli(*common, "--encoder", "openclip:ViT-S-32", "--image-size", "40"))
    assert proc.returncode != 0 and "my-vectors.npy" in proc.stderr
    assert (out / "embeddings" / "my-vectors.npy").read_bytes() == b"mine"
    assert (out / "release" / "notes.txt").read_text() == "mine"

    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "letter.txt").write_text("keep")
    proc = _no_traceback(cli("build", "--source", "fashion-mnist", "--out", folder))
    assert proc.returncode != 0 and "not a build directory" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["letter.txt"]


def test_a_failed_export_keeps_the_previous_release(cli, label_build, tmp_path):
    import signal

    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    old_manifest = (out / "release" / "manifest.json").read_text()
    recipe = out / "build.yaml"
    recipe.write_text(recipe.read_text().replace("shard_size: 1000000", "shard_size: 150000"))
    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "export", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".release.partial" / "wds").glob("pairs-*.tar"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "release" / "manifest.json").read_text() == old_manifest
    assert run_cli("verify", out / "release") == 0


# ---------------------------------------------------------------- 14: one build at a time

def test_a_second_build_into_a_locked_folder_says_who_holds_it(cli, label_build, tmp_path):
    from spp_curate.files import BuildLock

    out = tmp_path / "b"
    shutil.copytree(label_build, out)
    with BuildLock(out):
        proc = _no_traceback(cli("report", out, "--force"))
    assert proc.returncode != 0 and f"process {os.getpid()}" in proc.stderr
    assert run_cli("verify", out / "release") == 0


def test_verify_spread_over_workers_finds_what_one_process_finds(tmp_path):
    """``verify --workers 2`` hashes the files in units over two processes: the same problems, in the same
    order, as one process, on a release with a changed and a missing file."""
    from spp_curate.engine.local import LocalEngine
    from spp_curate.export.manifest import verify_release

    out = tmp_path / "b"
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--limit", "400",
                   "--encoder", "pixels:8", "--workers", "0", "--shard-size", "20KB") == 0
    release = tmp_path / "release"
    shutil.copytree(out / "release", release)
    shards = sorted((release / "data").glob("*.parquet"))
    assert len(shards) >= 3
    shards[0].write_bytes(shards[0].read_bytes()[:-10] + b"0123456789")
    shards[1].unlink()
    alone = verify_release(release)
    spread = verify_release(release, workers=2, engine=LocalEngine(), unit_bytes=1)  # a unit a file
    assert alone == spread and len(alone) >= 2, alone
