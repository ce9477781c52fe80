"""Encoders, named by one string in the words of the library that provides them, built by one function.

* ``openclip:MODEL`` - an open_clip image tower with random weights, seeded (tests, smoke runs);
  ``openclip:MODEL:TAG`` with pretrained weights (``open_clip.list_pretrained()``), fetched into the Hugging
  Face cache when online; ``openclip:MODEL:/path/weights.safetensors`` with a local file; and open_clip's own
  schemes ``openclip:hf-hub:ORG/NAME`` (a model published on the Hub, read from the Hub cache offline) and
  ``openclip:local-dir:PATH`` (a folder holding ``open_clip_config.json`` and the weights).
* ``timm:MODEL[.TAG]`` - any timm backbone (``vit_small_patch14_dinov2.lvd142m``, ``convnext_tiny``): its
  pooled pre-logit features (``num_classes=0``) and its own data config (``timm.data.resolve_data_config``)
  as the preprocessing; the pretrained weights from the Hub, ``timm:MODEL:FILE`` from a local file,
  ``timm:MODEL:random`` seeded random weights.
* ``torchvision:ARCH:CHECKPOINT`` - a torchvision classifier (``resnet50``, ...) without its classification
  layer, its weights taken from a self-supervised checkpoint: MoCo v2/v3 (``module.encoder_q.`` /
  ``module.base_encoder.``), solo-learn (``backbone.``), lightly, or a plain ``state_dict``; the prefix is
  recognised or given (``--encoder-prefix``), projection heads are dropped, and a key that matches nothing
  is an error that names it, never a silent partial load. ``torchvision:ARCH:random`` for seeded weights.
* ``ssl:PATH`` - a checkpoint of the bundled trainer (``RUN/last.pt`` or ``RUN``): its backbone's
  pooled features, *before* the projection head, at the input size it was trained at.
* ``pixels:SIZE`` - no model: the picture itself, resized to ``SIZE`` px and normalised as the trainer's
  input is, flattened (``3 * SIZE**2`` numbers). The build's PCA whitening makes it the classic
  PCA-pixel retrieval baseline; on aligned pictures (Fashion-MNIST) its neighbours are more often of the
  anchor's class than a short self-supervised run's, and they carry what that run's augmentations do not
  (BENCHMARKS.md, learning gain).

Every file is read size-capped and with ``weights_only=True`` (no pickled code runs). :func:`load_encoder`
returns an :class:`Encoder`: a module mapping a batch of preprocessed images to features, the matching PIL
preprocessing, and a description for ``embeddings/meta.json`` that names the weights.
:func:`tensor_preprocess` reads that preprocessing as batched tensor operations (the device decode path)
when it is one it knows (open_clip's, timm's, torchvision's and the trainer's eval transforms are).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import parse_encoder
from ..errors import UserError, brief
from ..progress import quiet_log
from .encoder_checks import _OPENCLIP_HUB_WEIGHTS, _check_size, _local_dir_weights, _pixels_size, check_encoder

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


def _create_openclip(model_name: str, pretrained: str | None, image_size: int | None) -> tuple[Any, Any, str]:
    """The whole open_clip model, its eval preprocessing, and where its weights came from.

    Every weights file passes our size-capped, tensors-only reader first, and a ``local-dir:`` or ``hf-hub:``
    model must load its weights (open_clip would otherwise fall back to random init with a logged warning)."""
    import open_clip

    kwargs: dict[str, Any] = {}
    if image_size:
        kwargs["force_image_size"] = image_size
    source = "random-init"
    scheme = model_name.startswith(("hf-hub:", "local-dir:"))
    if scheme:
        source = model_name  # open_clip reads the config and the weights from there
        if model_name.startswith("local-dir:"):
            read_state_dict(_local_dir_weights(Path(model_name[len("local-dir:"):])))
        else:
            read_state_dict(Path(_hub_weights(model_name[len("hf-hub:"):])))
        kwargs["require_pretrained"] = True
    elif pretrained:
        if Path(pretrained).is_file():
            # Read by us first (size-capped, tensors only): a foreign pickle or a file of something else is a
            # one-line error of ours, not torch's advice to load it unsafely.
            read_state_dict(Path(pretrained))
            source = f"file:{Path(pretrained).name}"
        elif pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise UserError(f"{pretrained!r} is neither a file nor a pretrained tag of {model_name} "
                            f"(tags: {tags})", option="--encoder")
        else:
            source = f"tag:{pretrained}"
    try:
        # open_clip logs a warning for random init (what the user asked for) and errors for downloads it then
        # raises; the raised error is what the user reads, once.
        # Random init is seeded, so the encoder string alone fixes the weights:
        # a resumed run, a stage rerun, the text tower and a test all see the same model.
        with quiet_log(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - download/IO errors have many types
        if scheme and "state_dict" in str(exc):  # the weights read as tensors but are another model's
            raise _not_fitting(model_name, "its config's model", exc) from None
        if scheme:
            raise UserError(f"cannot load {model_name} ({type(exc).__name__}: {brief(exc, 160)}); "
                            "hf-hub: needs the Hub or the model in the Hugging Face cache (HF_HUB_CACHE), local-dir: "
                            "a folder with open_clip_config.json and open_clip_model.safetensors",
                            option="--encoder") from None
        if Path(pretrained).is_file():
            raise _not_fitting(pretrained, model_name, exc) from None
        raise UserError(
            f"cannot load weights {pretrained!r} for {model_name} ({type(exc).__name__}: {brief(exc, 160)}); "
            f"offline, fetch them once where the Hub is reachable or pass a local file: "
            f"openclip:{model_name}:/path/to/open_clip_model.safetensors",
            option="--encoder",
        ) from None
    model.eval()
    return model, preprocess, source


def _hub_weights(repo: str) -> str:
    """The local path of an ``hf-hub:`` model's weights file (from the cache, else fetched)."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return download_pretrained_from_hf(repo)
    except Exception as exc:  # noqa: BLE001 - offline, missing file and HTTP errors have many types
        raise UserError(f"hf-hub:{repo} has no weights file in the Hugging Face cache or on the Hub "
                        f"({', '.join(_OPENCLIP_HUB_WEIGHTS)}; {brief(exc, 100)}); hf-hub: needs the Hub or the model "
                        "in the Hugging Face cache (HF_HUB_CACHE)", option="--encoder") from None


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
        raise UserError(f"{model_name} cannot take {size} px inputs ({brief(exc, 120)})",
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


def load_encoder(spec: str, image_size: int | None = None, prefix: str | None = None) -> Encoder:
    """Build the encoder ``spec`` names, in eval mode, on the CPU (``prefix``: ``--encoder-prefix``)."""
    check_encoder(spec, image_size)
    enc = parse_encoder(spec)
    if enc.kind == "openclip":
        encoder = _openclip(enc.name, enc.pretrained, image_size)
    elif enc.kind == "timm":
        encoder = _timm(enc, image_size)
    elif enc.kind == "torchvision":
        encoder = _torchvision(enc, image_size, prefix)
    elif enc.kind == "pixels":
        encoder = _pixels(int(enc.name), image_size)
    else:
        encoder = _ssl(enc.name, image_size)
    check_finite(encoder.module, spec)
    check_preprocess(encoder, spec)
    return encoder


def check_preprocess(encoder: Encoder, spec: str) -> None:
    """The encoder's preprocessing runs on a picture (a config's zero std, say, fails here in one line naming
    ``--encoder``, before any image is embedded, not in the embed stage's workers)."""
    from PIL import Image

    try:
        out = encoder.preprocess(Image.new("RGB", (max(encoder.image_size, 8),) * 2, (128, 128, 128)))
        ok = isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all())
    except Exception as exc:  # noqa: BLE001 - whatever a transform raises, the preprocessing is unusable
        raise UserError(f"the preprocessing of {spec} fails on a picture ({type(exc).__name__}: {brief(exc, 120)})",
                        option="--encoder") from None
    if not ok:
        raise UserError(f"the preprocessing of {spec} gives numbers that are not finite (a zero std?)",
                        option="--encoder")


