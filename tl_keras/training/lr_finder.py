"""The learning-rate range test of `--mode=find_lr`: a short run whose learning
rate rises exponentially, one step at a time, and the rate it suggests.

Leslie Smith's test ("Cyclical Learning Rates for Training Neural Networks",
2017), as fastai's `Learner.lr_find` and Lightning's `Tuner.lr_find` run it:
from 1e-7 to 1 over `--find_lr_steps` steps, the loss of each step smoothed by
a bias-corrected moving average (beta 0.98, as both do), stopping once the
smoothed loss passes four times its lowest. The suggestion is the rate where
the smoothed loss falls fastest (Lightning's rule, fastai's `steep`): a rate
at which training still makes quick progress, well below where it diverges.

The rate follows the optimizer's iteration count, which a step that float16
loss scaling skips (its gradients overflowed) leaves where it was: each step's
loss is paired with the rate the optimizer held as the step ran, not the
rate of its position in the sweep.

Backend-agnostic: only `keras` and NumPy. It writes only the curve, as CSV and
PNG, under the run folder's `find_lr/`; never a checkpoint.
"""

import csv
import dataclasses
import os

import keras
import numpy as np

from tl_keras import progress
from tl_keras.errors import TrainingDiverged
from tl_keras.outputs import plots
from tl_keras.training import optimization

MIN_LEARNING_RATE = 1e-7
MAX_LEARNING_RATE = 1.0
SMOOTHING = 0.98
# The smoothed loss past this multiple of its lowest means training diverged.
DIVERGENCE_FACTOR = 4.0
STEEPEST_DESCENT = "steepest descent of the smoothed loss"
# When the loss never falls (the first rate already too high, or a flat
# curve): fastai's `minimum` suggestion.
TENTH_OF_MINIMUM = "a tenth of the rate at the smoothed loss's minimum"


