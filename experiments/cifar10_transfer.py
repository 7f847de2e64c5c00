"""Transfer learning on real images: train on five CIFAR-10 classes, transfer to
the other five with few labels, and compare against training from scratch.

    python experiments/cifar10_transfer.py --data=../shared/data/cifar10-jpg \\
        [--work_dir=DIR] [--quick]

DATA is CIFAR-10 as image folders, DATA/{train,test}/<class>/*.jpg.

1. Source: MobileNetV3Small at 128 px is trained from scratch (in full mode
   with a random resized crop and flip) on airplane, automobile, bird, cat and deer
   (--source_classes). Its `backbone.weights.h5` seeds the target runs through
   `--weights=PATH`.
2. Target: dog, frog, horse, ship and truck (--target_classes), with N training
   images per class for N in --sizes, in three arms (--arms) of the same length in
   epochs, all with the same random resized crop and flip:
     (a) scratch: random weights, every layer trained;
     (b) head only: the transferred backbone frozen, only a new head trained;
     (c) both phases: 10 epochs of (b), then 20 of fine-tuning the backbone at
         3e-4, against 1e-3 for the head.
     (d) self-training (at N in SELF_TRAINING_SIZES only): (c), then a round
         of self-training with the tool's defaults on the target classes'
         remaining training images, their labels withheld (`--unlabeled`, a
         folder of links to them that `write_unlabeled_pool` makes; the run
         reads its class subfolders' names only to report how right its
         pseudo-labels are). It continues arm (c)'s finished run
         (`continue_finished_run`), so its two phases are (c)'s own. In full
         mode it also runs at N=100 on random 1,000 and 5,000 of those images.
   Every arm is tested on all 5,000 target test images, also with `--tta=flip`.
3. It prints a table of test top-1 and wall time (arm (d)'s includes arm
   (c)'s), and in full mode arm (d) by the number of unlabelled images; writes
   them to WORK_DIR/results.md; and ends with `transfer_gain_points=X`, arm (c)
   minus arm (a) at N=100 in percentage points, then `both_phases_n100=Y`, arm
   (c)'s test top-1 at N=100 (plain, without the mirror), then
   `self_training_n100=Z`, arm (d)'s.

Every run is a `run.py` command, printed before it starts; the experiment has no
training code of its own. (It imports `tl_keras.data.folder` once, to list the
files a target run trains and validates on, which arm (d)'s pool must leave
out, and asks `tl_keras.cli.flags` for the flags.txt of arm (d)'s continued
run.) Each run's output goes to WORK_DIR/<run>.log, and its model, metrics and
TensorBoard logs to WORK_DIR/<run>/. Rerun the same command after an
interruption: finished runs are kept and interrupted ones resume.

This file holds the command line and the order of the runs; `transfer/arms.py`
what each run trains, `transfer/runner.py` how it runs, and `transfer/report.py`
the tables.

Why MobileNetV3Small at 128 px: on two CPU cores a source epoch takes about
as long as one of ResNet50 at 32 px, and the network learns far more in it.
The 32 px images are upsampled inside the model, so its last feature map is
4x4, where ResNet50's at 32 px is 1x1; and it has 0.9 million weights against
23.6 million. From scratch on the source classes it reached 74% in two epochs,
where this experiment's ResNet50 at 32 px reached 64% in three and 69% in
eight. Its BatchNormalization layers train from scratch (`--batchnorm=train`):
their moving statistics track the weights at momentum 0.9 during training and
are recomputed with the final weights after it.
The source keeps 10% of its training images for validation; the target runs
keep 2% (100 per class), enough to watch overfitting without making the
few-shot runs mostly validation.
"""

import os
import sys

from absl import app, flags

from transfer import REPOSITORY
from transfer import arms as arms_lib
from transfer import report
from transfer.runner import Runner, continue_finished_run

_DATA = flags.DEFINE_string(
    "data", None, "CIFAR-10 as image folders: DATA/{train,test}/<class>/*.jpg.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None,
    "Where runs, logs and results.md go (default: runs/cifar10_transfer, or "
    "runs/cifar10_transfer_quick with --quick).")
_QUICK = flags.DEFINE_boolean(
    "quick", False,
    "A 3-epoch source without augmentation (15 with it in full) and N=100 only; the "
    "target arms keep the full schedule, and arm (d) skips the table by pool size. On two "
    "CPU cores, quick mode's source and arms (a)-(c) took 18 minutes, and arm (d)'s round "
    "15 more; full mode's runs add up to 221 minutes (docs/results.md).")
_SIZES = flags.DEFINE_list(
    "sizes", None,
    "Target training images per class, one row each (default: 20,100, the sizes the few-label "
    "targets are set at; --sizes=20,100,500 adds a row that trains on five times N=100's "
    "images; with --quick, "
    "100).")
