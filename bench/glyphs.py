"""Glyphs: a generated labelled picture set whose same-class pictures differ in ways augmentations cannot make.

    python bench/glyphs.py OUT [--per-class 400] [--test-per-class 100] [--seed 0]

26 classes, one per letter of the Latin alphabet. Each picture is that letter
drawn in capital *or* small form, in one of the machine's font faces (serif,
sans, mono, script, bold, italic...), at a random size, position and small
rotation, in a random grey on a random grey background with a light gradient,
32 x 32 PNG. A crop or a colour jitter of an "A" in one face cannot give an
"a", or the same "A" in another face; a same-class partner can. Written as
``OUT/train/<letter>/NNNNN.png`` and ``OUT/test/<letter>/NNNNN.png`` (the
``imagefolder`` source: ``--source imagefolder --root OUT/train``,
``eval --test-root OUT/test``), with ``OUT/glyphs.json`` naming the faces and
the seed. The same fonts and seed give the same pictures.

Faces: every TrueType/OpenType file under /usr/share/fonts that draws all 52
letters (symbol and math faces are left out). The figures in BENCHMARKS.md
used the faces of the Debian packages fonts-dejavu-core, fonts-dejavu-extra,
fonts-liberation, fonts-urw-base35, fonts-freefont-ttf, fonts-comic-neue,
fonts-linuxlibertine and fonts-cantarell (``apt-get install ...``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = (Path("/usr/share/fonts"),)
LEFT_OUT = ("symbol", "dingbat", "math", "d050000l", "standardsymbols")
SIDE, CANVAS = 32, 96
MIN_FACES = 8


def _mask(font: ImageFont.FreeTypeFont, char: str) -> bytes:
    mask = font.getmask(char)
    return bytes(mask) if mask.size[0] * mask.size[1] else b""


def usable_faces(dirs=FONT_DIRS) -> list[Path]:
    """Font files that draw every letter distinctly from the face's missing-glyph box, sorted by path."""
    faces = []
    for path in sorted(p for d in dirs if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf")):
        if any(word in path.name.lower() for word in LEFT_OUT):
            continue
        try:
            font = ImageFont.truetype(str(path), 48)
            missing = _mask(font, "\uffff")
            masks = {ch: _mask(font, ch) for ch in string.ascii_letters}
        except OSError:
            continue
        if all(m and m != missing for m in masks.values()) and len(set(masks.values())) >= 48:
            faces.append(path)
    return faces


def draw(letter: str, face: Path, rng: np.random.Generator) -> Image.Image:
    """One picture of ``letter`` (capital or small, at random) in ``face``."""
    char = letter.upper() if rng.random() < 0.5 else letter.lower()
    font = ImageFont.truetype(str(face), int(rng.integers(44, 72)))
    back, ink = rng.integers(0, 256, size=2)
    while abs(int(back) - int(ink)) < 90:
        ink = rng.integers(0, 256)
    gradient = np.linspace(-1, 1, CANVAS)[None, :] * rng.normal(0, 25)
    canvas = Image.fromarray(np.clip(back + np.repeat(gradient, CANVAS, 0), 0, 255).astype(np.uint8), "L")
    glyph = Image.new("L", (CANVAS, CANVAS), 0)
    box = ImageDraw.Draw(glyph).textbbox((0, 0), char, font=font, anchor="lt")
    w, h = box[2] - box[0], box[3] - box[1]
    x = (CANVAS - w) / 2 + rng.normal(0, 6) - box[0]
    y = (CANVAS - h) / 2 + rng.normal(0, 6) - box[1]
    ImageDraw.Draw(glyph).text((x, y), char, fill=255, font=font, anchor="lt")
    glyph = glyph.rotate(float(rng.normal(0, 8)), resample=Image.BILINEAR)
    canvas.paste(Image.new("L", canvas.size, int(ink)), mask=glyph)
    return canvas.resize((SIDE, SIDE), Image.LANCZOS)


def generate(out: Path, per_class: int = 400, test_per_class: int = 100, seed: int = 0) -> dict:
    faces = usable_faces()
    if len(faces) < MIN_FACES:
        raise SystemExit(f"only {len(faces)} usable font faces under {', '.join(map(str, FONT_DIRS))}; at least "
                         f"{MIN_FACES} are needed (apt-get install fonts-urw-base35 fonts-freefont-ttf ...)")
    info = {"faces": [p.name for p in faces], "seed": seed, "per_class": per_class,
            "test_per_class": test_per_class, "side": SIDE, "classes": list(string.ascii_uppercase)}
    marker = out / "glyphs.json"
    if marker.is_file() and json.loads(marker.read_text()) == info:
        return info
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c, letter in enumerate(string.ascii_uppercase):
            folder = out / split / letter
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                key = f"{seed}/{split}/{letter}/{i}".encode()
                rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))
                draw(letter, faces[int(rng.integers(len(faces)))], rng).save(folder / f"{i:05d}.png")
    marker.write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = generate(args.out, args.per_class, args.test_per_class, args.seed)
    print(f"{args.out}: {26 * args.per_class:,} train and {26 * args.test_per_class:,} test pictures of 26 letters "
          f"in {len(info['faces'])} font faces")


if __name__ == "__main__":
    main()
