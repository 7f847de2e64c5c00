"""Writing `model.onnx`, for ONNX Runtime, and checking it against the
SavedModel on test images.

tf2onnx converts the same function the SavedModel's `serving_default` wraps,
the whole model with its preprocessing inside, from the same weights; the file
takes uint8 images `[batch, image_size, image_size, 3]` (any batch) as
`images` and returns float32 `probabilities` `[batch, classes]`, and holds the
class names in its metadata. Written beside its final path and renamed into
place, as the SavedModel is (`tl_keras.outputs.export`).

The packages are the `onnx` extra (`pip install -e ".[onnx]"`); this module
imports them only when it converts or runs a file.
"""

import importlib.metadata
import importlib.util
import json
import os

import numpy as np
import tensorflow as tf
# What tf2onnx freezes functions with, too.
from tensorflow.python.framework import convert_to_constants

from tl_keras import console
from tl_keras import progress
from tl_keras.outputs import export

# ONNX Runtime's probabilities must match the SavedModel's within this, on
# this many test images, as the float32 TFLite file's must.
ONNX_TOLERANCE = 1e-4
ONNX_CHECK_IMAGES = 32
# The operator set the file targets: 17 is the first with LayerNormalization,
# ConvNeXt's.
ONNX_OPSET = 17
# What the file's metadata holds, beside the graph.
CLASS_NAMES_KEY = "class_names"
RESIZE_KEY = "resize"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
ONNX_PACKAGES = ("onnx", "onnxruntime", "tf2onnx")
INSTALL_COMMAND = 'pip install -e ".[onnx]"'
# Images per ONNX Runtime call when measuring top-1.
_BATCH = 32

# The backbone families tf2onnx can't convert, by the start of their names,
# with what it leaves unconverted (tests/test_onnx.py keeps this true).
UNCONVERTIBLE = {
    "convnext": ("ConvNeXt: tf2onnx 1.17.0 has no ONNX form of the TensorFlow ops Erfc "
                 "(its exact GELU) and StatefulPartitionedCall (the XLA-compiled function "
                 "Keras runs its depthwise convolutions in, as grouped convolutions)"),
}


def missing_packages():
    """The packages `--export_onnx` and predicting with a .onnx file need and
    this Python lacks."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def refusal(backbone, backend):
    """Why `--export_onnx` can't convert this backbone under this Keras
    backend, or can't run here at all; None when it can."""
    missing = missing_packages()
    if missing:
        return (f"--export_onnx needs the {', '.join(missing)} package(s), which this "
                f"Python lacks: {INSTALL_COMMAND} installs them.")
    if backend != "tensorflow":
        # Under JAX the SavedModel's model is a StableHLO module in one
        # XlaCallModule op, which tf2onnx has no conversion for.
        return (f"--export_onnx converts the model's TensorFlow graph with tf2onnx; "
                f"under KERAS_BACKEND={backend} that graph is one XlaCallModule op, "
                f"which tf2onnx can't convert (\"pass1 convert failed for name: "
                f"XlaCallModule\"). Train with KERAS_BACKEND=tensorflow for model.onnx, "
                f"or drop --export_onnx.")
    for family, limit in UNCONVERTIBLE.items():
        if backbone.startswith(family):
            return (f"--export_onnx can't convert --backbone={backbone}. {limit}. Drop "
                    f"--export_onnx, or pick a backbone that converts (docs/deploy.md "
                    f"lists them).")
    return None


def versions():
    """`tf2onnx X, onnxruntime Y`: what converted and checked the file."""
    return ", ".join(f"{name} {importlib.metadata.version(name)}"
                     for name in ("tf2onnx", "onnxruntime"))


def export_onnx(model, path, image_size, class_names, resize):
    """Writes the model as ONNX: uint8 `images` `[batch, image_size,
    image_size, 3]` in, `probabilities` out, the class names (as a JSON list)
    and `resize` in the metadata.

    Returns:
        None on success, or the converter's reason it couldn't convert.
    """
    import onnx
    import tf2onnx

    classify = tf.function(
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    try:
        with console.native_chatter_dropped(), console.library_logs_dropped("tf2onnx"):
            proto = _converted(classify.get_concrete_function(), tf2onnx)
    except Exception as error:  # The converter raises many kinds; report any.
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    # tf2onnx leaves an op it can't convert in the graph, as it was.
    unconverted = sorted({node.op_type for node in proto.graph.node
                          if not onnx.defs.has(node.op_type, node.domain)})
    if unconverted:
        return (f"tf2onnx {importlib.metadata.version('tf2onnx')} has no ONNX form of "
                f"the TensorFlow op(s) {', '.join(unconverted)}")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        return f"the ONNX checker refused the converted model: {str(error).splitlines()[0]}"
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.helper.set_model_props(proto, {CLASS_NAMES_KEY: json.dumps(list(class_names)),
                                        RESIZE_KEY: resize})
    export.write_atomically(path, lambda temporary: onnx.save_model(proto, temporary),
                            suffix=".onnx")
    return None


def _converted(concrete_function, tf2onnx):
    """The function as an ONNX model: `images` in, `probabilities` out.

    Frozen here, every captured value made a constant, rather than by
    `tf2onnx.convert.from_function` (or Keras' `export(format="onnx")`, which
    calls it): that keeps captured tensors that aren't variables, such as the
    mean and variance of EfficientNetV2's Normalization layer, as inputs of
    the ONNX graph, which ONNX Runtime then refuses to run without.
    """
    frozen = convert_to_constants.convert_variables_to_constants_v2(
        concrete_function, lower_control_flow=False, aggressive_inlining=True)
    [images], [probabilities] = frozen.inputs, frozen.outputs
    proto, _ = tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(), input_names=[images.name],
        output_names=[probabilities.name], opset=ONNX_OPSET,
        tensors_to_rename={images.name: INPUT_NAME, probabilities.name: OUTPUT_NAME})
    return proto


