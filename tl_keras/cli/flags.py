"""The command line: the flags, parsed, their help, and their values as a `Config`.

Each flag is made from the field that defines its option in `tl_keras.config`:
`Config`'s for the options of the run, `ModeOptions`'s for those of what this
process does. `tl_keras.cli.flag_checks` holds the checks absl runs as it
parses, before any data or model work.

This is the only module that reads flags.
"""

import dataclasses
import glob
import os
import re
import sys

from absl import flags
from absl.testing import flagsaver

from tl_keras import flagfile
from tl_keras import options
from tl_keras import rundir
from tl_keras.cli import flag_checks
from tl_keras.config import Config
from tl_keras.config import ModeOptions
from tl_keras.data import exclusion
from tl_keras.errors import UsageError
from tl_keras.model import backbones

_DEFINERS = {
    "string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
    "float": flags.DEFINE_float, "boolean": flags.DEFINE_boolean,
    "list": flags.DEFINE_list,
}


def _define_flags(*option_classes):
    """Defines the flag of every field of `option_classes`.

    Returns:
        The help groups: (title, flag holders) pairs, in the order the groups
        first appear, each group's flags in field order.
    """
    groups = {}
    for option_class in option_classes:
        for field in dataclasses.fields(option_class):
            spec = options.flag_spec(field)
            if spec.kind == "enum":
                holder = flags.DEFINE_enum(field.name, spec.default, list(spec.choices),
                                           spec.help)
            else:
                holder = _DEFINERS[spec.kind](field.name, spec.default, spec.help)
            groups.setdefault(spec.group, []).append(holder)
    return tuple((title, tuple(holders)) for title, holders in groups.items())


# The groups --helpshort lists the flags in, each flag once.
HELP_GROUPS = _define_flags(Config, ModeOptions)
# Once the flags exist: absl runs the checks as it parses.
flag_checks.register()

# What `to_flagfile` leaves out and `mode` returns.
_MODE_FLAGS = frozenset(field.name for field in dataclasses.fields(ModeOptions))


def parse(argv):
    """Parses the command line; the `flags_parser` for `absl.app.run`.

    `--help` and `--helpshort` print the tool's flags, grouped. A bad flag, a
    missing flagfile, or a word that isn't a flag ends the program with a
    one-line message and exit status 2, before any work starts.
    """
    if any(argument in _HELP_ARGUMENTS for argument in argv[1:]):
        print(usage())
        sys.exit(0)
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error).removeprefix("ERROR:: ")  # absl's, before our "error: "
        if "flagfile" in message:
            configs = sorted(glob.glob(os.path.join("configs", "*.flags")))
            if configs:
                message += f" (available: {', '.join(configs)})"
        _exit_with_usage_error(message)
    if len(remaining) > 1:
        _exit_with_usage_error(_not_a_flag(argv[1:], remaining[1]))
    return remaining


def _exit_with_usage_error(message):
    print(f"error: {message}\nSee --helpshort for the flags.", file=sys.stderr)
    sys.exit(2)


def _not_a_flag(arguments, word):
    """Says where `word`, which absl took for an argument, came from, and the
    flag it likely meant."""
    origin = _flagfile_line(arguments, word, seen=set())
    where = f"{origin[0]}, line {origin[1]}: " if origin else ""
    return (f"{where}{word!r} is not a flag: flags start with --, as in "
            f"--{word.lstrip('-')}.")


def _flagfile_line(arguments, word, seen):
    """(path, line number) of the line `word` in the flagfiles `arguments` name
    (nested ones included), or None."""
    for argument in arguments:
        if not argument.lstrip("-").startswith("flagfile="):
            continue
        path = argument.split("=", 1)[1]
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        with open(path) as file:
            lines = [line.strip() for line in file]
        for number, line in enumerate(lines, start=1):
            if line == word:
                return path, number
        found = _flagfile_line(lines, word, seen)
        if found:
            return found
    return None


_HELP_ARGUMENTS = frozenset({"--help", "-help", "--helpshort", "-helpshort", "-?"})


def usage():
    """The `--helpshort` text: the tool's own flags by group, with their defaults."""
    lines = ["Transfer learning for image classification.",
             "Usage: python run.py [--flagfile=configs/cifar100.flags] [--flag=value ...]",
             "A flag given after --flagfile wins."]
    for title, holders in HELP_GROUPS:
        lines += ["", f"{title}:"]
        for holder in holders:
            flag = flags.FLAGS[holder.name]
            lines.append(f"  --{flag.name}{_shown_default(flag.default)}")
            lines.append(flags.text_wrap(flag.help, indent="      "))
    lines += ["", "Library log lines (TensorFlow's, absl's, Python warnings) are off;",
              "--verbosity=0 (INFO) or 1 (DEBUG) shows them.",
              "--helpfull also lists absl's and TensorFlow's own flags."]
    return "\n".join(lines)


