"""A release's precision without labels: the stratified reviewed sample, its interval, and what it drives.

Real pairs: the committed subset mined with ``--category none`` (the SePP-ID sampler alone), whose pairs are
right or wrong by their labels. Simulated reviewers answer from those labels (or err at a set rate) through
the review page's API in estimate mode, and the interval is held to the label precision of the whole release.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from spp_curate import layout
from spp_curate.review import estimate as E
from spp_curate.review import store

from conftest import FMNIST, TEST_ENCODER, run_cli


def truth(build) -> tuple[pd.DataFrame, float]:
    """The build's pairs with their unordered key and whether their labels agree; and the label precision."""
    index = pq.read_table(build / layout.INDEX, columns=["id", "key", "label"]).to_pandas().set_index("id")
    pairs = pq.read_table(build / layout.PAIRS).to_pandas()
    pairs["anchor_key"] = index.key.loc[pairs.anchor_id].to_numpy()
    pairs["positive_key"] = index.key.loc[pairs.positive_id].to_numpy()
    pairs["key"] = store.pair_key(pairs.anchor_key, pairs.positive_key)
    pairs["good"] = index.label.loc[pairs.anchor_id].to_numpy() == index.label.loc[pairs.positive_id].to_numpy()
    return pairs, float(pairs.good.mean())


def simulated_reviews(pairs: pd.DataFrame, seed: int, n: int, error_rate: float = 0.0,
                      reviewer: str = "sim") -> pd.DataFrame:
    """What a reviewer answering from the labels records in estimate mode: the first ``n`` pairs of the draw."""
    plan = E.sample_plan(pairs.key.to_numpy(), pairs.similarity.to_numpy(), seed).iloc[:n]
    rows = pairs.set_index("key").loc[plan.key]
    good = rows.good.to_numpy()
    flip = np.random.default_rng([seed, 7]).random(len(good)) < error_rate
    return pd.DataFrame({"pair_id": rows.pair_id.to_numpy(), "anchor_key": rows.anchor_key.to_numpy(),
                         "positive_key": rows.positive_key.to_numpy(),
                         "decision": np.where(good ^ flip, "accept", "reject"),
                         "time": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(len(good)), "s"),
                         "reviewer": reviewer, "sample": True, "band": plan.band.to_numpy(),
                         "draw": plan.draw.to_numpy()})


def reviewed_copy(build, tmp_path, seed: int, n: int):
    """A copy of ``build`` whose ``reviews.parquet`` holds a simulated reviewer's first ``n`` sample decisions."""
    import pyarrow as pa

    copy = tmp_path / "b"
    shutil.copytree(build, copy)
    pairs, _ = truth(copy)
    table = simulated_reviews(pairs, seed, n)
    table["band"] = table.band.astype("int32")
    pq.write_table(pa.Table.from_pandas(table, schema=store.SCHEMA, preserve_index=False), copy / layout.REVIEWS)
    return copy, pairs


def test_the_draw_is_seeded_stratified_and_equal_in_allocation(none_build):
    pairs, _ = truth(none_build)
    plan = E.sample_plan(pairs.key.to_numpy(), pairs.similarity.to_numpy(), seed=3)
    shuffled = pairs.sample(frac=1.0, random_state=1)
    again = E.sample_plan(shuffled.key.to_numpy(), shuffled.similarity.to_numpy(), seed=3)
    assert plan.equals(again)  # the pairs decide the draw, not their order in the file
    assert not plan.key.equals(E.sample_plan(pairs.key.to_numpy(), pairs.similarity.to_numpy(), seed=4).key)
    assert sorted(plan.key) == sorted(pairs.key)  # every pair is drawn once
    first = plan.band.iloc[:50].to_numpy()
    assert first[:5].tolist() == [0, 1, 2, 3, 4] and np.bincount(first).tolist() == [10] * 5  # lowest band first
    shares = np.bincount(E.bands_of(pairs.similarity.to_numpy())) / len(pairs)
    assert np.allclose(shares, np.diff(E.BAND_EDGES), atol=0.01)
    lows = pairs.similarity.to_numpy()[E.bands_of(pairs.similarity.to_numpy()) == 0]
    assert lows.max() <= np.quantile(pairs.similarity, 0.1) + 1e-6


