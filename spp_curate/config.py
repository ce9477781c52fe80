"""The build recipe: one validated model, loaded from ``manifests/`` plus CLI overrides.

A recipe names the source, the encoder and every mining and export knob. The
file ``manifests/<source>.yaml`` holds the defaults for a source; options given
on the command line override them. The resolved recipe is written to
``DIR/build.yaml`` so that every stage can be rerun alone on a build directory.
"""

from __future__ import annotations

import json
import platform
import re
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import UserError, brief
from . import layout
from .files import atomic_path, file_identity, read_capped, short_hash
from .pipeline import STAGES

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"


def _sources():
    """The registry of source kinds (``curate/sources/``), read where a ``--source`` is parsed."""
    from .curate import sources

    return sources.SOURCES

#: The kinds of encoder a recipe may name (``curate/encoders.py`` builds each).
ENCODER_KINDS = ("openclip", "timm", "torchvision", "ssl", "pixels")
#: What follows an encoder kind, for messages.
ENCODER_FORMS = ("openclip:MODEL[:TAG|:FILE], openclip:hf-hub:ORG/NAME, openclip:local-dir:PATH, "
                 "timm:MODEL[.TAG][:FILE|:random], torchvision:ARCH:CHECKPOINT|random, ssl:CHECKPOINT or pixels:SIZE")
#: The largest side ``pixels:SIZE`` takes: 3 x 64 x 64 = 12,288 numbers an image already.
MAX_PIXELS_SIZE = 64


@dataclass(frozen=True)
class SourceSpec:
    """``--source`` parsed: ``kind`` and, for ``hf:`` and ``wds:``, the argument after the colon."""

    kind: str
    argument: str = ""


@dataclass(frozen=True)
class EncoderSpec:
    """``--encoder`` parsed: the kind, the model (open_clip or timm name, torchvision architecture, or the
    trainer checkpoint of ``ssl:``) and where its weights come from (a tag, a file, ``random``, or None)."""

    kind: str
    name: str  # the model (``hf-hub:ORG/NAME`` and ``local-dir:PATH`` whole), or the ssl checkpoint path
    pretrained: str | None = None

    @property
    def weights_file(self) -> Path | None:
        """The local file the weights come from, when there is one."""
        if self.kind == "ssl":
            candidate = Path(self.name)
            candidate = candidate / "last.pt" if candidate.is_dir() else candidate
        elif self.kind == "openclip" and self.name.startswith("local-dir:"):
            folder = Path(self.name[len("local-dir:"):])
            candidate = next((folder / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                              if (folder / f).is_file()), folder)
        else:
            candidate = Path(self.pretrained or "")
        return candidate if str(candidate) not in ("", ".") and candidate.is_file() else None


def parse_source(spec: str) -> SourceSpec:
    kind, _, argument = spec.partition(":")
    if kind not in _sources():
        raise UserError(f"unknown source {spec!r}; accepted: {', '.join(sorted(_sources()))}", option="--source")
    return SourceSpec(kind, argument)


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference (evaluation) set named in one string: ``KIND[:ROOT-OR-NAME][:SPLIT]``.

    ``fashion-mnist:test``, ``imagefolder:/data/eval``, ``imagenet:/data/imagenet:val``,
    ``hf:org/name:test``, ``wds:/data/eval-{0000..0009}.tar``. The last part is the split when
    there are two parts after the kind and it holds no ``/``; Fashion-MNIST takes a split alone.
    """

    spec: str
    kind: str
    root: str | None
    split: str

    @property
    def source(self) -> str:
        """The ``--source`` value of this set (``hf:`` and ``wds:`` carry their argument)."""
        return f"{self.kind}:{self.root}" if _sources()[self.kind].takes_argument else self.kind

    @property
    def root_option(self) -> str | None:
        return None if _sources()[self.kind].takes_argument else self.root


def parse_reference(spec: str, option: str = "--exclude-near") -> ReferenceSpec:
    kind, _, rest = spec.partition(":")
    accepted = f"accepted: {reference_forms()}"
    if kind not in _sources():
        raise UserError(f"unknown reference set {spec!r}; {accepted}", option=option)
    cls = _sources()[kind]
    parts = rest.rsplit(":", 1) if rest else []
    if cls.root_optional and len(parts) == 1 and "/" not in parts[0]:
        return ReferenceSpec(spec, kind, None, parts[0])
    if len(parts) == 2 and parts[1] and "/" not in parts[1] and parts[0]:
        root, split = parts
    else:
        root, split = rest or None, cls.reference_split
    if not cls.root_optional and not root:
        raise UserError(f"reference set {spec!r} names no {'dataset' if cls.takes_argument else 'files'}; "
                        f"{accepted}", option=option)
    return ReferenceSpec(spec, kind, root, split)


def source_forms() -> str:
    """``--source``'s accepted forms, for help texts: ``fashion-mnist | imagefolder | ... | wds:SHARDS``."""
    return " | ".join(cls.form for cls in _sources().values())


