"""A classifier small enough to train in a test in a second or two, with a
backbone of three blocks (a stem and two residual blocks), and
`train.train_two_phases` on it with the test's settings."""

import keras
import numpy as np
import tensorflow as tf

from tl_keras import rundir
from tl_keras.training import recipe
from tl_keras.training import train

NUM_CLASSES = 3
IMAGE_SIZE = 16
# Its blocks, from the stem to the top, as `layer_decay.backbone_blocks` finds them.
BLOCKS = ("stem", "block1_conv", "block2_conv")


def build(num_classes=NUM_CLASSES, image_size=IMAGE_SIZE):
    """(classifier, backbone), with the same initial weights every call;
    `image_size=None` takes images of any size."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="stem")(inputs)
    for block in BLOCKS[1:]:
        # Linear, so that every weight gets a gradient.
        residual = keras.layers.Conv2D(4, 3, padding="same", name=block)(x)
        x = keras.layers.Add(name=f"{block}_add")([x, residual])
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="tiny")
    images = keras.Input((image_size, image_size, 3), dtype="uint8")
    features = backbone(keras.layers.Rescaling(1 / 255)(images))
    head = keras.layers.Dense(num_classes, activation="softmax", name="head")
    return keras.Model(images, head(features)), backbone


def one_batch(batch_size=8):
    """The same batch of random images and one-hot labels, again and again:
    every step sees the same examples, however many steps came before, so a
    resumed run can match an uninterrupted one exactly."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, batch_size)]
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def train_phases(model, backbone, model_dir, *, head_epochs=0, finetune_epochs=0,
                 learning_rate=1e-2, steps_per_epoch=2, optimizer="adam", verbose=0,
                 **options):
    """`train.train_two_phases` on `one_batch`, validated on it too; `options`
    are its other keyword arguments."""
    batches = one_batch()
    return train.train_two_phases(
        model, backbone, train_batches=batches, validation_batches=batches.take(1),
        steps_per_epoch=steps_per_epoch,
        phases=phases(head_epochs, finetune_epochs, learning_rate),
        unfreeze="all", optimizer=optimizer, weight_decay=0.0, label_smoothing=0.0,
        num_classes=NUM_CLASSES, jit_compile=False,
        scope=tf.distribute.get_strategy().scope, paths=rundir.RunPaths(str(model_dir)),
        verbose=verbose, **options)


def phases(head_epochs, finetune_epochs, learning_rate):
    return recipe.plan_phases(
        head_epochs=head_epochs, head_learning_rate=learning_rate,
        finetune_epochs=finetune_epochs, finetune_learning_rate=learning_rate,
        warmup_epochs=0)


def count_train_step_traces(model):
    """Returns a list that grows by one each time `model`'s train step is
    traced: under TensorFlow, Python runs the step only while tracing it."""
    traces = []
    train_step = model.train_step

    def counted_train_step(data):
        traces.append(data)
        return train_step(data)

    model.train_step = counted_train_step
    return traces
