"""Image files: which files can be images, decoding them, and their sizes.

The one place the image formats are known: a folder dataset (`tl_keras.data.folder`)
checks and decodes its files here, `--mode=predict` checks its files here, and
the SavedModel (`tl_keras.outputs.export`) decodes the bytes it is sent as here.
"""

import functools
import os

import tensorflow as tf

from tl_keras.data import pipeline

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
# The first bytes of each format `decode_image` reads: what makes a file, or
# a string sent to the SavedModel (`tl_keras.outputs.export`), an image at all.
JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
BMP_SIGNATURE = b"BM"
IMAGE_SIGNATURES = (JPEG_SIGNATURE, PNG_SIGNATURE, *GIF_SIGNATURES, BMP_SIGNATURE)

# Image sizes are compared this many files at a time, so the check stops soon
# after the first image of another size.
_SIZE_CHECK_BATCH = 64
# libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size, for a fraction of
# the work of a full decode.
_JPEG_SCALE_DENOMINATORS = (1, 2, 4, 8)


def image_file_problem(path):
    """Says why a file can't be a whole image, or returns None if it can.

    Reads only its first and last bytes: enough to catch empty files, files of
    another kind under an image extension, and truncated JPEG, PNG and GIF files.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as file:
            head = file.read(16)
            file.seek(max(size - 16, 0))
            tail = file.read(16)
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if head.startswith(JPEG_SIGNATURE):
        # A JPEG ends with the EOI marker; some writers pad after it.
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end marker)"
    if head.startswith(PNG_SIGNATURE):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head.startswith(GIF_SIGNATURES):
        return None if tail.rstrip(b"\x00").endswith(b";") else "truncated GIF"
    if head.startswith(BMP_SIGNATURE):
        declared = int.from_bytes(head[2:6], "little")
        # Some writers leave the size field 0; otherwise it must fit the file.
        return None if declared <= size else "truncated BMP"
    return "not a JPEG, PNG, GIF or BMP file"


def common_image_shape(paths, image_size):
    """The one (height, width, 3) every image of every split travels at.

    Images that fit within the model's input travel at their own size when they
    all share one, and the model resizes them on the accelerator: small images
    stay small, in memory and on their way to it. Otherwise the answer is the
    input size, and `decoded_examples` brings every image of another size to it with
    the model's own resize, so that evaluation sees the pixels the exported
    model computes from the same file.
    """
    input_shape = (image_size, image_size, 3)
    first = _height_width(tf.io.read_file(paths[0])).numpy()
    if first.max() > image_size:
        return input_shape
    sizes = tf.data.Dataset.from_tensor_slices(paths.astype(str)).map(
        lambda path: _height_width(tf.io.read_file(path)),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(_SIZE_CHECK_BATCH)
    for batch in sizes:
        if (batch.numpy() != first).any():
            return input_shape
    return (*first, 3)


def _height_width(contents):
    # A JPEG's size is in its header; other formats must be decoded.
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.extract_jpeg_shape(contents)[:2],
        lambda: tf.shape(decode_image(contents))[:2],
    )


def decode_image(contents):
    """Decodes JPEG, PNG, BMP or GIF (first frame) bytes to uint8 RGB.

    Grayscale becomes RGB and an alpha channel is dropped.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _decode_reduced(contents, image_size):
    """Like `decode_image`, but a JPEG at the smallest scale (1/1 to 1/8) that
    leaves its shorter side at least `image_size`, so that what follows still
    shrinks it, antialiased, and never enlarges it."""

    def jpeg():
        shorter = tf.reduce_min(tf.io.extract_jpeg_shape(contents)[:2])
        # libjpeg rounds a scaled side up. The scales only get smaller, so the
        # count of reduced ones that are large enough indexes the smallest.
        scale_index = tf.add_n([
            tf.cast((shorter + denominator - 1) // denominator >= image_size, tf.int32)
            for denominator in _JPEG_SCALE_DENOMINATORS[1:]
        ])
        return tf.switch_case(scale_index, [
            functools.partial(tf.io.decode_jpeg, contents, channels=3, ratio=denominator)
            for denominator in _JPEG_SCALE_DENOMINATORS
        ])

    image = tf.cond(tf.io.is_jpeg(contents), jpeg, lambda: decode_image(contents))
    image.set_shape([None, None, 3])
    return image


def decoded_examples(files, image_shape, image_size, resize, reduce_jpeg=False):
    """(image, label) pairs read and decoded in parallel, in listing order.

    Args:
        files: a `FileList`.
        image_shape: from `common_image_shape`: every image's own shape, or the
            input shape, to which any image of another size is resized here.
        image_size: the model's input size.
        resize: `stretch` or `crop`, as the model resizes.
        reduce_jpeg: decode large JPEGs at reduced scale (`_decode_reduced`).
            Defaults to False.
    """
    labels = tf.constant(files.labels)
    paths = tf.constant(files.paths.astype(str))
    decode = (functools.partial(_decode_reduced, image_size=image_size)
              if reduce_jpeg else decode_image)

    def read(path, label):
        image = decode(tf.io.read_file(path))
        image = tf.cond(
            tf.reduce_all(tf.shape(image)[:2] == image_shape[:2]),
            lambda: image,
            # The model's resize, antialiased when it shrinks; evaluation
            # differs from serving the original only by rounding to uint8.
            lambda: pipeline.resize_uint8(image, image_size, resize),
        )
        return tf.ensure_shape(image, image_shape), label

    return tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        read, num_parallel_calls=tf.data.AUTOTUNE
    )
