"""The text of a run's flags.txt: what a resume compares, how two differ, and
the same text with some flags' values replaced.

`tl_keras.cli.flags.to_flagfile` writes the text, `tl_keras.rundir` keeps it
in the run's folder, and a resume is refused when its own text differs here.
"""

# flags.txt records each training example --exclude_files leaves out, on a
# line of its own after this prefix: absl reads the line as a comment, and
# `claim` compares these lines as it compares the flags, so a resume with
# another list (another file, or the same file edited) is refused.
EXCLUDED_PREFIX = "# excluded: "


def exclusion_lines(entries):
    """The lines of flags.txt that record the training examples
    `--exclude_files` leaves out (`EXCLUDED_PREFIX`)."""
    return [f"# --exclude_files leaves out these {len(entries)} training examples:",
            *(EXCLUDED_PREFIX + entry for entry in entries)]


def differences(stored_text, given_text, ignored=frozenset(), defaults_text=""):
    """How `given_text` differs from `stored_text` (`stored --seed=1, given
    --seed=2`, flag by flag), but for the flags named in `ignored`; empty when
    they match.

    A flag that `stored_text` lacks and `given_text` sets to its default, as
    `defaults_text` (every flag at its default) writes it, is no difference:
    the stored run was made by an older version, before the flag existed, and
    trained as its default does. Without this, every new flag would stop
    interrupted runs from resuming after an upgrade.
    """
    stored, given = _compared_lines(stored_text, ignored), _compared_lines(given_text, ignored)
    stored_names = {_flag_name(line) for line in stored}
    defaults = set(defaults_text.splitlines())
    given = {line for line in given
             if _flag_name(line) in stored_names or line not in defaults}
    return _describe_differences(stored, given) if stored != given else ""


def with_flag_values(flagfile_text, values):
    """`flagfile_text` with these flags set to these values, each on its own
    `--name=value` line (absl's form for every flag but booleans), replacing
    the flag's line or appended after the others.

    Args:
        flagfile_text: a flags.txt text, as `tl_keras.cli.flags.to_flagfile` writes.
        values: {flag name: int, float or string value}.
    """
    lines = flagfile_text.splitlines()
    for name, value in values.items():
        line = f"--{name}={value}"
        places = [i for i, text in enumerate(lines) if text.startswith(f"--{name}=")]
        if places:
            lines[places[0]] = line
        else:
            lines.append(line)
    return "".join(f"{line}\n" for line in lines)


def _describe_differences(stored, given):
    """`stored --seed=1, given --seed=2`, flag by flag, for the changed flags;
    the excluded examples as counts."""
    def by_name(lines):
        return {_flag_name(line): line for line in lines}

    def excluded(lines):
        return {line for line in lines if line.startswith(EXCLUDED_PREFIX)}

    parts = []
    stored_excluded, given_excluded = excluded(stored), excluded(given)
    if stored_excluded != given_excluded:
        parts.append(
            f"stored {len(stored_excluded)} excluded training examples, given "
            f"{len(given_excluded)}, {len(stored_excluded ^ given_excluded)} of them "
            f"in one list only")
    stored, given = by_name(stored - stored_excluded), by_name(given - given_excluded)
    for name in sorted(set(stored) | set(given)):
        if stored.get(name) != given.get(name):
            parts.append(f"stored {stored.get(name, 'no --' + name)}, "
                         f"given {given.get(name, 'no --' + name)}")
    return "; ".join(parts[:6])


def _compared_lines(text, ignored=frozenset()):
    """The lines of a flags.txt text that a resume compares: its flags, and
    the examples --exclude_files leaves out."""
    return {line for line in text.splitlines()
            if line and (not line.startswith("#") or line.startswith(EXCLUDED_PREFIX))
            and not _sets_one_of(line, ignored)}


def _flag_name(line):
    """The flag a flags.txt line sets: `seed` for `--seed=1`, and `tta` for
    both `--tta` and `--notta` (absl writes booleans, and only booleans,
    without `=`). No flag of the tool's own starts with `no`
    (tests/test_flags.py checks), so the prefix always negates."""
    name = line.removeprefix("--").split("=", 1)[0]
    return name.removeprefix("no") if "=" not in line else name


def _sets_one_of(line, names):
    """Whether a flags.txt line sets one of `names`: `--name=value`, or a
    boolean's `--name` or `--noname`."""
    name = line.removeprefix("--").split("=", 1)[0]
    return name in names or ("=" not in line and name.removeprefix("no") in names)
