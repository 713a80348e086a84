"""Errors that reach the user as one line naming the fix (kept import-light for the CLI)."""


class DataError(ValueError):
    """The data cannot be used as configured."""


class BadImageError(ValueError):
    """A file that is not a readable image."""


class RunFailedError(RuntimeError):
    """Training stopped on an error after the run folder was made; finished epochs are kept."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training diverged (usually a learning rate too high)."""
