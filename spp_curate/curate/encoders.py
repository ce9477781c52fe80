"""Encoders, named by one string, built by one function (open_clip's spirit).

* ``openclip:MODEL`` - an open_clip image tower with random weights, seeded (tests, smoke runs).
* ``openclip:MODEL:TAG`` - with pretrained weights ``TAG`` (see ``open_clip.list_pretrained()``),
  fetched into the usual Hugging Face cache when online.
* ``openclip:MODEL:/path/to/weights.bin`` - with a local weights file.
* ``ssl:PATH`` - a checkpoint of the bundled trainer (``RUN/last.pt`` or ``RUN``): its backbone's
  pooled features, *before* the projection head, at the input size it was trained at.

:func:`load_encoder` returns an :class:`Encoder`: a module mapping a batch of
preprocessed images to features, the matching PIL preprocessing, and a
description for ``embeddings/meta.json``. :func:`tensor_preprocess` reads that
preprocessing as batched tensor operations (the device decode path), when it
is one it knows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import parse_encoder
from ..errors import UserError

RANDOM_INIT_SEED = 0


@dataclass
class Encoder:
    spec: str
    module: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    image_size: int
    dim: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)


class _OpenCLIPImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


_PASS_THROUGH = ("RGB", "MaybeConvertMode", "MaybeToTensor", "ToTensor", "ToImage", "PILToTensor")


@dataclass(frozen=True)
class TensorPreprocess:
    """An encoder's preprocessing as tensor operations on uint8 ``(3, H, W)`` pictures already on the device:
    shorter side resized to ``resize`` (antialiased, as Pillow does), centre ``crop``, scaled to [0, 1],
    normalised. Pictures of one shape are resized as one batch."""

    resize: int
    crop: int
    interpolation: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pictures: list[torch.Tensor]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        device = pictures[0].device
        out = torch.empty(len(pictures), 3, self.crop, self.crop, device=device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, pic in enumerate(pictures):
            by_shape.setdefault(tuple(pic.shape), []).append(i)
        for positions in by_shape.values():
            batch = torch.stack([pictures[i] for i in positions])
            batch = F.resize(batch, [self.resize], interpolation=self.interpolation, antialias=True)
            batch = F.center_crop(batch, [self.crop, self.crop])
            out[torch.tensor(positions, device=device)] = batch.float()
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1) * 255.0
        return (out - mean) / std


def _steps(transform: Any) -> list[Any]:
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [step for t in inner for step in _steps(t)]
    return [transform]


def tensor_preprocess(preprocess: Any) -> TensorPreprocess | None:
    """The PIL preprocessing of an encoder as a :class:`TensorPreprocess`, when it is exactly: a resize of the
    shorter side to one size, a square centre crop, conversions to RGB and to a [0, 1] tensor, and a
    normalisation (open_clip's and the trainer's eval transforms are). None for anything else: those
    encoders decode on the CPU with Pillow."""
    from torchvision.transforms import InterpolationMode

    resize = crop = interpolation = mean = std = None
    for step in _steps(preprocess):
        name = type(step).__name__
        size = getattr(step, "size", None)
        size = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
        if name == "Resize" and resize is None and getattr(step, "max_size", None) is None:
            if len(size) != 1:
                return None
            resize, interpolation = int(size[0]), InterpolationMode(step.interpolation)
        elif name == "CenterCrop" and crop is None and resize is not None:
            if len(set(size)) != 1:
                return None
            crop = int(size[0])
        elif name == "Normalize" and mean is None and crop is not None:
            mean, std = tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
        elif name == "ToDtype" and getattr(step, "scale", False):
            continue
        elif name in _PASS_THROUGH or getattr(step, "__name__", "") == "_convert_to_rgb":
            continue
        else:
            return None
    if None in (resize, crop, mean) or len(mean) != 3 or len(std) != 3:
        return None
    return TensorPreprocess(resize, crop, interpolation, mean, std)


def check_encoder(spec: str, image_size: int | None = None) -> None:
    """Validate an encoder string (and an input-size override) cheaply, before any stage runs."""
    enc = parse_encoder(spec)
    if enc.kind == "openclip":
        import open_clip

        if enc.name not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if enc.name.lower()[:5] in m.lower()][:5]
            hint = f" (close: {', '.join(close)})" if close else " (see open_clip.list_models())"
            raise UserError(f"unknown open_clip model {enc.name!r}{hint}", option="--encoder")
        patch = (open_clip.get_model_config(enc.name) or {}).get("vision_cfg", {}).get("patch_size")
        if image_size is not None and isinstance(patch, int) and image_size < patch:
            raise UserError(f"{image_size} px is below {enc.name}'s patch size of {patch} px; use at least {patch}",
                            option="--image-size")
    elif enc.kind == "ssl":
        path = Path(enc.name)
        if not (path.is_file() or (path / "last.pt").is_file()):
            raise UserError(f"no trainer checkpoint at {enc.name} (expected RUN/last.pt from `spp-curate train`)",
                            option="--encoder")


def _create_openclip(model_name: str, pretrained: str | None, image_size: int | None) -> tuple[Any, Any, str]:
    """The whole open_clip model, its eval preprocessing, and where its weights came from."""
    import open_clip

    kwargs: dict[str, Any] = {}
    if image_size:
        kwargs["force_image_size"] = image_size
    source = "random-init"
    if pretrained:
        if Path(pretrained).is_file():
            source = f"file:{Path(pretrained).name}"
        elif pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise UserError(f"{pretrained!r} is neither a file nor a pretrained tag of {model_name} "
                            f"(tags: {tags})", option="--encoder")
        else:
            source = f"tag:{pretrained}"
    try:
        # open_clip logs a warning for random init; that is what the user asked for.
        logging.getLogger().setLevel(logging.ERROR)
        # Random init is seeded, so the encoder string alone fixes the weights:
        # a resumed run, a stage rerun, the text tower and a test all see the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - download/IO errors have many types
        raise UserError(
            f"cannot load weights {pretrained!r} for {model_name} ({type(exc).__name__}: {str(exc)[:160]}); "
            f"offline, fetch them once where the Hub is reachable or pass a local file: "
            f"openclip:{model_name}:/path/to/open_clip_model.safetensors",
            option="--encoder",
        ) from None
    model.eval()
    return model, preprocess, source


def _openclip(model_name: str, pretrained: str | None, image_size: int | None) -> Encoder:
    import open_clip

    model, preprocess, source = _create_openclip(model_name, pretrained, image_size)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    tower = _OpenCLIPImageTower(model)
    try:
        with torch.inference_mode():
            dim = int(tower(torch.zeros(1, 3, size, size)).shape[-1])
    except RuntimeError as exc:
        raise UserError(f"{model_name} cannot take {size} px inputs ({str(exc).splitlines()[0][:120]})",
                        option="--image-size") from None
    meta = {"library": "open_clip", "version": open_clip.__version__, "model": model_name,
            "weights": source, "preprocess": repr(preprocess).replace("\n", " ")}
    return Encoder(f"openclip:{model_name}" + (f":{pretrained}" if pretrained else ""), tower, preprocess,
                   size, dim, meta)


def load_text_encoder(spec: str, image_size: int | None = None) -> tuple[Callable, Callable]:
    """The tokenizer and text tower matching an ``openclip:`` image encoder (for zero-shot labels)."""
    import open_clip

    check_encoder(spec)
    enc = parse_encoder(spec)
    if enc.kind != "openclip":
        raise UserError(f"zero-shot labels need an open_clip encoder with a text tower, not {spec!r}",
                        option="--category")
    model, _, _ = _create_openclip(enc.name, enc.pretrained, image_size)
    return open_clip.get_tokenizer(enc.name), model.encode_text


def load_encoder(spec: str, image_size: int | None = None) -> Encoder:
    """Build the encoder ``spec`` names, in eval mode, on the CPU."""
    check_encoder(spec, image_size)
    enc = parse_encoder(spec)
    if enc.kind == "openclip":
        return _openclip(enc.name, enc.pretrained, image_size)
    return _ssl(enc.name, image_size)


def _ssl(path: str, image_size: int | None) -> Encoder:
    """A trainer checkpoint's backbone (pre-projector features), with the trainer's eval preprocessing."""
    from ..checkpoint import eval_transform, load_backbone

    backbone, dim, trained_size = load_backbone(path, option="--encoder")
    size = image_size or trained_size
    meta = {"library": "spp-curate trainer", "checkpoint": Path(path).name, "output": "backbone (pre-projector)",
            "image_size": size}
    return Encoder(f"ssl:{path}", backbone, eval_transform(size), size, dim, meta)
