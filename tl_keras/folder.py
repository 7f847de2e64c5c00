"""The data source for a user's own images: `--dataset=folder:PATH`.

Reads `PATH/<split>/<class>/*` when split folders exist, else `PATH/<class>/*`,
and produces the same `Splits` as a TFDS dataset. Files that can't be images are
found before training, by a cheap look at their first and last bytes, and
skipped with their names printed (or refused under `--strict_data`).
"""

import concurrent.futures
import functools
import os

import numpy as np
import tensorflow as tf

from tl_keras import pipeline
from tl_keras import progress
from tl_keras import subsets
from tl_keras.data import Splits
from tl_keras.errors import UsageError

PREFIX = "folder:"

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})

# Folder names taken as splits, compared case-insensitively.
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "validation": ("val", "validation", "valid", "dev"),
    "test": ("test", "testing", "eval"),
}

# Image sizes are compared this many files at a time, so the check stops soon
# after the first image of another size.
_SIZE_CHECK_BATCH = 64
# libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size, for a fraction of
# the work of a full decode.
_JPEG_SCALE_DENOMINATORS = (1, 2, 4, 8)
_SKIPPED_FILES_SHOWN = 5


def is_folder_dataset(dataset):
    return dataset.startswith(PREFIX)


def load_folder(dataset, *, image_size, resize, val_fraction, seed, strict, classes,
                train_examples_per_class):
    """Lists an image folder and splits it into train, validation and test.

    Without split folders, validation and test each take `val_fraction` of
    every class (stratified), chosen by `seed`; with a `train` folder but no
    validation folder, validation is carved from train the same way.

    Images larger than the model's input are brought down to it here, on the
    CPU, as the model itself would resize them; see `_common_image_shape`.

    Args:
        dataset: `folder:PATH`.
        image_size: the model's input size.
        resize: `stretch` or `crop`, as the model resizes.
        val_fraction: the fraction of each class held out when carving.
        seed: picks the held-out and subset examples.
        strict: make any unreadable file, or a split without images of some
            class, an error instead of a note.
        classes: class names to keep, in their new label order; empty keeps all.
        train_examples_per_class: keep this many training images per class;
            None keeps all.

    Returns:
        `tl_keras.data.Splits`.

    Raises:
        UsageError: for a missing folder, an empty class folder, fewer than two
            classes, an unknown class, or (with `strict`) an unreadable file or a
            split without images of some class.
    """
    root = dataset[len(PREFIX):]
    if not os.path.isdir(root):
        raise UsageError(f"--dataset={dataset}: no folder {root!r}.")
    split_dirs = _find_split_dirs(root)
    train_dir = split_dirs.get("train", root)
    class_names = _class_names(train_dir)

    listed = {"train": _list_files(train_dir, class_names)}
    for split in ("validation", "test"):
        if split in split_dirs:
            listed[split] = _list_files(split_dirs[split], class_names)
    total = sum(len(files) for files in listed.values())
    with progress.step(f"Checking {total:,} image files", total, unit="file") as checking:
        problems = {split: _problems(files, checking.advance)
                    for split, files in listed.items()}
        checking.result = f"Checked {total:,} image files"
    listed = {split: _drop_unreadable(files, problems[split], strict)
              for split, files in listed.items()}

    carve_from = listed["train"]
    rng = np.random.default_rng(seed)
    sources = {"train": _describe(split_dirs.get("train"), root)}
    for split in ("test", "validation"):
        if split in listed:
            sources[split] = _describe(split_dirs[split], root)
            continue
        held_out = subsets.stratified_indices(
            carve_from.labels, val_fraction, rng, split_name=split
        )
        listed[split] = carve_from.take(held_out)
        carve_from = carve_from.take(np.setdiff1d(np.arange(len(carve_from)), held_out))
        sources[split] = f"{val_fraction:.0%} of each class of {sources['train']}"
    listed["train"] = carve_from

    class_names, listed = _select(
        class_names, listed, classes, train_examples_per_class, seed
    )
    subsets.check_every_class_present(
        {split: files.labels for split, files in listed.items()}, class_names, strict
    )
    # Listed class by class, the files would reach the pipeline's shuffle
    # buffer (smaller than a big split) a few classes at a time: mix them first.
    listed["train"] = listed["train"].shuffled(np.random.default_rng(seed))
    image_shape = _common_image_shape(
        np.concatenate([files.paths for files in listed.values()]), image_size
    )
    decoded = functools.partial(
        _decoded, image_shape=image_shape, image_size=image_size, resize=resize
    )
    return Splits(
        # Training alone may decode JPEGs at reduced scale: its pixels need not
        # match serving's bit for bit, while evaluation's must.
        train=decoded(listed["train"], reduce_jpeg=True),
        validation=decoded(listed["validation"]),
        test=decoded(listed["test"]),
        class_names=tuple(class_names),
        sizes={split: len(files) for split, files in listed.items()},
        image_shape=image_shape,
        validation_source=sources["validation"],
    )


