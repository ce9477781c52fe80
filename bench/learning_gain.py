"""Does training on semantic pairs beat the matched augmentation-only baseline, and does it never hurt?

    python bench/learning_gain.py --quick                        # CPU: Fashion-MNIST label pairs, SimCLR and MoCo
    python bench/learning_gain.py --quick --dataset glyphs       # CPU: the generated glyph set (bench/glyphs.py)
    python bench/learning_gain.py --quick --noise                # CPU: label pairs mixed with random pairs
    python bench/learning_gain.py --full                         # a GPU: all 60,000 training images, the whole loop

Quick: one label-pair release is built from the first 4,000 Fashion-MNIST
training images (the arXiv 2510.08722 setting: same classes, same pairs), or
from the 10,400 training pictures of the glyph set (26 letters, capital and
small, in about a hundred font faces: same-class pictures differ in ways no
crop or colour jitter makes); every run trains on those pairs for the same
epochs (batch 128): ``augment`` sees only the anchors (aug(a), aug'(a)),
``semantic`` the pair (aug(a), aug(b)), ``both`` all three views.
``--sampler`` adds the SePP-ID loop: a single-image SimCLR model mines pairs
with ``--category none`` and ``both`` trains on them; ``--pixel-sampler`` adds
the pairs raw pixels mine (``--encoder pixels:32``, ``--category none``), the
sampler ``make demo`` uses.

Every run trains with the trainer's defaults (SimCLR with its support set of
partner projections, MoCo without) unless ``--support`` or ``--positive-loss``
say otherwise.

Noise (``--noise``): the label release's partners are replaced, for a share
of its pairs drawn at random, by random images, so that the release's label
precision is about 0.1, 0.25, 0.5, 0.75 and 1.0 (0.1 is random pairs of ten
balanced classes). A replaced pair carries its own similarity (the build's
whitened embeddings of its two pictures), as a mined wrong pair would
(``--noise-similarity kept``: the replaced pair's, as before). ``augment``
(which never sees a partner) runs once per seed; ``both`` runs on every mix
with each ``--partner-weights`` value (``auto``: the trainer's default, the
precision above chance; ``1``: every partner counts fully, as before
weighting) and, for ``auto``, each ``--partner-trusts`` mode (``release``: one
weight for all pairs; ``similarity``: each pair by its similarity band's
precision). Ends with one JSON line holding ``noise``: ``{precision, weight,
trust, gain_knn, std_knn, gain_linear, std_linear}`` per mix, weight and mode,
where gain is ``both`` minus ``augment`` (mean over seeds) and std the
standard deviation over seeds of that difference, beside ``augment``'s own
standard deviations.

Full: the SePP-ID loop (arXiv 2306.16122) on all 60,000 training images with
resnet18 at 32 px: a sampler pretrained with SimCLR on single images (also the
single-image baseline), pairs mined with it (``--category none``) and with the
labels, then ``augment``, ``semantic`` and ``both`` for SimCLR and MoCo-v2 on
each pair set, 3 seeds, 100 epochs each.

Evaluation: weighted kNN (k=200, T=0.1) and a linear probe on the test split
(5,000 + 5,000 Fashion-MNIST images in quick mode, all of it in full mode, the
whole glyph set), beside the raw-pixel kNN and 1-NN of the same split. Prints
a table of mean +- std over seeds, the wall time, and a final JSON line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spp_curate.config import resolve_recipe
from spp_curate.stages import build, run_stage
from spp_curate.train.evaluate import evaluate
from spp_curate.train.loop import TrainConfig, parse_support, train
from spp_curate.train.trust import check_partner_trust, parse_partner_weight, release_trust

from _common import DEBIAN, SUBSET, mode_parser
from glyphs import generate as generate_glyphs

NOISE_PRECISIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


class Dataset:
    """Where a dataset's pictures are, how a build and an evaluation read them."""

    def __init__(self, name: str, root: str, limit: int | None, eval_limit: int | None) -> None:
        self.name, self.root, self.limit, self.eval_limit = name, root, limit, eval_limit
        if name == "glyphs":
            self.source, self.train_root, self.test_root = "imagefolder", f"{root}/train", f"{root}/test"
        else:
            self.source, self.train_root, self.test_root = "fashion-mnist", root, None

    def evaluate(self, run: Path) -> dict:
        return evaluate(run, self.source, self.train_root, test_root=self.test_root, limit=self.eval_limit)

    def pair_release(self, work: Path, name: str, encoder: str, category: str) -> Path:
        recipe = resolve_recipe(self.source, {"root": self.train_root, "limit": self.limit, "encoder": encoder,
                                              "image_size": 32, "category": category, "min_similarity": 0.0,
                                              "dup_threshold": 0.9999, "max_per_anchor": 1, "k": 8})
        build(work / name, recipe)
        return work / name