def reference_forms() -> str:
    """A reference set's form with one example per source kind, for help texts and errors."""
    return "KIND[:ROOT][:SPLIT], e.g. " + ", ".join(cls.reference_example for cls in _sources().values())


_QUANTILE_RE = re.compile(r"^q(0?\.\d+|0|1(\.0*)?)$")


def parse_threshold(value: float | str, option: str, precision: bool = False) -> tuple[str, float]:
    """A threshold given as a similarity (``0.99``), as a quantile of the build's own scores (``q0.999``) or,
    where ``precision`` allows it (``--min-similarity``), as a precision target resolved on the reviewed sample
    (``precision:0.9``: the lowest threshold whose pairs keep that precision, ``review/estimate.py``).

    Returns ``("value", x)``, ``("quantile", q)`` or ``("precision", p)``.
    """
    text = str(value).strip()
    wrong = UserError(f"got {text!r}; accepted: a similarity in [-1, 1] or a quantile q0..q1 (e.g. q0.999)"
                      + (" or a precision target precision:P (e.g. precision:0.9)" if precision else ""),
                      option=option)
    if precision and text.startswith("precision:"):
        try:
            target = float(text[len("precision:"):])
        except ValueError:
            raise wrong from None
        if not 0.0 < target < 1.0:
            raise wrong
        return "precision", target
    if text.startswith("q"):
        if not _QUANTILE_RE.match(text) or not 0.0 <= float(text[1:]) <= 1.0:
            raise wrong
        return "quantile", float(text[1:])
    try:
        number = float(text)
    except ValueError:
        raise wrong from None
    if not -1.0 <= number <= 1.0:
        raise wrong
    return "value", number


def resolve_threshold(given: float | str, scores: np.ndarray, option: str) -> float:
    """A threshold's value: as given, or that quantile of ``scores`` (1.0 when there are none); a precision
    target is resolved by the mine stage before this is asked (``pairing/mine.py``)."""
    kind, value = parse_threshold(given, option)
    if kind == "value":
        return value
    return float(np.quantile(scores, value)) if len(scores) else 1.0


def check_threshold_order(min_similarity: float, dup_threshold: float | None) -> None:
    if dup_threshold is not None and dup_threshold <= min_similarity:
        raise UserError(f"the duplicate threshold ({dup_threshold:.6g}) must be above the minimum similarity "
                        f"({min_similarity:.6g}), or no pair can pass both", option="--dup-threshold")


