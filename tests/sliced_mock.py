"""TFDS's mock data, with split slices read as TFDS reads them."""

import contextlib
import types
from unittest import mock

import tensorflow_datasets as tfds


@contextlib.contextmanager
def mock_data(num_examples):
    """`tfds.testing.mock_data(num_examples)`, where a slice reads its share.

    The mock alone reads every example for any slice, so `train[0%:90%]` and
    `train[90%:100%]` would both be all of train. Here each slice is the same
    range of the mock's (deterministic) examples that TFDS would read of a
    split of `num_examples`.
    """
    with tfds.testing.mock_data(num_examples=num_examples):
        read_whole = tfds.core.DatasetBuilder.as_dataset
        split_info = types.SimpleNamespace(num_examples=num_examples)

        def as_dataset(self, split, **kwargs):
            parts = []
            for spec in split.split("+"):
                instruction = tfds.core.ReadInstruction.from_spec(spec)
                [part] = instruction.to_absolute({instruction.split_name: split_info})
                # TFDS writes None for a bound at either end.
                start, end = part.from_ or 0, part.to or num_examples
                whole = read_whole(self, split=part.splitname, **kwargs)
                parts.append(whole.skip(start).take(end - start))
            dataset = parts[0]
            for part in parts[1:]:
                dataset = dataset.concatenate(part)
            return dataset

        with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", as_dataset):
            yield
