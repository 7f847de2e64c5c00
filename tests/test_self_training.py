"""Self-training on unlabelled images: the pool, its checks, the pseudo-labels
kept per class, the rounds as phases, resume, and the export rule."""

import csv
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO_ROOT, SMOKE_FLAGS, TEST_BACKBONE, parse_config
from tl_keras import rundir
from tl_keras.data import folder
from tl_keras.data import unlabeled
from tl_keras.errors import UsageError
from tl_keras.training import export_weights
from tl_keras.training import monitor
from tl_keras.training import recipe
from tl_keras.training import runstate
from tl_keras.training import self_training
from tl_keras.training import train

CLASSES = ("bright", "dark")
_BRIGHTNESS = {"bright": 195, "dark": 60}


def _write_images(directory, name, count, rng):
    os.makedirs(directory, exist_ok=True)
    for index in range(count):
        pixels = rng.normal(_BRIGHTNESS[name], 40, (16, 16, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(directory, f"{name}{index}.png"))


def write_dataset_and_pool(root, pool_per_class=12):
    """`root/images/{train,val,test}/{bright,dark}/` and an unlabelled pool,
    `root/pool/`: a subfolder per class (their hidden labels) and loose images
    deeper down. Returns (the --dataset, the --unlabeled) values."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        for name in CLASSES:
            _write_images(os.path.join(root, "images", split, name), name, count, rng)
    for name in CLASSES:
        _write_images(os.path.join(root, "pool", name), name, pool_per_class, rng)
    _write_images(os.path.join(root, "pool", "unsorted", "deeper"), "dark", 3, rng)
    return f"folder:{root}/images", f"{root}/pool"


def _splits(dataset):
    return folder.load_folder(dataset, image_size=32, resize="stretch", val_fraction=0.1,
                              seed=0, strict=False, classes=(),
                              train_examples_per_class=None)


def _pool(source, splits):
    return unlabeled.load_pool(source, splits, dataset=f"folder:{source}", data_dir=None,
                               image_size=32, resize="stretch", strict=False)


@pytest.fixture
def dataset_and_pool(tmp_path):
    return write_dataset_and_pool(str(tmp_path))


# --- Choosing the pseudo-labels ---------------------------------------------

def test_only_confident_images_are_kept_and_at_most_the_cap_per_class():
    probabilities = np.array([
        [0.95, 0.05, 0.0],  # class 0, kept third-most-confident: over the cap
        [0.99, 0.01, 0.0],  # class 0
        [0.97, 0.03, 0.0],  # class 0
        [0.50, 0.50, 0.0],  # below the threshold
        [0.10, 0.85, 0.05],  # class 1
        [0.0, 0.2, 0.8],  # class 2, at the threshold
        [0.79, 0.21, 0.0],  # below the threshold
    ])
    kept = self_training.select_pseudo_labels(probabilities, threshold=0.8, per_class_cap=2)
    assert kept.indices.tolist() == [1, 2, 4, 5]
    assert kept.labels.tolist() == [0, 0, 1, 2]
    np.testing.assert_allclose(kept.confidences, [0.99, 0.97, 0.85, 0.8])


def test_the_cap_holds_for_every_class_of_a_large_pool():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5000, 4)) + np.array([3.0, 0, 0, 0])  # class 0 dominates
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    kept = self_training.select_pseudo_labels(probabilities, threshold=0.6,
                                              per_class_cap=300)
    counts = np.bincount(kept.labels, minlength=4)
    assert counts.max() == 300 and counts[0] == 300  # it would take far more uncapped
    assert (probabilities[kept.indices].max(axis=1) >= 0.6).all()
    # The kept ones of the capped class are its most confident.
    of_class = (probabilities.argmax(axis=1) == 0) & (probabilities.max(axis=1) >= 0.6)
    least_kept = kept.confidences[kept.labels == 0].min()
    assert np.sort(probabilities[of_class].max(axis=1))[-300] == least_kept


def test_the_default_cap_is_a_share_of_the_pool_per_class():
    assert self_training.per_class_cap(pool_size=24_400, num_classes=5, given=None) == 1952
    assert self_training.per_class_cap(pool_size=1_001, num_classes=5, given=None) == 81
    assert self_training.per_class_cap(pool_size=3, num_classes=10, given=None) == 1
    assert self_training.per_class_cap(pool_size=24_400, num_classes=5, given=7) == 7


# --- The pool and its checks ------------------------------------------------

def test_the_pool_is_searched_recursively_and_only_class_subfolders_give_hidden_labels(
        dataset_and_pool):
    dataset, source = dataset_and_pool
    pool = _pool(source, _splits(dataset))
    assert len(pool) == 2 * 12 + 3
    hidden = dict(zip(pool.ids, pool.hidden_labels))
    assert {label for path, label in hidden.items() if "/unsorted/" in path} == {-1}
    assert {label for path, label in hidden.items() if "/pool/dark/" in path} == {1}


@pytest.mark.parametrize("split_folder", ["val", "test"])
def test_a_validation_or_test_image_in_the_pool_is_refused_naming_it(
        dataset_and_pool, tmp_path, split_folder):
    dataset, source = dataset_and_pool
    original = tmp_path / "images" / split_folder / "dark" / "dark0.png"
    copy = tmp_path / "pool" / "unsorted" / "renamed.png"
    shutil.copy(original, copy)  # the same bytes under another name
    with pytest.raises(UsageError, match="renamed.png") as refusal:
        _pool(source, _splits(dataset))
    assert str(original) in str(refusal.value)
    os.remove(copy)
    os.symlink(original, copy)  # the same file
    with pytest.raises(UsageError, match="renamed.png"):
        _pool(source, _splits(dataset))


def test_training_images_in_the_pool_are_left_out(dataset_and_pool, tmp_path, capsys):
    dataset, source = dataset_and_pool
    shutil.copytree(tmp_path / "images" / "train" / "bright", tmp_path / "pool" / "copied")
    pool = _pool(source, _splits(dataset))
    assert len(pool) == 2 * 12 + 3
    assert "Leaving out 8 unlabelled images that are the run's training images" in (
        capsys.readouterr().out)


def test_same_files_finds_a_link_and_a_copy_but_not_another_file_of_the_same_size(tmp_path):
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"x" * 100)
    second.write_bytes(b"y" * 100)
    (tmp_path / "copy.bin").write_bytes(b"x" * 100)
    os.symlink(second, tmp_path / "link.bin")
    (tmp_path / "other.bin").write_bytes(b"z" * 100)
    found = unlabeled.same_files(
        [str(tmp_path / name) for name in ("copy.bin", "link.bin", "other.bin")],
        [str(first), str(second)])
    assert found == {0: str(first), 1: str(second)}


def test_a_missing_or_empty_pool_is_refused(dataset_and_pool, tmp_path):
    dataset, _ = dataset_and_pool
    splits = _splits(dataset)
    with pytest.raises(UsageError, match="no such folder"):
        _pool(str(tmp_path / "nowhere"), splits)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UsageError, match="no image files"):
        _pool(str(tmp_path / "empty"), splits)
    # A pool of nothing but the run's own training images leaves nothing.
    with pytest.raises(UsageError, match="no images left"):
        _pool(str(tmp_path / "images" / "train"), splits)


# --- Options ----------------------------------------------------------------

def test_rounds_default_to_one_with_unlabeled_images_and_to_none_without(tmp_path):
    with_pool, _ = parse_config(f"--unlabeled={tmp_path}")
    without, _ = parse_config()
    assert with_pool.self_training_rounds == 1 and without.self_training_rounds == 0
    assert parse_config(f"--unlabeled={tmp_path}",
                        "--self_training_rounds=3")[0].self_training_rounds == 3


@pytest.mark.parametrize("args, message", [
    (["--self_training_rounds=1"], "needs unlabelled images"),
    (["--unlabeled=POOL", "--pseudo_label_threshold=0"], "must be in \\(0, 1\\)"),
    (["--unlabeled=POOL", "--pseudo_label_threshold=1"], "must be in \\(0, 1\\)"),
    (["--unlabeled=POOL", "--pseudo_labels_per_class=0"], "must be at least 1"),
    (["--unlabeled=POOL", "--self_training_epochs=0"], "must be at least 1"),
    (["--unlabeled=POOL", "--strategy=multi_worker"], "runs on one machine"),
    (["--unlabeled=tfds:stl10"], "tfds:NAME:SPLIT"),
])
def test_bad_self_training_options_are_refused_when_parsed(args, message):
    from absl import flags as absl_flags

    with pytest.raises(absl_flags.IllegalFlagValueError, match=message):
        parse_config(*args)


# --- Rounds as phases ---------------------------------------------------------

def test_rounds_follow_fine_tuning_on_the_same_timeline():
    rounds = recipe.plan_self_training(first_epoch=5, rounds=2, epochs=4,
                                       learning_rate=1e-4, warmup_epochs=3)
    assert [(p.name, p.first_epoch, p.epochs) for p in rounds] == [
        ("self_training_1", 5, 4), ("self_training_2", 9, 4)]
    assert rounds[0].warmup_epochs == 2  # at most half the round
    assert [recipe.self_training_round(p.name) for p in rounds] == [1, 2]
    assert recipe.self_training_round("finetune") is None
    assert [monitor.phase_number(name) for name in ("head", "finetune", "self_training_2")] \
        == [0, 1, 3]


def test_the_model_labels_every_pool_image_in_order_and_in_inference_mode(dataset_and_pool):
    import tiny_training

    dataset, source = dataset_and_pool
    pool = _pool(source, _splits(dataset))
    model, _ = tiny_training.build()
    dropped = keras.layers.Dropout(0.9)(model.output)  # a layer that differs in training
    model = keras.Model(model.input, dropped)
    probabilities = self_training.label_pool(model, pool, batch_size=5, image_size=16,
                                             resize="stretch", num_classes=3)
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in pool.ids])
    np.testing.assert_allclose(probabilities, model(images, training=False), atol=1e-6)


def test_a_rounds_pseudo_labels_are_written_and_read_back(dataset_and_pool, tmp_path):
    dataset, source = dataset_and_pool
    pool = _pool(source, _splits(dataset))
    kept = self_training.PseudoLabels(np.array([0, 5]), np.array([1, 0]),
                                      np.array([0.9, 0.85]))
    path = str(tmp_path / "run" / "self_training" / "round_1.json")
    self_training.write_round(path, 1, pool, kept, threshold=0.8, cap=10)
    with open(path) as file:
        record = json.load(file)
    assert record["pseudo_labels"][1] == {"image": pool.ids[5], "label": 0,
                                          "confidence": 0.85}
    read = self_training.read_round(path, pool)
    assert read.indices.tolist() == [0, 5] and read.labels.tolist() == [1, 0]
    os.remove(pool.ids[5])
    with pytest.raises(UsageError, match="no longer in --unlabeled"):
        self_training.read_round(path, _pool(source, _splits(dataset)))


def test_the_rounds_line_counts_per_class_and_scores_hidden_labels():
    pool = unlabeled.Pool(source="POOL", ids=np.array(["a", "b", "c", "d"]),
                          hidden_labels=np.array([0, 1, -1, 1]), image_shape=None,
                          read=None)
    kept = self_training.PseudoLabels(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1]),
                                      np.ones(4))
    line = self_training.describe_round(1, kept, pool, ("cat", "dog"), cap=5, threshold=0.8)
    assert "kept 4 of 4 unlabelled images (confidence >= 0.8, at most 5 per class): " \
           "cat 2, dog 2." in line
    assert "(3 images): 66.7% (cat 50.0%, dog 100.0%)" in line


def test_a_resumed_round_reads_its_pseudo_labels_instead_of_labelling_again(
        dataset_and_pool, tmp_path, monkeypatch):
    dataset, source = dataset_and_pool
    splits = _splits(dataset)
    pool = _pool(source, splits)
    config, _ = parse_config(f"--dataset={dataset}", f"--unlabeled={source}",
                             "--batch_size=4", "--self_training_augment=none",
                             "--self_training_mixup=0")
    paths = rundir.RunPaths(str(tmp_path / "run"))
    kept = self_training.PseudoLabels(np.array([1, 2, 26]), np.array([1, 0, 1]),
                                      np.ones(3))
    self_training.write_round(paths.pseudo_labels(1), 1, pool, kept, threshold=0.8, cap=9)

    def never(*args, **kwargs):
        raise AssertionError("the round labelled the pool again")

    monkeypatch.setattr(self_training, "label_pool", never)
    rounds = self_training.Rounds(model=None, pool=pool, splits=splits, paths=paths,
                                  config=config)
    phase = recipe.plan_self_training(first_epoch=2, rounds=1, epochs=1, learning_rate=1e-4,
                                      warmup_epochs=0)[0]
    batches, steps = rounds(phase)
    # The 16 labelled images and the 3 kept ones, in full batches of 4.
    assert steps == 4 and rounds.steps == {"self_training_1": 4}
    # Known, so that Keras starts the batches afresh each epoch rather than
    # running out of them in the second (under JAX, a crash).
    assert int(batches.cardinality()) == 4
    images, labels = next(iter(batches))
    assert images.shape == (4, 16, 16, 3) and labels.shape == (4, 2)
    assert rounds(recipe.plan_phases(head_epochs=1, head_learning_rate=1e-3,
                                     finetune_epochs=1, finetune_learning_rate=1e-3,
                                     warmup_epochs=0)[1]) is None


def test_a_rounds_balanced_class_weights_average_1_over_what_it_trains_on(
        dataset_and_pool, tmp_path, capsys):
    """Labels 8/2 weigh 0.625/2.5; a round that keeps 2/10 pseudo-labels trains
    on 10/12 images, on which those weights would average 1.65."""
    dataset, source = dataset_and_pool
    for index in range(2, 8):
        os.remove(os.path.join(dataset.removeprefix("folder:"), "train", "dark",
                               f"dark{index}.png"))
    splits = _splits(dataset)
    assert tuple(splits.train_class_counts) == (8, 2)
    pool = _pool(source, splits)
    config, _ = parse_config(f"--dataset={dataset}", f"--unlabeled={source}",
                             "--class_weight=balanced", "--batch_size=2",
                             "--self_training_augment=none", "--self_training_mixup=0",
                             "--self_training_cutmix=0")
    paths = rundir.RunPaths(str(tmp_path / "run"))
    kept_labels = np.array([0, 0] + [1] * 10)
    kept = self_training.PseudoLabels(np.arange(12), kept_labels, np.ones(12))
    self_training.write_round(paths.pseudo_labels(1), 1, pool, kept, threshold=0.8, cap=12)
    rounds = self_training.Rounds(model=None, pool=pool, splits=splits, paths=paths,
                                  config=config)
    phase = recipe.plan_self_training(first_epoch=2, rounds=1, epochs=1, learning_rate=1e-4,
                                      warmup_epochs=0)[0]

    batches, steps = rounds(phase)

    labels, weights = [], []
    for _, batch_labels, batch_weights in batches.take(steps):
        labels.append(np.argmax(batch_labels, axis=-1))
        weights.append(batch_weights.numpy())
    labels, weights = np.concatenate(labels), np.concatenate(weights)
    assert np.bincount(labels).tolist() == [10, 12]  # every image once
    assert weights.mean() == pytest.approx(1.0, abs=1e-6)
    # Each class carries the same share of the loss.
    assert weights[labels == 0].sum() == pytest.approx(weights[labels == 1].sum())
    assert "Self-training round 1: class weights (balanced, over its labelled and " \
           "pseudo-labelled images): bright 1.10, dark 0.92." in capsys.readouterr().out


# --- The export rule ----------------------------------------------------------

def test_a_round_that_lowers_validation_top1_is_not_exported(tmp_path):
    """Fine-tuning learns the batch; the round trains on wrong labels, so its
    validation top-1 falls, and the weights exported stay fine-tuning's."""
    import tiny_training

    model, backbone = tiny_training.build()
    right = tiny_training.one_batch()
    wrong = right.map(lambda images, labels: (images, tf.roll(labels, 1, axis=1)))
    phases = tiny_training.phases(0, 6, 1e-2) + recipe.plan_self_training(
        first_epoch=6, rounds=1, epochs=2, learning_rate=1e-2, warmup_epochs=0)
    paths = rundir.RunPaths(str(tmp_path))
    asked = []

    def phase_inputs(phase):
        asked.append(phase.name)
        return (wrong, 4) if phase.name == "self_training_1" else None

    train.train_two_phases(
        model, backbone, train_batches=right, validation_batches=right.take(1),
        steps_per_epoch=4, phases=phases, unfreeze="all", optimizer="adam",
        weight_decay=0.0, label_smoothing=0.0, num_classes=tiny_training.NUM_CLASSES,
        jit_compile=False, scope=tf.distribute.get_strategy().scope, paths=paths,
        phase_inputs=phase_inputs, verbose=0)

    assert asked == ["finetune", "self_training_1"]
    progress = runstate.Progress(paths.progress)
    round_top1 = progress.phases["self_training_1"]["validation"]["top1"]
    assert progress.best["phase"] == "finetune" and round_top1 < progress.best_top1
    exported = export_weights.restore_export_weights(
        model, backbone, "best", phases=phases, paths=paths, unfreeze="all",
        train_batchnorm=False, label_smoothing=0.0, train_batches=right,
        validation_batches=right.take(1))
    assert exported["phase"] == "finetune"
    images, labels = next(iter(right))
    predicted = np.argmax(model.predict(images, verbose=0), axis=1)
    assert (predicted == np.argmax(labels, axis=1)).mean() == progress.best_top1
    with open(paths.history, newline="") as file:
        assert [row["phase"] for row in csv.DictReader(file)][-2:] == ["self_training_1"] * 2


# --- A whole run, killed mid-round ----------------------------------------------

def _history(model_dir):
    path = os.path.join(model_dir, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as file:
        return [(int(row["epoch"]), row["phase"]) for row in csv.DictReader(file)]


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_in_that_round_with_the_same_pseudo_labels(
        tmp_path, capsys):
    """The run is SIGKILLed in a process of its own; the rerun, which only has
    to find what that process left, runs in this one (no second start-up)."""
    from tl_keras.cli import job

    dataset, source = write_dataset_and_pool(str(tmp_path))
    model_dir = str(tmp_path / "run")
    arguments = [TEST_BACKBONE, f"--dataset={dataset}", f"--unlabeled={source}",
                 "--batch_size=8", "--head_epochs=1", "--finetune_epochs=1",
                 "--self_training_epochs=3", "--pseudo_label_threshold=0.3",
                 # Not under test, and tracing RandAugment's pipeline costs
                 # more than the whole round trains.
                 "--self_training_augment=none",
                 "--jit_compile=false", f"--model_dir={model_dir}"]
    command = [sys.executable, os.path.join(REPO_ROOT, "run.py"), f"--flagfile={SMOKE_FLAGS}",
               *arguments]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    # The round's first epoch backed up (a kill before its backup would only
    # redo that epoch).
    backed_up = os.path.join(rundir.RunPaths(model_dir).backup_dir("self_training_1"),
                             rundir.BACKUP_METADATA_FILE)
    while not os.path.exists(backed_up):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run took too long to reach the round"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    pseudo_labels = rundir.RunPaths(model_dir).pseudo_labels(1)
    shutil.copy(pseudo_labels, tmp_path / "before.json")

    capsys.readouterr()
    config, flagfile_text = parse_config(*arguments)
    job.run_training(config, flagfile_text=flagfile_text, verbose=0)
    rerun = capsys.readouterr().out

    assert "Phase finetune: already complete; skipping it." in rerun
    assert "reading the pseudo-labels its start wrote" in rerun
    assert "labelling" not in rerun
    assert "Phase self_training_1: epochs 3-5, resuming at epoch 4" in rerun
    assert filecmp.cmp(pseudo_labels, tmp_path / "before.json", shallow=False)
    assert _history(model_dir) == [(1, "head"), (2, "finetune")] + [
        (epoch, "self_training_1") for epoch in (3, 4, 5)]
    with open(os.path.join(model_dir, "metrics.json")) as file:
        assert "self_training_1" in json.load(file)["validation"]


# --- A TFDS split as the pool ---------------------------------------------------

def _tfds_pool(source, splits, dataset="cifar10"):
    return unlabeled.load_pool(source, splits, dataset=dataset, data_dir=None, image_size=32,
                               resize="stretch", strict=False)


@pytest.mark.parametrize("source, role", [
    ("tfds:cifar10:test", "test"),
    ("tfds:cifar10:train", "validation"),  # validation is carved from train
])
def test_a_tfds_pool_that_shares_the_validation_or_test_split_is_refused(
        mock_tfds, source, role):
    from tl_keras.data import tfds_dataset

    splits = tfds_dataset.load_tfds("cifar10", None, "train", "", "test", 0.1)
    with pytest.raises(UsageError, match=f"shares examples with the run's {role} split"):
        _tfds_pool(source, splits)


@pytest.mark.parametrize("dataset, source", [
    ("cifar10:3.0.2", "tfds:cifar10:test"),
    ("cifar10", "tfds:cifar10:3.0.2:test"),
    ("cifar10:3.0.2", "tfds:cifar10:3.0.2:test[:10%]"),
])
def test_a_version_in_either_name_does_not_hide_the_overlap(mock_tfds, dataset, source):
    from tl_keras.data import tfds_dataset

    splits = tfds_dataset.load_tfds(dataset, None, "train", "", "test", 0.1)
    with pytest.raises(UsageError, match=f"shares examples with the run's test split "
                                         f"\\(test.* of --dataset={dataset}\\)"):
        _tfds_pool(source, splits, dataset=dataset)


def test_a_pool_names_its_version_between_name_and_split(mock_tfds):
    from tl_keras.data import tfds_dataset

    assert unlabeled.parse_tfds_source("tfds:cifar10:3.0.2:train[:50%]") == (
        "cifar10", "3.0.2", "train[:50%]")
    assert unlabeled.parse_tfds_source("tfds:cifar10:train[:50%]") == (
        "cifar10", None, "train[:50%]")
    splits = tfds_dataset.load_tfds("cifar10", None, "train", "", "test", 0.1)
    pool = _tfds_pool("tfds:cifar10:3.0.2:train[:50%]", splits)
    assert len(pool) == 32


def test_a_tfds_pool_reads_the_chosen_examples_with_their_pseudo_labels(mock_tfds):
    from tl_keras.data import tfds_dataset

    splits = tfds_dataset.load_tfds("cifar10", None, "train", "", "test", 0.1)
    pool = _tfds_pool("tfds:cifar10:train[:50%]", splits)
    assert len(pool) == 32 and pool.ids[3] == "tfds:cifar10:train[:50%]#3"
    assert (pool.hidden_labels >= 0).all()  # the mock's labels name cifar10's classes
    examples = list(pool.read(np.array([0, 3, 5]), np.array([7, 8, 9]), False)
                    .as_numpy_iterator())
    assert [label for _, label in examples] == [7, 8, 9]
    assert all(image.shape == (32, 32, 3) for image, _ in examples)
    # Another dataset's split may be anything.
    assert len(_tfds_pool("tfds:cifar10:test", splits, dataset="folder:IMAGES")) == 64


@pytest.mark.slow
def test_a_round_trains_every_epoch_under_jax(tmp_path):
    """Under JAX, a round's second epoch needs its batches started afresh.

    The phases and rounds are trained as a run trains them, in a process of its
    own for the backend, but on tiny_training's classifier and without the
    run's export (see jax_self_training_round.py): a whole run.py run on
    MobileNet spent a minute compiling for JAX what this check doesn't need."""
    dataset, source = write_dataset_and_pool(str(tmp_path))
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "jax_self_training_round.py"),
         f"--flagfile={SMOKE_FLAGS}", f"--dataset={dataset}", f"--unlabeled={source}",
         "--batch_size=8", "--head_epochs=1", "--finetune_epochs=0",
         "--self_training_epochs=2", "--pseudo_label_threshold=0.3",
         # Not under test, and tracing RandAugment's pipeline costs more than
         # the whole round trains.
         "--self_training_augment=none", f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Backend: jax." in result.stdout
    assert "Phase self_training_1: epochs 2-3" in result.stdout
    assert _history(str(tmp_path / "run")) == [(1, "head"), (2, "self_training_1"),
                                               (3, "self_training_1")]
