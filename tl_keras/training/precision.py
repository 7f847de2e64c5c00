"""The compute dtype: mixed precision where the accelerators gain from it.

Backend-agnostic, and importable without TensorFlow (the GPU checks run under
JAX on machines without it): each backend is asked about its own devices.
"""

import keras


def resolve_mixed_precision(setting):
    """Chooses the Keras dtype policy for `--mixed_precision` on this machine.

    Returns:
        A tuple (policy name, reason) such as ("mixed_bfloat16", "GPU ...").
    """
    has_tpu, capabilities = accelerators() if setting == "auto" else (False, [])
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


def accelerators():
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
    import tensorflow as tf

    capabilities = [
        tf.config.experimental.get_device_details(gpu).get("compute_capability")
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    has_tpu = bool(tf.config.list_logical_devices("TPU"))
    return has_tpu, [c for c in capabilities if c]
