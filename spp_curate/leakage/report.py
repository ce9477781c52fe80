"""The report's leakage section: what the exclusion caught, what it let through, and the score histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .. import layout
from ..config import Recipe, parse_reference
from ..figures import grid, save_figure, thumb
from ..files import read_json

GRID_CELLS = 12


def leakage_block(stats: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics.json`` (and the card and manifest) say of the exclusion."""
    return {"threshold": stats["threshold"], "threshold_given": stats["threshold_given"],
            "method": stats["method"], "excluded": stats["excluded"],
            "references": [{k: v for k, v in r.items() if k != "folder"} for r in stats["references"]]}


def _histogram(stats: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    bins = np.asarray(stats["hist_bins"])
    hist = np.asarray(stats["hist"])
    occupied = np.flatnonzero(hist)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.bar((bins[:-1] + bins[1:]) / 2, hist, width=bins[1] - bins[0])
    if len(occupied):
        ax.set_xlim(bins[max(occupied[0] - 2, 0)], bins[min(occupied[-1] + 3, len(bins) - 1)])
    ax.axvline(stats["threshold"], color="red", linestyle="--", linewidth=1)
    ax.annotate(f"threshold {stats['threshold']:.4f}", (stats["threshold"], 1), xycoords=("data", "axes fraction"),
                fontsize=7, rotation=90, va="top", ha="right")
    ax.set_yscale("symlog")
    ax.set_xlabel("copy score of the nearest reference image")
    ax.set_ylabel("build images")
    ax.set_title("nearest reference image of every build image")
    save_figure(fig, path)


def leakage_section(recipe: Recipe, build_dir: Path, out: Path) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Figures of the leakage section under ``out`` and the metrics block; (None, {}) without reference sets."""
    stats_path = build_dir / layout.EXCLUSION_STATS
    if not stats_path.is_file():
        return None, {}
    stats = read_json(stats_path)
    if not stats["references"]:
        return None, {}
    from ..curate.sources import open_source
    from .exclude import reference_recipe

    figures = {}
    _histogram(stats, out / "leak-scores.png")
    figures["Leakage: copy score of each build image's nearest reference image"] = "leak-scores.png"
    table = pq.read_table(build_dir / layout.EXCLUSION).to_pandas()
    table = table[table.reference.notna()]
    sources = {recipe.source: open_source(recipe)}
    for ref in stats["references"]:
        sources[ref["name"]] = open_source(reference_recipe(recipe, parse_reference(ref["name"])))
    picks = {"Leakage: excluded, the closest": ("leak-excluded.png", table[table.excluded]
                                                .nlargest(GRID_CELLS, "similarity")),
             "Leakage: kept, the closest below the threshold": ("leak-kept.png", table[~table.excluded]
                                                                .nlargest(GRID_CELLS, "similarity"))}
    for title, (name, rows) in picks.items():
        if not len(rows):
            continue
        cells = [(thumb(sources[recipe.source], r.key), thumb(sources[r.reference], r.reference_key),
                  [f"score {r.similarity:.4f}{' same bytes' if r.same_digest else ''}", r.reference_key[:28]],
                  bool(r.excluded)) for r in rows.itertuples()]
        grid(cells, out / name)
        figures[title] = name
    return leakage_block(stats), figures
