"""What a study runs: its settings, checked once, and the list of releases and runs they make.

A study (arXiv 2510.08722's design) compares, on one labelled source, runs that
differ in their positives alone:

* **pair sets** (releases built by the pair rules): ``sampler`` (semantic pairs
  the sampler mines with ``--category none``), ``label`` (pairs of the same label,
  the ceiling, where the source has labels), and one per ablation of the partner
  choice or the partners per anchor;
* **modes** on each pair set: ``augment`` (the matched control: the same anchors,
  class histogram and steps, the partners unused), ``semantic`` (the partner
  replaces the second augmentation) and ``both`` (all three views);
* **references**: raw pixels (from every evaluation), the single-image run of each
  method (every picture of the source), and a supervised run of the same backbone
  and budget.

Every run is a folder named by its settings' digest, so a study run again with
the same settings reuses what is done and continues a run it left.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..backbones import BACKBONES
from ..errors import UserError
from ..train.data import POSITIVE_MODES
from ..train.methods import METHODS

#: ``--quick``: what fits a 2-core CPU in under 45 minutes with every method, mode and 3 seeds (the label pairs,
#: the ceiling, only when asked for: they would add two thirds of the runs).
QUICK = {"limit": 3_000, "eval_limit": 3_000, "epochs": 3, "label_pairs": False}
#: The ablations a study takes (``--ablate AXIS:VALUE``): partner choice, partners per anchor, self-pair rate.
ABLATIONS = {"partner": ("nearest", "random", "farthest"), "partners": "a whole number from 2 to 16",
             "self-pairs": "a share from 0 to 1"}
#: The label pairs (the ceiling): each picture's partners drawn at random among its ``LABEL_K`` nearest of the
#: same label, ``LABEL_PARTNERS`` of them, one drawn per epoch. Two different pictures of one class, as the
#: papers' semantic pairs are; the nearest same-label picture alone adds little that augmentation does not
#: (measured: BENCHMARKS.md, the study's label pairs).
LABEL_K = 256
LABEL_PARTNERS = 8


@dataclass(frozen=True)
class PairSet:
    """One release of the study: its name and the recipe options that differ from the study's base recipe."""

    name: str
    options: dict[str, Any]
    what: str  # in words, for the report

    @property
    def digest(self) -> str:
        return _digest(self.options)


@dataclass(frozen=True)
class Run:
    """One training run and what it is compared as: ``kind`` is pairs, single or supervised."""

    kind: str
    method: str
    mode: str
    seed: int
    pair_set: str | None = None
    self_pairs: float = 0.0
    ablation: str | None = None  # the ablation this run measures (``partner:random``), None for the main grid

    @property
    def label(self) -> str:
        if self.kind == "pairs":
            extra = f", self pairs {self.self_pairs:g}" if self.self_pairs else ""
            return f"{self.method} {self.mode} on {self.pair_set} pairs{extra}, seed {self.seed}"
        return f"{self.method if self.kind == 'single' else 'supervised'} on single images, seed {self.seed}"


