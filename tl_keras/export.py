"""Writing the trained model: a SavedModel for serving, and `model.keras`.

Each artifact is written beside its final path and renamed into place, so a
crash never leaves a half-written model where a server would load it.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf

SERVING_SIGNATURE = "serving_default"


def export_saved_model(model, path):
    """Exports a SavedModel whose `serving_default` takes images of any size.

    Args:
        model: the classifier from `tl_keras.model.build_classifier`.
        path: the SavedModel directory to write (replaced if it exists).

    Signature `serving_default`:
        input `images`: uint8 `[batch, height, width, 3]`, any height and width.
        output `probabilities`: float32 `[batch, classes]`.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):
        return {"probabilities": model(images, training=False)}

    archive.add_endpoint(
        name=SERVING_SIGNATURE,
        fn=serve,
        input_signature=[
            tf.TensorSpec(shape=(None, None, None, 3), dtype=tf.uint8, name="images")
        ],
    )
    _write_atomically(path, lambda temporary: archive.write_out(temporary, verbose=False))


def save_keras_model(model, path):
    """Saves the whole model (architecture, weights, optimizer) as `.keras`."""
    _write_atomically(path, model.save, suffix=".keras")


def _write_atomically(path, write, suffix=""):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temporary_dir = tempfile.mkdtemp(prefix=".export-", dir=parent)
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
