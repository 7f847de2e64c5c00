"""Image folders: formats, bad files, layouts, subsets and augmentation."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tl_keras.data import folder
from tl_keras.data import image_io
from tl_keras.data import pipeline
from tl_keras.errors import UsageError


def _write_image(path, size=(24, 24), mode="RGB", fmt=None, value=None, frames=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    def pixels():
        if value is not None:
            return np.full((size[1], size[0], channels), value, np.uint8).squeeze()
        return rng.integers(0, 256, (size[1], size[0], channels), np.uint8).squeeze()
    images = [Image.fromarray(pixels(), mode) for _ in range(frames)]
    images[0].save(path, format=fmt, save_all=frames > 1, append_images=images[1:])


def _class_folder(root, name, count, size=(24, 24)):
    for index in range(count):
        _write_image(os.path.join(root, name, f"{index:03d}.jpg"), size=size, fmt="JPEG")


def _load(root, **overrides):
    options = dict(image_size=32, resize="stretch", val_fraction=0.2, seed=0,
                   strict=False, classes=(), train_examples_per_class=None)
    options.update(overrides)
    return folder.load_folder(f"folder:{root}", **options)


def _decode_all(dataset):
    return [(image.numpy(), int(label)) for image, label in dataset]


def test_reads_every_format_as_rgb(tmp_path):
    train = tmp_path / "train"
    _write_image(str(train / "a" / "upper.JPG"), fmt="JPEG")
    _write_image(str(train / "a" / "gray.PNG"), mode="L", fmt="PNG", value=77, size=(30, 20))
    _write_image(str(train / "a" / "alpha.png"), mode="RGBA", fmt="PNG", size=(16, 40))
    _write_image(str(train / "b" / "bitmap.BMP"), fmt="BMP", value=200)
    _write_image(str(train / "b" / "animated.gif"), fmt="GIF", frames=3, size=(33, 33))
    _write_image(str(train / "b" / "photo.jpeg"), fmt="JPEG")
    _class_folder(str(tmp_path / "test"), "a", 1)
    _class_folder(str(tmp_path / "test"), "b", 1)

    splits = _load(tmp_path, val_fraction=0.5)

    images = _decode_all(splits.train) + _decode_all(splits.validation)
    assert len(images) == 6
    assert all(image.dtype == np.uint8 and image.shape[-1] == 3 for image, _ in images)
    # Sizes differ, so each image is resized to the input size, as the model would.
    assert splits.image_shape == (32, 32, 3)
    assert {image.shape for image, _ in images} == {(32, 32, 3)}
    assert any((image == 77).all() for image, _ in images)  # gray, in all three channels


def test_bad_files_are_skipped_and_named(tmp_path, capsys):
    _class_folder(str(tmp_path / "train"), "a", 3)
    _class_folder(str(tmp_path / "train"), "b", 3)
    _class_folder(str(tmp_path / "test"), "a", 1)
    _class_folder(str(tmp_path / "test"), "b", 1)
    good = (tmp_path / "train" / "a" / "000.jpg").read_bytes()
    (tmp_path / "train" / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "train" / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "b" / "notes.jpg").write_text("not an image\n")
    (tmp_path / "train" / "b" / ".hidden.jpg").write_bytes(good[:10])
    (tmp_path / "train" / "b" / "readme.txt").write_text("ignored: not an image name")

    splits = _load(tmp_path, val_fraction=0.34)

    out = capsys.readouterr().out
    assert "Skipping 3 file(s)" in out
    for name, reason in [("truncated.jpg", "truncated JPEG"), ("empty.jpg", "empty file"),
                         ("notes.jpg", "not a JPEG, PNG, GIF or BMP file")]:
        assert f"{name}: {reason}" in out
    assert ".hidden" not in out and "readme" not in out
    assert splits.sizes["train"] + splits.sizes["validation"] == 6
    assert len(_decode_all(splits.train)) == splits.sizes["train"]


def test_strict_data_refuses_bad_files(tmp_path):
    _class_folder(str(tmp_path), "a", 5)
    _class_folder(str(tmp_path), "b", 5)
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(UsageError, match=r"(?s)1 file\(s\) can't be read.*empty.png: empty file"):
        _load(tmp_path, strict=True)


def test_an_empty_class_folder_is_an_error_that_names_it(tmp_path):
    _class_folder(str(tmp_path), "a", 5)
    os.makedirs(tmp_path / "b")
    with pytest.raises(UsageError, match=f"Class folder {tmp_path / 'b'} has no images"):
        _load(tmp_path)


def test_one_class_is_an_error(tmp_path):
    _class_folder(str(tmp_path), "only", 5)
    with pytest.raises(UsageError, match="needs at least two"):
        _load(tmp_path)


def test_flat_folder_splits_by_class_deterministically(tmp_path):
    for name in ("a", "b", "c"):
        _class_folder(str(tmp_path), name, 10)

    splits = _load(tmp_path, val_fraction=0.2)
    again = _load(tmp_path, val_fraction=0.2)
    other_seed = _load(tmp_path, val_fraction=0.2, seed=1)

    assert splits.class_names == ("a", "b", "c")
    assert splits.sizes == {"train": 18, "validation": 6, "test": 6}
    validation_labels = sorted(label for _, label in _decode_all(splits.validation))
    assert validation_labels == [0, 0, 1, 1, 2, 2]  # stratified: 2 of each class
    first = [image.tobytes() for image, _ in _decode_all(splits.validation)]
    assert first == [image.tobytes() for image, _ in _decode_all(again.validation)]
    assert first != [image.tobytes() for image, _ in _decode_all(other_seed.validation)]
    assert splits.image_shape == (24, 24, 3)
    # Training files come mixed, not class by class, so a shuffle buffer
    # smaller than the split still sees every class.
    train_labels = [label for _, label in _decode_all(splits.train)]
    assert train_labels != sorted(train_labels)


def _resized_file(path, resize):
    return pipeline.resize_uint8(
        image_io.decode_image(tf.io.read_file(str(path))), 32, resize).numpy()


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_an_image_of_another_size_is_resized_as_the_model_would(tmp_path, resize):
    for split, count in (("train", 4), ("test", 2)):
        for name in ("a", "b"):
            _class_folder(str(tmp_path / split), name, count)
    _write_image(str(tmp_path / "test" / "b" / "wide.png"), size=(60, 20), fmt="PNG")

    splits = _load(tmp_path, resize=resize)

    # One image of another size: no shape is shared, so all travel at the
    # input size, and none is squashed into the 24 px of the others first.
    assert splits.image_shape == (32, 32, 3)
    test = _decode_all(splits.test)
    np.testing.assert_array_equal(
        test[-1][0], _resized_file(tmp_path / "test" / "b" / "wide.png", resize))
    np.testing.assert_array_equal(
        test[0][0], _resized_file(tmp_path / "test" / "a" / "000.jpg", resize))


def test_large_jpegs_come_down_to_the_input_size_on_the_cpu(tmp_path):
    for split, count in (("train", 3), ("test", 1)):
        for name in ("a", "b"):
            # Smooth content, as in photos, which a reduced-scale decode keeps.
            for index in range(count):
                path = tmp_path / split / name / f"{index}.jpg"
                os.makedirs(path.parent, exist_ok=True)
                coarse = np.random.default_rng(index).integers(0, 256, (4, 4, 3), np.uint8)
                Image.fromarray(coarse).resize((300, 140), Image.BILINEAR).save(path)

    splits = _load(tmp_path, resize="crop", val_fraction=0.34)

    assert splits.image_shape == (32, 32, 3)
    # Evaluation: exactly the model's resize of the full image.
    test = _decode_all(splits.test)
    np.testing.assert_array_equal(test[0][0], _resized_file(tmp_path / "test" / "a" / "0.jpg",
                                                            "crop"))
    # Training decodes them at a quarter of their size (140 px / 4 >= 32),
    # then resizes the same way: nearly the same pixels for far less work.
    train = np.stack([image for image, _ in _decode_all(splits.train)]).astype(int)
    full = np.stack([_resized_file(path, "crop") for path in tmp_path.glob("train/*/*")])
    # Mean absolute difference to the closest full-scale image, in 0..255 levels.
    closest = np.abs(train[:, None] - full[None]).mean(axis=(2, 3, 4)).min(axis=1)
    assert 0 < closest.min() and closest.max() < 2


@pytest.mark.parametrize("val_name, test_name", [("val", "test"), ("Validation", "TEST")])
def test_split_folders_are_used_as_they_are(tmp_path, val_name, test_name):
    for split, count in (("train", 6), (val_name, 2), (test_name, 3)):
        for name in ("a", "b"):
            _class_folder(str(tmp_path / split), name, count)

    splits = _load(tmp_path)

    assert splits.sizes == {"train": 12, "validation": 4, "test": 6}
    assert splits.validation_source == f"{val_name}/"


def test_train_and_test_folders_carve_validation_from_train(tmp_path):
    for name in ("a", "b"):
        _class_folder(str(tmp_path / "train"), name, 10)
        _class_folder(str(tmp_path / "test"), name, 3)

    splits = _load(tmp_path, val_fraction=0.1)

    assert splits.sizes == {"train": 18, "validation": 2, "test": 6}
    assert "of train/" in splits.validation_source


def test_classes_and_examples_per_class_select_deterministically(tmp_path):
    for name, count in (("cat", 12), ("dog", 12), ("frog", 12)):
        _class_folder(str(tmp_path / "train"), name, count)
        _class_folder(str(tmp_path / "test"), name, 2)

    splits = _load(tmp_path, classes=("frog", "cat"), train_examples_per_class=4,
                   val_fraction=0.25)
    again = _load(tmp_path, classes=("frog", "cat"), train_examples_per_class=4,
                  val_fraction=0.25)

    assert splits.class_names == ("frog", "cat")
    assert splits.sizes == {"train": 8, "validation": 6, "test": 4}
    train = _decode_all(splits.train)
    assert sorted(label for _, label in train) == [0] * 4 + [1] * 4
    assert [i.tobytes() for i, _ in train] == [i.tobytes() for i, _ in _decode_all(again.train)]


def test_unknown_class_names_the_closest(tmp_path):
    for name in ("cat", "dog"):
        _class_folder(str(tmp_path), name, 5)
    with pytest.raises(UsageError, match=r"no class dgo \(closest: dog\)"):
        _load(tmp_path, classes=("cat", "dgo"))


def test_tfds_subsets_count_and_renumber(mock_tfds):
    from tl_keras.data import tfds_dataset

    splits = tfds_dataset.load_tfds("cifar10", None, "train", "", "test", 0.1,
                                    classes=("3", "5"), train_examples_per_class=2, seed=0)

    assert splits.class_names == ("3", "5")
    train_labels = sorted(int(label) for _, label in splits.train)
    assert splits.sizes["train"] == len(train_labels) == 4
    assert train_labels == [0, 0, 1, 1]
    assert all(int(label) in (0, 1) for _, label in splits.test)


def _training_images(examples, **augmentation):
    batches = pipeline.training_batches(
        examples, num_examples=16, image_shape=(24, 24, 3), image_size=24,
        num_classes=2, batch_size=8, seed=0, repeat=False, **augmentation,
    )
    return [(images.numpy(), labels.numpy()) for images, labels in batches]


@pytest.fixture
def examples():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 24, 24, 3), np.uint8)
    return tf.data.Dataset.from_tensor_slices((images, np.arange(16) % 2))


@pytest.mark.parametrize("augmentation", [
    {"augment": "basic"}, {"augment": "randaugment"}, {"mixup": 0.4}, {"cutmix": 1.0},
])
def test_augmentation_changes_training_batches_reproducibly(examples, augmentation):
    plain = _training_images(examples)
    augmented = _training_images(examples, **augmentation)
    again = _training_images(examples, **augmentation)

    assert any((a[0] != p[0]).any() for a, p in zip(augmented, plain))
    for first, second in zip(augmented, again):
        np.testing.assert_array_equal(first[0], second[0])
    for images, labels in augmented:
        assert images.dtype == np.uint8 and images.shape == (8, 24, 24, 3)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("index", range(5))
def test_cutmix_labels_follow_the_pasted_area(index):
    from tl_keras.data import augment

    # A black image of class 0 and a white one of class 1: the share of black
    # pixels left in the first must be its class-0 label weight.
    images = tf.constant(np.stack([np.zeros((24, 24, 3)), np.full((24, 24, 3), 255)]), tf.uint8)
    labels = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    mixed, mixed_labels = augment.mix_batch(
        images, labels, tf.constant([index, 7], tf.int64), mixup_alpha=0.0, cutmix_alpha=1.0
    )
    black_share = float(np.mean(mixed.numpy()[0, :, :, 0] == 0))
    assert mixed_labels.numpy()[0, 0] == pytest.approx(black_share, abs=1e-6)
    assert mixed_labels.numpy()[1, 1] == pytest.approx(
        float(np.mean(mixed.numpy()[1, :, :, 0] == 255)), abs=1e-6)


def test_evaluation_batches_are_never_augmented(examples):
    # Evaluation has no augmentation options: what is checked is what is served.
    batches = pipeline.evaluation_batches(
        examples, num_examples=16, image_shape=(24, 24, 3), image_size=24,
        num_classes=2, batch_size=8,
    )
    images = np.concatenate([images.numpy() for images, _ in batches])
    expected = np.stack([image.numpy() for image, _ in examples])
    np.testing.assert_array_equal(images, expected)


def test_a_class_too_small_to_split_is_named(tmp_path, capsys):
    _class_folder(str(tmp_path), "common", 10)
    _class_folder(str(tmp_path), "rare", 1)

    splits = _load(tmp_path)

    assert splits.sizes == {"train": 7, "validation": 2, "test": 2}
    assert ("Note: the test split has no examples of rare; the validation split has no "
            "examples of rare; their metrics there will have support 0.") in \
        capsys.readouterr().out
    with pytest.raises(UsageError, match="The test split has no examples of rare; the "
                                         "validation split has no examples of rare"):
        _load(tmp_path, strict=True)
