"""Decode image bytes into RGB pictures, or say precisely why not.

Real collections hold odd files: PNG bytes under a ``.JPEG`` name, CMYK and
grayscale JPEGs, 16-bit PNGs, EXIF-rotated photos, palette images with
transparency, truncated downloads, empty files and decompression bombs. Every
decoder in the project goes through :func:`decode_image`, which either returns
an upright RGB image or raises :class:`BadImage` with a short reason that ends
up in the quarantine table.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Transparent pixels are composited on this fixed background, so that the same
# file always gives the same picture.
BACKGROUND = (255, 255, 255)
# 2 x Pillow's default bomb limit: larger images are refused, not decoded.
MAX_PIXELS = 2 * 89_478_485


class BadImage(Exception):
    """The bytes are not a usable image; ``str(exc)`` is the reason."""


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
