"""--class_weight=balanced: the weights, their sample weights in the training
batches, and their effect on what a model trained on an imbalanced set predicts."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import IMBALANCED_TRAIN, parse_config, run_job, write_imbalanced_folder
from tl_keras.data import folder
from tl_keras.data import pipeline
from tl_keras.training import optimization
from tl_keras.training import recipe


@pytest.mark.parametrize("counts, expected", [
    # scikit-learn's compute_class_weight("balanced"): n / (classes * count).
    ([90, 10], [100 / (2 * 90), 100 / (2 * 10)]),
    ([5, 5, 5], [1.0, 1.0, 1.0]),
    ([30, 60, 10], [100 / (3 * 30), 100 / (3 * 60), 100 / (3 * 10)]),
    # A class without training examples is left out of n_classes, and weighs 0.
    ([30, 0, 10], [40 / (2 * 30), 0.0, 40 / (2 * 10)]),
])
def test_balanced_weights_are_scikit_learns(counts, expected):
    weights = recipe.balanced_class_weights(counts)

    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    # Averaged over the training examples, the weights are 1: the loss keeps its scale.
    assert np.dot(weights, counts) / sum(counts) == pytest.approx(1.0)


def test_the_weights_are_described_by_class():
    counts = [90, 10, 0]
    weights = recipe.balanced_class_weights(counts)
    assert recipe.describe_class_weights(weights, counts, ["cat", "dog", "eel"]) == (
        "cat 0.56, dog 5.00, eel 0 (no training examples)")
    assert recipe.describe_class_weights(np.ones(2), [7, 7], ["cat", "dog"]) == (
        "1 for every class (each has the same number of training examples)")


def _batches(class_weights, **augmentation):
    labels = np.array([0, 0, 0, 1, 0, 0, 1, 0])
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), np.uint8)
    return pipeline.training_batches(
        tf.data.Dataset.from_tensor_slices((images, labels)), num_examples=8,
        image_shape=(4, 4, 3), image_size=4, num_classes=2, batch_size=4, seed=0,
        repeat=False, class_weights=class_weights, **augmentation)


@pytest.mark.parametrize("augmentation", [{}, {"mixup": 0.4}, {"cutmix": 1.0}])
def test_each_training_example_weighs_its_labels_classes(augmentation):
    class_weights = np.array([0.5, 3.0], np.float32)
    batches = list(_batches(class_weights, **augmentation))

    mixed = False
    for images, labels, weights in batches:
        # A one-hot label weighs its class's weight; a mixed one, the mix.
        np.testing.assert_allclose(weights.numpy(), labels.numpy() @ class_weights, rtol=1e-6)
        mixed |= bool(np.any((labels.numpy() > 0) & (labels.numpy() < 1)))
    assert mixed == bool(augmentation)
    # Without class weights, a batch is (images, labels) as before.
    assert all(len(batch) == 2 for batch in _batches(None, **augmentation))


def test_cached_feature_batches_carry_weights_for_training_only():
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.array([0, 0, 0, 0, 1, 1])
    class_weights = np.array([0.75, 1.5], np.float32)
    training = pipeline.feature_batches(features, labels, num_classes=2, batch_size=3,
                                        seed=0, class_weights=class_weights)
    for _, one_hot, weights in training.take(4):
        np.testing.assert_allclose(weights.numpy(), one_hot.numpy() @ class_weights)
    validation = pipeline.feature_batches(features, labels, num_classes=2, batch_size=3)
    assert all(len(batch) == 2 for batch in validation)


def _brightness_classes(counts, seed):
    """Images whose class is their brightness, under noise; class 0 darker."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    means = np.array([112, 144])[labels]
    pixels = rng.normal(means[:, None, None, None], 40, (len(labels), 8, 8, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def _majority_share_after_training(class_weights):
    """Trains a small classifier on 200 dark and 20 bright images; returns the
    share of a balanced test set it calls dark, and its top-1 there."""
    keras.utils.set_random_seed(0)
    images, labels = _brightness_classes([200, 20], seed=0)
    batches = pipeline.training_batches(
        tf.data.Dataset.from_tensor_slices((images, labels)), num_examples=len(labels),
        image_shape=(8, 8, 3), image_size=8, num_classes=2, batch_size=20, seed=0,
        repeat=False, class_weights=class_weights)
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.ops.cast(inputs, "float32") / 255 - 0.5)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy")
    model.fit(batches, epochs=3, shuffle=False, verbose=0)
    test_images, test_labels = _brightness_classes([100, 100], seed=1)
    predicted = model.predict(test_images, verbose=0).argmax(axis=1)
    return np.mean(predicted == 0), np.mean(predicted == test_labels)


def test_balanced_weights_stop_an_imbalanced_set_predicting_its_majority():
    unweighted_share, unweighted_top1 = _majority_share_after_training(None)
    balanced_share, balanced_top1 = _majority_share_after_training(
        recipe.balanced_class_weights([200, 20]))

    # Unweighted, the common class wins nearly everything; balanced, about half.
    assert unweighted_share > 0.9
    assert balanced_share < 0.6
    assert balanced_top1 > unweighted_top1 + 0.3


def test_folder_splits_count_their_training_images_by_class(tmp_path):
    dataset = write_imbalanced_folder(str(tmp_path))
    splits = folder.load_folder(dataset, image_size=32, resize="stretch", val_fraction=0.1,
                                seed=0, strict=False, classes=(),
                                train_examples_per_class=None)
    assert splits.class_names == ("common", "rare")
    assert splits.train_class_counts == (IMBALANCED_TRAIN["common"], IMBALANCED_TRAIN["rare"])


def test_a_run_prints_its_weights_and_records_the_flag(imbalanced_run):
    config, _, printed = imbalanced_run
    # 44 images, 40 common and 4 rare: 44 / (2 * 40) and 44 / (2 * 4).
    assert "Class weights (balanced): common 0.55, rare 5.50.\n" in printed
    with open(os.path.join(config.model_dir, "flags.txt")) as file:
        assert "--class_weight=balanced\n" in file.read()
    rerun, _ = parse_config(flagfile=os.path.join(config.model_dir, "flags.txt"))
    assert rerun.class_weight == "balanced"


def _majority_predictions(tmp_path, *args):
    """Trains on the imbalanced folder; how many of its 16 balanced test images
    the exported model.keras calls `common` (read straight from the files: a
    --mode=evaluate run, which would load the SavedModel and draw its Grad-CAM
    grid, costs seconds that this check doesn't need)."""
    from PIL import Image

    root = tmp_path / "images"
    dataset = write_imbalanced_folder(str(root))
    config, _ = run_job(tmp_path, f"--dataset={dataset}", "--cache_features",
                        "--head_epochs=4", "--head_learning_rate=1e-2",
                        "--finetune_epochs=0", "--batch_size=22", "--export_weights=last", *args)
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    images = np.stack([np.asarray(Image.open(path).convert("RGB"))
                       for path in sorted((root / "test").glob("*/*.png"))])
    assert len(images) == 16
    # Class 0 is `common`, the first in alphabetical order.
    return int((model.predict(images, verbose=0).argmax(axis=1) == 0).sum())


@pytest.mark.slow  # Two whole runs; the weights' effect is checked without --slow above.
def test_a_balanced_run_predicts_the_majority_class_less_often(tmp_path):
    unweighted = _majority_predictions(tmp_path / "unweighted")
    balanced = _majority_predictions(tmp_path / "balanced", "--class_weight=balanced")

    assert unweighted >= 12, unweighted
    assert balanced < unweighted - 3, (balanced, unweighted)


def test_batchnorm_statistics_are_recomputed_from_weighted_batches():
    # --batchnorm=train recomputes statistics from the training batches, which
    # carry sample weights with --class_weight.
    from tl_keras.training import finetune

    inputs = keras.Input((4, 4, 3), dtype="uint8")
    normalised = keras.layers.BatchNormalization()(keras.ops.cast(inputs, "float32"))
    backbone = keras.Model(inputs, normalised)
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    classifier = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    optimization.compile_for_evaluation(classifier, label_smoothing=0.0)
    training = _batches(np.array([1.0, 2.0], np.float32))

    validation = finetune.recompute_statistics_and_validate(
        classifier, backbone, training, training.map(lambda images, labels, _: (images, labels)))

    images = np.concatenate([batch[0].numpy() for batch in training])
    np.testing.assert_allclose(backbone.layers[-1].moving_mean,
                               images.astype(np.float32).mean(axis=(0, 1, 2)), rtol=1e-4)
    assert set(validation) == {"top1", "top5", "label_smoothed_loss"}
