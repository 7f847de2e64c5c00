"""Training images per second of the project's model, against a plain Keras
model of the same backbone, head, dtype policy and compile settings, measured
in the same run.

    python benchmarks/step_throughput.py [--backbone=resnet50 --image_size=32 ...]
    KERAS_BACKEND=jax python benchmarks/step_throughput.py --mixed_precision=bfloat16 ...

(a) the project's model, phase 1 (frozen backbone) and (b) phase 2 (unfrozen);
(c) the plain Keras reference, both phases. Each feeds one fixed uint8 batch
repeated, so it measures the step, not the input pipeline; each figure is the
median of --repeats timings, taken in turns with the reference's. Then one head-phase epoch on cached backbone
features against the same epoch on images.

Prints each figure, then cached_head_epoch_speedup=X and, last,
ratio_vs_plain_keras=X (the smaller of the two phase ratios).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tl_keras import distribute, pipeline, train  # noqa: E402
from tl_keras import model as model_lib  # noqa: E402

_BACKBONE = flags.DEFINE_string("backbone", "resnet50", "Keras Applications backbone.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Input size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Head size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timings per figure; the median counts.")
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision", "auto", ["auto", "off", "bfloat16", "float16"], "Dtype policy.")
_JIT_COMPILE = flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                                 "XLA-compile the step.")

_COMPILE = dict(optimizer="adamw", weight_decay=0.05, label_smoothing=0.1)


def _batches(batch_size, image_size, classes):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
    labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch_size)]
    return tf.data.Dataset.from_tensors((images, labels)).cache().repeat()


def _images_per_second(models, data, steps, repeats, batch_size):
    """Images/s of each model, timed in turns so drift in the machine's speed
    falls on all of them alike; the median of `repeats` turns each."""
    for model in models:
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)  # Compile, warm up.
    timings = [[] for _ in models]
    for _ in range(repeats):
        for model, times in zip(models, timings):
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
            times.append(time.perf_counter() - start)
    return [steps * batch_size / statistics.median(times) for times in timings]


def _compile(model, phase, jit_compile):
    train.compile_for_phase(
        model, phase, steps_per_epoch=_STEPS.value, num_classes=_CLASSES.value,
        jit_compile=jit_compile, **_COMPILE)


def _plain_keras_model(backbone_name, image_size, classes):
    """The reference: what one writes by hand from the Keras guides."""
    spec = model_lib.backbone_spec(backbone_name)
    backbone = spec.constructor(include_top=False, weights=None,
                                input_shape=(image_size, image_size, 3), pooling="avg")
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8")
    x = spec.preprocess_input(keras.ops.cast(inputs, "float32"))
    x = backbone(x, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs), backbone


def main(argv):
    del argv
    policy, reason = distribute.choose_dtype_policy(
        _MIXED_PRECISION.value, *distribute._accelerators())
    keras.config.set_dtype_policy(policy)
    jit_compile = {"auto": "auto", "true": True, "false": False}[_JIT_COMPILE.value]
    size, batch, classes = _IMAGE_SIZE.value, _BATCH_SIZE.value, _CLASSES.value
    steps, repeats = _STEPS.value, _REPEATS.value
    print(f"{_BACKBONE.value} at {size} px, batch {batch}, {keras.backend.backend()} "
          f"backend, dtype policy {policy} ({reason}), jit_compile={_JIT_COMPILE.value}; "
          f"median of {repeats} x {steps} steps")
    data = _batches(batch, size, classes)
    head, finetune = train.plan_phases(head_epochs=1, head_learning_rate=1e-3,
                                       finetune_epochs=1, finetune_learning_rate=1e-4,
                                       warmup_epochs=0)
    figures = {}

    backbone = model_lib.build_backbone(_BACKBONE.value, size, "none")
    ours = model_lib.build_classifier(backbone, _BACKBONE.value, classes, size, 0.2)
    plain, plain_backbone = _plain_keras_model(_BACKBONE.value, size, classes)

    model_lib.freeze_backbone(backbone)
    plain_backbone.trainable = False
    _compile(ours, head, jit_compile)
    _compile(plain, head, jit_compile)
    figures["ours", 1], figures["plain", 1] = _images_per_second(
        [ours, plain], data, steps, repeats, batch)

    model_lib.unfreeze_backbone(backbone, "all")
    plain_backbone.trainable = True
    for layer in plain_backbone.layers:  # The guides' fine-tuning: BN stays frozen.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    _compile(ours, finetune, jit_compile)
    _compile(plain, finetune, jit_compile)
    figures["ours", 2], figures["plain", 2] = _images_per_second(
        [ours, plain], data, steps, repeats, batch)

    for phase, name in ((1, "phase 1, frozen backbone"), (2, "phase 2, unfrozen")):
        print(f"(a/b) tl_keras {name}: {figures['ours', phase]:,.0f} images/s")
        print(f"(c)   plain Keras {name}: {figures['plain', phase]:,.0f} images/s")

    # One head-phase epoch of steps * repeats batches: on images, and on
    # features the backbone computed once beforehand.
    epoch_steps = steps * repeats
    model_lib.freeze_backbone(backbone)
    _compile(ours, head, jit_compile)
    ours.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
    start = time.perf_counter()
    ours.fit(data, steps_per_epoch=epoch_steps, epochs=1, verbose=0)
    uncached = time.perf_counter() - start
    images, labels = next(iter(data))
    features = model_lib.feature_extractor(ours).predict(images, verbose=0)
    feature_data = pipeline.feature_batches(
        np.tile(features, (epoch_steps, 1)), np.tile(np.argmax(labels, 1), epoch_steps),
        num_classes=classes, batch_size=batch, seed=0)
    head_model = model_lib.head_of(ours)
    _compile(head_model, head, jit_compile)
    head_model.fit(feature_data, steps_per_epoch=1, epochs=1, verbose=0)
    start = time.perf_counter()
    head_model.fit(feature_data, steps_per_epoch=epoch_steps, epochs=1, verbose=0)
    cached = time.perf_counter() - start
    print(f"head-phase epoch of {epoch_steps * batch:,} images: {uncached:.2f} s on images, "
          f"{cached:.2f} s on cached features")

    print(f"phase1_ratio={figures['ours', 1] / figures['plain', 1]:.3f}")
    print(f"phase2_ratio={figures['ours', 2] / figures['plain', 2]:.3f}")
    print(f"cached_head_epoch_speedup={uncached / cached:.2f}")
    ratio = min(figures["ours", phase] / figures["plain", phase] for phase in (1, 2))
    print(f"ratio_vs_plain_keras={ratio:.3f}")


if __name__ == "__main__":
    app.run(main)
