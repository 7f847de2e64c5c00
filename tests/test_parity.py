"""Evaluation sees the pixels serving sees: `--mode=evaluate`'s predictions on
an image folder match the exported model's on the same original files."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tl_keras.data import image_io, pipeline, sources
from tl_keras.outputs import evaluate, predict

# Training images all share one size; test images come in others, landscape
# and portrait, larger and smaller than the 32 px input.
_TRAIN_SIZE = (72, 72)
_TEST_SIZES = ((80, 48), (48, 80), (120, 70), (70, 120), (40, 28), (33, 90))


def _write_photos(root, split, sizes_by_index, count):
    rng = np.random.default_rng(len(split))
    for name in ("cat", "dog"):
        directory = os.path.join(root, split, name)
        os.makedirs(directory)
        for index in range(count):
            width, height = sizes_by_index(index)
            # Coarse blobs plus pixel noise: content that shrinking without
            # antialiasing, or squashing, visibly changes.
            coarse = rng.integers(0, 256, (6, 6, 3), np.uint8)
            blobs = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
            noise = rng.integers(-40, 41, (height, width, 3))
            pixels = np.clip(blobs + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(directory, f"{index:02d}.jpg"),
                                         quality=90)


# The check needs a run whose SavedModel resizes as --resize says, not one
# trained on these photos: evaluation and serving must agree on any folder. So
# it borrows the session's runs, one per --resize, and points their
# configuration at the photos: deploy_run (stretch, the default) and
# messy_folder_run (crop). Their VGG16 has no BatchNormalization, so its
# outputs depend on the image, trained or not (checked below).
_RUNS = {"stretch": "deploy_run", "crop": "messy_folder_run"}


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_evaluation_predicts_what_serving_predicts_on_the_original_files(tmp_path, request,
                                                                         resize):
    root = str(tmp_path / "photos")
    _write_photos(root, "train", lambda index: _TRAIN_SIZE, count=8)
    _write_photos(root, "test", lambda index: _TEST_SIZES[index % len(_TEST_SIZES)],
                  count=12)
    run_config = request.getfixturevalue(_RUNS[resize])[0]
    assert run_config.resize == resize
    config = dataclasses.replace(run_config, dataset=f"folder:{root}")
    serving = predict.load_serving(config.model_dir)

    # What modes.run_evaluation computes for --mode=evaluate --split=test.
    splits = sources.load_splits(config)
    evaluated, labels = evaluate.predictions_and_labels(
        pipeline.split_batches(config, splits, "test"), predict.serving_predictor(serving))

    # The test split is read in listing order: class by class, files sorted.
    paths = [os.path.join(root, "test", name, file)
             for name in splits.class_names
             for file in sorted(os.listdir(os.path.join(root, "test", name)))]
    np.testing.assert_array_equal(labels, [int("dog" in path) for path in paths])
    classify = serving.signatures["serving_default"]
    served = np.concatenate([
        classify(images=image_io.decode_image(tf.io.read_file(path))[None])
        ["probabilities"].numpy()
        for path in paths
    ])

    # A model whose output ignores its input would agree with anything.
    assert np.ptp(served[:, 0]) > 1e-2
    agreement = np.mean(evaluated.argmax(axis=1) == served.argmax(axis=1))
    difference = np.abs(evaluated - served).max()
    print(f"resize={resize}: argmax agreement {agreement:.3f}, "
          f"largest probability difference {difference:.2e}")
    assert agreement >= 0.99
    assert difference <= 1e-3
