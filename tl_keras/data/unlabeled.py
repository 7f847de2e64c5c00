"""The unlabelled images of `--unlabeled`: a folder, searched recursively, or
a TFDS split (`tfds:NAME:SPLIT`), as a `Pool` that `tl_keras.training.self_training`
labels and trains on; and what may never be in it.

Validation and test images never enter the pool: a folder's files are
compared with a folder dataset's by real path and by content, and a TFDS split
with the run's own TFDS dataset's validation and test splits by their slices.
Everything here runs before any training.
"""

import dataclasses
import hashlib
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tl_keras import progress
from tl_keras.data import folder
from tl_keras.data import image_io
from tl_keras.data import pipeline
from tl_keras.data import tfds_dataset
from tl_keras.data import tfds_splits
from tl_keras.errors import UsageError

TFDS_PREFIX = "tfds:"
_FILES_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class Pool:
    """The unlabelled images.

    Attributes:
        source: `--unlabeled` as given.
        ids: str `[images]`: what names each image in a round's file: a
            folder image's path, or `tfds:NAME:SPLIT#INDEX`.
        hidden_labels: int `[images]`: the run's label where the pool names
            one (a folder image's subfolder, or a TFDS label, named as one of
            the run's classes), else -1. Read only to report how right the
            pseudo-labels are.
        image_shape: the shape the images travel at (as `Splits.image_shape`).
        read: a function from (increasing indices, their labels, reduce_jpeg)
            to unbatched (uint8 image, label) examples of those images, in
            that order.
    """

    source: str
    ids: np.ndarray
    hidden_labels: np.ndarray
    image_shape: tuple
    read: object

    def __len__(self):
        return len(self.ids)


def load_pool(source, splits, *, dataset, data_dir, image_size, resize, strict):
    """Lists and checks `--unlabeled`'s images, before any training.

    A folder is searched recursively for image files; files that can't be
    images are skipped (or, with `strict`, refused) as a folder dataset's are.
    Files that are also the run's training images are left out (they have
    their labels); one that is a validation or test image is refused.

    Args:
        source: `--unlabeled`: a folder, or `tfds:NAME:SPLIT`.
        splits: the run's `tl_keras.data.splits.Splits`.
        dataset, data_dir: `--dataset` and `--data_dir`.
        image_size, resize, strict: as for `tl_keras.data.folder.load_folder`.

    Returns:
        A `Pool`.

    Raises:
        UsageError: for a missing or empty pool, or one that holds a
            validation or test image.
    """
    if source.startswith(TFDS_PREFIX):
        pool = _tfds_pool(source, splits, dataset=dataset, data_dir=data_dir,
                          image_size=image_size, resize=resize)
    else:
        pool = _folder_pool(source, splits, image_size=image_size, resize=resize,
                            strict=strict)
    hidden = int((pool.hidden_labels >= 0).sum())
    named_by = "TFDS labels" if source.startswith(TFDS_PREFIX) else "subfolders"
    print(f"Unlabelled images (--unlabeled={source}): {len(pool):,}" + (
        f", {hidden:,} of them with {named_by} named after classes, which only measure "
        f"how right the pseudo-labels are" if hidden else "") + ".", flush=True)
    return pool


def _folder_pool(source, splits, *, image_size, resize, strict):
    files = _pool_files(source, splits.class_names, strict)
    if splits.files is not None:
        files = _without_split_files(files, splits.files, source)
    if not len(files):
        raise UsageError(f"--unlabeled={source}: no images left to label.")
    image_shape = image_io.common_image_shape(files.paths, image_size)

    def read(indices, labels, reduce_jpeg):
        chosen = folder.FileList(files.paths[indices], labels)
        return image_io.decoded_examples(chosen, image_shape=image_shape,
                                         image_size=image_size, resize=resize,
                                         reduce_jpeg=reduce_jpeg)

    return Pool(source=source, ids=files.paths.astype(str), hidden_labels=files.labels,
                image_shape=image_shape, read=read)


def _pool_files(root, class_names, strict):
    """The pool's readable image files, sorted, with their hidden labels."""
    if not os.path.isdir(root):
        raise UsageError(f"--unlabeled={root}: no such folder. Pass a folder of images, "
                         f"or tfds:NAME:SPLIT.")
    label_of = {name: label for label, name in enumerate(class_names)}
    paths, labels = [], []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        top = os.path.relpath(directory, root).split(os.sep)[0]
        label = label_of.get(top, -1)
        for name in sorted(names):
            if (not name.startswith(".")
                    and os.path.splitext(name)[1].lower() in image_io.IMAGE_EXTENSIONS):
                paths.append(os.path.join(directory, name))
                labels.append(label)
    if not paths:
        raise UsageError(
            f"--unlabeled={root}: no image files in it or its subfolders "
            f"({', '.join(sorted(image_io.IMAGE_EXTENSIONS))}).")
    files = folder.FileList(paths, labels)
    with progress.step(f"Checking {len(files):,} unlabelled image files", len(files),
                       unit="file") as checking:
        problems = folder.file_problems(files, checking.advance)
        checking.result = f"Checked {len(files):,} unlabelled image files"
    return folder.drop_unreadable(files, problems, strict)


