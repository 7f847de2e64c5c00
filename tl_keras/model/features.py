"""The backbone's features, computed once per image.

With `--cache_features`, the frozen backbone runs once over train and
validation, and the head phase trains the classifier's own dropout and head
layers on those features instead of on images. `--mode=audit` computes every
split's features the same way (`split_features`).
"""

import dataclasses
import os

import keras
import numpy as np

from tl_keras import progress
from tl_keras.data import pipeline
from tl_keras.model import classifier as classifier_lib


def feature_extractor(classifier):
    """The classifier up to the backbone's pooled features (before the head)."""
    features = classifier.get_layer(classifier_lib.DROPOUT_LAYER).input
    return keras.Model(classifier.input, features, name="feature_extractor")


def head_of(classifier):
    """The classifier's dropout and head as a model on pooled features.

    It shares the classifier's layers, so training it trains the classifier.
    """
    dropout = classifier.get_layer(classifier_lib.DROPOUT_LAYER)
    features = keras.Input(shape=dropout.input.shape[1:], name="features")
    probabilities = classifier.get_layer(classifier_lib.HEAD_LAYER)(dropout(features))
    return keras.Model(features, probabilities, name="head")


@dataclasses.dataclass(frozen=True)
class CachedFeatures:
    """Batches of (backbone features, one-hot labels) for the head phase."""

    train: object
    validation: object


# Features up to this size stay in memory; larger ones go to --model_dir/features.
_FEATURE_MEMORY_LIMIT_BYTES = 4 * 1024**3


def cache_features(classifier, *, batches_of, sizes, num_classes, batch_size, seed,
                   directory, class_weights=None):
    """Runs the backbone once over train and validation.

    Args:
        classifier: the classifier whose backbone computes the features.
        batches_of: a function from a split's name to its batches, every
            example once, in order.
        sizes: the number of examples of each split, by name.
        num_classes, batch_size: for the feature batches.
        seed: shuffles the training features.
        directory: where features too large for memory are kept.
        class_weights: optional float `[num_classes]`, for the training
            batches' sample weights (`tl_keras.data.pipeline.feature_batches`).

    Returns:
        `CachedFeatures`.
    """
    images = sizes["train"] + sizes["validation"]
    with progress.step(f"Computing the backbone features of {images:,} images",
                       total=images, unit="image") as computing:
        extractor = feature_extractor(classifier)
        datasets, places = {}, set()
        for split in ("train", "validation"):
            values, labels, place = split_features(
                extractor, batches_of(split), sizes[split], split=split,
                directory=directory, computed=computing.advance)
            places.add(place)
            datasets[split] = pipeline.feature_batches(
                values, labels, num_classes=num_classes, batch_size=batch_size,
                seed=seed if split == "train" else None,
                class_weights=class_weights if split == "train" else None,
            )
        computing.result = (
            f"Computed backbone features of {sizes['train']:,} train and "
            f"{sizes['validation']:,} validation images once "
            f"({', '.join(sorted(places))})")
    return CachedFeatures(train=datasets["train"], validation=datasets["validation"])


def split_features(extractor, batches, count, *, split, directory, computed,
                   on_images=None):
    """Runs `extractor` once over the batches of one split.

    Args:
        extractor: from `feature_extractor`.
        batches: (uint8 images, one-hot labels) batches, every example once,
            in order.
        count: the number of examples.
        split: the split's name, for the file of features kept on disk.
        directory: where features too large for memory are kept.
        computed: called with each batch's number of images once it is done.
        on_images: optional, called with each batch's images, for what else
            is computed from them in the same pass.

    Returns:
        (float32 features `[count, dimensions]`, in memory or memory-mapped;
        int labels `[count]`; where the features are, in words).
    """
    values, place = features_array(split, count, extractor.output.shape[-1], directory)
    labels = np.empty(count, np.int64)
    position = 0
    for images, one_hot in batches:
        batch = len(images)
        values[position:position + batch] = extractor.predict(images, verbose=0)
        labels[position:position + batch] = np.argmax(one_hot, axis=1)
        if on_images is not None:
            on_images(images)
        position += batch
        computed(batch)
    return values, labels, place


def features_array(split, count, dimensions, directory):
    """An empty float32 array for a split's features, in memory when it fits,
    else a memmap under `directory`; and where it is, for the log."""
    if count * dimensions * 4 <= _FEATURE_MEMORY_LIMIT_BYTES:
        return np.empty((count, dimensions), np.float32), "in memory"
    os.makedirs(directory, exist_ok=True)
    values = np.lib.format.open_memmap(os.path.join(directory, f"{split}.npy"),
                                       mode="w+", dtype=np.float32,
                                       shape=(count, dimensions))
    return values, f"on disk in {directory}"
