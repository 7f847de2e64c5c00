"""The training recipe: the phases on one epoch timeline, their learning
rates scaled to the batch, the steps of an epoch, and the class weights.

Plain values and functions: `tl_keras.training.train` runs the phases this
module lays out, `tl_keras.training.optimization` compiles each, and
`tl_keras.training.auto_recipe` chooses the epochs by the dataset's size.
"""

import dataclasses

import numpy as np

from tl_keras.errors import UsageError

HEAD_PHASE = "head"
FINETUNE_PHASE = "finetune"
# Self-training round N's phase is self_training_N (tl_keras.training.self_training).
SELF_TRAINING_PHASE_PREFIX = "self_training_"


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """What one phase trains and how.

    Attributes:
        name: `head`, `finetune`, or `self_training_N` for self-training round N.
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


def plan_self_training(*, first_epoch, rounds, epochs, learning_rate, warmup_epochs):
    """Lays out the self-training rounds on the same timeline, after the two phases.

    Each round warms up for `warmup_epochs`, but at most half the round, so
    that a short round still decays.

    Returns:
        A list of `rounds` `PhasePlan`s named `self_training_1`, ...
    """
    return [
        PhasePlan(self_training_phase(number), first_epoch + (number - 1) * epochs, epochs,
                  learning_rate, min(warmup_epochs, epochs / 2))
        for number in range(1, rounds + 1)
    ]


def self_training_phase(round_number):
    return f"{SELF_TRAINING_PHASE_PREFIX}{round_number}"


def self_training_round(phase_name):
    """The round number of a self-training phase's name; None for another phase."""
    if not phase_name.startswith(SELF_TRAINING_PHASE_PREFIX):
        return None
    return int(phase_name[len(SELF_TRAINING_PHASE_PREFIX):])


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
