"""A wrong option gets one line naming the option and what is accepted, never a traceback."""

from __future__ import annotations

import pytest

from conftest import FMNIST, run_cli_process, said_lines


def _one_line_error(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = said_lines(proc.stderr)
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


def test_a_command_whose_inputs_fail_their_check_leaves_no_out_folder(tmp_path, cli):
    """``build`` of a source that cannot be opened and ``train`` on a folder that is not a release fail before
    their ``--out`` folder exists: no ``.lock`` and ``build.yaml`` left behind."""
    (tmp_path / "empty").mkdir()
    proc = cli("build", "--source", "imagefolder", "--root", tmp_path / "empty", "--out", tmp_path / "b",
               "--encoder", "pixels:8")
    assert proc.returncode == 2 and "--root" in proc.stderr and not (tmp_path / "b").exists()
    proc = cli("train", "--pairs", tmp_path / "empty", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "--pairs" in proc.stderr and not (tmp_path / "run").exists()


def test_a_class_names_file_that_is_not_utf8_is_one_line_before_any_stage(tmp_path, cli):
    names = tmp_path / "names.txt"
    names.write_bytes(b"\xff\xfe")
    out = tmp_path / "b"
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--limit", "40",
               "--encoder", "pixels:8", "--workers", "0", "--category", "zeroshot", "--class-names", names)
    lines = said_lines(proc.stderr)
    assert proc.returncode == 2 and lines == [lines[-1]] and "--class-names" in lines[-1] and "UTF-8" in lines[-1]
    assert not (out / "index.parquet").exists()


def test_an_address_space_too_small_for_the_libraries_is_one_line_not_a_hang(tmp_path):
    """Under ``ulimit -v`` 4 GB a library failed to load or the mine stage waited forever on pyarrow's thread
    pool: the command now says so at once and writes nothing."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4_000_000 * 1024, resource.RLIM_INFINITY))

    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "spp_curate.cli", "build", "--source", "fashion-mnist", "--root",
                           str(FMNIST), "--out", str(out), "--encoder", "pixels:8", "--limit", "40"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    lines = said_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "ulimit -v" in lines[0], lines
    assert not out.exists()
