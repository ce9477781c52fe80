"""WebDataset pair shards: ``<key>.anchor.<ext>``, ``<key>.json``, ``<key>.positive.<ext>``, adjacent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import webdataset as wds

from ..files import temp_path
from .samples import PairSample


class PairTarWriter:
    """Writes one tar shard to a temporary name, renamed into place on :meth:`close`.

    Member times are fixed (``mtime=0``) so the same pairs give the same bytes.
    """

    def __init__(self, path: Path, image_ext: str) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.ext = image_ext
        self.rows = 0
        self._fh = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._fh, mtime=0, user="spp", group="spp")

    def write(self, sample: PairSample) -> None:
        self._tar.write({
            "__key__": sample.key,
            f"anchor.{self.ext}": sample.anchor,
            f"positive.{self.ext}": sample.positive,
            "json": json.dumps(sample.metadata(), sort_keys=True).encode(),
        })
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
