"""Parquet pair shards with declared Hugging Face features (Image columns decode on load)."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import temp_path
from .samples import PairSample


PAIR_COLUMNS = ["pair_id", "anchor_key", "positive_key", "anchor_digest", "positive_digest", "label",
                "label_name", "similarity"]


def id_features(class_names: list[str]) -> datasets.Features:
    """The schema of an ID-only release: keys and digests, no pixels."""
    label = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int32")
    return datasets.Features({
        "pair_id": datasets.Value("int64"),
        "anchor_key": datasets.Value("string"),
        "positive_key": datasets.Value("string"),
        "anchor_digest": datasets.Value("string"),
        "positive_digest": datasets.Value("string"),
        "label": label,
        "label_name": datasets.Value("string"),
        "similarity": datasets.Value("float32"),
    })


def pair_features(class_names: list[str]) -> datasets.Features:
    """The release schema, declared (not inferred), as ``datasets`` reads it: images first."""
    return datasets.Features({"pair_id": datasets.Value("int64"), "anchor": datasets.Image(),
                              "positive": datasets.Image(), **{k: v for k, v in id_features(class_names).items()
                                                                 if k != "pair_id"}})


class PairParquetWriter:
    """Writes one Parquet shard in row groups, renamed into place on :meth:`close`."""

    def __init__(self, path: Path, features: datasets.Features, row_group_rows: int) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.schema = features.arrow_schema  # carries the features in its "huggingface" metadata
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._buffer: list[PairSample] = []
        self._writer = pq.ParquetWriter(self.tmp, self.schema)

    def write(self, sample: PairSample) -> None:
        self._buffer.append(sample)
        if len(self._buffer) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        b = self._buffer
        columns = {name: [getattr(s, name) for s in b] for name in self.schema.names
                   if name not in ("anchor", "positive")}
        if "anchor" in self.schema.names:
            columns["anchor"] = [{"bytes": s.anchor, "path": None} for s in b]
            columns["positive"] = [{"bytes": s.positive, "path": None} for s in b]
        table = pa.table({name: columns[name] for name in self.schema.names}, schema=self.schema)
        self._writer.write_table(table)
        self.rows += len(b)
        self._buffer = []

    def close(self) -> int:
        self._flush()
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.rows

    def abort(self) -> None:
        """After a failed write: close quietly and drop the temporary file."""
        try:
            self._writer.close()
        except (OSError, ValueError):
            pass
        self.tmp.unlink(missing_ok=True)
