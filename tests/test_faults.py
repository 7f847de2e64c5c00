"""Surviving faults: SIGKILL and SIGTERM mid-run, reruns, locks, NaN, atomic writes."""

import contextlib
import csv
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pytest

import sliced_mock
from conftest import FINISHED_RUN_FLAGS, REPO_ROOT, SMOKE_FLAGS, run_job, training_only
from tl_keras import errors
from tl_keras import rundir
from tl_keras.errors import UsageError
from tl_keras.outputs import export
from tl_keras.training import callbacks
from tl_keras.training import resume

LAUNCHER = os.path.join(REPO_ROOT, "tests", "mock_run.py")
# Four epochs across both phases, small enough to run in seconds each.
RUN_FLAGS = [f"--flagfile={SMOKE_FLAGS}", "--head_epochs=1", "--finetune_epochs=3",
             "--batch_size=8", "--warmup_epochs=1", "--jit_compile=false",
             # Light: these tests are about the run's bookkeeping, not accuracy.
             # MobileNet cut after its first block (7 layers) traces in a
             # fraction of the whole network's time.
             "--backbone=mobilenet", "--cut_at=1"]


def _start(model_dir, *extra):
    return subprocess.Popen(
        [sys.executable, LAUNCHER, *RUN_FLAGS, f"--model_dir={model_dir}", *extra],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Epochs of over 0.7 s, for the tests to stop them in.
        env=dict(os.environ, MOCK_RUN_STEP_PAUSE="0.1"),
    )