def check_finite(module: torch.nn.Module, spec: str) -> None:
    """Weights holding NaN or inf (a run whose loss diverged) give no usable features: one line naming the
    first such tensor, before any image is embedded, rather than empty pairs further on."""
    # Buffers may hold -inf by design (a causal attention mask); NaN or +inf in them (batch-norm statistics: an
    # infinite running variance) is damage.
    checks = [(n, t, torch.isfinite) for n, t in module.named_parameters()] + \
             [(n, t, lambda x: ~torch.isnan(x) & (x != float("inf"))) for n, t in module.named_buffers()]
    for name, tensor, fine in checks:
        if tensor.is_floating_point() and not bool(fine(tensor).all()):
            raise UserError(f"the weights of {spec} hold NaN or inf (first in {name}); they give no usable "
                            "features (a training run whose loss diverged?)", option="--encoder")


def _not_fitting(path: str, model: str, exc: Exception) -> UserError:
    """A weights file that read as tensors but that the model's loader refused: the wrong architecture."""
    return UserError(f"the tensors of {path} do not fit {model} ({type(exc).__name__}: "
                     f"{brief(exc, 200)}); name the architecture the weights were saved from",
                     option="--encoder")


def unreadable_weights(path: Path, exc: Exception) -> str:
    """Why a file did not load as tensors, in one line: a pickle that names code to run (which is refused and
    not run), or a file that is not weights at all. Never torch's advice to load it with ``weights_only=False``."""
    import re

    called = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"globals?: ([\w.]+)", str(exc))
    if called:
        return (f"{path} is a pickle that asks to run {called.group(1)}; refused, nothing was run (weights are read "
                "as tensors only: save a state_dict, or .safetensors)")
    return (f"{path} is not a weights file: neither safetensors nor a torch file of tensors "
            f"({type(exc).__name__})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a torch file read with ``weights_only=True``, unwrapped
    from the containers training scripts put them in (``state_dict``, ``model``, ``teacher``, ...)."""
    import warnings

    _check_size(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and format errors all mean "not weights we can read"
        raise UserError(unreadable_weights(path, exc), option="--encoder") from None
    for _ in range(3):  # {'state_dict': {...}}, {'model': {...}}, lightning's {'state_dict': ...}
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "teacher", "student", "backbone", "module")
                          if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state_dict of tensors", option="--encoder")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


@contextmanager
def _seeded():
    """Random weights fixed by the encoder string alone, as for open_clip's random init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


def _timm(enc, image_size: int | None) -> Encoder:
    import timm
    import timm.data

    kwargs: dict[str, Any] = {"num_classes": 0}
    weights = enc.pretrained
    state = None
    if weights not in (None, "random"):
        state = read_state_dict(Path(weights))  # ours: size-capped, tensors only, loaded strictly below
    pretrained = weights is None  # the Hub's weights; a file is loaded by us, every tensor accounted for
    if image_size:
        kwargs["img_size"] = image_size
    try:
        with _seeded():
            try:
                model = timm.create_model(enc.name, pretrained=pretrained, **kwargs)
            except TypeError:  # a convolutional net takes any size and no img_size argument
                kwargs.pop("img_size", None)
                model = timm.create_model(enc.name, pretrained=pretrained, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - download, file and shape errors have many types
        if weights not in (None, "random"):
            raise _not_fitting(weights, f"timm's {enc.name}", exc) from None
        raise UserError(f"cannot load timm weights for {enc.name} from the Hub ({type(exc).__name__}: "
                        f"{brief(exc, 160)}); offline, give a local file "
                        f"(timm:{enc.name}:/path/model.safetensors) or timm:{enc.name}:random",
                        option="--encoder") from None
    if state is not None:
        _load_timm_file(model, state, Path(weights), enc.name)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    if image_size:
        config["input_size"] = (3, image_size, image_size)
    preprocess = timm.data.create_transform(**config)
    size = int(config["input_size"][-1])
    dim = _feature_dim(model, size, enc.name)
    source = "random-init" if weights == "random" else f"file:{Path(weights).name}" if weights else \
        f"hub:{model.pretrained_cfg.get('hf_hub_id') or enc.name}"
    meta = {"library": "timm", "version": timm.__version__, "model": enc.name, "weights": source,
            "output": "pooled pre-logits (num_classes=0)", "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in config.items()},
            "preprocess": repr(preprocess).replace("\n", " ")}
    return Encoder(f"timm:{enc.name}" + (f":{weights}" if weights else ""), model, preprocess, size, dim, meta)


def _load_timm_file(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Load a weights file into a timm backbone strictly: through the model's own checkpoint filter (which
    converts original layouts and resizes position embeddings) when it has one, the classifier's tensors left
    out (the backbone has none: ``num_classes=0``), and every other tensor of the model and of the file matched;
    what is missing or left over is named, never loaded in part as timm's non-strict loading would."""
    import sys

    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception:  # noqa: BLE001 - a filter for another layout: the tensors are matched as they are
            pass
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in wanted]
    shapes = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{path} does not fit timm's {name}: " + _key_problems(missing, unexpected, shapes)
                        + "; name the architecture the weights were saved from", option="--encoder")
    model.load_state_dict(state, strict=False)


