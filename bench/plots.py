"""The documentation's benchmark plots, from the current figures in ``docs/figures.json``.

    python bench/plots.py               # writes docs/assets/bench-*.png
    python bench/plots.py --out DIR     # elsewhere (the test suite draws them into a temporary folder)

``BENCHMARKS.md`` keeps the record, with the command behind each figure; ``docs/figures.json`` holds the
current ones (each with its command), and the site shows them as these plots (``docs/speed.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIGURES = REPO / "docs" / "figures.json"


def bars(ax, labels: list[str], values: list[float], unit: str, colors=None) -> None:
    positions = range(len(labels))
    drawn = ax.barh(list(positions), values, color=colors or "#4c72b0")
    ax.set_yticks(list(positions), labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    top = max(values) if values else 1
    for rect, value in zip(drawn, values):
        ax.text(rect.get_width() + top * 0.01, rect.get_y() + rect.get_height() / 2,
                f"{value:,.0f}" if value >= 100 else f"{value:.3g}",
                va="center", fontsize=9)
    ax.set_xlim(0, top * 1.18)
    ax.spines[["top", "right"]].set_visible(False)


def draw(name: str, figure: dict, out: Path) -> Path:
    kind = figure["kind"]
    if kind == "bars":
        fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(figure["bars"])))
        bars(ax, [b["label"] for b in figure["bars"]], [b["value"] for b in figure["bars"]], figure["unit"],
             [b.get("color", "#4c72b0") for b in figure["bars"]])
    elif kind == "growth":  # one line per series over sizes, one panel per measure
        measures = figure["measures"]
        fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.4))
        for ax, (measure, unit) in zip(axes if len(measures) > 1 else [axes], measures.items()):
            for series in figure["series"]:
                points = [(x, y) for x, y in zip(series["sizes"], series[measure]) if y is not None]
                if not points:
                    continue
                ax.plot(*zip(*points), marker="o", label=series["label"])
                for x, y in points:
                    ax.annotate(f"{y:,.0f}" if y >= 100 else f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("pictures")
            ax.set_ylabel(unit)
            ax.spines[["top", "right"]].set_visible(False)
        (axes[0] if len(measures) > 1 else axes).legend(fontsize=8)
    else:
        raise ValueError(f"{name}: unknown kind of figure {kind!r}")
    fig.suptitle(figure["title"], fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.text(0.01, 0.02, figure["command"], fontsize=7, family="monospace", color="#555555")
    path = out / f"bench-{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "assets")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = json.loads(FIGURES.read_text())
    paths = [draw(name, figure, args.out) for name, figure in figures.items()]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
