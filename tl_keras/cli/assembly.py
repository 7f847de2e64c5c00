"""What every mode builds from a `Config` before it runs: the strategy, dtype
policy and backbone; the splits and class weights; the training batches; the
classifier; and `--recipe=auto`'s choices.

`tl_keras.cli.job` (training) and `tl_keras.cli.modes` (find_lr, evaluate, predict)
build these the same way from here, so a range test sees the data and model
training would see.
"""

import dataclasses

import keras

from tl_keras import flagfile
from tl_keras.data import pipeline
from tl_keras.data import sources
from tl_keras.model import backbones
from tl_keras.model import classifier as classifier_lib
from tl_keras.training import auto_recipe
from tl_keras.training import distribute
from tl_keras.training import finetune
from tl_keras.training import precision
from tl_keras.training import recipe


def strategy_and_backbone(config):
    """Sets up the strategy, dtype policy and seed, and builds the backbone."""
    strategy = distribute.create_strategy(config.strategy, config.tpu)
    distribute.check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    policy, reason = precision.resolve_mixed_precision(config.mixed_precision)
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(config.seed)
    # First, so that weights that can't load (a file of another architecture,
    # no network) are refused before anything else is printed.
    with strategy.scope():
        backbone = backbones.build_backbone(
            config.backbone, config.image_size, config.weights, config.cut_at
        )
    print(
        f"Strategy: {distribute.describe(strategy)} with {strategy.num_replicas_in_sync} "
        f"replica(s); dtype policy {policy} ({reason}).",
        flush=True,
    )
    cut = "" if config.cut_at is None else (
        f", cut at block {config.cut_at} ({backbone.output.shape[-1]} features)")
    print(f"Backbone: {backbone.name} at {config.image_size}x{config.image_size} px, "
          f"weights {config.weights}{cut}.", flush=True)
    return strategy, backbone


def apply_auto_recipe(config, flagfile_text, splits, given_flags):
    """`--recipe=auto`: prints its choices; returns `config` and `flagfile_text`
    with them."""
    chosen = auto_recipe.auto_recipe(splits.sizes["train"], config, given_flags)
    print("\n".join(chosen.lines), flush=True)
    return (dataclasses.replace(config, **chosen.values),
            flagfile.with_flag_values(flagfile_text, chosen.values))


def training_batches(config, splits, repeat, class_weights=None):
    return pipeline.training_batches(
        splits.train, num_examples=splits.sizes["train"], seed=config.seed,
        repeat=repeat, augment=config.augment, mixup=config.mixup, cutmix=config.cutmix,
        class_weights=class_weights, **pipeline.batch_settings(config, splits),
    )


def load_splits(config):
    # Only balanced weights need the class counts a TFDS dataset doesn't record.
    return sources.load_splits(config,
                               count_train_classes=config.class_weight == "balanced")


def class_weights(config, splits):
    """--class_weight's weight of each class, printed (None for `none`)."""
    if config.class_weight != "balanced":
        return None
    counts = splits.train_class_counts
    weights = recipe.balanced_class_weights(counts)
    print(f"Class weights ({config.class_weight}): "
          f"{recipe.describe_class_weights(weights, counts, splits.class_names)}.",
          flush=True)
    return weights


def build_classifier(config, strategy, backbone, splits):
    """Builds the classifier, and checks `--unfreeze` before phase 1 starts."""
    train_batchnorm = config.batchnorm == "train"
    with strategy.scope():
        classifier = classifier_lib.build_classifier(
            backbone, config.backbone, splits.num_classes, config.image_size,
            config.dropout, config.resize, train_batchnorm=train_batchnorm,
        )
    if config.finetune_epochs:
        # Resolve --unfreeze now, so a bad layer name fails before phase 1.
        finetune.first_unfrozen_layer_index(backbone, config.unfreeze)
        if config.weights == "none" and not train_batchnorm:
            print("Note: --weights=none with --batchnorm=frozen keeps BatchNormalization "
                  "at its initial statistics, which normalise nothing. To train a "
                  "backbone from scratch, pass --batchnorm=train.", flush=True)
    return classifier


def jit_compile(setting):
    return {"auto": "auto", "true": True, "false": False}[setting]
