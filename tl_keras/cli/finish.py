"""After training, the run's last steps: restore the weights to export,
evaluate them on the test split, write every artifact from them, and print
the summary. `tl_keras.cli.job` trains first.
"""

import os
import shlex

import numpy as np

from tl_keras import rundir
from tl_keras.data import pipeline
from tl_keras.errors import UsageError
from tl_keras.model import classifier as classifier_lib
from tl_keras.outputs import evaluate
from tl_keras.outputs import export
from tl_keras.outputs import gradcam
from tl_keras.outputs import onnx_export
from tl_keras.outputs import predict
from tl_keras.outputs import tflite
from tl_keras.training import export_weights


def evaluate_and_export(config, strategy, role, classifier, backbone, splits, phases,
                        paths, run_log, timers, train_batches, validation_batches,
                        validation_by_phase):
    """After training: restores the weights to export, evaluates them on the
    test split, writes every artifact from them, and prints the summary."""
    with strategy.scope():
        exported = export_weights.restore_export_weights(
            classifier, backbone, config.export_weights, phases=phases, paths=paths,
            unfreeze=config.unfreeze, train_batchnorm=config.batchnorm == "train",
            label_smoothing=config.label_smoothing, train_batches=train_batches,
            validation_batches=validation_batches)
    print(f"Evaluating and exporting the {_describe_export(exported)}.", flush=True)
    # Served on CPUs too: whatever the training dtype policy, everything from
    # here on computes in float32, so the test metrics are the export's own.
    model = classifier_lib.with_training_state(classifier_lib.float32_copy(classifier),
                                               classifier)
    test_metrics, test = _test(config, model, splits, paths, run_log,
                               validation_by_phase, exported)
    export.write_artifacts(model, backbone.name, paths, class_names=splits.class_names,
                           image_size=config.image_size, resize=config.resize)
    metrics = {"validation": validation_by_phase, "test": test_metrics, "exported": exported}
    if test.tta_report:
        metrics["test_tta_flip"] = evaluate.summary(test.tta_report)
    metrics.update(_export_deployables(config, model, splits, paths, test))
    _log_gradcam(model, test.examples, splits.class_names, run_log,
                 step=_last_epoch(config))
    if role.is_chief:
        print(_summary(config, metrics, exported, phases, timers, splits))
    return metrics


def _export_deployables(config, model, splits, paths, test):
    """Writes model.tflite and model.onnx as the flags ask, each checked on the
    same test images; records and returns their metrics.json entries."""
    entries = {}
    if not (config.export_tflite or config.export_onnx):
        return entries
    images = np.stack([pipeline.resize_uint8(image, config.image_size, config.resize).numpy()
                       for image in test.first_images])
    checked = dict(test_labels=test.first_labels, float_predicted=test.first_predicted,
                   test_examples=splits.sizes["test"],
                   load_serving=lambda: predict.load_serving(config.model_dir))
    if config.export_tflite:
        entries["tflite"] = _export_tflite(config, model, splits, paths, images, checked)
    if config.export_onnx:
        entries["onnx"] = onnx_export.export_checked_onnx(
            model, paths.onnx, image_size=config.image_size, resize=config.resize,
            class_names=splits.class_names, labels_path=paths.labels,
            test_images=images, **checked)
    entries = {name: entry for name, entry in entries.items() if entry}
    for name, entry in entries.items():
        evaluate.add_to_metrics(paths.metrics, name, entry)
    return entries


def _export_tflite(config, model, splits, paths, images, checked):
    """Writes model.tflite as --tflite_quantization says, with its labels file;
    returns its metrics.json entry, or None when the converter failed."""
    calibration = ()
    if config.tflite_quantization == "int8":
        calibration = pipeline.sample_images(
            splits.train, num_examples=splits.sizes["train"],
            count=tflite.TFLITE_CALIBRATION_IMAGES, seed=config.seed,
            image_size=config.image_size, resize=config.resize)
    return tflite.export_checked_tflite(
        model, paths.tflite, image_size=config.image_size,
        quantization=config.tflite_quantization, max_drop=config.tflite_max_drop,
        class_names=splits.class_names, labels_path=paths.labels,
        representative_images=calibration, test_images=images, **checked)


def _test(config, model, splits, paths, run_log, validation_by_phase, exported):
    """Evaluates the exported weights on the test split (with --tta=flip, their
    mirror-averaged predictions too); writes metrics.json.

    Returns:
        (the test metrics, the `tl_keras.outputs.evaluate.TestResults`, whose first
        images the TFLite checks use).
    """
    test = evaluate.evaluate_test_split(
        model, pipeline.split_batches(config, splits, "test"), splits.class_names,
        keep_images=(tflite.TFLITE_ACCURACY_IMAGES
                     if config.export_tflite or config.export_onnx else 0),
        tta=config.tta)
    test_metrics = evaluate.summary(test.report)
    tta_metrics = evaluate.summary(test.tta_report) if test.tta_report else None
    evaluate.write_metrics(paths.metrics, validation_by_phase, test_metrics, exported,
                           test_tta=tta_metrics)
    last_epoch = _last_epoch(config)
    final = {f"test_{k}": v for k, v in test_metrics.items()}
    final.update({f"test_tta_flip_{k}": v for k, v in (tta_metrics or {}).items()})
    run_log.final_metrics(final, last_epoch)
    flipped = f"; with --tta=flip, {evaluate.headline(tta_metrics)}" if tta_metrics else ""
    print(f"Test ({config.test_split}): {evaluate.headline(test_metrics)}{flipped}.",
          flush=True)
    return test_metrics, test


def _last_epoch(config):
    """The last epoch of the run's timeline, counted from 0."""
    return (config.head_epochs + config.finetune_epochs
            + config.self_training_rounds * config.self_training_epochs - 1)


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
    deployables = "".join(
        f"{name}, " for name, written in (
            (rundir.TFLITE_FILE, config.export_tflite and os.path.isfile(paths.tflite)),
            (rundir.ONNX_FILE, config.export_onnx and os.path.isfile(paths.onnx)),
            (rundir.LABELS_FILE, os.path.isfile(paths.labels)))
        if written)
    lines += [
        f"Outputs in {config.model_dir}: {rundir.SAVED_MODEL_DIR}/, "
        f"{rundir.KERAS_MODEL_FILE}, {deployables}{rundir.METRICS_FILE}, "
        f"{rundir.HISTORY_FILE}, {rundir.PLOTS_DIR}/, {rundir.TENSORBOARD_DIR}/"
        + (f", {rundir.SELF_TRAINING_DIR}/." if config.self_training_rounds else "."),
        "Look further:",
        f"  tensorboard --logdir {shlex.quote(paths.tensorboard)}",
        f"  python run.py --mode=evaluate --model_dir={run}",
        f"  python run.py --mode=predict --model_dir={run} --images=PATH",
        f"  saved_model_cli show --dir {shlex.quote(paths.saved_model)} --all",
    ]
    return "\n".join(lines)


def _describe_export(exported):
    which = ("best validation top-1" if exported["weights"] == export_weights.EXPORT_BEST
             else "last epoch")
    return (f"weights of epoch {exported['epoch']} ({exported['phase']} phase; "
            f"--export_weights={exported['weights']}: {which} "
            f"{exported['validation']['top1']:.2%})")