def _key_problems(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = [f"{len(missing)} weights missing ({', '.join(missing[:4])})" if missing else "",
             f"{len(unexpected)} keys unmatched ({', '.join(unexpected[:4])})" if unexpected else "",
             f"{len(shapes)} of other shape ({', '.join(shapes[:3])})" if shapes else ""]
    return "; ".join(p for p in parts if p)


def _feature_dim(module: torch.nn.Module, size: int, name: str) -> int:
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:  # torchvision's ViT asserts its input size
        raise UserError(f"{name} cannot take {size} px inputs ({brief(exc, 120)})",
                        option="--image-size") from None
    return int(out.reshape(1, -1).shape[-1])


#: Key prefixes of a backbone inside self-supervised checkpoints, tried in this order: MoCo v2 (query encoder),
#: MoCo v3 (base encoder), solo-learn and lightly (``backbone.``), DataParallel, and a plain state_dict.
KNOWN_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.", "module.backbone.",
                  "backbone.", "model.backbone.", "module.encoder.", "encoder.", "module.", "model.", "")
#: Names of a torchvision classifier's last layer, replaced by an identity so the encoder gives pooled features.
_HEADS = ("fc", "classifier", "heads", "head")


class _Flatten(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.model(images), 1)


def _torchvision(enc, image_size: int | None, prefix: str | None) -> Encoder:
    import torchvision
    from torchvision.transforms import v2 as T

    size = image_size or 224
    with _seeded():
        model = torchvision.models.get_model(enc.name, weights=None)
    head = next((h for h in _HEADS if isinstance(getattr(model, h, None), torch.nn.Module)), None)
    if head is None:
        raise UserError(f"torchvision {enc.name} has no classification layer named {', '.join(_HEADS)} to drop",
                        option="--encoder")
    setattr(model, head, torch.nn.Identity())
    wanted = model.state_dict()
    source, used = "random-init", None
    if enc.pretrained != "random":
        path = Path(enc.pretrained)
        weights = read_state_dict(path)
        used, covered = (prefix, None) if prefix is not None else _best_prefix(weights, wanted)
        if covered == 0:
            raise UserError(f"{path}: no key prefix maps its tensors onto {enc.name} (tried "
                            f"{', '.join(repr(p) for p in KNOWN_PREFIXES if p)}; first keys: "
                            f"{', '.join(list(weights)[:3])}); give --encoder-prefix", option="--encoder-prefix")
        mine = {k[len(used):]: v for k, v in weights.items() if k.startswith(used)}
        missing = [k for k in wanted if k not in mine and not k.endswith("num_batches_tracked")]
        dropped_head = {k for k in mine if k.split(".")[0] in _HEADS and k not in wanted}
        unexpected = [k for k in mine if k not in wanted and k not in dropped_head]
        shapes = [k for k in wanted if k in mine and mine[k].shape != wanted[k].shape]
        if missing or unexpected or shapes:
            how = "given" if prefix is not None else "the best of the known prefixes"
            raise UserError(f"{path} does not fit {enc.name} under prefix {used!r} ({how}): "
                            + _key_problems(missing, unexpected, shapes), option="--encoder")
        model.load_state_dict({k: v for k, v in mine.items() if k in wanted}, strict=False)
        source = f"file:{path.name}"
    model.eval()
    module = _Flatten(model)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet normalisation
    preprocess = T.Compose([T.RGB(), T.Resize(round(size * 256 / 224), antialias=True), T.CenterCrop(size),
                            T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    dim = _feature_dim(module, size, enc.name)
    meta = {"library": "torchvision", "version": torchvision.__version__, "model": enc.name, "weights": source,
            "key_prefix": used, "output": f"pooled features ({head} dropped)",
            "preprocess": repr(preprocess).replace("\n", " ")}
    return Encoder(f"torchvision:{enc.name}:{enc.pretrained}", module, preprocess, size, dim, meta)


def _best_prefix(weights: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> tuple[str, int]:
    """The known prefix under which the checkpoint's keys cover the most weights of the backbone (the first in
    :data:`KNOWN_PREFIXES` order among equals), and how many it covers: all of them for a checkpoint that fits,
    fewer for one that lacks layers (the caller names what is missing), 0 when no prefix maps any."""
    need = {k for k in wanted if not k.endswith("num_batches_tracked")}
    best, most = "", 0
    for prefix in KNOWN_PREFIXES:
        covered = len(need & {k[len(prefix):] for k in weights if k.startswith(prefix)})
        if covered == len(need):
            return prefix, covered
        if covered > most:
            best, most = prefix, covered
    return best, most


def _ssl(path: str, image_size: int | None) -> Encoder:
    """A trainer checkpoint's backbone (pre-projector features), with the trainer's eval preprocessing."""
    from ..checkpoint import eval_transform, load_backbone

    backbone, dim, trained_size = load_backbone(path, option="--encoder")
    size = image_size or trained_size
    meta = {"library": "spp-curate trainer", "checkpoint": Path(path).name, "output": "backbone (pre-projector)",
            "image_size": size}
    return Encoder(f"ssl:{path}", backbone, eval_transform(size), size, dim, meta)


def _pixels(side: int, image_size: int | None) -> Encoder:
    """Raw pixels: the trainer's eval preprocessing at ``side`` px (or ``--image-size``), flattened."""
    from ..checkpoint import eval_transform

    size = _pixels_size(side, image_size)
    meta = {"library": "spp-curate", "output": "raw pixels (RGB, normalised, flattened)", "image_size": size}
    return Encoder(f"pixels:{side}", torch.nn.Flatten(), eval_transform(size), size, 3 * size * size, meta)
