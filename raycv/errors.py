"""Errors that reach the user as one line naming the fix (kept import-light for the CLI)."""


class DataError(ValueError):
    """The data cannot be used as configured."""


class BadImageError(ValueError):
    """A file that is not a readable image."""


class RunFailedError(RuntimeError):
    """Training stopped on an error after the run folder was made; finished epochs are kept."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training diverged (usually a learning rate too high)."""


class CorruptCheckpointError(DataError):
    """A checkpoint file that is not the one written: truncated, or changed on disk since.

    A ``DataError`` so that the CLI shows it as one line: like a bad data file, it is a file
    that cannot be used, and the message names it and the fix."""
