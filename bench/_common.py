"""What the benchmarks share: the quick/full command line and where Fashion-MNIST is."""

from __future__ import annotations

import argparse
from pathlib import Path

SUBSET = Path(__file__).resolve().parent.parent / "tests" / "data" / "fashion-mnist"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def mode_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with ``--quick`` (CPU, minutes) and ``--full`` (a GPU machine) and ``--root`` (Fashion-MNIST)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--root", type=Path, help="Fashion-MNIST IDX files [default: Debian's, else the subset]")
    return parser
