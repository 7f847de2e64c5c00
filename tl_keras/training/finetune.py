"""Fine-tuning a backbone: which layers train, and BatchNormalization's care.

Backend-agnostic: only `keras`. The head phase freezes the whole backbone;
fine-tuning unfreezes its top layers (`--unfreeze`), keeping BatchNormalization
frozen unless `--batchnorm=train`, which then needs its momentum lowered while
it trains and its statistics recomputed after.
"""

import contextlib
import difflib

import keras

from tl_keras import progress
from tl_keras.errors import UsageError
from tl_keras.training import optimization

# BatchNormalization momentum while it trains (--batchnorm=train): the moving
# statistics then average about the last ten batches, PyTorch's default.
TRACKING_BATCHNORM_MOMENTUM = 0.9

# Batches averaged when re-estimating BatchNormalization statistics after
# training from scratch: thousands of images, a fraction of an epoch's cost.
BATCHNORM_STATISTICS_BATCHES = 100


def freeze_backbone(backbone):
    """Freezes every backbone weight for the head phase."""
    backbone.trainable = False


def unfreeze_backbone(backbone, unfreeze, train_batchnorm=False):
    """Unfreezes the backbone's top layers for fine-tuning.

    Unless `train_batchnorm`, BatchNormalization layers stay frozen whatever
    `unfreeze` says, so their statistics and affine weights keep the values
    they were trained with.

    Args:
        backbone: a model from `tl_keras.model.backbones.build_backbone`.
        unfreeze: `all`; a number N, to unfreeze the top N layers; or the name of
            the first layer to unfreeze, which unfreezes it and every layer after.
        train_batchnorm: unfreeze the BatchNormalization layers in that range
            too, for a backbone trained from scratch, whose initial statistics
            (mean 0, variance 1) normalise nothing.

    Returns:
        The names of the layers that now hold trainable weights.

    Raises:
        UsageError: for a layer name the backbone doesn't have.
    """
    first = first_unfrozen_layer_index(backbone, unfreeze)
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        frozen = index < first or (
            not train_batchnorm and isinstance(layer, keras.layers.BatchNormalization))
        layer.trainable = not frozen
    return [
        layer.name
        for layer in backbone.layers
        if layer.trainable and layer.trainable_weights
    ]


def first_unfrozen_layer_index(backbone, unfreeze):
    """Resolves `--unfreeze` to the index of the first layer to unfreeze.

    Args:
        backbone: a model from `tl_keras.model.backbones.build_backbone`.
        unfreeze: `all`, a positive number of top layers, or a layer name.

    Returns:
        An index into `backbone.layers`.

    Raises:
        UsageError: for a layer name the backbone doesn't have, listing the
            closest names.
    """
    layers = backbone.layers
    if unfreeze == "all":
        return 0
    if unfreeze.isdigit():
        return max(len(layers) - int(unfreeze), 0)
    names = [layer.name for layer in layers]
    if unfreeze in names:
        return names.index(unfreeze)
    closest = difflib.get_close_matches(unfreeze, names, n=5, cutoff=0.6)
    hint = f" Closest: {', '.join(closest)}." if closest else ""
    raise UsageError(
        f"--unfreeze={unfreeze}: {backbone.name} has no layer of that name.{hint} "
        f"Pass all, a number of top layers, or a layer name from "
        f"{names[1]} to {names[-1]}."
    )


def recompute_batchnorm_statistics(classifier, backbone, image_batches):
    """Sets the trainable BatchNormalization layers' moving statistics to the
    plain average of their batch statistics over `image_batches`.

    The moving averages kept during training mix in statistics of earlier
    weights, which change fast when training from random initialisation, and
    after only a few hundred steps they still hold part of their initial mean 0
    and variance 1 (momentum 0.99: 0.99**160 is about 0.2). A network trained
    from scratch on a small dataset can then predict well in training mode and
    near chance in inference mode. One
    pass with the final weights fixes that ("precise BatchNorm", Wu and
    Johnson, 2021); nothing but the moving statistics changes.

    Args:
        classifier: a model from
            `tl_keras.model.classifier.build_classifier(..., train_batchnorm=True)`.
        backbone: the backbone inside it.
        image_batches: an iterable of uint8 image batches, e.g. training batches.

    Returns:
        The number of batches averaged; 0 when there are no trainable
        BatchNormalization layers, which are then left alone.
    """
    layers = _trainable_batchnorm_layers(backbone)
    if not layers:
        return 0
    count = 0
    # The block restores each layer's own momentum; inside it, momentum
    # (i - 1) / i makes the moving statistic the running mean of the first i
    # batches' statistics, and the first batch (momentum 0) replaces it.
    with batchnorm_momentum(backbone, 0.0):
        for count, images in enumerate(image_batches, start=1):
            for layer in layers:
                layer.momentum = (count - 1) / count
            classifier(images, training=True)
    return count


def _trainable_batchnorm_layers(backbone):
    return [layer for layer in backbone.layers
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


@contextlib.contextmanager
def batchnorm_momentum(backbone, momentum):
    """Sets the trainable BatchNormalization layers' momentum for a while.

    While BatchNormalization trains, above all from scratch, the moving
    statistics should follow the fast-moving weights, or each epoch's
    validation runs on statistics of weights long gone: at Keras
    Applications' momentum of 0.99 or 0.999, a few hundred steps leave a large
    part of the initial mean 0 and variance 1 in them. Only the moving
    statistics depend on momentum; training-mode outputs, and so the weights'
    updates, do not. The momentum is read when the train step is traced, so
    the model must trace it inside the `with` block (compile drops a traced
    step).

    Args:
        backbone: a model from `tl_keras.model.backbones.build_backbone`.
        momentum: the momentum to use inside the `with` block.
    """
    layers = _trainable_batchnorm_layers(backbone)
    momentums = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = momentum
        yield
    finally:
        for layer, original in zip(layers, momentums):
            layer.momentum = original


def recompute_statistics_and_validate(model, backbone, train_batches, validation_batches,
                                      validated_top1=None):
    """With `--batchnorm=train`: `recompute_batchnorm_statistics` over the first
    training batches, shown as a step of its own.

    Validates again, since validation until now ran with the old statistics.

    Returns:
        The validation metrics with the new statistics.
    """
    batches = train_batches.take(BATCHNORM_STATISTICS_BATCHES)
    with progress.step("Recomputing BatchNormalization statistics",
                       _known_length(batches), unit="batch") as recomputing:

        def images():
            # A batch may carry sample weights (--class_weight) after its labels.
            for batch in batches.as_numpy_iterator():
                yield batch[0]
                recomputing.advance()

        used = recompute_batchnorm_statistics(model, backbone, images())
        validation = optimization.validation_metrics(
            model.evaluate(validation_batches, return_dict=True, verbose=0))
        change = f" (was {validated_top1:.2%})" if validated_top1 is not None else ""
        recomputing.result = (
            f"Recomputed BatchNormalization statistics over {used} training batches "
            f"with these weights: validation top-1 {validation['top1']:.2%}{change}")
    return validation


def _known_length(batches):
    """The number of batches, or None when the dataset can't say."""
    try:
        return len(batches)
    except TypeError:
        return None
