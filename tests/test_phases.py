"""Which weights each phase changes, and that BatchNormalization never moves
unless --batchnorm=train asks it to."""

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

from tl_keras import rundir
from tl_keras.data import pipeline
from tl_keras.errors import UsageError
from tl_keras.model import backbones
from tl_keras.model import classifier as classifier_lib
from tl_keras.training import export_weights
from tl_keras.training import finetune
from tl_keras.training import recipe
from tl_keras.training import resume
from tl_keras.training import runstate
from tl_keras.training import train

NUM_CLASSES = 3
IMAGE_SIZE = 32
# The smallest of the backbones to trace and save (86 layers): these tests
# check which weights move, not how well they learn.
BACKBONE = "mobilenet"
# Where a later block starts, and one layer within it.
LATE_BLOCK = "conv_dw_13"
LATE_LAYER = "conv_pw_13"
_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def _batches(num_examples=16, batch_size=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, num_examples)
    return pipeline.training_batches(
        tf.data.Dataset.from_tensor_slices((images, labels)),
        num_examples=num_examples, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        image_size=IMAGE_SIZE, num_classes=NUM_CLASSES, batch_size=batch_size,
        seed=0, repeat=False,
    )


def _build(weights_path, train_batchnorm=False):
    keras.utils.set_random_seed(1)
    backbone = backbones.build_backbone(BACKBONE, IMAGE_SIZE, weights_path)
    classifier = classifier_lib.build_classifier(
        backbone, BACKBONE, NUM_CLASSES, IMAGE_SIZE, dropout=0.0,
        train_batchnorm=train_batchnorm,
    )
    return classifier, backbone


@pytest.fixture(scope="module")
def pretrained_weights(tmp_path_factory):
    """A backbone weights file, standing in for downloaded ImageNet weights.

    Its BatchNormalization statistics are those of random images, as a trained
    network's fit its data. With the initial ones (mean 0, variance 1) MobileNet's
    activations grow from layer to layer until its ReLU6s saturate, and no
    gradient reaches the early layers; and they differ from the initial values,
    so a test can tell whether training moved them.
    """
    keras.utils.set_random_seed(0)
    backbone = backbones.build_backbone(BACKBONE, IMAGE_SIZE, "none")
    classifier = classifier_lib.build_classifier(backbone, BACKBONE, NUM_CLASSES, IMAGE_SIZE,
                                            dropout=0.0, train_batchnorm=True)
    images = np.random.default_rng(0).integers(0, 256, (32, IMAGE_SIZE, IMAGE_SIZE, 3),
                                               dtype=np.uint8)
    finetune.recompute_batchnorm_statistics(classifier, backbone, [images])
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not np.allclose(layer.moving_variance, 1.0), layer.name
    path = str(tmp_path_factory.mktemp("weights") / "backbone.weights.h5")
    backbone.save_weights(path)
    return path


def _snapshot(model):
    return {weight.path: np.array(weight) for weight in model.weights}


def _changed(before, model):
    after = _snapshot(model)
    return {path for path in before if not np.array_equal(before[path], after[path])}


def _train(model, backbone, tmp_path, *, head_epochs, finetune_epochs, unfreeze="all",
           train_batchnorm=False, phase_callbacks=None):
    train.train_two_phases(
        model, backbone,
        train_batches=_batches(), validation_batches=_batches(),
        steps_per_epoch=2,
        phases=recipe.plan_phases(
            head_epochs=head_epochs, head_learning_rate=1e-2,
            finetune_epochs=finetune_epochs, finetune_learning_rate=1e-2,
            warmup_epochs=0,
        ),
        unfreeze=unfreeze, train_batchnorm=train_batchnorm, optimizer="adam", weight_decay=0.0, label_smoothing=0.0,
        num_classes=NUM_CLASSES, jit_compile=False,
        scope=tf.distribute.get_strategy().scope,
        paths=rundir.RunPaths(str(tmp_path)), phase_callbacks=phase_callbacks, verbose=0,
    )


def _weights_of(model, layer_filter):
    return {
        weight.path
        for layer in model.layers
        if layer_filter(layer)
        for weight in layer.weights
    }


def _batchnorm_weights(backbone):
    return _weights_of(backbone, lambda l: isinstance(l, keras.layers.BatchNormalization))


class _Snapshots(keras.callbacks.Callback):
    """Snapshots the classifier's weights as each phase ends, by phase name."""

    def __init__(self, classifier, phase_name, into):
        super().__init__()
        self.classifier, self.phase_name, self.into = classifier, phase_name, into

    def on_train_end(self, logs=None):
        self.into[self.phase_name] = _snapshot(self.classifier)


