"""--mode=find_lr: the learning-rate range test, its suggestion, and that it
leaves a run's own files alone."""

import csv
import dataclasses
import hashlib
import os
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags

import sliced_mock
import tiny_training
from conftest import REPO_ROOT, SMOKE_FLAGS, TEST_BACKBONE, parse_config
from tl_keras import config as config_lib
from tl_keras import rundir
from tl_keras.cli import modes
from tl_keras.errors import UsageError
from tl_keras.training import lr_finder
from tl_keras.training import lr_finder_setup
from tl_keras.training import runstate

STEPS = 10


def _sweep(steps):
    """The rate of each of `steps` steps, as `ExponentialRise` sets them."""
    return lr_finder.MIN_LEARNING_RATE * (
        lr_finder.MAX_LEARNING_RATE / lr_finder.MIN_LEARNING_RATE) ** (
        np.arange(steps) / (steps - 1))


def _dip(rates, steepest_at=1e-4):
    """A loss curve that falls fastest at `steepest_at`, bottoms out, then explodes."""
    x = np.log10(rates)
    return (2.3 - 1.5 / (1 + np.exp(-(x - np.log10(steepest_at)) / 0.4))
            + 0.05 * np.exp((x + 1.5) * 4))


def test_the_suggestion_is_where_the_smoothed_loss_falls_fastest():
    rates = _sweep(100)
    rate, rule = lr_finder.suggest(rates, _dip(rates))
    assert rule == lr_finder.STEEPEST_DESCENT == "steepest descent of the smoothed loss"
    # Within one step (a factor of 10**(7/99)) of the steepest point.
    assert 1e-4 / 1.18 < rate < 1e-4 * 1.18


def test_the_suggestion_ignores_the_first_tenth_and_what_follows_the_minimum():
    rates = _sweep(100)
    curve = _dip(rates)
    curve[:10] = np.linspace(9, 2.3, 10)  # the average settling
    curve[-3:] = [40, 5, 80]  # a steep fall after divergence set in
    rate, _ = lr_finder.suggest(rates, curve)
    assert 1e-4 / 1.18 < rate < 1e-4 * 1.18


def test_the_drop_into_the_minimum_is_not_taken_for_the_steepest_descent():
    # A curve like a real run's, whose average falls slowly, then one step
    # more into its minimum before it rises.
    rates = _sweep(40)
    curve = np.concatenate([np.linspace(1.20, 1.10, 30), [1.09, 1.12, 1.3], np.full(7, 2.0)])
    rate, rule = lr_finder.suggest(rates, curve)
    assert rule == lr_finder.STEEPEST_DESCENT and rate < rates[30]


def test_a_loss_that_only_rises_gets_a_tenth_of_the_rate_at_its_minimum():
    rates = _sweep(50)
    curve = np.linspace(1.0, 3.0, 50)
    curve[20:] = np.nan  # diverged
    assert lr_finder.suggest(rates, curve) == (
        pytest.approx(rates[0] / 10), lr_finder.TENTH_OF_MINIMUM)


def test_the_smoothing_is_bias_corrected():
    np.testing.assert_allclose(lr_finder.smooth([2.0] * 5), [2.0] * 5)
    assert lr_finder.smooth([3.0, 1.0])[0] == 3.0


def test_the_schedule_rises_exponentially_from_the_first_to_the_last_rate():
    schedule = lr_finder.ExponentialRise(1e-7, 1.0, STEPS)
    rates = [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(STEPS)]
    np.testing.assert_allclose(rates, _sweep(STEPS), rtol=1e-5)
    assert rates[0] == pytest.approx(1e-7) and rates[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(np.log(rates)), np.log(10) * 7 / (STEPS - 1),
                               rtol=1e-4)


def test_the_range_test_stops_once_the_smoothed_loss_passes_four_times_its_lowest():
    recorder = lr_finder.LossRecorder(on_step=lambda: None)
    model = types.SimpleNamespace(stop_training=False)
    recorder.set_model(model)
    for loss in [2.0] * 10 + [1.0] * 30 + [60.0]:
        recorder.on_epoch_end(0, {"loss": loss})
        assert not model.stop_training
    recorder.on_epoch_end(0, {"loss": 60.0})
    smoothed = lr_finder.smooth(recorder.losses)
    assert smoothed[-1] > 4 * smoothed.min() > smoothed[-2]
    assert model.stop_training


def test_a_nan_loss_stops_the_range_test_at_once():
    recorder = lr_finder.LossRecorder(on_step=lambda: None)
    model = types.SimpleNamespace(stop_training=False)
    recorder.set_model(model)
    recorder.on_epoch_end(0, {"loss": 2.0})
    recorder.on_epoch_end(0, {"loss": float("nan")})
    assert model.stop_training


