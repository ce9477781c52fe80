"""The one image loader: every picture the project looks at (index, embed, report, export, verify,
trainer, eval) is read and decoded here, with one failure rule.

Real collections hold odd files: PNG bytes under a ``.JPEG`` name, CMYK and
grayscale JPEGs, 16-bit PNGs, EXIF-rotated photos, palette images with
transparency, truncated downloads, empty files and decompression bombs. The
loader either returns an upright RGB image (alpha composited on white) or
raises :class:`BadImage` with a short reason; each caller then does the one
thing that rule allows: quarantine the image (index; embed, which also zeros
its row), draw a red tile (report), name it (verify, materialize), or leave
it out and count it (trainer, eval). Nothing decodes a picture any other way,
so the trainer sees exactly what the encoder saw.

* :func:`load_image` - ``(source, key)`` to a picture;
* :func:`read_image` - the same plus the encoded bytes and container format (export, materialize);
* :func:`load_images` - the batch form, pictures and a mask of which loaded;
* :func:`image_from_bytes` - bytes that came from a release (verify);
* :func:`square_pixels` - bytes to the uint8 square the trainer and eval cache;
* :func:`check_image` - what the index records (upright size, format), from the header where it can vouch;
* :func:`device_jpeg` / :func:`decode_jpegs` - the JPEGs a device decoder (nvJPEG on a GPU) decodes to the
  same picture, and their batched decoding; every other file takes the Pillow path above.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import KeyRefused

# Transparent pixels are composited on this fixed background, so that the same
# file always gives the same picture.
BACKGROUND = (255, 255, 255)
# 2 x Pillow's default bomb limit: larger images are refused, not decoded.
MAX_PIXELS = 2 * 89_478_485


class BadImage(Exception):
    """The bytes are not a usable image; ``str(exc)`` is the reason."""


class ImageUnreadable(BadImage):
    """The source could not give the image's bytes (a missing or unreadable file)."""


class ImageRefused(BadImage):
    """The key is not one the source may read (absolute, ``..``, a link out of its root)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale the full range down to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    # CMYK, YCbCr, LAB, L, 1, ... : Pillow's converters handle these.
    return img.convert("RGB")


def decode_image(data: bytes, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data`` to an upright RGB image.

    ``draft_size`` lets a JPEG decode at a reduced scale (Pillow draft mode)
    when the picture is much larger than the size it will be resized to.
    Raises :class:`BadImage` with a short reason for anything unusable.
    """
    return decode_with_format(data, draft_size, max_pixels)[0]


