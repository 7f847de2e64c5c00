"""The run modes, start to finish: the stages joined in data-flow order.

Training is sources -> pipeline -> backbones -> classifier -> recipe -> train
-> evaluate -> export, each a plain function of the one before. `run.py`
calls one function per `--mode`.
"""

import dataclasses
import json
import os
import shlex

import keras

from tl_keras import backbones
from tl_keras import callbacks
from tl_keras import classifier as classifier_lib
from tl_keras import distribute
from tl_keras import evaluate
from tl_keras import export
from tl_keras import features
from tl_keras import finetune
from tl_keras import monitor
from tl_keras import pipeline
from tl_keras import plots
from tl_keras import precision
from tl_keras import predict
from tl_keras import recipe
from tl_keras import rundir
from tl_keras import sources
from tl_keras import train


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
        tl_keras.errors.Preempted: on SIGTERM, after saving a backup (on one
            machine; see `tl_keras.train.train_two_phases`).
    """
    strategy, backbone = _strategy_and_backbone(config)
    role = distribute.worker_role(strategy)
    config = _this_workers_config(config, role)
    with rundir.claim(config.model_dir, flagfile_text, overwrite) as state:
        if role.num_workers > 1:
            state = distribute.agreed_state(strategy, role, config.model_dir, state)
        if state == rundir.COMPLETE:
            return _already_complete(config, role)
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


def _strategy_and_backbone(config):
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
            config.backbone, config.image_size, config.weights
        )
    print(
        f"Strategy: {distribute.describe(strategy)} with {strategy.num_replicas_in_sync} "
        f"replica(s); dtype policy {policy} ({reason}).",
        flush=True,
    )
    print(f"Backbone: {backbone.name} at {config.image_size}x{config.image_size} px, "
          f"weights {config.weights}.", flush=True)
    return strategy, backbone


def _this_workers_config(config, role):
    """`config`, with a folder of its own for a worker that isn't the chief."""
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
    return config


def _already_complete(config, role):
    print(f"{config.model_dir} holds a complete run; nothing to do. Pass "
          f"--overwrite to train it again from scratch.", flush=True)
    if not role.is_chief:
        # The chief's run is complete, whatever a kill left here.
        rundir.mark_complete(config.model_dir)
        rundir.discard_worker_outputs(config.model_dir)
        return {}
    with open(rundir.RunPaths(config.model_dir).metrics) as file:
        return json.load(file)


def _train_evaluate_export(config, strategy, role, backbone, flagfile_text, state,
                           verbose):
    splits = sources.load_splits(config)
    steps = recipe.training_steps_per_epoch(
        splits.sizes["train"], config.batch_size, config.steps_per_epoch
    )
    train_batches = pipeline.training_batches(
        splits.train, num_examples=splits.sizes["train"], seed=config.seed,
        repeat=config.steps_per_epoch is not None, augment=config.augment,
        mixup=config.mixup, cutmix=config.cutmix, **pipeline.batch_settings(config, splits),
    )
    validation_batches = pipeline.split_batches(config, splits, "validation")
    classifier = _classifier(config, strategy, backbone, splits)

    paths = rundir.RunPaths(config.model_dir)
    if state == rundir.FRESH:
        with open(paths.flags, "w") as file:
            file.write(flagfile_text)
    with open(paths.class_names, "w") as file:
        json.dump(list(splits.class_names), file)
    run_log = monitor.RunLog(paths.tensorboard)
    run_log.hparams(config)
    run_log.training_inputs(train_batches, splits.class_names)

    phases = _plan_phases(config)
    timers = {phase.name: callbacks.PhaseTimer() for phase in phases}
    validation_by_phase = train.train_two_phases(
        classifier, backbone,
        train_batches=train_batches,
        validation_batches=validation_batches,
        steps_per_epoch=steps,
        phases=phases,
        unfreeze=config.unfreeze,
        train_batchnorm=config.batchnorm == "train",
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        num_classes=splits.num_classes,
        jit_compile=_jit_compile(config.jit_compile),
        scope=strategy.scope,
        paths=paths,
        layer_decay=config.layer_decay,
        ema=config.ema,
        early_stopping=config.early_stopping,
        phase_callbacks=lambda phase: [
            timers[phase.name],
            monitor.PhaseMonitor(run_log, phase, steps, validation_batches,
                                 splits.class_names, classifier)],
        profile_batches=config.profile_batches,
        cached_features=(
            (lambda: _cache_features(config, classifier, splits, paths))
            if config.cache_features else None
        ),
        backup_on_preemption=role.num_workers == 1,
        verbose=verbose,
    )
    plots.write_training_curves(paths.history, paths.training_curves, config.head_epochs)
    return _evaluate_and_export(
        config, strategy, role, classifier, backbone, splits, phases, paths, run_log,
        timers, train_batches, validation_batches, validation_by_phase)


