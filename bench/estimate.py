"""Calibration of the reviewed-sample precision estimate (``review/estimate.py``) on real pairs.

    python bench/estimate.py --quick     # the committed subset, --category none, 200 seeds (minutes on 2 cores)
    python bench/estimate.py --full      # 10,000 Fashion-MNIST pictures, 1,000 seeds

Builds a release of the SePP-ID sampler alone (``--category none``, whose pairs are right or wrong by their
labels), then, for each seed, a simulated reviewer takes the seed's draw (``estimate.sample_plan``), answers
from the labels (``accept`` when they agree) and stops after 300 judgements. On the first ``--api-seeds``
seeds the same reviewer also drives the review page's API in estimate mode (the FastAPI app itself, in
process: next pair, decision, estimate), and the page's estimates must equal the estimator's. Per seed: the estimate and its 95 % interval after 50, 100, 200 and
300 pairs; the coverage is the share of seeds whose interval holds the label precision of the whole release.
A second reviewer who errs at a set rate (``--error-rate``) is scored against the precision such a reviewer
would see. Ends with one JSON line holding ``coverage``, ``seeds``, ``width_300`` (mean interval width at 300
pairs), ``precision`` and the convergence table.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEBIAN, SUBSET, mode_parser  # noqa: E402

CHECKPOINTS = (50, 100, 200, 300)


def build_release(out: Path, root: Path, limit: int) -> Path:
    from spp_curate.config import resolve_recipe
    from spp_curate.stages import build

    recipe = resolve_recipe("fashion-mnist", {"root": str(root), "limit": limit, "encoder": "openclip:ViT-S-32",
                                              "image_size": 32, "category": "none", "min_similarity": "q0",
                                              "max_per_anchor": 1, "workers": 0})
    build(out, recipe)
    return out


def label_truth(build_dir: Path):
    """The build's pairs with their unordered key and whether their labels agree, and the label precision."""
    import pandas as pd

    from spp_curate import layout
    from spp_curate.review import store

    index = pq.read_table(build_dir / layout.INDEX, columns=["id", "key", "label"]).to_pandas().set_index("id")
    pairs = pq.read_table(build_dir / layout.PAIRS).to_pandas()
    pairs["anchor_key"] = index.key.loc[pairs.anchor_id].to_numpy()
    pairs["positive_key"] = index.key.loc[pairs.positive_id].to_numpy()
    pairs["key"] = store.pair_key(pairs.anchor_key, pairs.positive_key)
    pairs["good"] = index.label.loc[pairs.anchor_id].to_numpy() == index.label.loc[pairs.positive_id].to_numpy()
    return pairs, float(pairs.good.mean()), pd


def answers(pairs, seed: int, n: int, error_rate: float, pd):
    """What a simulated reviewer records in estimate mode: the first ``n`` pairs of the seed's draw, judged
    from the labels and wrong at ``error_rate``."""
    from spp_curate.review import estimate as E

    plan = E.sample_plan(pairs.key.to_numpy(), pairs.similarity.to_numpy(), seed).iloc[:n]
    rows = pairs.set_index("key").loc[plan.key]
    flip = np.random.default_rng([seed, 7]).random(len(rows)) < error_rate
    return pd.DataFrame({"pair_id": rows.pair_id.to_numpy(), "anchor_key": rows.anchor_key.to_numpy(),
                         "positive_key": rows.positive_key.to_numpy(),
                         "decision": np.where(rows.good.to_numpy() ^ flip, "accept", "reject"),
                         "time": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(len(rows)), "s"),
                         "reviewer": "sim", "sample": True, "band": plan.band.to_numpy(),
                         "draw": plan.draw.to_numpy()})


