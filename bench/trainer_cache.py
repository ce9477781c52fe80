"""The trainer's picture cache: kept beside the release and reused, raw pixels against JPEG, in one run.

    python bench/trainer_cache.py --quick   # 20,000 Fashion-MNIST pictures at 128 px, SimCLR both, 2 CPU cores

A release of label pairs is built from an image folder of Fashion-MNIST pictures (``pixels:8``, the images
layout). Then, in this process:

* the data preparation of a first ``train`` run (read the pairs, decode every picture once, keep the cache
  beside the release) and of a second run on the same release (find the cache, map it): CPU and wall seconds;
* the cache's bytes as raw pixels (N x S x S x 3) and as JPEG at the training size;
* the trainer's rate (pairs/s: views made from the cache, augmented and a training step) from each cache,
  over the same batches, alternating so both see the same machine load.

Ends with one JSON line.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from spp_curate.cli import main
from spp_curate.curate.sources import FashionMNISTSource
from spp_curate.devices import default_device
from spp_curate.train.data import ViewMaker, pair_data
from spp_curate.train.loop import TrainConfig, build_model, train_step

from _common import DEBIAN, SUBSET, mode_parser


def cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    wall, used = time.perf_counter(), cpu()
    out = fn()
    return out, time.perf_counter() - wall, cpu() - used


def rate(data, side: int, batches: list[torch.Tensor], device) -> float:
    cfg = TrainConfig(out="unused", method="simclr", positives="both", image_size=side, support=0)
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    views = ViewMaker(data, "both", side, device)
    train_step(model, optimizer, views(batches[0]), device, 0.0)  # warm-up
    started, pairs = time.perf_counter(), 0
    for batch in batches[1:]:
        train_step(model, optimizer, views(batch), device, 0.0)
        pairs += len(batch)
    return pairs / (time.perf_counter() - started)


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--batches", type=int, default=6, help="training batches timed per cache [6]")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    fmnist = args.root or (DEBIAN if DEBIAN.is_dir() else SUBSET)
    source = FashionMNISTSource(str(fmnist), "train")
    n = min(args.images, len(source.labels))
    device = default_device()
    with tempfile.TemporaryDirectory() as tmp:
        root, build = Path(tmp) / "images", Path(tmp) / "build"
        for i in range(n):
            folder = root / f"{int(source.labels[i]):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(source.images[i], "L").save(folder / f"{i:05d}.png")
        assert main(["build", "--source", "imagefolder", "--root", str(root), "--out", str(build), "--encoder",
                     "pixels:8", "--category", "label", "--copy-threshold", "off", "--workers", "0"]) == 0
        release = str(build / "release")
        results = {}
        for kind in ("disk", "jpeg"):
            first, first_wall, first_cpu = timed(lambda: pair_data(release, args.side, None, kind, Path(tmp) / "run"))
            again, again_wall, again_cpu = timed(lambda: pair_data(release, args.side, None, kind, Path(tmp) / "run"))
            results[kind] = {"first_s": round(first_wall, 2), "first_cpu_s": round(first_cpu, 2),
                             "second_s": round(again_wall, 3), "second_cpu_s": round(again_cpu, 3),
                             "second_over_first": round(again_wall / first_wall, 4),
                             "cache_bytes": int(again.cache.pixels.nbytes), "data": again}
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(results["jpeg"]["data"]), generator=generator)
        batches = list(order[: args.batch_size * (args.batches + 1)].split(args.batch_size))
        rates = {"disk": [], "jpeg": []}
        for _ in range(2):  # alternate, so both caches see the same load
            for kind in ("disk", "jpeg"):
                rates[kind].append(rate(results[kind]["data"], args.side, batches, device))
    for kind in results:
        results[kind].pop("data")
        results[kind]["pairs_per_s"] = round(max(rates[kind]), 2)
    raw, jpeg = results["disk"], results["jpeg"]
    summary = {"images": n, "side": args.side, "device": str(device), **{f"{k}_cache": v for k, v in results.items()},
               "jpeg_bytes_over_raw": round(jpeg["cache_bytes"] / raw["cache_bytes"], 4),
               "jpeg_rate_over_raw": round(jpeg["pairs_per_s"] / raw["pairs_per_s"], 4)}
    for kind, r in results.items():
        print(f"{kind:>5} cache: first run's data preparation {r['first_s']:.1f} s ({r['first_cpu_s']:.1f} CPU-s), "
              f"second run's {r['second_s']:.2f} s = {r['second_over_first']:.3f} of the first; "
              f"{r['cache_bytes']:,} bytes; trainer {r['pairs_per_s']:.1f} pairs/s")
    print(f"jpeg cache: {summary['jpeg_bytes_over_raw']:.3f} of the raw cache's bytes, "
          f"{summary['jpeg_rate_over_raw']:.3f} of its training rate")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main_()
