"""Writing the trained model: a SavedModel for serving, `model.keras`, the
backbone's weights, and a checked `model.tflite`.

Each artifact is written beside its final path and renamed into place, so a
crash never leaves a half-written model where a server would load it.
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tl_keras import console
from tl_keras import image_io
from tl_keras import pipeline
from tl_keras import progress
from tl_keras import rundir

SERVING_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
# The bare model inside the SavedModel, probabilities only; also a signature.
PROBABILITIES_FUNCTION = "probabilities"
DEFAULT_TOP_K = 5

# The TFLite model must give the SavedModel's probabilities within this, on
# this many test images.
TFLITE_TOLERANCE = 1e-4
TFLITE_CHECK_IMAGES = 32


def export_saved_model(model, path, class_names, image_size, resize="stretch",
                       top_k=DEFAULT_TOP_K):
    """Exports a SavedModel with three signatures (README.md's Serving tables).

    `serving_default`: input `images`, uint8 `[batch, height, width, 3]` of any
    height and width.
    `serving_bytes`: input `image_bytes`, string `[batch]` of encoded JPEG, PNG,
    GIF or BMP images (what TF Serving's REST API receives as base64).

    Both return `probabilities` float32 `[batch, classes]`, `top_k_indices`
    int32 `[batch, k]` and `top_k_classes` string `[batch, k]`, best first,
    where k is `min(top_k, classes)`.
    `probabilities`: the bare model; input `images` as above, output
    `output_0` float32 `[batch, classes]`.

    Args:
        model: the classifier from `tl_keras.classifier.build_classifier`.
        path: the SavedModel directory to write (replaced if it exists).
        class_names: the class names, by label.
        image_size: the model's input size; encoded images of different sizes
            in one request are brought to it before batching.
        resize: `stretch` or `crop`, as the model was trained.
        top_k: how many classes the top-k outputs hold (at most all of them).
    """
    archive = keras.export.ExportArchive()
    images_spec = tf.TensorSpec(shape=(None, None, None, 3), dtype=tf.uint8, name="images")
    # The model alone, converted by the Keras backend in use (under JAX, by
    # jax2tf); the serving functions around it are plain TensorFlow, so they
    # can decode images and look up class names on any backend.
    probabilities_of = archive.track_and_add_endpoint(
        PROBABILITIES_FUNCTION, model, input_signature=[images_spec]
    )
    names = tf.constant(list(class_names))
    k = min(top_k, len(class_names))

    @tf.function(input_signature=[images_spec])
    def classify(images):
        probabilities = probabilities_of(images)
        top = tf.math.top_k(probabilities, k=k)
        return {
            "probabilities": probabilities,
            "top_k_indices": top.indices,
            "top_k_classes": tf.gather(names, top.indices),
        }

    @tf.function(input_signature=[
        tf.TensorSpec(shape=(None,), dtype=tf.string, name="image_bytes")
    ])
    def classify_encoded(image_bytes):
        images = tf.map_fn(
            lambda encoded: pipeline.resize_uint8(_decode(encoded), image_size, resize),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
        )
        return classify(images)

    archive.add_endpoint(name=SERVING_SIGNATURE, fn=classify)
    archive.add_endpoint(name=BYTES_SIGNATURE, fn=classify_encoded)
    _write_atomically(path, lambda temporary: archive.write_out(temporary, verbose=False))


def _decode(encoded):
    is_image = tf.reduce_any([
        tf.strings.substr(encoded, 0, len(signature)) == signature
        for signature in image_io.IMAGE_SIGNATURES
    ])
    with tf.control_dependencies([
        tf.debugging.Assert(
            is_image,
            ["image_bytes holds a string that is not a JPEG, PNG, GIF or BMP image; "
             "it starts with:", tf.strings.substr(encoded, 0, 16)],
        )
    ]):
        return image_io.decode_image(encoded)


def write_artifacts(model, backbone_name, paths, *, class_names, image_size, resize):
    """Writes saved_model/, model.keras and the backbone's weights, as a step."""
    files = (f"{rundir.SAVED_MODEL_DIR}/, {rundir.KERAS_MODEL_FILE} and "
             f"{rundir.BACKBONE_WEIGHTS_FILE}")
    with progress.step(f"Exporting {files}", total=3, unit="file") as exporting:
        export_saved_model(model, paths.saved_model, class_names=class_names,
                           image_size=image_size, resize=resize)
        exporting.advance()
        save_keras_model(model, paths.keras_model)
        exporting.advance()
        model.get_layer(backbone_name).save_weights(paths.backbone_weights)
        exporting.advance()
        exporting.result = f"Wrote {files} to {paths.model_dir}"


def export_checked_tflite(model, path, *, image_size, resize, test_images, load_serving):
    """Writes model.tflite, if the converter can, and checks it on `test_images`
    against the SavedModel that `load_serving()` loads.

    Raises:
        RuntimeError: when its probabilities differ by more than `TFLITE_TOLERANCE`.
    """
    with progress.step("Converting to model.tflite and checking it", total=2,
                       unit="part") as converting, console.native_chatter_dropped():
        problem = export_tflite(model, path, image_size)
        converting.advance()
        if problem:
            converting.result = f"Skipped the TFLite export: the converter failed ({problem})"
            return
        sized = np.stack([pipeline.resize_uint8(image, image_size, resize).numpy()
                          for image in test_images])
        difference = tflite_max_difference(path, load_serving(), sized)
        converting.advance()
        verdict = "within" if difference <= TFLITE_TOLERANCE else "NOT within"
        converting.result = (
            f"Wrote model.tflite: on {len(sized)} test images its probabilities are "
            f"{verdict} {TFLITE_TOLERANCE:g} of the SavedModel's (largest difference "
            f"{difference:.2e})")
    if difference > TFLITE_TOLERANCE:
        raise RuntimeError(f"model.tflite differs from the SavedModel by {difference:.2e}.")


def export_tflite(model, path, image_size):
    """Writes a float32 TFLite model taking one uint8 `[1, size, size, 3]` image.

    Returns:
        None on success, or the reason the converter couldn't run.
    """
    classify = tf.function(
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.uint8)],
    )
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [classify.get_concrete_function()], model
        )
        flatbuffer = converter.convert()
    except Exception as error:  # The converter raises many kinds; report any.
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    _write_atomically(path, lambda temporary: _write_bytes(temporary, flatbuffer),
                      suffix=".tflite")
    return None


