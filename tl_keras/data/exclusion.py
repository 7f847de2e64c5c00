"""`--exclude_files`: training examples a run leaves out, listed in a text file.

One example a line, as `--mode=audit` writes them to `exclude.txt`: for a
folder dataset, an image's path (absolute, or relative to the working
directory); for a TFDS dataset, an example's index in the training split as
TFDS reads it (`--train_split`, less any validation carved from it). Blank
lines and lines that start with `#` are skipped.

Only training examples can be left out: a validation or test image that has a
copy in train stays where it is, and its training copy is the one to drop.
"""

import os

import numpy as np
import tensorflow as tf

from tl_keras.errors import UsageError

_SHOWN = 5


def read_entries(path):
    """The examples `path` lists, in its order, each once."""
    with open(path) as file:
        lines = (line.strip() for line in file)
        return tuple(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def folder_positions(path, train_paths, other_paths):
    """Where each file `path` lists is among the training files.

    Args:
        path: the `--exclude_files` file.
        train_paths: the training files, in the split's order.
        other_paths: the validation and test files, by split name.

    Returns:
        The sorted positions in `train_paths` of the listed files.

    Raises:
        UsageError: naming the listed files that are validation or test images,
            or no image of the dataset at all.
    """
    position_of = {_normalised(file): index for index, file in enumerate(train_paths)}
    split_of = {_normalised(file): split
                for split, files in other_paths.items() for file in files}
    positions, held_out, unknown = [], [], []
    for entry in read_entries(path):
        key = _normalised(entry)
        if key in position_of:
            positions.append(position_of[key])
        elif key in split_of:
            held_out.append(f"{entry} (a {split_of[key]} image)")
        else:
            unknown.append(entry)
    if held_out:
        raise UsageError(
            f"--exclude_files={path} lists {len(held_out)} image(s) of the validation or "
            f"test split: {_listing(held_out)}. Only training images can be left out; "
            f"where a held-out image has a copy in train, list the training copy.")
    if unknown:
        raise UsageError(
            f"--exclude_files={path} lists {len(unknown)} file(s) that aren't images of "
            f"the dataset: {_listing(unknown)}. List training images by their paths, as "
            f"--mode=audit writes them to exclude.txt.")
    return np.array(sorted(positions), np.int64)


def tfds_positions(path, count):
    """The training examples `path` lists by index, sorted.

    Raises:
        UsageError: for an entry that isn't an index below `count`.
    """
    entries = read_entries(path)
    bad = [entry for entry in entries if not (entry.isdigit() and int(entry) < count)]
    if bad:
        raise UsageError(
            f"--exclude_files={path} lists {len(bad)} entr(ies) that aren't examples of "
            f"the training split: {_listing(bad)}. For a TFDS dataset, list each training "
            f"example by its index, 0 to {count - 1}, as --mode=audit writes them to "
            f"exclude.txt.")
    return np.array(sorted(int(entry) for entry in entries), np.int64)


def without_positions(examples, positions, count):
    """`examples` (a `tf.data.Dataset` of `count` elements) less those at
    `positions`.

    Returns:
        (the dataset, the positions of the examples kept, sorted).
    """
    keep = np.ones(count, bool)
    keep[positions] = False
    kept = np.flatnonzero(keep)
    mask = tf.constant(keep)
    dataset = (examples.enumerate()
               .filter(lambda index, example: mask[index])
               .map(lambda index, example: example)
               # Keras restarts a dataset each epoch only if it knows its length.
               .apply(tf.data.experimental.assert_cardinality(len(kept))))
    return dataset, kept


def describe(path, count):
    return f"Leaving out {count:,} training image(s) listed in --exclude_files={path}."


def _normalised(path):
    return os.path.normpath(os.path.abspath(path))


def _listing(entries):
    more = len(entries) - _SHOWN
    return ", ".join(entries[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
