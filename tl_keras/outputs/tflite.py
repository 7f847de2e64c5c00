"""Writing `model.tflite` (float32 or quantized) with its labels file, and
checking it against the float model on test images.

Each file is written beside its final path and renamed into place, as the
SavedModel is (`tl_keras.outputs.export`).
"""

import os

import numpy as np
import tensorflow as tf

from tl_keras import console
from tl_keras import progress
from tl_keras.config import TFLITE_QUANTIZATIONS
from tl_keras.outputs import export
from tl_keras.outputs import litert

# The TFLite model must give the SavedModel's probabilities within this, on
# this many test images.
TFLITE_TOLERANCE = 1e-4
TFLITE_CHECK_IMAGES = 32
# How the console names the file of each of --tflite_quantization's choices.
TFLITE_DESCRIPTIONS = {"none": "float32", "dynamic": "dynamic-range (int8 weights)",
                       "float16": "float16", "int8": "full-integer int8"}
# Every variant's top-1 is measured on at most this many test images, kept in
# memory at --image_size (2,000 at 224 px take 300 MB).
TFLITE_ACCURACY_IMAGES = 2000
# int8 is calibrated on this many training images, fewer if the split is smaller.
TFLITE_CALIBRATION_IMAGES = 200


def export_checked_tflite(model, path, *, image_size, quantization, max_drop,
                          class_names, labels_path, representative_images, test_images,
                          test_labels, float_predicted, test_examples, load_serving):
    """Writes model.tflite, quantized as `quantization` says, and the labels
    file beside it; checks the file against the float model on test images.

    Every variant's probabilities are compared with the SavedModel's on the
    first `TFLITE_CHECK_IMAGES` test images; a float32 file (`none`) must
    match them within `TFLITE_TOLERANCE`. Every variant's top-1 is measured on
    all of `test_images`, next to the float model's on the same images;
    losing more than `max_drop` points is reported with its likely causes,
    and the file is kept.

    Args:
        quantization: one of `TFLITE_QUANTIZATIONS`.
        max_drop: the top-1 points the file may lose before the run warns.
        class_names: written one per line to `labels_path`.
        representative_images: uint8 `[n, size, size, 3]` training images that
            calibrate `int8`; unused by the others.
        test_images: uint8 test images at `image_size`, with their `test_labels`.
        float_predicted: the float model's predicted class for each of them.
        test_examples: how many images the test split holds, for the log.
        load_serving: loads the SavedModel.

    Returns:
        metrics.json's `tflite` entry: `quantization`, `bytes`, `runtime`,
        `check_images`, `max_difference`, `images`, `top1`, `float_top1` and
        `drop_points`; None when the converter failed.

    Raises:
        RuntimeError: when a float32 file's probabilities differ by more than
            `TFLITE_TOLERANCE`.
    """
    described = f"{TFLITE_DESCRIPTIONS[quantization]} model.tflite"
    with progress.step(f"Converting to a {described} and checking it", total=3,
                       unit="part") as converting, console.native_chatter_dropped():
        problem = export_tflite(model, path, image_size, quantization,
                                representative_images)
        converting.advance()
        if problem:
            converting.result = f"Skipped the TFLite export: the converter failed ({problem})"
            return None
        export.write_labels(labels_path, class_names)
        checked = test_images[:TFLITE_CHECK_IMAGES]
        difference = tflite_max_difference(path, load_serving(), checked)
        converting.advance()
        predicted = tflite_probabilities(path, test_images).argmax(axis=1)
        converting.advance()
        entry = _entry(path, quantization, difference, len(checked), predicted,
                       test_labels, float_predicted)
        converting.result = _described_result(entry, described, labels_path, test_examples,
                                               len(representative_images))
    if quantization == "none" and not _within_tolerance(difference):
        raise RuntimeError(f"model.tflite differs from the SavedModel by {difference:.2e}.")
    if entry["drop_points"] > max_drop:
        print(_drop_warning(entry, max_drop, len(representative_images), len(class_names)),
              flush=True)
    return entry


def _entry(path, quantization, difference, check_images, predicted, labels,
           float_predicted):
    """metrics.json's `tflite` entry; see `export_checked_tflite`."""
    labels = np.asarray(labels)
    top1 = float(np.mean(predicted == labels))
    float_top1 = float(np.mean(np.asarray(float_predicted) == labels))
    return {"quantization": quantization, "bytes": os.path.getsize(path),
            "runtime": litert.runtime_name(), "check_images": check_images,
            "max_difference": difference, "images": len(predicted), "top1": top1,
            "float_top1": float_top1, "drop_points": round(100 * (float_top1 - top1), 4)}


