"""Where the run executes: the distribution over devices and machines.

With the TensorFlow backend that is a tf.distribute strategy; with JAX, Keras'
own `keras.distribution.DataParallel`. The compute dtype is `tl_keras.training.precision`'s.
"""

import contextlib
import dataclasses
import inspect
import json
import os

import keras
import tensorflow as tf

from tl_keras import rundir
from tl_keras.config import STRATEGIES
from tl_keras.errors import UsageError
from tl_keras.training import runstate


class KerasDistribution:
    """The strategy-like face of `keras.distribution` for non-TensorFlow backends.

    Keras distributes inside `fit` once `set_distribution` is called, so there
    is no scope to enter.
    """

    def __init__(self, num_replicas):
        self.num_replicas_in_sync = num_replicas

    def scope(self):
        return contextlib.nullcontext()


def describe(strategy):
    """A readable name for the strategy or distribution in use."""
    if isinstance(strategy, KerasDistribution):
        kind = "DataParallel" if strategy.num_replicas_in_sync > 1 else "no distribution"
        return f"keras.distribution ({kind}, {keras.backend.backend()} backend)"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        role = worker_role(strategy)
        chief = ", the chief" if role.is_chief else ""
        return f"MultiWorkerMirroredStrategy ({role.name}{chief}, of {role.num_workers} workers)"
    if strategy is tf.distribute.get_strategy():
        # TensorFlow's default strategy, whose class name is private; --strategy=auto
        # picks it only on a machine without GPUs.
        return "the CPU (TensorFlow's default strategy)"
    return type(strategy).__name__



def create_strategy(name, tpu_address=None):
    """Creates the distribution named by `--strategy`.

    Args:
        name: `auto` (TensorFlow: MirroredStrategy when there are GPUs, else the
            default strategy on the CPU; JAX: `keras.distribution.DataParallel`
            over the local devices), or one of the TensorFlow-only `one_device`,
            `mirrored`, `multi_worker` (MultiWorkerMirroredStrategy from the
            `TF_CONFIG` environment variable) and `tpu`.
        tpu_address: `--tpu`, for `tpu`: a TPU name, `grpc://HOST:PORT`, or
            `local` on a TPU VM.

    Returns:
        A `tf.distribute.Strategy`, or a `KerasDistribution` on other backends.

    Raises:
        UsageError: for a tf.distribute strategy on another backend.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        if name != "auto":
            raise UsageError(
                f"--strategy={name} is a tf.distribute strategy, which needs "
                f"KERAS_BACKEND=tensorflow. Under {backend}, pass --strategy=auto: "
                f"it spreads each batch over the local devices with "
                f"keras.distribution.DataParallel.")
        devices = keras.distribution.list_devices()
        if backend == "jax" and len(devices) > 1:
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=devices))
            return KerasDistribution(len(devices))
        return KerasDistribution(1)
    if name == "multi_worker":
        cluster_description(os.environ.get("TF_CONFIG"))  # Fails early, and clearly.
        _fix_keras_fit_for_multi_worker()
        # Created before any other TensorFlow call, since collective ops must be
        # configured before TensorFlow initialises its runtime. Each worker
        # mirrors over all of its local GPUs (or its CPU).
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()
    if name == "one_device":
        device = gpus[0].name if gpus else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        # Without GPUs, mirror over the logical CPU devices: one on an ordinary
        # machine, several where they were configured (the tests do this to run
        # two replicas on one CPU).
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "tpu":
        return _tpu_strategy(tpu_address)
    raise UsageError(f"Unknown --strategy={name}; pass one of {', '.join(STRATEGIES)}.")


def _tpu_strategy(address):
    """TPUStrategy on the TPU at `address`. Untested here (no TPU): kept to
    the three calls TensorFlow's TPU guide prescribes."""
    if not address:
        raise UsageError(
            "--strategy=tpu needs --tpu=ADDRESS: the TPU's name, grpc://HOST:PORT, or "
            "local on a TPU VM.")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as error:
        raise UsageError(
            f"Couldn't reach the TPU at --tpu={address}: {error}\nCheck the name or "
            f"address (local on a TPU VM), and that this machine may use it.") from error
    return tf.distribute.TPUStrategy(resolver)


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's place in a multi-worker cluster.

    Attributes:
        name: e.g. `chief_0` or `worker_1`.
        is_chief: whether it writes the run's outputs. The chief is the task of
            type `chief`, or worker 0 when the cluster has no chief.
        num_workers: how many tasks train together.
    """

    name: str
    is_chief: bool
    num_workers: int


SINGLE_MACHINE = WorkerRole(name="chief_0", is_chief=True, num_workers=1)


def cluster_description(tf_config):
    """Checks the `TF_CONFIG` text of a multi-worker run and reads this task's role.

    Returns:
        A `WorkerRole`.

    Raises:
        UsageError: naming what is missing or wrong, and what it should be.
    """
    example = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if not tf_config:
        raise UsageError(
            f"--strategy=multi_worker reads the cluster from the TF_CONFIG environment "
            f"variable, which is not set. Set it on each host, e.g. TF_CONFIG='{example}' "
            f"(index 0 on the first host, 1 on the second), and run the same command on "
            f"every host.")
    try:
        parsed = json.loads(tf_config)
        cluster, task = parsed["cluster"], parsed["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"TF_CONFIG={tf_config!r} is not a cluster description ({error!r}). It "
            f"should look like {example}.") from error
    if task_type not in ("chief", "worker"):
        raise UsageError(
            f"TF_CONFIG's task type is {task_type!r}; tl_keras trains with chief and "
            f"worker tasks only.")
    members = cluster.get(task_type, []) if isinstance(cluster, dict) else []
    if not 0 <= index < len(members):
        raise UsageError(
            f"TF_CONFIG's task index {index} is out of range: its cluster lists "
            f"{len(members)} {task_type} address(es).")
    is_chief = task_type == "chief" or ("chief" not in cluster and index == 0)
    num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    return WorkerRole(f"{task_type}_{index}", is_chief, num_workers)


def worker_role(strategy):
    """This process's `WorkerRole`; `SINGLE_MACHINE` outside multi-worker runs."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return SINGLE_MACHINE
    return cluster_description(os.environ.get("TF_CONFIG"))


