"""The training recipe: the two phases, their optimizer, learning rates,
loss and metrics.

Backend-agnostic: only `keras`. Plain values and functions: `tl_keras.train`
runs the phases this module lays out.
"""

import dataclasses

import keras
import numpy as np

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
    warmup_epochs: float | None


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


# The batch that --lr_scaling=linear takes the learning rates to be for, as in
# "Accurate, Large Minibatch SGD" (Goyal et al., 2017).
LINEAR_SCALING_REFERENCE_BATCH = 256


def learning_rate_scale(batch_size, scaling):
    """The factor on the learning rates: 1 for `none`; batch_size/256 for `linear`."""
    if scaling == "linear":
        return batch_size / LINEAR_SCALING_REFERENCE_BATCH
    return 1.0


def training_steps_per_epoch(num_examples, batch_size, cap):
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


def balanced_class_weights(counts):
    """`--class_weight=balanced`: scikit-learn's weights, n_examples /
    (n_classes * count), over the classes that have training examples.

    Every class then carries the same share of the training loss, and the
    weights average 1 over the training examples, so the loss keeps its scale
    (and the learning rates their meaning). A class without training examples
    weighs 0; no training example ever has it.

    Args:
        counts: the number of training examples of each class, by label.

    Returns:
        float32 `[classes]`.
    """
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def describe_class_weights(weights, counts, class_names):
    """The weights as the run prints them, e.g. `cat 0.55, dog 5.50`."""
    if len({count for count in counts if count}) == 1:
        return "1 for every class (each has the same number of training examples)"
    return ", ".join(
        f"{name} {weight:.2f}" if count else f"{name} 0 (no training examples)"
        for name, weight, count in zip(class_names, weights, counts))


def learning_rate_schedule(phase, steps_per_epoch):
    """The phase's learning rate: constant, or linear warmup then cosine decay.

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.
    """
    if phase.warmup_epochs is None:
        return phase.learning_rate
    warmup_steps = int(round(phase.warmup_epochs * steps_per_epoch))
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
        metrics=classification_metrics(num_classes),
        jit_compile=jit_compile,
    )


def compile_for_evaluation(model, label_smoothing):
    """Compiles a model that was never compiled, so that it can validate."""
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=classification_metrics(model.output_shape[-1]))


def classification_metrics(num_classes):
    """Top-1 and top-5 accuracy (top-k with k at most the number of classes)."""
    return [keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5")]


def validation_metrics(results, prefix=""):
    """Keras' validation results under the names metrics.json uses.

    Keras' `loss` is the compiled loss: cross-entropy against labels smoothed
    by --label_smoothing. It is named for that, apart from the test split's
    `nll`, which is computed without smoothing (`tl_keras.evaluate`).
    """
    return {"top1": float(results[f"{prefix}top1"]),
            "top5": float(results[f"{prefix}top5"]),
            "label_smoothed_loss": float(results[f"{prefix}loss"])}
