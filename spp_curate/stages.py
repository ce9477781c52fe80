"""Running the stages on a build directory: in order, skipping what is complete, one command at a time.

A stage is complete when ``DIR/stages/<stage>.json`` carries the recipe
fingerprint of that stage (its fields, those of the stages before it, and the
source's current state) and its outputs exist. Change ``k`` and only mine,
report and export run again; change the encoder and embedding runs again too;
add, remove or edit a source image and everything runs again.

Every command that writes to a build directory holds its lock (``DIR/.lock``)
and first removes the temporary files a killed run left there.
"""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import layout
from .config import Recipe, save_recipe
from .engine import get_engine
from .errors import UserError
from .files import BuildLock, file_identity, read_json, remove_stale_temps, short_hash, write_json
from .pipeline import STAGE_BY_NAME, STAGES


def check_build_dir(build_dir: Path) -> None:
    """A build goes into a new or empty folder, or into one of its own earlier builds: never into a
    folder of other files (which a rerun might then clean up)."""
    if build_dir.is_symlink() or (build_dir.exists() and not build_dir.is_dir()):
        raise UserError(f"{build_dir} is not a folder", option="--out")
    others = [p for p in build_dir.iterdir() if p.name != layout.LOCK] if build_dir.is_dir() else []
    if others and not (build_dir / layout.BUILD_RECIPE).is_file():
        raise UserError(f"{build_dir} is not empty and is not a build directory (no build.yaml); "
                        "choose a new or empty folder", option="--out")


def bind_source_state(recipe: Recipe, build_dir: Path | None = None, trust_listing: bool = False) -> Recipe:
    """The recipe bound to what its source and its reference sets hold now (listing, sizes, modification
    times): an edited reference set runs the exclude stage again, as an edited source runs every stage.

    With ``trust_listing`` the listing the last index of ``build_dir`` kept is taken instead of walking the
    source, when none of the folders it walked changed since (``curate.index.trusted_listing``): no file is
    listed or stat'ed; a file edited in place, which changes no folder, is not seen."""
    if recipe.source_state is not None:
        return recipe
    from .curate.sources import open_source
    from .curate.sources.base import Source, listing_state
    from .leakage.exclude import reference_state

    source = open_source(recipe)
    if type(source).stat is Source.stat:  # images that are not files: the source's own state
        return recipe.with_source_state(source.state(), reference_state(recipe))
    # Images that are files: one walk, one stat a file, kept with the bound recipe for the index stage;
    # with --limit the walk stops at the limit, and the state covers what the build reads.
    listing = None
    if trust_listing and build_dir is not None:
        from .curate.index import trusted_listing
        from .progress import console

        listing, why = trusted_listing(Path(build_dir), recipe, source)
        said = (f"listing: the last build's ({len(listing):,} images, {len(listing.folders):,} folders unchanged; "
                "--trust-listing)" if listing is not None else f"listing: walking the source ({why})")
        console.print(said, markup=False, highlight=False, soft_wrap=True)
    if listing is None:
        listing = source.listing(recipe.limit)
    bound = recipe.with_source_state(listing_state(listing), reference_state(recipe))
    bound.attach_listing(listing)
    return bound


def _record(build_dir: Path, stage: str) -> Path:
    return build_dir / layout.STAGE_RECORDS / f"{stage}.json"


def stage_fingerprint(build_dir: Path, recipe: Recipe, stage: str) -> str:
    """The recipe's fingerprint of ``stage``, with the state (size, time) of the files the stage watches and
    of the earlier stages' outputs it reads (as make does): an index rewritten by ``build --rehash`` runs
    what follows again, one rewritten with the same rows is kept as it was and runs nothing."""
    upto = STAGES[: STAGES.index(stage) + 1]
    names = [w for s in upto for w in STAGE_BY_NAME[s].watched(recipe)]  # a watched file reruns what follows too
    names += [i for s in upto for i in STAGE_BY_NAME[s].inputs]
    watched = [build_dir / w for w in dict.fromkeys(names)]
    if not watched:
        return recipe.fingerprint(stage)
    states = [file_identity(s) if (s := _stat(p)) else "absent" for p in watched]
    return recipe.fingerprint(stage) + ":" + short_hash("|".join(states))


def _stat(path: Path):
    try:
        return path.stat() if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def is_complete(build_dir: Path, recipe: Recipe, stage: str) -> bool:
    record = _record(build_dir, stage)
    if not record.is_file() or not all((build_dir / o).exists() for o in STAGE_BY_NAME[stage].outputs):
        return False
    try:
        return read_json(record).get("fingerprint") == stage_fingerprint(build_dir, recipe, stage)
    except (ValueError, OSError, AttributeError):
        return False  # a damaged record: the stage runs again


@contextlib.contextmanager
def locked(build_dir: Path) -> Iterator[None]:
    """Hold the build directory's lock; clean the temporary files a killed run left."""
    with BuildLock(build_dir):
        remove_stale_temps(build_dir)
        yield


