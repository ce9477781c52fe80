"""Curation by hand: quantile thresholds, the threshold curve, the review server, and releases of reviewed pairs.

The server runs as users run it (``spp-curate review`` in its own process) and is spoken to over HTTP;
the page is driven in headless Chromium (Debian's ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_cli_process

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# ---------------------------------------------------------------- a review server, as a user starts it

class Server:
    def __init__(self, build_dir: Path, reviewer: str, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "spp_curate.cli", "review", str(build_dir), "--port", "0",
                                      "--reviewer", reviewer, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("review: http://"):
            self.proc.kill()
            raise AssertionError(f"the server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = line.split()[1].rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])

    def call(self, path: str, body: object | None = None, raw: bytes | None = None) -> tuple[int, object]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            payload, status = exc.read(), exc.code
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def decide(self, pair_id: int, decision: str) -> dict:
        status, body = self.call("/api/decision", {"pair_id": pair_id, "decision": decision})
        assert status == 200, body
        return body

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reviews(build: Path) -> pd.DataFrame:
    return pq.read_table(build / "reviews.parquet").to_pandas()


@pytest.fixture
def build_copy(label_build, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(label_build, out)
    return out


def pair_ids(build: Path) -> np.ndarray:
    return pq.read_table(build / "pairs.parquet", columns=["pair_id"]).column("pair_id").to_numpy()


# ---------------------------------------------------------------- thresholds a person can choose

def rebuild(build: Path, *options: str) -> None:
    proc = run_cli_process("build", "--source", "fashion-mnist", "--out", build, "--encoder", "openclip:ViT-S-32",
                           "--image-size", "32", "--workers", "0", "--shard-size", "1MB", "--category", "none",
                           *options)
    assert proc.returncode == 0, proc.stderr


def test_quantile_thresholds_give_the_pairs_of_their_values_and_are_recorded(none_build, tmp_path, fmnist_root):
    by_quantile, by_value = tmp_path / "q", tmp_path / "v"
    shutil.copytree(none_build, by_quantile)
    shutil.copytree(none_build, by_value)
    rebuild(by_quantile, "--root", str(fmnist_root), "--min-similarity", "q0.3", "--dup-threshold", "q0.995")
    stats = json.loads((by_quantile / "mine_stats.json").read_text())
    cands = stats["funnel"][0]["remaining"]
    resolved = stats["thresholds"]
    assert resolved["min_similarity"]["given"] == "q0.3" and resolved["dup_threshold"]["given"] == "q0.995"
    low, high = resolved["min_similarity"]["value"], resolved["dup_threshold"]["value"]
    assert low < high
    # q0.3 drops about 30 % of the candidates, q0.995 about 0.5 % more as near-duplicates.
    removed = {s["step"]: s["removed"] for s in stats["funnel"]}
    assert abs(removed["below_min_similarity"] / cands - 0.3) < 0.02
    assert 0 < removed["near_duplicate"] / cands < 0.01

    rebuild(by_value, "--root", str(fmnist_root), "--min-similarity", repr(low), "--dup-threshold", repr(high))
    a = pq.read_table(by_quantile / "pairs.parquet").to_pandas()
    b = pq.read_table(by_value / "pairs.parquet").to_pandas()
    pd.testing.assert_frame_equal(a, b)
    assert len(a) < len(pq.read_table(none_build / "pairs.parquet"))

    manifest = json.loads((by_quantile / "release" / "manifest.json").read_text())
    assert manifest["recipe"]["min_similarity"] == "q0.3"
    assert manifest["metrics"]["thresholds"]["min_similarity"]["value"] == low
    card = (by_quantile / "release" / "README.md").read_text()
    assert f"similarity >= {low:.4g} (the 0.3 quantile" in card
    html = (by_quantile / "report" / "index.html").read_text()
    assert f"{low:.4f} (q0.3)" in html


def test_threshold_curve_at_this_builds_threshold_is_what_the_build_kept(none_build):
    stats = json.loads((none_build / "mine_stats.json").read_text())
    metrics = json.loads((none_build / "report" / "metrics.json").read_text())
    curve = stats["curve"]
    at = curve["threshold"].index(curve["current"])
    assert curve["current"] == stats["thresholds"]["min_similarity"]["value"] == 0.0
    assert curve["pairs"][at] == metrics["pairs"]
    assert curve["precision"][at] == pytest.approx(metrics["precision"])
    assert curve["coverage"][at] == pytest.approx(metrics["coverage"])
    # Raising the threshold keeps fewer pairs and covers fewer images; precision is read off the same points.
    assert np.all(np.diff(curve["pairs"]) <= 0) and np.all(np.diff(curve["coverage"]) <= 0)
    assert curve["pairs"][-1] < curve["pairs"][0]
    assert 0.0 < min(p for p in curve["precision"] if p is not None) <= max(curve["precision"]) <= 1.0


def test_report_opens_with_the_headline_numbers_and_draws_the_curve(none_build):
    html = (none_build / "report" / "index.html").read_text()
    first_picture = html.index("<img")
    for name in ("pairs", "precision", "coverage", "quarantined"):
        assert html.index(f"id='headline-{name}'") < first_picture
    metrics = json.loads((none_build / "report" / "metrics.json").read_text())
    assert f"{metrics['pairs']:,}" in html[:first_picture]
    assert "threshold-curve.png" in metrics["figures"]
    assert (none_build / "report" / "threshold-curve.png").stat().st_size > 10_000


@pytest.mark.parametrize("options, option", [
    (["--min-similarity", "q1.5"], "--min-similarity"),
    (["--dup-threshold", "high"], "--dup-threshold"),
    (["--min-similarity", "q0.9", "--dup-threshold", "q0.5"], "--dup-threshold"),
])
def test_a_wrong_threshold_is_one_line_naming_the_option(none_build, tmp_path, fmnist_root, options, option):
    work = tmp_path / "b"
    shutil.copytree(none_build, work)
    proc = run_cli_process("build", "--source", "fashion-mnist", "--root", fmnist_root, "--out", work,
                           "--encoder", "openclip:ViT-S-32", "--image-size", "32", "--workers", "0",
                           "--category", "none", *options)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and option in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the server

def listening_address(port: int) -> str:
    """The local address the socket on ``port`` listens on, read from the kernel's table."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
            return ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on port {port}")


