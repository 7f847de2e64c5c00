"""What a run records between processes, so a rerun resumes where it stopped.

`progress.json` (which phases are complete, their validation metrics, the best
epoch), the best checkpoint's two-step promotion, each phase's end weights,
and the resume position multi-worker runs compare. The paths are
`tl_keras.rundir.RunPaths`.
"""

import json
import os

import numpy as np

from tl_keras import recipe
from tl_keras import rundir


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
        # Its weights are in the pending file until `promote_pending_best`.
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
    end-of-epoch backup (see `tl_keras.callbacks.ResumableBackup`)."""
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
