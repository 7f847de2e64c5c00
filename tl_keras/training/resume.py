"""What lets a killed phase resume: a backup of each epoch (and, on SIGTERM,
of the batches done), written so a kill never leaves it half-written, and
a clean stop on SIGTERM. The last two callbacks `tl_keras.training.train` runs.

Backend-agnostic: only `keras`.
"""

import os
import shutil
import signal

import keras

from tl_keras.errors import Preempted
from tl_keras.training import runstate


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, kept until the phase's end is recorded, and
    able to save on demand (on SIGTERM)."""

    def __init__(self, backup_dir):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)

    def on_train_begin(self, logs=None):
        # Keras' restore sets the model's `_initial_epoch`, which outlives the
        # fit: a later phase, with no backup of its own, would start at the
        # epoch an earlier phase resumed at. Only this phase's backup counts.
        self.model._initial_epoch = None
        super().on_train_begin(logs)

    def saved_position(self):
        """(epoch, batches of it already trained) a restore starts at; see
        `tl_keras.training.runstate.backup_position`."""
        return runstate.backup_position(self.backup_dir)

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
        runstate.write_json(self._training_metadata_path,
                            {"epoch": self._current_epoch, "batch": self._last_batch_seen})

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
