"""The checks of an encoder string made before any stage runs, without building the model: the string's form,
the model's name in its library, a weights file's presence and size, and whether the Hub's weights are cached
or reachable. torch and the model libraries are imported only for the kinds that need them, so a build whose
encoder needs none (``pixels:``, ``ssl:``) starts its first stage without loading torch; the model itself is
built by :mod:`spp_curate.curate.encoders`.
"""

from __future__ import annotations

from pathlib import Path

from ..config import MAX_PIXELS_SIZE, parse_encoder
from ..errors import UserError, brief


def check_encoder(spec: str, image_size: int | None = None) -> None:
    """Validate an encoder string (and an input-size override) cheaply, before any stage runs."""
    enc = parse_encoder(spec)
    if enc.kind == "openclip" and enc.name.startswith("local-dir:"):
        folder = Path(enc.name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"{folder} holds no open_clip_config.json (open_clip's local-dir: layout: the config "
                            "and open_clip_model.safetensors)", option="--encoder")
        _check_openclip_config(folder / "open_clip_config.json")
        _local_dir_weights(folder)
    elif enc.kind == "openclip" and enc.name.startswith("hf-hub:"):
        repo = enc.name[len("hf-hub:"):]
        config = _hub_file(repo, ("open_clip_config.json",), f"openclip:{enc.name}")
        if config is not None:
            _check_openclip_config(Path(config))
            _hub_file(repo, _OPENCLIP_HUB_WEIGHTS, f"openclip:{enc.name}")
    elif enc.kind == "timm":
        import timm

        if not timm.is_model(enc.name.split(".")[0]):
            base = enc.name.split(".")[0].lower()
            close = [m for m in timm.list_models() if base[:6] in m][:5]
            raise UserError(f"unknown timm model {enc.name!r}" + (f" (close: {', '.join(close)})" if close else
                            " (see timm.list_models())"), option="--encoder")
        _check_weights_file(enc)
        if enc.pretrained is None:
            _timm_hub_weights(enc.name)
    elif enc.kind == "torchvision":
        import torchvision

        if enc.name not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"unknown torchvision classifier {enc.name!r} (see torchvision.models.list_models())",
                            option="--encoder")
        _check_weights_file(enc)
    elif enc.kind == "openclip":
        import open_clip

        if enc.name not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if enc.name.lower()[:5] in m.lower()][:5]
            hint = f" (close: {', '.join(close)})" if close else " (see open_clip.list_models())"
            raise UserError(f"unknown open_clip model {enc.name!r}{hint}", option="--encoder")
        if enc.pretrained and enc.pretrained in open_clip.list_pretrained_tags_by_model(enc.name):
            _openclip_tag_weights(enc.name, enc.pretrained)
        patch = (open_clip.get_model_config(enc.name) or {}).get("vision_cfg", {}).get("patch_size")
        if image_size is not None and isinstance(patch, int) and image_size < patch:
            raise UserError(f"{image_size} px is below {enc.name}'s patch size of {patch} px; use at least {patch}",
                            option="--image-size")
    elif enc.kind == "pixels":
        _pixels_size(int(enc.name), image_size)
    elif enc.kind == "ssl":
        path = Path(enc.name)
        if not (path.is_file() or (path / "last.pt").is_file()):
            raise UserError(f"no trainer checkpoint at {enc.name} (expected RUN/last.pt from `spp-curate train`)",
                            option="--encoder")


#: What open_clip looks for in a ``local-dir:`` folder or a Hub repo, in its own order of preference.
_OPENCLIP_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                         "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                         "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_OPENCLIP_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: An ``open_clip_config.json`` is read up to this size (real ones are a few KB).
MAX_CONFIG_BYTES = 1 * 2**20


def _local_dir_weights(folder: Path) -> Path:
    """The weights file open_clip would take from a ``local-dir:`` folder; a one-line error when it holds none
    (open_clip itself would build the model with random weights and only log a warning)."""
    for name in _OPENCLIP_DIR_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext) if p.is_file())
    if found:
        return found[0]
    raise UserError(f"{folder} holds open_clip_config.json but no weights file ({', '.join(_OPENCLIP_HUB_WEIGHTS)}); "
                    "random weights are asked for as openclip:MODEL with no tag, never taken silently",
                    option="--encoder")


def _check_openclip_config(path: Path) -> None:
    """An ``open_clip_config.json`` read size-capped: a model config, and a preprocessing whose mean and std are
    finite numbers (one, or one per channel) with every std above zero; one line naming ``--encoder`` else."""
    import json
    import math

    from ..files import read_capped

    try:
        config = json.loads(read_capped(path, MAX_CONFIG_BYTES, path.name))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as open_clip's config ({brief(exc, 120)})", option="--encoder") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg", config), dict):
        raise UserError(f"{path} holds no model_cfg mapping", option="--encoder")
    pre = config.get("preprocess_cfg") or {}
    if not isinstance(pre, dict):
        raise UserError(f"{path}: preprocess_cfg is not a mapping", option="--encoder")
    for name in ("mean", "std"):
        value = pre.get(name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        ok = len(values) in (1, 3) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) and (name == "mean" or v > 0) for v in values)
        if not ok:
            raise UserError(f"{path}: preprocess_cfg {name} is {str(value)[:60]}; accepted: one or three finite "
                            f"numbers{', each above 0' if name == 'std' else ''}", option="--encoder")