class FileList:
    """Paths and labels of one split, as parallel arrays."""

    def __init__(self, paths, labels):
        self.paths = np.asarray(paths, dtype=object)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def shuffled(self, rng):
        order = rng.permutation(len(self))
        return FileList(self.paths[order], self.labels[order])

    def take(self, indices):
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        return FileList(self.paths[indices], self.labels[indices])


def _select(class_names, listed, classes, train_examples_per_class, seed):
    """Applies `--classes` to every split and the per-class cap to train."""
    names, old_to_new = subsets.class_mapping(class_names, classes)
    selected = {}
    for split, files in listed.items():
        kept = files.take(np.flatnonzero(old_to_new[files.labels] >= 0))
        selected[split] = FileList(kept.paths, old_to_new[kept.labels])
    if train_examples_per_class:
        indices, short = subsets.per_class_indices(
            selected["train"].labels, train_examples_per_class, seed
        )
        note = subsets.describe_short_classes(short, names, train_examples_per_class)
        if note:
            print(note, flush=True)
        selected["train"] = selected["train"].take(indices)
    return names, selected


def _find_split_dirs(root):
    found = {}
    for entry in _visible_dirs(root):
        for split, names in SPLIT_FOLDER_NAMES.items():
            if entry.name.lower() in names and split not in found:
                found[split] = entry.path
    if found and "train" not in found:
        raise UsageError(
            f"{root} has split folders ({', '.join(sorted(found))}) but no train "
            f"folder; name the training folder train, or put class folders "
            f"directly in {root}."
        )
    return found


def _class_names(train_dir):
    names = sorted(entry.name for entry in _visible_dirs(train_dir))
    if len(names) < 2:
        raise UsageError(
            f"{train_dir} holds {len(names)} class folder(s); a classifier needs "
            f"at least two, as {train_dir}/<class>/<image files>."
        )
    return names


def _list_files(split_dir, class_names):
    present = {entry.name for entry in _visible_dirs(split_dir)}
    unknown = sorted(present - set(class_names))
    if unknown:
        raise UsageError(
            f"{split_dir} has class folders that the training folder lacks: "
            f"{', '.join(unknown)}. Every class needs training images."
        )
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        images = sorted(
            entry.path
            for entry in os.scandir(class_dir)
            if entry.is_file()
            and not entry.name.startswith(".")
            and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise UsageError(
                f"Class folder {class_dir} has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove it."
            )
        paths.extend(images)
        labels.extend([label] * len(images))
    return FileList(paths, labels)


def _visible_dirs(path):
    return [
        entry for entry in os.scandir(path)
        if entry.is_dir() and not entry.name.startswith(".")
    ]


def _describe(split_dir, root):
    return os.path.relpath(split_dir, root) + "/" if split_dir else "the folder"


def _problems(files, checked):
    """Why each file can't be an image (None if it can), by its first and last
    bytes; calls `checked()` after each file."""
    problems = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        for problem in pool.map(image_file_problem, files.paths, chunksize=256):
            problems.append(problem)
            checked()
    return problems


def _drop_unreadable(files, problems, strict):
    """Drops the files `problems` says can't be images, naming them."""
    bad = [i for i, problem in enumerate(problems) if problem]
    if not bad:
        return files
    listing = "\n".join(
        f"  {files.paths[i]}: {problems[i]}" for i in bad[:_SKIPPED_FILES_SHOWN]
    )
    more = len(bad) - _SKIPPED_FILES_SHOWN
    listing += f"\n  ... and {more} more" if more > 0 else ""
    if strict:
        raise UsageError(
            f"{len(bad)} file(s) can't be read as images (--strict_data):\n{listing}\n"
            f"Remove or fix them, or drop --strict_data to skip them."
        )
    print(f"Skipping {len(bad)} file(s) that can't be read as images:\n{listing}",
          flush=True)
    return files.take(np.setdiff1d(np.arange(len(files)), bad))


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
    if head.startswith(b"\xff\xd8\xff"):
        # A JPEG ends with the EOI marker; some writers pad after it.
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return None if tail.rstrip(b"\x00").endswith(b";") else "truncated GIF"
    if head.startswith(b"BM"):
        declared = int.from_bytes(head[2:6], "little")
        # Some writers leave the size field 0; otherwise it must fit the file.
        return None if declared <= size else "truncated BMP"
    return "not a JPEG, PNG, GIF or BMP file"


def _common_image_shape(paths, image_size):
    """The one (height, width, 3) every image of every split travels at.

    Images that fit within the model's input travel at their own size when they
    all share one, and the model resizes them on the accelerator: small images
    stay small, in memory and on their way to it. Otherwise the answer is the
    input size, and `_decoded` brings every image of another size to it with
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


def _decoded(files, image_shape, image_size, resize, reduce_jpeg=False):
    """(image, label) pairs read and decoded in parallel, in listing order.

    Args:
        files: a `FileList`.
        image_shape: from `_common_image_shape`: every image's own shape, or the
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
