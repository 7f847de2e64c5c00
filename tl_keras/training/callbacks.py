"""The callbacks of a training phase: what `model.fit` does besides training.

Backend-agnostic: only `keras`. In the order `tl_keras.training.train` runs them: stop
on a NaN loss, log the learning rate, time the phase, keep the best
checkpoint, write history.csv and progress.json, and stop early; then
`tl_keras.training.resume`'s backup of each epoch and stop on SIGTERM.
"""

import csv
import os
import time

import keras
import numpy as np

from tl_keras.errors import TrainingDiverged
from tl_keras.training import optimization
from tl_keras.training import runstate


# Not keras.callbacks.TerminateOnNaN: it sets `stop_training`, and its
# raise_error mode (Keras 3.13 on; we support 3.12) raises a bare RuntimeError
# that names neither the epoch nor a fix.
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
                f"{self.paths.backups}/."
            )


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


class PhaseProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, numbering each epoch out of its phase's last
    (a `recipe.PhasePlan`'s): a phase resumed part-way through an epoch fits
    that epoch alone first, which Keras alone would print as "Epoch k/k"."""

    def __init__(self, phase):
        super().__init__()
        self.phase_end = phase.first_epoch + phase.epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.phase_end


class ClassifierCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that always saves the whole classifier, also while a
    phase trains a part of it (the head on cached features)."""

    def __init__(self, classifier, filepath, **kwargs):
        super().__init__(filepath, **kwargs)
        self.classifier = classifier

    def set_model(self, model):
        super().set_model(self.classifier)


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
        validation = optimization.validation_metrics(logs or {}, prefix="val_")
        best = self.checkpoint.best
        improved = best not in (None, -np.inf) and (
            self.progress.best_top1 is None or best > self.progress.best_top1)
        self.progress.record_epoch(self.phase, epoch, validation, improved)
        if improved:
            runstate.promote_pending_best(self.progress, self.paths)


# Not keras.callbacks.EarlyStopping: it keeps its count in memory, which a
# rerun after a kill would start again; progress.json holds each epoch's top-1.
class PhaseEarlyStopping(keras.callbacks.Callback):
    """Stops a phase (a `recipe.PhasePlan`) before its last epoch once
    `runstate.Progress.early_stop` says so, after the epoch has been recorded
    (so it comes after `ProgressWriter`).

    Attributes:
        stopped: the `runstate.EarlyStop` that stopped it, or None.
    """

    def __init__(self, progress, phase, patience):
        super().__init__()
        self.progress = progress
        self.phase = phase
        self.patience = patience
        self.stopped = None

    def on_epoch_end(self, epoch, logs=None):
        stop = early_stop(self.progress, self.phase, epoch, self.patience)
        if stop:
            self.stopped = stop
            self.model.stop_training = True
            print(stop.describe(self.phase.name), flush=True)


def early_stop(progress, phase, epoch, patience):
    """The `runstate.EarlyStop` due after `epoch` of `phase` (a
    `recipe.PhasePlan`), or None; never after the phase's last epoch, which
    ends it anyway."""
    if epoch + 1 >= phase.first_epoch + phase.epochs:
        return None
    return progress.early_stop(phase.name, epoch, patience)


class EmaWeights(keras.callbacks.Callback):
    """With `--ema`: the optimizer's moving average of the weights is what each
    epoch validates and what the epoch-end callbacks before this one save
    (the best checkpoint); the model trains, and the callbacks after this one
    (the backup) save, the raw weights, with the average beside them in the
    optimizer.

    At the end of `fit`, Keras puts the average in the model
    (`finalize_variable_values`): what the phase ends with. A `fit` that goes
    on with the phase (after a resume part-way through an epoch) restores the
    raw weights from the backup first.

    Not keras.callbacks.SwapEMAWeights: to checkpoint the average, it leaves
    it in the model from one epoch's end to the next's start, so a backup
    would hold the two swapped; and under TensorFlow it swaps by adding and
    subtracting, which doesn't give back the raw weights exactly.
    """

    def __init__(self):
        super().__init__()
        self._average_in_model = False

    def _swap(self):
        for weight, average in self._weights_and_averages():
            if average is not None:
                raw = keras.ops.convert_to_numpy(weight)
                weight.assign(average)
                average.assign(raw)
        self._average_in_model = not self._average_in_model

    def on_test_begin(self, logs=None):
        if not self._average_in_model:
            self._swap()

    def on_epoch_end(self, epoch, logs=None):
        if self._average_in_model:
            self._swap()

    def on_train_end(self, logs=None):
        # finalize_variable_values assigned each average to its weight, which
        # under JAX leaves the two holding one array; the next jitted
        # evaluate or predict donates (deletes) the weight's, and the
        # optimizer, whose state model.keras saves, would hold a deleted
        # array. Each average gets an array of its own.
        for _, average in self._weights_and_averages():
            if average is not None:
                average.assign(keras.ops.convert_to_numpy(average))

    def _weights_and_averages(self):
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        return zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)
