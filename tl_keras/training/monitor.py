"""TensorBoard beyond Keras' callback: per-step learning rate, the phase
boundary, image grids, confusion matrices, the Grad-CAM grid and the HParams
table.

Keras' TensorBoard callback writes the epoch scalars (loss, top-1, top-5, the
learning rate at each epoch's end) to `tensorboard/train` and
`tensorboard/validation`. This module writes to the run's own log,
`tensorboard/run`, on the same epoch and step axes.
"""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from tl_keras.outputs import evaluate
from tl_keras.outputs import plots
from tl_keras.training import optimization
from tl_keras.training import recipe

RUN_LOG = "run"
GRADCAM_TAG = "test_gradcam"
PHASE_NUMBERS = {recipe.HEAD_PHASE: 0, recipe.FINETUNE_PHASE: 1}


def phase_number(name):
    """0 for the head phase, 1 for fine-tuning, 1 + N for self-training round N."""
    round_number = recipe.self_training_round(name)
    return PHASE_NUMBERS[name] if round_number is None else 1 + round_number


class RunLog:
    """A summary writer for `tensorboard/run`, and what goes into it."""

    def __init__(self, tensorboard_dir):
        self.directory = os.path.join(tensorboard_dir, RUN_LOG)
        self.writer = tf.summary.create_file_writer(self.directory)

    def image(self, tag, png, step, description=None):
        with self.writer.as_default():
            tf.summary.image(tag, tf.io.decode_png(png)[None], step=step,
                             description=description)
        self.writer.flush()

    def learning_rates(self, phase, steps_per_epoch, epoch):
        """The learning rate of every step of one epoch, on the global step axis.

        Computed from the phase's schedule, so training steps never wait on it.
        """
        schedule = optimization.learning_rate_schedule(phase, steps_per_epoch)
        first = (epoch - phase.first_epoch) * steps_per_epoch
        with self.writer.as_default():
            for step in range(first, first + steps_per_epoch):
                rate = schedule(step) if callable(schedule) else schedule
                tf.summary.scalar("learning_rate_per_step", float(keras.ops.convert_to_numpy(rate)),
                                  step=phase.first_epoch * steps_per_epoch + step)
            # A step function, 0 in the head phase and 1 in fine-tuning, that
            # marks the boundary on the epoch axis of every other chart.
            tf.summary.scalar("phase", phase_number(phase.name), step=epoch,
                              description="0: head phase, 1: fine-tuning, 1 + N: "
                                          "self-training round N")
        self.writer.flush()

    def training_inputs(self, batches, class_names, count=16):
        """A grid of (augmented) training images with their labels, at step 0."""
        # A batch may carry sample weights (--class_weight) after its labels.
        images, labels = next(iter(batches))[:2]
        images, labels = images.numpy()[:count], labels.numpy()[:count]
        titles = []
        for label in labels:
            best = int(np.argmax(label))
            weight = "" if label[best] > 0.999 else f" ({label[best]:.0%})"
            titles.append(f"{class_names[best]}{weight}")
        self.image("training_inputs", plots.image_grid(images, titles), step=0,
                   description="Training batch as the model sees it, augmentation included.")

    def hparams(self, config):
        """The run's configuration, for TensorBoard's HParams table."""
        with self.writer.as_default():
            hparams_api.hparams(_hparams_values(config))
        self.writer.flush()

    def final_metrics(self, metrics, step):
        with self.writer.as_default():
            for name, value in metrics.items():
                tf.summary.scalar(f"final/{name}", value, step=step)
        self.writer.flush()

    def gradcam(self, png, step):
        """The test split's Grad-CAM grid, from `tl_keras.outputs.gradcam.grid`."""
        self.image(GRADCAM_TAG, png, step=step,
                   description="Grad-CAM heatmaps, for the predicted class, over the most "
                               "confident wrong test predictions, then a few of the most "
                               "confident right ones.")


class PhaseMonitor(keras.callbacks.Callback):
    """Writes one phase's boundary, its per-step learning rate and, at its
    end, the validation confusion matrix; each once, also when the phase is
    resumed part-way through an epoch (and so takes two fits) or after a kill.
    """

    def __init__(self, run_log, phase, steps_per_epoch, validation_batches, class_names,
                 classifier):
        super().__init__()
        # The whole classifier, even while a phase fits only its head.
        self.classifier = classifier
        self.run_log = run_log
        self.phase = phase
        self.steps_per_epoch = steps_per_epoch
        self.validation_batches = validation_batches
        self.class_names = class_names
        # The last epoch this process trained; None before any.
        self.last_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        # At the end of the phase's first epoch, not at the start of a fit: a
        # rerun's fits start inside a phase that began in an earlier process.
        if epoch == self.phase.first_epoch:
            with self.run_log.writer.as_default():
                tf.summary.text("phase_boundary",
                                f"Epoch {self.phase.first_epoch + 1}: the "
                                f"{self.phase.name} phase starts.",
                                step=self.phase.first_epoch)
        self.run_log.learning_rates(self.phase, self.steps_per_epoch, epoch)
        self.last_epoch = epoch

    def on_train_end(self, logs=None):
        # Only the fit that ends the phase: at its last epoch, or stopped
        # early. (Not the fit of a resumed epoch's remaining batches, nor the
        # one that trains no epoch to finish a phase stopped before a kill.)
        last = self.phase.first_epoch + self.phase.epochs - 1
        if self.last_epoch is None or not (self.last_epoch == last
                                           or self.model.stop_training):
            return
        probabilities, labels = evaluate.predictions_and_labels(
            self.validation_batches, evaluate.keras_predictor(self.classifier))
        report = evaluate.classification_report(probabilities, labels, self.class_names)
        self.run_log.image(
            f"validation_confusion_matrix/{self.phase.name}",
            plots.confusion_matrix(report["confusion"], self.class_names,
                                   title=f"Validation, end of the {self.phase.name} phase"),
            step=self.last_epoch,
        )


def _hparams_values(config):
    """The configuration as HParams values: strings, numbers and booleans only."""
    values = {}
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        values[name] = "" if value is None else value
    return values