FULL_SIZES, QUICK_SIZES = (20, 100), (100,)

_SOURCE_CLASSES = flags.DEFINE_list(
    "source_classes", list(arms_lib.SOURCE_CLASSES),
    "CIFAR-10 classes the source backbone is trained on, from scratch.")
_TARGET_CLASSES = flags.DEFINE_list(
    "target_classes", list(arms_lib.TARGET_CLASSES),
    "CIFAR-10 classes the target arms learn with few labels; none of the source's.")
_ARMS = flags.DEFINE_list(
    "arms", list(arms_lib.DEFAULT_ARMS),
    "Target arms to run, of scratch, head, both and self. transfer_gain_points needs "
    "scratch and both; both alone checks the recipe on another split at a quarter of the "
    "cost. self (arm (d)) runs at N=20 and N=100 only, continuing both's run, which it "
    "therefore runs too.")
_SELF_TRAINING_FLAGS = flags.DEFINE_list(
    "self_training_flags", [],
    "run.py flags that replace arm (d)'s self-training settings, e.g. "
    "--self_training_flags=--pseudo_labels_per_class=1000,--self_training_epochs=5: how the "
    "table of self-training choices in docs/results.md was measured. Those runs are named "
    "after the flags (target_nN_self__...), beside the default ones, continuing the same "
    "arm (c), and skip the table by pool size.")


def chosen_work_dir():
    """--work_dir, or its default for the mode, as an absolute path."""
    return os.path.abspath(_WORK_DIR.value or os.path.join(
        REPOSITORY, "runs", "cifar10_transfer_quick" if _QUICK.value else "cifar10_transfer"))


def _class_split():
    """The source and target classes, checked: two or more each, no class in both.

    Returns:
        (source classes, target classes), tuples of names.
    """
    source, target = tuple(_SOURCE_CLASSES.value), tuple(_TARGET_CLASSES.value)
    shared = sorted(set(source) & set(target))
    if shared:
        raise app.UsageError(
            f"--source_classes and --target_classes share {', '.join(shared)}: the target "
            "classes must be ones the source never saw, or the transfer is not measured.")
    if len(source) < 2 or len(target) < 2:
        raise app.UsageError(
            f"--source_classes={','.join(source)} --target_classes={','.join(target)}: "
            "give two or more classes to each.")
    return source, target


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    data, sizes, arms, source_classes, target_classes = _checked_options()
    schedule = arms_lib.QUICK if _QUICK.value else arms_lib.FULL
    work_dir = chosen_work_dir()
    os.makedirs(work_dir, exist_ok=True)
    print(f"{'Quick' if _QUICK.value else 'Full'} mode: source {schedule.source_epochs} "
          f"epochs, each target arm {schedule.target_epochs} epochs; runs in {work_dir}.",
          flush=True)

    # Arm (d) continues arm (c)'s run at its size, so arm (c) runs first.
    run_arms = [arm for arm in arms_lib.ARMS
                if arm in arms or (arm == "both" and "self" in arms)]
    planned = [(size, arm) for size in sizes for arm in run_arms
               if arm != "self" or size in arms_lib.SELF_TRAINING_SIZES]
    # The table by pool size is of arm (d)'s own settings, not of a variant's.
    subsets = {size: (schedule.pool_sizes
                      if size == arms_lib.GAIN_SIZE and not _SELF_TRAINING_FLAGS.value else ())
               for size, arm in planned if arm == "self"}
    if subsets:
        # Arm (d)'s pool loads TensorFlow in this process: as quietly as
        # run.py loads it.
        sys.path.insert(0, REPOSITORY)
        from tl_keras import console
        console.quiet_startup(sys.argv)
    runner = Runner(work_dir, total=1 + len(planned) + sum(map(len, subsets.values())))
    source = runner.run("source", f"source, {len(source_classes)} classes from scratch",
                        arms_lib.source_flags(data, schedule, source_classes))
    run = _Arms(runner, work_dir, data, schedule, target_classes,
                source_weights=os.path.join(work_dir, "source", "backbone.weights.h5"))
    for size, arm in planned:
        if arm != "self":
            run.transfer_arm(size, arm)
        else:
            run.self_training_arm(size, subsets[size])
    _report(work_dir, source, run, sizes, arms, run_arms, subsets)


