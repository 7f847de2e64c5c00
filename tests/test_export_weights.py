"""The model you export is the model you measured: the best epoch's weights,
computing in float32, in every exported file and the test metrics alike."""

import json
import os
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import run_job
from tl_keras import rundir
from tl_keras.data import pipeline
from tl_keras.model import backbones
from tl_keras.model import classifier as classifier_lib
from tl_keras.outputs import litert
from tl_keras.training import export_weights
from tl_keras.training import optimization
from tl_keras.training import recipe
from tl_keras.training import runstate


def _write_dark_and_bright_images(root):
    """Two classes a random network tells apart at once: dark and bright noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for label, name in enumerate(("dark", "bright")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.normal(40 if label == 0 else 215, 30, (16, 16, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{index}.png")


# VGG16, the suite's quickest backbone to trace, compile and save, from random
# weights: with no BatchNormalization its features follow the images'
# brightness, so the head learns the two classes at once.
BACKBONE = "vgg16"


@pytest.fixture(scope="module")
def bfloat16_run(tmp_path_factory):
    """VGG16 from random weights under bfloat16: it reaches 100% validation
    top-1 in the head phase, so fine-tuning can't beat it and the best epoch
    comes before the last."""
    tmp_path = tmp_path_factory.mktemp("bfloat16")
    _write_dark_and_bright_images(tmp_path / "images")
    reads = _TestSplitReads()
    with mock.patch.object(pipeline, "split_batches", reads.wrap(pipeline.split_batches)):
        config, metrics = run_job(
            tmp_path, f"--dataset=folder:{tmp_path / 'images'}", "--batch_size=8",
            # It learns from random weights; a high rate makes its head sure
            # of itself (see below) in two epochs.
            f"--backbone={BACKBONE}",
            "--head_epochs=2", "--head_learning_rate=0.3", "--finetune_epochs=1",
            "--warmup_epochs=0", "--finetune_learning_rate=1e-2",
            "--mixed_precision=bfloat16", "--export_tflite")
    # The run leaves Keras's global policy at mixed_bfloat16; the test that
    # built this fixture must load the exports under the default, as the rest do.
    keras.config.set_dtype_policy("float32")
    return config, metrics, reads.count


class _TestSplitReads:
    """Counts the passes over the test split's batches."""

    def __init__(self):
        self.count = 0

    def wrap(self, evaluation_batches):
        def counted(config, splits, split):
            batches = evaluation_batches(config, splits, split)
            return _CountedIterable(batches, self) if split == "test" else batches
        return counted


class _CountedIterable:
    """Passes over a dataset, counted; nothing else of it is reachable."""

    def __init__(self, batches, reads):
        self.batches, self.reads = batches, reads

    def __iter__(self):
        self.reads.count += 1
        return iter(self.batches)


@pytest.mark.slow
def test_the_test_split_is_read_once(bfloat16_run):
    """The evaluation, the Grad-CAM grid and the TFLite check share one pass."""
    _, _, reads = bfloat16_run
    assert reads == 1


def _weights_in(path, model):
    model.load_weights(path)
    return model.get_weights()


@pytest.mark.slow
def test_every_export_and_the_test_metrics_come_from_the_best_epoch(bfloat16_run, capsys):
    config, metrics, _ = bfloat16_run
    validation_top1 = [epoch["top1"] for epoch in _history_validation(config.model_dir)]
    assert max(validation_top1[:2]) == 1.0  # the head phase reached the best possible

    exported = metrics["exported"]
    assert (exported["weights"], exported["phase"]) == ("best", "head")
    assert exported["epoch"] == 1 + int(np.argmax(validation_top1))
    assert exported["epoch"] < 3  # not the last epoch, so the test means something
    with open(os.path.join(config.model_dir, "metrics.json")) as file:
        assert json.load(file)["exported"] == exported

    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    best = _weights_in(os.path.join(config.model_dir, "checkpoints", "best.weights.h5"),
                       keras.saving.load_model(os.path.join(config.model_dir, "model.keras")))
    for exported_weight, best_weight in zip(model.get_weights(), best):
        np.testing.assert_array_equal(exported_weight, best_weight)
    with np.load(rundir.RunPaths(config.model_dir).phase_end_weights("finetune")) as last:
        assert any(not np.array_equal(weight, last[f"arr_{index}"])
                   for index, weight in enumerate(model.get_weights()))

    backbone = model.get_layer(BACKBONE)
    saved_backbone = _weights_in(os.path.join(config.model_dir, "backbone.weights.h5"),
                                 keras.models.clone_model(backbone))
    for mine, theirs in zip(backbone.get_weights(), saved_backbone):
        np.testing.assert_array_equal(mine, theirs)

    # The test metrics are the SavedModel's own on the test images.
    serving = tf.saved_model.load(os.path.join(config.model_dir, "saved_model"))
    images, labels = _test_images(config)
    probabilities = serving.signatures["serving_default"](
        images=tf.constant(images))["probabilities"].numpy()
    assert metrics["test"]["top1"] == pytest.approx(np.mean(probabilities.argmax(1) == labels))