def tflite_max_difference(tflite_path, serving, images):
    """The largest probability difference between the TFLite model and the
    SavedModel's `serving_default` on uint8 `images` `[n, size, size, 3]`."""
    interpreter = tf.lite.Interpreter(model_path=tflite_path)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    expected = serving.signatures[SERVING_SIGNATURE](images=tf.constant(images))
    largest = 0.0
    for image, reference in zip(images, expected["probabilities"].numpy()):
        interpreter.set_tensor(source, image[None])
        interpreter.invoke()
        difference = abs(interpreter.get_tensor(target)[0] - reference).max()
        largest = max(largest, float(difference))
    return largest


def _write_bytes(path, content):
    with open(path, "wb") as file:
        file.write(content)


def save_keras_model(model, path):
    """Saves the whole model (architecture, weights, optimizer) as `.keras`."""
    _write_atomically(path, model.save, suffix=".keras")


def _write_atomically(path, write, suffix=""):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temporary_dir = tempfile.mkdtemp(prefix=rundir.TEMPORARY_PREFIX, dir=parent)
    try:
        temporary = os.path.join(temporary_dir, "artifact" + suffix)
        write(temporary)
        if os.path.exists(path):
            # Move the previous artifact aside (it is deleted with the
            # temporary folder) so the new one can be renamed into place.
            os.replace(path, os.path.join(temporary_dir, "previous" + suffix))
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary_dir, ignore_errors=True)
