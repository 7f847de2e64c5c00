"""The classifier: a backbone under a new Dense head, preprocessing inside.

Backend-agnostic: only `keras` and `keras.ops`, so any Keras backend runs it.

The model takes uint8 RGB images of any height and width. Resizing and the
backbone's own preprocessing run inside it, so an exported model needs nothing
re-implemented outside, and the input pipeline can ship small uint8 images to
the accelerator, which resizes them cheaply.
"""

import keras
from keras import ops

from tl_keras.model import backbones
from tl_keras.model import layer_decay

# The names of the layers after the backbone: `tl_keras.model.features` splits the
# classifier there, into the backbone's features and the head on them.
DROPOUT_LAYER = "dropout"
HEAD_LAYER = "head"


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
        self._preprocess_input = backbones.backbone_spec(backbone).preprocess_input

    def call(self, images):
        return self.normalized(self.resized(images))

    def resized(self, images):
        """The images as the backbone sees them, before its normalisation:
        float32 `[batch, image_size, image_size, 3]` in whole levels 0-255."""
        images = ops.cast(images, "float32")
        if images.shape[1] == images.shape[2] == self.image_size:
            # Already the right size (known when the graph is built): a resize
            # would copy the pixels unchanged.
            return images
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
        return ops.clip(ops.round(images), 0, 255)

    def normalized(self, images):
        """The backbone family's own `preprocess_input` of `resized`'s output."""
        return self._preprocess_input(images)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=self.backbone, image_size=self.image_size, resize=self.resize
        )
        return config


# What a model.keras may hold beyond Keras' own objects: the preprocessing, and
# the optimizers --layer_decay fine-tunes with. Each is registered with Keras
# where it is defined, so `keras.saving.load_model` needs only this module
# imported.
SAVED_OBJECTS = (ImagePreprocessing, *layer_decay.OPTIMIZERS.values())


def build_classifier(backbone, backbone_name, num_classes, image_size, dropout,
                     resize="stretch", train_batchnorm=False):
    """Puts preprocessing and a new classification head around a backbone.

    Args:
        backbone: a model from `tl_keras.model.backbones.build_backbone`.
        backbone_name: its name, which selects the preprocessing.
        num_classes: the number of classes the head predicts.
        image_size: the size images are resized to before the backbone.
        dropout: the dropout rate before the head.
        resize: how images are brought to `image_size`; see `ImagePreprocessing`.
        train_batchnorm: whether the backbone runs in training mode when the
            classifier trains, so that the BatchNormalization layers that are
            trainable normalise by batch statistics and update theirs. Only for
            training a backbone from scratch; see
            `tl_keras.training.finetune.unfreeze_backbone`.

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
    x = keras.layers.Dropout(dropout, name=DROPOUT_LAYER)(x)
    # float32 output so softmax and the loss stay stable under mixed precision.
    probabilities = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name=HEAD_LAYER
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


def with_training_state(copy, trained):
    """`copy` compiled as `trained` was, its optimizer holding the trained
    optimizer's state, so that a `.keras` file of it holds the optimizer too.

    `float32_copy` builds an uncompiled model under a mixed policy; without
    this, `model.keras` would lose the optimizer whenever training was mixed.
    A loss-scaling wrapper (float16) is left behind: the copy computes in
    float32.

    Returns:
        `copy`, compiled where `trained` has a built optimizer whose
        variables match the copy's trainable variables.
    """
    if copy is trained or trained.optimizer is None or not trained.optimizer.built:
        return copy
    optimizer = getattr(trained.optimizer, "inner_optimizer", trained.optimizer)
    copy.compile_from_config(trained.get_compile_config())
    copy.optimizer.build(copy.trainable_variables)
    if len(copy.optimizer.variables) != len(optimizer.variables):
        return copy
    for mine, theirs in zip(copy.optimizer.variables, optimizer.variables):
        mine.assign(theirs)
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
