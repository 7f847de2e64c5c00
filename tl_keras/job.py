"""One training run, start to finish: the stages joined in data-flow order.

data -> pipeline -> model -> train -> evaluate -> export, each a plain function
of the one before. `run.py` calls `run_training` with a `Config`.
"""

import json
import os

import keras

from tl_keras import data
from tl_keras import distribute
from tl_keras import evaluate
from tl_keras import export
from tl_keras import folder
from tl_keras import model as model_lib
from tl_keras import pipeline
from tl_keras import train


def run_training(config, flagfile_text="", verbose="auto"):
    """Trains, evaluates and exports one model as `config` says.

    Everything that can fail on bad input (flags, replicas, dataset, weights,
    `--unfreeze`) is checked before the first training step.

    Args:
        config: a `tl_keras.config.Config`.
        flagfile_text: the effective flags, written to `flags.txt` for reruns.
        verbose: `model.fit`'s verbosity.

    Returns:
        The metrics written to `metrics.json`.
    """
    strategy = distribute.create_strategy(config.strategy)
    distribute.check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    policy, reason = distribute.resolve_mixed_precision(config.mixed_precision)
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(config.seed)
    print(
        f"Strategy: {type(strategy).__name__} with {strategy.num_replicas_in_sync} "
        f"replica(s); dtype policy {policy} ({reason}).",
        flush=True,
    )

    splits = _load_splits(config)
    print(
        f"Dataset {config.dataset}: {splits.num_classes} classes; "
        f"{splits.sizes['train']:,} train, {splits.sizes['validation']:,} validation "
        f"({splits.validation_source}), {splits.sizes['test']:,} test examples.",
        flush=True,
    )
    steps = train.steps_per_epoch(
        splits.sizes["train"], config.batch_size, config.steps_per_epoch
    )
    batching = dict(
        image_shape=splits.image_shape, image_size=config.image_size,
        num_classes=splits.num_classes, batch_size=config.batch_size,
        resize=config.resize,
    )
    train_batches = pipeline.training_batches(
        splits.train, num_examples=splits.sizes["train"], seed=config.seed,
        repeat=config.steps_per_epoch is not None, augment=config.augment,
        mixup=config.mixup, cutmix=config.cutmix, **batching,
    )
    validation_batches = pipeline.evaluation_batches(
        splits.validation, num_examples=splits.sizes["validation"], **batching
    )

    with strategy.scope():
        backbone = model_lib.build_backbone(
            config.backbone, config.image_size, config.weights
        )
        classifier = model_lib.build_classifier(
            backbone, config.backbone, splits.num_classes, config.image_size,
            config.dropout, config.resize,
        )
    if config.finetune_epochs:
        # Resolve --unfreeze now, so a bad layer name fails before phase 1.
        model_lib.first_unfrozen_layer_index(backbone, config.unfreeze)

    paths = train.RunPaths(config.model_dir)
    os.makedirs(config.model_dir, exist_ok=True)
    with open(os.path.join(config.model_dir, "flags.txt"), "w") as file:
        file.write(flagfile_text)
    with open(os.path.join(config.model_dir, "class_names.json"), "w") as file:
        json.dump(list(splits.class_names), file)
    if os.path.exists(paths.history):
        os.remove(paths.history)  # A fresh run starts a fresh timeline.

    validation_by_phase = train.train_two_phases(
        classifier, backbone,
        train_batches=train_batches,
        validation_batches=validation_batches,
        steps_per_epoch=steps,
        phases=train.plan_phases(
            head_epochs=config.head_epochs,
            head_learning_rate=config.head_learning_rate,
            finetune_epochs=config.finetune_epochs,
            finetune_learning_rate=config.finetune_learning_rate,
            warmup_epochs=config.warmup_epochs,
        ),
        unfreeze=config.unfreeze,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        num_classes=splits.num_classes,
        jit_compile=_jit_compile(config.jit_compile),
        scope=strategy.scope,
        paths=paths,
        verbose=verbose,
    )

    test_batches = pipeline.evaluation_batches(
        splits.test, num_examples=splits.sizes["test"], **batching
    )
    test_metrics = evaluate.evaluate(classifier, test_batches, verbose=verbose)
    metrics_path = os.path.join(config.model_dir, "metrics.json")
    evaluate.write_metrics(metrics_path, validation_by_phase, test_metrics)
    print(
        f"Test ({config.test_split}): top-1 {test_metrics['top1']:.2%}, "
        f"top-5 {test_metrics['top5']:.2%}, loss {test_metrics['loss']:.4f}.",
        flush=True,
    )

    export.export_saved_model(classifier, os.path.join(config.model_dir, "saved_model"))
    export.save_keras_model(classifier, os.path.join(config.model_dir, "model.keras"))
    backbone.save_weights(os.path.join(config.model_dir, "backbone.weights.h5"))
    print(f"Wrote saved_model/, model.keras and backbone.weights.h5 to {config.model_dir}.")
    return {"validation": validation_by_phase, "test": test_metrics}


def _load_splits(config):
    if folder.is_folder_dataset(config.dataset):
        return folder.load_folder(
            config.dataset, val_fraction=config.val_fraction, seed=config.seed,
            strict=config.strict_data, classes=config.classes,
            train_examples_per_class=config.train_examples_per_class,
        )
    return data.load_tfds(
        config.dataset, config.data_dir, config.train_split, config.val_split,
        config.test_split, config.val_fraction, classes=config.classes,
        train_examples_per_class=config.train_examples_per_class, seed=config.seed,
    )


def _jit_compile(setting):
    return {"auto": "auto", "true": True, "false": False}[setting]
