"""--layer_decay: the backbone's blocks come from its structure, and each
trains at the peak learning rate times the decay to the power of its depth."""

import re

import keras
import numpy as np
import pytest

import tiny_training
from tl_keras.model import backbones
from tl_keras.model import layer_decay
from tl_keras.training import optimization


@pytest.mark.parametrize("name, count, stem, top", [
    # The stem, then the 16 bottleneck blocks.
    ("resnet50", 17, "conv1_conv to conv1_bn", "conv5_block3_1_conv to conv5_block3_3_bn"),
    # A plain chain: its five stages, each ended by a pooling layer.
    ("vgg16", 5, "block1_conv1 to block1_conv2", "block5_conv1 to block5_conv3"),
    # A chain too, its stages starting at its strided convolutions.
    ("mobilenet", 5, "conv1 to conv_pw_1_bn", "conv_dw_12 to conv_pw_13_bn"),
    # Squeeze-and-excitation gates inside blocks don't end them; the blocks
    # without a shortcut before the first residual one are the stem.
    ("mobilenetv3small", 11, "conv to expanded_conv_1_project_bn", "conv_1 to conv_1_bn"),
    pytest.param("mobilenetv2", 16, "Conv1 to block_1_project_BN", "block_16_expand to Conv_1_bn",
                 marks=pytest.mark.slow),
    pytest.param("efficientnetv2b0", 21, "stem_conv to block2a_project_bn", "top_conv to top_bn",
                 marks=pytest.mark.slow),
    # Its residual additions are operations, not layers. Its last layer is
    # named by Keras' counter, `layer_normalization` plus a suffix if the
    # process built one before: so only the name's start is checked.
    pytest.param("convnexttiny", 23, "convnext_tiny_stem", "layer_normalization",
                 marks=pytest.mark.slow),
])
def test_blocks_follow_the_backbones_structure(name, count, stem, top):
    backbone = backbones.build_backbone(name, 32, "none")

    blocks = layer_decay.backbone_blocks(backbone)

    spans = [block.first if block.first == block.last else f"{block.first} to {block.last}"
             for block in blocks]
    assert (len(blocks), spans[0]) == (count, stem), spans
    assert re.fullmatch(re.escape(top) + r"(_\d+)?", spans[-1]), spans
    # Every weight in exactly one block.
    ids = [id(weight) for block in blocks for weight in block.weights]
    assert sorted(ids) == sorted(id(weight) for weight in backbone.weights)


def test_each_block_trains_at_the_peak_rate_times_the_decay_to_its_depth(tmp_path, capsys):
    model, backbone = tiny_training.build()
    before = {weight.path: keras.ops.convert_to_numpy(weight) for weight in model.trainable_weights}

    # One Adam step: its first update moves each weight by the learning rate
    # (times the gradient's sign), whatever the gradient's size.
    tiny_training.train_phases(model, backbone, tmp_path, finetune_epochs=1,
                               steps_per_epoch=1, learning_rate=0.01, layer_decay=0.5)

    def step(layer):
        return max(np.abs(keras.ops.convert_to_numpy(weight) - before[weight.path]).max()
                   for weight in layer.trainable_weights)

    assert step(model.get_layer("head")) == pytest.approx(0.01, rel=1e-3)
    for depth, name in enumerate(reversed(tiny_training.BLOCKS), start=1):
        assert step(backbone.get_layer(name)) == pytest.approx(0.01 * 0.5 ** depth, rel=1e-3), name
    assert ("Peak learning rate 0.01 for the head, 0.005 for the top block (block2_conv), "
            "down to 0.00125 for the stem (stem).") in capsys.readouterr().out


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_scales_with_the_rate(name):
    weight = keras.Variable(np.ones(4, "float32"))
    optimizer = optimization.make_optimizer(name, 0.1, weight_decay=0.5,
                                      rate_factors={id(weight): 0.25})

    # No gradient: the step is the decoupled weight decay alone.
    optimizer.apply([np.zeros(4, "float32")], [weight])

    np.testing.assert_allclose(keras.ops.convert_to_numpy(weight), 1 - 0.1 * 0.5 * 0.25, rtol=1e-6)


@pytest.mark.slow  # test_backends's JAX run loads such a model.keras too
def test_a_model_saved_with_the_optimizer_loads(tmp_path):
    model, _ = tiny_training.build()
    model.compile(optimizer=optimization.make_optimizer("adamw", 1e-3, 0.05, rate_factors={}),
                  loss="categorical_crossentropy")
    model.fit(tiny_training.one_batch(), steps_per_epoch=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")

    loaded = keras.saving.load_model(tmp_path / "model.keras")

    assert isinstance(loaded.optimizer, layer_decay.LayerRateAdamW)
    for mine, theirs in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(mine, theirs)

