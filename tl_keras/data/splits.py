"""`Splits`: a run's examples as the data stage hands them on, whichever source
(a TFDS dataset or a folder) they came from.
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Splits:
    """The examples of a run, unbatched: each element is (image uint8 HxWx3, label).

    Attributes:
        train: the training examples, in a fixed order (the pipeline shuffles).
        validation: the examples checked after each epoch.
        test: the examples only the final evaluation reads.
        class_names: the label names, index by index, from the dataset's metadata.
        sizes: the number of examples in each split, by name.
        image_shape: the static (height, width, 3) when every image has it, or
            None when sizes vary.
        validation_source: how the validation split was chosen, for the log.
        train_class_counts: the number of training examples of each class, by
            label; None where nothing read the labels (a TFDS dataset loaded
            without `count_train_classes`, `classes` or
            `train_examples_per_class`).
        files: for a folder dataset, each split's file paths, by split name,
            which `tl_keras.training.self_training` keeps out of its unlabelled pool;
            None for a TFDS dataset.
        split_specs: for a TFDS dataset, the split specs each split reads
            (train's less, and validation's as, carved), by split name; None
            for a folder.
        indices: for a TFDS dataset, each example's index in its split spec
            as TFDS reads it, by split name (what `--exclude_files` lists);
            None for a folder.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    class_names: tuple
    sizes: dict
    image_shape: tuple | None
    validation_source: str
    train_class_counts: tuple | None = None
    files: dict | None = None
    split_specs: dict | None = None
    indices: dict | None = None

    @property
    def num_classes(self):
        return len(self.class_names)
