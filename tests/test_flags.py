"""The README's flag table matches the flags the tool defines.

Each option is defined once, on its field (`tl_keras.config`); the README's
table is written by hand, so this test is what keeps it from drifting: every
flag has a row and every row a flag, with the same default, and the same
choices where a row lists an enum's choices.

The table's conventions, which the test reads: a row may document several
flags (`--a`, `--b`), with one default for all or one each (`x`, `y`); a
default in backticks is the flag's literal default value; a default in plain
words describes a flag left out (`none`, `all`, ...) and is only allowed for a
flag whose default is empty (None, "" or []), or, as off or on, for a
boolean's.
"""

import os
import re

import pytest
from absl import flags as absl_flags

from conftest import REPO_ROOT
from tl_keras.cli import flags

# absl's own flags with a row of their own, because the README explains them.
ABSL_FLAGS_IN_THE_TABLE = frozenset({"verbosity"})

LITERAL = re.compile(r"`([^`]*)`")
# A backticked word in a row's meaning that could be an enum choice: lowercase,
# so neither a flag (`--batch_size`) nor a name such as `TF_CONFIG`.
CHOICE = re.compile(r"`([a-z][a-z0-9_]*)`")


def _readme_rows():
    """{flag name: (default cell, meaning cell)} from the README's Flags table."""
    with open(os.path.join(REPO_ROOT, "README.md")) as file:
        section = file.read().split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        flag_cell, default_cell, meaning = (cell.strip() for cell in line.strip("|").split(" | "))
        names = re.findall(r"`--(\w+)`", flag_cell)
        defaults = default_cell.split(", ")
        if len(defaults) == 1:
            defaults *= len(names)
        assert len(defaults) == len(names), f"{len(names)} flags, {len(defaults)} defaults: {line}"
        for name, default in zip(names, defaults):
            assert name not in rows, f"--{name} has two rows in the README's flag table"
            rows[name] = (default, meaning if len(names) == 1 else "")
    return rows


README_ROWS = _readme_rows()
DEFINED = {flag.name: flag for flag in absl_flags.FLAGS.get_flags_for_module(flags.__name__)}


def test_every_flag_has_a_readme_row_and_every_row_a_flag():
    documented = set(README_ROWS) - ABSL_FLAGS_IN_THE_TABLE
    undocumented = sorted(set(DEFINED) - documented)
    unknown = sorted(documented - set(DEFINED))
    assert not undocumented and not unknown, (
        f"flags without a row in the README's table: {undocumented}; "
        f"README rows for flags the tool doesn't define: {unknown}")
    assert ABSL_FLAGS_IN_THE_TABLE <= set(absl_flags.FLAGS), "absl no longer defines these"


@pytest.mark.parametrize("name", sorted(DEFINED))
def test_the_readme_shows_the_flags_default(name):
    if name not in README_ROWS:
        pytest.skip("no README row; test_every_flag_has_a_readme_row_and_every_row_a_flag fails")
    flag = DEFINED[name]
    shown, _ = README_ROWS[name]
    literal = LITERAL.fullmatch(shown)
    if literal:
        assert flag.parser.parse(literal.group(1)) == flag.default, (
            f"the README shows --{name}'s default as {shown}; it is {flag.default!r}")
    elif isinstance(flag.default, bool):
        assert shown == ("on" if flag.default else "off"), (
            f"the README shows --{name}'s default as {shown}; it is {flag.default!r}")
    else:
        assert flag.default in (None, "", []), (
            f"the README describes --{name}'s default as {shown!r}, words for a flag "
            f"left out; its default is {flag.default!r}: show it in backticks")


@pytest.mark.parametrize("name", sorted(name for name, flag in DEFINED.items()
                                        if isinstance(flag.parser, absl_flags.EnumParser)))
def test_the_readme_lists_all_of_an_enums_choices_or_none(name):
    _, meaning = README_ROWS.get(name, ("", ""))
    choices = set(DEFINED[name].parser.enum_values)
    shown = set(CHOICE.findall(meaning))
    if shown & choices:
        assert shown == choices, (
            f"the README's row of --{name} lists {sorted(shown)}; its choices are {sorted(choices)}")


def test_the_option_definitions_import_no_stage_and_no_tensorflow():
    # Config is a plain object: the choices of --strategy and
    # --tflite_quantization live beside it, not in the modules that use them.
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, tl_keras.config; print(sorted(sys.modules))"],
        capture_output=True, text=True, check=True).stdout
    assert "'tensorflow'" not in loaded
    assert "'tl_keras.training.distribute'" not in loaded
    assert "'tl_keras.outputs.tflite'" not in loaded
