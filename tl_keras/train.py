"""Two-phase training: the head on a frozen backbone, then fine-tuning.

Backend-agnostic: only `keras`. The caller passes a `scope` (the distribution
strategy's) inside which both compiles run, so the optimizer's variables are
created where the model's are.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import time

import keras
import numpy as np

from tl_keras import features
from tl_keras import finetune
from tl_keras import progress
from tl_keras import recipe
from tl_keras.errors import UsageError


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to each epoch's logs.

    It must come before the callbacks that write the logs (TensorBoard, CSV).
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class PhaseTimer(keras.callbacks.Callback):
    """Measures a phase as this process trains it: its wall time, and the time
    and number of its training steps (validation left out), for images/s.

    Keras calls `on_test_begin` for each epoch's validation, which ends the
    epoch's training steps.
    """

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.training_seconds = 0.0
        self.steps = 0
        self._started = self._epoch_started = None

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()

    def on_train_end(self, logs=None):
        self.seconds += time.perf_counter() - self._started

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_test_begin(self, logs=None):
        if self._epoch_started is not None:
            self.training_seconds += time.perf_counter() - self._epoch_started
            self._epoch_started = None


class HistoryWriter(keras.callbacks.Callback):
    """Appends one row per completed epoch, with its phase, to a CSV file.

    Epochs are counted from 1 in the file, as the console counts them. The
    header is written once, from the first epoch's log keys, so both phases
    share one file and one timeline. A resumed run first drops the rows of the
    epochs it is about to redo.
    """

    def __init__(self, path, phase):
        super().__init__()
        self.path = path
        self.phase = phase
        self._first_epoch_seen = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch_seen:
            self._first_epoch_seen = True
            self._forget_from(epoch)

    def _forget_from(self, epoch):
        """Drops rows of epochs about to run again: a kill can land between an
        epoch's row and its backup, and each epoch must appear once."""
        if not os.path.exists(self.path):
            return
        with open(self.path, newline="") as file:
            rows = list(csv.reader(file))
        # Rows count from 1; Keras' `epoch` from 0, so it is row epoch + 1.
        kept = rows[:1] + [row for row in rows[1:] if int(row[0]) <= epoch]
        if len(kept) < len(rows):
            with open(self.path, "w", newline="") as file:
                csv.writer(file).writerows(kept)

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "phase": self.phase, **(logs or {})}
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists:
            with open(self.path, newline="") as file:
                fieldnames = next(csv.reader(file))
        else:
            fieldnames = list(row)
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where training writes inside `--model_dir`."""

    model_dir: str

    @property
    def tensorboard(self):
        return os.path.join(self.model_dir, "tensorboard")

    @property
    def best_checkpoint(self):
        return os.path.join(self.model_dir, "checkpoints", "best.weights.h5")

    @property
    def pending_best_checkpoint(self):
        """Where a new best epoch's weights are written, until progress.json
        has recorded which epoch they are (see `ProgressWriter`)."""
        return os.path.join(self.model_dir, "checkpoints", "best.pending.weights.h5")

    @property
    def history(self):
        return os.path.join(self.model_dir, "history.csv")

    @property
    def progress(self):
        return os.path.join(self.model_dir, "progress.json")

    def backup_dir(self, phase):
        return os.path.join(self.model_dir, "backup", phase)

    def phase_end_weights(self, phase):
        return os.path.join(self.model_dir, "checkpoints", f"{phase}_end.weights.npz")

    @property
    def training_curves(self):
        return os.path.join(self.model_dir, "plots", "training_curves.png")


def train_two_phases(model, backbone, *, train_batches, validation_batches,
                     steps_per_epoch, phases, unfreeze, train_batchnorm=False,
                     optimizer, weight_decay,
                     label_smoothing, num_classes, jit_compile, scope, paths,
                     phase_callbacks=None, profile_batches=None, cached_features=None,
                     backup_on_preemption=True, verbose="auto"):
    """Trains the head on the frozen backbone, then fine-tunes; resumes a killed run.

    Rerun in the same `paths.model_dir` after a kill, it skips completed phases
    (restoring the weights they ended with) and continues the interrupted one
    from its last backup: weights, optimizer state (so the learning-rate
    schedule's position too) and epoch. `history.csv` keeps each epoch once.

    Args:
        model: the classifier from `tl_keras.model.build_classifier`.
        backbone: the backbone inside it.
        train_batches: training batches, repeated if `steps_per_epoch` caps them.
        validation_batches: validation batches, read in full after each epoch.
        steps_per_epoch: training steps per epoch.
        phases: the two `PhasePlan`s from `tl_keras.recipe.plan_phases`.
        unfreeze: `--unfreeze`, see `tl_keras.model.unfreeze_backbone`.
        train_batchnorm: `--batchnorm=train`: phase 2 trains the unfrozen
            BatchNormalization layers too. The classifier must have been built
            with the same setting.
        optimizer, weight_decay, label_smoothing, jit_compile: compile settings.
        num_classes: the number of classes, for top-5 on fewer classes.
        scope: returns a context manager (the strategy's scope) for compiling.
        paths: `RunPaths`.
        phase_callbacks: optional function from a `PhasePlan` to more callbacks
            for that phase.
        profile_batches: optional (first, last) batch of the first phase to
            write a profiler trace for.
        cached_features: optional function returning
            `tl_keras.features.CachedFeatures`; the head phase then trains on
            them instead of on images. Called only if the head phase runs.
        backup_on_preemption: on SIGTERM, back up the epoch in progress. Off
            for multi-worker runs, whose workers stop at different batches:
            the rerun resumes all of them from their last common epoch.
        verbose: `model.fit`'s verbosity.

    Returns:
        A dict from phase name to its last epoch's validation metrics
        (`{"top1", "top5", "label_smoothed_loss"}`); phases with no epochs are
        left out.

    Raises:
        TrainingDiverged: when the loss becomes NaN or infinite.
        Preempted: when the process received SIGTERM; a backup was saved
            if `backup_on_preemption`.
    """
    os.makedirs(os.path.dirname(paths.best_checkpoint), exist_ok=True)
    progress = Progress(paths.progress)
    _settle_pending_best(progress, paths)
    restore_from = None
    for phase in phases:
        if phase.epochs == 0:
            continue
        if progress.phase_complete(phase.name):
            print(f"Phase {phase.name}: already complete; skipping it.", flush=True)
            restore_from = paths.phase_end_weights(phase.name)
            continue
        if restore_from:
            # Only weights carry over: each phase starts a new optimizer.
            _load_weights(model, restore_from)
        if phase.name == recipe.HEAD_PHASE:
            finetune.freeze_backbone(backbone)
            trained = "the head"
        else:
            unfrozen = finetune.unfreeze_backbone(backbone, unfreeze, train_batchnorm)
            batchnorm = ("BatchNormalization trains with them" if train_batchnorm
                         else "BatchNormalization stays frozen")
            trained = (
                f"the head and {len(unfrozen)} backbone layers "
                f"(--unfreeze={unfreeze}; {batchnorm})"
            )
        fit_model, fit_data, fit_validation = model, train_batches, validation_batches
        if phase.name == recipe.HEAD_PHASE and cached_features:
            # The frozen backbone's features, computed once: the head trains on
            # them, and being the classifier's own layers, trains the classifier.
            cached = cached_features()
            fit_model, fit_data, fit_validation = (
                features.head_of(model), cached.train, cached.validation)
            trained = "the head on cached backbone features"
        with scope():
            # Recompile after changing `trainable`: the compiled step captures
            # which weights it updates.
            recipe.compile_for_phase(
                fit_model, phase, steps_per_epoch=steps_per_epoch, optimizer=optimizer,
                weight_decay=weight_decay, label_smoothing=label_smoothing,
                num_classes=num_classes, jit_compile=jit_compile,
            )
        last_epoch = phase.first_epoch + phase.epochs
        backup = ResumableBackup(paths.backup_dir(phase.name))
        resumed_at, batches_done = backup.saved_position()
        resuming = ""
        if resumed_at is not None:
            resuming = f", resuming at epoch {resumed_at + 1}" + (
                f", batch {batches_done + 1}" if batches_done else "")
        print(
            f"Phase {phase.name}: epochs {phase.first_epoch + 1}-{last_epoch}{resuming}, "
            f"training {trained}, {_count_trainable(model):,} trainable weights, "
            f"learning rate {phase.learning_rate:g}, {steps_per_epoch} steps/epoch.",
            flush=True,
        )
        checkpoint = ClassifierCheckpoint(
            model,
            paths.pending_best_checkpoint,
            monitor="val_top1",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            # Carried across phases (and restarts) so a later epoch only
            # replaces the checkpoint when it does better.
            initial_value_threshold=progress.best_top1,
        )
        watcher = PreemptionWatcher(backup if backup_on_preemption else None,
                                    steps_per_epoch)
        callbacks = [
            StopOnNaN(paths),
            LearningRateLogger(),
            keras.callbacks.TensorBoard(
                paths.tensorboard,
                profile_batch=(profile_batches or 0) if not progress.phases else 0,
            ),
            checkpoint,
            HistoryWriter(paths.history, phase.name),
            ProgressWriter(progress, phase.name, checkpoint, paths),
            *(phase_callbacks(phase) if phase_callbacks else []),
            # After every callback that records the epoch, so that a kill
            # never leaves a backup of an epoch that history.csv or
            # progress.json lack. (Its restore, in on_train_begin, still comes
            # before any epoch starts.)
            backup,
            # Last, so that an epoch it stops at is recorded by all the others.
            watcher,
        ]
        # With --batchnorm=train, the moving statistics follow the weights
        # closely, so that each epoch's validation and the best checkpoint mean
        # something; they are recomputed after the phase. compile_for_phase
        # above dropped the traced train step, so fit traces it in this block,
        # with this momentum.
        trains_batchnorm = train_batchnorm and phase.name != recipe.HEAD_PHASE
        tracking_batchnorm = (
            finetune.batchnorm_momentum(backbone, TRACKING_BATCHNORM_MOMENTUM)
            if trains_batchnorm else contextlib.nullcontext())

        def fit(first_epoch, end_epoch, steps):
            fit_model.fit(
                fit_data, validation_data=fit_validation, initial_epoch=first_epoch,
                epochs=end_epoch, steps_per_epoch=steps, callbacks=callbacks,
                # The input pipeline shuffles; fit can't shuffle a dataset.
                shuffle=False, verbose=verbose,
            )

        with tracking_batchnorm:
            if batches_done:
                # A SIGTERM stopped this epoch part-way: train only its
                # remaining batches, so the optimizer's step count (and with it
                # the learning-rate schedule) goes on exactly as it would have.
                watcher.batches_before = batches_done
                fit(resumed_at, resumed_at + 1, steps_per_epoch - batches_done)
                watcher.batches_before = 0
            if not batches_done or resumed_at + 1 < last_epoch:
                fit(phase.first_epoch, last_epoch, steps_per_epoch)
        if trains_batchnorm:
            validation = _recompute_batchnorm_statistics(
                model, backbone, train_batches, validation_batches,
                progress.phases[phase.name]["validation"]["top1"])
            progress.record_validation(phase.name, validation)
            if validation["top1"] > (progress.best_top1 or 0.0):
                # Validated with its own statistics, the last epoch can beat
                # the epoch chosen on statistics that lagged the weights.
                model.save_weights(paths.pending_best_checkpoint)
                progress.record_best(phase.name, last_epoch - 1, validation,
                                     statistics_recomputed=True)
                _promote_pending_best(progress, paths)
        _save_weights(model, paths.phase_end_weights(phase.name))
        progress.complete_phase(phase.name)
        backup.delete()
        restore_from = None
    return progress.validation_by_phase()


EXPORT_BEST, EXPORT_LAST = "best", "last"


def restore_export_weights(model, backbone, choice, *, phases, paths, unfreeze,
                           train_batchnorm, label_smoothing, train_batches,
                           validation_batches):
    """Loads the weights the run evaluates and exports, after training.

    They are read from the run folder, also when training was done by an
    earlier process, so a rerun after a kill during the export exports the
    trained weights.

    Args:
        model, backbone: as for `train_two_phases`.
        choice: `best`: the epoch with the best validation top-1 across both
            phases (`checkpoints/best.weights.h5`); `last`: the last epoch.
        phases: the `PhasePlan`s trained.
        paths: `RunPaths`.
        unfreeze, train_batchnorm, label_smoothing: as for `train_two_phases`.
            With `train_batchnorm`, best weights from fine-tuning get
            BatchNormalization statistics recomputed for them, as the last
            epoch's already have; if they then validate below the last
            epoch, the last epoch's weights are the best.
        train_batches, validation_batches: for that recompute.

    Returns:
        `{"weights": choice, "epoch" (counted from 1), "phase", "validation"}`:
        which weights these are and their validation metrics.
    """
    progress = Progress(paths.progress)
    last_phase = [phase for phase in phases if phase.epochs][-1]
    last = {"weights": choice, "epoch": last_phase.first_epoch + last_phase.epochs,
            "phase": last_phase.name,
            "validation": progress.phases[last_phase.name]["validation"]}
    best = progress.best
    if choice == EXPORT_LAST or best is None:
        _load_weights(model, paths.phase_end_weights(last_phase.name))
        return {**last, "weights": EXPORT_LAST}
    # The checkpoint also holds the optimizer of the phase that wrote it, which
    # the export doesn't need (and the model's current optimizer doesn't fit).
    # (A classifier whose only phase trained its head on cached features was
    # never compiled, and has no optimizer.)
    optimizer = getattr(model, "optimizer", None)
    model.load_weights(paths.best_checkpoint,
                       objects_to_skip=[optimizer] if optimizer else None)
    validation = best["validation"]
    if (train_batchnorm and best["phase"] == recipe.FINETUNE_PHASE
            and not best.get("statistics_recomputed")):
        # The same layers as in phase 2, also when phase 2 ran in an earlier
        # process and this one never unfroze (nor compiled) the model.
        finetune.unfreeze_backbone(backbone, unfreeze, train_batchnorm)
        if not getattr(model, "compiled", False):
            recipe.compile_for_evaluation(model, label_smoothing)
        validation = _recompute_batchnorm_statistics(
            model, backbone, train_batches, validation_batches, validation["top1"])
        if validation["top1"] < last["validation"]["top1"]:
            print(f"With their own statistics, the weights of epoch {best['epoch'] + 1} "
                  f"validate below the last epoch's "
                  f"({last['validation']['top1']:.2%}), which are the best, then.",
                  flush=True)
            _load_weights(model, paths.phase_end_weights(last_phase.name))
            return last
    return {"weights": EXPORT_BEST, "epoch": best["epoch"] + 1, "phase": best["phase"],
            "validation": validation}


# BatchNormalization momentum while it trains (--batchnorm=train): the moving
# statistics then average about the last ten batches, PyTorch's default.
TRACKING_BATCHNORM_MOMENTUM = 0.9

# Batches averaged when re-estimating BatchNormalization statistics after
# training from scratch: thousands of images, a fraction of an epoch's cost.
BATCHNORM_STATISTICS_BATCHES = 100


def _recompute_batchnorm_statistics(model, backbone, train_batches, validation_batches,
                                    validated_top1=None):
    """With `--batchnorm=train`: see `tl_keras.model.recompute_batchnorm_statistics`.

    Validates again, since validation until now ran with the old statistics.

    Returns:
        The validation metrics with the new statistics.
    """
    batches = train_batches.take(BATCHNORM_STATISTICS_BATCHES)
    with progress.step("Recomputing BatchNormalization statistics",
                       _known_length(batches), unit="batch") as recomputing:

        def images():
            for batch_images, _ in batches.as_numpy_iterator():
                yield batch_images
                recomputing.advance()

        used = finetune.recompute_batchnorm_statistics(model, backbone, images())
        validation = recipe.validation_metrics(
            model.evaluate(validation_batches, return_dict=True, verbose=0))
        change = f" (was {validated_top1:.2%})" if validated_top1 is not None else ""
        recomputing.result = (
            f"Recomputed BatchNormalization statistics over {used} training batches "
            f"with these weights: validation top-1 {validation['top1']:.2%}{change}")
    return validation


def _known_length(batches):
    """The number of batches, or None when the dataset can't say."""
    try:
        return len(batches)
    except TypeError:
        return None


class ClassifierCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that always saves the whole classifier, also while a
    phase trains a part of it (the head on cached features)."""

    def __init__(self, classifier, filepath, **kwargs):
        super().__init__(filepath, **kwargs)
        self.classifier = classifier

    def set_model(self, model):
        super().set_model(self.classifier)


def _promote_pending_best(progress, paths):
    """Makes the pending best weights the best, once progress.json names their
    epoch (and, in the same write, says they are pending), so that a kill at
    any point leaves a state `_settle_pending_best` completes or undoes."""
    os.replace(paths.pending_best_checkpoint, paths.best_checkpoint)
    progress.set_best_pending(False)


def _settle_pending_best(progress, paths):
    """After a kill: finishes a promotion progress.json had recorded, or drops
    pending weights it never recorded (written, or half-written, by the epoch
    the kill interrupted), so that best.weights.h5 always holds the epoch
    progress.json names."""
    pending = os.path.exists(paths.pending_best_checkpoint)
    if progress.best_pending and pending:
        os.replace(paths.pending_best_checkpoint, paths.best_checkpoint)
    elif pending:
        os.remove(paths.pending_best_checkpoint)
    if progress.best_pending:
        progress.set_best_pending(False)


class Progress:
    """`progress.json`: which phases are complete, their last validation
    metrics, and the epoch with the best validation top-1 so far (the one
    `checkpoints/best.weights.h5` holds), rewritten atomically."""

    def __init__(self, path):
        self.path = path
        self.state = {"phases": {}, "best": None}
        if os.path.exists(path):
            with open(path) as file:
                self.state = json.load(file)

    @property
    def phases(self):
        return self.state["phases"]

    @property
    def best(self):
        """`{"epoch" (from 0), "phase", "validation"}` of the best epoch, or None."""
        return self.state.get("best")

    @property
    def best_top1(self):
        return self.best["validation"]["top1"] if self.best else None

    @property
    def best_pending(self):
        """Whether the best epoch's weights may still be in the pending file."""
        return self.state.get("best_pending", False)

    def set_best_pending(self, pending):
        self.state["best_pending"] = pending
        self._write()

    def phase_complete(self, phase):
        return self.phases.get(phase, {}).get("complete", False)

    def record_epoch(self, phase, epoch, validation, is_best):
        self.phases.setdefault(phase, {"complete": False})["validation"] = validation
        if is_best:
            self._set_best(phase, epoch, validation, statistics_recomputed=False)
        self._write()

    def record_best(self, phase, epoch, validation, statistics_recomputed):
        """Notes the epoch whose weights `checkpoints/best.weights.h5` holds,
        and whether their BatchNormalization statistics were recomputed."""
        self._set_best(phase, epoch, validation, statistics_recomputed)
        self._write()

    def _set_best(self, phase, epoch, validation, statistics_recomputed):
        # Its weights are in the pending file until `_promote_pending_best`.
        self.state["best"] = {"epoch": epoch, "phase": phase, "validation": validation,
                              "statistics_recomputed": statistics_recomputed}
        self.state["best_pending"] = True

    def record_validation(self, phase, validation):
        """Replaces a phase's last validation metrics (after its BatchNormalization
        statistics were recomputed)."""
        self.phases[phase]["validation"] = validation
        self._write()

    def complete_phase(self, phase):
        self.phases.setdefault(phase, {})["complete"] = True
        self._write()

    def validation_by_phase(self):
        return {name: state["validation"] for name, state in self.phases.items()
                if "validation" in state}

    def _write(self):
        temporary = self.path + ".tmp"
        with open(temporary, "w") as file:
            json.dump(self.state, file, indent=2)
        os.replace(temporary, self.path)


class ProgressWriter(keras.callbacks.Callback):
    """Records each completed epoch's validation metrics, and whether the
    checkpoint callback (which runs before it) kept it as the best."""

    def __init__(self, progress, phase, checkpoint, paths):
        super().__init__()
        self.progress = progress
        self.phase = phase
        self.checkpoint = checkpoint
        self.paths = paths

    def on_epoch_end(self, epoch, logs=None):
        validation = recipe.validation_metrics(logs or {}, prefix="val_")
        best = self.checkpoint.best
        improved = best not in (None, -np.inf) and (
            self.progress.best_top1 is None or best > self.progress.best_top1)
        self.progress.record_epoch(self.phase, epoch, validation, improved)
        if improved:
            _promote_pending_best(self.progress, self.paths)


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, kept until the phase's end is recorded, and
    able to save on demand (on SIGTERM)."""

    def __init__(self, backup_dir):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)

    def saved_epoch(self):
        """The epoch a restore would start at, or None without a backup."""
        return self.saved_position()[0]

    def saved_position(self):
        """(epoch, batches of it already trained) a restore starts at, or
        (None, 0) without a backup. Batches are 0 for an end-of-epoch backup."""
        if not os.path.exists(self._training_metadata_path):
            return None, 0
        with open(self._training_metadata_path) as file:
            metadata = json.load(file)
        return metadata["epoch"], metadata.get("batch", 0)

    def _save_model(self):
        """Keras' save, but each file written beside its place and renamed into
        it: Keras writes in place, and a kill in the middle (a SIGKILL, or the
        end of a SIGTERM's grace period) would leave a backup no rerun can
        read. The weights go first: a kill between the two renames restarts
        the epoch they finished, rather than skipping one."""
        os.makedirs(self.backup_dir, exist_ok=True)
        pending = os.path.join(self.backup_dir, "pending.weights.h5")
        self.model.save_weights(pending, overwrite=True)
        os.replace(pending, self._weights_path)
        with open(self._training_metadata_path + ".tmp", "w") as file:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen}, file)
        os.replace(self._training_metadata_path + ".tmp", self._training_metadata_path)

    def save_now(self, epoch, batches_done):
        """Saves the weights and optimizer now, `batches_done` batches into
        `epoch`, so the rerun trains only the rest of that epoch."""
        self._current_epoch = epoch
        self._last_batch_seen = batches_done
        self._save_model()

    def delete(self):
        shutil.rmtree(self.backup_dir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.backup_dir))  # `backup/`, once empty.
        except OSError:
            pass


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite."""


class Preempted(Exception):
    """The process received SIGTERM; training stopped at the end of a batch."""


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first batch whose loss is NaN or infinite.

    It raises rather than setting `stop_training`, so the epoch-end callbacks
    never back up or checkpoint the broken weights.
    """

    def __init__(self, paths):
        super().__init__()
        self.paths = paths
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise TrainingDiverged(
                f"The training loss became {float(loss)} at epoch {self.epoch + 1}, "
                f"batch {batch + 1}. Likely causes: a learning rate too high "
                f"(lower --head_learning_rate or --finetune_learning_rate), or "
                f"float16 without loss scaling (try --mixed_precision=bfloat16 or "
                f"off). The last good state is kept: the best weights in "
                f"{self.paths.best_checkpoint} and the last epoch's backup in "
                f"{os.path.dirname(self.paths.backup_dir('x'))}/."
            )


class PreemptionWatcher(keras.callbacks.Callback):
    """On SIGTERM, finishes the current batch, saves a backup (unless given
    none to save) and stops.

    Stopped after an epoch's last batch, it lets the epoch end (validation,
    checkpoint, history, backup) and stops then, so the rerun starts a fresh
    epoch; stopped earlier, the backup records how many of the epoch's batches
    are done.

    Attributes:
        batches_before: batches of the current epoch trained before this fit
            started (by the run a SIGTERM stopped); its batch numbers count on
            from there.
    """

    def __init__(self, backup, steps_per_epoch):
        super().__init__()
        self.backup = backup
        self.steps_per_epoch = steps_per_epoch
        self.batches_before = 0
        self.received = False
        self.epoch = 0
        self._previous_handler = None

    def on_train_begin(self, logs=None):
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, logs=None):
        signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _on_sigterm(self, signum, frame):
        # Only note it here: raising inside a running step could leave the
        # weights half-updated.
        self.received = True

    def on_train_batch_end(self, batch, logs=None):
        batches_done = self.batches_before + batch + 1
        if not self.received or batches_done >= self.steps_per_epoch:
            return
        self.on_train_end()
        if self.backup is None:
            raise Preempted(
                f"Received SIGTERM: stopped after batch {batches_done} of epoch "
                f"{self.epoch + 1}. Rerun the same command on every worker to continue "
                f"from the last completed epoch.")
        self.backup.save_now(self.epoch, batches_done)
        raise Preempted(
            f"Received SIGTERM: stopped after batch {batches_done} of epoch "
            f"{self.epoch + 1} and saved a backup to {self.backup.backup_dir}. "
            f"Rerun the same command to continue from there."
        )

    def on_epoch_end(self, epoch, logs=None):
        if not self.received:
            return
        self.on_train_end()
        rerun = ("Rerun the same command to continue from there." if self.backup else
                 "Rerun the same command on every worker to continue from there.")
        raise Preempted(f"Received SIGTERM: stopped at the end of epoch {epoch + 1}. {rerun}")


def resume_position(paths):
    """Where a rerun in `paths.model_dir` would start, as ints: for each phase,
    whether it is complete and the epoch its backup restarts at (-1: none).
    Multi-worker runs check that every worker's folder says the same."""
    progress = Progress(paths.progress)
    position = []
    for phase in (recipe.HEAD_PHASE, recipe.FINETUNE_PHASE):
        saved = ResumableBackup(paths.backup_dir(phase)).saved_epoch()
        position += [int(progress.phase_complete(phase)), -1 if saved is None else saved]
    return position


def _save_weights(model, path):
    np.savez(path, *model.get_weights())


def _load_weights(model, path):
    with np.load(path) as saved:
        model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])


def _count_trainable(model):
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)
