"""Predicting with a finished run's SavedModel, or its model.tflite or
model.onnx: the artifacts a server or a phone loads, so what people try is
what they ship.
With Grad-CAM, the run's Keras model too: a SavedModel has no gradients."""

import csv
import glob
import os

import keras
import numpy as np
import tensorflow as tf

from tl_keras import rundir
from tl_keras.data import image_io
from tl_keras.data import pipeline
from tl_keras.errors import UsageError
from tl_keras.outputs import export
from tl_keras.outputs import gradcam
from tl_keras.outputs import litert
from tl_keras.outputs import onnx_export
from tl_keras.outputs import plots

_FILES_PER_CALL = 32


def load_serving(model_dir):
    """Loads `MODEL_DIR/saved_model`.

    Raises:
        UsageError: when the run has no SavedModel (yet).
    """
    path = rundir.RunPaths(model_dir).saved_model
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise UsageError(
            f"No SavedModel in {path}: --model_dir must be a finished training run "
            f"(python run.py --model_dir={model_dir} ... trains one)."
        )
    return tf.saved_model.load(path)


def load_keras_model(model_dir):
    """Loads `MODEL_DIR/model.keras`, the model Grad-CAM differentiates.

    Raises:
        UsageError: when the run has no model.keras.
    """
    path = rundir.RunPaths(model_dir).keras_model
    if not os.path.isfile(path):
        raise UsageError(
            f"No {rundir.KERAS_MODEL_FILE} in {model_dir}: Grad-CAM needs the Keras model "
            f"a finished training run writes there.")
    # tl_keras.model.classifier, imported with tl_keras.outputs.gradcam, has registered the
    # model's own layer. Not compiled: only its forward pass and gradients count.
    return keras.saving.load_model(path, compile=False)


def serving_bytes_classifier(serving, tta="none"):
    """The SavedModel's `serving_bytes` (`serving_tta` for `tta="flip"`):
    encoded images in, `probabilities` out.

    Raises:
        UsageError: for `flip`, when the SavedModel predates `serving_tta`.
    """
    if tta == "none":
        return serving.signatures[export.BYTES_SIGNATURE]
    if export.TTA_SIGNATURE not in serving.signatures:
        raise UsageError(
            f"--tta={tta}: this SavedModel has no {export.TTA_SIGNATURE} signature; "
            f"it was exported before tl_keras had one. Predict without --tta, or "
            f"train the run again.")
    return serving.signatures[export.TTA_SIGNATURE]


def load_tflite(path, resize, tta="none"):
    """A `.tflite` file from `--export_tflite` as a classifier of encoded images,
    with the class names from the labels file beside it.

    Args:
        path: the `.tflite` file.
        resize: `stretch` or `crop`, as the run trained; images are brought to
            the file's input size this way, as `serving_bytes` brings them.
        tta: `none`, or `flip`: run the file on each image and on its mirror
            image, and average their probabilities, as `serving_tta` does.

    Returns:
        (a function from `image_bytes`, string `[n]`, to `{"probabilities":
        [n, classes]}`, as `serving_bytes_classifier`'s; the class names).

    Raises:
        UsageError: when the file or its labels file is missing.
    """
    labels_path = os.path.join(os.path.dirname(path), rundir.LABELS_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"No such file: {path}.")
    if not os.path.isfile(labels_path):
        raise UsageError(
            f"No {rundir.LABELS_FILE} beside {path}: --export_tflite writes the "
            f"class names there, one per line; copy it along with the .tflite file.")
    with open(labels_path, encoding="utf-8") as file:
        class_names = file.read().splitlines()
    interpreter = litert.interpreter(path)
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]["index"]
    size = int(source["shape"][1])

    def run(images):
        probabilities = []
        for image in images:  # The file takes one image per call.
            interpreter.set_tensor(source["index"], image[None])
            interpreter.invoke()
            probabilities.append(interpreter.get_tensor(target)[0])
        return np.stack(probabilities)

    return _file_classifier(run, size, resize, tta), class_names


