"""Training, start to finish: the stages joined in data-flow order.

sources -> pipeline -> backbones -> classifier -> recipe -> train -> evaluate
-> export, each a plain function of the one before; `tl_keras.cli.assembly`
builds the first four from the config, and `tl_keras.cli.finish` does what
follows training. The other modes are in `tl_keras.cli.modes`.
"""

import dataclasses
import json

import keras

from tl_keras import rundir
from tl_keras.cli import assembly
from tl_keras.cli import finish
from tl_keras.data import pipeline
from tl_keras.data import unlabeled
from tl_keras.errors import UsageError
from tl_keras.model import features
from tl_keras.outputs import onnx_export
from tl_keras.outputs import plots
from tl_keras.training import callbacks
from tl_keras.training import distribute
from tl_keras.training import monitor
from tl_keras.training import recipe
from tl_keras.training import self_training
from tl_keras.training import train


def run_training(config, flagfile_text="", verbose="auto", overwrite=False,
                 given_flags=frozenset(), flag_defaults=""):
    """Trains, evaluates and exports one model as `config` says.

    Everything that can fail on bad input (flags, replicas, dataset, weights,
    `--unfreeze`, `--export_onnx`'s packages and backend) is checked before the
    first training step.

    Args:
        config: a `tl_keras.config.Config`.
        flagfile_text: the effective flags, written to `flags.txt` for reruns.
        verbose: `model.fit`'s verbosity.
        overwrite: start afresh in a `--model_dir` that holds an earlier run.
        given_flags: the options given explicitly, which `--recipe=auto` keeps.
        flag_defaults: every flag at its default, as `flags.txt` writes it, so
            that a run made before a flag existed resumes with it at its
            default (`tl_keras.cli.flags.defaults_flagfile`).

    Returns:
        The metrics written to `metrics.json`.

    Raises:
        UsageError: for bad input, found before training starts.
        tl_keras.errors.Preempted: on SIGTERM, after saving a backup (on one
            machine; see `tl_keras.training.train.train_two_phases`).
    """
    refusal = config.export_onnx and onnx_export.refusal(config.backbone,
                                                         keras.config.backend())
    if refusal:
        raise UsageError(refusal)
    strategy, backbone = assembly.strategy_and_backbone(config)
    role = distribute.worker_role(strategy)
    config = _this_workers_config(config, role)
    splits = None
    if config.recipe == "auto":
        # Its choices depend on the training set's size and go into flags.txt,
        # which a rerun's flags must match to resume: so the data is read
        # before the folder is claimed, and a rerun on the same data resumes.
        splits = assembly.load_splits(config)
        config, flagfile_text = assembly.apply_auto_recipe(
            config, flagfile_text, splits, given_flags)
    with rundir.claim(config.model_dir, flagfile_text, overwrite, flag_defaults) as state:
        if role.num_workers > 1:
            state = distribute.agreed_state(strategy, role, config.model_dir, state)
        if state == rundir.COMPLETE:
            return _already_complete(config, role)
        if state == rundir.RESUME:
            print(f"Resuming the interrupted run in {config.model_dir}.", flush=True)
        else:
            print(f"Run folder: {config.model_dir}", flush=True)
        metrics = _train_evaluate_export(config, strategy, role, backbone, flagfile_text,
                                         state, verbose, splits)
        rundir.mark_complete(config.model_dir)
        if not role.is_chief:
            rundir.discard_worker_outputs(config.model_dir)
        return metrics


def _this_workers_config(config, role):
    """`config`, with a folder of its own for a worker that isn't the chief."""
    if role.num_workers > 1 and role.is_chief:
        print(f"The chief writes the run's outputs to {config.model_dir}; the other "
              f"workers write to places of their own under it and delete them at the end.",
              flush=True)
    if not role.is_chief:
        # Every worker runs every step and save, in sync; only the chief's
        # outputs are the run's.
        config = dataclasses.replace(
            config, model_dir=rundir.worker_dir(config.model_dir, role.name))
        print(f"The chief writes the run's outputs; this worker writes to "
              f"{config.model_dir} and deletes it at the end.", flush=True)
    return config


def _already_complete(config, role):
    print(f"{config.model_dir} holds a complete run; nothing to do. Pass "
          f"--overwrite to train it again from scratch.", flush=True)
    if not role.is_chief:
        # The chief's run is complete, whatever a kill left here.
        rundir.mark_complete(config.model_dir)
        rundir.discard_worker_outputs(config.model_dir)
        return {}
    with open(rundir.RunPaths(config.model_dir).metrics) as file:
        return json.load(file)