@pytest.fixture(scope="module")
def frozen_batchnorm_run(tmp_path_factory, pretrained_weights):
    """One two-phase training (2 head epochs, 1 fine-tuning epoch, --unfreeze=all,
    BatchNormalization frozen) that several tests read, rather than each
    training MobileNet for itself: the weights before it, as each phase ends
    and after it; `fit`'s shuffle arguments, under warnings raised as errors;
    and what history.csv, progress.json and the backup held at each head epoch's
    end. Returns (classifier, backbone, snapshots, shuffles, seen)."""
    import csv

    tmp_path = tmp_path_factory.mktemp("frozen_batchnorm")
    classifier, backbone = _build(pretrained_weights)
    paths = rundir.RunPaths(str(tmp_path))
    snapshots = {"before": _snapshot(classifier)}
    shuffles, seen = [], []
    fit = keras.Model.fit

    def recording_fit(self, *args, **kwargs):
        shuffles.append(kwargs.get("shuffle", True))
        return fit(self, *args, **kwargs)

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            with open(paths.history, newline="") as file:
                rows = [int(row["epoch"]) for row in csv.DictReader(file)]
            recorded = runstate.Progress(paths.progress).phases["head"]["validation"]
            backed_up, _ = resume.ResumableBackup(paths.backup_dir("head")).saved_position()
            seen.append((rows[-1], recorded is not None, backed_up))

    def callbacks(phase):
        spy = [Spy()] if phase.name == "head" else []
        return spy + [_Snapshots(classifier, phase.name, snapshots)]

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(keras.Model, "fit", recording_fit)
        warnings.simplefilter("error", UserWarning)
        _train(classifier, backbone, tmp_path, head_epochs=2, finetune_epochs=1,
               phase_callbacks=callbacks)
    snapshots["after"] = _snapshot(classifier)
    return classifier, backbone, snapshots, shuffles, seen


def _changed_between(snapshots, start, end):
    return {path for path in snapshots[start]
            if not np.array_equal(snapshots[start][path], snapshots[end][path])}


def test_head_phase_changes_only_the_head(frozen_batchnorm_run):
    classifier, _, snapshots, _, _ = frozen_batchnorm_run

    head = {w.path for w in classifier.get_layer("head").weights}
    assert _changed_between(snapshots, "before", "head") == head


def test_finetune_changes_every_unfrozen_weight_but_no_batchnorm(frozen_batchnorm_run):
    # From the head phase's end to after the run: the phase and what follows it.
    _, backbone, snapshots, _, _ = frozen_batchnorm_run

    changed = _changed_between(snapshots, "head", "after")
    batchnorm = _batchnorm_weights(backbone)
    assert batchnorm, "the backbone should have BatchNormalization layers"
    assert not changed & batchnorm, "BatchNormalization weights or statistics moved"
    convolutions = _weights_of(backbone, lambda l: isinstance(l, _CONVOLUTIONS))
    assert convolutions <= changed, "every convolution should train with --unfreeze=all"


