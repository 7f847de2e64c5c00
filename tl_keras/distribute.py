"""Where the run executes: the distribution over devices and the compute dtype.

With the TensorFlow backend that is a tf.distribute strategy; with JAX, Keras'
own `keras.distribution.DataParallel`.
"""

import contextlib

import keras
import tensorflow as tf

from tl_keras.errors import UsageError


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
    return type(strategy).__name__


def create_strategy(name):
    """Creates the distribution named by `--strategy`.

    Args:
        name: `auto` (TensorFlow: MirroredStrategy when there are GPUs, else the
            default strategy on the CPU; JAX: `keras.distribution.DataParallel`
            over the local devices), `one_device`, or `mirrored` (TensorFlow only).

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
    raise UsageError(f"Unknown --strategy={name}; pass auto, one_device or mirrored.")


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


def resolve_mixed_precision(setting):
    """Chooses the Keras dtype policy for `--mixed_precision` on this machine.

    Returns:
        A tuple (policy name, reason) such as ("mixed_bfloat16", "GPU ...").
    """
    has_tpu, capabilities = _accelerators() if setting == "auto" else (False, [])
    return choose_dtype_policy(setting, has_tpu, capabilities)


def choose_dtype_policy(setting, has_tpu, gpu_capabilities):
    """The dtype policy for a setting and the accelerators present.

    Args:
        setting: `auto`, `off`, `bfloat16` or `float16`.
        has_tpu: whether the run is on TPUs.
        gpu_capabilities: the (major, minor) compute capability of each GPU.

    Returns:
        A tuple (policy name, reason).
    """
    if setting == "off":
        return "float32", "--mixed_precision=off"
    if setting in ("bfloat16", "float16"):
        return f"mixed_{setting}", f"--mixed_precision={setting}"
    if has_tpu:
        return "mixed_bfloat16", "TPUs compute in bfloat16"
    capabilities = list(gpu_capabilities)
    if not capabilities:
        return "float32", "no GPU: mixed precision is slower than float32 on CPUs"
    slowest = min(capabilities)
    described = f"GPU compute capability {slowest[0]}.{slowest[1]}"
    # bfloat16 needs Ampere (8.0) or newer; older GPUs get float16, for which
    # Keras wraps the optimizer in loss scaling when the model is compiled.
    if slowest >= (8, 0):
        return "mixed_bfloat16", described
    return "mixed_float16", described


def _accelerators():
    """(whether there are TPUs, the compute capability of each GPU), asked of
    the backend in use."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.devices()
        capabilities = [
            tuple(int(part) for part in str(device.compute_capability).split("."))
            for device in devices
            if device.platform == "gpu" and getattr(device, "compute_capability", None)
        ]
        return any(device.platform == "tpu" for device in devices), capabilities
    if backend == "torch":
        import torch

        return False, [torch.cuda.get_device_capability(index)
                       for index in range(torch.cuda.device_count())]
    capabilities = [
        tf.config.experimental.get_device_details(gpu).get("compute_capability")
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    has_tpu = bool(tf.config.list_logical_devices("TPU"))
    return has_tpu, [c for c in capabilities if c]
