"""What a phase resumed part-way through an epoch writes to TensorBoard's run
log and prints: each phase's boundary and confusion matrix once, and its
epochs numbered out of the phase's last, though the phase takes two fits."""

import collections
import contextlib
import io
import os
import signal

import keras
import pytest
import tensorflow as tf

import tiny_training
from tl_keras import rundir
from tl_keras.errors import Preempted
from tl_keras.training import monitor

HEAD_EPOCHS, FINETUNE_EPOCHS = 3, 1
STEPS_PER_EPOCH = 2
# SIGTERM during the first batch of this epoch (from 0) of the head phase.
TERMINATED_EPOCH = 1


class _TerminateAfterFirstBatch(keras.callbacks.Callback):
    """Sends SIGTERM during the first batch of `TERMINATED_EPOCH`: the run
    backs up the epoch part-way and stops."""

    def __init__(self):
        super().__init__()
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == TERMINATED_EPOCH and batch == 0:
            signal.raise_signal(signal.SIGTERM)


def _train(model_dir, *extra_callbacks):
    """The tiny classifier's two phases, with `tl_keras.training.monitor.PhaseMonitor`
    writing to `model_dir/tensorboard/run`; what Keras printed (verbose=2)."""
    model, backbone = tiny_training.build()
    run_log = monitor.RunLog(rundir.RunPaths(str(model_dir)).tensorboard)
    validation = tiny_training.one_batch().take(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            tiny_training.train_phases(
                model, backbone, model_dir, head_epochs=HEAD_EPOCHS,
                finetune_epochs=FINETUNE_EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
                verbose=2,
                phase_callbacks=lambda phase: [
                    monitor.PhaseMonitor(run_log, phase, STEPS_PER_EPOCH,
                                         validation, ["a", "b", "c"], model),
                    *extra_callbacks])
        finally:
            run_log.writer.close()
    return printed.getvalue()


@pytest.fixture(scope="module")
def resumed_mid_epoch(tmp_path_factory):
    """(the run's folder, what the rerun printed)."""
    model_dir = tmp_path_factory.mktemp("resumed")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Preempted, match="stopped after batch 1 of epoch 2"):
            _train(model_dir, _TerminateAfterFirstBatch())
    finally:
        # The killed run's watcher leaves its handler installed.
        signal.signal(signal.SIGTERM, handler)
    return model_dir, _train(model_dir)


def _summaries_by_tag_and_step(directory):
    """{(tag, step): how many times it was written}, over every event file."""
    counts = collections.Counter()
    for name in os.listdir(directory):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
            for value in event.summary.value:
                counts[value.tag, event.step] += 1
    return counts


def test_each_phase_boundary_and_confusion_matrix_is_written_once(resumed_mid_epoch):
    model_dir, _ = resumed_mid_epoch
    counts = _summaries_by_tag_and_step(os.path.join(model_dir, "tensorboard", "run"))

    written = {key: count for key, count in counts.items()
               if key[0] == "phase_boundary" or key[0].startswith("validation_confusion")}
    last_head_epoch = HEAD_EPOCHS - 1
    assert written == {("phase_boundary", 0): 1,
                       ("phase_boundary", HEAD_EPOCHS): 1,
                       ("validation_confusion_matrix/head", last_head_epoch): 1,
                       ("validation_confusion_matrix/finetune", HEAD_EPOCHS): 1}
    # And each step's learning rate once, the resumed epoch's included.
    steps = HEAD_EPOCHS + FINETUNE_EPOCHS
    rates = {step: count for (tag, step), count in counts.items()
             if tag == "learning_rate_per_step"}
    assert rates == {step: 1 for step in range(steps * STEPS_PER_EPOCH)}


def test_the_resumed_epoch_is_numbered_out_of_the_phases_last(resumed_mid_epoch):
    _, printed = resumed_mid_epoch
    epoch_lines = [line for line in printed.splitlines() if line.startswith("Epoch ")]
    # As an uninterrupted run numbers them: the resumed epoch 2 of the head's
    # 3, not "Epoch 2/2".
    assert epoch_lines == ["Epoch 2/3", "Epoch 3/3", "Epoch 4/4"]
