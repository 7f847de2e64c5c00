"""The data source: a TFDS dataset, as (uint8 image, int label) splits.

This stage decides which examples belong to train, validation and test, and
what the classes are. `tl_keras.data.pipeline` then turns the splits into batches.
"""

import difflib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tl_keras.data import exclusion
from tl_keras.data import subsets
from tl_keras.data import tfds_splits
from tl_keras.data.splits import Splits
from tl_keras.errors import UsageError


def load_tfds(name, data_dir, train_split, val_split, test_split, val_fraction, *,
              classes=(), train_examples_per_class=None, seed=0, strict=False,
              count_train_classes=False, exclude_files=None):
    """Loads a TFDS dataset by name, downloading and preparing it if needed.

    Args:
        name: a TFDS name, e.g. `cifar100` (optionally `name:version`).
        data_dir: where TFDS keeps prepared datasets; None for its default.
        train_split: the TFDS split (or slice, e.g. `train[:50%]`) to train on.
        val_split: the validation split; empty to use the dataset's `validation`
            split if it has one, else to hold out `val_fraction` of `train_split`.
        test_split: the split the final evaluation reads.
        val_fraction: the fraction of `train_split` held out when carving.
        classes: class names to keep, in their new label order; empty keeps all.
        train_examples_per_class: keep this many training examples per class,
            chosen by `seed`; None keeps all.
        seed: picks the per-class examples.
        strict: make a split without examples of some class an error; checked
            only with `classes` or `train_examples_per_class`, which read the
            labels anyway. Default False.
        count_train_classes: count each class's training examples, in a pass
            over the labels alone unless other options read them. Default False.
        exclude_files: a file listing training examples to leave out by index
            (`tl_keras.data.exclusion`); None leaves none out.

    Returns:
        `Splits`.

    Raises:
        UsageError: for an unknown dataset or split, a validation split that
            overlaps the training split, a dataset without (image, label)
            supervision, a download that failed, or (with `strict`) a split
            without examples of some class.
    """
    builder = prepared_builder(name, data_dir)
    available = set(builder.info.splits.keys())
    if not val_split:
        if "validation" in available:
            val_split = "validation"
        else:
            val_split = None
    for flag, split in (("train", train_split), ("val", val_split), ("test", test_split)):
        if split is not None:
            tfds_splits.check_split(builder, f"--{flag}_split", split)
    if val_split is None:
        read_for_training, val_split = tfds_splits.carve(train_split, val_fraction,
                                                       builder.info.splits)
        validation_source = f"the last {val_fraction:.0%} of {train_split}: {val_split}"
    else:
        tfds_splits.check_disjoint(train_split, val_split, builder.info.splits)
        read_for_training, validation_source = train_split, val_split

    def read(split):
        # A fixed file order: shuffling is the pipeline's job.
        return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)

    datasets = {"train": read(read_for_training), "validation": read(val_split),
                "test": read(test_split)}
    read_positions = {}
    if exclude_files:
        datasets["train"], read_positions["train"] = _without_excluded(
            datasets["train"], exclude_files)
    label_feature = builder.info.features[builder.info.supervised_keys[1]]
    image_feature = builder.info.features[builder.info.supervised_keys[0]]
    image_shape = tuple(image_feature.shape)
    class_names, datasets, sizes, train_labels, kept = _select_examples(
        list(label_feature.names), datasets, classes, train_examples_per_class, seed, strict
    )
    if count_train_classes and train_labels is None:
        train_labels = split_labels(builder, read_for_training)
    return Splits(
        **datasets,
        class_names=tuple(class_names),
        sizes=sizes,
        image_shape=image_shape if None not in image_shape else None,
        validation_source=validation_source,
        train_class_counts=subsets.class_counts(train_labels, len(class_names)),
        split_specs={"train": read_for_training, "validation": val_split,
                     "test": test_split},
        indices={split: read_positions[split][positions] if split in read_positions
                 else positions for split, positions in kept.items()},
    )


def name_without_version(name):
    """A TFDS name as `--dataset` gives it, less any `:version`: `cifar10:3.0.2`
    is `cifar10`."""
    return name.split(":")[0]


def prepared_builder(name, data_dir):
    """The TFDS builder of an image classification dataset, prepared in `data_dir`.

    Raises:
        UsageError: for an unknown dataset, one without (image, label)
            supervision, or a download that failed.
    """
    builder = _builder(name, data_dir)
    _check_supervision(builder)
    _download_and_prepare(builder)
    return builder


def split_labels(builder, split):
    """The labels of a split, in one pass that reads but doesn't decode its images."""
    image_key = builder.info.supervised_keys[0]
    labels_only = builder.as_dataset(
        split=split, as_supervised=True, shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()})
    return np.fromiter(labels_only.map(lambda image, label: label).as_numpy_iterator(),
                       np.int64)