def test_malformed_requests_get_4xx_and_change_nothing(build_copy):
    ids = pair_ids(build_copy)
    with Server(build_copy, "ann") as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert listening_address(server.port) == "127.0.0.1"
        bad = [
            ("/api/decision", {"pair_id": int(ids.max()) + 1, "decision": "accept"}, 404),
            ("/api/decision", {"pair_id": -1, "decision": "reject"}, 422),  # not a pair id at all
            ("/api/decision", {"pair_id": int(ids[0]), "decision": "maybe"}, 422),
            ("/api/decision", {"pair_id": "../../build.yaml", "decision": "accept"}, 422),
            ("/api/decision", {"pair_id": int(ids[0]), "decision": "accept", "reviewer": "mallory"}, 422),
            ("/api/decision", {"decision": "accept"}, 422),
        ]
        for path, body, expected in bad:
            status, _ = server.call(path, body)
            assert status == expected, (body, status)
        assert server.call("/api/decision", raw=b"{not json")[0] == 422
        for path in ("/image/../../build.yaml", "/image/..%2F..%2Fbuild.yaml", "/../build.yaml", "/%2e%2e/build.yaml",
                     "/image/99999999.png", "/image/-1.png", "/report/../build.yaml", "/reviews.parquet",
                     "/api/pairs?limit=0", "/api/pairs?mutual=perhaps"):
            status, _ = server.call(path)
            assert 400 <= status < 500, (path, status)
        status, summary = server.call("/api/summary")
        assert status == 200 and summary["counts"]["reviewed"] == 0
    assert not (build_copy / "reviews.parquet").exists()


def test_a_server_killed_between_two_decisions_loses_neither(build_copy):
    first, second = (int(i) for i in pair_ids(build_copy)[[3, 7]])
    server = Server(build_copy, "ann")
    server.decide(first, "accept")
    server.stop(signal.SIGKILL)
    with Server(build_copy, "ann") as again:
        status, summary = again.call("/api/summary")
        assert summary["counts"]["reviewed"] == 1 and summary["counts"]["accepted"] == 1
        again.decide(second, "reject")
        again.stop(signal.SIGKILL)
    got = reviews(build_copy)
    assert got.pair_id.tolist() == [first, second] and got.decision.tolist() == ["accept", "reject"]
    assert set(got.reviewer) == {"ann"}