def test_the_range_test_records_each_steps_own_loss():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (64, 4)).astype("float32")
    labels = keras.utils.to_categorical((images[:, 0] > 0) + (images[:, 1] > 0), 3)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(64).repeat()
    traces = tiny_training.count_train_step_traces(model)
    test = lr_finder.range_test(
        model, batches, steps=60, phase="head", trained="the head", optimizer="adamw",
        weight_decay=0.0, label_smoothing=0.0, jit_compile=False,
        scope=tf.distribute.get_strategy().scope)
    assert int(model.optimizer.iterations) == len(test.losses) == 60
    assert len(traces) == 1  # The optimizer was built before fit traced the step.
    np.testing.assert_allclose(test.learning_rates, _sweep(60), rtol=1e-5)
    # The loss of single steps: a mean since the first step would stay near 1.1.
    assert test.losses[0] > 1 and test.losses.min() < 0.1
    assert test.learning_rates[0] <= test.suggestion <= test.learning_rates[-1]


def _overflowing_batches(steps, overflowing, rng):
    """One batch per step of 3-class data whose last input is 0, but on the
    steps in `overflowing`, where it is 60,000: a float16 gradient of its
    weights times the loss scale overflows there. Its weights start at 0, so
    it changes no output; they get no gradient elsewhere, and no update from
    the skipped steps, so they stay 0."""
    images = rng.normal(0, 1, (steps, 32, 5)).astype("float32")
    images[:, :, 4] = 0
    images[sorted(overflowing), :, 4] = 6e4
    labels = keras.utils.to_categorical((images[..., 0] > 0) + (images[..., 1] > 0), 3)
    return tf.data.Dataset.from_tensor_slices((images, labels)).repeat()


def test_each_loss_is_labelled_with_the_rate_its_step_ran_at_when_loss_scaling_skips(
        capsys):
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax",
                                                   dtype="float32")(hidden))
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel[4] = 0
    model.get_layer("hidden").set_weights([kernel, bias])
    steps, overflowing = 30, {2, 3, 11, 12, 20}
    batches = _overflowing_batches(steps, overflowing, np.random.default_rng(0))

    test = lr_finder.range_test(
        model, batches, steps=steps, phase="head", trained="the head", optimizer="adamw",
        weight_decay=0.0, label_smoothing=0.0, jit_compile=False,
        scope=tf.distribute.get_strategy().scope)

    # Keras wrapped the optimizer in a LossScaleOptimizer, which skipped those steps.
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert not model.get_layer("hidden").get_weights()[0][4].any()
    assert int(model.optimizer.iterations) == steps - len(overflowing)
    # A skipped step leaves the iteration count, and so the rate, where it was.
    iteration = np.arange(steps) - [sum(skipped < step for skipped in overflowing)
                                    for step in range(steps)]
    ran_at = _sweep(steps)[iteration]
    assert len(test.losses) == steps
    np.testing.assert_allclose(test.learning_rates, ran_at, rtol=1e-5)
    assert test.suggestion == pytest.approx(lr_finder.suggest(ran_at, test.smoothed)[0])
    assert "30 of 30 steps, 5 of them skipped by float16 loss scaling" in (
        capsys.readouterr().out)


def test_fine_tuning_sweeps_each_block_at_its_layer_decay_factor(monkeypatch):
    model, backbone = tiny_training.build()
    before = {weight.path: keras.ops.convert_to_numpy(weight) for weight in model.trainable_weights}
    # Rates too small to turn a gradient around: then each Adam step moves a
    # weight by about its rate, whatever the gradient's size, and the sweep by
    # their sum (within 1%: Adam's step is the rate only for a steady gradient).
    monkeypatch.setattr(lr_finder, "MAX_LEARNING_RATE", 1e-4)

    trained, rates = lr_finder_setup.set_up_phase(model, backbone, "finetune", unfreeze="all",
                                            train_batchnorm=False, decay=0.5)
    test = lr_finder.range_test(
        model, tiny_training.one_batch(), steps=STEPS, phase="finetune", trained=trained,
        optimizer="adam", weight_decay=0.0, label_smoothing=0.0, jit_compile=False,
        scope=tf.distribute.get_strategy().scope, rate_factors=rates.factors)

    def moved(layer):
        return max(np.abs(keras.ops.convert_to_numpy(weight) - before[weight.path]).max()
                   for weight in layer.trainable_weights)

    swept = test.learning_rates.sum()
    assert moved(model.get_layer("head")) == pytest.approx(swept, rel=1e-2)
    for depth, name in enumerate(reversed(tiny_training.BLOCKS), start=1):
        assert moved(backbone.get_layer(name)) == pytest.approx(swept * 0.5**depth,
                                                                 rel=1e-2), name
    assert lr_finder_setup.describe_optimizer(rates, ema=0.0) == [
        "Layer-wise learning-rate decay 0.5, as fine-tuning trains: the head at the rate "
        "swept, the backbone's 3 blocks at 0.5 (the top one) down to 0.125 (the stem) "
        "times it. The suggestion is the head's rate, as --finetune_learning_rate is."]


