"""Choosing examples: stratified held-out splits, `--classes` and
`--train_examples_per_class`.

Pure NumPy on label arrays, so a TFDS dataset and an image folder choose the
same way; each source applies the choice to its own examples.
"""

import difflib

import numpy as np

from tl_keras.errors import UsageError


def stratified_indices(labels, fraction, rng, split_name):
    """Picks `fraction` of each class's examples, at random by `rng`.

    Each class keeps at least one example out of the pick, so carving never
    empties a class.

    Returns:
        The picked indices into `labels`, sorted.

    Raises:
        UsageError: when no class has enough examples to give any.
    """
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(int(round(len(members) * fraction)), len(members) - 1)
        picked.append(rng.permutation(members)[:count])
    picked = np.sort(np.concatenate(picked)) if picked else np.array([], np.int64)
    if not len(picked):
        raise UsageError(
            f"Too few images to hold out a {split_name} split at {fraction:.0%} per "
            f"class; add a {split_name} folder, more images, or a larger --val_fraction."
        )
    return picked


def check_every_class_present(labels_by_split, class_names, strict):
    """Says which splits hold no example of some class, before any training.

    Such a class goes unmeasured there (its support is 0 in the evaluation).

    Args:
        labels_by_split: the labels of each split, by split name.
        class_names: the class names, by label.
        strict: raise instead of printing a note.

    Raises:
        UsageError: with `strict`, naming each split and the classes it lacks.
    """
    gaps = []
    for split, labels in labels_by_split.items():
        missing = np.setdiff1d(np.arange(len(class_names)), labels)
        if len(missing):
            names = ", ".join(class_names[label] for label in missing)
            gaps.append(f"the {split} split has no examples of {names}")
    if not gaps:
        return
    problem = "; ".join(gaps)
    if strict:
        raise UsageError(
            f"{problem[0].upper()}{problem[1:]} (--strict_data). Add examples of "
            f"those classes, or drop --strict_data to go on without them there."
        )
    print(f"Note: {problem}; their metrics there will have support 0. "
          f"--strict_data makes this an error.", flush=True)


def class_mapping(class_names, classes):
    """Maps old labels to the order `--classes` gives.

    Args:
        class_names: the dataset's class names, by label.
        classes: the names to keep, in their new order; empty keeps all.

    Returns:
        (new class names, int array: old label -> new label, or -1 if dropped).

    Raises:
        UsageError: for an unknown or repeated name.
    """
    if not classes:
        return list(class_names), np.arange(len(class_names))
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise UsageError(f"--classes names {', '.join(repeated)} more than once.")
    unknown = [name for name in classes if name not in class_names]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, class_names, n=3)
            hints.append(f"{name} (closest: {', '.join(close)})" if close else name)
        raise UsageError(
            f"--classes: no class {'; '.join(hints)}. The classes are "
            f"{', '.join(class_names)}."
        )
    if len(classes) < 2:
        raise UsageError("--classes must name at least two classes.")
    old_to_new = np.full(len(class_names), -1)
    for new, name in enumerate(classes):
        old_to_new[list(class_names).index(name)] = new
    return list(classes), old_to_new


def per_class_indices(labels, examples_per_class, seed):
    """Keeps `examples_per_class` examples of each class, chosen by `seed`.

    Returns:
        (sorted kept indices into `labels`, classes that had fewer examples).
    """
    rng = np.random.default_rng(seed)
    kept, short = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < examples_per_class:
            short.append(int(label))
        kept.append(rng.permutation(members)[:examples_per_class])
    return np.sort(np.concatenate(kept)), short


def describe_short_classes(short, class_names, examples_per_class):
    """A note for classes with fewer training images than asked for."""
    if not short:
        return None
    names = ", ".join(class_names[label] for label in short)
    return (
        f"Note: --train_examples_per_class={examples_per_class}, but {names} "
        f"had fewer; they keep all they have."
    )


def class_counts(labels, num_classes):
    """The number of examples of each class among `labels`, as a tuple; None
    when the labels are None (not read)."""
    if labels is None:
        return None
    return tuple(int(count) for count in np.bincount(labels, minlength=num_classes))
