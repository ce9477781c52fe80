"""Benchmark the embed stage against a naive one-image-at-a-time loop with the same model.

    python bench/embed.py --quick                       # ~2,000 ImageNet-like JPEGs, ViT-S-32, CPU
    python bench/embed.py --full --root /data/imagenet  # ViT-B-32 and ViT-L-14 on real JPEGs (CUDA)

Prints the figures and a final JSON line:
{"figure": <img/s>, "unit": "img/s", "baseline": "naive-loop", "ratio": <x>}.
The baseline runs in the same process on the same files: open, preprocess
and encode one image at a time (a sample of the files, to keep it short).
The run also measures the embed stage with Pillow draft decoding off, and
the decode-only rate, to show what limits throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from spp_curate.config import resolve_recipe
from spp_curate.curate.embed import embed_index
from spp_curate.engine.local import LocalEngine
from spp_curate.curate.encoders import load_encoder
from spp_curate.images import decode_image
from spp_curate.curate.index import index_source


def imagenet_like(root: Path, n: int, seed: int = 0, size=(500, 375), start: int = 0) -> None:
    """``n`` photo-like JPEGs (smooth gradients, shapes, grain) of ``size`` at quality 90 in 10 class folders,
    numbered from ``start`` (slices with different starts can be written in parallel)."""
    rng = np.random.default_rng(seed if start == 0 else [seed, start])
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(start, start + n):
        folder = root / f"class{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(-1, 1, 3)
        base = rng.uniform(40, 215, 3)
        grad = (a * xx / w + b * yy / h + c)[..., None] * rng.uniform(30, 80, 3)
        arr = np.clip(base + grad + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(3, 9)):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.filter(ImageFilter.GaussianBlur(1.2)).save(folder / f"{i:05d}.jpg", quality=90)


def naive_loop(encoder_spec: str, files: list[Path]) -> float:
    """What a user writes first: open, preprocess and encode one image at a time."""
    encoder = load_encoder(encoder_spec)
    start = time.perf_counter()
    with torch.no_grad():
        for path in files:
            x = encoder.preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
            torch.nn.functional.normalize(encoder(x), dim=-1)
    return len(files) / (time.perf_counter() - start)


def decode_only(files: list[Path], draft_size: int | None) -> float:
    start = time.perf_counter()
    for path in files:
        decode_image(path.read_bytes(), draft_size=draft_size)
    return len(files) / (time.perf_counter() - start)


def stage_rate(root: Path, work: Path, encoder: str, workers: int, batch: int, draft: bool) -> float:
    recipe = resolve_recipe("imagefolder", {"root": str(root), "encoder": encoder, "workers": workers,
                                            "batch_size": batch, "chunk_size": 10**9})
    build = work / ("draft" if draft else "nodraft")
    build.mkdir(parents=True, exist_ok=True)
    counts = index_source(recipe, build, LocalEngine())
    start = time.perf_counter()
    embed_index(recipe, build, LocalEngine(), draft=draft)
    return counts["images"] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="generated JPEGs, small model, CPU (default)")
    mode.add_argument("--full", action="store_true", help="real JPEGs under --root, ViT-B-32 and ViT-L-14")
    ap.add_argument("--root", type=Path, help="an image folder (ImageNet train/) for --full")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--baseline-images", type=int, default=150)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spp-bench-embed-"))
    try:
        root = args.root
        if root is None:
            root = work / "images"
            imagenet_like(root, args.n)
        files = sorted(root.rglob("*.jpg")) + sorted(root.rglob("*.JPEG"))
        encoders = [args.encoder] if args.encoder else (
            ["openclip:ViT-B-32", "openclip:ViT-L-14"] if args.full else ["openclip:ViT-S-32"])
        workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
        batch = args.batch_size or (256 if torch.cuda.is_available() else 64)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"{len(files):,} JPEGs under {root}; device {device}; {workers} decode workers; batch {batch}")
        decode_full = decode_only(files[:300], None)
        decode_draft = decode_only(files[:300], 224)
        print(f"decode only, one core: {decode_full:,.0f} img/s full size, {decode_draft:,.0f} img/s with draft")
        result = {}
        for spec in encoders:
            ours = stage_rate(root, work / spec.replace(":", "_"), spec, workers, batch, draft=True)
            nodraft = stage_rate(root, work / (spec.replace(":", "_") + "_nd"), spec, workers, batch, draft=False)
            base = naive_loop(spec, files[: args.baseline_images])
            print(f"{spec}: embed stage {ours:,.1f} img/s (draft off: {nodraft:,.1f}); naive loop {base:,.1f} img/s; "
                  f"ratio {ours / base:.2f}")
            result = {"figure": round(ours, 1), "unit": "img/s", "baseline": "naive-loop",
                      "ratio": round(ours / base, 2), "encoder": spec, "draft_off": round(nodraft, 1),
                      "device": device}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
