"""File helpers shared by every stage: atomic writes, content hashes, confined paths, owned folders, the build lock.

Every stage writes to a temporary name beside the final one and renames when
the content is complete, so a killed run never leaves a half file under the
real name. A folder is replaced only by writing its successor beside it and
swapping, and only when every file in the old one is one spp-curate writes:
the program never deletes a file it did not write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

_HASH_BLOCK = 1 << 20
#: ``.NAME.tmp-PID``: the only temporary names the program makes, and the only ones it cleans up.
TEMP_RE = re.compile(r"^\.[^/]+\.tmp-(\d+)$")


class UnsafePath(ValueError):
    """A path taken from outside input that would leave its base folder, or pass through a symlink."""


def temp_path(final: str | os.PathLike[str]) -> Path:
    """The temporary name a file is written under before it is renamed to ``final``."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete the temporary files (``.NAME.tmp-PID``) a killed run left under ``directory``; return how many.

    Only names of the program's own temporary pattern are touched, never through a symlink, and never
    those of a live process (a review server writes its decisions beside a running build).
    """
    directory = Path(directory)
    if not directory.is_dir() or directory.is_symlink():
        return 0
    removed = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not Path(dirpath, d).is_symlink()]
        for name in filenames:
            match = TEMP_RE.match(name)
            path = Path(dirpath, name)
            if match and not _alive(int(match.group(1))) and path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
    return removed


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


#: Rows a Parquet row group holds: the writer buffers a whole row group's encoded pages, so a table of
#: millions of rows is written a bounded slice at a time.
ROW_GROUP = 65_536


def write_table(path: str | os.PathLike[str], table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    pa.default_memory_pool().release_unused()  # the writer's buffers go back to the system, not kept


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def short_hash(text: str) -> str:
    """The first 16 hex digits of the sha256 of ``text``: the form of every fingerprint and source state."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def file_identity(st: os.stat_result) -> str:
    """A file's cheap identity, ``size:mtime_ns``: what says a file changed without reading it."""
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_capped(path: str | os.PathLike[str], cap: int, what: str = "file") -> bytes:
    """Read a whole file, refusing (before reading) one larger than ``cap`` bytes."""
    size = os.stat(path).st_size
    if size > cap:
        raise ValueError(f"{what} is {size:,} bytes, over the {cap:,}-byte limit")
    with open(path, "rb") as fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{what} grew past the {cap:,}-byte limit while being read")
    return data


def check_relative(rel: str) -> PurePosixPath:
    """A relative POSIX path with no ``..``, ``.``, empty, absolute or backslash parts; raises :class:`UnsafePath`."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise UnsafePath(f"{rel!r} is not a relative path")
    path = PurePosixPath(rel)
    if path.is_absolute() or rel.startswith("/") or any(p in ("..", ".", "") for p in rel.split("/")):
        raise UnsafePath(f"{rel!r} is absolute or climbs out with '..'")
    return path


def safe_join(base: str | os.PathLike[str], rel: str, follow_inside: bool = False) -> Path:
    """``base / rel`` for a path ``rel`` taken from outside input, kept inside ``base``.

    ``rel`` must be relative with no ``..``; a symlink on the way is refused, or, with
    ``follow_inside``, allowed only where it resolves to a place inside ``base``. Only the parts
    inside ``base`` are looked at, so a refused path never touches anything outside it.
    """
    parts = check_relative(rel).parts
    base = Path(base)
    path = base
    for i, part in enumerate(parts):
        path = path / part
        if path.is_symlink():
            if not follow_inside:
                raise UnsafePath(f"{rel!r} passes through a symlink ({'/'.join(parts[: i + 1])})")
            if not path.resolve().is_relative_to(base.resolve()):
                raise UnsafePath(f"{rel!r}: the symlink {'/'.join(parts[: i + 1])} leads outside")
    return path


def foreign_files(directory: str | os.PathLike[str], patterns: Iterable[re.Pattern[str]]) -> list[str]:
    """Paths under ``directory`` (relative, POSIX) that the program would not have written there.

    A file is the program's when its relative path matches one of ``patterns`` or is one of its
    temporary names; symlinks and anything that is not a plain file or folder are never its.
    """
    directory = Path(directory)
    patterns = list(patterns)
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in sorted(dirnames):
            if Path(dirpath, name).is_symlink():
                out.append(Path(dirpath, name).relative_to(directory).as_posix())
        dirnames[:] = sorted(d for d in dirnames if not Path(dirpath, d).is_symlink())
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink() or not path.is_file():
                out.append(rel)
            elif not (TEMP_RE.match(name) or any(p.fullmatch(rel) for p in patterns)):
                out.append(rel)
    return out


def refuse_foreign(directory: Path, patterns: Iterable[re.Pattern[str]], option: str) -> None:
    """Raise a one-line :class:`UserError` if ``directory`` holds anything the program did not write."""
    if directory.is_symlink():
        raise UserError(f"{directory} is a symlink; spp-curate writes only into folders it made", option=option)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise UserError(f"{directory} is a file, not a folder", option=option)
    foreign = foreign_files(directory, patterns)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{directory} holds {foreign[0]}{more}, which spp-curate did not write; it deletes "
                        "nothing of yours: move it away or choose another folder", option=option)


def remove_owned(directory: Path, patterns: Iterable[re.Pattern[str]], option: str) -> None:
    """Delete ``directory`` after checking that every file in it is one the program writes there."""
    refuse_foreign(directory, patterns, option)
    if directory.exists():
        shutil.rmtree(directory)


def swap_in(staging: Path, final: Path, patterns: Iterable[re.Pattern[str]], option: str) -> None:
    """Replace ``final`` with the complete folder ``staging``; the old ``final`` goes only after the swap.

    A kill at any point leaves either the old folder or the new one under ``final`` (or both
    names recoverable by :func:`recover_swap`), never neither.
    """
    old = final.with_name(f".{final.name}.old")
    refuse_foreign(final, patterns, option)
    remove_owned(old, patterns, option)
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    if old.exists():
        shutil.rmtree(old)


def recover_swap(final: Path, patterns: Iterable[re.Pattern[str]], option: str) -> None:
    """Finish a swap a kill interrupted: put the old folder back if the new one never arrived."""
    old = final.with_name(f".{final.name}.old")
    if not old.exists():
        return
    if final.exists():
        remove_owned(old, patterns, option)
    else:
        os.rename(old, final)


class BuildLock:
    """An exclusive lock on a folder (``DIR/.lock``), held for as long as a command writes there.

    A second command on the same folder gets a one-line error naming the process that holds it.
    The lock is the kernel's (``flock``), so it goes with the process that held it, kill included.
    """

    def __init__(self, directory: Path, option: str = "--out") -> None:
        self.path = Path(directory) / ".lock"
        self.option = option
        self._fh = None

    def __enter__(self) -> "BuildLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")
        except OSError as exc:
            raise UserError(f"cannot write to {self.path.parent}: {exc.strerror or exc}", option=self.option) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(f"{self.path.parent} is in use by {holder}; wait for it to finish or choose "
                            "another folder", option=self.option) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
