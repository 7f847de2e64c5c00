"""`--cut_at`: the backbone cut at the end of one of its blocks, pooled there.

Backend-agnostic: only `keras`. The blocks are `--layer_decay`'s
(`tl_keras.model.layer_decay.backbone_blocks`), found from the graph: block 0
is the stem, the last block the top, and a negative index counts from the top
as Python's do. Earlier blocks hold features that carry further from the
source task (Yosinski et al., 2014); `--mode=probe` measures which.
"""

import dataclasses

import keras

from tl_keras.errors import UsageError
from tl_keras.model import layer_decay

# The pooling layer put on a cut backbone's last feature map, as the full
# backbone's own `pooling="avg"` pools its last.
CUT_POOLING_LAYER = "cut_avg_pool"


def block_outputs(backbone):
    """Each block of `backbone` with its output tensor, from the stem to the top.

    Returns:
        A list of (`layer_decay.Block`, KerasTensor) pairs.
    """
    by_name = {operation.name: operation for operation in backbone.operations}
    outputs = []
    for block in layer_decay.backbone_blocks(backbone):
        end = by_name[block.end]
        # A plain chain's stage ends where the next stage's strided layer
        # starts (VGG, MobileNet); the zero padding before that layer is the
        # next stage's, and pooling over it would count its zeros.
        while isinstance(end, keras.layers.ZeroPadding2D):
            end = end.input._keras_history.operation
        outputs.append((dataclasses.replace(block, end=end.name), end.output))
    return outputs


def describe_blocks(outputs):
    """One line per block: its index from the stem and from the top, its
    layers and the shape of its output."""
    count = len(outputs)
    lines = []
    for index, (block, tensor) in enumerate(outputs):
        shape = "x".join(str(size) for size in tensor.shape[1:])
        span = block.first if block.first == block.end else f"{block.first} .. {block.end}"
        lines.append(f"  {index:>3} ({index - count:>4})  {shape:<14} {span}")
    return lines


def resolve(backbone, cut_at, outputs=None):
    """`cut_at` as an index from the stem.

    Raises:
        UsageError: when `backbone` has no block `cut_at`, listing the valid
            range and each block's output shape.
    """
    outputs = outputs or block_outputs(backbone)
    count = len(outputs)
    if -count <= cut_at < count:
        return cut_at % count
    raise UsageError("\n".join([
        f"--cut_at={cut_at}: {backbone.name} has {count} blocks; pass 0 (the stem) to "
        f"{count - 1} (the top), or -{count} to -1 counting from the top. Its blocks, "
        f"with the shape of each one's output:",
        "  block (from the top)  output  layers",
        *describe_blocks(outputs)]))


def cut_backbone(backbone, cut_at):
    """`backbone` up to the end of block `cut_at`, average-pooled there.

    The cut model shares the backbone's layers, so it holds the backbone's
    weights; it keeps the backbone's name. Cutting at the top block returns
    `backbone` itself.

    Raises:
        UsageError: for a block index out of range; see `resolve`.
    """
    outputs = block_outputs(backbone)
    index = resolve(backbone, cut_at, outputs)
    if index == len(outputs) - 1:
        return backbone
    features = keras.layers.GlobalAveragePooling2D(name=CUT_POOLING_LAYER)(outputs[index][1])
    return keras.Model(backbone.inputs, features, name=backbone.name)