def parse_encoder(spec: str) -> EncoderSpec:
    """One encoder string in the words of the library that provides the model (open_clip's own ``hf-hub:`` and
    ``local-dir:`` schemes included)."""
    kind, _, rest = spec.partition(":")
    if kind not in ENCODER_KINDS or not rest:
        raise UserError(f"unknown encoder {spec!r}; accepted: {ENCODER_FORMS}", option="--encoder")
    if kind == "openclip":
        if rest.startswith(("hf-hub:", "local-dir:")):
            scheme, _, where = rest.partition(":")
            if not where:
                raise UserError(f"{spec!r} names no {'repository' if scheme == 'hf-hub' else 'folder'} "
                                f"after {scheme}:", option="--encoder")
            return EncoderSpec(kind, rest)
        model, _, pretrained = rest.partition(":")
        return EncoderSpec(kind, model, pretrained or None)
    if kind in ("timm", "torchvision"):
        model, _, weights = rest.partition(":")
        if not model or (kind == "torchvision" and not weights):
            raise UserError(f"{spec!r}: accepted {'torchvision:ARCH:CHECKPOINT (or :random)' if kind == 'torchvision' else 'timm:MODEL[.TAG][:FILE|:random]'}",
                            option="--encoder")
        return EncoderSpec(kind, model, weights or None)
    if kind == "pixels" and not (rest.isascii() and rest.isdigit() and 8 <= int(rest) <= MAX_PIXELS_SIZE):
        raise UserError(f"{spec[:60]!r}: accepted pixels:SIZE, a side from 8 to {MAX_PIXELS_SIZE} px (e.g. pixels:32)",
                        option="--encoder")
    return EncoderSpec(kind, rest)


_WHITEN_RE = re.compile(r"^(none|center|pca|keep)(?::(\d{1,6}))?$")


def parse_whiten(value: str) -> tuple[str, int | None]:
    """``--whiten``: ``none``, ``center``, ``pca``, ``pca:DIM`` or ``keep`` (the build's stored scale)."""
    match = _WHITEN_RE.match(str(value).strip())
    if not match or (match.group(2) and match.group(1) != "pca") or match.group(2) == "0":
        raise UserError(f"got {str(value)[:40]!r}; accepted: none, center, pca, pca:DIM (e.g. pca:128) or keep",
                        option="--whiten")
    return match.group(1), int(match.group(2)) if match.group(2) else None


#: The largest size an option takes: far beyond any machine, still an int64 everywhere it goes.
MAX_SIZE = 2**62


def max_workers() -> int:
    """The most decode processes a command may start: 4 per core (at least 8); more only fills memory."""
    import os

    return max(8, 4 * (os.cpu_count() or 1))


def parse_size(value: int | str) -> int:
    """Parse ``500MB``, ``64MiB``, ``1e6`` or an int into a byte count (units through pydantic's ``ByteSize``:
    decimal kB, MB, GB, TB and binary KiB, MiB, GiB, TiB); a ``ValueError`` naming what is accepted otherwise."""
    from pydantic import ByteSize, TypeAdapter

    wrong = ValueError(f"not a size: {str(value)[:40]!r} (use bytes or a unit, e.g. 500MB, 64MiB, 1e9; at most "
                       f"{MAX_SIZE:,} bytes)")
    if isinstance(value, bool):
        raise wrong
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip()
        try:
            number = int(text) if text.isdigit() else float(text)
        except ValueError:
            try:
                size = int(TypeAdapter(ByteSize).validate_python(text))
            except ValidationError:
                raise wrong from None
        else:
            if number != number or number in (float("inf"), float("-inf")):
                raise wrong
            size = int(number)
    if not 0 <= size <= MAX_SIZE:
        raise wrong
    return size


def knob(default: Any = ..., *, help: str, stage: str | None, option: str = "value", cli_min: int | None = None,
         build: bool = True, required: bool = False, **field: Any) -> Any:
    """A recipe field that is also a command-line option, declared once: its help (``{sources}`` and
    ``{references}`` name the registered source kinds), the stage whose fingerprint it joins (with every stage
    after it; None: it changes how a build runs, not what it makes), how the CLI takes it (``value``: an
    integer where the field is one, else text; ``text``: text always, e.g. ``8GB``; ``path``; ``flag``: a
    ``--x/--no-x`` pair; ``list``: repeatable), the option's own lower bound, whether ``build`` offers it and
    whether the option must be given (a recipe file gives the others) (``cli.py`` makes ``build``'s and the
    stage commands' options from these)."""
    extra = {"stage": stage, "option": option, "min": cli_min, "build": build, "required": required}
    if "default_factory" in field:
        return Field(description=help, json_schema_extra=extra, **field)
    return Field(default, description=help, json_schema_extra=extra, **field)


