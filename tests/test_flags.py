"""The flag reference, docs/flags.md, matches the flags the tool defines.

Each option is defined once, on its field (`tl_keras.config`, or for the
options of what a process does, `tl_keras.flags`); the reference's table is
written by hand, so this test is what keeps it from drifting: every
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

FLAG_REFERENCE = os.path.join(REPO_ROOT, "docs", "flags.md")

# absl's own flags with a row of their own, because the reference explains them.
ABSL_FLAGS_IN_THE_TABLE = frozenset({"verbosity"})

LITERAL = re.compile(r"`([^`]*)`")
# A backticked word in a row's meaning that could be an enum choice: lowercase,
# so neither a flag (`--batch_size`) nor a name such as `TF_CONFIG`.
CHOICE = re.compile(r"`([a-z][a-z0-9_]*)`")


def _reference_rows():
    """{flag name: (default cell, meaning cell)} from the flag reference's table."""
    with open(FLAG_REFERENCE) as file:
        page = file.read()
    rows = {}
    for line in page.splitlines():
        if not line.startswith("| `--"):
            continue
        flag_cell, default_cell, meaning = (cell.strip() for cell in line.strip("|").split(" | "))
        names = re.findall(r"`--(\w+)`", flag_cell)
        defaults = default_cell.split(", ")
        if len(defaults) == 1:
            defaults *= len(names)
        assert len(defaults) == len(names), f"{len(names)} flags, {len(defaults)} defaults: {line}"
        for name, default in zip(names, defaults):
            assert name not in rows, f"--{name} has two rows in docs/flags.md"
            rows[name] = (default, meaning if len(names) == 1 else "")
    return rows


REFERENCE_ROWS = _reference_rows()
DEFINED = {flag.name: flag for flag in absl_flags.FLAGS.get_flags_for_module(flags.__name__)}


def test_every_flag_has_a_reference_row_and_every_row_a_flag():
    documented = set(REFERENCE_ROWS) - ABSL_FLAGS_IN_THE_TABLE
    undocumented = sorted(set(DEFINED) - documented)
    unknown = sorted(documented - set(DEFINED))
    assert not undocumented and not unknown, (
        f"flags without a row in docs/flags.md: {undocumented}; "
        f"docs/flags.md rows for flags the tool doesn't define: {unknown}")
    assert ABSL_FLAGS_IN_THE_TABLE <= set(absl_flags.FLAGS), "absl no longer defines these"


@pytest.mark.parametrize("name", sorted(DEFINED))
def test_the_reference_shows_the_flags_default(name):
    if name not in REFERENCE_ROWS:
        pytest.skip("no row; test_every_flag_has_a_reference_row_and_every_row_a_flag fails")
    flag = DEFINED[name]
    shown, _ = REFERENCE_ROWS[name]
    literal = LITERAL.fullmatch(shown)
    if literal:
        assert flag.parser.parse(literal.group(1)) == flag.default, (
            f"docs/flags.md shows --{name}'s default as {shown}; it is {flag.default!r}")
    elif isinstance(flag.default, bool):
        assert shown == ("on" if flag.default else "off"), (
            f"docs/flags.md shows --{name}'s default as {shown}; it is {flag.default!r}")
    else:
        assert flag.default in (None, "", []), (
            f"docs/flags.md describes --{name}'s default as {shown!r}, words for a flag "
            f"left out; its default is {flag.default!r}: show it in backticks")


@pytest.mark.parametrize("name", sorted(name for name, flag in DEFINED.items()
                                        if isinstance(flag.parser, absl_flags.EnumParser)))
def test_the_reference_lists_all_of_an_enums_choices_or_none(name):
    _, meaning = REFERENCE_ROWS.get(name, ("", ""))
    choices = set(DEFINED[name].parser.enum_values)
    shown = set(CHOICE.findall(meaning))
    if shown & choices:
        assert shown == choices, (
            f"docs/flags.md's row of --{name} lists {sorted(shown)}; "
            f"its choices are {sorted(choices)}")


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
