"""The run modes, start to finish: the stages joined in data-flow order.

Training is data -> pipeline -> model -> train -> evaluate -> export, each a
plain function of the one before. `run.py` calls one function per `--mode`.
"""

import csv
import dataclasses
import json
import os
import shlex

import keras
import numpy as np

from tl_keras import backbones
from tl_keras import classifier as classifier_lib
from tl_keras import console
from tl_keras import data
from tl_keras import distribute
from tl_keras import evaluate
from tl_keras import export
from tl_keras import features
from tl_keras import finetune
from tl_keras import folder
from tl_keras import monitor
from tl_keras import pipeline
from tl_keras import plots
from tl_keras import precision
from tl_keras import predict
from tl_keras import progress
from tl_keras import recipe
from tl_keras import rundir
from tl_keras import train
from tl_keras.errors import UsageError

CLASS_NAMES_FILE = "class_names.json"


def run_training(config, flagfile_text="", verbose="auto", overwrite=False):
    """Trains, evaluates and exports one model as `config` says.

    Everything that can fail on bad input (flags, replicas, dataset, weights,
    `--unfreeze`) is checked before the first training step.

    Args:
        config: a `tl_keras.config.Config`.
        flagfile_text: the effective flags, written to `flags.txt` for reruns.
        verbose: `model.fit`'s verbosity.
        overwrite: start afresh in a `--model_dir` that holds an earlier run.

    Returns:
        The metrics written to `metrics.json`.

    Raises:
        UsageError: for bad input, found before training starts.
        tl_keras.train.Preempted: on SIGTERM, after saving a backup (on one
            machine; see `tl_keras.train.train_two_phases`).
    """
    strategy = distribute.create_strategy(config.strategy, config.tpu)
    distribute.check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    policy, reason = precision.resolve_mixed_precision(config.mixed_precision)
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(config.seed)
    # First, so that weights that can't load (a file of another architecture,
    # no network) are refused before anything else is printed.
    with strategy.scope():
        backbone = backbones.build_backbone(
            config.backbone, config.image_size, config.weights
        )
    print(
        f"Strategy: {distribute.describe(strategy)} with {strategy.num_replicas_in_sync} "
        f"replica(s); dtype policy {policy} ({reason}).",
        flush=True,
    )
    print(f"Backbone: {backbone.name} at {config.image_size}x{config.image_size} px, "
          f"weights {config.weights}.", flush=True)
    role = distribute.worker_role(strategy)
    if role.num_workers > 1 and role.is_chief:
        print(f"The chief writes the run's outputs to {config.model_dir}; the other "
              f"workers write to places of their own under it and delete them at the end.",
              flush=True)
    if not role.is_chief:
        # Every worker runs every step and save, in sync; only the chief's
        # outputs are the run's.
        config = dataclasses.replace(
            config, model_dir=rundir.worker_dir(config.model_dir, role.name))
        print(f"The chief writes the run's outputs; this worker writes to "
              f"{config.model_dir} and deletes it at the end.", flush=True)

    with rundir.claim(config.model_dir, flagfile_text, overwrite) as state:
        if role.num_workers > 1:
            state = _agreed_state(strategy, role, config.model_dir, state)
        if state == rundir.COMPLETE:
            print(f"{config.model_dir} holds a complete run; nothing to do. Pass "
                  f"--overwrite to train it again from scratch.", flush=True)
            if not role.is_chief:
                # The chief's run is complete, whatever a kill left here.
                rundir.mark_complete(config.model_dir)
                rundir.discard_worker_outputs(config.model_dir)
                return {}
            with open(os.path.join(config.model_dir, "metrics.json")) as file:
                return json.load(file)
        if state == rundir.RESUME:
            print(f"Resuming the interrupted run in {config.model_dir}.", flush=True)
        else:
            print(f"Run folder: {config.model_dir}", flush=True)
        metrics = _train_evaluate_export(config, strategy, role, backbone, flagfile_text,
                                         state, verbose)
        rundir.mark_complete(config.model_dir)
        if not role.is_chief:
            rundir.discard_worker_outputs(config.model_dir)
        return metrics


def _agreed_state(strategy, role, model_dir, state):
    """The state every worker of a multi-worker run goes on with.

    A collective: each worker tells the others whether it is the chief, whether
    its folder holds a complete run, and where it would resume. The chief's
    word on completion holds for all. Otherwise every worker must resume where
    the chief does: a kill can land between two workers' end-of-epoch saves,
    and workers resumed from different epochs would wait on each other forever.

    Returns:
        `rundir.COMPLETE` when the chief's run is complete, else `state`.

    Raises:
        UsageError: on every worker, when they would resume from different places.
    """
    position = [int(state == rundir.COMPLETE),
                *train.resume_position(train.RunPaths(model_dir))]
    rows = distribute.gather_from_workers(strategy, [int(role.is_chief), *position])
    chief = next(row[1:] for row in rows if row[0])
    if chief[0]:
        return rundir.COMPLETE
    if any(row[1:] != chief for row in rows):
        raise UsageError(
            f"The workers' folders disagree about where to resume ({role.name}'s "
            f"{model_dir} says {position}, the chief's {chief}): a kill landed between "
            f"their saves. Rerun every worker with --overwrite to start afresh.")
    return state


