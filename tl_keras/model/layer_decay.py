"""Layer-wise learning-rate decay: the backbone's blocks, and optimizers that
give each block its own learning rate.

Backend-agnostic: only `keras`. With `--layer_decay=F`, fine-tuning trains the
head at the peak learning rate, the backbone's top block at F times it, the
next at F**2, and so on down to the stem, as BEiT and timm's `--layer-decay`
do: the lower a block, the more general its pretrained features, and the less
they should move.

Keras 3 has no per-variable learning rate, and scaling a gradient doesn't
scale an Adam or RMSprop update (they divide it by its own running scale), so
the optimizers here scale the learning rate itself, variable by variable.
"""

import dataclasses

import keras
from keras import ops


@dataclasses.dataclass(frozen=True)
class Block:
    """A run of the backbone's layers that shares one learning rate.

    Attributes:
        first, last: the names of its first and last layers that hold weights.
        weights: every weight of its layers.
        end: the name of its last layer, weights or not: the block's output
            is that layer's (`--cut_at` cuts there).
    """

    first: str
    last: str
    weights: tuple
    end: str = ""


def backbone_blocks(backbone):
    """Splits a backbone into its blocks, from the structure of its graph.

    A cut point is a layer (or operation) that every path from the input to the
    output passes through. Between two cut points where paths join by
    addition or concatenation lies a block: a residual block (ResNet,
    MobileNetV2/V3, EfficientNet, ConvNeXt), an Inception module, a DenseNet
    layer. Paths that join by multiplication (a squeeze-and-excitation gate)
    scale the features within a block rather than end one. The plain chains
    between blocks (the stem, a block without a shortcut, the last
    convolution) are a block each. A backbone that is one chain throughout
    (VGG, MobileNet) is split into its stages instead: a new block starts at
    each pooling or strided layer. Layers without weights join the block
    before them (the first block, for those before any weights).

    Args:
        backbone: a functional model, e.g. from
            `tl_keras.model.backbones.build_backbone`.

    Returns:
        A list of `Block`s, from the input (the stem) to the output (the top).
    """
    operations = backbone.operations
    inputs = _inbound_positions(operations)
    cuts = _cut_points(inputs)
    block_ends = [index for index in cuts
                  if len(inputs[index]) > 1 and not _is_gate(operations[index])]
    runs = _split_at_block_ends(len(operations), cuts, block_ends)
    if not block_ends:
        runs = _split_at_downsampling(operations, runs[0])
    return _merge_weightless([[operations[i] for i in run] for run in runs])


def _inbound_positions(operations):
    """For each operation, the positions of the operations it takes inputs from."""
    position = {id(operation): index for index, operation in enumerate(operations)}
    inputs = []
    for index, operation in enumerate(operations):
        sources = {position[id(tensor._keras_history.operation)]
                   for node in operation._inbound_nodes
                   for tensor in node.input_tensors
                   if id(tensor._keras_history.operation) in position}
        if any(source >= index for source in sources):
            raise ValueError(f"{operation.name} comes before one of its inputs: the "
                             f"operations are not in topological order.")
        inputs.append(sorted(sources))
    return inputs


def _cut_points(inputs):
    """Positions no edge of the graph jumps over. In topological order, a path
    can only get past position k by an edge from before k to after it."""
    cuts = []
    reach = -1  # the furthest position an edge from before here goes to
    furthest = [-1] * len(inputs)
    for target, sources in enumerate(inputs):
        for source in sources:
            furthest[source] = max(furthest[source], target)
    for index in range(len(inputs)):
        if reach <= index:
            cuts.append(index)
        reach = max(reach, furthest[index])
    return cuts


def _is_gate(operation):
    # keras.layers.Multiply, and the multiplication of KerasTensors (`x * y`).
    return type(operation).__name__ == "Multiply"


def _split_at_block_ends(count, cuts, block_ends):
    """Each block end closes a block that starts after the cut point before it;
    the stretches between blocks are blocks of their own."""
    previous_cut = {end: max(cut for cut in cuts if cut < end) for end in block_ends}
    runs, start = [], 0
    for end in block_ends:
        block_start = previous_cut[end] + 1
        if block_start > start:
            runs.append(list(range(start, block_start)))
        runs.append(list(range(block_start, end + 1)))
        start = end + 1
    if start < count:
        runs.append(list(range(start, count)))
    return runs


def _split_at_downsampling(operations, run):
    runs = [[]]
    for index in run:
        if runs[-1] and _downsamples(operations[index]):
            runs.append([])
        runs[-1].append(index)
    return runs


def _downsamples(operation):
    strides = getattr(operation, "strides", None) or (1,)
    return any(stride > 1 for stride in strides)


