"""The training loop: one method, one positive mode, checkpoints every epoch, exact resume."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..checkpoint import CHECKPOINT, load_checkpoint
from ..devices import autocast_for, default_device
from ..errors import UserError
from ..files import atomic_path
from ..progress import console, stage_progress
from ..backbones import BACKBONES, build_backbone
from .data import POSITIVE_MODES, PairViews, SingleImageViews, collate_views
from .methods import METHODS, Views, build_method


@dataclass
class TrainConfig:
    out: str
    method: str = "simclr"
    positives: str = "augment"
    backbone: str = "small-cnn"
    pairs: str | None = None
    source: str | None = None
    root: str | None = None
    limit: int | None = None
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.06
    weight_decay: float = 5e-4
    image_size: int = 32
    seed: int = 0
    workers: int = 0

    def check(self) -> None:
        for name, value, accepted in (("--method", self.method, tuple(METHODS)),
                                      ("--positives", self.positives, POSITIVE_MODES),
                                      ("--backbone", self.backbone, BACKBONES)):
            if value not in accepted:
                raise UserError(f"got {value!r}; accepted: {', '.join(accepted)}", option=name)
        if (self.pairs is None) == (self.source is None):
            raise UserError("give exactly one of --pairs RELEASE and --source SOURCE", option="--pairs")
        if self.source is not None and self.positives != "augment":
            raise UserError("single images have no partner: --source trains with --positives augment",
                            option="--positives")


def _dataset(cfg: TrainConfig):
    if cfg.pairs is not None:
        return PairViews(cfg.pairs, cfg.positives, cfg.image_size, cfg.seed, limit=cfg.limit)
    from ..config import resolve_recipe
    from ..curate.sources import open_source

    source = open_source(resolve_recipe(cfg.source, {"root": cfg.root}))
    return SingleImageViews(source, cfg.image_size, cfg.limit)


def build_model(cfg: TrainConfig):
    backbone, dim = build_backbone(cfg.backbone, cfg.image_size)
    return build_method(cfg.method, backbone, dim, use_partner=cfg.positives != "augment"), dim


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train, checkpointing ``out/last.pt`` every epoch; returns the last epoch's metrics.

    ``stop_after`` ends the run after that epoch as an interruption would; ``resume`` then continues it
    to the same weights an uninterrupted run reaches.
    """
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = default_device()
    torch.manual_seed(cfg.seed)
    model, dim = build_model(cfg)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr * cfg.batch_size / 256, momentum=0.9,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    start, history = 0, []
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, option="--resume")
        if {k: v for k, v in ckpt["config"].items() if k != "epochs"} != \
                {k: v for k, v in asdict(cfg).items() if k != "epochs"}:
            raise UserError(f"{ckpt_path} was trained with other options; use another --out", option="--resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start, history = int(ckpt["epoch"]), list(ckpt["history"])

    data = _dataset(cfg)
    # Momentum schedules follow training progress. A stream of unknown length (hf://) takes its
    # steps per epoch from the epoch before; its first epoch holds the starting momentum.
    known_steps = len(data) // cfg.batch_size or None
    for epoch in range(start, min(cfg.epochs, stop_after or cfg.epochs)):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # each epoch's augmentations, resumable
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        loader = DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers, drop_last=True,
                            collate_fn=collate_views, pin_memory=device.type == "cuda",
                            **({} if isinstance(data, torch.utils.data.IterableDataset)
                               else {"shuffle": True, "generator": generator}))
        model.train()
        total, seen, steps, skipped, started = 0.0, 0, 0, 0, time.perf_counter()
        per_epoch = known_steps or (history[-1].get("steps") if history else None)
        label = f"{cfg.method}/{cfg.positives} {epoch + 1}/{cfg.epochs}"
        with stage_progress(label, len(data) or None, unit="pair" if cfg.pairs else "img") as (bar, task):
            for tensors, images, partners, bad in loader:
                skipped += bad
                if len(tensors) == 0 or len(tensors[0]) < 2:
                    continue
                tensors = [t.to(device, non_blocking=True) for t in tensors]
                views = Views(tensors, [i.to(device) for i in images], [p.to(device) for p in partners])
                with autocast_for(device):
                    loss = model.loss(views)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                within = min(1.0, steps / per_epoch) if per_epoch else 0.0
                model.after_step(min(1.0, (epoch + within) / cfg.epochs))
                total += float(loss.detach()) * views.batch
                seen += views.batch
                bar.update(task, advance=views.batch, description=f"{label} loss {total / seen:.3f}")
        scheduler.step()
        if skipped:
            console.print(f"[yellow]{label}: {skipped} sample(s) skipped: their images do not decode[/yellow]")
        metrics = {"epoch": epoch + 1, "loss": total / max(seen, 1), "steps": steps, "skipped": skipped,
                   "img_per_s": seen / max(time.perf_counter() - started, 1e-9)}
        history.append(metrics)
        ckpt = {"config": asdict(cfg), "epoch": epoch + 1, "feat_dim": dim, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}
        with atomic_path(ckpt_path) as tmp:
            torch.save(ckpt, tmp)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
    return history[-1] if history else {}
