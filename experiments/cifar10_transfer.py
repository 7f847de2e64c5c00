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
training code of its own. (It imports `tl_keras.data.folder` once, to list the files
a target run trains and validates on, which arm (d)'s pool must leave out, and
asks `tl_keras.cli.flags` for the flags.txt of arm (d)'s continued run.) Each run's output goes to WORK_DIR/<run>.log, and its
model, metrics and TensorBoard logs to WORK_DIR/<run>/. Rerun the same command
after an interruption: finished runs are kept and interrupted ones resume.

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

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

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
    "CPU cores, quick mode's source and arms (a)-(c) took 18 minutes alone, and arm (d)'s "
    "round 15 more on cores shared with another run; full mode took 163 minutes on shared "
    "cores (the README's Results).")
_SIZES = flags.DEFINE_list(
    "sizes", None,
    "Target training images per class, one row each (default: 20,100, the sizes the few-label "
    "targets are set at; --sizes=20,100,500 adds a row that trains on five times N=100's "
    "images; with --quick, "
    "100).")
FULL_SIZES, QUICK_SIZES = (20, 100), (100,)

SOURCE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TARGET_CLASSES = ("dog", "frog", "horse", "ship", "truck")
_SOURCE_CLASSES = flags.DEFINE_list(
    "source_classes", list(SOURCE_CLASSES),
    "CIFAR-10 classes the source backbone is trained on, from scratch.")
_TARGET_CLASSES = flags.DEFINE_list(
    "target_classes", list(TARGET_CLASSES),
    "CIFAR-10 classes the target arms learn with few labels; none of the source's.")
GAIN_SIZE = 100

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPOSITORY, "run.py")
# The target runs' validation share and seed, which write_unlabeled_pool
# repeats to find the files each run holds out.
TARGET_VAL_FRACTION = 0.02
TARGET_SEED = 42
# Arm (d) runs at these sizes only; other rows show no figure for it.
SELF_TRAINING_SIZES = (20, 100)
# Arm (d)'s self-training, beyond the tool's defaults (the README's "How the
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
# without them had reached 74.2% (the README's Results).
# Arm (d)'s round is the tool's default round (--self_training_epochs).
FULL = Schedule(source_epochs=15, target_epochs=30, head_epochs=10, self_training_epochs=30,
                source_augment="basic", pool_sizes=(1000, 5000))
# Quick mode's round is a third of the full one, and no shorter: with 5
# epochs, arm (d)'s best validation top-1 only tied arm (c)'s, so arm (c)'s
# weights were exported; with 10 it beat arm (c) (the README's Results).
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
_ARMS = flags.DEFINE_list(
    "arms", list(DEFAULT_ARMS),
    "Target arms to run, of scratch, head, both and self. transfer_gain_points needs "
    "scratch and both; both alone checks the recipe on another split at a quarter of the "
    "cost. self (arm (d)) runs at N=20 and N=100 only, continuing both's run, which it "
    "therefore runs too.")
_SELF_TRAINING_FLAGS = flags.DEFINE_list(
    "self_training_flags", [],
    "run.py flags that replace arm (d)'s self-training settings, e.g. "
    "--self_training_flags=--pseudo_labels_per_class=1000,--self_training_epochs=5: how the "
    "README's table of self-training choices was measured. Those runs are named after the "
    "flags (target_nN_self__...), beside the default ones, continuing the same arm (c), and "
    "skip the table by pool size.")


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
        # from memorising them (the README's ablation, row 1).
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


def run_name_suffix(self_training):
    """`__a=1__b=2` for `--self_training_flags=--a=1,--b=2`, or ''."""
    return "".join("__" + flag.lstrip("-").replace("/", "_") for flag in self_training)


def continue_finished_run(finished_dir, model_dir, run_flags):
    """Makes `model_dir` a copy of the finished run in `finished_dir`, marked
    unfinished and with the effective flags of `run_flags`, so that `run.py`
    with those flags resumes it: it skips the phases the copy completed and
    trains only the ones `run_flags` adds (arm (d)'s self-training rounds
    after arm (c)'s two phases). The two phases are then arm (c)'s, not a
    second training of the same flags and seed, and are not paid for twice.

    The flags text comes from the tool's own flags module, as `run.py` would
    write it; nothing else of the run is touched. Does nothing if `model_dir`
    exists (a continuation made before, finished or interrupted).
    """
    if os.path.exists(model_dir):
        return
    partial = model_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(finished_dir, partial, symlinks=True)
    os.remove(os.path.join(partial, "COMPLETE"))
    written = subprocess.run(
        [sys.executable, "-c",
         "import sys; from tl_keras.cli import flags; flags.parse(sys.argv); "
         "sys.stdout.write(flags.to_flagfile())",
         *COMMON_FLAGS, *run_flags, f"--model_dir={model_dir}"],
        cwd=REPOSITORY, capture_output=True, text=True)
    if written.returncode != 0:
        sys.exit(f"The flags of {model_dir} were refused: {written.stderr.strip()}")
    with open(os.path.join(partial, "flags.txt"), "w") as file:
        file.write(written.stdout)
    os.replace(partial, model_dir)


