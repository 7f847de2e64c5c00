"""Beyond one machine: two workers on loopback (killed and resumed), TF_CONFIG
checks, learning-rate scaling, and the TPU path up to the TPU itself."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from absl import flags as absl_flags

from conftest import REPO_ROOT, SMOKE_FLAGS, parse_config
from tl_keras import errors
from tl_keras import rundir
from tl_keras.cli import job
from tl_keras.errors import UsageError
from tl_keras.training import distribute
from tl_keras.training import recipe
from tl_keras.training import resume
from tl_keras.training import runstate

LAUNCHER = os.path.join(REPO_ROOT, "tests", "mock_run.py")
# MobileNet cut after its first block (7 layers): these tests are about
# coordinating workers, and the whole network's tracing took a third of each
# worker's time.
RUN_FLAGS = [f"--flagfile={SMOKE_FLAGS}", "--head_epochs=1", "--finetune_epochs=3",
             "--batch_size=8", "--jit_compile=false", "--backbone=mobilenet",
             "--cut_at=1", "--strategy=multi_worker"]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for one in sockets:
        one.bind(("127.0.0.1", 0))
    ports = [one.getsockname()[1] for one in sockets]
    for one in sockets:
        one.close()
    return ports


def _start_cluster(model_dir):
    """Starts two workers of the smoke run on 127.0.0.1."""
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        environment = dict(os.environ, TF_CONFIG=json.dumps({
            "cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}),
            # Epochs of over 0.7 s, for `cluster_run` to kill them in.
            MOCK_RUN_STEP_PAUSE="0.1")
        processes.append(subprocess.Popen(
            [sys.executable, LAUNCHER, *RUN_FLAGS, f"--model_dir={model_dir}"],
            cwd=REPO_ROOT, env=environment, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return processes


def _finish(processes, timeout=500):
    """Waits for the workers; returns [(exit status, output)]."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            results.append((process.returncode, output))
    finally:
        for process in processes:
            process.kill()
    return results