@pytest.fixture(scope="module")
def trained_batchnorm_run(tmp_path_factory, pretrained_weights):
    """One two-phase training with --batchnorm=train (1 head epoch, 1
    fine-tuning epoch from LATE_BLOCK) that two tests read: the weights before
    it, as each phase ends and after it, and the BatchNormalization momentum
    each layer had during fine-tuning's steps. Returns (backbone, snapshots,
    momentum_in_fit)."""
    tmp_path = tmp_path_factory.mktemp("trained_batchnorm")
    classifier, backbone = _build(pretrained_weights, train_batchnorm=True)
    batchnorm = [layer for layer in backbone.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
    snapshots = {"before": _snapshot(classifier)}
    momentum_in_fit = {}

    class MomentumSpy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for layer in batchnorm:
                momentum_in_fit[layer.name] = layer.momentum

    def callbacks(phase):
        spy = [MomentumSpy()] if phase.name == "finetune" else []
        return spy + [_Snapshots(classifier, phase.name, snapshots)]

    _train(classifier, backbone, tmp_path, head_epochs=1, finetune_epochs=1,
           unfreeze=LATE_BLOCK, train_batchnorm=True, phase_callbacks=callbacks)
    snapshots["after"] = _snapshot(classifier)
    return backbone, snapshots, momentum_in_fit


def test_trained_batchnorm_moves_only_where_unfrozen_and_only_in_phase_2(
        trained_batchnorm_run):
    # --batchnorm=train.
    backbone, snapshots, _ = trained_batchnorm_run

    assert not _changed_between(snapshots, "before", "head") & _batchnorm_weights(backbone), (
        "phase 1 freezes the backbone, BatchNormalization statistics included")

    names = [layer.name for layer in backbone.layers]
    first = LATE_BLOCK
    # Fine-tuning and what follows it (the statistics recomputed after the last phase).
    changed = _changed_between(snapshots, "head", "after")
    is_batchnorm = lambda l: isinstance(l, keras.layers.BatchNormalization)  # noqa: E731
    later = _weights_of(backbone, lambda l: is_batchnorm(l)
                        and names.index(l.name) >= names.index(first))
    earlier = _weights_of(backbone, lambda l: is_batchnorm(l)
                          and names.index(l.name) < names.index(first))
    assert later <= changed, "the unfrozen BatchNormalization layers should train"
    assert not changed & earlier, "frozen BatchNormalization layers moved"


def test_trained_batchnorm_statistics_follow_the_weights_during_phase_2(
        trained_batchnorm_run):
    # Each epoch's validation uses the moving statistics. At the backbone's own
    # momentum of 0.99 they would still be mostly their initial values after a
    # short phase, and validation would report near chance.
    backbone, _, momentum_in_fit = trained_batchnorm_run
    first = LATE_BLOCK
    names = [layer.name for layer in backbone.layers]
    batchnorm = [layer for layer in backbone.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]

    unfrozen = {layer.name for layer in batchnorm
                if names.index(layer.name) >= names.index(first)}
    assert unfrozen and {momentum_in_fit[name] for name in unfrozen} == {
        finetune.TRACKING_BATCHNORM_MOMENTUM}
    assert {m for name, m in momentum_in_fit.items() if name not in unfrozen} == {0.99}, (
        "only the trainable BatchNormalization layers should change momentum")
    assert {layer.get_config()["momentum"] for layer in batchnorm} == {0.99}, (
        "after the phase, the saved configuration should have the architecture's momentum")


def test_batchnorm_momentum_reaches_the_traced_train_step():
    # Keras reads momentum when it traces the train step, so setting it is only
    # worth something if a step traced inside the block uses it.
    inputs = keras.Input((1,))
    outputs = keras.layers.Dense(1)(keras.layers.BatchNormalization(name="bn")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    constant = np.full((8, 1), 10.0, "float32")

    with finetune.batchnorm_momentum(model, 0.9):
        model.fit(constant, np.zeros((8, 1), "float32"), batch_size=8, verbose=0)

    layer = model.get_layer("bn")
    # One step from mean 0: 0.9 * 0 + 0.1 * 10. At the layer's own 0.99 it would be 0.1.
    np.testing.assert_allclose(np.array(layer.moving_mean), [1.0], rtol=1e-5)
    assert layer.momentum == 0.99


def test_each_phase_traces_its_train_step_once(tmp_path):
    """Keras, under no strategy of its own, leaves the optimizer's variables to
    the step's first trace, and TensorFlow then traces it again: each phase
    would wait twice as long for its first step (benchmarks/phase_start.py)."""
    import tiny_training

    model, backbone = tiny_training.build()
    traces = tiny_training.count_train_step_traces(model)
    tiny_training.train_phases(model, backbone, tmp_path, head_epochs=1, finetune_epochs=1)
    assert len(traces) == 2


def test_trained_batchnorm_predicts_with_its_moving_statistics():
    # Trained or not, BatchNormalization must normalise by its moving statistics
    # at inference, so one image's prediction can't depend on its batch.
    classifier, _ = _build("none", train_batchnorm=True)
    images = np.random.default_rng(0).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3),
                                               dtype=np.uint8)
    alone = classifier.predict(images[:1], verbose=0)
    in_batch = classifier.predict(images, verbose=0)[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-4, atol=1e-5)
    trained_mode = keras.ops.convert_to_numpy(classifier(images, training=True))[:1]
    assert not np.allclose(trained_mode, alone, atol=1e-5), (
        "in training mode the backbone should normalise by batch statistics")


