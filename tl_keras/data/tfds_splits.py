"""TFDS split specs (`train[:90%]`, `train+test`): the split names they use,
carving a validation split from the training one, and which examples two
specs share, from their slice bounds alone."""

import tensorflow_datasets as tfds

from tl_keras.errors import UsageError


def check_split(builder, option, split):
    """Refuses a split spec (`option`'s value) naming a split the dataset lacks."""
    available = set(builder.info.splits.keys())
    # A split may be a slice such as `train[:10%]` or a sum `train+test`.
    names = {part.split("[")[0].strip() for part in split.split("+")}
    # A mocked dataset (in tests) has no split metadata; accept what TFDS accepts.
    missing = sorted(names - available) if available else []
    if missing:
        raise UsageError(
            f"{option}={split}: {builder.name} has no split "
            f"{', '.join(missing)}. Its splits are {', '.join(sorted(available))}; "
            f"a slice such as train[:90%] also works."
        )


def carve(train_split, val_fraction, split_infos):
    """Holds out the last `val_fraction` of each part of a TFDS split spec.

    Both results are TFDS slices, so they are disjoint however TFDS orders
    the examples it reads. Of 50,000 examples, `train` becomes
    `train[0:45000]` and `train[45000:50000]`; each part of a sum gives its
    own last fraction.

    Args:
        train_split: `--train_split`, e.g. `train`, `train[:50%]`, `train+test`.
        val_fraction: the fraction of each part held out.
        split_infos: the dataset's `builder.info.splits`.

    Returns:
        (the split spec to train on, the split spec to validate on).

    Raises:
        UsageError: for a part too small to give examples to both.
    """
    kept, held_out = [], []
    for part in _parts(train_split):
        unit, start, end = _bounds(part, split_infos)
        if unit == "%":
            cut = end - (end - start) * val_fraction
        else:
            cut = end - max(1, round((end - start) * val_fraction))
            if cut <= start:
                raise UsageError(
                    f"--train_split={train_split}: {_slice(part.split_name, unit, start, end)} "
                    f"has too few examples to hold out --val_fraction={val_fraction} "
                    f"and train on the rest; pass a --val_split."
                )
        kept.append(_slice(part.split_name, unit, start, cut))
        held_out.append(_slice(part.split_name, unit, cut, end))
    return "+".join(kept), "+".join(held_out)


def check_disjoint(train_split, val_split, split_infos):
    """Refuses a validation split that shares examples with the training split.

    Parts that read the same TFDS split are compared by their slice bounds.

    Raises:
        UsageError: naming both splits and the slices they share.
    """
    shared = shared_slices(train_split, val_split, split_infos)
    if shared:
        raise UsageError(
            f"--train_split={train_split} and --val_split={val_split} overlap: "
            f"{shared} share examples, so validation would score examples the model "
            f"trains on. Pass slices that don't overlap (e.g. --train_split=train[:90%] "
            f"--val_split=train[90%:]), or leave --val_split empty to carve it."
        )


def shared_slices(first, second, split_infos):
    """The first two parts of split specs `first` and `second` that share
    examples, in words (`train[0:100] and train[50:150]`), or None.

    Parts that read the same TFDS split are compared by their slice bounds.
    """
    for first_part in _parts(first):
        for second_part in _parts(second):
            if first_part.split_name != second_part.split_name:
                continue
            unit, first_start, first_end = _bounds(first_part, split_infos)
            _, second_start, second_end = _bounds(second_part, split_infos)
            if first_end <= second_start or second_end <= first_start:
                continue
            name = first_part.split_name
            return (f"{_slice(name, unit, first_start, first_end)} and "
                    f"{_slice(name, unit, second_start, second_end)}")
    return None


def _parts(split):
    """The `tfds.core.ReadInstruction` of each `+`-separated part of a split spec."""
    try:
        parts = [tfds.core.ReadInstruction.from_spec(part) for part in split.split("+")]
    except ValueError as error:
        raise UsageError(f"Can't read the split {split!r}: {error}") from error
    if not all(isinstance(part, tfds.core.ReadInstruction) for part in parts):
        raise UsageError(f"Name the splits in {split!r} (e.g. train+test) instead of all.")
    return parts


def _bounds(part, split_infos):
    """A part's (unit, start, end), in examples from the dataset's split sizes.

    A mocked dataset (in tests) has no split sizes: its whole splits and
    percent slices are bounded in percent instead, which TFDS maps to the
    same examples whatever their count.
    """
    if part.split_name in split_infos:
        try:
            [absolute] = part.to_absolute(split_infos)
        except ValueError as error:
            raise UsageError(f"Can't read {part!r}: {error}") from error
        # TFDS writes None for a bound at either end.
        end = split_infos[part.split_name].num_examples if absolute.to is None else absolute.to
        return "abs", absolute.from_ or 0, end
    if part.unit == "%" or (part.from_ is None and part.to is None):
        start = 0 if part.from_ is None else part.from_ + (100 if part.from_ < 0 else 0)
        end = 100 if part.to is None else part.to + (100 if part.to < 0 else 0)
        return "%", start, end
    raise UsageError(
        f"Can't tell which examples {part.split_name}[{part.from_}:{part.to}] holds: "
        f"the dataset doesn't record its split sizes. Slice it in percent instead."
    )


def _slice(split_name, unit, start, end):
    suffix = "%" if unit == "%" else ""
    return f"{split_name}[{start:g}{suffix}:{end:g}{suffix}]"