def test_the_head_phase_sweeps_without_layer_decay_and_ema_is_left_out_in_words():
    model, backbone = tiny_training.build()
    assert lr_finder_setup.set_up_phase(model, backbone, "head", unfreeze="all",
                                  train_batchnorm=False, decay=0.5) == ("the head", None)
    assert lr_finder_setup.describe_optimizer(None, ema=0.0) == []
    [line] = lr_finder_setup.describe_optimizer(None, ema=0.999)
    assert line.startswith("--ema=0.999 is left out: the moving average changes no "
                           "training step")


def _run_with_a_trained_head(model_dir, *flags):
    """A run folder whose head phase is complete: its flags.txt and progress.json."""
    _, flagfile_text = parse_config(f"--model_dir={model_dir}", *flags)
    os.makedirs(model_dir)
    with open(rundir.RunPaths(model_dir).flags, "w") as file:
        file.write(flagfile_text)
    runstate.Progress(rundir.RunPaths(model_dir).progress).complete_phase("head", 0)
    return rundir.RunPaths(model_dir)


@pytest.mark.parametrize("stored, given, named", [
    ("--dataset=cifar100", "--dataset=cifar10",
     "stored --dataset=cifar100, given --dataset=cifar10"),
    ("--classes=cat,dog", "--classes=cat,ship",
     "stored --classes=cat,dog, given --classes=cat,ship"),
])
def test_a_head_trained_with_other_flags_is_refused_naming_them(tmp_path, stored, given,
                                                                 named):
    paths = _run_with_a_trained_head(str(tmp_path / "run"), stored)
    _, flagfile_text = parse_config(f"--model_dir={paths.model_dir}", given)
    with pytest.raises(UsageError) as refusal:
        lr_finder_setup.trained_head(paths, "finetune", 1, flagfile_text)
    assert named in str(refusal.value)
    assert f"--flagfile={paths.flags}" in str(refusal.value)


def test_a_head_trained_with_these_flags_but_for_phase_2s_is_started_from(tmp_path, capsys):
    paths = _run_with_a_trained_head(str(tmp_path / "run"), "--dataset=cifar10")
    _, flagfile_text = parse_config(
        f"--model_dir={paths.model_dir}", "--dataset=cifar10", "--unfreeze=2",
        "--layer_decay=0.5", "--finetune_learning_rate=0.3", "--jit_compile=false",
        "--export_tflite", "--self_training_epochs=5")
    assert lr_finder_setup.trained_head(paths, "finetune", 1, flagfile_text) == paths
    assert "Starting from the head phase's end weights" in capsys.readouterr().out
    # A misspelt name there would compare that option after all.
    assert config_lib.NOT_IN_THE_HEAD_PHASE <= {
        field.name for field in dataclasses.fields(config_lib.Config)}


def _digests(model_dir):
    """{path: SHA-256} of every file in a run's folder but what find_lr writes."""
    digests = {}
    for root, folders, files in os.walk(model_dir):
        folders[:] = [name for name in folders if name != rundir.FIND_LR_DIR]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                digests[os.path.relpath(path, model_dir)] = hashlib.sha256(
                    file.read()).hexdigest()
    return digests


def _tensorboard_tags(directory):
    tags = set()
    for root, _, files in os.walk(directory):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags |= {value.tag for value in event.summary.value}
    return tags


