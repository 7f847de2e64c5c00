"""A quiet console: library chatter off by default, one flag away.

TensorFlow's C++ logging, absl's INFO lines (TFDS, SavedModel export) and
Python warnings from libraries bury the lines a person needs. By default this
module turns them off; absl's own `--verbosity` (0: INFO, 1: DEBUG), given on
the command line or in a flagfile, turns them back on, and a
`TF_CPP_MIN_LOG_LEVEL` the user set is left as set.

`quiet_startup` must run before TensorFlow is imported: TensorFlow reads
`TF_CPP_MIN_LOG_LEVEL` as it loads. This module imports no TensorFlow itself.
"""

import contextlib
import importlib
import importlib.util
import logging as std_logging
import os
import re
import sys
import tempfile
import warnings

from absl import app
from absl import flags
from absl import logging

# A line of TensorFlow's C++ logging or absl's (severity letter, month, day),
# the notice its libraries print before absl's C++ logging is set up, or a
# line of TFLite's own logging ("INFO: Created TensorFlow Lite XNNPACK
# delegate for CPU."), or the TFLite quantizer's summary of a quantized
# conversion ("fully_quantize: 0, inference_type: 6, ...").
_LIBRARY_LINE = re.compile(
    r"[IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog|INFO: "
    r"|fully_quantize: ")

_native_quiet = False


def requested_verbosity(argv):
    """absl's `--verbosity` (`-v`) as given in `argv` or its flagfiles, else None.

    Read before the full parse, since TensorFlow's C++ log level must be set
    before TensorFlow loads, and the full parse needs the modules that load it.
    """
    probe = flags.FlagValues()
    flags.DEFINE_integer("verbosity", None, "", short_name="v", flag_values=probe)
    try:
        probe(list(argv), known_only=True)
    except flags.Error:
        return None  # The full parse reports it, in our words.
    return probe.verbosity


def quiet_startup(argv):
    """Turns library chatter off unless `argv` gives `--verbosity`.

    Call it before anything imports TensorFlow, from a program run with
    `absl.app.run`.

    Args:
        argv: the command line, `sys.argv`.
    """
    global _native_quiet
    verbosity = requested_verbosity(argv)
    if verbosity is not None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    # Grappler's cost-model warnings and cuInit's error are WARNING and ERROR
    # lines of no use to a user; failures that matter reach Python as errors.
    _native_quiet = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3") == "3"
    if not sys.warnoptions:  # A user's -W or PYTHONWARNINGS wins.
        warnings.simplefilter("ignore")
    # absl.app.run raises --verbosity to INFO when it isn't given; lower it
    # again once it has, for TFDS's and the SavedModel export's INFO lines.
    app.call_after_init(lambda: logging.set_verbosity(logging.ERROR))
    with native_chatter_dropped():
        # TensorFlow's libraries print notices as they load, before its log
        # level applies. Under another Keras backend TensorFlow may not be
        # installed at all (the GPU machines here have JAX alone).
        for library in ("tensorflow", "keras"):
            if importlib.util.find_spec(library):
                importlib.import_module(library)


@contextlib.contextmanager
def native_chatter_dropped():
    """Drops the log lines that native code writes to stderr inside the block.

    For the C++ libraries (TFLite's interpreter, TensorFlow as it loads) that
    print whatever `TF_CPP_MIN_LOG_LEVEL` says. Anything else written to stderr
    in the block is written once the block ends. Does nothing when
    `quiet_startup` left the library lines on.
    """
    if not _native_quiet:
        yield
        return
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            sys.stderr.writelines(line for line in text.splitlines(keepends=True)
                                  if not _LIBRARY_LINE.match(line))
            sys.stderr.flush()


@contextlib.contextmanager
def library_logs_dropped(*loggers):
    """Drops what the named Python loggers log inside the block (tf2onnx logs
    the optimisations it skips, with tracebacks, and converts anyway). Does
    nothing when `quiet_startup` left the library lines on."""
    if not _native_quiet:
        yield
        return
    quieted = [std_logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(std_logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)

