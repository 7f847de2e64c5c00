"""The run modes, start to finish: the stages joined in data-flow order.

Training is sources -> pipeline -> backbones -> classifier -> recipe -> train
-> evaluate -> export, each a plain function of the one before. `run.py`
calls one function per `--mode`; `--mode=find_lr` builds the data and model
as training does and runs `tl_keras.lr_finder` on them.
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
from tl_keras import gradcam
from tl_keras import lr_finder
from tl_keras import monitor
from tl_keras import pipeline
from tl_keras import plots
from tl_keras import precision
from tl_keras import predict
from tl_keras import recipe
from tl_keras import rundir
from tl_keras import sources
from tl_keras import train
from tl_keras.errors import UsageError


def run_training(config, flagfile_text="", verbose="auto", overwrite=False,
                 given_flags=frozenset()):
    """Trains, evaluates and exports one model as `config` says.

    Everything that can fail on bad input (flags, replicas, dataset, weights,
    `--unfreeze`) is checked before the first training step.

    Args:
        config: a `tl_keras.config.Config`.
        flagfile_text: the effective flags, written to `flags.txt` for reruns.
        verbose: `model.fit`'s verbosity.
        overwrite: start afresh in a `--model_dir` that holds an earlier run.
        given_flags: the options given explicitly, which `--recipe=auto` keeps.

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
    splits = None
    if config.recipe == "auto":
        # Its choices depend on the training set's size and go into flags.txt,
        # which a rerun's flags must match to resume: so the data is read
        # before the folder is claimed, and a rerun on the same data resumes.
        splits = _load_splits(config)
        config, flagfile_text = _auto_recipe(config, flagfile_text, splits, given_flags)
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
                                         state, verbose, splits)
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


def _auto_recipe(config, flagfile_text, splits, given_flags):
    """`--recipe=auto`: prints its choices; returns `config` and `flagfile_text`
    with them."""
    chosen = recipe.auto_recipe(splits.sizes["train"], config, given_flags)
    print("\n".join(chosen.lines), flush=True)
    return (dataclasses.replace(config, **chosen.values),
            rundir.with_flag_values(flagfile_text, chosen.values))


def _train_evaluate_export(config, strategy, role, backbone, flagfile_text, state,
                           verbose, splits=None):
    splits = splits or _load_splits(config)
    class_weights = _class_weights(config, splits)
    steps = recipe.training_steps_per_epoch(
        splits.sizes["train"], config.batch_size, config.steps_per_epoch
    )
    train_batches = _training_batches(config, splits,
                                      repeat=config.steps_per_epoch is not None,
                                      class_weights=class_weights)
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
            (lambda: _cache_features(config, classifier, splits, paths, class_weights))
            if config.cache_features else None
        ),
        backup_on_preemption=role.num_workers == 1,
        verbose=verbose,
    )
    plots.write_training_curves(paths.history, paths.training_curves, config.head_epochs)
    return _evaluate_and_export(
        config, strategy, role, classifier, backbone, splits, phases, paths, run_log,
        timers, train_batches, validation_batches, validation_by_phase)


def _training_batches(config, splits, repeat, class_weights=None):
    return pipeline.training_batches(
        splits.train, num_examples=splits.sizes["train"], seed=config.seed,
        repeat=repeat, augment=config.augment, mixup=config.mixup, cutmix=config.cutmix,
        class_weights=class_weights, **pipeline.batch_settings(config, splits),
    )


def _load_splits(config):
    # Only balanced weights need the class counts a TFDS dataset doesn't record.
    return sources.load_splits(config,
                               count_train_classes=config.class_weight == "balanced")


def _class_weights(config, splits):
    """--class_weight's weight of each class, printed (None for `none`)."""
    if config.class_weight != "balanced":
        return None
    counts = splits.train_class_counts
    weights = recipe.balanced_class_weights(counts)
    print(f"Class weights ({config.class_weight}): "
          f"{recipe.describe_class_weights(weights, counts, splits.class_names)}.",
          flush=True)
    return weights


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


