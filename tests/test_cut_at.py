"""`--cut_at`: the classifier on the backbone's output at the end of a block."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import parse_config
from tl_keras import rundir
from tl_keras.errors import UsageError
from tl_keras.model import backbones
from tl_keras.model import classifier as classifier_lib
from tl_keras.model import cut
from tl_keras.model import features
from tl_keras.model import layer_decay
from tl_keras.outputs import export
from tl_keras.outputs import gradcam
from tl_keras.outputs import tflite

IMAGE_SIZE = 32
# A ResNet, a MobileNet and an EfficientNet, each cut a few blocks up.
FAMILIES = [("resnet50", 3), ("mobilenetv2", 4), ("efficientnetb0", -5)]


@functools.cache
def _cut_classifier(name, cut_at):
    """(the full backbone, the cut one, the classifier on it). Built once per
    family and shared by the tests that only read them (features, exports,
    Grad-CAM): building EfficientNet or ResNet50 costs seconds each time."""
    full = backbones.build_backbone(name, IMAGE_SIZE, "none")
    backbone = cut.cut_backbone(full, cut_at)
    model = classifier_lib.build_classifier(backbone, name, 3, IMAGE_SIZE, dropout=0.0)
    return full, backbone, model


def _images(count=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                dtype=np.uint8)


@pytest.mark.parametrize("name, cut_at", FAMILIES)
def test_the_classifiers_features_are_the_named_blocks_output(name, cut_at):
    full, _, model = _cut_classifier(name, cut_at)
    end = cut.block_outputs(full)[cut_at][0].end
    by_hand = keras.Model(full.input, full.get_layer(end).output)
    images = _images()
    preprocessed = model.get_layer("preprocessing")(images)
    expected = np.asarray(by_hand(preprocessed)).mean(axis=(1, 2))
    actual = np.asarray(features.feature_extractor(model)(images))
    assert actual.shape == expected.shape
    assert actual.shape[-1] < full.output.shape[-1]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_resnet50s_blocks_are_its_residual_blocks():
    # The names a user would write by hand: block 3 ends the third block of conv2.
    full = backbones.build_backbone("resnet50", IMAGE_SIZE, "none")
    blocks = layer_decay.backbone_blocks(full)
    # The stem and 16 residual blocks; the top's output is the backbone's, pooled.
    assert len(blocks) == 17
    assert [blocks[i].end for i in (0, 1, 3, 4, -2, -1)] == [
        "pool1_pool", "conv2_block1_out", "conv2_block3_out", "conv3_block1_out",
        "conv5_block2_out", "avg_pool"]
    assert cut.cut_backbone(full, -1) is full


def test_a_stage_of_a_plain_chain_ends_before_the_next_ones_zero_padding():
    full = backbones.build_backbone("mobilenet", IMAGE_SIZE, "none")
    # layer_decay's stage 2 runs on to conv_pad_6, which pads for conv_dw_6's stride.
    assert layer_decay.backbone_blocks(full)[2].end == "conv_pad_6"
    block, output = cut.block_outputs(full)[2]
    assert block.end == "conv_pw_5_relu"
    assert output.shape[1:] == full.get_layer("conv_pw_5_relu").output.shape[1:]


@pytest.mark.parametrize("name, cut_at", FAMILIES)
def test_the_saved_model_matches_the_keras_model(name, cut_at, tmp_path):
    _, _, model = _cut_classifier(name, cut_at)
    images = _images()
    export.export_saved_model(model, str(tmp_path / "saved"), ["a", "b", "c"], IMAGE_SIZE)
    serving = tf.saved_model.load(str(tmp_path / "saved"))
    served = serving.signatures[export.SERVING_SIGNATURE](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), np.asarray(model(images)),
                               atol=1e-5)


def test_the_tflite_file_matches_the_keras_model(tmp_path):
    pytest.importorskip("tensorflow.lite.python.lite")
    _, _, model = _cut_classifier("mobilenetv2", 4)
    images = _images(2)
    tflite.export_tflite(model, str(tmp_path / "model.tflite"), IMAGE_SIZE)
    np.testing.assert_allclose(tflite.tflite_probabilities(str(tmp_path / "model.tflite"),
                                                           images),
                               np.asarray(model(images)), atol=1e-5)


def test_grad_cam_explains_the_cuts_feature_map():
    full, _, model = _cut_classifier("resnet50", 3)
    explainer = gradcam.GradCam(model)
    assert explainer.feature_map.shape[1:] == full.get_layer("conv2_block3_out").output.shape[1:]


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "efficientnetb0"])
def test_a_block_out_of_range_is_refused_with_the_valid_range(name):
    full = backbones.build_backbone(name, IMAGE_SIZE, "none")
    count = len(layer_decay.backbone_blocks(full))
    with pytest.raises(UsageError) as refused:
        backbones.build_backbone(name, IMAGE_SIZE, "none", cut_at=count)
    message = str(refused.value)
    assert f"--cut_at={count}: {full.name} has {count} blocks" in message
    assert f"0 (the stem) to {count - 1} (the top), or -{count} to -1" in message
    # One line per block, with its output shape.
    stem_shape = "x".join(map(str, cut.block_outputs(full)[0][1].shape[1:]))
    assert f"    0 ({-count:>4})  {stem_shape}" in message
    assert f"  {count - 1:>3} (  -1)  {full.output.shape[-1]} " in message


def test_unfreeze_counts_within_what_remains():
    from tl_keras.training import finetune
    full = backbones.build_backbone("resnet50", IMAGE_SIZE, "none")
    backbone = cut.cut_backbone(full, 3)
    finetune.unfreeze_backbone(backbone, "5")
    trainable = [layer.name for layer in backbone.layers if layer.trainable]
    assert trainable[-1] == cut.CUT_POOLING_LAYER
    assert "conv2_block3_3_conv" in trainable and "conv5_block3_out" not in trainable
    # --layer_decay's blocks are the cut's: the stem and three residual blocks.
    assert len(layer_decay.layer_rates(backbone, 0.5).blocks) == 4


def test_flags_txt_records_it_and_a_resume_with_another_cut_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    _, at_three = parse_config("--cut_at=3", f"--model_dir={model_dir}")
    assert "--cut_at=3\n" in at_three
    with rundir.claim(str(model_dir), at_three, overwrite=False):
        with open(rundir.RunPaths(str(model_dir)).flags, "w") as file:
            file.write(at_three)
    _, at_five = parse_config("--cut_at=5", f"--model_dir={model_dir}")
    with pytest.raises(UsageError, match="cut_at"):
        with rundir.claim(str(model_dir), at_five, overwrite=False):
            pass
    # A run made before --cut_at existed has no such line, and still resumes.
    _, uncut = parse_config(f"--model_dir={model_dir}")
    assert "cut_at" not in uncut


@pytest.mark.slow
def test_a_cut_run_trains_exports_and_seeds_another(tmp_path):
    # The whole run on the cut backbone: cached features for the head phase,
    # BatchNormalization trained and its statistics recomputed, the exports.
    import sliced_mock
    from conftest import run_job

    with sliced_mock.mock_data(num_examples=64):
        config, metrics = run_job(
            tmp_path, "--backbone=resnet50", "--cut_at=4", "--cache_features",
            "--batchnorm=train", "--unfreeze=10", "--head_epochs=1", "--finetune_epochs=1")
    assert metrics["test"]["top1"] >= 0
    model = keras.saving.load_model(f"{config.model_dir}/model.keras")
    backbone = model.get_layer("resnet50")
    assert backbone.layers[-1].name == cut.CUT_POOLING_LAYER
    assert backbone.output.shape[-1] == 512  # conv3_block1_out's channels
    images = _images()
    serving = tf.saved_model.load(f"{config.model_dir}/saved_model")
    served = serving.signatures[export.SERVING_SIGNATURE](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), np.asarray(model(images)),
                               atol=1e-5)
    # A cut run's backbone.weights.h5 holds the blocks it kept: it seeds a
    # run cut at the same block.
    seeded = backbones.build_backbone("resnet50", IMAGE_SIZE,
                                      f"{config.model_dir}/backbone.weights.h5", cut_at=4)
    for mine, theirs in zip(seeded.weights, backbone.weights):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs))
