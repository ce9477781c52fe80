"""Decisions on pairs: ``DIR/reviews.parquet``, one row per decision, written whole and atomically each time.

A decision names its pair by the two image keys (and the pair id it had when
made), so decisions stay with their pictures when the pairs are mined again
with other settings. The file is rewritten under a lock (``DIR/.reviews.lock``,
the kernel's ``flock``): two review servers on one build take turns, and a
server killed between two decisions leaves the file as it was after the first.
Each reviewer's last decision on a pair is the one that counts.

How several reviewers combine: a pair is *rejected* when any reviewer's last
decision rejects it, *accepted* when at least one accepts it and none rejects
it; ``skip`` is no decision.
"""

from __future__ import annotations

import contextlib
import fcntl
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import layout
from ..errors import UserError, brief
from ..files import write_table

DECISIONS = ("accept", "reject", "skip")
SCHEMA = pa.schema([
    ("pair_id", pa.int64()), ("anchor_key", pa.string()), ("positive_key", pa.string()),
    ("decision", pa.string()), ("time", pa.timestamp("ms", tz="UTC")), ("reviewer", pa.string()),
    # Estimate mode (``review/estimate.py``): a decision on a pair drawn at random, its similarity band and its
    # position in the seeded draw; null for decisions made while browsing.
    ("sample", pa.bool_()), ("band", pa.int32()), ("draw", pa.int64()),
])
#: The columns every version of the file has; the others read as null when absent.
REQUIRED = ("pair_id", "anchor_key", "positive_key", "decision", "time", "reviewer")


def _read(path: Path) -> pa.Table:
    """The file's decisions in this SCHEMA; files written before the sample columns read with them null.

    Read through one open file: another server may rename a new version into place meanwhile, and a reader
    that opened the path twice (metadata, then pages) would mix the two versions."""
    try:
        with open(path, "rb") as fh:
            table = pq.ParquetFile(fh).read()
        columns = {}
        for name in SCHEMA.names:
            typ = SCHEMA.field(name).type
            if name not in table.column_names and name in REQUIRED:
                raise ValueError(f"no {name} column")
            columns[name] = (table.column(name).cast(typ) if name in table.column_names
                             else pa.nulls(table.num_rows, typ))
        return pa.table(columns, schema=SCHEMA)
    except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
        first = brief(exc, 160)
        raise UserError(f"{path} is damaged ({first}); move it aside to review afresh, or restore it "
                        "(nothing here removes it)", option="DIR") from None


@contextlib.contextmanager
def _locked(build_dir: Path) -> Iterator[None]:
    with open(build_dir / layout.REVIEWS_LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: The longest reviewer name recorded with a decision.
MAX_REVIEWER = 100


def reviewer_name(given: str | None) -> str:
    """The name recorded with each decision: ``--reviewer``, else the login name; printable, at most
    MAX_REVIEWER characters, or a one-line error naming the option."""
    import getpass

    try:
        default = getpass.getuser()
    except (OSError, KeyError):
        default = "reviewer"
    name = (given if given is not None else default).strip()
    if not name or len(name) > MAX_REVIEWER or any(not c.isprintable() for c in name):
        raise UserError(f"got {given!r}; accepted: a printable name of at most {MAX_REVIEWER} characters",
                        option="--reviewer")
    return name


def read_reviews(build_dir: Path) -> pd.DataFrame:
    """Every decision recorded on this build (an empty table when there is none)."""
    path = build_dir / layout.REVIEWS
    if not path.is_file() or path.is_symlink():
        return SCHEMA.empty_table().to_pandas()
    return _read(path).to_pandas()


def record(build_dir: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Append decisions (pair_id, anchor_key, positive_key, decision, reviewer) and return every decision."""
    for row in rows:
        if row["decision"] not in DECISIONS:
            raise ValueError(f"decision {row['decision']!r}; accepted: {', '.join(DECISIONS)}")
    now = datetime.now(timezone.utc)
    new = pa.Table.from_pylist([{"sample": None, "band": None, "draw": None, **r, "time": now} for r in rows],
                               schema=SCHEMA)
    with _locked(build_dir):
        path = build_dir / layout.REVIEWS
        old = _read(path) if path.is_file() and not path.is_symlink() else SCHEMA.empty_table()
        table = pa.concat_tables([old, new])
        write_table(path, table)
    return table.to_pandas()


def pair_key(anchor_key: pd.Series | np.ndarray, positive_key: pd.Series | np.ndarray) -> np.ndarray:
    """One string per unordered pair of image keys."""
    a, p = pd.Series(np.asarray(anchor_key, dtype=object)), pd.Series(np.asarray(positive_key, dtype=object))
    first = a <= p
    return (a.where(first, p) + "\x00" + p.where(first, a)).to_numpy(dtype=object)


def last_decisions(reviews: pd.DataFrame) -> pd.DataFrame:
    """Each reviewer's last decision on each pair: columns pair, reviewer, decision, time."""
    if not len(reviews):
        return pd.DataFrame({"pair": [], "reviewer": [], "decision": [], "time": []})
    frame = reviews.assign(pair=pair_key(reviews.anchor_key, reviews.positive_key), order=np.arange(len(reviews)))
    frame = frame.sort_values(["time", "order"]).drop_duplicates(["pair", "reviewer"], keep="last")
    return frame[["pair", "reviewer", "decision", "time"]].reset_index(drop=True)


def consensus(last: pd.DataFrame) -> pd.Series:
    """Per pair: ``accepted``, ``rejected`` or ``undecided`` (only skips), over every reviewer's last decision."""
    if not len(last):
        return pd.Series(dtype=object)
    flags = pd.DataFrame({"pair": last.pair.to_numpy(), "rejected": (last.decision == "reject").to_numpy(),
                          "accepted": (last.decision == "accept").to_numpy()})
    by_pair = flags.groupby("pair")
    rejected, accepted = by_pair.rejected.any(), by_pair.accepted.any()
    return pd.Series(np.where(rejected, "rejected", np.where(accepted, "accepted", "undecided")), index=rejected.index)


def apply_reviews(pairs: pd.DataFrame, reviews: pd.DataFrame,
                  reviewed: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The pairs a release of ``reviewed`` holds (``pairs`` has anchor_key and positive_key), and what the
    release records of the review: counts over the build's pairs, reviewers, their agreement."""
    keys = pair_key(pairs.anchor_key, pairs.positive_key)
    last = last_decisions(reviews)
    last = last[last.pair.isin(set(keys))]
    verdict = consensus(last)
    state = pd.Series(keys).map(verdict).fillna("unreviewed").to_numpy()
    keep = (np.ones(len(pairs), bool) if reviewed == "all" else
            state == "accepted" if reviewed == "accepted" else state != "rejected")
    decided = last[last.decision != "skip"]
    per_pair = decided.groupby("pair").decision.agg(["nunique", "size"])
    shared = per_pair[per_pair["size"] >= 2]
    return pairs[keep], {
        "selected": reviewed,
        "pairs_mined": len(pairs),
        "pairs_reviewed": int(decided.pair.nunique()),
        "accepted": int((verdict == "accepted").sum()),
        "rejected": int((verdict == "rejected").sum()),
        "skipped_only": int((verdict == "undecided").sum()),
        "reviewers": sorted(last.reviewer.unique().tolist()),
        "pairs_reviewed_by_two_or_more": len(shared),
        "agreement": float((shared["nunique"] == 1).mean()) if len(shared) else None,
    }