@pytest.mark.slow
def test_exports_compute_in_float32_after_bfloat16_training(bfloat16_run):
    config, _, _ = bfloat16_run
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    policies = {layer.dtype_policy.name for layer in model.get_layer(BACKBONE).layers}
    assert policies == {"float32"}

    serving = tf.saved_model.load(os.path.join(config.model_dir, "saved_model"))
    graph = serving.signatures["serving_default"].graph.as_graph_def()
    half = {tf.bfloat16.as_datatype_enum, tf.float16.as_datatype_enum}
    nodes = list(graph.node) + [node for function in graph.library.function
                                for node in function.node_def]
    half_nodes = [node.name for node in nodes
                  if any(value.type in half for value in node.attr.values())]
    assert not half_nodes, half_nodes[:5]

    interpreter = litert.interpreter(os.path.join(config.model_dir, "model.tflite"))
    dtypes = {np.dtype(detail["dtype"]).name for detail in interpreter.get_tensor_details()}
    assert not dtypes & {"float16", "bfloat16"}, dtypes

    # Same weights: the SavedModel gives what a float32 model gives, and not
    # what the bfloat16 model it was trained as gives. Compared as
    # log-probabilities: trained on an easy task, the model is sure of itself,
    # and bfloat16 shows in the smallest probabilities. On its own test
    # images: on random ones, between dark and bright, it is unsure.
    images, _ = _test_images(config)
    served = _log(serving.signatures["serving_default"](
        images=tf.constant(images))["probabilities"].numpy())
    np.testing.assert_allclose(served, _log(model.predict(images, verbose=0)), atol=1e-3)
    keras.config.set_dtype_policy("mixed_bfloat16")
    as_trained = classifier_lib.build_classifier(
        backbones.build_backbone(BACKBONE, 32, "none"), BACKBONE, 2, 32, 0.1)
    keras.config.set_dtype_policy("float32")
    as_trained.set_weights(model.get_weights())
    assert np.abs(_log(as_trained.predict(images, verbose=0)) - served).max() > 1e-2


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_model_keras_holds_the_trained_optimizer_under_a_mixed_policy(tmp_path, policy):
    """The float32 copy that is exported is compiled with the trained
    optimizer's state, which a mixed run's `model.keras` used to lose."""
    import tiny_training
    from tl_keras.outputs import export

    keras.config.set_dtype_policy(policy)
    model, _ = tiny_training.build()
    keras.config.set_dtype_policy("float32")
    model.compile(optimizer=optimization.make_optimizer("adamw", 1e-3, 0.05, rate_factors={}),
                  loss="categorical_crossentropy", metrics=["categorical_accuracy"])
    model.fit(tiny_training.one_batch(), steps_per_epoch=3, verbose=0)
    trained = getattr(model.optimizer, "inner_optimizer", model.optimizer)

    copy = classifier_lib.with_training_state(classifier_lib.float32_copy(model), model)
    export.save_keras_model(copy, str(tmp_path / "model.keras"))
    loaded = keras.saving.load_model(tmp_path / "model.keras")

    assert type(loaded.optimizer) is type(trained)
    assert int(loaded.optimizer.iterations) == int(trained.iterations) > 0
    assert len(loaded.optimizer.variables) == len(trained.variables)
    for mine, theirs in zip(loaded.optimizer.variables, trained.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine),
                                      keras.ops.convert_to_numpy(theirs))


