"""Grad-CAM: where the classifier looked, as a heatmap over each image.

Grad-CAM (Selvaraju et al., 2017, arXiv:1610.02391) weighs each channel of a
convolutional feature map by the mean gradient of one class's logit with
respect to it, sums the weighted channels and keeps the positive part: the
regions whose features raise that class's score. Here the class is the
predicted one, or one given.

The feature map is found from the model's structure, so any Keras
Applications family works without a list of layer names: walking back from
the backbone's output, the first 4-D tensor larger than 1x1 that every path to
the output passes through, so the rest of the network is a function of it
alone. That is the map global pooling averages, unless a small --image_size
made it 1x1, where a heatmap would be one value: the walk then goes on back
to the last larger map. A padding layer's output is passed over, since its
border cells are no region of the image.

Keras 3 has no backend-neutral gradient, so `_gradient` has one per backend,
TensorFlow's `GradientTape` and `jax.grad`; `GradCam` refuses any other
backend with a UsageError.
"""

import collections
import dataclasses

import keras
import numpy as np
from keras import ops

from tl_keras.errors import UsageError
from tl_keras.model import classifier as classifier_lib
from tl_keras.outputs import plots

SUPPORTED_BACKENDS = ("tensorflow", "jax")
# Images smaller than this are enlarged for their tile, so a 32 px CIFAR image
# is still readable where a grid shows it.
_MIN_TILE_SIZE = 128


def check_backend():
    """Raises a UsageError unless the Keras backend in use has a gradient here."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise UsageError(
            f"Grad-CAM needs gradients, which tl_keras takes from the tensorflow or jax "
            f"backend; this process runs KERAS_BACKEND={backend}. Run it with "
            f"KERAS_BACKEND=tensorflow (or jax).")


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Grad-CAM of a batch of images.

    Attributes:
        heatmaps: float32 `[n, height, width]` at the feature map's
            resolution, in [0, 1]: 1 where the class's evidence is strongest,
            0 where there is none (everywhere, if nothing raised its score).
        classes: int `[n]`, the class each heatmap is for.
        probabilities: float32 `[n, classes]`, the model's prediction.
        images: uint8 `[n, size, size, 3]`, the images as the backbone saw
            them (resized as the model resizes), which the heatmaps cover.
    """

    heatmaps: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray
    images: np.ndarray


class GradCam:
    """Grad-CAM for a classifier from `tl_keras.model.classifier.build_classifier`.

    Args:
        classifier: the classifier; it computes in float32 here whatever
            dtype policy it was built under, so half-precision gradients
            don't flatten the heatmaps.

    Attributes:
        feature_map: the backbone's tensor the heatmaps are computed on;
            see `last_spatial_feature_map`.

    Raises:
        UsageError: under a backend without a gradient here.
    """

    def __init__(self, classifier):
        check_backend()
        classifier = classifier_lib.float32_copy(classifier)
        backbone = _only_layer(classifier, keras.Model)
        self.preprocessing = _only_layer(classifier, classifier_lib.ImagePreprocessing)
        self.feature_map = last_spatial_feature_map(backbone)
        self._feature_maps = keras.Model(backbone.inputs, self.feature_map)
        # The rest of the backbone, as a function of the feature map alone.
        self._pooled = keras.Model(self.feature_map, backbone.outputs[0])
        self._head = classifier.get_layer(classifier_lib.HEAD_LAYER)

    def _logits(self, feature_maps):
        # The head without its softmax: a confident prediction's probability
        # saturates, and its gradient with it; its logit doesn't. Dropout,
        # between the two, is the identity at inference.
        pooled = self._pooled(feature_maps, training=False)
        return ops.matmul(pooled, self._head.kernel) + self._head.bias

    def explain(self, images, classes=None):
        """Grad-CAM heatmaps of a batch of images.

        Args:
            images: uint8 `[n, height, width, 3]`, as the classifier takes them.
            classes: int `[n]`, the class to explain for each image. Defaults
                to the predicted class.

        Returns:
            An `Explanation`.
        """
        seen = self.preprocessing.resized(ops.convert_to_tensor(images))
        feature_maps = self._feature_maps(self.preprocessing.normalized(seen),
                                          training=False)
        logits = self._logits(feature_maps)
        if classes is None:
            classes = ops.argmax(logits, axis=-1)
        classes = ops.reshape(ops.cast(ops.convert_to_tensor(classes), "int32"), (-1, 1))

        def class_logits(maps):
            # Summed over the batch: each image's logit depends on its own
            # map alone, so one gradient holds every image's.
            return ops.sum(ops.take_along_axis(self._logits(maps), classes, axis=1))

        gradients = _gradient(class_logits, feature_maps)
        channel_weights = ops.mean(gradients, axis=(1, 2), keepdims=True)
        heatmaps = ops.relu(ops.sum(channel_weights * feature_maps, axis=-1))
        peaks = ops.max(heatmaps, axis=(1, 2), keepdims=True)
        heatmaps = ops.where(peaks > 0, heatmaps / ops.maximum(peaks, 1e-12), 0.0)
        return Explanation(
            heatmaps=ops.convert_to_numpy(heatmaps).astype(np.float32),
            classes=ops.convert_to_numpy(classes)[:, 0],
            probabilities=ops.convert_to_numpy(ops.softmax(logits, axis=-1)),
            images=ops.convert_to_numpy(seen).astype(np.uint8))


