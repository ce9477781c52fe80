"""The longest silence of each command: how long a user watching a pipe (a log) waits without a line.

    python bench/quiet.py            # the committed Fashion-MNIST subset, 2,000 pictures
    python bench/quiet.py --full     # Debian's Fashion-MNIST, 10,000 pictures

Each command runs with its output to a pipe (not a terminal, as in a log or CI), read byte by byte as it
comes; the silence is the longest stretch without a new line, from the start (the interpreter's imports
count) to the exit. Ends with one JSON line: each command's longest silence in seconds, after which line,
and its wall seconds.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DEBIAN, SUBSET, mode_parser


def silences(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its longest gap between lines (and after which one), its wall seconds and exit code."""
    started = last = time.monotonic()
    longest, after, lines, pending = 0.0, "(start)", 0, b""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    os.set_blocking(proc.stdout.fileno(), False)
    previous = "(start)"
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            sel.select(timeout=0.2)
            try:
                data = os.read(proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                now = time.monotonic()
                if now - last > longest:
                    longest, after = now - last, previous
                last, previous, lines = now, line.decode("utf-8", "replace")[:100], lines + 1
    proc.wait()
    end = time.monotonic()
    if end - last > longest:
        longest, after = end - last, previous + " (to the exit)"
    return {"longest_silence_s": round(longest, 2), "after": after, "lines": lines,
            "wall_s": round(end - started, 1), "exit": proc.returncode}


def main() -> dict:
    parser = mode_parser(__doc__)
    args = parser.parse_args()
    root = str(args.root or (DEBIAN if args.full else SUBSET))
    limit = "10000" if args.full else "2000"
    work = Path(tempfile.mkdtemp(prefix="spp-quiet-"))
    env = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SPP_CURATE_CACHE": str(work / "cache")}
    spp = [sys.executable, "-m", "spp_curate.cli"]
    build, run = work / "build", work / "run"
    commands = {
        "build": [*spp, "build", "--source", "fashion-mnist", "--root", root, "--limit", limit, "--out", build,
                  "--encoder", "pixels:32", "--category", "none", "--k", "8", "--max-per-anchor", "1"],
        "verify": [*spp, "verify", build / "release"],
        "report": [*spp, "report", build, "--force"],
        "audit": [*spp, "audit", build / "release", "--against", f"fashion-mnist:{root}:test"],
        "train": [*spp, "train", "--pairs", build / "release", "--out", run, "--epochs", "1", "--batch-size", "128"],
        "eval": [*spp, "eval", run, "--source", "fashion-mnist", "--root", root, "--limit", limit],
        "diff": [*spp, "diff", build / "release", build / "release"],
        "push --dry-run": [*spp, "push", build / "release", "--repo-id", "org/name", "--dry-run"],
    }
    result = {}
    for name, cmd in commands.items():
        result[name] = silences([str(c) for c in cmd], env)
        got = result[name]
        print(f"{name}: longest silence {got['longest_silence_s']:.1f} s after {got['after']!r} "
              f"({got['lines']} lines in {got['wall_s']} s, exit {got['exit']})", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
