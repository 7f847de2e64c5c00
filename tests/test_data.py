"""TFDS splits: carving validation from train, refusing overlaps, missing classes."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tl_keras.data import tfds_dataset
from tl_keras.errors import UsageError

_TEST_OFFSET = 100  # test images count on from here, so no index is both


class NumberedImages(tfds.core.GeneratorBasedBuilder):
    """40 train and 10 test images of 2x2 pixels, each filled with its own number.

    Prepared from nothing, so the tests read a real TFDS dataset offline, with
    its split sizes and slicing.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(2, 2, 3)),
                "label": tfds.features.ClassLabel(names=["even", "odd", "never"]),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(40)),
                "test": self._generate_examples(range(_TEST_OFFSET, _TEST_OFFSET + 10))}

    def _generate_examples(self, numbers):
        for number in numbers:
            yield number, {"image": np.full((2, 2, 3), number, np.uint8), "label": number % 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    NumberedImages(data_dir=str(directory)).download_and_prepare()
    return str(directory)


def _numbers(dataset):
    return [int(image[0, 0, 0]) for image, _ in dataset]


def _load(data_dir, train_split="train", val_split="", test_split="test", **options):
    return tfds_dataset.load_tfds("numbered_images", data_dir, train_split, val_split,
                                  test_split, options.pop("val_fraction", 0.25), **options)


@pytest.fixture
def reads_in_a_new_order_each_time(monkeypatch):
    """Makes every read of a split return its examples in another order, as a
    dataset read from several files in parallel may."""
    read = tfds.core.DatasetBuilder.as_dataset

    def as_dataset(self, *args, **kwargs):
        return read(self, *args, **kwargs).shuffle(1000, reshuffle_each_iteration=True)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", as_dataset)


def _numbers_of_split(data_dir, split):
    builder = tfds.builder("numbered_images", data_dir=data_dir)
    return sorted(_numbers(builder.as_dataset(split=split, as_supervised=True)))


@pytest.mark.parametrize("train_split, expected_train, expected_validation", [
    ("train", "train[:30]", "train[30:]"),
    ("train[:50%]", "train[:15]", "train[15:20]"),
    ("train[8:]", "train[8:32]", "train[32:]"),
    # Each part of a sum gives its own last quarter (of test's 10, 2).
    ("train[:20]+test", "train[:15]+test[:8]", "train[15:20]+test[8:]"),
])
def test_carved_validation_is_the_last_fraction_whatever_the_read_order(
        data_dir, reads_in_a_new_order_each_time, train_split, expected_train,
        expected_validation):
    splits = _load(data_dir, train_split=train_split)

    # Read twice each: a carve that depends on the order would differ.
    for _ in range(2):
        assert sorted(_numbers(splits.train)) == _numbers_of_split(data_dir, expected_train)
        assert sorted(_numbers(splits.validation)) == \
            _numbers_of_split(data_dir, expected_validation)
    assert splits.sizes["train"] + splits.sizes["validation"] == \
        len(_numbers_of_split(data_dir, train_split))
    assert splits.validation_source.startswith(f"the last 25% of {train_split}: train[")


def test_a_carve_that_leaves_a_split_empty_is_refused(data_dir):
    with pytest.raises(UsageError, match=r"train\[0:1\] has too few examples to hold out"):
        _load(data_dir, train_split="train[:1]")


@pytest.mark.parametrize("train_split, val_split", [
    ("train", "train[90%:]"),
    ("train[:50%]", "train[40%:60%]"),
    ("train[:31]", "train[75%:]"),  # share the 31st example: abs against percent
    ("test+train[10:20]", "train[:11]"),
])
def test_a_validation_split_that_overlaps_train_is_refused(data_dir, train_split, val_split):
    expected = f"--train_split={train_split} and --val_split={val_split} overlap"
    with pytest.raises(UsageError, match=re.escape(expected)):
        _load(data_dir, train_split=train_split, val_split=val_split)


@pytest.mark.parametrize("train_split, val_split", [
    ("train[:75%]", "train[75%:]"),
    ("train[:30]", "train[30:]"),
    ("train[10:20]", "train[:10]+train[20:]+test"),
])
def test_disjoint_validation_splits_are_accepted(data_dir, train_split, val_split):
    splits = _load(data_dir, train_split=train_split, val_split=val_split)
    assert not set(_numbers(splits.train)) & set(_numbers(splits.validation))


def test_a_split_without_some_class_is_named(data_dir, capsys):
    splits = _load(data_dir, val_split="test", classes=("even", "never"))
    assert splits.sizes["train"] == 20
    assert ("Note: the train split has no examples of never; the validation split has "
            "no examples of never; the test split has no examples of never") in \
        capsys.readouterr().out

    with pytest.raises(UsageError, match="the validation split has no examples of never"):
        _load(data_dir, val_split="test", classes=("even", "never"), strict=True)


@pytest.mark.parametrize("options, expected", [
    # No option reads the labels: counting them is a pass of its own.
    ({"count_train_classes": True}, (15, 15, 0)),
    ({}, None),
    # --classes reads them anyway, and counts in its own label order.
    ({"classes": ("odd", "even")}, (15, 15)),
    ({"train_examples_per_class": 4, "count_train_classes": True}, (4, 4, 0)),
])
def test_training_examples_are_counted_by_class(data_dir, options, expected):
    splits = _load(data_dir, **options)
    assert splits.train_class_counts == expected
    if expected:
        labels = [int(label) for _, label in splits.train]
        assert expected == tuple(labels.count(label) for label in range(len(expected)))


@pytest.mark.parametrize("options", [{"classes": ("odd", "even")},
                                     {"train_examples_per_class": 8}])
def test_every_planned_step_trains_on_a_filtered_split(data_dir, options):
    """A filtered split of unknown length made Keras run out of batches in the
    second epoch, training fewer steps than the run planned and printed."""
    import keras

    from tl_keras.data import pipeline

    splits = _load(data_dir, **options)
    batches = pipeline.training_batches(
        splits.train, num_examples=splits.sizes["train"], image_shape=(2, 2, 3),
        image_size=2, num_classes=splits.num_classes, batch_size=4, seed=0, repeat=False)
    steps = splits.sizes["train"] // 4
    model = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(splits.num_classes)])
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))

    model.fit(batches, epochs=3, steps_per_epoch=steps, verbose=0)

    assert int(model.optimizer.iterations) == 3 * steps
