"""The input pipeline: (uint8 image, label) examples into batches for the model.

Batches stay uint8: the model resizes and normalises on the accelerator, so the
CPU ships a quarter of the bytes float32 would take, and small images (CIFAR's
32 px) travel small.
"""

import numpy as np
import tensorflow as tf

from tl_keras.data import augment as augment_lib
from tl_keras.errors import UsageError

# Decoded training data up to this size stays in memory after the first epoch,
# which saves re-reading and re-decoding it every epoch (CIFAR-100's 50,000
# images take 150 MiB). Larger datasets stream from disk each epoch.
_CACHE_LIMIT_BYTES = 2 * 1024**3
_SHUFFLE_BUFFER = 16_384


def training_batches(examples, *, num_examples, image_shape, image_size,
                     num_classes, batch_size, seed, repeat, resize="stretch",
                     augment="none", mixup=0.0, cutmix=0.0, class_weights=None):
    """Batches training examples, shuffled the same way for the same seed.

    Args:
        examples: unbatched (uint8 image, int label) pairs.
        num_examples: how many examples `examples` holds.
        image_shape: the static image shape, or None when sizes vary (then each
            image is resized to `image_size` here, since a batch needs one size).
        image_size: the model's input size.
        num_classes: for one-hot labels, which label smoothing needs.
        batch_size: the global batch size; a last partial batch is dropped so
            every step has the same shape on every replica.
        seed: seeds the shuffle and every augmentation draw.
        repeat: whether to repeat forever, for runs capped by steps per epoch.
        resize: `stretch` or `crop` (centre crop to square first), for images
            resized here.
        augment: `none`, `basic` (random resized crop and horizontal flip) or
            `randaugment` (basic, then Keras' RandAugment on each batch).
        mixup, cutmix: Beta alphas for MixUp and CutMix of each batch; 0 is off.
        class_weights: optional float `[num_classes]`: each batch then also
            carries its examples' weights `[batch]` (`_with_sample_weights`).

    Returns:
        A `tf.data.Dataset` of (uint8 images [batch, h, w, 3], float32 one-hot
        labels [batch, num_classes]).
    """
    examples = _as_rgb(examples)
    # A run capped by steps per epoch may never finish a pass, and a cache that
    # is never completed is thrown away; such runs are short, so skip it.
    if _fits_in_memory(image_shape, num_examples) and not repeat:
        examples = examples.cache()
    examples = examples.shuffle(
        min(num_examples, _SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True
    )
    if repeat:
        examples = examples.repeat()
    batches = _batch(examples, image_shape, image_size, batch_size,
                     drop_remainder=True, resize=resize)
    if augment != "none":
        batches = tf.data.Dataset.zip(batches, _batch_seeds(seed)).map(
            lambda batch, batch_seed: (
                augment_lib.crop_and_flip(batch[0], batch_seed), batch[1]
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if augment == "randaugment":
        # Sequential: the layer draws from a stateful seed generator, and
        # parallel calls would consume its states in a varying order.
        batches = batches.map(augment_lib.rand_augment(seed))
    batches = _one_hot(batches, num_classes)
    if mixup or cutmix:
        batches = tf.data.Dataset.zip(batches, _batch_seeds(seed + 1)).map(
            lambda batch, batch_seed: augment_lib.mix_batch(
                *batch, batch_seed, mixup_alpha=mixup, cutmix_alpha=cutmix
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    batches = _with_sample_weights(batches, class_weights)
    return _shard_by_data(batches.prefetch(tf.data.AUTOTUNE))


def _with_sample_weights(batches, class_weights):
    """Adds each example's weight, which Keras' `fit` applies to its loss: its
    class's weight, or for a MixUp or CutMix label, its classes' weights mixed
    in the label's proportions.

    Weighting the mixed label rather than the image's larger share keeps the
    weight of each class's part of the image as the label counts it. Without
    `class_weights`, the batches stay (inputs, labels).
    """
    if class_weights is None:
        return batches
    weights = tf.constant(class_weights, tf.float32)
    return batches.map(
        lambda inputs, labels: (inputs, labels, tf.linalg.matvec(labels, weights)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def evaluation_batches(examples, *, num_examples, image_shape, image_size,
                       num_classes, batch_size, resize="stretch"):
    """Batches examples for evaluation: every example once, in order.

    The last batch may be partial, so that metrics count every example.

    Args:
        examples, num_examples, image_shape, image_size, num_classes, batch_size,
        resize: as for `training_batches`.

    Returns:
        A `tf.data.Dataset` like `training_batches`' but finite and in order.
    """
    examples = _as_rgb(examples)
    if _fits_in_memory(image_shape, num_examples):
        examples = examples.cache()
    batches = _batch(examples, image_shape, image_size, batch_size,
                     drop_remainder=False, resize=resize)
    return _shard_by_data(_one_hot(batches, num_classes).prefetch(tf.data.AUTOTUNE))


def split_batches(config, splits, split):
    """Batches of one split of `tl_keras.data.splits.Splits` as `config` sizes them,
    every example once, in order."""
    if split not in splits.sizes:
        raise UsageError(f"--split={split}: pass train, validation or test.")
    return evaluation_batches(
        getattr(splits, split), num_examples=splits.sizes[split],
        **batch_settings(config, splits)
    )


def batch_settings(config, splits):
    """The keyword arguments `training_batches` and `evaluation_batches` take
    from the run's configuration and its splits."""
    return dict(
        image_shape=splits.image_shape, image_size=config.image_size,
        num_classes=splits.num_classes, batch_size=config.batch_size,
        resize=config.resize,
    )


def _batch(examples, image_shape, image_size, batch_size, drop_remainder, resize):
    if image_shape is None:
        examples = examples.map(
            lambda image, label: (resize_uint8(image, image_size, resize), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return examples.batch(batch_size, drop_remainder=drop_remainder)


def _one_hot(batches, num_classes):
    # After batching: one vectorised op per batch instead of one per image.
    return batches.map(
        lambda images, labels: (images, tf.one_hot(labels, num_classes)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _as_rgb(examples):
    """Grayscale datasets become RGB; others pass untouched, at no per-image cost."""
    if examples.element_spec[0].shape[-1] != 1:
        return examples
    return examples.map(
        lambda image, label: (tf.image.grayscale_to_rgb(image), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def sample_images(examples, *, num_examples, count, seed, image_size, resize):
    """`count` images of `examples` chosen by `seed` (all of them when there
    are fewer), brought to `image_size` as the SavedModel brings its input.

    Reads `examples` once, whatever their order, so the sample spreads over a
    split that is sorted by class.

    Returns:
        uint8 `[count, image_size, image_size, 3]`, in the split's order.
    """
    count = min(count, num_examples)
    chosen = np.sort(np.random.default_rng(seed).choice(num_examples, count, replace=False))
    if not count:
        return np.zeros([0, image_size, image_size, 3], np.uint8)
    return np.stack([resize_uint8(image, image_size, resize).numpy()
                     for image in images_at(examples, chosen)])


def images_at(examples, positions):
    """The images of `examples` at `positions`, in one pass over them.

    Returns:
        A list of uint8 images, in the order of sorted `positions`.
    """
    wanted = tf.constant(np.unique(np.asarray(positions, np.int64)), tf.int64)
    picked = _as_rgb(examples).enumerate().filter(
        lambda index, example: tf.reduce_any(tf.equal(index, wanted)))
    return [image for _, (image, _label) in picked.as_numpy_iterator()]


def resize_uint8(image, size, method):
    """Resizes one uint8 image to `size` x `size`, keeping uint8.

    Args:
        method: `stretch` (plain resize) or `crop` (centre crop to a square
            first, which keeps the aspect ratio).
    """
    if method == "crop":
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(
            image, (height - side) // 2, (width - side) // 2, side, side
        )
    resized = tf.image.resize(image, (size, size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _batch_seeds(seed):
    """One stateless seed per batch: new ones each epoch, the same ones each run."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def _fits_in_memory(image_shape, num_examples):
    if image_shape is None:
        return False
    height, width, _ = image_shape
    return num_examples * height * width * 3 <= _CACHE_LIMIT_BYTES


def feature_batches(features, labels, *, num_classes, batch_size, seed=None,
                    class_weights=None):
    """Batches (features, one-hot labels) from arrays in memory or memory-mapped.

    Args:
        features: float `[examples, dimensions]`, a NumPy array or memmap.
        labels: int `[examples]`.
        num_classes: for the one-hot labels.
        batch_size: the global batch size.
        seed: shuffle with this seed and drop the last partial batch (for
            training); None keeps every example in order (for evaluation).
        class_weights: optional float `[num_classes]`: each batch then carries
            its examples' weights, as `training_batches`' do.
    """
    count = len(labels)

    def read(indices):
        indices = np.sort(indices)  # Sorted reads are sequential on a memmap.
        return features[indices].astype(np.float32), labels[indices]

    order = tf.data.Dataset.range(count)
    if seed is not None:
        order = order.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    batches = order.batch(batch_size, drop_remainder=seed is not None).map(
        lambda indices: tf.numpy_function(read, [indices], (tf.float32, tf.int64)),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).map(lambda x, y: (tf.ensure_shape(x, [None, features.shape[1]]),
                        tf.one_hot(tf.ensure_shape(y, [None]), num_classes)))
    if seed is not None:
        batches = batches.repeat()
    batches = _with_sample_weights(batches, class_weights)
    return _shard_by_data(batches.prefetch(tf.data.AUTOTUNE))


def _shard_by_data(batches):
    """Under a multi-worker strategy, each worker takes its share of every
    global batch (DATA sharding): the datasets here aren't one file per worker,
    which FILE sharding would need. Single-machine strategies ignore this."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return batches.with_options(options)
