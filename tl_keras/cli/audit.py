"""`--mode=audit`: the dataset a run trains on, checked for wrong labels,
validation and test images copied into train, duplicates and outliers.

The backbone computes every image's features once, with the trained backbone
of the run in `--model_dir`, or before any training with `--weights`; the same
pass digests each image's decoded pixels. `tl_keras.outputs.copies` finds the
copies, `tl_keras.outputs.label_issues` the labels, and
`tl_keras.outputs.audit_report` writes and prints what they found.
"""

import contextlib
import dataclasses
import os
import shlex

import numpy as np

from tl_keras import progress
from tl_keras import rundir
from tl_keras.cli import assembly
from tl_keras.data import augment
from tl_keras.data import exclusion
from tl_keras.data import pipeline
from tl_keras.data import sources
from tl_keras.errors import UsageError
from tl_keras.model import classifier as classifier_lib
from tl_keras.model import features as features_lib
from tl_keras.outputs import audit_report
from tl_keras.outputs import copies
from tl_keras.outputs import label_issues

SPLITS = ("train", "validation", "test")
# Training images copied, re-encoded and resized, to measure how far a near
# copy lies from its original in this feature space.
_MEASURED_COPIES = 256


def run_audit(config, *, from_run, output=None, flagfile_text=""):
    """Audits the dataset `config` trains on and writes what it finds.

    Args:
        config: the run's `Config` (from its flags.txt) when `from_run`, else
            the command's.
        from_run: `config.model_dir` holds a run: its trained backbone
            computes the features. Otherwise `config.weights` do.
        output: the folder to write to; default `--model_dir/audit`.
        flagfile_text: the command's flags, written beside the audit when it
            comes before training, for the command that trains without the
            flagged images.

    Returns:
        `tl_keras.outputs.audit_report.Findings`.

    Raises:
        UsageError: without cleanlab, or for a run folder without its
            backbone, before any data or model work.
    """
    label_issues.require_cleanlab()
    paths = rundir.RunPaths(config.model_dir)
    if from_run:
        config = dataclasses.replace(config, weights=_trained_backbone(paths))
        print(f"Auditing the dataset of the run in {config.model_dir}, with its trained "
              f"backbone.", flush=True)
    else:
        print(f"Auditing the dataset these flags train on, with --weights={config.weights} "
              f"(no run in {config.model_dir} yet).", flush=True)
        if config.weights == "none":
            print("Note: --weights=none: random features find exact copies, but near "
                  "copies and label issues only poorly.", flush=True)
    directory = output or paths.audit
    claim = rundir.claim_beside_run(config.model_dir) if output is None else (
        contextlib.nullcontext())
    with claim:
        findings, grids = _audit(config, directory)
        if from_run:
            flagfile = paths.flags
            model_dir = config.model_dir.rstrip(os.sep) + "_audited"
        else:
            flagfile = os.path.join(directory, rundir.FLAGS_FILE)
            with open(flagfile, "w") as file:
                file.write(flagfile_text)
            model_dir = None
    command = ["python", "run.py", f"--flagfile={flagfile}",
               f"--exclude_files={os.path.join(directory, audit_report.EXCLUDE_FILE)}",
               *([f"--model_dir={model_dir}"] if model_dir else [])]
    print("\n".join(audit_report.summary(findings, directory, grids, shlex.join(command))),
          flush=True)
    return findings


def _trained_backbone(paths):
    """The run's backbone weights file; refused when the run has none."""
    if not os.path.isfile(paths.backbone_weights):
        raise UsageError(
            f"{paths.model_dir} holds a run but no {rundir.BACKBONE_WEIGHTS_FILE}, the "
            f"trained backbone the audit computes features with; a run writes it when "
            f"it finishes. Finish the run (rerun its command), or audit before training "
            f"with --weights and a --model_dir or --output of the audit's own.")
    return paths.backbone_weights


@dataclasses.dataclass
class _Split:
    """One split's features, labels, pixel digests, thumbnails and example names."""

    features: np.ndarray
    labels: np.ndarray
    digests: list
    thumbnails: np.ndarray
    names: list