def _log(probabilities):
    return np.log(np.maximum(probabilities, 1e-30))


@pytest.mark.slow
def test_export_weights_last_restores_the_last_epoch(bfloat16_run):
    config, _, _ = bfloat16_run
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    paths = rundir.RunPaths(config.model_dir)
    phases = recipe.plan_phases(head_epochs=2, head_learning_rate=0.3, finetune_epochs=1,
                               finetune_learning_rate=1e-2, warmup_epochs=0)
    exported = export_weights.restore_export_weights(
        model, model.get_layer(BACKBONE), "last", phases=phases, paths=paths,
        unfreeze="all", train_batchnorm=False, label_smoothing=0.0, train_batches=None,
        validation_batches=None)
    assert (exported["weights"], exported["epoch"], exported["phase"]) == (
        "last", 3, "finetune")
    with np.load(paths.phase_end_weights("finetune")) as last:
        for index, weight in enumerate(model.get_weights()):
            np.testing.assert_array_equal(weight, last[f"arr_{index}"])


@pytest.mark.parametrize("last_top1", [0.0, 1.0])
def test_best_weights_get_batchnorm_statistics_of_their_own(tmp_path, capsys, last_top1):
    """With --batchnorm=train, the recompute applies to the best epoch's
    weights when they are the ones exported, not only to the last epoch's;
    if they then validate below the last epoch, the last epoch's are best.
    The classifier was never compiled: phase 2 ran in a process before a kill."""
    backbone = backbones.build_backbone("mobilenetv3small", 32, "none")
    classifier = classifier_lib.build_classifier(backbone, "mobilenetv3small", 2, 32, 0.0,
                                                 train_batchnorm=True)
    paths = rundir.RunPaths(str(tmp_path))
    os.makedirs(os.path.dirname(paths.best_checkpoint))
    runstate.save_weights(classifier, paths.phase_end_weights("finetune"))
    last_weights = classifier.get_weights()
    batchnorm = [layer for layer in backbone.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in batchnorm:
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, 7.0, np.float32))
    classifier.save_weights(paths.best_checkpoint)
    progress = runstate.Progress(paths.progress)
    validation = {"top1": 0.5, "top5": 1.0, "label_smoothed_loss": 0.7}
    progress.record_epoch("finetune", 1, validation, is_best=True)
    last_validation = {"top1": last_top1, "top5": 1.0, "label_smoothed_loss": 0.7}
    progress.record_epoch("finetune", 2, last_validation, is_best=False)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    batches = tf.data.Dataset.from_tensor_slices(
        (images, np.eye(2, dtype=np.float32)[np.arange(16) % 2])).batch(8)
    phases = recipe.plan_phases(head_epochs=1, head_learning_rate=1e-3, finetune_epochs=2,
                               finetune_learning_rate=1e-3, warmup_epochs=0)
    exported = export_weights.restore_export_weights(
        classifier, backbone, "best", phases=phases, paths=paths, unfreeze="all",
        train_batchnorm=True, label_smoothing=0.0, train_batches=batches,
        validation_batches=batches)

    assert "Recomputed BatchNormalization statistics over 2 training batches" in \
        capsys.readouterr().out
    if last_top1 == 0.0:
        assert (exported["epoch"], exported["phase"]) == (2, "finetune")
        assert all(not np.allclose(layer.moving_mean.numpy(), 7.0) for layer in batchnorm)
        assert exported["validation"] != validation
    else:
        assert (exported["epoch"], exported["validation"]) == (3, last_validation)
        for weight, expected in zip(classifier.get_weights(), last_weights):
            np.testing.assert_array_equal(weight, expected)


def _history_validation(model_dir):
    import csv

    with open(os.path.join(model_dir, "history.csv"), newline="") as file:
        return [{"top1": float(row["val_top1"])} for row in csv.DictReader(file)]


def _test_images(config):
    root = config.dataset[len("folder:"):]
    images, labels = [], []
    for label, name in enumerate(("bright", "dark")):  # class names, sorted
        folder = os.path.join(root, "test", name)
        for file_name in sorted(os.listdir(folder)):
            images.append(np.array(Image.open(os.path.join(folder, file_name))))
            labels.append(label)
    return np.stack(images), np.array(labels)