def gather_from_workers(strategy, values):
    """Every worker's `values` (a list of ints), in task order.

    A collective: every worker must call it, at the same point.

    Returns:
        A list with one list of ints per replica of every worker.
    """
    @tf.function
    def gather():
        per_replica = strategy.run(lambda: tf.constant([values], tf.int64))
        return strategy.gather(per_replica, axis=0)

    return gather().numpy().tolist()


# The Keras releases `_fix_keras_fit_for_multi_worker` fits (3.15.1 tested),
# as pyproject.toml pins them.
TESTED_KERAS = ">=3.12,<3.16"

# The Keras internals the fix replaces or calls, with the signatures it was
# written against (in keras.src.backend.tensorflow.trainer).
_PATCHED_SIGNATURES = {
    "_collective_all_reduce_multi_worker": "(strategy)",
    "reduce_per_replica": "(values, strategy, reduction)",
    "TensorFlowTrainer._maybe_symbolic_build": "(self, iterator=None, data_batch=None)",
}


def _check_keras_internals(trainer):
    """Refuses to patch a Keras whose internals differ from those the fix expects.

    Raises:
        UsageError: naming the installed Keras, what changed, and the tested range.
    """
    for path, expected in _PATCHED_SIGNATURES.items():
        target = trainer
        try:
            for name in path.split("."):
                target = getattr(target, name)
            found = str(inspect.signature(target))
        except (AttributeError, TypeError, ValueError):
            found = "missing"
        if found != expected:
            raise UsageError(
                f"--strategy=multi_worker works around two bugs of Keras' fit "
                f"(keras-team/keras#20585) by patching Keras internals, which differ "
                f"in the installed Keras {keras.__version__}: "
                f"keras.src.backend.tensorflow.trainer.{path} is {found}, not "
                f"{expected}. tl_keras is tested with keras{TESTED_KERAS}: "
                f"pip install 'keras{TESTED_KERAS}'.")