def noisy_build(base: Path, out: Path, precision: float, seed: int = 0,
                real_similarity: bool = True) -> tuple[Path, float]:
    """A copy of the label-pair build ``base`` whose partners are random images for a share of its pairs,
    drawn so that the label precision is about ``precision``; report and export run again on it. With
    ``real_similarity`` a replaced pair's similarity is its own (the build's whitened embeddings), else the
    replaced pair's. Returns the release and its label precision."""
    from spp_curate import layout
    from spp_curate.config import load_recipe
    from spp_curate.pairing.whiten import Whitening

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("release", ".release.partial", ".lock",
                                                             "released-index.parquet"))
    index = pq.read_table(out / "index.parquet", columns=["id", "label"]).to_pandas()
    pairs = pq.read_table(out / "pairs.parquet")
    table = pairs.to_pandas()
    shares = index.label.value_counts(normalize=True).to_numpy()
    chance = float((shares ** 2).sum())
    share = min(1.0, max(0.0, (1.0 - precision) / (1.0 - chance)))
    rng = np.random.default_rng(seed + int(precision * 1000))
    swap = rng.random(len(table)) < share
    ids = index.id.to_numpy()
    new = rng.choice(ids, size=int(swap.sum()))
    clash = new == table.anchor_id.to_numpy()[swap]
    while clash.any():
        new[clash] = rng.choice(ids, size=int(clash.sum()))
        clash = new == table.anchor_id.to_numpy()[swap]
    table.loc[swap, "positive_id"] = new
    table.loc[swap, "positive_label"] = index.set_index("id").label.loc[new].to_numpy()
    table.loc[swap, "mutual"] = False
    if real_similarity and swap.any():
        vecs, emb_ids = layout.load_embeddings(out)
        white = Whitening.load(out / layout.WHITENING).apply(vecs)
        row = {int(i): r for r, i in enumerate(emb_ids)}
        a = np.asarray([row[int(i)] for i in table.anchor_id.to_numpy()[swap]])
        b = np.asarray([row[int(i)] for i in new])
        table.loc[swap, "similarity"] = np.sum(white[a] * white[b], axis=1).astype(table.similarity.dtype)
    pq.write_table(pa.Table.from_pandas(table, schema=pairs.schema, preserve_index=False), out / "pairs.parquet")
    recipe = load_recipe(out)
    for stage in ("report", "export"):
        run_stage(out, recipe, stage, force=True)
    return out / "release", float((table.label == table.positive_label).mean())


def run_dir(work: Path, label: str, method: str, positives: str, weight: str, trust: str, seed: int) -> Path:
    """Where one run of the study trains (the single-image run of seed 0 is the SePP-ID loop's sampler)."""
    return work / "runs" / f"{label}-{method}-{positives}-{weight}-{trust}-{seed}".replace(" ", "_")


def weights_used(release: Path, weight: str, trust: str) -> tuple:
    """What the trainer would weight the partners of ``release`` by: runs that would train alike run once."""
    from spp_curate.train.cache import ReleaseReader

    t = release_trust(str(release), parse_partner_weight(weight), trust)
    per_pair = t.pair_weights(ReleaseReader(Path(release)).similarity)
    if per_pair is None or np.ptp(per_pair) < 1e-6:  # one weight for every pair, however it was reached
        return (round(float(t.weight if per_pair is None else per_pair[0]), 6),)
    return tuple(np.round(per_pair, 6))


