"""Which levers make semantic positives pay: each against the plain ``both`` run and the matched ``augment``.

    python bench/levers.py --quick                                   # Fashion-MNIST label pairs
    python bench/levers.py --quick --dataset glyphs --glyphs DIR     # the glyph set (bench/glyphs.py)
    python bench/levers.py --quick --levers l_in,nnclr --seeds 3     # some of them

One label-pair release is built as ``bench/learning_gain.py --quick`` builds
it (Fashion-MNIST: the first 4,000 training images; glyphs: the whole training
set), and SimCLR trains on it for every lever over the same seeds. Each lever
changes one thing of the plain ``both`` run (aug(a), aug'(a), aug(b) all
positives of each other, the partner masked out of the negatives, no support
set: ``--support 0``, which is how these levers were measured; SimCLR's default
is now the ``nnclr`` lever's support set):

* ``l_in``: SupCon's L_in, ``-log mean_p p(p)``, where ``both`` uses L_out,
  ``-mean_p log p(p)`` (Khosla et al. 2020, eq. 2 and 3): ``train
  --positive-loss in``.
* ``nnclr``: a support set of past partner embeddings (NNCLR, Dwibedi et al.
  2021): each view's nearest entry in a queue of the last 2,048 partner
  projections is one more positive of it: ``train --support 2048``.
* ``mask_neighbours``: the partner's and the anchor's own neighbours (their 8
  nearest in the build's whitened embeddings, the sampler that mined the
  pairs) are taken out of the negatives too, not only the partner.
* ``warmup``: the first epoch trains as ``augment`` does (the partner terms at
  weight 0, the partner views still in the batch), then partners count.
* ``gathered``: each batch holds the anchors of a few categories (4 on
  Fashion-MNIST, 8 on glyphs), where the plain run's batches are a random
  draw, so pairs of a category are spread over every batch.
* ``t01``: the temperature 0.1 instead of 0.2.
* ``l_in_nnclr``: ``l_in`` and ``nnclr`` together.

``gathered`` and ``t01`` change ``augment`` too, so each runs its own matched
``augment``; the others compare with the plain ``augment``. The gain of a run
is its kNN / linear top-1 minus its matched ``augment``'s on the same seed;
the table gives its mean and the standard deviation over seeds, and the
change against the plain ``both`` (the lever's own effect). Ends with one JSON
line holding ``levers``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from spp_curate import layout
from spp_curate.train import data as train_data
from spp_curate.train.losses import multi_positive_info_nce, partner_weights, view_masks
from spp_curate.train.loop import TrainConfig, train
from spp_curate.train.methods.simclr import SimCLR

from _common import DEBIAN, SUBSET, mode_parser
from glyphs import generate as generate_glyphs
from learning_gain import Dataset

LEVERS = ("l_in", "nnclr", "mask_neighbours", "warmup", "gathered", "t01", "l_in_nnclr")
#: Levers the trainer has as options (``spp-curate train``); the others are probes defined here.
TRAINER_OPTIONS = {"l_in": {"positive_loss": "in"}, "nnclr": {"support": 2048},
                   "l_in_nnclr": {"positive_loss": "in", "support": 2048}}
#: Levers whose change applies to ``augment`` as well: each has its own matched ``augment``.
CHANGES_AUGMENT = ("gathered", "t01")


class SimCLRMaskNeighbours(SimCLR):
    """The anchor's and the partner's sampler neighbours are neither positives nor negatives."""

    name = "simclr-lever-mask_neighbours"
    ids: torch.Tensor | None = None  # (M,) sorted image ids
    neighbours: torch.Tensor | None = None  # (M, k) positions in ``ids`` (-1: none)

    def _related(self, image: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        ids, nbrs = self.ids.to(image.device), self.neighbours.to(image.device)

        def position(values):
            pos = torch.searchsorted(ids, values).clamp_max(len(ids) - 1)
            return torch.where(ids[pos] == values, pos, torch.full_like(pos, -1))

        pos_img, pos_partner = position(image), position(partner)
        near = torch.cat([torch.where(pos_img[:, None] >= 0, nbrs[pos_img.clamp_min(0)], -1),
                          torch.where(pos_partner[:, None] >= 0, nbrs[pos_partner.clamp_min(0)], -1)], dim=1)
        return ((near[:, :, None] == pos_img[None, None, :]) & (pos_img[None, None, :] >= 0)).any(dim=1)

    def loss(self, views):
        x, group, image, partner = views.stacked()
        z = torch.nn.functional.normalize(self.projector(self.backbone(x)), dim=1)
        positives, excluded = view_masks(group, image, partner, self.use_partner)
        if self.use_partner:
            excluded |= self._related(image, partner) & ~positives
        weights = None if views.weights is None or not self.use_partner else \
            partner_weights(image, views.weights.to(z.device)[group])
        return multi_positive_info_nce(z @ z.T / self.temperature, positives, excluded, weights)


class SimCLRWarmup(SimCLR):
    """The partner terms at weight 0 until ``warm`` of training has passed."""

    name = "simclr-lever-warmup"
    warm = 1 / 3

    def __init__(self, backbone, feat_dim, use_partner, **options):
        super().__init__(backbone, feat_dim, use_partner, **options)
        self._progress = 0.0

    def after_step(self, progress: float) -> None:
        super().after_step(progress)
        self._progress = progress

    def loss(self, views):
        if self.use_partner and self._progress < self.warm:
            views.weights = torch.zeros(views.batch, device=views.tensors[0].device)
        return super().loss(views)


class SimCLRT01(SimCLR):
    name = "simclr-lever-t01"
    temperature = 0.1


def neighbour_table(build: Path, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted trainer image ids of the build's pictures and each one's ``k`` nearest (positions in those ids),
    from the build's whitened embeddings: the sampler that mined its pairs."""
    import faiss

    from spp_curate.pairing.whiten import Whitening

    vecs, emb_ids = layout.load_embeddings(build)
    vecs = Whitening.load(build / layout.WHITENING).apply(vecs)
    keys = np.asarray(pq.read_table(build / layout.INDEX, columns=["id", "key"]).to_pandas()
                      .set_index("id").key.loc[emb_ids])
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    _, near = index.search(vecs, k + 1)
    hashed = np.asarray([train_data.image_id(str(key)) for key in keys], dtype=np.int64)
    order = np.argsort(hashed)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    near = np.where(near >= 0, rank[np.maximum(near, 0)], -1)[:, 1:]  # drop the picture itself
    return torch.from_numpy(hashed[order]), torch.from_numpy(near[order])


