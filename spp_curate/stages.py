"""Running the stages on a build directory: in order, skipping what is complete.

A stage is complete when ``DIR/stages/<stage>.json`` carries the recipe
fingerprint of that stage (its fields and those of the stages before it) and
its outputs exist. Change ``k`` and only mine, report and export run again;
change the encoder and embedding runs again too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import STAGES, Recipe, validate_recipe
from .errors import UserError
from .files import atomic_path, read_json, write_json

STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "index": ("index.parquet", "quarantine.parquet"),
    "embed": ("embeddings/meta.json",),
    "mine": ("pairs.parquet", "mine_stats.json"),
    "report": ("report/metrics.json", "report/index.html"),
    "export": ("release/manifest.json",),
}


def _runner(stage: str) -> Callable[[Recipe, Path], dict[str, Any]]:
    # Imported on demand: `spp-curate verify` should not pay for torch and faiss.
    if stage == "index":
        from .curate.index import build_index
        return build_index
    if stage == "embed":
        from .curate.embed import embed_index
        return embed_index
    if stage == "mine":
        from .pairing.mine import mine_pairs
        return mine_pairs
    if stage == "report":
        from .pairing.quality import write_report
        return write_report
    if stage == "export":
        from .export.release import export_release
        return export_release
    raise ValueError(stage)


def save_recipe(build_dir: Path, recipe: Recipe) -> None:
    from .export.manifest import library_versions

    build_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(build_dir / "build.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"recipe": recipe.model_dump(), "versions": library_versions()},
                                      sort_keys=False))


def load_recipe(build_dir: Path) -> Recipe:
    path = build_dir / "build.yaml"
    if not path.is_file():
        raise UserError(f"{build_dir} is not a build directory (no build.yaml); start one with "
                        "`spp-curate build --source ...`", option="DIR")
    data = yaml.safe_load(path.read_text()) or {}
    return validate_recipe(data.get("recipe", {}))


def _record(build_dir: Path, stage: str) -> Path:
    return build_dir / "stages" / f"{stage}.json"


def is_complete(build_dir: Path, recipe: Recipe, stage: str) -> bool:
    record = _record(build_dir, stage)
    if not record.is_file() or not all((build_dir / o).exists() for o in STAGE_OUTPUTS[stage]):
        return False
    return read_json(record).get("fingerprint") == recipe.fingerprint(stage)


def run_stage(build_dir: Path, recipe: Recipe, stage: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless it is complete; returns its summary, or None when skipped."""
    position = STAGES.index(stage)
    for before in STAGES[:position]:
        if not is_complete(build_dir, recipe, before):
            raise UserError(f"stage {before!r} is not complete for this recipe; run "
                            f"`spp-curate {before} {build_dir}` (or `spp-curate build`) first", option=stage)
    if not force and is_complete(build_dir, recipe, stage):
        return None
    for after in STAGES[position:]:
        _record(build_dir, after).unlink(missing_ok=True)
    started = time.time()
    summary = _runner(stage)(recipe, build_dir)
    metrics_keys = ("precision", "coverage", "pairs", "images", "quarantined")
    short = {k: v for k, v in (summary or {}).items() if k in metrics_keys or isinstance(v, int)}
    write_json(_record(build_dir, stage), {"fingerprint": recipe.fingerprint(stage),
                                           "seconds": round(time.time() - started, 2), "summary": short})
    return short


def build(build_dir: Path, recipe: Recipe, force: bool = False,
          on_stage: Callable[[str, dict[str, Any] | None], None] | None = None, until: str | None = None) -> None:
    """Run the stages in order, up to ``until``; complete stages are skipped (unless ``force``)."""
    save_recipe(build_dir, recipe)
    last = STAGES.index(until) if until else len(STAGES) - 1
    for stage in STAGES[: last + 1]:
        summary = run_stage(build_dir, recipe, stage, force=force)
        if on_stage:
            on_stage(stage, summary)
