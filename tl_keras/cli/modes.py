"""The modes besides training: `find_lr` before a run, `evaluate` and
`predict` after one. `run.py` calls one function per `--mode`; training is
`tl_keras.cli.job`.
"""

import json
import os
import shlex

from tl_keras import rundir
from tl_keras.cli import assembly
from tl_keras.data import pipeline
from tl_keras.data import sources
from tl_keras.errors import UsageError
from tl_keras.outputs import evaluate
from tl_keras.outputs import gradcam
from tl_keras.outputs import predict
from tl_keras.training import lr_finder
from tl_keras.training import lr_finder_setup
from tl_keras.training import monitor
from tl_keras.training import recipe


def run_find_lr(config, phase, steps, *, flagfile_text, given_flags=frozenset(),
                flag_defaults=""):
    """`--mode=find_lr`: a learning-rate range test of one phase, set up as
    training sets it up, written to `--model_dir/find_lr/` and TensorBoard.

    It holds the folder's lock and writes nothing but `find_lr/`, so a run
    there keeps its checkpoints, progress and flags as they were.

    Args:
        config, flagfile_text, given_flags, flag_defaults: as for
            `tl_keras.job.run_training`; the flags are compared with those of
            the run whose head phase `finetune` starts from.
        phase: `head` or `finetune`.
        steps: the steps the learning rate rises over.

    Returns:
        The `tl_keras.training.lr_finder.RangeTest`.

    Raises:
        UsageError: for bad input, before the test starts; among it a run
            whose head was trained with other flags (see
            `tl_keras.training.lr_finder_setup.trained_head`).
    """
    strategy, backbone = assembly.strategy_and_backbone(config)
    paths = rundir.RunPaths(config.model_dir)
    with rundir.claim_beside_run(config.model_dir):
        splits = assembly.load_splits(config)
        if config.recipe == "auto":
            config, flagfile_text = assembly.apply_auto_recipe(
                config, flagfile_text, splits, given_flags)
        # Repeated batches would fill a batch from fewer examples; training won't.
        recipe.training_steps_per_epoch(splits.sizes["train"], config.batch_size, None)
        head = lr_finder_setup.trained_head(paths, phase, config.head_epochs, flagfile_text,
                                            flag_defaults)
        classifier = assembly.build_classifier(config, strategy, backbone, splits)
        trained, rates = lr_finder_setup.set_up_phase(
            classifier, backbone, phase, unfreeze=config.unfreeze,
            train_batchnorm=config.batchnorm == "train", trained_head=head,
            decay=config.layer_decay)
        for line in lr_finder_setup.describe_optimizer(rates, config.ema):
            print(line, flush=True)
        test = lr_finder.range_test(
            classifier, assembly.training_batches(config, splits, repeat=True,
                                          class_weights=assembly.class_weights(config, splits)),
            steps=steps,
            phase=phase, trained=trained, optimizer=config.optimizer,
            weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
            jit_compile=assembly.jit_compile(config.jit_compile), scope=strategy.scope,
            rate_factors=rates.factors if rates else None)
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
        The report from `tl_keras.outputs.evaluate.classification_report` (of the plain
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
    SavedModel, or with a `.tflite` file and the labels file beside it, or
    with a `.onnx` file.

    Args:
        model: a run folder, or a `.tflite` or `.onnx` file.
        resize: for a `.tflite` file, how images are brought to its size: the
            run's `--resize` (a `.onnx` file holds its own).
        tta: `none`, or `flip`: average each image's probabilities with its
            mirror image's (the SavedModel's `serving_tta`; a `.tflite` or
            `.onnx` file runs twice per image).
        explain: also write each image's Grad-CAM overlay, from the run's
            model.keras, under `RUN/explanations/` (a run folder only).

    Returns:
        The predictions, as written by `tl_keras.outputs.predict.predict_files`.
    """
    explainer = explanations_dir = None
    model_file = os.path.splitext(model)[1]
    if model_file in _FILE_LOADERS:
        if explain:
            raise UsageError(
                f"--explain needs the Keras model of a run folder (model.keras): a "
                f"{model_file} file has no gradients for Grad-CAM. Pass --model_dir=RUN, "
                f"the folder of the run that wrote {os.path.basename(model)}.")
        classify, class_names = _FILE_LOADERS[model_file](model, resize, tta)
    else:
        classify = predict.serving_bytes_classifier(predict.load_serving(model), tta)
        with open(rundir.RunPaths(model).class_names) as file:
            class_names = json.load(file)
        if explain:
            explainer = gradcam.GradCam(predict.load_keras_model(model))
            explanations_dir = rundir.RunPaths(model).explanations
    # Announced once the model has loaded, so a refusal above comes alone.
    if tta == "flip":
        print("--tta=flip: each image's probabilities are averaged with its mirror "
              "image's.", flush=True)
    return predict.predict_files(classify, images, class_names, top_k, output,
                                 explainer=explainer, explanations_dir=explanations_dir)


# The model files --mode=predict takes instead of a run folder, by suffix.
_FILE_LOADERS = {".tflite": predict.load_tflite, ".onnx": predict.load_onnx}