def _select_examples(class_names, datasets, classes, train_examples_per_class, seed,
                     strict):
    """Applies `--classes` to every split and the per-class cap to train.

    Only here are the labels read, so only here does a split without some
    class get noticed: a whole TFDS dataset isn't read an extra time for it.

    Returns:
        (class names, datasets by split, sizes by split, the training split's
        labels or None when they weren't read, the positions of the examples
        kept by split).
    """
    if not classes and not train_examples_per_class:
        sizes = {split: _count(dataset) for split, dataset in datasets.items()}
        return (class_names, datasets, sizes, None,
                {split: np.arange(size) for split, size in sizes.items()})
    names, old_to_new = subsets.class_mapping(class_names, classes)
    selected, sizes, kept_labels, positions = {}, {}, {}, {}
    for split, dataset in datasets.items():
        # One pass over the labels decides which examples stay.
        labels = old_to_new[np.fromiter(
            dataset.map(lambda image, label: label).as_numpy_iterator(), np.int64
        )]
        keep = labels >= 0
        if split == "train" and train_examples_per_class:
            indices, short = subsets.per_class_indices(
                labels[keep], train_examples_per_class, seed
            )
            note = subsets.describe_short_classes(short, names, train_examples_per_class)
            if note:
                print(note, flush=True)
            kept_positions = np.flatnonzero(keep)[indices]
            keep = np.zeros_like(keep)
            keep[kept_positions] = True
        selected[split] = _filter(dataset, keep, old_to_new)
        sizes[split] = int(keep.sum())
        kept_labels[split] = labels[keep]
        positions[split] = np.flatnonzero(keep)
    subsets.check_every_class_present(kept_labels, names, strict)
    return names, selected, sizes, kept_labels["train"], positions


def _without_excluded(train, exclude_files):
    """The training examples less those `exclude_files` lists, the count
    printed; and the positions of those kept."""
    count = _count(train)
    dropped = exclusion.tfds_positions(exclude_files, count)
    print(exclusion.describe(exclude_files, len(dropped)), flush=True)
    return exclusion.without_positions(train, dropped, count)


def _filter(dataset, keep, old_to_new):
    count = int(np.sum(keep))
    keep, old_to_new = tf.constant(keep), tf.constant(old_to_new)
    return (
        dataset.enumerate()
        .filter(lambda index, example: keep[index])
        .map(lambda index, example: (example[0], tf.gather(old_to_new, example[1])))
        # A filter hides how many examples remain. Keras restarts a dataset
        # each epoch only if it knows its length: without this, the second
        # epoch ran out of batches part-way and trained fewer steps than planned.
        .apply(tf.data.experimental.assert_cardinality(count))
    )


def _builder(name, data_dir):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        known = tfds.list_builders(with_community_datasets=False)
        closest = difflib.get_close_matches(name_without_version(name), known, n=5)
        hint = f" Closest: {', '.join(closest)}." if closest else ""
        raise UsageError(
            f"--dataset={name}: TFDS has no dataset of that name.{hint} "
            f"See https://www.tensorflow.org/datasets/catalog for the catalog."
        ) from error


def _check_supervision(builder):
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2:
        raise UsageError(
            f"--dataset={builder.name} has no (image, label) supervised keys, "
            f"so tl_keras can't tell which feature is the label."
        )
    image, label = builder.info.features[keys[0]], builder.info.features[keys[1]]
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise UsageError(
            f"--dataset={builder.name} is not an image classification dataset: "
            f"its supervised keys are {keys[0]} ({type(image).__name__}) and "
            f"{keys[1]} ({type(label).__name__})."
        )
    if image.shape[-1] not in (1, 3, None):
        raise UsageError(
            f"--dataset={builder.name} has images of {image.shape[-1]} channels; "
            f"tl_keras reads grayscale or RGB."
        )


def _download_and_prepare(builder):
    """Prepares the dataset; a no-op when it is already in `data_dir`."""
    try:
        builder.download_and_prepare()
    except Exception as error:  # Download failures come in many types.
        raise UsageError(
            f"Couldn't download or prepare the TFDS dataset {builder.name!r} "
            f"into {builder.data_dir}: {type(error).__name__}: {error}\n"
            f"To go on offline, prepare it on a machine with network access "
            f"(python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{builder.name}', data_dir='DIR').download_and_prepare()\"), "
            f"copy DIR here and pass --data_dir=DIR."
        ) from error


def _count(dataset):
    count = int(dataset.cardinality())
    if count < 0:  # Unknown cardinality: count once.
        count = int(dataset.reduce(0, lambda n, _: n + 1))
    return count