def pseudo_label_summary(model_dir):
    """(pool images, kept, percent right) of the run's last self-training
    round, right judged by the class subfolder each pool image's link sits in."""
    folder = os.path.join(model_dir, "self_training")
    last = max(os.listdir(folder), key=lambda name: int(name[len("round_"):-len(".json")]))
    with open(os.path.join(folder, last)) as file:
        record = json.load(file)
    kept = record["pseudo_labels"]
    with open(os.path.join(model_dir, "class_names.json")) as file:
        class_names = json.load(file)
    right = sum(os.path.basename(os.path.dirname(entry["image"])) == class_names[entry["label"]]
                for entry in kept)
    return record["pool_images"], len(kept), 100 * right / max(len(kept), 1)


class Runner:
    """Runs `run.py` commands one by one, keeping each one's wall time.

    Wall times go to WORK_DIR/times.json and commands to WORK_DIR/commands.json,
    so a rerun of the experiment reports the finished runs it skips with the
    time they took, and refuses one that another command made.
    """

    def __init__(self, work_dir, total):
        self.work_dir = work_dir
        self.total = total
        self.count = 0
        self.times_path = os.path.join(work_dir, "times.json")
        self.commands_path = os.path.join(work_dir, "commands.json")
        self.times = self._load(self.times_path)
        self.commands = self._load(self.commands_path)

    @staticmethod
    def _load(path):
        if not os.path.exists(path):
            return {}
        with open(path) as file:
            return json.load(file)

    def _check_same_flags(self, name, model_dir, run_flags):
        """Refuses to report a finished run made with other flags: after a
        change to the recipe, its figures would pass for the new recipe's."""
        earlier = self.commands.get(name)
        if earlier is not None and earlier != run_flags:
            changed = sorted(set(run_flags) ^ set(earlier))
            sys.exit(f"{model_dir} finished with other flags than this experiment now "
                     f"gives it ({' '.join(changed)}). Pass another --work_dir, or delete "
                     "that folder to run it again.")

    def record(self, name, seconds, run_flags):
        """Adds a finished run's time and flags to times.json and commands.json.

        Each file is read again just before it is written: another experiment
        process may share the work folder (say `--sizes=20` and `--sizes=100`
        at once), and writing the copy this process loaded at its start would
        drop the runs the other one finished since.
        """
        for path, attribute, value in ((self.times_path, "times", seconds),
                                       (self.commands_path, "commands", run_flags)):
            values = {**self._load(path), name: value}
            setattr(self, attribute, values)
            with open(path + f".{os.getpid()}.tmp", "w") as file:
                json.dump(values, file, indent=2)
            os.replace(path + f".{os.getpid()}.tmp", path)

    def run(self, name, description, run_flags):
        """Runs one training run unless it finished before.

        Returns:
            (test top-1 in percent, wall time in seconds).
        """
        self.count += 1
        model_dir = os.path.join(self.work_dir, name)
        # Each run is as quiet as run.py is by default; --verbosity given
        # here brings the library lines back in the runs' logs too.
        verbosity = ([f"--verbosity={flags.FLAGS.verbosity}"]
                     if flags.FLAGS["verbosity"].present else [])
        command = [sys.executable, RUN_PY, *COMMON_FLAGS, *run_flags, *verbosity,
                   f"--model_dir={model_dir}"]
        finished = os.path.exists(os.path.join(model_dir, "COMPLETE"))
        if finished and name in self.times:
            self._check_same_flags(name, model_dir, [*COMMON_FLAGS, *run_flags])
            seconds = self.times[name]
            print(f"[{self.count}/{self.total}] {description}: finished earlier.", flush=True)
        else:
            shown = ["python", os.path.relpath(RUN_PY), *command[2:]]
            print(f"[{self.count}/{self.total}] {description}:\n  " + " ".join(shown),
                  flush=True)
            log_path = os.path.join(self.work_dir, f"{name}.log")
            start = time.perf_counter()
            with open(log_path, "a") as log:
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=REPOSITORY)
            seconds = time.perf_counter() - start
            if code != 0:
                with open(log_path) as log:
                    tail = log.read()[-3000:]
                sys.exit(f"{description} failed (exit status {code}). The end of "
                         f"{log_path}:\n{tail}")
            self.record(name, seconds, [*COMMON_FLAGS, *run_flags])
        with open(os.path.join(model_dir, "metrics.json")) as file:
            top1 = 100 * json.load(file)["test"]["top1"]
        print(f"  test top-1 {top1:.2f}% in {seconds:.0f} s", flush=True)
        return top1, seconds


