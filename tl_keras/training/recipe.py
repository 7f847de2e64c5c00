"""The training recipe: the two phases, their optimizer, learning rates,
loss and metrics; and `--recipe=auto`'s choices by the training set's size.

Backend-agnostic: only `keras`. Plain values and functions: `tl_keras.training.train`
runs the phases this module lays out.
"""

import dataclasses
import math

import keras
import numpy as np

from tl_keras.errors import UsageError
from tl_keras.model import layer_decay

HEAD_PHASE = "head"
FINETUNE_PHASE = "finetune"
# Self-training round N's phase is self_training_N (tl_keras.training.self_training).
SELF_TRAINING_PHASE_PREFIX = "self_training_"


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """What one phase trains and how.

    Attributes:
        name: `head`, `finetune`, or `self_training_N` for self-training round N.
        first_epoch: the epoch index the phase starts at; phases share one
            timeline, so fine-tuning starts at the number of head epochs.
        epochs: how many epochs the phase runs (may be 0).
        learning_rate: the peak learning rate.
        warmup_epochs: epochs of linear warmup before cosine decay; None keeps
            the learning rate constant.
    """

    name: str
    first_epoch: int
    epochs: int
    learning_rate: float
    warmup_epochs: float | None


def plan_phases(*, head_epochs, head_learning_rate, finetune_epochs,
                finetune_learning_rate, warmup_epochs):
    """Lays out the two phases on one epoch timeline.

    Returns:
        A list of two `PhasePlan`s, head then fine-tuning.
    """
    return [
        PhasePlan(HEAD_PHASE, 0, head_epochs, head_learning_rate, None),
        PhasePlan(FINETUNE_PHASE, head_epochs, finetune_epochs,
                  finetune_learning_rate, warmup_epochs),
    ]


def plan_self_training(*, first_epoch, rounds, epochs, learning_rate, warmup_epochs):
    """Lays out the self-training rounds on the same timeline, after the two phases.

    Each round warms up for `warmup_epochs`, but at most half the round, so
    that a short round still decays.

    Returns:
        A list of `rounds` `PhasePlan`s named `self_training_1`, ...
    """
    return [
        PhasePlan(self_training_phase(number), first_epoch + (number - 1) * epochs, epochs,
                  learning_rate, min(warmup_epochs, epochs / 2))
        for number in range(1, rounds + 1)
    ]


def self_training_phase(round_number):
    return f"{SELF_TRAINING_PHASE_PREFIX}{round_number}"


def self_training_round(phase_name):
    """The round number of a self-training phase's name; None for another phase."""
    if not phase_name.startswith(SELF_TRAINING_PHASE_PREFIX):
        return None
    return int(phase_name[len(SELF_TRAINING_PHASE_PREFIX):])


# The batch that --lr_scaling=linear takes the learning rates to be for, as in
# "Accurate, Large Minibatch SGD" (Goyal et al., 2017).
LINEAR_SCALING_REFERENCE_BATCH = 256


def learning_rate_scale(batch_size, scaling):
    """The factor on the learning rates: 1 for `none`; batch_size/256 for `linear`."""
    if scaling == "linear":
        return batch_size / LINEAR_SCALING_REFERENCE_BATCH
    return 1.0


def training_steps_per_epoch(num_examples, batch_size, cap):
    """Training steps per epoch: full batches only, optionally capped.

    Raises:
        UsageError: when there are fewer examples than one batch.
    """
    full = num_examples // batch_size
    if full == 0:
        raise UsageError(
            f"{num_examples} training examples make no full batch of "
            f"--batch_size={batch_size}; pass a smaller batch size."
        )
    return min(full, cap) if cap else full


def balanced_class_weights(counts):
    """`--class_weight=balanced`: scikit-learn's weights, n_examples /
    (n_classes * count), over the classes that have training examples.

    Every class then carries the same share of the training loss, and the
    weights average 1 over the training examples, so the loss keeps its scale
    (and the learning rates their meaning). A class without training examples
    weighs 0; no training example ever has it.

    Args:
        counts: the number of training examples of each class, by label.

    Returns:
        float32 `[classes]`.
    """
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def describe_class_weights(weights, counts, class_names):
    """The weights as the run prints them, e.g. `cat 0.55, dog 5.50`."""
    if len({count for count in counts if count}) == 1:
        return "1 for every class (each has the same number of training examples)"
    return ", ".join(
        f"{name} {weight:.2f}" if count else f"{name} 0 (no training examples)"
        for name, weight, count in zip(class_names, weights, counts))


def learning_rate_schedule(phase, steps_per_epoch):
    """The phase's learning rate: constant, or linear warmup then cosine decay.

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.
    """
    if phase.warmup_epochs is None:
        return phase.learning_rate
    warmup_steps = int(round(phase.warmup_epochs * steps_per_epoch))
    decay_steps = max(phase.epochs * steps_per_epoch - warmup_steps, 1)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(phase.learning_rate, decay_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=decay_steps,
        warmup_target=phase.learning_rate,
        warmup_steps=warmup_steps,
    )