def load_onnx(path, resize, tta="none"):
    """A `.onnx` file from `--export_onnx` as a classifier of encoded images,
    run in ONNX Runtime, with the class names from the file's metadata.

    Args:
        path: the `.onnx` file.
        resize: as for `load_tflite`; the file's own `resize` setting, which
            `--export_onnx` writes into it, wins.
        tta: as for `load_tflite`.

    Returns:
        As `load_tflite`.

    Raises:
        UsageError: when the file is missing, or ONNX Runtime is.
    """
    if not os.path.isfile(path):
        raise UsageError(f"No such file: {path}.")
    if onnx_export.missing_packages():
        raise UsageError(
            f"Predicting with a .onnx file needs ONNX Runtime, which this Python lacks: "
            f"{onnx_export.INSTALL_COMMAND} installs it.")
    onnx_session = onnx_export.session(path)
    class_names, file_resize = onnx_export.metadata(onnx_session)
    size = int(onnx_session.get_inputs()[0].shape[1])

    def run(images):
        return onnx_export.onnx_probabilities(onnx_session, images)

    return _file_classifier(run, size, file_resize or resize, tta), class_names


def _file_classifier(run, size, resize, tta):
    """A classifier of encoded images, as `serving_bytes_classifier`'s, from
    `run`: the file's probabilities of uint8 images `[n, size, size, 3]`."""
    def classify(image_bytes):
        images = np.stack([_model_input(encoded, size, resize)
                           for encoded in tf.unstack(image_bytes)])
        probabilities = run(images)
        if tta == "flip":
            mirror_images = np.ascontiguousarray(images[:, :, ::-1])
            probabilities = (probabilities + run(mirror_images)) / 2
        return {"probabilities": tf.constant(probabilities)}

    return classify


def _model_input(encoded, size, resize):
    """An encoded image as `serving_bytes` feeds it to the model: decoded and
    brought to `size`, as uint8 NumPy."""
    return pipeline.resize_uint8(image_io.decode_image(encoded), size, resize).numpy()


def serving_predictor(serving):
    """`serving_default`'s probabilities for one batch, as NumPy; see
    `tl_keras.outputs.evaluate.keras_predictor` for a Keras model's."""
    classify = serving.signatures[export.SERVING_SIGNATURE]
    return lambda images: classify(images=images)["probabilities"].numpy()


def image_files(spec):
    """The image files named by a file, a folder (searched recursively) or a glob.

    Raises:
        UsageError: when nothing matches.
    """
    if os.path.isdir(spec):
        found = [
            os.path.join(directory, name)
            for directory, subdirectories, names in os.walk(spec)
            for name in names
            if not name.startswith(".")
            and os.path.splitext(name)[1].lower() in image_io.IMAGE_EXTENSIONS
        ]
    elif os.path.isfile(spec):
        found = [spec]
    else:
        found = [path for path in glob.glob(spec, recursive=True) if os.path.isfile(path)]
    if not found and not glob.has_magic(spec) and not os.path.exists(spec):
        raise UsageError(f"--images={spec}: no such file or folder.")
    if not found:
        raise UsageError(f"--images={spec}: no image files there.")
    return sorted(found)


