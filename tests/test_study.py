"""``spp-curate study`` on a tiny configuration: every run it plans is trained and evaluated, the report's numbers
are those of the runs' own evaluations, comparisons are paired and matched, a second invocation reuses every run,
and the HTML report renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import FMNIST
from images import write_imagefolder
from test_review import browser, wait_for  # noqa: F401 - the review tests' headless Chromium

TINY = ["--methods", "simsiam", "--modes", "augment,semantic,both", "--seeds", "2", "--epochs", "1",
        "--limit", "300", "--eval-limit", "300", "--k", "20", "--k", "5", "--workers", "0",
        "--ablate", "partner:nearest", "--ablate", "self-pairs:0.5"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from spp_curate.cli import main

    base = tmp_path_factory.mktemp("study")
    transfer = base / "transfer"
    write_imagefolder(transfer / "train", per_class=30, odd=False, broken=True)
    write_imagefolder(transfer / "test", per_class=20, odd=False, broken=False)
    out = base / "out"
    args = ["study", "--source", "fashion-mnist", "--root", str(FMNIST), "--out", str(out),
            "--transfer", f"imagefolder:{transfer}", *TINY]
    assert main(args) == 0
    return out, args, json.loads((out / "report" / "study.json").read_text())


def _eval(folder: str, name: str) -> dict:
    return json.loads(next(Path(folder).glob(f"eval-{name}*.json")).read_text())


def test_every_planned_run_is_trained_and_evaluated_on_every_set(study):
    out, _, result = study
    runs = result["runs"]
    kinds = {(r["kind"], r["pair_set"], r["method"], r["mode"], r["self_pairs"]) for r in runs}
    for method in ("simsiam",):
        for pair_set in ("sampler", "label"):
            for mode in ("augment", "semantic", "both"):
                assert ("pairs", pair_set, method, mode, 0.0) in kinds
        assert ("single", None, method, "augment", 0.0) in kinds
    assert ("supervised", None, "supervised", "labels", 0.0) in kinds
    assert ("pairs", "label-partner-nearest", "simsiam", "both", 0.0) in kinds
    assert ("pairs", "label", "simsiam", "both", 0.5) in kinds
    assert len(runs) == len(kinds) * 2  # every one over both seeds
    assert {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        assert set(r["evals"]) == {"test", next(s["name"] for s in result["eval_sets"] if s["name"] != "test")}
        for evaluation in r["evals"].values():
            assert set(evaluation["knn_top1_at"]) == {"20", "5"} and 0.0 <= evaluation["linear_top1"] <= 1.0


def test_the_tables_are_the_runs_own_numbers_paired_by_seed(study):
    _, _, result = study
    runs = result["runs"]

    def at(method, pair_set, mode, seed, metric="knn@20", where="test"):
        r = next(r for r in runs if (r["kind"], r["method"], r["pair_set"], r["mode"], r["seed"], r["self_pairs"])
                 == ("pairs", method, pair_set, mode, seed, 0.0))
        e = _eval(r["folder"], where)  # the evaluation file the run folder holds
        return e["linear_top1"] if metric == "linear" else e["knn_top1_at"][metric.split("@")[1]]

    def supervised(seed, metric):
        r = next(r for r in runs if (r["kind"], r["seed"]) == ("supervised", seed))
        e = _eval(r["folder"], "test")
        return e["linear_top1"] if metric == "linear" else e["knn_top1_at"][metric.split("@")[1]]

    row = next(t for t in result["table"] if (t["eval"], t["pair_set"], t["method"], t["mode"])
               == ("test", "sampler", "simsiam", "both"))
    values = [at("simsiam", "sampler", "both", s) for s in (0, 1)]
    assert row["knn@20"]["values"] == pytest.approx(values)
    assert row["knn@20"]["mean"] == pytest.approx(np.mean(values))
    assert row["knn@20"]["std"] == pytest.approx(np.std(values, ddof=1))
    for p in result["paired"]:
        if p["eval"] != "test":
            continue
        run_mode, control = p["comparison"].split(" - ")
        for metric in ("knn@20", "knn@5", "linear"):
            d = p[metric]
            expected = [(supervised(s, metric) if run_mode == "supervised" else
                         at(p["method"], p["pair_set"], run_mode, s, metric)) -
                        at(p["method"], p["pair_set"], control, s, metric) for s in (0, 1)]
            assert d["values"] == pytest.approx(expected)
            assert d["low"] <= d["mean"] <= d["high"]
    comparisons = {(p["pair_set"], p["method"], p["comparison"]) for p in result["paired"]}
    assert ("label", "simsiam", "supervised - augment") in comparisons  # the labels' own lead, the bound
    assert ("label", "simsiam", "both - augment") in comparisons and ("sampler", "simsiam", "both - semantic") in comparisons
    pixels = result["references"]["test"]["raw_pixels"]
    assert pixels["knn@20"] == _eval(runs[0]["folder"], "test")["pixel_knn_top1_at"]["20"]
    assert set(result["references"]["test"]["single"]) == {"simsiam"}
    assert result["references"]["test"]["supervised"]["linear"]["n"] == 2
    assert {a["ablation"] for a in result["ablations"]} == {"partner:nearest", "self-pairs:0.5"}


def test_the_controls_are_matched_and_the_releases_say_their_false_neighbours(study):
    _, _, result = study
    releases = {r["name"]: r for r in result["releases"]}
    assert releases["label"]["precision"] == 1.0 and releases["label"]["false_neighbour_rate"] == 0.0
    sampler = releases["sampler"]
    assert 0.1 < sampler["precision"] < 1.0
    assert sampler["false_neighbour_rate"] == pytest.approx(1.0 - sampler["precision"])
    measured = pq.read_table(Path(sampler["build"]) / "pairs.parquet").to_pandas()
    assert sampler["pairs"] == len(measured) and sampler["anchors"] == measured.anchor_id.nunique()
    # the label pairs: several partners an anchor, drawn at random among its same-label neighbours, so further
    # down their ranking than the nearest ones (the ablation), and never of another label
    drawn = pq.read_table(Path(releases["label"]["build"]) / "pairs.parquet").to_pandas()
    near = pq.read_table(Path(releases["label-partner-nearest"]["build"]) / "pairs.parquet").to_pandas()
    assert drawn.groupby("anchor_id").size().max() == 8 and len(drawn) > 4 * drawn.anchor_id.nunique()
    assert (drawn["label"] == drawn["positive_label"]).all()
    assert drawn["rank"].mean() > near["rank"].mean() + 3
    # the control and the pair runs of one release take the same steps of the same anchors
    steps = {}
    for r in result["runs"]:
        if r["kind"] == "pairs" and r["pair_set"] == "sampler":
            steps.setdefault((r["method"], r["seed"]), set()).add(r["steps"])
    assert steps and all(len(s) == 1 for s in steps.values())
    self_run = next(r for r in result["runs"] if r["self_pairs"] == 0.5)
    assert "self_pairs" in json.loads((Path(self_run["folder"]) / "settings.json").read_text())


def test_a_second_invocation_reuses_every_run_and_a_lost_evaluation_comes_back_the_same(study, capsys):
    from spp_curate.cli import main

    out, args, result = study
    folders = [Path(r["folder"]) for r in result["runs"]]
    stamps = {f: (f / "last.pt").stat().st_mtime_ns for f in folders}
    lost = next(folders[i] for i, r in enumerate(result["runs"]) if r["mode"] == "both")
    kept = _eval(str(lost), "test")
    next(lost.glob("eval-test*.json")).unlink()
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().err
    assert said.count("reused: trained and evaluated") == len(folders) - 1
    assert {f: (f / "last.pt").stat().st_mtime_ns for f in folders} == stamps  # nothing trained again
    again = _eval(str(lost), "test")
    assert again["knn_top1_at"] == kept["knn_top1_at"] and again["linear_top1"] == kept["linear_top1"]
    assert json.loads((out / "report" / "study.json").read_text())["table"] == result["table"]


def test_wrong_study_options_are_one_line_errors(tmp_path, cli):
    for option, value, words in (("--methods", "simclr,swav", "accepted"), ("--ablate", "partner:closest",
                                                                            "partner:farthest"),
                                 ("--transfer", f"imagefolder:{tmp_path / 'none'}", "train/"),
                                 ("--modes", "both,pairs", "augment")):
        res = cli("study", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "s", option, value)
        assert res.returncode == 2, res.stderr
        assert option in res.stderr and words in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "s" / "runs").exists()


def test_the_study_report_renders_with_its_plots(study, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    out, _, result = study
    page = tmp_path / "report"
    shutil.copytree(out / "report", page)
    browser.get((page / "index.html").as_uri())
    title = wait_for(lambda: browser.find_element(By.TAG_NAME, "h1").text)
    assert "matched controls" in title
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 2 * len(result["eval_sets"])  # kNN and linear, for each evaluation set
    wait_for(lambda: all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 500", i)
                         for i in images))
    text = browser.find_element(By.TAG_NAME, "body").text
    for words in ("false-neighbour rate", "both - augment", "supervised - augment", "supervised, same backbone and budget", "raw pixels",
                  "partner:nearest", "Budget: matched in steps"):
        assert words in text, words


def test_an_image_folder_study_warns_when_its_limit_cuts_classes(tmp_path, capsys):
    from spp_curate.cli import main

    write_imagefolder(tmp_path / "train", per_class=30, odd=False, broken=True)
    write_imagefolder(tmp_path / "test", per_class=10, odd=False, broken=False)
    args = ["study", "--source", "imagefolder", "--root", tmp_path / "train", "--test-root", tmp_path / "test",
            "--out", tmp_path / "s", "--methods", "simsiam", "--modes", "augment", "--seeds", "1", "--epochs", "1",
            "--no-references", "--no-label-pairs", "--workers", "0", "--k", "5", "--sampler", "ssl"]
    assert main([str(a) for a in args + ["--limit", "40"]]) == 0
    said = capsys.readouterr().err
    # the SePP-ID loop: the method's single-image run is trained first and mines the pairs
    assert "the sampler: simsiam on single images, seed 0" in said
    sampler = json.loads((tmp_path / "s" / "report" / "study.json").read_text())["releases"][0]
    assert sampler["options"]["encoder"].startswith("ssl:") and sampler["options"]["encoder"].endswith("last.pt")
    assert (Path(sampler["options"]["encoder"][4:])).is_file()
    assert "warning: --limit 40 takes the first pictures in source order" in said
    assert "of the source's 3 classes" in said
    result = json.loads((tmp_path / "s" / "report" / "study.json").read_text())
    assert [r["mode"] for r in result["runs"]] == ["augment"]
    assert main([str(a) for a in args]) == 0  # every picture: no warning
    assert "warning: --limit" not in capsys.readouterr().err