def _fix_keras_fit_for_multi_worker():
    """Works around two bugs of Keras 3's `fit` under MultiWorkerMirroredStrategy
    (keras-team/keras#20585), for this process.

    1. `fit` builds the model from its first batch, which it first averages
       across workers; under this strategy that reduce fails on the eager
       per-replica batch. Building needs only the shapes, so one local replica's
       batch does.
    2. Training and evaluation results are averaged across workers with
       `axis=0`, which fails on the scalar metrics and would collapse any
       other result. The mean over workers is element by element: no axis.

    Only code paths taken under MultiWorkerMirroredStrategy change; the
    two-worker test (tests/test_multi_worker.py) fails if a Keras release
    breaks this, and a Keras whose patched functions take other arguments is
    refused.

    Raises:
        UsageError: on a Keras whose internals the fix doesn't fit.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    _check_keras_internals(trainer)
    if getattr(trainer, "_tl_keras_multi_worker_fix", False):
        return
    multi_worker = trainer._collective_all_reduce_multi_worker
    reduce_per_replica = trainer.reduce_per_replica
    maybe_symbolic_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def mean_across_workers(values, strategy, reduction):
        if not (multi_worker(strategy) and reduction in ("auto", "mean")):
            return reduce_per_replica(values, strategy, reduction)
        return tree.map_structure(
            lambda value: strategy.reduce("MEAN", value, axis=None), values)

    def build_from_a_local_batch(self, iterator=None, data_batch=None):
        if (iterator is None or self._distribute_strategy is None
                or not multi_worker(self.distribute_strategy)):
            return maybe_symbolic_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = tree.map_structure(
                lambda value: self.distribute_strategy.experimental_local_results(value)[0],
                next(batches))
            break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = mean_across_workers
    trainer.TensorFlowTrainer._maybe_symbolic_build = build_from_a_local_batch
    trainer._tl_keras_multi_worker_fix = True


def check_batch_size(batch_size, num_replicas):
    """Checks that the global batch splits evenly across the replicas.

    Raises:
        UsageError: naming the nearest batch sizes that would split.
    """
    if batch_size % num_replicas:
        lower = batch_size - batch_size % num_replicas
        upper = lower + num_replicas
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise UsageError(
            f"--batch_size={batch_size} is the global batch, and it doesn't split "
            f"evenly across {num_replicas} replicas. Pass a multiple of "
            f"{num_replicas}, such as {options}."
        )


def agreed_state(strategy, role, model_dir, state):
    """The state every worker of a multi-worker run goes on with.

    A collective: each worker tells the others whether it is the chief, whether
    its folder holds a complete run, and where it would resume. The chief's
    word on completion holds for all. Otherwise every worker must resume where
    the chief does: a kill can land between two workers' end-of-epoch saves,
    and workers resumed from different epochs would wait on each other forever.

    Args:
        strategy, role: the run's strategy and this worker's `worker_role`.
        model_dir: this worker's run folder.
        state: what `tl_keras.rundir.claim` decided for it.

    Returns:
        `rundir.COMPLETE` when the chief's run is complete, else `state`.

    Raises:
        UsageError: on every worker, when they would resume from different places.
    """
    position = [int(state == rundir.COMPLETE),
                *runstate.resume_position(rundir.RunPaths(model_dir))]
    rows = gather_from_workers(strategy, [int(role.is_chief), *position])
    chief = next(row[1:] for row in rows if row[0])
    if chief[0]:
        return rundir.COMPLETE
    if any(row[1:] != chief for row in rows):
        raise UsageError(
            f"The workers' folders disagree about where to resume ({role.name}'s "
            f"{model_dir} says {position}, the chief's {chief}): a kill landed between "
            f"their saves. Rerun every worker with --overwrite to start afresh.")
    return state
