"""`--mode=probe`: a linear probe at each depth of the backbone."""

import csv
import os

import numpy as np
import pytest
from absl import flags as absl_flags
from PIL import Image

from conftest import parse_config
from tl_keras import rundir
from tl_keras.cli import probe as probe_mode
from tl_keras.model import depth_features
from tl_keras.training import probe

# Three classes told apart by coarse colour alone, under heavy pixel noise:
# what an image's mean colour says, and nothing finer.
_COLOURS = {"reddish": (135, 115, 115), "greenish": (115, 135, 115), "bluish": (115, 115, 135)}


def _write_colour_folder(root, per_split):
    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        for name, colour in _COLOURS.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for index in range(count):
                pixels = rng.normal(colour, 80, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{index}.png"))
    return f"folder:{root}"


@pytest.mark.parametrize("count, every, probed", [
    (17, None, list(range(17))),
    (60, None, list(range(2, 60, 3))),
    (17, 5, [1, 6, 11, 16]),
])
def test_the_probed_blocks_end_at_the_top(count, every, probed):
    assert depth_features.probed_blocks(count, every) == probed


def test_an_early_block_does_at_least_as_well_as_the_top_on_coarse_colour(tmp_path, capsys):
    dataset = _write_colour_folder(tmp_path / "images", {"train": 16, "val": 16, "test": 1})
    config, _ = parse_config(f"--dataset={dataset}", f"--model_dir={tmp_path / 'run'}",
                             "--batch_size=16")
    results = probe_mode.run_probe(config, every=4)
    blocks = [result.depth.block for result in results]
    assert blocks == [0, 4, 8, 12, 16]  # resnet50's 17 blocks
    by_block = {result.depth.block: result.validation_top1 for result in results}
    assert by_block[4] >= by_block[16], by_block
    assert probe.suggestion(results).depth.from_top != -1
    assert by_block[4] > 1 / 3 + 0.2, by_block  # well above chance
    with open(tmp_path / "run" / "probe" / "depths.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["block"]) for row in rows] == blocks
    assert [float(row["validation_top1"]) for row in rows] == pytest.approx(
        [result.validation_top1 for result in results], abs=1e-4)
    assert rows[-1]["from_top"] == "-1" and rows[-1]["layer"] == "avg_pool"
    with open(tmp_path / "run" / "probe" / "depths.png", "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Linear probe at each depth" in out and "The probe took" in out
    # A probe writes only probe/: the folder can still take a run.
    assert sorted(os.listdir(tmp_path / "run")) == ["probe"]


def _results(validation_top1):
    count = len(validation_top1)
    return [probe.DepthResult(
        depth=depth_features.Depth(block=index, from_top=index - count, layer=f"l{index}",
                                   dimensions=8),
        train_top1=1.0, validation_top1=top1) for index, top1 in enumerate(validation_top1)]


def test_the_suggestion_is_the_best_depth_and_the_top_on_a_tie():
    assert probe.suggestion(_results([0.5, 0.8, 0.6])).depth.block == 1
    assert probe.suggestion(_results([0.5, 0.8, 0.8])).depth.block == 2
    lines = probe.summary(_results([0.5, 0.8, 0.6]), seconds=12)
    assert "Suggested: --cut_at=1 (--cut_at=-2 from the top), 80.0% against the top's 60.0%." \
        in lines
    assert any(line.startswith("That is the best depth for a frozen backbone") for line in lines)
    lines = probe.summary(_results([0.5, 0.6, 0.8]), seconds=12)
    assert any(line.startswith("The top is best (80.0%)") for line in lines)
    assert lines[-1] == "The probe took 12 s."


def test_the_linear_probe_fits_a_separable_task():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    features = rng.normal(0, 1, (300, 20)).astype(np.float32)
    features[:, 0] += 6 * labels  # one direction separates the classes
    classify = probe.fit_linear(features[:200], labels[:200], 3)
    assert np.mean(classify(features[200:]) == labels[200:]) > 0.95


@pytest.mark.parametrize("args, expected", [
    (["--mode=probe", "--probe_every=0"], "must be at least 1"),
    (["--mode=probe", "--strategy=multi_worker"], "--mode=probe runs on one machine"),
])
def test_bad_probe_flags_are_refused(args, expected):
    with pytest.raises(absl_flags.Error, match=expected):
        parse_config(*args)


def test_the_probe_flags_stay_out_of_flags_txt_and_its_folder_is_a_new_runs(tmp_path):
    _, flagfile_text = parse_config("--mode=probe", "--probe_every=2")
    assert not [line for line in flagfile_text.splitlines()
                if line.startswith(("--mode=", "--probe"))]
    (tmp_path / rundir.PROBE_DIR).mkdir()
    with rundir.claim(str(tmp_path), "--a=1\n", overwrite=False) as state:
        assert state == rundir.FRESH
