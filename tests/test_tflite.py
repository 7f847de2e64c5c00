"""model.tflite's variants (--tflite_quantization), their metrics.json entry,
the labels file beside them, and predicting with a .tflite file."""

import contextlib
import dataclasses
import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import sliced_mock
from conftest import TEST_BACKBONE, parse_config
from tl_keras.cli import job
from tl_keras.cli import modes

pytest.importorskip("tensorflow.lite.python.lite",
                    reason="this TensorFlow has no TFLite converter")

# The mock splits, and the colour folder's train and test splits, hold this
# many examples each; a run keeps every test image.
EXAMPLES = 40
# Each class a colour: even a network with random weights tells them apart, so
# the head learns them in a few cheap epochs, and a test can tell a model that
# learned from one that names a class at random or the same class for all.
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40),
           "white": (225, 225, 225)}


def _train(tmp_path, *args, **config_changes):
    """A one-epoch smoke run that exports model.tflite; (config, metrics, stdout)."""
    config, flagfile_text = parse_config(
        TEST_BACKBONE, f"--model_dir={tmp_path / 'run'}", "--export_tflite",
        "--finetune_epochs=0", "--batch_size=16", *args)
    # Changes no command line can make, such as a negative --tflite_max_drop.
    config = dataclasses.replace(config, **config_changes)
    printed = io.StringIO()
    with sliced_mock.mock_data(num_examples=EXAMPLES), contextlib.redirect_stdout(printed):
        metrics = job.run_training(config, flagfile_text=flagfile_text, verbose=0)
    return config, metrics, printed.getvalue()


def _write_colours(root, count, seed):
    """Writes `root/<colour>/<i>.png`: `count` noisy 32 px images of each colour."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """An int8 export of a model that learned the colours, its head trained
    on cached features, so in seconds."""
    tmp_path = tmp_path_factory.mktemp("int8")
    per_class = EXAMPLES // len(COLOURS)
    _write_colours(tmp_path / "colours" / "train", per_class, seed=0)
    _write_colours(tmp_path / "colours" / "test", per_class, seed=1)
    # A threshold below any drop, so the warning must appear.
    return _train(tmp_path, f"--dataset=folder:{tmp_path / 'colours'}", "--cache_features",
                  "--head_epochs=10", "--head_learning_rate=0.1",
                  "--tflite_quantization=int8", tflite_max_drop=-1.0)


def _interpreter(config):
    interpreter = tf.lite.Interpreter(os.path.join(config.model_dir, "model.tflite"))
    interpreter.allocate_tensors()
    return interpreter


def test_int8_file_takes_uint8_images_and_computes_in_int8(int8_run):
    config, _, _ = int8_run
    interpreter = _interpreter(config)
    [source] = interpreter.get_input_details()
    assert source["dtype"] == np.uint8
    assert list(source["shape"]) == [1, config.image_size, config.image_size, 3]
    # Not a quantized input (scale 0, zero point 0, TFLite's "none"): an app
    # feeds its pixels as they are, as to the SavedModel, not rescaled.
    assert source["quantization"] == (0.0, 0)
    assert source["quantization_parameters"]["scales"].size == 0
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    dtypes = [detail["dtype"] for detail in interpreter.get_tensor_details()]
    # Weights and activations in int8: only the input, its cast and the
    # dequantized output stay outside it.
    assert dtypes.count(np.int8) > 5 * dtypes.count(np.float32), dtypes


def _model_parameters(config):
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    return model.count_params()


def _check_tflite_entry(config, metrics, quantization, bytes_per_parameter):
    with open(os.path.join(config.model_dir, "metrics.json")) as file:
        written = json.load(file)["tflite"]
    assert written == metrics["tflite"]
    assert written["quantization"] == quantization
    assert written["bytes"] == os.path.getsize(os.path.join(config.model_dir, "model.tflite"))
    low, high = bytes_per_parameter
    assert low <= written["bytes"] / _model_parameters(config) <= high, written
    assert written["images"] == EXAMPLES
    assert 0 <= written["top1"] <= 1 and 0 <= written["float_top1"] <= 1
    assert written["float_top1"] == pytest.approx(metrics["test"]["top1"])
    assert written["drop_points"] == pytest.approx(
        100 * (written["float_top1"] - written["top1"]), abs=1e-3)


def test_int8_run_writes_its_tflite_entry(int8_run):
    config, metrics, printed = int8_run
    _check_tflite_entry(config, metrics, "int8", bytes_per_parameter=(0.9, 1.3))
    # Measured on a model that learned (chance is 25%), the int8 file keeps
    # its top-1; on a near-chance model, a drop of 0 says nothing.
    assert metrics["tflite"]["float_top1"] >= 0.9, metrics["tflite"]
    assert metrics["tflite"]["top1"] >= 0.9, metrics["tflite"]
    # 40 examples in train, less validation's 10%: all are calibration images.
    assert "bytes, calibrated on 36 training images) and labels.txt" in printed
    assert (f"test top-1 {metrics['tflite']['top1']:.2%} on all {EXAMPLES} test images"
            in printed)


@pytest.mark.slow  # Two whole runs; int8's and none's entries are checked without --slow.
@pytest.mark.parametrize("quantization, bytes_per_parameter",
                         [("dynamic", (0.9, 1.3)), ("float16", (1.8, 2.4))])
def test_each_quantization_writes_its_tflite_entry(tmp_path, quantization,
                                                   bytes_per_parameter):
    config, metrics, printed = _train(tmp_path, f"--tflite_quantization={quantization}")
    _check_tflite_entry(config, metrics, quantization, bytes_per_parameter)
    assert "Skipped the TFLite export" not in printed


def test_a_drop_past_the_threshold_is_said_plainly_and_the_file_kept(int8_run):
    config, _, printed = int8_run
    assert "Warning: the int8 model.tflite loses" in printed
    assert "more than --tflite_max_drop=-1. The file is kept. Likely causes:" in printed
    assert "calibration images (it used 36 training images)" in printed
    assert os.path.getsize(os.path.join(config.model_dir, "model.tflite")) > 0


def test_the_labels_file_lists_the_class_names_in_order(int8_run):
    config, _, _ = int8_run
    with open(os.path.join(config.model_dir, "class_names.json")) as file:
        class_names = json.load(file)
    with open(os.path.join(config.model_dir, "labels.txt"), encoding="utf-8") as file:
        assert file.read() == "".join(f"{name}\n" for name in class_names)


def _top1(predictions):
    return {path: ranked[0][0] for path, ranked in predictions}


def test_predict_on_the_int8_file_names_the_saved_models_classes(int8_run, tmp_path,
                                                                 capsys):
    config, _, _ = int8_run
    # Two new images of each colour, in a folder named for it.
    images = _write_colours(tmp_path / "images", count=2, seed=2)
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