def test_the_interval_covers_the_label_precision_in_about_95_percent_of_200_seeds(none_build):
    pairs, precision = truth(none_build)
    assert 0.3 < precision < 0.95
    covered, widths = [], []
    for seed in range(200):
        est = E.estimate_precision(pairs[["key", "similarity"]], simulated_reviews(pairs, seed, 300))
        covered.append(est.low <= precision <= est.high)
        widths.append(est.high - est.low)
    coverage = float(np.mean(covered))
    print(f"coverage {coverage:.3f} over 200 seeds, mean width at 300 pairs {np.mean(widths):.4f}, "
          f"precision {precision:.4f}")
    assert 0.90 <= coverage <= 0.99
    assert np.mean(widths) <= 0.12  # +-0.06 at 300 pairs
    # it converges: more judged pairs, a narrower interval around the truth
    errors = [np.mean([abs(E.estimate_precision(pairs[["key", "similarity"]],
                                                simulated_reviews(pairs, s, n)).value - precision)
                       for s in range(30)]) for n in (50, 150, 300)]
    assert errors[0] > errors[1] > errors[2], errors


def test_an_erring_reviewer_is_measured_as_they_judge_and_two_reviewers_agree_by_kappa(none_build):
    pairs, precision = truth(none_build)
    seen = precision * 0.9 + (1 - precision) * 0.1
    est = E.estimate_precision(pairs[["key", "similarity"]], simulated_reviews(pairs, 0, 600, error_rate=0.1))
    assert est.low <= seen <= est.high
    both = pd.concat([simulated_reviews(pairs, 0, 200, reviewer="ann"),
                      simulated_reviews(pairs, 0, 200, error_rate=0.2, reviewer="bob")])
    two = E.estimate_precision(pairs[["key", "similarity"]], both)
    assert two.reviewers == ["ann", "bob"] and two.pairs_judged_by_two == 200
    assert 0.3 < two.kappa < 0.9  # a 20 % error rate: agreement well above chance, well below perfect
    skipped = simulated_reviews(pairs, 0, 100)
    skipped["decision"] = "skip"
    assert E.estimate_precision(pairs[["key", "similarity"]], skipped).value is None  # a skip judges nothing


def test_estimate_mode_through_the_page_api_and_what_the_release_says(none_build, tmp_path):
    from fastapi.testclient import TestClient

    from spp_curate.review.server import create_app

    build = tmp_path / "b"
    shutil.copytree(none_build, build)
    pairs, precision = truth(build)
    good = dict(zip(pairs.pair_id, pairs.good))
    app = create_app(build, "ann", estimate=40, seed=5)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/api/summary").json()["estimate"]["target_pairs"] == 40
        drawn = []
        while True:
            nxt = client.get("/api/estimate/next").json()
            if nxt["done"]:
                break
            drawn.append(nxt["pair"]["pair_id"])
            answer = client.post("/api/decision", json={"pair_id": drawn[-1],
                                                        "decision": "accept" if good[drawn[-1]] else "reject"}).json()
        assert len(drawn) == 40 and answer["judged"] == 40 and answer["estimate"]["value"] is not None
    plan = E.sample_plan(pairs.key.to_numpy(), pairs.similarity.to_numpy(), 5)
    assert drawn == pairs.set_index("key").loc[plan.key.iloc[:40]].pair_id.tolist()  # the draw, in its order
    recorded = store.read_reviews(build)
    assert recorded["sample"].all() and recorded.draw.tolist() == list(range(40))
    assert recorded.band.tolist() == plan.band.iloc[:40].tolist()
    # the release carries the estimate beside the label precision
    assert run_cli("export", build, "--force") == 0
    manifest = json.loads((build / "release" / "manifest.json").read_text())
    est = manifest["review"]["precision_estimate"]
    assert est["pairs_reviewed"] == 40 and est["low"] <= est["value"] <= est["high"] and "Korn" in est["method"]
    card = (build / "release" / "README.md").read_text()
    assert "reviewed at random" in card and f"{est['value']:.3f}" in card
    # and the precision of each similarity band, from the same sample, for the trainer to weight pairs by
    # (all mined pairs are shipped: a judged pair counts as judged, the others as their band's estimate)
    trust = manifest["pair_trust"]
    assert trust["source"] == "reviewed sample" and len(trust["bands"]) == len(est["bands"])
    for band, judged in zip(trust["bands"], est["bands"]):
        assert band["judged"] == judged["judged"]
        unjudged = (judged["accepted"] + 0.5) / (judged["judged"] + 1)
        assert band["precision"] == pytest.approx((judged["accepted"] + (band["pairs"] - judged["judged"]) * unjudged)
                                                  / band["pairs"])
    shipped = manifest["review"]["precision_shipped"]
    assert shipped["pairs"] == len(pairs) and shipped["judged"] == 40
    assert trust["cuts"] == pytest.approx(np.quantile(pairs.similarity, E.BAND_EDGES[1:-1]).tolist())