def _cache_features(config, classifier, splits, paths, class_weights):
    return features.cache_features(
        classifier, batches_of=lambda split: pipeline.split_batches(config, splits, split),
        sizes=splits.sizes, num_classes=splits.num_classes,
        batch_size=config.batch_size, seed=config.seed, directory=paths.features,
        class_weights=class_weights)


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
    if test.tta_report:
        metrics["test_tta_flip"] = evaluate.summary(test.tta_report)
    if config.export_tflite:
        tflite = _export_tflite(config, model, splits, paths, test)
        if tflite:
            evaluate.add_to_metrics(paths.metrics, "tflite", tflite)
            metrics["tflite"] = tflite
    _log_gradcam(model, test.examples, splits.class_names, run_log,
                 step=config.head_epochs + config.finetune_epochs - 1)
    if role.is_chief:
        print(_summary(config, metrics, exported, phases, timers, splits))
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
    """Evaluates the exported weights on the test split (with --tta=flip, their
    mirror-averaged predictions too); writes metrics.json.

    Returns:
        (the test metrics, the `tl_keras.evaluate.TestResults`, whose first
        images the TFLite checks use).
    """
    test = evaluate.evaluate_test_split(
        model, pipeline.split_batches(config, splits, "test"), splits.class_names,
        keep_images=export.TFLITE_ACCURACY_IMAGES if config.export_tflite else 0,
        tta=config.tta)
    test_metrics = evaluate.summary(test.report)
    tta_metrics = evaluate.summary(test.tta_report) if test.tta_report else None
    evaluate.write_metrics(paths.metrics, validation_by_phase, test_metrics, exported,
                           test_tta=tta_metrics)
    last_epoch = config.head_epochs + config.finetune_epochs - 1
    final = {f"test_{k}": v for k, v in test_metrics.items()}
    final.update({f"test_tta_flip_{k}": v for k, v in (tta_metrics or {}).items()})
    run_log.final_metrics(final, last_epoch)
    flipped = f"; with --tta=flip, {evaluate.headline(tta_metrics)}" if tta_metrics else ""
    print(f"Test ({config.test_split}): {evaluate.headline(test_metrics)}{flipped}.",
          flush=True)
    return test_metrics, test


def _log_gradcam(model, examples, class_names, run_log, step):
    """Sends the test split's Grad-CAM grid to TensorBoard. After the exports,
    since the models Grad-CAM builds share (and add calls to) the model's layers."""
    if not examples.kept:
        return
    try:
        explainer = gradcam.GradCam(model)
    except UsageError as refusal:
        # A backend without gradients here; every other output is written.
        print(f"Note: no Grad-CAM grid in TensorBoard. {refusal}", flush=True)
        return
    run_log.gradcam(gradcam.grid(explainer, examples.kept, class_names), step)


