"""--ema: the moving average of the weights is what each epoch validates and
what the checkpoints and exports hold; the raw weights train on, also across
a resume."""

import signal

import keras
import numpy as np
import pytest

import tiny_training
from tl_keras import rundir
from tl_keras.training import export_weights

MOMENTUM = 0.5


def _numpy(weight):
    return keras.ops.convert_to_numpy(weight)


class _HeadSpy(keras.callbacks.Callback):
    """The head's kernel after each step (the raw weights that train) and at
    the end of each epoch's validation (the weights it validated), and the
    loss of the weights in the model then on the validation batch."""

    def __init__(self):
        super().__init__()
        self.raw, self.validated, self.validation_losses = [], [], []

    def _kernel(self):
        return _numpy(self.model.get_layer("head").kernel)

    def on_train_batch_end(self, batch, logs=None):
        self.raw.append(self._kernel())

    def on_test_end(self, logs=None):
        self.validated.append(self._kernel())
        images, labels = next(iter(tiny_training.one_batch()))
        loss = keras.losses.categorical_crossentropy(labels, self.model(images))
        self.validation_losses.append((float(np.mean(_numpy(loss))), logs["loss"]))


def _moving_average(values, momentum):
    """Keras' `use_ema`: the first step's weights, then each step's blended in."""
    averages, average = [], values[0]
    for value in values:
        average = momentum * average + (1 - momentum) * value
        averages.append(average)
    return averages


def test_the_average_is_validated_checkpointed_and_kept(tmp_path):
    model, backbone = tiny_training.build()
    spy = _HeadSpy()

    tiny_training.train_phases(model, backbone, tmp_path, head_epochs=2, learning_rate=0.05,
                               ema=MOMENTUM, phase_callbacks=lambda phase: [spy])

    averages = _moving_average(spy.raw, MOMENTUM)
    steps = 2
    for epoch, kernel in enumerate(spy.validated):
        last_step = (epoch + 1) * steps - 1
        np.testing.assert_allclose(kernel, averages[last_step], rtol=1e-5, atol=1e-7)
        assert np.abs(kernel - spy.raw[last_step]).max() > 1e-3, "no different from the raw weights"
    for loss, validation_loss in spy.validation_losses:
        assert loss == pytest.approx(validation_loss, rel=1e-5)

    paths = rundir.RunPaths(str(tmp_path))
    with np.load(paths.phase_end_weights("head")) as phase_end:
        kept = [phase_end[f"arr_{i}"] for i in range(len(phase_end.files))]
    model.set_weights(kept)
    np.testing.assert_allclose(_numpy(model.get_layer("head").kernel), averages[-1], rtol=1e-5)
    # The best checkpoint, what --export_weights=best evaluates and exports.
    exported = export_weights.restore_export_weights(
        model, backbone, "best", phases=tiny_training.phases(2, 0, 0.05), paths=paths,
        unfreeze="all", train_batchnorm=False, label_smoothing=0.0, train_batches=None,
        validation_batches=None)
    best_step = exported["epoch"] * steps - 1
    np.testing.assert_allclose(_numpy(model.get_layer("head").kernel), averages[best_step],
                               rtol=1e-5, atol=1e-7)


class _Killed(Exception):
    pass


@pytest.fixture(autouse=True)
def _sigterm_handler():
    """Puts back the SIGTERM handler a killed run's watcher leaves installed."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


class _KillAtEpoch(keras.callbacks.Callback):
    """Stands for a SIGKILL once `epoch` starts, after the epoch before was
    backed up."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Killed


class _TerminateAfterBatch(keras.callbacks.Callback):
    """Sends SIGTERM during the first batch of `epoch`: the run backs up the
    epoch part-way and stops."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch
        self.current = None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 0:
            signal.raise_signal(signal.SIGTERM)


def _trained_weights(model_dir, interruption=None):
    """Trains the head for 3 epochs with --ema; with an interruption, trains
    again from where it stopped, as a rerun would. Returns the phase's end
    weights and each epoch's validation loss."""
    settings = dict(head_epochs=3, learning_rate=0.05, ema=0.9)
    if interruption:
        model, backbone = tiny_training.build()
        with pytest.raises(Exception) as stopped:
            tiny_training.train_phases(model, backbone, model_dir,
                                       phase_callbacks=lambda phase: [interruption], **settings)
        assert isinstance(stopped.value, _Killed) or "SIGTERM" in str(stopped.value)
    model, backbone = tiny_training.build()
    tiny_training.train_phases(model, backbone, model_dir, **settings)
    paths = rundir.RunPaths(str(model_dir))
    with np.load(paths.phase_end_weights("head")) as phase_end:
        weights = [phase_end[f"arr_{i}"] for i in range(len(phase_end.files))]
    with open(paths.history) as file:
        losses = [float(line.split(",")[5]) for line in file.readlines()[1:]]
    return weights, losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _trained_weights(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("interruption", [
    pytest.param(_KillAtEpoch(1), id="killed between epochs"),
    # Resumed part-way through an epoch, the phase takes two fits.
    pytest.param(_TerminateAfterBatch(1), id="terminated mid-epoch", marks=pytest.mark.slow),
])
def test_a_resumed_run_averages_and_trains_as_an_uninterrupted_one(
        tmp_path, uninterrupted, interruption):
    # The backup holds the raw weights, with the average in the optimizer; a
    # rerun that trained the average on, or lost it, would end elsewhere.
    weights, losses = _trained_weights(tmp_path, interruption)

    expected_weights, expected_losses = uninterrupted
    for mine, theirs in zip(weights, expected_weights):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)