@dataclasses.dataclass(frozen=True)
class RangeTest:
    """One range test's curve and suggestion.

    Attributes:
        learning_rates, losses, smoothed: per step run, as float arrays:
            the rate the step ran at, its loss, and the smoothed loss.
        planned_steps: the steps it would have run without diverging.
        suggestion: the suggested learning rate.
        rule: how it was chosen, in words.
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    planned_steps: int
    suggestion: float
    rule: str

    @property
    def diverged(self):
        return len(self.losses) < self.planned_steps


class ExponentialRise(keras.optimizers.schedules.LearningRateSchedule):
    """`start` at step 0, `end` at step `steps - 1`, rising by the same factor
    every step in between."""

    def __init__(self, start, end, steps):
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step):
        progress = keras.ops.cast(step, "float32") / max(self.steps - 1, 1)
        return self.start * keras.ops.power(self.end / self.start, progress)

    def get_config(self):
        return {"start": self.start, "end": self.end, "steps": self.steps}


def smooth(losses, beta=SMOOTHING):
    """The bias-corrected exponential moving average of `losses`, step by step."""
    average, smoothed = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**step))
    return np.array(smoothed)


def suggest(rates, smoothed):
    """The suggested learning rate for a range test's curve.

    The rate where the smoothed loss falls fastest, before its minimum, past
    the first tenth of the steps, where the average still settles (Lightning
    skips the first 10 of its 100). When the loss never falls there, a tenth
    of the rate at the minimum.

    Args:
        rates: the learning rate of each step, rising (a step that loss
            scaling skipped shares its rate with the next).
        smoothed: the smoothed loss of each step (NaN once it diverged).

    Returns:
        (learning rate, the rule that chose it, in words).

    Raises:
        TrainingDiverged: when no step had a finite loss.
    """
    rates, smoothed = np.asarray(rates), np.asarray(smoothed)
    # Once the average is not a number, it stays so: the curve is what comes before.
    broken = np.flatnonzero(~np.isfinite(smoothed))
    curve = smoothed[:broken[0]] if len(broken) else smoothed
    if not len(curve):
        raise TrainingDiverged(
            f"The loss was not a number from the first step, at a learning rate of "
            f"{rates[0]:.0e}, so no rate trains this model. Likely causes: float16 "
            f"without loss scaling (try --mixed_precision=bfloat16 or off), or "
            f"weights that are already broken.")
    lowest = int(np.argmin(curve))
    skip = len(smoothed) // 10
    if lowest - skip >= 2:
        # Central differences over the whole curve, so that the minimum's own
        # slope (near 0) is not a one-sided drop into it. The steps are evenly
        # spaced in log(rate), so the slope per step is the slope against it
        # (but for the few steps loss scaling skips, each at the next one's rate).
        slopes = np.gradient(curve)[skip:lowest]
        if slopes.min() < 0:
            return float(rates[skip + np.argmin(slopes)]), STEEPEST_DESCENT
    return float(rates[lowest] / 10), TENTH_OF_MINIMUM


class LossRecorder(keras.callbacks.Callback):
    """Records each step's learning rate and loss, and stops once the smoothed
    loss diverges.

    The range test fits one step per epoch: Keras' epoch loss is then that
    step's own loss, where its per-batch logs hold the mean since the epoch
    began. The rate is read from the optimizer as the step starts (under JAX
    too, whose trainer writes its state back into the variables by each
    epoch's end): the schedule at the iteration count the step runs at.
    """

    def __init__(self, on_step):
        super().__init__()
        self.learning_rates = []
        self.losses = []
        self.on_step = on_step
        self._rate = None

    def on_epoch_begin(self, epoch, logs=None):
        self._rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        self.learning_rates.append(self._rate)
        self.losses.append(float(logs["loss"]))
        self.on_step()
        smoothed = smooth(self.losses)
        if (not np.isfinite(smoothed[-1])
                or smoothed[-1] > DIVERGENCE_FACTOR * np.min(smoothed)):
            self.model.stop_training = True


def range_test(model, train_batches, *, steps, phase, trained, optimizer,
               weight_decay, label_smoothing, jit_compile, scope, rate_factors=None):
    """Runs the range test on `model` as `set_up_phase` set it up.

    Args:
        model: the classifier.
        train_batches: training batches, repeated, as training reads them.
        steps: how many steps the rate rises over.
        phase, trained: the phase tested and what trains, for the progress line.
        optimizer, weight_decay, label_smoothing, jit_compile: as training
            compiles with (`tl_keras.training.optimization.compile_for_phase`).
        scope: returns the strategy's scope, to compile in.
        rate_factors: `--layer_decay`'s factors on the rate, as for
            `tl_keras.training.optimization.make_optimizer`; None, the default, for none.

    Returns:
        A `RangeTest`.
    """
    with scope():
        # Recompiled after `set_up_phase` changed `trainable`, as training is.
        model.compile(
            optimizer=optimization.make_optimizer(
                optimizer, ExponentialRise(MIN_LEARNING_RATE, MAX_LEARNING_RATE, steps),
                weight_decay, rate_factors=rate_factors),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
            jit_compile=jit_compile)
        optimization.build_optimizer(model)
    with progress.step(
            f"Learning-rate range test of the {phase} phase, training {trained}, the "
            f"rate rising from {MIN_LEARNING_RATE:g} to {MAX_LEARNING_RATE:g} over "
            f"{steps} steps", steps) as testing:
        recorder = LossRecorder(testing.advance)
        # One step per epoch, so that each epoch's loss is one step's.
        model.fit(train_batches, epochs=steps, steps_per_epoch=1, callbacks=[recorder],
                  shuffle=False, verbose=0)
        rates, losses = np.array(recorder.learning_rates), np.array(recorder.losses)
        testing.result = (f"Learning-rate range test: {len(losses)} of {steps} steps"
                          f"{_stopped_or_skipped(model.optimizer, len(losses), steps)}")
    smoothed = smooth(losses)
    suggestion, rule = suggest(rates, smoothed)
    return RangeTest(learning_rates=rates, losses=losses, smoothed=smoothed,
                     planned_steps=steps, suggestion=suggestion, rule=rule)


def _stopped_or_skipped(optimizer, steps_run, steps):
    """Why the sweep ran fewer steps, or ended below the last rate, in words."""
    skipped = steps_run - int(optimizer.iterations)
    said = ""
    if steps_run < steps:
        said = f", stopped as the smoothed loss passed {DIVERGENCE_FACTOR:g}x its lowest"
    if skipped:
        said += (f", {skipped} of them skipped by float16 loss scaling (their gradients "
                 f"overflowed), the rate held for the next")
    return said


def write_curve(paths, phase, test, title):
    """Writes the curve to `find_lr/PHASE.csv` (step from 1, learning_rate:
    the rate the step ran at, loss, smoothed_loss) and `find_lr/PHASE.png`.

    Returns:
        The plot, as PNG bytes.
    """
    csv_path, png_path = paths.find_lr_csv(phase), paths.find_lr_plot(phase)
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "learning_rate", "loss", "smoothed_loss"])
        for step, row in enumerate(zip(test.learning_rates, test.losses, test.smoothed),
                                   start=1):
            writer.writerow([step, *(f"{value:.6g}" for value in row)])
    png = plots.learning_rate_range_test(
        test.learning_rates, test.losses, test.smoothed, test.suggestion, test.rule,
        title=title)
    with open(png_path, "wb") as file:
        file.write(png)
    return png


def summary(test, phase, scale):
    """The lines that report the test: its minimum and the suggested flag.

    Args:
        test: a `RangeTest`.
        phase: the phase tested, which names the flag.
        scale: `tl_keras.training.recipe.learning_rate_scale`: the flag's value is the
            rate divided by it.
    """
    lowest = int(np.nanargmin(test.smoothed))
    scaled = (f" (the rate itself {test.suggestion:.1e}, before --lr_scaling=linear's "
              f"x{scale:g})" if scale != 1 else "")
    return [f"Lowest smoothed loss {test.smoothed[lowest]:.4g}, at learning rate "
            f"{test.learning_rates[lowest]:.1e}.",
            f"Suggested --{phase}_learning_rate={test.suggestion / scale:.1e}{scaled} "
            f"({test.rule})."]