def _summary(config, metrics, exported, phases, timers, splits):
    """The run's last lines: results, time, outputs, and where to look next."""
    run = shlex.quote(config.model_dir)
    paths = rundir.RunPaths(config.model_dir)
    test_metrics, flipped = metrics["test"], metrics.get("test_tta_flip")
    lines = [
        "",
        f"Done. Test ({config.test_split}, {splits.sizes['test']:,} images): top-1 "
        f"{test_metrics['top1']:.2%}, top-5 {test_metrics['top5']:.2%}" + (
            f"; with --tta=flip, top-1 {flipped['top1']:.2%}, top-5 {flipped['top5']:.2%}."
            if flipped else "."),
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


def run_find_lr(config, phase, steps, given_flags=frozenset()):
    """`--mode=find_lr`: a learning-rate range test of one phase, set up as
    training sets it up, written to `--model_dir/find_lr/` and TensorBoard.

    It holds the folder's lock and writes nothing but `find_lr/`, so a run
    there keeps its checkpoints, progress and flags as they were.

    Args:
        config, given_flags: as for `run_training`.
        phase: `head` or `finetune`.
        steps: the steps the learning rate rises over.

    Returns:
        The `tl_keras.lr_finder.RangeTest`.
    """
    strategy, backbone = _strategy_and_backbone(config)
    paths = rundir.RunPaths(config.model_dir)
    with rundir.claim_for_find_lr(config.model_dir):
        splits = _load_splits(config)
        if config.recipe == "auto":
            config, _ = _auto_recipe(config, "", splits, given_flags)
        # Repeated batches would fill a batch from fewer examples; training won't.
        recipe.training_steps_per_epoch(splits.sizes["train"], config.batch_size, None)
        classifier = _classifier(config, strategy, backbone, splits)
        trained = lr_finder.set_up_phase(
            classifier, backbone, phase, unfreeze=config.unfreeze,
            train_batchnorm=config.batchnorm == "train",
            trained_head=lr_finder.trained_head(paths, phase, config.head_epochs))
        test = lr_finder.range_test(
            classifier, _training_batches(config, splits, repeat=True,
                                          class_weights=_class_weights(config, splits)),
            steps=steps,
            phase=phase, trained=trained, optimizer=config.optimizer,
            weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
            jit_compile=_jit_compile(config.jit_compile), scope=strategy.scope)
        png = lr_finder.write_curve(paths, phase, test, title=(
            f"Learning-rate range test, {phase} phase ({config.backbone})"))
        monitor.RunLog(paths.find_lr_tensorboard).image(
            f"find_lr/{phase}", png, step=0,
            description="Training loss against learning rate, the suggestion marked.")
    scale = recipe.learning_rate_scale(config.batch_size, config.lr_scaling)
    print("\n".join([
        *lr_finder.summary(test, phase, scale),
        f"Wrote {phase}.csv and {phase}.png to {os.path.dirname(paths.find_lr_csv(phase))}.",
        f"  tensorboard --logdir {shlex.quote(paths.find_lr_tensorboard)}"]), flush=True)
    return test


def run_evaluation(config, split, tta=None):
    """Evaluates a finished run's SavedModel on one split and writes the
    report, with the Grad-CAM grid of its worst mistakes.

    Args:
        config: the run's own configuration (from its `flags.txt`).
        split: `train`, `validation` or `test`.
        tta: `none` or `flip` (then both figures are reported: the plain
            predictions' and those averaged with each mirror image's); None
            takes the run's `--tta`.

    Returns:
        The report from `tl_keras.evaluate.classification_report` (of the plain
        predictions).

    Raises:
        UsageError: when the run has no SavedModel or model.keras, or the
            backend has no gradients here; before the data is read.
    """
    serving = predict.load_serving(config.model_dir)
    explainer = gradcam.GradCam(predict.load_keras_model(config.model_dir))
    splits = sources.load_splits(config)
    batches = pipeline.split_batches(config, splits, split)
    examples = evaluate.ExamplesToShow()
    report, tta_report = evaluate.reports(batches, predict.serving_predictor(serving),
                                          splits.class_names, tta=tta or config.tta,
                                          on_batch=examples.add)
    paths = rundir.RunPaths(config.model_dir)
    evaluate.write_evaluation(paths.evaluation, report, split, tta_report)
    print(evaluate.format_report(report, split, tta_report=tta_report))
    print(f"\nWrote metrics.json, per_class.csv and confusion_matrix.png to "
          f"{paths.evaluation}.")
    if examples.kept:
        with open(paths.gradcam_grid, "wb") as file:
            file.write(gradcam.grid(explainer, examples.kept, splits.class_names))
        print(f"Grad-CAM of the {len(examples.mistakes.kept)} most confident mistakes and "
              f"the {len(examples.correct.kept)} most confident right predictions: "
              f"{paths.gradcam_grid}")
    return report


def run_prediction(model, images, top_k, output, resize="stretch", tta="none",
                   explain=False):
    """Predicts the top-k classes of image files with a finished run's
    SavedModel, or with a `.tflite` file and the labels file beside it.

    Args:
        model: a run folder, or a `.tflite` file.
        resize: for a `.tflite` file, how images are brought to its size: the
            run's `--resize`.
        tta: `none`, or `flip`: average each image's probabilities with its
            mirror image's (the SavedModel's `serving_tta`; a `.tflite` file
            runs twice per image).
        explain: also write each image's Grad-CAM overlay, from the run's
            model.keras, under `RUN/explanations/` (a run folder only).

    Returns:
        The predictions, as written by `tl_keras.predict.predict_files`.
    """
    if tta == "flip":
        print("--tta=flip: each image's probabilities are averaged with its mirror "
              "image's.", flush=True)
    explainer = explanations_dir = None
    if model.endswith(".tflite"):
        if explain:
            raise UsageError(
                f"--explain needs the Keras model of a run folder (model.keras): a .tflite "
                f"file has no gradients for Grad-CAM. Pass --model_dir=RUN, the folder of "
                f"the run that wrote {os.path.basename(model)}.")
        classify, class_names = predict.load_tflite(model, resize, tta)
    else:
        classify = predict.serving_bytes_classifier(predict.load_serving(model), tta)
        with open(rundir.RunPaths(model).class_names) as file:
            class_names = json.load(file)
        if explain:
            explainer = gradcam.GradCam(predict.load_keras_model(model))
            explanations_dir = rundir.RunPaths(model).explanations
    return predict.predict_files(classify, images, class_names, top_k, output,
                                 explainer=explainer, explanations_dir=explanations_dir)


def _jit_compile(setting):
    return {"auto": "auto", "true": True, "false": False}[setting]