#: How a build's partner choice reads after "at most N per anchor" (nothing for the default, the nearest).
PARTNER_WORDS = {"nearest": "", "random": " (drawn at random among those that pass)",
                 "farthest": " (the least similar that pass)"}


class Recipe(BaseModel):
    """Everything that determines a build's output: each field is also the option of that name."""

    model_config = ConfigDict(extra="forbid")

    name: str = knob(help="release name", stage="export")
    description: str = knob("", help="free text for the dataset card (a recipe file holds it)", stage="export",
                            build=False)
    license: str = knob("other", help="license id for the dataset card", stage="export")
    source: str = knob(help="{sources}", stage="index", required=True)
    root: str | None = knob(None, help="where the source's files are", stage="index", option="path")
    split: str = knob("train", help="source split, e.g. train | test | val", stage="index")
    limit: int | None = knob(None, help="take the first N images in source order", stage="index", cli_min=0,
                             ge=0, le=2**62)
    image_column: str | None = knob(None, help="hf sources: the image column [default: detected]", stage="index")
    label_column: str | None = knob(None, help="hf sources: the label column [default: detected]", stage="index")

    encoder: str = knob("openclip:ViT-B-32", help="openclip:MODEL[:TAG|:FILE] | openclip:hf-hub:ORG/NAME | "
                        "openclip:local-dir:PATH | timm:MODEL[.TAG][:FILE|:random] | torchvision:ARCH:CHECKPOINT | "
                        "ssl:RUN | pixels:SIZE", stage="embed")
    #: The key prefix of the backbone's weights in a ``torchvision:`` checkpoint, when it is none of those
    #: recognised (MoCo's ``module.encoder_q.``/``module.base_encoder.``, solo-learn's ``backbone.``, ...).
    encoder_prefix: str | None = knob(None, help="key prefix of the backbone in a torchvision: checkpoint "
                                      "[recognised: MoCo, solo-learn, lightly]", stage="embed")
    image_size: int | None = knob(None, help="encoder input size override", stage="embed", ge=8, le=1024)
    batch_size: int = knob(128, help="images per encoder batch", stage=None, cli_min=1, ge=1)
    workers: int | None = knob(None, help="decode processes [default: spare cores]", stage=None, cli_min=0, ge=0)
    chunk_size: int = knob(50_000, help="images per embedding chunk (resume unit)", stage=None, cli_min=1, ge=1)
    #: Where the embed stage decodes JPEGs: on the encoder's device in batches (nvJPEG on a GPU), with
    #: Pillow for the rest, or Pillow for all; auto = the device on a GPU, Pillow on the CPU.
    decode: Literal["auto", "device", "pillow"] = knob(
        "auto", help="where the embed stage decodes JPEGs: auto (the GPU when there is one) | device | pillow",
        stage="embed")

    k: int = knob(16, help="neighbours searched per image", stage="mine", cli_min=1, ge=1, le=4096)
    category: Literal["label", "zeroshot", "cluster", "none"] = knob(
        "label", help="what 'same category' means: label | zeroshot | cluster | none", stage="mine")
    class_names: str | None = knob(None, help="class names, one per line (for --category zeroshot)", stage="mine",
                                   option="path")
    clusters: int = knob(100, help="k-means clusters (for --category cluster)", stage="mine", cli_min=2, ge=2,
                         le=1_000_000)
    #: Similarity thresholds: a cosine similarity, or a quantile of the build's own candidate similarities
    #: (``q0.2``), resolved by the mine stage and recorded in ``mine_stats.json``.
    min_similarity: float | str = knob(
        "q0.1", help="minimum cosine similarity of a pair (0.5), or a quantile of the build's candidate "
        "similarities (q0.2)", stage="mine")
    #: An embedding similarity at or above which a pair counts as a duplicate: off by default (None), since
    #: near-duplicates are decided by picture content (``copy_threshold``), which no encoder's scale moves.
    dup_threshold: float | str | None = knob(
        None, help="also count pairs at or above this embedding similarity (0.985) or quantile (q0.999) as "
        "near-duplicates [default: none; duplicates are decided by picture, --copy-threshold]", stage="mine")
    #: The copy score (``leakage/copies.py``: normalised cross-correlation of small grayscale renderings,
    #: crops and rescaling allowed) at or above which two pictures are one: never a pair. None: off. Every
    #: pair the other rules would keep is compared (``pairing/mine.py:mine_without_copies``).
    copy_threshold: float | None = knob(
        0.993, help="copy score (grayscale cross-correlation, crops and rescaling allowed) at or above which two "
        "pictures are one and never a pair [0.993; none: off]", stage="mine", ge=0.0, le=1.0)
    #: The similarity scale: none, center, or PCA-whitening (pca, pca:DIM), fitted on the build's embeddings
    #: and applied before the kNN search (``pairing/whiten.py``); keep: the one the build stored before.
    whiten: str = knob("pca", help="similarity scale fitted on the build before kNN: none | center | pca | "
                       "pca:DIM | keep (the scale this build stored before, so thresholds keep their meaning "
                       "as the source grows) [pca]", stage="mine")
    max_per_anchor: int = knob(2, help="pairs kept per anchor", stage="mine", cli_min=1, ge=1)
    #: Which of an anchor's candidates that pass the rules become its partners: the most similar, a seeded
    #: random draw among them, or the least similar (with --category label: the farthest same-label of the k).
    partner: Literal["nearest", "random", "farthest"] = knob(
        "nearest", help="which of an anchor's candidates become its --max-per-anchor partners: nearest | random "
        "(seeded, among the k) | farthest (the least similar that passes the rules)", stage="mine")
    mutual: bool = knob(False, help="keep mutual neighbours only", stage="mine", option="flag")
    pairs_per_class: int | None = knob(None, help="cap and balance pairs per category", stage="mine", cli_min=1,
                                       ge=1)
    index: Literal["auto", "flat", "ivf-flat", "ivf-pq"] = knob(
        "auto", help="kNN index: auto | flat | ivf-flat | ivf-pq", stage="mine")
    memory: int = knob(8 * 10**9, help="memory budget for the kNN index, e.g. 8GB", stage="mine", option="text",
                       ge=1)
    nprobe: int | None = knob(None, help="IVF lists probed per query", stage="mine", cli_min=1, ge=1)
    seed: int = knob(0, help="random seed", stage="mine", ge=0, le=2**32 - 1)

    #: Reference (evaluation) sets whose near-copies never enter a pair, and the copy-score threshold.
    exclude_near: list[str] = knob(
        help="a reference set whose near-copies never enter a pair, {references} (repeatable)", stage="exclude",
        option="list", default_factory=list)
    exclude_threshold: str = knob(
        "0.99", help="copy score at or above which an image is a near-copy (0.99), or a quantile of the build's "
        "own scores (q0.999)", stage="exclude")

    grid_pairs: int = knob(24, help="pairs in each of the report's grids (a recipe file holds it)", stage="report",
                           build=False, ge=1)
    #: Which pairs a release holds: all, or those the review page's decisions accepted / did not reject.
    reviewed: Literal["all", "accepted", "not-rejected"] = knob(
        "all", help="which pairs the release holds: all | accepted (a reviewer accepted, none rejected) | "
        "not-rejected (no reviewer rejected); decisions come from `spp-curate review`", stage="export", build=False)
    engine: Literal["local", "ray"] = knob("local", help="local | ray (a cluster at RAY_ADDRESS, or a local one)",
                                           stage=None)

    shard_size: int = knob(500 * 10**6, help="release shard size, e.g. 500MB", stage="export", option="text", ge=1)
    images: Literal["embed", "none"] = knob("embed", help="embed | none (an ID-only release: keys and digests)",
                                            stage="export")
    max_side: int | None = knob(None, help="shrink release images larger than this", stage="export", cli_min=8,
                                ge=8)
    layout: Literal["images", "pairs"] = knob(
        "images", help="images (each picture stored once, pairs as rows of keys: the release is the size of its "
        "pictures) | pairs (both pictures in every pair row and in WebDataset pair samples: for small releases, "
        "where a Hub viewer of side-by-side pairs is worth about six times the bytes)", stage="export")
    webdataset: bool = knob(False, help="with --layout images, also write the pictures as WebDataset tars (for "
                            "streaming; a second copy of every picture)", stage="export", option="flag")
    redistribute: bool = knob(True, help="whether the source's pictures may be published; a recipe of a source "
                              "that may not (ImageNet) sets false, and push then refuses a release with pixels "
                              "unless --i-hold-the-rights", stage="export", option="flag")

    #: What the source held when this build looked (``Source.state()``); part of every fingerprint.
    _source_state: str | None = PrivateAttr(default=None)
    #: The source's listing taken when the state was (``stages.bind_source_state``): the index stage reads it
    #: instead of walking and stat'ing the source again. Not part of any fingerprint.
    _listing: Any = PrivateAttr(default=None)
    #: What the ``exclude_near`` reference sets hold (``leakage.exclude.reference_state``), when there are any.
    _reference_state: str | None = PrivateAttr(default=None)

    @field_validator("workers")
    @classmethod
    def _workers_bound(cls, value: int | None) -> int | None:
        if value is not None and value > max_workers():
            raise ValueError(f"at most {max_workers()} on this machine (4 per core)")
        return value

    @field_validator("shard_size", "memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        parse_source(value)
        return value

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, value: str) -> str:
        parse_encoder(value)
        return value

    @field_validator("exclude_near")
    @classmethod
    def _references(cls, value: list[str]) -> list[str]:
        for spec in value:
            parse_reference(spec)
        if len(set(value)) != len(value):
            raise ValueError("a reference set is named twice")
        return value

    @field_validator("min_similarity", "dup_threshold", mode="before")
    @classmethod
    def _similarity_threshold(cls, value: Any, info: Any) -> float | str | None:
        if info.field_name == "dup_threshold" and (value is None or str(value).strip().lower() in ("none", "off")):
            return None
        kind, number = parse_threshold(value, option_name(info.field_name),
                                       precision=info.field_name == "min_similarity")
        return number if kind == "value" else str(value).strip()

    @field_validator("copy_threshold", mode="before")
    @classmethod
    def _copy_threshold(cls, value: Any) -> Any:
        return None if value is None or str(value).strip().lower() in ("none", "off") else value

    @field_validator("whiten")
    @classmethod
    def _whiten(cls, value: str) -> str:
        parse_whiten(value)
        return value.strip()

    @field_validator("exclude_threshold", mode="before")
    @classmethod
    def _exclude_threshold(cls, value: Any) -> str:
        parse_threshold(value, "--exclude-threshold")
        return str(value).strip()

    @property
    def precision_target(self) -> float | None:
        """``--min-similarity precision:P``: the precision the reviewed sample must give the pairs kept."""
        text = str(self.min_similarity)
        return float(text[len("precision:"):]) if text.startswith("precision:") else None

    @property
    def references(self) -> list[ReferenceSpec]:
        return [parse_reference(s) for s in self.exclude_near]

    @property
    def source_spec(self) -> SourceSpec:
        return parse_source(self.source)

    @property
    def encoder_spec(self) -> EncoderSpec:
        return parse_encoder(self.encoder)

    @model_validator(mode="after")
    def _thresholds(self) -> "Recipe":
        if isinstance(self.min_similarity, float) and isinstance(self.dup_threshold, float):
            check_threshold_order(self.min_similarity, self.dup_threshold)
        return self

    def with_source_state(self, state: str, reference_state: str | None = None) -> "Recipe":
        """This recipe, bound to what the source holds now: a changed source changes every fingerprint;
        and to what its reference sets hold: a changed set changes the prints from the exclude stage on."""
        bound = self.model_copy()
        bound._source_state = state
        bound._reference_state = reference_state
        return bound

    @property
    def source_state(self) -> str | None:
        return self._source_state

    def listing_identity(self) -> tuple:
        """What a listing of this recipe's source depends on."""
        return (self.source, self.root, self.split, self.limit, self.image_column, self.label_column)

    def attach_listing(self, listing: Any) -> None:
        self._listing = (self.listing_identity(), listing)

    @property
    def listing(self) -> Any:
        """The listing attached with the state, if it is of the source this recipe names (a recipe copied for a
        reference set names another source, and walks its own)."""
        if self._listing is None or self._listing[0] != self.listing_identity():
            return None
        return self._listing[1]

    def fingerprint(self, stage: str, source_state: bool = True) -> str:
        """Hash of the fields ``stage`` and every stage before it depend on, and of the source's state.

        An encoder read from a file (``ssl:RUN/last.pt``, ``openclip:MODEL:/weights``) counts
        with the file's size and modification time, so retraining a run in place re-embeds; an
        added, removed or edited source image changes the source state and so every stage's print.
        ``source_state=False`` leaves the source's state out: what the index and embed stages reuse
        image by image depends on the recipe alone.
        """
        upto = STAGES[: STAGES.index(stage) + 1]
        fields = {f: getattr(self, f) for s in upto for f in STAGE_FIELDS[s]}
        if fields.get("encoder_prefix", "") is None:  # unset: the prints of builds made before the option stand
            del fields["encoder_prefix"]
        if fields.get("partner") == "nearest":  # the choice before the option existed: those prints stand too
            del fields["partner"]
        if "encoder" in fields:
            weights = self.encoder_spec.weights_file
            stat = weights.stat() if weights else None
            fields["encoder_file"] = file_identity(stat) if stat else None
        fields["source_state"] = self._source_state if source_state else None
        if source_state and "exclude_near" in fields and self._reference_state is not None:
            fields["reference_state"] = self._reference_state
        return short_hash(json.dumps(fields, sort_keys=True))


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _raise_validation(err: ValidationError) -> None:
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "recipe"
    msg = first["msg"]
    if not first["loc"] and first["type"] == "value_error":  # a rule across fields (model validator)
        raise UserError(msg.removeprefix("Value error, "), option="--dup-threshold") from None
    if first["type"] == "literal_error":
        msg = f"got {repr(first['input'])[:60]}; accepted: {first['ctx']['expected']}"
    elif first["type"] == "extra_forbidden":
        raise UserError(f"unknown recipe field {field!r}") from None
    else:
        msg = f"{msg.removeprefix('Value error, ')} (got {str(first.get('input'))[:60]!r})"
    raise UserError(msg, option=option_name(field)) from None


