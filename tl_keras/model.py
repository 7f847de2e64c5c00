"""The classifier: a Keras Applications backbone under a new Dense head.

Backend-agnostic: only `keras` and `keras.ops`, so any Keras backend runs it.

The model takes uint8 RGB images of any height and width. Resizing and the
backbone's own preprocessing run inside it, so an exported model needs nothing
re-implemented outside, and the input pipeline can ship small uint8 images to
the accelerator, which resizes them cheaply.
"""

import contextlib
import dataclasses
import difflib
import os
import warnings

import keras
from keras import ops

from tl_keras.errors import UsageError

# Input sizes the ImageNet weights were trained at, from the Keras Applications
# documentation; every backbone not listed here was trained at 224.
_NATIVE_IMAGE_SIZES = {
    "efficientnetb1": 240,
    "efficientnetb2": 260,
    "efficientnetb3": 300,
    "efficientnetb4": 380,
    "efficientnetb5": 456,
    "efficientnetb6": 528,
    "efficientnetb7": 600,
    "efficientnetv2b1": 240,
    "efficientnetv2b2": 260,
    "efficientnetv2b3": 300,
    "efficientnetv2s": 384,
    "efficientnetv2m": 480,
    "efficientnetv2l": 480,
    "inceptionv3": 299,
    "inceptionresnetv2": 299,
    "xception": 299,
    "nasnetlarge": 331,
}
_DEFAULT_NATIVE_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one Keras Applications backbone.

    Attributes:
        name: the lower-case name used on the command line, e.g. `resnet50`.
        constructor: the `keras.applications` function, e.g. `ResNet50`.
        preprocess_input: the family's `preprocess_input` function.
        native_image_size: the input size its ImageNet weights were trained at.
    """

    name: str
    constructor: object
    preprocess_input: object
    native_image_size: int


def _discover_backbones():
    """Finds every backbone `keras.applications` offers, keyed by lower-case name."""
    specs = {}
    for attribute in dir(keras.applications):
        constructor = getattr(keras.applications, attribute)
        if not (attribute[:1].isupper() and callable(constructor)):
            continue
        # Each constructor lives in its family's module (`...applications.resnet`),
        # which also holds that family's `preprocess_input`.
        family = constructor.__module__.rsplit(".", 1)[-1]
        family_module = getattr(keras.applications, family, None)
        if family_module is None or not hasattr(family_module, "preprocess_input"):
            continue
        name = attribute.lower()
        specs[name] = BackboneSpec(
            name=name,
            constructor=constructor,
            preprocess_input=family_module.preprocess_input,
            native_image_size=_NATIVE_IMAGE_SIZES.get(
                name, _DEFAULT_NATIVE_IMAGE_SIZE
            ),
        )
    return specs


_BACKBONES = _discover_backbones()


def available_backbones():
    """Returns the sorted lower-case names that `--backbone` accepts."""
    return sorted(_BACKBONES)


def backbone_spec(name):
    """Looks up a backbone by name, case-insensitively.

    Args:
        name: a Keras Applications model name, e.g. `ResNet50` or `resnet50`.

    Returns:
        Its `BackboneSpec`.

    Raises:
        UsageError: for an unknown name, listing the closest known names.
    """
    spec = _BACKBONES.get(name.lower())
    if spec is None:
        closest = difflib.get_close_matches(name.lower(), _BACKBONES, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(closest)}." if closest else ""
        raise UsageError(
            f"Unknown backbone {name!r}.{hint} Available: "
            f"{', '.join(available_backbones())}."
        )
    return spec


@keras.saving.register_keras_serializable(package="tl_keras")
class ImagePreprocessing(keras.layers.Layer):
    """Turns uint8 RGB images of any size into the backbone's expected input.

    Resizes to `image_size`, rounding to whole uint8 levels, and applies the
    backbone family's own `preprocess_input`. It computes in float32 whatever
    the global dtype policy, because ImageNet mean subtraction loses precision
    in float16.

    Args:
        backbone: the backbone's name; selects its `preprocess_input`.
        image_size: the square size the backbone receives.
        resize: `stretch` (plain resize) or `crop` (centre crop to a square
            first, keeping the aspect ratio). Defaults to `stretch`.
    """

    def __init__(self, backbone, image_size, resize="stretch", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone
        self.image_size = image_size
        self.resize = resize
        self._preprocess_input = backbone_spec(backbone).preprocess_input

    def call(self, images):
        images = ops.cast(images, "float32")
        if images.shape[1] == images.shape[2] == self.image_size:
            # Already the right size (known when the graph is built): a resize
            # would copy the pixels unchanged.
            return self._preprocess_input(images)
        images = ops.image.resize(
            images,
            (self.image_size, self.image_size),
            interpolation="bilinear",
            # Antialiasing matters only when shrinking, where it keeps thin
            # structures from aliasing; when enlarging it changes nothing.
            antialias=True,
            crop_to_aspect_ratio=self.resize == "crop",
        )
        # Whole levels, as `pipeline.resize_uint8` leaves the images the input
        # pipeline resizes: an image resized there or here is then the same
        # pixels, so evaluation and serving agree.
        images = ops.clip(ops.round(images), 0, 255)
        return self._preprocess_input(images)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=self.backbone, image_size=self.image_size, resize=self.resize
        )
        return config


def build_backbone(name, image_size, weights):
    """Creates a Keras Applications backbone without its top, average-pooled.

    Args:
        name: the backbone's name, e.g. `resnet50`.
        image_size: the square input size.
        weights: `imagenet`, `none`, or the path of a weights file: either one
            written by a previous run (`backbone.weights.h5`) or a Keras
            Applications `..._notop.h5` file.

    Returns:
        The backbone, a `keras.Model` mapping preprocessed images to features.

    Raises:
        UsageError: when the weights can't be downloaded or loaded, or the image
            size is too small for this backbone.
    """
    spec = backbone_spec(name)
    download = weights == "imagenet"
    try:
        backbone = spec.constructor(
            include_top=False,
            weights="imagenet" if download else None,
            input_shape=(image_size, image_size, 3),
            pooling="avg",
        )
    except ValueError as error:
        # Keras Applications validate the input size with a ValueError.
        raise UsageError(
            f"Can't build {spec.name} at --image_size={image_size}: {error}"
        ) from error
    except Exception as error:  # Keras raises a bare Exception on a failed fetch.
        if not download:
            raise
        cache = os.path.join(
            os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models"
        )
        raise UsageError(
            f"Couldn't download the ImageNet weights for {spec.name}: {error}\n"
            f"To go on offline, either copy the Keras weights file "
            f"(its name ends in _notop.h5) into {cache}, or pass "
            f"--weights=PATH to a weights file you have, or --weights=none "
            f"to train from random initialisation."
        ) from error
    if not download and weights != "none":
        _load_backbone_weights(backbone, weights)
    return backbone


def _load_backbone_weights(backbone, path):
    if not os.path.isfile(path):
        raise UsageError(
            f"--weights={path}: no such file. Pass imagenet, none, or the path "
            f"of a weights file (for example RUN/backbone.weights.h5)."
        )
    # A file of another architecture makes Keras warn once per layer before it
    # fails; the error below says all of it in one line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(path)
        except Exception as error:
            keras_summary = str(error).split("\n")[0]
            raise UsageError(
                f"--weights={path} doesn't fit the {backbone.name} backbone "
                f"({keras_summary})\nThe file must hold weights of the same backbone "
                f"architecture, without its classification top."
            ) from error
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)


def build_classifier(backbone, backbone_name, num_classes, image_size, dropout,
                     resize="stretch", train_batchnorm=False):
    """Puts preprocessing and a new classification head around a backbone.

    Args:
        backbone: a model from `build_backbone`.
        backbone_name: its name, which selects the preprocessing.
        num_classes: the number of classes the head predicts.
        image_size: the size images are resized to before the backbone.
        dropout: the dropout rate before the head.
        resize: how images are brought to `image_size`; see `ImagePreprocessing`.
        train_batchnorm: whether the backbone runs in training mode when the
            classifier trains, so that the BatchNormalization layers that are
            trainable normalise by batch statistics and update theirs. Only for
            training a backbone from scratch; see `unfreeze_backbone`.

    Returns:
        A `keras.Model` from uint8 images `[batch, height, width, 3]` of any
        height and width to float32 class probabilities `[batch, num_classes]`.
    """
    images = keras.Input(shape=(None, None, 3), dtype="uint8", name="images")
    x = ImagePreprocessing(backbone_name, image_size, resize, name="preprocessing")(images)
    if train_batchnorm:
        # The backbone follows the model's mode. Keras still runs a frozen
        # BatchNormalization layer in inference mode, so phase 1 (all frozen)
        # leaves the statistics alone and phase 2 updates the unfrozen ones.
        x = backbone(x)
    else:
        # training=False keeps BatchNormalization in inference mode in both
        # phases: its statistics stay the ones the weights were trained with,
        # which small fine-tuning batches would otherwise overwrite.
        x = backbone(x, training=False)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 output so softmax and the loss stay stable under mixed precision.
    probabilities = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="head"
    )(x)
    return keras.Model(images, probabilities, name=f"{backbone_name}_classifier")


def float32_copy(classifier):
    """The classifier computing in float32 throughout, with the same weights.

    Layers built under a mixed-precision policy keep it in what they export,
    so a SavedModel or TFLite file would compute in float16 or bfloat16 on
    the CPUs that serve it. The weights themselves are float32 under any
    mixed policy, so the copy takes them unchanged.

    Returns:
        A new model, or `classifier` itself when it already computes in
        float32.
    """
    config = classifier.get_config()
    float32_config = _float32_policies(config)
    if float32_config == config:
        return classifier
    # Under a float32 global policy too, for any layer that builds layers of
    # its own without passing its dtype on.
    global_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.Model.from_config(float32_config)
    finally:
        keras.config.set_dtype_policy(global_policy)
    copy.set_weights(classifier.get_weights())
    return copy


def _float32_policies(config):
    """`config` with every mixed-precision dtype policy made float32."""
    if isinstance(config, list):
        return [_float32_policies(item) for item in config]
    if not isinstance(config, dict):
        return config
    if (config.get("class_name") == "DTypePolicy"
            and str(config.get("config", {}).get("name", "")).startswith("mixed_")):
        return {**config, "config": {**config["config"], "name": "float32"}}
    return {key: _float32_policies(value) for key, value in config.items()}


def freeze_backbone(backbone):
    """Freezes every backbone weight for the head phase."""
    backbone.trainable = False


def unfreeze_backbone(backbone, unfreeze, train_batchnorm=False):
    """Unfreezes the backbone's top layers for fine-tuning.

    Unless `train_batchnorm`, BatchNormalization layers stay frozen whatever
    `unfreeze` says, so their statistics and affine weights keep the values
    they were trained with.

    Args:
        backbone: a model from `build_backbone`.
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
        classifier: a model from `build_classifier(..., train_batchnorm=True)`.
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
        backbone: a model from `build_backbone`.
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


def first_unfrozen_layer_index(backbone, unfreeze):
    """Resolves `--unfreeze` to the index of the first layer to unfreeze.

    Args:
        backbone: a model from `build_backbone`.
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


def feature_extractor(classifier):
    """The classifier up to the backbone's pooled features (before the head)."""
    return keras.Model(classifier.input, classifier.get_layer("dropout").input,
                       name="feature_extractor")


def head_of(classifier):
    """The classifier's dropout and head as a model on pooled features.

    It shares the classifier's layers, so training it trains the classifier.
    """
    features = keras.Input(shape=classifier.get_layer("dropout").input.shape[1:],
                           name="features")
    x = classifier.get_layer("dropout")(features)
    return keras.Model(features, classifier.get_layer("head")(x), name="head")
