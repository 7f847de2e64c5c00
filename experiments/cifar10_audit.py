"""Does `--mode=audit` find what is wrong with a dataset? CIFAR-10 images with
faults planted and recorded, audited, then trained on without what it flags.

    python experiments/cifar10_audit.py --data=../shared/data/cifar10-jpg [--work_dir=DIR]

DATA is CIFAR-10 as image folders, DATA/{train,test}/<class>/*.jpg.

1. Source: the transfer experiment's quick source (experiments/cifar10_transfer.py
   --quick, arm (c)'s starting point): MobileNetV3Small trained from scratch for
   3 epochs on airplane, automobile, bird, cat and deer; here at 64 px instead of
   128, to fit two CPU cores.
2. Data, under WORK_DIR/noisy/, the transfer experiment's five target classes
   (dog, frog, horse, ship, truck):
   - train/: 500 CIFAR training images a class, picked by the seed; 10% of the
     2,500 (250), picked at random, filed under another class at random.
     flips.csv records them;
   - val/: 50 other CIFAR training images a class, labels right;
   - test/: the 1,000 CIFAR test images a class, plus 25 training images copied
     in unchanged and 25 more saved as JPEG quality 60 at 2 to 4 pixels more or
     less than 32, each under its true class. leaks.csv records them. The 50 are
     picked from the training images whose label is right, so each fault is
     measured alone.
   Every image is renamed img_NNNNN.jpg, so a name says nothing of its class.
   WORK_DIR/clean/ is the same dataset with the right training labels.
3. Audits: (A) before training, with the source backbone (--weights); (B) of
   the run trained on the noisy labels, with its fine-tuned backbone.
4. Runs, each the same recipe (the head 4 epochs at 1e-3, then fine-tuning 8 at
   3e-4, crop and flip, 64 px): on the noisy labels, on the clean labels, and on
   the noisy labels less the training images audit (B) flags
   (--exclude_files=its exclude.txt).
5. The table: label issues found (precision and recall at the audit's own
   cut-off), leaks found (exact, near, and pairs that weren't planted), and the
   three runs' test top-1, on the 5,050 test images.

Every step is a run.py command, printed as it starts, its output in
WORK_DIR/<step>.log. Rerun the same command after an interruption: finished
steps are kept.
"""

import csv
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging  # noqa: F401  (logging defines --verbosity)
from PIL import Image

from transfer import REPOSITORY
from transfer import arms
from transfer.runner import RUN_PY, Runner

_DATA = flags.DEFINE_string("data", None, "CIFAR-10 as image folders: DATA/{train,test}/<class>/*.jpg.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Where data, runs and results.md go (default: runs/cifar10_audit).")

CLASSES = arms.TARGET_CLASSES
TRAIN_PER_CLASS, VAL_PER_CLASS = 500, 50
FLIPPED_SHARE = 0.10
LEAKED_EXACT, LEAKED_NEAR = 25, 25
NEAR_QUALITY = 60
SEED = 42
IMAGE_SIZE = "--image_size=64"
TARGET_FLAGS = [
    f"--seed={SEED}", "--batch_size=32", "--augment=basic", "--head_learning_rate=1e-3",
    "--head_epochs=4", "--finetune_epochs=8", "--finetune_learning_rate=3e-4",
    "--warmup_epochs=1", "--unfreeze=all", IMAGE_SIZE,
]


