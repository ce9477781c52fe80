"""`train` and the checkpoints it writes, against careless and hostile use: a locked, guarded run folder,
hostile checkpoint configs, a cut release, a diverging loss and out-of-range options, each one line."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from spp_curate.files import BuildLock

from conftest import FMNIST, run_cli_process

TINY = ["--epochs", "1", "--limit", "64", "--batch-size", "32"]


def one_line(proc, option: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert option in last, proc.stderr[-1000:]
    return last


@pytest.fixture(scope="module")
def run(label_build, tmp_path_factory):
    """One finished tiny run, copied by the tests that spoil it."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = run_cli_process("train", "--out", out, "--pairs", label_build / "release", "--positives", "both", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_an_existing_run_is_continued_or_restarted_only_when_asked(run, label_build, tmp_path, cli):
    again = tmp_path / "run"
    shutil.copytree(run, again)
    before = (again / "last.pt").read_bytes()
    proc = cli("train", "--out", again, "--pairs", label_build / "release", "--positives", "both", *TINY)
    last = one_line(proc, "--out")
    assert "--resume" in last and "--force" in last
    assert (again / "last.pt").read_bytes() == before  # the run is untouched
    proc = cli("train", "--out", again, "--pairs", label_build / "release", "--positives", "both", "--force", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert len((again / "metrics.jsonl").read_text().splitlines()) == 1  # begun anew, not appended to
    assert torch.load(again / "last.pt", weights_only=True)["epoch"] == 1


def test_a_second_train_into_a_run_in_use_is_refused(label_build, tmp_path):
    out = tmp_path / "busy"
    with BuildLock(out):  # as a first `train` holds it
        proc = run_cli_process("train", "--out", out, "--pairs", label_build / "release", *TINY)
    assert "in use by process" in one_line(proc, "--out")
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()


def _spoiled(run, tmp_path, name, change):
    out = tmp_path / name
    shutil.copytree(run, out)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "last.pt")
    return out


@pytest.mark.parametrize("name, change, must_say", [
    ("bool-size", lambda c: c["config"].update(image_size=True), "image_size"),
    ("zero-size", lambda c: c["config"].update(image_size=0), "image_size"),
    ("negative-size", lambda c: c["config"].update(image_size=-32), "image_size"),
    ("huge-size", lambda c: c["config"].update(image_size=2**70), "image_size"),
    ("negative-epoch", lambda c: c.update(epoch=-5), "epoch"),
    ("epoch-past-the-run", lambda c: c.update(epoch=99), "epoch"),
    ("float-epoch", lambda c: c.update(epoch=1.5), "epoch"),
    ("no-backbone", lambda c: c["config"].update(backbone="vit-h"), "backbone"),
])
def test_a_checkpoint_with_a_hostile_config_is_one_line_everywhere_it_is_read(run, label_build, tmp_path, cli, name,
                                                                            change, must_say):
    out = _spoiled(run, tmp_path, name, change)
    said = [one_line(cli("eval", out, "--source", "fashion-mnist", "--root", FMNIST, "--limit", "100"), "RUN"),
            one_line(cli("train", "--out", out, "--pairs", label_build / "release", "--positives", "both",
                         "--resume", *TINY), "--resume"),
            one_line(cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b",
                         "--encoder", f"ssl:{out / 'last.pt'}", "--limit", "50", "--workers", "0"), "--encoder")]
    assert all(must_say in line for line in said), said


