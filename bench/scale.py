"""Benchmark a whole build, stage by stage, against the encoder alone measured in the same run.

    python bench/scale.py --quick                 # 1,000 generated ImageNet-like JPEGs, ViT-S-32, CPU (minutes)
    python bench/scale.py --full                  # 64,000 of them, ViT-B-32, on a GPU machine
    python bench/scale.py --full --root /data/imagenet/train --images 200000

Builds an image folder of ImageNet-like JPEGs (``bench/embed.py``'s generator) or the folder given, then
runs ``spp-curate build`` on it and prints images/s (index, embed) or pairs/s (mine, export) per stage.
The yardstick is the encoder alone on synthetic input of the same size and batch, on the same device, in
the same process: the embed stage's rate over it says how well the stage feeds the model. The index stage
is also set against the index as it was before the embed stage became the one pass that decodes pixels
(every file read, hashed and decoded in full, in as many processes), on the same files in the same run.
Ends with one JSON line holding ``embed_img_s``, ``model_only_img_s``, ``embed_over_model``,
``index_plus_embed_over_embed``, ``index_over_full_decode``, ``export_pairs_s``, ``decode``, ``device`` and
``feed_img_s_per_worker``: what one decode worker hands over on the device path (bytes read, header checked,
collated, pinned; no model, no decode), the embed stage's ceiling on a GPU divided by its worker count.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from spp_curate.config import resolve_recipe
from spp_curate.curate.embed import decode_path, encode_batch, prepare_encoder
from spp_curate.devices import auto_workers, default_device
from spp_curate.engine.local import LocalEngine
from spp_curate.files import sha256_bytes
from spp_curate.images import decode_with_format
from spp_curate.pipeline import STAGES
from spp_curate.stages import build

from _common import mode_parser
from embed import imagenet_like


def model_alone(encoder: str, image_size: int | None, batch: int, seconds: float = 20.0) -> float:
    """Images/s of the encoder on random input already on the device: the stage's ceiling."""
    recipe = resolve_recipe("imagefolder", {"encoder": encoder, "image_size": image_size})
    device = default_device()
    enc = prepare_encoder(recipe, device)
    x = torch.randn(batch, 3, enc.image_size, enc.image_size)
    ok = torch.ones(batch, dtype=torch.bool)
    encode_batch(enc, x, ok, device)  # warm-up: kernels chosen, memory allocated
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 2 * batch:
        encode_batch(enc, x, ok, device)
        done += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


class FullDecode:
    """The previous index's work on a batch of files: read, hash and decode each in full (the baseline)."""

    gpus = 0

    def setup(self) -> None:
        pass

    def __call__(self, paths: list[Path]) -> int:
        for path in paths:
            data = path.read_bytes()
            sha256_bytes(data)
            decode_with_format(data)
        return len(paths)