def write_datasets(data, work_dir):
    """Writes WORK_DIR/noisy and WORK_DIR/clean (links to DATA's images, and
    the leaked copies), with flips.csv and leaks.csv. Kept once made.

    Returns:
        (the noisy folder, the clean folder).
    """
    noisy, clean = os.path.join(work_dir, "noisy"), os.path.join(work_dir, "clean")
    if os.path.isdir(clean):
        return noisy, clean
    rng = np.random.default_rng(SEED)
    train, val = [], []
    for label, name in enumerate(CLASSES):
        files = sorted(os.listdir(os.path.join(data, "train", name)))
        chosen = rng.permutation(len(files))[:TRAIN_PER_CLASS + VAL_PER_CLASS]
        paths = [os.path.join(data, "train", name, files[i]) for i in chosen]
        train += [(path, label) for path in paths[:TRAIN_PER_CLASS]]
        val += [(path, label) for path in paths[TRAIN_PER_CLASS:]]
    flipped = rng.choice(len(train), round(FLIPPED_SHARE * len(train)), replace=False)
    given = [label for _, label in train]
    for index in flipped:
        given[index] = rng.choice([c for c in range(len(CLASSES)) if c != given[index]])
    right = np.setdiff1d(np.arange(len(train)), flipped)
    leaked = rng.choice(right, LEAKED_EXACT + LEAKED_NEAR, replace=False)
    for root in (noisy + ".partial", clean + ".partial"):
        shutil.rmtree(root, ignore_errors=True)
    names = [f"img_{i:05d}.jpg" for i in range(len(train) + len(val))]
    for index, (path, label) in enumerate(train):
        _link(path, os.path.join(noisy + ".partial", "train", CLASSES[given[index]], names[index]))
        _link(path, os.path.join(clean + ".partial", "train", CLASSES[label], names[index]))
    for index, (path, label) in enumerate(val, start=len(train)):
        _link(path, os.path.join(noisy + ".partial", "val", CLASSES[label], names[index]))
    test_rows = _write_test(data, noisy + ".partial", train, leaked, len(names), rng)
    _write_csv(os.path.join(noisy + ".partial", "flips.csv"), ["train_image", "true", "given"],
               [[_final(noisy, noisy + ".partial", _train_path(noisy + ".partial", names, given, i)),
                 CLASSES[train[i][1]], CLASSES[given[i]]] for i in sorted(flipped)])
    _write_csv(os.path.join(noisy + ".partial", "leaks.csv"), ["kind", "test_image", "train_image"],
               [[kind, _final(noisy, noisy + ".partial", test),
                 _final(noisy, noisy + ".partial",
                        _train_path(noisy + ".partial", names, given, i))]
                for kind, test, i in test_rows])
    for split in ("val", "test"):
        os.symlink(os.path.join(noisy, split), os.path.join(clean + ".partial", split))
    os.replace(noisy + ".partial", noisy)
    os.replace(clean + ".partial", clean)
    return noisy, clean


def _write_test(data, root, train, leaked, first_number, rng):
    """The test folder: CIFAR's test images, and the leaked copies.

    Returns:
        (kind, test path, training index) of each leaked copy.
    """
    number = first_number
    for label, name in enumerate(CLASSES):
        for file_name in sorted(os.listdir(os.path.join(data, "test", name))):
            _link(os.path.join(data, "test", name, file_name),
                  os.path.join(root, "test", name, f"img_{number:05d}.jpg"))
            number += 1
    rows = []
    for count, index in enumerate(leaked):
        path, label = train[index]
        test = os.path.join(root, "test", CLASSES[label], f"img_{number + count:05d}.jpg")
        if count < LEAKED_EXACT:
            shutil.copyfile(path, test)
            rows.append(("exact", test, index))
            continue
        side = 32 + int(rng.choice([-4, -3, -2, 2, 3, 4]))
        with Image.open(path) as image:
            image.convert("RGB").resize((side, side), Image.BILINEAR).save(
                test, quality=NEAR_QUALITY)
        rows.append(("near", test, index))
    return rows


def _train_path(root, names, given, index):
    return os.path.join(root, "train", CLASSES[given[index]], names[index])


def _final(final_root, partial_root, path):
    """A path under the partial folder, as it will be once renamed."""
    return os.path.join(final_root, os.path.relpath(path, partial_root))


def _link(target, link):
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.realpath(target), link)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])


def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def audit(work_dir, model_dir, audit_flags):
    """Runs `--mode=audit` on WORK_DIR/`model_dir` unless it finished before:
    of the run there, or (without one) of `audit_flags`' dataset.

    Returns:
        (the audit's folder, its wall time in seconds).
    """
    directory = os.path.join(work_dir, model_dir, "audit")
    name = f"audit_{model_dir}"
    times = os.path.join(work_dir, f"{name}.seconds")
    command = [sys.executable, RUN_PY, *arms.COMMON_FLAGS, *audit_flags, "--mode=audit",
               f"--model_dir={os.path.join(work_dir, model_dir)}"]
    if os.path.exists(times):
        print(f"Audit {name}: finished earlier.", flush=True)
        with open(times) as file:
            return directory, float(file.read())
    print(f"Audit {name}:\n  python {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(os.path.join(work_dir, f"{name}.log"), "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPOSITORY)
    if code != 0:
        sys.exit(f"Audit {name} failed (exit status {code}); see its log.")
    seconds = time.perf_counter() - start
    with open(times, "w") as file:
        file.write(f"{seconds:.1f}")
    return directory, seconds


