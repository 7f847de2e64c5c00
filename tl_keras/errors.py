"""The one exception type a user is meant to read."""


class UsageError(Exception):
    """A problem the user can fix: bad input, missing data or weights, no network.

    `run.py` prints the message alone, without a traceback, and exits with status 2.
    The message names the problem and the fix.
    """
