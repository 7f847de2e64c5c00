"""The backbones: every Keras Applications model, by name, and its weights.

Backend-agnostic: only `keras`. `build_backbone` returns the bare backbone,
average-pooled and without its top; `tl_keras.model.classifier` puts preprocessing
and a head around it.
"""

import dataclasses
import difflib
import os
import warnings

import keras

from tl_keras.errors import UsageError
from tl_keras.model import cut

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


def build_backbone(name, image_size, weights, cut_at=None):
    """Creates a Keras Applications backbone without its top, average-pooled.

    Args:
        name: the backbone's name, e.g. `resnet50`.
        image_size: the square input size.
        weights: `imagenet`, `none`, or the path of a weights file: either one
            written by a previous run (`backbone.weights.h5`) or a Keras
            Applications `..._notop.h5` file.
        cut_at: None for the whole backbone, or the block to cut it at
            (`tl_keras.model.cut.cut_backbone`), once the weights are in.

    Returns:
        The backbone, a `keras.Model` mapping preprocessed images to features.

    Raises:
        UsageError: when the weights can't be downloaded or loaded, the image
            size is too small for this backbone, or it has no block `cut_at`.
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
    kept = backbone if cut_at is None else cut.cut_backbone(backbone, cut_at)
    if not download and weights != "none":
        _load_backbone_weights(backbone, weights, kept)
    return kept


def _load_backbone_weights(backbone, path, kept):
    """Loads the file into the whole backbone or, when only the blocks a cut
    keeps fit it (another cut run's backbone.weights.h5), into `kept`."""
    try:
        _load_weights_file(backbone, path)
    except UsageError:
        if kept is backbone:
            raise
        _load_weights_file(kept, path)


def _load_weights_file(backbone, path):
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
