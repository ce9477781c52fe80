"""``manifest.json``: what a release holds, byte for byte, and the check that it still does."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..curate.images import BadImage, decode_image
from ..errors import UserError
from ..files import read_json, sha256_file
from .webdataset import tar_sample_count

SCHEMA_VERSION = 1
_LIBRARIES = ("spp-curate", "torch", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12", "numpy", "pyarrow",
              "pillow", "datasets", "webdataset", "huggingface_hub")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def file_entry(release: Path, path: Path, kind: str, rows: int | None) -> dict[str, Any]:
    return {"path": path.relative_to(release).as_posix(), "kind": kind, "rows": rows,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _rows(release: Path, entry: dict[str, Any], image_ext: str) -> int | None:
    path = release / entry["path"]
    if entry["kind"] == "parquet":
        return pq.read_metadata(path).num_rows
    if entry["kind"] == "webdataset":
        return tar_sample_count(path, image_ext)
    return None


def _first_images(path: Path, kind: str) -> list[bytes]:
    """The encoded images of a shard's first pair (none for ID-only shards)."""
    if kind == "parquet":
        schema = pq.read_schema(path)
        if "anchor" not in schema.names:
            return []
        first = pq.ParquetFile(path).read_row_group(0, columns=["anchor", "positive"]).slice(0, 1).to_pylist()
        return [first[0]["anchor"]["bytes"], first[0]["positive"]["bytes"]] if first else []
    import tarfile

    with tarfile.open(path) as tar:
        out = []
        for member in tar:
            if member.name.split(".", 1)[1].startswith(("anchor.", "positive.")):
                out.append(tar.extractfile(member).read())
            if len(out) == 2:
                break
        return out


def verify_release(release: str | Path) -> list[str]:
    """Check every file against the manifest; return the problems found (empty when good)."""
    release = Path(release)
    if not (release / "manifest.json").is_file():
        raise UserError(f"{release} has no manifest.json; is it a release directory?", option="RELEASE")
    try:
        manifest = read_json(release / "manifest.json")
        files = manifest["files"]
        pairs = int(manifest["counts"]["pairs"])
        image_ext = manifest["image_ext"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"manifest.json: unreadable or incomplete ({exc})"]
    problems: list[str] = []
    totals: dict[str, int] = {"parquet": 0, "webdataset": 0}
    listed = set()
    for entry in files:
        path = release / entry["path"]
        listed.add(entry["path"])
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest (the file changed)")
            continue
        try:
            rows = _rows(release, entry, image_ext)
        except Exception as exc:  # noqa: BLE001 - any unreadable shard is a problem to report
            problems.append(f"{entry['path']}: unreadable ({exc})")
            continue
        if rows != entry["rows"]:
            problems.append(f"{entry['path']}: {rows} rows, manifest says {entry['rows']}")
        if entry["kind"] in ("parquet", "webdataset") and rows:
            for data in _first_images(path, entry["kind"]):
                try:
                    decode_image(data)
                except BadImage as exc:
                    problems.append(f"{entry['path']}: its first pair's image does not decode ({exc})")
        if entry["kind"] in totals and rows is not None:
            totals[entry["kind"]] += rows
    for kind, total in totals.items():
        if any(e["kind"] == kind for e in files) and total != pairs:
            problems.append(f"{kind} shards hold {total} pairs, manifest counts {pairs}")
    for pattern in ("data/*.parquet", "wds/*.tar"):
        for path in sorted(release.glob(pattern)):
            rel = path.relative_to(release).as_posix()
            if rel not in listed:
                problems.append(f"{rel}: not in the manifest")
    return problems