def _checked_options():
    """The flags' values, checked before any run: (data folder, sizes, arms,
    source classes, target classes)."""
    data = os.path.abspath(_DATA.value)
    source_classes, target_classes = _class_split()
    try:
        sizes = ([int(size) for size in _SIZES.value] if _SIZES.value is not None
                 else list(QUICK_SIZES if _QUICK.value else FULL_SIZES))
    except ValueError:
        raise app.UsageError(f"--sizes={','.join(_SIZES.value)}: pass whole numbers.")
    if min(sizes) < 1:
        raise app.UsageError(f"--sizes={','.join(map(str, sizes))}: pass positive numbers.")
    unknown = sorted(set(_ARMS.value) - set(arms_lib.ARMS))
    if unknown or not _ARMS.value:
        raise app.UsageError(
            f"--arms={','.join(_ARMS.value)}: choose from {', '.join(arms_lib.ARMS)}.")
    arms = [arm for arm in arms_lib.ARMS if arm in _ARMS.value]
    missing = arms_lib.missing_class_folders(data, source_classes + target_classes)
    if missing:
        raise app.UsageError(missing)
    return data, sizes, arms, source_classes, target_classes


class _Arms:
    """Runs the target arms, collecting what the tables report.

    Attributes:
        results: (size, arm) -> (test top-1, seconds).
        flip: (size, arm) -> test top-1 with `--tta=flip`.
        by_pool: (size, pool size or None for the whole pool) -> arm (d)'s
            row of `report.pool_table`.
    """

    def __init__(self, runner, work_dir, data, schedule, target_classes, source_weights):
        self.runner = runner
        self.work_dir = work_dir
        self.data = data
        self.schedule = schedule
        self.target_classes = target_classes
        self.source_weights = source_weights
        self.results, self.flip, self.by_pool = {}, {}, {}

    def transfer_arm(self, size, arm):
        """Arm (a), (b) or (c) at N=`size`."""
        name = f"target_n{size}_{arm}"
        self.results[size, arm] = self.runner.run(
            name, f"target, N={size}, {arms_lib.ARMS[arm]}",
            arms_lib.target_flags(self.data, size, arm, self.schedule, self.source_weights,
                                  self.target_classes))
        self.flip[size, arm] = report.flip_top1(os.path.join(self.work_dir, name))

    def self_training_arm(self, size, pool_sizes):
        """Arm (d) at N=`size`, on its whole pool and on random subsets of it
        of `pool_sizes` images, each continuing arm (c)'s finished run."""
        arm, name = "self", f"target_n{size}_self"
        pool = arms_lib.write_unlabeled_pool(
            self.data, os.path.join(self.work_dir, f"unlabeled_n{size}"), size,
            self.target_classes)
        variants = [(count, arms_lib.write_pool_subset(pool, f"{pool}_{count}", count))
                    for count in pool_sizes] + [(None, pool)]
        for count, folder in variants:
            variant = name + (f"_{count}" if count else "") + arms_lib.run_name_suffix(
                _SELF_TRAINING_FLAGS.value)
            run_flags = arms_lib.target_flags(
                self.data, size, arm, self.schedule, self.source_weights,
                self.target_classes, folder, _SELF_TRAINING_FLAGS.value)
            continue_finished_run(os.path.join(self.work_dir, f"target_n{size}_both"),
                                  os.path.join(self.work_dir, variant), run_flags)
            top1, seconds = self.runner.run(
                variant, f"target, N={size}, {arms_lib.ARMS[arm]}"
                + (f", {count:,} unlabelled images" if count else ""), run_flags)
            # Its first two phases are arm (c)'s run, which it continues.
            outcome = (top1, seconds + self.results[size, "both"][1])
            variant_dir = os.path.join(self.work_dir, variant)
            self.by_pool[size, count] = (*outcome, report.flip_top1(variant_dir),
                                         *report.pseudo_label_summary(variant_dir))
        self.results[size, arm] = self.by_pool[size, None][:2]
        self.flip[size, arm] = self.by_pool[size, None][2]


def _report(work_dir, source, run, sizes, arms, run_arms, subsets):
    """Writes results.md, prints it, and ends with the headline figures."""
    gain_size, results = arms_lib.GAIN_SIZE, run.results
    table = report.results_table(source, results, sizes, run_arms, run.flip)
    if any(subsets.values()):
        table += "\n\n" + report.pool_table(
            gain_size, results[gain_size, "both"],
            {count: run.by_pool[size, count] for size, count in run.by_pool
             if size == gain_size})
    with open(os.path.join(work_dir, "results.md"), "w") as file:
        file.write(table + "\n")
    print()
    print(table)
    if {"scratch", "both"} <= set(arms) and gain_size in sizes:
        gain = results[gain_size, "both"][0] - results[gain_size, "scratch"][0]
        print(f"transfer_gain_points={gain:.1f}")
    if "both" in run_arms and gain_size in sizes:
        print(f"both_phases_n{gain_size}={results[gain_size, 'both'][0]:.1f}")
    if (gain_size, "self") in results:
        print(f"self_training_n{gain_size}={results[gain_size, 'self'][0]:.1f}")


if __name__ == "__main__":
    flags.mark_flag_as_required("data")
    app.run(main)