def _classifier(config, strategy, backbone, splits):
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


def _plan_phases(config):
    """The two phases, their learning rates scaled as --lr_scaling says."""
    scale = recipe.learning_rate_scale(config.batch_size, config.lr_scaling)
    if scale != 1:
        print(f"Learning rates scaled linearly to the global batch of {config.batch_size} "
              f"(x{scale:g} of their values for {recipe.LINEAR_SCALING_REFERENCE_BATCH}): "
              f"head {config.head_learning_rate * scale:g}, fine-tuning "
              f"{config.finetune_learning_rate * scale:g}.", flush=True)
    return recipe.plan_phases(
        head_epochs=config.head_epochs,
        head_learning_rate=config.head_learning_rate * scale,
        finetune_epochs=config.finetune_epochs,
        finetune_learning_rate=config.finetune_learning_rate * scale,
        warmup_epochs=config.warmup_epochs,
    )


def _cache_features(config, classifier, splits, paths):
    return features.cache_features(
        classifier, batches_of=lambda split: pipeline.split_batches(config, splits, split),
        sizes=splits.sizes, num_classes=splits.num_classes,
        batch_size=config.batch_size, seed=config.seed, directory=paths.features)


def _evaluate_and_export(config, strategy, role, classifier, backbone, splits, phases,
                         paths, run_log, timers, train_batches, validation_batches,
                         validation_by_phase):
    """After training: restores the weights to export, evaluates them on the
    test split, writes every artifact from them, and prints the summary."""
    with strategy.scope():
        exported = train.restore_export_weights(
            classifier, backbone, config.export_weights, phases=phases, paths=paths,
            unfreeze=config.unfreeze, train_batchnorm=config.batchnorm == "train",
            label_smoothing=config.label_smoothing, train_batches=train_batches,
            validation_batches=validation_batches)
    print(f"Evaluating and exporting the {_describe_export(exported)}.", flush=True)
    # Served on CPUs too: whatever the training dtype policy, everything from
    # here on computes in float32, so the test metrics are the export's own.
    model = classifier_lib.float32_copy(classifier)
    test_metrics, test = _test(config, model, splits, paths, run_log,
                               validation_by_phase, exported)
    export.write_artifacts(model, backbone.name, paths, class_names=splits.class_names,
                           image_size=config.image_size, resize=config.resize)
    metrics = {"validation": validation_by_phase, "test": test_metrics, "exported": exported}
    if config.export_tflite:
        tflite = _export_tflite(config, model, splits, paths, test)
        if tflite:
            evaluate.add_to_metrics(paths.metrics, "tflite", tflite)
            metrics["tflite"] = tflite
    if role.is_chief:
        print(_summary(config, test_metrics, exported, phases, timers, splits))
    return metrics


def _export_tflite(config, model, splits, paths, test):
    """Writes model.tflite as --tflite_quantization says, with its labels file;
    returns its metrics.json entry, or None when the converter failed."""
    calibration = ()
    if config.tflite_quantization == "int8":
        calibration = pipeline.sample_images(
            splits.train, num_examples=splits.sizes["train"],
            count=export.TFLITE_CALIBRATION_IMAGES, seed=config.seed,
            image_size=config.image_size, resize=config.resize)
    return export.export_checked_tflite(
        model, paths.tflite, image_size=config.image_size, resize=config.resize,
        quantization=config.tflite_quantization, max_drop=config.tflite_max_drop,
        class_names=splits.class_names, labels_path=paths.tflite_labels,
        representative_images=calibration, test_images=test.first_images,
        test_labels=test.first_labels, float_predicted=test.first_predicted,
        test_examples=splits.sizes["test"],
        load_serving=lambda: predict.load_serving(config.model_dir))


