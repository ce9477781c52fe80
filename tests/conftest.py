"""Shared fixtures: the committed Fashion-MNIST subset and builds made from it once per session."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist (`make test` runs one worker per core) each worker does its math on one thread: two
# workers on two cores, each with a thread per core, would fight over them. Set before torch and faiss load.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from spp_curate.cli import main  # noqa: E402

DATA = Path(__file__).parent / "data"
FMNIST = DATA / "fashion-mnist"

# A small random-init ViT at 32 px: real open_clip code, seconds per thousand images on a CPU.
TEST_ENCODER = ["--encoder", "openclip:ViT-S-32", "--image-size", "32"]

# Heaviest test files first (seconds from a recent run; tests/file_costs.py refreshes them), so that under
# `--dist loadfile --no-loadscope-reorder` no long file starts last while the other workers sit idle. A file
# not in the table counts as the heaviest. Tests within a file keep their order.
_COSTS = json.loads((Path(__file__).with_name("file_costs.json")).read_text())


def pytest_collection_modifyitems(config, items):
    unknown = max(_COSTS.values(), default=0.0) + 1.0
    items.sort(key=lambda item: -_COSTS.get(item.path.name, unknown))


# Nothing in the suite may reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the suite's own cache (fetched releases, pixel references): never the user's
if "SPP_CURATE_CACHE" not in os.environ:
    import tempfile

    os.environ["SPP_CURATE_CACHE"] = tempfile.mkdtemp(prefix="spp-curate-test-cache-")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_cli(*args: str) -> int:
    """Run the CLI in this process, as the console script does."""
    return main([str(a) for a in args])


#: A heartbeat line (``progress.heartbeat``): a command saying it is still at work (an import, a model built to
#: check its weights) when a second or more passed without a line; never part of an error message.
HEARTBEAT = re.compile(r": \d+:\d{2}:\d{2} so far$")


def said_lines(text: str) -> list[str]:
    """A command's non-empty lines, its heartbeat lines left out (what a one-line error is counted in)."""
    return [line for line in text.splitlines() if line.strip() and not HEARTBEAT.search(line)]


def run_cli_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, to see exactly what a user sees."""
    return subprocess.run([sys.executable, "-m", "spp_curate.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture
def cli(capsys):
    """Run the CLI in this process and capture what it prints, as ``run_cli_process`` returns it.

    Faster than a fresh interpreter; an exception that is not a one-line user error propagates and fails
    the test, as a traceback would.
    """
    def call(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = run_cli(*args)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess([str(a) for a in args], rc, captured.out, captured.err)
    return call


#: The pair-row layout (both pictures in every row and tar sample): what the shared builds' release tests read
#: in depth. The default layout, each picture once, is tested on its own (test_images_layout.py).
PAIR_LAYOUT = ["--layout", "pairs"]


def build_fmnist(out: Path, *extra: str) -> Path:
    layout = [] if "--layout" in extra else PAIR_LAYOUT
    rc = run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, *TEST_ENCODER,
                 "--workers", "0", "--shard-size", "1MB", *layout, *extra)
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    return FMNIST


def shared_build(tmp_path_factory, name: str, *extra: str) -> Path:
    """A build of the committed subset made once per run: under pytest-xdist the first worker to need it
    builds it (the others wait on a lock) into the run's shared temporary folder, and every worker reads
    it. Only for read-only tests (the others copy it first)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_fmnist(tmp_path_factory.mktemp(name) / "build", *extra)
    shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    out, done = shared / f"shared-{name}" / "build", shared / f"shared-{name}.done"
    with open(shared / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if out.parent.exists():  # a worker that failed half-way left it
                shutil.rmtree(out.parent)
            build_fmnist(out, *extra)
            done.touch()
    return out


@pytest.fixture(scope="session")
def label_build(tmp_path_factory) -> Path:
    """A build of the committed subset with --category label, shared by the read-only tests."""
    return shared_build(tmp_path_factory, "label", "--category", "label")


@pytest.fixture(scope="session")
def images_build(tmp_path_factory) -> Path:
    """A build of the committed subset in the default layout (each picture once), with WebDataset image tars."""
    return shared_build(tmp_path_factory, "images", "--category", "label", "--layout", "images", "--webdataset")


@pytest.fixture(scope="session")
def none_build(tmp_path_factory) -> Path:
    """The same images mined with --category none (the semantic sampler alone)."""
    return shared_build(tmp_path_factory, "none", "--category", "none", "--min-similarity", "0")
