"""The training loop: one method, one positive mode, checkpoints every epoch, exact resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CHECKPOINT, MAX_IMAGE_SIZE, load_checkpoint
from ..devices import autocast_for, default_device
from ..errors import UserError, brief
from ..files import BuildLock, atomic_path
from ..progress import console, stage_progress
from ..backbones import BACKBONES, build_backbone
from .cache import CACHE_MODES
from .losses import POSITIVE_LOSSES
from .data import POSITIVE_MODES, TrainData, ViewMaker, epoch_seed, pair_data, single_data
from .methods import METHODS, build_method
from .trust import check_partner_trust, check_partner_weight, release_trust


METRICS_LOG = "metrics.jsonl"
#: The largest training seed (numpy's and the epoch seeds' range).
MAX_SEED = 2**32 - 1

#: Options a resumed run may change: they do not change what it computes.
RESUMABLE_CHANGES = ("epochs", "workers", "cache")
#: The largest ``--support``: a queue of about a million 128-number projections (512 MiB).
MAX_SUPPORT = 1 << 20
#: What a checkpoint written before an option existed trained with (where that is not the option's default now).
BEFORE_OPTION = {"support": 0}


@dataclass
class TrainConfig:
    out: str
    method: str = "simclr"
    positives: str = "augment"
    backbone: str = "small-cnn-grid"
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
    workers: int | None = None  # decode processes; None: one per spare core
    cache: str = "auto"
    partner_weight: float | None = None  # the partner terms' weight; None: from the release's precision (trust.py)
    partner_trust: str = "release"  # one weight for all pairs, or each by its similarity band (trust.py)
    positive_loss: str = "out"  # how several positives enter a contrastive loss (losses.POSITIVE_LOSSES)
    support: int | None = None  # a support set of this many partner projections, 0: none; None: auto (support.py)
    self_pairs: float = 0.0  # the share of pairs whose partner is replaced by the anchor itself (a study's ablation)

    def check(self) -> None:
        for name, value, accepted in (("--method", self.method, tuple(METHODS)),
                                      ("--positives", self.positives, POSITIVE_MODES),
                                      ("--cache", self.cache, CACHE_MODES),
                                      ("--backbone", self.backbone, BACKBONES)):
            if value not in accepted:
                raise UserError(f"got {value!r}; accepted: {', '.join(accepted)}", option=name)
        if (self.pairs is None) == (self.source is None):
            raise UserError("give exactly one of --pairs RELEASE and --source SOURCE", option="--pairs")
        if self.limit is not None and (isinstance(self.limit, bool) or not 1 <= self.limit <= 2**62):
            raise UserError(f"got {str(self.limit)[:40]}; accepted: a whole number from 1 to {2**62:,}",
                            option="--limit")
        for name, value, low, high in (("--seed", self.seed, 0, MAX_SEED), ("--image-size", self.image_size, 8,
                                                                             MAX_IMAGE_SIZE),
                                       ("--epochs", self.epochs, 1, 100_000), ("--batch-size", self.batch_size, 2,
                                                                                 1 << 20)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(f"got {str(value)[:40]}; accepted: a whole number from {low} to {high:,}",
                                option=name)
        if not (math.isfinite(self.lr) and self.lr >= 0.0):
            raise UserError(f"got {self.lr}; accepted: a finite number from 0", option="--lr")
        from ..config import max_workers

        if self.workers is not None and not 0 <= self.workers <= max_workers():
            raise UserError(f"got {self.workers}; accepted: 0 to {max_workers()} on this machine (4 per core)",
                            option="--workers")
        check_partner_weight(self.partner_weight)
        check_partner_trust(self.partner_trust)
        if self.positive_loss not in POSITIVE_LOSSES:
            raise UserError(f"got {str(self.positive_loss)[:40]!r}; accepted: {', '.join(POSITIVE_LOSSES)}",
                            option="--positive-loss")
        if self.support is not None and (isinstance(self.support, bool) or not isinstance(self.support, int)
                                         or not 0 <= self.support <= MAX_SUPPORT):
            raise support_error(str(self.support))
        if isinstance(self.self_pairs, bool) or not (isinstance(self.self_pairs, (int, float))
                                                     and 0.0 <= self.self_pairs <= 1.0):
            raise UserError(f"got {str(self.self_pairs)[:40]}; accepted: a share from 0 to 1", option="--self-pairs")
        if self.self_pairs and self.pairs is None:
            raise UserError("single images have no partner to replace: --self-pairs needs --pairs",
                            option="--self-pairs")
        if not METHODS[self.method].contrastive:
            for name, value, default in (("--positive-loss", self.positive_loss, "out"),
                                         ("--support", self.support or 0, 0)):
                if value != default:
                    raise UserError(f"{self.method} has no negatives to contrast with: {name} applies to "
                                    f"{', '.join(m for m, cls in METHODS.items() if cls.contrastive)}", option=name)
        if self.source is not None and self.positives != "augment":
            raise UserError("single images have no partner: --source trains with --positives augment",
                            option="--positives")


def trained_otherwise(saved: dict[str, Any], cfg: TrainConfig) -> str:
    """The options a checkpoint's run (its config ``saved``) was trained with where ``cfg`` differs, as
    ``--name value`` (auto values resolved), or "" when ``cfg`` continues the same run."""
    now = asdict(cfg)
    try:
        saved = {**saved, "support": support_size(TrainConfig(**{k: v for k, v in saved.items()
                                                                  if k in now}))}
    except (TypeError, KeyError):
        pass  # a hostile or damaged config: compared as it is, and found different
    now["support"] = support_size(cfg)
    return ", ".join(f"--{k.replace('_', '-')} {str(saved.get(k))[:40]}" for k in now
                     if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])


def _dataset(cfg: TrainConfig, pairs: str | None = None) -> TrainData:
    """The run's rows and pictures, decoded once (by row ranges of the release, or of the source's keys);
    ``pairs``: the release as already fetched (a Hub release's local folder), else ``cfg.pairs``."""
    if cfg.pairs is not None:
        return pair_data(pairs or cfg.pairs, cfg.image_size, cfg.workers, cfg.cache, Path(cfg.out), cfg.limit)
    from ..curate.sources import open_named

    source = open_named(cfg.source, cfg.root)
    return single_data(source, cfg.image_size, cfg.workers, cfg.cache, Path(cfg.out), cfg.limit)


def train_step(model, optimizer, views, device, progress: float, check=None) -> torch.Tensor:
    """One step on a batch of views: the loss (under autocast on a GPU), ``check(loss)`` before anything is
    updated, the gradient, the optimiser's step, and the momentum schedule at ``progress`` (0..1) of training."""
    with autocast_for(device):
        loss = model.loss(views)
    if check is not None:
        check(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.after_step(progress)
    return loss


def build_model(cfg: TrainConfig):
    backbone, dim = build_backbone(cfg.backbone, cfg.image_size)
    return build_method(cfg.method, backbone, dim, use_partner=cfg.positives != "augment",
                        positive_loss=cfg.positive_loss, support=support_size(cfg)), dim


def parse_support(value: str) -> int | None:
    """``auto`` (None) or a whole number, from the command line (checked by :meth:`TrainConfig.check`)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise support_error(repr(str(value))) from None


def support_error(shown: str) -> UserError:
    """The one-line error of a ``--support`` value that is not ``auto`` or a size up to :data:`MAX_SUPPORT`."""
    return UserError(f"got {shown[:40]}; accepted: auto, or a whole number from 0 (none) to {MAX_SUPPORT:,}",
                     option="--support")


def support_size(cfg: TrainConfig) -> int:
    """The support set a run trains with: ``--support``, else its method's ``default_support`` (SimCLR's; MoCo
    and the non-contrastive methods have none by default, see ``Method.default_support``)."""
    if cfg.support is not None:
        return cfg.support
    return METHODS[cfg.method].default_support


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None,
          force: bool = False) -> dict[str, Any]:
    """Train, checkpointing ``out/last.pt`` every epoch; returns the last epoch's metrics.

    ``stop_after`` ends the run after that epoch as an interruption would; ``resume`` then continues it
    to the same weights an uninterrupted run reaches. The run directory is locked while training (a
    second run into it is refused), and a run already there is continued only with ``resume`` and
    started again only with ``force``.
    """
    cfg.check()
    if cfg.pairs is not None and not cfg.pairs.startswith("hf://"):
        from ..export.manifest import load_manifest

        load_manifest(Path(cfg.pairs), option="--pairs")  # before the run folder is made: a wrong one leaves none
    out = Path(cfg.out)
    with BuildLock(out, option="--out"):
        ckpt_path = out / CHECKPOINT
        if ckpt_path.exists() and not resume and not force:
            raise UserError(f"{out} already holds a run ({CHECKPOINT}); continue it with --resume, start it again "
                            "with --force, or choose another --out", option="--out")
        if force and not resume:
            for name in (CHECKPOINT, METRICS_LOG):  # the program's own files, written by an earlier run
                (out / name).unlink(missing_ok=True)
        return _train(cfg, resume, stop_after)


POSITIVES_SAID = {
    "both": "each anchor's two augmentations and its partner are positives of each other (SePP-ID); the matched "
            "baseline is --positives augment",
    "semantic": "the partner replaces the second augmentation (the pairs alone); the matched baseline is "
                "--positives augment",
    "augment": "each anchor's two augmentations, the matched baseline: the release's partners are not used "
               "(--positives both uses them)",
}


def _train(cfg: TrainConfig, resume: bool, stop_after: int | None) -> dict[str, Any]:
    console.print(f"positives: {cfg.positives} ("
                  + ("single images: no partner" if cfg.pairs is None else POSITIVES_SAID[cfg.positives]) + ")",
                  markup=False, highlight=False, soft_wrap=True)
    trust = None
    pairs = cfg.pairs
    if pairs is not None and pairs.startswith("hf://"):  # fetched and verified once, for the trust and the data
        from ..export.hub import fetch_release

        pairs = str(fetch_release(pairs))
    if pairs is not None and cfg.positives != "augment":
        trust = release_trust(pairs, cfg.partner_weight, cfg.partner_trust)
        console.print(f"pairs: {trust.describe()}", markup=False, highlight=False)
        if support_size(cfg):
            console.print(f"support set: each view's nearest of the last {support_size(cfg):,} partner projections is "
                          "one more positive, weighted as its pair (--support)", markup=False, highlight=False)
        if trust.warning():
            console.print(f"[yellow]warning: {trust.warning()}[/yellow]")
    out = Path(cfg.out)
    device = default_device()
    torch.manual_seed(cfg.seed)
    model, dim = build_model(cfg)
    model.to(device)
    # channels-last: 1.6x the small CNN's training rate on a 2-core CPU, and the layout cuDNN prefers
    model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr * cfg.batch_size / 256, momentum=0.9,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    start, history = 0, []
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, option="--resume")
        # an option added since the checkpoint was written counts as its default there
        defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
        saved = {**defaults, **BEFORE_OPTION, **ckpt["config"]}
        differ = trained_otherwise(saved, cfg)
        if differ:
            raise UserError(f"{ckpt_path} was trained with other options ({differ}); give those to resume it, or "
                            "use another --out", option="--resume")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{ckpt_path} is damaged: its state does not fit this run "
                            f"({type(exc).__name__}: {brief(exc, 120)}); "
                            "start again with --force", option="--resume") from None
        start, history = ckpt["epoch"], list(ckpt["history"])

    data = _dataset(cfg, pairs)
    if cfg.self_pairs:
        replaced = data.replace_partners(cfg.self_pairs, cfg.seed)
        console.print(f"self pairs: {replaced:,} of {len(data):,} pairs have the anchor itself as partner "
                      f"(--self-pairs {cfg.self_pairs:g})", markup=False, highlight=False)
    if data.skipped:
        console.print(f"[yellow]{data.skipped} {data.unit}(s) left out: their images do not decode "
                      f"(first: {data.cache.first_failure})[/yellow]")
    if data.per_epoch < 2:  # one row per anchor and epoch
        raise UserError(f"{data.per_epoch} {'anchor' if data.unit == 'pair' else data.unit}(s) to train on; "
                        "at least 2 are needed",
                        option="--pairs" if cfg.pairs else "--source")
    pair_weights = trust.pair_weights(data.similarity) if trust else None
    if trust and cfg.partner_trust == "similarity" and trust.source != "given" and pair_weights is None:
        console.print("[yellow]--partner-trust similarity: this release has no precision by similarity band, or "
                      "its pairs no similarity; every pair counts by the one weight above[/yellow]")
    partner_weight = (float(pair_weights.mean()) if pair_weights is not None and len(pair_weights)
                      else trust.weight if trust else None)
    per_step = cfg.batch_size
    steps = data.per_epoch // per_step + (data.per_epoch % per_step >= 2)  # a last batch of one is left out
    what = "anchors (one pair each)" if data.unit == "pair" else f"{data.unit}s"
    console.print(f"budget: an epoch is {data.per_epoch:,} {what} = {steps:,} steps of {per_step}; {cfg.epochs} "
                  f"epochs = {steps * cfg.epochs:,} steps, {data.per_epoch * cfg.epochs:,} {data.unit}s seen "
                  "(runs compared at equal epochs are matched in steps only if their epochs are)",
                  markup=False, highlight=False)
    make_views = ViewMaker(data, cfg.positives, cfg.image_size, device,
                           partner_weight=trust.weight if trust else 1.0, pair_weights=pair_weights)
    for epoch in range(start, min(cfg.epochs, stop_after or cfg.epochs)):
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # each epoch's augmentations, resumable
        batches = data.batches(cfg.batch_size, cfg.seed, epoch)
        model.train()
        total, seen, steps, started = 0.0, 0, 0, time.perf_counter()
        label = f"{cfg.method}/{cfg.positives} {epoch + 1}/{cfg.epochs}"
        with stage_progress(label, data.per_epoch, unit=data.unit) as (bar, task):
            for batch in batches:
                views = make_views(batch)

                def finite(loss: torch.Tensor) -> None:
                    if not torch.isfinite(loss.detach()):
                        raise UserError(f"the loss is {float(loss.detach())} at epoch {epoch + 1}, step {steps + 1}: "
                                        f"training diverged at learning rate {cfg.lr}; lower --lr (the last good "
                                        f"checkpoint, if any, is kept)", option="--lr")

                # momentum schedules follow training progress
                loss = train_step(model, optimizer, views, device,
                                  min(1.0, (epoch + (steps + 1) / len(batches)) / cfg.epochs), check=finite)
                steps += 1
                total += float(loss.detach()) * views.batch
                seen += views.batch
                bar.update(task, advance=views.batch, description=f"{label} loss {total / seen:.3f}")
        scheduler.step()
        metrics = {"epoch": epoch + 1, "loss": total / max(seen, 1), "steps": steps, "skipped": data.skipped,
                   "unit": data.unit, "per_s": seen / max(time.perf_counter() - started, 1e-9),
                   "partner_weight": partner_weight}
        history.append(metrics)
        ckpt = {"config": asdict(cfg), "epoch": epoch + 1, "feat_dim": dim, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}
        with atomic_path(ckpt_path) as tmp:
            torch.save(ckpt, tmp)
        with open(out / METRICS_LOG, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
    return history[-1] if history else {}
