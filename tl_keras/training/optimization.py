"""How a phase optimizes: its learning-rate schedule, its optimizer, and the
loss and metrics the model is compiled with.

Backend-agnostic: only `keras`.
"""

import keras

from tl_keras.model import layer_decay


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


def make_optimizer(name, learning_rate, weight_decay, *, ema=0.0, rate_factors=None):
    """Creates the optimizer named by `--optimizer`.

    Weight decay skips biases and normalisation parameters, whose decay only
    pulls the network away from its pretrained operating point.

    Args:
        name: `adamw`, `adam`, `sgd` (Nesterov momentum 0.9) or `rmsprop`.
        learning_rate: a float or a schedule.
        weight_decay: the decoupled weight decay coefficient; 0 for none.
        ema: `--ema`: the momentum of an exponential moving average of the
            trained weights, kept by the optimizer (Keras' `use_ema`); 0, the
            default, for none. `tl_keras.training.callbacks.EmaWeights` puts it in the
            model for validation and checkpoints.
        rate_factors: `--layer_decay`'s factors on the learning rate, from
            `tl_keras.model.layer_decay.LayerRates`; None, the default, for none.

    Returns:
        A `keras.optimizers.Optimizer`.
    """
    decay = weight_decay or None
    classes = layer_decay.OPTIMIZERS if rate_factors is not None else _OPTIMIZERS
    if name not in classes:
        raise ValueError(f"Unknown optimizer: {name!r}")
    settings = dict(weight_decay=weight_decay if name == "adamw" else decay)
    if name == "sgd":
        settings.update(momentum=0.9, nesterov=True)
    if ema:
        settings.update(use_ema=True, ema_momentum=ema)
    if rate_factors is not None:
        settings.update(rate_factors=rate_factors)
    optimizer = classes[name](learning_rate, **settings)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


_OPTIMIZERS = {"adamw": keras.optimizers.AdamW, "adam": keras.optimizers.Adam,
               "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}


def compile_for_phase(model, phase, *, steps_per_epoch, optimizer, weight_decay,
                      label_smoothing, num_classes, jit_compile, ema=0.0,
                      rate_factors=None):
    """Compiles the model for one phase (after its trainable flags are set).

    `ema` and `rate_factors` are as for `make_optimizer`.
    """
    model.compile(
        optimizer=make_optimizer(
            optimizer, learning_rate_schedule(phase, steps_per_epoch), weight_decay,
            ema=ema, rate_factors=rate_factors,
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=classification_metrics(num_classes),
        jit_compile=jit_compile,
    )
    build_optimizer(model)


def build_optimizer(model):
    """Creates the compiled optimizer's variables now, before fit traces the
    train step.

    Keras builds the optimizer before that trace only under a distribution
    strategy of its own; otherwise the first trace creates the variables, and
    TensorFlow then traces the step a second time, so each phase waited about
    twice as long for its first step (`benchmarks/phase_start.py`). The
    variables are the ones the first step would create, in the same order.
    """
    model.optimizer.build(model.trainable_variables)


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
    `nll`, which is computed without smoothing (`tl_keras.outputs.evaluate`).
    """
    return {"top1": float(results[f"{prefix}top1"]),
            "top5": float(results[f"{prefix}top5"]),
            "label_smoothed_loss": float(results[f"{prefix}loss"])}