def _history(model_dir):
    path = os.path.join(model_dir, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as file:
        return [int(row["epoch"]) for row in csv.DictReader(file)]


def _epoch_lines(output):
    """Each epoch's summary from fit's log, without its timings."""
    return [re.sub(r"^\d+/\d+ - [^ ]+ - [^ ]+ - ", "", line)
            for line in output.splitlines() if re.match(r"^\d+/\d+ - .* - loss: ", line)]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """Two workers killed (SIGKILL) early in phase 2's second epoch, then rerun."""
    model_dir = tmp_path_factory.mktemp("cluster") / "run"
    processes = _start_cluster(model_dir)
    deadline = time.time() + 400
    # The head epoch and phase 2's first, backed up by both workers: on a busy
    # machine the other worker's save can come well after the chief's history
    # line, and a kill between the two is refused, as it should be.
    backups = [os.path.join(rundir.RunPaths(folder).backup_dir("finetune"),
                            rundir.BACKUP_METADATA_FILE)
               for folder in (str(model_dir), rundir.worker_dir(str(model_dir), "worker_1"))]
    while len(_history(model_dir)) < 2 or not all(map(os.path.exists, backups)):
        assert time.time() < deadline and all(p.poll() is None for p in processes), \
            _finish(processes, timeout=5)
        time.sleep(0.05)
    # Into the next epoch, well before its end, when both workers save again.
    time.sleep(0.3)
    for process in processes:
        process.send_signal(signal.SIGKILL)
    _finish(processes)
    return model_dir, _finish(_start_cluster(model_dir))


@pytest.mark.slow
def test_two_workers_killed_in_phase_two_resume_as_one(cluster_run):
    model_dir, results = cluster_run
    for code, output in results:
        assert code == 0, output[-3000:]
        assert "Phase finetune: epochs 2-4, resuming at epoch 3" in output
    chief_output, worker_output = results[0][1], results[1][1]
    assert "worker_0, the chief, of 2 workers" in chief_output
    assert "worker_1, of 2 workers" in worker_output

    # Trained together: the epochs' losses and metrics, reduced across both
    # workers, read the same in both logs. Two separate runs on their own
    # shards would differ.
    epochs = _epoch_lines(chief_output)
    assert len(epochs) == 2
    assert epochs == _epoch_lines(worker_output)

    # The chief wrote the run, each epoch once, and exported it.
    assert _history(model_dir) == [1, 2, 3, 4]
    serving = tf.saved_model.load(str(model_dir / "saved_model"))
    outputs = serving.signatures["serving_default"](images=tf.zeros([2, 40, 50, 3], tf.uint8))
    assert outputs["probabilities"].shape == (2, 10)
    for name in ("metrics.json", "model.keras", "backbone.weights.h5", "COMPLETE"):
        assert (model_dir / name).exists(), name

    # The other worker's own folder is gone but for its COMPLETE marker and
    # flags.txt.
    worker_dir = rundir.worker_dir(str(model_dir), "worker_1")
    assert sorted(os.listdir(worker_dir)) == ["COMPLETE", "flags.txt"]


@pytest.mark.slow
def test_a_complete_cluster_run_is_not_retrained(cluster_run):
    model_dir, _ = cluster_run
    for code, output in _finish(_start_cluster(model_dir), timeout=200):
        assert code == 0, output[-3000:]
        assert "holds a complete run; nothing to do" in output
        assert "Epoch 1/" not in output


# What each worker sends: [is chief, complete, then `runstate.resume_position`].
_CHIEF_AT_EPOCH_3 = [1, 0, 1, -1, 0, 2]


def test_workers_that_would_resume_from_different_epochs_refuse(tmp_path, monkeypatch):
    monkeypatch.setattr(distribute, "gather_from_workers",
                        lambda strategy, values: [_CHIEF_AT_EPOCH_3, [0, 0, 1, -1, 0, 1]])
    role = distribute.WorkerRole("worker_1", is_chief=False, num_workers=2)
    with pytest.raises(UsageError, match=r"disagree about where to resume.*--overwrite"):
        distribute.agreed_state(None, role, str(tmp_path), rundir.RESUME)


def test_workers_at_the_chiefs_epoch_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(distribute, "gather_from_workers",
                        lambda strategy, values: [_CHIEF_AT_EPOCH_3, [0, 0, 1, -1, 0, 2]])
    role = distribute.WorkerRole("worker_1", is_chief=False, num_workers=2)
    assert distribute.agreed_state(None, role, str(tmp_path), rundir.RESUME) == rundir.RESUME


def test_a_complete_chief_completes_a_worker_a_kill_left_unfinished(tmp_path, monkeypatch):
    sent = []

    def gather(strategy, values):
        sent.append(values)
        return [[1, 1, 1, -1, 1, -1], values]

    monkeypatch.setattr(distribute, "gather_from_workers", gather)
    role = distribute.WorkerRole("worker_1", is_chief=False, num_workers=2)
    assert distribute.agreed_state(None, role, str(tmp_path), rundir.RESUME) == rundir.COMPLETE
    assert sent == [[0, 0, 0, -1, 0, -1]]  # Every worker sends as many values.


def test_a_fresh_folder_has_no_resume_position(tmp_path):
    assert runstate.resume_position(rundir.RunPaths(str(tmp_path))) == [0, -1, 0, -1]


@pytest.mark.parametrize("tf_config, message", [
    (None, r"TF_CONFIG environment variable, which is not set.*same command on every host"),
    ("{not json", r"is not a cluster description.*should look like"),
    ('{"cluster": {"worker": ["a:1"]}}', r"is not a cluster description"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     r"task index 3 is out of range: its cluster lists 1 worker"),
    ('{"cluster": {"worker": ["a:1"], "evaluator": ["b:1"]}, '
     '"task": {"type": "evaluator", "index": 0}}', r"chief and worker tasks only"),
])
def test_a_bad_tf_config_is_named_with_the_fix(tf_config, message):
    with pytest.raises(UsageError, match=message):
        distribute.cluster_description(tf_config)


def test_the_chief_is_the_chief_task_or_else_worker_zero():
    with_chief = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    def role(cluster, task_type, index):
        return distribute.cluster_description(json.dumps(
            {"cluster": cluster, "task": {"type": task_type, "index": index}}))
    assert role(with_chief, "chief", 0) == distribute.WorkerRole("chief_0", True, 3)
    assert not role(with_chief, "worker", 0).is_chief
    assert role({"worker": ["a:1", "b:1"]}, "worker", 0).is_chief
    assert not role({"worker": ["a:1", "b:1"]}, "worker", 1).is_chief


def test_multi_worker_without_tf_config_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    config, flagfile_text = parse_config(f"--model_dir={tmp_path / 'run'}",
                                         "--strategy=multi_worker")
    with pytest.raises(UsageError, match="TF_CONFIG"):
        job.run_training(config, flagfile_text=flagfile_text, verbose=0)
    assert not (tmp_path / "run").exists()


def test_a_workers_folder_of_a_complete_run_refuses_other_flags_as_the_chiefs_does(tmp_path):
    """Else the worker would call the run complete and wait in `agreed_state`
    for a chief that refused the flags and stopped."""
    worker_dir = tmp_path / "workers" / "worker_1"
    os.makedirs(worker_dir / "backup")
    (worker_dir / rundir.FLAGS_FILE).write_text(f"{rundir.FLAGS_HEADER}\n--seed=1\n")
    (worker_dir / "history.csv").write_text("epoch\n")
    rundir.mark_complete(str(worker_dir))
    rundir.discard_worker_outputs(str(worker_dir))
    assert sorted(os.listdir(worker_dir)) == [rundir.COMPLETE_FILE, rundir.FLAGS_FILE]
    with pytest.raises(UsageError, match="holds a complete run made with other flags"):
        with rundir.claim(str(worker_dir), "--seed=2\n", overwrite=False):
            pass
    with rundir.claim(str(worker_dir), "--seed=1\n", overwrite=False) as state:
        assert state == rundir.COMPLETE


def test_the_chief_leaves_the_workers_folders_to_them(tmp_path):
    model_dir = str(tmp_path)
    os.makedirs(rundir.worker_dir(model_dir, "worker_1"))
    (tmp_path / "history.csv").write_text("epoch\n")
    (tmp_path / rundir.FLAGS_FILE).write_text(f"{rundir.FLAGS_HEADER}\n--a\n")
    with rundir.claim(model_dir, "--a\n", overwrite=True) as state:
        assert state == rundir.FRESH
    assert os.path.isdir(rundir.worker_dir(model_dir, "worker_1"))
    assert not (tmp_path / "history.csv").exists()  # The chief's own files go.


def test_linear_scaling_takes_the_learning_rates_to_be_for_a_batch_of_256():
    assert recipe.learning_rate_scale(64, "none") == 1
    assert recipe.learning_rate_scale(64, "linear") == 0.25
    assert recipe.learning_rate_scale(1024, "linear") == 4


def test_linear_scaling_changes_the_learning_rate_the_run_trains_with(tmp_path, mock_tfds):
    from conftest import run_job, training_only

    with training_only():  # only the history is read
        run_job(tmp_path, "--lr_scaling=linear", "--batch_size=16", "--head_epochs=1",
                "--finetune_epochs=0", "--backbone=mobilenet", "--steps_per_epoch=2",
                "--head_learning_rate=1e-3")
    with open(tmp_path / "run" / "history.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert float(rows[0]["learning_rate"]) == pytest.approx(1e-3 * 16 / 256)


def test_flags_that_need_another_strategy_are_refused():
    with pytest.raises(absl_flags.Error, match=r"--tpu=my-tpu names a TPU.*Add --strategy=tpu"):
        parse_config("--tpu=my-tpu")
    with pytest.raises(absl_flags.Error, match="doesn't train across workers yet"):
        parse_config("--cache_features", "--strategy=multi_worker")


def test_tpu_needs_an_address():
    with pytest.raises(UsageError, match="--strategy=tpu needs --tpu=ADDRESS"):
        distribute.create_strategy("tpu", None)


# Runs in its own process: connecting to a cluster changes TensorFlow's
# process-wide context, which the other tests share.
_FAKE_RESOLVER_SCRIPT = """
import sys
import tensorflow as tf
from tl_keras.errors import UsageError
from tl_keras.training import distribute

class FakeResolver(tf.distribute.cluster_resolver.TPUClusterResolver):
    # A resolver for a TPU that asks no metadata service: an empty cluster, so
    # TensorFlow's own connect and initialise run, and find no TPU here.
    addresses = []

    def __init__(self, tpu=None):
        FakeResolver.addresses.append(tpu)
        self._tpu = tpu.encode()
        self.task_type = self.task_id = self.rpc_layer = None

    def cluster_spec(self):
        return tf.train.ClusterSpec({})

    def master(self, task_type=None, task_id=None, rpc_layer=None):
        return ""

    def get_master(self):
        return ""

    def num_accelerators(self, *args, **kwargs):
        return {}

tf.distribute.cluster_resolver.TPUClusterResolver = FakeResolver
try:
    distribute.create_strategy("tpu", "my-tpu")
except UsageError as error:
    print("UsageError:", error)
print("addresses:", FakeResolver.addresses)
"""


def test_tpu_strategy_asks_the_resolver_for_the_tpu_and_explains_a_failure():
    result = subprocess.run([sys.executable, "-c", _FAKE_RESOLVER_SCRIPT], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert "addresses: ['my-tpu']" in result.stdout, result.stderr[-2000:]
    assert "UsageError: Couldn't reach the TPU at --tpu=my-tpu: TPUs not found" in result.stdout


def test_sigterm_across_workers_saves_no_mid_epoch_backup():
    watcher = resume.PreemptionWatcher(None, steps_per_epoch=10)
    watcher.on_train_begin()
    watcher.on_epoch_begin(2)
    watcher._on_sigterm(None, None)
    with pytest.raises(errors.Preempted, match=r"batch 5 of epoch 3.*from the last completed"):
        watcher.on_train_batch_end(4)


def test_a_keras_whose_internals_changed_is_refused_for_multi_worker(monkeypatch):
    import keras
    from keras.src.backend.tensorflow import trainer

    monkeypatch.setattr(trainer, "_tl_keras_multi_worker_fix", False, raising=False)
    monkeypatch.setattr(trainer, "reduce_per_replica", lambda values, strategy: values)

    with pytest.raises(UsageError) as raised:
        distribute._fix_keras_fit_for_multi_worker()

    message = str(raised.value)
    assert f"the installed Keras {keras.__version__}" in message
    assert "trainer.reduce_per_replica is (values, strategy), not " \
           "(values, strategy, reduction)" in message
    assert "tested with keras>=3.12,<3.16" in message


def test_the_tested_keras_range_is_the_one_pyproject_requires():
    with open(os.path.join(REPO_ROOT, "pyproject.toml")) as file:
        assert f'"keras{distribute.TESTED_KERAS}"' in file.read()