def make_optimizer(name, learning_rate, weight_decay, *, ema=0.0, rate_factors=None):
    """Creates the optimizer named by `--optimizer`.

    Weight decay skips biases and normalisation parameters, whose decay only
    pulls the network away from its pretrained operating point.

    Args:
        name: `adamw`, `adam`, `sgd` (Nesterov momentum 0.9) or `rmsprop`.
        learning_rate: a float or a schedule.
        weight_decay: the decoupled weight decay coefficient; 0 for none.
        ema: `--ema`: the momentum of an exponential moving average of the
            trained weights, kept by the optimizer (Keras' `use_ema`); 0, the
            default, for none. `tl_keras.training.callbacks.EmaWeights` puts it in the
            model for validation and checkpoints.
        rate_factors: `--layer_decay`'s factors on the learning rate, from
            `tl_keras.model.layer_decay.LayerRates`; None, the default, for none.

    Returns:
        A `keras.optimizers.Optimizer`.
    """
    decay = weight_decay or None
    classes = layer_decay.OPTIMIZERS if rate_factors is not None else _OPTIMIZERS
    if name not in classes:
        raise ValueError(f"Unknown optimizer: {name!r}")
    settings = dict(weight_decay=weight_decay if name == "adamw" else decay)
    if name == "sgd":
        settings.update(momentum=0.9, nesterov=True)
    if ema:
        settings.update(use_ema=True, ema_momentum=ema)
    if rate_factors is not None:
        settings.update(rate_factors=rate_factors)
    optimizer = classes[name](learning_rate, **settings)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