def _gradient(function, x):
    """The gradient of the scalar `function` at `x`, by the backend's autodiff."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # Only under this backend.

        with tf.GradientTape() as tape:
            tape.watch(x)
            value = function(x)
        return tape.gradient(value, x)
    import jax  # check_backend admits no third backend.

    return jax.grad(function)(x)


def _only_layer(model, layer_type):
    layers = [layer for layer in model.layers if isinstance(layer, layer_type)]
    if len(layers) != 1:
        raise ValueError(f"{model.name} has {len(layers)} layers of type "
                         f"{layer_type.__name__}; Grad-CAM expects one, as "
                         f"tl_keras.model.classifier.build_classifier makes.")
    return layers[0]


def last_spatial_feature_map(backbone):
    """The backbone's last spatial feature map, found from its structure.

    Walking back from the output, nearest first: the first 4-D tensor larger
    than 1x1, not made by a padding layer, that every path from the input to
    the output passes through.

    Args:
        backbone: a functional model from images to features.

    Returns:
        The symbolic tensor, `[batch, height, width, channels]`.
    """
    output = backbone.outputs[0]
    for tensor in _ancestors_nearest_first(output):
        shape = tensor.shape
        if (len(shape) == 4 and None not in shape[1:3] and shape[1] * shape[2] > 1
                and not isinstance(_operation(tensor), keras.layers.ZeroPadding2D)
                and _every_path_passes(output, tensor)):
            return tensor
    raise ValueError(f"{backbone.name} has no feature map larger than 1x1.")


def _operation(tensor):
    return tensor._keras_history.operation


def _inputs_of(tensor):
    """The tensors the operation that made `tensor` took; none for an input.

    Keras keeps the graph on each symbolic tensor (`_keras_history`: the
    operation, and which of its calls made it); it has no public walk.
    """
    operation, node_index, _ = tensor._keras_history
    return operation._inbound_nodes[node_index].input_tensors


def _ancestors_nearest_first(output):
    """`output` and every tensor it is computed from, breadth first."""
    queue, seen = collections.deque([output]), {id(output)}
    while queue:
        tensor = queue.popleft()
        yield tensor
        for parent in _inputs_of(tensor):
            if id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)


def _every_path_passes(output, tensor):
    """Whether every path from the model's inputs to `output` passes `tensor`:
    then `tensor` alone determines `output`."""
    stack, seen = [output], set()
    while stack:
        current = stack.pop()
        if current is tensor or id(current) in seen:
            continue
        seen.add(id(current))
        parents = _inputs_of(current)
        if not parents:
            return False  # Reached an input around `tensor`.
        stack.extend(parents)
    return True


def overlays(explanation):
    """Each image with its heatmap over it, as uint8 tiles at least
    `_MIN_TILE_SIZE` pixels square, the heatmap enlarged smoothly to fit."""
    size = max(_MIN_TILE_SIZE, explanation.images.shape[1])
    images = ops.image.resize(explanation.images.astype(np.float32), (size, size),
                              interpolation="bilinear")
    heatmaps = ops.image.resize(explanation.heatmaps[..., None], (size, size),
                                interpolation="bilinear")[..., 0]
    return [plots.heatmap_overlay(image, heatmap) for image, heatmap in
            zip(ops.convert_to_numpy(images), ops.convert_to_numpy(heatmaps))]


def grid(gradcam, predictions, class_names):
    """A grid of images with their Grad-CAM heatmaps, for the predicted class,
    each titled with its true and predicted class and the confidence.

    Args:
        gradcam: a `GradCam`.
        predictions: `tl_keras.outputs.evaluate.Prediction`s, all images one size.
        class_names: the class names, by label.

    Returns:
        PNG bytes.
    """
    explanation = gradcam.explain(np.stack([prediction.image for prediction in predictions]),
                                  classes=[prediction.predicted for prediction in predictions])
    titles = [f"true {class_names[prediction.label]}\npredicted "
              f"{class_names[prediction.predicted]} ({prediction.confidence:.0%})"
              for prediction in predictions]
    return plots.image_grid(overlays(explanation), titles)
