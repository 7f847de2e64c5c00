"""The transfer experiment's runs: the source, the target arms and what each
trains, as `run.py` flags; and arm (d)'s pool of unlabelled images.
"""

import dataclasses
import os
import shutil
import sys

import numpy as np

from transfer import REPOSITORY

SOURCE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TARGET_CLASSES = ("dog", "frog", "horse", "ship", "truck")
GAIN_SIZE = 100

# The target runs' validation share and seed, which write_unlabeled_pool
# repeats to find the files each run holds out.
TARGET_VAL_FRACTION = 0.02
TARGET_SEED = 42
# Arm (d) runs at these sizes only; other rows show no figure for it.
SELF_TRAINING_SIZES = (20, 100)
# Arm (d)'s self-training, beyond the tool's defaults (docs/results.md, "How the
# self-training recipe was chosen" measures each choice).
SELF_TRAINING_FLAGS = (
    "--self_training_rounds=1",
)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Epoch counts of one mode of the experiment.

    Attributes:
        source_epochs: epochs of the source run.
        target_epochs: epochs of every target arm.
        head_epochs: of those, the head-phase epochs of arm (c).
        self_training_epochs: the epochs of arm (d)'s self-training round,
            after arm (c)'s.
        source_augment: the source's `--augment`.
        pool_sizes: arm (d) at N=GAIN_SIZE also runs on random subsets of
            its pool of these sizes, for the table of accuracy against the
            number of unlabelled images.
    """

    source_epochs: int
    target_epochs: int
    head_epochs: int
    self_training_epochs: int
    source_augment: str
    pool_sizes: tuple = ()


# The crop and flip pay off over 15 source epochs, not over 3: there the
# source reached 72.1% with them and arm (c) at N=100 69.6%, where 2 epochs
# without them had reached 74.2% (docs/results.md).
# Arm (d)'s round is the tool's default round (--self_training_epochs).
FULL = Schedule(source_epochs=15, target_epochs=30, head_epochs=10, self_training_epochs=30,
                source_augment="basic", pool_sizes=(1000, 5000))
# Quick mode's round is a third of the full one, and no shorter: with 5
# epochs, arm (d)'s best validation top-1 only tied arm (c)'s, so arm (c)'s
# weights were exported; with 10 it beat arm (c) (docs/results.md).
QUICK = Schedule(source_epochs=3, target_epochs=30, head_epochs=10, self_training_epochs=10,
                 source_augment="none")

# Settings every run shares: the CPU-friendly model, and plain Adam without
# weight decay or label smoothing, so the arms differ only in their weights and
# in what they train.
COMMON_FLAGS = (
    "--backbone=mobilenetv3small",
    "--image_size=128",
    "--optimizer=adam",
    "--weight_decay=0",
    "--label_smoothing=0",
    "--mixed_precision=off",
)

ARMS = {
    "scratch": "(a) scratch",
    "head": "(b) head only",
    "both": "(c) both phases",
    "self": "(d) both phases + self-training",
}
DEFAULT_ARMS = ("scratch", "head", "both", "self")


def missing_class_folders(data, classes):
    """The message for a --data folder that lacks `classes`' train or test
    folders (DATA/{train,test}/<class>/), or None when it holds them all."""
    missing = [f"{split}/{name}" for split in ("train", "test") for name in classes
               if not os.path.isdir(os.path.join(data, split, name))]
    if not missing:
        return None
    return (f"--data={data} should hold CIFAR-10 as image folders, "
            f"DATA/{{train,test}}/<class>/*.jpg, but lacks {', '.join(missing[:4])}"
            f"{' and more' if len(missing) > 4 else ''}.")


def source_flags(data, schedule, classes=SOURCE_CLASSES):
    """The source run: every layer from random weights, BatchNormalization
    included, since random initial statistics normalise nothing."""
    return [
        f"--dataset=folder:{data}",
        f"--classes={','.join(classes)}",
        "--weights=none",
        "--batchnorm=train",
        "--head_epochs=0",
        f"--finetune_epochs={schedule.source_epochs}",
        "--finetune_learning_rate=1e-3",
        "--warmup_epochs=0.3",
        "--unfreeze=all",
        "--batch_size=64",
        "--dropout=0",
        # In full mode a random resized crop and flip: the transferred features
        # are what the target arms get, and with augmentation they were worth
        # 2.7 points of arm (c) at N=100 (70.6% to 73.3%, issue 7).
        f"--augment={schedule.source_augment}",
    ]


def target_flags(data, size, arm, schedule, source_weights, classes=TARGET_CLASSES,
                 unlabeled=None, self_training=()):
    """One target run: `size` images per class, trained as `arm` says; arm
    `self` also self-trains on the images in the folder `unlabeled`, with
    the run.py flags `self_training` last, so that they win."""
    flags_ = [
        f"--dataset=folder:{data}",
        f"--classes={','.join(classes)}",
        f"--train_examples_per_class={size}",
        f"--val_fraction={TARGET_VAL_FRACTION}",
        f"--seed={TARGET_SEED}",
        "--batch_size=32",
        # Every arm sees the same random resized crop and flip: with 100
        # images a class they are most of what keeps the fine-tuned backbone
        # from memorising them (docs/results.md's ablation, row 1).
        "--augment=basic",
        # Test top-1 is also reported with the mirrored image averaged in.
        "--tta=flip",
    ]
    if arm == "scratch":
        return flags_ + [
            "--weights=none",
            "--batchnorm=train",
            "--head_epochs=0",
            f"--finetune_epochs={schedule.target_epochs}",
            "--finetune_learning_rate=1e-3",
            "--warmup_epochs=1",
            "--unfreeze=all",
        ]
    flags_ += [f"--weights={source_weights}", "--head_learning_rate=1e-3"]
    if arm == "head":
        return flags_ + [f"--head_epochs={schedule.target_epochs}", "--finetune_epochs=0"]
    both = flags_ + [
        f"--head_epochs={schedule.head_epochs}",
        f"--finetune_epochs={schedule.target_epochs - schedule.head_epochs}",
        # 3e-4 rather than 1e-4: the ablation's largest single lever (row 5).
        "--finetune_learning_rate=3e-4",
        "--warmup_epochs=1",
        "--unfreeze=all",
    ]
    if arm == "both":
        return both
    if not unlabeled:
        raise ValueError("arm self needs the folder of unlabelled images")
    return both + [f"--unlabeled={unlabeled}", *SELF_TRAINING_FLAGS,
                   f"--self_training_epochs={schedule.self_training_epochs}", *self_training]


def run_name_suffix(self_training):
    """`__a=1__b=2` for `--self_training_flags=--a=1,--b=2`, or ''."""
    return "".join("__" + flag.lstrip("-").replace("/", "_") for flag in self_training)


def write_unlabeled_pool(data, pool_dir, size, classes=TARGET_CLASSES):
    """Makes arm (d)'s unlabelled folder: `pool_dir/<class>/`, links to every
    training image of `classes` that the target run of `size` images per class
    neither trains nor validates on (about 24,500 at N=100).

    The run lists the same files (the same flags and seed), so its validation
    images stay out of the pool, as `--unlabeled` requires. The subfolders are
    named after the classes so that each round reports how right its
    pseudo-labels are; the run never trains on those names. Kept once made.

    Returns:
        `pool_dir`.
    """
    if os.path.isdir(pool_dir):
        return pool_dir
    sys.path.insert(0, REPOSITORY)
    from tl_keras.data import folder

    splits = folder.load_folder(
        f"folder:{data}", image_size=32, resize="stretch", val_fraction=TARGET_VAL_FRACTION,
        seed=TARGET_SEED, strict=False, classes=tuple(classes),
        train_examples_per_class=size)
    taken = {os.path.realpath(path)
             for path in np.concatenate([splits.files["train"], splits.files["validation"]])}
    partial = pool_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for name in classes:
        class_dir = os.path.join(data, "train", name)
        os.makedirs(os.path.join(partial, name))
        for file_name in sorted(os.listdir(class_dir)):
            path = os.path.realpath(os.path.join(class_dir, file_name))
            if path not in taken:
                os.symlink(path, os.path.join(partial, name, file_name))
    os.replace(partial, pool_dir)
    return pool_dir


def write_pool_subset(pool_dir, subset_dir, count):
    """A random `count` of the pool's images (seeded, so reruns agree), as
    links in `subset_dir/<class>/`: the pool a user with fewer unlabelled
    images would have. Kept once made.

    Returns:
        `subset_dir`.
    """
    if os.path.isdir(subset_dir):
        return subset_dir
    links = sorted(os.path.join(name, file_name) for name in os.listdir(pool_dir)
                   for file_name in os.listdir(os.path.join(pool_dir, name)))
    if count > len(links):
        raise ValueError(f"{pool_dir} holds {len(links)} images, fewer than {count}")
    chosen = np.random.default_rng(TARGET_SEED).choice(len(links), count, replace=False)
    partial = subset_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for index in sorted(chosen):
        os.makedirs(os.path.join(partial, os.path.dirname(links[index])), exist_ok=True)
        os.symlink(os.path.realpath(os.path.join(pool_dir, links[index])),
                   os.path.join(partial, links[index]))
    os.replace(partial, subset_dir)
    return subset_dir
