"""Where a run's examples come from: a TFDS dataset (`tl_keras.data.tfds_dataset`) or a
folder of images (`tl_keras.data.folder`). Either gives the same `Splits`, which
`tl_keras.data.pipeline` turns into batches.
"""

from tl_keras.data import folder
from tl_keras.data import tfds_dataset


def load_splits(config, count_train_classes=False, reduce_train_jpeg=True):
    """The run's examples, from a TFDS dataset or an image folder.

    Args:
        config: the run's `tl_keras.config.Config`.
        count_train_classes: make sure `Splits.train_class_counts` is known,
            which for a TFDS dataset may cost a pass over the training labels.
        reduce_train_jpeg: for a folder, let training decode large JPEGs at
            reduced scale (`tl_keras.data.folder.load_folder`).

    Returns:
        `tl_keras.data.splits.Splits`.
    """
    if folder.is_folder_dataset(config.dataset):
        splits = folder.load_folder(
            config.dataset, image_size=config.image_size, resize=config.resize,
            val_fraction=config.val_fraction, seed=config.seed,
            strict=config.strict_data, classes=config.classes,
            train_examples_per_class=config.train_examples_per_class,
            exclude_files=config.exclude_files, reduce_train_jpeg=reduce_train_jpeg,
        )
    else:
        splits = tfds_dataset.load_tfds(
            config.dataset, config.data_dir, config.train_split, config.val_split,
            config.test_split, config.val_fraction, classes=config.classes,
            train_examples_per_class=config.train_examples_per_class, seed=config.seed,
            strict=config.strict_data,
            count_train_classes=count_train_classes, exclude_files=config.exclude_files,
        )
    print(
        f"Dataset {config.dataset}: {splits.num_classes} classes; "
        f"{splits.sizes['train']:,} train, {splits.sizes['validation']:,} validation "
        f"({splits.validation_source}), {splits.sizes['test']:,} test examples.",
        flush=True,
    )
    return splits
