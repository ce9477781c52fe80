"""Compare the device JPEG decoders: torchvision's ``decode_jpeg`` and TorchCodec's, against Pillow.

    python bench/jpeg_decoders.py --quick      # CPU: the odd-file corpus, real photo crops, 300 ImageNet-like JPEGs
    python bench/jpeg_decoders.py --full       # the same on CUDA too (nvJPEG), 2,000 JPEGs

For each decoder: the largest and mean absolute pixel difference from the project's loader
(``images.decode_image``, Pillow) on every file ``images.device_jpeg`` sends to a device decoder, which
files it refuses, and its rate in images/s on each device, decoding in batches of 64 (the yardstick is
Pillow decoding the same bytes in the same run). Ends with one JSON line.
"""

from __future__ import annotations

import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from spp_curate.images import decode_image, device_jpeg  # noqa: E402
from images import broken_files, fmnist_pictures, odd_files  # noqa: E402

from _common import mode_parser  # noqa: E402
from embed import imagenet_like  # noqa: E402


def photo_crops(n: int = 24) -> list[bytes]:
    """JPEG crops of a real photograph (matplotlib's sample), at several sizes and qualities."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        photo = Image.open(fh).convert("RGB")
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = int(rng.integers(64, photo.width)), int(rng.integers(64, photo.height))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        buf = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=int(rng.integers(60, 98)),
                                               subsampling=int(rng.integers(0, 3)))
        out.append(buf.getvalue())
    return out


def torchvision_decode(encoded: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


def torchcodec_decode(encoded: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchcodec.decoders import decode_jpeg

    return list(decode_jpeg(encoded, mode="RGB", device=device))


DECODERS = {"torchvision": torchvision_decode, "torchcodec": torchcodec_decode}


def one_by_one(decode, files: list[bytes], device: str) -> list[np.ndarray | None]:
    out = []
    for data in files:
        try:
            out.append(decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], device)[0]
                       .permute(1, 2, 0).cpu().numpy())
        except Exception:  # noqa: BLE001 - a refusal is a result here
            out.append(None)
    return out


def agreement(decode, files: dict[str, bytes], device: str) -> dict:
    """How the decoder's pictures compare with the loader's: on the files ``device_jpeg`` routes to a device
    decoder (``max_abs``, ``mean_abs``), and which of the others it refuses or decodes differently."""
    names = list(files)
    decoded = one_by_one(decode, [files[n] for n in names], device)
    worst, means, refused, differ = 0, [], [], []
    for name, pic in zip(names, decoded):
        routed = device_jpeg(files[name])
        try:
            ref = np.asarray(decode_image(files[name]), dtype=np.int16)
        except Exception:  # noqa: BLE001 - the loader refuses it: a decoder must not be trusted with it either
            ref = None
        if pic is None:
            refused.append(name)
            continue
        if ref is None or ref.shape != pic.shape or np.abs(ref - pic.astype(np.int16)).mean() > 2:
            differ.append(name + (" (routed!)" if routed else ""))
            continue
        if routed:
            diff = np.abs(ref - pic.astype(np.int16))
            worst, means = max(worst, int(diff.max())), means + [float(diff.mean())]
    return {"files": len(names), "routed": len(means), "max_abs": worst,
            "mean_abs": round(float(np.mean(means)), 4) if means else None, "refused": refused,
            "differ_from_loader": differ}


def rate(decode, files: list[bytes], device: str, batch: int = 64) -> float:
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in files]
    decode(tensors[:batch], device)  # warm-up
    started = time.perf_counter()
    for lo in range(0, len(tensors), batch):
        decode(tensors[lo: lo + batch], device)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - started)


def pillow_rate(files: list[bytes]) -> float:
    started = time.perf_counter()
    for data in files:
        decode_image(data)
    return len(files) / (time.perf_counter() - started)


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--images", type=int, help="ImageNet-like JPEGs timed [300 quick, 2,000 full]")
    args = parser.parse_args(argv)
    n = args.images or (2000 if args.full else 300)
    picture = fmnist_pictures(1, classes=1, size=96)[0][1]
    corpus = {**odd_files(picture), **{k: v for k, v in broken_files(picture).items() if isinstance(v, bytes)}}
    corpus = {name: data for name, data in corpus.items() if isinstance(data, bytes)}
    routed = sorted(name for name, data in corpus.items() if device_jpeg(data))
    photos = {f"photo-{i}": data for i, data in enumerate(photo_crops())}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        imagenet_like(Path(tmp), n)
        timed = [p.read_bytes() for p in sorted(Path(tmp).rglob("*.jpg"))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result: dict = {"corpus": sorted(corpus), "routed_to_device": routed, "images_timed": n,
                    "pillow_img_s": round(pillow_rate(timed), 1), "decoders": {}}
    for name, decode in DECODERS.items():
        entry: dict = {}
        try:
            decode([torch.frombuffer(bytearray(photos["photo-0"]), dtype=torch.uint8)], "cpu")
        except Exception as exc:  # noqa: BLE001 - not installed or not loadable here
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            result["decoders"][name] = entry
            print(f"{name}: unavailable ({entry['error']})", flush=True)
            continue
        for device in devices:
            entry[device] = {"odd_corpus": agreement(decode, corpus, device),
                             "photos": agreement(decode, photos, device),
                             "img_s": round(rate(decode, timed, device), 1)}
            print(f"{name} on {device}: {json.dumps(entry[device])}", flush=True)
        result["decoders"][name] = entry
    print(f"Pillow (the CPU loader) on the same bytes: {result['pillow_img_s']:,.0f} img/s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