def test_recomputed_batchnorm_statistics_are_those_of_the_batches():
    classifier, backbone = _build("none", train_batchnorm=True)
    images = np.random.default_rng(0).integers(0, 256, (8, IMAGE_SIZE, IMAGE_SIZE, 3),
                                               dtype=np.uint8)
    frozen = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    frozen.trainable = False

    def modes_differ():
        inference = classifier.predict(images, verbose=0)
        training = keras.ops.convert_to_numpy(classifier(images, training=True))
        return np.abs(inference - training).max()

    assert modes_differ() > 0.05, "the initial statistics should not fit these images"
    used = finetune.recompute_batchnorm_statistics(classifier, backbone, [images, images])

    assert used == 2
    # Averaged over the same batch twice, the moving statistics are that
    # batch's own, so inference mode now computes what training mode does.
    assert modes_differ() < 1e-3
    assert np.all(np.array(frozen.moving_mean) == 0), "a frozen layer's statistics moved"
    assert all(l.momentum == 0.99 for l in backbone.layers
               if isinstance(l, keras.layers.BatchNormalization))


def test_finetune_from_a_layer_name_leaves_earlier_layers_alone(tmp_path, pretrained_weights):
    classifier, backbone = _build(pretrained_weights)
    names = [layer.name for layer in backbone.layers]
    first = LATE_BLOCK
    before = _snapshot(classifier)

    _train(classifier, backbone, tmp_path, head_epochs=0, finetune_epochs=1, unfreeze=first)

    changed = _changed(before, classifier)
    earlier = _weights_of(backbone, lambda l: names.index(l.name) < names.index(first))
    later_convolutions = _weights_of(
        backbone,
        lambda l: names.index(l.name) >= names.index(first)
        and isinstance(l, _CONVOLUTIONS),
    )
    assert not changed & earlier
    assert not changed & _batchnorm_weights(backbone)
    assert later_convolutions <= changed
    assert {w.path for w in classifier.get_layer("head").weights} <= changed


@pytest.mark.parametrize(
    "unfreeze, expected_first",
    [("all", 0), ("10", -10), ("conv5_block3_out", "conv5_block3_out")],
)
def test_each_form_of_unfreeze(unfreeze, expected_first):
    backbone = backbones.build_backbone("resnet50", IMAGE_SIZE, "none")
    layers = backbone.layers
    first = (
        [l.name for l in layers].index(expected_first)
        if isinstance(expected_first, str)
        else expected_first % len(layers)
    )

    unfrozen = finetune.unfreeze_backbone(backbone, unfreeze)

    for index, layer in enumerate(layers):
        should_train = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == should_train, layer.name
    assert set(unfrozen) == {l.name for l in layers[first:] if l.trainable and l.weights}


def test_unfreeze_unknown_layer_names_the_closest():
    backbone = backbones.build_backbone("resnet50", IMAGE_SIZE, "none")
    with pytest.raises(UsageError, match="conv5_block1_1_conv"):
        finetune.first_unfrozen_layer_index(backbone, "conv5_blok1_1_conv")


def test_backbone_weights_from_one_run_seed_another_with_a_new_head(tmp_path):
    source = backbones.build_backbone("resnet50", IMAGE_SIZE, "none")
    classifier_lib.build_classifier(source, "resnet50", 5, IMAGE_SIZE, 0.0)
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)

    target = backbones.build_backbone("resnet50", IMAGE_SIZE, path)
    classifier = classifier_lib.build_classifier(target, "resnet50", 7, IMAGE_SIZE, 0.0)

    assert classifier.output_shape == (None, 7)
    for mine, theirs in zip(target.weights, source.weights):
        np.testing.assert_array_equal(np.array(mine), np.array(theirs))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = str(tmp_path / "mobilenet.weights.h5")
    backbones.build_backbone("mobilenetv3small", IMAGE_SIZE, "none").save_weights(path)
    with warnings.catch_warnings(record=True) as caught, \
            pytest.raises(UsageError, match="doesn't fit the resnet50 backbone") as refused:
        warnings.simplefilter("always")
        backbones.build_backbone("resnet50", IMAGE_SIZE, path)
    # The refusal alone: not Keras' warning for every layer, nor its layer list.
    assert not caught
    assert len(str(refused.value).splitlines()) == 2