def _described_result(entry, described, labels_path, test_examples, calibration_images):
    """The step's closing line: the file, its top-1 and its parity."""
    which = (f"all {entry['images']:,}" if entry["images"] == test_examples
             else f"the first {entry['images']:,} of {test_examples:,}")
    calibrated = (f", calibrated on {calibration_images:,} training images"
                  if entry["quantization"] == "int8" else "")
    result = (
        f"Wrote {described} ({entry['bytes']:,} bytes{calibrated}) and "
        f"{os.path.basename(labels_path)}: test top-1 {entry['top1']:.2%} on {which} "
        f"test images in {entry['runtime']}, the float model's {entry['float_top1']:.2%} "
        f"(drop {entry['drop_points']:.2f} points); on {entry['check_images']} test "
        f"images its probabilities ")
    if entry["quantization"] == "none":
        verdict = "are" if _within_tolerance(entry["max_difference"]) else "are NOT"
        return result + (f"{verdict} within {TFLITE_TOLERANCE:g} of the SavedModel's "
                         f"(largest difference {entry['max_difference']:.2e})")
    return result + f"differ from the SavedModel's by up to {entry['max_difference']:.2e}"


def _within_tolerance(difference):
    # Written so that NaN, which compares false with everything, fails.
    return difference <= TFLITE_TOLERANCE


def _drop_warning(entry, max_drop, calibration_images, num_classes):
    """Says plainly that the TFLite file lost too much top-1, and why it may have."""
    causes = []
    if entry["images"] < 200:
        causes.append(f"only {entry['images']} test images were compared, so each "
                      f"one is {100 / entry['images']:.1f} points")
    if entry["float_top1"] < 2 / num_classes:
        causes.append(f"the float model itself is near chance ({entry['float_top1']:.2%} "
                      f"for {num_classes} classes): a model trained too briefly, whose "
                      f"close probabilities small rounding errors reorder")
    if entry["quantization"] == "int8":
        causes.append(f"too few or unrepresentative calibration images (it used "
                      f"{calibration_images} training images)")
        causes.append("activations with outliers, whose int8 ranges leave few steps "
                      "for the common values (networks without BatchNormalization, such as "
                      "VGG16, suffer most)")
    else:
        causes.append("weights with outliers, whose rounding moves the common values")
    return (f"Warning: the {entry['quantization']} model.tflite loses "
            f"{entry['drop_points']:.2f} points of test top-1 against the float model "
            f"({entry['top1']:.2%} against {entry['float_top1']:.2%} on {entry['images']} "
            f"test images), more than --tflite_max_drop={max_drop:g}. The file is kept. "
            f"Likely causes: " + "; ".join(causes) + ".")


def export_tflite(model, path, image_size, quantization="none", representative_images=()):
    """Writes a TFLite model taking one uint8 `[1, size, size, 3]` image and
    returning float32 probabilities, its weights stored as `quantization` says.

    Every variant converts the same function, the whole model with its
    resizing and preprocessing inside, so each takes the images the SavedModel
    takes. `int8` is full-integer post-training quantization calibrated on
    `representative_images`; its uint8 input feeds the model as it is, and
    its output is dequantized to float32 probabilities.

    Returns:
        None on success, or the reason the converter couldn't run.
    """
    classify = tf.function(
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.uint8)],
    )
    try:
        converter = _tflite_converter(classify.get_concrete_function(), quantization,
                                      representative_images)
        flatbuffer = converter.convert()
    except Exception as error:  # The converter raises many kinds; report any.
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    export.write_atomically(path, lambda temporary: _write_bytes(temporary, flatbuffer),
                      suffix=".tflite")
    return None


def _tflite_converter(concrete_function, quantization, representative_images):
    if quantization not in TFLITE_QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: pass one of {TFLITE_QUANTIZATIONS}.")
    # Without the model as its trackable object, the converter freezes the
    # variables into constants (the path TensorFlow calls deprecated). Given
    # the Keras 3 model, it can leave them as variables nothing initialises:
    # TensorFlow 2.21 wrote a 25 kB float32 file whose probabilities were NaN
    # for a model exported outside a training run (and, for unclear reasons,
    # not in tests/test_serving.py's run), and int8 calibration failed on
    # them ("READ_VARIABLE failed to invoke").
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete_function])
    if quantization != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8":
        converter.representative_dataset = lambda: (
            [image[None]] for image in representative_images)
        # Integer kernels only: an op without one fails the conversion rather
        # than falling back to float in a file a phone would run as int8.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def tflite_probabilities(tflite_path, images):
    """The TFLite model's probabilities for uint8 `images` `[n, size, size, 3]`,
    one image per call, as the file takes them."""
    interpreter = litert.interpreter(tflite_path)
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    probabilities = []
    for image in images:
        interpreter.set_tensor(source, image[None])
        interpreter.invoke()
        probabilities.append(interpreter.get_tensor(target)[0].copy())
    return np.stack(probabilities)


def tflite_max_difference(tflite_path, serving, images):
    """The largest probability difference between the TFLite model and the
    SavedModel's `serving_default` on uint8 `images` `[n, size, size, 3]`."""
    expected = serving.signatures[export.SERVING_SIGNATURE](images=tf.constant(images))
    actual = tflite_probabilities(tflite_path, images)
    return float(np.abs(actual - expected["probabilities"].numpy()).max())


def _write_bytes(path, content):
    with open(path, "wb") as file:
        file.write(content)