def results_table(source, results, sizes, arms=tuple(ARMS), flip=None):
    """The results as a Markdown table, one row per N and one column per arm.

    Args:
        source: (test top-1, seconds) of the source run.
        results: (size, arm) -> (test top-1, seconds).
        sizes: the rows.
        arms: the columns, keys of ARMS.
        flip: optional (size, arm) -> test top-1 with `--tta=flip`, shown after
            the plain figure.
    """
    lines = [
        f"Source (from scratch): test top-1 {source[0]:.1f}% in {source[1]:.0f} s.",
        "",
        "| Train images per class | " + " | ".join(ARMS[arm] for arm in arms) + " |",
        "|---:|" + "---:|" * len(arms),
    ]
    for size in sizes:
        cells = []
        for arm in arms:
            if (size, arm) not in results:
                cells.append("-")
                continue
            top1, seconds = results[size, arm]
            mirrored = (flip or {}).get((size, arm))
            shown = f"{top1:.1f}%" + (f" / {mirrored:.1f}%" if mirrored is not None else "")
            cells.append(f"{shown} ({seconds:.0f} s)")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    if flip:
        lines += ["", "Each cell: test top-1 / with `--tta=flip` (wall time of the run)."]
    return "\n".join(lines)


def pool_table(size, both, by_pool):
    """Arm (d) at N=`size` against the number of unlabelled images.

    Args:
        size: N.
        both: arm (c)'s (test top-1, seconds) at N.
        by_pool: pool size (None for the whole pool) -> (test top-1, seconds,
            top-1 with `--tta=flip`, pool images, pseudo-labels kept, percent
            of them right).
    """
    lines = [
        f"Arm (d) at N={size} by the number of unlabelled images:",
        "",
        "| Unlabelled images | Pseudo-labels kept (right) | Test top-1 (with flip) | Wall time |",
        "|---:|---:|---:|---:|",
        f"| none: arm (c) | - | {both[0]:.1f}% | {both[1]:.0f} s |",
    ]
    for count in sorted(by_pool, key=lambda count: count or float("inf")):
        top1, seconds, mirrored, pool_images, kept, right = by_pool[count]
        shown = f"{top1:.1f}%" + (f" ({mirrored:.1f}%)" if mirrored is not None else "")
        lines.append(f"| {pool_images:,}{'' if count else ' (all)'} | {kept:,} ({right:.1f}%) | "
                     f"{shown} | {seconds:.0f} s |")
    return "\n".join(lines)


