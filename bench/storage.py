"""Benchmark release bytes against the bytes of the pictures a release ships, per layout and format.

    python bench/storage.py --quick     # 2,000 Fashion-MNIST pictures (~500 B PNG), 2,000 small JPEGs (~2 KB)
                                        # and 300 ImageNet-like JPEGs (400 x 350), minutes on a CPU

Each source is built once (``--encoder pixels:16 --category label``) and exported in three layouts: the default
(``images``: each picture once in Parquet, pairs as a table of keys), ``images --webdataset`` (the same pictures
also as WebDataset tars) and ``pairs`` (both pictures in every pair row and every tar sample). For each it prints
the bytes of each format and of the whole release over the bytes of the distinct pictures it ships, and the peak
disk an export takes (release, staging folder and the release it replaces, each file counted once by inode)
over the release's bytes, sampled every 20 ms while the build runs again with another ``--license`` (only the
export stage reruns and its pictures are unchanged, so a layout that links unchanged shards adds little; ``export
--force`` instead rereads and rewrites every picture). Ends with one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from spp_curate.cli import main
from spp_curate.curate.sources import FashionMNISTSource

from _common import DEBIAN, SUBSET, mode_parser

LAYOUTS = {"images": ["--layout", "images"], "images+webdataset": ["--layout", "images", "--webdataset"],
           "pairs": ["--layout", "pairs"]}


def small_pictures(root: Path, n: int, fmnist: Path) -> None:
    source = FashionMNISTSource(str(fmnist), "train")
    for i in range(min(n, len(source.labels))):
        folder = root / f"{int(source.labels[i]):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source.images[i], "L").save(folder / f"{i:05d}.png")


def imagenet_like(root: Path, n: int, classes: int = 10, seed: int = 0, size: tuple[int, int] = (400, 350),
                  noise: float = 26.0, quality: int = 95) -> None:
    """Photos' statistics, roughly: a class's smooth colour field, per-picture texture and noise, saved as
    JPEG (at 400 x 350 and quality 95 about 110 KB, ImageNet's mean file size; at 64 x 56 about 2 KB)."""
    rng = np.random.default_rng(seed)
    bases = rng.uniform(40, 215, size=(classes, 3))
    yy, xx = np.mgrid[0:size[1], 0:size[0]] * (350 / size[1]) / 50.0
    for i in range(n):
        label = i % classes
        phase = rng.uniform(0, 6.3, 3)
        field = bases[label][None, None, :] + 40 * np.sin(xx[..., None] + phase) * np.cos(yy[..., None] - phase)
        picture = np.clip(field + rng.normal(0, noise, field.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{i:05d}.jpg", quality=quality)


def unique_bytes(paths: list[Path]) -> int:
    seen, total = set(), 0
    for root in paths:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def peak_during(build: Path, command: list[str]) -> int:
    """The most bytes the release folders held at once while ``command`` ran (sampled every 20 ms)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], unique_bytes([build / "release", build / ".release.partial"]))
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        assert main(command) == 0
    finally:
        done.set()
        thread.join()
    return max(peak[0], unique_bytes([build / "release"]))


def measure(root: Path, out: Path, name: str) -> dict:
    base = ["build", "--source", "imagefolder", "--root", str(root), "--encoder", "pixels:16", "--category",
            "label", "--workers", "0", "--shard-size", "50MB"]
    rows = {}
    for layout, options in LAYOUTS.items():
        build = out / f"{name}-{layout}"
        assert main([*base, "--out", str(build), *options]) == 0
        manifest = json.loads((build / "release" / "manifest.json").read_text())
        index = pq.read_table(build / "index.parquet", columns=["key", "nbytes"]).to_pandas().set_index("key")
        pairs = pq.read_table(build / "pairs.parquet", columns=["anchor_id", "positive_id"]).to_pandas()
        ids = np.unique(np.concatenate([pairs.anchor_id, pairs.positive_id]))
        keyed = pq.read_table(build / "index.parquet", columns=["id", "nbytes"]).to_pandas().set_index("id")
        pictures = int(keyed.nbytes.loc[ids].sum())
        by_kind: dict[str, int] = {}
        for entry in manifest["files"]:
            by_kind[entry["kind"]] = by_kind.get(entry["kind"], 0) + entry["bytes"]
        parquet = sum(by_kind.get(k, 0) for k in ("parquet", "pairs", "images"))
        tar = sum(by_kind.get(k, 0) for k in ("webdataset", "image-tars"))
        release = unique_bytes([build / "release"])
        # a re-export (another licence in the card): the release it replaces stands until the new one is whole
        peak = peak_during(build, [*base, "--out", str(build), *options, "--license", "cc0-1.0"])
        rows[layout] = {"pictures": int(len(ids)), "picture_bytes": pictures, "release_bytes": release,
                        "parquet_over_pictures": round(parquet / pictures, 3),
                        "tar_over_pictures": round(tar / pictures, 3) if tar else None,
                        "release_over_pictures": round(release / pictures, 3),
                        "peak_export_over_release": round(peak / release, 3), "mean_picture_bytes":
                        round(float(index.nbytes.mean()))}
        print(f"{name:>14} {layout:>18}: {len(ids):,} pictures of {pictures / len(ids):,.0f} B; release "
              f"{release / pictures:.3f} x the pictures (Parquet {parquet / pictures:.3f}"
              + (f", tar {tar / pictures:.3f}" if tar else "") + f"); peak disk in an export "
              f"{peak / release:.3f} x the release", flush=True)
    return rows


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--tiny", type=int, default=2000, help="Fashion-MNIST pictures (~500 B PNG) [2,000]")
    parser.add_argument("--small", type=int, default=2000, help="small JPEGs (64 x 56, ~2 KB) [2,000]")
    parser.add_argument("--large", type=int, default=300, help="ImageNet-like JPEGs (400 x 350) [300]")
    args = parser.parse_args(argv)
    fmnist = args.root or (DEBIAN if DEBIAN.is_dir() else SUBSET)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small_pictures(tmp / "tiny", args.tiny, fmnist)
        imagenet_like(tmp / "small", args.small, size=(64, 56), noise=30.0, quality=90)
        imagenet_like(tmp / "large", args.large)
        result = {"tiny": measure(tmp / "tiny", tmp, "fashion-mnist"), "small": measure(tmp / "small", tmp, "small"),
                  "imagenet-like": measure(tmp / "large", tmp, "imagenet-like")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
