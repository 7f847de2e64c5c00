"""After training: the report, evaluate and predict modes, the serving
signatures, saved_model_cli's view against the serving tables of
docs/outputs-and-serving.md, and the TensorBoard logs."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

import sliced_mock
from conftest import REPO_ROOT
from tl_keras.cli import flags
from tl_keras.cli import modes
from tl_keras.outputs import evaluate


def test_report_matches_a_hand_computed_confusion_matrix():
    class_names = ["ant", "bee", "cat"]
    labels = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    probabilities = np.full((6, 3), 0.1)
    probabilities[np.arange(6), predicted] = 0.8

    report = evaluate.classification_report(probabilities, labels, class_names, top_k=2)

    np.testing.assert_array_equal(report["confusion"], [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert report["top1"] == pytest.approx(4 / 6)
    # Ties at 0.1 rank by index: the runner-up is the lowest other class.
    assert report["nll"] == pytest.approx(-np.mean(np.log([0.8, 0.8, 0.1, 0.8, 0.1, 0.8])))
    by_class = {row["class"]: row for row in report["per_class"]}
    assert by_class["ant"] == pytest.approx(
        {"class": "ant", "precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert by_class["bee"]["precision"] == pytest.approx(0.5)
    assert by_class["bee"]["recall"] == pytest.approx(0.5)
    assert by_class["cat"]["precision"] == pytest.approx(0.5)
    assert by_class["cat"]["f1"] == pytest.approx(2 / 3)
    text = evaluate.format_report(report, "test")
    assert text.index("bee") < text.index("cat") < text.index("ant")  # worst first


def test_evaluate_mode_reproduces_the_training_runs_test_metrics(finished_run_alone,
                                                                 capsys):
    config, metrics = finished_run_alone
    with sliced_mock.mock_data(num_examples=64):
        report = modes.run_evaluation(flags.run_config(config.model_dir), "test")

    assert report["top1"] == pytest.approx(metrics["test"]["top1"])
    assert report["nll"] == pytest.approx(metrics["test"]["nll"], rel=1e-4)
    out = capsys.readouterr().out
    assert "test: 64 examples, top-1" in out and "precision" in out
    directory = os.path.join(config.model_dir, "evaluation")
    assert sorted(os.listdir(directory)) == ["confusion_matrix.png", "gradcam.png",
                                             "metrics.json", "per_class.csv"]
    mistakes = round((1 - report["top1"]) * 64)
    shown = f"{min(mistakes, 12)} most confident mistakes and the {min(64 - mistakes, 4)} "
    assert f"Grad-CAM of the {shown}most confident right predictions: " \
           f"{directory}/gradcam.png" in out
    grid = np.asarray(Image.open(os.path.join(directory, "gradcam.png")).convert("RGB"))
    # Four tiles a row, each at least 128 px wide, titled: not blank.
    assert grid.shape[1] >= 4 * 128, grid.shape
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 100
    with open(os.path.join(directory, "per_class.csv")) as file:
        assert len(list(csv.DictReader(file))) == 10


def test_training_writes_training_curves(finished_run):
    config, _ = finished_run
    image = Image.open(os.path.join(config.model_dir, "plots", "training_curves.png"))
    assert image.format == "PNG"
    # Two panels side by side, 11 x 4 inches at 80 dpi, trimmed to what they draw.
    width, height = image.size
    assert 700 <= width <= 1000 and 250 <= height <= 400, image.size
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines and text, not blank


def _encoded(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def test_predict_names_the_bad_file_and_predicts_the_rest(finished_run, tmp_path, capsys):
    config, _ = finished_run
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for name, fmt in (("a.jpg", "JPEG"), ("b.PNG", "PNG"), ("nested/c.gif", "GIF")):
        (images / name).write_bytes(_encoded(rng.integers(0, 256, (40, 30, 3), np.uint8), fmt))
    (images / "bad.jpg").write_text("not an image")
    output = tmp_path / "predictions.csv"

    predictions = modes.run_prediction(config.model_dir, str(images), top_k=3,
                                     output=str(output))

    out = capsys.readouterr().out
    assert f"skipped {images / 'bad.jpg'}" in out
    assert len(predictions) == 3
    with open(os.path.join(config.model_dir, "class_names.json")) as file:
        class_names = json.load(file)
    for path, ranked in predictions:
        assert len(ranked) == 3 and all(name in class_names for name, _ in ranked)
        assert f"{path}: {ranked[0][0]} " in out
    with open(output) as file:
        rows = list(csv.DictReader(file))
    assert [row["path"] for row in rows] == [path for path, _ in predictions]
    assert set(rows[0]) == {"path", "class_1", "probability_1", "class_2",
                            "probability_2", "class_3", "probability_3"}


def test_predict_explain_writes_an_overlay_per_image_in_the_run(finished_run_alone, tmp_path,
                                                                capsys):
    config, _ = finished_run_alone
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "nested/b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(images / name)
    before = sorted(str(path) for path in images.rglob("*"))

    modes.run_prediction(config.model_dir, str(images), top_k=2, output=None, explain=True)

    out = capsys.readouterr().out
    explanations = os.path.join(config.model_dir, "explanations")
    for name in ("a.jpg", "a.png", "nested/b.jpg"):
        overlay = os.path.join(explanations, name + ".png")
        assert f"{images / name}: " in out and f" (Grad-CAM: {overlay})" in out, out
        with Image.open(overlay) as written:
            assert written.format == "PNG" and written.size[0] >= 128
    assert f"Wrote 3 Grad-CAM overlay(s) to {explanations}." in out
    # Nothing is written beside the user's images.
    assert sorted(str(path) for path in images.rglob("*")) == before


@pytest.fixture(scope="module")
def signatures(finished_run):
    config, _ = finished_run
    serving = tf.saved_model.load(os.path.join(config.model_dir, "saved_model"))
    return serving.signatures


@pytest.mark.parametrize("height, width", [(32, 32), (48, 40), (20, 28)])
def test_both_signatures_agree_on_the_same_images(signatures, height, width):
    rng = np.random.default_rng(1)
    encoded = [_encoded(rng.integers(0, 256, (height, width, 3), np.uint8), "JPEG")
               for _ in range(3)]
    decoded = tf.stack([tf.io.decode_jpeg(content, channels=3) for content in encoded])

    from_bytes = signatures["serving_bytes"](image_bytes=tf.constant(encoded))
    from_pixels = signatures["serving_default"](images=decoded)

    # The bytes path resizes before batching and rounds to uint8, and the
    # model rounds its own resize the same way: the same pixels at any size.
    np.testing.assert_allclose(from_bytes["probabilities"].numpy(),
                               from_pixels["probabilities"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(from_bytes["top_k_indices"].numpy(),
                                  from_pixels["top_k_indices"].numpy())
    classes = from_pixels["top_k_classes"].numpy()
    assert classes.shape == (3, 5) and classes.dtype == object


def test_bad_serving_input_says_what_is_wrong(signatures):
    errors = (TypeError, ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(errors, match="expected to be a uint8 tensor but is a float tensor"):
        signatures["serving_default"](images=tf.zeros([1, 32, 32, 3], tf.float32))
    # TensorFlow folds any in-graph rank check against the signature's static
    # rank, so the resize kernel is what reports a missing batch axis.
    with pytest.raises(errors, match=r"must be 4-dimensional\[32,32,3\]"):
        signatures["serving_default"](images=tf.zeros([32, 32, 3], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP"):
        signatures["serving_bytes"](image_bytes=tf.constant([b"hello, not an image"]))


def _documented_signatures():
    """{signature: {(input|output, name): (dtype, shape text)}} from the
    Serving section of docs/outputs-and-serving.md: a `### `name`` heading,
    then a table."""
    with open(os.path.join(REPO_ROOT, "docs", "outputs-and-serving.md")) as file:
        page = file.read()
    serving = re.search(r"^## Serving\n(.*?)(?=^## |\Z)", page, re.S | re.M).group(1)
    signatures = {}
    for name, body in re.findall(r"^### `(\w+)`\n(.*?)(?=^### |\Z)", serving, re.S | re.M):
        rows = re.findall(r"^\| (input|output) \| `(\w+)` \| (\w+) \| `(\[.*\])` \|$",
                          body, re.M)
        signatures[name] = {(kind, tensor): (dtype, shape) for kind, tensor, dtype, shape in rows}
    return signatures


def _cli_signatures(saved_model):
    """The same, from `saved_model_cli show --all`, shapes as tuples."""
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
         "--dir", saved_model, "--all"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    dtypes = {"DT_UINT8": "uint8", "DT_FLOAT": "float32", "DT_INT32": "int32",
              "DT_STRING": "string"}
    signatures = {}
    for name, body in re.findall(r"^signature_def\['(\w+)'\]:\n(.*?)Method name",
                                 result.stdout, re.S | re.M):
        if name == "__saved_model_init_op":
            continue
        tensors = re.findall(
            r"(input|output)s\['(\w+)'\] tensor_info:\n\s+dtype: (\w+)\n\s+shape: \((.*?)\)",
            body)
        signatures[name] = {
            (kind, tensor): (dtypes[dtype], tuple(int(d) for d in shape.split(",") if d.strip()))
            for kind, tensor, dtype, shape in tensors
        }
    return signatures


def test_the_documented_serving_tables_are_what_saved_model_cli_shows(tmp_path):
    import keras

    from tl_keras.outputs import export

    # Three classes, fewer than the five top-k outputs, so a shape that
    # confuses `classes`, 5 and min(5, classes) shows.
    class_names = ["ant", "bee", "cat"]
    inputs = keras.Input((None, None, 3), dtype="uint8")
    features = keras.layers.GlobalAveragePooling2D()(keras.ops.cast(inputs, "float32"))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(features))
    export.export_saved_model(model, str(tmp_path / "saved_model"), class_names, image_size=32)

    shown = _cli_signatures(str(tmp_path / "saved_model"))
    documented = _documented_signatures()

    assert sorted(documented) == sorted(shown) == ["probabilities", "serving_bytes",
                                                   "serving_default", "serving_tta"]
    sizes = {"batch": -1, "height": -1, "width": -1, "classes": len(class_names), "min": min}
    for signature, tensors in documented.items():
        assert sorted(tensors) == sorted(shown[signature]), signature
        for key, (dtype, shape) in tensors.items():
            expected = (dtype, tuple(eval(shape, {"__builtins__": {}}, sizes)))
            assert expected == shown[signature][key], (signature, key, shape)


def _tags(directory):
    accumulator = event_accumulator.EventAccumulator(directory, size_guidance={
        event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0,
        event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_holds_the_promised_scalars_images_and_hparams(finished_run):
    config, _ = finished_run
    root = os.path.join(config.model_dir, "tensorboard")
    for split in ("train", "validation"):
        scalars = _tags(os.path.join(root, split)).Tags()["tensors"]
        assert {"epoch_loss", "epoch_top1", "epoch_top5"} <= set(scalars), split
    run = _tags(os.path.join(root, "run"))
    tensors = set(run.Tags()["tensors"])
    assert {"learning_rate_per_step", "phase", "training_inputs",
            "validation_confusion_matrix/head", "validation_confusion_matrix/finetune",
            "test_gradcam", "final/test_top1", "phase_boundary"} <= tensors
    steps = [event.step for event in run.Tensors("learning_rate_per_step")]
    assert steps == list(range(len(steps))) and len(steps) == 3  # one per step, 3 epochs
    phases = [float(tf.make_ndarray(e.tensor_proto)) for e in run.Tensors("phase")]
    assert phases == [0.0, 1.0, 1.0]
    plugins = run.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins


def test_tflite_export_matches_the_saved_model(messy_folder_run, tmp_path, capsys):
    """On the messy folder run, which exports a float32 model.tflite (see
    tests/messy_folder.py): images of many sizes, centre-cropped."""
    pytest.importorskip("tensorflow.lite.python.lite",
                        reason="this TensorFlow has no TFLite converter")
    config, _, out = messy_folder_run

    # The run goes on without model.tflite when the converter fails; here
    # that is a regression to see.
    assert "Skipped the TFLite export" not in out
    assert "its probabilities are within 0.0001 of the SavedModel's" in out
    assert os.path.getsize(os.path.join(config.model_dir, "model.tflite")) > 0
    with open(os.path.join(config.model_dir, "metrics.json")) as file:
        entry = json.load(file)["tflite"]
    assert entry["quantization"] == "none" and entry["drop_points"] == 0
    assert entry["bytes"] == os.path.getsize(os.path.join(config.model_dir, "model.tflite"))

    # Predicting with the file prints what the SavedModel prints.
    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(np.random.default_rng(0).integers(
            0, 256, (6, 40, 24, 3), dtype=np.uint8)):
        Image.fromarray(image).save(images / f"{index}.png")
    modes.run_prediction(config.model_dir, str(images), top_k=2, output=None)
    from_saved_model = capsys.readouterr().out
    # The file holds no --resize: it is given the run's, crop.
    modes.run_prediction(os.path.join(config.model_dir, "model.tflite"), str(images),
                       top_k=2, output=None, resize=config.resize)
    assert capsys.readouterr().out == from_saved_model
    # With --tta=flip too: the file runs on each image and its mirror, as
    # serving_tta does.
    modes.run_prediction(config.model_dir, str(images), top_k=2, output=None, tta="flip")
    averaged = capsys.readouterr().out
    modes.run_prediction(os.path.join(config.model_dir, "model.tflite"), str(images),
                       top_k=2, output=None, resize=config.resize, tta="flip")
    assert capsys.readouterr().out == averaged
    announced, *predictions = averaged.splitlines()
    assert announced.startswith("--tta=flip: ")
    assert predictions != from_saved_model.splitlines()


def test_profile_batches_write_a_profiler_trace(finished_run):
    config, _ = finished_run
    profile = os.path.join(config.model_dir, "tensorboard", "train", "plugins", "profile")
    traces = [name for _, _, names in os.walk(profile) for name in names]
    assert any(name.endswith(".xplane.pb") for name in traces), traces
