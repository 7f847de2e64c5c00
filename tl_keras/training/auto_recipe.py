"""`--recipe=auto`: the schedule, augmentation and MixUp chosen by the training
set's size, after BiT's HyperRule, each choice with its reason.
"""

import dataclasses
import math

from tl_keras.errors import UsageError
from tl_keras.training import recipe


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
    epoch = recipe.training_steps_per_epoch(
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
