"""Does training on semantic pairs beat the matched augmentation-only baseline? Fashion-MNIST, small-cnn.

    python bench/learning_gain.py --quick        # SimCLR and MoCo x augment/semantic/both x 3 seeds, CPU

One label-pair release is built from the Fashion-MNIST training split (the
arXiv 2510.08722 setting: same classes, same pairs). Every run trains on the
same pairs for the same epochs; ``augment`` sees only the anchors (aug(a),
aug'(a)), ``semantic`` the pair (aug(a), aug(b)), ``both`` all three views.
Evaluation: weighted kNN (k=200, T=0.1) and a linear probe on the test split.
Prints a table of mean +- std over seeds and a final JSON line with the ratio
of SimCLR ``both`` to ``augment`` kNN top-1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from spp_curate.config import resolve_recipe
from spp_curate.stages import build
from spp_curate.train.evaluate import evaluate
from spp_curate.train.loop import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CPU setting below (default)")
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX files [default: the Debian package's]")
    ap.add_argument("--pairs-limit", type=int, default=4000, help="images the pairs are mined from")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="simclr,moco")
    ap.add_argument("--backbone", default="small-cnn")
    ap.add_argument("--eval-limit", type=int, default=5000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spp-bench-gain-"))
    try:
        recipe = resolve_recipe("fashion-mnist", {"root": args.root, "limit": args.pairs_limit,
                                                  "encoder": "openclip:ViT-S-32", "image_size": 32,
                                                  "category": "label", "min_similarity": 0.0,
                                                  "dup_threshold": 0.9999, "max_per_anchor": 1, "workers": 0})
        build(work / "pairs", recipe)
        release = str(work / "pairs" / "release")
        rows = {}
        pixel = None
        for method in args.methods.split(","):
            for positives in ("augment", "semantic", "both"):
                knn, lin = [], []
                for seed in range(args.seeds):
                    run = work / f"{method}-{positives}-{seed}"
                    train(TrainConfig(out=str(run), method=method, positives=positives, pairs=release,
                                      backbone=args.backbone, epochs=args.epochs, seed=seed))
                    result = evaluate(run, "fashion-mnist", args.root, limit=args.eval_limit)
                    knn.append(result["knn_top1"])
                    pixel = result["pixel_knn_top1"], result["pixel_1nn_top1"]
                    lin.append(result["linear_top1"])
                rows[(method, positives)] = (np.mean(knn), np.std(knn), np.mean(lin), np.std(lin))
                print(f"{method} {positives}: kNN {np.mean(knn):.4f} +- {np.std(knn):.4f}, "
                      f"linear {np.mean(lin):.4f} +- {np.std(lin):.4f}", flush=True)
        print(f"\n{args.pairs_limit:,} images -> pairs, {args.epochs} epochs, {args.backbone}, {args.seeds} seeds")
        print("| method | positives | kNN top-1 | linear top-1 |\n|---|---|---|---|")
        for (method, positives), (km, ks, lm, ls) in rows.items():
            print(f"| {method} | {positives} | {km:.4f} ± {ks:.4f} | {lm:.4f} ± {ls:.4f} |")
        print(f"| raw pixels (same split, reference) | - | {pixel[0]:.4f} (1-NN {pixel[1]:.4f}) | - |")
        base = rows.get(("simclr", "augment")) or next(iter(rows.values()))
        best = rows.get(("simclr", "both")) or base
        print(json.dumps({"figure": round(float(best[0]), 4), "unit": "kNN top-1", "baseline": "simclr-augment",
                          "ratio": round(float(best[0] / base[0]), 4),
                          "pixel_knn_top1": round(float(pixel[0]), 4)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
