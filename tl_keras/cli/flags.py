"""The command line: every flag, its validation, and the conversion to `Config`.

Each flag is made from the field that defines its option: `Config`'s, in
`tl_keras.config`, for the options of the run, and `_ModeOptions`'s, here, for
those of what this process does.

This is the only module that reads flags. Validators run when the command line
is parsed, before any data or model work, and say how to fix what they reject.
"""

import dataclasses
import glob
import os
import re
import sys

from absl import flags
from absl.testing import flagsaver

from tl_keras import config as config_lib
from tl_keras import rundir
from tl_keras.config import Config
from tl_keras.errors import UsageError
from tl_keras.model import backbones

_MODES = config_lib.OptionGroup("Modes")


@dataclasses.dataclass(frozen=True)
class _ModeOptions:
    """The options of what this process does, not of the training run itself:
    `to_flagfile` leaves them out, so rerunning a run's flags.txt trains it.

    Never instantiated: only its fields are read, defined like `Config`'s.
    """
    mode: str = _MODES.enum(
        "train", ["train", "evaluate", "predict", "find_lr"],
        "train: train, evaluate and export. evaluate: evaluate the finished run in "
        "--model_dir on --split. predict: classify --images with that run's SavedModel, "
        "or with the .tflite file --model_dir names (its labels.txt beside it). "
        "find_lr: a learning-rate range test of --find_lr_phase, written to "
        "--model_dir/find_lr/; it changes nothing else there.")
    split: str = _MODES.enum(
        "test", ["train", "validation", "test"], "--mode=evaluate: the split.")
    images: str | None = _MODES.string(
        None, "--mode=predict: an image file, a folder, or a glob.")
    top_k: int = _MODES.integer(5, "--mode=predict: classes shown per image.")
    output: str | None = _MODES.string(
        None, "--mode=predict: also write the predictions to this CSV file.")
    find_lr_phase: str = _MODES.enum(
        "head", ["head", "finetune"],
        "--mode=find_lr: the phase whose learning rate is tested, set up as training "
        "sets it up. finetune starts from the head phase's end weights of the run in "
        "--model_dir when it has them, else from an untrained head.")
    find_lr_steps: int = _MODES.integer(
        100, "--mode=find_lr: training steps over which the rate rises from 1e-7 to 1.")
    explain: bool = _MODES.boolean(
        False,
        "--mode=predict: also write each image's Grad-CAM heatmap, for its top class, "
        "over it as a PNG under RUN/explanations/. Needs a run folder, not a .tflite file.")
    overwrite: bool = config_lib.RUN.boolean(
        False,
        "Train afresh in a --model_dir that holds a complete or unfinished run, "
        "deleting what that run wrote and nothing else. Without it, a complete run is "
        "left alone and an interrupted one resumes. A folder that holds no run is "
        "never written into unless it is empty.")


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
            spec = config_lib.flag_spec(field)
            if spec.kind == "enum":
                holder = flags.DEFINE_enum(field.name, spec.default, list(spec.choices),
                                           spec.help)
            else:
                holder = _DEFINERS[spec.kind](field.name, spec.default, spec.help)
            groups.setdefault(spec.group, []).append(holder)
    return tuple((title, tuple(holders)) for title, holders in groups.items())


# The groups --helpshort lists the flags in, each flag once.
HELP_GROUPS = _define_flags(Config, _ModeOptions)

# What `to_flagfile` leaves out and `mode` returns.
_MODE_FLAGS = frozenset(field.name for field in dataclasses.fields(_ModeOptions))


def _check(flag, condition, fix):
    def validator(value):
        if value is not None and not condition(value):
            # absl puts "flag --name=value: " before the message.
            raise flags.ValidationError(fix)
        return True

    flags.register_validator(flag, validator)


_check("val_fraction", lambda v: 0 < v < 1, "must be between 0 and 1, e.g. 0.1.")
_check("image_size", lambda v: v >= 32,
       "must be at least 32 (pixels), or left out for the backbone's native size.")
