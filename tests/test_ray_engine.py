"""The Ray engine writes the same files as the local engine, even with a worker killed mid-run.

One Ray build: starting Ray is most of a Ray test's time on two cores, and a build whose worker was killed
and retried, compared with the local build, checks the plain case too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spp_curate.layout import load_embeddings

from conftest import FMNIST, TEST_ENCODER, run_cli

OPTS = ("--source", "fashion-mnist", "--root", str(FMNIST), *TEST_ENCODER, "--limit", "600",
        "--shard-size", "200KB", "--chunk-size", "200", "--batch-size", "50")
SMALL = tuple("100" if a == "600" else a for a in OPTS)  # every stage of a local build, on fewer images


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "b"
    assert run_cli("build", *OPTS, "--out", out, "--workers", "0") == 0
    return out


def _same_result(a, b):
    pa_, pb = pq.read_table(a / "pairs.parquet").to_pandas(), pq.read_table(b / "pairs.parquet").to_pandas()
    assert pa_[["anchor_id", "positive_id", "rank"]].equals(pb[["anchor_id", "positive_id", "rank"]])
    assert np.allclose(pa_.similarity, pb.similarity, atol=1e-3)
    va, ia = load_embeddings(a)
    vb, ib = load_embeddings(b)
    assert np.array_equal(ia, np.arange(600)) and np.array_equal(ia, ib)  # no chunk lost or duplicated
    assert np.abs(va - vb).max() < 1e-3  # batching may round float16 differently
    assert run_cli("verify", b / "release") == 0


def _embed_actors() -> list[int]:
    """PIDs of Ray worker processes running the encoder actors (Ray names them in their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "EmbedWorkActor" in cmdline:
                found.append(int(entry.name))
    return found


def test_the_ray_engine_gives_the_local_result_with_a_worker_killed_mid_run(local_build, tmp_path):
    """One Ray build, one of its encoder workers killed by SIGKILL while it works: the build retries it and
    writes what the local engine writes, shards written by parallel tasks."""
    out = tmp_path / "ray"
    proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "build", *OPTS, "--out", str(out),
                             "--engine", "ray", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and killed is None and proc.poll() is None:
        actors = _embed_actors()
        if actors and (out / "embeddings" / "run.json").exists():
            time.sleep(1.0)  # let it get into the work
            killed = actors[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    _, stderr = proc.communicate(timeout=600)
    assert killed is not None, "no encoder worker was seen"
    assert proc.returncode == 0, stderr[-2000:]
    _same_result(local_build, out)
    assert len(list((out / "release" / "data").glob("*.parquet"))) > 2


def test_the_local_engine_imports_nothing_from_ray(tmp_path):
    code = (
        "import sys; from spp_curate.cli import main; "
        f"rc = main(['build', *{list(SMALL)!r}, '--out', {str(tmp_path / 'b')!r}, '--workers', '0']); "
        "assert rc == 0; assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