def test_a_precision_target_threshold_comes_from_the_reviews_and_reproduces(none_build, tmp_path):
    build, pairs = reviewed_copy(none_build, tmp_path, seed=0, n=300)
    common = ["build", "--source", "fashion-mnist", "--root", FMNIST, "--out", build, *TEST_ENCODER,
              "--workers", "0", "--category", "none", "--min-similarity", "precision:0.8"]
    assert run_cli(*common) == 0
    stats = json.loads((build / "mine_stats.json").read_text())
    t = stats["thresholds"]["min_similarity"]
    assert t["given"] == "precision:0.8" and t["reviewed"] == 300 and t["value"] > pairs.similarity.min()
    first = (build / "pairs.parquet").read_bytes()
    mined, _ = truth(build)
    assert mined.good.mean() > truth(none_build)[1]  # a precision target keeps the better pairs
    assert run_cli(*common, "--force") == 0
    assert (build / "pairs.parquet").read_bytes() == first  # the same reviews give the same threshold and pairs
    (build / layout.REVIEWS).unlink()
    assert run_cli(*common, "--force") == 2  # no reviewed sample: one line saying how to make one


@pytest.mark.parametrize("value", ["precision:1.5", "precision:", "precision:x", "precisio:0.9"])
def test_a_wrong_precision_target_is_one_line(cli, tmp_path, value):
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b",
               "--min-similarity", value)
    assert proc.returncode == 2 and "--min-similarity" in proc.stderr and "precision:" in proc.stderr


from test_review import Server, browser, wait_for  # noqa: E402,F401 - the review tests' server and browser


def test_estimate_mode_in_a_browser_takes_one_key_per_pair_and_shows_the_interval(none_build, tmp_path, browser):
    from selenium.webdriver.common.by import By

    build = tmp_path / "b"
    shutil.copytree(none_build, build)
    text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
    with Server(build, "ann", "--estimate", "12") as server:
        browser.get(server.url + "/")
        wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert not browser.find_element(By.ID, "filters").is_displayed()  # the reviewer does not choose
        body = browser.find_element(By.TAG_NAME, "body")
        shown = []
        for n in range(1, 13):
            wait_for(lambda: text("est-judged") == str(n - 1))
            shown.append(int(text("pair-id")))
            body.send_keys("a" if n % 3 else "r")
        wait_for(lambda: text("est-judged") == "12")
        assert "interval" in text("est-interval") and 0 <= float(text("est-value")) <= 1
        wait_for(lambda: "Estimate complete" in text("done"))
    recorded = store.read_reviews(build)
    assert recorded.pair_id.tolist() == shown and recorded["sample"].all()
    assert recorded.draw.tolist() == list(range(12))


def test_the_curve_carries_the_sample_estimate_with_its_band(none_build, tmp_path):
    from fastapi.testclient import TestClient

    from spp_curate.review.server import create_app

    build, pairs = reviewed_copy(none_build, tmp_path, seed=1, n=200)
    precision = float(pairs.good.mean())
    table = store.read_reviews(build)
    with TestClient(create_app(build, "ann"), base_url="http://127.0.0.1") as client:
        curve = client.get("/api/curve").json()
    first = next(i for i, v in enumerate(curve["estimate"]) if v is not None)
    assert curve["estimate_low"][first] <= curve["estimate"][first] <= curve["estimate_high"][first]
    assert curve["estimate_low"][0] <= precision <= curve["estimate_high"][0]  # all pairs: the release's precision
    whole = E.estimate_precision(pairs[["key", "similarity"]], table)
    assert curve["estimate"][0] == pytest.approx(whole.value)


