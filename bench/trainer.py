"""The trainer's rate against the previous data path and against the model alone, in one run.

    python bench/trainer.py --quick     # 2 CPU cores: the demo sampler (SimCLR, small-cnn, single images, batch 256)
    python bench/trainer.py --full      # a GPU: resnet18 at 32 px, batch 512, label pairs, augment and both

Three figures per setting, measured in the same process:

* ``previous``: the data path this project had before the picture cache: every sample decoded by Pillow
  and augmented picture by picture (torchvision v2) in DataLoader workers, a release streamed through
  ``datasets`` (which caps workers at its shard count), then the same training step;
* ``trainer``: ``spp-curate train`` as it is (decode once, augment in batches on the device), its second
  epoch's rate from the run's metrics;
* ``model alone``: the same training steps on random tensors already on the device: the ceiling.

Prints a table and ends with one JSON line (rates in pairs/s or images/s, the speed-up over ``previous``
and the share of the model-alone rate).
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import v2 as T

from spp_curate.checkpoint import MEAN, STD
from spp_curate.config import resolve_recipe
from spp_curate.curate.sources import open_source
from spp_curate.devices import auto_workers, default_device
from spp_curate.images import image_from_bytes, load_image
from spp_curate.stages import build
from spp_curate.train.data import image_id
from spp_curate.train.loop import TrainConfig, build_model, train, train_step
from spp_curate.train.methods import Views

from _common import DEBIAN, SUBSET, mode_parser


def previous_augment(size: int) -> T.Compose:
    return T.Compose([T.RGB(), T.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


class PreviousSingle(Dataset):
    def __init__(self, source, keys, size):
        self.source, self.keys, self.aug = source, keys, previous_augment(size)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        img, ia = load_image(self.source, self.keys[i]), image_id(self.keys[i])
        return (self.aug(img), self.aug(img)), (ia, ia), (-1, -1)


class PreviousPairs(IterableDataset):
    def __init__(self, release, positives, size):
        import datasets

        rows = datasets.load_dataset(release, split="train", streaming=True)
        for column in ("anchor", "positive"):
            rows = rows.cast_column(column, datasets.Image(decode=False))
        self.rows, self.positives, self.aug = rows, positives, previous_augment(size)

    def __iter__(self):
        for row in self.rows.shuffle(seed=0, buffer_size=4096):
            a, b = image_from_bytes(row["anchor"]["bytes"]), image_from_bytes(row["positive"]["bytes"])
            ia, ib = image_id(row["anchor_key"]), image_id(row["positive_key"])
            if self.positives == "augment":
                yield (self.aug(a), self.aug(a)), (ia, ia), (ib, ib)
            else:
                yield (self.aug(a), self.aug(a), self.aug(b)), (ia, ia, ib), (ib, ib, ia)


def collate(batch):
    tensors, images, partners = zip(*batch)
    v = len(tensors[0])
    return ([torch.stack([t[i] for t in tensors]) for i in range(v)],
            [torch.tensor([x[i] for x in images]) for i in range(v)],
            [torch.tensor([x[i] for x in partners]) for i in range(v)])


def step_fn(cfg: TrainConfig, device, channels_last: bool = True):
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device).to(memory_format=layout).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step(views: Views) -> None:
        views.tensors = [t.to(device, non_blocking=True).contiguous(memory_format=layout)
                         for t in views.tensors]
        views.images = [i.to(device) for i in views.images]
        views.partners = [p.to(device) for p in views.partners]
        train_step(model, opt, views, device, 0.5)  # the trainer's own step
    return step


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def previous_rate(cfg: TrainConfig, data, workers: int, steps: int, device) -> float:
    step = step_fn(cfg, device, channels_last=device.type == "cuda")  # the previous trainer's layouts
    loader = DataLoader(data, batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate, drop_last=True,
                        pin_memory=device.type == "cuda", **({} if isinstance(data, IterableDataset) else
                                                                {"shuffle": True}))
    batches = iter(loader)
    step(Views(*next(batches)))  # warm-up (workers started, kernels chosen)
    sync(device)
    started = time.perf_counter()
    done = 0
    for tensors, images, partners in itertools.islice(batches, steps):
        step(Views(tensors, images, partners))
        done += len(tensors[0])
    sync(device)
    return done / (time.perf_counter() - started)


def model_alone_rate(cfg: TrainConfig, views: int, steps: int, device) -> float:
    step = step_fn(cfg, device)
    b = cfg.batch_size
    x = [torch.randn(b, 3, cfg.image_size, cfg.image_size, device=device) for _ in range(views)]
    ids = torch.arange(b, device=device)
    make = lambda: Views(list(x), [ids] * views, [ids + b] * views)  # noqa: E731
    step(make())
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(make())
    sync(device)
    return steps * b / (time.perf_counter() - started)


def trainer_rate(cfg: TrainConfig) -> float:
    train(cfg)
    return json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[-1])["per_s"]


def main() -> None:
    parser = mode_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="timed steps of the previous path and the model")
    parser.add_argument("--limit", type=int, default=None, help="pictures of the quick setting [3,000]")
    args = parser.parse_args()
    root = args.root or (DEBIAN if DEBIAN.exists() else SUBSET)
    device = default_device()
    work = Path(tempfile.mkdtemp(prefix="spp-bench-trainer-"))
    rows, out = [], {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    try:
        if not args.full:
            limit, steps = args.limit or 3000, args.steps or 6
            cfg = TrainConfig(out=str(work / "sampler"), method="simclr", source="fashion-mnist", root=str(root),
                              limit=limit, backbone="small-cnn", batch_size=256, epochs=2, workers=0)
            source = open_source(resolve_recipe("fashion-mnist", {"root": str(root)}))
            keys = [k for k, _ in itertools.islice(source.items(), limit)]
            prev = previous_rate(cfg, PreviousSingle(source, keys, 32), 0, steps, device)
            new = trainer_rate(cfg)
            alone = model_alone_rate(cfg, 2, steps, device)
            rows.append(("sampler: simclr, single images, small-cnn, batch 256", prev, new, alone, "img/s"))
            out.update(previous_img_s=round(prev, 1), trainer_img_s=round(new, 1), model_only_img_s=round(alone, 1))
        else:
            steps = args.steps or 30
            recipe = resolve_recipe("fashion-mnist", {"root": str(root), "encoder": "openclip:ViT-S-32",
                                                      "image_size": 32, "category": "label", "min_similarity": 0.0,
                                                      "dup_threshold": 0.9999, "max_per_anchor": 1})
            build(work / "pairs", recipe)
            release = str(work / "pairs" / "release")
            for positives in ("augment", "both"):
                cfg = TrainConfig(out=str(work / positives), method="moco", positives=positives, pairs=release,
                                  backbone="resnet18", batch_size=512, epochs=2, workers=auto_workers())
                prev = previous_rate(cfg, PreviousPairs(release, positives, 32), 8, steps, device)
                new = trainer_rate(cfg)
                alone = model_alone_rate(cfg, 3 if positives == "both" else 2, steps, device)
                rows.append((f"moco/{positives}: label pairs, resnet18, batch 512", prev, new, alone, "pairs/s"))
                out.update({f"{positives}_previous_pairs_s": round(prev, 1), f"{positives}_trainer_pairs_s": round(new, 1),
                            f"{positives}_model_only_pairs_s": round(alone, 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| setting | previous | trainer | model alone | trainer / previous | trainer / model |")
    print("|---|---|---|---|---|---|")
    for name, prev, new, alone, unit in rows:
        print(f"| {name} | {prev:,.0f} {unit} | {new:,.0f} {unit} | {alone:,.0f} {unit} | {new / prev:.1f}x | "
              f"{new / alone:.2f} |")
    out["speedup"] = round(rows[-1][2] / rows[-1][1], 2)
    out["trainer_over_model"] = round(rows[-1][2] / rows[-1][3], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
