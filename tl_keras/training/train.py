"""Two-phase training: the head on a frozen backbone, then fine-tuning.

Backend-agnostic: only `keras`. Each phase is a list of steps: set what trains,
compile, say so, fit (resuming a killed run part-way), and record its end. The
caller passes a `scope` (the distribution strategy's) inside which both
compiles run, so the optimizer's variables are created where the model's are.
"""

import contextlib
import dataclasses
import math
import os

import keras

from tl_keras.model import features
from tl_keras.model import layer_decay
from tl_keras.training import callbacks
from tl_keras.training import finetune
from tl_keras.training import optimization
from tl_keras.training import recipe
from tl_keras.training import resume
from tl_keras.training import runstate


def train_two_phases(model, backbone, *, train_batches, validation_batches,
                     steps_per_epoch, phases, unfreeze, train_batchnorm=False,
                     optimizer, weight_decay,
                     label_smoothing, num_classes, jit_compile, scope, paths,
                     layer_decay=1.0, ema=0.0, early_stopping=0,
                     phase_callbacks=None, profile_batches=None, cached_features=None,
                     phase_inputs=None, backup_on_preemption=True, verbose="auto"):
    """Trains the head on the frozen backbone, then fine-tunes; resumes a killed run.

    Rerun in the same `paths.model_dir` after a kill, it skips completed phases
    (restoring the weights they ended with) and continues the interrupted one
    from its last backup: weights, optimizer state (so the learning-rate
    schedule's position too) and epoch. `history.csv` keeps each epoch once.

    Args:
        model: the classifier from `tl_keras.model.classifier.build_classifier`.
        backbone: the backbone inside it.
        train_batches: training batches, repeated if `steps_per_epoch` caps them.
        validation_batches: validation batches, read in full after each epoch.
        steps_per_epoch: training steps per epoch.
        phases: the two `PhasePlan`s from `tl_keras.training.recipe.plan_phases`.
        unfreeze: `--unfreeze`, see `tl_keras.training.finetune.unfreeze_backbone`.
        train_batchnorm: `--batchnorm=train`: phase 2 trains the unfrozen
            BatchNormalization layers too. The classifier must have been built
            with the same setting.
        optimizer, weight_decay, label_smoothing, jit_compile: compile settings.
        num_classes: the number of classes, for top-5 on fewer classes.
        scope: returns a context manager (the strategy's scope) for compiling.
        paths: `tl_keras.rundir.RunPaths`.
        layer_decay: `--layer_decay`: fine-tuning trains each backbone block
            at the learning rate times this to the power of its depth from
            the top (`tl_keras.model.layer_decay`); 1, the default, for none.
        ema: `--ema`: the momentum of a moving average of the weights, which
            each epoch validates and the checkpoints and phase ends hold in
            place of the raw weights (`tl_keras.training.callbacks.EmaWeights`); 0, the
            default, for none.
        early_stopping: `--early_stopping`: a phase ends after this many
            epochs without a better validation top-1 than its best before
            them; the next phase still starts at its planned epoch. 0, the
            default, for never.
        phase_callbacks: optional function from a `PhasePlan` to more callbacks
            for that phase.
        profile_batches: optional (first, last) batch of the first phase to
            write a profiler trace for.
        cached_features: optional function returning
            `tl_keras.model.features.CachedFeatures`; the head phase then trains on
            them instead of on images. Called only if the head phase runs.
        phase_inputs: optional function from a `PhasePlan` to that phase's own
            (training batches, steps per epoch), or to None for the run's.
            Called just before the phase trains (not for one already
            complete), when the model holds the weights the phase starts
            from: a self-training round labels its images with them.
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
    progress = runstate.Progress(paths.progress)
    runstate.settle_pending_best(progress, paths)
    run = _Run(
        model=model, backbone=backbone, train_batches=train_batches,
        validation_batches=validation_batches, steps_per_epoch=steps_per_epoch,
        unfreeze=unfreeze, train_batchnorm=train_batchnorm,
        compile_settings=dict(optimizer=optimizer, weight_decay=weight_decay,
                              label_smoothing=label_smoothing, num_classes=num_classes,
                              jit_compile=jit_compile, ema=ema),
        layer_decay=layer_decay, early_stopping=early_stopping,
        scope=scope, paths=paths, progress=progress, phase_callbacks=phase_callbacks,
        profile_batches=profile_batches, cached_features=cached_features,
        phase_inputs=phase_inputs, backup_on_preemption=backup_on_preemption,
        verbose=verbose,
    )
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
            runstate.load_weights(model, restore_from)
        _train_phase(_for_phase(run, phase), phase)
        restore_from = None
    return progress.validation_by_phase()


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every phase of one `train_two_phases` call shares; see its Args."""

    model: keras.Model
    backbone: keras.Model
    train_batches: object
    validation_batches: object
    steps_per_epoch: int
    unfreeze: str
    train_batchnorm: bool
    compile_settings: dict
    layer_decay: float
    early_stopping: int
    scope: object
    paths: object
    progress: runstate.Progress
    phase_callbacks: object
    profile_batches: object
    cached_features: object
    phase_inputs: object
    backup_on_preemption: bool
    verbose: object


