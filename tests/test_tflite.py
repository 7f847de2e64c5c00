"""model.tflite's variants (--tflite_quantization), their metrics.json entry,
the labels file beside them, and predicting with a .tflite file; all in LiteRT."""

import json
import os

import ai_edge_litert.interpreter
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import COLOUR_EXAMPLES, refuse_tf_lite_interpreter, write_colours
from tl_keras.cli import modes
from tl_keras.outputs import litert
from tl_keras.outputs import predict
from tl_keras.outputs import tflite

pytest.importorskip("tensorflow.lite.python.lite",
                    reason="this TensorFlow has no TFLite converter")

# deploy_run's test split holds this many images, and a run checks every
# test image; the quantization tests check as many.
EXAMPLES = COLOUR_EXAMPLES


def _interpreter(config):
    interpreter = litert.interpreter(os.path.join(config.model_dir, "model.tflite"))
    # LiteRT's, as on a phone, not TensorFlow's deprecated one.
    assert isinstance(interpreter, ai_edge_litert.interpreter.Interpreter)
    return interpreter


def test_int8_file_takes_uint8_images_and_computes_in_int8(deploy_run):
    config, _, _ = deploy_run
    interpreter = _interpreter(config)
    [source] = interpreter.get_input_details()
    assert source["dtype"] == np.uint8
    assert list(source["shape"]) == [1, config.image_size, config.image_size, 3]
    # Not a quantized input (scale 0, zero point 0, TFLite's "none"): an app
    # feeds its pixels as they are, as to the SavedModel, not rescaled.
    assert source["quantization"] == (0.0, 0)
    assert source["quantization_parameters"]["scales"].size == 0
    assert source["quantization_parameters"]["zero_points"].size == 0
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    dtypes = [detail["dtype"] for detail in interpreter.get_tensor_details()]
    # Weights and activations in int8: only the input, its cast and the
    # dequantized output stay outside it.
    assert dtypes.count(np.int8) > 5 * dtypes.count(np.float32), dtypes


def _model_parameters(config):
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    return model.count_params()


def _check_tflite_entry(config, metrics, quantization, bytes_per_parameter):
    """The run's entry: in metrics.json, as the export returned it."""
    with open(os.path.join(config.model_dir, "metrics.json")) as file:
        written = json.load(file)["tflite"]
    assert written == metrics["tflite"]
    _check_entry(written, os.path.join(config.model_dir, "model.tflite"),
                 _model_parameters(config), quantization, bytes_per_parameter)
    assert written["float_top1"] == pytest.approx(metrics["test"]["top1"])


def _check_entry(written, path, parameters, quantization, bytes_per_parameter):
    assert written["quantization"] == quantization
    assert written["runtime"] == "LiteRT"
    assert written["bytes"] == os.path.getsize(path)
    low, high = bytes_per_parameter
    assert low <= written["bytes"] / parameters <= high, written
    assert written["images"] == EXAMPLES
    # Every variant's parity with the SavedModel is recorded; float32's is checked.
    assert written["check_images"] == 32
    assert 0 <= written["max_difference"] <= 1, written
    assert 0 <= written["top1"] <= 1 and 0 <= written["float_top1"] <= 1
    assert written["drop_points"] == pytest.approx(
        100 * (written["float_top1"] - written["top1"]), abs=1e-3)


def test_deploy_run_writes_its_tflite_entry(deploy_run):
    config, metrics, printed = deploy_run
    _check_tflite_entry(config, metrics, "int8", bytes_per_parameter=(0.9, 1.3))
    # Measured on a model that learned (chance is 25%), the int8 file keeps
    # its top-1; on a near-chance model, a drop of 0 says nothing.
    assert metrics["tflite"]["float_top1"] >= 0.9, metrics["tflite"]
    assert metrics["tflite"]["top1"] >= 0.9, metrics["tflite"]
    # 40 examples in train, less validation's 10%: all are calibration images.
    assert "bytes, calibrated on 36 training images) and labels.txt" in printed
    assert (f"test top-1 {metrics['tflite']['top1']:.2%} on all {EXAMPLES} test images"
            in printed)


@pytest.mark.slow  # Two conversions of VGG16; int8's and none's entries are checked without --slow.
@pytest.mark.parametrize("quantization, bytes_per_parameter",
                         [("dynamic", (0.9, 1.3)), ("float16", (1.8, 2.4))])
