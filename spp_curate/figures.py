"""Pictures for reports: thumbnails, grids of picture pairs, and matplotlib figures saved atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .files import atomic_path
from .images import BadImage, load_image

THUMB = 96
GRID_COLUMNS = 4


def fit(img: Image.Image) -> Image.Image:
    """``img`` as a THUMB x THUMB picture (small ones enlarged without smoothing)."""
    img = img.copy()
    img.thumbnail((THUMB, THUMB), Image.Resampling.NEAREST if max(img.size) < THUMB else Image.Resampling.BICUBIC)
    if img.size != (THUMB, THUMB):
        img = img.resize((THUMB, THUMB), Image.Resampling.NEAREST)
    return img


def thumb(source: Any, key: str) -> Image.Image:
    """``key`` of ``source`` as a thumbnail; a red square if it no longer decodes."""
    try:
        return fit(load_image(source, key))
    except BadImage:
        return Image.new("RGB", (THUMB, THUMB), (200, 0, 0))


def grid(cells: list[tuple[Image.Image, Image.Image, list[str], bool]], path: Path) -> None:
    """A PNG grid of picture pairs side by side, each with up to two caption lines (red when ``wrong``)."""
    cell_w, cell_h, pad = 2 * THUMB + 6, THUMB + 30, 8
    rows = max(1, -(-len(cells) // GRID_COLUMNS))
    canvas = Image.new("RGB", (GRID_COLUMNS * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (left, right, caption, wrong) in enumerate(cells):
        x = pad + (i % GRID_COLUMNS) * (cell_w + pad)
        y = pad + (i // GRID_COLUMNS) * (cell_h + pad)
        canvas.paste(left, (x, y))
        canvas.paste(right, (x + THUMB + 6, y))
        for j, line in enumerate(caption[:2]):
            draw.text((x, y + THUMB + 2 + 13 * j), line, fill=(190, 0, 0) if wrong else (30, 30, 30))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG under ``path`` atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
