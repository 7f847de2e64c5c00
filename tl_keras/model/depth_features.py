"""`--mode=probe`'s features: the backbone's pooled output at the end of each
probed block, for train and validation, computed in one pass.

Backend-agnostic: only `keras` (and numpy for the arrays). The features are
kept as the head phase's cached features are (`tl_keras.model.features`): in
memory when they fit, else in .npy files.
"""

import dataclasses
import math

import keras
import numpy as np

from tl_keras import progress
from tl_keras.model import classifier as classifier_lib
from tl_keras.model import cut
from tl_keras.model import features as features_lib

# A deeper backbone is probed at every k-th block, so that about this many
# depths are probed (the top always).
MAX_DEPTHS = 24


@dataclasses.dataclass(frozen=True)
class Depth:
    """One probed depth.

    Attributes:
        block: the block's index from the stem (`--cut_at`'s value).
        from_top: its index from the top (-1 is the top).
        layer: the name of the block's last layer.
        dimensions: the number of pooled features there.
    """

    block: int
    from_top: int
    layer: str
    dimensions: int


def probed_blocks(count, every=None):
    """The indices of the blocks to probe, of `count`: every `every`-th from
    the top down, or, when `every` is None, every block of a backbone with at
    most `MAX_DEPTHS` of them and enough for about that many otherwise."""
    every = every or max(1, math.ceil(count / MAX_DEPTHS))
    return sorted(range(count - 1, -1, -every))


def depth_extractor(backbone, backbone_name, image_size, resize, every=None):
    """A model from uint8 images to the pooled features at each probed depth.

    Returns:
        (the model, its list of `Depth`s), the model's outputs in that order.
    """
    outputs = cut.block_outputs(backbone)
    indices = probed_blocks(len(outputs), every)
    images = keras.Input(shape=(None, None, 3), dtype="uint8", name="images")
    preprocessed = classifier_lib.ImagePreprocessing(
        backbone_name, image_size, resize, name="preprocessing")(images)
    pooled = [_pooled(outputs[index][1]) for index in indices]
    at_depths = keras.Model(backbone.inputs, pooled, name="depths")(preprocessed, training=False)
    depths = [Depth(block=index, from_top=index - len(outputs),
                    layer=outputs[index][0].end, dimensions=int(tensor.shape[-1]))
              for index, tensor in zip(indices, pooled)]
    return keras.Model(images, at_depths, name="depth_features"), depths


def _pooled(tensor):
    if len(tensor.shape) == 2:  # the top block's output, pooled by the backbone
        return tensor
    return keras.layers.GlobalAveragePooling2D()(tensor)


def compute(extractor, depths, *, batches_of, sizes, directory):
    """Runs `extractor` once over train and validation.

    Args:
        extractor, depths: from `depth_extractor`.
        batches_of: a function from a split's name to its batches of (uint8
            images, one-hot labels), every example once, in order.
        sizes: the number of examples of each split, by name.
        directory: where features too large for memory are kept.

    Returns:
        A dict from split to (a list of float32 arrays `[examples, dimensions]`,
        one per depth, and int labels `[examples]`).
    """
    total = sizes["train"] + sizes["validation"]
    computed = {}
    with progress.step(f"Computing the features of {total:,} images at {len(depths)} "
                       f"depths", total=total, unit="image") as computing:
        for split in ("train", "validation"):
            arrays = [features_lib.features_array(
                f"{split}_block{depth.block}", sizes[split], depth.dimensions, directory)[0]
                for depth in depths]
            labels = np.empty(sizes[split], np.int64)
            position = 0
            for images, one_hot in batches_of(split):
                batch = len(images)
                values = extractor.predict(images, verbose=0)
                for array, value in zip(arrays, _as_list(values)):
                    array[position:position + batch] = value
                labels[position:position + batch] = np.argmax(one_hot, axis=1)
                position += batch
                computing.advance(batch)
            computed[split] = (arrays, labels)
        computing.result = (f"Computed the features of {sizes['train']:,} train and "
                            f"{sizes['validation']:,} validation images at {len(depths)} "
                            f"depths, once")
    return computed


def _as_list(values):
    return values if isinstance(values, (list, tuple)) else [values]