def test_a_damaged_checkpoint_is_one_line_on_resume(run, label_build, tmp_path, cli):
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    data = (cut / "last.pt").read_bytes()
    (cut / "last.pt").write_bytes(data[: len(data) // 2])
    args = ["--pairs", label_build / "release", "--positives", "both", "--resume", *TINY]
    assert "not a checkpoint" in one_line(cli("train", "--out", cut, *args), "--resume")

    def wrong_weights(c):
        c["model"] = {k: torch.zeros(3) for k in c["model"]}
    wrong = _spoiled(run, tmp_path, "wrong", wrong_weights)
    assert "damaged" in one_line(cli("train", "--out", wrong, *args), "--resume")


def test_train_refuses_a_release_cut_behind_its_manifest(label_build, tmp_path, cli):
    release = tmp_path / "release"
    shutil.copytree(label_build / "release", release)
    manifest = json.loads((release / "manifest.json").read_text())
    shard = release / next(e["path"] for e in manifest["files"] if e["kind"] == "parquet")
    pq.write_table(pq.read_table(shard).slice(0, 10), shard)
    last = one_line(cli("train", "--out", tmp_path / "r", "--pairs", release, *TINY), "--pairs")
    assert shard.name in last and "manifest says" in last
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_diverging_loss_stops_the_run_with_one_line(label_build, tmp_path, cli):
    proc = cli("train", "--out", tmp_path / "r", "--pairs", label_build / "release", "--lr", "1e30",
               "--epochs", "2", "--limit", "256", "--batch-size", "64")
    assert "lower --lr" in one_line(proc, "--lr")
    assert not (tmp_path / "r" / "last.pt").exists()  # no checkpoint of NaN weights


@pytest.mark.parametrize("args, option", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--seed", str(10**20)], "--seed"),
    (["--seed", "-1"], "--seed"), (["--image-size", "100000"], "--image-size"),
    (["--epochs", str(10**9)], "--epochs"), (["--partner-weight", "2"], "--partner-weight"),
    (["--positive-loss", "mean"], "--positive-loss"), (["--support", "-1"], "--support"),
    (["--support", "many"], "--support"),
    (["--support", str(10**9)], "--support"), (["--method", "byol", "--support", "64"], "--support"),
    (["--method", "simsiam", "--positive-loss", "in"], "--positive-loss"),
])
def test_out_of_range_train_options_are_one_line(label_build, tmp_path, cli, args, option):
    proc = cli("train", "--out", tmp_path / "r", "--pairs", label_build / "release", *args)
    one_line(proc, option)
    assert not (tmp_path / "r" / "last.pt").exists()


def _rewritten(release, out, change):
    """A copy of ``release`` whose Parquet shards are changed by ``change`` and listed anew in the manifest
    (sizes, digests, rows), WebDataset shards left out: a release that a careless or hostile tool wrote."""
    import hashlib

    shutil.copytree(release, out, ignore=shutil.ignore_patterns("wds"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = [e for e in manifest["files"] if e["kind"] != "webdataset"]
    for entry in manifest["files"]:
        if entry["kind"] == "parquet":
            path = out / entry["path"]
            table = change(pq.read_table(path))
            pq.write_table(table, path)
            entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                         rows=table.num_rows)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _set(table, name, values):
    import pyarrow as pa

    return table.set_column(table.schema.get_field_index(name), name, pa.array(values))


SCHEMA_CHANGES = {
    "no anchor_key column": lambda t: t.drop(["anchor_key"]),
    "anchor_key column holds int64": lambda t: _set(t, "anchor_key", list(range(t.num_rows))),
    "no anchor column": lambda t: t.drop(["anchor"]),
    "anchor column holds binary": lambda t: _set(t, "anchor", [c["bytes"] for c in t.column("anchor").to_pylist()]),
    "anchor column holds struct<path: string>": lambda t: _set(t, "anchor", [{"path": "x"}] * t.num_rows),
}


@pytest.mark.parametrize("must_say", sorted(SCHEMA_CHANGES))
def test_a_release_with_wrong_columns_fails_verify_and_train_names_the_column(label_build, tmp_path, cli, must_say):
    release = _rewritten(label_build / "release", tmp_path / "release", SCHEMA_CHANGES[must_say])
    proc = cli("verify", release)
    assert proc.returncode == 1 and must_say in proc.stderr, proc.stderr
    assert must_say in one_line(cli("train", "--out", tmp_path / "r", "--pairs", release, *TINY), "--pairs")


def test_a_release_with_null_keys_is_one_line_for_train(label_build, tmp_path, cli):
    release = _rewritten(label_build / "release", tmp_path / "release",
                         lambda t: _set(t, "positive_key", [None, *t.column("positive_key").to_pylist()[1:]]))
    assert "no positive_key" in one_line(cli("train", "--out", tmp_path / "r", "--pairs", release, *TINY), "--pairs")


def test_a_checkpoint_from_before_an_option_existed_resumes(label_build, tmp_path, cli):
    args = ["--pairs", label_build / "release", "--positives", "both", "--limit", "64", "--batch-size", "32"]
    for name, change, ok in (("older", lambda c: c["config"].pop("partner_weight"), True),  # before the option
                             ("other", lambda c: c["config"].update(partner_weight=0.5), False)):
        out = tmp_path / name
        assert cli("train", "--out", out, *args, "--epochs", "1").returncode == 0
        ckpt = torch.load(out / "last.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, out / "last.pt")
        proc = cli("train", "--out", out, *args, "--epochs", "2", "--resume")
        if ok:
            assert proc.returncode == 0, proc.stderr[-1500:]
            assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
        else:
            said = one_line(proc, "--resume")
            assert "other options (--partner-weight 0.5)" in said, said


def test_a_checkpoint_from_before_the_support_set_resumes_as_it_was_trained(label_build, tmp_path, cli):
    from spp_curate.train.methods import METHODS

    args = ["--pairs", label_build / "release", "--positives", "both", "--limit", "64", "--batch-size", "32"]
    out = tmp_path / "older"
    assert cli("train", "--out", out, *args, "--epochs", "1", "--support", "0").returncode == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["config"].pop("support")  # written before --support existed: it trained without one
    torch.save(ckpt, out / "last.pt")
    proc = cli("train", "--out", out, *args, "--epochs", "2", "--resume")
    if METHODS["simclr"].default_support:  # the default has one now: the run is told what it needs, not changed
        assert "other options (--support 0)" in one_line(proc, "--resume")
    else:
        assert proc.returncode == 0, proc.stderr[-1500:]
    proc = cli("train", "--out", out, *args, "--epochs", "2", "--resume", "--support", "0")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
