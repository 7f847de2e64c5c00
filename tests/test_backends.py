"""Any Keras backend, and the compute dtype each machine gets."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, SMOKE_FLAGS
from tl_keras import precision

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


def _run_under_jax(tmp_path, *flags):
    # JAX on the CPU alone, so a GPU host runs what these tests expect of a CPU.
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, LAUNCHER, f"--flagfile={SMOKE_FLAGS}", "--batch_size=8",
         "--backbone=mobilenet", f"--model_dir={tmp_path / 'run'}", *flags],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_smoke_run_under_jax_trains_and_exports_a_saved_model(tmp_path):
    result = _run_under_jax(tmp_path, "--mixed_precision=auto")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras.distribution (no distribution, jax backend)" in result.stdout
    assert "dtype policy float32 (no GPU" in result.stdout
    assert "Test (test): top-1" in result.stdout
    # The SavedModel a JAX run exports serves in TensorFlow like any other.
    serving = tf.saved_model.load(str(tmp_path / "run" / "saved_model"))
    for height, width in ((32, 32), (45, 60)):
        images = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), np.uint8)
        outputs = serving.signatures["serving_default"](images=tf.constant(images))
        np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1, rtol=1e-5)
        assert outputs["top_k_classes"].shape == (2, 5)


def test_tf_only_strategies_are_refused_under_jax(tmp_path):
    result = _run_under_jax(tmp_path, "--strategy=mirrored")
    assert result.returncode == 2
    assert "--strategy=mirrored is a tf.distribute strategy, which needs " \
           "KERAS_BACKEND=tensorflow" in result.stderr
    assert "Traceback" not in result.stderr
