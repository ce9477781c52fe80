"""Real image files for tests: a class-folder tree from the committed Fashion-MNIST subset, and odd and broken files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from spp_curate.curate.sources import FashionMNISTSource

from conftest import FMNIST


def fmnist_pictures(per_class: int, classes: int = 3, size: int = 64) -> list[tuple[int, Image.Image]]:
    """Real Fashion-MNIST pictures as RGB images of ``size`` px, ``per_class`` from each of the first classes."""
    src = FashionMNISTSource(str(FMNIST), "train")
    out = []
    for label in range(classes):
        for i in np.flatnonzero(src.labels == label)[:per_class]:
            img = Image.fromarray(src.images[i], "L").resize((size, size), Image.Resampling.BICUBIC)
            tint = np.array([[1.0, 0.8, 0.6], [0.6, 1.0, 0.8], [0.8, 0.6, 1.0]])[label % 3]
            rgb = (np.asarray(img, dtype=np.float32)[..., None] * tint).astype(np.uint8)
            out.append((label, Image.fromarray(rgb, "RGB")))
    return out


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def broken_behind_header(picture: Image.Image) -> bytes:
    """A JPEG with a sound header and end marker whose Huffman table is garbage: only decoding finds it."""
    good = jpeg_bytes(picture)
    table = good.find(b"\xff\xc4")
    return good[: table + 4] + b"\xff" * 30 + good[table + 34:]


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: a decompression bomb as Pillow sees one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(img: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def odd_files(picture: Image.Image) -> dict[str, bytes]:
    """Valid oddities: each must decode to an upright RGB picture."""
    rgba = picture.convert("RGBA")
    rgba.putalpha(128)
    pal = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    gray16 = Image.fromarray((np.asarray(picture.convert("L"), dtype=np.uint16) * 257))
    return {
        "png_named_jpeg.JPEG": png_bytes(picture),
        "cmyk.jpg": jpeg_bytes(picture.convert("CMYK")),
        "gray.jpg": jpeg_bytes(picture.convert("L")),
        "gray16.png": png_bytes(gray16),
        "palette_transparent.png": png_bytes(pal, transparency=0),
        "rgba.png": png_bytes(rgba),
        "exif_rotated.jpg": exif_rotated_jpeg(picture.crop((0, 0, 64, 32))),
    }


def broken_files(picture: Image.Image) -> dict[str, str | bytes]:
    """Unusable files, each with a word its quarantine reason must contain."""
    good = jpeg_bytes(picture)
    return {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "not_an_image.jpg": (b"this is a text file, not a picture\n" * 20, "not an image"),
        "bomb.png": (png_header_claiming(30_000, 30_000), "too large"),
    }


def write_imagefolder(root: Path, per_class: int = 40, odd: bool = True, broken: bool = True) -> dict[str, str]:
    """Write ``root/<class>/<n>.jpg`` from real pictures plus odd and broken files; return {key: expected reason}."""
    names = ["tshirt", "trouser", "pullover"]
    pictures = fmnist_pictures(per_class)
    for n, (label, img) in enumerate(pictures):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        (root / names[label] / f"{n:04d}.jpg").write_bytes(jpeg_bytes(img))
    if odd:
        for name, data in odd_files(pictures[0][1]).items():
            (root / names[0] / f"odd_{name}").write_bytes(data)
    expected = {}
    if broken:
        for name, (data, reason) in broken_files(pictures[-1][1]).items():
            (root / names[-1] / f"bad_{name}").write_bytes(data)
            expected[f"{names[-1]}/bad_{name}"] = reason
    (root / names[0] / "notes.txt").write_text("not an image extension: skipped, not quarantined\n")
    return expected
