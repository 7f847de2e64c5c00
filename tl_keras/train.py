"""Two-phase training: the head on a frozen backbone, then fine-tuning.

Backend-agnostic: only `keras`. The caller passes a `scope` (the distribution
strategy's) inside which both compiles run, so the optimizer's variables are
created where the model's are.
"""

import csv
import dataclasses
import math
import os

import keras

from tl_keras import model as model_lib
from tl_keras.errors import UsageError

HEAD_PHASE = "head"
FINETUNE_PHASE = "finetune"


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """What one phase trains and how.

    Attributes:
        name: `head` or `finetune`.
        first_epoch: the epoch index the phase starts at; phases share one
            timeline, so fine-tuning starts at the number of head epochs.
        epochs: how many epochs the phase runs (may be 0).
        learning_rate: the peak learning rate.
        warmup_epochs: epochs of linear warmup before cosine decay; None keeps
            the learning rate constant.
    """

    name: str
    first_epoch: int
    epochs: int
    learning_rate: float
    warmup_epochs: int | None


def plan_phases(*, head_epochs, head_learning_rate, finetune_epochs,
                finetune_learning_rate, warmup_epochs):
    """Lays out the two phases on one epoch timeline.

    Returns:
        A list of two `PhasePlan`s, head then fine-tuning.
    """
    return [
        PhasePlan(HEAD_PHASE, 0, head_epochs, head_learning_rate, None),
        PhasePlan(FINETUNE_PHASE, head_epochs, finetune_epochs,
                  finetune_learning_rate, warmup_epochs),
    ]


def learning_rate_schedule(phase, steps_per_epoch):
    """The phase's learning rate: constant, or linear warmup then cosine decay.

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.
    """
    if phase.warmup_epochs is None:
        return phase.learning_rate
    warmup_steps = phase.warmup_epochs * steps_per_epoch
    decay_steps = max(phase.epochs * steps_per_epoch - warmup_steps, 1)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(phase.learning_rate, decay_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=decay_steps,
        warmup_target=phase.learning_rate,
        warmup_steps=warmup_steps,
    )


