"""A task Grad-CAM must get right: the class is the corner a bright square is in.

`python tests/corner_task.py` trains on it and prints the result as JSON, so
that a test can run it under another Keras backend in a process of its own.

The backbone is a small convolutional network of our own, not a Keras
Applications one: from random weights it learns the task in seconds on a CPU,
where a MobileNetV3 or EfficientNetV2 took minutes. The families' structures
are tested in test_gradcam.py without training.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tl_keras.model import classifier as classifier_lib  # noqa: E402
from tl_keras.outputs import gradcam  # noqa: E402

IMAGE_SIZE = 32
# Top-left, top-right, bottom-left, bottom-right.
CORNERS = 4


def corner_images(count, seed, size=IMAGE_SIZE):
    """Noise with a bright square in one corner, a few pixels from it at most.

    Returns:
        (uint8 images `[count, size, size, 3]`, int labels `[count]`: 0
        top-left, 1 top-right, 2 bottom-left, 3 bottom-right).
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 128, (count, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, CORNERS, count)
    side, jitter = size // 4, size // 16
    for image, label in zip(images, labels):
        top, left = rng.integers(0, jitter + 1, 2)
        if label >= 2:
            top = size - side - top
        if label % 2:
            left = size - side - left
        image[top:top + side, left:left + side] = 255
    return images, labels


def small_backbone(size=IMAGE_SIZE):
    """Three strided convolutions to a 4x4 map, average-pooled, as
    `tl_keras.model.backbones.build_backbone` pools a Keras Applications model."""
    inputs = keras.Input((size, size, 3))
    x = inputs
    for filters in (16, 32, 32):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="small")


def small_classifier(num_classes=CORNERS):
    # VGG16's preprocessing: any family's would do.
    return classifier_lib.build_classifier(small_backbone(), "vgg16", num_classes,
                                           IMAGE_SIZE, dropout=0.0)


def peak_corners(heatmaps):
    """The corner (as `corner_images` numbers them) of each heatmap's peak."""
    count, height, width = heatmaps.shape
    peaks = heatmaps.reshape(count, -1).argmax(axis=1)
    # Each cell's centre decides which half it is in.
    bottom = (peaks // width + 0.5) / height > 0.5
    right = (peaks % width + 0.5) / width > 0.5
    return bottom * 2 + right


def train_and_explain(seed=0, epochs=5):
    """Trains `small_classifier` on 512 corner images, explains 64 others.

    Returns:
        A dict: `accuracy` on the 64, `peaks_in_the_square_corner` (the share
        of the correctly classified ones whose heatmap peaks in the square's
        quadrant), `constant_heatmaps` (how many of the 64 are one value) and
        `heatmap_shape`.
    """
    keras.utils.set_random_seed(seed)
    model = small_classifier()
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy())
    images, labels = corner_images(512, seed)
    model.fit(images, labels, batch_size=32, epochs=epochs, verbose=0)

    test_images, test_labels = corner_images(64, seed + 1)
    explanation = gradcam.GradCam(model).explain(test_images)
    correct = explanation.classes == test_labels
    heatmaps = explanation.heatmaps
    return {
        "accuracy": float(correct.mean()),
        "peaks_in_the_square_corner": float(
            (peak_corners(heatmaps) == test_labels)[correct].mean()),
        "constant_heatmaps": int((np.ptp(heatmaps, axis=(1, 2)) == 0).sum()),
        "heatmap_shape": list(heatmaps.shape),
    }


if __name__ == "__main__":
    print(json.dumps(train_and_explain()))