def test_pairs_mined_again_keep_an_unbiased_estimate_from_the_old_draw(none_build):
    """A sample drawn on the pairs as first mined, read after they were mined again (the similarities moved, so
    the bands did): each judgement weighs by the band it was drawn in. On the real pairs, with similarities
    re-scaled by noise, the estimate's mean error over 40 draws stays within 0.01 of the label precision (read
    with today's bands alone, a low band's oversampled pairs drag it down)."""
    pairs, precision = truth(none_build)
    errors = []
    for seed in range(40):
        reviews = simulated_reviews(pairs, seed, 300)
        rng = np.random.default_rng(seed)
        moved = pairs[["key"]].assign(similarity=pairs.similarity.to_numpy() + rng.normal(0, 0.15, len(pairs)))
        errors.append(E.estimate_precision(moved, reviews).value - precision)
    bias, noise = float(np.mean(errors)), float(np.std(errors) / np.sqrt(len(errors)))
    print(f"bias after re-mining {bias:+.4f} +- {noise:.4f}")
    assert abs(bias) < max(0.01, 3 * noise), (bias, noise)
    # the same draw on unchanged pairs: every weight within a band is equal, the estimate as before
    reviews = simulated_reviews(pairs, 0, 300)
    j = E.judgements(pairs[["key", "similarity"]], reviews)
    for h in range(E.N_BANDS):
        assert np.allclose(j.row_weight[j.row_band == h], j.row_weight[j.row_band == h][0])


def _sample_reviews(build, n: int, seed: int = 0, start: int = 0):
    import pyarrow as pa

    pairs, _ = truth(build)
    table = simulated_reviews(pairs, seed, start + n).iloc[start:]
    table["band"] = table.band.astype("int32")
    old = store.read_reviews(build)
    table = pd.concat([old, table]) if len(old) else table
    pq.write_table(pa.Table.from_pandas(table, schema=store.SCHEMA, preserve_index=False), build / layout.REVIEWS)
    return pairs


def test_a_release_of_accepted_pairs_carries_their_trust_and_new_decisions_reach_it(none_build, tmp_path, cli):
    """After an estimate review, a release of the accepted pairs ships only pairs a person accepted: its trust
    is theirs (1.0), not the mined pairs' estimate; and five more decisions, exported without --force, reach the
    manifest and the card."""
    from spp_curate.train.trust import release_trust

    build = tmp_path / "b"
    shutil.copytree(none_build, build)
    pairs = _sample_reviews(build, 60)
    assert cli("export", build, "--reviewed", "accepted").returncode == 0
    manifest = json.loads((build / "release" / "manifest.json").read_text())
    review = manifest["review"]
    assert review["pairs_released"] == review["accepted"] > 0
    assert review["precision_shipped"]["value"] == 1.0 and review["precision_shipped"]["judged"] == review["accepted"]
    assert review["precision_estimate"]["value"] < 0.95  # the mined pairs' estimate stays, for what it is
    trust = release_trust(str(build / "release"), None)
    assert trust.precision == 1.0 and trust.weight == 1.0 and trust.warning() is None
    assert all(b["precision"] in (None, 1.0) for b in manifest["pair_trust"]["bands"])
    # all pairs shipped: the shipped precision mixes the judged pairs and the band estimates of the others
    assert cli("export", build, "--reviewed", "all").returncode == 0
    manifest = json.loads((build / "release" / "manifest.json").read_text())
    shipped = manifest["review"]["precision_shipped"]
    assert shipped["pairs"] == len(pairs) and abs(shipped["value"] - manifest["review"]["precision_estimate"]["value"]) < 0.1
    before = manifest["review"]["precision_estimate"]
    _sample_reviews(build, 5, start=60)
    assert cli("export", build).returncode == 0  # no --force
    after = json.loads((build / "release" / "manifest.json").read_text())["review"]["precision_estimate"]
    assert after["pairs_reviewed"] == before["pairs_reviewed"] + 5
    card = (build / "release" / "README.md").read_text()
    assert f"{after['value']:.3f}" in card and f"from {after['pairs_reviewed']:,} pairs" in card
    assert run_cli("verify", build / "release") == 0