def _audit(config, directory):
    """Computes the features, finds what the audit reports, writes it.

    Returns:
        (`Findings`, the grids written).
    """
    strategy, backbone = assembly.strategy_and_backbone(config)
    splits = sources.load_splits(config, reduce_train_jpeg=False)
    with strategy.scope():
        extractor = features_lib.feature_extractor(classifier_lib.build_classifier(
            backbone, config.backbone, splits.num_classes, config.image_size,
            config.dropout, config.resize))
    computed = _features(config, splits, extractor, directory)
    with progress.step("Looking for copies, label issues and outliers") as looking:
        train = computed["train"]
        thumbnails = copies.unit_rows(train.thumbnails)
        within = copies.nearest(thumbnails, thumbnails, 1, skip_same_row=True)
        threshold = copies.near_copy_threshold(
            _copy_distances(config, splits), copies.nearest_distinct(train.digests, within))
        leaks = {split: copies.leaks(
            train.digests, computed[split].digests,
            copies.nearest(copies.unit_rows(computed[split].thumbnails), thumbnails, 1),
            threshold.distance) for split in audit_report.HELD_OUT_SPLITS}
        features = copies.unit_rows(train.features)
        findings = audit_report.Findings(
            names={split: computed[split].names for split in SPLITS},
            labels={split: computed[split].labels for split in SPLITS},
            class_names=splits.class_names,
            label_issues=label_issues.find(train.features, train.labels,
                                           splits.num_classes, config.seed),
            leaks=leaks,
            duplicates=copies.duplicates(train.digests, within, threshold.distance),
            outliers=copies.outliers(copies.nearest(
                features, features, copies.OUTLIER_NEIGHBOURS, skip_same_row=True)),
            threshold=threshold,
            excluded_before=(exclusion.read_entries(config.exclude_files)
                             if config.exclude_files else ()))
        looking.result = "Looked for copies, label issues and outliers"
    audit_report.write_tables(directory, findings)
    grids = audit_report.write_grids(directory, findings,
                                     lambda split, positions: _images(splits, split, positions))
    return findings, grids


def _features(config, splits, extractor, directory):
    """Each split's features, pixel digests and thumbnails, in one pass over
    its images."""
    total = sum(splits.sizes.values())
    computed = {}
    with progress.step(f"Computing the backbone features of {total:,} images",
                       total=total, unit="image") as computing:
        for split in SPLITS:
            digests, thumbnails = [], []

            def look_at(images):
                digests.extend(copies.pixel_digests(images))
                thumbnails.append(copies.thumbnails(images))

            values, labels, _ = features_lib.split_features(
                extractor, pipeline.split_batches(config, splits, split),
                splits.sizes[split], split=split,
                directory=os.path.join(directory, rundir.FEATURES_DIR),
                computed=computing.advance, on_images=look_at)
            computed[split] = _Split(values, labels, digests, _stacked(thumbnails),
                                     _names(splits, split))
        computing.result = f"Computed the backbone features of {total:,} images once"
    return computed


def _stacked(thumbnails):
    return np.concatenate(thumbnails) if thumbnails else np.zeros((0, 1), np.float32)


def _copy_distances(config, splits):
    """The cosine distances between the thumbnails of sampled training images
    and of their near copies (`tl_keras.data.augment.near_copies`)."""
    originals = pipeline.sample_images(
        splits.train, num_examples=splits.sizes["train"], count=_MEASURED_COPIES,
        seed=config.seed, image_size=config.image_size, resize=config.resize)
    if not len(originals):
        return np.zeros(1)
    rows = [copies.unit_rows(copies.thumbnails(images))
            for images in (originals, augment.near_copies(originals))]
    return np.maximum(0, 1 - np.sum(rows[0] * rows[1], axis=1))


def _names(splits, split):
    """A split's examples as `--exclude_files` names them: paths, or TFDS indices."""
    if splits.files is not None:
        return [str(path) for path in splits.files[split]]
    return [str(index) for index in splits.indices[split]]


def _images(splits, split, positions):
    """{position: uint8 image} of a split's examples at `positions`."""
    wanted = sorted(set(int(p) for p in positions))
    return dict(zip(wanted, pipeline.images_at(getattr(splits, split), wanted)))