def audit_scores(noisy, directory):
    """The audit's label-issue precision and recall against flips.csv, and its
    leaks against leaks.csv: {name: value}."""
    flips = {row["train_image"] for row in _read_csv(os.path.join(noisy, "flips.csv"))}
    ranked = [row["example"] for row in _read_csv(os.path.join(directory, "label_issues.csv"))]
    flagged = set(ranked)
    planted = {(row["test_image"], row["train_image"]): row["kind"]
               for row in _read_csv(os.path.join(noisy, "leaks.csv"))}
    found = [(row["example"], row["train_example"], row["kind"])
             for row in _read_csv(os.path.join(directory, "leaks.csv"))]
    hits = {kind: sum(planted.get((test, train)) == kind for test, train, _ in found)
            for kind in ("exact", "near")}
    return {
        "flagged": len(flagged), "right": len(flagged & flips),
        "precision": len(flagged & flips) / max(len(flagged), 1),
        "recall": len(flagged & flips) / len(flips),
        # Of the images ranked first, as many as were flipped: how good the
        # ranking is, whatever the cut-off.
        "top": len(set(ranked[:len(flips)]) & flips) / len(flips),
        "exact": hits["exact"], "near": hits["near"],
        "false_pairs": sum((test, train) not in planted for test, train, _ in found),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    data = os.path.abspath(_DATA.value)
    work_dir = os.path.abspath(_WORK_DIR.value or os.path.join(REPOSITORY, "runs", "cifar10_audit"))
    os.makedirs(work_dir, exist_ok=True)
    runner = Runner(work_dir, total=4)
    source = runner.run("source", "source at 64 px, 5 classes from scratch",
                        arms.source_flags(data, arms.QUICK) + [IMAGE_SIZE])
    source_weights = os.path.join(work_dir, "source", "backbone.weights.h5")
    noisy, clean = write_datasets(data, work_dir)
    on_noisy = [f"--dataset=folder:{noisy}", f"--weights={source_weights}", *TARGET_FLAGS]
    source_audit = audit(work_dir, "source_features", on_noisy)
    runs = {"noisy": runner.run("run_noisy", "noisy labels", on_noisy)}
    run_audit = audit(work_dir, "run_noisy", [])
    runs["clean"] = runner.run("run_clean", "clean labels", [
        f"--dataset=folder:{clean}", f"--weights={source_weights}", *TARGET_FLAGS])
    runs["excluded"] = runner.run("run_excluded", "noisy labels less audit (B)'s exclude.txt", [
        *on_noisy, f"--exclude_files={os.path.join(run_audit[0], 'exclude.txt')}"])
    report(work_dir, noisy, source, {"(A) source backbone": source_audit,
                                     "(B) fine-tuned on the noisy labels": run_audit}, runs)


def report(work_dir, noisy, source, audits, runs):
    """Writes results.md and prints it."""
    lines = [f"Source: test top-1 {source[0]:.1f}% in {source[1]:.0f} s.", "",
             "| features | label issues flagged | precision | recall | precision of the top "
             f"{round(FLIPPED_SHARE * TRAIN_PER_CLASS * len(CLASSES))} | exact leaks found "
             "| near leaks found | pairs not planted | audit wall time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (directory, seconds) in audits.items():
        s = audit_scores(noisy, directory)
        lines.append(
            f"| {name} | {s['flagged']} ({s['right']} right) | {s['precision']:.2f} "
            f"| {s['recall']:.2f} | {s['top']:.2f} | {s['exact']}/{LEAKED_EXACT} "
            f"| {s['near']}/{LEAKED_NEAR} "
            f"| {s['false_pairs']} | {seconds:.0f} s |")
    excluded = os.path.join(work_dir, "run_noisy", "audit", "exclude.txt")
    with open(excluded) as file:
        dropped = sum(1 for line in file if line.strip() and not line.startswith("#"))
    noisy_top1, clean_top1, excluded_top1 = (runs[k][0] for k in ("noisy", "clean", "excluded"))
    gap = clean_top1 - noisy_top1
    lines += ["", "| training labels | test top-1 | wall time |", "|---|---:|---:|",
              f"| noisy (10% flipped) | {noisy_top1:.2f}% | {runs['noisy'][1]:.0f} s |",
              f"| noisy, less the {dropped} images audit (B) flags | {excluded_top1:.2f}% "
              f"| {runs['excluded'][1]:.0f} s |",
              f"| clean | {clean_top1:.2f}% | {runs['clean'][1]:.0f} s |", "",
              f"Recovered {(excluded_top1 - noisy_top1) / gap:.0%} of the gap"
              if gap > 0 else f"The clean run did not beat the noisy one (gap {gap:.2f}).",
              ]
    with open(os.path.join(work_dir, "results.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    flags.mark_flag_as_required("data")
    app.run(main)
