"""Running a `.tflite` file in LiteRT, the runtime of the `ai-edge-litert`
package: what phones and edge boards run TFLite files in now. TensorFlow's own
`tf.lite.Interpreter` is deprecated and due for deletion; it is used only
where LiteRT has no wheel (Linux on ARM, for one), and then it says so.
"""

import tensorflow as tf

from tl_keras import console

try:
    from ai_edge_litert import interpreter as _litert
except ImportError:  # No wheel for this platform; the fallback below says so.
    _litert = None

# What the console and the benchmarks call the runtime in use.
LITERT = "LiteRT"
FALLBACK = "tf.lite.Interpreter"

_fallback_announced = False


def runtime_name():
    """`LITERT`, or `FALLBACK` where the `ai-edge-litert` package is missing."""
    return LITERT if _litert else FALLBACK


def interpreter(path, num_threads=None):
    """A ready interpreter of the `.tflite` file at `path`: LiteRT's, or where
    the package is missing TensorFlow's, with a note the first time.

    Args:
        num_threads: the threads its kernels may use; None leaves it to the
            runtime.
    """
    if _litert:
        make = _litert.Interpreter
    else:
        _announce_fallback()
        make = tf.lite.Interpreter
    # The interpreter announces its CPU delegate on stderr as it starts.
    with console.native_chatter_dropped():
        ready = make(model_path=path, num_threads=num_threads)
        ready.allocate_tensors()
    return ready


def _announce_fallback():
    global _fallback_announced
    if _fallback_announced:
        return
    _fallback_announced = True
    print("Note: the ai-edge-litert package is not installed (it has no wheel for "
          "some platforms), so .tflite files run in TensorFlow's tf.lite.Interpreter, "
          "which TensorFlow has deprecated. Where a wheel exists, pip install "
          "ai-edge-litert runs them in LiteRT, as phones do.", flush=True)
