"""The input pipeline: (uint8 image, label) examples into batches for the model.

Batches stay uint8: the model resizes and normalises on the accelerator, so the
CPU ships a quarter of the bytes float32 would take, and small images (CIFAR's
32 px) travel small.
"""

import tensorflow as tf

# Decoded training data up to this size stays in memory after the first epoch,
# which saves re-reading and re-decoding it every epoch (CIFAR-100's 50,000
# images take 150 MiB). Larger datasets stream from disk each epoch.
_CACHE_LIMIT_BYTES = 2 * 1024**3
_SHUFFLE_BUFFER = 16_384


def training_batches(examples, *, num_examples, image_shape, image_size,
                     num_classes, batch_size, seed, repeat):
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
        seed: the shuffle seed.
        repeat: whether to repeat forever, for runs capped by steps per epoch.

    Returns:
        A `tf.data.Dataset` of (uint8 images [batch, h, w, 3], float32 one-hot
        labels [batch, num_classes]).
    """
    examples = examples.map(
        lambda image, label: (_as_rgb(image), label), num_parallel_calls=tf.data.AUTOTUNE
    )
    # A run capped by steps per epoch may never finish a pass, and a cache that
    # is never completed is thrown away; such runs are short, so skip it.
    if _fits_in_memory(image_shape, num_examples) and not repeat:
        examples = examples.cache()
    examples = examples.shuffle(
        min(num_examples, _SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True
    )
    if repeat:
        examples = examples.repeat()
    return _batch(examples, image_shape, image_size, num_classes, batch_size,
                  drop_remainder=True)


def evaluation_batches(examples, *, num_examples, image_shape, image_size,
                       num_classes, batch_size):
    """Batches examples for evaluation: every example once, in order.

    The last batch may be partial, so that metrics count every example.

    Args:
        examples, num_examples, image_shape, image_size, num_classes, batch_size:
            as for `training_batches`.

    Returns:
        A `tf.data.Dataset` like `training_batches`' but finite and in order.
    """
    examples = examples.map(
        lambda image, label: (_as_rgb(image), label), num_parallel_calls=tf.data.AUTOTUNE
    )
    if _fits_in_memory(image_shape, num_examples):
        examples = examples.cache()
    return _batch(examples, image_shape, image_size, num_classes, batch_size,
                  drop_remainder=False)


def _batch(examples, image_shape, image_size, num_classes, batch_size, drop_remainder):
    if image_shape is None:
        examples = examples.map(
            lambda image, label: (_resize_uint8(image, image_size), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    batches = examples.batch(batch_size, drop_remainder=drop_remainder)
    # One-hot after batching: one vectorised op per batch instead of per image.
    batches = batches.map(
        lambda images, labels: (images, tf.one_hot(labels, num_classes)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return batches.prefetch(tf.data.AUTOTUNE)


def _as_rgb(image):
    if image.shape[-1] == 1:
        return tf.image.grayscale_to_rgb(image)
    return image


def _resize_uint8(image, size):
    resized = tf.image.resize(image, (size, size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _fits_in_memory(image_shape, num_examples):
    if image_shape is None:
        return False
    height, width, _ = image_shape
    return num_examples * height * width * 3 <= _CACHE_LIMIT_BYTES
