"""Where the run executes: the tf.distribute strategy and the compute dtype."""

import tensorflow as tf

from tl_keras.errors import UsageError


def create_strategy(name):
    """Creates the tf.distribute strategy named by `--strategy`.

    Args:
        name: `auto` (MirroredStrategy when there are GPUs, else the default
            strategy on the CPU), `one_device`, or `mirrored`.

    Returns:
        A `tf.distribute.Strategy`.
    """
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
    """Chooses the Keras dtype policy for `--mixed_precision`.

    Args:
        setting: `auto`, `off`, `bfloat16` or `float16`.

    Returns:
        A tuple (policy name, reason) such as ("mixed_bfloat16", "GPU ...").
    """
    if setting == "off":
        return "float32", "--mixed_precision=off"
    if setting in ("bfloat16", "float16"):
        return f"mixed_{setting}", f"--mixed_precision={setting}"
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16", "TPUs compute in bfloat16"
    capabilities = [
        tf.config.experimental.get_device_details(gpu).get("compute_capability")
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    capabilities = [c for c in capabilities if c]
    if not capabilities:
        return "float32", "no GPU: mixed precision is slower than float32 on CPUs"
    slowest = min(capabilities)
    described = f"GPU compute capability {slowest[0]}.{slowest[1]}"
    # bfloat16 needs Ampere (8.0) or newer; older GPUs get float16, for which
    # Keras wraps the optimizer in loss scaling when the model is compiled.
    if slowest >= (8, 0):
        return "mixed_bfloat16", described
    return "mixed_float16", described