def _merge_weightless(runs):
    blocks, pending = [], []
    for run in runs:
        layers = pending + run
        weighted = [layer for layer in layers if getattr(layer, "weights", None)]
        if not weighted:
            if blocks:
                blocks[-1] = dataclasses.replace(
                    blocks[-1], weights=blocks[-1].weights + _weights_of(layers),
                    end=layers[-1].name)
            else:
                pending = layers
            continue
        pending = []
        blocks.append(Block(first=weighted[0].name, last=weighted[-1].name,
                            weights=_weights_of(layers), end=layers[-1].name))
    return blocks


def _weights_of(layers):
    return tuple(weight for layer in layers for weight in getattr(layer, "weights", ()))


@dataclasses.dataclass(frozen=True)
class LayerRates:
    """Each weight's factor on the learning rate.

    Attributes:
        decay: `--layer_decay`, F.
        blocks: the backbone's `Block`s, from the stem to the top.
        factors: a dict from `id()` of each backbone weight to its block's
            factor, F**(depth from the top): F for the top block, F**2 for the
            one below, and so on. Every other weight (the head's) gets 1.
    """

    decay: float
    blocks: list
    factors: dict

    def describe(self, peak_learning_rate):
        """One line: the learning rates of the head, the top block and the stem."""
        top, stem = self.blocks[-1], self.blocks[0]
        return (
            f"Layer-wise learning-rate decay {self.decay:g}: the head and "
            f"{len(self.blocks)} backbone blocks. Peak learning rate "
            f"{peak_learning_rate:.3g} for the head, "
            f"{peak_learning_rate * self.decay:.3g} for the top block ({_span(top)}), "
            f"down to {peak_learning_rate * self.decay ** len(self.blocks):.3g} for the "
            f"stem ({_span(stem)}).")


def _span(block):
    return block.first if block.first == block.last else f"{block.first} to {block.last}"


def layer_rates(backbone, decay):
    """The learning-rate factor of each backbone weight; see `LayerRates`."""
    blocks = backbone_blocks(backbone)
    factors = {}
    for depth, block in enumerate(reversed(blocks), start=1):
        for weight in block.weights:
            factors[id(weight)] = decay ** depth
    return LayerRates(decay=decay, blocks=blocks, factors=factors)


class _PerVariableRate:
    """Mixed into a Keras optimizer: each variable trains at the learning rate
    times its own factor, weight decay included (as timm scales a parameter
    group's whole rate).

    The factors are not part of the optimizer's configuration: one reloaded
    from `model.keras` trains every variable at the same rate.

    Args:
        rate_factors: a dict from `id()` of a variable to its factor; a
            variable not in it gets 1. Defaults to None, all 1.
    """

    def __init__(self, *args, rate_factors=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._factor_by_id = dict(rate_factors or {})

    def build(self, variables):
        super().build(variables)
        # In the order of `_get_variable_index`, which finds a variable under
        # any backend (a replica's copy under tf.distribute too).
        self._rate_factors = [self._factor_by_id.get(id(v), 1.0) for v in variables]
        self._decayed = [self.weight_decay is not None and self._use_weight_decay(v)
                         for v in variables]

    def _apply_weight_decay(self, variables):
        # Applied in update_step instead, at each variable's own rate.
        pass

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        learning_rate = ops.multiply(learning_rate, self._rate_factors[index])
        if self._decayed[index]:
            rate = ops.cast(ops.multiply(learning_rate, self.weight_decay), variable.dtype)
            self.assign_sub(variable, ops.multiply(variable, rate))
        super().update_step(gradient, variable, learning_rate)


# Registered, so that a model.keras saved while one of these optimizers
# trained it loads (`tl_keras.model.classifier` imports this module).
@keras.saving.register_keras_serializable(package="tl_keras")
class LayerRateAdamW(_PerVariableRate, keras.optimizers.AdamW):
    """AdamW with a learning-rate factor per variable."""


@keras.saving.register_keras_serializable(package="tl_keras")
class LayerRateAdam(_PerVariableRate, keras.optimizers.Adam):
    """Adam with a learning-rate factor per variable."""


@keras.saving.register_keras_serializable(package="tl_keras")
class LayerRateSGD(_PerVariableRate, keras.optimizers.SGD):
    """SGD with a learning-rate factor per variable."""


@keras.saving.register_keras_serializable(package="tl_keras")
class LayerRateRMSprop(_PerVariableRate, keras.optimizers.RMSprop):
    """RMSprop with a learning-rate factor per variable."""


OPTIMIZERS = {"adamw": LayerRateAdamW, "adam": LayerRateAdam, "sgd": LayerRateSGD,
              "rmsprop": LayerRateRMSprop}
