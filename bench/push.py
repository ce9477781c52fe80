"""Benchmark a push of a release of 2,000 shard files to a local stand-in of the Hub, killed once and resumed.

    python bench/push.py --quick     # 2,000 one-picture shards of Fashion-MNIST (small files), 2 CPU cores

The release is built with ``--shard-size`` small enough that each picture shard holds one picture, so the
release is some 2,000 files. ``spp-curate push`` (the real ``huggingface_hub`` client, LFS transfers) sends it
to ``tests/hub_server.py`` on 127.0.0.1 in commits of 100 files; the push is killed with SIGKILL after a random
number of commits, then run again. Prints the files, bytes and commits of the whole push, the seconds of each
run, how many bytes the second run sent again that the first had already sent (LFS objects the stand-in held,
and regular files of the interrupted commit), and whether the repo held a manifest before the end. Ends with
one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spp_curate.cli import main

from _common import DEBIAN, SUBSET, mode_parser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hub_server import HubServer  # noqa: E402


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--pictures", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fmnist = args.root or (DEBIAN if DEBIAN.is_dir() else SUBSET)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build = tmp / "build"
        assert main(["build", "--source", "fashion-mnist", "--root", str(fmnist), "--out", str(build), "--limit",
                     str(int(args.pictures * 1.05)), "--encoder", "pixels:8", "--category", "label", "--workers", "0",
                     "--shard-size", "600B", "--copy-threshold", "off"]) == 0
        release = build / "release"
        manifest = json.loads((release / "manifest.json").read_text())
        files = len(manifest["files"]) + 1
        total = sum(e["bytes"] for e in manifest["files"]) + (release / "manifest.json").stat().st_size
        with HubServer(tmp / "store") as hub:
            env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_bench",
                   "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf"), "SPP_CURATE_RETRY_WAIT": "0.05"}
            command = [sys.executable, "-m", "spp_curate.cli", "push", str(release), "--repo-id", "bench/pairs"]
            kill_after = rng.randint(2, max(3, files // 100 - 1))
            started = time.perf_counter()
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            while hub.hub.commits_made < kill_after and proc.poll() is None:
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            first_s = time.perf_counter() - started
            repo = hub.hub.repos["bench/pairs"]
            head = repo.commits.get(repo.branches["main"], {})
            manifest_early = "manifest.json" in head
            committed = sum(e["bytes"] for e in manifest["files"] if e["path"] in head)
            received = hub.hub.lfs_bytes_received
            started = time.perf_counter()
            resumed = subprocess.run(command, env=env, capture_output=True, text=True)
            second_s = time.perf_counter() - started
            assert resumed.returncode == 0, resumed.stderr
            # what the second run sent that the first had already sent: its LFS uploads of objects the first
            # uploaded are skipped by the batch API; the regular files of the interrupted commit are sent again
            second_lfs = hub.hub.lfs_bytes_received - received
            lfs_left = sum(e["bytes"] for e in manifest["files"] if e["path"] not in head
                           and e["path"].endswith((".parquet", ".tar", ".png")))
            resent = max(0, second_lfs - lfs_left)
            verify = subprocess.run([sys.executable, "-m", "spp_curate.cli", "verify", "hf://bench/pairs"], env=env,
                                    capture_output=True, text=True)
            commits = hub.hub.commits_made
    result = {"files": files, "bytes": total, "commits": commits, "killed_after_commits": kill_after,
              "first_run_s": round(first_s, 2), "resumed_run_s": round(second_s, 2),
              "committed_before_kill_bytes": committed, "resent_bytes": resent,
              "largest_commit_bytes_bound": 100 * max(e["bytes"] for e in manifest["files"]),
              "manifest_before_the_end": manifest_early, "verify_hf_ok": verify.returncode == 0}
    print(f"{files:,} files, {total:,} bytes, {commits} commits; killed after {kill_after} commits "
          f"({first_s:.1f} s), resumed in {second_s:.1f} s; resent {resent:,} bytes; manifest on the Hub before "
          f"the end: {manifest_early}; verify hf://: {'ok' if verify.returncode == 0 else verify.stderr[-300:]}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
