"""Sizes are parsed by pydantic's ByteSize, and every bad size is a one-line error naming its option."""

from __future__ import annotations

import pytest

from spp_curate.config import MAX_SIZE, parse_size

from conftest import FMNIST, said_lines


@pytest.mark.parametrize("text, size", [("500MB", 500 * 10**6), ("64MiB", 64 * 2**20), ("1e6", 10**6),
                                        ("1.5GB", 1_500_000_000), (" 2 GiB ", 2 * 2**30), ("4096", 4096), (12, 12)])
def test_sizes_in_every_form_the_help_promises(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5i", "9" * 400, "nan", "inf", "-1", "", "12 parsecs", str(MAX_SIZE + 1), True])
def test_a_bad_size_is_a_value_error_naming_the_forms(text):
    with pytest.raises(ValueError, match="use bytes or a unit"):
        parse_size(text)


@pytest.mark.parametrize("option", ["--memory", "--shard-size"])
@pytest.mark.parametrize("value", ["5i", "9" * 400, "-3MB"])
def test_a_bad_size_option_is_one_line_naming_it(cli, tmp_path, option, value):
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b", option, value)
    assert proc.returncode == 2
    lines = said_lines(proc.stderr)
    assert len(lines) == 1 and option in lines[0] and "use bytes or a unit" in lines[0], lines
    assert not (tmp_path / "b").exists()


LAUGHS = ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
          + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcde", "bcdef"))
          + "exclude_near: [" + ", ".join(["*f"] * 9) + "]\n")


@pytest.mark.parametrize("content, must_say", [
    (LAUGHS, "expands past"),  # 490 bytes, 9**7 values once its aliases are expanded
    ("name: x\nk: " + "[" * 3000 + "]" * 3000 + "\n", "expands past"),
    (bytes(range(256)) * 4, "not text"),
    ("name: x\n" + "# padding\n" * 40_000, "limit"),
    ("- just\n- a list\n", "mapping"),
    ("k: [unclosed\n", "not valid YAML"),
    (None, "not a regular file"),  # a device, as /dev/zero is
])
def test_a_hostile_recipe_file_is_one_line_and_costs_no_memory(cli, tmp_path, content, must_say):
    recipe = tmp_path / "recipe.yaml"
    if content is None:
        recipe = "/dev/zero"
    elif isinstance(content, bytes):
        recipe.write_bytes(content)
    else:
        recipe.write_text(content)
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b", "--recipe", recipe)
    assert proc.returncode == 2
    lines = said_lines(proc.stderr)
    assert len(lines) == 1 and "--recipe" in lines[0] and must_say in lines[0], lines
    assert len(lines[0]) < 400
    assert not (tmp_path / "b").exists()