def test_recomputed_statistics_can_make_the_last_epoch_the_best(tmp_path, monkeypatch):
    """With --batchnorm=train, epochs validate on moving statistics that lag
    the weights; the last epoch, validated again with recomputed statistics,
    competes for the export with that better figure, and isn't recomputed twice."""
    classifier, backbone = _build("none", train_batchnorm=True)
    recomputed = {"top1": 1.0, "top5": 1.0, "label_smoothed_loss": 0.01}
    calls = []

    def recompute(model, *args):
        calls.append(args)
        return recomputed

    monkeypatch.setattr(finetune, "recompute_statistics_and_validate", recompute)
    _train(classifier, backbone, tmp_path, head_epochs=1, finetune_epochs=2,
           unfreeze=LATE_LAYER, train_batchnorm=True)

    paths = rundir.RunPaths(str(tmp_path))
    best = runstate.Progress(paths.progress).best
    assert (best["phase"], best["epoch"], best["validation"]) == ("finetune", 2, recomputed)
    exported = export_weights.restore_export_weights(
        classifier, backbone, "best", phases=recipe.plan_phases(
            head_epochs=1, head_learning_rate=1e-2, finetune_epochs=2,
            finetune_learning_rate=1e-2, warmup_epochs=0),
        paths=paths, unfreeze=LATE_LAYER, train_batchnorm=True,
        label_smoothing=0.0, train_batches=_batches(), validation_batches=_batches())
    assert (exported["epoch"], exported["validation"]) == (3, recomputed)
    assert len(calls) == 1
    with np.load(paths.phase_end_weights("finetune")) as last:
        for index, weight in enumerate(classifier.get_weights()):
            np.testing.assert_array_equal(weight, last[f"arr_{index}"])


def test_fit_leaves_shuffling_to_the_input_pipeline(frozen_batchnorm_run):
    # Keras can't shuffle a dataset, and warns on every phase when asked to;
    # the run trained with UserWarnings raised as errors.
    _, _, _, shuffles, _ = frozen_batchnorm_run
    assert shuffles == [False, False]


def test_an_epoch_is_recorded_before_it_is_backed_up(frozen_batchnorm_run):
    """A kill between the two must never leave a backup of an epoch that
    history.csv or progress.json lack: the rerun would skip it."""
    _, _, _, _, seen = frozen_batchnorm_run
    # Epochs count from 1 in history.csv; the backup names the epoch to start at.
    assert seen == [(1, True, None), (2, True, 1)]


def test_pending_best_weights_are_kept_only_once_recorded(tmp_path):
    paths = rundir.RunPaths(str(tmp_path))
    os.makedirs(os.path.dirname(paths.best_checkpoint))
    progress = runstate.Progress(paths.progress)
    validation = {"top1": 0.5, "top5": 1.0, "label_smoothed_loss": 0.7}

    # Killed after the checkpoint wrote epoch 2's weights, before progress.json
    # recorded them: they are dropped, and epoch 1's stay the best.
    progress.record_epoch("head", 0, validation, is_best=True)
    with open(paths.pending_best_checkpoint, "w") as file:
        file.write("epoch 1")
    runstate.promote_pending_best(progress, paths)
    with open(paths.pending_best_checkpoint, "w") as file:
        file.write("epoch 2")
    runstate.settle_pending_best(runstate.Progress(paths.progress), paths)
    assert not os.path.exists(paths.pending_best_checkpoint)
    with open(paths.best_checkpoint) as file:
        assert file.read() == "epoch 1"

    # Killed after progress.json recorded epoch 2, before the rename: kept.
    with open(paths.pending_best_checkpoint, "w") as file:
        file.write("epoch 2")
    progress.record_epoch("head", 1, validation, is_best=True)
    settled = runstate.Progress(paths.progress)
    runstate.settle_pending_best(settled, paths)
    with open(paths.best_checkpoint) as file:
        assert file.read() == "epoch 2"
    assert not settled.best_pending and not os.path.exists(paths.pending_best_checkpoint)


@pytest.mark.slow  # test_early_stopping's rerun test takes the same path
def test_a_rerun_after_a_kill_in_the_head_phase_fine_tunes_at_its_own_epochs(tmp_path):
    """The head phase resumes from its backup; fine-tuning, with none, must
    still start at its planned epoch, not where the head phase resumed."""
    import csv

    import tiny_training

    class Killed(Exception):
        pass

    class KillAtSecondEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise Killed

    settings = dict(head_epochs=3, finetune_epochs=2, steps_per_epoch=1)
    model, backbone = tiny_training.build()
    with pytest.raises(Killed):
        tiny_training.train_phases(model, backbone, tmp_path, **settings,
                                   phase_callbacks=lambda phase: [KillAtSecondEpoch()])
    model, backbone = tiny_training.build()
    tiny_training.train_phases(model, backbone, tmp_path, **settings)

    with open(rundir.RunPaths(str(tmp_path)).history, newline="") as file:
        timeline = [(int(row["epoch"]), row["phase"]) for row in csv.DictReader(file)]
    assert timeline == [(1, "head"), (2, "head"), (3, "head"),
                        (4, "finetune"), (5, "finetune")]
