"""End to end: flags -> data -> two phases -> evaluation -> every output."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import keras

from conftest import parse_config, run_job as _run


def test_writes_every_output(finished_run):
    config, _ = finished_run
    listing = set(os.listdir(config.model_dir))
    assert {
        "flags.txt", "tensorboard", "checkpoints", "saved_model", "model.keras",
        "metrics.json", "history.csv", "backbone.weights.h5", "class_names.json",
    } <= listing
    assert os.path.isfile(os.path.join(config.model_dir, "checkpoints", "best.weights.h5"))
    assert not [name for name in listing if name.startswith(".export-")]


def test_metrics_json_holds_validation_per_phase_and_test(finished_run):
    config, metrics = finished_run
    with open(os.path.join(config.model_dir, "metrics.json")) as file:
        written = json.load(file)
    assert written == metrics
    assert set(written["validation"]) == {"head", "finetune"}
    assert set(written["test"]) == {"top1", "top5", "nll"}
    # Mock CIFAR-10 has 64 random test images: top-1 is a multiple of 1/64.
    assert written["test"]["top1"] * 64 == pytest.approx(round(written["test"]["top1"] * 64))


def test_history_numbers_epochs_across_both_phases(finished_run):
    config, _ = finished_run
    with open(os.path.join(config.model_dir, "history.csv")) as file:
        rows = list(csv.DictReader(file))
    assert [(int(r["epoch"]), r["phase"]) for r in rows] == [
        (1, "head"), (2, "finetune"), (3, "finetune")
    ]
    for row in rows:
        assert {"loss", "top1", "val_loss", "val_top1", "learning_rate"} <= set(row)


def test_tensorboard_has_train_and_validation_scalars_on_one_timeline(finished_run):
    config, _ = finished_run
    steps = {}
    for split in ("train", "validation"):
        directory = os.path.join(config.model_dir, "tensorboard", split)
        for name in os.listdir(directory):
            if not name.startswith("events.out.tfevents"):
                continue  # e.g. plugins/profile
            for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
                for value in event.summary.value:
                    steps.setdefault((split, value.tag), set()).add(event.step)
    assert steps[("train", "epoch_loss")] == {0, 1, 2}
    assert steps[("validation", "epoch_loss")] == {0, 1, 2}
    assert steps[("train", "epoch_learning_rate")] == {0, 1, 2}
    assert ("validation", "epoch_learning_rate") not in steps  # as docs/cluster-and-resume.md says


def test_head_size_comes_from_dataset_metadata(finished_run):
    config, _ = finished_run
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    assert model.output_shape == (None, 10)  # cifar10, not a constant
    with open(os.path.join(config.model_dir, "class_names.json")) as file:
        assert len(json.load(file)) == 10


@pytest.mark.parametrize("height, width", [(32, 32), (45, 60)])
def test_saved_model_matches_the_keras_model(finished_run, height, width):
    config, _ = finished_run
    model = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"))
    serving = tf.saved_model.load(os.path.join(config.model_dir, "saved_model"))
    images = np.random.default_rng(0).integers(0, 256, (4, height, width, 3), dtype=np.uint8)

    served = serving.signatures["serving_default"](images=tf.constant(images))
    expected = model.predict(images, verbose=0)

    assert served["probabilities"].shape == (4, 10)
    # A model whose output ignores its input would match anything.
    assert np.ptp(expected, axis=0).max() > 1e-3
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)


def test_flags_txt_reruns_the_same_configuration(finished_run):
    config, _ = finished_run
    rerun, _ = parse_config(flagfile=os.path.join(config.model_dir, "flags.txt"))
    assert rerun == config


def test_a_flag_after_the_flagfile_wins(tmp_path):
    config, _ = parse_config("--batch_size=8")
    assert config.batch_size == 8


def _saved_model_top1(config):
    """The exported model's top-1 on the run's test split, image by image."""
    from tl_keras.data import sources

    serving = tf.saved_model.load(os.path.join(config.model_dir, "saved_model"))
    classify = serving.signatures["serving_default"]
    correct = [
        int(classify(images=image[None])["top_k_indices"][0, 0]) == int(label)
        for image, label in sources.load_splits(config).test
    ]
    return np.mean(correct)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="mirrors over the GPUs there, not the two logical CPUs")
@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_replicas(tmp_path, mock_tfds, capsys):
    config, metrics = _run(
        tmp_path, "--strategy=mirrored", "--head_epochs=1", "--finetune_epochs=1",
        "--warmup_epochs=0",
    )
    assert "MirroredStrategy with 2 replica(s)" in capsys.readouterr().out
    assert metrics["test"]["top1"] == pytest.approx(_saved_model_top1(config))
    assert os.path.isdir(os.path.join(config.model_dir, "saved_model"))


def test_a_messy_image_folder_trains_and_names_what_it_skipped(messy_folder_run):
    # Shared with tests/test_parity.py's crop check: see tests/messy_folder.py.
    config, metrics, out = messy_folder_run
    assert "Skipping 2 file(s)" in out and "broken.jpg" in out and "empty.png" in out
    with open(os.path.join(config.model_dir, "class_names.json")) as file:
        assert json.load(file) == ["cat", "dog"]
    assert metrics["test"]["top1"] == pytest.approx(_saved_model_top1(config))
    serving = tf.saved_model.load(os.path.join(config.model_dir, "saved_model"))
    probabilities = serving.signatures["serving_default"](
        images=tf.zeros([1, 50, 70, 3], tf.uint8))["probabilities"]
    assert probabilities.shape == (1, 2)
