"""Writing the trained model: a SavedModel for serving, `model.keras` and the
backbone's weights, and the labels file. `tl_keras.outputs.tflite` writes
`model.tflite`, and `tl_keras.outputs.onnx_export` `model.onnx`.

Each artifact is written beside its final path and renamed into place, so a
crash never leaves a half-written model where a server would load it.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from tl_keras import progress
from tl_keras import rundir
from tl_keras.data import image_io
from tl_keras.data import pipeline

SERVING_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
# serving_bytes with --tta=flip: each image averaged with its mirror image.
TTA_SIGNATURE = "serving_tta"
# The bare model inside the SavedModel, probabilities only; also a signature.
PROBABILITIES_FUNCTION = "probabilities"
DEFAULT_TOP_K = 5


def export_saved_model(model, path, class_names, image_size, resize="stretch",
                       top_k=DEFAULT_TOP_K):
    """Exports a SavedModel with four signatures (README.md's Serving tables).

    `serving_default`: input `images`, uint8 `[batch, height, width, 3]` of any
    height and width.
    `serving_bytes`: input `image_bytes`, string `[batch]` of encoded JPEG, PNG,
    GIF or BMP images (what TF Serving's REST API receives as base64).
    `serving_tta`: as `serving_bytes`, each image's probabilities averaged with
    those of its mirror image (`--tta=flip`).

    These three return `probabilities` float32 `[batch, classes]`, `top_k_indices`
    int32 `[batch, k]` and `top_k_classes` string `[batch, k]`, best first,
    where k is `min(top_k, classes)`.
    `probabilities`: the bare model; input `images` as above, output
    `output_0` float32 `[batch, classes]`.

    Args:
        model: the classifier from `tl_keras.model.classifier.build_classifier`.
        path: the SavedModel directory to write (replaced if it exists).
        class_names: the class names, by label.
        image_size: the model's input size; encoded images of different sizes
            in one request are brought to it before batching.
        resize: `stretch` or `crop`, as the model was trained.
        top_k: how many classes the top-k outputs hold (at most all of them).
    """
    archive = keras.export.ExportArchive()
    # The model alone, converted by the Keras backend in use (under JAX, by
    # jax2tf); the serving functions around it are plain TensorFlow, so they
    # can decode images and look up class names on any backend.
    probabilities_of = archive.track_and_add_endpoint(
        PROBABILITIES_FUNCTION, model, input_signature=[_IMAGES_SPEC]
    )
    signatures = _serving_functions(probabilities_of, class_names, image_size, resize, top_k)
    for name, function in signatures.items():
        archive.add_endpoint(name=name, fn=function)
    write_atomically(path, lambda temporary: archive.write_out(temporary, verbose=False))


_IMAGES_SPEC = tf.TensorSpec(shape=(None, None, None, 3), dtype=tf.uint8, name="images")
_BYTES_SPEC = tf.TensorSpec(shape=(None,), dtype=tf.string, name="image_bytes")


def _serving_functions(probabilities_of, class_names, image_size, resize, top_k):
    """The serving signatures around the model, by name; see `export_saved_model`."""
    names = tf.constant(list(class_names))
    k = min(top_k, len(class_names))

    def outputs(probabilities):
        top = tf.math.top_k(probabilities, k=k)
        return {
            "probabilities": probabilities,
            "top_k_indices": top.indices,
            "top_k_classes": tf.gather(names, top.indices),
        }

    def decoded(image_bytes):
        return tf.map_fn(
            lambda encoded: pipeline.resize_uint8(_decode(encoded), image_size, resize),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
        )

    @tf.function(input_signature=[_IMAGES_SPEC])
    def classify(images):
        return outputs(probabilities_of(images))

    @tf.function(input_signature=[_BYTES_SPEC])
    def classify_encoded(image_bytes):
        return classify(decoded(image_bytes))

    @tf.function(input_signature=[_BYTES_SPEC])
    def classify_encoded_and_mirrored(image_bytes):
        images = decoded(image_bytes)
        mirror_images = tf.reverse(images, axis=[2])  # [batch, height, width, 3]
        return outputs((probabilities_of(images) + probabilities_of(mirror_images)) / 2)

    return {SERVING_SIGNATURE: classify, BYTES_SIGNATURE: classify_encoded,
            TTA_SIGNATURE: classify_encoded_and_mirrored}


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


def save_keras_model(model, path):
    """Saves the whole model (architecture, weights, optimizer) as `.keras`."""
    write_atomically(path, model.save, suffix=".keras")


def write_labels(path, class_names):
    """Writes the class names one per line, line i for class i: the label map
    TFLite apps read, and ONNX Runtime apps may."""
    text = "".join(f"{name}\n" for name in class_names)
    write_atomically(path, lambda temporary: _write_text(temporary, text), suffix=".txt")


def _write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="") as file:
        file.write(text)


def write_atomically(path, write, suffix=""):
    """Writes `path` through `write(temporary path)`, then renames it into place."""
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
