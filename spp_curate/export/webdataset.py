"""WebDataset pair shards: ``<key>.anchor.<ext>``, ``<key>.json``, ``<key>.positive.<ext>``, adjacent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import webdataset as wds

from .samples import PairSample


class PairTarWriter:
    """Writes one tar shard to a temporary name, renamed into place on :meth:`close`.

    Member times are fixed (``mtime=0``) so the same pairs give the same bytes.
    """

    def __init__(self, path: Path, image_ext: str) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
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


def tar_sample_count(path: Path, image_ext: str) -> int:
    """Count samples in a pair shard, checking each sample's three members are adjacent."""
    import tarfile

    expected = (f"anchor.{image_ext}", "json", f"positive.{image_ext}")
    names = []
    with tarfile.open(path) as tar:
        for member in tar:
            names.append(member.name)
    if len(names) % 3:
        raise ValueError(f"{len(names)} members is not a whole number of pairs")
    for i in range(0, len(names), 3):
        keys = {n.split(".", 1)[0] for n in names[i:i + 3]}
        exts = tuple(sorted(n.split(".", 1)[1] for n in names[i:i + 3]))
        if len(keys) != 1 or exts != expected:
            raise ValueError(f"members {names[i:i + 3]} are not one pair's adjacent members")
    return len(names) // 3