def _finish(process, timeout=400):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _history(model_dir):
    path = os.path.join(model_dir, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _wait_for_epochs(model_dir, count, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(_history(model_dir)) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the run took too long to reach the epoch")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the RUN_FLAGS run, uninterrupted, on the mock data
    mock_run.py gives a process of its own. Only its history is read, so it
    runs in this process (the import of TensorFlow is the dearer part of so
    small a run) and stops after training: no test evaluation or export."""
    model_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    with sliced_mock.mock_data(num_examples=64), training_only():
        # run_job reads the flagfile first (RUN_FLAGS[0]): given again, its
        # --model_dir would win over the one run_job gives.
        run_job(model_dir.parent, *RUN_FLAGS[1:])
    assert len(_history(model_dir)) == 4
    return model_dir


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The RUN_FLAGS run, interrupted twice, as one run can be: SIGKILL once
    it has trained the head and one fine-tuning epoch; the rerun, SIGTERM
    once it has begun epoch 4; the second rerun finishes. The two that are
    stopped run in processes of their own. One chain serves the SIGKILL and
    the SIGTERM tests, saving a start and a head phase; it records what each
    test reads on the way."""
    model_dir = tmp_path_factory.mktemp("interrupted") / "run"
    process = _start(model_dir)
    _wait_for_epochs(model_dir, 2, process)  # the head and one fine-tuning epoch
    # and that epoch's backup, which comes just after its row: the rerun
    # must resume at epoch 3.
    backed_up = model_dir / "backup" / "finetune" / rundir.BACKUP_METADATA_FILE
    while not backed_up.exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.kill()
    process.wait()
    chain = types.SimpleNamespace(model_dir=model_dir)
    chain.lock_left_by_kill = os.path.exists(model_dir / "run.lock")

    process = _start(model_dir)
    _wait_for_epochs(model_dir, 3, process)  # epoch 4 has just begun
    process.send_signal(signal.SIGTERM)
    chain.after_kill = _finish(process)  # the rerun, stopped by SIGTERM
    chain.backed_up = os.path.exists(model_dir / "backup" / "finetune" / "latest.weights.h5")
    chain.exported_when_stopped = os.path.exists(model_dir / "saved_model")
    chain.saved_position = (
        resume.ResumableBackup(str(model_dir / "backup" / "finetune")).saved_position()
        if chain.backed_up else None)

    # The last rerun only has to find what the SIGTERM left and finish the run:
    # it runs in this process, as the reference does, saving a start-up.
    printed = io.StringIO()
    with sliced_mock.mock_data(num_examples=64), contextlib.redirect_stdout(printed):
        run_job(model_dir.parent, *RUN_FLAGS[1:])
    chain.after_sigterm = printed.getvalue()
    return chain


def _epochs_and_phases(model_dir):
    return [(int(row["epoch"]), row["phase"]) for row in _history(model_dir)]


EXPECTED_TIMELINE = [(1, "head"), (2, "finetune"), (3, "finetune"), (4, "finetune")]


@pytest.mark.slow
def test_sigkill_in_phase_two_then_rerun_loses_and_doubles_nothing(interrupted, uninterrupted):
    model_dir = interrupted.model_dir
    assert interrupted.lock_left_by_kill  # left behind by the kill

    code, out, err = interrupted.after_kill  # the rerun, until SIGTERM stopped it
    assert code == 143, err
    assert "Resuming the interrupted run" in out
    assert "Phase head: already complete; skipping it." in out
    # From the backup of epoch 2, not from the phase's start.
    assert "Phase finetune: epochs 2-4, resuming at epoch 3," in out
    assert "Epoch 3/4" in out and "Epoch 2/4" not in out
    assert _epochs_and_phases(model_dir) == EXPECTED_TIMELINE
    # The learning-rate schedule continued where it was: after the resume each
    # epoch ends at the same rate as in the uninterrupted run.
    resumed = [float(row["learning_rate"]) for row in _history(model_dir)]
    reference = [float(row["learning_rate"]) for row in _history(uninterrupted)]
    np.testing.assert_allclose(resumed, reference, rtol=1e-6)
    # The completed head phase trained as the uninterrupted run's did. Later
    # weights can't match bit for bit: each rerun's input pipeline starts its
    # shuffle sequence again, so it sees the examples of the resumed epochs in
    # another order (and epoch 2 is redone if the kill landed after its row
    # but before its backup). Still, it ends nearer the uninterrupted run's
    # final validation loss than that run moved in those epochs: a rerun that
    # lost or skipped them would not.
    losses = [float(row["val_loss"]) for row in _history(model_dir)]
    reference = [float(row["val_loss"]) for row in _history(uninterrupted)]
    np.testing.assert_allclose(losses[:1], reference[:1], rtol=1e-5)
    assert abs(losses[-1] - reference[-1]) < abs(reference[-1] - reference[1]), \
        (losses, reference)
    assert os.path.isdir(model_dir / "saved_model")
    assert not os.path.exists(model_dir / "backup" / "finetune")
    assert not os.path.exists(model_dir / "run.lock")


@pytest.mark.slow
def test_sigterm_saves_a_backup_and_the_rerun_continues_on_schedule(interrupted, uninterrupted):
    model_dir = interrupted.model_dir
    code, out, err = interrupted.after_kill
    assert code == 143, err
    stopped = re.search(r"Received SIGTERM: stopped (after batch (\d+) of|at the end of) "
                        r"epoch (\d+)", err)
    assert stopped, err
    assert "Rerun the same command to continue" in err
    assert interrupted.backed_up
    assert not interrupted.exported_when_stopped
    if stopped.group(2):  # part-way through an epoch: the backup says where
        epoch, batches_done = interrupted.saved_position
        assert (epoch + 1, batches_done) == (int(stopped.group(3)), int(stopped.group(2)))

    if stopped.group(2):
        assert (f"resuming at epoch {stopped.group(3)}, batch "
                f"{int(stopped.group(2)) + 1}") in interrupted.after_sigterm
    assert _epochs_and_phases(model_dir) == EXPECTED_TIMELINE
    # The rerun trains only the rest of the stopped epoch, so the optimizer's
    # step count, and the learning rate with it, is where an uninterrupted
    # run's is at the end of every epoch.
    resumed = [float(row["learning_rate"]) for row in _history(model_dir)]
    reference = [float(row["learning_rate"]) for row in _history(uninterrupted)]
    np.testing.assert_allclose(resumed, reference, rtol=1e-6)


def test_a_complete_run_is_not_retrained_without_overwrite(finished_run_alone):
    """The suite's shared smoke run, rerun with its own flags: any complete
    run will do, and this one is trained anyway."""
    config, _ = finished_run_alone
    model_dir = pathlib.Path(config.model_dir)
    history_before = (model_dir / "history.csv").read_text()
    printed = io.StringIO()
    with sliced_mock.mock_data(num_examples=64), contextlib.redirect_stdout(printed):
        run_job(model_dir.parent, *FINISHED_RUN_FLAGS)
    assert "holds a complete run; nothing to do" in printed.getvalue()
    assert (model_dir / "history.csv").read_text() == history_before


def test_overwrite_deletes_only_what_the_earlier_run_wrote(tmp_path, capsys):
    model_dir = tmp_path / "run"
    os.makedirs(model_dir / "saved_model")
    rundir.mark_complete(str(model_dir))
    (model_dir / "history.csv").write_text("epoch,phase\n0,head\n")
    (model_dir / ".export-abc").mkdir()  # left by a kill during an export
    (model_dir / "notes.md").write_text("my notes on this run")
    with rundir.claim(str(model_dir), "--a=1\n", overwrite=True) as state:
        assert state == rundir.FRESH
        assert sorted(os.listdir(model_dir)) == ["notes.md", rundir.LOCK_FILE]
    assert (model_dir / "notes.md").read_text() == "my notes on this run"
    assert "kept what no run writes: notes.md" in capsys.readouterr().out


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_holds_no_run_is_refused_and_left_alone(tmp_path, overwrite):
    (tmp_path / "thesis.tex").write_text("three years of work")
    (tmp_path / "src").mkdir()
    # Names a run writes too, but not written by one.
    (tmp_path / "flags.txt").write_text("--my_tool_option=1\n")
    (tmp_path / "COMPLETE").write_text("done\n")
    with pytest.raises(UsageError) as refused:
        with rundir.claim(str(tmp_path), "--a=1\n", overwrite=overwrite):
            pass
    message = str(refused.value)
    assert f"--model_dir={tmp_path} is not empty and holds no tl_keras run" in message
    assert "it holds COMPLETE, flags.txt, src, thesis.tex" in message
    assert sorted(os.listdir(tmp_path)) == ["COMPLETE", "flags.txt", "src", "thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "three years of work"


def test_training_into_a_folder_of_the_users_stops_before_any_work(tmp_path, monkeypatch):
    from conftest import parse_config
    from tl_keras.cli import job
    from tl_keras.data import sources

    (tmp_path / "photo.jpg").write_bytes(b"precious")
    monkeypatch.setattr(sources, "load_splits", lambda config: pytest.fail("data was read"))
    config, flagfile_text = parse_config(f"--model_dir={tmp_path}", "--overwrite")
    with pytest.raises(UsageError, match="holds no tl_keras run"):
        job.run_training(config, flagfile_text=flagfile_text, verbose=0, overwrite=True)
    assert os.listdir(tmp_path) == ["photo.jpg"]


def test_a_second_run_on_a_live_runs_folder_is_refused(tmp_path):
    model_dir = str(tmp_path / "run")
    with rundir.claim(model_dir, "--a=1\n", overwrite=False):
        with pytest.raises(UsageError, match=f"its lock file {model_dir}/run.lock is held"):
            with rundir.claim(model_dir, "--a=1\n", overwrite=False):
                pass


def test_a_stale_lock_is_taken_over(tmp_path):
    model_dir = tmp_path / "run"
    os.makedirs(model_dir)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)
    import socket
    (model_dir / rundir.LOCK_FILE).write_text(
        f"{socket.gethostname()} {finished.stdout.strip()}\n")
    with rundir.claim(str(model_dir), "--a=1\n", overwrite=False) as state:
        assert state == rundir.FRESH


def test_an_unfinished_run_with_other_flags_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    os.makedirs(model_dir)
    (model_dir / "flags.txt").write_text(f"{rundir.FLAGS_HEADER}\n--batch_size=8\n--seed=1\n")
    with pytest.raises(UsageError,
                       match=r"other flags \(stored --seed=1, given --seed=2\)"):
        with rundir.claim(str(model_dir), "--batch_size=8\n--seed=2\n", overwrite=False):
            pass
    with rundir.claim(str(model_dir), "# other header\n--batch_size=8\n--seed=1\n",
                      overwrite=False) as state:
        assert state == rundir.RESUME


def test_a_complete_run_with_other_flags_is_refused_not_passed_off_as_theirs(tmp_path):
    model_dir = tmp_path / "run"
    os.makedirs(model_dir)
    (model_dir / "flags.txt").write_text(f"{rundir.FLAGS_HEADER}\n--batch_size=8\n--seed=1\n")
    rundir.mark_complete(str(model_dir))
    with pytest.raises(UsageError, match=r"holds a complete run made with other flags "
                                         r"\(stored --seed=1, given --seed=2\)"):
        with rundir.claim(str(model_dir), "--batch_size=8\n--seed=2\n", overwrite=False):
            pass
    assert sorted(os.listdir(model_dir)) == ["COMPLETE", "flags.txt"]  # Nothing touched.
    with rundir.claim(str(model_dir), "--batch_size=8\n--seed=1\n", overwrite=False) as state:
        assert state == rundir.COMPLETE
    with rundir.claim(str(model_dir), "--batch_size=8\n--seed=2\n", overwrite=True) as state:
        assert state == rundir.FRESH


def test_nan_loss_stops_with_the_likely_causes(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    features = np.ones((8, 3), np.float32)
    features[4:] = np.nan  # the second batch goes NaN
    labels = np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    paths = rundir.RunPaths(str(tmp_path))

    with pytest.raises(errors.TrainingDiverged) as raised:
        model.fit(features, labels, batch_size=4, shuffle=False, verbose=0,
                  callbacks=[callbacks.StopOnNaN(paths)])

    message = str(raised.value)
    assert "became nan at epoch 1, batch 2" in message
    assert "--finetune_learning_rate" in message and "float16" in message


def test_a_failed_export_leaves_the_previous_artifact_whole(tmp_path):
    path = tmp_path / "saved_model"
    os.makedirs(path)
    (path / "saved_model.pb").write_text("the previous, complete model")

    def crash_half_way(temporary):
        os.makedirs(temporary)
        (open(os.path.join(temporary, "saved_model.pb"), "w")).write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export.write_atomically(str(path), crash_half_way)

    assert (path / "saved_model.pb").read_text() == "the previous, complete model"
    assert os.listdir(tmp_path) == ["saved_model"]


def _backed_up_model(tmp_path):
    """(a model, its `ResumableBackup` saved 3 batches into the first epoch)."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    backup = resume.ResumableBackup(str(tmp_path / "backup"))
    backup.set_model(model)
    backup.save_now(0, 3)
    return model, backup


def test_a_kill_during_a_backup_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    model, backup = _backed_up_model(tmp_path)
    weights = tmp_path / "backup" / "latest.weights.h5"
    before = weights.read_bytes()

    def killed_half_way(path, overwrite=True):
        with open(path, "wb") as file:
            file.write(b"half an HDF5 file")
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(model, "save_weights", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        backup.save_now(1, 2)
    assert weights.read_bytes() == before
    assert backup.saved_position() == (0, 3)


def test_a_kill_while_the_backup_records_its_position_leaves_one_a_rerun_reads(
        tmp_path, monkeypatch):
    """training_metadata.json, which a rerun reads first, stays whole JSON."""
    _, backup = _backed_up_model(tmp_path)

    def killed_half_way(value, file, **kwargs):
        file.write(json.dumps(value)[:5])
        file.flush()
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(json, "dump", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        backup.save_now(1, 2)
    monkeypatch.undo()
    # The weights were renamed in before the kill: the rerun restarts the
    # position it last recorded with them, rather than skip batches.
    assert backup.saved_position() == (0, 3)