def _without_split_files(files, split_files, source):
    """`files` without the run's training images; refuses validation and test ones."""
    for split in ("validation", "test"):
        shared = same_files(files.paths, split_files[split])
        if shared:
            listing = "\n".join(f"  {files.paths[index]} (the {split} image {other})"
                                for index, other in sorted(shared.items())[:_FILES_SHOWN])
            raise UsageError(
                f"--unlabeled={source} holds {len(shared)} of the run's {split} images, "
                f"which must never be trained on:\n{listing}\nRemove them from the "
                f"unlabelled folder.")
    training = same_files(files.paths, split_files["train"])
    if training:
        print(f"Leaving out {len(training):,} unlabelled images that are the run's "
              f"training images, labelled already.", flush=True)
    return files.take(np.setdiff1d(np.arange(len(files)), list(training)))


def same_files(paths, others):
    """The files of `paths` that are also one of `others`: the same file (the
    same real path) or the same bytes.

    Only files of a size some other file has are read.

    Returns:
        {index into `paths`: the path in `others` it equals}.
    """
    real_others = {os.path.realpath(other): other for other in others}
    by_size = {}
    for other in others:
        by_size.setdefault(os.path.getsize(other), []).append(other)
    digests = {}

    def digest(path):
        if path not in digests:
            with open(path, "rb") as file:
                digests[path] = hashlib.sha256(file.read()).digest()
        return digests[path]

    shared = {}
    for index, path in enumerate(paths):
        real = os.path.realpath(path)
        if real in real_others:
            shared[index] = real_others[real]
            continue
        for other in by_size.get(os.path.getsize(path), ()):
            if digest(other) == digest(path):
                shared[index] = other
                break
    return shared


def parse_tfds_source(source):
    """`tfds:NAME[:VERSION]:SPLIT` as (NAME, VERSION or None, SPLIT).

    A split may hold colons of its own (`train[:50%]`), so a version is
    recognised by its form, e.g. `3.0.2` or `3.*.*`.
    """
    match = re.fullmatch(r"tfds:([^:]+?)(?::(\d+\.[\d*]+\.[\d*]+))?:(.+)", source)
    if match is None:
        raise UsageError(f"--unlabeled={source}: pass tfds:NAME:SPLIT, or "
                         f"tfds:NAME:VERSION:SPLIT, such as tfds:cifar10:3.0.2:train.")
    return match.groups()


def _tfds_pool(source, splits, *, dataset, data_dir, image_size, resize):
    """A TFDS split as the pool; refused where it shares examples with the
    run's validation or test split (the same TFDS dataset, whatever either's
    version, and overlapping slices). Another config of the same dataset
    (`name/config`) is another dataset here: its overlap isn't checked."""
    name, version, split = parse_tfds_source(source)
    builder = tfds_dataset.prepared_builder(f"{name}:{version}" if version else name, data_dir)
    tfds_splits.check_split(builder, f"--unlabeled={source}", split)
    # `cifar10:3.0.2` is still cifar10: another version holds the same images.
    if splits.split_specs is not None and tfds_dataset.name_without_version(dataset) == name:
        for role in ("validation", "test"):
            shared = tfds_splits.shared_slices(split, splits.split_specs[role],
                                                builder.info.splits)
            if shared:
                raise UsageError(
                    f"--unlabeled={source} shares examples with the run's {role} split "
                    f"({shared} of --dataset={dataset}), which must never be trained on. "
                    f"Pass a split or slice of {name} that doesn't overlap "
                    f"{splits.split_specs[role]}.")
    image_key, label_key = builder.info.supervised_keys
    labels = tfds_dataset.split_labels(builder, split)
    if not len(labels):
        raise UsageError(f"--unlabeled={source}: the split holds no examples.")
    names = builder.info.features[label_key].names
    label_of = {class_name: label for label, class_name in enumerate(splits.class_names)}
    hidden = np.array([label_of.get(names[label], -1) if label >= 0 else -1
                       for label in labels], np.int64)
    shape = tuple(builder.info.features[image_key].shape)
    # As a folder's: their own size when they all share one within the input.
    image_shape = (shape if None not in shape and max(shape[:2]) <= image_size
                   else (image_size, image_size, 3))
    image_shape = (*image_shape[:2], 3)
    encoded = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={image_key: tfds.decode.SkipDecoding()})

    def read(indices, chosen_labels, reduce_jpeg):
        del reduce_jpeg  # TFDS images are small enough to decode whole.
        keep = np.zeros(len(labels), bool)
        keep[indices] = True
        label_at = np.full(len(labels), -1, np.int64)
        label_at[indices] = chosen_labels
        keep, label_at = tf.constant(keep), tf.constant(label_at)
        return encoded.enumerate().filter(lambda index, example: keep[index]).map(
            lambda index, example: (
                _to_shape(image_io.decode_image(example[image_key]), image_shape, resize),
                label_at[index]),
            num_parallel_calls=tf.data.AUTOTUNE)

    ids = np.array([f"{source}#{index}" for index in range(len(labels))])
    return Pool(source=source, ids=ids, hidden_labels=hidden, image_shape=image_shape,
                read=read)


def _to_shape(image, image_shape, resize):
    """The image, brought to `image_shape` as the model resizes, where it differs."""
    image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == image_shape[:2]),
                    lambda: image,
                    lambda: pipeline.resize_uint8(image, image_shape[0], resize))
    return tf.ensure_shape(image, image_shape)