def _test(config, model, splits, paths, run_log, validation_by_phase, exported):
    """Evaluates the exported weights on the test split; writes metrics.json.

    Returns:
        (the test metrics, the `tl_keras.evaluate.TestResults`, whose first
        images the TFLite checks use).
    """
    test = evaluate.evaluate_test_split(
        model, pipeline.split_batches(config, splits, "test"), splits.class_names,
        keep_images=export.TFLITE_ACCURACY_IMAGES if config.export_tflite else 0)
    test_metrics = evaluate.summary(test.report)
    evaluate.write_metrics(paths.metrics, validation_by_phase, test_metrics, exported)
    last_epoch = config.head_epochs + config.finetune_epochs - 1
    run_log.final_metrics({f"test_{k}": v for k, v in test_metrics.items()}, last_epoch)
    run_log.worst_mistakes(test.mistakes, splits.class_names, last_epoch)
    print(
        f"Test ({config.test_split}): top-1 {test_metrics['top1']:.2%}, "
        f"top-5 {test_metrics['top5']:.2%}, NLL {test_metrics['nll']:.4f}.",
        flush=True,
    )
    return test_metrics, test


def _summary(config, test_metrics, exported, phases, timers, splits):
    """The run's last lines: results, time, outputs, and where to look next."""
    run = shlex.quote(config.model_dir)
    paths = rundir.RunPaths(config.model_dir)
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
    tflite = (f"{rundir.TFLITE_FILE}, {rundir.TFLITE_LABELS_FILE}, "
              if config.export_tflite and os.path.isfile(paths.tflite) else "")
    lines += [
        f"Outputs in {config.model_dir}: {rundir.SAVED_MODEL_DIR}/, "
        f"{rundir.KERAS_MODEL_FILE}, {tflite}{rundir.METRICS_FILE}, {rundir.HISTORY_FILE}, "
        f"{rundir.PLOTS_DIR}/, {rundir.TENSORBOARD_DIR}/.",
        "Look further:",
        f"  tensorboard --logdir {shlex.quote(paths.tensorboard)}",
        f"  python run.py --mode=evaluate --model_dir={run}",
        f"  python run.py --mode=predict --model_dir={run} --images=PATH",
        f"  saved_model_cli show --dir {shlex.quote(paths.saved_model)} --all",
    ]
    return "\n".join(lines)


def _describe_export(exported):
    which = ("best validation top-1" if exported["weights"] == train.EXPORT_BEST
             else "last epoch")
    return (f"weights of epoch {exported['epoch']} ({exported['phase']} phase; "
            f"--export_weights={exported['weights']}: {which} "
            f"{exported['validation']['top1']:.2%})")


def run_evaluation(config, split):
    """Evaluates a finished run's SavedModel on one split and writes the report.

    Args:
        config: the run's own configuration (from its `flags.txt`).
        split: `train`, `validation` or `test`.

    Returns:
        The report from `tl_keras.evaluate.classification_report`.
    """
    serving = predict.load_serving(config.model_dir)
    splits = sources.load_splits(config)
    batches = pipeline.split_batches(config, splits, split)
    probabilities, labels = evaluate.predictions_and_labels(
        batches, predict.serving_predictor(serving))
    report = evaluate.classification_report(probabilities, labels, splits.class_names)
    directory = rundir.RunPaths(config.model_dir).evaluation
    evaluate.write_evaluation(directory, report, split)
    print(evaluate.format_report(report, split))
    print(f"\nWrote metrics.json, per_class.csv and confusion_matrix.png to {directory}.")
    return report


def run_prediction(model, images, top_k, output, resize="stretch"):
    """Predicts the top-k classes of image files with a finished run's
    SavedModel, or with a `.tflite` file and the labels file beside it.

    Args:
        model: a run folder, or a `.tflite` file.
        resize: for a `.tflite` file, how images are brought to its size: the
            run's `--resize`.

    Returns:
        The predictions, as written by `tl_keras.predict.predict_files`.
    """
    if model.endswith(".tflite"):
        classify, class_names = predict.load_tflite(model, resize)
    else:
        classify = predict.serving_bytes_classifier(predict.load_serving(model))
        with open(rundir.RunPaths(model).class_names) as file:
            class_names = json.load(file)
    return predict.predict_files(classify, images, class_names, top_k, output)


def _jit_compile(setting):
    return {"auto": "auto", "true": True, "false": False}[setting]
