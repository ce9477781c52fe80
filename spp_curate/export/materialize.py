"""``spp-curate materialize``: an ID-only release + the user's own copy of the source -> a full release.

Every image a pair names is read from ``--root`` and its sha256 compared with
the digest in the release. Any missing or changed file is named, and nothing
is written; otherwise the result is a full release (Parquet with images, and
WebDataset tars) that verifies like a built one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..config import validate_recipe
from ..curate.images import BadImage, decode_with_format
from ..curate.sources import open_source
from ..errors import UserError
from ..files import read_json, sha256_bytes
from ..progress import stage_progress
from .release import PAIR_COLUMNS, ReleaseInput, write_release


def materialize(release: Path, root: Path, out: Path) -> tuple[list[str], dict[str, int] | None]:
    """Rebuild ``release`` (ID-only) into ``out``; returns ``(problems, counts)``, counts None on problems."""
    if not (release / "manifest.json").is_file():
        raise UserError(f"{release} has no manifest.json; is it a release directory?", option="RELEASE")
    manifest = read_json(release / "manifest.json")
    if manifest.get("images") != "none":
        raise UserError(f"{release} already holds its images; materialize takes an ID-only release "
                        "(built with --images none)", option="RELEASE")
    recipe = validate_recipe({**manifest["recipe"], "root": str(root), "images": "embed"})
    shards = [release / e["path"] for e in manifest["files"] if e["kind"] == "parquet"]
    pairs = pd.concat([pq.read_table(p, columns=PAIR_COLUMNS).to_pandas() for p in shards], ignore_index=True)
    pairs["label"] = pairs["label"].astype(np.int64)
    digests = dict(zip(pairs.anchor_key, pairs.anchor_digest)) | dict(zip(pairs.positive_key, pairs.positive_digest))
    source = open_source(recipe)

    problems: list[str] = []
    facts: dict[str, tuple[str, int]] = {}
    with stage_progress("materialize: check", len(digests)) as (bar, task):
        for key, digest in digests.items():
            try:
                data = source.read(key)
            except (OSError, KeyError):
                problems.append(f"{key}: missing under {root}")
            else:
                if sha256_bytes(data) != digest:
                    problems.append(f"{key}: changed (sha256 differs from the release)")
                else:
                    try:
                        facts[key] = (decode_with_format(data)[1], len(data))
                    except BadImage as exc:
                        problems.append(f"{key}: {exc}")
            bar.update(task, advance=1)
    if problems:
        return problems, None
    images = pd.DataFrame.from_dict(facts, orient="index", columns=["format", "nbytes"])
    figure = next(iter(sorted((release / "assets").glob("*.png"))), None) if (release / "assets").is_dir() else None
    counts = {k: manifest["counts"][k] for k in ("images", "quarantined")}
    inp = ReleaseInput(recipe=recipe, pairs=pairs, images=images, class_names=manifest.get("class_names", []),
                       counts=counts, metrics=manifest.get("metrics"), figure=figure)
    return [], write_release(inp, source, out)
