"""Benchmark the leakage check: recall of planted near-copies, look-alikes excluded, and its cost in a build.

    python bench/leakage.py --quick     # committed subset: 3,000 training pictures, 1,000 test pictures
    python bench/leakage.py --full      # all of Fashion-MNIST: 60,000 training, 10,000 test pictures

An image folder is made of Fashion-MNIST training pictures plus planted copies
of test pictures (``spp_curate.leakage.planted``: exact, jpeg, resized,
cropped up to 2 px a side, cropped up to 10 % a side); the build runs with
``--exclude-near fashion-mnist:ROOT:test``. The cost is the exclude stage's
seconds over the other stages' seconds of the same build (one process, one
machine). Ends with one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from spp_curate.cli import main
from spp_curate.leakage.planted import KINDS, plant_folder

from _common import DEBIAN, SUBSET, mode_parser


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--threshold", default="0.99")
    args = parser.parse_args(argv)
    fmnist = SUBSET if not args.full else (args.root or DEBIAN)
    train_images, per_kind = (60_000, 200) if args.full else (3_000, 40)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "build"
        planted = plant_folder(root, fmnist, train_images, per_kind)
        started = time.time()
        rc = main(["build", "--source", "imagefolder", "--root", str(root), "--out", str(out),
                   "--encoder", "openclip:ViT-S-32", "--image-size", "64", "--dup-threshold", "0.9999",
                   "--exclude-near", f"fashion-mnist:{fmnist}:test", "--exclude-threshold", args.threshold])
        wall = time.time() - started
        assert rc == 0
        seconds = {p.stem: json.loads(p.read_text())["seconds"] for p in (out / "stages").glob("*.json")}
        table = pq.read_table(out / "exclusion.parquet").to_pandas().set_index("key")
        stats = json.loads((out / "exclusion.json").read_text())
    recall = {kind: float(np.mean([table.excluded[k] for k, v in planted.items() if v == kind])) for kind in KINDS}
    natural = table.drop(index=list(planted))
    others = sum(v for k, v in seconds.items() if k != "exclude")
    result = {
        "mode": "full" if args.full else "quick", "build_images": len(table), "reference_images": 10_000
        if args.full else 1_000, "planted_per_kind": per_kind, "threshold": stats["threshold"],
        "recall": recall, "natural_excluded": int(natural.excluded.sum()),
        "natural_excluded_share": round(float(natural.excluded.mean()), 5),
        "exclude_s": seconds.get("exclude"), "other_stages_s": round(others, 2),
        "exclude_over_build": round(seconds.get("exclude", 0) / others, 4), "build_wall_s": round(wall, 1),
        "stage_seconds": seconds,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