def test_find_lr_on_a_finished_run_writes_its_curve_and_nothing_else(finished_run_alone,
                                                                     capsys):
    trained, _ = finished_run_alone
    before = _digests(trained.model_dir)
    # The run's own flags, but for three of phase 2 and how it runs, which
    # its head doesn't depend on: two only make the test quicker (XLA's
    # compile would take longer than the ten steps, and backpropagating into
    # all of VGG16 more than twice as long as into its top layers).
    config, flagfile_text = parse_config(
        "--jit_compile=false", "--unfreeze=2", "--layer_decay=0.8",
        flagfile=os.path.join(trained.model_dir, "flags.txt"))
    with sliced_mock.mock_data(num_examples=64):
        test = modes.run_find_lr(config, "finetune", steps=STEPS,
                                 flagfile_text=flagfile_text)

    assert _digests(trained.model_dir) == before  # checkpoints, progress, flags, COMPLETE
    out = capsys.readouterr().out
    assert "Starting from the head phase's end weights of the run in" in out
    assert "Layer-wise learning-rate decay 0.8, as fine-tuning trains" in out
    paths = rundir.RunPaths(trained.model_dir)
    with open(paths.find_lr_csv("finetune")) as file:
        rows = list(csv.DictReader(file))
    rates = [float(row["learning_rate"]) for row in rows]
    assert 2 <= len(rows) <= STEPS and rates[0] == pytest.approx(1e-7)
    np.testing.assert_allclose(np.diff(np.log(rates)), np.log(10) * 7 / (STEPS - 1),
                               rtol=1e-3)
    assert rates[0] <= test.suggestion <= rates[-1]
    assert (f"Suggested --finetune_learning_rate={test.suggestion:.1e} "
            f"({test.rule}).") in out
    with open(paths.find_lr_plot("finetune"), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "find_lr/finetune" in _tensorboard_tags(paths.find_lr_tensorboard)


@pytest.mark.slow
def test_find_lr_before_a_run_leaves_the_folder_to_it(tmp_path, mock_tfds, capsys):
    config, flagfile_text = parse_config(TEST_BACKBONE, f"--model_dir={tmp_path / 'run'}",
                                         "--ema=0.99")
    modes.run_find_lr(config, "head", steps=STEPS, flagfile_text=flagfile_text)
    out = capsys.readouterr().out
    assert "Learning-rate range test of the head phase, training the head" in out
    assert "--ema=0.99 is left out" in out
    assert sorted(os.listdir(config.model_dir)) == [rundir.FIND_LR_DIR]
    with rundir.claim(config.model_dir, flagfile_text, overwrite=False) as state:
        assert state == rundir.FRESH


def test_a_folder_of_find_lr_results_alone_is_a_new_runs(tmp_path):
    (tmp_path / rundir.FIND_LR_DIR).mkdir()
    with rundir.claim(str(tmp_path), "--a=1\n", overwrite=False) as state:
        assert state == rundir.FRESH


def test_overwrite_keeps_the_find_lr_results(tmp_path, capsys):
    rundir.mark_complete(str(tmp_path))
    (tmp_path / rundir.FIND_LR_DIR).mkdir()
    with rundir.claim(str(tmp_path), "--a=1\n", overwrite=True) as state:
        assert state == rundir.FRESH
    assert os.listdir(tmp_path) == [rundir.FIND_LR_DIR]
    assert "kept" not in capsys.readouterr().out


def test_find_lr_refuses_a_folder_of_the_users_and_a_run_in_progress(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    with pytest.raises(UsageError, match="is not empty and holds no tl_keras run"):
        with rundir.claim_beside_run(str(tmp_path / "mine")):
            pass
    with rundir.claim(str(tmp_path / "run"), "--a=1\n", overwrite=False):
        with pytest.raises(UsageError, match="Another run is using"):
            with rundir.claim_beside_run(str(tmp_path / "run")):
                pass


@pytest.mark.parametrize("args, expected", [
    (["--mode=find_lr", "--find_lr_steps=5"], "must be at least 10"),
    (["--mode=find_lr", "--strategy=multi_worker"], "--mode=find_lr runs on one machine"),
])
def test_bad_find_lr_flags_are_refused(args, expected):
    with pytest.raises(absl_flags.Error, match=expected):
        parse_config(*args)


def test_the_find_lr_flags_stay_out_of_flags_txt():
    # They say what this process does, not how the run trains, so a range
    # test's flags never stop a run from resuming.
    _, flagfile_text = parse_config("--mode=find_lr", "--find_lr_phase=finetune",
                                    "--find_lr_steps=20")
    written = flagfile_text.splitlines()
    assert not [line for line in written if line.startswith(("--mode=", "--find_lr"))]


@pytest.mark.slow
def test_the_command_line_runs_a_range_test_quietly(tmp_path):
    environment = {key: value for key, value in os.environ.items()
                   if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "mock_run.py"),
         f"--flagfile={SMOKE_FLAGS}", TEST_BACKBONE, "--mode=find_lr",
         "--find_lr_phase=finetune", f"--find_lr_steps={STEPS}", "--recipe=auto",
         f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Recipe auto, for 58 training images" in output
    assert "holds no finished head phase, so the head is untrained" in output
    assert "Suggested --finetune_learning_rate=" in output
    assert not [line for line in output.splitlines() if line[:1] in "IWEF"
                and line[1:5].isdigit()], output
