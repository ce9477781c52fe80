"""The supervised reference of a study: the same backbone, pictures, augmentations and budget, trained on labels.

Cross-entropy through a linear head on the backbone's features, SGD with the
trainer's learning-rate rule and cosine schedule, the trainer's augmentations
(:class:`..train.augment.DeviceAugment`) and epoch order. The checkpoint is the
trainer's (``RUN/last.pt`` with the backbone's weights under ``backbone.``), so
``spp-curate eval`` and a study read it as they read any run. A run left
unfinished starts again: it is the shortest run of a study.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import build_backbone
from ..checkpoint import CHECKPOINT, load_checkpoint
from ..devices import autocast_for, default_device
from ..errors import UserError
from ..files import atomic_path
from ..progress import stage_progress
from ..train.augment import DeviceAugment
from ..train.data import epoch_seed, single_data


@dataclass
class SupervisedConfig:
    out: str
    source: str
    root: str | None
    limit: int | None
    epochs: int
    batch_size: int
    lr: float
    backbone: str
    image_size: int
    seed: int
    workers: int | None = None
    method: str = "supervised"


def train_supervised(cfg: SupervisedConfig) -> dict[str, Any]:
    """Train (or find trained) the supervised reference; returns its last epoch's metrics."""
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, option="--out")
        if ckpt.get("epoch") == cfg.epochs and ckpt["config"] == asdict(cfg):
            return ckpt["history"][-1]
    from ..curate.sources import open_named

    out.mkdir(parents=True, exist_ok=True)
    source = open_named(cfg.source, cfg.root)
    labels = np.asarray([label for _, label in itertools.islice(source.items(), cfg.limit)])
    if labels.dtype.kind not in "iu" or (labels < 0).any():
        raise UserError("the supervised reference needs labels: this source's pictures have none", option="--source")
    data = single_data(source, cfg.image_size, cfg.workers, "memory", out, cfg.limit)
    labels = torch.from_numpy(labels[data.rows[:, 0]].astype(np.int64))
    device = default_device()
    torch.manual_seed(cfg.seed)
    backbone, dim = build_backbone(cfg.backbone, cfg.image_size)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": torch.nn.Linear(dim, int(labels.max()) + 1)})
    model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr * cfg.batch_size / 256, momentum=0.9,
                                weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    augment = DeviceAugment(cfg.image_size).to(device)
    pixels = torch.from_numpy(np.asarray(data.cache.pixels))
    rows = torch.from_numpy(data.rows[:, 0])
    history = []
    for epoch in range(cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        batches = data.batches(cfg.batch_size, cfg.seed, epoch)
        model.train()
        total, seen, started = 0.0, 0, time.perf_counter()
        label = f"supervised {epoch + 1}/{cfg.epochs}"
        with stage_progress(label, data.per_epoch, unit="img") as (bar, task):
            for batch in batches:
                x = augment(pixels[rows[batch]].to(device))
                with autocast_for(device):
                    loss = torch.nn.functional.cross_entropy(model["head"](model["backbone"](x)).float(),
                                                             labels[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
                bar.update(task, advance=len(batch), description=f"{label} loss {total / seen:.3f}")
        scheduler.step()
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "steps": len(batches), "unit": "img",
                        "per_s": seen / max(time.perf_counter() - started, 1e-9)})
    state = {f"backbone.{k}": v for k, v in model["backbone"].state_dict().items()}
    with atomic_path(ckpt_path) as tmp:
        torch.save({"config": asdict(cfg), "epoch": cfg.epochs, "feat_dim": dim, "history": history,
                    "model": state}, tmp)
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return history[-1]