def flip_top1(model_dir):
    """Test top-1 with `--tta=flip` in percent, or None if the run has none."""
    with open(os.path.join(model_dir, "metrics.json")) as file:
        mirrored = json.load(file).get("test_tta_flip")
    return None if mirrored is None else 100 * mirrored["top1"]


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
    data = os.path.abspath(_DATA.value)
    source_classes, target_classes = _class_split()
    try:
        sizes = ([int(size) for size in _SIZES.value] if _SIZES.value is not None
                 else list(QUICK_SIZES if _QUICK.value else FULL_SIZES))
    except ValueError:
        raise app.UsageError(f"--sizes={','.join(_SIZES.value)}: pass whole numbers.")
    if min(sizes) < 1:
        raise app.UsageError(f"--sizes={','.join(map(str, sizes))}: pass positive numbers.")
    unknown = sorted(set(_ARMS.value) - set(ARMS))
    if unknown or not _ARMS.value:
        raise app.UsageError(f"--arms={','.join(_ARMS.value)}: choose from {', '.join(ARMS)}.")
    arms = [arm for arm in ARMS if arm in _ARMS.value]
    missing = [f"{split}/{name}" for split in ("train", "test")
               for name in source_classes + target_classes
               if not os.path.isdir(os.path.join(data, split, name))]
    if missing:
        raise app.UsageError(
            f"--data={_DATA.value} should hold CIFAR-10 as image folders, "
            f"DATA/{{train,test}}/<class>/*.jpg, but lacks {', '.join(missing[:4])}"
            f"{' and more' if len(missing) > 4 else ''}.")
    schedule = QUICK if _QUICK.value else FULL
    work_dir = chosen_work_dir()
    os.makedirs(work_dir, exist_ok=True)
    print(f"{'Quick' if _QUICK.value else 'Full'} mode: source {schedule.source_epochs} "
          f"epochs, each target arm {schedule.target_epochs} epochs; runs in {work_dir}.",
          flush=True)

    # Arm (d) continues arm (c)'s run at its size, so arm (c) runs first.
    run_arms = [arm for arm in ARMS if arm in arms or (arm == "both" and "self" in arms)]
    planned = [(size, arm) for size in sizes for arm in run_arms
               if arm != "self" or size in SELF_TRAINING_SIZES]
    # The table by pool size is of arm (d)'s own settings, not of a variant's.
    subsets = {size: (schedule.pool_sizes
                      if size == GAIN_SIZE and not _SELF_TRAINING_FLAGS.value else ())
               for size, arm in planned if arm == "self"}
    if subsets:
        # Arm (d)'s pool loads TensorFlow in this process: as quietly as
        # run.py loads it.
        sys.path.insert(0, REPOSITORY)
        from tl_keras import console
        console.quiet_startup(sys.argv)
    runner = Runner(work_dir, total=1 + len(planned) + sum(map(len, subsets.values())))
    source = runner.run("source", f"source, {len(source_classes)} classes from scratch",
                        source_flags(data, schedule, source_classes))
    source_weights = os.path.join(work_dir, "source", "backbone.weights.h5")
    results, flip, by_pool = {}, {}, {}
    for size, arm in planned:
        name = f"target_n{size}_{arm}"
        if arm != "self":
            results[size, arm] = runner.run(
                name, f"target, N={size}, {ARMS[arm]}",
                target_flags(data, size, arm, schedule, source_weights, target_classes))
            flip[size, arm] = flip_top1(os.path.join(work_dir, name))
            continue
        pool = write_unlabeled_pool(data, os.path.join(work_dir, f"unlabeled_n{size}"),
                                    size, target_classes)
        variants = [(count, write_pool_subset(pool, f"{pool}_{count}", count))
                    for count in subsets[size]] + [(None, pool)]
        for count, folder in variants:
            variant = name + (f"_{count}" if count else "") + run_name_suffix(
                _SELF_TRAINING_FLAGS.value)
            run_flags = target_flags(data, size, arm, schedule, source_weights,
                                     target_classes, folder, _SELF_TRAINING_FLAGS.value)
            continue_finished_run(os.path.join(work_dir, f"target_n{size}_both"),
                                  os.path.join(work_dir, variant), run_flags)
            top1, seconds = runner.run(
                variant, f"target, N={size}, {ARMS[arm]}"
                + (f", {count:,} unlabelled images" if count else ""), run_flags)
            # Its first two phases are arm (c)'s run, which it continues.
            outcome = (top1, seconds + results[size, "both"][1])
            by_pool[size, count] = (*outcome, flip_top1(os.path.join(work_dir, variant)),
                                    *pseudo_label_summary(os.path.join(work_dir, variant)))
        results[size, arm] = by_pool[size, None][:2]
        flip[size, arm] = by_pool[size, None][2]

    table = results_table(source, results, sizes, run_arms, flip)
    if any(subsets.values()):
        table += "\n\n" + pool_table(GAIN_SIZE, results[GAIN_SIZE, "both"],
                                      {count: by_pool[size, count] for size, count in by_pool
                                       if size == GAIN_SIZE})
    with open(os.path.join(work_dir, "results.md"), "w") as file:
        file.write(table + "\n")
    print()
    print(table)
    if {"scratch", "both"} <= set(arms) and GAIN_SIZE in sizes:
        gain = results[GAIN_SIZE, "both"][0] - results[GAIN_SIZE, "scratch"][0]
        print(f"transfer_gain_points={gain:.1f}")
    if "both" in run_arms and GAIN_SIZE in sizes:
        print(f"both_phases_n{GAIN_SIZE}={results[GAIN_SIZE, 'both'][0]:.1f}")
    if (GAIN_SIZE, "self") in results:
        print(f"self_training_n{GAIN_SIZE}={results[GAIN_SIZE, 'self'][0]:.1f}")


if __name__ == "__main__":
    flags.mark_flag_as_required("data")
    app.run(main)