@dataclass
class StudyConfig:
    out: str
    source: str
    root: str | None = None
    test_root: str | None = None
    sampler: str = "pixels:32"  # an --encoder, or "ssl": the SePP-ID loop (the first method's single-image run)
    methods: tuple[str, ...] = tuple(METHODS)
    modes: tuple[str, ...] = POSITIVE_MODES
    seeds: int = 3
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.06
    backbone: str = "small-cnn-grid"
    image_size: int = 32
    limit: int | None = None  # training pictures of the source (the first N)
    eval_limit: int | None = None  # pictures of each evaluation split (the first N)
    ks: tuple[int, ...] = (200, 20)
    k: int = 8  # neighbours searched per picture when mining
    label_pairs: bool = True
    references: bool = True
    transfer: tuple[str, ...] = ()
    ablations: tuple[str, ...] = ()
    workers: int | None = None

    def check(self) -> None:
        for option, values, accepted in (("--methods", self.methods, tuple(METHODS)),
                                         ("--modes", self.modes, POSITIVE_MODES)):
            wrong = [v for v in values if v not in accepted]
            if wrong or not values:
                raise UserError(f"got {','.join(wrong or values)[:60]!r}; accepted: a comma-separated list of "
                                f"{', '.join(accepted)}", option=option)
        if self.backbone not in BACKBONES:
            raise UserError(f"got {self.backbone!r}; accepted: {', '.join(BACKBONES)}", option="--backbone")
        for option, value, low, high in (("--seeds", self.seeds, 1, 100), ("--epochs", self.epochs, 1, 100_000),
                                         ("--batch-size", self.batch_size, 2, 1 << 20), ("--k", self.k, 1, 4096)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(f"got {str(value)[:40]}; accepted: a whole number from {low} to {high:,}",
                                option=option)
        for value in self.ablations:
            parse_ablation(value)
        for value in self.transfer:
            transfer_set(value)
        if self.sampler != "ssl":
            from ..config import parse_encoder

            parse_encoder(self.sampler)

    # What a run's folder is named by: everything that changes what it computes.
    def run_settings(self, run: Run, pair_digest: str | None) -> dict[str, Any]:
        settings = {"kind": run.kind, "method": run.method, "mode": run.mode, "seed": run.seed,
                    "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "backbone": self.backbone,
                    "image_size": self.image_size}
        if run.kind == "pairs":
            settings.update(pairs=pair_digest, self_pairs=run.self_pairs)
        else:
            settings.update(source=self.source, root=self.root, limit=self.limit)
        return settings

    def base_recipe(self) -> dict[str, Any]:
        """The build options every pair set shares (the demo's: one partner per anchor, every candidate the
        rules keep, whitened similarities)."""
        return {"root": self.root, "limit": self.limit, "image_size": None, "min_similarity": "q0",
                "max_per_anchor": 1, "k": self.k, "workers": self.workers}

    def pair_sets(self, sampler_encoder: str, labelled: bool) -> list[PairSet]:
        sets = [PairSet("sampler", {"encoder": sampler_encoder, "category": "none"},
                        f"semantic pairs: each picture's nearest neighbour by the sampler ({sampler_encoder}, "
                        "whitened), no labels used")]
        if labelled and self.label_pairs:
            sets.append(PairSet("label", {"encoder": sampler_encoder, "category": "label", "k": LABEL_K,
                                          "partner": "random", "max_per_anchor": LABEL_PARTNERS},
                                f"label pairs (the ceiling): {LABEL_PARTNERS} partners a picture, drawn at random "
                                f"among its {LABEL_K} nearest of the same label (one drawn per epoch)"))
        base = sets[-1]
        for value in self.ablations:
            axis, arg = parse_ablation(value)
            if axis == "partner":
                drawn = {"nearest": "nearest of the k", "random": "at random among the k",
                         "farthest": "farthest of the k"}[arg]
                sets.append(PairSet(f"{base.name}-partner-{arg}", {**base.options, "partner": arg},
                                    f"{base.name} pairs with the partner drawn {drawn}"))
            elif axis == "partners":
                sets.append(PairSet(f"{base.name}-partners-{arg}", {**base.options, "max_per_anchor": int(arg)},
                                    f"{base.name} pairs, {arg} partners per anchor (one drawn per epoch)"))
        return sets

    def runs(self, pair_sets: list[PairSet]) -> list[Run]:
        """Every run, seeds outermost: after a seed's round every comparison has one more sample."""
        # the base pair_sets() built the ablations on: the label pairs when there are some
        ablation_base = "label" if any(s.name == "label" for s in pair_sets) else "sampler"
        main = [s for s in pair_sets if s.name in ("sampler", "label")]
        runs: list[Run] = []
        for seed in range(self.seeds):
            if self.references:
                runs += [Run("single", m, "augment", seed) for m in self.methods]
                runs.append(Run("supervised", "supervised", "labels", seed))
            for method in self.methods:
                for pair_set in main:
                    runs += [Run("pairs", method, mode, seed, pair_set.name) for mode in self.modes]
            method = self.methods[0]  # ablations: the first method, in `both` against its own control
            for value in self.ablations:
                axis, arg = parse_ablation(value)
                if axis == "self-pairs":
                    runs.append(Run("pairs", method, "both", seed, ablation_base, float(arg), ablation=value))
                else:
                    name = f"{ablation_base}-{axis}-{arg}"
                    runs += [Run("pairs", method, mode, seed, name, ablation=value) for mode in ("augment", "both")]
            if self.ablations:  # each ablation is read against the base set's both and augment runs
                runs += [Run("pairs", method, mode, seed, ablation_base) for mode in ("augment", "both")]
        return list(dict.fromkeys(runs))

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("out", "workers")}


def with_quick(cfg: StudyConfig, given: set[str]) -> StudyConfig:
    """``--quick``'s sizes, where the options were not given."""
    return replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})


def parse_ablation(value: str) -> tuple[str, str]:
    axis, _, arg = str(value).partition(":")
    accepted = "partner:nearest, partner:random, partner:farthest, partners:N (2 to 16), self-pairs:SHARE (0 to 1)"
    if axis == "partner" and arg in ABLATIONS["partner"]:
        return axis, arg
    if axis == "partners" and arg.isdigit() and 2 <= int(arg) <= 16:
        return axis, arg
    if axis == "self-pairs":
        try:
            share = float(arg)
        except ValueError:
            share = -1.0
        if 0.0 < share <= 1.0:
            return axis, f"{share:g}"
    raise UserError(f"got {str(value)[:40]!r}; accepted: {accepted}", option="--ablate")


@dataclass(frozen=True)
class EvalSet:
    """A labelled train/test split a study evaluates on: the source's own, or a transfer set."""

    name: str
    source: str
    root: str | None
    test_root: str | None


def transfer_set(value: str) -> EvalSet:
    """``fashion-mnist[:ROOT]`` (its own splits) or ``imagefolder:ROOT`` (``ROOT/train`` and ``ROOT/test``)."""
    kind, _, root = str(value).partition(":")
    if kind == "fashion-mnist":
        return EvalSet(value, "fashion-mnist", root or None, None)
    if kind == "imagefolder" and root:
        base = Path(root)
        for split in ("train", "test"):
            if not (base / split).is_dir():
                raise UserError(f"{value}: no {split}/ folder under {root} (a transfer image folder holds train/ "
                                "and test/, one folder per class in each)", option="--transfer")
        return EvalSet(value, "imagefolder", str(base / "train"), str(base / "test"))
    raise UserError(f"got {str(value)[:60]!r}; accepted: fashion-mnist[:ROOT] | imagefolder:ROOT (with ROOT/train "
                    "and ROOT/test)", option="--transfer")


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=5).hexdigest()


def run_digest(settings: dict[str, Any]) -> str:
    return _digest(settings)
