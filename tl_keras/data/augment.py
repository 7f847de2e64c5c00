"""Training-time augmentation, in the tf.data pipeline.

It runs on the CPU in tf.data, on whole uint8 batches at the size images travel
at (32 px for CIFAR), where a crop and flip cost little, and one op serves a
batch. Being outside the model, it never reaches the exported inference path.
Every random draw is stateless and seeded from (--seed, batch position), so a
run repeats exactly.
"""

import math

import keras
import tensorflow as tf

AUGMENTATIONS = ("none", "basic", "randaugment")

# Random resized crop keeps 25% to 100% of the image area. ImageNet recipes go
# down to 8%, which leaves too little of a 32 px image to recognise.
_CROP_AREA_RANGE = (0.25, 1.0)
_CROP_ASPECT_RANGE = (3 / 4, 4 / 3)


def crop_and_flip(images, seed):
    """Random resized crop and horizontal flip of each image in a batch.

    One `crop_and_resize` op does both for the whole batch: a box whose left
    edge lies right of its right edge samples a mirrored crop. A per-image
    crop, flip and resize would run three ops per image, which on a CPU costs
    far more than the pixels themselves at 32 px.

    Args:
        images: uint8 `[batch, height, width, 3]`.
        seed: int `[2]`, the stateless seed for this batch.

    Returns:
        uint8 images of the same shape.
    """
    area_seed, aspect_seed, offset_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    batch = tf.shape(images)[0]
    area = tf.random.stateless_uniform([batch], area_seed, *_CROP_AREA_RANGE)
    log_aspect = tf.random.stateless_uniform(
        [batch], aspect_seed, math.log(_CROP_ASPECT_RANGE[0]),
        math.log(_CROP_ASPECT_RANGE[1]),
    )
    # Box sides as fractions of the image, for the drawn area and aspect ratio.
    width = tf.minimum(tf.sqrt(area * tf.exp(log_aspect)), 1.0)
    height = tf.minimum(tf.sqrt(area / tf.exp(log_aspect)), 1.0)
    offsets = tf.random.stateless_uniform([batch, 2], offset_seed)
    top = offsets[:, 0] * (1.0 - height)
    left = offsets[:, 1] * (1.0 - width)
    flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
    x1 = tf.where(flip, left + width, left)
    x2 = tf.where(flip, left, left + width)
    boxes = tf.stack([top, x1, top + height, x2], axis=1)
    cropped = tf.image.crop_and_resize(
        tf.cast(images, tf.float32), boxes, tf.range(batch), tf.shape(images)[1:3]
    )
    return tf.cast(tf.clip_by_value(tf.round(cropped), 0, 255), tf.uint8)


def rand_augment(seed):
    """A batch function applying Keras' RandAugment to uint8 images."""
    layer = keras.layers.RandAugment(value_range=(0, 255), seed=seed)

    def apply(images, labels):
        augmented = layer(tf.cast(images, tf.float32))
        return tf.cast(tf.clip_by_value(tf.round(augmented), 0, 255), tf.uint8), labels

    return apply


def mix_batch(images, labels, seed, *, mixup_alpha, cutmix_alpha):
    """MixUp or CutMix of a batch with itself reversed, one or the other per batch.

    When both alphas are positive, each batch uses one of them, chosen at random.

    Args:
        images: uint8 `[batch, height, width, 3]`.
        labels: float one-hot `[batch, classes]`.
        seed: int32 `[2]`.
        mixup_alpha, cutmix_alpha: Beta distribution parameters; 0 disables.

    Returns:
        (uint8 images, soft labels) of the same shapes.
    """
    choice_seed, lambda_seed, box_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3)
    )
    partner_images, partner_labels = tf.reverse(images, [0]), tf.reverse(labels, [0])
    if mixup_alpha and cutmix_alpha:
        use_cutmix = tf.random.stateless_uniform([], choice_seed) < 0.5
    else:
        use_cutmix = tf.constant(bool(cutmix_alpha))
    alpha = tf.where(use_cutmix, float(cutmix_alpha or 1.0), float(mixup_alpha or 1.0))
    share = _beta_sample(alpha, lambda_seed)

    def mixup():
        mixed = share * tf.cast(images, tf.float32) + (1 - share) * tf.cast(
            partner_images, tf.float32
        )
        return tf.cast(tf.round(mixed), tf.uint8), share

    def cutmix():
        mask, kept_share = _cutmix_mask(tf.shape(images)[1:3], share, box_seed)
        mixed = tf.where(mask[None, :, :, None], images, partner_images)
        return mixed, kept_share

    mixed_images, kept = tf.cond(use_cutmix, cutmix, mixup)
    mixed_labels = kept * labels + (1 - kept) * partner_labels
    return mixed_images, mixed_labels


def _beta_sample(alpha, seed):
    first, second = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma([], first, alpha=alpha)
    y = tf.random.stateless_gamma([], second, alpha=alpha)
    return x / (x + y)


def _cutmix_mask(shape, share, seed):
    """A boolean `[height, width]` mask, False inside a box of (1 - share) area.

    Returns:
        (mask, the share of pixels the mask keeps), the second after clipping
        the box to the image.
    """
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    side = tf.sqrt(1.0 - share)
    centre = tf.random.stateless_uniform([2], seed) * tf.stack([height, width])
    top = tf.clip_by_value(centre[0] - side * height / 2, 0, height)
    bottom = tf.clip_by_value(centre[0] + side * height / 2, 0, height)
    left = tf.clip_by_value(centre[1] - side * width / 2, 0, width)
    right = tf.clip_by_value(centre[1] + side * width / 2, 0, width)
    rows = tf.range(height)[:, None]
    columns = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (columns >= left) & (columns < right)
    kept = 1.0 - tf.reduce_mean(tf.cast(inside, tf.float32))
    return ~inside, kept


# `near_copies`' distortions: a copy saved again as a JPEG of this quality, at a
# size this many percent smaller or larger (alternately), as a photo saved
# twice or a test image re-encoded from a training one would be.
NEAR_COPY_JPEG_QUALITY = 60
NEAR_COPY_RESIZE_PERCENT = 12


def near_copies(images):
    """Copies of uint8 images, each resized by `NEAR_COPY_RESIZE_PERCENT`,
    saved as a JPEG of `NEAR_COPY_JPEG_QUALITY`, decoded, and brought back
    to its size, as a folder would bring it: what the audit measures its
    near-copy threshold on (`tl_keras.outputs.copies`).

    Args:
        images: uint8 `[count, height, width, 3]`.

    Returns:
        uint8 copies of the same shape.
    """
    height, width = images.shape[1:3]
    copies = []
    for index, image in enumerate(images):
        factor = 1 + (1 if index % 2 else -1) * NEAR_COPY_RESIZE_PERCENT / 100
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        resized = tf.image.resize(image, size, antialias=True)
        encoded = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(tf.round(resized), 0, 255),
                                            tf.uint8), quality=NEAR_COPY_JPEG_QUALITY)
        decoded = tf.image.resize(tf.io.decode_jpeg(encoded, channels=3), (height, width),
                                  antialias=True)
        copies.append(tf.cast(tf.clip_by_value(tf.round(decoded), 0, 255), tf.uint8))
    return tf.stack(copies).numpy() if copies else images.copy()