#: A recipe file's limits: its size, and its YAML nodes counted with every alias expanded (a "billion laughs"
#: file of a few hundred bytes expands to gigabytes), and how deep they nest.
MAX_RECIPE_BYTES = 256 * 2**10
MAX_RECIPE_NODES = 20_000
MAX_RECIPE_DEPTH = 32


def _check_yaml_size(node: yaml.Node, path: Path) -> None:
    """Refuse a YAML node graph whose expansion is over the node or depth limit, before building it."""
    count, stack = 0, [(node, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_NODES or depth > MAX_RECIPE_DEPTH:
            what = f"{MAX_RECIPE_NODES:,} values" if count > MAX_RECIPE_NODES else f"{MAX_RECIPE_DEPTH} levels"
            raise UserError(f"{path} expands past {what} (aliases or nesting); a recipe is a flat mapping of "
                            "fields", option="--recipe")
        if isinstance(item, yaml.MappingNode):
            stack.extend((part, depth + 1) for pair in item.value for part in pair)
        elif isinstance(item, yaml.SequenceNode):
            stack.extend((part, depth + 1) for part in item.value)


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """A recipe YAML file: at most :data:`MAX_RECIPE_BYTES`, UTF-8, safe YAML within the node and depth limits."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"{path} is not a regular file", option="--recipe")
        text = read_capped(path, MAX_RECIPE_BYTES, path.name).decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_yaml_size(node, path)
        data = yaml.safe_load(text) or {}
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", option="--recipe") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text (UTF-8 YAML expected)", option="--recipe") from None
    except RecursionError:
        raise UserError(f"{path} expands past {MAX_RECIPE_DEPTH} levels (nesting); a recipe is a flat mapping of "
                        "fields", option="--recipe") from None
    except yaml.YAMLError as exc:
        first = brief(exc, 200)
        raise UserError(f"{path} is not valid YAML: {first}", option="--recipe") from None
    except ValueError as exc:  # over the size limit
        raise UserError(f"{path}: {exc}", option="--recipe") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of recipe fields", option="--recipe")
    return data


def resolve_recipe(source: str, overrides: dict[str, Any], recipe_file: str | None = None) -> Recipe:
    """Merge a source's manifest (or ``recipe_file``) with non-None CLI overrides."""
    kind = parse_source(source).kind
    if recipe_file:
        base = load_recipe_file(recipe_file)
    else:
        manifest = MANIFEST_DIR / f"{kind}.yaml"
        base = load_recipe_file(manifest) if manifest.exists() else {"name": kind}
    merged = {**base, "source": source, **{k: v for k, v in overrides.items() if v is not None}}
    encoder = overrides.get("encoder")
    if (isinstance(encoder, str) and encoder.startswith(("ssl:", "pixels:")) and encoder != base.get("encoder")
            and overrides.get("image_size") is None):
        # The base's input size belongs to the base's encoder; a trainer checkpoint is embedded at the size
        # it was trained at (its own, read from it), raw pixels at the size their spec names, unless
        # --image-size says otherwise.
        merged["image_size"] = None
    try:
        return Recipe(**merged)
    except ValidationError as err:
        _raise_validation(err)
        raise  # unreachable


def validate_recipe(data: dict[str, Any]) -> Recipe:
    try:
        return Recipe(**data)
    except ValidationError as err:
        _raise_validation(err)
        raise


LIBRARIES = ("spp-curate", "torch", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12", "numpy", "pyarrow",
              "pillow", "datasets", "webdataset", "huggingface_hub")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_recipe(build_dir: Path, recipe: Recipe) -> None:
    build_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(build_dir / layout.BUILD_RECIPE) as tmp:
        tmp.write_text(yaml.safe_dump({"recipe": recipe.model_dump(), "versions": library_versions()},
                                      sort_keys=False))


def load_recipe(build_dir: Path) -> Recipe:
    path = build_dir / layout.BUILD_RECIPE
    if not path.is_file():
        raise UserError(f"{build_dir} is not a build directory (no build.yaml); start one with "
                        "`spp-curate build --source ...`", option="DIR")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} cannot be read ({first}); rerun `spp-curate build` with the options you want "
                        "to write it anew", option="DIR") from None
    if not isinstance(data, dict) or not isinstance(data.get("recipe", {}), dict):
        raise UserError(f"{path} does not hold a recipe mapping", option="DIR")
    return validate_recipe(data.get("recipe", {}))


#: Which recipe fields each stage's output depends on (with those of the stages before it): the ``stage`` each
#: field declares.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    stage: tuple(n for n, f in Recipe.model_fields.items() if (f.json_schema_extra or {}).get("stage") == stage)
    for stage in STAGES}