def gains(rows: dict, precision_of: dict) -> list[dict]:
    """Every run with partners against the ``augment`` of its pairs and method, seed by seed."""
    out = []
    for (label, method, positives, weight), r in rows.items():
        base = rows.get((label, method, "augment", "auto"))
        if positives == "augment" or base is None:
            continue
        d = {k: 100 * (r[k] - base[k]) for k in ("knn", "linear")}
        out.append({"pairs": label, "precision": precision_of.get(label), "method": method, "positives": positives,
                    "partner_weight": weight, "gain_knn": round(float(d["knn"].mean()), 2),
                    "std_knn": round(float(d["knn"].std()), 2), "gain_linear": round(float(d["linear"].mean()), 2),
                    "std_linear": round(float(d["linear"].std()), 2),
                    "per_seed_knn": [round(float(x), 2) for x in d["knn"]],
                    "per_seed_linear": [round(float(x), 2) for x in d["linear"]]})
    return out


def main() -> None:
    parser = mode_parser(__doc__)
    parser.add_argument("--dataset", choices=("fashion-mnist", "glyphs"), default="fashion-mnist")
    parser.add_argument("--glyphs", type=Path, help="the glyph set's folder (made there when absent) "
                        "[default: a temporary one]")
    parser.add_argument("--noise", action="store_true", help="the precision sweep: label pairs mixed with random ones")
    parser.add_argument("--sampler", action="store_true", help="also the SePP-ID loop's own pairs (quick mode)")
    parser.add_argument("--pixel-sampler", action="store_true",
                        help="also the pairs raw pixels mine, --encoder pixels:32 (quick mode)")
    parser.add_argument("--epochs", type=int, default=None, help="[quick 3, full 100]")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--backbone", default=None, help="[quick: the trainer's default, small-cnn-grid; full "
                        "resnet18]")
    parser.add_argument("--batch-size", type=int, default=None, help="[quick 128, full 512]")
    parser.add_argument("--methods", default=None, help="[simclr,moco; with --noise simclr]")
    parser.add_argument("--positives", default="augment,semantic,both")
    parser.add_argument("--partner-weights", default="auto",
                        help="comma-separated --partner-weight values for the runs that use partners")
    parser.add_argument("--partner-trusts", default="release",
                        help="comma-separated --partner-trust modes for the runs at --partner-weight auto")
    parser.add_argument("--noise-similarity", choices=("real", "kept"), default="real",
                        help="a replaced pair's similarity: its own, or the replaced pair's")
    parser.add_argument("--support", default="auto", help="train --support for every run [auto: the method's]")
    parser.add_argument("--positive-loss", default="out", help="train --positive-loss for every run [out]")
    parser.add_argument("--no-label-runs", action="store_true",
                        help="train on the sampler's pairs only (the label build is still made)")
    parser.add_argument("--precisions", default=",".join(map(str, NOISE_PRECISIONS)))
    args = parser.parse_args()
    full = args.full
    epochs = args.epochs or (100 if full else 3)
    batch = args.batch_size or (512 if full else 128)
    methods = (args.methods or ("simclr" if args.noise else "simclr,moco")).split(",")
    weights = [w.strip() for w in args.partner_weights.split(",")]
    for w in weights:
        parse_partner_weight(w)
    trusts = [t.strip() for t in args.partner_trusts.split(",")]
    for t in trusts:
        check_partner_trust(t)
    # the runs that use partners: (--partner-weight, --partner-trust); the trust mode matters at auto only
    settings = [(w, t) for w in weights for t in (trusts if w == "auto" else ["release"])]
    common = dict(backbone=args.backbone or ("resnet18" if full else TrainConfig.backbone), batch_size=batch,
                  epochs=epochs,
                  support=parse_support(args.support), positive_loss=args.positive_loss)
    work = Path(tempfile.mkdtemp(prefix="spp-bench-gain-"))
    if args.dataset == "glyphs":
        glyphs = args.glyphs or work / "glyphs"
        if not (glyphs / "glyphs.json").is_file():  # a set made before (any size) is used as it is
            generate_glyphs(glyphs)
        data = Dataset("glyphs", str(glyphs), None, None)
    else:
        root = str(args.root or (DEBIAN if DEBIAN.exists() else SUBSET))
        data = Dataset("fashion-mnist", root, None if full else 4000, None if full else 5000)
    started = time.perf_counter()
    rows: dict[tuple[str, str, str, str], dict] = {}
    pixel = None

    def runs(label: str, method: str, positives: str, weight: str = "auto", trust: str = "release",
             **where) -> dict:
        nonlocal pixel
        knn, lin = [], []
        for seed in range(args.seeds):
            run = run_dir(work, label, method, positives, weight, trust, seed)
            train(TrainConfig(out=str(run), method=method, positives=positives, seed=seed,
                              partner_weight=parse_partner_weight(weight) if positives != "augment" else None,
                              partner_trust=trust, **common, **where))
            result = data.evaluate(run)
            knn.append(result["knn_top1"])
            lin.append(result["linear_top1"])
            pixel = result["pixel_knn_top1"], result["pixel_1nn_top1"], result["pixel_linear_top1"]
        row = {"knn": np.array(knn), "linear": np.array(lin)}
        shown = weight if trust == "release" else f"{weight}, {trust}"
        rows[(label, method, positives, shown)] = row
        print(f"{label} {method} {positives} (partner weight {shown}): kNN {np.mean(knn):.4f} +- {np.std(knn):.4f}, "
              f"linear {np.mean(lin):.4f} +- {np.std(lin):.4f}; per seed kNN {[round(x, 4) for x in knn]}, "
              f"linear {[round(x, 4) for x in lin]}", flush=True)
        return row

    try:
        builds, precision_of = {}, {}
        if full:
            runs("single images", "simclr", "augment", source=data.source, root=data.train_root)
            sampler = run_dir(work, "single images", "simclr", "augment", "auto", "release", 0) / "last.pt"
            builds["sampler pairs"] = data.pair_release(work, "pairs-none", f"ssl:{sampler}", "none")
            builds["label pairs"] = data.pair_release(work, "pairs-label", f"ssl:{sampler}", "label")
        else:
            builds["label pairs"] = data.pair_release(work, "pairs-label", "openclip:ViT-S-32", "label")
            if args.sampler:
                runs("single images", "simclr", "augment", source=data.source, root=data.train_root,
                     limit=data.limit)
                sampler = run_dir(work, "single images", "simclr", "augment", "auto", "release", 0) / "last.pt"
                builds["sampler pairs"] = data.pair_release(work, "pairs-none", f"ssl:{sampler}", "none")
            if args.pixel_sampler:
                builds["pixel pairs"] = data.pair_release(work, "pairs-pixels", "pixels:32", "none")
        for label, b in builds.items():
            precision_of[label] = json.loads((b / "report" / "metrics.json").read_text()).get("precision")
        noise = []
        if args.noise:
            base = builds["label pairs"]
            for method in methods:
                augment = runs("label pairs", method, "augment", pairs=str(base / "release"))
                for target in (float(x) for x in args.precisions.split(",")):
                    release, measured = noisy_build(base, work / f"noise-{target}", target,
                                                    real_similarity=args.noise_similarity == "real")
                    label = f"precision {measured:.3f}"
                    precision_of[label] = measured
                    done = {}  # the weights the runs would use -> its entry: such runs are run once
                    for weight, trust in settings:
                        value = weights_used(release, weight, trust)
                        if value in done:
                            noise.append({**done[value], "partner_weight": weight, "trust": trust,
                                          "same_run_as": [done[value]["partner_weight"], done[value]["trust"]]})
                            print(json.dumps(noise[-1]), flush=True)
                            continue
                        both = runs(label, method, "both", weight, trust, pairs=str(release))
                        gain = {k: both[k] - augment[k] for k in ("knn", "linear")}
                        noise.append({"target": target, "precision": round(measured, 4), "method": method,
                                      "partner_weight": weight, "trust": trust,
                                      "gain_knn": round(100 * float(gain["knn"].mean()), 2),
                                      "std_knn": round(100 * float(gain["knn"].std()), 2),
                                      "gain_linear": round(100 * float(gain["linear"].mean()), 2),
                                      "std_linear": round(100 * float(gain["linear"].std()), 2),
                                      "augment_std_knn": round(100 * float(augment["knn"].std()), 2),
                                      "augment_std_linear": round(100 * float(augment["linear"].std()), 2)})
                        done[value] = noise[-1]
                        print(json.dumps(noise[-1]), flush=True)
        else:
            for label, b in builds.items():
                if args.no_label_runs and label == "label pairs" and len(builds) > 1:
                    continue
                # the settings that differ on this release (on label pairs ``auto`` is 1: run it once)
                resolved = {}
                for w, t in settings:
                    resolved.setdefault(weights_used(b / "release", w, t), (w, t))
                for method in methods:
                    for positives in args.positives.split(","):
                        for weight, trust in ([("auto", "release")] if positives == "augment" else resolved.values()):
                            runs(label, method, positives, weight, trust, pairs=str(b / "release"))
        wall = time.perf_counter() - started
        print(f"\n{data.name}: {len(pq.read_table(builds['label pairs'] / 'pairs.parquet', columns=['pair_id'])):,} "
              f"label pairs, {epochs} epochs, batch {batch}, {common['backbone']}, {args.seeds} seeds, "
              f"wall time {wall / 60:.1f} min")
        print("| pairs | pair precision | method | positives | partner weight | kNN top-1 | linear top-1 |\n"
              "|---|---|---|---|---|---|---|")
        for (label, method, positives, weight), r in rows.items():
            prec = precision_of.get(label)
            print(f"| {label} | {'-' if prec is None else f'{prec:.3f}'} | {method} | {positives} | "
                  f"{weight if positives != 'augment' else '-'} | {r['knn'].mean():.4f} ± {r['knn'].std():.4f} | "
                  f"{r['linear'].mean():.4f} ± {r['linear'].std():.4f} |")
        print(f"| raw pixels (same split, reference) | - | - | - | - | {pixel[0]:.4f} (1-NN {pixel[1]:.4f}) | "
              f"{pixel[2]:.4f} |")
        summary = {"dataset": data.name, "epochs": epochs, "seeds": args.seeds, "support": args.support,
                   "positive_loss": args.positive_loss, "pixel_knn_top1": round(float(pixel[0]), 4),
                   "pixel_linear_top1": round(float(pixel[2]), 4), "wall_min": round(wall / 60, 1)}
        if args.noise:
            summary["noise"] = noise
        else:
            summary["gains"] = gains(rows, precision_of)
            # the headline: the first method's `both` against its `augment`, on label pairs where they ran,
            # else on the first pairs that have both runs
            for label in [*builds, "single images"]:
                base = rows.get((label, methods[0], "augment", "auto"))
                best = rows.get((label, methods[0], "both", weights[0]))
                if base is not None and best is not None:
                    break
            else:
                label, base = "single images", next(iter(rows.values()))
                best = base
            diff_knn, diff_lin = best["knn"] - base["knn"], best["linear"] - base["linear"]
            summary.update({"figure": round(float(best["knn"].mean()), 4), "unit": "kNN top-1",
                            "baseline": f"{methods[0]}-augment, {label}",
                            "gain_points": round(100 * float(diff_knn.mean()), 2),
                            "gain_linear_points": round(100 * float(diff_lin.mean()), 2),
                            "gain_std_points": round(100 * float(diff_knn.std()), 2),
                            "gain_linear_std_points": round(100 * float(diff_lin.std()), 2),
                            "baseline_std_points": round(100 * float(base["knn"].std()), 2),
                            "baseline_std_linear_points": round(100 * float(base["linear"].std()), 2)})
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
