"""Bad input stops before any work, with a message that names the fix."""

import os
import urllib.error

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags as absl_flags

from conftest import REPO_ROOT, SMOKE_FLAGS, parse_config
from tl_keras.cli import job
from tl_keras.cli import modes
from tl_keras.errors import UsageError
from tl_keras.model import backbones


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--head_learning_rate=0", "flag --head_learning_rate=0.0: must be greater than 0"),
        ("--finetune_learning_rate=-1e-4", "flag --finetune_learning_rate=-0.0001: must be greater than 0"),
        ("--batch_size=0", "flag --batch_size=0: must be at least 1"),
        ("--backbone=resnet5", "Closest: resnet50"),
        ("--backbone=ConvNextTinny", "Closest: convnexttiny"),
        ("--weights=/no/such/file.h5", "not imagenet or none, and no such file"),
        ("--val_fraction=1.5", "must be between 0 and 1"),
        ("--unfreeze=-3", "pass all, a positive number of top layers, or a layer name"),
        ("--image_size=8", "must be at least 32"),
        ("--warmup_epochs=2", "leaves no fine-tuning after warmup"),
        ("--optimizer=adagrad", "value should be one of"),
    ],
)
def test_flag_validation_names_the_fix(flag, expected):
    with pytest.raises(absl_flags.Error) as raised:
        parse_config(flag)
    assert expected in str(raised.value)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--tflite_quantization=int8"],
         "--tflite_quantization=int8 quantizes model.tflite, which only --export_tflite "
         "writes. Add --export_tflite"),
        (["--export_tflite", "--tflite_max_drop=-1"], "must be 0 or more"),
    ],
)
def test_contradictory_tflite_flags_are_refused(args, expected):
    with pytest.raises(absl_flags.Error) as raised:
        parse_config(*args)
    assert expected in str(raised.value)


def test_quantized_tflite_with_its_export_is_accepted():
    config, _ = parse_config("--export_tflite", "--tflite_quantization=int8")
    assert config.tflite_quantization == "int8" and config.tflite_max_drop == 2.0


def test_explain_outside_predict_is_refused():
    with pytest.raises(absl_flags.Error) as raised:
        parse_config("--mode=evaluate", "--model_dir=run", "--explain")
    assert "--explain writes Grad-CAM overlays of --images, for --mode=predict only" in str(
        raised.value)


def test_explain_with_a_tflite_file_is_refused_before_any_work(tmp_path):
    # No file there: the refusal comes before anything is read.
    with pytest.raises(UsageError, match=r"--explain needs the Keras model of a run folder "
                                         r"\(model.keras\): a .tflite file has no gradients"):
        modes.run_prediction(str(tmp_path / "model.tflite"), str(tmp_path), top_k=1,
                           output=None, explain=True)


def test_no_epochs_at_all_is_refused():
    with pytest.raises(absl_flags.Error, match="nothing to train"):
        parse_config("--head_epochs=0", "--finetune_epochs=0")


def test_backbone_names_are_case_insensitive():
    config, _ = parse_config("--backbone=EfficientNetV2S", flagfile=None)
    assert config.backbone == "efficientnetv2s"
    assert config.image_size == 384  # its native size


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="mirrors over the GPUs there, not the two logical CPUs")
def test_batch_that_replicas_cannot_split_fails_before_any_work(tmp_path, mock_tfds):
    config, _ = parse_config(
        "--strategy=mirrored", "--batch_size=33", f"--model_dir={tmp_path / 'run'}"
    )
    with pytest.raises(UsageError, match="doesn't split evenly across 2 replicas.*32 or 34"):
        job.run_training(config)
    assert not os.path.exists(config.model_dir)


def test_unknown_unfreeze_layer_fails_before_training(tmp_path, mock_tfds):
    config, _ = parse_config("--unfreeze=conv9_block1_out", f"--model_dir={tmp_path / 'run'}")
    with pytest.raises(UsageError, match="has no layer of that name"):
        job.run_training(config)
    assert not os.path.exists(os.path.join(config.model_dir, "history.csv"))


def test_failed_dataset_download_says_how_to_go_on_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("simulated: no route to host")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_network)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_network)
    config, _ = parse_config(
        f"--data_dir={tmp_path / 'tfds'}", f"--model_dir={tmp_path / 'run'}"
    )
    with pytest.raises(UsageError) as raised:
        job.run_training(config)
    message = str(raised.value)
    assert "Couldn't download or prepare the TFDS dataset 'cifar10'" in message
    assert "simulated: no route to host" in message
    assert "--data_dir=DIR" in message
    assert not os.path.exists(config.model_dir)


def test_failed_weights_download_says_how_to_go_on_offline(tmp_path, monkeypatch):
    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("simulated: no route to host")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # an empty weights cache
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(UsageError) as raised:
        backbones.build_backbone("resnet50", 32, "imagenet")
    message = str(raised.value)
    assert "Couldn't download the ImageNet weights for resnet50" in message
    assert "--weights=PATH" in message and "--weights=none" in message


def _run_cli(monkeypatch, capsys, *args):
    """`python run.py ARGS` in this process: run.py's flag parser and main, as
    `absl.app.run` calls them; (exit status, stderr). A subprocess would spend
    seconds importing TensorFlow to print one line. What a subprocess would
    show as a traceback escapes here as any exception other than SystemExit,
    and fails the test."""
    import importlib

    from absl.testing import flagsaver

    from tl_keras import console
    from tl_keras.cli import flags

    # run.py quiets the libraries as it loads, for a process of its own; not
    # for the test process.
    monkeypatch.setattr(console, "quiet_startup", lambda argv: None)
    monkeypatch.chdir(REPO_ROOT)  # where the README runs it, and its configs/ are
    run = importlib.import_module("run")
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exited:
        run.main(flags.parse(["run.py", *args]))
    return exited.value.code, capsys.readouterr().err


def test_cli_reports_a_missing_flagfile_without_a_traceback(monkeypatch, capsys):
    code, stderr = _run_cli(monkeypatch, capsys, "--flagfile=configs/no_such.flags")
    assert code == 2
    assert "configs/no_such.flags" in stderr
    assert "configs/smoke.flags" in stderr  # lists what exists
    assert "Traceback" not in stderr


def test_cli_reports_a_usage_error_without_a_traceback(tmp_path, monkeypatch, capsys):
    # An unknown TFDS name is found after parsing, in the data stage.
    code, stderr = _run_cli(monkeypatch, capsys,
        f"--flagfile={SMOKE_FLAGS}", "--dataset=cifar1000", f"--model_dir={tmp_path}/run"
    )
    assert code == 2
    assert "error: --dataset=cifar1000: TFDS has no dataset of that name." in stderr
    assert "Closest: cifar100" in stderr
    assert "Traceback" not in stderr
