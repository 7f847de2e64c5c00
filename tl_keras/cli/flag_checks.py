"""The checks of the command line: each flag's own range, and the rules
between flags, run by absl as it parses, before any data or model work. Each
says how to fix what it rejects.

`tl_keras.cli.flags` defines the flags, then calls `register`.
"""

import os
import re

from absl import flags

from tl_keras import rundir
from tl_keras.errors import UsageError
from tl_keras.model import backbones


# Each check, as a function that registers it with absl, in the order absl
# runs them; `register` calls them once the flags are defined.
_REGISTRATIONS = []


def register():
    """Registers every check; call it once, after the flags are defined."""
    for registration in _REGISTRATIONS:
        registration()


def _check(flag, condition, fix):
    """A check of one flag's value: `condition` holds, or `fix` says what to pass."""
    def validator(value):
        if value is not None and not condition(value):
            # absl puts "flag --name=value: " before the message.
            raise flags.ValidationError(fix)
        return True

    _REGISTRATIONS.append(lambda: flags.register_validator(flag, validator))


def _checks_together(*names):
    """Marks a check of several flags together; it gets {name: value}."""
    def record(check):
        _REGISTRATIONS.append(lambda: flags.register_multi_flags_validator(list(names), check))
        return check
    return record


def _checks_value(name):
    """Marks a check of one flag's value that is more than a condition."""
    def record(check):
        _REGISTRATIONS.append(lambda: flags.register_validator(name, check))
        return check
    return record


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
       "pass a folder of images, or tfds:NAME:SPLIT such as tfds:stl10:unlabelled "
       "(tfds:NAME:VERSION:SPLIT names a version, e.g. tfds:cifar10:3.0.2:train).")
_check("exclude_files", os.path.isfile,
       "no such file. Pass a text file of the training images to leave out, one a "
       "line, such as the exclude.txt --mode=audit writes.")
_check("top_k", lambda v: v >= 1, "must be at least 1.")
_check("probe_every", lambda v: v >= 1, "must be at least 1, e.g. 2.")
_check("find_lr_steps", lambda v: v >= 10, "must be at least 10, e.g. 100.")
_check("profile_batches",
       lambda v: re.fullmatch(r"\d+,\d+", v) and 0 < int(v.split(",")[0]) <= int(v.split(",")[1]),
       "pass START,END batch numbers, 1 <= START <= END, e.g. 10,20.")
_check("steps_per_epoch", lambda v: v >= 1, "must be at least 1, or left out for no cap.")
_check("dataset", lambda v: bool(v.strip()), "must name a TFDS dataset, e.g. cifar100.")
_check("unfreeze", lambda v: v == "all" or (v.isdigit() and int(v) > 0) or
       (bool(v) and not v.lstrip("-").isdigit()),
       "pass all, a positive number of top layers, or a layer name.")


@_checks_together("mode", "model_dir", "images", "explain")
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
    model_file = os.path.splitext(values["model_dir"] or "")[1]
    if model_file in rundir.MODEL_FILE_SUFFIXES and mode != "predict":
        raise flags.ValidationError(
            f"--model_dir={values['model_dir']} is a {model_file} file, which only "
            f"--mode=predict takes; --mode={mode} needs a run folder.")
    if mode == "predict" and not values["images"]:
        raise flags.ValidationError(
            "--mode=predict needs --images=PATH: an image file, a folder or a glob.")
    return True


@_checks_together("mode", "strategy")
def _validate_find_lr(values):
    if values["mode"] in ("find_lr", "probe") and values["strategy"] == "multi_worker":
        raise flags.ValidationError(
            f"--mode={values['mode']} runs on one machine; drop --strategy=multi_worker.")
    return True


@_checks_together("cache_features", "augment", "mixup", "cutmix")
def _validate_cache_features(values):
    augmenting = [f"--{name}={values[name]}" for name in ("augment", "mixup", "cutmix")
                  if values[name] not in ("none", 0, 0.0)]
    if values["cache_features"] and augmenting:
        raise flags.ValidationError(
            f"--cache_features computes each training image's features once, so "
            f"phase 1 can't see augmented images ({', '.join(augmenting)}). Drop "
            f"--cache_features, or the augmentation.")
    return True


@_checks_together("unlabeled", "self_training_rounds", "strategy")
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


@_checks_value("backbone")
def _validate_backbone(name):
    try:
        backbones.backbone_spec(name)
    except UsageError as error:
        raise flags.ValidationError(str(error)) from error
    return True


@_checks_value("weights")
def _validate_weights(weights):
    if weights in ("imagenet", "none") or os.path.isfile(weights):
        return True
    raise flags.ValidationError(
        "not imagenet or none, and no such file. Pass imagenet, none, or the "
        "path of a weights file.")


@_checks_together("strategy", "tpu", "cache_features")
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


@_checks_together("export_tflite", "tflite_quantization", "tflite_max_drop")
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


@_checks_together("head_epochs", "finetune_epochs")
def _validate_epochs(values):
    if values["head_epochs"] + values["finetune_epochs"] == 0:
        raise flags.ValidationError(
            "--head_epochs and --finetune_epochs are both 0, so there is nothing "
            "to train; give at least one of them a positive number of epochs.")
    return True


@_checks_together("warmup_epochs", "finetune_epochs", "recipe")
def _validate_warmup(values):
    warmup, finetune = values["warmup_epochs"], values["finetune_epochs"]
    # --recipe=auto may choose either, and checks the two once it has.
    if finetune and warmup >= finetune and values["recipe"] != "auto":
        raise flags.ValidationError(
            f"--warmup_epochs={warmup} leaves no fine-tuning after warmup "
            f"(--finetune_epochs={finetune}); pass a --warmup_epochs below "
            f"{finetune}, such as {finetune / 2:g}.")
    return True
