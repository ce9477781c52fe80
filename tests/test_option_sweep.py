"""Every option of `build` fed hostile values: each ends in success or in a one-line error naming the option
(exit 2), never a traceback. Accepted values run the index stage of a four-picture folder."""

from __future__ import annotations

import pytest
import typer.main

from spp_curate.cli import app

from conftest import said_lines

from images import write_imagefolder

HOSTILE = ["9" * 400, "-5", "nan", "inf", "-inf", "ünï©ødé", "", "1e400", "\x7f\x01"]
#: Options the sweep does not feed: where the build goes and how far it runs (they are the harness),
#: the source and root (the sweep's input), and flags, which take no value.
HARNESS = {"--out", "--source", "--root", "--until", "--help"}


def _options(command: str) -> list[str]:
    cmd = typer.main.get_command(app).commands[command]
    return sorted(p.opts[0] for p in cmd.params if p.param_type_name == "option" and not p.is_flag
                  and p.opts[0] not in HARNESS)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "images"
    write_imagefolder(root, per_class=2, odd=False, broken=False)
    return root


def test_the_sweep_covers_every_value_taking_option_of_build():
    assert len(_options("build")) >= 30


@pytest.mark.parametrize("option", _options("build"))
def test_every_build_option_takes_hostile_values_without_a_traceback(cli, tiny_root, tmp_path, option):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    for i, value in enumerate([*HOSTILE, str(binary), "/dev/zero"]):
        out = tmp_path / f"b{i}"
        proc = cli("build", "--source", "imagefolder", "--root", tiny_root, "--out", out, "--until", "index",
                   option, value)
        if proc.returncode == 0:
            continue
        lines = said_lines(proc.stderr)
        assert proc.returncode == 2, (option, value, proc.returncode, lines[-3:])
        assert option in lines[-1] or option.lstrip("-") in lines[-1], (option, value, lines[-3:])


TRAIN_HARNESS = {"--out", "--pairs", "--source", "--root", "--help"}


@pytest.mark.parametrize("option", sorted(set(_options("train")) - TRAIN_HARNESS))
def test_every_train_option_takes_hostile_values_without_a_traceback(cli, label_build, tmp_path, option):
    for i, value in enumerate([*HOSTILE, "/dev/zero"]):
        out = tmp_path / f"r{i}"
        # a tiny run; the swept option comes last, so it wins over the harness's own value
        proc = cli("train", "--out", out, "--pairs", label_build / "release", "--epochs", "1", "--limit", "8",
                   "--batch-size", "4", "--workers", "0", option, value)
        if proc.returncode == 0:
            continue
        lines = said_lines(proc.stderr)
        assert proc.returncode == 2, (option, value, proc.returncode, lines[-3:])
        assert option in lines[-1], (option, value, lines[-3:])