def decode_with_format(data: bytes, draft_size: int | None = None,
                       max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """:func:`decode_image`, plus Pillow's name for the container format (``JPEG``, ``PNG`` ...)."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"too large: {width}x{height} pixels is over the limit of {max_pixels}")
            if draft_size and img.format == "JPEG" and min(width, height) >= 2 * draft_size:
                # Decode at 1/2, 1/4 or 1/8 scale while the shorter side stays >= draft_size.
                scale = draft_size / min(width, height)
                img.draft(img.mode if img.mode in ("RGB", "L") else None,
                          (math.ceil(width * scale), math.ceil(height * scale)))
            fmt = str(img.format)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img), fmt
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image: no decoder recognises these bytes") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"truncated or corrupt: {exc}") from None


@dataclass(frozen=True)
class LoadedImage:
    """A picture with the bytes it came from and their container format (``JPEG``, ``PNG`` ...)."""

    image: Image.Image
    data: bytes
    format: str


def read_bytes(source: Any, key: str) -> bytes:
    """The encoded bytes under ``key``, not decoded; :class:`BadImage` when they cannot be read."""
    try:
        return source.read(key)
    except KeyRefused as exc:
        raise ImageRefused(str(exc)) from None
    except (OSError, KeyError) as exc:
        raise ImageUnreadable(f"unreadable: {getattr(exc, 'strerror', None) or exc}") from None


def read_image(source: Any, key: str, draft_size: int | None = None) -> LoadedImage:
    """Read ``key`` from ``source`` and decode it; :class:`BadImage` (with a reason) for anything unusable."""
    data = read_bytes(source, key)
    image, fmt = decode_with_format(data, draft_size)
    return LoadedImage(image, data, fmt)


def load_image(source: Any, key: str, draft_size: int | None = None) -> Image.Image:
    """The upright RGB picture stored under ``key``; :class:`BadImage` for anything unusable."""
    return read_image(source, key, draft_size).image


def load_images(source: Any, keys: list[str], draft_size: int | None = None
                ) -> tuple[list[Image.Image | None], list[str | None]]:
    """The batch form: a picture (or None) and a failure reason (or None) for each key, in order."""
    images: list[Image.Image | None] = []
    reasons: list[str | None] = []
    for key in keys:
        try:
            images.append(load_image(source, key, draft_size))
            reasons.append(None)
        except BadImage as exc:
            images.append(None)
            reasons.append(str(exc))
    return images, reasons


def square_pixels(data: bytes, side: int) -> np.ndarray:
    """Encoded bytes to a ``(side, side, 3)`` uint8 picture: decoded as the encoder decodes (draft size
    ``side``), shorter side resized to ``side`` (bilinear, antialiased), centre square kept: the geometry
    of :func:`spp_curate.checkpoint.eval_transform`, pixel for pixel. :class:`BadImage` if unusable."""
    img = decode_image(data, draft_size=side)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != side:
        long = int(side * long / short)
        img = img.resize((side, long) if w <= h else (long, side), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    return np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.uint8)


@dataclass(frozen=True)
class ImageFacts:
    """What the index records of a usable image: its upright size and container format."""

    width: int
    height: int
    format: str


def _jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int, int, str, str] | None:
    """``(width, height, EXIF orientation, mode, format)`` of a JPEG whose header vouches for its pixels:
    it parses, ends with the end-of-image marker (trailing zero padding aside), is within the pixel limit,
    has a mode Pillow decodes without help, and its EXIF reads. None for anything else."""
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L", "CMYK") \
                    or width * height > max_pixels or width < 1 or height < 1:
                return None
            orientation = img.getexif().get(0x0112, 1)
            return width, height, int(orientation) if isinstance(orientation, int) else -1, img.mode, str(img.format)
    except Exception:  # noqa: BLE001 - any doubt about the header: the full decode decides
        return None


def check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageFacts:
    """The index's check of one file: its upright size and format, or :class:`BadImage` with the reason.

    A JPEG that is whole by its header (:func:`_jpeg_header`) is not decoded here: its size comes from the
    header and its EXIF orientation, as :func:`decode_image` would turn it. Every other file (PNG, a JPEG
    cut short, one with unreadable EXIF, ...) is decoded in full, so a refused file gets the reason
    :func:`decode_image` gives. A JPEG whose pixel data is broken behind a sound header passes here; the
    embed stage, which decodes every image, quarantines it with the same reason.
    """
    header = _jpeg_header(data, max_pixels)  # None for empty bytes: the full decode names them
    if header is not None:
        width, height, orientation, _, fmt = header
        return ImageFacts(height, width, fmt) if orientation in (5, 6, 7, 8) else ImageFacts(width, height, fmt)
    img, fmt = decode_with_format(data, max_pixels=max_pixels)
    return ImageFacts(img.width, img.height, fmt)


def device_jpeg(data: bytes, max_pixels: int = MAX_PIXELS) -> bool:
    """Whether a device JPEG decoder gives the picture :func:`decode_image` gives: a whole RGB or grayscale
    JPEG that needs no EXIF turn. CMYK, rotated, cut-short and non-JPEG files take the Pillow path."""
    header = _jpeg_header(data, max_pixels)
    return header is not None and header[3] in ("RGB", "L") and header[2] in (1, 0)


def decode_jpegs(encoded: list[Any], device: Any) -> list[Any]:
    """JPEG bytes (1-D uint8 tensors) to upright RGB uint8 ``(3, H, W)`` tensors on ``device``, decoded as one
    batch (nvJPEG on a GPU, libjpeg-turbo on the CPU); None for each file the decoder refuses, which the
    caller then decodes with Pillow (:func:`image_from_bytes`) for the picture or the reason."""
    if not encoded:
        return []
    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; its decoder works as before
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_jpegs(encoded, device)


def drain_stream(device: Any) -> None:
    """Wait until the work already queued on ``device``'s current CUDA stream has run (nothing on a CPU).

    On Hopper GPUs nvJPEG's hardware decoder writes its output buffers before work queued on the caller's
    stream has run (pytorch/vision PR #9606, torchcodec PR #1634). The caching allocator hands a block back
    as soon as it is freed on its stream, so without this barrier the decoder can overwrite memory that
    queued kernels (copies, masked writes, the last batch's reductions) are still reading: wrong numbers in
    code that never touched the decoder. The decode synchronises afterwards anyway, so waiting costs nothing.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _decode_jpegs(encoded: list[Any], device: Any) -> list[Any]:
    # torchvision's decoder, not TorchCodec's: pixel for pixel the same on the CPU (bench/jpeg_decoders.py), and
    # it ships with the pinned torchvision, so no extension tied to one torch build is needed (BENCHMARKS.md).
    from torchvision.io import ImageReadMode, decode_jpeg

    drain_stream(device)
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - the decoders raise RuntimeError or library errors; Pillow decides
        decoded = []
        for data in encoded:  # one refused file fails the batch (vision #8496): decode one by one to find it
            drain_stream(device)
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001
                decoded.append(None)
        return decoded


def image_from_bytes(data: bytes | None, draft_size: int | None = None) -> Image.Image:
    """Decode encoded bytes taken from a release (a Parquet cell, a tar member)."""
    return decode_image(data or b"", draft_size)
