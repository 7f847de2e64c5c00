"""--tta=flip: each image's probabilities averaged with its mirror image's, in
the test evaluation of a run, --mode=evaluate, --mode=predict and the
SavedModel's serving_tta signature."""

import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from absl.testing import flagsaver
from PIL import Image

import sliced_mock
from tl_keras.cli import flags
from tl_keras.cli import modes
from tl_keras.outputs import evaluate
from tl_keras.outputs import export

CLASS_NAMES = ["ant", "bee", "cat"]


def _model(mirror_symmetric):
    """A three-class model on 8 px images: mirror-symmetric when it pools over
    the whole image first, not when every pixel has a weight of its own."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    pixels = keras.ops.cast(inputs, "float32") / 255
    if mirror_symmetric:
        features = keras.layers.GlobalAveragePooling2D()(pixels)
    else:
        features = keras.layers.Flatten()(pixels)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(features))


def _images(count=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 8, 8, 3), np.uint8)


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _reports(model, images, labels, tta):
    batches = tf.data.Dataset.from_tensor_slices(
        (images, tf.one_hot(labels, len(CLASS_NAMES)))).batch(4)
    return evaluate.reports(batches, evaluate.keras_predictor(model), CLASS_NAMES, tta=tta)


def test_flip_reports_the_mean_of_each_image_and_its_mirror():
    model = _model(mirror_symmetric=False)
    images, labels = _images(), np.array([0, 1, 2, 0, 1, 2])

    plain, flipped = _reports(model, images, labels, tta="flip")

    mean = (model.predict(images, verbose=0)
            + model.predict(images[:, :, ::-1].copy(), verbose=0)) / 2
    expected = evaluate.classification_report(mean, labels, CLASS_NAMES)
    assert flipped["nll"] == pytest.approx(expected["nll"], rel=1e-6)
    np.testing.assert_array_equal(flipped["confusion"], expected["confusion"])
    # The model is not mirror-symmetric, so averaging changes the probabilities.
    assert flipped["nll"] != pytest.approx(plain["nll"], rel=1e-4)
    unflipped, none = _reports(model, images, labels, tta="none")
    assert unflipped["nll"] == plain["nll"] and none is None


def test_flip_changes_nothing_for_a_mirror_symmetric_model():
    model = _model(mirror_symmetric=True)
    images, labels = _images(), np.array([0, 1, 2, 0, 1, 2])

    plain, flipped = _reports(model, images, labels, tta="flip")

    assert flipped["nll"] == pytest.approx(plain["nll"], rel=1e-6)
    np.testing.assert_array_equal(flipped["confusion"], plain["confusion"])


@pytest.mark.parametrize("mirror_symmetric", [False, True])
def test_serving_tta_averages_each_image_with_its_mirror(tmp_path, mirror_symmetric):
    path = str(tmp_path / "saved_model")
    export.export_saved_model(_model(mirror_symmetric), path, CLASS_NAMES, image_size=8)
    signatures = tf.saved_model.load(path).signatures
    images = _images()

    def probabilities(signature, pixels):
        encoded = tf.constant([_png(image) for image in pixels])
        return signatures[signature](image_bytes=encoded)["probabilities"].numpy()

    plain = probabilities("serving_bytes", images)
    mirror = probabilities("serving_bytes", images[:, :, ::-1])
    averaged = signatures["serving_tta"](image_bytes=tf.constant([_png(i) for i in images]))

    np.testing.assert_allclose(averaged["probabilities"].numpy(), (plain + mirror) / 2,
                               atol=1e-6)
    assert (np.abs(averaged["probabilities"].numpy() - plain).max() < 1e-6) == mirror_symmetric
    assert averaged["top_k_classes"].shape == (6, 3)


def test_evaluate_mode_reports_both_figures(finished_run_alone, capsys):
    config, metrics = finished_run_alone
    with sliced_mock.mock_data(num_examples=64):
        report = modes.run_evaluation(flags.run_config(config.model_dir), "test", tta="flip")

    with open(os.path.join(config.model_dir, "evaluation", "metrics.json")) as file:
        written = json.load(file)
    # The plain figures are still the training run's; the averaged ones differ
    # (test_flip_reports_the_mean_of_each_image_and_its_mirror checks how).
    assert written["top1"] == pytest.approx(metrics["test"]["top1"])
    assert written["nll"] == report["nll"] == pytest.approx(metrics["test"]["nll"], rel=1e-4)
    assert set(written["tta_flip"]) == {"top1", "top5", "nll"}
    assert written["tta_flip"]["nll"] != pytest.approx(written["nll"], rel=1e-4)
    printed = capsys.readouterr().out
    assert f"test: 64 examples, {evaluate.headline(report)}\n" in printed
    assert (f"test with --tta=flip (each image averaged with its mirror): "
            f"{evaluate.headline(written['tta_flip'])}\n") in printed


def test_predict_with_flip_averages_the_image_and_its_mirror(finished_run, tmp_path):
    config, _ = finished_run
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8)
    for name, pixels in (("image", image), ("mirror", image[:, ::-1])):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")

    def probabilities(tta):
        predictions = modes.run_prediction(config.model_dir, str(tmp_path), top_k=10,
                                         output=None, tta=tta)
        return {os.path.basename(path)[:-4]: dict(ranked) for path, ranked in predictions}

    averaged, plain = probabilities("flip"), probabilities("none")

    for name in plain["image"]:
        assert averaged["image"][name] == pytest.approx(
            (plain["image"][name] + plain["mirror"][name]) / 2, abs=1e-6)
        # An image and its mirror average to the same probabilities.
        assert averaged["mirror"][name] == pytest.approx(averaged["image"][name], abs=1e-6)
    assert max(abs(averaged["image"][name] - plain["image"][name])
               for name in plain["image"]) > 1e-4


def test_a_runs_test_evaluation_reports_both_figures(imbalanced_run):
    config, metrics, printed = imbalanced_run
    with open(os.path.join(config.model_dir, "metrics.json")) as file:
        written = json.load(file)
    assert written == metrics
    assert set(written["test_tta_flip"]) == set(written["test"]) == {"top1", "top5", "nll"}
    flipped = evaluate.headline(written["test_tta_flip"])
    assert f"Test (test): {evaluate.headline(written['test'])}; with --tta=flip, {flipped}." \
        in printed
    assert "; with --tta=flip, top-1 " in printed.split("Done.")[1]


def test_evaluate_and_predict_take_the_runs_tta_unless_given_one(finished_run,
                                                                 imbalanced_run):
    with flagsaver.flagsaver():
        absl_flags.FLAGS.unparse_flags()
        absl_flags.FLAGS(["run.py", "--mode=evaluate", "--model_dir=RUN"])
        assert flags.mode()["tta"] is None
        absl_flags.FLAGS(["run.py", "--mode=evaluate", "--model_dir=RUN", "--tta=none"])
        assert flags.mode()["tta"] == "none"
    assert flags.run_setting(imbalanced_run[0].model_dir, "tta") == "flip"
    assert flags.run_setting(finished_run[0].model_dir, "tta") == "none"
    assert flags.run_setting("/nonexistent", "tta") == "none"
