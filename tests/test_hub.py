"""Publishing without the network: the real ``huggingface_hub`` client, unmodified, pointed with ``HF_ENDPOINT`` at a
local stand-in of the Hub (``tests/hub_server.py``; LFS transfers, ``HF_HUB_DISABLE_XET=1``). A push in bounded
commits with the manifest last, resumed after SIGKILL without resending what the Hub holds, retried on 5xx and
stopped on 403; ``verify hf://`` catches a missing, truncated or altered file; ``train --pairs hf://ORG/NAME@REV``
trusts the pairs as on disk; the release's ``croissant.json`` validates with ``mlcroissant``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FMNIST, run_cli

from hub_server import HubServer


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A release of many small shards (each picture shard about 6 KB), so that commits are many."""
    out = tmp_path_factory.mktemp("hub") / "b"
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--limit", "300",
                   "--encoder", "pixels:8", "--workers", "0", "--category", "label", "--shard-size", "6KB") == 0
    return out / "release"


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub-store") as server:
        yield server


def _env(hub, tmp_path) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_local_test",
            "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
            "SPP_CURATE_CACHE": str(tmp_path / "ours"), "SPP_CURATE_RETRY_WAIT": "0.05"}


def _cli(env, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spp_curate.cli", *[str(a) for a in args]], env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_push_commits_in_bounds_manifest_last_and_verify_reads_it_back(release, hub, tmp_path):
    env = _env(hub, tmp_path)
    manifest = json.loads((release / "manifest.json").read_text())
    files = len(manifest["files"]) + 1
    assert files > 12
    proc = _cli(env, "push", release, "--repo-id", "someorg/pairs", "--max-files", "5")
    assert proc.returncode == 0, proc.stderr
    commit = proc.stdout.split("at commit ")[1].split()[0]
    repo = hub.hub.repos["someorg/pairs"]
    assert repo.branches["main"] == commit and len(repo.commits) == hub.hub.commits_made
    order = [set(files) for files in repo.commits.values()]  # each commit's tree, in order
    assert all("manifest.json" not in tree for tree in order[:-1]) and "manifest.json" in order[-1]
    grown = [len(b - a) for a, b in zip([set()] + order, order)]
    assert max(grown) <= 5 and sum(grown) == files
    proc = _cli(env, "verify", f"hf://someorg/pairs@{commit}")
    assert proc.returncode == 0 and f"ok at commit {commit}" in proc.stdout, proc.stderr
    # a second push sends nothing: every file is there, with its hash
    again = _cli(env, "push", release, "--repo-id", "someorg/pairs")
    assert again.returncode == 0 and "sent 0 (0 bytes)" in again.stdout, again.stdout + again.stderr


def test_a_killed_push_resumes_without_resending_what_the_hub_holds(release, hub, tmp_path):
    env = _env(hub, tmp_path)
    manifest = json.loads((release / "manifest.json").read_text())
    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "push", str(release), "--repo-id",
                             "someorg/killed", "--max-files", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while hub.hub.commits_made < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    repo = hub.hub.repos["someorg/killed"]
    head = repo.commits[repo.branches["main"]]
    assert head and "manifest.json" not in head  # half-pushed: never a manifest whose files are not all there
    received = hub.hub.lfs_bytes_received
    resumed = _cli(env, "push", release, "--repo-id", "someorg/killed", "--max-files", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(head)} already there" in resumed.stdout
    largest_commit = max(sum(e["bytes"] for e in manifest["files"][i:i + 2]) for i in range(len(manifest["files"])))
    resent = hub.hub.lfs_bytes_received - received - sum(
        e["bytes"] for e in manifest["files"] if e["path"] not in head and e["kind"] in ("images", "pairs"))
    assert resent <= largest_commit
    assert _cli(env, "verify", "hf://someorg/killed").returncode == 0


def test_a_5xx_is_retried_and_a_403_stops_at_once_in_one_line(release, hub, tmp_path):
    env = _env(hub, tmp_path)
    hub.hub.fail_commits = [500, 502]
    proc = _cli(env, "push", release, "--repo-id", "someorg/flaky")
    assert proc.returncode == 0 and "commit failed (HTTP 500)" in proc.stderr, proc.stderr
    hub.hub.fail_commits = [403]
    tried = sum(r.endswith("/commit/main") for r in hub.hub.requests)
    proc = _cli(env, "push", release, "--repo-id", "someorg/forbidden")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "HTTP 403" in lines[0] and "Traceback" not in proc.stderr
    assert sum(r.endswith("/commit/main") for r in hub.hub.requests) == tried + 1  # never retried


def test_push_finds_a_file_the_hub_lost_behind_a_successful_commit(release, hub, tmp_path):
    """A commit that answered 200 but left a file out: the push's own check of the remote names it."""
    env = _env(hub, tmp_path)
    manifest = json.loads((release / "manifest.json").read_text())
    lost = next(e["path"] for e in manifest["files"] if e["kind"] == "images")
    hub.hub.lose_on_commit = lost
    proc = _cli(env, "push", release, "--repo-id", "someorg/lossy")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and f"{lost}: missing" in lines[0], proc.stderr
    again = _cli(env, "push", release, "--repo-id", "someorg/lossy")  # the rerun sends what is missing
    assert again.returncode == 0 and "sent 1 " in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
def test_verify_hf_finds_a_missing_truncated_or_altered_file(release, hub, tmp_path, damage):
    env = _env(hub, tmp_path)
    assert _cli(env, "push", release, "--repo-id", "someorg/damaged").returncode == 0
    target = sorted(p for p in hub.hub.head("someorg/damaged", "main")[1] if p.startswith("data/images-"))[0]
    if damage == "missing":
        hub.hub.drop("someorg/damaged", target)
    else:
        hub.hub.alter("someorg/damaged", target, truncate=damage == "truncated")
    proc = _cli(env, "verify", "hf://someorg/damaged")
    assert proc.returncode == 1 and target in proc.stderr, proc.stdout + proc.stderr
    said = {"missing": "missing", "truncated": "bytes, the manifest says", "altered": "sha256 differs"}[damage]
    assert said in proc.stderr


def test_training_from_the_hub_at_a_pinned_commit_trusts_the_pairs_as_on_disk(release, hub, tmp_path):
    env = _env(hub, tmp_path)
    proc = _cli(env, "push", release, "--repo-id", "someorg/train")
    commit = proc.stdout.split("at commit ")[1].split()[0]
    common = ["--epochs", "1", "--limit", "32", "--batch-size", "16", "--workers", "0", "--image-size", "16",
              "--cache", "memory"]
    said = []
    for pairs, out in ((release, "disk"), (f"hf://someorg/train@{commit}", "hub")):
        proc = _cli(env, "train", "--pairs", pairs, "--out", tmp_path / out, *common)
        assert proc.returncode == 0, proc.stderr
        said.append([line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("pairs: ")])
    assert said[0] and said[0] == said[1]


def test_the_croissant_description_validates_and_reads_the_records(release):
    import mlcroissant as mlc

    dataset = mlc.Dataset(jsonld=str(release / "croissant.json"))
    pairs = list(dataset.records("pairs"))
    manifest = json.loads((release / "manifest.json").read_text())
    assert len(pairs) == manifest["counts"]["pairs"]
    pictures = list(dataset.records("images"))
    assert len(pictures) == manifest["counts"]["pictures"]
    assert pictures[0]["images/image"].size == (28, 28)
    listed = {e["path"]: e["sha256"] for e in manifest["files"]}
    described = json.loads((release / "croissant.json").read_text())["distribution"]
    assert all(d["sha256"] == listed[d["contentUrl"]] for d in described if d["@type"] == "cr:FileObject")


def test_a_new_version_replaces_the_old_in_the_manifests_commit(release, hub, tmp_path):
    """Pushing another release to the same repo: the files of the old version it does not list are removed in the
    commit that brings the new manifest, so the configs' globs never read the two versions mixed."""
    env = _env(hub, tmp_path)
    assert _cli(env, "push", release, "--repo-id", "someorg/versions").returncode == 0
    other = tmp_path / "other"
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", other, "--limit", "120",
                   "--encoder", "pixels:8", "--workers", "0", "--category", "label", "--shard-size", "20KB") == 0
    proc = _cli(env, "push", other / "release", "--repo-id", "someorg/versions")
    assert proc.returncode == 0 and "of the earlier version to remove with the manifest" in proc.stderr, proc.stderr
    repo = hub.hub.repos["someorg/versions"]
    head = repo.commits[repo.branches["main"]]
    listed = {e["path"] for e in json.loads((other / "release" / "manifest.json").read_text())["files"]}
    assert set(head) == listed | {"manifest.json"}
    trees = list(repo.commits.values())
    before_last = set(trees[-2])
    assert json.loads((release / "manifest.json").read_text())["files"][0]["path"] in before_last  # old until then
    assert _cli(env, "verify", "hf://someorg/versions").returncode == 0
