"""Training images per second of the project's model, against a plain Keras
model of the same backbone, head, dtype policy and compile settings, measured
in the same run.

    python benchmarks/step_throughput.py [--backbone=resnet50 --image_size=32 ...]
    KERAS_BACKEND=jax python benchmarks/step_throughput.py --mixed_precision=bfloat16 ...

Under JAX or PyTorch it needs no TensorFlow (see `FixedBatch`).

(a) the project's model, phase 1 (frozen backbone) and (b) phase 2 (unfrozen);
(c) the plain Keras reference, both phases. Each feeds one fixed uint8 batch
repeated, so it measures the step, not the input pipeline. Each model is timed
in processes of its own, --rounds per model taken in turns (ABBA), each timing
--repeats runs of --steps steps.

Each figure is the fastest of those timings, with the median beside it. On the
two-core CPU machine, the same model's 10-step timings jump between two speeds,
one about half the other, from one timing to the next, in any process (see
BENCHMARKS.md). The median of such a mix falls in whichever speed had more
timings, so it compares luck; the fastest timing compares the steps.

Then one head-phase epoch on cached backbone features against the same epoch on
images.

Prints each figure, then cached_head_epoch_speedup=X and, last,
ratio_vs_plain_keras=X (the smaller of the two phase ratios).
"""

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tl_keras import console  # noqa: E402

# Before TensorFlow loads, as in run.py: library chatter off unless --verbosity.
console.quiet_startup(sys.argv)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tl_keras.model import backbones  # noqa: E402
from tl_keras.model import classifier as classifier_lib  # noqa: E402
from tl_keras.model import features  # noqa: E402
from tl_keras.training import finetune  # noqa: E402
from tl_keras.training import optimization  # noqa: E402
from tl_keras.training import precision, recipe  # noqa: E402

_BACKBONE = flags.DEFINE_string("backbone", "resnet50", "Keras Applications backbone.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Input size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Head size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timings per process and phase.")
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision", "auto", ["auto", "off", "bfloat16", "float16"], "Dtype policy.")
_JIT_COMPILE = flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                                 "XLA-compile the step.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Processes per model, taken in turns (ABBA).")
_SHOW_TIMINGS = flags.DEFINE_boolean(
    "show_timings", False, "Also print each process's timings, in images/s.")
_MODEL = flags.DEFINE_enum(
    "model", None, ["tl_keras", "plain"],
    "Internal: time only this model, in this process, and print its timings.")

_TIMINGS_PREFIX = "timings="

_COMPILE = dict(optimizer="adamw", weight_decay=0.05, label_smoothing=0.1)


class FixedBatch:
    """One fixed batch, fed to `fit` again and again.

    Under TensorFlow it comes from a cached, repeated tf.data dataset. Other
    backends get it as device arrays of `steps` copies that Keras slices, so
    the benchmark runs without TensorFlow installed (as on the GPU machines,
    which have JAX): call `prepare(steps)` before timing.
    """

    def __init__(self, inputs, labels, batch_size):
        self.inputs, self.labels, self.batch_size = inputs, labels, batch_size
        self._dataset = None
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            self._dataset = tf.data.Dataset.from_tensors((inputs, labels)).cache().repeat()
        self._arrays = {}

    def prepare(self, steps):
        if self._dataset is None and steps not in self._arrays:
            self._arrays[steps] = tuple(
                keras.ops.convert_to_tensor(np.concatenate([array] * steps))
                for array in (self.inputs, self.labels))

    def fit(self, model, steps):
        """`steps` training steps of `model` on the batch."""
        if self._dataset is not None:
            model.fit(self._dataset, steps_per_epoch=steps, epochs=1, verbose=0)
            return
        self.prepare(steps)
        inputs, labels = self._arrays[steps]
        model.fit(inputs, labels, batch_size=self.batch_size, shuffle=False, epochs=1,
                  verbose=0)


def _fixed_batch(batch_size, image_size, classes):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
    labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch_size)]
    return FixedBatch(images, labels, batch_size)


def _seconds_per_fit(model, batch, steps, repeats):
    """`repeats` timings of `steps` training steps, after one untimed warm-up."""
    batch.fit(model, steps)  # Compile, warm up.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        batch.fit(model, steps)
        times.append(time.perf_counter() - start)
    return times


