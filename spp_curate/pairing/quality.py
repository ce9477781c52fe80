"""The report stage: pair quality in numbers (``metrics.json``) and pictures (``index.html``).

It reads only ``index.parquet``, ``quarantine.parquet``, ``pairs.parquet`` and
``mine_stats.json``, so rerunning it is cheap. Precision is measured against
the source's labels whenever they exist, whatever category mode mined the pairs.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from .. import layout  # noqa: E402
from ..config import PARTNER_WORDS, Recipe  # noqa: E402
from ..curate.sources import Source, open_source  # noqa: E402
from ..files import atomic_path, read_json, write_json  # noqa: E402
from ..figures import grid, save_figure, thumb  # noqa: E402



def compute_metrics(index: pd.DataFrame, pairs: pd.DataFrame, stats: dict[str, Any],
                    quarantined: int) -> dict[str, Any]:
    """Precision, coverage, counts and the filter funnel."""
    n_images = len(index)
    labelled = pairs[(pairs.label >= 0) & (pairs.positive_label >= 0)]
    agree = labelled.label == labelled.positive_label
    per_class = {}
    if len(labelled):
        by_class = agree.groupby(labelled.label_name).mean()
        per_class = {str(k): round(float(v), 6) for k, v in by_class.items()}
    in_pair = np.union1d(pairs.anchor_id.to_numpy(), pairs.positive_id.to_numpy())
    sims = pairs.similarity.to_numpy(dtype=np.float64)
    return {
        "images": n_images,
        "quarantined": quarantined,
        "pairs": len(pairs),
        "precision": float(agree.mean()) if len(labelled) else None,
        "precision_per_class": per_class,
        "pairs_labelled": len(labelled),
        "coverage": float(len(in_pair) / n_images) if n_images else 0.0,
        "images_in_pairs": int(len(in_pair)),
        "mutual_share": float(pairs.mutual.mean()) if len(pairs) else None,
        "pairs_per_class": {str(k): int(v) for k, v in pairs.label_name.value_counts().sort_index().items()},
        "similarity": ({"mean": float(sims.mean()), "median": float(np.median(sims)),
                        "min": float(sims.min()), "max": float(sims.max())} if len(sims) else None),
        "filter_removed": {s["step"]: s["removed"] for s in stats["funnel"][1:]},
        "ivf_recall_at_k": stats["search"].get("ivf_recall_at_k"),
        "zeroshot_accuracy": stats["categories"].get("zeroshot_accuracy"),
        "categories": stats["categories"],
        "funnel": stats["funnel"],
        "search": stats["search"],
        "thresholds": stats["thresholds"],
    }


def pair_grid(source: Source, keys: dict[int, str], pairs: pd.DataFrame, path: Path,
              class_names: list[str] | None = None) -> None:
    """A PNG grid: each cell is anchor | positive with their labels and similarity."""
    cells = []
    names = class_names or []
    for row in pairs.itertuples():
        wrong = row.label >= 0 and row.positive_label >= 0 and row.label != row.positive_label
        caption = [f"{row.label_name[:14]}  sim {row.similarity:.3f}"]
        if wrong:
            other = names[row.positive_label] if row.positive_label < len(names) else f"label {row.positive_label}"
            caption.append(f"positive: {other[:20]}")
        cells.append((thumb(source, keys[row.anchor_id]), thumb(source, keys[row.positive_id]), caption, wrong))
    grid(cells, path)


def threshold_values(stats: dict[str, Any]) -> tuple[float, float]:
    """The minimum similarity and duplicate threshold the mine stage used (quantiles resolved)."""
    return stats["thresholds"]["min_similarity"]["value"], stats["thresholds"]["dup_threshold"]["value"]


def threshold_curve_plot(curve: dict[str, Any], path: Path) -> None:
    """Precision and coverage (left axis) and pairs (right axis) against the minimum similarity."""
    x = np.asarray(curve["threshold"])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    if curve["precision"] is not None:
        ax.plot(x, [np.nan if p is None else p for p in curve["precision"]], label="precision (labels agree)")
    ax.plot(x, curve["coverage"], label="coverage (images in a pair)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("minimum similarity")
    ax.set_ylabel("share")
    right = ax.twinx()
    right.plot(x, curve["pairs"], color="grey", linestyle=":", label="pairs")
    right.set_ylabel("pairs")
    ax.axvline(curve["current"], color="black", linestyle="--", linewidth=0.8)
    ax.annotate("this build", (curve["current"], 0.02), fontsize=7, rotation=90, va="bottom")
    lines = ax.get_legend_handles_labels()
    extra = right.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="lower left")
    ax.set_title("what each minimum similarity would keep (before any per-class cap)")
    save_figure(fig, path)


def similarity_histogram(stats: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """Kept vs removed candidates by similarity, with the thresholds drawn in."""
    save_figure(similarity_histogram_figure(stats), path)


def similarity_histogram_figure(stats: dict[str, Any]) -> Any:
    """The figure of :func:`similarity_histogram`, laid out, not yet saved."""
    bins = np.asarray(stats["hist_bins"])
    centres = (bins[:-1] + bins[1:]) / 2
    occupied = np.flatnonzero(np.sum([stats["kept_hist"], *stats["removed_hist"].values()], axis=0))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    if len(occupied):
        ax.set_xlim(bins[max(occupied[0] - 2, 0)], bins[min(occupied[-1] + 3, len(bins) - 1)])
    lo, hi = ax.get_xlim()
    for x, name in zip(threshold_values(stats), ("min similarity", "duplicate threshold")):
        if x is None or not lo <= x <= hi:
            continue
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        # inside the axes, from just under the top, on the side of the line with room: never cut by the frame
        right = x <= lo + 0.8 * (hi - lo)
        ax.annotate(name, (x, 0.97), xycoords=("data", "axes fraction"), xytext=(2 if right else -2, 0),
                    textcoords="offset points", fontsize=7, rotation=90, va="top",
                    ha="left" if right else "right", annotation_clip=False)
    ax.bar(centres, stats["kept_hist"], width=bins[1] - bins[0], alpha=0.8, label="kept")
    for name, hist in stats["removed_hist"].items():
        if sum(hist):
            ax.step(centres, hist, where="mid", label=f"removed: {name}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("candidate pairs")
    ax.set_yscale("symlog")
    ax.legend(fontsize=7)
    ax.set_title("similarity of kept and removed candidate pairs")
    fig.tight_layout()
    return fig


def pairs_per_class_plot(metrics: dict[str, Any], path: Path) -> None:
    counts = metrics["pairs_per_class"]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.bar(range(len(counts)), list(counts.values()))
    ax.set_xticks(range(len(counts)), list(counts.keys()), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("pairs")
    ax.set_title("pairs per class (anchor's label)")
    save_figure(fig, path)


HEADLINE = ("pairs", "precision", "coverage", "quarantined")


def threshold_text(thresholds: dict[str, dict[str, Any]], field: str) -> str:
    """``0.9812`` or ``0.9812 (q0.2)``: the value used, and the quantile it was given as."""
    t = thresholds[field]
    given = str(t["given"])
    if t["value"] is None:
        return "off"
    return f"{t['value']:.4f}" + (f" ({given})" if given.startswith("q") else "")


def _html(recipe: Recipe, metrics: dict[str, Any], grids: dict[str, str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    # Pairs mined within label categories share a label by construction: their label precision says nothing
    # of the encoder, and the card says so under the figure.
    notes = {"precision": "by construction: pairs mined within label categories" if recipe.category == "label"
             else "share of pairs whose two labels agree"}
    cards = "".join(f"<div class='headline'><div class='value' id='headline-{k}'>"
                    f"{'n/a' if metrics.get(k) is None else fmt(metrics.get(k))}</div><div>{k}</div>"
                    + (f"<div class='note' id='headline-{k}-note'>{html.escape(notes[k])}</div>" if k in notes else "")
                    + "</div>" for k in HEADLINE)
    more = {"images": "images", "excluded_near_copies": "excluded as near-copies of a reference set",
            "images_in_pairs": "images in pairs", "mutual_share": "pairs whose two images are each other's neighbours",
            "ivf_recall_at_k": "approximate search's recall@k against exact search",
            "zeroshot_accuracy": "zero-shot accuracy of the pseudo-labels"}
    rows = "".join(f"<tr><th>{html.escape(label)}</th><td>{fmt(metrics.get(k))}</td></tr>" for k, label in more.items()
                   if metrics.get(k) is not None)
    leak = metrics.get("leakage")
    leakage = "" if not leak else (
        f"<h2>Leakage</h2><p>Images whose copy score against a reference set is at least {leak['threshold']:.4f} "
        f"(given as {html.escape(str(leak['threshold_given']))}), or whose bytes equal a reference image's, "
        "never enter a pair.</p><table><tr><th>reference set</th><th>split</th><th>images</th><th>excluded</th>"
        "<th>same bytes</th></tr>" + "".join(
            f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['split'])}</td><td>{r['count']:,}</td>"
            f"<td>{r['excluded']:,}</td><td>{r['same_digest']:,}</td></tr>" for r in leak["references"]) + "</table>")
    search = metrics["search"]
    kinds = ", ".join(f"{count:,} {kind}" for kind, count in (search.get("index_kinds") or {}).items()) or "none"
    funnel = "".join(f"<tr><td>{html.escape(s['step'])}</td><td>{s['removed']:,}</td><td>{s['remaining']:,}</td></tr>"
                     for s in metrics["funnel"])
    figures = "".join(f"<h2>{html.escape(title)}</h2><img src='{src}' alt='{html.escape(title)}'>"
                      for title, src in grids.items())
    per_class = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>"
                        for k, v in metrics["precision_per_class"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(recipe.name)}: pair report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}} img{{max-width:100%}}
.headlines{{display:flex;gap:1em;margin:1em 0}} .headline{{border:1px solid #ccc;padding:.5em 1em;text-align:center}}
.headline .value{{font-size:1.8em;font-weight:bold}} .headline .note{{font-size:.75em;color:#666;max-width:16em}}</style></head>
<body><h1>{html.escape(recipe.name)}: semantic pair report</h1>
<div class="headlines">{cards}</div>
<table>{rows}</table>
<h2>Filter funnel</h2><table><tr><th>step</th><th>removed</th><th>remaining</th></tr>{funnel}</table>
<p>source <code>{html.escape(recipe.source)}</code>, encoder <code>{html.escape(recipe.encoder)}</code>,
category <code>{recipe.category}</code>, k={recipe.k}, min similarity {threshold_text(metrics["thresholds"], "min_similarity")},
duplicate threshold {threshold_text(metrics["thresholds"], "dup_threshold")}, at most {recipe.max_per_anchor} per anchor{PARTNER_WORDS[recipe.partner]}{", mutual only" if recipe.mutual else ""}{f", at most {recipe.pairs_per_class} per class" if recipe.pairs_per_class else ""}.
Search: {html.escape(search["scope"])}, {search["groups"]:,} groups ({html.escape(kinds)} {"index" if search["groups"] == 1 else "indexes"}) on {search["device"]}.</p>
{leakage}
{figures}
<h2>Precision per class</h2><table>{per_class}</table>
<p>Full figures: <a href="metrics.json">metrics.json</a>.</p>
</body></html>
"""