def _train_evaluate_export(config, strategy, role, backbone, flagfile_text, state,
                           verbose):
    splits = load_splits(config)
    steps = recipe.training_steps_per_epoch(
        splits.sizes["train"], config.batch_size, config.steps_per_epoch
    )
    train_batches = pipeline.training_batches(
        splits.train, num_examples=splits.sizes["train"], seed=config.seed,
        repeat=config.steps_per_epoch is not None, augment=config.augment,
        mixup=config.mixup, cutmix=config.cutmix, **_batching(config, splits),
    )
    validation_batches = evaluation_batches(config, splits, "validation")

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

    paths = train.RunPaths(config.model_dir)
    if state == rundir.FRESH:
        with open(os.path.join(config.model_dir, rundir.FLAGS_FILE), "w") as file:
            file.write(flagfile_text)
    with open(os.path.join(config.model_dir, CLASS_NAMES_FILE), "w") as file:
        json.dump(list(splits.class_names), file)

    run_log = monitor.RunLog(paths.tensorboard)
    run_log.hparams(_hparams(config))
    run_log.training_inputs(train_batches, splits.class_names)
    scale = recipe.learning_rate_scale(config.batch_size, config.lr_scaling)
    if scale != 1:
        print(f"Learning rates scaled linearly to the global batch of {config.batch_size} "
              f"(x{scale:g} of their values for {recipe.LINEAR_SCALING_REFERENCE_BATCH}): "
              f"head {config.head_learning_rate * scale:g}, fine-tuning "
              f"{config.finetune_learning_rate * scale:g}.", flush=True)
    phases = recipe.plan_phases(
        head_epochs=config.head_epochs,
        head_learning_rate=config.head_learning_rate * scale,
        finetune_epochs=config.finetune_epochs,
        finetune_learning_rate=config.finetune_learning_rate * scale,
        warmup_epochs=config.warmup_epochs,
    )
    timers = {phase.name: train.PhaseTimer() for phase in phases}
    validation_by_phase = train.train_two_phases(
        classifier, backbone,
        train_batches=train_batches,
        validation_batches=validation_batches,
        steps_per_epoch=steps,
        phases=phases,
        unfreeze=config.unfreeze,
        train_batchnorm=train_batchnorm,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        num_classes=splits.num_classes,
        jit_compile=_jit_compile(config.jit_compile),
        scope=strategy.scope,
        paths=paths,
        phase_callbacks=lambda phase: [
            timers[phase.name],
            monitor.PhaseMonitor(run_log, phase, steps, validation_batches,
                                 splits.class_names, classifier)],
        profile_batches=config.profile_batches,
        cached_features=(
            (lambda: features.cache_features(
                classifier, batches_of=lambda split: evaluation_batches(config, splits, split),
                sizes=splits.sizes, num_classes=splits.num_classes,
                batch_size=config.batch_size, seed=config.seed,
                directory=os.path.join(config.model_dir, "features")))
            if config.cache_features else None
        ),
        backup_on_preemption=role.num_workers == 1,
        verbose=verbose,
    )
    _write_training_curves(paths, config.head_epochs)
    return _evaluate_and_export(
        config, strategy, role, classifier, backbone, splits, phases, paths, run_log,
        timers, train_batches, validation_batches, validation_by_phase)


