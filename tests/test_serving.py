"""After training: the report, evaluate and predict modes, both serving
signatures, saved_model_cli's view and the TensorBoard logs."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from tl_keras import evaluate
from tl_keras import flags
from tl_keras import job


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
    assert report["loss"] == pytest.approx(-np.mean(np.log([0.8, 0.8, 0.1, 0.8, 0.1, 0.8])))
    by_class = {row["class"]: row for row in report["per_class"]}
    assert by_class["ant"] == pytest.approx(
        {"class": "ant", "precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert by_class["bee"]["precision"] == pytest.approx(0.5)
    assert by_class["bee"]["recall"] == pytest.approx(0.5)
    assert by_class["cat"]["precision"] == pytest.approx(0.5)
    assert by_class["cat"]["f1"] == pytest.approx(2 / 3)
    text = evaluate.format_report(report, "test")
    assert text.index("bee") < text.index("cat") < text.index("ant")  # worst first


def test_evaluate_mode_reproduces_the_training_runs_test_metrics(finished_run, capsys):
    config, metrics = finished_run
    with tfds.testing.mock_data(num_examples=64):
        report = job.run_evaluation(flags.run_config(config.model_dir), "test")

    assert report["top1"] == pytest.approx(metrics["test"]["top1"])
    assert report["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-4)
    out = capsys.readouterr().out
    assert "test: 64 examples, top-1" in out and "precision" in out
    directory = os.path.join(config.model_dir, "evaluation")
    assert sorted(os.listdir(directory)) == ["confusion_matrix.png", "metrics.json",
                                             "per_class.csv"]
    with open(os.path.join(directory, "per_class.csv")) as file:
        assert len(list(csv.DictReader(file))) == 10


def test_training_writes_training_curves(finished_run):
    config, _ = finished_run
    path = os.path.join(config.model_dir, "plots", "training_curves.png")
    assert Image.open(path).format == "PNG"


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

    predictions = job.run_prediction(config.model_dir, str(images), top_k=3,
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


def test_saved_model_cli_shows_both_signatures(finished_run):
    config, _ = finished_run
    cli = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        [cli, "show", "--dir", os.path.join(config.model_dir, "saved_model"), "--all"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for expected in ("signature_def['serving_default']", "signature_def['serving_bytes']",
                     "inputs['images']", "inputs['image_bytes']",
                     "outputs['probabilities']", "outputs['top_k_indices']",
                     "outputs['top_k_classes']", "shape: (-1, -1, -1, 3)"):
        assert expected in result.stdout


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
            "test_worst_mistakes", "final/test_top1", "phase_boundary"} <= tensors
    steps = [event.step for event in run.Tensors("learning_rate_per_step")]
    assert steps == list(range(len(steps))) and len(steps) == 3  # one per step, 3 epochs
    phases = [float(tf.make_ndarray(e.tensor_proto)) for e in run.Tensors("phase")]
    assert phases == [0.0, 1.0, 1.0]
    plugins = run.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins


def test_tflite_export_matches_the_saved_model(tmp_path, capsys):
    from conftest import run_job

    with tfds.testing.mock_data(num_examples=40):
        config, _ = run_job(tmp_path, "--export_tflite", "--finetune_epochs=0",
                            "--batch_size=16", "--backbone=mobilenetv3small")

    out = capsys.readouterr().out
    if "Skipped the TFLite export" in out:
        pytest.skip(out[out.index("Skipped the TFLite export"):].splitlines()[0])
    assert "its probabilities are within 0.0001 of the SavedModel's" in out
    assert os.path.getsize(os.path.join(config.model_dir, "model.tflite")) > 0


def test_profile_batches_write_a_profiler_trace(finished_run):
    config, _ = finished_run
    profile = os.path.join(config.model_dir, "tensorboard", "train", "plugins", "profile")
    traces = [name for _, _, names in os.walk(profile) for name in names]
    assert any(name.endswith(".xplane.pb") for name in traces), traces
