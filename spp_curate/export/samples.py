"""The record both shard writers take, and the interface they share (img2dataset's writers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PairSample:
    """One pair as it goes into a release: metadata plus the two encoded images."""

    pair_id: int
    anchor: bytes
    positive: bytes
    anchor_key: str
    positive_key: str
    anchor_digest: str
    positive_digest: str
    label: int
    label_name: str
    similarity: float

    @property
    def key(self) -> str:
        """The WebDataset sample key: digits only, so it holds no dot."""
        return f"{self.pair_id:09d}"

    def metadata(self) -> dict[str, Any]:
        return {"pair_id": self.pair_id, "anchor_key": self.anchor_key, "positive_key": self.positive_key,
                "anchor_digest": self.anchor_digest, "positive_digest": self.positive_digest,
                "label": self.label, "label_name": self.label_name,
                "similarity": round(float(self.similarity), 6)}