def test_each_quantization_writes_its_tflite_entry(finished_run, tmp_path, capsys,
                                                   quantization, bytes_per_parameter):
    """The export a run calls, on finished_run's model, once per quantization:
    which file a run writes is --tflite_quantization's only effect, and the
    runs of deploy_run (int8) and test_serving (none) check that a run
    records the entry the export returns in metrics.json."""
    config, _ = finished_run
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    size = config.image_size
    images = np.random.default_rng(0).integers(0, 256, (EXAMPLES, size, size, 3), np.uint8)
    labels = np.arange(EXAMPLES) % 10
    float_predicted = model.predict(images, verbose=0).argmax(axis=1)
    path = str(tmp_path / "model.tflite")
    entry = tflite.export_checked_tflite(
        model, path, image_size=size, quantization=quantization, max_drop=100.0,
        class_names=[str(index) for index in range(10)],
        labels_path=str(tmp_path / "labels.txt"), representative_images=(),
        test_images=images, test_labels=labels, float_predicted=float_predicted,
        test_examples=EXAMPLES, load_serving=lambda: predict.load_serving(config.model_dir))
    _check_entry(entry, path, model.count_params(), quantization, bytes_per_parameter)
    assert entry["float_top1"] == pytest.approx(np.mean(float_predicted == labels))
    assert "Skipped the TFLite export" not in capsys.readouterr().out


def test_a_drop_past_the_threshold_is_said_plainly_and_the_file_kept(deploy_run):
    config, _, printed = deploy_run
    assert "Warning: the int8 model.tflite loses" in printed
    assert "more than --tflite_max_drop=-1. The file is kept. Likely causes:" in printed
    assert "calibration images (it used 36 training images)" in printed
    assert os.path.getsize(os.path.join(config.model_dir, "model.tflite")) > 0


def test_the_labels_file_lists_the_class_names_in_order(deploy_run):
    config, _, _ = deploy_run
    with open(os.path.join(config.model_dir, "class_names.json")) as file:
        class_names = json.load(file)
    with open(os.path.join(config.model_dir, "labels.txt"), encoding="utf-8") as file:
        assert file.read() == "".join(f"{name}\n" for name in class_names)


def _top1(predictions):
    return {path: ranked[0][0] for path, ranked in predictions}


def test_predict_on_the_int8_file_names_the_saved_models_classes(deploy_run, tmp_path,
                                                                 capsys, monkeypatch):
    config, _, _ = deploy_run
    monkeypatch.setattr(tf.lite, "Interpreter", refuse_tf_lite_interpreter)
    # Two new images of each colour, in a folder named for it.
    images = write_colours(tmp_path / "images", count=2, seed=2)
    from_saved_model = modes.run_prediction(config.model_dir, str(images), top_k=3,
                                            output=None)
    capsys.readouterr()
    tflite = os.path.join(config.model_dir, "model.tflite")
    from_tflite = modes.run_prediction(tflite, str(images), top_k=3, output=None)

    printed = capsys.readouterr().out
    assert "Predicted 8 image(s); skipped 0." in printed
    assert len(from_tflite) == 8 and all(len(ranked) == 3 for _, ranked in from_tflite)
    saved, quantized = _top1(from_saved_model), _top1(from_tflite)
    truth = {path: os.path.basename(os.path.dirname(path)) for path in saved}
    # The model learned the colours, so agreeing with it means something: 6
    # right of 8 (chance is 2) names at least 3 classes, where a model that
    # names one class for every image gets 2.
    assert sum(saved[path] == truth[path] for path in saved) >= 6, (saved, truth)
    # int8 rounds the probabilities, so a near tie may go the other way.
    agree = sum(saved[path] == quantized[path] for path in saved)
    assert agree >= 7, (saved, quantized)


def test_without_litert_tflite_files_run_in_tensorflow_and_it_says_so(deploy_run,
                                                                      monkeypatch, capsys):
    config, _, _ = deploy_run
    path = os.path.join(config.model_dir, "model.tflite")
    # As on a platform without an ai-edge-litert wheel.
    monkeypatch.setattr(litert, "_litert", None)
    monkeypatch.setattr(litert, "_fallback_announced", False)
    first, second = litert.interpreter(path), litert.interpreter(path)
    assert isinstance(first, tf.lite.Interpreter) and isinstance(second, tf.lite.Interpreter)
    printed = capsys.readouterr().out
    assert printed.count("Note: the ai-edge-litert package is not installed") == 1, printed
    assert "runs them in LiteRT" in printed
    assert litert.runtime_name() == "tf.lite.Interpreter"