def _hub_offline() -> bool:
    import huggingface_hub.constants as hub_constants

    return bool(hub_constants.HF_HUB_OFFLINE)


def _hub_file(repo: str, names: tuple[str, ...], spec: str, hint: str = "") -> str | None:
    """The cached path of the first of ``names`` in Hub repo ``repo``; None when none is cached but the Hub
    answers that one exists (the build fetches it). Where neither holds, a one-line error naming ``--encoder``,
    before any stage runs (a pretrained encoder offline must not fail after the index has run)."""
    import huggingface_hub as hub

    for name in names:
        try:
            found = hub.try_to_load_from_cache(repo, name)
        except Exception:  # noqa: BLE001 - a repo id the cache cannot hold
            found = None
        if isinstance(found, str):
            return found
    hint = hint or "or copy the model into a folder and give openclip:local-dir:PATH"
    if _hub_offline():
        raise UserError(f"{spec}: the Hub is offline (HF_HUB_OFFLINE) and {repo} ({' or '.join(names)}) is not in the "
                        f"Hugging Face cache; fetch it once where the Hub is reachable, {hint}", option="--encoder")
    reason = ""
    for name in names:
        try:
            hub.get_hf_file_metadata(hub.hf_hub_url(repo, name), timeout=10)
            return None
        except Exception as exc:  # noqa: BLE001 - network, 401/404 and timeouts have many types
            reason = reason or brief(exc, 100)
    raise UserError(f"{spec}: {repo} ({' or '.join(names)}) is neither in the Hugging Face cache nor reachable on "
                    f"the Hub ({reason}); fetch it once where the Hub is reachable, {hint}", option="--encoder")


def _url_reachable(url: str, cached: Path, spec: str, hint: str) -> None:
    """A weights URL outside the Hub: cached at ``cached``, or answering a HEAD request; a one-line error else."""
    import urllib.request

    if cached.is_file():
        return
    try:
        if _hub_offline():
            raise OSError("offline (HF_HUB_OFFLINE)")
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
    except Exception as exc:  # noqa: BLE001 - DNS, refused, timeouts, HTTP errors
        raise UserError(f"{spec}: its weights ({url}) are neither cached nor reachable ({brief(exc, 80)}); {hint}",
                        option="--encoder") from None


def _openclip_tag_weights(model: str, tag: str) -> None:
    """Preflight of ``openclip:MODEL:TAG``: its weights are in the cache or the Hub answers for them."""
    import os

    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    hint = f"or pass a local file: openclip:{model}:/path/to/open_clip_model.safetensors"
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # open_clip's form: "org/name/" or "org/name/file.bin"
        names = (filename,) if filename else _OPENCLIP_HUB_WEIGHTS
        if filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        _hub_file(repo, names, f"openclip:{model}:{tag}", hint)
    elif cfg.get("url"):
        _url_reachable(cfg["url"], Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"]),
                       f"openclip:{model}:{tag}", hint)


def _timm_hub_weights(name: str) -> None:
    """Preflight of ``timm:MODEL[.TAG]`` with no file: its pretrained weights are cached or reachable."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hint = f"or give a local file (timm:{name}:/path/model.safetensors) or timm:{name}:random"
    if cfg is None:
        raise UserError(f"timm has no pretrained weights for {name}; give a local file (timm:{name}:/path/"
                        f"model.safetensors) or timm:{name}:random", option="--encoder")
    if getattr(cfg, "hf_hub_id", None):
        names = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else \
            ("model.safetensors", "pytorch_model.bin")
        _hub_file(cfg.hf_hub_id.split("@")[0], names, f"timm:{name}", hint)
    elif getattr(cfg, "url", None):
        import torch

        _url_reachable(cfg.url, Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name, f"timm:{name}", hint)


def names_weights(spec: str) -> bool:
    """Whether the encoder string names weights to load (a file, a folder, a checkpoint, the Hub's), or a
    torchvision net (whose input size only a forward pass checks): the preflight builds those once."""
    enc = parse_encoder(spec)
    if enc.kind == "pixels":
        return False
    if enc.kind in ("ssl", "torchvision"):
        return True
    if enc.kind == "openclip":
        return bool(enc.pretrained) or enc.name.startswith(("hf-hub:", "local-dir:"))
    return enc.pretrained != "random"


#: Checkpoints of other people's runs are read up to this size (a ResNet-50 MoCo file is about 0.5 GB).
MAX_WEIGHTS_BYTES = 4 * 2**30


def _check_weights_file(enc) -> None:
    if enc.pretrained in (None, "random"):
        return
    path = Path(enc.pretrained)
    if not path.is_file():
        raise UserError(f"no weights file at {enc.pretrained} (give a local file, or "
                        f"{enc.kind}:{enc.name}:random for seeded random weights)", option="--encoder")
    _check_size(path)


def _check_size(path: Path) -> None:
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise UserError(f"{path} is {path.stat().st_size:,} bytes, over the {MAX_WEIGHTS_BYTES:,}-byte limit for "
                        "a weights file", option="--encoder")


def _pixels_size(side: int, image_size: int | None) -> int:
    """The side ``pixels:SIZE`` embeds at: ``--image-size`` when given, else its own; one line when out of range."""
    size = image_size or side
    if not 8 <= size <= MAX_PIXELS_SIZE:
        raise UserError(f"got {size} px for pixels:; accepted: 8 to {MAX_PIXELS_SIZE}", option="--image-size")
    return size
