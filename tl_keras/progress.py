"""Progress of the long steps outside `fit`: checking files, caching features,
recomputing statistics, exporting.

In a terminal, a Keras progress bar; in a log file, where a bar would be a
line per update, only a start line and an end line with the time taken.
"""

import contextlib
import sys
import time

import keras


class Step:
    """A step in progress; see `step`.

    Attributes:
        result: what the end line says; the step's description when left empty.
    """

    def __init__(self, doing, total, unit):
        self.doing = doing
        self.result = ""
        self._done = 0
        self._bar = (keras.utils.Progbar(total, unit_name=unit)
                     if sys.stdout.isatty() else None)

    def advance(self, count=1):
        """Records `count` more units of work done."""
        self._done += count
        if self._bar:
            self._bar.update(self._done)

    def _finish_bar(self):
        if self._bar:
            self._bar.update(self._done, finalize=True)


@contextlib.contextmanager
def step(doing, total=None, unit="step"):
    """Shows a step that can take more than a few seconds, as it runs.

    Args:
        doing: what it does, e.g. "Checking 1,200 image files".
        total: the units of work it will do; None when unknown.
        unit: their name, e.g. "file"; default `step`.

    Yields:
        A `Step`: call its `advance()` as work gets done, and set its `result`
        to what the end line should say.
    """
    print(f"{doing}...", flush=True)
    started = time.perf_counter()
    current = Step(doing, total, unit)
    try:
        yield current
    finally:
        current._finish_bar()
    print(f"{current.result or doing}, in {time.perf_counter() - started:.1f} s.",
          flush=True)
