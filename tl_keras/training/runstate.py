"""What a run records between processes, so a rerun resumes where it stopped.

`progress.json` (which phases are complete, their validation metrics, the best
epoch), the best checkpoint's two-step promotion, each phase's end weights,
and the resume position multi-worker runs compare. The paths are
`tl_keras.rundir.RunPaths`.
"""

import dataclasses
import json
import os

import numpy as np

from tl_keras import rundir
from tl_keras.training import recipe


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
        state = self.phases.setdefault(phase, {"complete": False})
        state["validation"] = validation
        # Each epoch's top-1, for --early_stopping; an epoch redone after a
        # kill replaces its entry. (JSON keys are strings.)
        state.setdefault("top1_by_epoch", {})[str(epoch)] = validation["top1"]
        if is_best:
            self._set_best(phase, epoch, validation, statistics_recomputed=False)
        self._write()

    def record_best(self, phase, epoch, validation, statistics_recomputed):
        """Notes the epoch whose weights `checkpoints/best.weights.h5` holds,
        and whether their BatchNormalization statistics were recomputed."""
        self._set_best(phase, epoch, validation, statistics_recomputed)
        self._write()

    def _set_best(self, phase, epoch, validation, statistics_recomputed):
        # Its weights are in the pending file until `promote_pending_best`.
        self.state["best"] = {"epoch": epoch, "phase": phase, "validation": validation,
                              "statistics_recomputed": statistics_recomputed}
        self.state["best_pending"] = True

    def record_validation(self, phase, validation):
        """Replaces a phase's last validation metrics (after its BatchNormalization
        statistics were recomputed)."""
        self.phases[phase]["validation"] = validation
        self._write()

    def complete_phase(self, phase, last_epoch, stopped_early=None):
        """Marks a phase complete, at `last_epoch` (from 0), with the
        `EarlyStop` that ended it, if one did; a rerun then skips it."""
        state = self.phases.setdefault(phase, {})
        state.update(complete=True, last_epoch=last_epoch)
        if stopped_early:
            state["stopped_early"] = dataclasses.asdict(stopped_early)
        self._write()

    def last_epoch(self, phase):
        """The last epoch (from 0) a complete phase trained, or None."""
        return self.phases.get(phase, {}).get("last_epoch")

    def early_stop(self, phase, epoch, patience):
        """The `EarlyStop` due after `epoch` (from 0) of `phase`: when none of
        the last `patience` epochs up to it beat the phase's best validation
        top-1 before them. None when training goes on, or `patience` is 0.

        Only epochs up to `epoch` count, so that entries an interrupted run
        recorded for later epochs (redone after the rerun) don't."""
        if not patience:
            return None
        recorded = self.phases.get(phase, {}).get("top1_by_epoch", {})
        top1 = {int(key): value for key, value in recorded.items() if int(key) <= epoch}
        if not top1:
            return None
        # The first epoch that reached the best: a later one only as good is
        # not better.
        best_epoch = max(sorted(top1), key=lambda key: top1[key])
        if epoch - best_epoch < patience:
            return None
        return EarlyStop(epoch=epoch, best_epoch=best_epoch, best_top1=top1[best_epoch],
                         patience=patience)

    def validation_by_phase(self):
        return {name: state["validation"] for name, state in self.phases.items()
                if "validation" in state}

    def _write(self):
        write_json(self.path, self.state, indent=2)


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    """Why `--early_stopping` ended a phase. Epochs count from 0."""

    epoch: int
    best_epoch: int
    best_top1: float
    patience: int

    def describe(self, phase):
        return (f"Phase {phase} stopped early after epoch {self.epoch + 1}: no better "
                f"validation top-1 for {self.epoch - self.best_epoch} epochs "
                f"(--early_stopping={self.patience}); best {self.best_top1:.2%} at epoch "
                f"{self.best_epoch + 1}.")


def write_json(path, value, indent=None):
    """Writes `value` as JSON to `path + ".tmp"` and renames it into place, so
    that a kill in the middle leaves the previous file whole, never half of
    one that a rerun can't parse."""
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        json.dump(value, file, indent=indent)
    os.replace(temporary, path)


def promote_pending_best(progress, paths):
    """Makes the pending best weights the best, once progress.json names their
    epoch (and, in the same write, says they are pending), so that a kill at
    any point leaves a state `settle_pending_best` completes or undoes."""
    os.replace(paths.pending_best_checkpoint, paths.best_checkpoint)
    progress.set_best_pending(False)


def settle_pending_best(progress, paths):
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


def resume_position(paths):
    """Where a rerun in `paths.model_dir` would start, as ints: for each phase,
    whether it is complete and the epoch its backup restarts at (-1: none).
    Multi-worker runs check that every worker's folder says the same."""
    progress = Progress(paths.progress)
    position = []
    for phase in (recipe.HEAD_PHASE, recipe.FINETUNE_PHASE):
        saved, _ = backup_position(paths.backup_dir(phase))
        position += [int(progress.phase_complete(phase)), -1 if saved is None else saved]
    return position


def backup_position(backup_dir):
    """(epoch, batches of it already trained) a restore from the backup in
    `backup_dir` starts at, or (None, 0) without one. Batches are 0 for an
    end-of-epoch backup (see `tl_keras.training.resume.ResumableBackup`)."""
    path = os.path.join(backup_dir, rundir.BACKUP_METADATA_FILE)
    if not os.path.exists(path):
        return None, 0
    with open(path) as file:
        metadata = json.load(file)
    return metadata["epoch"], metadata.get("batch", 0)


def save_weights(model, path):
    """Writes a model's weights as one NumPy archive (a phase's end weights)."""
    np.savez(path, *model.get_weights())


def load_weights(model, path):
    with np.load(path) as saved:
        model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
