"""The exceptions a user reads: `run.py` prints their message, without a
traceback, and exits with a status of their own."""


class UsageError(Exception):
    """A problem the user can fix: bad input, missing data or weights, no network.

    `run.py` exits with status 2. The message names the problem and the fix.
    """


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the input was fine, the training wasn't.

    `run.py` exits with status 1. The message names the likely causes and
    where the last good state is kept.
    """


class Preempted(Exception):
    """The process received SIGTERM; training stopped at the end of a batch.

    `run.py` exits with status 143, as if the signal had ended the process.
    """