def through_the_api(build_dir: Path, seed: int, n: int, error_rate: float, pairs) -> list[tuple]:
    """The same reviewer, driving the review page's API in estimate mode (the FastAPI app, in process)."""
    from fastapi.testclient import TestClient

    from spp_curate import layout
    from spp_curate.review.server import create_app

    good = dict(zip(pairs.pair_id, pairs.good))
    (build_dir / layout.REVIEWS).unlink(missing_ok=True)
    flips = np.random.default_rng([seed, 7]).random(n) < error_rate
    got = []
    with TestClient(create_app(build_dir, "sim", estimate=n, half_width=0.0, seed=seed),
                    base_url="http://127.0.0.1") as client:
        for i in range(n):
            nxt = client.get("/api/estimate/next").json()
            if nxt["pair"] is None:
                break
            ok = bool(good[nxt["pair"]["pair_id"]]) ^ bool(flips[i])
            est = client.post("/api/decision", json={"pair_id": nxt["pair"]["pair_id"],
                                                     "decision": "accept" if ok else "reject"}).json()["estimate"]
            if i + 1 in CHECKPOINTS:
                got.append((est["value"], est["low"], est["high"]))
    (build_dir / layout.REVIEWS).unlink(missing_ok=True)
    return got


def simulate(build_dir: Path, seeds: int, api_seeds: int, error_rate: float) -> dict:
    from spp_curate.review import estimate as E

    pairs, precision, pd = label_truth(build_dir)
    seen = precision * (1 - error_rate) + (1 - precision) * error_rate
    target = seen if error_rate else precision
    rows = {c: [] for c in CHECKPOINTS}
    started = time.perf_counter()
    for seed in range(seeds):
        table = answers(pairs, seed, max(CHECKPOINTS), error_rate, pd)
        for c in CHECKPOINTS:
            est = E.estimate_precision(pairs[["key", "similarity"]], table.iloc[:c])
            rows[c].append((est.value, est.low, est.high))
    direct_s = time.perf_counter() - started
    same = 0
    started = time.perf_counter()
    for seed in range(api_seeds):  # the page's API gives the same estimates as the estimator on the same answers
        api = through_the_api(build_dir, seed, max(CHECKPOINTS), error_rate, pairs)
        same += int(np.allclose(np.asarray(api, dtype=float), np.asarray([rows[c][seed] for c in CHECKPOINTS])))
    table = {}
    for n, got in rows.items():
        got = np.asarray([g for g in got if g[0] is not None], dtype=np.float64)
        table[n] = {"coverage": round(float(np.mean((got[:, 1] <= target) & (target <= got[:, 2]))), 4),
                    "mean_width": round(float(np.mean(got[:, 2] - got[:, 1])), 4),
                    "mean_abs_error": round(float(np.mean(np.abs(got[:, 0] - target))), 4),
                    "seeds": int(len(got))}
    return {"precision": round(precision, 4), "reviewer_sees": round(seen, 4), "error_rate": error_rate,
            "table": table, "api_seeds": api_seeds, "api_equals_estimator": same,
            "seconds_direct": round(direct_s, 1), "seconds_api": round(time.perf_counter() - started, 1)}


def main_(argv: list[str] | None = None) -> dict:
    parser = mode_parser(__doc__)
    parser.add_argument("--seeds", type=int, help="[quick 200, full 1000]")
    parser.add_argument("--error-rate", type=float, default=0.05, help="the erring reviewer's rate")
    parser.add_argument("--api-seeds", type=int, default=5, help="seeds also driven through the page's API")
    args = parser.parse_args(argv)
    seeds = args.seeds or (1000 if args.full else 200)
    root = args.root or (DEBIAN if args.full and DEBIAN.exists() else SUBSET)
    with tempfile.TemporaryDirectory() as tmp:
        build_dir = build_release(Path(tmp) / "b", root, 10_000 if args.full else 3_000)
        exact = simulate(build_dir, seeds, args.api_seeds, 0.0)
        erring = simulate(build_dir, seeds, 1, args.error_rate)
    for name, res in (("labels", exact), (f"errs {args.error_rate:.0%}", erring)):
        print(f"reviewer answering from {name}: release precision {res['precision']}, reviewer sees "
              f"{res['reviewer_sees']}; through the page's API on {res['api_seeds']} seeds, the same estimates "
              f"on {res['api_equals_estimator']}")
        print("| judged | coverage | mean width | mean |error| | seeds |\n|---|---|---|---|---|")
        for n, row in res["table"].items():
            print(f"| {n} | {row['coverage']} | {row['mean_width']} | {row['mean_abs_error']} | {row['seeds']} |")
    last = exact["table"][max(exact["table"])]
    result = {"coverage": last["coverage"], "seeds": last["seeds"], "width_300": last["mean_width"],
              "precision": exact["precision"], "convergence": exact["table"], "erring_reviewer": erring}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_()
