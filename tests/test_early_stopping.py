"""--early_stopping: a phase that stops improving ends, the run goes on with
the next phase at its planned epoch, and a rerun doesn't train it again."""

import csv

import pytest

import tiny_training
from tl_keras import rundir
from tl_keras.training import export_weights
from tl_keras.training import runstate
from tl_keras.training import train

# Small enough that validation top-1 never changes: a plateau from the start.
PLATEAU = 1e-12


@pytest.mark.parametrize("top1, epoch, patience, expected", [
    ([0.5, 0.4, 0.4], 2, 2, (2, 0)),
    ([0.5, 0.6, 0.4], 2, 2, None),  # epoch 2 is one epoch after the best
    ([0.5, 0.5, 0.5], 2, 2, (2, 0)),  # as good is not better
    ([0.5, 0.4, 0.9], 1, 1, (1, 0)),  # epoch 2's entry, left by a kill, is to be redone
    ([0.5, 0.4, 0.4], 2, 0, None),  # off
])
def test_a_phase_stops_after_patience_epochs_without_a_better_top1(
        tmp_path, top1, epoch, patience, expected):
    progress = runstate.Progress(str(tmp_path / "progress.json"))
    for recorded, value in enumerate(top1):
        progress.record_epoch("head", recorded, {"top1": value, "top5": 1.0,
                                                 "label_smoothed_loss": 1.0}, is_best=False)

    stop = runstate.Progress(progress.path).early_stop("head", epoch, patience)

    assert (stop and (stop.epoch, stop.best_epoch)) == (expected or None)


def _epochs_and_phases(model_dir):
    with open(rundir.RunPaths(str(model_dir)).history, newline="") as file:
        return [(int(row["epoch"]), row["phase"]) for row in csv.DictReader(file)]


def test_a_plateau_ends_each_phase_and_the_next_starts_at_its_planned_epoch(tmp_path, capsys):
    model, backbone = tiny_training.build()

    tiny_training.train_phases(model, backbone, tmp_path, head_epochs=3, finetune_epochs=3,
                               steps_per_epoch=1, learning_rate=PLATEAU, early_stopping=1)

    out = capsys.readouterr().out
    assert "Phase head stopped early after epoch 2: no better validation top-1 for 1 " \
           "epochs (--early_stopping=1); best" in out
    assert "at epoch 1." in out
    assert "Phase finetune stopped early after epoch 5" in out
    # Fine-tuning keeps its epochs, so every run of these flags numbers them alike.
    assert _epochs_and_phases(tmp_path) == [
        (1, "head"), (2, "head"), (4, "finetune"), (5, "finetune")]
    progress = runstate.Progress(rundir.RunPaths(str(tmp_path)).progress)
    assert progress.phases["head"]["stopped_early"]["epoch"] == 1
    exported = export_weights.restore_export_weights(
        model, backbone, "last", phases=tiny_training.phases(3, 3, PLATEAU),
        paths=rundir.RunPaths(str(tmp_path)), unfreeze="all", train_batchnorm=False,
        label_smoothing=0.0, train_batches=None, validation_batches=None)
    assert (exported["epoch"], exported["phase"]) == (5, "finetune")


def test_a_rerun_after_the_stop_does_not_train_the_phase_again(tmp_path, capsys, monkeypatch):
    class Killed(Exception):
        pass

    def killed(*args):
        raise Killed

    settings = dict(head_epochs=3, finetune_epochs=1, steps_per_epoch=1,
                    learning_rate=PLATEAU, early_stopping=1)
    # Killed after the head phase stopped early, before it was recorded complete.
    finish_phase = train._finish_phase
    monkeypatch.setattr(train, "_finish_phase", killed)
    model, backbone = tiny_training.build()
    with pytest.raises(Killed):
        tiny_training.train_phases(model, backbone, tmp_path, **settings)
    monkeypatch.setattr(train, "_finish_phase", finish_phase)
    capsys.readouterr()

    model, backbone = tiny_training.build()
    tiny_training.train_phases(model, backbone, tmp_path, **settings)

    assert "Phase head: epochs 1-3, stopped early after epoch 2, finishing it" in \
        capsys.readouterr().out
    # Fine-tuning at its own epoch too, though the head phase resumed from a
    # backup and fine-tuning has none.
    assert _epochs_and_phases(tmp_path) == [(1, "head"), (2, "head"), (4, "finetune")]
    progress = runstate.Progress(rundir.RunPaths(str(tmp_path)).progress)
    assert progress.phases["head"]["stopped_early"]["epoch"] == 1
