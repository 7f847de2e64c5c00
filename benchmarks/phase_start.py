"""Seconds from a phase's `fit` to its first finished step, with the optimizer
built at compile time (`tl_keras.training.optimization.build_optimizer`, as
training does), against the same compile without that build, measured in the
same run.

    python benchmarks/phase_start.py [--backbone=mobilenet --image_size=32 ...]

Under TensorFlow's default strategy, Keras leaves the optimizer's variables to
the train step's first trace; TensorFlow then traces the step again, as it
does for any tf.function whose first call created variables. A phase's first
step is mostly that tracing, so it is what a run waits for before each phase
trains (and what each short run of the test suite pays).

Each round builds a fresh classifier (random weights) for each arm, in turns
(ABBA), and times one `fit` of one step for the head phase, then for the
fine-tuning phase (--unfreeze=all). Prints each arm's median per phase, the
traces of the train step each arm made, and, last,
phase_start_speedup=X: the unbuilt arm's median time to both phases' first
steps over the built arm's.
"""

import contextlib
import os
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tl_keras import console  # noqa: E402

# Before TensorFlow loads, as in run.py: library chatter off unless --verbosity.
console.quiet_startup(sys.argv)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tl_keras.model import backbones  # noqa: E402
from tl_keras.model import classifier as classifier_lib  # noqa: E402
from tl_keras.training import finetune  # noqa: E402
from tl_keras.training import optimization  # noqa: E402
from tl_keras.training import recipe  # noqa: E402

_BACKBONE = flags.DEFINE_string("backbone", "mobilenet", "Keras Applications backbone.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Input size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Head size.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds of both arms, taken in turns (ABBA).")

_ARMS = ("built", "unbuilt")


def _batches():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (_BATCH_SIZE.value, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3),
                          np.uint8)
    labels = np.eye(_CLASSES.value, dtype=np.float32)[
        rng.integers(0, _CLASSES.value, _BATCH_SIZE.value)]
    return tf.data.Dataset.from_tensors((images, labels)).cache().repeat()


def _time_phase_starts(arm, batches):
    """(seconds to the head phase's first step, to fine-tuning's, traces of
    the train step) for a fresh classifier."""
    backbone = backbones.build_backbone(_BACKBONE.value, _IMAGE_SIZE.value, "none")
    model = classifier_lib.build_classifier(backbone, _BACKBONE.value, _CLASSES.value,
                                            _IMAGE_SIZE.value, 0.2)
    traces = []
    train_step = model.train_step

    def counted_train_step(data):
        traces.append(1)  # Python runs it only while tracing.
        return train_step(data)

    model.train_step = counted_train_step
    head, finetuning = recipe.plan_phases(
        head_epochs=1, head_learning_rate=1e-3, finetune_epochs=1,
        finetune_learning_rate=1e-4, warmup_epochs=None)
    seconds = []
    skip_build = (mock.patch.object(optimization, "build_optimizer", lambda model: None)
                  if arm == "unbuilt" else contextlib.nullcontext())
    with skip_build:
        for phase, set_trainable in ((head, lambda: finetune.freeze_backbone(backbone)),
                                     (finetuning,
                                      lambda: finetune.unfreeze_backbone(backbone, "all"))):
            set_trainable()
            optimization.compile_for_phase(
                model, phase, steps_per_epoch=1, optimizer="adamw", weight_decay=0.05,
                label_smoothing=0.1, num_classes=_CLASSES.value, jit_compile=False)
            start = time.perf_counter()
            model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0)
            seconds.append(time.perf_counter() - start)
    keras.backend.clear_session()
    return seconds[0], seconds[1], len(traces)


def main(argv):
    del argv
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("Keras builds the optimizer before the first trace on other "
                         "backends; run this with KERAS_BACKEND=tensorflow.")
    batches = _batches()
    _time_phase_starts("built", batches)  # Untimed: TensorFlow's own first-use costs.
    timings = {arm: [] for arm in _ARMS}
    order = []
    for round_index in range(_ROUNDS.value):
        order += list(_ARMS if round_index % 2 == 0 else reversed(_ARMS))
    for arm in order:
        timings[arm].append(_time_phase_starts(arm, batches))
    print(f"{_BACKBONE.value} at {_IMAGE_SIZE.value} px, batch {_BATCH_SIZE.value}, "
          f"{_ROUNDS.value} rounds; seconds to each phase's first step (median):")
    totals = {}
    for arm in _ARMS:
        head = statistics.median(t[0] for t in timings[arm])
        finetuning = statistics.median(t[1] for t in timings[arm])
        traces = sorted({t[2] for t in timings[arm]})
        totals[arm] = statistics.median(t[0] + t[1] for t in timings[arm])
        print(f"  {arm:8s} head {head:6.2f} s, fine-tuning {finetuning:6.2f} s, "
              f"both {totals[arm]:6.2f} s; train-step traces for both phases: {traces}")
    print(f"phase_start_speedup={totals['unbuilt'] / totals['built']:.2f}")


if __name__ == "__main__":
    app.run(main)
