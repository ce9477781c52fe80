"""``manifest.json``: what a release holds, byte for byte, and the check that it still does.

A release may come from anyone (the Hub, a colleague, a download), so
:func:`load_manifest` and :func:`verify_release` treat it as hostile input:

* the manifest is size-capped JSON of a declared schema;
* every path it lists must be one of the release layout's names for its kind
  (``data/train-*.parquet``, ``wds/pairs-*.tar``, ``README.md``, ``assets/*.png``),
  so no entry can name ``/etc/passwd`` or ``../x``;
* a symlink anywhere in the release is a problem, and no file is opened through one;
* each file's size is compared with the manifest before it is read, and then hashed as a stream;
* tar members must be plain files with flat, relative names and sizes under a cap, and are
  read (a shard's first images, to decode them) only after their size is checked.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import layout
from ..images import BadImage, image_from_bytes
from ..errors import UserError
from ..files import UnsafePath, read_capped, safe_join, sha256_file
from ..progress import loading, stage_progress

SCHEMA_VERSION = 1
#: Stated limits on what is read into memory from a release.
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_MEMBER_BYTES = 256 * 2**20
MAX_ROW_GROUP_BYTES = 512 * 2**20


class FileEntry(BaseModel):
    """One file of a release, as the manifest lists it."""

    model_config = ConfigDict(extra="forbid")

    path: str
    kind: Literal["parquet", "webdataset", "pairs", "images", "image-tars", "croissant", "changelog", "card", "asset"]
    rows: int | None = Field(default=None, ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Counts(BaseModel):
    model_config = ConfigDict(extra="allow")

    pairs: int = Field(ge=0)


class Manifest(BaseModel):
    """The parts of ``manifest.json`` the tools rely on; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow")

    schema_version: int
    name: str
    images: Literal["embed", "none"]
    recipe: dict[str, Any]
    counts: Counts
    image_ext: Literal["jpg", "png"]
    #: ``pairs``: both pictures in every pair row (and tar sample); ``images``: each picture once, pairs as rows
    #: of keys (``export/pictures.py``). Manifests written before the field are of the pairs layout.
    layout: Literal["pairs", "images"] = "pairs"
    class_names: list[str] = []
    files: list[FileEntry]

    def entries(self, kind: str) -> list[FileEntry]:
        return [e for e in self.files if e.kind == kind]


