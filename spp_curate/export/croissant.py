"""``croissant.json``: the release described in MLCommons Croissant 1.0 (JSON-LD), for tools that read datasets by
their metadata (``mlcroissant``, the Hub's dataset search, TFDS' Croissant builder).

Written from what the manifest lists: each shard as a ``FileObject`` with its sha256, the shards of one kind as a
``FileSet``, and a ``RecordSet`` per table: ``pairs`` (rows of keys, or pair rows with both pictures in the
``pairs`` layout) and ``images`` (each picture once) in the default layout. The JSON-LD context is Croissant's
own (``croissant_context.json``, as ``mlcroissant`` writes it). The tests validate the file with ``mlcroissant``
and read records through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONTEXT = Path(__file__).with_name("croissant_context.json")
CONFORMS_TO = "http://mlcommons.org/croissant/1.0"
#: Columns of each table, as Croissant data types (pictures are ``sc:ImageObject``, their bytes taken from the
#: Image struct's ``bytes`` field).
TEXT, INTEGER, FLOAT, IMAGE = "sc:Text", "sc:Integer", "sc:Float", "sc:ImageObject"
PAIR_FIELDS = [("pair_id", INTEGER), ("anchor_key", TEXT), ("positive_key", TEXT), ("label", INTEGER),
               ("label_name", TEXT), ("similarity", FLOAT)]
IMAGE_FIELDS = [("key", TEXT), ("image", IMAGE), ("digest", TEXT), ("label", INTEGER), ("label_name", TEXT)]
KIND_FORMAT = {"parquet": "application/x-parquet", "pairs": "application/x-parquet",
               "images": "application/x-parquet", "webdataset": "application/x-tar", "image-tars": "application/x-tar"}


def _field(record: str, file_set: str, name: str, kind: str) -> dict[str, Any]:
    extract: dict[str, Any] = {"column": name}
    source: dict[str, Any] = {"fileSet": {"@id": file_set}, "extract": extract}
    if kind == IMAGE:
        source["transform"] = {"jsonPath": "bytes"}
    return {"@type": "cr:Field", "@id": f"{record}/{name}", "name": name, "dataType": kind, "source": source}


def croissant(recipe, entries: list[dict[str, Any]], layout: str, images: str, version: int,
              date: str) -> dict[str, Any]:
    """The Croissant description of a release whose files are ``entries`` (the manifest's, before the manifest)."""
    distribution, sets = [], {}
    for entry in entries:
        if entry["kind"] not in KIND_FORMAT:
            continue
        distribution.append({"@type": "cr:FileObject", "@id": entry["path"], "name": entry["path"],
                             "contentUrl": entry["path"], "encodingFormat": KIND_FORMAT[entry["kind"]],
                             "contentSize": f"{entry['bytes']} B", "sha256": entry["sha256"]})
        sets.setdefault(entry["kind"], entry["path"].split("/")[0])
    tables = {"pairs": ("pairs", "data/pairs-*.parquet"), "images": ("images", "data/images-*.parquet"),
              "parquet": ("pairs", "data/train-*.parquet")}
    record_sets = []
    for kind, (record, pattern) in tables.items():
        if kind not in sets:
            continue
        file_set = f"{record}-files"
        distribution.append({"@type": "cr:FileSet", "@id": file_set, "name": file_set,
                             "encodingFormat": KIND_FORMAT[kind], "includes": pattern})
        fields = IMAGE_FIELDS if kind == "images" else PAIR_FIELDS
        if kind == "parquet" and images != "none":
            fields = [*PAIR_FIELDS, ("anchor", IMAGE), ("positive", IMAGE)]
        if images == "none" and kind in ("pairs", "parquet"):
            fields = [*PAIR_FIELDS, ("anchor_digest", TEXT), ("positive_digest", TEXT)]
        record_sets.append({"@type": "cr:RecordSet", "@id": record, "name": record,
                            "field": [_field(record, file_set, name, t) for name, t in fields]})
    return {
        "@context": json.loads(CONTEXT.read_text()),
        "@type": "sc:Dataset",
        "name": recipe.name,
        "description": (recipe.description or "Semantic positive pairs: two different images of the same category, "
                        "for use as extra positives in self-supervised learning.").strip(),
        "conformsTo": CONFORMS_TO,
        "citeAs": "@misc{sepp_id_2306_16122, title = {Semantic Positive Pairs for Enhancing Visual Representation "
                  "Learning of Instance Discrimination Methods}, eprint = {2306.16122}, archivePrefix = {arXiv}, "
                  "year = {2023}}",
        "datePublished": date,
        "license": recipe.license,
        "version": f"{version}.0.0",
        "keywords": ["semantic positive pairs", "self-supervised learning", f"layout: {layout}"],
        "distribution": distribution,
        "recordSet": record_sets,
    }