@contextlib.contextmanager
def gathered_batches(label_of_key: dict[str, int], per_batch: int):
    """Within the block, an epoch's batches each hold the anchors of ``per_batch`` categories."""
    original = train_data.TrainData.batches

    def batches(self, batch_size, seed, epoch):
        order = torch.cat(original(self, batch_size, seed, epoch))  # the seeded draw of one row per anchor
        labels = np.asarray([label_of_key[self.cache.keys[a]] for a in self.rows[order.numpy(), 0]])
        rng = np.random.default_rng([seed, epoch, 7])
        chunk = max(1, batch_size // per_batch)
        chunks = []
        for c in np.unique(labels):
            rows = order[torch.from_numpy(np.flatnonzero(labels == c))]
            chunks.extend(rows.split(chunk))
        rng.shuffle(chunks)
        out = [torch.cat(chunks[i: i + per_batch]) for i in range(0, len(chunks), per_batch)]
        return [b for b in out if len(b) >= 2]

    train_data.TrainData.batches = batches
    try:
        yield
    finally:
        train_data.TrainData.batches = original


def main() -> None:
    parser = mode_parser(__doc__)
    parser.add_argument("--dataset", choices=("fashion-mnist", "glyphs"), default="fashion-mnist")
    parser.add_argument("--glyphs", type=Path, help="the glyph set's folder (made there when absent)")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="[fashion-mnist 3, glyphs 6]")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    levers = [x for x in args.levers.split(",") if x]
    for lever in levers:
        if lever not in LEVERS:
            parser.error(f"--levers: got {lever!r}; accepted: {', '.join(LEVERS)}")
    work = Path(tempfile.mkdtemp(prefix="spp-bench-levers-"))
    if args.dataset == "glyphs":
        glyphs = args.glyphs or work / "glyphs"
        if not (glyphs / "glyphs.json").is_file():
            generate_glyphs(glyphs, per_class=200, test_per_class=100)
        data = Dataset("glyphs", str(glyphs), None, None)
        epochs, per_batch = args.epochs or 6, 8
    else:
        root = str(args.root or (DEBIAN if DEBIAN.exists() else SUBSET))
        data = Dataset("fashion-mnist", root, 4000, 5000)
        epochs, per_batch = args.epochs or 3, 4
    started = time.perf_counter()
    try:
        build = data.pair_release(work, "pairs-label", "openclip:ViT-S-32", "label")
        release = str(build / "release")
        precision = json.loads((build / "report" / "metrics.json").read_text()).get("precision")
        rel = pq.read_table(build / "release" / "data", columns=["anchor_key", "positive_key", "label"]).to_pandas()
        label_of_key = {**dict(zip(rel.positive_key, rel.label)), **dict(zip(rel.anchor_key, rel.label))}
        if "mask_neighbours" in levers:
            SimCLRMaskNeighbours.ids, SimCLRMaskNeighbours.neighbours = neighbour_table(build)
        SimCLRWarmup.warm = 1 / epochs
        results: dict[str, dict[str, np.ndarray]] = {}
        pixel = None

        def runs(name: str, method: str, positives: str, context=contextlib.nullcontext, **options) -> None:
            nonlocal pixel
            knn, lin = [], []
            options = {"support": 0, **options}  # the plain run has no support set; ``nnclr`` adds one
            for seed in range(args.seeds):
                run = work / "runs" / f"{name}-{seed}"
                with context():
                    train(TrainConfig(out=str(run), method=method, positives=positives, seed=seed, pairs=release,
                                      backbone="small-cnn", batch_size=args.batch_size, epochs=epochs,
                                      **options))
                result = data.evaluate(run)
                knn.append(result["knn_top1"])
                lin.append(result["linear_top1"])
                pixel = result["pixel_knn_top1"], result["pixel_linear_top1"]
                shutil.rmtree(run, ignore_errors=True)
            results[name] = {"knn": np.array(knn), "linear": np.array(lin)}
            print(f"{name}: kNN {[round(v, 4) for v in knn]}, linear {[round(v, 4) for v in lin]} "
                  f"({(time.perf_counter() - started) / 60:.1f} min)", flush=True)

        runs("augment", "simclr", "augment")
        runs("both", "simclr", "both")
        for lever in levers:
            context = (lambda: gathered_batches(label_of_key, per_batch)) if lever == "gathered" \
                else contextlib.nullcontext
            options = TRAINER_OPTIONS.get(lever)
            method = "simclr" if lever == "gathered" or options is not None else f"simclr-lever-{lever}"
            if lever in CHANGES_AUGMENT:
                runs(f"augment+{lever}", method, "augment", context)
            runs(f"both+{lever}", method, "both", context, **(options or {}))
        wall = (time.perf_counter() - started) / 60

        def diff(a: str, b: str, metric: str) -> tuple[float, float]:
            d = 100 * (results[a][metric] - results[b][metric])
            return round(float(d.mean()), 2), round(float(d.std()), 2)

        print(f"\n{data.name}: label pairs (precision {precision:.3f}), SimCLR, small CNN, {epochs} epochs, batch "
              f"{args.batch_size}, {args.seeds} seeds, {wall:.1f} min")
        print("| run | kNN top-1 | linear top-1 | gain over its `augment`, kNN | linear | against plain `both`, kNN "
              "| linear |\n|---|---|---|---|---|---|---|")
        summary = []
        for name, r in results.items():
            lever = name.split("+", 1)[1] if "+" in name else None
            base = f"augment+{lever}" if lever in CHANGES_AUGMENT else "augment"
            row = {"run": name, "knn": round(float(r["knn"].mean()), 4), "knn_std": round(float(r["knn"].std()), 4),
                   "linear": round(float(r["linear"].mean()), 4),
                   "linear_std": round(float(r["linear"].std()), 4)}
            cells = ["", "", "", ""]
            if name.startswith("both"):
                (gk, sk), (gl, sl) = diff(name, base, "knn"), diff(name, base, "linear")
                row.update(gain_knn=gk, std_knn=sk, gain_linear=gl, std_linear=sl)
                cells[:2] = [f"{gk:+.2f} ± {sk:.2f}", f"{gl:+.2f} ± {sl:.2f}"]
                if lever:
                    (ek, esk), (el, esl) = diff(name, "both", "knn"), diff(name, "both", "linear")
                    row.update(vs_both_knn=ek, vs_both_knn_std=esk, vs_both_linear=el, vs_both_linear_std=esl)
                    cells[2:] = [f"{ek:+.2f} ± {esk:.2f}", f"{el:+.2f} ± {esl:.2f}"]
            summary.append(row)
            print(f"| {name} | {row['knn']:.4f} ± {row['knn_std']:.4f} | {row['linear']:.4f} ± "
                  f"{row['linear_std']:.4f} | {' | '.join(cells)} |")
        print(f"| raw pixels (same split) | {pixel[0]:.4f} | {pixel[1]:.4f} | | | | |")
        print(json.dumps({"dataset": data.name, "epochs": epochs, "seeds": args.seeds, "wall_min": round(wall, 1),
                          "pixel_knn_top1": round(float(pixel[0]), 4), "levers": summary}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