def _for_phase(run, phase):
    """`run`, with the phase's own training batches where `phase_inputs` has some."""
    inputs = run.phase_inputs(phase) if run.phase_inputs else None
    if inputs is None:
        return run
    train_batches, steps_per_epoch = inputs
    return dataclasses.replace(run, train_batches=train_batches,
                               steps_per_epoch=steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class _Fit:
    """What one phase fits: the classifier, or its head on cached features."""

    model: keras.Model
    data: object
    validation: object


def _train_phase(run, phase):
    fit, trained, rates = _configure_phase(run, phase)
    backup = resume.ResumableBackup(run.paths.backup_dir(phase.name))
    resumed_at, batches_done = backup.saved_position()
    # A phase --early_stopping ended just before a kill: it is finished from
    # its backup, without training on.
    stopped = (callbacks.early_stop(run.progress, phase, resumed_at - 1, run.early_stopping)
               if resumed_at is not None and not batches_done else None)
    _announce_phase(run, phase, trained, rates, resumed_at, batches_done, stopped)
    watcher = resume.PreemptionWatcher(
        backup if run.backup_on_preemption else None, run.steps_per_epoch)
    extras = _PhaseExtras(
        early_stopping=(callbacks.PhaseEarlyStopping(run.progress, phase,
                                                     run.early_stopping)
                        if run.early_stopping else None),
        ema=callbacks.EmaWeights() if run.compile_settings["ema"] else None)
    phase_callbacks = _callbacks(run, phase, backup, watcher, extras)
    trains_batchnorm = run.train_batchnorm and phase.name != recipe.HEAD_PHASE
    # With --batchnorm=train, the moving statistics follow the weights
    # closely, so that each epoch's validation and the best checkpoint mean
    # something; they are recomputed after the phase. compile_for_phase
    # dropped the traced train step, so fit traces it in this block, with this
    # momentum.
    with (finetune.batchnorm_momentum(run.backbone, finetune.TRACKING_BATCHNORM_MOMENTUM)
          if trains_batchnorm else contextlib.nullcontext()):
        if stopped:
            # No epochs: fit only restores the backup (and with --ema puts
            # the average in the model, as at the end of any fit).
            _fit(run, fit, phase_callbacks, resumed_at, resumed_at, run.steps_per_epoch)
        else:
            _fit_phase(run, phase, fit, phase_callbacks, watcher, extras, resumed_at,
                       batches_done)
    _finish_phase(run, phase, backup, trains_batchnorm,
                  stopped or (extras.early_stopping and extras.early_stopping.stopped))


@dataclasses.dataclass(frozen=True)
class _PhaseExtras:
    """The callbacks of the options a phase may run with; None when off."""

    early_stopping: callbacks.PhaseEarlyStopping | None
    ema: callbacks.EmaWeights | None


def _finish_phase(run, phase, backup, trains_batchnorm, stopped):
    """Records the phase's end: its last epoch's weights, and that it is complete."""
    last_epoch = stopped.epoch if stopped else phase.first_epoch + phase.epochs - 1
    if trains_batchnorm:
        _recompute_statistics(run, phase, last_epoch)
    runstate.save_weights(run.model, run.paths.phase_end_weights(phase.name))
    run.progress.complete_phase(phase.name, last_epoch, stopped)
    backup.delete()


def _configure_phase(run, phase):
    """Sets what the phase trains and compiles for it.

    Returns:
        (`_Fit`, what trains, in words, the `tl_keras.model.layer_decay.LayerRates`
        it trains with or None).
    """
    if phase.name == recipe.HEAD_PHASE:
        finetune.freeze_backbone(run.backbone)
        trained = "the head"
    else:
        unfrozen = finetune.unfreeze_backbone(run.backbone, run.unfreeze,
                                              run.train_batchnorm)
        batchnorm = ("BatchNormalization trains with them" if run.train_batchnorm
                     else "BatchNormalization stays frozen")
        trained = (
            f"the head and {len(unfrozen)} backbone layers "
            f"(--unfreeze={run.unfreeze}; {batchnorm})"
        )
    fit = _Fit(run.model, run.train_batches, run.validation_batches)
    if phase.name == recipe.HEAD_PHASE and run.cached_features:
        # The frozen backbone's features, computed once: the head trains on
        # them, and being the classifier's own layers, trains the classifier.
        cached = run.cached_features()
        fit = _Fit(features.head_of(run.model), cached.train, cached.validation)
        trained = "the head on cached backbone features"
    # Only fine-tuning trains the backbone, whose blocks the decay sets apart.
    rates = (layer_decay.layer_rates(run.backbone, run.layer_decay)
             if phase.name != recipe.HEAD_PHASE and run.layer_decay < 1 else None)
    with run.scope():
        # Recompile after changing `trainable`: the compiled step captures
        # which weights it updates.
        optimization.compile_for_phase(fit.model, phase, steps_per_epoch=run.steps_per_epoch,
                                 rate_factors=rates.factors if rates else None,
                                 **run.compile_settings)
    return fit, trained, rates


def _announce_phase(run, phase, trained, rates, resumed_at, batches_done, stopped):
    last_epoch = phase.first_epoch + phase.epochs
    resuming = ""
    if stopped:
        resuming = f", stopped early after epoch {stopped.epoch + 1}, finishing it"
    elif resumed_at is not None:
        resuming = f", resuming at epoch {resumed_at + 1}" + (
            f", batch {batches_done + 1}" if batches_done else "")
    print(
        f"Phase {phase.name}: epochs {phase.first_epoch + 1}-{last_epoch}{resuming}, "
        f"training {trained}, {_count_trainable(run.model):,} trainable weights, "
        f"learning rate {phase.learning_rate:g}, {run.steps_per_epoch} steps/epoch.",
        flush=True,
    )
    if rates:
        print(rates.describe(phase.learning_rate), flush=True)
    if stopped:
        print(stopped.describe(phase.name), flush=True)


def _callbacks(run, phase, backup, watcher, extras):
    """The phase's callbacks, in the order their work must happen."""
    checkpoint = callbacks.ClassifierCheckpoint(
        run.model,
        run.paths.pending_best_checkpoint,
        monitor="val_top1",
        mode="max",
        save_best_only=True,
        save_weights_only=True,
        # Carried across phases (and restarts) so a later epoch only
        # replaces the checkpoint when it does better.
        initial_value_threshold=run.progress.best_top1,
    )
    return [
        callbacks.StopOnNaN(run.paths),
        callbacks.LearningRateLogger(),
        keras.callbacks.TensorBoard(
            run.paths.tensorboard,
            profile_batch=(run.profile_batches or 0) if not run.progress.phases else 0,
        ),
        checkpoint,
        callbacks.HistoryWriter(run.paths.history, phase.name),
        callbacks.ProgressWriter(run.progress, phase.name, checkpoint, run.paths),
        # After ProgressWriter, which records the top-1 it decides by.
        *([extras.early_stopping] if extras.early_stopping else []),
        # After every callback that saves the average weights, before the
        # backup, which saves the raw ones; and before the phase's own, whose
        # on_train_end predicts with the weights the phase ends with.
        *([extras.ema] if extras.ema else []),
        *(run.phase_callbacks(phase) if run.phase_callbacks else []),
        # After every callback that records the epoch, so that a kill
        # never leaves a backup of an epoch that history.csv or
        # progress.json lack. (Its restore, in on_train_begin, still comes
        # before any epoch starts.)
        backup,
        # After every callback that records, so that an epoch it stops at is
        # recorded by all of them.
        watcher,
        # Where fit would put its own, which this one replaces.
        callbacks.PhaseProgbar(phase),
    ]


def _fit_phase(run, phase, fit, phase_callbacks, watcher, extras, resumed_at,
               batches_done):
    last_epoch = phase.first_epoch + phase.epochs
    if batches_done:
        # A SIGTERM stopped this epoch part-way: train only its remaining
        # batches, so the optimizer's step count (and with it the
        # learning-rate schedule) goes on exactly as it would have.
        watcher.batches_before = batches_done
        _fit(run, fit, phase_callbacks, resumed_at, resumed_at + 1,
             run.steps_per_epoch - batches_done)
        watcher.batches_before = 0
        if extras.early_stopping and extras.early_stopping.stopped:
            return
    if not batches_done or resumed_at + 1 < last_epoch:
        _fit(run, fit, phase_callbacks, phase.first_epoch, last_epoch, run.steps_per_epoch)


def _fit(run, fit, phase_callbacks, first_epoch, end_epoch, steps):
    fit.model.fit(
        fit.data, validation_data=fit.validation, initial_epoch=first_epoch,
        epochs=end_epoch, steps_per_epoch=steps, callbacks=phase_callbacks,
        # The input pipeline shuffles; fit can't shuffle a dataset.
        shuffle=False, verbose=run.verbose,
    )


def _recompute_statistics(run, phase, last_epoch):
    """With --batchnorm=train: the phase's last epoch, validated again with
    recomputed statistics, competes for the best checkpoint."""
    progress = run.progress
    validation = finetune.recompute_statistics_and_validate(
        run.model, run.backbone, run.train_batches, run.validation_batches,
        progress.phases[phase.name]["validation"]["top1"])
    progress.record_validation(phase.name, validation)
    if validation["top1"] > (progress.best_top1 or 0.0):
        # Validated with its own statistics, the last epoch can beat the epoch
        # chosen on statistics that lagged the weights.
        run.model.save_weights(run.paths.pending_best_checkpoint)
        progress.record_best(phase.name, last_epoch, validation,
                             statistics_recomputed=True)
        runstate.promote_pending_best(progress, run.paths)


def _count_trainable(model):
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)