def full_decode_index(root: Path, workers: int) -> float:
    """Images/s of the previous index stage's work over every file under ``root``, in ``workers`` processes."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    batches = [paths[lo: lo + 64] for lo in range(0, len(paths), 64)]
    started = time.perf_counter()
    LocalEngine().map(FullDecode(), batches, workers=workers)
    return len(paths) / (time.perf_counter() - started)


def feed_rate(root: Path, batch: int, image_size: int, seconds: float = 10.0) -> float:
    """Images/s that one decode worker hands over on the device path, with no model and no decode: each file
    read and its JPEG header checked (``_IndexedImages``), a batch collated (``_collate_mixed``) and, where
    CUDA is, copied into pinned memory. One process, as each DataLoader worker is: the ceiling of ``W``
    workers is about ``W`` times this figure."""
    from spp_curate.curate.embed import _collate_mixed, _IndexedImages
    from spp_curate.curate.sources import ImageFolderSource

    source = ImageFolderSource(str(root))
    keys = [key for key, _ in source.items()]
    items = _IndexedImages(source, keys, None, image_size, device_decode=True)
    pin = torch.cuda.is_available()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        for lo in range(0, len(keys), batch):
            blob = _collate_mixed([items[i] for i in range(lo, min(lo + batch, len(keys)))])[0]
            if pin:
                blob.pin_memory()
            done += min(batch, len(keys) - lo)
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"cpu ({os.cpu_count()} cores)"


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--images", type=int, help="generated pictures [1,000 quick, 64,000 full]")
    parser.add_argument("--encoder", help="[quick: openclip:ViT-S-32; full: openclip:ViT-B-32]")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, help="[quick: 64; full: 1024]")
    parser.add_argument("--workers", type=int, help="decode processes [default: spare cores]")
    parser.add_argument("--decode", default="auto", choices=["auto", "device", "pillow"],
                        help="where the embed stage decodes JPEGs [auto: the GPU when there is one]")
    parser.add_argument("--model-seconds", type=float, default=20.0, help="how long the model alone is timed")
    parser.add_argument("--copy-threshold", default=None,
                        help="the mine stage's copy rule [the recipe's; none: off, to time the other stages alone]")
    parser.add_argument("--skip-previous-index", action="store_true",
                        help="do not time the previous full-decode index (saves a pass over the files)")
    args = parser.parse_args(argv)
    n = args.images or (64_000 if args.full else 1_000)
    encoder = args.encoder or ("openclip:ViT-B-32" if args.full else "openclip:ViT-S-32")
    batch = args.batch_size or (1024 if args.full else 64)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "images"
            started = time.perf_counter()
            imagenet_like(root, n)
            print(f"generated {n:,} JPEGs of 500x375 in {time.perf_counter() - started:.1f} s", flush=True)
        n = sum(1 for p in root.rglob("*") if p.is_file())
        out = Path(tmp) / "build"
        recipe = resolve_recipe("imagefolder", {"root": str(root), "encoder": encoder, "image_size": args.image_size,
                                                "batch_size": batch, "workers": args.workers,
                                                "decode": args.decode, "copy_threshold": args.copy_threshold,
                                                "min_similarity": "q0.5", "dup_threshold": "q0.999"})
        started = time.perf_counter()
        build(out, recipe)
        wall = time.perf_counter() - started
        records = {s: json.loads((out / "stages" / f"{s}.json").read_text()) for s in STAGES}
        previous_index = None if args.skip_previous_index else \
            full_decode_index(Path(root), auto_workers() if args.workers is None else args.workers)
        feed = feed_rate(Path(root), batch, recipe.image_size or 224, seconds=min(10.0, args.model_seconds))
    seconds = {s: r["seconds"] for s, r in records.items()}
    images = records["index"]["summary"]["images"]
    pairs = records["mine"]["summary"]["pairs"]
    model = model_alone(encoder, args.image_size, batch, args.model_seconds)
    rates = {"index": (images, "img"), "embed": (images, "img"), "exclude": (images, "img"),
             "mine": (pairs, "pair"), "report": (pairs, "pair"), "export": (pairs, "pair")}
    for stage in STAGES:
        count, unit = rates[stage]
        print(f"{stage:>8}: {seconds[stage]:8.2f} s  {count / max(seconds[stage], 1e-9):10,.0f} {unit}/s")
    embed_img_s = images / max(seconds["embed"], 1e-9)
    index_img_s = images / max(seconds["index"], 1e-9)
    if previous_index:
        print(f"previous index (every file decoded in full): {previous_index:,.0f} img/s; the index stage runs "
              f"at {index_img_s / previous_index:.2f}x it")
    workers = auto_workers() if args.workers is None else max(1, args.workers)
    print(f"feeding side (bytes read, header checked, collated{', pinned' if torch.cuda.is_available() else ''}; "
          f"no model, no decode): {feed:,.0f} img/s per worker process, about {feed * workers:,.0f} img/s "
          f"for the {workers} workers of this machine")
    decode = decode_path(args.decode, default_device())
    print(f"model alone ({encoder}, batch {batch}): {model:,.0f} img/s; the embed stage runs at "
          f"{embed_img_s / model:.2f} of it; whole build {wall:.1f} s on {device_name()}")
    result = {"mode": "full" if args.full else "quick", "images": images, "pairs": pairs, "encoder": encoder,
              "batch": batch, "embed_img_s": round(embed_img_s, 1), "model_only_img_s": round(model, 1),
              "embed_over_model": round(embed_img_s / model, 4),
              "index_plus_embed_over_embed": round((seconds["index"] + seconds["embed"]) / seconds["embed"], 4),
              "index_over_full_decode": round(index_img_s / previous_index, 3) if previous_index else None,
              "feed_img_s_per_worker": round(feed, 1), "feed_workers": workers,
              "feed_over_model": round(feed * workers / model, 3),
              "export_pairs_s": round(pairs / max(seconds["export"], 1e-9), 1), "decode": decode,
              "stage_s": seconds,
              "build_s": round(wall, 2), "device": device_name()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
