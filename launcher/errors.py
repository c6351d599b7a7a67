"""Errors the CLI reports as one line (exit status 2) instead of a traceback."""


class CommandError(Exception):
    """A user-facing error naming the problem."""
