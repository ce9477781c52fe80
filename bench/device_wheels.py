"""Download the wheels ``bench/device_check.py`` carries to a bare GPU machine (``make device-wheels``).

    python bench/device_wheels.py [--dest device-wheels]

Each distribution in ``device_check.CARRIED`` at the version installed in this environment (what the suite
tested), for CPython 3.12 on manylinux x86-64, without dependencies: no torch, no CUDA runtime wheels. Prints
the folder's size and fails when it leaves less than 24 MiB of the 64 MiB a device run may carry for the
project itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from device_check import CARRIED, WHEELS

LIMIT = 40 * 2**20
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=WHEELS)
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in CARRIED]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
           *[arg for p in PLATFORMS for arg in ("--platform", p)], "--dest", str(args.dest), *pins]
    proc = subprocess.run(cmd)
    if proc.returncode:
        return proc.returncode
    wanted = {name.lower().replace("-", "_") for name in CARRIED}
    for stale in args.dest.glob("*.whl"):  # wheels of other versions left by an earlier download
        name, version = stale.name.split("-")[:2]
        pin = next((p for p in pins if p.split("==")[0].lower().replace("-", "_") == name.lower()), None)
        if name.lower() not in wanted or (pin and pin.split("==")[1] != version):
            stale.unlink()
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{len(list(args.dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.dest}")
    if total > LIMIT:
        print(f"over {LIMIT / 2**20:.0f} MiB: too little room is left for the project in a 64 MiB device run")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
