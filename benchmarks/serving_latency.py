"""Serving latency of each format of one model, on the same images, in one
process: the SavedModel's `serving_default`, each TFLite variant in LiteRT,
and model.onnx in ONNX Runtime.

    python benchmarks/serving_latency.py --model_dir=RUN
    python benchmarks/serving_latency.py --backbone=resnet50 --image_size=224

With --model_dir, a finished run's files: its SavedModel, and its model.tflite
and model.onnx where it wrote them; the TFLite variants and the ONNX file it
didn't write are converted from its model.keras, as the run converts them.
Without, a --backbone with random weights (enough for timing), exported in
every format into a temporary folder. int8 is calibrated on the timed images,
which are random: its timing is real, its accuracy is not measured here.

For each format: single-image latency (median and p90 over --calls calls,
after --warmup calls), and the throughput of batches of --batch_size images
(a TFLite file takes one image per invoke, so its batch is that many invokes).
The formats take turns, --rounds rounds of each, so a change in the machine's
load falls on all of them. Each runtime gets --threads threads. Prints a
Markdown table, the SavedModel as 1.0, and each format's top-1 agreement with
the SavedModel on the images.
"""

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tl_keras import console  # noqa: E402

# Before TensorFlow loads, as in run.py: library chatter off unless --verbosity.
console.quiet_startup(sys.argv)

import json  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tl_keras import rundir  # noqa: E402
from tl_keras.config import TFLITE_QUANTIZATIONS  # noqa: E402
from tl_keras.model import backbones  # noqa: E402
from tl_keras.model import classifier as classifier_lib  # noqa: E402
from tl_keras.outputs import export  # noqa: E402
from tl_keras.outputs import litert  # noqa: E402
from tl_keras.outputs import onnx_export  # noqa: E402
from tl_keras.outputs import predict  # noqa: E402
from tl_keras.outputs import tflite  # noqa: E402

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A finished run's folder.")
_BACKBONE = flags.DEFINE_string("backbone", "resnet50",
                                "Without --model_dir: the backbone, random weights.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Without --model_dir: input size.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Without --model_dir: head size.")
_CALLS = flags.DEFINE_integer("calls", 200, "Timed single-image calls per format.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed calls per format first.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per batch for throughput.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per format.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Turns each format takes.")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "Threads for each runtime.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the images.")


class Format:
    """One way of serving the model: `run(images)` gives its probabilities."""

    def __init__(self, name, size_bytes, run, one_per_call=False):
        self.name, self.bytes, self.run = name, size_bytes, run
        self.one_per_call = one_per_call
        self.latencies, self.batch_seconds = [], []

    def batch(self, images):
        if self.one_per_call:
            return np.concatenate([self.run(image[None]) for image in images])
        return self.run(images)


def _saved_model_format(path):
    # Kept alive by `run`: the functions of a loaded SavedModel need its variables.
    loaded = tf.saved_model.load(path)
    size = sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)

    def run(images):
        serving = loaded.signatures[export.SERVING_SIGNATURE]
        return serving(images=tf.constant(images))["probabilities"].numpy()

    return Format("SavedModel `serving_default`", size, run)


def _tflite_format(path, quantization):
    interpreter = litert.interpreter(path, num_threads=_THREADS.value)
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]

    def run(image):
        interpreter.set_tensor(source, image)
        interpreter.invoke()
        return interpreter.get_tensor(target)

    name = f"TFLite {tflite.TFLITE_DESCRIPTIONS[quantization]}, {litert.runtime_name()}"
    return Format(name, os.path.getsize(path), run, one_per_call=True)


def _onnx_format(path):
    session = onnx_export.session(path, num_threads=_THREADS.value)
    return Format("ONNX, ONNX Runtime", os.path.getsize(path),
                  lambda images: onnx_export.onnx_probabilities(session, images))


def _source(workdir):
    """(the Keras model, its class names, its SavedModel's path, {quantization:
    .tflite path} and the .onnx path or None, as written so far)."""
    if not _MODEL_DIR.value:
        model = classifier_lib.build_classifier(
            backbones.build_backbone(_BACKBONE.value, _IMAGE_SIZE.value, "none"),
            _BACKBONE.value, _CLASSES.value, _IMAGE_SIZE.value, dropout=0.0)
        class_names = [str(label) for label in range(_CLASSES.value)]
        saved_model = os.path.join(workdir, rundir.SAVED_MODEL_DIR)
        export.export_saved_model(model, saved_model, class_names, _IMAGE_SIZE.value)
        return model, class_names, saved_model, {}, None
    paths = rundir.RunPaths(_MODEL_DIR.value)
    with open(paths.class_names) as file:
        class_names = json.load(file)
    written = {}
    if os.path.isfile(paths.tflite):
        with open(paths.metrics) as file:
            written[json.load(file)["tflite"]["quantization"]] = paths.tflite
    return (predict.load_keras_model(_MODEL_DIR.value), class_names, paths.saved_model,
            written, paths.onnx if os.path.isfile(paths.onnx) else None)


