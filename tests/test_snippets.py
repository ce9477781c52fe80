"""Every shell and Python snippet of the README and the documentation runs, or says why it cannot.

A fenced ``bash``/``sh``/``python`` block runs as it is written, in document order, in one workspace per
page (so a page's later snippets see what its earlier ones made). The workspace holds what the snippets
name: ``images/`` (an image folder of real Fashion-MNIST pictures), a demo release at
``builds/demo/pairs-pixels/release``, and ``SPP_CURATE_FASHION_MNIST`` pointing at the committed subset.

The comment line just before a block may say what differs here, and nothing else may:

    <!-- snippet: skip: REASON -->                  not run (a GPU, the network, a cluster, a server, the suite)
    <!-- snippet: run with "A" as "B", ... -->      run with each A replaced by B (weights that need the network,
                                                    a budget fit for a test)

A block with neither runs unchanged; a block that fails fails this test, so no snippet can go stale.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from spp_curate.curate.sources import FashionMNISTSource

from conftest import FMNIST, run_cli

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*snippet:\s*(.*?)\s*-->\s*$")


@dataclass
class Snippet:
    page: Path
    line: int
    kind: str
    code: str
    skip: str | None
    swaps: list[tuple[str, str]]

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        kind = LANGUAGES.get(match.group(1))
        if kind is None:
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.match(before.strip())
        skip, swaps = None, []
        if mark:
            said = mark.group(1)
            if said.startswith("skip:"):
                skip = said[5:].strip()
                assert skip, f"{page.name}: a skip must say why"
            elif said.startswith("run with"):
                swaps = re.findall(r'"([^"]*)" as "([^"]*)"', said)
                assert swaps, f"{page.name}: 'run with' names no replacement: {said}"
            else:
                raise AssertionError(f"{page.name}: unknown snippet mark {said!r}")
        found.append(Snippet(page, text[: match.start()].count("\n") + 1, kind, match.group(2), skip, swaps))
    return found


ALL = [s for page in PAGES for s in snippets(page)]


def test_every_page_s_snippets_are_found_and_each_skip_says_why():
    assert len(ALL) >= 15, len(ALL)
    for s in ALL:
        for old, _ in s.swaps:
            assert old in s.code, f"{s.name}: replaces {old!r}, which the snippet does not hold"


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory) -> Path:
    """A build like the demo's (images layout, image tars too), made once for every page's workspace."""
    out = tmp_path_factory.mktemp("demo") / "pairs-pixels"
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--limit", "600",
                   "--encoder", "pixels:16", "--category", "label", "--k", "8", "--workers", "0",
                   "--webdataset") == 0
    return out


def workspace(root: Path, demo_build: Path) -> dict[str, str]:
    """``images/``, the demo's build at ``builds/demo/pairs-pixels`` and (for pages that do not make their
    own) at ``builds/mine``, and the environment the snippets run in."""
    source = FashionMNISTSource(str(FMNIST), "train")
    for i in range(90):
        folder = root / "images" / source.CLASS_NAMES[int(source.labels[i])].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source.images[i]).save(folder / f"{i:04d}.png")
    for where in ("demo/pairs-pixels", "mine"):
        shutil.copytree(demo_build, root / "builds" / where, symlinks=True)
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "SPP_CURATE_FASHION_MNIST": str(FMNIST), "SPP_CURATE_CACHE": str(root / ".cache"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / ".hf"),
            "PYTHONUNBUFFERED": "1"}


def run(snippet: Snippet, cwd: Path, env: dict[str, str]) -> None:
    code = snippet.code
    for old, new in snippet.swaps:
        code = code.replace(old, new)
    cmd = ["bash", "-euo", "pipefail", "-c", code] if snippet.kind == "shell" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{snippet.name} failed ({proc.returncode}):\n{code}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(s.page == p for s in ALL)],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_page_s_snippets_run(page, demo_build, tmp_path):
    env = workspace(tmp_path, demo_build)
    ran = 0
    for snippet in (s for s in ALL if s.page == page):
        if snippet.skip:
            continue
        run(snippet, tmp_path, env)
        ran += 1
    if not ran:
        pytest.skip(f"every snippet of {page.name} is marked skip")


def test_an_unmarked_snippet_that_fails_fails_the_test(tmp_path, demo_build):
    """The runner is not lenient: a snippet naming a release nobody made fails."""
    env = workspace(tmp_path, demo_build)
    broken = Snippet(REPO / "README.md", 0, "shell", "spp-curate verify builds/nowhere/release\n", None, [])
    with pytest.raises(AssertionError, match="failed"):
        run(broken, tmp_path, env)
