"""The review page answers only the page itself: no other site's name (DNS rebinding), no cross-origin write,
no address beyond loopback unless asked for with a warning."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from conftest import run_cli_process
from test_review import Server, reviews


def request(url: str, path: str, headers: dict, body: dict | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_another_sites_name_and_origin_are_refused_and_record_nothing(none_build, tmp_path):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(none_build, build)
    with Server(build, "ann") as server:
        evil = {"Host": f"evil.example:{server.port}"}
        status, _ = request(server.url, "/api/decision", evil, {"pair_id": 4, "decision": "reject"})
        assert status == 403
        assert request(server.url, "/api/pairs", evil)[0] == 403  # nothing is read under another name either
        assert request(server.url, "/image/0.png", evil)[0] == 403
        status, _ = request(server.url, "/api/decision", {"Origin": "http://evil.example"},
                            {"pair_id": 4, "decision": "reject"})
        assert status == 403  # a page of another site, posting to the right host
        assert not (build / "reviews.parquet").exists()
        status, body = request(server.url, "/api/decision", {"Origin": server.url},
                               {"pair_id": 4, "decision": "accept"})
        assert status == 200, body  # the page itself
        assert request(server.url, "/api/pairs", {"Host": f"localhost:{server.port}"})[0] == 200
        assert request(server.url, "/api/decision", {}, {"pair_id": 5, "decision": "skip"})[0] == 200  # curl
    assert reviews(build).pair_id.tolist() == [4, 5]


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::"])
def test_listening_beyond_loopback_needs_allow_remote(none_build, host):
    proc = run_cli_process("review", none_build, "--port", "0", "--host", host)
    assert proc.returncode == 2 and "--host" in proc.stderr and "--allow-remote" in proc.stderr
    assert "Traceback" not in proc.stderr and "http://" not in proc.stdout



MALFORMED = ['{"pair_id": 1e400, "decision": "accept"}', '{"pair_id": NaN, "decision": "accept"}',
             '{"pair_id": ' + "9" * 400 + ', "decision": "accept"}', '{"pair_id": -1, "decision": "accept"}',
             '{"pair_id": "x", "decision": "accept"}', '{"pair_id": 4, "decision": "maybe"}', '{"pair_id": 4}',
             '[1, 2]', 'not json', '{"pair_id": 4, "decision": "accept", "extra": 1}']


def test_a_malformed_decision_is_refused_naming_the_field_and_records_nothing(none_build, tmp_path):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(none_build, build)
    with Server(build, "ann") as server:
        for body in MALFORMED:
            status, answer = server.call("/api/decision", raw=body.encode())
            assert status == 422, (body, status, answer)
            detail = answer["detail"]
            assert isinstance(detail, str) and len(detail) < 300, detail
            if body.startswith('{"pair_id": ') and '"decision": "accept"}' in body and "extra" not in body:
                assert detail.startswith("pair_id"), (body, detail)
    assert not (build / "reviews.parquet").exists()


def test_a_damaged_reviews_file_is_one_line_for_the_page_and_export_and_is_kept(none_build, tmp_path, cli):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(none_build, build)
    damaged = b"PAR1" + b"\x00" * 64 + b"PAR1"
    (build / "reviews.parquet").write_bytes(damaged)
    with Server(build, "ann") as server:
        status, answer = server.call("/api/decision", {"pair_id": 4, "decision": "accept"})
        assert status == 409 and "reviews.parquet is damaged" in answer["detail"], (status, answer)
    proc = cli("export", build, "--reviewed", "accepted")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "reviews.parquet is damaged" in proc.stderr.strip().splitlines()[-1]
    assert (build / "reviews.parquet").read_bytes() == damaged  # the user's file, untouched


@pytest.mark.parametrize("spoil", ["no index", "broken mine stats", "mine stats a list"])
def test_review_on_an_incomplete_build_is_one_line(none_build, tmp_path, spoil):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(none_build, build, ignore=shutil.ignore_patterns("release", "embeddings"))
    if spoil == "no index":
        (build / "index.parquet").unlink()
    else:
        (build / "mine_stats.json").write_text("{broken" if spoil == "broken mine stats" else "[1, 2]")
    proc = run_cli_process("review", build, "--port", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert "not a complete build" in proc.stderr.strip().splitlines()[-1]