def predict_files(classify, spec, class_names, top_k, output=None, explainer=None,
                  explanations_dir=None):
    """Prints (and optionally writes as CSV) the top-k classes of each image.

    Files that can't be read as images are reported by name and skipped; the
    rest are still predicted.

    Args:
        classify: a function from encoded images to their probabilities:
            `serving_bytes_classifier`'s or `load_tflite`'s.
        spec: a file, a folder or a glob.
        class_names: the run's class names, by label.
        top_k: how many classes to report per image.
        output: optional CSV path.
        explainer: optionally, a `tl_keras.outputs.gradcam.GradCam` of the same
            model: each image's Grad-CAM overlay, for its top class, is then
            written as a PNG under `explanations_dir`, and its path printed
            on the image's line.
        explanations_dir: where the overlays go, at each image's path
            relative to the folder that holds all the images, `.png` added.

    Returns:
        A list of (path, [(class name, probability), ...]) for the predicted files.
    """
    k = min(top_k, len(class_names))
    predictions, failures, explained = [], [], 0
    paths = image_files(spec)
    readable = []
    for path in paths:
        problem = image_io.image_file_problem(path)
        if problem:
            failures.append((path, problem))
        else:
            readable.append(path)
    for start in range(0, len(readable), _FILES_PER_CALL):
        chunk = readable[start:start + _FILES_PER_CALL]
        results = _classify_files(classify, chunk, failures)
        overlays = [None] * len(results)
        if explainer and results:
            overlays = _write_overlays(explainer, results, class_names, explanations_dir,
                                       root=_common_folder(readable))
            explained += len(overlays)
        for (path, probabilities), overlay in zip(results, overlays):
            top = np.argsort(-probabilities)[:k]
            ranked = [(class_names[i], float(probabilities[i])) for i in top]
            predictions.append((path, ranked))
            line = f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked)
            print(line + (f" (Grad-CAM: {overlay})" if overlay else ""))
    for path, problem in failures:
        print(f"skipped {path}: {problem}")
    print(f"Predicted {len(predictions)} image(s); skipped {len(failures)}.")
    if explainer:
        print(f"Wrote {explained} Grad-CAM overlay(s) to {explanations_dir}.")
    if output:
        _write_csv(output, predictions, k)
        print(f"Wrote {output}.")
    return predictions


def _common_folder(paths):
    return os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in paths])


def _write_overlays(explainer, results, class_names, directory, root):
    """Writes each image's Grad-CAM overlay, for its top class, as a titled PNG.

    Args:
        explainer: a `tl_keras.outputs.gradcam.GradCam`.
        results: (path, probabilities) pairs, as `_classify_files` returns them.
        directory: where the PNGs go, at each image's path relative to `root`.

    Returns:
        The PNGs' paths, in the order of `results`.
    """
    preprocessing = explainer.preprocessing
    images = np.stack([
        _model_input(tf.io.read_file(path), preprocessing.image_size, preprocessing.resize)
        for path, _ in results])
    explanation = explainer.explain(
        images, classes=[int(np.argmax(probabilities)) for _, probabilities in results])
    written = []
    for (path, probabilities), tile, label in zip(results, gradcam.overlays(explanation),
                                                  explanation.classes):
        png = os.path.join(directory, os.path.relpath(os.path.abspath(path), root) + ".png")
        os.makedirs(os.path.dirname(png), exist_ok=True)
        title = (f"{os.path.basename(path)}\npredicted {class_names[label]} "
                 f"({probabilities[label]:.0%})")
        with open(png, "wb") as file:
            file.write(plots.image_grid([tile], [title], columns=1))
        written.append(png)
    return written


def _classify_files(classify, paths, failures):
    contents = [tf.io.read_file(path) for path in paths]
    try:
        probabilities = classify(image_bytes=tf.stack(contents))["probabilities"].numpy()
        return list(zip(paths, probabilities))
    except tf.errors.InvalidArgumentError:
        # A file that looked whole failed to decode: retry one by one to find it.
        results = []
        for path, content in zip(paths, contents):
            try:
                probabilities = classify(image_bytes=content[None])["probabilities"]
                results.append((path, probabilities.numpy()[0]))
            except tf.errors.InvalidArgumentError:
                failures.append((path, "can't be decoded"))
        return results


def _write_csv(path, predictions, k):
    header = ["path"]
    for rank in range(1, k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for image_path, ranked in predictions:
            row = [image_path]
            for name, probability in ranked:
                row += [name, f"{probability:.6f}"]
            writer.writerow(row)
