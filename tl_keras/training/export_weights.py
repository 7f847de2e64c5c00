"""After training: the weights the run evaluates and exports, the best epoch's
or the last's (`--export_weights`), read back from the run folder.

Backend-agnostic: only `keras`.
"""

from tl_keras.training import finetune
from tl_keras.training import optimization
from tl_keras.training import recipe
from tl_keras.training import runstate

EXPORT_BEST, EXPORT_LAST = "best", "last"


def restore_export_weights(model, backbone, choice, *, phases, paths, unfreeze,
                           train_batchnorm, label_smoothing, train_batches,
                           validation_batches):
    """Loads the weights the run evaluates and exports, after training.

    They are read from the run folder, also when training was done by an
    earlier process, so a rerun after a kill during the export exports the
    trained weights.

    Args:
        model, backbone: as for `tl_keras.training.train.train_two_phases`.
        choice: `best`: the epoch with the best validation top-1 across all
            phases (`checkpoints/best.weights.h5`); `last`: the last epoch.
        phases: the `PhasePlan`s trained.
        paths: `tl_keras.rundir.RunPaths`.
        unfreeze, train_batchnorm, label_smoothing: as for that function.
            With `train_batchnorm`, best weights from a phase after the head's get
            BatchNormalization statistics recomputed for them, as the last
            epoch's already have; if they then validate below the last
            epoch, the last epoch's weights are the best.
        train_batches, validation_batches: for that recompute.

    Returns:
        `{"weights": choice, "epoch" (counted from 1), "phase", "validation"}`:
        which weights these are and their validation metrics.
    """
    progress = runstate.Progress(paths.progress)
    last_phase = [phase for phase in phases if phase.epochs][-1]
    last_epoch = progress.last_epoch(last_phase.name)
    if last_epoch is None:  # a phase not recorded complete: its planned end
        last_epoch = last_phase.first_epoch + last_phase.epochs - 1
    last = {"weights": choice, "epoch": last_epoch + 1,
            "phase": last_phase.name,
            "validation": progress.phases[last_phase.name]["validation"]}
    best = progress.best
    if choice == EXPORT_LAST or best is None:
        runstate.load_weights(model, paths.phase_end_weights(last_phase.name))
        return {**last, "weights": EXPORT_LAST}
    _load_best_checkpoint(model, paths)
    validation = best["validation"]
    if (train_batchnorm and best["phase"] != recipe.HEAD_PHASE
            and not best.get("statistics_recomputed")):
        validation = _validate_with_own_statistics(
            model, backbone, unfreeze=unfreeze, label_smoothing=label_smoothing,
            train_batches=train_batches, validation_batches=validation_batches,
            validated_top1=validation["top1"])
        if validation["top1"] < last["validation"]["top1"]:
            print(f"With their own statistics, the weights of epoch {best['epoch'] + 1} "
                  f"validate below the last epoch's "
                  f"({last['validation']['top1']:.2%}), which are the best, then.",
                  flush=True)
            runstate.load_weights(model, paths.phase_end_weights(last_phase.name))
            return last
    return {"weights": EXPORT_BEST, "epoch": best["epoch"] + 1, "phase": best["phase"],
            "validation": validation}


def _load_best_checkpoint(model, paths):
    # The checkpoint also holds the optimizer of the phase that wrote it, which
    # the export doesn't need (and the model's current optimizer doesn't fit).
    # (A classifier whose only phase trained its head on cached features was
    # never compiled, and has no optimizer.)
    optimizer = getattr(model, "optimizer", None)
    model.load_weights(paths.best_checkpoint,
                       objects_to_skip=[optimizer] if optimizer else None)


def _validate_with_own_statistics(model, backbone, *, unfreeze, label_smoothing,
                                  train_batches, validation_batches, validated_top1):
    """Recomputes the BatchNormalization statistics of best weights from
    fine-tuning with --batchnorm=train, and validates them again."""
    # The same layers as in phase 2, also when phase 2 ran in an earlier
    # process and this one never unfroze (nor compiled) the model.
    finetune.unfreeze_backbone(backbone, unfreeze, train_batchnorm=True)
    if not getattr(model, "compiled", False):
        optimization.compile_for_evaluation(model, label_smoothing)
    return finetune.recompute_statistics_and_validate(
        model, backbone, train_batches, validation_batches, validated_top1)