_OPTIMIZERS = {"adamw": keras.optimizers.AdamW, "adam": keras.optimizers.Adam,
               "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}


def compile_for_phase(model, phase, *, steps_per_epoch, optimizer, weight_decay,
                      label_smoothing, num_classes, jit_compile, ema=0.0,
                      rate_factors=None):
    """Compiles the model for one phase (after its trainable flags are set).

    `ema` and `rate_factors` are as for `make_optimizer`.
    """
    model.compile(
        optimizer=make_optimizer(
            optimizer, learning_rate_schedule(phase, steps_per_epoch), weight_decay,
            ema=ema, rate_factors=rate_factors,
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=classification_metrics(num_classes),
        jit_compile=jit_compile,
    )


def compile_for_evaluation(model, label_smoothing):
    """Compiles a model that was never compiled, so that it can validate."""
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=classification_metrics(model.output_shape[-1]))


def classification_metrics(num_classes):
    """Top-1 and top-5 accuracy (top-k with k at most the number of classes)."""
    return [keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5")]


def validation_metrics(results, prefix=""):
    """Keras' validation results under the names metrics.json uses.

    Keras' `loss` is the compiled loss: cross-entropy against labels smoothed
    by --label_smoothing. It is named for that, apart from the test split's
    `nll`, which is computed without smoothing (`tl_keras.outputs.evaluate`).
    """
    return {"top1": float(results[f"{prefix}top1"]),
            "top5": float(results[f"{prefix}top5"]),
            "label_smoothed_loss": float(results[f"{prefix}loss"])}


# --recipe=auto: BiT's HyperRule (Kolesnikov et al., 2020, "Big Transfer (BiT):
# General Visual Representation Learning"; bit_hyperrule.py in
# google-research/big_transfer) sets the fine-tuning schedule and MixUp by the
# number of training examples, in four bands. BiT counts its schedule in steps
# of a batch of 512 and fine-tunes every layer from the first step; here phase 2
# gets the examples those steps show the network, as epochs of the training
# set, and a head phase of a tenth of that goes first.
BIT_BATCH_SIZE = 512
# Past this, a tiny set's per-epoch validation and backup outweigh its training.
AUTO_MAX_EPOCHS = 100
AUTO_HEAD_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class SizeBand:
    """One of the HyperRule's dataset sizes and what BiT does at that size.

    Attributes:
        below: the band holds datasets of fewer training examples than this.
        steps: BiT's fine-tuning steps, of 512 examples.
        warmup_steps: the first of them, with a linear warmup.
        mixup: BiT's MixUp alpha.
    """

    below: float
    steps: int
    warmup_steps: int
    mixup: float


HYPERRULE_BANDS = (
    SizeBand(below=5_000, steps=100, warmup_steps=10, mixup=0.0),
    SizeBand(below=20_000, steps=500, warmup_steps=100, mixup=0.0),
    SizeBand(below=500_000, steps=10_000, warmup_steps=500, mixup=0.1),
    SizeBand(below=math.inf, steps=20_000, warmup_steps=500, mixup=0.1),
)

# The smallest dataset BiT mixes: where the first band with MixUp starts.
_MIXUP_FROM = next(smaller.below for smaller, band in zip(HYPERRULE_BANDS, HYPERRULE_BANDS[1:])
                   if band.mixup)


@dataclasses.dataclass(frozen=True)
class AutoRecipe:
    """What --recipe=auto chose.

    Attributes:
        values: {option name: value} for the options it set; never one given
            explicitly.
        lines: what to print: the dataset's band, then one line per option,
            its value and why (or that it was given).
    """

    values: dict
    lines: tuple


def auto_recipe(num_train_examples, config, given):
    """Chooses the schedule, augmentation and MixUp from the training set's size.

    Args:
        num_train_examples: the training examples, after any subset and the
            validation split are taken out.
        config: the run's `tl_keras.config.Config`, as the flags set it.
        given: the names of the options given explicitly (command line or
            flagfile); they keep their values.

    Returns:
        An `AutoRecipe`.

    Raises:
        UsageError: when a given --warmup_epochs leaves no fine-tuning after
            it in the chosen --finetune_epochs.
    """
    band = next(band for band in HYPERRULE_BANDS if num_train_examples < band.below)
    epoch = training_steps_per_epoch(
        num_train_examples, config.batch_size, config.steps_per_epoch) * config.batch_size
    choices = _Choices(config, given)
    finetune_epochs = choices.choose("finetune_epochs", *_finetune_epochs(band, epoch))
    choices.choose("head_epochs", *_head_epochs(finetune_epochs, band, epoch))
    if finetune_epochs:
        fraction = band.warmup_steps / band.steps
        choices.choose(
            "warmup_epochs", round(fraction * finetune_epochs, 2),
            f"BiT warms up for {band.warmup_steps:,} of its {band.steps:,} steps at "
            f"this size, {fraction:.1%} of fine-tuning")
    for name, value, why in _augmentation(config, given, band):
        choices.choose(name, value, why)
    warmup = choices.value("warmup_epochs")
    if finetune_epochs and warmup >= finetune_epochs:
        raise UsageError(
            f"--warmup_epochs={warmup:g} leaves no fine-tuning after warmup in the "
            f"--finetune_epochs={finetune_epochs} that --recipe=auto chose for "
            f"{num_train_examples:,} training images; pass a smaller --warmup_epochs, "
            f"or --finetune_epochs too.")
    header = (f"Recipe auto, for {num_train_examples:,} training images "
              f"(BiT's HyperRule: {_describe_band(band)}):")
    return AutoRecipe(values=choices.values, lines=(header, *choices.lines))


def _finetune_epochs(band, epoch):
    examples = band.steps * BIT_BATCH_SIZE
    epochs = math.ceil(examples / epoch)
    why = (f"BiT fine-tunes on {examples:,} examples ({band.steps:,} steps of "
           f"{BIT_BATCH_SIZE}) at this size, {epochs:,} epochs of {epoch:,}")
    if epochs > AUTO_MAX_EPOCHS:
        epochs, why = AUTO_MAX_EPOCHS, f"{why}; at most {AUTO_MAX_EPOCHS}"
    return epochs, why


def _head_epochs(finetune_epochs, band, epoch):
    if not finetune_epochs:
        epochs, _ = _finetune_epochs(band, epoch)
        return epochs, "no fine-tuning, so the head phase takes the whole schedule"
    return (max(1, math.ceil(AUTO_HEAD_FRACTION * finetune_epochs)),
            "a tenth of fine-tuning, at least 1: the new head settles before the "
            "backbone trains under it")


def _augmentation(config, given, band):
    """(option, value, why) for --augment and --mixup."""
    if config.cache_features:
        why = "--cache_features: phase 1 trains on features of unaugmented images"
        return [("augment", "none", why), ("mixup", 0.0, why)]
    if "cutmix" in given and config.cutmix:
        mixup = (0.0, "--cutmix was given: its batches mix by CutMix alone, as asked")
    elif band.mixup:
        mixup = (band.mixup, f"BiT's MixUp alpha from {_MIXUP_FROM:,} images on")
    else:
        mixup = (0.0, f"BiT uses no MixUp below {_MIXUP_FROM:,} images")
    return [("augment", "basic",
             "BiT's random crop and horizontal flip, at every size"),
            ("mixup", *mixup)]


def _describe_band(band):
    index = HYPERRULE_BANDS.index(band)
    if not index:
        return f"under {band.below:,} images"
    lower = HYPERRULE_BANDS[index - 1].below
    if band.below == math.inf:
        return f"{lower:,} images or more"
    return f"{lower:,} to {band.below:,} images"


class _Choices:
    """The options --recipe=auto sets, the given ones kept, with a line each."""

    def __init__(self, config, given):
        self.config = config
        self.given = given
        self.values = {}
        self.lines = []

    def choose(self, name, value, why):
        """Sets `name` to `value` unless it was given; returns its value now."""
        if name in self.given:
            kept = self.value(name)
            self.lines.append(f"  --{name}={_shown(kept)}: given, kept.")
            return kept
        self.values[name] = value
        self.lines.append(f"  --{name}={_shown(value)}: {why}.")
        return value

    def value(self, name):
        return self.values.get(name, getattr(self.config, name))


def _shown(value):
    return f"{value:g}" if isinstance(value, float) else str(value)