def session(path, num_threads=None):
    """An ONNX Runtime session of the file at `path`, on the CPU, its
    operators using `num_threads` threads (None leaves it to ONNX Runtime)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # Errors only: its warnings are about graph fusions.
    if num_threads:
        options.intra_op_num_threads = num_threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def metadata(onnx_session):
    """(the class names, the `resize` setting) from a session's file."""
    properties = onnx_session.get_modelmeta().custom_metadata_map
    return json.loads(properties[CLASS_NAMES_KEY]), properties.get(RESIZE_KEY)


def onnx_probabilities(onnx_session, images):
    """The file's probabilities for uint8 `images` `[n, size, size, 3]`."""
    return np.concatenate([
        onnx_session.run([OUTPUT_NAME], {INPUT_NAME: images[start:start + _BATCH]})[0]
        for start in range(0, len(images), _BATCH)])


def export_checked_onnx(model, path, *, image_size, resize, class_names, labels_path,
                        test_images, test_labels, float_predicted, test_examples,
                        load_serving):
    """Writes model.onnx, and the labels file beside it; checks the file
    against the SavedModel.

    ONNX Runtime's probabilities must match `serving_default`'s within
    `ONNX_TOLERANCE` on the first `ONNX_CHECK_IMAGES` of `images`, and its
    top-1 on all of them is measured beside the float model's. A failed check
    warns, names the largest difference, and keeps the file.

    Args:
        class_names: held in the file's metadata, and written one per line to
            `labels_path`.
        test_images: uint8 test images at `image_size`, with their `test_labels`.
        float_predicted: the float model's predicted class for each of them.
        test_examples: how many images the test split holds, for the log.
        load_serving: loads the SavedModel.

    Returns:
        metrics.json's `onnx` entry (`bytes`, `opset`, `converter`,
        `check_images`, `max_difference`, `within_tolerance`, `images`, `top1`,
        `float_top1`, `drop_points`); None when the converter failed.
    """
    with progress.step("Converting to model.onnx and checking it in ONNX Runtime",
                       total=3, unit="part") as converting:
        problem = export_onnx(model, path, image_size, class_names, resize)
        converting.advance()
        if problem:
            converting.result = f"Skipped the ONNX export: tf2onnx failed ({problem})"
            return None
        export.write_labels(labels_path, class_names)
        onnx_session = session(path)
        checked = test_images[:ONNX_CHECK_IMAGES]
        expected = load_serving().signatures[export.SERVING_SIGNATURE](
            images=tf.constant(checked))["probabilities"].numpy()
        difference = float(np.abs(onnx_probabilities(onnx_session, checked)
                                  - expected).max())
        converting.advance()
        predicted = onnx_probabilities(onnx_session, test_images).argmax(axis=1)
        converting.advance()
        entry = _entry(path, difference, len(checked), predicted, test_labels,
                       float_predicted)
        which = (f"all {len(test_images):,}" if len(test_images) == test_examples
                 else f"the first {len(test_images):,} of {test_examples:,}")
        verdict = "within" if entry["within_tolerance"] else "NOT within"
        converting.result = (
            f"Wrote model.onnx ({entry['bytes']:,} bytes, {entry['converter']}) and "
            f"{os.path.basename(labels_path)}: "
            f"test top-1 {entry['top1']:.2%} on {which} test images, the float model's "
            f"{entry['float_top1']:.2%}; on {len(checked)} test images its probabilities "
            f"are {verdict} {ONNX_TOLERANCE:g} of the SavedModel's (largest difference "
            f"{difference:.2e})")
    if not entry["within_tolerance"]:
        print(f"Warning: model.onnx's probabilities differ from the SavedModel's by up to "
              f"{difference:.2e} on {len(checked)} test images, more than "
              f"{ONNX_TOLERANCE:g}. The file is kept. Likely cause: an operation that "
              f"{entry['converter'].split(',')[0]} translates into ONNX operators that "
              f"compute differently; its top-1 above says how much that matters.",
              flush=True)
    return entry


def _entry(path, difference, check_images, predicted, labels, float_predicted):
    labels = np.asarray(labels)
    top1 = float(np.mean(predicted == labels))
    float_top1 = float(np.mean(np.asarray(float_predicted) == labels))
    return {"bytes": os.path.getsize(path), "opset": ONNX_OPSET, "converter": versions(),
            "check_images": check_images, "max_difference": difference,
            # Written so that NaN, which compares false with everything, fails.
            "within_tolerance": difference <= ONNX_TOLERANCE,
            "images": len(predicted), "top1": top1, "float_top1": float_top1,
            "drop_points": round(100 * (float_top1 - top1), 4)}