def _evaluate_and_export(config, strategy, role, classifier, backbone, splits, phases,
                         paths, run_log, timers, train_batches, validation_batches,
                         validation_by_phase):
    """After training: restores the weights to export, evaluates them on the
    test split, writes every artifact from them, and prints the summary."""
    train_batchnorm = config.batchnorm == "train"
    with strategy.scope():
        exported = train.restore_export_weights(
            classifier, backbone, config.export_weights, phases=phases, paths=paths,
            unfreeze=config.unfreeze, train_batchnorm=train_batchnorm,
            label_smoothing=config.label_smoothing, train_batches=train_batches,
            validation_batches=validation_batches)
    print(f"Evaluating and exporting the {_describe_export(exported)}.", flush=True)
    # Served on CPUs too: whatever the training dtype policy, everything from
    # here on computes in float32, so the test metrics are the export's own.
    model = classifier_lib.float32_copy(classifier)

    test_batches = evaluation_batches(config, splits, "test")
    test = _evaluate_test_split(model, test_batches, splits.class_names,
                                keep_images=TFLITE_CHECK_IMAGES if config.export_tflite else 0)
    test_metrics = evaluate.summary(test.report)
    evaluate.write_metrics(os.path.join(config.model_dir, "metrics.json"),
                           validation_by_phase, test_metrics, exported)
    last_epoch = config.head_epochs + config.finetune_epochs - 1
    run_log.final_metrics({f"test_{k}": v for k, v in test_metrics.items()}, last_epoch)
    _log_worst_mistakes(run_log, test.mistakes, splits.class_names, last_epoch)
    print(
        f"Test ({config.test_split}): top-1 {test_metrics['top1']:.2%}, "
        f"top-5 {test_metrics['top5']:.2%}, NLL {test_metrics['nll']:.4f}.",
        flush=True,
    )

    files = "saved_model/, model.keras and backbone.weights.h5"
    with progress.step(f"Exporting {files}", total=3, unit="file") as exporting:
        export.export_saved_model(
            model, os.path.join(config.model_dir, "saved_model"),
            class_names=splits.class_names, image_size=config.image_size,
            resize=config.resize,
        )
        exporting.advance()
        export.save_keras_model(model, os.path.join(config.model_dir, "model.keras"))
        exporting.advance()
        model.get_layer(backbone.name).save_weights(
            os.path.join(config.model_dir, "backbone.weights.h5"))
        exporting.advance()
        exporting.result = f"Wrote {files} to {config.model_dir}"
    if config.export_tflite:
        _export_checked_tflite(model, config, test.first_images)
    if role.is_chief:
        print(_summary(config, test_metrics, exported, phases, timers, splits))
    return {"validation": validation_by_phase, "test": test_metrics, "exported": exported}


def _summary(config, test_metrics, exported, phases, timers, splits):
    """The run's last lines: results, time, outputs, and where to look next."""
    run = shlex.quote(config.model_dir)
    lines = [
        "",
        f"Done. Test ({config.test_split}, {splits.sizes['test']:,} images): top-1 "
        f"{test_metrics['top1']:.2%}, top-5 {test_metrics['top5']:.2%}.",
        f"Exported the {_describe_export(exported)}.",
    ]
    for phase in phases:
        timer = timers[phase.name]
        if not phase.epochs:
            continue
        if not timer.steps:
            lines.append(f"Phase {phase.name}: trained by an earlier run of this command.")
            continue
        speed = timer.steps * config.batch_size / max(timer.training_seconds, 1e-9)
        lines.append(f"Phase {phase.name}: {timer.seconds:.1f} s, training at "
                     f"{speed:,.0f} images/s.")
    lines += [
        f"Outputs in {config.model_dir}: saved_model/, model.keras, metrics.json, "
        f"history.csv, plots/, tensorboard/.",
        "Look further:",
        f"  tensorboard --logdir {shlex.quote(os.path.join(config.model_dir, 'tensorboard'))}",
        f"  python run.py --mode=evaluate --model_dir={run}",
        f"  python run.py --mode=predict --model_dir={run} --images=PATH",
        f"  saved_model_cli show --dir {shlex.quote(os.path.join(config.model_dir, 'saved_model'))} --all",
    ]
    return "\n".join(lines)


def _describe_export(exported):
    which = ("best validation top-1" if exported["weights"] == train.EXPORT_BEST
             else "last epoch")
    return (f"weights of epoch {exported['epoch']} ({exported['phase']} phase; "
            f"--export_weights={exported['weights']}: {which} "
            f"{exported['validation']['top1']:.2%})")


@dataclasses.dataclass(frozen=True)
class _TestResults:
    report: dict
    mistakes: object
    first_images: list


def _evaluate_test_split(model, batches, class_names, keep_images):
    """Evaluates on the test split in one pass, keeping what the worst-mistakes
    grid and the TFLite check need, so neither reads it again."""
    mistakes = evaluate.MostConfidentMistakes()
    first_images = []

    def keep(images, probabilities, labels):
        mistakes.add(images, probabilities, labels)
        first_images.extend(images[:keep_images - len(first_images)])

    probabilities, labels = evaluate.predictions_and_labels(
        batches, monitor.predict_batch(model), on_batch=keep)
    return _TestResults(
        report=evaluate.classification_report(probabilities, labels, class_names),
        mistakes=mistakes, first_images=first_images)


def run_evaluation(config, split):
    """Evaluates a finished run's SavedModel on one split and writes the report.

    Args:
        config: the run's own configuration (from its `flags.txt`).
        split: `train`, `validation` or `test`.

    Returns:
        The report from `tl_keras.evaluate.classification_report`.
    """
    serving = predict.load_serving(config.model_dir)
    splits = load_splits(config)
    batches = evaluation_batches(config, splits, split)
    probabilities, labels = evaluate.predictions_and_labels(
        batches, predict.predict_batch(serving))
    report = evaluate.classification_report(probabilities, labels, splits.class_names)
    directory = os.path.join(config.model_dir, "evaluation")
    evaluate.write_evaluation(directory, report, split)
    print(evaluate.format_report(report, split))
    print(f"\nWrote metrics.json, per_class.csv and confusion_matrix.png to {directory}.")
    return report


