"""Does training on semantic pairs beat the matched augmentation-only baseline? The SePP-ID loop on Fashion-MNIST.

    python bench/learning_gain.py --quick     # CPU, minutes: label pairs of 4,000 images, small-cnn, SimCLR and MoCo
    python bench/learning_gain.py --full      # a GPU: all 60,000 training images, resnet18, the whole loop

Quick: one label-pair release is built from the first 4,000 training images
(the arXiv 2510.08722 setting: same classes, same pairs); every run trains on
those pairs for the same epochs (batch 128: 26 steps an epoch): ``augment`` sees only
the anchors (aug(a), aug'(a)), ``semantic`` the pair (aug(a), aug(b)), ``both`` all
three views.

Full: the SePP-ID loop (arXiv 2306.16122) on all 60,000 training images with
resnet18 at 32 px: a sampler pretrained with SimCLR on single images (also the
single-image baseline), pairs mined with it (``--category none``) and with the
labels, then ``augment``, ``semantic`` and ``both`` for SimCLR and MoCo-v2 on
each pair set, 3 seeds, 100 epochs each.

Evaluation: weighted kNN (k=200, T=0.1) and a linear probe on the test split
(all of it in full mode), beside the raw-pixel kNN and 1-NN of the same split.
Prints a table of mean +- std over seeds, the wall time, and a final JSON line
with SimCLR ``both`` against ``augment`` on label pairs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from spp_curate.config import resolve_recipe
from spp_curate.stages import build
from spp_curate.train.evaluate import evaluate
from spp_curate.train.loop import TrainConfig, train

from _common import DEBIAN, SUBSET, mode_parser


def pair_release(work: Path, name: str, root: str, limit: int | None, encoder: str, category: str) -> str:
    recipe = resolve_recipe("fashion-mnist", {"root": root, "limit": limit, "encoder": encoder, "image_size": 32,
                                              "category": category, "min_similarity": 0.0, "dup_threshold": 0.9999,
                                              "max_per_anchor": 1, "k": 8})
    build(work / name, recipe)
    return str(work / name / "release")


def main() -> None:
    parser = mode_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=None, help="[quick 3, full 100]")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="[quick 128, full 512]")
    parser.add_argument("--methods", default="simclr,moco")
    parser.add_argument("--positives", default="augment,semantic,both")
    args = parser.parse_args()
    root = str(args.root or (DEBIAN if DEBIAN.exists() else SUBSET))
    full = args.full
    epochs = args.epochs or (100 if full else 3)
    limit, eval_limit = (None, None) if full else (4000, 5000)
    batch = args.batch_size or (512 if full else 128)
    common = dict(backbone="resnet18" if full else "small-cnn", batch_size=batch, epochs=epochs)
    work = Path(tempfile.mkdtemp(prefix="spp-bench-gain-"))
    started = time.perf_counter()
    rows: dict[tuple[str, str, str], tuple[float, float, float, float]] = {}
    pixel = None

    def runs(label: str, method: str, positives: str, **where) -> None:
        nonlocal pixel
        knn, lin = [], []
        for seed in range(args.seeds):
            run = work / f"{label}-{method}-{positives}-{seed}"
            train(TrainConfig(out=str(run), method=method, positives=positives, seed=seed, **common, **where))
            result = evaluate(run, "fashion-mnist", root, limit=eval_limit)
            knn.append(result["knn_top1"])
            lin.append(result["linear_top1"])
            pixel = result["pixel_knn_top1"], result["pixel_1nn_top1"]
        rows[(label, method, positives)] = (np.mean(knn), np.std(knn), np.mean(lin), np.std(lin))
        print(f"{label} {method} {positives}: kNN {np.mean(knn):.4f} +- {np.std(knn):.4f}, "
              f"linear {np.mean(lin):.4f} +- {np.std(lin):.4f}", flush=True)

    try:
        releases = {}
        if full:
            runs("single images", "simclr", "augment", source="fashion-mnist", root=root)
            sampler = work / "single images-simclr-augment-0" / "last.pt"
            releases["sampler pairs"] = pair_release(work, "pairs-none", root, None, f"ssl:{sampler}", "none")
            releases["label pairs"] = pair_release(work, "pairs-label", root, None, f"ssl:{sampler}", "label")
        else:
            releases["label pairs"] = pair_release(work, "pairs-label", root, limit, "openclip:ViT-S-32", "label")
        for label, release in releases.items():
            for method in args.methods.split(","):
                for positives in args.positives.split(","):
                    runs(label, method, positives, pairs=release)
        wall = time.perf_counter() - started
        scope = "60,000" if full else f"{limit:,}"
        print(f"\n{scope} images -> pairs, {epochs} epochs, batch {batch}, {common['backbone']}, {args.seeds} seeds, "
              f"wall time {wall / 60:.1f} min")
        print("| pairs | method | positives | kNN top-1 | linear top-1 |\n|---|---|---|---|---|")
        for (label, method, positives), (km, ks, lm, ls) in rows.items():
            print(f"| {label} | {method} | {positives} | {km:.4f} ± {ks:.4f} | {lm:.4f} ± {ls:.4f} |")
        print(f"| raw pixels (same split, reference) | - | - | {pixel[0]:.4f} (1-NN {pixel[1]:.4f}) | - |")
        base = rows.get(("label pairs", "simclr", "augment")) or next(iter(rows.values()))
        best = rows.get(("label pairs", "simclr", "both")) or base
        print(json.dumps({"figure": round(float(best[0]), 4), "unit": "kNN top-1",
                          "baseline": "simclr-augment, label pairs", "gain_points": round(100 * (best[0] - base[0]), 2),
                          "baseline_std_points": round(100 * float(base[1]), 2),
                          "pixel_knn_top1": round(float(pixel[0]), 4), "wall_min": round(wall / 60, 1)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
