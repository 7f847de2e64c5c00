"""Any Keras backend, and the compute dtype each machine gets."""

import csv
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, SMOKE_FLAGS
from tl_keras import rundir
from tl_keras.training import precision

LAUNCHER = os.path.join(REPO_ROOT, "tests", "mock_run.py")


@pytest.mark.parametrize("setting, has_tpu, capabilities, expected, reason", [
    ("auto", False, [], "float32",                   # CPU
     "no GPU: mixed precision is slower than float32 on CPUs"),
    ("auto", False, [(8, 0)], "mixed_bfloat16", "GPU compute capability 8.0"),  # A100
    ("auto", False, [(9, 0), (9, 0)], "mixed_bfloat16",  # H100s
     "GPU compute capability 9.0"),
    ("auto", False, [(7, 0)], "mixed_float16",       # V100: loss scaling
     "GPU compute capability 7.0"),
    ("auto", False, [(8, 6), (7, 5)], "mixed_float16",  # the oldest GPU decides
     "GPU compute capability 7.5"),
    ("auto", True, [], "mixed_bfloat16", "TPUs compute in bfloat16"),  # TPU
    ("off", False, [(9, 0)], "float32", "--mixed_precision=off"),
    ("float16", False, [], "mixed_float16", "--mixed_precision=float16"),
    ("bfloat16", False, [], "mixed_bfloat16", "--mixed_precision=bfloat16"),
])
def test_mixed_precision_choice(setting, has_tpu, capabilities, expected, reason):
    assert precision.choose_dtype_policy(setting, has_tpu, capabilities) == (expected, reason)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="this host has a GPU, so auto rightly picks mixed precision")
def test_auto_mixed_precision_on_this_cpu_is_float32():
    assert precision.resolve_mixed_precision("auto")[0] == "float32"


def _jax_environment(compilation_cache=None):
    # JAX on the CPU alone, so a GPU host runs what these tests expect of a CPU.
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    if compilation_cache:
        # JAX's persistent cache, which a user may set too: a rerun gets the
        # executables its killed run compiled, the same ones, instead of
        # compiling them again (see CONTRIBUTING.md's Tests for what it saves).
        environment.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return environment


def _jax_command(model_dir, *flags):
    return [sys.executable, LAUNCHER, f"--flagfile={SMOKE_FLAGS}", "--batch_size=8",
            "--backbone=mobilenet", f"--model_dir={model_dir}", *flags]


@pytest.mark.parametrize("strategy", ["one_device", "mirrored", "multi_worker", "tpu"])
def test_tf_only_strategies_are_refused_on_another_backend(strategy, monkeypatch):
    """What the slow test below checks of a real JAX process, in this one:
    the refusal, before anything is created."""
    import keras

    from tl_keras.errors import UsageError
    from tl_keras.training import distribute

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(UsageError, match=f"--strategy={strategy} is a tf.distribute "
                                         f"strategy, which needs KERAS_BACKEND=tensorflow"):
        distribute.create_strategy(strategy, "my-tpu")


@pytest.mark.slow
def test_tf_only_strategies_are_refused_under_jax(tmp_path):
    # A real JAX process refuses too, with status 2 and no traceback. Slow:
    # JAX and TensorFlow take ~8 s CPU to import, and the test above checks
    # the refusal itself.
    result = subprocess.run(_jax_command(tmp_path / "run", "--strategy=mirrored"),
                            cwd=REPO_ROOT, env=_jax_environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2
    assert "--strategy=mirrored is a tf.distribute strategy, which needs " \
           "KERAS_BACKEND=tensorflow" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def resumed_jax_run(tmp_path_factory):
    """One JAX run, killed once its first fine-tuning epoch is backed up, then
    rerun to the end: (its folder, the rerun's CompletedProcess).

    Shared by the two slow tests below, as a JAX run in a process of its own
    is among the suite's dearest things: the smoke test reads the finished
    run (its header, test result and SavedModel), the other the resume.
    --mixed_precision=auto: the header must say what auto picked on a CPU.
    --layer_decay and --ema: optimizer state a JAX run backs up and a rerun
    restores. --early_stopping=1 with a learning rate too small to change any
    prediction: fine-tuning's validation top-1 stays where its first epoch put
    it, so the rerun's epoch 3 is no better than the killed run's epoch 2, and
    the phase stops on the top-1 the killed run recorded.
    """
    model_dir = tmp_path_factory.mktemp("jax") / "run"
    # MobileNet cut after its first block (7 layers), which JAX traces and
    # compiles in a fraction of the whole network's time.
    command = _jax_command(model_dir, "--cut_at=1", "--mixed_precision=auto",
                           "--finetune_epochs=3", "--layer_decay=0.5", "--ema=0.9",
                           "--early_stopping=1", "--finetune_learning_rate=1e-12")
    environment = _jax_environment(compilation_cache=model_dir.parent / "jax-cache")
    # Epochs of over 0.7 s, for the kill below to land in the next one.
    environment.update(MOCK_RUN_STEP_PAUSE="0.1")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Killed once the first fine-tuning epoch is backed up.
    backed_up = model_dir / "backup" / "finetune" / rundir.BACKUP_METADATA_FILE
    deadline = time.time() + 400
    while not backed_up.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.kill()
    process.communicate()
    return model_dir, subprocess.run(command, cwd=REPO_ROOT, env=environment,
                                     capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_run_under_jax_trains_and_exports_a_saved_model(resumed_jax_run):
    model_dir, result = resumed_jax_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras.distribution (no distribution, jax backend)" in result.stdout
    assert "dtype policy float32 (no GPU" in result.stdout
    assert "Test (test): top-1" in result.stdout
    # The SavedModel a JAX run exports serves in TensorFlow like any other.
    serving = tf.saved_model.load(str(model_dir / "saved_model"))
    for height, width in ((32, 32), (45, 60)):
        images = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), np.uint8)
        outputs = serving.signatures["serving_default"](images=tf.constant(images))
        np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1, rtol=1e-5)
        assert outputs["top_k_classes"].shape == (2, 5)


@pytest.mark.slow
def test_fine_tuning_controls_resume_after_a_kill_under_jax(resumed_jax_run):
    """--layer_decay's optimizer and --ema's average are optimizer state a
    JAX run backs up and a rerun restores; --early_stopping decides on the
    top-1 of epochs the killed run recorded."""
    import keras

    from tl_keras.model import classifier  # what loading model.keras needs imported
    from tl_keras.training import runstate

    model_dir, result = resumed_jax_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Phase finetune: epochs 2-4, resuming at epoch 3," in result.stdout
    assert "Layer-wise learning-rate decay 0.5: the head and 2 backbone blocks." in result.stdout
    assert ("Phase finetune stopped early after epoch 3: no better validation top-1 for 1 "
            "epochs (--early_stopping=1); best") in result.stdout
    assert "at epoch 2." in result.stdout
    # Each epoch once, and none after the stop.
    with open(model_dir / "history.csv", newline="") as file:
        epochs = [(int(row["epoch"]), row["phase"]) for row in csv.DictReader(file)]
    assert epochs == [(1, "head"), (2, "finetune"), (3, "finetune")]
    progress = runstate.Progress(str(model_dir / rundir.PROGRESS_FILE))
    assert progress.phases["finetune"]["stopped_early"]["epoch"] == 2  # from 0
    model = keras.saving.load_model(model_dir / "model.keras")
    assert type(model.optimizer) in classifier.SAVED_OBJECTS
    assert model.optimizer.use_ema and model.optimizer.ema_momentum == 0.9
