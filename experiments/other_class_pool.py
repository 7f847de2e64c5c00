"""What self-training's selection keeps when the unlabelled folder also holds
images of other classes: measured with the transfer experiment's teachers.

    python experiments/other_class_pool.py --data=../shared/data/cifar10-jpg \\
        [--work_dir=DIR] [--sizes=20,100]

--data, --work_dir and --sizes are the transfer experiment's, with its
defaults (its full mode's work folder, N=20 and N=100).

For each N in --sizes it takes arm (c)'s finished run at N from the transfer
experiment's full-mode work folder (`experiments/cifar10_transfer.py`), the
teacher of arm (d)'s round, and lets it label two sets of images, as a round
labels its pool:
  - arm (d)'s pool: the target classes' training images its run neither
    trains nor validates on (WORK_DIR/unlabeled_nN, which that script made);
  - the source classes' training images (airplane, automobile, bird, cat,
    deer: 25,000), which none of the run's classes describes.
It then keeps pseudo-labels from the two together with `--self_training`'s
default rule (confidence of at least the default threshold, at most the
default share of the mixed pool per class) and prints how many of the kept
ones are other-class images, and what the teacher calls each other class.

Nothing trains: this measures what a round would train on, not what the
student would then score.
"""

import dataclasses
import os
import sys

import numpy as np
from absl import app, flags

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The transfer experiment's own --data, --work_dir and --sizes, with its defaults.
import cifar10_transfer  # noqa: E402
from transfer import arms  # noqa: E402


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    data = os.path.abspath(cifar10_transfer._DATA.value)
    work_dir = cifar10_transfer.chosen_work_dir()
    sizes = [int(size)
             for size in cifar10_transfer._SIZES.value or cifar10_transfer.FULL_SIZES]
    teachers = {size: os.path.join(work_dir, f"target_n{size}_both", "model.keras")
                for size in sizes}
    missing = [path for path in teachers.values() if not os.path.exists(path)]
    missing += [os.path.join(data, "train", name) for name in arms.SOURCE_CLASSES
                if not os.path.isdir(os.path.join(data, "train", name))]
    if missing:
        raise app.UsageError(
            f"Missing {', '.join(missing)}: run experiments/cifar10_transfer.py (full mode) "
            f"in --work_dir={work_dir} first, and pass CIFAR-10's image folders as --data.")

    from tl_keras import console
    console.quiet_startup(sys.argv)
    import keras

    from tl_keras import config
    from tl_keras.data import folder, unlabeled
    from tl_keras.training import self_training

    other_dir = os.path.join(work_dir, "other_classes")
    if not os.path.isdir(other_dir):
        partial = other_dir + ".partial"
        for name in arms.SOURCE_CLASSES:
            os.makedirs(os.path.join(partial, name), exist_ok=True)
            class_dir = os.path.join(data, "train", name)
            for file_name in sorted(os.listdir(class_dir)):
                link = os.path.join(partial, name, file_name)
                if not os.path.lexists(link):
                    os.symlink(os.path.realpath(os.path.join(class_dir, file_name)), link)
        os.replace(partial, other_dir)
    classes = arms.TARGET_CLASSES
    threshold = {field.name: field for field in dataclasses.fields(config.Config)}[
        "pseudo_label_threshold"].metadata["flag"].default
    for size in sizes:
        splits = folder.load_folder(
            f"folder:{data}", image_size=128, resize="stretch",
            val_fraction=arms.TARGET_VAL_FRACTION, seed=arms.TARGET_SEED, strict=False,
            classes=classes, train_examples_per_class=size)
        pool_dir = arms.write_unlabeled_pool(
            data, os.path.join(work_dir, f"unlabeled_n{size}"), size, classes)
        model = keras.saving.load_model(teachers[size], compile=False)
        probabilities = {}
        for name, source in (("pool", pool_dir), ("other", other_dir)):
            pool = unlabeled.load_pool(source, splits, dataset=None, data_dir=None,
                                       image_size=128, resize="stretch", strict=False)
            probabilities[name] = self_training.label_pool(
                model, pool, batch_size=64, image_size=128, resize="stretch",
                num_classes=len(classes))
            if name == "other":
                other_classes = np.array(
                    [os.path.basename(os.path.dirname(str(path))) for path in pool.ids])
        mixed = np.concatenate([probabilities["pool"], probabilities["other"]])
        cap = self_training.per_class_cap(len(mixed), len(classes), None)
        kept = self_training.select_pseudo_labels(mixed, threshold=threshold, per_class_cap=cap)
        from_other = kept.indices >= len(probabilities["pool"])
        print(f"N={size}: {len(probabilities['pool']):,} pool images and "
              f"{len(probabilities['other']):,} of other classes; the default rule "
              f"(confidence >= {threshold:g}, at most {cap:,} per class) keeps {len(kept):,}, "
              f"{int(from_other.sum()):,} ({from_other.mean():.1%}) of them other-class images. "
              "By pseudo-label: " + ", ".join(
                  f"{name} {int((from_other & (kept.labels == index)).sum()):,} of "
                  f"{int((kept.labels == index).sum()):,}"
                  for index, name in enumerate(classes)) + ".", flush=True)
        other = probabilities["other"]
        for name in arms.SOURCE_CLASSES:
            of_class = other[other_classes == name]
            called = np.bincount(of_class.argmax(axis=1), minlength=len(classes))
            print(f"  {name}: mean confidence {of_class.max(axis=1).mean():.2f}; called "
                  + ", ".join(f"{target} {count:,}" for target, count in zip(classes, called)
                              if count) + ".", flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("data")
    app.run(main)
