"""Benchmark an incremental build: 1 % new images against a fresh build of the same folder, in one process.

    python bench/incremental.py --quick     # 6,000 Fashion-MNIST pictures, ViT-S-32 at 64 px (CPU, minutes)
    python bench/incremental.py --full      # 60,000 pictures, the default encoder ViT-B-32 (a GPU machine)
    python bench/incremental.py --images 20000 --encoder pixels:16 --category label   # the copy rule's cost

An image folder of Fashion-MNIST training pictures (PNG files) is built fresh;
then 1 % more pictures are added and the build runs again in place; then the
grown folder is built fresh in another directory, and the two releases are
compared (same pairs, same pictures: the update equals a fresh build). Prints
the seconds of each stage of both runs, the update's share of the fresh build
in CPU seconds (user + sys, this process and its workers) and wall seconds,
how many images each run read and embedded, how many copy scores the update
reused, and the share of the new release's bytes it took from the old one by
reference (hard links). Ends with one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_build(root: Path, out: Path, encoder: list[str]) -> tuple[float, dict[str, float], dict]:
    started, cpu = time.perf_counter(), cpu_seconds()
    rc = main(["build", "--source", "imagefolder", "--root", str(root), "--out", str(out), *encoder])
    wall = time.perf_counter() - started
    timed_build.cpu = cpu_seconds() - cpu
    assert rc == 0
    seconds = {s: json.loads((out / "stages" / f"{s}.json").read_text())["seconds"] for s in STAGES}
    summaries = {s: json.loads((out / "stages" / f"{s}.json").read_text())["summary"] for s in STAGES}
    return wall, seconds, summaries


def inodes(release: Path) -> set[tuple[int, int]]:
    """The files of a release as (device, inode): a file kept by a hard link keeps its inode."""
    return {(st.st_dev, st.st_ino) for path in release.rglob("*") if path.is_file() for st in [path.stat()]}


def release_sharing(release: Path, manifest: dict, before: set[tuple[int, int]]) -> float:
    """The share of the release's bytes that are the very files (inodes) of the release it replaced."""
    total = sum(e["bytes"] for e in manifest["files"])
    linked = sum(e["bytes"] for e in manifest["files"]
                 if ((st := os.stat(release / e["path"])).st_dev, st.st_ino) in before)
    return linked / total if total else 0.0


def same_release(a: Path, b: Path) -> bool:
    """Two releases hold the same pairs (keys, similarity to 1e-4) and the same pictures (key, digest)."""
    import pandas as pd
    import pyarrow.parquet as pq

    def read(release: Path, kind: str, columns: list[str]) -> pd.DataFrame:
        manifest = json.loads((release / "manifest.json").read_text())
        parts = [pq.read_table(release / e["path"], columns=columns).to_pandas()
                 for e in manifest["files"] if e["kind"] == kind]
        return pd.concat(parts).sort_values(columns[:2]).reset_index(drop=True)

    keys = ["anchor_key", "positive_key", "similarity"]
    pa_, pb = read(a, "pairs", keys), read(b, "pairs", keys)
    paired = set(pa_.anchor_key) | set(pa_.positive_key)  # a kept shard may also hold pictures no pair names now
    ia = read(a, "images", ["key", "digest"])
    ia = ia[ia.key.isin(paired)].reset_index(drop=True)
    ib = read(b, "images", ["key", "digest"])
    return (len(pa_) == len(pb) and pa_[keys[:2]].equals(pb[keys[:2]])
            and bool(np.allclose(pa_.similarity, pb.similarity, atol=1e-4)) and ia.equals(ib))


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--images", type=int, help="pictures in the first build [6,000 quick, 60,000 full]")
    parser.add_argument("--new", type=float, default=0.01, help="share of new pictures in the update")
    parser.add_argument("--encoder", help="encoder spec [quick: openclip:ViT-S-32 at 64 px; full: the default]")
    parser.add_argument("--image-size", type=int, help="encoder input size override (with --encoder)")
    parser.add_argument("--category", help="--category of both builds [the recipe's]")
    parser.add_argument("--shard-size", help="--shard-size of the releases, e.g. 2MB [the recipe's]")
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
    encoder += ["--category", args.category] if args.category else []
    encoder += ["--shard-size", args.shard_size] if args.shard_size else []
    rows = np.random.default_rng(0).permutation(len(source.labels))
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "build"
        write_pictures(root, source, rows[:n], "a")
        fresh_wall, fresh, _ = timed_build(root, out, encoder)
        fresh_cpu = timed_build.cpu
        write_pictures(root, source, rows[n: n + added], "b")
        before = inodes(out / "release")
        update_wall, update, summaries = timed_build(root, out, encoder)
        update_cpu = timed_build.cpu
        manifest = json.loads((out / "release" / "manifest.json").read_text())
        shared = release_sharing(out / "release", manifest, before)
        stats = json.loads((out / "mine_stats.json").read_text())["duplicates"]
        grown = Path(tmp) / "grown"
        timed_build(root, grown, encoder)
        same = same_release(out / "release", grown / "release")
    for stage in STAGES:
        print(f"{stage:>8}: fresh {fresh[stage]:8.2f} s   update {update[stage]:8.2f} s")
    ratio = update_wall / fresh_wall
    cpu_ratio = update_cpu / fresh_cpu
    print(f"fresh build of {n:,} pictures: {fresh_cpu:.1f} CPU-s ({fresh_wall:.1f} s); update with {added:,} new "
          f"({args.new:.0%}): {update_cpu:.1f} CPU-s = {cpu_ratio:.3f} of the fresh build ({update_wall:.1f} s = "
          f"{ratio:.3f} in wall time)")
    print(f"copy scores: {stats.get('scores_reused', 0):,} reused of {stats.get('pairs_compared', 0):,} pairs "
          f"compared; release bytes shared with the old one by reference: {shared:.3f}; "
          f"equals a fresh build of the grown folder: {same}")
    result = {"mode": "full" if args.full else "quick", "images": n, "new": added,
              "encoder": " ".join(encoder) or "default", "fresh_s": round(fresh_wall, 2),
              "update_s": round(update_wall, 2), "update_over_fresh": round(ratio, 4),
              "fresh_cpu_s": round(fresh_cpu, 2), "update_cpu_s": round(update_cpu, 2),
              "update_over_fresh_cpu": round(cpu_ratio, 4), "copy_scores_reused": stats.get("scores_reused", 0),
              "pairs_compared": stats.get("pairs_compared"), "bytes_shared_by_reference": round(shared, 4),
              "equals_fresh_build": same,
              "fresh_stage_s": fresh, "update_stage_s": update,
              "update_read": summaries["index"].get("read"), "update_embedded": summaries["embed"].get("embedded")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