def _train_evaluate_export(config, strategy, role, backbone, flagfile_text, state,
                           verbose, splits=None):
    splits = splits or assembly.load_splits(config)
    class_weights = assembly.class_weights(config, splits)
    steps = recipe.training_steps_per_epoch(
        splits.sizes["train"], config.batch_size, config.steps_per_epoch
    )
    train_batches = assembly.training_batches(config, splits,
                                      repeat=config.steps_per_epoch is not None,
                                      class_weights=class_weights)
    validation_batches = pipeline.split_batches(config, splits, "validation")
    pool = _unlabeled_pool(config, splits)
    classifier = assembly.build_classifier(config, strategy, backbone, splits)

    paths, run_log = _start_writing(config, state, flagfile_text, splits, train_batches)
    phases = _plan_phases(config)
    timers = {phase.name: callbacks.PhaseTimer() for phase in phases}
    rounds = None if pool is None else self_training.Rounds(
        model=classifier, pool=pool, splits=splits, paths=paths, config=config)
    validation_by_phase = train.train_two_phases(
        classifier, backbone,
        train_batches=train_batches,
        validation_batches=validation_batches,
        steps_per_epoch=steps,
        phases=phases,
        unfreeze=config.unfreeze,
        train_batchnorm=config.batchnorm == "train",
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        num_classes=splits.num_classes,
        jit_compile=assembly.jit_compile(config.jit_compile),
        scope=strategy.scope,
        paths=paths,
        layer_decay=config.layer_decay,
        ema=config.ema,
        early_stopping=config.early_stopping,
        phase_callbacks=lambda phase: [
            timers[phase.name],
            monitor.PhaseMonitor(run_log, phase,
                                 rounds.steps.get(phase.name, steps) if rounds else steps,
                                 validation_batches, splits.class_names, classifier)],
        profile_batches=config.profile_batches,
        cached_features=(
            (lambda: _cache_features(config, classifier, splits, paths, class_weights))
            if config.cache_features else None
        ),
        phase_inputs=rounds,
        backup_on_preemption=role.num_workers == 1,
        verbose=verbose,
    )
    plots.write_training_curves(paths.history, paths.training_curves, config.head_epochs)
    return finish.evaluate_and_export(
        config, strategy, role, classifier, backbone, splits, phases, paths, run_log,
        timers, train_batches, validation_batches, validation_by_phase)


def _start_writing(config, state, flagfile_text, splits, train_batches):
    """The run's first files: flags.txt (for a fresh run), class_names.json, and
    TensorBoard's HParams and training inputs.

    Returns:
        (the `tl_keras.rundir.RunPaths`, the `tl_keras.training.monitor.RunLog`).
    """
    paths = rundir.RunPaths(config.model_dir)
    if state == rundir.FRESH:
        with open(paths.flags, "w") as file:
            file.write(flagfile_text)
    with open(paths.class_names, "w") as file:
        json.dump(list(splits.class_names), file)
    run_log = monitor.RunLog(paths.tensorboard)
    run_log.hparams(config)
    run_log.training_inputs(train_batches, splits.class_names)
    return paths, run_log


def _unlabeled_pool(config, splits):
    """--unlabeled's images, checked before anything is written or trained, so
    that a bad pool stops the run first; None without self-training."""
    if not config.self_training_rounds:
        return None
    return unlabeled.load_pool(config.unlabeled, splits, dataset=config.dataset,
                               data_dir=config.data_dir, image_size=config.image_size,
                               resize=config.resize, strict=config.strict_data)


def _plan_phases(config):
    """The two phases and the self-training rounds, their learning rates
    scaled as --lr_scaling says."""
    scale = recipe.learning_rate_scale(config.batch_size, config.lr_scaling)
    if scale != 1:
        print(f"Learning rates scaled linearly to the global batch of {config.batch_size} "
              f"(x{scale:g} of their values for {recipe.LINEAR_SCALING_REFERENCE_BATCH}): "
              f"head {config.head_learning_rate * scale:g}, fine-tuning "
              f"{config.finetune_learning_rate * scale:g}" + (
                  f", self-training {config.self_training_learning_rate * scale:g}"
                  if config.self_training_rounds else "") + ".", flush=True)
    return recipe.plan_phases(
        head_epochs=config.head_epochs,
        head_learning_rate=config.head_learning_rate * scale,
        finetune_epochs=config.finetune_epochs,
        finetune_learning_rate=config.finetune_learning_rate * scale,
        warmup_epochs=config.warmup_epochs,
    ) + recipe.plan_self_training(
        first_epoch=config.head_epochs + config.finetune_epochs,
        rounds=config.self_training_rounds, epochs=config.self_training_epochs,
        learning_rate=config.self_training_learning_rate * scale,
        warmup_epochs=config.warmup_epochs,
    )


def _cache_features(config, classifier, splits, paths, class_weights):
    return features.cache_features(
        classifier, batches_of=lambda split: pipeline.split_batches(config, splits, split),
        sizes=splits.sizes, num_classes=splits.num_classes,
        batch_size=config.batch_size, seed=config.seed, directory=paths.features,
        class_weights=class_weights)
