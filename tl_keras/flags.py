"""The command line: every flag, its validation, and the conversion to `Config`.

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

from tl_keras import backbones
from tl_keras import distribute
from tl_keras import rundir
from tl_keras.config import Config
from tl_keras.errors import UsageError

# What to do.
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "evaluate", "predict"],
    "train: train, evaluate and export. evaluate: evaluate the finished run in "
    "--model_dir on --split. predict: classify --images with that run's SavedModel.")
_SPLIT = flags.DEFINE_enum(
    "split", "test", ["train", "validation", "test"], "--mode=evaluate: the split.")
_IMAGES = flags.DEFINE_string(
    "images", None, "--mode=predict: an image file, a folder, or a glob.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "--mode=predict: classes shown per image.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False,
    "Train afresh in a --model_dir that holds a complete or unfinished run, "
    "deleting what that run wrote and nothing else. Without it, a complete run is "
    "left alone and an interrupted one resumes. A folder that holds no run is "
    "never written into unless it is empty.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "--mode=predict: also write the predictions to this CSV file.")

# Data.
_DATASET = flags.DEFINE_string(
    "dataset", "cifar100",
    "TFDS dataset name, e.g. cifar100; or folder:PATH for your own images in "
    "PATH/<class>/* or PATH/<split>/<class>/*.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "Where TFDS keeps prepared datasets (default: TFDS's own, ~/tensorflow_datasets). "
    "Point it at a prepared copy to run offline.")
_TRAIN_SPLIT = flags.DEFINE_string(
    "train_split", "train", "TFDS split to train on; slices such as train[:50%] work.")
_VAL_SPLIT = flags.DEFINE_string(
    "val_split", "",
    "Validation split. Empty: the dataset's `validation` split if it has one, else "
    "the last --val_fraction of each part of --train_split, as TFDS slices, the same "
    "examples every run. One that overlaps --train_split is refused.")
_TEST_SPLIT = flags.DEFINE_string(
    "test_split", "test", "Split read once, by the final evaluation.")
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.1,
    "Fraction held out when carving validation from train (and, for a folder "
    "without split folders, test too; stratified by class).")
_CLASSES = flags.DEFINE_list(
    "classes", [],
    "Keep only these classes (comma-separated names), renumbered in this order.")
_TRAIN_EXAMPLES_PER_CLASS = flags.DEFINE_integer(
    "train_examples_per_class", None,
    "Keep this many training images per class, chosen by --seed (few-shot runs).")
_STRICT_DATA = flags.DEFINE_boolean(
    "strict_data", False,
    "Make any unreadable image file, and a split without examples of some class, "
    "an error instead of a note.")
_AUGMENT = flags.DEFINE_enum(
    "augment", "none", ["none", "basic", "randaugment"],
    "Training augmentation: basic is a random resized crop and horizontal flip; "
    "randaugment adds Keras' RandAugment. Never applied at evaluation or serving.")
_MIXUP = flags.DEFINE_float("mixup", 0.0, "MixUp Beta alpha (e.g. 0.2); 0 is off.")
_CUTMIX = flags.DEFINE_float(
    "cutmix", 0.0, "CutMix Beta alpha (e.g. 1.0); 0 is off. With --mixup, each "
    "batch uses one of the two.")

# Model.
_BACKBONE = flags.DEFINE_string(
    "backbone", "resnet50",
    "Keras Applications model, case-insensitive: resnet50, efficientnetv2s, "
    "convnexttiny, mobilenetv3large, ...")
_WEIGHTS = flags.DEFINE_string(
    "weights", "imagenet",
    "Backbone weights: imagenet, none (random), or the path of a weights file, "
    "such as a previous run's backbone.weights.h5.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None,
    "Square size the backbone sees (default: its native size, e.g. 224 for "
    "resnet50). Smaller images are resized inside the model; larger folder "
    "images are brought down on the CPU first, as the model would resize them.")
_DROPOUT = flags.DEFINE_float("dropout", 0.2, "Dropout rate before the head.")
_RESIZE = flags.DEFINE_enum(
    "resize", "stretch", ["stretch", "crop"],
    "How images become square --image_size: stretch resizes as they are; crop "
    "takes the centre square first, keeping the aspect ratio. Training, "
    "evaluation and the exported model all do the same.")

# Training.
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 64, "Global batch size, split across all replicas.")
_HEAD_EPOCHS = flags.DEFINE_integer(
    "head_epochs", 3, "Phase 1: epochs training the head on the frozen backbone.")
_HEAD_LEARNING_RATE = flags.DEFINE_float(
    "head_learning_rate", 1e-3, "Phase 1 learning rate (constant).")
_FINETUNE_EPOCHS = flags.DEFINE_integer(
    "finetune_epochs", 10, "Phase 2: epochs fine-tuning the unfrozen layers.")
_FINETUNE_LEARNING_RATE = flags.DEFINE_float(
    "finetune_learning_rate", 1e-4,
    "Phase 2 peak learning rate, reached after warmup, then cosine decay to 0.")
_UNFREEZE = flags.DEFINE_string(
    "unfreeze", "all",
    "Phase 2 unfreezes: all; a number N of top backbone layers; or the name of "
    "the first layer to unfreeze. BatchNormalization layers follow --batchnorm.")
_BATCHNORM = flags.DEFINE_enum(
    "batchnorm", "frozen", ["frozen", "train"],
    "frozen keeps every BatchNormalization layer in inference mode with the "
    "statistics its weights came with, the right choice for pretrained weights. "
    "train lets the BatchNormalization layers phase 2 unfreezes normalise by "
    "batch statistics and update theirs: the right choice when training a "
    "backbone from scratch (--weights=none).")
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "adamw", ["adamw", "adam", "sgd", "rmsprop"],
    "Optimizer for both phases (sgd uses Nesterov momentum 0.9).")
_WEIGHT_DECAY = flags.DEFINE_float(
    "weight_decay", 0.05,
    "Decoupled weight decay; biases and normalisation parameters are exempt.")
_LR_SCALING = flags.DEFINE_enum(
    "lr_scaling", "none", ["none", "linear"],
    "none: the learning rates apply as given, whatever --batch_size. linear: "
    "they are for a global batch of 256 and scale with --batch_size/256.")
_WARMUP_EPOCHS = flags.DEFINE_float(
    "warmup_epochs", 1.0,
    "Phase 2 epochs of linear learning-rate warmup; fractions work, e.g. 0.5.")
_LABEL_SMOOTHING = flags.DEFINE_float(
    "label_smoothing", 0.1, "Label smoothing of the cross-entropy loss.")
_EXPORT_WEIGHTS = flags.DEFINE_enum(
    "export_weights", "best", ["best", "last"],
    "Which weights the test evaluation and every exported file use: best, the "
    "epoch with the best validation top-1 across both phases; last, the last epoch.")

# Runtime.
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision", "auto", ["auto", "off", "bfloat16", "float16"],
    "Compute dtype. auto: bfloat16 on GPUs of compute capability 8.0+ and TPUs, "
    "float16 with loss scaling on older GPUs, float32 on CPUs.")
_JIT_COMPILE = flags.DEFINE_enum(
    "jit_compile", "auto", ["auto", "true", "false"],
    "XLA-compile the train step. auto: Keras decides per model and backend.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "auto", list(distribute.STRATEGIES),
    "Where training runs. auto: MirroredStrategy over the GPUs if there are any, "
    "else the CPU (under JAX: keras.distribution.DataParallel over the local "
    "devices). The others are tf.distribute strategies: one_device, mirrored, "
    "multi_worker (MultiWorkerMirroredStrategy over the cluster in TF_CONFIG), "
    "tpu (TPUStrategy on --tpu).")
_TPU = flags.DEFINE_string(
    "tpu", None, "--strategy=tpu: the TPU's name, grpc://HOST:PORT, or local on a TPU VM.")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None,
    "Where the run writes its outputs (default: runs/DATASET-BACKBONE).")
_SEED = flags.DEFINE_integer("seed", 42, "Seed for weights, shuffling and dropout.")
_CACHE_FEATURES = flags.DEFINE_boolean(
    "cache_features", False,
    "Phase 1: run the frozen backbone once over train and validation and train "
    "the head on those features (much faster; no augmentation in phase 1).")
_EXPORT_TFLITE = flags.DEFINE_boolean(
    "export_tflite", False,
    "Also write model.tflite (float32, one --image_size image) and check it "
    "against the SavedModel on test images.")
_PROFILE_BATCHES = flags.DEFINE_string(
    "profile_batches", None,
    "START,END: write a profiler trace of these batches of the first phase to "
    "TensorBoard (e.g. 10,20).")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", None,
    "Cap on training steps per epoch, for quick runs (default: the whole split).")


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
_check("label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.1.")
_check("train_examples_per_class", lambda v: v >= 1,
       "must be at least 1, or left out to keep every training image.")
_check("mixup", lambda v: v >= 0, "must be 0 (off) or a positive alpha, e.g. 0.2.")
_check("cutmix", lambda v: v >= 0, "must be 0 (off) or a positive alpha, e.g. 1.0.")
_check("top_k", lambda v: v >= 1, "must be at least 1.")
_check("profile_batches",
       lambda v: re.fullmatch(r"\d+,\d+", v) and 0 < int(v.split(",")[0]) <= int(v.split(",")[1]),
       "pass START,END batch numbers, 1 <= START <= END, e.g. 10,20.")
_check("steps_per_epoch", lambda v: v >= 1, "must be at least 1, or left out for no cap.")
_check("dataset", lambda v: bool(v.strip()), "must name a TFDS dataset, e.g. cifar100.")
_check("unfreeze", lambda v: v == "all" or (v.isdigit() and int(v) > 0) or
       (bool(v) and not v.lstrip("-").isdigit()),
       "pass all, a positive number of top layers, or a layer name.")


@flags.multi_flags_validator(["mode", "model_dir", "images"])
def _validate_mode(values):
    mode = values["mode"]
    if mode != "train" and not values["model_dir"]:
        raise flags.ValidationError(
            f"--mode={mode} needs --model_dir=RUN, the folder of a finished training run.")
    if mode == "predict" and not values["images"]:
        raise flags.ValidationError(
            "--mode=predict needs --images=PATH: an image file, a folder or a glob.")
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


@flags.multi_flags_validator(["head_epochs", "finetune_epochs"])
def _validate_epochs(values):
    if values["head_epochs"] + values["finetune_epochs"] == 0:
        raise flags.ValidationError(
            "--head_epochs and --finetune_epochs are both 0, so there is nothing "
            "to train; give at least one of them a positive number of epochs.")
    return True


@flags.multi_flags_validator(["warmup_epochs", "finetune_epochs"])
def _validate_warmup(values):
    warmup, finetune = values["warmup_epochs"], values["finetune_epochs"]
    if finetune and warmup >= finetune:
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

# The groups --helpshort lists the flags in, each flag once.
HELP_GROUPS = (
    ("Data", (_DATASET, _DATA_DIR, _TRAIN_SPLIT, _VAL_SPLIT, _TEST_SPLIT, _VAL_FRACTION,
              _CLASSES, _TRAIN_EXAMPLES_PER_CLASS, _STRICT_DATA, _AUGMENT, _MIXUP,
              _CUTMIX)),
    ("Model", (_BACKBONE, _WEIGHTS, _IMAGE_SIZE, _RESIZE, _DROPOUT)),
    ("Training", (_BATCH_SIZE, _HEAD_EPOCHS, _HEAD_LEARNING_RATE, _FINETUNE_EPOCHS,
                  _FINETUNE_LEARNING_RATE, _WARMUP_EPOCHS, _LR_SCALING, _UNFREEZE,
                  _BATCHNORM, _OPTIMIZER, _WEIGHT_DECAY, _LABEL_SMOOTHING,
                  _EXPORT_WEIGHTS, _CACHE_FEATURES, _STEPS_PER_EPOCH)),
    ("Run", (_MODEL_DIR, _OVERWRITE, _SEED, _MIXED_PRECISION, _JIT_COMPILE, _STRATEGY,
             _TPU, _EXPORT_TFLITE, _PROFILE_BATCHES)),
    ("Modes", (_MODE, _SPLIT, _IMAGES, _TOP_K, _OUTPUT)),
)


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
    """The parsed `--mode` and its own settings, as a dict."""
    return {
        "mode": _MODE.value, "split": _SPLIT.value, "images": _IMAGES.value,
        "top_k": _TOP_K.value, "output": _OUTPUT.value, "model_dir": _MODEL_DIR.value,
        "overwrite": _OVERWRITE.value,
    }


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


def to_config():
    """Converts the parsed flags into a `Config`."""
    spec = backbones.backbone_spec(_BACKBONE.value)
    return Config(
        dataset=_DATASET.value.strip(),
        data_dir=_DATA_DIR.value,
        train_split=_TRAIN_SPLIT.value,
        val_split=_VAL_SPLIT.value,
        test_split=_TEST_SPLIT.value,
        val_fraction=_VAL_FRACTION.value,
        classes=tuple(name.strip() for name in _CLASSES.value),
        train_examples_per_class=_TRAIN_EXAMPLES_PER_CLASS.value,
        strict_data=_STRICT_DATA.value,
        augment=_AUGMENT.value,
        mixup=_MIXUP.value,
        cutmix=_CUTMIX.value,
        backbone=spec.name,
        weights=_WEIGHTS.value,
        image_size=_IMAGE_SIZE.value or spec.native_image_size,
        dropout=_DROPOUT.value,
        resize=_RESIZE.value,
        batch_size=_BATCH_SIZE.value,
        head_epochs=_HEAD_EPOCHS.value,
        head_learning_rate=_HEAD_LEARNING_RATE.value,
        finetune_epochs=_FINETUNE_EPOCHS.value,
        finetune_learning_rate=_FINETUNE_LEARNING_RATE.value,
        unfreeze=_UNFREEZE.value,
        batchnorm=_BATCHNORM.value,
        optimizer=_OPTIMIZER.value,
        weight_decay=_WEIGHT_DECAY.value,
        warmup_epochs=_WARMUP_EPOCHS.value,
        label_smoothing=_LABEL_SMOOTHING.value,
        export_weights=_EXPORT_WEIGHTS.value,
        mixed_precision=_MIXED_PRECISION.value,
        jit_compile=_JIT_COMPILE.value,
        strategy=_STRATEGY.value,
        tpu=_TPU.value,
        lr_scaling=_LR_SCALING.value,
        model_dir=_MODEL_DIR.value or _default_model_dir(_DATASET.value, spec.name),
        seed=_SEED.value,
        steps_per_epoch=_STEPS_PER_EPOCH.value,
        export_tflite=_EXPORT_TFLITE.value,
        cache_features=_CACHE_FEATURES.value,
        profile_batches=(
            tuple(int(b) for b in _PROFILE_BATCHES.value.split(","))
            if _PROFILE_BATCHES.value else None
        ),
    )


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


# Flags of how this process acts, not of the training run itself.
_MODE_FLAGS = frozenset({"mode", "split", "images", "top_k", "output", "overwrite"})


def _default_model_dir(dataset, backbone):
    name = os.path.basename(os.path.normpath(dataset)) if ":" in dataset else dataset
    return os.path.join("runs", re.sub(r"[^\w.-]+", "_", f"{name}-{backbone}"))