_check("dropout", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.2.")
_check("batch_size", lambda v: v >= 1, "must be at least 1, e.g. 64.")
_check("head_epochs", lambda v: v >= 0, "must be 0 or more.")
_check("finetune_epochs", lambda v: v >= 0, "must be 0 or more.")
_check("head_learning_rate", lambda v: v > 0, "must be greater than 0, e.g. 1e-3.")
_check("finetune_learning_rate", lambda v: v > 0, "must be greater than 0, e.g. 1e-4.")
_check("weight_decay", lambda v: v >= 0, "must be 0 or more, e.g. 0.05.")
_check("warmup_epochs", lambda v: v >= 0, "must be 0 or more.")
_check("layer_decay", lambda v: 0 < v <= 1,
       "must be in (0, 1], e.g. 0.75; 1 is off.")
_check("ema", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.999; 0 is off.")
_check("early_stopping", lambda v: v >= 0,
       "must be 0 (off) or a number of epochs, e.g. 3.")
_check("label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.1.")
_check("train_examples_per_class", lambda v: v >= 1,
       "must be at least 1, or left out to keep every training image.")
_check("mixup", lambda v: v >= 0, "must be 0 (off) or a positive alpha, e.g. 0.2.")
_check("cutmix", lambda v: v >= 0, "must be 0 (off) or a positive alpha, e.g. 1.0.")
_check("pseudo_label_threshold", lambda v: 0 < v < 1,
       "must be in (0, 1), e.g. 0.5: the least confidence a pseudo-label is kept at.")
_check("pseudo_labels_per_class", lambda v: v >= 1,
       "must be at least 1, or left out for 40% of the unlabelled images per class.")
_check("self_training_rounds", lambda v: v >= 0, "must be 0 or more.")
_check("self_training_epochs", lambda v: v >= 1, "must be at least 1, e.g. 10.")
_check("self_training_learning_rate", lambda v: v > 0,
       "must be greater than 0, e.g. 1e-4.")
_check("self_training_mixup", lambda v: v >= 0,
       "must be 0 (off) or a positive alpha, e.g. 0.2.")
_check("self_training_cutmix", lambda v: v >= 0,
       "must be 0 (off) or a positive alpha, e.g. 1.0.")
_check("unlabeled", lambda v: bool(v.strip()) and (
           not v.startswith("tfds:") or re.fullmatch(r"tfds:[^:]+:.+", v)),
       "pass a folder of images, or tfds:NAME:SPLIT such as tfds:stl10:unlabelled.")
_check("top_k", lambda v: v >= 1, "must be at least 1.")
_check("find_lr_steps", lambda v: v >= 10, "must be at least 10, e.g. 100.")
_check("profile_batches",
       lambda v: re.fullmatch(r"\d+,\d+", v) and 0 < int(v.split(",")[0]) <= int(v.split(",")[1]),
       "pass START,END batch numbers, 1 <= START <= END, e.g. 10,20.")
_check("steps_per_epoch", lambda v: v >= 1, "must be at least 1, or left out for no cap.")
_check("dataset", lambda v: bool(v.strip()), "must name a TFDS dataset, e.g. cifar100.")
_check("unfreeze", lambda v: v == "all" or (v.isdigit() and int(v) > 0) or
       (bool(v) and not v.lstrip("-").isdigit()),
       "pass all, a positive number of top layers, or a layer name.")


@flags.multi_flags_validator(["mode", "model_dir", "images", "explain"])
def _validate_mode(values):
    mode = values["mode"]
    if values["explain"] and mode != "predict":
        raise flags.ValidationError(
            f"--explain writes Grad-CAM overlays of --images, for --mode=predict only "
            f"(--mode=evaluate writes its Grad-CAM grid without it); drop it for "
            f"--mode={mode}.")
    if mode in ("evaluate", "predict") and not values["model_dir"]:
        raise flags.ValidationError(
            f"--mode={mode} needs --model_dir=RUN, the folder of a finished training run.")
    if values["model_dir"] and values["model_dir"].endswith(".tflite") and mode != "predict":
        raise flags.ValidationError(
            f"--model_dir={values['model_dir']} is a .tflite file, which only "
            f"--mode=predict takes; --mode={mode} needs a run folder.")
    if mode == "predict" and not values["images"]:
        raise flags.ValidationError(
            "--mode=predict needs --images=PATH: an image file, a folder or a glob.")
    return True


@flags.multi_flags_validator(["mode", "strategy"])
def _validate_find_lr(values):
    if values["mode"] == "find_lr" and values["strategy"] == "multi_worker":
        raise flags.ValidationError(
            "--mode=find_lr runs on one machine; drop --strategy=multi_worker.")
    return True


@flags.multi_flags_validator(["cache_features", "augment", "mixup", "cutmix"])
def _validate_cache_features(values):
    augmenting = [f"--{name}={values[name]}" for name in ("augment", "mixup", "cutmix")
                  if values[name] not in ("none", 0, 0.0)]
    if values["cache_features"] and augmenting:
        raise flags.ValidationError(
            f"--cache_features computes each training image's features once, so "
            f"phase 1 can't see augmented images ({', '.join(augmenting)}). Drop "
            f"--cache_features, or the augmentation.")
    return True


@flags.multi_flags_validator(["unlabeled", "self_training_rounds", "strategy"])
def _validate_self_training(values):
    rounds = values["self_training_rounds"]
    if rounds and not values["unlabeled"]:
        raise flags.ValidationError(
            f"--self_training_rounds={rounds} needs unlabelled images to label: add "
            f"--unlabeled=FOLDER (or tfds:NAME:SPLIT), or drop --self_training_rounds.")
    if values["unlabeled"] and values["strategy"] == "multi_worker":
        raise flags.ValidationError(
            "--unlabeled runs on one machine: its pseudo-label files and rounds are "
            "not shared across workers yet. Drop --strategy=multi_worker, or --unlabeled.")
    return True


@flags.validator("backbone")
def _validate_backbone(name):
    try:
        backbones.backbone_spec(name)
    except UsageError as error:
        raise flags.ValidationError(str(error)) from error
    return True


@flags.validator("weights")
def _validate_weights(weights):
    if weights in ("imagenet", "none") or os.path.isfile(weights):
        return True
    raise flags.ValidationError(
        "not imagenet or none, and no such file. Pass imagenet, none, or the "
        "path of a weights file.")


@flags.multi_flags_validator(["strategy", "tpu", "cache_features"])
def _validate_strategy(values):
    strategy = values["strategy"]
    if values["tpu"] and strategy != "tpu":
        raise flags.ValidationError(
            f"--tpu={values['tpu']} names a TPU, which only --strategy=tpu uses "
            f"(not --strategy={strategy}). Add --strategy=tpu, or drop --tpu.")
    if values["cache_features"] and strategy == "multi_worker":
        raise flags.ValidationError(
            "--cache_features keeps each worker's features in its own memory, and "
            "doesn't train across workers yet. Drop it for --strategy=multi_worker.")
    return True


@flags.multi_flags_validator(["export_tflite", "tflite_quantization", "tflite_max_drop"])
def _validate_tflite(values):
    # Quantizing is a choice about model.tflite, so it asks for the file
    # rather than quietly adding an export the command line didn't ask for.
    if values["tflite_quantization"] != "none" and not values["export_tflite"]:
        raise flags.ValidationError(
            f"--tflite_quantization={values['tflite_quantization']} quantizes "
            f"model.tflite, which only --export_tflite writes. Add --export_tflite, "
            f"or drop --tflite_quantization.")
    if values["tflite_max_drop"] < 0:
        raise flags.ValidationError(
            f"--tflite_max_drop={values['tflite_max_drop']:g} must be 0 or more "
            f"(percentage points of test top-1), e.g. 2.")
    return True


@flags.multi_flags_validator(["head_epochs", "finetune_epochs"])
def _validate_epochs(values):
    if values["head_epochs"] + values["finetune_epochs"] == 0:
        raise flags.ValidationError(
            "--head_epochs and --finetune_epochs are both 0, so there is nothing "
            "to train; give at least one of them a positive number of epochs.")
    return True


@flags.multi_flags_validator(["warmup_epochs", "finetune_epochs", "recipe"])
def _validate_warmup(values):
    warmup, finetune = values["warmup_epochs"], values["finetune_epochs"]
    # --recipe=auto may choose either, and checks the two once it has.
    if finetune and warmup >= finetune and values["recipe"] != "auto":
        raise flags.ValidationError(
            f"--warmup_epochs={warmup} leaves no fine-tuning after warmup "
            f"(--finetune_epochs={finetune}); pass a --warmup_epochs below "
            f"{finetune}, such as {finetune / 2:g}.")
    return True


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
                for field in dataclasses.fields(_ModeOptions)}
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
    default doesn't change what the rerun does.
    """
    lines = [rundir.FLAGS_HEADER]
    for flag in sorted(flags.FLAGS.get_flags_for_module(__name__), key=lambda f: f.name):
        if flag.value is not None and flag.name not in _MODE_FLAGS:
            lines.append(flag.serialize())
    return "\n".join(lines) + "\n"


def _default_model_dir(dataset, backbone):
    name = os.path.basename(os.path.normpath(dataset)) if ":" in dataset else dataset
    return os.path.join("runs", re.sub(r"[^\w.-]+", "_", f"{name}-{backbone}"))
