"""Grad-CAM: the feature map it finds, its heatmaps, and where they point."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import corner_task
from conftest import REPO_ROOT
from tl_keras.errors import UsageError
from tl_keras.model import backbones
from tl_keras.model import classifier as classifier_lib
from tl_keras.outputs import gradcam


def _images(count, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


def _pooling_input(backbone):
    # The last: squeeze-and-excitation blocks pool too.
    poolings = [layer for layer in backbone.layers
                if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    return poolings[-1].input


# At 64 px every family's last map is 2x2: the map its global pooling averages.
# The two largest networks take longest to build, and are slow tests.
@pytest.mark.parametrize("name, channels", [
    pytest.param("resnet50", 2048, marks=pytest.mark.slow), ("mobilenetv3small", 576),
    ("efficientnetv2b0", 1280), pytest.param("convnexttiny", 768, marks=pytest.mark.slow),
])
def test_every_family_gets_heatmaps_of_its_last_spatial_map(name, channels):
    keras.utils.set_random_seed(0)
    backbone = backbones.build_backbone(name, 64, "none")
    model = classifier_lib.build_classifier(backbone, name, num_classes=3, image_size=64,
                                            dropout=0.5)
    explainer = gradcam.GradCam(model)

    assert explainer.feature_map is _pooling_input(backbone)
    assert tuple(explainer.feature_map.shape) == (None, 2, 2, channels)
    # Images of another size are resized as the model resizes them.
    images = _images(3, 48)
    explanation = explainer.explain(images)
    assert explanation.heatmaps.shape == (3, 2, 2)
    assert explanation.images.shape == (3, 64, 64, 3)
    assert (np.ptp(explanation.heatmaps, axis=(1, 2)) > 0).all(), explanation.heatmaps
    assert explanation.heatmaps.max() == pytest.approx(1)
    # Its forward pass is the classifier's, dropout and softmax included.
    np.testing.assert_allclose(explanation.probabilities,
                               keras.ops.convert_to_numpy(model(images)), atol=1e-5)


def _backbone(outputs_from):
    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, outputs_from(inputs), name="backbone")


def test_a_1x1_map_and_a_padded_one_are_passed_over_for_the_last_larger_map():
    layers = keras.layers
    found = {}

    def graph(inputs):
        x = layers.Conv2D(4, 3, strides=8, padding="same")(inputs)  # 4x4
        found["expected"] = x
        x = layers.ZeroPadding2D(1)(x)  # 6x6, a border of zeros
        x = layers.Conv2D(4, 3, strides=4)(x)  # 1x1
        return layers.GlobalAveragePooling2D()(x)

    assert gradcam.last_spatial_feature_map(_backbone(graph)) is found["expected"]


def test_a_map_that_a_shortcut_bypasses_is_passed_over():
    layers = keras.layers
    found = {}

    def graph(inputs):
        block = layers.Conv2D(4, 3, strides=8, padding="same")(inputs)  # 4x4
        found["expected"] = block
        late = layers.Conv2D(4, 3, strides=2, padding="same")(block)  # 2x2, nearer the output
        return layers.Add()([layers.GlobalAveragePooling2D()(late),
                             layers.GlobalAveragePooling2D()(block)])

    assert gradcam.last_spatial_feature_map(_backbone(graph)) is found["expected"]


def _check_corner_task(result):
    assert result["heatmap_shape"] == [64, 4, 4]
    assert result["accuracy"] >= 0.9, result
    assert result["peaks_in_the_square_corner"] >= 0.8, result
    assert result["constant_heatmaps"] == 0, result


def test_heatmaps_peak_in_the_corner_whose_square_decides_the_class():
    _check_corner_task(corner_task.train_and_explain())


@pytest.mark.slow
def test_heatmaps_peak_in_the_corner_whose_square_decides_the_class_under_jax():
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "corner_task.py")],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_corner_task(json.loads(result.stdout.splitlines()[-1]))


def test_heatmaps_cover_the_image_the_right_way_round():
    heatmaps = np.zeros((1, 4, 4), np.float32)
    heatmaps[0, 0, 3] = 1  # top right
    explanation = gradcam.Explanation(
        heatmaps=heatmaps, classes=np.zeros(1, int), probabilities=np.ones((1, 1)),
        images=np.full((1, 32, 32, 3), 128, np.uint8))

    [tile] = gradcam.overlays(explanation)

    # Enlarged for the grid, and red (jet's 1) at the top right, blue elsewhere.
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
    red_minus_blue = tile[..., 0].astype(int) - tile[..., 2]
    assert np.unravel_index(red_minus_blue.argmax(), red_minus_blue.shape)[0] < 32
    assert np.unravel_index(red_minus_blue.argmax(), red_minus_blue.shape)[1] >= 96
    assert red_minus_blue[100, 20] < 0


def test_a_mixed_precision_classifier_is_explained_in_float32():
    keras.utils.set_random_seed(0)
    full = corner_task.small_classifier()
    images, _ = corner_task.corner_images(4, seed=0)
    expected = gradcam.GradCam(full).explain(images).heatmaps
    keras.config.set_dtype_policy("mixed_bfloat16")
    mixed = corner_task.small_classifier()
    mixed.set_weights(full.get_weights())

    heatmaps = gradcam.GradCam(mixed).explain(images).heatmaps

    # bfloat16 keeps 8 bits of mantissa: its heatmaps would differ by ~1e-2.
    np.testing.assert_allclose(heatmaps, expected, atol=1e-5)


def test_a_backend_without_gradients_here_is_refused(monkeypatch):
    model = corner_task.small_classifier()
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(UsageError, match="KERAS_BACKEND=torch. Run it with "
                                         "KERAS_BACKEND=tensorflow"):
        gradcam.GradCam(model)
