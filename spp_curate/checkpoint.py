"""Trainer checkpoints, read safely, and what reading a run's backbone needs: shared by ``curate`` and ``train``.

A checkpoint may come from anyone (``--encoder ssl:PATH``, ``spp-curate eval``),
so it is size-capped, loaded with ``weights_only=True`` (tensors and plain
containers only: no code runs), and checked for the fields a run writes. A file
that is not one is a one-line :class:`UserError`, never torch's own advice to
load it unsafely.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator
from torchvision.transforms import v2 as T

from .backbones import BACKBONES, build_backbone
from .errors import UserError, brief

CHECKPOINT = "last.pt"
#: The largest input side a checkpoint may ask for (``train --image-size`` has the same bound).
MAX_IMAGE_SIZE = 1024
MAX_CHECKPOINT_BYTES = 8 * 2**30
#: The trainer's input normalisation, which the eval transform and the ``ssl:`` encoder reuse.
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def checkpoint_path(run_or_ckpt: str | Path) -> Path:
    path = Path(run_or_ckpt)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: str | Path, option: str = "RUN") -> dict[str, Any]:
    """A checkpoint written by ``spp-curate train``; a one-line :class:`UserError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} (expected RUN/last.pt from `spp-curate train`)", option=option)
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{path} is {size:,} bytes, over the {MAX_CHECKPOINT_BYTES:,}-byte limit for a checkpoint",
                        option=option)
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle are not the user's business
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a checkpoint"
        raise UserError(f"{path} is not a checkpoint of `spp-curate train` ({type(exc).__name__})",
                        option=option) from None
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not (isinstance(config, dict) and isinstance(ckpt.get("model"), dict)):
        raise UserError(f"{path} is not a checkpoint of `spp-curate train` (no trainer config and weights)",
                        option=option)
    try:
        _Checkpoint.model_validate(ckpt)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise UserError(f"{path} is not a usable checkpoint of `spp-curate train`: {where}: {error['msg']}",
                        option=option) from None
    return ckpt


class _Config(BaseModel):
    """The parts of a checkpoint's trainer config that reading it relies on (the rest is compared on resume)."""

    model_config = ConfigDict(extra="allow")
    backbone: Literal[tuple(BACKBONES)]  # type: ignore[valid-type]
    image_size: StrictInt = Field(ge=8, le=MAX_IMAGE_SIZE)
    epochs: StrictInt = Field(default=1, ge=1)


class _Checkpoint(BaseModel):
    """A checkpoint as ``spp-curate train`` writes it: the epoch reached is within the run's epochs."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    config: _Config
    model: dict
    epoch: StrictInt = Field(default=0, ge=0)
    history: list = []

    @model_validator(mode="after")
    def _epoch_within_the_run(self) -> "_Checkpoint":
        if self.epoch > self.config.epochs:
            raise ValueError(f"epoch {self.epoch} is past the run's {self.config.epochs} epochs")
        return self


def geometry(size: int) -> T.Compose:
    """Shorter side to ``size`` (antialiased), then the centre square (``images.square_pixels`` does the same)."""
    return T.Compose([T.RGB(), T.Resize(size, antialias=True), T.CenterCrop(size)])


def eval_transform(size: int) -> T.Compose:
    """What the ``ssl:`` encoder applies (and ``eval``, through the cache): resize, centre crop, normalise."""
    return T.Compose([geometry(size), T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


def load_backbone(run_or_ckpt: str | Path, option: str = "RUN") -> tuple[torch.nn.Module, int, int]:
    """A run's trained backbone (``RUN`` or ``RUN/last.pt``) in eval mode, its feature size and input size."""
    path = checkpoint_path(run_or_ckpt)
    ckpt = load_checkpoint(path, option)
    config = ckpt["config"]
    backbone, dim = build_backbone(config["backbone"], config["image_size"])
    weights = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"{path}: its backbone weights do not fit a {config['backbone']} "
                        f"({brief(exc, 120)})", option=option) from None
    return backbone.eval(), dim, int(config["image_size"])