def _compile(model, phase, jit_compile):
    optimization.compile_for_phase(
        model, phase, steps_per_epoch=_STEPS.value, num_classes=_CLASSES.value,
        jit_compile=jit_compile, **_COMPILE)


def _plain_keras_model(backbone_name, image_size, classes):
    """The reference: what one writes by hand from the Keras guides."""
    spec = backbones.backbone_spec(backbone_name)
    backbone = spec.constructor(include_top=False, weights=None,
                                input_shape=(image_size, image_size, 3), pooling="avg")
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8")
    x = spec.preprocess_input(keras.ops.cast(inputs, "float32"))
    x = backbone(x, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs), backbone


def _setup():
    """Sets the dtype policy; returns (jit_compile, policy, reason, phase plans)."""
    policy, reason = precision.choose_dtype_policy(
        _MIXED_PRECISION.value, *precision.accelerators())
    keras.config.set_dtype_policy(policy)
    jit_compile = {"auto": "auto", "true": True, "false": False}[_JIT_COMPILE.value]
    phases = recipe.plan_phases(head_epochs=1, head_learning_rate=1e-3,
                                finetune_epochs=1, finetune_learning_rate=1e-4,
                                warmup_epochs=0)
    return jit_compile, policy, reason, phases


def _model_to_time(name, size, classes):
    """One model and its two phase settings: (model, freeze, unfreeze)."""
    if name == "tl_keras":
        backbone = backbones.build_backbone(_BACKBONE.value, size, "none")
        model = classifier_lib.build_classifier(backbone, _BACKBONE.value, classes, size, 0.2)
        return (model, lambda: finetune.freeze_backbone(backbone),
                lambda: finetune.unfreeze_backbone(backbone, "all"))
    model, backbone = _plain_keras_model(_BACKBONE.value, size, classes)

    def freeze():
        backbone.trainable = False

    def unfreeze():
        backbone.trainable = True
        for layer in backbone.layers:  # The guides' fine-tuning: BN stays frozen.
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False

    return model, freeze, unfreeze


def _time_one_model(name):
    """Child process: both phases of one model; prints their timings as JSON."""
    jit_compile, _, _, (head_plan, finetune_plan) = _setup()
    size, batch, classes = _IMAGE_SIZE.value, _BATCH_SIZE.value, _CLASSES.value
    fixed_batch = _fixed_batch(batch, size, classes)
    model, freeze, unfreeze = _model_to_time(name, size, classes)
    timings = {}
    for phase, (set_trainable, plan) in enumerate(
            ((freeze, head_plan), (unfreeze, finetune_plan)), start=1):
        set_trainable()
        _compile(model, plan, jit_compile)
        timings[phase] = _seconds_per_fit(model, fixed_batch, _STEPS.value, _REPEATS.value)
    print(_TIMINGS_PREFIX + json.dumps(timings), flush=True)


def _timings_in_a_process(name):
    """Runs this script for one model in a fresh process; returns its timings."""
    passed = [arg for arg in sys.argv[1:]
              if not arg.startswith(("--model=", "--rounds=", "--show_timings"))]
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *passed,
                             f"--model={name}"], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines()
             if line.startswith(_TIMINGS_PREFIX)]
    if result.returncode != 0 or not lines:
        sys.exit(f"Timing {name} failed (exit status {result.returncode}):\n"
                 f"{result.stderr[-3000:]}")
    return {int(phase): times for phase, times in
            json.loads(lines[-1][len(_TIMINGS_PREFIX):]).items()}


