"""--cache_features: the head phase on backbone features computed once."""

import csv
import numpy as np
import pytest
from absl import flags as absl_flags

import sliced_mock
from conftest import parse_config, run_job


def _head_after_phase_one(tmp_path, *flags):
    import keras

    with sliced_mock.mock_data(num_examples=64):
        # 58 training images in one batch: full-batch steps, so the order the
        # two pipelines shuffle into cannot matter.
        config, metrics = run_job(
            tmp_path, "--finetune_epochs=0", "--head_epochs=3", "--batch_size=58",
            "--dropout=0", "--weights=none", *flags)
    model = keras.saving.load_model(f"{config.model_dir}/model.keras")
    with open(f"{config.model_dir}/history.csv") as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    assert losses[-1] < losses[0], "the head should have trained"
    return [np.array(w) for w in model.get_layer("head").weights], metrics


@pytest.mark.slow
def test_cached_head_phase_matches_the_uncached_one(tmp_path, capsys):
    cached, cached_metrics = _head_after_phase_one(tmp_path / "cached", "--cache_features")
    assert "Computed backbone features of 58 train and 6 validation images once" in \
        capsys.readouterr().out
    uncached, uncached_metrics = _head_after_phase_one(tmp_path / "uncached")

    for mine, theirs in zip(cached, uncached):
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-5)
    assert cached_metrics["validation"]["head"]["label_smoothed_loss"] == pytest.approx(
        uncached_metrics["validation"]["head"]["label_smoothed_loss"], rel=1e-3)
    assert cached_metrics["test"]["top1"] == pytest.approx(uncached_metrics["test"]["top1"])


def test_cache_features_refuses_augmentation():
    with pytest.raises(absl_flags.Error, match="can't see augmented images"):
        parse_config("--cache_features", "--augment=basic")
