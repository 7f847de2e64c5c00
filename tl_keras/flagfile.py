"""A run's flags.txt as text: how it differs from the flags given now, and
the same text with some flags' values replaced."""


def differences(path, flagfile_text, ignored=frozenset()):
    """How the flags.txt at `path` differs from `flagfile_text` (`stored
    --seed=1, given --seed=2`, flag by flag), but for the flags named in
    `ignored`; empty when they match."""
    with open(path) as file:
        stored = _flag_lines(file.read(), ignored)
    given = _flag_lines(flagfile_text, ignored)
    return _describe_differences(stored, given) if stored != given else ""


def _describe_differences(stored, given):
    """`stored --seed=1, given --seed=2`, flag by flag, for the changed flags."""
    def by_name(lines):
        return {line.split("=", 1)[0]: line for line in lines}

    stored, given = by_name(stored), by_name(given)
    parts = []
    for name in sorted(set(stored) | set(given)):
        if stored.get(name) != given.get(name):
            parts.append(f"stored {stored.get(name, 'no ' + name)}, "
                         f"given {given.get(name, 'no ' + name)}")
    return "; ".join(parts[:6])


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


def _flag_lines(text, ignored=frozenset()):
    return {line for line in text.splitlines()
            if line and not line.startswith("#") and not _sets_one_of(line, ignored)}


def _sets_one_of(line, names):
    """Whether a flags.txt line sets one of `names`: `--name=value`, or a
    boolean's `--name` or `--noname`."""
    name = line.removeprefix("--").split("=", 1)[0]
    return name in names or ("=" not in line and name.removeprefix("no") in names)
