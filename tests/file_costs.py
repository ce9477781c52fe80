"""The seconds each test file took in a run, from its JUnit XML, for the suite's scheduling.

``make test`` runs one worker per core, each test file on one worker, heaviest files first (``conftest.py``
orders them by ``file_costs.json``): a long file started last leaves the other cores idle while it ends.
Refresh the table after a change that moves a file's time much:

    python -m pytest -q -n 2 --dist loadfile --junitxml=/tmp/suite.xml
    python tests/file_costs.py /tmp/suite.xml
"""

from __future__ import annotations

import collections
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TABLE = Path(__file__).with_name("file_costs.json")


def costs(junit: Path) -> dict[str, float]:
    seconds: dict[str, float] = collections.defaultdict(float)
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        seconds[Path(name).name] += float(case.get("time") or 0.0)
    return {name: round(s, 1) for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    table = costs(Path(sys.argv[1]))
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{TABLE.name}: {len(table)} files, {sum(table.values()):.0f} s in all")
