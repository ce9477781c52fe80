"""Benchmark an incremental build: 1 % new images against a fresh build of the same folder, in one process.

    python bench/incremental.py --quick     # 6,000 Fashion-MNIST pictures, ViT-S-32 at 64 px (CPU, minutes)
    python bench/incremental.py --full      # 60,000 pictures, the default encoder ViT-B-32 (a GPU machine)

An image folder of Fashion-MNIST training pictures (PNG files) is built fresh;
then 1 % more pictures are added and the build runs again in place. Prints the
seconds of each stage of both runs, the update's share of the fresh build,
and how many images each run read and embedded. Ends with one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from spp_curate.cli import main
from spp_curate.curate.sources import FashionMNISTSource
from spp_curate.pipeline import STAGES

from _common import DEBIAN, SUBSET, mode_parser


def write_pictures(root: Path, source: FashionMNISTSource, rows: np.ndarray, prefix: str) -> None:
    for i in rows:
        folder = root / f"{int(source.labels[i]):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source.images[i], "L").save(folder / f"{prefix}{i:05d}.png")


def timed_build(root: Path, out: Path, encoder: list[str]) -> tuple[float, dict[str, float], dict]:
    started = time.perf_counter()
    rc = main(["build", "--source", "imagefolder", "--root", str(root), "--out", str(out), *encoder])
    wall = time.perf_counter() - started
    assert rc == 0
    seconds = {s: json.loads((out / "stages" / f"{s}.json").read_text())["seconds"] for s in STAGES}
    summaries = {s: json.loads((out / "stages" / f"{s}.json").read_text())["summary"] for s in STAGES}
    return wall, seconds, summaries


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--images", type=int, help="pictures in the first build [6,000 quick, 60,000 full]")
    parser.add_argument("--new", type=float, default=0.01, help="share of new pictures in the update")
    parser.add_argument("--encoder", help="encoder spec [quick: openclip:ViT-S-32 at 64 px; full: the default]")
    parser.add_argument("--image-size", type=int, help="encoder input size override (with --encoder)")
    args = parser.parse_args(argv)
    fmnist = args.root or (DEBIAN if DEBIAN.is_dir() else SUBSET)
    source = FashionMNISTSource(str(fmnist), "train")
    n = min(args.images or (60_000 if args.full else 6_000), len(source.labels))
    added = max(1, int(round(n * args.new)))
    if n + added > len(source.labels):
        n = len(source.labels) - added
    encoder = (["--encoder", args.encoder, *(["--image-size", str(args.image_size)] if args.image_size else [])]
               if args.encoder else
               [] if args.full else ["--encoder", "openclip:ViT-S-32", "--image-size", "64"])
    rows = np.random.default_rng(0).permutation(len(source.labels))
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "build"
        write_pictures(root, source, rows[:n], "a")
        fresh_wall, fresh, _ = timed_build(root, out, encoder)
        write_pictures(root, source, rows[n: n + added], "b")
        update_wall, update, summaries = timed_build(root, out, encoder)
    for stage in STAGES:
        print(f"{stage:>8}: fresh {fresh[stage]:8.2f} s   update {update[stage]:8.2f} s")
    ratio = update_wall / fresh_wall
    print(f"fresh build of {n:,} pictures: {fresh_wall:.1f} s; update with {added:,} new ({args.new:.0%}): "
          f"{update_wall:.1f} s = {ratio:.3f} of the fresh build")
    result = {"mode": "full" if args.full else "quick", "images": n, "new": added,
              "encoder": " ".join(encoder) or "default", "fresh_s": round(fresh_wall, 2),
              "update_s": round(update_wall, 2), "update_over_fresh": round(ratio, 4),
              "fresh_stage_s": fresh, "update_stage_s": update,
              "update_read": summaries["index"].get("read"), "update_embedded": summaries["embed"].get("embedded")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