def test_two_servers_on_one_build_keep_every_decision(build_copy):
    ids = [int(i) for i in pair_ids(build_copy)[:30]]
    with Server(build_copy, "ann") as ann, Server(build_copy, "bob") as bob:
        errors: list[BaseException] = []

        def work(server: Server, decision: str) -> None:
            try:
                for pid in ids:
                    server.decide(pid, decision)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=a) for a in ((ann, "accept"), (bob, "reject"),
                                                                     (ann, "skip"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        got = reviews(build_copy)
        assert len(got) == 90
        assert (got[got.reviewer == "bob"].decision == "reject").sum() == 30
        assert sorted(got[got.reviewer == "ann"].decision.value_counts().tolist()) == [30, 30]
        status, summary = bob.call("/api/summary")
        assert summary["counts"]["rejected"] == 30 and summary["counts"]["all_reviewers"]["rejected"] == 30


# ---------------------------------------------------------------- releases of reviewed pairs

def test_export_reviewed_holds_the_chosen_pairs_and_records_the_review(build_copy):
    ids = [int(i) for i in pair_ids(build_copy)]
    accepted, rejected = ids[:6], ids[6:9]
    with Server(build_copy, "ann") as ann, Server(build_copy, "bob") as bob:
        for pid in accepted:
            ann.decide(pid, "accept")
        for pid in rejected:
            ann.decide(pid, "reject")
        bob.decide(accepted[0], "reject")  # they disagree on one pair...
        bob.decide(accepted[1], "accept")  # ...and agree on another
        ann.decide(ids[9], "skip")

    proc = run_cli_process("export", build_copy, "--reviewed", "accepted")
    assert proc.returncode == 0, proc.stderr
    release = build_copy / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    released = pd.concat([pq.read_table(release / f["path"]).to_pandas() for f in manifest["files"]
                          if f["kind"] == "parquet"])
    assert sorted(released.pair_id.tolist()) == accepted[1:]
    review = manifest["review"]
    assert review["selected"] == "accepted" and manifest["recipe"]["reviewed"] == "accepted"
    assert (review["pairs_reviewed"], review["accepted"], review["rejected"]) == (9, 5, 4)
    assert review["reviewers"] == ["ann", "bob"]
    assert review["pairs_reviewed_by_two_or_more"] == 2 and review["agreement"] == 0.5
    assert review["pairs_released"] == 5 and manifest["counts"]["pairs"] == 5
    card = (release / "README.md").read_text()
    assert "## Review" in card and "9 of the" in card and "agreed on 50.0%" in card
    assert run_cli_process("verify", release).returncode == 0

    proc = run_cli_process("export", build_copy, "--reviewed", "not-rejected")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == len(ids) - 4

    # A new decision is a new input: export runs again without --force.
    with Server(build_copy, "cat") as cat:
        cat.decide(ids[20], "reject")
    proc = run_cli_process("export", build_copy)
    assert proc.returncode == 0 and "skipped" not in proc.stderr, proc.stderr
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == len(ids) - 5

    proc = run_cli_process("export", build_copy, "--reviewed", "maybe")
    assert proc.returncode == 2 and "--reviewed" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the page, in a real browser

@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("SPP_CURATE_BROWSER_TESTS") == "required":
            pytest.fail("Chromium is required here: apt-get install chromium chromium-driver")
        pytest.skip("no Chromium: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def wait_for(check, timeout: float = 30.0):
    end = time.time() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the page is still loading
            if time.time() > end:
                raise
        if time.time() > end:
            raise AssertionError("the page did not get there in time")
        time.sleep(0.1)


def test_the_page_in_a_browser_records_keys_and_resumes_after_reload(build_copy, browser):
    from selenium.webdriver.common.by import By

    text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731

    def ready() -> None:
        wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

    with Server(build_copy, "ann") as server:
        browser.get(server.url + "/")
        ready()
        first = int(text("pair-id"))
        assert text("count-reviewed") == "0"
        natural = browser.execute_script(
            "const i = document.getElementById('anchor-img'); return i.complete ? i.naturalWidth : 0")
        assert natural > 0  # the picture loaded
        # the curve's pair count says what it counts, beside the build's own count
        legend = wait_for(lambda: text("legend"))
        assert "before the caps" in legend and f"the build has {text('count-pairs')}" in legend, legend
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("a")
        wait_for(lambda: text("count-accepted") == "1")
        second = int(text("pair-id"))
        assert second != first
        body.send_keys("r")
        wait_for(lambda: text("count-rejected") == "1")
        third = int(text("pair-id"))
        assert text("count-reviewed") == "2"

        got = reviews(build_copy)
        assert got.pair_id.tolist() == [first, second] and got.decision.tolist() == ["accept", "reject"]

        browser.refresh()
        ready()
        assert (text("count-reviewed"), text("count-accepted"), text("count-rejected")) == ("2", "1", "1")
        assert int(text("pair-id")) == third  # resumes at the first pair not yet reviewed

        # Going back shows an earlier decision once the filter lets reviewed pairs in.
        browser.find_element(By.ID, "f-unreviewed").click()
        wait_for(lambda: int(text("pair-id")) == first)
        assert text("decision") == "accept"
        svg = browser.find_element(By.ID, "curve").get_attribute("innerHTML")
        assert svg.count("<polyline") >= 3


def test_the_report_reads_in_words_in_a_browser(none_build, label_build, browser):
    """The report as a reader sees it in Chromium: index kinds in words (no Python dict), metrics by their
    meaning (no internal names), and label precision flagged as true by construction where labels chose
    the pairs."""
    from selenium.webdriver.common.by import By

    for build, note in ((none_build, "share of pairs whose two labels agree"),
                        (label_build, "by construction: pairs mined within label categories")):
        browser.get((build / "report" / "index.html").as_uri())
        text = wait_for(lambda: browser.find_element(By.TAG_NAME, "body").text)
        assert "{'" not in text and "mutual_share" not in text and "indexes {" not in text
        assert "pairs whose two images are each other's neighbours" in text
        assert browser.find_element(By.ID, "headline-precision-note").text == note
        assert browser.find_element(By.ID, "headline-precision-note").is_displayed()