def _cached_head_epoch(jit_compile, head, fixed_batch, steps, classes):
    """Seconds of one head-phase epoch on images, and on cached features."""
    backbone = backbones.build_backbone(_BACKBONE.value, _IMAGE_SIZE.value, "none")
    ours = classifier_lib.build_classifier(backbone, _BACKBONE.value, classes,
                                           _IMAGE_SIZE.value, 0.2)
    finetune.freeze_backbone(backbone)
    _compile(ours, head, jit_compile)
    fixed_batch.fit(ours, 1)  # Compile, warm up.
    fixed_batch.prepare(steps)
    start = time.perf_counter()
    fixed_batch.fit(ours, steps)
    uncached = time.perf_counter() - start
    # The head trains on the backbone's features of the same batch.
    head_inputs = features.feature_extractor(ours).predict(fixed_batch.inputs, verbose=0)
    head_model = features.head_of(ours)
    _compile(head_model, head, jit_compile)
    if keras.backend.backend() == "tensorflow":
        # The run's own path (`--cache_features`): shuffled tf.data batches read
        # from the features in memory.
        from tl_keras.data import pipeline

        batches = pipeline.feature_batches(
            np.tile(head_inputs, (steps, 1)), np.tile(np.argmax(fixed_batch.labels, 1), steps),
            num_classes=classes, batch_size=fixed_batch.batch_size, seed=0)

        def fit_head(count):
            head_model.fit(batches, steps_per_epoch=count, epochs=1, verbose=0)
    else:
        feature_batch = FixedBatch(head_inputs, fixed_batch.labels, fixed_batch.batch_size)
        feature_batch.prepare(steps)

        def fit_head(count):
            feature_batch.fit(head_model, count)
    fit_head(1)  # Compile, warm up.
    start = time.perf_counter()
    fit_head(steps)
    cached = time.perf_counter() - start
    return uncached, cached


def main(argv):
    del argv
    if _MODEL.value:
        _time_one_model(_MODEL.value)
        return
    jit_compile, policy, reason, (head, _) = _setup()
    size, batch, classes = _IMAGE_SIZE.value, _BATCH_SIZE.value, _CLASSES.value
    steps, repeats, rounds = _STEPS.value, _REPEATS.value, _ROUNDS.value
    print(f"{_BACKBONE.value} at {size} px, batch {batch}, {keras.backend.backend()} "
          f"backend, dtype policy {policy} ({reason}), jit_compile={_JIT_COMPILE.value}; "
          f"{rounds} processes x {repeats} timings of {steps} steps per model", flush=True)

    timings = {("ours", 1): [], ("ours", 2): [], ("plain", 1): [], ("plain", 2): []}
    models = [("tl_keras", "ours"), ("plain", "plain")]
    for round_ in range(rounds):
        # Each model goes first in every other round (ABBA), so neither always
        # runs right after a pause or right after the other.
        for name, key in models if round_ % 2 == 0 else models[::-1]:
            for phase, times in _timings_in_a_process(name).items():
                timings[key, phase] += times
                if _SHOW_TIMINGS.value:
                    print(f"{name} phase {phase}: "
                          f"{[round(steps * batch / seconds) for seconds in times]}",
                          flush=True)
    figures = {key: steps * batch / min(times) for key, times in timings.items()}
    medians = {key: steps * batch / statistics.median(times)
               for key, times in timings.items()}
    for phase, name in ((1, "phase 1, frozen backbone"), (2, "phase 2, unfrozen")):
        for key, label in (("ours", "(a/b) tl_keras"), ("plain", "(c)   plain Keras")):
            print(f"{label} {name}: {figures[key, phase]:,.0f} images/s fastest, "
                  f"{medians[key, phase]:,.0f} median")

    # One head-phase epoch of steps * repeats batches: on images, and on
    # features the backbone computed once beforehand.
    epoch_steps = steps * repeats
    uncached, cached = _cached_head_epoch(
        jit_compile, head, _fixed_batch(batch, size, classes), epoch_steps, classes)
    print(f"head-phase epoch of {epoch_steps * batch:,} images: {uncached:.2f} s on images, "
          f"{cached:.2f} s on cached features")

    print(f"phase1_ratio={figures['ours', 1] / figures['plain', 1]:.3f} (medians: "
          f"{medians['ours', 1] / medians['plain', 1]:.3f})")
    print(f"phase2_ratio={figures['ours', 2] / figures['plain', 2]:.3f} (medians: "
          f"{medians['ours', 2] / medians['plain', 2]:.3f})")
    print(f"cached_head_epoch_speedup={uncached / cached:.2f}")
    ratio = min(figures["ours", phase] / figures["plain", phase] for phase in (1, 2))
    print(f"ratio_vs_plain_keras={ratio:.3f}")


if __name__ == "__main__":
    app.run(main)
