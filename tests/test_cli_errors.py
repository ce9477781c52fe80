"""A wrong option gets one line naming the option and what is accepted, never a traceback."""

from __future__ import annotations

import pytest

from conftest import FMNIST, run_cli_process


def _one_line_error(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, must_say", [
    (["--source", "nosuch"], ["--source", "fashion-mnist", "imagefolder"]),
    (["--source", "imagefolder", "--root", "/nonexistent/images"], ["--root", "/nonexistent/images", "does not exist"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--encoder", "clip:RN50"], ["--encoder", "openclip:MODEL"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--encoder", "openclip:NoSuchNet"], ["--encoder", "NoSuchNet"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--encoder", "pixels:500"], ["--encoder", "8 to 64"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--encoder", "pixels:32", "--image-size", "96"],
     ["--image-size", "8 to 64"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--limit", "-5"], ["--limit", "greater than or equal to 0"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--category", "colour"], ["--category", "label", "none"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--shard-size", "lots"], ["--shard-size", "500MB"]),
    (["--source", "fashion-mnist", "--root", str(FMNIST), "--split", "valid"], ["--split", "train, test"]),
    (["--source", "fashion-mnist", "--bogus-option", "1"], ["--bogus-option"]),
])
def test_wrong_option_is_one_line(tmp_path, args, must_say):
    line = _one_line_error(run_cli_process("build", "--out", tmp_path / "b", *args))
    for word in must_say:
        assert word in line, line


def test_missing_fashion_mnist_names_both_ways_to_get_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(run_cli_process("build", "--source", "fashion-mnist", "--root", empty,
                                           "--out", tmp_path / "b", env={"HF_HUB_OFFLINE": "1",
                                                                         "HF_DATASETS_OFFLINE": "1"}))
    assert "dataset-fashion-mnist" in line and "zalando-datasets/fashion_mnist" in line


def test_stage_on_a_directory_that_is_not_a_build(tmp_path):
    line = _one_line_error(run_cli_process("mine", tmp_path))
    assert "build.yaml" in line


def test_verify_on_a_directory_that_is_not_a_release(tmp_path):
    line = _one_line_error(run_cli_process("verify", tmp_path))
    assert "manifest.json" in line


def test_help_lists_every_command():
    proc = run_cli_process("--help")
    assert proc.returncode == 0
    for command in ("build", "index", "embed", "mine", "report", "export", "verify"):
        assert command in proc.stdout


def test_demo_with_an_unknown_sampler_is_one_line_and_writes_nothing(tmp_path):
    line = _one_line_error(run_cli_process("demo", "--sampler", "clip", "--out", tmp_path / "demo"))
    assert "--sampler" in line and "pixels, ssl" in line, line
    assert not (tmp_path / "demo").exists()
