"""``spp-curate materialize``: an ID-only release + the user's own copy of the source -> a full release.

The release may come from anyone, so it is verified first (its paths stay
inside it, no symlinks, sizes and digests as listed), and the source is the one
named on the command line (``--source``, ``--root``), never the release's
recipe. Every key a pair names must be a key of that source's own form (a
relative path with no ``..`` under ``--root``, a row of the split ...); any
other is refused before anything is read, so the answer never tells whether a
path outside the root exists. Every image read is checked against the digest
in the release; any missing, changed or refused image is named, and nothing is
written. The new release is written beside ``--out`` and swapped in when
complete; ``--out`` must be new, empty, or an earlier output of this command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..config import validate_recipe
from ..curate.sources import open_source
from ..images import BadImage, ImageRefused, ImageUnreadable, read_image
from ..errors import UserError
from ..files import safe_join, sha256_bytes
from ..progress import stage_progress
from ..review.estimate import checked_band_trust
from .manifest import load_manifest, verify_release
from .parquet import PAIR_COLUMNS
from .pictures import pair_rows
from .release import ReleaseInput, write_release


def _check_out(release: Path, root: Path | None, out: Path) -> None:
    """``--out`` may not be the input release, the source, or a folder inside or around either."""
    target = out.resolve()
    for name, other in (("the input release", release), ("--root", root)):
        if other is None:
            continue
        other = other.resolve()
        if target == other or target.is_relative_to(other) or other.is_relative_to(target):
            raise UserError(f"{out} is {name} or overlaps it; write the full release somewhere else",
                            option="--out")


def materialize(release: Path, source_spec: str, root: Path | None, out: Path,
                engine) -> tuple[list[str], dict[str, int] | None]:
    """Rebuild ``release`` (ID-only) into ``out``; returns ``(problems, counts)``, counts None on problems."""
    manifest = load_manifest(release)
    if manifest.images != "none":
        raise UserError(f"{release} already holds its images; materialize takes an ID-only release "
                        "(built with --images none)", option="RELEASE")
    _check_out(release, root, out)
    problems = verify_release(release)
    if problems:
        raise UserError(f"{release} does not verify ({problems[0]}); run `spp-curate verify {release}`",
                        option="RELEASE")
    # The release's recipe gives the card's and shards' settings; where the pixels come from is the user's word.
    recipe = validate_recipe({**manifest.recipe, "source": source_spec, "root": str(root) if root else None,
                              "images": "embed", "engine": "local", "layout": manifest.layout})
    pairs = pair_rows(release, manifest, PAIR_COLUMNS)
    pairs["label"] = pairs["label"].astype(np.int64)
    digests = dict(zip(pairs.anchor_key, pairs.anchor_digest)) | dict(zip(pairs.positive_key, pairs.positive_digest))
    source = open_source(recipe)

    facts: dict[str, tuple[str, int]] = {}
    with stage_progress("materialize: check", len(digests)) as (bar, task):
        for key, digest in digests.items():
            try:
                loaded = read_image(source, key)
            except ImageRefused as exc:
                problems.append(f"{key!r}: {exc}")
            except ImageUnreadable:
                problems.append(f"{key}: missing under {root or source_spec}")
            except BadImage as exc:
                problems.append(f"{key}: {exc}")
            else:
                if sha256_bytes(loaded.data) != digest:
                    problems.append(f"{key}: changed (sha256 differs from the release)")
                else:
                    facts[key] = (loaded.format, len(loaded.data))
            bar.update(task, advance=1)
    if problems:
        return problems, None
    images = pd.DataFrame.from_dict(facts, orient="index", columns=["format", "nbytes"])
    assets = manifest.entries("asset")
    figure = safe_join(release, assets[0].path) if assets else None
    counts = {k: int(getattr(manifest.counts, k, 0) or 0) for k in ("images", "quarantined")}
    inp = ReleaseInput(recipe=recipe, pairs=pairs, images=images, class_names=manifest.class_names,
                       counts=counts, metrics=getattr(manifest, "metrics", None), figure=figure,
                       pair_trust=checked_band_trust((manifest.model_extra or {}).get("pair_trust")))
    return [], write_release(inp, source, out, engine, option="--out")

