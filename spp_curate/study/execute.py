"""Running a study: the pair sets built, every run trained and evaluated, each reused when already done.

Layout of ``OUT``::

    study.lock, plan.json          the settings of the last invocation
    releases/<set>-<digest>/       one build per pair set (release under it; the build's own reuse applies)
    runs/<set|single|supervised>/<method>-<mode>-s<seed>-<digest>/
                                   a run (last.pt, metrics.jsonl, settings.json) and one eval-<set>.json per
                                   evaluation set, each keeping the evaluation's settings
    report/index.html, report/study.json, report/*.png
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import layout
from ..checkpoint import CHECKPOINT, load_checkpoint
from ..config import resolve_recipe
from ..errors import UserError
from ..files import BuildLock, read_json, write_json
from ..stages import build
from ..train.evaluate import evaluate
from ..train.loop import TrainConfig, train
from .plan import EvalSet, PairSet, Run, StudyConfig, run_digest, transfer_set
from .supervised import SupervisedConfig, train_supervised


def run_study(cfg: StudyConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, train and evaluate everything ``cfg`` asks for (reusing what is done) and write the report."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with BuildLock(out, option="--out"):
        write_json(out / "plan.json", cfg.settings())
        eval_sets = [EvalSet("test", cfg.source, cfg.root, cfg.test_root)] + [transfer_set(t) for t in cfg.transfer]
        runner = _Runner(cfg, out, eval_sets, say)
        sampler = cfg.sampler
        if sampler == "ssl":  # the SePP-ID loop: the first method's single-image run, seed 0, is the sampler
            first = Run("single", cfg.methods[0], "augment", 0)
            say(f"the sampler: {first.label} (the SePP-ID loop's self-supervised sampler)")
            sampler = f"ssl:{runner.train(first)[0] / CHECKPOINT}"
        sets = cfg.pair_sets(sampler, labelled=True)
        say(f"[release 1 of {len(sets)}] {sets[0].name}: {sets[0].what}")
        built = {"sampler": runner.build(sets[0])}
        _warn_cut_classes(Path(built["sampler"]["build"]), cfg, say)
        if built["sampler"]["precision"] is None:  # no labels: no label pairs, ablations on the sampler's pairs
            if cfg.label_pairs:
                say("label pairs: left out, the source's pictures have no labels")
            sets = cfg.pair_sets(sampler, labelled=False)
        for n, pair_set in enumerate(sets[1:], 2):
            say(f"[release {n} of {len(sets)}] {pair_set.name}: {pair_set.what}")
            built[pair_set.name] = runner.build(pair_set)
        runs = cfg.runs(sets)
        if built["sampler"]["precision"] is None:
            runs = [r for r in runs if r.kind != "supervised"]
        runner.releases = built
        results = []
        started, done_new = time.monotonic(), 0
        for n, run in enumerate(runs):
            left = ""
            if done_new:
                per_run = (time.monotonic() - started) / done_new
                left = f", about {math.ceil(per_run * (len(runs) - n) / 60)} min left"
            say(f"[run {n + 1} of {len(runs)}{left}] {run.label}")
            fresh, record = runner.run(run)
            done_new += fresh
            if not fresh:
                say("  reused: trained and evaluated with these settings before")
            results.append(record)
        from .report import write_report

        return write_report(out / "report", cfg, built, results, eval_sets)


class _Runner:
    def __init__(self, cfg: StudyConfig, out: Path, eval_sets: list[EvalSet], say: Callable[[str], None]) -> None:
        self.cfg, self.out, self.eval_sets, self.say = cfg, out, eval_sets, say
        self.releases: dict[str, dict[str, Any]] = {}

    def build(self, pair_set: PairSet) -> dict[str, Any]:
        recipe = resolve_recipe(self.cfg.source, {**self.cfg.base_recipe(), **pair_set.options,
                                                  "name": f"study-{pair_set.name}"})
        build_dir = self.out / "releases" / f"{pair_set.name}-{pair_set.digest}"
        build(build_dir, recipe)
        metrics = read_json(build_dir / layout.METRICS)
        anchors = pq.read_table(build_dir / layout.PAIRS, columns=["anchor_id"]).column(0)
        return {"name": pair_set.name, "what": pair_set.what, "build": str(build_dir),
                "release": str(build_dir / "release"), "digest": pair_set.digest, "options": pair_set.options,
                "pairs": metrics.get("pairs"), "precision": metrics.get("precision"),
                "false_neighbour_rate": None if metrics.get("precision") is None else 1.0 - metrics["precision"],
                "anchors": len(pc.unique(anchors))}

    def folder(self, run: Run) -> tuple[Path, dict[str, Any]]:
        release = self.releases.get(run.pair_set or "", {})
        settings = self.cfg.run_settings(run, release.get("digest"))
        group = run.pair_set if run.kind == "pairs" else run.kind
        extra = f"-self{run.self_pairs:g}" if run.self_pairs else ""
        return self.out / "runs" / group / f"{run.method}-{run.mode}{extra}-s{run.seed}-{run_digest(settings)}", settings

    def train(self, run: Run) -> tuple[Path, bool]:
        """Train ``run`` unless its folder holds it finished; returns the folder and whether it trained now."""
        folder, settings = self.folder(run)
        cfg = self.cfg
        if _finished(folder, cfg.epochs):
            return folder, False
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "settings.json", settings)
        if run.kind == "supervised":
            train_supervised(SupervisedConfig(out=str(folder), source=cfg.source, root=cfg.root, limit=cfg.limit,
                                              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                              backbone=cfg.backbone, image_size=cfg.image_size, seed=run.seed,
                                              workers=cfg.workers))
            return folder, True
        common = dict(out=str(folder), method=run.method, positives=run.mode, backbone=cfg.backbone,
                      epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, image_size=cfg.image_size,
                      seed=run.seed, workers=cfg.workers)
        if run.kind == "pairs":
            train(TrainConfig(pairs=self.releases[run.pair_set]["release"], self_pairs=run.self_pairs, **common),
                  resume=True)
        else:
            train(TrainConfig(source=cfg.source, root=cfg.root, limit=cfg.limit, **common), resume=True)
        return folder, True

    def run(self, run: Run) -> tuple[bool, dict[str, Any]]:
        """Train and evaluate ``run`` where not done; returns whether anything was computed, and its record."""
        folder, fresh = self.train(run)
        evals = {}
        for eval_set in self.eval_sets:
            wanted = {"source": eval_set.source, "root": eval_set.root, "test_root": eval_set.test_root,
                      "limit": self.cfg.eval_limit, "ks": list(self.cfg.ks)}
            path = folder / f"eval-{_safe(eval_set.name)}.json"
            found = read_json(path) if path.is_file() else None
            if found is None or found.get("settings") != wanted:
                fresh = True
                result = evaluate(folder, eval_set.source, eval_set.root, eval_set.test_root, self.cfg.eval_limit,
                                  self.cfg.ks, name=path.name)
                found = {**result, "settings": wanted}
                write_json(path, found)
            evals[eval_set.name] = found
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = sum(h.get("steps", 0) for h in history)
        record = {"kind": run.kind, "method": run.method, "mode": run.mode, "seed": run.seed,
                  "pair_set": run.pair_set, "self_pairs": run.self_pairs, "ablation": run.ablation,
                  "folder": str(folder), "steps": steps, "batch_size": self.cfg.batch_size,
                  "partner_weight": history[-1].get("partner_weight") if history else None,
                  "evals": {name: {k: v for k, v in e.items() if k != "settings"} for name, e in evals.items()}}
        return fresh, record


def _warn_cut_classes(build_dir: Path, cfg: StudyConfig, say: Callable[[str], None]) -> None:
    """--limit takes the first pictures in source order: in an image folder, the first classes only."""
    labels = pq.read_table(build_dir / layout.INDEX, columns=["label"]).column(0).to_numpy()
    classes = len(layout.read_class_names(build_dir / layout.INDEX))
    present = len(np.unique(labels[labels >= 0]))
    if cfg.limit is not None and classes and present < classes:
        say(f"warning: --limit {cfg.limit:,} takes the first pictures in source order, which hold {present} of the "
            f"source's {classes} classes; give a larger --limit (or none) to study them all")


def _finished(folder: Path, epochs: int) -> bool:
    path = folder / CHECKPOINT
    if not path.is_file():
        return False
    try:
        return load_checkpoint(path, option="--out").get("epoch") == epochs
    except UserError:
        return False


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:60]