def _shown_default(default):
    if default is None or default == [] or default == "":
        return ""
    if isinstance(default, bool):
        return "=true" if default else "=false"
    if isinstance(default, list):
        return "=" + ",".join(default)
    return f"={default:g}" if isinstance(default, float) else f"={default}"


def mode():
    """The parsed `--mode` and its own settings, as a dict; `tta` is the
    command line's `--tta`, or None where it gives none (evaluate and predict
    then take the run's)."""
    settings = {field.name: flags.FLAGS[field.name].value
                for field in dataclasses.fields(ModeOptions)}
    tta = flags.FLAGS["tta"]
    return settings | {"model_dir": flags.FLAGS.model_dir,
                       "tta": tta.value if tta.present else None}


def run_config(model_dir):
    """The `Config` of a finished run, from its `flags.txt`.

    The global flags are left as they were; the run's `model_dir` is the one
    given here, wherever the run was first written.

    Raises:
        UsageError: when `model_dir` holds no `flags.txt`.
    """
    path = os.path.join(model_dir, rundir.FLAGS_FILE)
    if not os.path.isfile(path):
        raise UsageError(
            f"No {rundir.FLAGS_FILE} in {model_dir}: --model_dir must be a training "
            f"run's folder.")
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["run.py", f"--flagfile={path}"])
        config = to_config()
    return dataclasses.replace(config, model_dir=model_dir)


def audit_config():
    """What `--mode=audit` audits: (the `Config` of the run in `--model_dir`,
    from its flags.txt, and True) when the folder holds one; else (these
    flags' `Config`, and False)."""
    config = to_config()
    if rundir.holds_a_run(config.model_dir):
        return run_config(config.model_dir), True
    return config, False


def run_setting(run_folder, name):
    """The value of option `name` in the run in `run_folder`, from its
    flags.txt; the option's default for a folder without one, such as a
    .tflite file's copied away from its run."""
    if not os.path.isfile(os.path.join(run_folder, rundir.FLAGS_FILE)):
        return flags.FLAGS[name].default
    return getattr(run_config(run_folder), name)


def to_config():
    """Converts the parsed flags into a `Config`."""
    values = {field.name: flags.FLAGS[field.name].value
              for field in dataclasses.fields(Config)}
    spec = backbones.backbone_spec(values["backbone"])
    # What the flags leave to be worked out, and the forms Config keeps values in.
    values.update(
        dataset=values["dataset"].strip(),
        classes=tuple(name.strip() for name in values["classes"]),
        backbone=spec.name,
        image_size=values["image_size"] or spec.native_image_size,
        unlabeled=values["unlabeled"].strip() if values["unlabeled"] else None,
        self_training_rounds=(
            values["self_training_rounds"] if values["self_training_rounds"] is not None
            else int(bool(values["unlabeled"]))),
        model_dir=values["model_dir"] or _default_model_dir(values["dataset"], spec.name),
        profile_batches=(
            tuple(int(b) for b in values["profile_batches"].split(","))
            if values["profile_batches"] else None
        ),
    )
    return Config(**values)


def given_flags():
    """The names of the run's options set on the command line or in a flagfile,
    defaults left out: those `--recipe=auto` keeps as they are."""
    return frozenset(field.name for field in dataclasses.fields(Config)
                     if flags.FLAGS[field.name].present)


def to_flagfile():
    """The effective flags as flagfile text: `--flagfile=` it to rerun the run.

    Every tl_keras flag is written, defaults included, so a later change of a
    default doesn't change what the rerun does; and, as comments a resume
    compares, the training examples `--exclude_files` lists.
    """
    lines = [rundir.FLAGS_HEADER]
    for flag in sorted(flags.FLAGS.get_flags_for_module(__name__), key=lambda f: f.name):
        if flag.value is not None and flag.name not in _MODE_FLAGS:
            lines.append(flag.serialize())
    if flags.FLAGS.exclude_files:
        # The list itself, not just the file's name: a resume with the same
        # file edited since is then refused too.
        lines += flagfile.exclusion_lines(exclusion.read_entries(flags.FLAGS.exclude_files))
    return "\n".join(lines) + "\n"


def defaults_flagfile():
    """Every flag at its default, as `to_flagfile` writes it: what a resume
    takes a flag to have been in a run whose flags.txt, written by an older
    version, lacks it (see `tl_keras.flagfile.differences`)."""
    return "\n".join(
        flag._serialize(flag.default)  # absl's own form of the value, as serialize()
        for flag in sorted(flags.FLAGS.get_flags_for_module(__name__), key=lambda f: f.name)
        if flag.default is not None and flag.name not in _MODE_FLAGS) + "\n"


def _default_model_dir(dataset, backbone):
    name = os.path.basename(os.path.normpath(dataset)) if ":" in dataset else dataset
    return os.path.join("runs", re.sub(r"[^\w.-]+", "_", f"{name}-{backbone}"))