def write_report(recipe: Recipe, build_dir: Path, engine=None) -> dict[str, Any]:
    """Write ``report/metrics.json``, the figures and ``report/index.html``; return the metrics."""
    out = build_dir / layout.REPORT
    out.mkdir(parents=True, exist_ok=True)
    index = pq.read_table(build_dir / layout.INDEX, columns=["id", "key", "label"]).to_pandas()
    pairs = pq.read_table(build_dir / layout.PAIRS).to_pandas()
    stats = read_json(build_dir / layout.MINE_STATS)
    quarantined = pq.read_metadata(build_dir / layout.QUARANTINE).num_rows
    metrics = compute_metrics(index, pairs, stats, quarantined)

    source = open_source(recipe)
    keys = dict(zip(index.id, index.key))
    n = recipe.grid_pairs
    grids = {}
    picks = {
        "Strongest pairs": pairs.nlargest(n, "similarity"),
        "Pairs nearest the similarity threshold": pairs.nsmallest(n, "similarity"),
    }
    wrong = pairs[(pairs.label >= 0) & (pairs.positive_label >= 0) & (pairs.label != pairs.positive_label)]
    if len(wrong):
        picks["Wrong pairs (labels disagree)"] = wrong.nlargest(n, "similarity")
    from ..leakage.report import leakage_section
    from ..progress import stage_progress

    figures = len(picks) + 3 + bool(recipe.references)
    with stage_progress("report: figures", figures, unit="figure") as (bar, task):
        for i, (title, chosen) in enumerate(picks.items()):
            name = [layout.STRONGEST_GRID, layout.THRESHOLD_GRID, layout.WRONG_GRID][i]
            if len(chosen):
                pair_grid(source, keys, chosen, out / name, source.class_names)
                grids[title] = name
            bar.update(task, advance=1)
        threshold_curve_plot(stats["curve"], out / layout.THRESHOLD_CURVE)
        grids = {"Precision and coverage against the minimum similarity": layout.THRESHOLD_CURVE, **grids}
        similarity_histogram(stats, recipe, out / layout.SIMILARITY_HISTOGRAM)
        grids["Similarity histogram"] = layout.SIMILARITY_HISTOGRAM
        bar.update(task, advance=2)
        if metrics["pairs_per_class"]:
            pairs_per_class_plot(metrics, out / layout.PAIRS_PER_CLASS)
            grids["Pairs per class"] = layout.PAIRS_PER_CLASS
        bar.update(task, advance=1)
        metrics["leakage"], leak_figures = leakage_section(recipe, build_dir, out)
        bar.update(task, advance=1 if recipe.references else 0)
    metrics["excluded_near_copies"] = metrics["leakage"]["excluded"] if metrics["leakage"] else None
    grids.update(leak_figures)
    metrics["figures"] = list(grids.values())
    write_json(build_dir / layout.METRICS, metrics)
    with atomic_path(build_dir / layout.REPORT_HTML) as tmp:
        tmp.write_text(_html(recipe, metrics, grids))
    return metrics
