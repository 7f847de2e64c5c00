"""The structure experiment (experiments/structure_transfer.py): its distant
target's textures, the depths it fine-tunes at, and how it reads a probe.
No training: each test takes about a second."""

import csv
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The script's parts import one another as the package `transfer`, as they do
# when the script runs from experiments/.
sys.path.insert(0, os.path.join(REPOSITORY, "experiments"))

from transfer import arms as arms_lib  # noqa: E402
from transfer import depth_report, depths, textures  # noqa: E402
from transfer.runner import Runner  # noqa: E402

SMALL = {"train": 3, "val": 2, "test": 1}


def _files(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def test_textures_are_written_once_as_split_folders_and_the_same_every_time(tmp_path):
    first = textures.write_textures(str(tmp_path / "a"), counts=SMALL)
    second = textures.write_textures(str(tmp_path / "b"), counts=SMALL)

    expected = sorted(os.path.join(split, name, f"{index:04d}.png")
                      for split, count in SMALL.items() for name in textures.CLASSES
                      for index in range(count))
    assert _files(first) == expected
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no .partial left behind
    for path in expected:
        with open(os.path.join(first, path), "rb") as a, open(os.path.join(second, path),
                                                               "rb") as b:
            assert a.read() == b.read(), path
        with Image.open(os.path.join(first, path)) as image:
            assert (image.size, image.mode) == ((textures.SIZE, textures.SIZE), "RGB")
    # A dataset that exists is kept, not rewritten with other counts.
    textures.write_textures(first, counts={"train": 1})
    assert _files(first) == expected


def _mean_colours(split, per_class):
    colours, labels = [], []
    for class_index, name in enumerate(textures.CLASSES):
        for index in range(per_class):
            image = textures.texture_image(name, textures.image_rng(split, class_index, index))
            colours.append(image.reshape(-1, 3).mean(axis=0))
            labels.append(class_index)
    return np.array(colours), np.array(labels)


def test_texture_classes_are_not_told_apart_by_their_mean_colour():
    """Colours are drawn per image, so a classifier must see the pattern."""
    train, train_labels = _mean_colours("train", 30)
    test, test_labels = _mean_colours("test", 30)
    centroids = np.stack([train[train_labels == label].mean(axis=0)
                          for label in range(len(textures.CLASSES))])
    predicted = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    chance = 1 / len(textures.CLASSES)
    assert np.mean(predicted == test_labels) < chance + 0.15


@pytest.mark.parametrize("probed, suggested, expected", [
    (range(11), 10, [5, 8, 10]),  # the top: halfway down, then halfway back up
    (range(11), 3, [3, 7, 10]),   # between the suggestion and the top
    (range(11), 9, [5, 9, 10]),   # the widest gap is below the suggestion
    (range(11), 0, [0, 5, 10]),
    ([1, 3, 5, 7, 9], 9, [5, 7, 9]),  # only probed blocks are chosen
    ([4, 9], 4, [4, 9]),
])
def test_arm_c_is_fine_tuned_at_the_suggestion_the_top_and_the_widest_gap(
        probed, suggested, expected):
    assert depths.fine_tuned_blocks(probed, suggested) == expected


def test_a_suggestion_the_probe_did_not_measure_is_refused():
    with pytest.raises(ValueError, match="Suggested block 4 is not one of"):
        depths.fine_tuned_blocks([1, 3, 5], 4)


def _write_probe(folder, validation_top1s):
    os.makedirs(folder)
    with open(os.path.join(folder, "depths.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("block", "from_top", "layer", "features", "train_top1",
                         "validation_top1"))
        for block, top1 in enumerate(validation_top1s):
            writer.writerow([block, block - len(validation_top1s), f"layer{block}", 16,
                             "1.0000", f"{top1:.4f}"])


def test_the_probe_is_read_with_the_tools_suggestion_and_judged_against_fine_tuning(
        tmp_path):
    _write_probe(str(tmp_path / "probe"), [0.3, 0.6, 0.6, 0.5])
    probed = depths.read_probe(str(tmp_path / "probe"))
    assert [(depth.block, depth.validation_top1) for depth in probed] == [
        (0, 30.0), (1, 60.0), (2, 60.0), (3, 50.0)]
    suggested = depths.suggested_block(probed)
    assert suggested == 2  # the deeper of a tie, as --mode=probe says

    study = depth_report.DepthStudy(
        title="T", probed=probed, probe_seconds=12.0, suggested=suggested,
        fine_tuned={0: (41.0, 100.0), 2: (55.5, 120.0), 3: (60.25, 130.0)},
        flip={0: None, 2: 56.0, 3: 61.0})
    table = depth_report.study_table(study)
    assert "| 2 | -2 | 16 | 100.0% / 60.0% (probe's best) | 55.5% / 56.0% (120 s) |" in table
    assert "| 3 | -1 | 16 | 100.0% / 50.0% | 60.2% / 61.0% (130 s) (best) |" in table
    assert "| 1 | -3 | 16 | 100.0% / 60.0% | - |" in table
    assert table.endswith("best fine-tuned depth of blocks 0, 2, 3: block 3. Different.")
    assert depth_report.verdict_line("near", study) == "near_probe_matches_fine_tuning=different"


def test_a_finished_probe_is_reported_not_run_again(tmp_path):
    (tmp_path / "near_probe" / "probe").mkdir(parents=True)
    (tmp_path / "near_probe" / "probe" / "summary.txt").write_text("")
    flags_ = ["--classes=a,b"]
    (tmp_path / "times.json").write_text(json.dumps({"near_probe": 12.0}))
    (tmp_path / "commands.json").write_text(json.dumps(
        {"near_probe": [*arms_lib.COMMON_FLAGS, *flags_, "--mode=probe"]}))

    assert Runner(str(tmp_path), total=1).probe("near_probe", "probe", flags_) == 12.0
    with pytest.raises(SystemExit, match="--classes=a,b --classes=c,d"):
        Runner(str(tmp_path), total=1).probe("near_probe", "probe", ["--classes=c,d"])
