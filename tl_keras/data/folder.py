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

from tl_keras import progress
from tl_keras.data import exclusion
from tl_keras.data import image_io
from tl_keras.data import subsets
from tl_keras.data.splits import Splits
from tl_keras.errors import UsageError

PREFIX = "folder:"

# Folder names taken as splits, compared case-insensitively.
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "validation": ("val", "validation", "valid", "dev"),
    "test": ("test", "testing", "eval"),
}

_SKIPPED_FILES_SHOWN = 5


def is_folder_dataset(dataset):
    return dataset.startswith(PREFIX)


def load_folder(dataset, *, image_size, resize, val_fraction, seed, strict, classes,
                train_examples_per_class, exclude_files=None, reduce_train_jpeg=True):
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
        exclude_files: a file listing training images to leave out
            (`tl_keras.data.exclusion`), applied after validation and test are
            held out, so they stay the same; None leaves none out.
        reduce_train_jpeg: let training decode large JPEGs at reduced scale
            (`tl_keras.data.image_io.decoded_examples`). Defaults to True; the
            audit turns it off, to compare every split's decoded pixels.

    Returns:
        `tl_keras.data.splits.Splits`.

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

    listed = _readable_files(split_dirs, train_dir, class_names, strict)
    sources = _carve_missing_splits(listed, split_dirs, root, val_fraction, seed)
    if exclude_files:
        listed["train"] = _without_excluded(listed, exclude_files)

    class_names, listed = _select_files(
        class_names, listed, classes, train_examples_per_class, seed
    )
    subsets.check_every_class_present(
        {split: files.labels for split, files in listed.items()}, class_names, strict
    )
    # Listed class by class, the files would reach the pipeline's shuffle
    # buffer (smaller than a big split) a few classes at a time: mix them first.
    listed["train"] = listed["train"].shuffled(np.random.default_rng(seed))
    image_shape = image_io.common_image_shape(
        np.concatenate([files.paths for files in listed.values()]), image_size
    )
    decoded = functools.partial(
        image_io.decoded_examples, image_shape=image_shape, image_size=image_size,
        resize=resize,
    )
    return Splits(
        # Training alone may decode JPEGs at reduced scale: its pixels need not
        # match serving's bit for bit, while evaluation's must.
        train=decoded(listed["train"], reduce_jpeg=reduce_train_jpeg),
        validation=decoded(listed["validation"]),
        test=decoded(listed["test"]),
        class_names=tuple(class_names),
        sizes={split: len(files) for split, files in listed.items()},
        image_shape=image_shape,
        validation_source=sources["validation"],
        train_class_counts=subsets.class_counts(listed["train"].labels, len(class_names)),
        files={split: files.paths for split, files in listed.items()},
    )


def _readable_files(split_dirs, train_dir, class_names, strict):
    """The image files of each split folder there is, those that can't be
    images dropped (or refused, if `strict`), by split."""
    listed = {"train": _list_files(train_dir, class_names)}
    for split in ("validation", "test"):
        if split in split_dirs:
            listed[split] = _list_files(split_dirs[split], class_names)
    total = sum(len(files) for files in listed.values())
    with progress.step(f"Checking {total:,} image files", total, unit="file") as checking:
        problems = {split: file_problems(files, checking.advance)
                    for split, files in listed.items()}
        checking.result = f"Checked {total:,} image files"
    return {split: drop_unreadable(files, problems[split], strict)
            for split, files in listed.items()}


def _carve_missing_splits(listed, split_dirs, root, val_fraction, seed):
    """Holds out `val_fraction` of each class of train for each split without
    a folder, in place in `listed`.

    Returns:
        Where each split's files came from, in words, by split.
    """
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
    return sources


def _without_excluded(listed, exclude_files):
    """The training files less those `exclude_files` lists, the count printed."""
    train = listed["train"]
    dropped = exclusion.folder_positions(
        exclude_files, train.paths,
        {split: files.paths for split, files in listed.items() if split != "train"})
    print(exclusion.describe(exclude_files, len(dropped)), flush=True)
    return train.take(np.setdiff1d(np.arange(len(train)), dropped))


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


def _select_files(class_names, listed, classes, train_examples_per_class, seed):
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
            and os.path.splitext(entry.name)[1].lower() in image_io.IMAGE_EXTENSIONS
        )
        if not images:
            raise UsageError(
                f"Class folder {class_dir} has no images "
                f"({', '.join(sorted(image_io.IMAGE_EXTENSIONS))}); add some or remove it."
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


def file_problems(files, checked):
    """Why each file can't be an image (None if it can), by its first and last
    bytes; calls `checked()` after each file."""
    problems = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        for problem in pool.map(image_io.image_file_problem, files.paths, chunksize=256):
            problems.append(problem)
            checked()
    return problems


def drop_unreadable(files, problems, strict):
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