def run_prediction(model_dir, images, top_k, output):
    """Predicts the top-k classes of image files with a finished run's SavedModel.

    Returns:
        The predictions, as written by `tl_keras.predict.predict_files`.
    """
    serving = predict.load_serving(model_dir)
    with open(os.path.join(model_dir, CLASS_NAMES_FILE)) as file:
        class_names = json.load(file)
    return predict.predict_files(serving, images, class_names, top_k, output)


def load_splits(config):
    """The run's examples, from a TFDS dataset or an image folder."""
    if folder.is_folder_dataset(config.dataset):
        splits = folder.load_folder(
            config.dataset, image_size=config.image_size, resize=config.resize,
            val_fraction=config.val_fraction, seed=config.seed,
            strict=config.strict_data, classes=config.classes,
            train_examples_per_class=config.train_examples_per_class,
        )
    else:
        splits = data.load_tfds(
            config.dataset, config.data_dir, config.train_split, config.val_split,
            config.test_split, config.val_fraction, classes=config.classes,
            train_examples_per_class=config.train_examples_per_class, seed=config.seed,
            strict=config.strict_data,
        )
    print(
        f"Dataset {config.dataset}: {splits.num_classes} classes; "
        f"{splits.sizes['train']:,} train, {splits.sizes['validation']:,} validation "
        f"({splits.validation_source}), {splits.sizes['test']:,} test examples.",
        flush=True,
    )
    return splits


def evaluation_batches(config, splits, split):
    """Batches of one split, every example once, in order."""
    if split not in splits.sizes:
        raise UsageError(f"--split={split}: pass train, validation or test.")
    return pipeline.evaluation_batches(
        getattr(splits, split), num_examples=splits.sizes[split], **_batching(config, splits)
    )


def _batching(config, splits):
    return dict(
        image_shape=splits.image_shape, image_size=config.image_size,
        num_classes=splits.num_classes, batch_size=config.batch_size,
        resize=config.resize,
    )


def _hparams(config):
    """The configuration as HParams values: strings, numbers and booleans only."""
    values = {}
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        values[name] = "" if value is None else value
    return values


def _write_training_curves(paths, head_epochs):
    if not os.path.exists(paths.history):
        return
    with open(paths.history, newline="") as file:
        rows = list(csv.DictReader(file))
    os.makedirs(os.path.dirname(paths.training_curves), exist_ok=True)
    with open(paths.training_curves, "wb") as file:
        file.write(plots.training_curves(rows, head_epochs))


def _log_worst_mistakes(run_log, mistakes, class_names, step):
    if not mistakes.kept:
        return
    titles = [
        f"true {class_names[mistake.label]}\npredicted {class_names[mistake.predicted]} "
        f"({mistake.confidence:.0%})"
        for mistake in mistakes.kept
    ]
    run_log.image("test_worst_mistakes",
                  plots.image_grid([mistake.image for mistake in mistakes.kept], titles),
                  step=step, description="The most confident wrong test predictions.")


# The TFLite model must give the SavedModel's probabilities within this, on
# this many test images.
TFLITE_TOLERANCE = 1e-4
TFLITE_CHECK_IMAGES = 32


def _export_checked_tflite(model, config, test_images):
    path = os.path.join(config.model_dir, "model.tflite")
    with progress.step("Converting to model.tflite and checking it", total=2,
                       unit="part") as converting, console.native_chatter_dropped():
        problem = export.export_tflite(model, path, config.image_size)
        converting.advance()
        if problem:
            converting.result = f"Skipped the TFLite export: the converter failed ({problem})"
            return
        sized = np.stack([
            pipeline.resize_uint8(image, config.image_size, config.resize).numpy()
            for image in test_images
        ])
        difference = export.tflite_max_difference(
            path, predict.load_serving(config.model_dir), sized)
        converting.advance()
        verdict = "within" if difference <= TFLITE_TOLERANCE else "NOT within"
        converting.result = (
            f"Wrote model.tflite: on {len(sized)} test images its probabilities are "
            f"{verdict} {TFLITE_TOLERANCE:g} of the SavedModel's (largest difference "
            f"{difference:.2e})")
    if difference > TFLITE_TOLERANCE:
        raise RuntimeError(f"model.tflite differs from the SavedModel by {difference:.2e}.")


def _jit_compile(setting):
    return {"auto": "auto", "true": True, "false": False}[setting]
