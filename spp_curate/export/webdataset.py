"""WebDataset shards: pair samples (``<key>.anchor.<ext>``, ``<key>.json``, ``<key>.positive.<ext>``, adjacent) and,
in the ``images`` layout, picture samples (``<id>.<ext>``, ``<id>.json``), each tar written by one writer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


from ..files import temp_path
from .samples import PairSample


def load_webdataset() -> None:
    """Import webdataset (and torch under it) once in this process, before workers fork, where tars are written
    or checked: each worker would otherwise import it again. A command that touches no tar never loads it."""
    import importlib

    importlib.import_module("webdataset")


class TarShardWriter:
    """Writes one tar shard of WebDataset samples to a temporary name, renamed into place on :meth:`close`.

    Member times are fixed (``mtime=0``) so the same samples give the same bytes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.rows = 0
        import webdataset as wds  # and torch under it: loaded by the writers that write tars, not on import

        self._fh = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._fh, mtime=0, user="spp", group="spp")

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.rows += 1

    def close(self) -> int:
        self._tar.close()
        if not self._fh.closed:
            self._fh.close()
        os.replace(self.tmp, self.path)
        return self.rows

    def abort(self) -> None:
        """After a failed write (a full disk): drop the temporary file without flushing the tar's end blocks,
        which would fail again, from a finaliser, as an ignored exception."""
        tar = self._tar.tarstream
        tar.closed = True
        stream = getattr(tar, "fileobj", None)
        if stream is not None and hasattr(stream, "closed"):
            stream.closed = True  # tarfile's stream would flush its buffer when collected
        try:
            self._fh.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


class PairTarWriter(TarShardWriter):
    """A pair shard: each pair's anchor, JSON and positive as one sample."""

    def __init__(self, path: Path, image_ext: str) -> None:
        super().__init__(path)
        self.ext = image_ext

    def write(self, sample: PairSample) -> None:  # type: ignore[override]
        super().write({
            "__key__": sample.key,
            f"anchor.{self.ext}": sample.anchor,
            f"positive.{self.ext}": sample.positive,
            "json": json.dumps(sample.metadata(), sort_keys=True).encode(),
        })