def file_entry(release: Path, path: Path, kind: str, rows: int | None) -> dict[str, Any]:
    return {"path": path.relative_to(release).as_posix(), "kind": kind, "rows": rows,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def load_manifest(release: str | Path, option: str = "RELEASE") -> Manifest:
    """Read and validate ``release/manifest.json``; a one-line :class:`UserError` when it is not usable."""
    release = Path(release)
    path = release / layout.MANIFEST
    if path.is_symlink():
        raise UserError(f"{path} is a symlink; a release's files must be its own", option=option)
    if not path.is_file():
        raise UserError(f"{release} has no manifest.json; is it a release directory?", option=option)
    try:
        manifest = Manifest.model_validate_json(read_capped(path, MAX_MANIFEST_BYTES, "manifest.json"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise UserError(f"{path} is not a valid manifest ({where}: {first['msg']})", option=option) from None
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} cannot be read: {exc}", option=option) from None
    for entry in manifest.files:
        pattern = layout.RELEASE_ENTRY_PATTERNS[entry.kind]
        if not pattern.fullmatch(entry.path):
            raise UserError(f"{path} lists {entry.path!r} as a {entry.kind} file; a release's {entry.kind} "
                            f"files are named like {pattern.pattern!r}", option=option)
    return manifest


def release_file(release: Path, entry: FileEntry) -> Path:
    """The file an entry names, inside the release and reached through no symlink (:class:`UnsafePath`)."""
    return safe_join(release, entry.path)


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """A tar member's sample key and extension, split as webdataset splits them (its own function: a release
    must read back through webdataset). webdataset, and torch under it, is imported on the first call only, so
    a command that checks no tar never loads it."""
    from webdataset.tariterators import base_plus_ext as split

    return split(name)


def _samples(path: Path, extensions: tuple[str, ...], what: str) -> int:
    """Count a tar's samples of ``len(extensions)`` adjacent members each, checking every member first: a plain
    file with a flat relative name under the size cap; raises ``ValueError`` naming the first bad one."""
    members = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isreg():
                kind = ("symlink" if member.issym() else "hard link" if member.islnk()
                        else "directory" if member.isdir() else "special file")
                raise ValueError(f"member {member.name!r} is a {kind}; a {what} shard holds plain files only")
            if member.name.startswith("/") or "/" in member.name or member.name in (".", ".."):
                raise ValueError(f"member {member.name!r} has a path; {what} shard members have flat names")
            if member.size > MAX_MEMBER_BYTES:
                raise ValueError(f"member {member.name!r} is {member.size:,} bytes, over the "
                                 f"{MAX_MEMBER_BYTES:,}-byte limit")
            members.append(member.name)
    step = len(extensions)
    if len(members) % step:
        raise ValueError(f"{len(members)} members is not a whole number of {what}s")
    for i in range(0, len(members), step):
        split = [base_plus_ext(n) for n in members[i:i + step]]
        if len({key for key, _ in split}) != 1 or sorted(ext for _, ext in split) != sorted(extensions):
            raise ValueError(f"members {members[i:i + step]} are not one {what}'s adjacent members")
    return len(members) // step


def check_tar(path: Path, image_ext: str) -> int:
    """Count a pair shard's samples (``anchor.EXT``, ``json``, ``positive.EXT``, adjacent), checking its members."""
    return _samples(path, (f"anchor.{image_ext}", "json", f"positive.{image_ext}"), "pair")


def check_image_tar(path: Path, image_ext: str) -> int:
    """Count an image tar's pictures (``images`` layout: ``<id>.EXT`` and ``<id>.json`` adjacent), checking its
    members as :func:`check_tar` does."""
    return _samples(path, (image_ext, "json"), "picture")


def _rows(path: Path, entry: FileEntry, image_ext: str) -> int | None:
    if entry.kind in ("parquet", "pairs", "images", "changelog"):
        return pq.read_metadata(path).num_rows
    if entry.kind == "webdataset":
        return check_tar(path, image_ext)
    if entry.kind == "image-tars":
        return check_image_tar(path, image_ext)
    return None


def _first_row(path: Path, columns: list[str]) -> list[bytes]:
    """The picture bytes in ``columns`` of a Parquet shard's first row, its first row group read under the cap."""
    parquet = pq.ParquetFile(path)
    if not set(columns) <= set(parquet.schema_arrow.names) or parquet.metadata.num_row_groups == 0:
        return []
    group_bytes = parquet.metadata.row_group(0).total_byte_size
    if group_bytes > MAX_ROW_GROUP_BYTES:
        raise ValueError(f"its first row group is {group_bytes:,} bytes, over the {MAX_ROW_GROUP_BYTES:,}-byte limit")
    first = parquet.read_row_group(0, columns=columns).slice(0, 1).to_pylist()
    return [first[0][c]["bytes"] for c in columns] if first else []


def _first_images(path: Path, kind: str) -> list[bytes]:
    """The encoded images of a shard's first pair or picture (none for ID-only shards), each read under a size
    cap; tar members have all been checked (type and size) by :func:`_samples` before."""
    if kind in ("parquet", "images"):
        return _first_row(path, ["image"] if kind == "images" else ["anchor", "positive"])
    wanted = 1 if kind == "image-tars" else 2
    out = []
    with tarfile.open(path) as tar:
        for member in tar:
            ext = base_plus_ext(member.name)[1]
            if (ext != "json") if kind == "image-tars" else ext.startswith(("anchor.", "positive.")):
                out.append(tar.extractfile(member).read(MAX_MEMBER_BYTES))
            if len(out) == wanted:
                break
    return out


def _symlinks(release: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(release):
        for name in dirnames + filenames:
            if Path(dirpath, name).is_symlink():
                found.append(Path(dirpath, name).relative_to(release).as_posix())
    return sorted(found)


def _columns_problem(schema, strings: tuple[str, ...], pictures: tuple[str, ...]) -> str | None:
    """Which of ``strings`` is not a string column, or of ``pictures`` not an image struct with binary ``bytes``
    (the Hugging Face ``Image`` feature); None when all are."""
    import pyarrow as pa

    for name in strings:
        if name not in schema.names:
            return f"no {name} column"
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return f"its {name} column holds {kind}, not strings"
    for name in pictures:
        if name not in schema.names:
            return f"no {name} column (the pictures)"
        kind = schema.field(name).type
        if not (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                and (pa.types.is_binary(kind.field("bytes").type)
                     or pa.types.is_large_binary(kind.field("bytes").type))):
            return f"its {name} column holds {kind}, not an image struct with binary bytes"
    return None


def pair_schema_problem(schema, images: bool = True, digests: bool = True) -> str | None:
    """What is wrong with a pair shard's Parquet schema for the readers (``train``, ``audit``, ``diff``), or None.

    Keys (and with ``digests`` the digests) must be string columns; with ``images`` the ``anchor`` and
    ``positive`` columns must be structs holding a binary ``bytes`` field (the Hugging Face ``Image`` feature).
    """
    keys = ("anchor_key", "positive_key") + (("anchor_digest", "positive_digest") if digests else ())
    return _columns_problem(schema, keys, ("anchor", "positive") if images else ())


def image_schema_problem(schema) -> str | None:
    """What is wrong with an ``images``-layout picture shard's schema for the readers, or None."""
    return _columns_problem(schema, ("key", "digest"), ("image",))


def _check_entry(release: Path, entry: FileEntry, image_ext: str,
                 images: bool = True) -> tuple[list[str], int | None]:
    """Problems with one listed file, and its row count when it could be read."""
    try:
        path = release_file(release, entry)
    except UnsafePath as exc:
        return [f"{entry.path}: refused ({exc})"], None
    if not path.is_file():
        return [f"{entry.path}: missing"], None
    size = path.stat().st_size
    if size != entry.bytes:
        return [f"{entry.path}: {size} bytes, manifest says {entry.bytes}"], None
    if sha256_file(path) != entry.sha256:
        return [f"{entry.path}: sha256 differs from the manifest (the file changed)"], None
    try:
        rows = _rows(path, entry, image_ext)
    except Exception as exc:  # noqa: BLE001 - any unreadable shard is a problem to report
        return [f"{entry.path}: unreadable ({exc})"], None
    problems = []
    if rows != entry.rows:
        problems.append(f"{entry.path}: {rows} rows, manifest says {entry.rows}")
    if entry.kind in ("parquet", "pairs", "images"):
        try:
            schema = pq.read_schema(path)
            wrong = (image_schema_problem(schema) if entry.kind == "images" else
                     pair_schema_problem(schema, images=images and entry.kind == "parquet",
                                         digests=entry.kind == "parquet" or not images))
        except Exception as exc:  # noqa: BLE001
            wrong = f"unreadable ({exc})"
        if wrong:
            return problems + [f"{entry.path}: {wrong}"], rows
    if entry.kind in ("parquet", "webdataset", "images", "image-tars") and rows:
        try:
            for data in _first_images(path, entry.kind):
                image_from_bytes(data)
        except BadImage as exc:
            problems.append(f"{entry.path}: its first pair's image does not decode ({exc})")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{entry.path}: unreadable ({exc})")
    return problems, rows


class VerifyWork:
    """``verify``'s unit of work: the checks of a few of a release's files (``_check_entry``)."""

    gpus = 0

    def __init__(self, release: Path, image_ext: str, embedded: bool) -> None:
        self.release, self.image_ext, self.embedded = release, image_ext, embedded

    def setup(self) -> None:
        pass

    def __call__(self, entries: list) -> list[tuple[list[str], int | None]]:
        return [_check_entry(self.release, e, self.image_ext, self.embedded) for e in entries]


#: Bytes of a release's files per unit of ``verify``'s work, at most; a release is cut into at least
#: ``VERIFY_UNITS_PER_WORKER`` units a worker (down to ``VERIFY_MIN_UNIT`` bytes), so no worker waits on another.
VERIFY_UNIT_BYTES = 64 << 20
VERIFY_UNITS_PER_WORKER = 4
VERIFY_MIN_UNIT = 1 << 20


def _verify_units(entries: list, unit_bytes: int = VERIFY_UNIT_BYTES) -> list[list]:
    units, unit, size = [], [], 0
    for entry in entries:
        unit.append(entry)
        size += entry.bytes
        if size >= unit_bytes:
            units.append(unit)
            unit, size = [], 0
    return units + ([unit] if unit else [])


def verify_release(release: str | Path, workers: int = 0, engine=None,
                   unit_bytes: int = VERIFY_UNIT_BYTES) -> list[str]:
    """Check every file against the manifest; return the problems found (empty when good). The files are
    hashed and checked in units of about 64 MB, which ``engine`` (given by the command) spreads over
    ``workers`` processes; without one, in this process.

    Reads nothing outside ``release`` and nothing through a symlink (see the module docstring).
    """
    release = Path(release)
    if not release.is_dir():
        raise UserError(f"{release} is not a folder", option="RELEASE")
    try:
        manifest = load_manifest(release)
    except UserError as exc:
        if not (release / layout.MANIFEST).exists():
            raise
        return [f"manifest.json: {exc}"]
    problems = [f"{rel}: a symlink; a release's files must be its own" for rel in _symlinks(release)]
    allowed = {"pairs": {"parquet", "webdataset"}, "images": {"pairs", "images", "image-tars"}}[manifest.layout]
    totals: dict[str, int] = {"parquet": 0, "webdataset": 0, "pairs": 0, "images": 0, "image-tars": 0}
    checked = []
    for entry in manifest.files:
        if entry.kind in totals and entry.kind not in allowed:
            problems.append(f"{entry.path}: a {entry.kind} file in a release of the {manifest.layout} layout")
        else:
            checked.append(entry)
    total = sum(e.bytes for e in checked)
    units = _verify_units(checked, int(np.clip(total // (VERIFY_UNITS_PER_WORKER * max(1, workers)),
                                               min(VERIFY_MIN_UNIT, unit_bytes), unit_bytes)))
    work = VerifyWork(release, manifest.image_ext, manifest.images == "embed")
    if any(e.kind in ("webdataset", "image-tars") for e in checked):  # loaded once, before workers fork
        from .webdataset import load_webdataset

        with loading("verify: loading webdataset, whose reader the tars must suit"):
            load_webdataset()
    with stage_progress("verify", total, unit="B") as (bar, task):
        if engine is None:  # in this process (the command passes an engine to spread the units)
            work.setup()
            results = []
            for unit in units:
                results.append(work(unit))
                bar.update(task, advance=sum(e.bytes for e in unit))
        else:
            results = engine.map(work, units, workers=workers if len(units) > 1 else 0,
                                 on_result=lambda i, _: bar.update(task, advance=sum(e.bytes for e in units[i])))
    for unit, result in zip(units, results):
        for entry, (found, rows) in zip(unit, result):
            problems += found
            if entry.kind in totals and rows is not None:
                totals[entry.kind] += rows
    for kind in ("parquet", "webdataset", "pairs"):
        if manifest.entries(kind) and totals[kind] != manifest.counts.pairs:
            problems.append(f"{kind} shards hold {totals[kind]} pairs, manifest counts {manifest.counts.pairs}")
    if manifest.layout == "images" and not problems:
        problems += _join_problems(release, manifest, totals)
    listed = {e.path for e in manifest.files}
    for folder in layout.SHARD_FOLDERS:
        base = release / folder
        if base.is_dir() and not base.is_symlink():
            for path in sorted(base.rglob("*")):
                rel = path.relative_to(release).as_posix()
                if path.is_file() and not path.is_symlink() and rel not in listed:
                    problems.append(f"{rel}: not in the manifest")
    return problems


def _join_problems(release: Path, manifest: Manifest, totals: dict[str, int]) -> list[str]:
    """An ``images``-layout release ships every picture its pairs name, once, and as many in its tars as in its
    Parquet shards (the key columns, read alone)."""
    problems = []
    pictures = getattr(manifest.counts, "pictures", None)
    for kind in ("images", "image-tars"):
        if manifest.entries(kind) and isinstance(pictures, int) and totals[kind] != pictures:
            problems.append(f"{kind} shards hold {totals[kind]} pictures, manifest counts {pictures}")
    if manifest.images != "embed":
        return problems
    shipped: set[str] = set()
    for entry in manifest.entries("images"):
        for key in pq.read_table(release_file(release, entry), columns=["key"]).column("key").to_pylist():
            if key in shipped:
                problems.append(f"{entry.path}: picture {key!r} is stored twice")
            shipped.add(key)
    for entry in manifest.entries("pairs"):
        table = pq.read_table(release_file(release, entry), columns=["anchor_key", "positive_key"]).to_pydict()
        for side in ("anchor", "positive"):
            for key in table[f"{side}_key"]:
                if key not in shipped:
                    problems.append(f"{entry.path}: a pair's {side} {key!r} has no picture in the image shards")
                    if len(problems) > 20:
                        return problems
    return problems


def verified_files(release: str | Path) -> list[tuple[str, int]]:
    """The files a verified release consists of, ``(relative path, bytes)``: its listed files and the manifest.

    Raises :class:`UserError` unless :func:`verify_release` finds no problem.
    """
    release = Path(release)
    problems = verify_release(release)
    if problems:
        raise UserError(f"{release} does not verify ({problems[0]}); run `spp-curate verify {release}`",
                        option="RELEASE")
    manifest = load_manifest(release)
    files = [(e.path, e.bytes) for e in manifest.files]
    return files + [(layout.MANIFEST, (release / layout.MANIFEST).stat().st_size)]
