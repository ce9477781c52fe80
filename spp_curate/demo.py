"""``spp-curate demo``: the SePP-ID loop on Fashion-MNIST, on a CPU, in minutes.

1. Pretrain a semantic sampler: SimCLR on single images (augment positives).
2. Mine pairs with it (``--category none``: the sampler alone, precision measured
   against the labels), and pairs with the labels for comparison.
3. Train ``augment`` (the matched baseline) and ``both`` (SePP-ID) on the sampler's
   pairs, at equal epochs.
4. Evaluate both, and print kNN top-1 and pair precision in a table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rich.table import Table

from . import layout
from .config import resolve_recipe
from .files import read_json
from .stages import build
from .train.evaluate import evaluate
from .train.loop import TrainConfig, train


def run_demo(out: Path, root: str | None, limit: int = 10_000, epochs: int = 3, method: str = "simclr",
             say: Callable[[str], None] = print) -> dict[str, Any]:
    # Batch 128: at a few epochs the number of steps matters more than the batch (BENCHMARKS.md, learning gain).
    common = dict(backbone="small-cnn", epochs=epochs, batch_size=128, image_size=32, seed=0)
    sampler = out / "sampler"
    say(f"[1/4] pretraining the semantic sampler ({method}, {limit:,} images, {epochs} epochs)")
    train(TrainConfig(out=str(sampler), method=method, positives="augment", source="fashion-mnist", root=root,
                      limit=limit, **common), resume=True)

    builds = {}
    for category in ("none", "label"):
        say(f"[2/4] mining pairs with the sampler, --category {category}")
        recipe = resolve_recipe("fashion-mnist", {
            "root": root, "limit": limit, "encoder": f"ssl:{sampler / 'last.pt'}", "image_size": None,
            "category": category, "min_similarity": "q0", "max_per_anchor": 1,
            "k": 8, "name": f"fashion-mnist-sepp-{category}"})
        builds[category] = out / f"pairs-{category}"
        build(builds[category], recipe)

    results: dict[str, Any] = {}
    for positives in ("augment", "both"):
        run = out / f"{method}-{positives}"
        say(f"[3/4] training {method} with --positives {positives} on the sampler's pairs")
        train(TrainConfig(out=str(run), method=method, positives=positives,
                          pairs=str(builds["none"] / "release"), **common), resume=True)
        say(f"[4/4] evaluating {run.name}")
        results[positives] = evaluate(run, "fashion-mnist", root, limit=limit)
        history = (run / "metrics.jsonl").read_text().splitlines()
        results[positives]["partner_weight"] = json.loads(history[-1]).get("partner_weight") if history else None
    precision = {c: read_json(b / layout.METRICS)["precision"] for c, b in builds.items()}
    return {"results": results, "precision": precision, "builds": builds}


def results_table(summary: dict[str, Any], method: str) -> Table:
    table = Table(title="SePP-ID loop on Fashion-MNIST: small-cnn trained on the sampler's pairs")
    for column in ("run", "pair precision", "partner weight", "kNN top-1", "linear top-1"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    for positives, result in summary["results"].items():
        weight = result.get("partner_weight")
        table.add_row(f"{method}/{positives}", f"{summary['precision']['none']:.4f}",
                      "-" if weight is None else f"{weight:.3f}",
                      f"{result['knn_top1']:.4f}", f"{result['linear_top1']:.4f}")
    table.add_row("label pairs", f"{summary['precision']['label']:.4f}", "-", "-", "-")
    first = next(iter(summary["results"].values()))
    table.add_row("raw pixels (ref.)", "-", "-", f"{first['pixel_knn_top1']:.4f}", f"{first['pixel_linear_top1']:.4f}")
    return table