def make_optimizer(name, learning_rate, weight_decay):
    """Creates the optimizer named by `--optimizer`.

    Weight decay skips biases and normalisation parameters, whose decay only
    pulls the network away from its pretrained operating point.

    Args:
        name: `adamw`, `adam`, `sgd` (Nesterov momentum 0.9) or `rmsprop`.
        learning_rate: a float or a schedule.
        weight_decay: the decoupled weight decay coefficient; 0 for none.

    Returns:
        A `keras.optimizers.Optimizer`.
    """
    decay = weight_decay or None
    if name == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    elif name == "adam":
        optimizer = keras.optimizers.Adam(learning_rate, weight_decay=decay)
    elif name == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=0.9, nesterov=True, weight_decay=decay
        )
    elif name == "rmsprop":
        optimizer = keras.optimizers.RMSprop(learning_rate, weight_decay=decay)
    else:
        raise ValueError(f"Unknown optimizer: {name!r}")
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def compile_for_phase(model, phase, *, steps_per_epoch, optimizer, weight_decay,
                      label_smoothing, num_classes, jit_compile):
    """Compiles the model for one phase (after its trainable flags are set)."""
    model.compile(
        optimizer=make_optimizer(
            optimizer, learning_rate_schedule(phase, steps_per_epoch), weight_decay
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
        jit_compile=jit_compile,
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


class HistoryWriter(keras.callbacks.Callback):
    """Appends one row per completed epoch, with its phase, to a CSV file.

    The header is written once, from the first epoch's log keys, so both phases
    share one file and one timeline.
    """

    def __init__(self, path, phase):
        super().__init__()
        self.path = path
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, "phase": self.phase, **(logs or {})}
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
    def history(self):
        return os.path.join(self.model_dir, "history.csv")

    @property
    def training_curves(self):
        return os.path.join(self.model_dir, "plots", "training_curves.png")


def train_two_phases(model, backbone, *, train_batches, validation_batches,
                     steps_per_epoch, phases, unfreeze, optimizer, weight_decay,
                     label_smoothing, num_classes, jit_compile, scope, paths,
                     phase_callbacks=None, profile_batches=None, verbose="auto"):
    """Trains the head on the frozen backbone, then fine-tunes.

    Args:
        model: the classifier from `tl_keras.model.build_classifier`.
        backbone: the backbone inside it.
        train_batches: training batches, repeated if `steps_per_epoch` caps them.
        validation_batches: validation batches, read in full after each epoch.
        steps_per_epoch: training steps per epoch.
        phases: the two `PhasePlan`s from `plan_phases`.
        unfreeze: `--unfreeze`, see `tl_keras.model.unfreeze_backbone`.
        optimizer, weight_decay, label_smoothing, jit_compile: compile settings.
        num_classes: the number of classes, for top-5 on fewer classes.
        scope: returns a context manager (the strategy's scope) for compiling.
        paths: `RunPaths`.
        phase_callbacks: optional function from a `PhasePlan` to more callbacks
            for that phase.
        profile_batches: optional (first, last) batch of the first phase to
            write a profiler trace for.
        verbose: `model.fit`'s verbosity.

    Returns:
        A dict from phase name to its last epoch's validation metrics
        (`{"loss", "top1", "top5"}`); phases with no epochs are left out.
    """
    os.makedirs(os.path.dirname(paths.best_checkpoint), exist_ok=True)
    validation_by_phase = {}
    best_top1 = None
    for phase in phases:
        if phase.epochs == 0:
            continue
        if phase.name == HEAD_PHASE:
            model_lib.freeze_backbone(backbone)
            trained = "the head"
        else:
            unfrozen = model_lib.unfreeze_backbone(backbone, unfreeze)
            trained = (
                f"the head and {len(unfrozen)} backbone layers "
                f"(--unfreeze={unfreeze}; BatchNormalization stays frozen)"
            )
        with scope():
            # Recompile after changing `trainable`: the compiled step captures
            # which weights it updates.
            compile_for_phase(
                model, phase, steps_per_epoch=steps_per_epoch, optimizer=optimizer,
                weight_decay=weight_decay, label_smoothing=label_smoothing,
                num_classes=num_classes, jit_compile=jit_compile,
            )
        last_epoch = phase.first_epoch + phase.epochs
        print(
            f"Phase {phase.name}: epochs {phase.first_epoch + 1}-{last_epoch}, "
            f"training {trained}, {_count_trainable(model):,} trainable weights, "
            f"learning rate {phase.learning_rate:g}, {steps_per_epoch} steps/epoch.",
            flush=True,
        )
        checkpoint = keras.callbacks.ModelCheckpoint(
            paths.best_checkpoint,
            monitor="val_top1",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            # Carried across phases so fine-tuning only replaces the head
            # phase's checkpoint when it does better.
            initial_value_threshold=best_top1,
        )
        history = model.fit(
            train_batches,
            validation_data=validation_batches,
            initial_epoch=phase.first_epoch,
            epochs=last_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=[
                LearningRateLogger(),
                keras.callbacks.TensorBoard(
                    paths.tensorboard,
                    profile_batch=(profile_batches or 0) if not validation_by_phase else 0,
                ),
                checkpoint,
                HistoryWriter(paths.history, phase.name),
                *(phase_callbacks(phase) if phase_callbacks else []),
            ],
            verbose=verbose,
        )
        best_top1 = checkpoint.best
        validation_by_phase[phase.name] = {
            name: float(history.history[f"val_{name}"][-1])
            for name in ("loss", "top1", "top5")
        }
    return validation_by_phase


def steps_per_epoch(num_examples, batch_size, cap):
    """Training steps per epoch: full batches only, optionally capped.

    Raises:
        UsageError: when there are fewer examples than one batch.
    """
    full = num_examples // batch_size
    if full == 0:
        raise UsageError(
            f"{num_examples} training examples make no full batch of "
            f"--batch_size={batch_size}; pass a smaller batch size."
        )
    return min(full, cap) if cap else full


def _count_trainable(model):
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)