def _convert_the_rest(model, class_names, written, onnx_path, workdir, images):
    """Converts, into `workdir`, the TFLite variants not in `written` and the
    ONNX file where `onnx_path` is None; returns the two, completed (a
    variant the converter failed on is left out, with a line that says why)."""
    size = images.shape[1]
    written = dict(written)
    for quantization in TFLITE_QUANTIZATIONS:
        if quantization not in written:
            path = os.path.join(workdir, f"model_{quantization}.tflite")
            problem = tflite.export_tflite(model, path, size, quantization, images)
            if problem:
                print(f"No {quantization} TFLite file: {problem}", flush=True)
            else:
                written[quantization] = path
    if onnx_path is None:
        onnx_path = os.path.join(workdir, rundir.ONNX_FILE)
        problem = onnx_export.export_onnx(model, onnx_path, size, class_names, "stretch")
        if problem:
            print(f"No ONNX file: {problem}", flush=True)
            onnx_path = None
    return written, onnx_path


def _time(formats, images):
    """Times every format, in turns; fills their `latencies` and `batch_seconds`."""
    for form in formats:
        for image in images[:_WARMUP.value]:
            form.run(image[None])
        form.batch(images[:_BATCH_SIZE.value])
    calls = -(-_CALLS.value // _ROUNDS.value)
    batches = -(-_BATCHES.value // _ROUNDS.value)
    for _ in range(_ROUNDS.value):
        for form in formats:
            for call in range(calls):
                image = images[call % len(images)][None]
                start = time.perf_counter()
                form.run(image)
                form.latencies.append(time.perf_counter() - start)
            for _ in range(batches):
                start = time.perf_counter()
                form.batch(images[:_BATCH_SIZE.value])
                form.batch_seconds.append(time.perf_counter() - start)


def _table(formats, images):
    reference = formats[0]
    expected = reference.batch(images).argmax(axis=1)
    base_median = statistics.median(reference.latencies)
    base_throughput = _BATCH_SIZE.value / statistics.median(reference.batch_seconds)
    lines = ["| format | bytes | 1 image: median | p90 | speed | batch of "
             f"{_BATCH_SIZE.value}: images/s | speed | top-1 as the SavedModel's |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for form in formats:
        median = statistics.median(form.latencies)
        p90 = float(np.percentile(form.latencies, 90))
        throughput = _BATCH_SIZE.value / statistics.median(form.batch_seconds)
        agree = float(np.mean(form.batch(images).argmax(axis=1) == expected))
        lines.append(f"| {form.name} | {form.bytes:,} | {1000 * median:.2f} ms | "
                     f"{1000 * p90:.2f} ms | {base_median / median:.2f} | {throughput:,.0f} | "
                     f"{throughput / base_throughput:.2f} | {agree:.0%} |")
    return "\n".join(lines)


def main(argv):
    del argv
    tf.config.threading.set_intra_op_parallelism_threads(_THREADS.value)
    with tempfile.TemporaryDirectory() as workdir:
        model, class_names, saved_model, written, onnx_path = _source(workdir)
        size = model.get_layer("preprocessing").image_size
        rng = np.random.default_rng(_SEED.value)
        images = rng.integers(0, 256, (max(_BATCH_SIZE.value, 32), size, size, 3),
                              dtype=np.uint8)
        with console.native_chatter_dropped():
            written, onnx_path = _convert_the_rest(model, class_names, written, onnx_path,
                                                   workdir, images)
        formats = [_saved_model_format(saved_model)]
        formats += [_tflite_format(written[quantization], quantization)
                    for quantization in TFLITE_QUANTIZATIONS if quantization in written]
        if onnx_path:
            formats.append(_onnx_format(onnx_path))
        _time(formats, images)
        print(f"\n{_CALLS.value} single-image calls and {_BATCHES.value} batches per "
              f"format, after {_WARMUP.value} calls of warm-up, in {_ROUNDS.value} turns; "
              f"{_THREADS.value} threads each; {size} px; speed: against the SavedModel.\n")
        print(_table(formats, images))


if __name__ == "__main__":
    app.run(main)