def _run_stage(build_dir: Path, recipe: Recipe, stage: str, force: bool = False,
               rehash: bool = False) -> dict[str, Any] | None:
    """Run ``stage`` unless complete. ``force`` runs it anyway, and the index stage then reads every file
    again; ``rehash`` does that for the index stage alone (what a content check needs: an edit that kept a
    file's size and modification time is seen by its bytes)."""
    rehash_only = stage == "index" and rehash and not force
    # the index reads every file again; an export is written anew even where this very release stands whole
    options = ({"rehash": True} if stage == "index" and (force or rehash) else
               {"again": True} if stage == "export" and force else {})
    position = STAGES.index(stage)
    for before in STAGES[:position]:
        if not is_complete(build_dir, recipe, before):
            raise UserError(f"stage {before!r} is not complete for this recipe and source; run "
                            f"`spp-curate {before} {build_dir}` (or `spp-curate build`) first", option=stage)
    complete = is_complete(build_dir, recipe, stage)
    if complete and not force and not rehash_only:
        return None
    # A rerun voids what follows. A rehash of a complete index does not: the index is rewritten only where it
    # changed, and the stages after it watch its file.
    for after in (stage,) if complete and rehash_only else STAGES[position:]:
        _record(build_dir, after).unlink(missing_ok=True)
    started = time.time()
    fingerprint = stage_fingerprint(build_dir, recipe, stage)  # before the run: a change during it reruns
    try:
        summary = STAGE_BY_NAME[stage].run(recipe, build_dir, get_engine(recipe.engine), **options)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(no_space(stage, build_dir, exc), option=stage) from None
    metrics_keys = ("precision", "coverage", "pairs", "images", "quarantined")
    short = {k: v for k, v in (summary or {}).items()
             if (k in metrics_keys and v is not None) or (isinstance(v, int) and not isinstance(v, bool))}
    write_json(_record(build_dir, stage), {"fingerprint": fingerprint,
                                           "seconds": round(time.time() - started, 2), "summary": short})
    # what the command prints: the counts, and a stage's words where it has no count (exclude with no set)
    return {k: v for k, v in (summary or {}).items() if k in short or isinstance(v, str)}


def no_space(stage: str, build_dir: Path, exc: OSError) -> str:
    """One line for a stage that ran out of disk: the file it was writing, the space free, what it needs."""
    import shutil

    written = Path(exc.filename) if exc.filename else None
    where = (f"{written.relative_to(build_dir)}" if written and written.is_relative_to(build_dir) else
             str(written) if written else f"the {stage} stage's files")
    free = shutil.disk_usage(build_dir).free
    need = space_needed(stage, build_dir)
    return (f"no space left on the device of {build_dir} while writing {where} ({free:,} bytes free"
            f"{f'; the stage writes about {need:,} bytes' if need else ''}); free some space and run the same "
            "command again: it resumes where it stopped")


def space_needed(stage: str, build_dir: Path) -> int | None:
    """About how many bytes ``stage`` writes, from what the stages before it recorded (None where unknown)."""
    import pyarrow.parquet as pq

    try:
        if stage == "embed":
            rows = pq.read_metadata(build_dir / layout.INDEX).num_rows
            return rows * (2 * 768 + 8)  # float16 rows up to 768 dims, and their ids
        if stage == "export":
            index = pq.read_table(build_dir / layout.INDEX, columns=["id", "nbytes"]).to_pandas().set_index("id")
            pairs = pq.read_table(build_dir / layout.PAIRS, columns=["anchor_id", "positive_id"]).to_pandas()
            pictures = index.nbytes.loc[pairs.anchor_id].sum() + index.nbytes.loc[pairs.positive_id].sum()
            return int(2 * pictures + 3072 * len(pairs))  # both formats, headers and rows
    except (OSError, ValueError, KeyError):
        return None
    return None


def run_stage(build_dir: Path, recipe: Recipe, stage: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless it is complete; returns its summary, or None when skipped."""
    with locked(build_dir):
        return _run_stage(build_dir, bind_source_state(recipe), stage, force)


def build(build_dir: Path, recipe: Recipe, force: bool = False,
          on_stage: Callable[[str, dict[str, Any] | None], None] | None = None, until: str | None = None,
          rehash: bool = False, trust_listing: bool = False) -> None:
    """Run the stages in order, up to ``until``; complete stages are skipped (unless ``force``). ``rehash``
    reads every source file again in the index stage; what follows runs again only where the index changed.
    ``trust_listing`` takes the last index's listing where no folder changed (:func:`bind_source_state`)."""
    check_build_dir(build_dir)
    # opens and lists the source: a wrong one fails before the folder exists
    bound = bind_source_state(recipe, build_dir, trust_listing and not rehash and not force)
    with locked(build_dir):
        save_recipe(build_dir, recipe)
        recipe = bound
        last = STAGES.index(until) if until else len(STAGES) - 1
        for stage in STAGES[: last + 1]:
            summary = _run_stage(build_dir, recipe, stage, force=force, rehash=rehash)
            if on_stage:
                on_stage(stage, summary)
