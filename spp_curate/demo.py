"""``spp-curate demo``: the SePP-ID loop on Fashion-MNIST, on a CPU, in minutes.

1. The semantic sampler: raw pixels (``--encoder pixels:32``, PCA-whitened by the build), or with
   ``sampler="ssl"`` a self-supervised one pretrained first (SimCLR on single images, augment positives).
2. Mine pairs with it (``--category none``: the sampler alone, precision measured against the labels).
3. Train ``augment`` (the matched baseline) and ``both`` (SePP-ID) on the sampler's pairs, at equal epochs.
4. Evaluate both, and print kNN and linear top-1 and the pair precision in a table.

Why pixels by default: on Fashion-MNIST (centred, aligned pictures) their nearest neighbours are of the
anchor's class more often than a 3-epoch SimCLR sampler's (0.83 against 0.80), and they carry what the
student's crops and colour jitter do not; a sampler trained with the student's own recipe gives pairs
that `both` is level with `augment` on (BENCHMARKS.md, learning gain: which sampler's pairs pay).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from rich.table import Table

from . import layout
from .config import resolve_recipe
from .errors import UserError
from .files import read_json
from .stages import build
from .train.evaluate import evaluate
from .train.loop import TrainConfig, train

#: The demo's samplers: ``pixels`` (no training) or ``ssl`` (pretrained by the bundled trainer first).
SAMPLERS = ("pixels", "ssl")


#: The demo's backbone: the small CNN pooled to 2 x 2 cells (with one global pool it stayed 1.4 kNN points
#: below raw pixels at this budget; BENCHMARKS.md, the reference trainer against raw pixels).
DEMO_BACKBONE = "small-cnn-grid"


def run_demo(out: Path, root: str | None, limit: int = 10_000, epochs: int = 3, method: str = "simclr",
             sampler: str = "pixels", say: Callable[[str], None] = print) -> dict[str, Any]:
    if sampler not in SAMPLERS:
        raise UserError(f"got {sampler!r}; accepted: {', '.join(SAMPLERS)}", option="--sampler")
    # Batch 128: at a few epochs the number of steps matters more than the batch (BENCHMARKS.md, learning gain).
    common = dict(backbone=DEMO_BACKBONE, epochs=epochs, batch_size=128, image_size=32, seed=0)
    if sampler == "ssl":
        sampler_run = out / "sampler"
        say(f"[1/6] pretraining the semantic sampler ({method}, {limit:,} images, {epochs} epochs)")
        train(TrainConfig(out=str(sampler_run), method=method, positives="augment", source="fashion-mnist",
                          root=root, limit=limit, **common), resume=True)
        encoder = f"ssl:{sampler_run / 'last.pt'}"
    else:
        say("[1/6] the semantic sampler: raw pixels at 32 px, PCA-whitened (nothing to train)")
        encoder = "pixels:32"

    say(f"[2/6] mining pairs with the sampler (--encoder {encoder}, --category none)")
    recipe = resolve_recipe("fashion-mnist", {
        "root": root, "limit": limit, "encoder": encoder, "image_size": None,
        "category": "none", "min_similarity": "q0", "max_per_anchor": 1,
        "k": 8, "name": f"fashion-mnist-sepp-{sampler}"})
    pairs = out / f"pairs-{sampler}"
    build(pairs, recipe)

    results: dict[str, Any] = {}
    modes = ("augment", "both")
    took = None
    for n, positives in enumerate(modes):
        run = out / f"{method}-{positives}-{sampler}"
        started = time.monotonic()
        left = f", about {math.ceil(took * (len(modes) - n) / 60)} min left" if took else ""
        say(f"[{3 + 2 * n}/6] run {n + 1} of {len(modes)}{left}: training {method} with --positives {positives} "
            "on the sampler's pairs")
        train(TrainConfig(out=str(run), method=method, positives=positives, pairs=str(pairs / "release"),
                          **common), resume=True)
        say(f"[{4 + 2 * n}/6] run {n + 1} of {len(modes)}: evaluating {run.name}")
        results[positives] = evaluate(run, "fashion-mnist", root, limit=limit)
        took = time.monotonic() - started
        history = (run / "metrics.jsonl").read_text().splitlines()
        results[positives]["partner_weight"] = json.loads(history[-1]).get("partner_weight") if history else None
    return {"results": results, "precision": read_json(pairs / layout.METRICS)["precision"], "sampler": sampler,
            "build": pairs}


def results_table(summary: dict[str, Any], method: str) -> Table:
    table = Table(title=f"SePP-ID loop on Fashion-MNIST: {DEMO_BACKBONE} trained on the {summary['sampler']} "
                        "sampler's pairs")
    for column in ("run", "pair precision", "partner weight", "kNN top-1", "linear top-1"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    for positives, result in summary["results"].items():
        weight = result.get("partner_weight")
        table.add_row(f"{method}/{positives}", f"{summary['precision']:.4f}",
                      "-" if weight is None else f"{weight:.3f}",
                      f"{result['knn_top1']:.4f}", f"{result['linear_top1']:.4f}")
    first = next(iter(summary["results"].values()))
    table.add_row("raw pixels (ref.)", "-", "-", f"{first['pixel_knn_top1']:.4f}", f"{first['pixel_linear_top1']:.4f}")
    return table
